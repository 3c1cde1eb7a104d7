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


def where(sp: Optional[SPContext], cu_seqlens: Optional[torch.Tensor], batch) -> dict:
    """The keyword arguments that place an SP op's call: ``batch=`` (this batch's context, its
    layout and group checked against the module's: a ValueError on a mismatch, never wrong
    positions) or the module's group / layout with the raw ``cu_seqlens``."""
    if batch is None:
        return dict(group=sp.group, layout=sp.layout, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        raise ValueError("pass the batch context (batch=) or cu_seqlens, not both: the batch holds the documents")
    if batch.layout.name != sp.layout:
        raise ValueError(f"this batch was sharded with layout={batch.layout.name!r} but the model was parallelized "
                         f"with layout={sp.layout!r}; build the batch (SPBatch.build / lasp2.shard) with "
                         f"layout={sp.layout!r}")
    if batch.group is not sp.group:
        raise ValueError("this batch's context was built for another process group than the model's "
                         "sequence-parallel group; build it with the model's group")
    return dict(batch=batch)


def token_positions(T: int, sp: Optional[SPContext], cu_seqlens: Optional[torch.Tensor],
                    device, batch=None) -> torch.Tensor:
    """Position of each of the T local tokens, int64 [T], for RoPE.

    Without SP the tokens are the whole sequence (positions 0..T-1). Under SP they are the
    *global* positions of this rank's tokens in ``sp.layout``, so RoPE sees the same angles as on
    one device. With ``cu_seqlens`` (global document boundaries) positions restart at 0 at every
    document start: packed documents are then encoded exactly as if each were its own sequence.
    With ``batch`` (this batch's context) they are its positions, computed once per batch.
    """
    if batch is not None:
        return batch.position_ids.to(device, non_blocking=True)
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
