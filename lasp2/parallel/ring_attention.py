"""Ring Attention: the K/V blocks rotate around the ring, merged with online softmax (baseline).

Forward: at step s (0 <= s < W) rank r holds the K/V block of rank ``(r - s) mod W``. It first
launches the hop that passes this block to r + 1 (and receives the next one from r - 1), then
computes on the block it holds, so the transfer overlaps the compute; W - 1 hops in all. A block
whose keys the causal / document mask fully hides is skipped (no compute) but still forwarded.
Partial results are merged with their log-sum-exps (``merge_attention``). Masks come from the
global positions of the block's owner under the layout, so contiguous and zigzag both work.

Backward (W - 1 hops, each launched before the step's compute): at step s rank r computes the
contribution of its queries to block ``b_s = (r + 1 + s) mod W``, i.e. the blocks run in the
*opposite* order to the forward, so the first two (r + 1 and r + 2) are the last two blocks the
forward received and are kept from it, and the last one is r's own. The dK/dV accumulator of
block b travels b - 1 -> b - 2 -> ... -> b (its owner) one step behind: at step s the hop to
r - 1 carries the accumulator of b_{s-1} (with r's share added) and, for 1 <= s <= W - 3, the K/V
block that r - 1 needs at step s + 1. Accumulators are fp32 (fp64 for fp64 inputs); K/V stay in
the input dtype; both travel as one byte buffer (one message per hop).

Memory kept for backward: q, o, lse, the own K/V and up to two received K/V blocks.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..ops.common import compute_dtype
from ..ops.precision import no_autocast
from ..ops.softmax import merge_attention
from ..ops.softmax_backends import block_bwd, block_fwd
from . import agreement, comm
from .softmax_common import SoftmaxCall


def _to_bytes(*tensors: torch.Tensor) -> torch.Tensor:
    """Tensors of any dtypes as one flat uint8 buffer (one message instead of several)."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def _from_bytes(buf: torch.Tensor, likes: List[torch.Tensor]) -> List[torch.Tensor]:
    out, offset = [], 0
    for like in likes:
        n = like.numel() * like.element_size()
        out.append(buf[offset: offset + n].view(like.dtype).view(like.shape))
        offset += n
    return out


def ring_fwd(q, k, v, call: SoftmaxCall):
    """Forward on plain tensors (q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv]).

    Returns o (q's dtype), lse [B, H, T] (fp32; fp64 for fp64), the K/V blocks kept for the
    backward {owner: [B, T, Hkv, D + Dv]} and the visibility of every owner's block.
    Communication: W - 1 hops (send to r + 1, recv from r - 1) of [B, T, Hkv, D + Dv], each block
    followed by its owner's 8-byte agreement digest; every rank checks every owner's at the end
    (after the last hop, so no rank is left waiting).
    """
    rank, W = call.rank_and_size()
    D, ct = k.shape[-1], compute_dtype(q.dtype)
    keep_owners = {(rank + 1) % W, (rank + 2) % W}  # the backward's first two blocks
    # Decided up front (host-side, O(T) each) so that the loop below only launches work.
    visible = call.visibility(rank, q.device)
    B, T, Hkv = k.shape[:3]
    n = B * T * Hkv * (D + v.shape[-1])
    msg = k.new_empty(n + agreement.digest_width(k.dtype))  # [K | V] then its owner's digest
    kv = msg[:n].view(B, T, Hkv, -1)
    kv[..., :D], kv[..., D:] = k, v
    msg[n:] = agreement.digest_elements(call.digest, k.dtype, k.device)
    cur, digests = kv, {}
    o = lse = None
    kept: Dict[int, torch.Tensor] = {}
    for s in range(W):
        src = (rank - s) % W
        hop = comm.send_recv(msg, (rank + 1) % W, msg, (rank - 1) % W, call.group) if s < W - 1 else None
        if visible[src]:  # a hidden block costs no compute but still travels on
            o_s, lse_s = block_fwd(call.backend, q, cur[..., :D], cur[..., D:], call.mask(rank, src, q.device),
                                   scale=call.scale, block_size=call.block_size, out_dtype=ct)
            o, lse = (o_s, lse_s) if o is None else merge_attention(o, lse, o_s, lse_s)
        if src in keep_owners and src != rank:
            kept[src] = cur
        if hop is not None:
            msg = hop.wait()
            cur = msg[:n].view(B, T, Hkv, -1)
            digests[(src - 1) % W] = msg[n:]  # checked once after the last hop: no sync per hop
    owners = list(digests)
    if owners and call.digest != agreement.UNCHECKED:
        agreement.check(agreement.read_digests(torch.stack([digests[o] for o in owners])), call.digest, owners,
                        "sp_softmax_attention(strategy='ring')")
    # Every query sees at least itself, so o is set; the guard keeps odd masks NaN-free.
    if o is None:
        o = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=ct)
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=ct)
    return o.to(q.dtype), lse, kept, visible


