"""How a global sequence is split over the ranks of a sequence-parallel group (DESIGN §1).

``contiguous``: rank r holds global tokens [r T, (r + 1) T) (T the local length).
``zigzag``: the sequence is cut into 2W equal segments; rank r holds segments r and 2W-1-r, in
that order, which balances causal softmax work.

Both are described the same way: a rank holds ``segments_per_rank`` equal segments, each a
contiguous run of global tokens; linear strategies publish one summary per segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Segment:
    index: int         # global segment index (segments are numbered in sequence order)
    owner: int         # rank that holds it
    local_start: int   # offset in the owner's local tensor
    global_start: int  # offset in the global sequence
    length: int


@dataclass(frozen=True)
class Layout:
    """Where every token lives. ``local_len`` is T, the tokens per rank."""

    name: str
    world: int
    local_len: int

    def __post_init__(self):
        if self.name not in LAYOUTS:
            raise ValueError(f"unknown layout {self.name!r}; choose one of {', '.join(map(repr, LAYOUTS))}")
        if self.local_len % self.segments_per_rank:
            raise ValueError(f"layout='zigzag' holds two equal segments per rank, so the local length "
                             f"must be even, got T = {self.local_len}; use an even length or "
                             f"layout='contiguous'")

    @property
    def segments_per_rank(self) -> int:
        return 1 if self.name == "contiguous" or self.world == 1 else 2

    @property
    def global_len(self) -> int:
        return self.world * self.local_len

    @property
    def segment_len(self) -> int:
        return self.local_len // self.segments_per_rank

    def segment_indices(self, rank: int) -> Tuple[int, ...]:
        """Global segment indices held by ``rank``, in local order."""
        if self.segments_per_rank == 1:
            return (rank,)
        return (rank, 2 * self.world - 1 - rank)

    def owner(self, index: int) -> int:
        if self.segments_per_rank == 1:
            return index
        return index if index < self.world else 2 * self.world - 1 - index

    def segment(self, index: int) -> Segment:
        owner = self.owner(index)
        slot = self.segment_indices(owner).index(index)
        L = self.segment_len
        return Segment(index, owner, slot * L, index * L, L)

    def local_segments(self, rank: int) -> List[Segment]:
        return [self.segment(i) for i in self.segment_indices(rank)]

    @property
    def num_segments(self) -> int:
        return self.world * self.segments_per_rank

    def global_positions(self, rank: int, device=None) -> torch.Tensor:
        """Global position of every local token: int64 [T]."""
        return torch.cat([torch.arange(s.global_start, s.global_start + s.length, device=device)
                          for s in self.local_segments(rank)])

    def global_index(self, device=None) -> torch.Tensor:
        """For every rank-major local slot (rank, t), its global position: int64 [W * T]."""
        return torch.cat([self.global_positions(r, device) for r in range(self.world)])


def local_starts(cu_list: Optional[Sequence[int]], seg: Segment) -> Optional[Tuple[int, ...]]:
    """Document starts inside one segment as sorted host positions in [0, length) (None when no
    document starts in it), from the global boundaries as host ints: no device read.

    The segment's first token counts as a start only when a document begins exactly there.
    """
    if cu_list is None:
        return None
    end = seg.global_start + seg.length
    inside = tuple(c - seg.global_start for c in cu_list if seg.global_start <= c < end)
    return inside or None
