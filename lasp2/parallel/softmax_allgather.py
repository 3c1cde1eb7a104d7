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

Per-call state (scale, mask options, layout, group, documents) is one ``SoftmaxCall``
(``softmax_common``), shared with ``ring_attention`` and ``ulysses``.
"""
from __future__ import annotations

from typing import List

import torch

from ..ops.common import compute_dtype
from ..ops.precision import no_autocast
from ..ops.softmax import attention_block_bwd, attention_block_fwd, merge_attention
from . import agreement, comm
from .softmax_common import SoftmaxCall


def allgather_fwd(q, k, v, call: SoftmaxCall):
    """Forward on plain tensors.

    Args: q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] (this rank's shard); call: the
        per-call state (scale, causal, layout, group, global document ids, block size).
    Returns: o [B, T, H, Dv] (q's dtype), lse [B, H, T] (fp32; fp64 for fp64), the gathered
        K/V [W, B, T, Hkv, D + Dv] (input dtype) and the per-slot visibility list.
    Communication: 1 all-gather of [W, B, T, Hkv, D + Dv] in the input dtype, plus the call's
    8-byte agreement digest (checked before the gathered K/V are used).
    """
    rank, W = call.rank_and_size()
    D, ct = k.shape[-1], compute_dtype(q.dtype)
    B, T, Hkv = k.shape[:3]
    n = B * T * Hkv * (D + v.shape[-1])
    buf = k.new_empty(n + agreement.digest_width(k.dtype))  # [K | V] then the digest: one copy
    kv = buf[:n].view(B, T, Hkv, -1)
    kv[..., :D], kv[..., D:] = k, v
    buf[n:] = agreement.digest_elements(call.digest, k.dtype, k.device)
    pending = comm.all_gather(buf, call.group, async_op=True)
    opts = dict(scale=call.scale, block_size=call.block_size, out_dtype=ct)
    # The diagonal slot needs nothing from the others: compute it while the gather runs.
    o, lse = attention_block_fwd(q, k, v, call.mask(rank, rank, q.device), **opts)
    visible = call.visibility(rank, q.device)
    gathered = pending.wait()
    agreement.check_stamped(gathered, call.digest, "sp_softmax_attention(strategy='allgather')")
    kv_all = gathered[:, :n].view(W, B, T, Hkv, -1)
    for j in range(W):
        if j != rank and visible[j]:  # a slot the mask fully hides costs no compute
            o_j, lse_j = attention_block_fwd(q, kv_all[j, ..., :D], kv_all[j, ..., D:],
                                             call.mask(rank, j, q.device), **opts)
            o, lse = merge_attention(o, lse, o_j, lse_j)
    return o.to(q.dtype), lse, kv_all, visible


def allgather_bwd(do, q, o, lse, kv_all, visible: List[bool], call: SoftmaxCall, dtypes):
    """Backward: (dq, dk, dv) of this rank's shard, in the dtypes ``dtypes`` of (q, k, v).

    Communication: 1 reduce-scatter of [W, B, T, Hkv, D + Dv] fp32 (fp64 for fp64 inputs).
    """
    rank, W = call.rank_and_size()
    ct = compute_dtype(q.dtype)
    D = q.shape[-1]
    # delta = rowsum(dO * O) of the *whole* attention: each slot's backward then gives exactly
    # that slot's share of dQ and the slot's dK/dV (attention_block_bwd on a key subset).
    delta = (do.to(ct) * o.to(ct)).sum(dim=-1).transpose(1, 2)
    qc = q.to(ct)  # dQ partials are summed over slots: keep them in the compute dtype
    dq = torch.zeros_like(qc)
    dkv = kv_all.new_zeros(kv_all.shape, dtype=ct)  # row j goes back to rank j
    for j in range(W):
        if not visible[j]:
            continue
        dq_j, dk_j, dv_j = attention_block_bwd(
            do, qc, kv_all[j, ..., :D].to(ct), kv_all[j, ..., D:].to(ct), None, lse,
            call.mask(rank, j, q.device), scale=call.scale, block_size=call.block_size, delta=delta)
        dq += dq_j
        dkv[j, ..., :D] = dk_j
        dkv[j, ..., D:] = dv_j
    # Every rank issues the reduce-scatter, even one whose slots were all hidden.
    mine = comm.reduce_scatter(dkv, call.group)
    return dq.to(dtypes[0]), mine[..., :D].to(dtypes[1]), mine[..., D:].to(dtypes[2])


def kv_in_sequence_order(kv_all: torch.Tensor, layout, D: int):
    """Gathered [W, B, T, Hkv, D + Dv] (rank-major, each rank's local order) -> (K [B, W T, Hkv, D],
    V [B, W T, Hkv, Dv]) of the whole sequence in global order (zigzag segments put back)."""
    segments = [layout.segment(j) for j in range(layout.num_segments)]
    whole = torch.cat([kv_all[s.owner, :, s.local_start: s.local_start + s.length] for s in segments], dim=1)
    return whole[..., :D], whole[..., D:]


class AllGatherAttentionFunction(torch.autograd.Function):
    """Thin autograd wrapper: ``apply(q, k, v, call[, return_kv])``, exactly one gradient per
    forward input. With ``return_kv`` it also returns the gathered K/V [W, B, T, Hkv, D + Dv]
    (not differentiable: a decode cache, ``sp_softmax_attention(return_kv=True)``)."""

    @staticmethod
    def forward(ctx, q, k, v, call: SoftmaxCall, return_kv: bool = False):
        o, lse, kv_all, visible = allgather_fwd(q, k, v, call)
        ctx.save_for_backward(q, o, lse, kv_all)
        ctx.call, ctx.visible, ctx.dtypes = call, visible, (q.dtype, k.dtype, v.dtype)
        if return_kv:
            kv_out = kv_all.detach().clone()  # the saved buffer stays private to backward
            ctx.mark_non_differentiable(kv_out)
            return o, kv_out
        return o

    @staticmethod
    @no_autocast
    def backward(ctx, do, *_):
        q, o, lse, kv_all = ctx.saved_tensors
        dq, dk, dv = allgather_bwd(do, q, o, lse, kv_all, ctx.visible, ctx.call, ctx.dtypes)
        return dq, dk, dv, None, None