def ring_bwd(do, q, k, v, o, lse, kept: Dict[int, torch.Tensor], visible: List[bool], call: SoftmaxCall):
    """Backward: (dq, dk, dv) of this rank's shard in the dtypes of q, k, v.

    Communication: W - 1 hops to r - 1, each the dK/dV accumulator [B, T, Hkv, D + Dv] fp32
    (fp64 for fp64) plus, on hops 1..W-3, a K/V block [B, T, Hkv, D + Dv] in the input dtype.
    """
    rank, W = call.rank_and_size()
    D, ct = k.shape[-1], compute_dtype(q.dtype)
    delta = (do.to(ct) * o.to(ct)).sum(dim=-1).transpose(1, 2)  # of the whole attention
    qc = q.to(ct)
    dq = torch.zeros_like(qc)
    own = torch.cat([k, v], dim=-1)
    kept = {**kept, rank: own}
    acc_like = own.new_empty(own.shape, dtype=ct)
    kv_cur = kept[(rank + 1) % W]
    acc_in = partial_prev = None
    for s in range(W):
        b = (rank + 1 + s) % W
        hop, want_kv = None, False
        if s >= 1:
            acc_out = partial_prev if acc_in is None else acc_in + partial_prev
            want_kv = s <= W - 3  # r - 1 computes block b at step s + 1 and kept only two
            send = _to_bytes(acc_out, *([kv_cur] if want_kv else []))
            hop = comm.send_recv(send, (rank - 1) % W, send, (rank + 1) % W, call.group)
        partial = torch.zeros_like(acc_like)
        if visible[b]:
            dq_b, dk_b, dv_b = block_bwd(
                call.backend, do, qc, kv_cur[..., :D].to(ct), kv_cur[..., D:].to(ct), lse,
                call.mask(rank, b, q.device), scale=call.scale, block_size=call.block_size, delta=delta)
            dq += dq_b
            partial[..., :D] = dk_b
            partial[..., D:] = dv_b
        partial_prev = partial
        acc_in = None
        if hop is not None:
            received = _from_bytes(hop.wait(), [acc_like] + ([own] if want_kv else []))
            acc_in = received[0]  # block b's accumulator from r + 1 (ranks b - 1 .. r + 1)
        if want_kv:
            kv_cur = received[1]  # the block of step s + 1, from r + 1
        elif s + 1 < W:
            kv_cur = kept[(rank + 2 + s) % W]  # r + 2 after step 0, the own block last
    dkv = partial_prev if acc_in is None else acc_in + partial_prev  # own block, every share
    return dq.to(q.dtype), dkv[..., :D].to(k.dtype), dkv[..., D:].to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Thin autograd wrapper: ``apply(q, k, v, call)``, exactly one gradient per forward input."""

    @staticmethod
    def forward(ctx, q, k, v, call: SoftmaxCall):
        o, lse, kept, visible = ring_fwd(q, k, v, call)
        owners = sorted(kept)
        ctx.save_for_backward(q, k, v, o, lse, *(kept[j] for j in owners))
        ctx.owners, ctx.visible, ctx.call = owners, visible, call
        return o

    @staticmethod
    @no_autocast
    def backward(ctx, do):
        q, k, v, o, lse, *blocks = ctx.saved_tensors
        dq, dk, dv = ring_bwd(do, q, k, v, o, lse, dict(zip(ctx.owners, blocks)), ctx.visible, ctx.call)
        return dq, dk, dv, None
