"""LASP-2H: sequence-parallel softmax attention with one collective per direction (DESIGN §1).

Forward, on every rank:
  1. pack the local K and V (only the KV heads under GQA, in the input dtype: they are
     activations, not states) into one buffer and launch ONE all-gather;
  2. while it is in flight, attend the local queries to the local keys;
  3. attend them to every other rank's keys that the mask does not fully hide, and merge the
     partial results with their log-sum-exps.
Masks come from global positions (``Layout``) and global document ids, never from "the upper
triangle of a square": a gathered slot (rank j, t) holds global token ``global_positions(j)[t]``.
Backward: local dQ, plus dK/dV of every gathered slot computed from the final (o, lse); ONE
reduce-scatter of the packed [W, B, T, Hkv, D + Dv] partial gradients returns each rank the sum
over all ranks of its own tokens' dK/dV. The partial sums travel in fp32 (fp64 for fp64 inputs)
because they are summed across ranks.

Memory kept for backward: q, o, lse and the gathered K/V, [W, B, T, Hkv, D + Dv] in the input
dtype (W times the local K/V). Re-gathering in backward would save that memory at the cost of a
second collective; LASP-2H keeps one collective per direction.

The small mask helpers at the bottom are shared with ``ring_attention`` and ``ulysses``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..ops.softmax import attention_block_bwd, attention_block_fwd, merge_attention
from . import comm
from .layout import Layout
from ..ops.precision import no_autocast

BLOCK_SIZE = 256  # tile size of the blockwise kernels (rows of a query block and a key block)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; half precision is accumulated and exchanged (gradients) in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def allgather_fwd(q, k, v, *, scale: float, causal: bool, layout: Layout, group,
                  doc: Optional[torch.Tensor], block_size: int = BLOCK_SIZE):
    """Forward on plain tensors.

    Args: q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] (this rank's shard); doc: global
        document id of every global position [W * T] int64, or None.
    Returns: o [B, T, H, Dv] (q's dtype), lse [B, H, T] (fp32; fp64 for fp64), the gathered
        K/V [W, B, T, Hkv, D + Dv] (input dtype) and the per-slot visibility list.
    Communication: 1 all-gather of [W, B, T, Hkv, D + Dv] in the input dtype.
    """
    rank, W = comm.rank_and_size(group)
    D, ct = k.shape[-1], compute_dtype(q.dtype)
    q_pos, q_doc = positions_and_docs(layout, rank, doc, q.device)
    pending = comm.all_gather(torch.cat([k, v], dim=-1), group, async_op=True)
    mask = dict(scale=scale, causal=causal, block_size=block_size, out_dtype=ct)
    # The diagonal slot needs nothing from the others: compute it while the gather runs.
    o, lse = attention_block_fwd(q, k, v, q_pos=q_pos, k_pos=q_pos, q_doc=q_doc, k_doc=q_doc, **mask)
    visible = [any_visible(q_pos, q_doc, *positions_and_docs(layout, j, doc, q.device), causal)
               for j in range(W)]
    kv_all = pending.wait()
    for j in range(W):
        if j != rank and visible[j]:  # a slot the mask fully hides costs no compute
            k_pos, k_doc = positions_and_docs(layout, j, doc, q.device)
            o_j, lse_j = attention_block_fwd(q, kv_all[j, ..., :D], kv_all[j, ..., D:], q_pos=q_pos,
                                             k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, **mask)
            o, lse = merge_attention(o, lse, o_j, lse_j)
    return o.to(q.dtype), lse, kv_all, visible


def allgather_bwd(do, q, o, lse, kv_all, visible: List[bool], *, scale: float, causal: bool,
                  layout: Layout, group, doc: Optional[torch.Tensor], dtypes,
                  block_size: int = BLOCK_SIZE):
    """Backward: (dq, dk, dv) of this rank's shard, in the dtypes ``dtypes`` of (q, k, v).

    Communication: 1 reduce-scatter of [W, B, T, Hkv, D + Dv] fp32 (fp64 for fp64 inputs).
    """
    rank, W = comm.rank_and_size(group)
    ct = compute_dtype(q.dtype)
    D = q.shape[-1]
    q_pos, q_doc = positions_and_docs(layout, rank, doc, q.device)
    # delta = rowsum(dO * O) of the *whole* attention: each slot's backward then gives exactly
    # that slot's share of dQ and the slot's dK/dV (attention_block_bwd on a key subset).
    delta = (do.to(ct) * o.to(ct)).sum(dim=-1).transpose(1, 2)
    qc = q.to(ct)  # dQ partials are summed over slots: keep them in the compute dtype
    dq = torch.zeros_like(qc)
    dkv = kv_all.new_zeros(kv_all.shape, dtype=ct)  # row j goes back to rank j
    for j in range(W):
        if not visible[j]:
            continue
        k_pos, k_doc = positions_and_docs(layout, j, doc, q.device)
        dq_j, dk_j, dv_j = attention_block_bwd(
            do, qc, kv_all[j, ..., :D].to(ct), kv_all[j, ..., D:].to(ct), None, lse, delta=delta,
            scale=scale, causal=causal, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc,
            block_size=block_size)
        dq += dq_j
        dkv[j, ..., :D] = dk_j
        dkv[j, ..., D:] = dv_j
    # Every rank issues the reduce-scatter, even one whose slots were all hidden.
    mine = comm.reduce_scatter(dkv, group)
    return dq.to(dtypes[0]), mine[..., :D].to(dtypes[1]), mine[..., D:].to(dtypes[2])


class AllGatherAttentionFunction(torch.autograd.Function):
    """Thin autograd wrapper: exactly one gradient per forward input."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout, group, doc):
        o, lse, kv_all, visible = allgather_fwd(q, k, v, scale=scale, causal=causal, layout=layout,
                                                group=group, doc=doc)
        ctx.save_for_backward(q, o, lse, kv_all)
        ctx.args = dict(scale=scale, causal=causal, layout=layout, group=group, doc=doc,
                        dtypes=(q.dtype, k.dtype, v.dtype))
        ctx.visible = visible
        return o

    @staticmethod
    @no_autocast
    def backward(ctx, do):
        q, o, lse, kv_all = ctx.saved_tensors
        dq, dk, dv = allgather_bwd(do, q, o, lse, kv_all, ctx.visible, **ctx.args)
        return dq, dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------- shared helpers


def positions_and_docs(layout: Layout, rank: int, doc: Optional[torch.Tensor],
                       device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Global positions [T] of ``rank``'s tokens and their document ids (None without docs)."""
    pos = layout.global_positions(rank, device)
    return pos, None if doc is None else doc[pos]


def any_visible(q_pos: torch.Tensor, q_doc: Optional[torch.Tensor], k_pos: torch.Tensor,
                k_doc: Optional[torch.Tensor], causal: bool) -> bool:
    """Whether any key is visible to any query (exact, O(Tq + Tk + documents), no [Tq, Tk]).

    A key j is visible to query i iff same document and (not causal or k_pos <= q_pos). Per
    document d that happens iff min k_pos over d's keys <= max q_pos over d's queries.
    """
    if q_doc is None:
        return (not causal) or bool(k_pos.min() <= q_pos.max())
    n = int(torch.maximum(q_doc.max(), k_doc.max())) + 1
    big = torch.iinfo(torch.int64).max
    # Without the causal mask any query of document d sees every key of d: use q_pos = big - 1.
    q_val = q_pos if causal else torch.full_like(q_pos, big - 1)
    k_min = torch.full((n,), big, dtype=torch.int64, device=k_pos.device).scatter_reduce(
        0, k_doc, k_pos, "amin")
    q_max = torch.full((n,), -1, dtype=torch.int64, device=q_pos.device).scatter_reduce(
        0, q_doc, q_val, "amax")
    return bool((k_min <= q_max).any())
