"""Ulysses: all-to-all from sequence sharding to head sharding and back (baseline).

Forward: ONE all-to-all sends every rank its H / W query heads (and the KV heads they read) for
all W * T tokens, q, k and v packed in one buffer; plain single-device blockwise attention runs
on that; ONE all-to-all returns the outputs to sequence sharding. Backward mirrors it: one
all-to-all of dO in, one of the packed (dQ, dK, dV) out. So 2 all-to-alls per direction.

After the all-to-all the tokens arrive in rank-major slot order (rank 0's T tokens, then rank
1's, ...), which under zigzag is not sequence order: their global positions are
``Layout.global_index()`` and the masks are built from those (and the global document ids).

GQA: rank j serves query heads [j H/W, (j+1) H/W). When W divides Hkv, it gets the Hkv / W
KV heads those read. Otherwise every KV head is first repeated m times (m the smallest divisor of
H / Hkv with W | Hkv * m): query head h still reads a copy of KV head h // (H / Hkv), and every
rank gets whole copies. The m copies' gradients are summed on the way back (in fp32, fp64 for
fp64, since they are partial sums).

Memory kept for backward: the head-sharded q, k, v, o for all W * T tokens (the size of the
local shards) and lse.
"""
from __future__ import annotations

import torch

from ..ops.common import compute_dtype
from ..ops.precision import no_autocast
from ..ops.softmax_backends import block_bwd, block_fwd
from . import agreement, comm
from .softmax_common import SoftmaxCall, kv_replication


def _to_heads(x: torch.Tensor, W: int) -> torch.Tensor:
    """[B, T, W * h, d] -> [W, B, T, h * d]: row j holds rank j's heads of the local tokens."""
    B, T = x.shape[:2]
    return x.reshape(B, T, W, -1).permute(2, 0, 1, 3)


def _from_ranks(x: torch.Tensor) -> torch.Tensor:
    """[W, B, T, n] (row j from rank j) -> [B, W * T, n], tokens in rank-major slot order."""
    W, B, T, n = x.shape
    return x.permute(1, 0, 2, 3).reshape(B, W * T, n)


def _unpack(x: torch.Tensor, heads_dims):
    """Split the last dim of [..., n] into contiguous [..., h, d] pieces."""
    out, offset = [], 0
    for h, d in heads_dims:
        out.append(x[..., offset: offset + h * d].reshape(*x.shape[:-1], h, d).contiguous())
        offset += h * d
    return out


def ulysses_fwd(q, k, v, call: SoftmaxCall):
    """Forward on plain tensors (q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv]).

    Returns o [B, T, H, Dv] (q's dtype) and the head-sharded (q, k, v, o, lse) for backward.
    Communication: 1 all-to-all of [W, B, T, (H D + Hkv m (D + Dv)) / W] (every row followed
    by the call's 8-byte agreement digest, checked on arrival) and 1 of [W, B, T, H Dv / W],
    input dtype.
    """
    group, W = call.group, call.rank_and_size()[1]
    B, T, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    m = kv_replication(H, Hkv, W)
    if m > 1:
        k, v = k.repeat_interleave(m, dim=2), v.repeat_interleave(m, dim=2)
    hq, hk = H // W, Hkv * m // W
    n = B * T * (hq * D + hk * (D + Dv))
    send = q.new_empty(W, n + agreement.digest_width(q.dtype))  # row j: rank j's heads, then the digest
    rows = send[:, :n].view(W, B, T, -1)
    rows[..., :hq * D] = _to_heads(q, W)
    rows[..., hq * D: (hq + hk) * D] = _to_heads(k, W)
    rows[..., (hq + hk) * D:] = _to_heads(v, W)
    send[:, n:] = agreement.digest_elements(call.digest, q.dtype, q.device)
    got = comm.all_to_all(send, group)
    agreement.check_stamped(got, call.digest, "sp_softmax_attention(strategy='ulysses')")
    full = _from_ranks(got[:, :n].view(W, B, T, -1))  # [B, W*T, n]: all tokens, my heads
    qh, kh, vh = _unpack(full, [(hq, D), (hk, D), (hk, Dv)])
    oh, lse = block_fwd(call.backend, qh, kh, vh, call.global_mask(q.device), scale=call.scale,
                        block_size=call.block_size)
    back = oh.reshape(B, W, T, hq * Dv).transpose(0, 1)  # row j: rank j's tokens
    o = comm.all_to_all(back, group)  # [W, B, T, hq*Dv], row j: heads of rank j
    o = o.permute(1, 2, 0, 3).reshape(B, T, H, Dv)
    return o, (qh, kh, vh, oh, lse)


def ulysses_bwd(do, saved, call: SoftmaxCall, dtypes, kv_heads: int):
    """Backward: (dq, dk, dv) of this rank's shard in the dtypes ``dtypes`` of (q, k, v);
    ``kv_heads`` is the caller's Hkv (before replication).

    Communication: 1 all-to-all of dO [W, B, T, H Dv / W] (input dtype) and 1 of the packed
    [W, B, T, (H D + Hkv m (D + Dv)) / W] gradients (input dtype; fp32 when m > 1).
    """
    qh, kh, vh, oh, lse = saved
    group, W = call.group, call.rank_and_size()[1]
    B, T, H, Dv = do.shape
    D, Hk = qh.shape[-1], kh.shape[2]
    m = Hk * W // kv_heads
    doh = _from_ranks(comm.all_to_all(_to_heads(do, W), group)).reshape(B, W * T, H // W, Dv)
    ct = compute_dtype(qh.dtype)
    if m > 1:  # the m copies' gradients are partial sums: keep them in the compute dtype
        qh, kh, vh = qh.to(ct), kh.to(ct), vh.to(ct)
    delta = (doh.to(ct) * oh.to(ct)).sum(dim=-1).transpose(1, 2)  # rowsum(dO O) [B, H/W, W T]
    dqh, dkh, dvh = block_bwd(call.backend, doh, qh, kh, vh, lse, call.global_mask(do.device),
                              scale=call.scale, block_size=call.block_size, delta=delta)
    send = torch.cat([x.reshape(B, W, T, -1) for x in (dqh, dkh, dvh)], dim=-1).transpose(0, 1)
    got = comm.all_to_all(send, group).permute(1, 2, 0, 3)  # [B, T, W, n], W: head groups
    dq, dk, dv = _unpack(got, [(H // W, D), (Hk, D), (Hk, Dv)])
    dq = dq.reshape(B, T, H, D)
    dk, dv = dk.reshape(B, T, Hk * W, D), dv.reshape(B, T, Hk * W, Dv)
    if m > 1:  # sum the gradients of the m copies of every KV head
        dk = dk.view(B, T, -1, m, D).sum(3)
        dv = dv.view(B, T, -1, m, Dv).sum(3)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


class UlyssesAttentionFunction(torch.autograd.Function):
    """Thin autograd wrapper: ``apply(q, k, v, call)``, exactly one gradient per forward input."""

    @staticmethod
    def forward(ctx, q, k, v, call: SoftmaxCall):
        o, saved = ulysses_fwd(q, k, v, call)
        ctx.save_for_backward(*saved)
        ctx.call, ctx.dtypes, ctx.kv_heads = call, (q.dtype, k.dtype, v.dtype), k.shape[2]
        return o

    @staticmethod
    @no_autocast
    def backward(ctx, do):
        dq, dk, dv = ulysses_bwd(do.contiguous(), ctx.saved_tensors, ctx.call, ctx.dtypes, ctx.kv_heads)
        return dq, dk, dv, None
