"""``strategy="allscan"``: the pipelined chain (ZeCO's All-Scan, arXiv 2507.01004).

The running state travels segment to segment in sequence order, as in LASP-1, but split into k
blocks along V: the owner of segment j receives block b of P_j, forwards block b of
P_{j+1} = Â_j P_j + Ŝ_j at once, and only then waits for block b + 1, so the next rank starts
while this one is still receiving. Latency (J + k - 2) block hops instead of (J - 1) whole-state
hops; every rank receives one state per local segment and direction, whatever W.

Why blocks along V (for every variant): the transition acts on the state from the left,
P -> Â P, for every kind of transition (``ops.transition``: decay vectors and the delta rule's
K x K matrices alike), so the columns of P never mix and any split along V is exact with the whole
Â. A split along K would only be exact for decay vectors (a matrix Â mixes rows). One split
serves every kind with one code path; it also needs no slicing of Â. The backward (D_j = G_j +
Â_j^T D_{j+1}) is the same chain in reverse and splits along V for the same reason.

Overlap: the forward chain runs in a helper thread (``linear_sp.overlapped``) while the rank
computes its intra-chunk outputs, so a rank forwards the state as soon as it arrives instead of
after its own intra-chunk work; the chain's latency hides behind that work. The block count k
comes from the call (``scan_blocks``) or the latency-optimal k* = sqrt((J - 2) s / alpha) on a
default link (``default_blocks``; ``lasp2 plan`` reports k* for other networks). Under zigzag the
chain runs through the 2W segments in sequence order (0 -> W-1 over the ranks, then back), as
LASP-1's does.

Communication (per direction): per local segment j > 0 whose predecessor is on another rank, k
recvs (one state [B, H, K, V] in all, fp32; fp64 for fp64 inputs) from the owner of j - 1; per
local segment j < J - 1 whose successor is on another rank, k sends to it. P2P only, tag = block.
Block 0 of every message also carries the W agreement digests seen upstream
(``agreement.ChainDigests``, 8 W bytes); a rank that sees one differ from its own raises once
its own sends are done.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from . import agreement, comm
from .context import LinearCall
from .linear_local import SegmentWork, apply_transition
from .linear_sp import overlapped


def pipeline_blocks(segments: int, state_time: float, hop_latency: float, max_blocks: int) -> int:
    """Block count k of a pipelined chain over ``segments`` segments that minimises its latency
    (J + k - 2)(alpha + s / k): k* = sqrt((J - 2) s / alpha), rounded to the better neighbour
    and clamped to [1, max_blocks] (the state splits along V, so at most V blocks).

    state_time: s, seconds to send one whole state; hop_latency: alpha, seconds per hop.
    """
    J = segments
    if J <= 2 or state_time <= 0 or max_blocks <= 1:
        return 1
    if hop_latency <= 0:
        return max_blocks
    best = math.sqrt((J - 2) * state_time / hop_latency)

    def cost(k: int) -> float:
        return (J + k - 2) * (hop_latency + state_time / k)

    candidates = {min(max_blocks, max(1, c)) for c in (math.floor(best), math.ceil(best))}
    return min(sorted(candidates), key=cost)


# Default link for choosing the block count when the caller gives none: an InfiniBand-class
# point-to-point hop (25 us latency, 40 GB/s per GPU; the planner's "infiniband" network). The
# planner (``lasp2 plan``) reports k* for the user's own network; pass it as ``scan_blocks``.
DEFAULT_HOP_LATENCY = 25e-6
DEFAULT_HOP_BANDWIDTH = 40e9


def default_blocks(segments: int, state_bytes: int, V: int, requested: Optional[int] = None) -> int:
    """The block count ``allscan`` uses: ``requested`` if given, else ``pipeline_blocks`` on the
    default link."""
    if requested is not None:
        return min(int(requested), V)
    return pipeline_blocks(segments, state_bytes / DEFAULT_HOP_BANDWIDTH, DEFAULT_HOP_LATENCY, V)


def _blocks(call: LinearCall, like: torch.Tensor) -> List[slice]:
    V = like.shape[-1]
    k = default_blocks(call.layout.num_segments, like.numel() * 4, V, call.blocks)
    bounds = [V * b // k for b in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _chain(items, call: LinearCall, neighbour, step):
    """Run the chain over this rank's segments in ``items`` (processing order: sequence order
    forward, reverse backward). ``neighbour(j, -1 | +1)`` gives the segment feeding segment j and the
    one it feeds (None at the ends). ``step(i, X_in, sl)`` -> block ``sl`` of X_out for item i.
    Returns X_in per item.
    """
    group, layout = call.group, call.layout
    rank = comm.rank_and_size(group)[0]
    like = items[0][1]
    blocks = _blocks(call, like)
    chain = agreement.ChainDigests(call.world, rank, call.digest)
    wire = lambda b, x: chain.message_like(x) if b == 0 else x  # block 0 carries the digests
    incoming = {}
    for i, (j, _) in enumerate(items):  # post every receive from another rank first
        src = neighbour(j, -1)
        if src is not None and layout.owner(src) != rank:
            incoming[i] = [comm.p2p([], [(wire(b, like[..., sl]), layout.owner(src))], group, tag=b)
                           for b, sl in enumerate(blocks)]
    sends, X_in, carried = [], [None] * len(items), None
    for i, (j, _) in enumerate(items):
        src, dst = neighbour(j, -1), neighbour(j, +1)
        remote_out = dst is not None and layout.owner(dst) != rank
        X = torch.zeros_like(like) if src is None else (carried if i not in incoming else torch.empty_like(like))
        out = torch.empty_like(like) if dst is not None else None
        for b, sl in enumerate(blocks):
            if i in incoming:
                got = incoming[i][b].wait()[0]
                X[..., sl] = chain.detach(got, like[..., sl]) if b == 0 else got
            if out is not None:
                out[..., sl] = step(i, X, sl)
                if remote_out:
                    msg = chain.attach(out[..., sl]) if b == 0 else out[..., sl]
                    sends.append(comm.p2p([(msg, layout.owner(dst))], [], group, tag=b))
        X_in[i], carried = X, out
    for s in sends:
        s.wait()
    chain.verify("sp_linear_attention(strategy='allscan')")
    return X_in


class PipelinedChainExchange:
    """The ``allscan`` exchange (``linear_sp`` protocol); see the module docstring."""

    name = "allscan"

    @staticmethod
    def forward(work: List[SegmentWork], call: LinearCall, local_work):
        J = call.layout.num_segments
        items = [(w.seg.index, w.summary_state.detach()) for w in work]

        def neighbour(j, side):
            n = j + side
            return n if 0 <= n < J else None

        def step(i, P, sl):  # block sl of Â_j P_j + Ŝ_j
            w = work[i]
            return apply_transition(w.kind, w.transition.detach(), P[..., sl]) + w.summary_state.detach()[..., sl]

        return overlapped(lambda: _chain(items, call, neighbour, step), local_work), None

    @staticmethod
    def backward(G: List[torch.Tensor], work: List[SegmentWork], call: LinearCall, saved):
        J = call.layout.num_segments
        rev = list(range(len(work) - 1, -1, -1))
        items = [(work[i].seg.index, G[i]) for i in rev]

        def neighbour(j, side):  # the backward chain runs against sequence order
            n = j - side
            return n if 0 <= n < J else None

        def step(i, N, sl):  # block sl of D_j = G_j + Â_j^T D_{j+1}
            w = work[rev[i]]
            return G[rev[i]][..., sl] + apply_transition(w.kind, w.transition.detach(), N[..., sl], transpose=True)

        N = _chain(items, call, neighbour, step)
        return [N[rev.index(i)] for i in range(len(work))]
