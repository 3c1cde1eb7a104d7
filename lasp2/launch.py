"""Run a function on W ranks: under ``torchrun`` (every process calls :func:`init_from_env`) or,
without it, on W local processes that :func:`spawn` starts itself (gloo by default) and whose
results it returns: how the examples and the CLIs run on a laptop or a CI box.

Typical use (``work`` at module level: the ranks import it by name; the guard is needed)::

    def work(n):  # rank and world size from torch.distributed
        return dist.get_rank() * n

    if __name__ == "__main__":
        if under_torchrun():
            init_from_env(); work(8); dist.destroy_process_group()
        else:
            results = spawn(work, 2, 8)  # [0, 8]: one result per rank
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["RankFailure", "under_torchrun", "init_from_env", "join_group", "spawn"]


class RankFailure(RuntimeError):
    """A run started by :func:`spawn` failed: a rank raised, died, or the run timed out.

    ``str(e)`` is one short line (e.g. ``"rank 1 failed: ValueError: ..."``). Attributes:
    ``rank`` (None on a timeout), ``traceback`` (the rank's full traceback text, None if it did
    not report one) and ``exitcode`` (set when a rank died without reporting).
    """

    def __init__(self, message: str, rank: Optional[int] = None, traceback: Optional[str] = None,
                 exitcode: Optional[int] = None):
        super().__init__(message)
        self.rank, self.traceback, self.exitcode = rank, traceback, exitcode


def under_torchrun() -> bool:
    """True when RANK, WORLD_SIZE and LOCAL_RANK are set (torchrun or a compatible launcher)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_from_env(backend: Optional[str] = None, timeout_s: float = 600.0) -> Tuple[int, int]:
    """Initialise the default process group from torchrun's environment; return (rank, world).

    ``backend`` defaults to "nccl" when CUDA is available, else "gloo"; with nccl the current
    CUDA device is set to LOCAL_RANK. Does nothing but return (rank, world) if the default group
    already exists. Collectives that cannot complete error after ``timeout_s`` seconds.
    """
    if not under_torchrun():
        raise RuntimeError("init_from_env needs the RANK, WORLD_SIZE and LOCAL_RANK variables that "
                           "torchrun sets; run under torchrun, or use lasp2.launch.spawn instead")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        dist.barrier()  # every rank's connections complete before any rank can leave (join_group)
    return dist.get_rank(), dist.get_world_size()


