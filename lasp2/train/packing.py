"""Pack variable-length documents into fixed-length sequences with global ``cu_seqlens``.

Policy (nothing is silently dropped or truncated):
- documents are laid end to end; a document that does not fit in the space left is split, and
  its remainder starts the next sequence as a new document (its first token gets no target
  from the previous part, exactly as if it were a document of its own);
- the last sequence, if shorter than ``seq_len``, is completed by one padding document of
  ``pad_id`` tokens whose labels are all ignored (``IGNORE_INDEX``), so that the sequence still
  splits evenly over the sequence-parallel group; attention never crosses into it, because it
  is a document of its own in ``cu_seqlens``.
Labels are next-token targets within a document; the last token of every document (and every
padding token) has label ``IGNORE_INDEX``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class PackedSequence:
    tokens: torch.Tensor      # int64 [seq_len]
    labels: torch.Tensor      # int64 [seq_len], IGNORE_INDEX where there is no target
    cu_seqlens: torch.Tensor  # int64 [N + 1], global cumulative document lengths
    n_padding: int            # tokens of the padding document (0 if none)


def _finish(pieces: List[Sequence[int]], seq_len: int, pad_id: int) -> PackedSequence:
    used = sum(len(p) for p in pieces)
    n_pad = seq_len - used
    if n_pad:
        pieces = pieces + [[pad_id] * n_pad]
    tokens = torch.tensor([t for p in pieces for t in p], dtype=torch.long)
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:-1] = tokens[1:]
    labels[cu[1:] - 1] = IGNORE_INDEX  # no target across a document end
    if n_pad:
        labels[used:] = IGNORE_INDEX
    return PackedSequence(tokens, labels, cu, n_pad)


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int, *, multiple_of: int = 1,
                   pad_id: int = 0) -> Iterator[PackedSequence]:
    """Yield packed sequences of exactly ``seq_len`` tokens (see the module policy).

    ``multiple_of``: the sequence must split evenly over the sequence-parallel group (W for the
    contiguous layout, 2W for zigzag); a ``seq_len`` that does not is a ValueError.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if multiple_of < 1 or seq_len % multiple_of:
        raise ValueError(f"seq_len={seq_len} must be a multiple of {multiple_of} so that it splits evenly "
                         f"over the sequence-parallel ranks; choose seq_len = k * {multiple_of}")
    pieces: List[Sequence[int]] = []
    room = seq_len
    for doc in documents:
        doc = list(doc)
        if not doc:
            continue  # an empty document holds no tokens and no targets
        while doc:
            take = doc[:room]
            pieces.append(take)
            doc = doc[room:]
            room -= len(take)
            if room == 0:
                yield _finish(pieces, seq_len, pad_id)
                pieces, room = [], seq_len
    if pieces:
        yield _finish(pieces, seq_len, pad_id)
