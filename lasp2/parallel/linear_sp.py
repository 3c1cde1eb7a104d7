"""The one causal linear SP driver every linear strategy shares (DESIGN §1).

All causal linear strategies do the same local work (``linear_local``): summarise each local
segment (Ŝ, Â), compute the intra-chunk outputs, add the incoming state's term; in backward form
G = dL/dP per segment and finish with one ``autograd.grad``. They differ only in the *exchange*:
how the local summaries become the incoming states P (forward) and how the G become the
gradients N_j = D_{j+1} reaching each segment's final state (backward). An exchange is an
object with

    forward(work, call, local_work) -> (P per local segment [B, H, K, V], saved)
        must call ``local_work()`` (the intra-chunk outputs) exactly once, at the point that
        overlaps its communication best;
    backward(G, work, call, saved) -> N per local segment [B, H, K, V]
        G: dL/dP per local segment. Every rank must enter every communication call here,
        whatever its local graph uses (DESIGN §1, "every rank enters every collective").

Implementations: ``lasp2.AllGatherExchange``, ``lasp1.ChainExchange``,
``allscan.PipelinedChainExchange``, ``tree.TreeExchange``; the registry
(``strategies.py``) maps names to them.
"""
from __future__ import annotations

import contextvars
import threading
from typing import Callable, List, Optional

import torch

from . import comm
from .context import LinearCall
from .linear_local import (SegmentWork, add_incoming, assemble, detached_leaves, grad_targets, inter_backward,
                           intra_outputs, leaf_grads, output_chunks_of, summarise)
from ..ops.precision import no_autocast
from ..ops.transition import Kind, classify


def linear_sp_fwd(q, k, v, g, beta, kind: Kind, call: LinearCall, exchange):
    """Forward on plain tensors (leaves may require grad: the graph is kept in the result).

    q, k [B, T, H, K]; v [B, T, H, V]; g None | [B, T, H] | [B, T, H, K]; beta None | [B, T, H];
    ``kind`` the transition they name (``ops.transition.classify``).
    Returns (o [B, T, H, V] in q's dtype with graph, work, saved).
    Communication: the exchange's forward.
    """
    rank = comm.rank_and_size(call.group)[0]
    work = summarise(q, k, v, g, beta, kind, call.scale, call.layout, rank, call.cu_list, call.backend)
    P, saved = exchange.forward(work, call, lambda: intra_outputs(work))
    for w, P_j in zip(work, P):
        add_incoming(w, P_j)
    return assemble(work, q.dtype), work, saved


def linear_sp_bwd(o: torch.Tensor, do: torch.Tensor, work: List[SegmentWork], call: LinearCall, exchange, saved):
    """From dL/do [B, T, H, V] for the output o (with graph): (tensors, grads) for one
    ``torch.autograd.grad`` over the local graph. Communication: the exchange's backward."""
    do_chunks = [output_chunks_of(do, w) for w in work]
    inter = [inter_backward(w, d) for w, d in zip(work, do_chunks)]
    nxt = exchange.backward([G for G, _ in inter], work, call, saved)
    return grad_targets(o, do, work, inter, nxt)


def overlapped(exchange: Callable[[], object], local_work: Callable[[], None]):
    """Run ``exchange()`` (point-to-point only, on detached tensors) in a helper thread while
    ``local_work()`` (the intra-chunk outputs, with graph) runs in this one; return the
    exchange's result, or raise its error.

    For exchanges whose messages depend on other ranks' progress (a chain, scan rounds), blocking
    receives would otherwise either delay the local work or wait until it is done; torch ops and
    gloo waits release the GIL, so both proceed at once. The helper runs in a copy of this
    context (``comm.track`` records still land in the caller's log). If ``local_work`` raises,
    its error propagates at once and the helper (a daemon) is abandoned.
    """
    box = {}
    ctx = contextvars.copy_context()

    def target():
        try:
            box["out"] = ctx.run(exchange)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            box["err"] = e

    helper = threading.Thread(target=target, name="lasp2-exchange", daemon=True)
    helper.start()
    local_work()
    helper.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


class LinearSPFunction(torch.autograd.Function):
    """Thin autograd wrapper around ``linear_sp_fwd``/``linear_sp_bwd``: one gradient per input.

    The local graph is built inside ``forward`` on detached leaves and kept for ``backward``: this
    is what lets the backward run its exchange on *every* rank, including those whose outputs
    depend on no incoming state (rank 0) or whose summary nobody uses (the last rank).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, call: LinearCall, exchange, kind: Optional[Kind] = None):
        kind = classify(g, beta) if kind is None else kind  # the public API passes the kind it classified
        leaves = detached_leaves((q, k, v, g, beta), call.grad_enabled)
        with torch.set_grad_enabled(any(t is not None and t.requires_grad for t in leaves)):
            o, work, saved = linear_sp_fwd(*leaves, kind, call, exchange)
        # ctx.o shares its storage with the returned output: keeping its graph costs no memory.
        ctx.o, ctx.leaves, ctx.work, ctx.saved, ctx.call, ctx.exchange = o, leaves, work, saved, call, exchange
        return o.detach()

    @staticmethod
    @no_autocast
    def backward(ctx, do):
        outputs, grads = linear_sp_bwd(ctx.o, do, ctx.work, ctx.call, ctx.exchange, ctx.saved)
        dq, dk, dv, dg, dbeta = leaf_grads(ctx.leaves, outputs, grads)
        ctx.o = ctx.work = ctx.leaves = ctx.saved = None  # free the graph
        return dq, dk, dv, dg, dbeta, None, None, None
