"""Distributed test harness: run a function on W gloo ranks in spawned processes.

Typical use in a test module (the worker function must live at module level so that the
spawned children can import it by name, e.g. ``tests.parallel.test_something._worker``)::

    def _worker(group, n):
        x = torch.full((n,), float(dist.get_rank(group)))
        dist.all_reduce(x, group=group)
        return x

    @pytest.mark.parametrize("world_size", WORLD_SIZES)
    def test_sum(world_size):
        outs = run_distributed(_worker, world_size, 3)
        ...

Start-up costs seconds per spawn (every child imports torch), so one spawn should run a table
of cases with :func:`run_cases` rather than one spawn per case.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch.distributed as dist

from lasp2.launch import RankFailure, spawn

WORLD_SIZES: tuple[int, ...] = (1, 2, 4)
"""World sizes every distributed test should cover (DESIGN.md §5)."""

# Environment for the children: one OpenMP thread (2-core CI runs several ranks at once) and no
# C++ warning chatter from c10d/gloo.
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}


@contextlib.contextmanager
def parent_store(timeout: float = 600.0) -> Iterator[dist.TCPStore]:
    """A TCPStore server owned by this (the test) process on a port the OS picks and this process
    holds, for child processes that rendezvous over TCP (torchrun agents, env:// workers): no
    free-port race with whatever else runs on the machine. Its ``.port`` goes to the children as
    ``--rdzv-endpoint 127.0.0.1:PORT --rdzv-conf is_host=false`` (torchrun) or ``MASTER_PORT`` with
    ``TORCHELASTIC_USE_AGENT_STORE=True`` (the workers' environment when torchrun's agent holds the
    store, which is exactly this situation)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    try:
        yield store
    finally:
        del store


def run_as_torchrun_workers(script, cwd, world_size: int = 2, timeout: float = 600.0) -> tuple[list[int], str]:
    """Run ``python script`` as ``world_size`` plain processes in the environment torchrun gives
    its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, the agent's store held by this
    process: ``parent_store``); return (exit codes, their stdout + stderr joined)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with parent_store(timeout) as store:
        base = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                "TORCHELASTIC_USE_AGENT_STORE": "True"}
        procs = [subprocess.Popen([sys.executable, str(script)], cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world_size)]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=timeout)[0])
            finally:
                p.kill()
    return [p.returncode for p in procs], "".join(outs)


def scratch_dir(prefix: str) -> str:
    """A fresh directory, removed when this process exits: the scratch space of a pooled worker
    (``Spawns(..., more_args=...)``), where a test's own ``tmp_path`` is not there yet."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class DistributedError(AssertionError):
    """A distributed run failed: a rank raised, died, or the run timed out.

    Subclasses AssertionError so that pytest reports it as a test failure, not an error.
    """


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0, **kwargs: Any
) -> list[Any]:
    """Run ``fn(group, *args, **kwargs)`` on ``world_size`` spawned gloo ranks.

    Built on the library's launcher, ``lasp2.launch.spawn``: each rank is a fresh process from
    the 'spawn' context (forking a pytest process that has already run multi-threaded torch is
    unsafe) with one thread, a gloo process group joined through a file in a fresh temporary
    directory (no ports) and a barrier (``join_group``). ``group`` is the world
    ``dist.ProcessGroup``; ``fn`` gets its rank with ``dist.get_rank(group)``.

    ``fn`` must be a module-level function (it is pickled by reference); ``args``, ``kwargs``
    and the return values must be picklable.

    Returns the per-rank return values in rank order. Raises :class:`DistributedError` naming
    the rank and carrying its full traceback if a rank raises, the exit code if a rank dies
    without reporting (promptly, not at the timeout), or which ranks did not finish if the whole
    run takes longer than ``timeout`` seconds (spawn time included). ``timeout`` is also the
    process-group timeout, so a collective that can never complete errors inside the rank. Every
    child is stopped and reaped before this returns or raises.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        pickle.dumps((fn, args, kwargs))  # fail here, clearly, rather than inside Process.start
    except Exception as e:
        raise TypeError(
            f"run_distributed: fn/args/kwargs must be picklable and fn defined at module level ({e})"
        ) from e
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    try:
        with _env(_CHILD_ENV):  # children inherit os.environ as it is when they start
            return spawn(_on_world_group, world_size, fn, args, kwargs, timeout_s=timeout, threads_per_rank=1)
    except RankFailure as e:
        lines = [f"run_distributed({name}, world_size={world_size}) failed: {e}"]
        if e.traceback:
            lines.append(f"--- rank {e.rank}:\n{e.traceback}")
        raise DistributedError("\n".join(lines)) from None


def _on_world_group(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return fn(dist.group.WORLD, *args, **kwargs)


def run_cases(cases: Iterable[tuple[str, Mapping[str, Any]]], check: Callable[..., None]) -> None:
    """Run ``check(**params)`` for every ``(name, params)`` in ``cases``; fail naming each bad case.

    Meant to run inside a worker of :func:`run_distributed`, so that one spawn covers a whole
    table of cases. Every case runs even if earlier ones fail; at the end an AssertionError
    lists each failing case's name, error and the line of test code that raised.

    Risk: a failure is local to the rank that raised. If ``check`` raises on one rank *before*
    a collective that the other ranks enter, those ranks block (until the process-group
    timeout) or, worse, pair that collective with a different one from the failing rank's next
    case. So a check should run all of its collectives first and assert afterwards (compute,
    then compare); then a failing rank has already done its share of communication when it
    moves on to the next case.
    """
    failures: list[str] = []
    n = 0
    for name, params in cases:
        n += 1
        try:
            check(**params)
        except Exception as e:  # noqa: BLE001 - any failure of a case is reported, then we go on
            where = _blame(e)
            failures.append(
                f"  {name}: {type(e).__name__}: {e}\n"
                f"    (at {os.path.basename(where.filename)}:{where.lineno})"
            )
    if failures:
        raise AssertionError(f"{len(failures)} of {n} cases failed:\n" + "\n".join(failures))


def run_sections(group, sections: Iterable[tuple[str, Callable[[Any], Any]]]) -> dict[str, dict]:
    """Run ``fn(group)`` for every ``(name, fn)`` in ``sections`` on this rank and report each
    one's result or failure text, never raising: the other sections still run and report.

    Meant for a worker of :class:`Spawns`, so that one spawn per world size serves every test
    of a module (each test then looks up its section). The same collective-ordering risk as
    :func:`run_cases` applies: a section should run its collectives before it asserts.
    """
    report = {}
    for name, fn in sections:
        try:
            report[name] = {"ok": True, "result": fn(group)}
        except Exception as e:  # noqa: BLE001 - reported to the test that owns the section
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    return report


class Spawns:
    """One spawn per world size for a whole module, or for several modules that share a ``pool``.

    ``worker(group, *args)`` (module level, returning :func:`run_sections`' report) is registered
    in ``pool`` when the module is imported, so by the time the first test asks for a world size,
    pytest has collected every module of the run and one spawn runs every registered worker of
    the pool in turn (each worker's sections are reported separately: a failing section fails
    only its own test; a hang ends the spawn at the timeout and fails every test that asked for
    it). The reports (or the spawn's failure) are kept for the other tests.
    """

    _pools: dict[str, list[tuple[Callable[..., dict], tuple, Callable[[], tuple] | None]]] = {}
    _reports: dict[tuple[str, int], Any] = {}

    def __init__(self, worker: Callable[..., dict], *args: Any, pool: str | None = None,
                 timeout: float = 600.0, more_args: Callable[[], tuple] | None = None):
        """``more_args``: None, or a function of no arguments, called in this (the test) process
        when the pool first runs, whose tuple is appended to ``args`` (what is only known at test
        time: references computed here, a scratch directory). The section names use ``args`` only."""
        self.worker, self.args = worker, args
        self.pool = pool or f"{worker.__module__}.{worker.__qualname__}{args!r}"
        self.timeout = timeout
        self._pools.setdefault(self.pool, []).append((worker, args, more_args))

    def results(self, world_size: int, name: str) -> list:
        """Section ``name``'s result on every rank; fails the calling test with the worker's
        report (every failing rank's error) otherwise."""
        import pytest  # only the test process needs it, not the spawned ranks

        key = (self.pool, world_size)
        if key not in self._reports:
            try:
                workers = [(worker, args, (more() if more else ()), _label(worker, args))
                           for worker, args, more in self._pools[self.pool]]
                self._reports[key] = run_distributed(_pool_worker, world_size, workers,
                                                     timeout=self.timeout * len(workers))
            except DistributedError as e:  # kept too: one broken spawn is not re-run per test
                self._reports[key] = str(e)
            except Exception as e:  # noqa: BLE001 - a more_args function failed here: kept the same way
                self._reports[key] = f"pool {self.pool!r}: preparing its arguments failed: " \
                                     f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        reports = self._reports[key]
        if isinstance(reports, str):
            pytest.fail(reports, pytrace=False)
        name = f"{_label(self.worker, self.args)}:{name}"
        missing = [r for r, rep in enumerate(reports) if name not in rep]
        assert not missing, f"no section {name!r} on ranks {missing}: {sorted(reports[0])}"
        bad = [f"--- rank {r}: {rep[name]['error']}" for r, rep in enumerate(reports) if not rep[name]["ok"]]
        if bad:
            pytest.fail("\n".join(bad), pytrace=False)
        return [rep[name]["result"] for rep in reports]


def _label(worker: Callable[..., dict], args: tuple) -> str:
    return f"{worker.__module__}.{worker.__qualname__}{args!r}"


def _pool_worker(group, workers) -> dict[str, dict]:
    """Run every worker of a pool on this rank; one report, section names prefixed by worker."""
    report: dict[str, dict] = {}
    for worker, args, more, label in workers:
        try:
            sections = worker(group, *args, *more)
        except Exception as e:  # noqa: BLE001 - a worker is expected to report, not raise
            raise RuntimeError(f"{label} raised instead of reporting its sections: {e}") from e
        report.update({f"{label}:{name}": v for name, v in sections.items()})
    return report


# --------------------------------------------------------------------------------------------
# Internals.


def _blame(e: BaseException) -> traceback.FrameSummary:
    """The innermost frame of ``e``'s traceback in our code (not in torch, pytest, ...)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "site-packages" not in f.filename]
    return (ours or frames)[-1]


@contextlib.contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set environment variables in this process, restoring them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
