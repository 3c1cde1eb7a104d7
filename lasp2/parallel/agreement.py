"""Per-call agreement between the ranks of one sequence-parallel call (DESIGN §2).

Ranks that call an SP op with different arguments (document boundaries, lengths, strategy,
layout, causal, scale, shapes, dtypes) must get an error, never a result computed from
mismatched halves. Every call therefore computes a 64-bit **digest** of everything that must
agree (``call_digest``) and sends it *inside the call's own first message*: 8 bytes appended to
the all-gather buffer (LASP-2, bidirectional LASP-2, LASP-2H), to every all-to-all row (Ulysses),
to the K/V block that travels around the ring (ring attention), or a vector of W digests that
rides the state along the chain (LASP-1). A rank that sees another rank's digest differ from its
own raises ``ValueError`` naming the ranks, after finishing the call's communication so that no
other rank is left waiting. No extra collective: the cost is the hash (a few microseconds) and
8 bytes per message (8 W on the chain).

What each strategy can see: gathers and all-to-alls deliver every rank's digest to every rank,
so all ranks raise together. The ring delivers every block to every rank after W - 1 hops: all
ranks raise at the end of the forward. The LASP-1 chain carries the digests downstream only:
every rank after the first disagreeing one raises; under the contiguous layout rank 0 receives
nothing in forward and learns of it in backward (the reverse chain), or when the raising ranks
end the job (launchers stop the others at once).

A message whose *size* depends on the disagreeing argument (the local length for the softmax
strategies, head counts, ...) cannot be delivered at all: the first call with a new shape
signature on a group is checked by one small all-gather before anything else
(``comm.ensure_agreement``, cached per group); if ranks diverge in shape later, the collective
fails on the rank that receives the mismatched message (gloo aborts it; the launcher stops the
job naming it) and any rank whose collective completes raises the digest error.

**Once per batch instead:** a call made with a per-batch context (``batch.SPBatch``) runs inside
a batch whose ranks were shown to agree when it was built (same tokens, documents and layout:
``lasp2.hf.shard_batch``'s check, or the training loop's construction), in a model whose layers
are the same on every rank. Its digest is ``UNCHECKED`` (0): the 8 bytes still travel, nobody
reads them, and the call does no host read of received data (on CUDA: no sync). The context's
``checks=True`` restores the per-call checks, for debugging.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence

import torch

DIGEST_BYTES = 8
UNCHECKED = 0  # the digest of a call whose agreement was established once for its batch


def call_digest(signature: str, cu_seqlens: Optional[torch.Tensor] = None) -> int:
    """A 63-bit digest (never 0, never ``UNCHECKED``) of a call's signature string and its
    document boundaries."""
    h = hashlib.blake2b(signature.encode(), digest_size=8)
    if cu_seqlens is not None:
        h.update(b"|cu|" + str(cu_seqlens.tolist()).encode())
    return (int.from_bytes(h.digest(), "little") >> 1) | 1


def digest_elements(digest: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The digest's 8 bytes as a 1-D tensor of ``dtype`` (8 / element size elements), to append
    to a buffer of that dtype. The values are raw bits (possibly NaN patterns in a float dtype):
    move them, never convert them."""
    return torch.tensor([digest], dtype=torch.int64, device=device).view(dtype)


def digest_width(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` that hold one digest."""
    return DIGEST_BYTES // torch.empty(0, dtype=dtype).element_size()


def read_digests(tail: torch.Tensor) -> List[int]:
    """Digests from the trailing elements of each row of ``tail`` [..., width] (any dtype).

    ``tail`` is often a slice of a received message that starts at an odd fp32 element (a state
    of odd size before it); an int64 view needs an 8-byte aligned start, so the few elements are
    copied first (``contiguous`` would return the slice itself)."""
    return tail.clone(memory_format=torch.contiguous_format).view(torch.int64).reshape(-1).tolist()


def stamp_rows(rows: torch.Tensor, digest: int) -> torch.Tensor:
    """[n, m] -> [n, m + width]: the digest appended to every row (one copy, in rows' dtype)."""
    d = digest_elements(digest, rows.dtype, rows.device)
    return torch.cat([rows, d.expand(rows.shape[0], -1)], dim=1)


def check(digests: Sequence[int], mine: int, ranks: Optional[Sequence[int]] = None, what: str = "") -> None:
    """ValueError naming the ranks whose digest differs from ``mine`` (``ranks[i]`` is the rank
    of ``digests[i]``; default: position = rank). ``what``: the op, for the message. Nothing to
    check when ``mine`` is ``UNCHECKED``."""
    if mine == UNCHECKED:
        return
    ranks = list(range(len(digests))) if ranks is None else list(ranks)
    bad = sorted({r for r, d in zip(ranks, digests) if d != mine})
    if bad:
        raise ValueError(f"ranks of the sequence-parallel group called {what or 'the op'} with different "
                         f"arguments in this call (document boundaries cu_seqlens, initial_state, lengths, strategy, layout, "
                         f"causal, scale, shapes or dtypes): rank(s) {bad} differ from this rank; pass "
                         f"identical arguments on every rank")


def check_stamped(gathered: torch.Tensor, mine: int, what: str = "") -> None:
    """Check a gathered [W, ..., m + width] buffer of rows stamped with ``stamp_rows`` (or any
    [W, ..., width] tail): every row of rank w must carry ``mine`` (no read when ``UNCHECKED``)."""
    if mine == UNCHECKED:
        return
    W = gathered.shape[0]
    width = digest_width(gathered.dtype)
    tails = gathered[..., -width:].contiguous().view(torch.int64).reshape(W, -1)  # [W, rows per rank]
    if bool((tails == mine).all()):
        return
    check(tails.reshape(-1).tolist(), mine, [w for w in range(W) for _ in range(tails.shape[1])], what)


class ChainDigests:
    """The digests that ride a chain of P2P hops (LASP-1; any strategy passing a state along):
    a vector of W slots (0: not seen yet) appended to each message.

    ``attach(x, vec)`` -> the message; ``detach(msg, like)`` -> (x, vec); ``merge(vec)`` records
    the received slots and this rank's own; ``verify(what)`` raises once the chain is done.
    """

    def __init__(self, world: int, rank: int, mine: int):
        self.rank, self.mine = rank, mine
        self.seen: List[int] = [0] * world
        self.seen[rank] = mine

    def attach(self, x: torch.Tensor) -> torch.Tensor:
        vec = torch.tensor(self.seen, dtype=torch.int64, device=x.device).view(x.dtype)
        return torch.cat([x.reshape(-1), vec])

    def message_like(self, x: torch.Tensor) -> torch.Tensor:
        """An empty tensor shaped like ``attach(x)`` (for the receive buffer)."""
        return x.new_empty(x.numel() + len(self.seen) * digest_width(x.dtype))

    def detach(self, msg: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        n = like.numel()
        if self.mine == UNCHECKED:  # agreed once for the batch: the slots are not read
            return msg[:n].view_as(like)
        for r, d in enumerate(read_digests(msg[n:].view(len(self.seen), -1))):
            if d and r != self.rank:
                self.seen[r] = d
        return msg[:n].view_as(like)

    def verify(self, what: str = "") -> None:
        if self.mine == UNCHECKED:
            return
        seen = [(r, d) for r, d in enumerate(self.seen) if d]
        check([d for _, d in seen], self.mine, [r for r, _ in seen], what)
