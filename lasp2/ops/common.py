"""Small helpers shared by the single-device ops (one home each; no torch.distributed).

    compute_dtype(dtype)        fp64 stays fp64, everything else computes in fp32
    default_scale(scale, d)     the score / output scale, d ** -0.5 unless given
    to_chunks / from_chunks     [B, T, H, D] <-> [B, H, N, C, D] (zero-padded to N * C tokens)
    masked_exp(x, mask)         exp(x) where mask, exactly 0 elsewhere, with finite gradients
    segment_starts(cu, T)       the document-start flags of one segment (the chunk forms' input)
    doc_positions(cu, C)        (chunk, column) of every document's first and last token
    DocMasks                    the chunked document structure of one segment
    ChunkedShape                C and N of a chunked segment (base of chunk.Chunked, delta.DeltaChunked)

Shape legend: B batch, T tokens, H heads, D head dim, C chunk size, N chunks (T zero-padded up
to N * C), Nd documents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ops compute, accumulate and keep states in: fp64 for fp64 inputs (the exactness
    tests), fp32 for fp32/fp16/bf16 inputs (running states drift in half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(scale: Optional[float], d: int) -> float:
    """``scale`` as a float, or d ** -0.5 (d: the query/key head dim) when it is None."""
    return d ** -0.5 if scale is None else float(scale)


def to_chunks(x: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, C, D] in ``dtype``, zero-padded at the end."""
    B, T, H, D = x.shape
    N = -(-T // C)
    x = x.to(dtype)
    if N * C != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, N * C - T))
    return x.view(B, N, C, H, D).permute(0, 3, 1, 2, 4).contiguous()


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, N, C, D] -> [B, T, H, D] (drops the padding)."""
    B, H, N, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, D)[:, :T]


def masked_exp(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """exp(x) where mask, exactly 0 elsewhere, with finite gradients (mask applied in log space)."""
    if mask is None:
        return x.exp()
    return torch.where(mask, x, torch.full_like(x, float("-inf"))).exp()


def segment_starts(cu_seqlens: Optional[torch.Tensor], T: int, device) -> Optional[torch.Tensor]:
    """bool [T]: True at every document start of a whole segment [0, T) except token 0 (document
    0 is the segment's continuing document: it receives the incoming state). None without
    ``cu_seqlens`` ([N + 1] int, 0 first, T last)."""
    if cu_seqlens is None or cu_seqlens.numel() <= 2:  # one document: no start after token 0 (a shape test)
        return None
    starts = torch.zeros(T, dtype=torch.bool, device=device)
    starts[cu_seqlens[:-1].long()] = True
    starts[0] = False
    return starts


def start_mask(starts: Optional[Sequence[int]], T: int, device) -> Optional[torch.Tensor]:
    """bool [T], True at the host positions ``starts`` (None when there are none)."""
    if not starts:
        return None
    mask = torch.zeros(T, dtype=torch.bool, device=device)
    mask[list(starts)] = True
    return mask


def doc_positions(cu_seqlens: torch.Tensor, C: int):
    """(chunk, column) of every document's first token, then of its last token: four [Nd] long."""
    starts = cu_seqlens[:-1].long()
    ends = cu_seqlens[1:].long() - 1
    return starts // C, starts % C, ends // C, ends % C


@dataclass
class DocMasks:
    """Document structure of one (padded) segment, chunked. All bool.

    pair  [N, C, C]  j <= i and same document (the causal intra mask)
    cont  [N, C]     no document start in the chunk at or before i: the state entering the
                     chunk reaches token i
    last  [N, C]     token j belongs to the document that is open at the chunk's end
    chunk_cont [N]   the chunk has no document start (its transition is non-zero)
    """

    pair: torch.Tensor
    cont: torch.Tensor
    last: torch.Tensor
    chunk_cont: torch.Tensor

    @staticmethod
    def build(starts: torch.Tensor, C: int) -> "DocMasks":
        T = starts.numel()
        N = -(-T // C)
        s = torch.zeros(N * C, dtype=torch.long, device=starts.device)
        s[:T] = starts.long()
        s = s.view(N, C)
        in_chunk = s.cumsum(-1)  # document index within the chunk, 0 = continuing document
        seg = s.flatten().cumsum(0).view(N, C)  # document index within the segment
        causal = torch.ones(C, C, dtype=torch.bool, device=s.device).tril()
        pair = causal & (seg[:, :, None] == seg[:, None, :])
        return DocMasks(
            pair=pair,
            cont=in_chunk == 0,
            last=seg == seg[:, -1:],
            chunk_cont=in_chunk[:, -1] == 0,
        )

    @staticmethod
    def maybe(starts: Optional[torch.Tensor], C: int) -> Optional["DocMasks"]:
        """``build`` for ``starts`` (which, when given, marks at least one start: every producer
        returns None for a segment without one, from host knowledge), else None (one document).
        No device read."""
        return None if starts is None else DocMasks.build(starts, C)


class ChunkedShape:
    """Chunk size C and chunk count N of a prepared segment whose ``q`` is [B, H, N, C, K]."""

    q: torch.Tensor

    @property
    def C(self) -> int:
        return self.q.shape[3]

    @property
    def N(self) -> int:
        return self.q.shape[2]


def causal_pair(C: int, device) -> torch.Tensor:
    """bool [C, C]: j <= i (the intra-chunk mask of one document)."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()


__all__: Tuple[str, ...] = ("compute_dtype", "default_scale", "to_chunks", "from_chunks", "masked_exp",
                            "segment_starts", "doc_positions", "DocMasks", "ChunkedShape",
                            "causal_pair")
