"""The mask of a softmax attention call, as one frozen value (no torch.distributed).

Key j is visible to query i iff ``k_pos[j] <= q_pos[i]`` (when ``causal``) and
``k_doc[j] == q_doc[i]`` (when document ids are given). Positions are *global* token positions
and need not be sorted or contiguous (zigzag shards, permuted or gathered key sets), so a mask is
never "the upper triangle of a square".

    q_pos  [Tq] int64   (None: arange(Tq))       k_pos  [Tk] int64   (None: arange(Tk))
    q_doc  [Tq] int64   (None: one document)     k_doc  [Tk] int64   (given together with q_doc)

The blockwise kernels ask it for a plan (which [block, block] tiles to skip, run unmasked or run
masked; decided from per-block min/max, O(T / block) host work) and for the bool mask of one tile.

Where the positions are runs of consecutive global positions known on the host (sequence
parallelism: a rank holds one or two segments of the sequence) and the document boundaries are a
host list, the mask carries them as ``HostRanges`` and the plan is computed from them in Python,
without reading a device tensor (no host sync per call on GPUs).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# Codes of the per-(query block, key block) plan.
SKIP, FULL, MASKED = 0, 1, 2


Run = Tuple[int, int, int]  # (local start, global start, length): local tokens [s, s + n) sit at [g, g + n)


@dataclass(frozen=True)
class HostRanges:
    """The host-side description of a mask's positions: the queries' and keys' runs of
    consecutive global positions (in local order, covering all of them) and the document
    boundaries (global cumulative lengths, or None for one document)."""

    q: Tuple[Run, ...]
    k: Tuple[Run, ...]
    cu: Optional[Tuple[int, ...]] = None


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees (see the module docstring). ``host``: the same positions and
    documents as host ranges, when known (then ``plan`` reads no tensor)."""

    causal: bool = True
    q_pos: Optional[Tensor] = None
    k_pos: Optional[Tensor] = None
    q_doc: Optional[Tensor] = None
    k_doc: Optional[Tensor] = None
    host: Optional[HostRanges] = None

    def __post_init__(self):
        if (self.q_doc is None) != (self.k_doc is None):
            raise ValueError("AttentionMask: give document ids for both queries and keys (q_doc and k_doc), "
                             "or for neither")

    def resolved(self, tq: int, tk: int, device) -> "AttentionMask":
        """The same mask with default positions (arange) filled in for Tq queries, Tk keys."""
        if self.q_pos is not None and self.k_pos is not None:
            return self
        return replace(self, q_pos=_arange(self.q_pos, tq, device), k_pos=_arange(self.k_pos, tk, device))

    def visible(self) -> Optional[Tensor]:
        """bool [Tq, Tk] of visible keys, or None when every key is visible (positions resolved)."""
        allowed = None
        if self.causal:
            allowed = self.k_pos[None, :] <= self.q_pos[:, None]
        if self.q_doc is not None:
            same = self.q_doc[:, None] == self.k_doc[None, :]
            allowed = same if allowed is None else allowed & same
        return allowed

    def tile(self, rows: slice, cols: slice) -> Tensor:
        """bool [rows, cols] of visible keys of one tile (positions resolved; some mask needed)."""
        return replace(self, q_pos=self.q_pos[rows], k_pos=self.k_pos[cols],
                       q_doc=None if self.q_doc is None else self.q_doc[rows],
                       k_doc=None if self.k_doc is None else self.k_doc[cols]).visible()

    def plan(self, bs: int) -> List[List[int]]:
        """For each (query block, key block) of ``bs`` rows: SKIP, FULL (no mask) or MASKED.

        Conservative: a block is skipped or declared fully visible only when that is certain
        from the blocks' position and document ranges (positions resolved).
        """
        if self.host is not None:
            qp, kp = runs_min_max(self.host.q, bs), runs_min_max(self.host.k, bs)
            cu = self.host.cu
            qd = None if cu is None else [(doc_of(lo, cu), doc_of(hi, cu)) for lo, hi in qp]
            kd = None if cu is None else [(doc_of(lo, cu), doc_of(hi, cu)) for lo, hi in kp]
        else:
            qp, kp = _block_min_max(self.q_pos, bs), _block_min_max(self.k_pos, bs)
            qd = _block_min_max(self.q_doc, bs) if self.q_doc is not None else None
            kd = _block_min_max(self.k_doc, bs) if self.k_doc is not None else None
        plan = []
        for i, (qp_lo, qp_hi) in enumerate(qp):
            row = []
            for j, (kp_lo, kp_hi) in enumerate(kp):
                hidden, full = False, True
                if self.causal:
                    hidden = kp_lo > qp_hi  # every key is after every query
                    full = kp_hi <= qp_lo  # every key is at or before every query
                if qd is not None:
                    (qd_lo, qd_hi), (kd_lo, kd_hi) = qd[i], kd[j]
                    hidden = hidden or kd_hi < qd_lo or kd_lo > qd_hi  # document ranges disjoint
                    full = full and qd_lo == qd_hi == kd_lo == kd_hi  # all in one document
                row.append(SKIP if hidden else (FULL if full else MASKED))
            plan.append(row)
        return plan


