"""The sequence-parallel context an attention module may carry.

Layers are single-device modules. ``lasp2.parallelize`` attaches an :class:`SPContext` to every
attention module (``module.sp = SPContext(...)``); with ``module.sp is None`` the module runs the
single-device op on whatever tokens it is given. Nothing here reads global state: the rank and
the group size come from ``group``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..parallel import comm
from ..parallel.layout import Layout


@dataclass(frozen=True)
class SPContext:
    """Where this module's tokens live and how its attention is parallelised.

    group: the sequence-parallel process group (``mesh["sp"].get_group()``).
    strategy: the SP strategy for this module's kind of attention, a name from the registry
        (``lasp2.parallel.strategies``: linear "lasp2", "lasp1", "allscan", "tree"; softmax
        "allgather", "ring", "ulysses").
    layout: "contiguous" or "zigzag"; must match how the inputs were sharded (``lasp2.shard``).
    """

    group: object
    strategy: str
    layout: str = "contiguous"


def token_positions(T: int, sp: Optional[SPContext], cu_seqlens: Optional[torch.Tensor],
                    device) -> torch.Tensor:
    """Position of each of the T local tokens, int64 [T], for RoPE.

    Without SP the tokens are the whole sequence (positions 0..T-1). Under SP they are the
    *global* positions of this rank's tokens in ``sp.layout``, so RoPE sees the same angles as on
    one device. With ``cu_seqlens`` (global document boundaries) positions restart at 0 at every
    document start: packed documents are then encoded exactly as if each were its own sequence.
    """
    if sp is None:
        pos = torch.arange(T, device=device)
    else:
        rank, world = comm.rank_and_size(sp.group)
        pos = Layout(sp.layout, world, T).global_positions(rank, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        doc = torch.searchsorted(cu, pos, right=True) - 1  # the document holding each token
        pos = pos - cu[doc.clamp(0, cu.numel() - 2)]
    return pos
