"""Every torch.distributed call lasp2 makes lives here (DESIGN §3): collectives, point-to-point,
backend quirks, the cross-rank agreement check, and byte accounting for the benchmarks.

Backend quirks handled once:
- gathers use ``all_gather_single`` when torch has it (2.13 deprecates
  ``all_gather_into_tensor``), else ``all_gather_into_tensor``; the input is sent as
  ``x.unsqueeze(0)`` into a ``[W, ...]`` buffer, the form gloo accepts;
- point-to-point ops address peers by their rank *in the group* (``group_dst``/``group_src``)
  when torch supports it, translated to global ranks otherwise.

Byte accounting: inside ``with track() as log:`` every call appends a record (op, bytes sent,
bytes received) to ``log``. Collective byte counts are the logical per-rank traffic of the ring
algorithm (an all-gather of b bytes per rank sends and receives (W - 1) * b), which is what
the cost model in ``lasp2.bench`` uses. Tracking uses a context variable: nothing global is
read by the communication itself.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


@dataclass
class CommRecord:
    op: str
    bytes_sent: int
    bytes_received: int


@dataclass
class CommLog:
    """Records of the communication issued on this rank inside ``track()``."""

    records: List[CommRecord] = field(default_factory=list)
    waited_s: float = 0.0  # seconds blocked inside lasp2's communication calls (all threads)

    def count(self, op: Optional[str] = None) -> int:
        return sum(1 for r in self.records if op is None or r.op == op)

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self.records)

    @property
    def bytes_received(self) -> int:
        return sum(r.bytes_received for r in self.records)


_active_log: contextvars.ContextVar[Optional[CommLog]] = contextvars.ContextVar("lasp2_comm_log", default=None)


@contextlib.contextmanager
def track() -> Iterator[CommLog]:
    """Record every lasp2 communication call made on this rank (this thread) in the block."""
    log = CommLog()
    token = _active_log.set(log)
    try:
        yield log
    finally:
        _active_log.reset(token)


@contextlib.contextmanager
def _blocking() -> Iterator[None]:
    """Add the time spent in the block to the active log's ``waited_s``."""
    log, t0 = _active_log.get(), time.perf_counter()
    try:
        yield
    finally:
        if log is not None:
            log.waited_s += time.perf_counter() - t0


def _record(op: str, sent: int, received: int) -> None:
    log = _active_log.get()
    if log is not None:
        log.records.append(CommRecord(op, sent, received))


def rank_and_size(group: ProcessGroup) -> Tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class Pending:
    """An in-flight collective: ``wait()`` returns its result (DESIGN §1: overlap the gather)."""

    def __init__(self, work, result: torch.Tensor):
        self._work, self._result = work, result

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            with _blocking():
                self._work.wait()
            self._work = None
        return self._result


def all_gather(x: torch.Tensor, group: ProcessGroup, *, async_op: bool = False):
    """Gather ``x`` from every rank: returns ``[W, *x.shape]`` (or a ``Pending`` if async_op).

    Communication: 1 all-gather of x's bytes per rank.
    """
    W = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty(W, *x.shape)
    nbytes = x.numel() * x.element_size()
    _record("all_gather", (W - 1) * nbytes, (W - 1) * nbytes)
    if W == 1:
        out[0].copy_(x)
        return Pending(None, out) if async_op else out
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with _blocking():
        work = gather(out, x.unsqueeze(0), group=group, async_op=async_op)
    return Pending(work, out) if async_op else out


def _peer_kwargs(op, peer: int, group: ProcessGroup, direction: str) -> dict:
    """Address ``peer`` (a rank in ``group``) the way this torch version accepts."""
    import inspect

    name = "group_dst" if direction == "dst" else "group_src"
    if name in inspect.signature(op).parameters:
        return {name: peer, "group": group}
    return {direction: dist.get_global_rank(group, peer), "group": group}


def send(x: torch.Tensor, peer: int, group: ProcessGroup) -> None:
    """Blocking send of ``x`` to ``peer`` (rank in ``group``). Communication: 1 send."""
    x = x.contiguous()
    _record("send", x.numel() * x.element_size(), 0)
    with _blocking():
        dist.send(x, **_peer_kwargs(dist.send, peer, group, "dst"))


def recv(like: torch.Tensor, peer: int, group: ProcessGroup) -> torch.Tensor:
    """Blocking receive of a tensor shaped like ``like`` from ``peer``. Communication: 1 recv."""
    out = torch.empty_like(like).contiguous()
    _record("recv", 0, out.numel() * out.element_size())
    with _blocking():
        dist.recv(out, **_peer_kwargs(dist.recv, peer, group, "src"))
    return out


