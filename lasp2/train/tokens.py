"""Token files: a flat array of token ids on disk, memory-mapped; each rank reads only its part.

Formats: ``.npy`` (numpy's header gives the dtype and length) or raw ``.bin`` as nanoGPT writes
them (uint16 unless a sidecar says otherwise). ``lasp2 prepare`` writes ``FILE.bin`` and a sidecar
``FILE.bin.json`` (``format``, ``dtype``, ``n_tokens``, ``vocab_size``, ``eos_id``, ``tokenizer``,
``sources``); the sidecar is optional for reading, but without it ``--vocab-size`` must be given.

Sampling (nanoGPT's): sequence b of step s is the window [o_b, o_b + seq_len + 1) of the file at
an offset drawn from (seed, step) only, so resuming is exact and the tokens do not depend on the
number of ranks; its tokens are window[:-1], its labels window[1:]. A rank reads only its
data-parallel rows and, of each, the positions its sequence-parallel shard holds in the layout
plus the one token after each segment (its last label): about seq_len / sp + 2 tokens per row,
never the whole file. Documents are not masked: attention runs across end-of-document tokens
inside a window, as in nanoGPT and torchtitan's default; the model sees the boundaries as eos_id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..parallel.layout import Layout
from .sampling import step_generator

DTYPES = ("uint16", "uint32")
FORMAT = "lasp2-tokens"


def _numpy():
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with the data/test extras
        raise ValueError("token files need numpy: pip install 'lasp2[data]'") from None
    return np


def sidecar_path(path) -> Path:
    return Path(str(path) + ".json")


@dataclass
class TokenFileInfo:
    path: str
    dtype: str
    n_tokens: int
    vocab_size: Optional[int]  # from the sidecar, if any
    eos_id: Optional[int]


def inspect(path: str) -> TokenFileInfo:
    """The file's dtype, length and (sidecar) vocabulary without reading its tokens; ValueError
    naming --data when it is not a token file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--data {path!r} is not a readable file")
    meta = {}
    if sidecar_path(p).is_file():
        try:
            meta = json.loads(sidecar_path(p).read_text())
        except ValueError as e:
            raise ValueError(f"--data {path!r}: its sidecar {sidecar_path(p)} is not JSON ({e})") from None
    if p.suffix == ".npy":
        arr = _numpy().load(p, mmap_mode="r")
        dtype, n = str(arr.dtype), int(arr.size)
        if arr.ndim != 1:
            raise ValueError(f"--data {path!r} holds an array of shape {arr.shape}; a token file is 1-D")
    elif p.suffix == ".bin":
        dtype = meta.get("dtype", "uint16")
        size = p.stat().st_size
        item = 2 if dtype == "uint16" else 4
        if dtype in DTYPES and size % item:
            raise ValueError(f"--data {path!r} has {size} bytes, not a whole number of {dtype} tokens")
        n = size // item
    else:
        raise ValueError(f"--data {path!r}: --task tokens reads .bin (raw uint16, or as its .json sidecar says) "
                         f"or .npy token files; write one with lasp2 prepare")
    if dtype not in DTYPES:
        raise ValueError(f"--data {path!r} holds {dtype} tokens; token files hold {' or '.join(DTYPES)}")
    return TokenFileInfo(str(p), dtype, n, meta.get("vocab_size"), meta.get("eos_id"))


def open_tokens(info: TokenFileInfo):
    """A read-only memory map of the tokens (nothing is read until indexed)."""
    np = _numpy()
    if info.path.endswith(".npy"):
        return np.load(info.path, mmap_mode="r")
    return np.memmap(info.path, dtype=info.dtype, mode="r")


class TokenData:
    """This rank's windows of a token file (see the module docstring)."""

    def __init__(self, path: str, seq_len: int, *, vocab_size: int, seed: int, layout: str, sp: int, sp_rank: int,
                 tokens=None):
        self.info = inspect(path)
        if self.info.n_tokens < seq_len + 1:
            raise ValueError(too_little(self.info, seq_len))
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed
        self.segments = Layout(layout, sp, seq_len // sp).local_segments(sp_rank)
        self.tokens = open_tokens(self.info) if tokens is None else tokens

    def offsets(self, step: int, batch_size: int) -> torch.Tensor:
        """Window starts of the global batch of ``step`` [batch_size] (the same on every rank)."""
        return torch.randint(0, self.info.n_tokens - self.seq_len, (batch_size,),
                             generator=step_generator(self.seed, step, stream=2))

    def rows(self, step: int, batch_size: int, rows: range) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels) int64 [len(rows), T_local] of this rank for global rows ``rows``."""
        np = _numpy()
        starts = self.offsets(step, batch_size).tolist()
        toks, labs = [], []
        for b in rows:
            parts = [np.asarray(self.tokens[starts[b] + s.global_start: starts[b] + s.global_start + s.length + 1])
                     for s in self.segments]
            toks.append(np.concatenate([p[:-1] for p in parts]))
            labs.append(np.concatenate([p[1:] for p in parts]))
        tokens = torch.from_numpy(np.stack(toks).astype(np.int64))
        labels = torch.from_numpy(np.stack(labs).astype(np.int64))
        top = int(max(tokens.max(), labels.max()))
        if top >= self.vocab_size:
            raise ValueError(f"--data {self.info.path!r} holds token id {top} but the model's vocabulary has "
                             f"{self.vocab_size} ids; pass --vocab-size {top + 1} or larger (or the tokenizer's)")
        return tokens, labels


def too_little(info: TokenFileInfo, seq_len: int) -> str:
    return (f"--data {info.path!r} holds {info.n_tokens} tokens, fewer than one sequence needs (--seq-len {seq_len} "
            f"+ 1 for the last label); use a shorter --seq-len or more data")


# ---- writing (lasp2 prepare) --------------------------------------------------------------------


def write_tokens(out: str, pieces: List, *, vocab_size: int, eos_id: Optional[int], tokenizer: str,
                 sources: List[str]) -> TokenFileInfo:
    """Write the concatenated ``pieces`` (1-D integer arrays) to ``out`` (.bin or .npy) in the
    smallest of uint16 / uint32 that holds ``vocab_size`` ids, with the sidecar ``out.json``."""
    np = _numpy()
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    p = Path(out)
    if p.suffix not in (".bin", ".npy"):
        raise ValueError(f"--out {out!r} must end in .bin or .npy")
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    if p.suffix == ".npy":
        arr = np.concatenate([np.asarray(x, dtype=dtype) for x in pieces]) if pieces else np.zeros(0, dtype)
        np.save(p, arr)
        n = int(arr.size)
    else:
        with open(p, "wb") as f:
            for x in pieces:
                a = np.asarray(x, dtype=dtype)
                f.write(a.tobytes())
                n += int(a.size)
    meta = {"format": FORMAT, "dtype": dtype, "n_tokens": n, "vocab_size": vocab_size, "eos_id": eos_id,
            "tokenizer": tokenizer, "sources": sources}
    sidecar_path(p).write_text(json.dumps(meta, indent=1))
    return TokenFileInfo(str(p), dtype, n, vocab_size, eos_id)
