"""The mask of a softmax attention call, as one frozen value (no torch.distributed).

Key j is visible to query i iff ``k_pos[j] <= q_pos[i]`` (when ``causal``) and
``k_doc[j] == q_doc[i]`` (when document ids are given). Positions are *global* token positions
and need not be sorted or contiguous (zigzag shards, permuted or gathered key sets), so a mask is
never "the upper triangle of a square".

    q_pos  [Tq] int64   (None: arange(Tq))       k_pos  [Tk] int64   (None: arange(Tk))
    q_doc  [Tq] int64   (None: one document)     k_doc  [Tk] int64   (given together with q_doc)

The blockwise kernels ask it for a plan (which [block, block] tiles to skip, run unmasked or run
masked; decided from per-block min/max, O(T / block) host work) and for the bool mask of one tile.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor

# Codes of the per-(query block, key block) plan.
SKIP, FULL, MASKED = 0, 1, 2


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees (see the module docstring)."""

    causal: bool = True
    q_pos: Optional[Tensor] = None
    k_pos: Optional[Tensor] = None
    q_doc: Optional[Tensor] = None
    k_doc: Optional[Tensor] = None

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