# ---------------------------------------------------------------------------------------------
# Agreement between ranks. Ranks that call a sequence-parallel op with different shapes, dtypes,
# strategies or layouts would otherwise pair mismatched collectives (a hang, an abort, or a wrong
# answer). The first call with a given signature (the shapes: what sizes the messages) on a group
# runs one extra small collective that compares the signatures of all ranks; later calls with that
# signature skip it, so steady-state calls keep the one-collective contract. Everything else, the
# document boundaries included, is checked on every call by a digest inside the call's own first
# message (``parallel/agreement.py``). The cache is per group (weakly referenced) and keeps the
# most recent _MAX_VERIFIED signatures; every rank evicts identically when they call identically.
# ---------------------------------------------------------------------------------------------
_verified: "weakref.WeakKeyDictionary[ProcessGroup, OrderedDict[str, None]]" = weakref.WeakKeyDictionary()
_MAX_VERIFIED = 1024


def signature_code(signature: str) -> float:
    """A 20-bit hash of a signature, exactly representable in fp32 (``ensure_agreement``'s code)."""
    return float(int(hashlib.sha1(signature.encode()).hexdigest()[:5], 16))


def ensure_agreement(group: ProcessGroup, signature: str, *, cached: bool = True) -> None:
    """Raise ValueError on every rank if the ranks' ``signature`` strings differ.

    Communication: the first time a (group, signature) is seen (every time with
    ``cached=False``), 1 all-gather of a small fixed-size code plus, only on disagreement,
    1 ``all_gather_object`` to report the differences; nothing afterwards.
    """
    seen = _verified.setdefault(group, OrderedDict())
    if cached and signature in seen:
        seen.move_to_end(signature)
        return
    code = torch.tensor([signature_code(signature)], dtype=torch.float64)
    codes = all_gather(code, group)
    if bool((codes == code).all()):
        seen[signature] = None
        if len(seen) > _MAX_VERIFIED:
            seen.popitem(last=False)
        return
    everyone: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, signature, group=group)
    lines = "\n".join(f"  rank {r}: {s}" for r, s in enumerate(everyone))
    raise ValueError("ranks of the sequence-parallel group called the op with different arguments; "
                     "every rank must pass the same shapes, dtypes, strategy and layout:\n" + lines)


# ---------------------------------------------------------------------------------------------
# Added for the softmax strategies (LASP-2H all-gather, ring attention, Ulysses).
#
# gloo on CPU (verified with torch 2.13): ``reduce_scatter_single`` / ``reduce_scatter_tensor``
# work, but gloo implements them as an all-reduce of the whole [W, ...] buffer after which each
# rank keeps its chunk (twice the traffic of a real reduce-scatter; NCCL does the real thing).
# ``all_to_all_single`` and ``batch_isend_irecv`` work natively. So no fallback is needed here;
# the byte records below are the logical per-rank traffic of the ideal algorithm, as for
# ``all_gather``.
# ---------------------------------------------------------------------------------------------


class _WaitAll:
    """Several in-flight works seen as one (what ``Pending`` expects of its work)."""

    def __init__(self, works):
        self._works = list(works or [])

    def wait(self):
        for w in self._works:
            w.wait()
        self._works = []


def reduce_scatter(x: torch.Tensor, group: ProcessGroup, *, async_op: bool = False):
    """Sum ``x`` [W, ...] over the ranks and keep this rank's row: returns ``x.shape[1:]``
    (or a ``Pending`` if async_op).

    Row j of every rank's ``x`` is destined for rank j (the inverse of ``all_gather``'s layout).
    Communication: 1 reduce-scatter; logical traffic (W - 1) * (bytes of one row) each way.
    """
    W = dist.get_world_size(group)
    if x.shape[0] != W:
        raise ValueError(f"reduce_scatter expects a [W, ...] buffer with W = {W}, got {tuple(x.shape)}")
    x = x.contiguous()
    out = x.new_empty(x.shape[1:])
    row_bytes = out.numel() * out.element_size()
    _record("reduce_scatter", (W - 1) * row_bytes, (W - 1) * row_bytes)
    if W == 1:
        out.copy_(x[0])
        return Pending(None, out) if async_op else out
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    # Flat views: gloo wants the input to be W outputs stacked along dim 0 with equal trailing
    # dims ([W * n] -> [n]), which a [W, ...] -> [...] call does not satisfy.
    with _blocking():
        work = scatter(out.view(-1), x.view(-1), group=group, async_op=async_op)
    return Pending(work, out) if async_op else out