def _arange(pos: Optional[Tensor], n: int, device) -> Tensor:
    return torch.arange(n, device=device, dtype=torch.int64) if pos is None else pos


def _block_min_max(x: Tensor, bs: int) -> List[Tuple[int, int]]:
    """(min, max) of each length-``bs`` block of a 1-D int tensor, with a single host sync."""
    n = x.numel()
    if n == 0:
        return []
    nb = -(-n // bs)
    pad = nb * bs - n
    # Pad by repeating the last element: it does not change any block's min or max.
    xp = torch.cat([x, x[-1:].expand(pad)]) if pad else x
    xp = xp.view(nb, bs)
    return [tuple(r) for r in torch.stack([xp.amin(1), xp.amax(1)], 1).tolist()]


def doc_of(position: int, cu: Sequence[int]) -> int:
    """Document index of a global position (documents are the intervals [cu[i], cu[i + 1]); a
    position at a repeated boundary belongs to the last document that starts there)."""
    return bisect_right(cu, position) - 1


def runs_min_max(runs: Sequence[Run], bs: int) -> List[Tuple[int, int]]:
    """(min, max) global position of each length-``bs`` block of the local tokens described by
    ``runs`` (consecutive global positions per run), in Python: O(blocks + runs)."""
    n = sum(length for _, _, length in runs)
    out = []
    for b0 in range(0, n, bs):
        b1 = min(b0 + bs, n)
        lo = hi = None
        for start, g, length in runs:
            a, e = max(b0, start), min(b1, start + length)
            if a < e:
                lo = g + a - start if lo is None else min(lo, g + a - start)
                hi = g + e - 1 - start if hi is None else max(hi, g + e - 1 - start)
        out.append((lo, hi))
    return out


def runs_visible(q_runs: Sequence[Run], k_runs: Sequence[Run], cu: Optional[Sequence[int]], causal: bool) -> bool:
    """Whether any key of ``k_runs`` is visible to any query of ``q_runs`` (same document and,
    when causal, at or before the query), exactly, from the runs alone. Documents are intervals,
    so for two runs it is enough to look at their nearest ends."""
    for _, qa, qn in q_runs:
        for _, ka, kn in k_runs:
            qb, kb = qa + qn, ka + kn  # exclusive ends
            if qa < kb and ka < qb:  # overlapping runs: a shared position sees itself
                return True
            if kb <= qa:  # keys before queries: the last key and the first query share a document?
                if cu is None or doc_of(kb - 1, cu) == doc_of(qa, cu):
                    return True
            elif not causal and (cu is None or doc_of(qb - 1, cu) == doc_of(ka, cu)):  # keys after queries
                return True
    return False
