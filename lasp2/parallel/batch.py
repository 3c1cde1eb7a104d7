"""One sequence-parallel context per batch (DESIGN §2): :class:`SPBatch`.

A batch of whole sequences is split over the ranks of an SP group once; everything a layer needs
to know about *where* its tokens sit in that batch is fixed at that moment and travels with the
batch as one frozen object: the group, the layout, the global position of every local token, the
document boundaries (global, and this rank's local view) and a digest of the batch's content.
Its values are checked once, where it is built (``SPBatch.build``), not at every layer call; a
model that receives it checks only that it belongs to this model and to these tokens.

Built by ``lasp2.hf.shard_batch`` (which also checks, with one 8-byte all-gather, that every
rank holds the same batch) and by the training loop's model wrapper (whose ranks draw the same
batch by construction). The core library can take the same object in place of its per-call
``group``/``layout``/``cu_seqlens`` arguments.

Shape legend: B sequences, T global tokens per sequence, W ranks, T_local = T / W, N documents.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..validation import check_cu_seqlens
from . import comm
from .layout import Layout


def batch_digest(*parts) -> int:
    """A 63-bit digest (never 0) of tensors (dtype, shape and bytes; moved to the CPU) and
    plain values (their repr), in order. None counts as a value."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().contiguous().cpu()
            h.update(f"|{t.dtype}{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")  # no copy
        else:
            h.update(f"|{p!r}|".encode())
    return (int.from_bytes(h.digest(), "little") >> 1) | 1


def _local_cu_seqlens(layout: Layout, rank: int, cu: Optional[torch.Tensor]) -> torch.Tensor:
    """Boundaries of the runs of this rank's local tokens that lie in one document *and* one
    segment: int64 [M + 1], 0 first, T_local last (a segment start always opens a run)."""
    bounds = {0, layout.local_len}
    for s in layout.local_segments(rank):
        bounds.add(s.local_start)
        if cu is not None:
            inside = cu[(cu > s.global_start) & (cu < s.global_start + s.length)] - s.global_start + s.local_start
            bounds.update(int(x) for x in inside)
    return torch.tensor(sorted(bounds), dtype=torch.long)


@dataclass(frozen=True, eq=False)
class SPBatch:
    """Where this rank's tokens of one batch sit, fixed when the batch was sharded.

    group: the SP process group. layout: ``Layout`` (name, W, T_local). rank: this rank in group.
    batch_size: B. positions: int64 [T_local], the global position of every local token.
    position_ids: int64 [T_local], the position the model encodes (the global one, or the offset
        in its document when documents are packed).
    cu_seqlens: None, or int64 [N + 1] global document boundaries (B == 1), on the CPU.
    local_cu_seqlens: int64 [M + 1], this rank's local tokens cut at every document start and
        every segment start (zigzag holds two segments), on the CPU.
    digest: 63-bit digest of the whole batch (tokens, labels, documents, layout), the same on
        every rank (checked by ``shard_batch``).
    tokens: None, or this rank's input ids [B, T_local]: the tokens this context was built for.
    checks: False (default): value checks (gate signs, beta ranges) and the ranks' agreement run
        once, here, not in every layer call (no host syncs inside the layers); True: every SP op
        call also checks its gates and its ranks' per-call digests, for debugging.
    cu_list: ``cu_seqlens`` as a host tuple of ints (None without documents), read by the layers
        instead of the tensor.

    ``eq=False``: identity semantics (it holds tensors and is never compared).
    """

    group: object
    layout: Layout
    rank: int
    batch_size: int
    positions: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: Optional[torch.Tensor]
    local_cu_seqlens: torch.Tensor
    digest: int
    tokens: Optional[torch.Tensor] = None
    checks: bool = False
    cu_list: Optional[Tuple[int, ...]] = None

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def local_len(self) -> int:
        return self.layout.local_len

    @property
    def has_documents(self) -> bool:
        return self.cu_seqlens is not None

    def check_local(self, T: int, B: int, what: str) -> None:
        """ValueError unless an op's inputs have this batch's local length and batch size (a
        shape check: no host sync)."""
        if T != self.local_len or B != self.batch_size:
            raise ValueError(f"{what}: inputs of {B} sequences x {T} local tokens, but the batch context is for "
                             f"{self.batch_size} x {self.local_len}; pass the batch these inputs were sharded with")

    @classmethod
    def build(cls, group, layout: str, global_len: int, batch_size: int, *,
              cu_seqlens: Optional[torch.Tensor] = None, digest: int = 0,
              tokens: Optional[torch.Tensor] = None, checks: bool = False) -> "SPBatch":
        """Check the values once and fix the context of one batch. ``global_len`` T must split
        into W equal parts (2W under zigzag); ``cu_seqlens`` as ``check_cu_seqlens`` requires.
        ValueError naming the argument otherwise. Communication: none."""
        rank, world = comm.rank_and_size(group)
        parts = world if layout == "contiguous" or world == 1 else 2 * world
        if global_len % parts:
            raise ValueError(f"the sequence length {global_len} does not split into {parts} equal parts for "
                             f"layout={layout!r} over {world} ranks; pad or trim the sequences to a multiple "
                             f"of {parts} yourself (lasp2 never does it silently)")
        lay = Layout(layout, world, global_len // world)
        check_cu_seqlens(cu_seqlens, global_len, batch_size)
        cu = None if cu_seqlens is None else cu_seqlens.detach().to("cpu", torch.long)
        pos = lay.global_positions(rank)
        pos_ids = pos if cu is None else pos - cu[torch.searchsorted(cu, pos, right=True) - 1]
        return cls(group, lay, rank, batch_size, pos, pos_ids, cu, _local_cu_seqlens(lay, rank, cu), digest, tokens,
                   checks, None if cu is None else tuple(cu.tolist()))


def resolve_placement(batch, group, layout: Optional[str], cu_seqlens, what: str):
    """(group, layout name, cu_seqlens) of a call: from ``batch`` (an ``SPBatch``) when given,
    which then must not be contradicted by the other arguments, else the arguments themselves."""
    if batch is None:
        return group, layout or "contiguous", cu_seqlens
    if not isinstance(batch, SPBatch):
        raise ValueError(f"{what}: batch must be an SPBatch (lasp2.SPBatch.build, lasp2.hf.shard_batch), "
                         f"got {type(batch).__name__}")
    if group is not None and group is not batch.group:
        raise ValueError(f"{what}: group differs from batch.group; pass one of them (the batch's is used)")
    if layout is not None and layout != batch.layout.name:
        raise ValueError(f"{what}: layout={layout!r} but the batch was sharded with layout={batch.layout.name!r}; "
                         f"drop layout (the batch's is used)")
    if cu_seqlens is not None:
        raise ValueError(f"{what}: cu_seqlens comes from the batch context; pass batch or cu_seqlens, not both")
    return batch.group, batch.layout.name, batch.cu_seqlens