def join_group(rank: int, world_size: int, init_method: str, backend: str = "gloo",
               timeout_s: float = 600.0) -> None:
    """Initialise the default process group as ``rank`` of ``world_size`` through ``init_method``
    (e.g. ``file://`` in a directory the parent owns: no ports to race for), then wait in one
    barrier until every rank has joined.

    Why the barrier: gloo's full-mesh connect can return on one rank before its peer has finished
    its half of the handshake. A rank that then leaves at once (its work needs no collective, or
    it raises) closes its sockets under a slower peer (a busy machine), and that peer dies in
    ``Gloo connectFullMesh failed ... Connection closed by peer`` instead of running or reporting
    the first rank's error. After the barrier every connection is complete on every rank.

    Communication: one barrier over the new default group.
    """
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    dist.barrier()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
          timeout_s: float = 600.0, threads_per_rank: Optional[int] = None) -> List[Any]:
    """Run ``fn(*args)`` on ``world_size`` new local processes; return their results by rank.

    Each rank is a fresh process (the 'spawn' start method) that sets
    ``torch.set_num_threads(threads_per_rank)`` (default: this machine's CPUs // world_size,
    at least 1), joins a ``backend`` process group through a file in a fresh temporary
    directory (no ports), calls ``fn(*args)`` (``fn`` learns its rank and world size from
    ``torch.distributed``; the default group is the whole world) and destroys the group.
    ``fn`` must be importable by name (module level); ``args`` and results must be picklable.

    Raises :class:`RankFailure` as soon as a rank raises (with its message and traceback) or
    dies without reporting (with its exit code), or when the whole run, start-up included,
    takes longer than ``timeout_s`` (also the process-group timeout). Every rank is stopped
    (SIGTERM, then SIGKILL) before this returns or raises, on Ctrl-C too.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads_per_rank = threads_per_rank or max(1, cpus // world_size)
    deadline = time.monotonic() + timeout_s
    ctx = mp.get_context("spawn")
    procs, readers, finished = [], [], False
    with tempfile.TemporaryDirectory(prefix="lasp2-spawn-") as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")
        try:
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                config = (rank, world_size, init_method, backend, timeout_s, threads_per_rank, os.getpid())
                p = ctx.Process(target=_run_rank, args=(fn, args, config, writer), name=f"lasp2-rank{rank}")
                p.start()
                writer.close()  # the child now holds the only write end: its death gives us EOF
                procs.append(p)
                readers.append(reader)
            results = _collect(procs, readers, deadline, timeout_s)
            finished = True
        finally:
            for reader in readers:
                reader.close()
            stopped = _stop(procs, grace_s=5.0 if finished else 0.0)
    for rank, p in enumerate(procs):  # a rank slow to exit after reporting (a busy machine) is fine
        if p.exitcode != 0 and rank not in stopped:
            raise RankFailure(f"rank {rank} returned a result but then {_exit_text(p.exitcode)}",
                              rank=rank, exitcode=p.exitcode)
    return results


def _collect(procs, readers, deadline: float, timeout_s: float) -> List[Any]:
    """Read each rank's report; raise RankFailure on the first failure or at the deadline."""
    results = {}
    pending = dict(enumerate(readers))
    while pending:
        ready = wait(list(pending.values()), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RankFailure(f"timed out after {timeout_s:g} s: rank(s) {sorted(pending)} did not finish")
        failures = []  # (when it failed, error); a death counts as earliest (others follow from it)
        for rank in [r for r, conn in pending.items() if conn in ready]:
            try:
                status, payload = pickle.loads(pending.pop(rank).recv_bytes())
            except EOFError:
                procs[rank].join(1.0)
                code = procs[rank].exitcode
                message = f"rank {rank} {_exit_text(code)} without reporting"
                failures.append((float("-inf"), RankFailure(message, rank=rank, exitcode=code)))
                continue
            if status == "ok":
                results[rank] = payload
            else:
                when, summary, text = payload  # when: wall-clock time the rank failed
                error = RankFailure(f"rank {rank} failed: {summary}", rank=rank, traceback=text)
                failures.append((when, error))
        if failures:
            raise min(failures, key=lambda f: f[0])[1]
    return [results[rank] for rank in range(len(procs))]


def _stop(procs, grace_s: float) -> set:
    """Wait ``grace_s`` for the ranks to exit, SIGTERM, SIGKILL 5 s later; return those signalled."""
    signalled = set()
    for wait_s, stop in ((grace_s, "terminate"), (5.0, "kill")):
        end = time.monotonic() + wait_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        for rank, p in enumerate(procs):
            if p.is_alive():
                getattr(p, stop)()
                signalled.add(rank)
    for p in procs:
        p.join()
    return signalled


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "closed its pipe but is still running"
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _exit_with_parent(parent_pid: int) -> None:
    """Watchdog thread of a rank: exit if the parent that spawned it has gone (no orphans)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _run_rank(fn, args, config, conn) -> None:
    """Entry point of a spawned rank: run ``fn(*args)`` and send ("ok", result) or ("error", ...)."""
    rank, world_size, init_method, backend, timeout_s, threads, parent_pid = config
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        join_group(rank, world_size, init_method, backend, timeout_s)
        result = fn(*args)
        dist.destroy_process_group()
        data = pickle.dumps(("ok", result))  # not mp's pickler: its tensors would die with us
    except BaseException as e:  # noqa: BLE001 - report everything, SystemExit included
        lines = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
        summary = lines[0] + (" [continued in .traceback]" if len(lines) > 1 else "")
        data = pickle.dumps(("error", (time.time(), summary, traceback.format_exc())))
    try:
        conn.send_bytes(data)
        conn.close()
    except OSError:  # the parent stopped listening (another rank failed first and it is stopping us):
        pass  # nothing to deliver; without this, multiprocessing prints "Process lasp2-rankN:" and a traceback
    # Skip interpreter teardown: the report is sent and the process group destroyed, but
    # gloo's C++ threads can still abort in static destructors ('terminate called without
    # an active exception', SIGABRT) after a clean run, which would read as a crash.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
