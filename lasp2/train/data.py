"""Training data: synthetic multi-query associative recall (MQAR) and byte-level text.

Both produce the GLOBAL batch of a step deterministically from (seed, step) on every rank; each
rank then keeps its data-parallel rows and its sequence-parallel shard (``lasp2.shard`` in the
run's layout). Nothing depends on the number of ranks except which part a rank keeps, so a run
with SP = 4 sees exactly the tokens of a run with SP = 1.

**MQAR** (multi-query associative recall, Arora et al., "Zoology", 2023), laid out so that the
recall has to cross ranks. Every sequence draws n key-value pairs (distinct keys out of ``keys``
ids, values out of ``values`` ids)::

    | context: first seq_len - queries tokens            | queries: last `queries` tokens   |
    | k3 v3 k1 v1 k4 v4 k2 v2 | k2 v2 k4 v4 k1 v1 ...    | k4  k1  k1  k3  k2  ...          |
    | -  -  -  -  -  -  -  -  | v2 -  v4 -  v1 -  ...    | v4  v1  v1  v3  v2  ...  labels  |

The context lists the n pairs ("key value") in a fresh random order in every block of n pairs,
repeated to fill it; the queries are keys of the pairs, and each one's label is the value that
followed that key. The answers never appear in the query region, so a query can only be answered
from the pairs: with the default ``queries = seq_len / 2`` and SP = 2, the pairs are all on rank 0
and the queries all on rank 1 (with more ranks, on the first and the second half of the ranks),
so every answer travels through the state passed between ranks. Context keys after the first
block are labelled too (in-context recall of a pair seen a block earlier: denser training signal
for the same mechanism; ``context_labels=False`` turns it off). **Accuracy** is measured on the
queries only (argmax over the whole vocabulary; chance is 1 / values). Token ids: 0 filler (only
when the context length is odd), 1..keys keys, then values.

**Tokens** (``--task tokens``): windows of a memory-mapped token file, each rank reading only
its own rows and positions (``lasp2.train.tokens``; ``lasp2 prepare`` writes such files).

**Text**: bytes of a file, split into documents (blank lines by default), each followed by an
end-of-document token and packed into fixed-length sequences with ``pack_documents`` (global
``cu_seqlens``; the padding document of the last sequence is masked). Vocabulary: 256 bytes,
``PAD_ID`` 256, ``EOS_ID`` 257. One packed sequence is one micro-batch (``cu_seqlens`` needs
B == 1); sequences are visited in an order reshuffled every epoch from the seed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..parallel.api import shard
from .packing import IGNORE_INDEX, PackedSequence, pack_documents
from .sampling import step_generator
from .tokens import TokenData

PAD_ID, EOS_ID = 256, 257
TEXT_VOCAB = 258
FILLER_ID = 0


@dataclass
class MicroBatch:
    """One forward/backward of this rank: tokens and labels [b, T_local], global cu_seqlens, and
    where accuracy is measured (bool [b, T_local]; None: at every labelled token)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: Optional[torch.Tensor] = None
    scored: Optional[torch.Tensor] = None


# ---- MQAR ---------------------------------------------------------------------------------------


