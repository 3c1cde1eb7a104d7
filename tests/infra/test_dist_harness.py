"""Tests of the distributed test harness in tests/dist.py itself."""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.dist import WORLD_SIZES, DistributedError, run_cases, run_distributed

# Worker functions are module-level so that spawned children can import them by name.


def _collectives(group: dist.ProcessGroup, n: int) -> dict:
    """all_reduce and all_gather of rank-dependent tensors; return what this rank saw."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    summed = torch.full((n,), float(rank + 1), dtype=torch.float64)
    dist.all_reduce(summed, group=group)
    gathered = [torch.empty(n, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, torch.arange(n, dtype=torch.float64) + 10 * rank, group=group)
    return {"rank": rank, "world": world, "sum": summed, "gathered": torch.stack(gathered)}


def _raise_on_rank1(group: dist.ProcessGroup) -> int:
    if dist.get_rank(group) == 1:
        raise ValueError("boom from rank 1")
    return dist.get_rank(group)


def _block_forever(group: dist.ProcessGroup) -> None:
    # Rank 0 waits in a collective that rank 1 never joins; rank 1 never returns.
    if dist.get_rank(group) == 0:
        dist.barrier(group=group)
    else:
        time.sleep(10_000)


def _exit_on_rank1(group: dist.ProcessGroup) -> int:
    # After a barrier, so that both ranks have finished setting up the group: exiting during
    # rank 0's gloo connect would make rank 0 raise first (a race on a loaded machine).
    dist.barrier(group=group)
    if dist.get_rank(group) == 1:
        os._exit(3)
    return dist.get_rank(group)


def _check_sum(world: int, scale: float, expected: float) -> None:
    """One table case: all_reduce first (every rank, always), assert afterwards."""
    x = torch.full((2,), scale, dtype=torch.float64)
    dist.all_reduce(x)
    assert torch.equal(x, torch.full((2,), expected, dtype=torch.float64)), f"got {x.tolist()}"


def _table(group: dist.ProcessGroup) -> list[str]:
    """Run a table with two bad cases; return the AssertionError message run_cases raised."""
    world = dist.get_world_size(group)
    cases = [
        ("ones", {"scale": 1.0, "expected": 1.0 * world}),
        ("wrong-expectation", {"scale": 2.0, "expected": -1.0}),
        ("twos", {"scale": 2.0, "expected": 2.0 * world}),
        ("bad-params", {"scale": 3.0, "expected": 3.0 * world, "typo": 1}),
        ("threes", {"scale": 3.0, "expected": 3.0 * world}),
    ]
    ran: list[str] = []

    def check(scale: float, expected: float) -> None:
        ran.append(f"{scale:g}")
        _check_sum(world, scale, expected)

    with pytest.raises(AssertionError) as info:
        run_cases(cases, check)
    return [str(info.value), *ran]


# W = 1 and 4 are exercised by every distributed test module; the harness's own check of them
# is in the slow run.
@pytest.mark.parametrize("world_size", [pytest.param(w, marks=pytest.mark.slow) if w != 2 else w
                                        for w in WORLD_SIZES])
def test_collectives_return_every_rank(world_size: int) -> None:
    if world_size == 2:
        outs = [r["collectives"] for r in _w2_run()]  # shared with the run_cases test
    else:
        outs = run_distributed(_collectives, world_size, 3)
    assert [o["rank"] for o in outs] == list(range(world_size))
    total = world_size * (world_size + 1) / 2
    expected_gather = torch.stack(
        [torch.arange(3, dtype=torch.float64) + 10 * r for r in range(world_size)]
    )
    for o in outs:
        assert o["world"] == world_size
        assert torch.equal(o["sum"], torch.full((3,), total, dtype=torch.float64))
        assert torch.equal(o["gathered"], expected_gather)


def test_raise_names_rank_and_message() -> None:
    with pytest.raises(DistributedError, match=r"rank 1 failed") as info:
        run_distributed(_raise_on_rank1, 2, timeout=600)  # it fails at once; the timeout only bounds a loaded spawn
    msg = str(info.value)
    assert "ValueError: boom from rank 1" in msg
    assert "Traceback" in msg and "_raise_on_rank1" in msg  # the full traceback travels
    assert "rank 0" not in msg  # rank 0 returned normally
    assert not mp.active_children()


def test_blocked_rank_times_out_and_is_killed() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"timed out after 5 s") as info:
        run_distributed(_block_forever, 2, timeout=5)
    elapsed = time.monotonic() - start
    assert 5 <= elapsed < 5 + 2 * 20  # the timeout, then the launcher's SIGTERM / SIGKILL waits
    # rank 0 is stuck in the barrier, rank 1 asleep: neither finished
    assert "rank(s) [0, 1] did not finish" in str(info.value)
    assert not mp.active_children()  # every rank was killed and reaped


def test_exit_reports_code_promptly() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"rank 1 exited with code 3"):
        run_distributed(_exit_on_rank1, 2, timeout=600)
    # Far below the timeout: a dead rank is noticed from its closed pipe, not by waiting (the
    # bound allows a spawn on a heavily shared machine: ~30 s at load average 16 on 2 cores).
    assert time.monotonic() - start < 300
    assert not mp.active_children()


def _collectives_and_table(group: dist.ProcessGroup, n: int) -> dict:
    """The two W = 2 runs that succeed, in one spawn."""
    return {"collectives": _collectives(group, n), "table": _table(group)}


@functools.lru_cache(maxsize=None)
def _w2_run() -> list:
    return run_distributed(_collectives_and_table, 2, 3, timeout=600)


def test_run_cases_names_failing_cases_and_runs_the_rest() -> None:
    for msg, *ran in (r["table"] for r in _w2_run()):
        assert msg.startswith("2 of 5 cases failed")
        assert "wrong-expectation: AssertionError: got [4.0, 4.0]" in msg
        assert "(at test_dist_harness.py:" in msg  # points at the failing assert
        assert "bad-params: TypeError" in msg and "typo" in msg
        for passing in ("ones", "twos", "threes"):
            assert f"{passing}:" not in msg
        # every case with valid params ran, failing or not, in order
        assert ran == ["1", "2", "2", "3"]


def test_run_cases_passes_silently() -> None:
    calls: list[int] = []
    run_cases([("a", {"x": 1}), ("b", {"x": 2})], lambda x: calls.append(x))
    assert calls == [1, 2]
