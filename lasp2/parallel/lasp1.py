"""LASP-1: the ring-chain baseline. The running state hops rank to rank in sequence order.

Each rank first does all of its local work that needs no incoming state (summaries and
zero-state outputs, as LASP-2 does), then waits for the state entering its segment from the
previous segment's owner, forwards Â P + Ŝ to the next owner immediately, and only then adds its
own incoming-state term, so the chain carries no avoidable compute. With ``contiguous`` that is
W - 1 sequential hops per direction; with ``zigzag`` the chain runs through 2W segments
(2W - 2 hops, two sends and two receives on most ranks).

Backward runs the same chain in reverse with D_j = G_j + Â_j^T D_{j+1} (DESIGN §1).
"""
from __future__ import annotations

from typing import List

import torch

from . import comm
from .layout import Layout
from .linear_local import (SegmentWork, add_incoming, apply_transition, assemble, detached_leaves,
                           grad_targets, inter_backward, intra_outputs, leaf_grads, output_chunks_of,
                           summarise)
from ..ops.precision import no_autocast


def lasp1_fwd(q, k, v, g, beta, *, scale: float, layout: Layout, group, cu_seqlens):
    """Forward on plain tensors; returns (o [B, T, H, V] with graph, work).

    Communication: per local segment j > 0 one recv of [B, H, K, V] from the owner of j - 1 and
    per local segment j < J - 1 one send to the owner of j + 1 (skipped when that is this rank).
    """
    rank = comm.rank_and_size(group)[0]
    work = summarise(q, k, v, g, beta, scale, layout, rank, cu_seqlens)
    intra_outputs(work)
    carried = None
    for w in work:  # local order is sequence order in both layouts
        j = w.seg.index
        if j == 0:
            P = torch.zeros_like(w.summary_state.detach())
        elif layout.owner(j - 1) == rank:
            P = carried
        else:
            P = comm.recv(w.summary_state.detach(), layout.owner(j - 1), group)
        out = apply_transition(w.transition.detach(), P) + w.summary_state.detach()
        if j + 1 < layout.num_segments:
            if layout.owner(j + 1) == rank:
                carried = out
            else:
                comm.send(out, layout.owner(j + 1), group)
        add_incoming(w, P)
    return assemble(work, q.dtype), work


def lasp1_bwd(o: torch.Tensor, do: torch.Tensor, work: List[SegmentWork], layout: Layout, group):
    """Gradients reaching each segment's outputs and final state, by the reverse chain.

    Communication: per local segment j < J - 1 one recv from the owner of j + 1, per local
    segment j > 0 one send to the owner of j - 1 (skipped when that is this rank).
    """
    rank = comm.rank_and_size(group)[0]
    do_chunks = [output_chunks_of(do, w) for w in work]
    inter = [inter_backward(w, d) for w, d in zip(work, do_chunks)]
    nxt = [None] * len(work)
    carried = None
    for i in range(len(work) - 1, -1, -1):
        w, j = work[i], work[i].seg.index
        if j == layout.num_segments - 1:
            nxt[i] = torch.zeros_like(w.summary_state.detach())
        elif layout.owner(j + 1) == rank:
            nxt[i] = carried
        else:
            nxt[i] = comm.recv(w.summary_state.detach(), layout.owner(j + 1), group)
        D = inter[i][0] + apply_transition(w.transition.detach(), nxt[i], transpose=True)
        if j > 0:
            if layout.owner(j - 1) == rank:
                carried = D
            else:
                comm.send(D, layout.owner(j - 1), group)
    return grad_targets(o, do, work, inter, nxt)


class LASP1Function(torch.autograd.Function):
    """Thin autograd wrapper: exactly one gradient per forward input."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, layout, group, cu_seqlens, grad_enabled):
        leaves = detached_leaves((q, k, v, g, beta), grad_enabled)
        with torch.set_grad_enabled(any(t is not None and t.requires_grad for t in leaves)):
            o, work = lasp1_fwd(*leaves, scale=scale, layout=layout, group=group, cu_seqlens=cu_seqlens)
        ctx.o, ctx.leaves, ctx.work, ctx.layout, ctx.group = o, leaves, work, layout, group
        return o.detach()

    @staticmethod
    @no_autocast
    def backward(ctx, do):
        outputs, grads = lasp1_bwd(ctx.o, do, ctx.work, ctx.layout, ctx.group)
        dq, dk, dv, dg, dbeta = leaf_grads(ctx.leaves, outputs, grads)
        ctx.o = ctx.work = ctx.leaves = None
        return dq, dk, dv, dg, dbeta, None, None, None, None, None