def mqar_batch(batch_size: int, seq_len: int, *, pairs: int, keys: int, values: int, seed: int, step: int,
               queries: Optional[int] = None, context_labels: bool = True):
    """The global MQAR batch of ``step``: (tokens, labels, scored), [batch_size, seq_len] each;
    tokens and labels int64, ``scored`` bool (the query positions, where accuracy is measured)."""
    queries = seq_len // 2 if queries is None else queries
    context = seq_len - queries
    if not (1 <= pairs <= keys) or queries < 1 or context < 2 * pairs:
        raise ValueError(f"MQAR with {pairs} pairs (of {keys} keys) and {queries} queries does not fit seq_len="
                         f"{seq_len}: the context ({context} tokens) must hold every pair once (2 x pairs tokens)")
    gen = step_generator(seed, step)
    B, n_ctx = batch_size, context // 2  # pairs shown in the context
    key_ids = torch.rand(B, keys, generator=gen).argsort(dim=1)[:, :pairs] + 1  # distinct per row
    value_ids = torch.randint(0, values, (B, pairs), generator=gen) + 1 + keys
    blocks = -(-n_ctx // pairs)
    order = torch.rand(B, blocks, pairs, generator=gen).argsort(dim=2).reshape(B, blocks * pairs)[:, :n_ctx]
    tokens = torch.full((B, seq_len), FILLER_ID, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    tokens[:, 0:2 * n_ctx:2] = key_ids.gather(1, order)
    tokens[:, 1:2 * n_ctx:2] = value_ids.gather(1, order)
    if context_labels:  # every key after the first block was shown with its value before
        labels[:, 2 * pairs:2 * n_ctx:2] = tokens[:, 2 * pairs + 1:2 * n_ctx:2]
    which = torch.randint(0, pairs, (B, queries), generator=gen)
    tokens[:, context:] = key_ids.gather(1, which)
    labels[:, context:] = value_ids.gather(1, which)
    scored = torch.zeros(B, seq_len, dtype=torch.bool)
    scored[:, context:] = True
    return tokens, labels, scored


# ---- text ---------------------------------------------------------------------------------------


def split_documents(raw: bytes, doc_sep: str) -> List[bytes]:
    """The non-empty documents of a file's bytes. ``doc_sep``: "blank-line" (one or more empty or
    whitespace-only lines separate documents), "line" or "none"."""
    if doc_sep == "blank-line":
        parts = re.split(rb"\r?\n[ \t\r]*\n", raw)
    elif doc_sep == "line":
        parts = raw.splitlines()
    elif doc_sep == "none":
        parts = [raw]
    else:
        raise ValueError(f"doc_sep must be blank-line, line or none, got {doc_sep!r}")
    return [p.strip(b"\r\n") for p in parts if p.strip()]


def read_documents(path: str, doc_sep: str = "blank-line") -> List[List[int]]:
    """Byte-level documents of a file (``split_documents``), each ending with ``EOS_ID``."""
    with open(path, "rb") as f:
        raw = f.read()
    docs = [list(p) + [EOS_ID] for p in split_documents(raw, doc_sep)]
    if not docs:
        raise ValueError(f"--data {path!r} holds no text (no non-empty document)")
    return docs


def too_little_text(path: str, n_tokens: int, seq_len: int) -> str:
    return (f"--data {path!r} holds {n_tokens} byte tokens (end-of-document marks included), less than one "
            f"--seq-len {seq_len} sequence: training would run on padding; use a shorter --seq-len or more text")


class TextData:
    """The packed sequences of a text file and their per-epoch order."""

    def __init__(self, path: str, seq_len: int, *, multiple_of: int, doc_sep: str = "blank-line", seed: int = 0):
        self.seed = seed
        self.sequences: List[PackedSequence] = list(
            pack_documents(read_documents(path, doc_sep), seq_len, multiple_of=multiple_of, pad_id=PAD_ID))
        self.n_tokens = sum(seq_len - s.n_padding for s in self.sequences)
        if self.n_tokens < seq_len:
            raise ValueError(too_little_text(path, self.n_tokens, seq_len))

    def __len__(self) -> int:
        return len(self.sequences)

    def sequence(self, index: int) -> PackedSequence:
        """The ``index``-th sequence visited (epochs in a seed-determined order each)."""
        epoch, pos = divmod(index, len(self.sequences))
        order = torch.randperm(len(self.sequences), generator=step_generator(self.seed, epoch, stream=1))
        return self.sequences[int(order[pos])]


# ---- what one rank sees -------------------------------------------------------------------------


class RankData:
    """Produces this rank's micro-batches for a step (``batch(step)``); see the module docstring."""

    def __init__(self, cfg, *, dp_rank: int, sp_group):
        self.cfg, self.dp_rank, self.group = cfg, dp_rank, sp_group
        self.per_dp = cfg.batch_size // cfg.dp
        self.text = self.tokens = None
        if cfg.task == "tokens":
            self.tokens = TokenData(cfg.data, cfg.seq_len, vocab_size=cfg.model_config().vocab_size, seed=cfg.seed,
                                    layout=cfg.layout, sp=cfg.sp, sp_rank=torch.distributed.get_rank(sp_group))
        if cfg.task == "text":
            parts = cfg.sp * (2 if cfg.layout == "zigzag" and cfg.sp > 1 else 1)
            self.text = TextData(cfg.data, cfg.seq_len, multiple_of=parts, doc_sep=cfg.doc_sep, seed=cfg.seed)

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        return shard(x, group=self.group, layout=self.cfg.layout, dim=1).contiguous()

    def batch(self, step: int) -> List[MicroBatch]:
        """Micro-batches of ``step`` (1-based) for this rank: one [B/dp, T/sp] for MQAR, one
        [1, T/sp] per packed sequence for text."""
        c = self.cfg
        rows = slice(self.dp_rank * self.per_dp, (self.dp_rank + 1) * self.per_dp)
        if self.tokens is not None:  # this rank's rows and positions only, read from the memory map
            tokens, labels = self.tokens.rows(step, c.batch_size, range(rows.start, rows.stop))
            return [MicroBatch(tokens, labels)]
        if self.text is None:
            tokens, labels, scored = mqar_batch(c.batch_size, c.seq_len, pairs=c.mqar_pairs, queries=c.mqar_queries,
                                                keys=c.mqar_keys, values=c.mqar_values, seed=c.seed, step=step,
                                                context_labels=c.mqar_context_labels)
            return [MicroBatch(self._shard(tokens[rows]), self._shard(labels[rows]), None, self._shard(scored[rows]))]
        out = []
        for i in range(rows.start, rows.stop):
            seq = self.text.sequence((step - 1) * c.batch_size + i)
            out.append(MicroBatch(self._shard(seq.tokens[None]), self._shard(seq.labels[None]), seq.cu_seqlens))
        return out
