"""Multi-head latent attention (MLA) under sequence parallelism: gather the latent, not K and V.

MLA (DeepSeek-V2; Kimi Linear's softmax layers) computes every token's keys and values from a
small per-token latent c_t (the normalised KV latent and the decoupled RoPE key, concatenated,
R = kv_lora_rank + rope dim) by a token-wise up-projection: K_t, V_t = expand(c_t). Because
``expand`` acts on each token alone, expanding the gathered latents of all ranks gives exactly the
K and V an all-gather of the expanded ones would (LASP-2H, ``softmax_allgather.py``), while moving
R values per token instead of H (Dk + Dv):

    forward   1 all-gather of [W, B, T, R] (input dtype) + 8-byte agreement digest
              K, V = expand(latents of every rank)           (recomputed on each rank: W x the
                                                             up-projection FLOPs of one shard)
              local queries attend to every visible slot     (``ops.softmax`` blocks, merged)
    backward  dK, dV of every slot -> d latent through expand (autograd), then
              1 reduce-scatter of [W, B, T, R] (fp32; fp64 for fp64): each rank gets the sum
              over ranks of its own tokens' latent gradient.

Bytes per rank and direction: (W - 1) B T R x element size, against (W - 1) B T H (Dk + Dv) for
the up-projected K/V (``latent_bytes_per_rank`` / ``kv_bytes_per_rank``; docs/algorithm.md).
``lasp2.hf``'s Kimi Linear adapter takes this path when it moves fewer bytes.

Masks come from global positions and global document ids (``SoftmaxCall``), as every softmax
strategy's. Memory kept for backward: the gathered latent and the expanded K/V of all W slots.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import functional
from ..ops.common import compute_dtype
from ..ops.precision import no_autocast
from ..ops.softmax import attention_block_bwd, attention_block_fwd, doc_ids_from_cu_seqlens, merge_attention
from ..validation import check_cu_seqlens, check_group, check_scale, check_tensor, resolve_scale
from . import agreement, comm
from .batch import SPBatch, resolve_placement
from .layout import Layout
from .softmax_common import SoftmaxCall

Expand = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def latent_bytes_per_rank(W: int, B: int, T: int, R: int, element_size: int) -> int:
    """Bytes one rank receives in the latent all-gather (and sends in the backward
    reduce-scatter, at the gradient's element size): (W - 1) B T R."""
    return (W - 1) * B * T * R * element_size


def kv_bytes_per_rank(W: int, B: int, T: int, H: int, Dk: int, Dv: int, element_size: int) -> int:
    """The same for LASP-2H on the up-projected K/V: (W - 1) B T H (Dk + Dv)."""
    return (W - 1) * B * T * H * (Dk + Dv) * element_size


class _GatherLatent(torch.autograd.Function):
    """[B, T, R] -> [W, B, T, R]: every rank's latent (slot j = rank j's tokens). Backward: one
    reduce-scatter of the slots' gradients, in the compute dtype (they are summed over ranks)."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, call: SoftmaxCall) -> torch.Tensor:
        W = call.rank_and_size()[1]
        n = latent.numel()
        buf = latent.new_empty(n + agreement.digest_width(latent.dtype))
        buf[:n] = latent.reshape(-1)
        buf[n:] = agreement.digest_elements(call.digest, latent.dtype, latent.device)
        gathered = comm.all_gather(buf, call.group)
        agreement.check_stamped(gathered, call.digest, "sp_mla_attention")
        ctx.call, ctx.dtype = call, latent.dtype
        return gathered[:, :n].reshape(W, *latent.shape)

    @staticmethod
    @no_autocast
    def backward(ctx, d_slots: torch.Tensor):
        mine = comm.reduce_scatter(d_slots.to(compute_dtype(ctx.dtype)), ctx.call.group)
        return mine.to(ctx.dtype), None


class _SlotAttention(torch.autograd.Function):
    """Local queries q [B, T, H, D] against the keys/values of every slot, k [W, B, T, H, D],
    v [W, B, T, H, Dv], under ``call``'s masks; slots the mask fully hides cost nothing. No
    communication: the gradients of k and v stay per slot (the latent's reduce-scatter sums them)."""

    @staticmethod
    def forward(ctx, q, k, v, call: SoftmaxCall):
        rank, W = call.rank_and_size()
        ct = compute_dtype(q.dtype)
        visible = call.visibility(rank, q.device)
        o = lse = None
        for j in range(W):
            if not visible[j]:
                continue
            o_j, lse_j = attention_block_fwd(q, k[j], v[j], call.mask(rank, j, q.device), scale=call.scale,
                                             block_size=call.block_size, out_dtype=ct)
            o, lse = (o_j, lse_j) if o is None else merge_attention(o, lse, o_j, lse_j)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.call, ctx.visible = call, visible
        return o.to(q.dtype)

    @staticmethod
    @no_autocast
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        call, rank = ctx.call, ctx.call.rank_and_size()[0]
        ct = compute_dtype(q.dtype)
        delta = (do.to(ct) * o).sum(dim=-1).transpose(1, 2)  # rowsum(dO * O) of the whole attention
        qc = q.to(ct)
        dq = torch.zeros_like(qc)
        dk, dv = torch.zeros_like(k, dtype=ct), torch.zeros_like(v, dtype=ct)
        for j, seen in enumerate(ctx.visible):
            if seen:
                dq_j, dk[j], dv[j] = attention_block_bwd(do, qc, k[j].to(ct), v[j].to(ct), None, lse,
                                                         call.mask(rank, j, q.device), scale=call.scale,
                                                         block_size=call.block_size, delta=delta)
                dq += dq_j
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def sp_mla_attention(q: torch.Tensor, latent: torch.Tensor, expand: Expand, *, group=None,
                     scale: Optional[float] = None, layout: Optional[str] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, batch: Optional[SPBatch] = None) -> torch.Tensor:
    """Causal multi-head latent attention over the SP group, gathering the latent (module docstring).

    Args:
        q: [B, T, H, Dk] this rank's queries (T local, in ``layout``).
        latent: [B, T, R] this rank's per-token latent (same dtype and device as q).
        expand: token-wise ``latent [B', T', R] -> (k [B', T', H, Dk], v [B', T', H, Dv])`` (the
            layer's up-projection; its parameters receive their gradients through it). It must
            not mix tokens: it runs on the gathered latents of every rank.
        group, layout, cu_seqlens, batch: as ``sp_softmax_attention`` (``batch`` in place of the
            other three). scale: defaults to Dk ** -0.5.

    Returns: o [B, T, H, Dv], this rank's shard of causal softmax attention on the whole sequence
    with K, V = expand(latent) of every token, in q's dtype.

    Communication (W > 1): forward 1 all-gather of [W, B, T, R] in the input dtype (+ an 8-byte
    agreement digest); backward 1 reduce-scatter of [W, B, T, R] in fp32 (fp64 for fp64). The
    first call with new shapes on a group adds one small agreement all-gather (then cached).
    """
    group, layout, cu_seqlens = resolve_placement(batch, group, layout, cu_seqlens, "sp_mla_attention")
    check_group(group)
    check_tensor("q", q, 4, "[B, T, H, Dk]")
    check_tensor("latent", latent, 3, "[B, T, R]")
    if latent.shape[:2] != q.shape[:2] or latent.dtype != q.dtype or latent.device != q.device:
        raise ValueError(f"latent must be [B, T, R] with q's B, T = {tuple(q.shape[:2])}, dtype {q.dtype} and "
                         f"device {q.device}; got {tuple(latent.shape)}, {latent.dtype}, {latent.device}")
    check_scale(scale)
    rank, world = comm.rank_and_size(group)
    lay = Layout(layout, world, q.shape[1])
    if batch is None:
        check_cu_seqlens(cu_seqlens, lay.global_len, q.shape[0], device=q.device)
    else:
        batch.check_local(q.shape[1], q.shape[0], "sp_mla_attention")
    scale = resolve_scale(scale, q)
    signature = (f"sp_mla_attention layout={layout} scale={scale!r} q={tuple(q.shape)}:{q.dtype} "
                 f"latent={tuple(latent.shape)} docs={cu_seqlens is not None}")
    comm.ensure_agreement(group, signature)
    if world == 1:
        k, v = expand(latent)
        return functional.softmax_attention(q, k, v, scale=scale, causal=True, cu_seqlens=cu_seqlens)
    doc = None if cu_seqlens is None else doc_ids_from_cu_seqlens(cu_seqlens.to(q.device), lay.global_len)
    checks = batch is None or batch.checks
    digest = agreement.call_digest(signature, cu_seqlens) if checks else agreement.UNCHECKED
    cu_list = None if cu_seqlens is None else (batch.cu_list if batch is not None else tuple(cu_seqlens.tolist()))
    call = SoftmaxCall(scale, True, lay, group, doc, digest=digest, cu_list=cu_list)
    slots = _GatherLatent.apply(latent, call)  # [W, B, T, R]
    k, v = expand(slots.flatten(0, 1))  # [W * B, T, H, D]: token-wise, so per slot
    B, T = q.shape[:2]
    return _SlotAttention.apply(q, k.reshape(world, B, T, *k.shape[2:]), v.reshape(world, B, T, *v.shape[2:]), call)
