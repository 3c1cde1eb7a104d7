"""Sequence-parallel short causal convolution: the halo exchange (DESIGN §3).

A depthwise causal conv of kernel k makes token t depend on tokens t-k+1..t. Under sequence
parallelism the first k-1 outputs of a segment need the last k-1 *inputs* of the segment before
it in sequence order: under ``contiguous`` that segment is on rank r-1; under ``zigzag`` rank r's
first segment (r) follows segment r-1 on rank r-1, and its second segment (2W-1-r) follows
segment 2W-2-r, held by rank r+1 (by rank r itself when r = W-1). Each rank sends the tails of
its segments to the owners of their successors, the received tails become the convs' left
context, and the backward sends the context's gradients back to the tails' owners. Documents
(``cu_seqlens``) stop the context: a token before a document start never reaches an output
after it. Sent tensors are fp32 (fp64 for fp64 inputs).

    y = lasp2.sp_causal_conv1d(x, weight, bias, group=group, layout="zigzag", activation="silu")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..ops.common import compute_dtype as wire_dtype  # what crosses ranks: fp32, fp64 for fp64
from ..ops.conv import activate, conv_with_context, doc_ids
from ..ops.precision import no_autocast
from ..validation import check_choice, check_conv, check_cu_seqlens, check_group
from . import comm
from .batch import resolve_placement
from .layout import LAYOUTS, Layout


@dataclass(frozen=True)
class HaloPlan:
    """Who sends which tail to whom, for one rank. Slots are local segment indices."""

    context: Tuple[Tuple[str, int], ...]  # per slot: ("none", 0) | ("local", source slot) | ("remote", source rank)
    sends: Tuple[Tuple[int, int], ...]    # (slot whose tail is sent, destination rank)
    recvs: Tuple[Tuple[int, int], ...]    # (slot whose context is received, source rank)


def halo_plan(lay: Layout, rank: int) -> HaloPlan:
    """The exchange of ``rank`` under ``lay``: at most one message per peer and direction."""
    context, sends, recvs = [], [], []
    for slot, seg in enumerate(lay.local_segments(rank)):
        if seg.index == 0:
            context.append(("none", 0))
        else:
            pred = lay.segment(seg.index - 1)
            if pred.owner == rank:
                context.append(("local", pred.local_start // lay.segment_len))
            else:
                context.append(("remote", pred.owner))
                recvs.append((slot, pred.owner))
        if seg.index + 1 < lay.num_segments and lay.owner(seg.index + 1) != rank:
            sends.append((slot, lay.owner(seg.index + 1)))
    assert len({d for _, d in sends}) == len(sends) and len({s for _, s in recvs}) == len(recvs)
    return HaloPlan(tuple(context), tuple(sends), tuple(recvs))


def _tail(slot: int, L: int, k1: int) -> slice:
    return slice(slot * L + L - k1, slot * L + L)


class HaloFunction(torch.autograd.Function):
    """x [B, T, C] -> the received left contexts [S, B, k-1, C] (zeros for slots with none or a
    local one). Forward: one ``comm.p2p`` batch of the tails; backward: one of their gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k1: int, plan: HaloPlan, lay: Layout, group) -> torch.Tensor:
        B, T, C = x.shape
        L, wire = lay.segment_len, wire_dtype(x.dtype)
        sends = [(x[:, _tail(s, L, k1)].to(wire), dst) for s, dst in plan.sends]
        like = torch.empty(B, k1, C, dtype=wire, device=x.device)
        got = comm.p2p(sends, [(like, src) for _, src in plan.recvs], group).wait()
        halo = x.new_zeros(lay.segments_per_rank, B, k1, C)
        for (slot, _), t in zip(plan.recvs, got):
            halo[slot] = t.to(x.dtype)
        ctx.k1, ctx.plan, ctx.lay, ctx.group, ctx.shape = k1, plan, lay, group, x.shape
        return halo

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        B, T, C = ctx.shape
        L, k1, wire = ctx.lay.segment_len, ctx.k1, wire_dtype(grad.dtype)
        sends = [(grad[slot].to(wire), src) for slot, src in ctx.plan.recvs]
        like = torch.empty(B, k1, C, dtype=wire, device=grad.device)
        got = comm.p2p(sends, [(like, dst) for _, dst in ctx.plan.sends], ctx.group).wait()
        dx = grad.new_zeros(B, T, C)
        for (slot, _), t in zip(ctx.plan.sends, got):
            dx[:, _tail(slot, L, k1)] += t.to(grad.dtype)
        return dx, None, None, None, None


