"""What the sequence-parallel softmax strategies share (allgather / LASP-2H, ring, Ulysses).

``SoftmaxCall`` is the per-call state every strategy's forward and backward need, as one frozen
value: a new option adds a field here instead of a parameter to every function. It also gives
the mask between any two ranks' tokens (from the layout's global positions and the global
document ids), and which rank pairs the mask fully hides. ``kv_replication`` is Ulysses' GQA
rule, shared with the cost model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from ..ops.attention_mask import AttentionMask, HostRanges, runs_visible
from . import comm
from .layout import Layout

BLOCK_SIZE = 256  # tile size of the blockwise kernels (rows of a query block and a key block)


@dataclass(frozen=True)
class SoftmaxCall:
    """Per-call state of one SP softmax attention call.

    scale: score scale (resolved, a float). causal: the causal mask. layout: the sharding
    (``Layout`` of this group). group: the SP process group. doc: global document id of every
    global position, [W * T] int64, or None (one document). block_size: kernel tile size.
    digest: the call's 64-bit agreement digest (``agreement.call_digest``), sent inside the
    strategy's first message and checked against the other ranks' (``agreement.UNCHECKED``: not
    checked per call). cu_list: the global document boundaries as a host tuple (None: one
    document): masks carry them with the layout's runs, so planning and visibility read no
    device tensor. backend: the resolved local kernel, "torch" or "flex"
    (``ops.softmax_backends``); the communication is the same for both.
    """

    scale: float
    causal: bool
    layout: Layout
    group: Any
    doc: Optional[torch.Tensor] = None
    block_size: int = BLOCK_SIZE
    digest: int = 0
    cu_list: Optional[Tuple[int, ...]] = None
    backend: str = "torch"

    def rank_and_size(self) -> Tuple[int, int]:
        return comm.rank_and_size(self.group)

    def runs(self, rank: int) -> Tuple[Tuple[int, int, int], ...]:
        """``rank``'s local tokens as runs (local start, global start, length)."""
        return tuple((s.local_start, s.global_start, s.length) for s in self.layout.local_segments(rank))

    def _host(self, q_runs, k_runs) -> Optional[HostRanges]:
        if self.doc is not None and self.cu_list is None:
            return None  # documents known only on the device: plan from the tensors
        return HostRanges(q_runs, k_runs, self.cu_list if self.doc is not None else None)

    def positions_and_docs(self, rank: int, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Global positions [T] of ``rank``'s tokens and their document ids (None without docs)."""
        return positions_and_docs(self.layout, rank, self.doc, device)

    def mask(self, q_rank: int, k_rank: int, device) -> AttentionMask:
        """The mask between ``q_rank``'s queries and ``k_rank``'s keys."""
        q_pos, q_doc = self.positions_and_docs(q_rank, device)
        k_pos, k_doc = self.positions_and_docs(k_rank, device)
        return AttentionMask(self.causal, q_pos, k_pos, q_doc, k_doc, self._host(self.runs(q_rank), self.runs(k_rank)))

    def global_mask(self, device) -> AttentionMask:
        """The mask over all W * T tokens in rank-major slot order (rank 0's tokens first), the
        order Ulysses' all-to-all delivers them in."""
        pos = self.layout.global_index(device)
        pdoc = None if self.doc is None else self.doc[pos]
        T, W = self.layout.local_len, self.layout.world
        runs = tuple((r * T + start, g, n) for r in range(W) for start, g, n in self.runs(r))
        return AttentionMask(self.causal, pos, pos, pdoc, pdoc, self._host(runs, runs))

    def visibility(self, rank: int, device) -> List[bool]:
        """For every rank j: whether any of j's keys is visible to any of ``rank``'s queries."""
        W = self.rank_and_size()[1]
        if self._host((), ()) is not None:  # from the runs and the host document list: no tensor read
            cu = self.cu_list if self.doc is not None else None
            return [runs_visible(self.runs(rank), self.runs(j), cu, self.causal) for j in range(W)]
        q_pos, q_doc = self.positions_and_docs(rank, device)
        return [any_visible(q_pos, q_doc, *self.positions_and_docs(j, device), self.causal) for j in range(W)]


def positions_and_docs(layout: Layout, rank: int, doc: Optional[torch.Tensor],
                       device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Global positions [T] of ``rank``'s tokens and their document ids (None without docs)."""
    pos = layout.global_positions(rank, device)
    return pos, None if doc is None else doc[pos]


def any_visible(q_pos: torch.Tensor, q_doc: Optional[torch.Tensor], k_pos: torch.Tensor,
                k_doc: Optional[torch.Tensor], causal: bool) -> bool:
    """Whether any key is visible to any query (exact, O(Tq + Tk + documents), no [Tq, Tk]).

    A key j is visible to query i iff same document and (not causal or k_pos <= q_pos). Per
    document d that happens iff min k_pos over d's keys <= max q_pos over d's queries.
    """
    if q_doc is None:
        return (not causal) or bool(k_pos.min() <= q_pos.max())
    n = int(torch.maximum(q_doc.max(), k_doc.max())) + 1
    big = torch.iinfo(torch.int64).max
    # Without the causal mask any query of document d sees every key of d: use q_pos = big - 1.
    q_val = q_pos if causal else torch.full_like(q_pos, big - 1)
    k_min = torch.full((n,), big, dtype=torch.int64, device=k_pos.device).scatter_reduce(
        0, k_doc, k_pos, "amin")
    q_max = torch.full((n,), -1, dtype=torch.int64, device=q_pos.device).scatter_reduce(
        0, q_doc, q_val, "amax")
    return bool((k_min <= q_max).any())


def kv_replication(H: int, Hkv: int, W: int) -> int:
    """Ulysses' GQA rule: the smallest m with m | H / Hkv and W | Hkv * m, i.e. how many copies
    of every KV head make whole KV heads per rank (m = H / Hkv always works when W | H)."""
    G = H // Hkv
    return next(m for m in range(1, G + 1) if G % m == 0 and (Hkv * m) % W == 0)
