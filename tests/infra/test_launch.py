"""lasp2.launch: spawn returns per-rank results, fails promptly and cleanly, and runs the example."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lasp2.launch import RankFailure, spawn, under_torchrun

ROOT = Path(__file__).resolve().parents[2]


# Rank bodies: module level, so that the spawned ranks can import them by name.
def _identify(tag):
    x = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(x)
    return tag, dist.get_rank(), dist.get_world_size(), torch.get_num_threads(), x.item()


def _raise_on_rank1_others_block():
    if dist.get_rank() == 1:
        raise ValueError("bad input on rank 1\nsecond line of the message")
    dist.barrier()  # never completes: rank 1 is gone; must be stopped by the parent, not the timeout


def _die_on_rank1_others_block():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def _sleep():
    time.sleep(60)


def _children() -> set:
    """PIDs of this process's live child processes, except multiprocessing's resource tracker."""
    me, found = str(os.getpid()), set()
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():  # Linux; elsewhere skip
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if fields[1] == me and fields[0] != "Z" and b"resource_tracker" not in cmdline:
            found.add(int(entry.name))
    return found


def test_spawn_returns_per_rank_values():
    assert spawn(_identify, 2, "hi", threads_per_rank=1) == [("hi", 0, 2, 1, 1.0), ("hi", 1, 2, 1, 1.0)]
    assert not mp.active_children()


@pytest.mark.parametrize("body, message, exitcode", [
    (_raise_on_rank1_others_block, "rank 1 failed: ValueError: bad input on rank 1 [continued in .traceback]", None),
    (_die_on_rank1_others_block, "rank 1 exited with code 3 without reporting", 3),
], ids=["raises", "dies"])
def test_failing_rank_stops_every_rank_promptly(body, message, exitcode):
    before = _children()
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn(body, 2, timeout_s=600)
    # Not at the timeout: the blocked rank is stopped once rank 1's failure is seen. Half the
    # timeout leaves room for a slow spawn on a loaded machine (tens of seconds at load 20).
    assert time.monotonic() - start < 300, "the blocked rank was not stopped promptly"
    e = info.value
    assert isinstance(e, RuntimeError)
    assert str(e) == message and "\n" not in str(e)
    assert e.rank == 1 and e.exitcode == exitcode
    if exitcode is None:
        assert "_raise_on_rank1_others_block" in e.traceback and "second line of the message" in e.traceback
    assert not mp.active_children()
    assert not _children() - before, "spawn left child processes behind"


def test_timeout_kills_every_rank():
    before = _children()
    with pytest.raises(RankFailure, match=r"timed out after 4 s: rank\(s\) \[0, 1\] did not finish") as info:
        spawn(_sleep, 2, timeout_s=4)
    assert info.value.rank is None
    assert not mp.active_children()
    assert not _children() - before


def test_spawn_rejects_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        spawn(_sleep, 0)


def test_under_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not under_torchrun()
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert under_torchrun()


def test_example_runs_end_to_end():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "examples/sp_linear_attention.py", "--seq-len", "64"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("o", "dq", "dk", "dv", "dg"):
        assert f"\n  {name} " in out, out
    assert "PASS: max relative error" in out and "1 all_gather" in out, out