def all_to_all(x: torch.Tensor, group: ProcessGroup, *, async_op: bool = False):
    """Exchange rows: ``x`` is [W, ...] with row j destined for rank j; returns [W, ...] whose
    row j came from rank j (or a ``Pending`` if async_op).

    Communication: 1 all-to-all; (W - 1) rows sent and (W - 1) rows received per rank.
    """
    W = dist.get_world_size(group)
    if x.shape[0] != W:
        raise ValueError(f"all_to_all expects a [W, ...] buffer with W = {W}, got {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    row_bytes = x[0].numel() * x.element_size()
    _record("all_to_all", (W - 1) * row_bytes, (W - 1) * row_bytes)
    if W == 1:
        out.copy_(x)
        return Pending(None, out) if async_op else out
    with _blocking():
        work = dist.all_to_all_single(out, x, group=group, async_op=async_op)
    return Pending(work, out) if async_op else out


def _p2p_op(op, x: torch.Tensor, peer: int, group: ProcessGroup, tag: int = 0):
    """A ``P2POp`` addressing ``peer`` by its rank in ``group`` the way this torch accepts."""
    import inspect

    if "group_peer" in inspect.signature(dist.P2POp.__init__).parameters:
        return dist.P2POp(op, x, group=group, tag=tag, group_peer=peer)
    return dist.P2POp(op, x, dist.get_global_rank(group, peer), group=group, tag=tag)


def p2p(sends: List[Tuple[torch.Tensor, int]], recvs: List[Tuple[torch.Tensor, int]], group: ProcessGroup,
        tag: int = 0) -> Pending:
    """Non-blocking: send each (tensor, peer) and receive a tensor shaped like each (like, peer)
    (peers are ranks in ``group``), all with ``tag``, as one ``batch_isend_irecv``. Messages between
    the same two ranks with the same tag are matched in the order they are issued.
    ``wait()`` returns the received tensors, in order.
    Communication: len(sends) sends and len(recvs) recvs (each recorded separately).
    """
    ops, keep, out = [], [], []
    for x, peer in sends:
        x = x.contiguous()
        _record("send", x.numel() * x.element_size(), 0)
        ops.append(_p2p_op(dist.isend, x, peer, group, tag))
        keep.append(x)
    for like, peer in recvs:
        buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        _record("recv", 0, buf.numel() * buf.element_size())
        ops.append(_p2p_op(dist.irecv, buf, peer, group, tag))
        out.append(buf)
    pending = Pending(_WaitAll(dist.batch_isend_irecv(ops) if ops else []), out)
    pending._keep = keep  # the sent tensors stay alive until the transfer completes
    return pending


def send_recv(x: Optional[torch.Tensor], dst: Optional[int], like: Optional[torch.Tensor],
              src: Optional[int], group: ProcessGroup) -> Pending:
    """Non-blocking: send ``x`` to ``dst`` and receive a tensor shaped like ``like`` from
    ``src`` (ranks in ``group``; either side may be None). ``wait()`` returns the received
    tensor (None if nothing was received).

    Both are issued as one ``batch_isend_irecv`` (``p2p``) so that a ring step cannot deadlock
    (NCCL needs the send and the receive of a step in one group; gloo accepts it too).
    Communication: 1 send and 1 recv (each recorded separately).
    """
    many = p2p([] if x is None else [(x, dst)], [] if like is None else [(like, src)], group)
    return Pending(many, None if like is None else many._result[0])  # ``many`` keeps x alive


# ---------------------------------------------------------------------------------------------
# Added for the per-batch SP context (``parallel/batch.py``): one check per batch that every rank
# of the group holds the same batch (its content, not only its shapes).
# ---------------------------------------------------------------------------------------------


def _small_tensor_device(group: ProcessGroup) -> torch.device:
    """Where a tiny control tensor must live for ``group``'s backend: the current CUDA device
    for an NCCL-only group, the CPU otherwise (gloo, or a group with a CPU backend)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and "cpu" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_digest(group: ProcessGroup, digest: int, what: str) -> None:
    """Raise ValueError on every rank unless every rank of ``group`` passed the same 63-bit
    ``digest`` (of ``what``, named in the message with the ranks that differ).

    Communication: 1 all-gather of 8 bytes per rank (an int64), every call.
    """
    W = dist.get_world_size(group)
    mine = torch.tensor([digest], dtype=torch.int64, device=_small_tensor_device(group))
    everyone = all_gather(mine, group).view(-1).tolist()
    bad = [r for r, d in enumerate(everyone) if d != digest]
    if bad:
        groups = {}
        for r, d in enumerate(everyone):
            groups.setdefault(d, []).append(r)
        split = "; ".join(f"ranks {rs}" for rs in groups.values())
        raise ValueError(f"the ranks of the sequence-parallel group hold different {what}: {split} agree among "
                         f"themselves ({W} ranks); every rank must pass the same whole batch (same data loader "
                         f"seed / sampler for all ranks of one SP group)")
