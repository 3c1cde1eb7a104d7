"""LASP-1: the ring-chain baseline. The running state hops rank to rank in sequence order.

Each rank first does all of its local work that needs no incoming state (summaries and
zero-state outputs, as LASP-2 does), then waits for the state entering its segment from the
previous segment's owner, forwards Â P + Ŝ to the next owner immediately, and only then adds its
own incoming-state term, so the chain carries no avoidable compute. With ``contiguous`` that is
W - 1 sequential hops per direction; with ``zigzag`` the chain runs through 2W segments
(2W - 2 hops, two sends and two receives on most ranks).

Backward runs the same chain in reverse with D_j = G_j + Â_j^T D_{j+1} (DESIGN §1). The local
work and the autograd Function are shared with the other linear strategies (``linear_sp``).
"""
from __future__ import annotations

from typing import List

import torch

from . import agreement, comm
from .context import LinearCall
from .linear_local import SegmentWork, apply_transition


class ChainExchange:
    """LASP-1's exchange (``linear_sp`` protocol): whole states, one blocking hop at a time.

    Communication: forward, per local segment j > 0 one recv of [B, H, K, V] from the owner of
    j - 1 and per local segment j < J - 1 one send to the owner of j + 1 (skipped when that is
    this rank); backward the same in reverse. Every message also carries the W agreement digests
    seen so far upstream (``agreement.ChainDigests``, 8 W bytes); a rank that sees one differ
    from its own raises after its own sends, so the chain never stalls.
    """

    name = "lasp1"

    @staticmethod
    def forward(work: List[SegmentWork], call: LinearCall, local_work):
        layout, group = call.layout, call.group
        rank = comm.rank_and_size(group)[0]
        chain = agreement.ChainDigests(call.world, rank, call.digest)
        local_work()
        carried, P_out = None, []
        for w in work:  # local order is sequence order in both layouts
            j = w.seg.index
            if j == 0:
                P = torch.zeros_like(w.summary_state.detach())
            elif layout.owner(j - 1) == rank:
                P = carried
            else:
                like = w.summary_state.detach()
                P = chain.detach(comm.recv(chain.message_like(like), layout.owner(j - 1), group), like)
            out = apply_transition(w.kind, w.transition.detach(), P) + w.summary_state.detach()
            if j + 1 < layout.num_segments:
                if layout.owner(j + 1) == rank:
                    carried = out
                else:
                    comm.send(chain.attach(out), layout.owner(j + 1), group)
            P_out.append(P)
        chain.verify("sp_linear_attention(strategy='lasp1')")
        return P_out, None

    @staticmethod
    def backward(G: List[torch.Tensor], work: List[SegmentWork], call: LinearCall, saved):
        layout, group = call.layout, call.group
        rank = comm.rank_and_size(group)[0]
        chain = agreement.ChainDigests(call.world, rank, call.digest)
        nxt = [None] * len(work)
        carried = None
        for i in range(len(work) - 1, -1, -1):
            w, j = work[i], work[i].seg.index
            if j == layout.num_segments - 1:
                nxt[i] = torch.zeros_like(w.summary_state.detach())
            elif layout.owner(j + 1) == rank:
                nxt[i] = carried
            else:
                like = w.summary_state.detach()
                nxt[i] = chain.detach(comm.recv(chain.message_like(like), layout.owner(j + 1), group), like)
            D = G[i] + apply_transition(w.kind, w.transition.detach(), nxt[i], transpose=True)
            if j > 0:
                if layout.owner(j - 1) == rank:
                    carried = D
                else:
                    comm.send(chain.attach(D), layout.owner(j - 1), group)
        chain.verify("sp_linear_attention(strategy='lasp1'), backward")
        return nxt