@no_autocast
def sp_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     group=None, layout: Optional[str] = None, activation: Optional[str] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, batch=None, output_final_state: bool = False):
    """Sequence-parallel short causal depthwise conv: this rank's shard of
    ``lasp2.causal_conv1d`` on the whole sequence.

    Args:
        x: [B, T, C], this rank's shard in ``layout`` (T local; the global length is W * T).
        weight: [C, k] (``conv1d.weight.squeeze(1)`` of a depthwise ``nn.Conv1d``); bias: [C] or
            None; x's dtype and device.
        group: the sequence-parallel process group (required unless ``batch`` gives it).
        layout: "contiguous" (default) or "zigzag". Each segment (T, or T / 2 under zigzag) must
            hold at least k - 1 tokens when W > 1.
        activation: None, "silu" or "swish" (applied after the conv, as transformers does).
        cu_seqlens: global [N + 1] cumulative document lengths, identical on every rank (B == 1);
            the conv restarts at every document start.
        batch: this batch's sequence-parallel context (``SPBatch``) in place of group, layout
            and cu_seqlens (its documents were checked once when it was built).
        output_final_state: also return the conv cache for decoding (not with cu_seqlens).

    Returns:
        y [B, T, C] in x's dtype, this rank's shard. Differentiable w.r.t. x, weight and bias.
        With ``output_final_state``: (y, conv_cache), conv_cache [B, k-1, C] in x's dtype = the
        last k - 1 inputs of the whole sequence, oldest first (zeros before the first token),
        bitwise identical on every rank; not differentiable (a decode cache). transformers'
        layout [B, C, k] (the last k inputs, whose oldest slot the next update drops) is
        ``F.pad(conv_cache.transpose(1, 2), (1, 0))``.

    Communication (W > 1, k > 1): forward 1 batched P2P exchange: each segment's last k - 1
    inputs [B, k-1, C] fp32 (fp64 for fp64) go to the owner of the next segment (1 message per
    rank under contiguous, up to 2 under zigzag); backward the same exchange of their gradients
    in the opposite direction. ``output_final_state``: + 1 all-gather of [W, B, k-1, C] in x's
    dtype (the conv cache from the owner of the last segment). The first call with new shapes on a group adds one small
    agreement check (then cached).
    """
    group, layout, cu_seqlens = resolve_placement(batch, group, layout, cu_seqlens, "sp_causal_conv1d")
    check_group(group)
    check_choice("layout", layout, LAYOUTS)
    check_conv(x, weight, bias, activation)
    rank, world = comm.rank_and_size(group)
    lay = Layout(layout, world, x.shape[1])
    if batch is None:
        check_cu_seqlens(cu_seqlens, lay.global_len, x.shape[0])
    else:
        batch.check_local(x.shape[1], x.shape[0], "sp_causal_conv1d")
    k1 = weight.shape[1] - 1
    if not isinstance(output_final_state, bool):
        raise ValueError(f"output_final_state must be True or False, got {output_final_state!r}")
    if output_final_state and cu_seqlens is not None:
        raise ValueError("output_final_state (the conv cache) is not supported with cu_seqlens (per-document "
                         "caches); run each document as its own sequence, or pass output_final_state=False")
    if world > 1 and k1 > lay.segment_len:
        raise ValueError(f"a kernel of size k = {k1 + 1} needs the last k - 1 = {k1} inputs of the previous "
                         f"segment, but segments hold {lay.segment_len} tokens (T = {x.shape[1]} per rank, "
                         f"layout={layout!r}); use at least {k1 * lay.segments_per_rank} tokens per rank")
    signature = (f"sp_causal_conv1d layout={layout} activation={activation} x={tuple(x.shape)}:{x.dtype} "
                 f"weight={tuple(weight.shape)} bias={bias is not None} docs={cu_seqlens is not None} "
                 f"cache={output_final_state}")
    comm.ensure_agreement(group, signature)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(x.device)
    L = lay.segment_len
    plan = halo_plan(lay, rank)
    halo = HaloFunction.apply(x, k1, plan, lay, group) if world > 1 and k1 > 0 else None
    outs = []
    for slot, seg in enumerate(lay.local_segments(rank)):
        kind, src = plan.context[slot] if world > 1 else ("none", 0)
        if k1 == 0:
            context = x[:, :0]
        elif kind == "local":
            context = x[:, _tail(src, L, k1)]
        elif kind == "remote":
            context = halo[slot]
        else:
            context = x.new_zeros(x.shape[0], k1, x.shape[2])
        if kind == "none" and halo is not None:
            context = context + halo[slot]  # zeros; keeps every rank's halo in its graph
        x_ext = torch.cat([context, x[:, slot * L:(slot + 1) * L]], dim=1)
        doc = None
        if cu_seqlens is not None:
            doc = doc_ids(cu_seqlens, torch.arange(seg.global_start - k1, seg.global_start + L, device=x.device))
        outs.append(conv_with_context(x_ext, weight, bias, doc))
    y = activate(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], activation)
    return (y, _conv_cache(x, k1, lay, rank, group)) if output_final_state else y


def _conv_cache(x: torch.Tensor, k1: int, lay: Layout, rank: int, group) -> torch.Tensor:
    """The last k1 inputs of the whole sequence [B, k1, C] (zeros before the first token), on
    every rank: the owner of the last segment cuts them (segments hold >= k1 tokens when W > 1),
    one all-gather delivers its bits."""
    B, T, C = x.shape
    if lay.world == 1 or k1 == 0:
        padded = torch.nn.functional.pad(x.detach(), (0, 0, k1, 0))
        return padded[:, padded.shape[1] - k1:]
    last = lay.segment(lay.num_segments - 1)
    L = lay.segment_len
    slot = last.local_start // L
    tail = x.detach()[:, _tail(slot, L, k1)] if last.owner == rank else x.new_zeros(B, k1, C)
    return comm.all_gather(tail.contiguous(), group)[last.owner]
