"""``strategy="tree"``: a log-depth scan of the segment summaries over the ranks.

The J segments (J = W contiguous, 2W zigzag) are the elements of an exclusive scan with the
associative operator ``compose`` ((Â2, X2) ∘ (Â1, X1) = (Â2 Â1, Â2 X1 + X2)), run by recursive
doubling (Hillis-Steele / Kogge-Stone): in round d every element i sends its running inclusive
aggregate to element i + 2^d and composes the one it receives from i - 2^d into both its
inclusive and its exclusive aggregate. After ceil(log2 J) rounds element i's exclusive aggregate
covers the elements before it; its X part is P_i (P_0 = 0, so the Â part is not needed). J need
not be a power of two.

Forward: elements (Â_j, Ŝ_j) in sequence order; P_j = the exclusive aggregate's X. Backward: the
suffix scan D_j = G_j + Â_j^T D_{j+1}, i.e. the same scan over the elements (Â_j^T, G_j) in
reverse sequence order; N_j = D_{j+1} is the exclusive aggregate's X.

The forward rounds run in a helper thread (``linear_sp.overlapped``) while the rank computes its
intra-chunk outputs. Under zigzag a rank holds two elements (segments r and 2W-1-r), so
J = 2W and there are ceil(log2 2W) = ceil(log2 W) + 1 rounds; an element whose partner is on the
same rank is handed over locally, without a message.

Communication (per direction, W > 1): ceil(log2 J) rounds; in round d each element i sends one
summary [B*H*K*V + |Â|] (fp32; fp64 for fp64 inputs) to the owner of element i + 2^d and receives
one from the owner of i - 2^d (if they exist), all sends and receives of a round in one
``batch_isend_irecv``. Per rank: at most S * ceil(log2 J) summaries received (S local segments).
Every message also carries the agreement digests its sender has seen (``agreement.ChainDigests``,
8 W bytes): an aggregate arrives with the digests of the ranks it covers, and a rank that sees one
differ from its own raises after the last round.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import agreement, comm
from .context import LinearCall
from ..ops.transition import Kind
from .linear_local import SegmentWork, compose
from .linear_sp import overlapped

Summary = Tuple[torch.Tensor, torch.Tensor]  # (Â in its kind's form, X [..., K, V])


def tree_rounds(J: int) -> int:
    """Rounds of the recursive-doubling scan over J elements: ceil(log2 J) (0 for J <= 1)."""
    return math.ceil(math.log2(J)) if J > 1 else 0


def doubling_scan(kind: Kind, local: Dict[int, Summary], J: int,
                  deliver: Callable[[int, Dict[int, Summary]], Dict[int, Summary]]) -> Dict[int, torch.Tensor]:
    """Exclusive scan over elements 0..J-1 of which this caller holds ``local`` (position ->
    (Â, X), Â in ``kind``'s form). Returns position -> X of the composition of every earlier
    element (zeros for 0).

    ``deliver(d, outgoing)`` moves round d's messages: ``outgoing`` maps each local position i
    with i + 2^d < J to its inclusive aggregate (for position i + 2^d); it returns, for each local
    position i >= 2^d, the aggregate of position i - 2^d. It may return a callable (the pending
    receive) instead of a dict.
    Pure algebra plus ``deliver``: the single-process tests drive it with an in-memory deliver.
    """
    incl = dict(local)
    excl: Dict[int, Optional[Summary]] = {i: None for i in local}
    for d in range(tree_rounds(J)):
        step = 1 << d
        got = deliver(d, {i: incl[i] for i in local if i + step < J})
        if callable(got):
            got = got()
        for i in local:
            if i >= step:
                earlier = got[i]
                excl[i] = earlier if excl[i] is None else compose(kind, excl[i], earlier)
                incl[i] = compose(kind, incl[i], earlier)
    return {i: torch.zeros_like(local[i][1]) if excl[i] is None else excl[i][1] for i in local}


def _pack(s: Summary) -> torch.Tensor:
    return torch.cat([s[1].reshape(-1), s[0].reshape(-1)])


def _unpack(flat: torch.Tensor, like: Summary) -> Summary:
    n = like[1].numel()
    return flat[n:].view_as(like[0]), flat[:n].view_as(like[1])


def _p2p_deliver(call: LinearCall, order: List[int], like: Summary):
    """``deliver`` for ``doubling_scan`` over the segments in ``order`` (scan position -> segment
    index): messages to/from other ranks travel as one tagged ``batch_isend_irecv`` per round;
    those between two elements of this rank are handed over directly."""
    rank = comm.rank_and_size(call.group)[0]
    owner = [call.layout.owner(j) for j in order]
    J = len(order)
    template = _pack(like)
    chain = agreement.ChainDigests(call.world, rank, call.digest)

    def deliver(d: int, outgoing: Dict[int, Summary]):
        step = 1 << d
        local_hand = {i + step: s for i, s in outgoing.items() if owner[i + step] == rank}
        sends = [(chain.attach(_pack(s)), owner[i + step]) for i, s in sorted(outgoing.items())
                 if owner[i + step] != rank]
        wanted = sorted(i for i in range(step, J) if owner[i] == rank and owner[i - step] != rank)
        pending = comm.p2p(sends, [(chain.message_like(template), owner[i - step]) for i in wanted], call.group,
                           tag=d)

        def finish():
            received = [chain.detach(x, template) for x in pending.wait()]
            if d == tree_rounds(J) - 1:
                chain.verify("sp_linear_attention(strategy='tree')")
            return {**local_hand, **{i: _unpack(x, like) for i, x in zip(wanted, received)}}
        return finish
    return deliver


class TreeExchange:
    """The ``tree`` exchange (``linear_sp`` protocol); see the module docstring."""

    name = "tree"

    @staticmethod
    def forward(work: List[SegmentWork], call: LinearCall, local_work):
        order = list(range(call.layout.num_segments))
        local = {w.seg.index: (w.transition.detach(), w.summary_state.detach()) for w in work}
        kind, like = work[0].kind, local[work[0].seg.index]
        P = overlapped(lambda: doubling_scan(kind, local, len(order), _p2p_deliver(call, order, like)), local_work)
        return [P[w.seg.index] for w in work], None

    @staticmethod
    def backward(G: List[torch.Tensor], work: List[SegmentWork], call: LinearCall, saved):
        J = call.layout.num_segments
        order = list(range(J - 1, -1, -1))  # scan position i holds segment J - 1 - i
        local = {J - 1 - w.seg.index: (w.kind.transpose(w.transition.detach()), G_j) for w, G_j in zip(work, G)}
        first = next(iter(local))
        N = doubling_scan(work[0].kind, local, J, _p2p_deliver(call, order, local[first]))
        return [N[J - 1 - w.seg.index] for w in work]

