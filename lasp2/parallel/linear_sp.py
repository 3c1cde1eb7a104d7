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
    final_state(work, call, saved) -> F [B, H, K, V]   (optional)
        the state after the sequence's last token, identical on every rank, with no further
        communication (LASP-2: every rank folded every summary); an exchange that has it also
        takes ``backward(..., final_grad=)``, this rank's term of dL/dF (the terms of all ranks
        sum to it), inside its own backward communication. Without it the driver adds one
        all-gather per direction (``_gathered_final_state``, ``_backward_with_final_grad``).

States in and out (docs/algorithm.md, "States in and out"): an initial state S0 rides inside
segment 0's published summary (``SegmentWork.entering``) and is segment 0's incoming state, so
no exchange knows about it; dL/dS0 = G_0 + Â_0^T D_1 on the owner of segment 0.

Implementations: ``lasp2.AllGatherExchange``, ``lasp1.ChainExchange``,
``allscan.PipelinedChainExchange``, ``tree.TreeExchange``; the registry
(``strategies.py``) maps names to them.
"""
from __future__ import annotations

import contextvars
import threading
from typing import Callable, List, Optional

import torch

from . import agreement, comm
from .context import LinearCall
from .linear_local import (SegmentWork, add_incoming, assemble, detached_leaves, grad_targets, inter_backward,
                           intra_outputs, leaf_grads, output_chunks_of, summarise)
from ..ops.precision import no_autocast
from ..ops.transition import Kind, classify


def linear_sp_fwd(q, k, v, g, beta, kind: Kind, call: LinearCall, exchange, initial_state=None):
    """Forward on plain tensors (leaves may require grad: the graph is kept in the result).

    q, k [B, T, H, K]; v [B, T, H, V]; g None | [B, T, H] | [B, T, H, K]; beta None | [B, T, H];
    ``kind`` the transition they name (``ops.transition.classify``); ``initial_state`` None or the
    state before the sequence's first token [B, H, K, V] (a constant, identical on every rank).
    Returns (o [B, T, H, V] in q's dtype with graph, work, saved, final state [B, H, K, V] in the
    state dtype — identical on every rank — or None unless ``call.output_final_state``).
    Communication: the exchange's forward; for an exchange without ``final_state``, one
    all-gather of [W, B, H, K, V] for the final state (``_gathered_final_state``).
    """
    rank = comm.rank_and_size(call.group)[0]
    work = summarise(q, k, v, g, beta, kind, call.scale, call.layout, rank, call.cu_list, call.backend,
                     initial_state=initial_state is not None, final_state=call.output_final_state)
    first = _local_position(work, 0)
    if initial_state is not None and first is not None:
        initial_state = initial_state.to(work[first].summary_state.dtype)
        work[first].entering = initial_state  # segment 0 publishes Â S0 + Ŝ (``SegmentWork``)
    native = getattr(exchange, "final_state", None)
    try:
        P, saved = exchange.forward(work, call, lambda: intra_outputs(work))
    except ValueError:  # the ranks disagree (agreement digest): still enter the final state's
        if call.output_final_state and native is None:  # gather, so that no rank waits in it
            _gathered_final_state(work, call, None)
        raise
    if initial_state is not None and first is not None:
        P[first] = initial_state  # the fold's P_0 = 0; segment 0's own outputs start from S0
    for w, P_j in zip(work, P):
        add_incoming(w, P_j)
    final = None
    if call.output_final_state:
        final = native(work, call, saved) if native is not None else _gathered_final_state(work, call, P)
    return assemble(work, q.dtype), work, saved, final


def linear_sp_bwd(o: torch.Tensor, do: torch.Tensor, work: List[SegmentWork], call: LinearCall, exchange, saved,
                  final_grad: Optional[torch.Tensor] = None):
    """From dL/do [B, T, H, V] for the output o (with graph) and, with ``call.output_final_state``,
    this rank's term dL/dF [B, H, K, V] of the final state's gradient (the terms of all ranks sum
    to it): (tensors, grads) for one ``torch.autograd.grad`` over the local graph, and this rank's
    share of dL/d(initial state) [B, H, K, V] (the whole of it on the owner of segment 0, zeros
    elsewhere). Communication: the exchange's backward; for an exchange without ``final_state``
    and with ``call.output_final_state``, one all-gather of [W, B, H, K, V] (the final state's
    gradient terms, summed in rank order).
    """
    do_chunks = [output_chunks_of(do, w) for w in work]
    inter = [inter_backward(w, d) for w, d in zip(work, do_chunks)]
    G = [G_j for G_j, _ in inter]
    if call.output_final_state and final_grad is None:
        final_grad = torch.zeros_like(G[0])
    if not call.output_final_state:
        nxt = exchange.backward(G, work, call, saved)
    elif getattr(exchange, "final_state", None) is not None:
        nxt = exchange.backward(G, work, call, saved, final_grad=final_grad.to(G[0].dtype))
    else:
        nxt = _backward_with_final_grad(G, work, call, exchange, saved, final_grad.to(G[0].dtype))
    outputs, grads = grad_targets(o, do, work, inter, nxt)
    first = _local_position(work, 0)
    if first is None:
        d_initial = torch.zeros_like(G[0])
    else:  # D_0 = G_0 + Â_0^T D_1: the gradient of P_0 (DESIGN §1, backward)
        w = work[first]
        d_initial = G[first] + w.kind.apply(w.transition.detach(), nxt[first], transpose=True)
    return outputs, grads, d_initial


def _local_position(work: List[SegmentWork], index: int) -> Optional[int]:
    """The position in ``work`` of global segment ``index``, or None if another rank owns it."""
    return next((i for i, w in enumerate(work) if w.seg.index == index), None)


def _gathered_final_state(work: List[SegmentWork], call: LinearCall, P: Optional[List[torch.Tensor]]) -> torch.Tensor:
    """The final state for an exchange that leaves it on one rank: the owner of the last segment
    forms Â P + Ŝ, one all-gather of [W, B, H, K, V] (+ the call's agreement digest) delivers its
    bits to every rank. (An all-gather rather than a broadcast: ``comm`` has no broadcast, W
    states are small, and the digest then reaches every rank, whatever the chain delivered.)
    ``P`` None: this rank's exchange failed; it sends zeros and the caller raises."""
    last = _local_position(work, call.layout.num_segments - 1)
    F = torch.zeros_like(work[0].local.summary_state.detach())
    if last is not None and P is not None:
        w = work[last]
        F = w.kind.apply(w.transition.detach(), P[last]) + w.local.summary_state.detach()
    gathered = comm.all_gather(agreement.stamp_rows(F.reshape(1, -1), call.digest), call.group)  # [W, 1, n + d]
    agreement.check_stamped(gathered, call.digest, "sp_linear_attention(output_final_state=True)")
    owner = call.layout.owner(call.layout.num_segments - 1)
    return gathered[owner, 0, :F.numel()].view_as(F).clone()


def _backward_with_final_grad(G, work, call, exchange, saved, final_grad):
    """An exchange's backward with D_J = sum over ranks of ``final_grad`` (one all-gather, summed
    in rank order): the owner of the last segment adds Â_{J-1}^T D_J to its G (so the chain
    carries D_{J-1} = G_{J-1} + Â_{J-1}^T D_J upstream) and D_J is the gradient reaching that
    segment's final state."""
    tail = comm.all_gather(final_grad.contiguous(), call.group).sum(0)
    last = _local_position(work, call.layout.num_segments - 1)
    G = list(G)
    if last is not None:
        w = work[last]
        G[last] = G[last] + w.kind.apply(w.transition.detach(), tail, transpose=True)
    nxt = exchange.backward(G, work, call, saved)
    if last is not None:
        nxt[last] = tail
    return nxt


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
    Returns o, or (o, final state) with ``call.output_final_state``.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, call: LinearCall, exchange, kind: Optional[Kind] = None):
        kind = classify(g, beta) if kind is None else kind  # the public API passes the kind it classified
        leaves = detached_leaves((q, k, v, g, beta), call.grad_enabled)
        S0 = None if initial_state is None else initial_state.detach()
        with torch.set_grad_enabled(any(t is not None and t.requires_grad for t in leaves)):
            o, work, saved, final = linear_sp_fwd(*leaves, kind, call, exchange, S0)
        # ctx.o shares its storage with the returned output: keeping its graph costs no memory.
        ctx.o, ctx.leaves, ctx.work, ctx.saved, ctx.call, ctx.exchange = o, leaves, work, saved, call, exchange
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        if call.output_final_state:
            return o.detach(), final
        return o.detach()

    @staticmethod
    @no_autocast
    def backward(ctx, do, final_grad=None):
        outputs, grads, d_initial = linear_sp_bwd(ctx.o, do, ctx.work, ctx.call, ctx.exchange, ctx.saved, final_grad)
        if any(t is not None and t.requires_grad for t in ctx.leaves):
            dq, dk, dv, dg, dbeta = leaf_grads(ctx.leaves, outputs, grads)
        else:
            dq = dk = dv = dg = dbeta = None
        d_initial = d_initial.to(ctx.initial_dtype) if ctx.initial_dtype is not None and ctx.needs_input_grad[5] else None
        ctx.o = ctx.work = ctx.leaves = ctx.saved = None  # free the graph
        return dq, dk, dv, dg, dbeta, d_initial, None, None, None
