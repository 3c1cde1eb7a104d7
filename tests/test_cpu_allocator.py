"""lasp2.cpu_allocator: opt-in, honours the user's settings and the opt-out, reaches children."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

_PROBE = ("import os, lasp2, sys; before = os.environ.get('MALLOC_MMAP_THRESHOLD_'); "
          "from lasp2.cpu_allocator import tune_cpu_allocator; applied = tune_cpu_allocator(); "
          "print(before, applied, os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TRIM_THRESHOLD_'))")


def _probe(**env) -> list:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LASP2_DEFAULT_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60,
                         env={**base, **env}, check=True)
    return out.stdout.split()


def test_importing_lasp2_changes_nothing_and_tuning_sets_both_thresholds():
    before, applied, mmap, trim = _probe()
    assert before == "None"  # importing lasp2 did not touch the allocator
    assert applied == "True" and mmap == str(1 << 30) and trim == str(1 << 30)


def test_user_values_win_and_the_opt_out_is_honoured():
    assert _probe(MALLOC_MMAP_THRESHOLD_="4194304")[1:3] == ["True", "4194304"]
    assert _probe(LASP2_DEFAULT_ALLOCATOR="1")[1:3] == ["False", "None"]


def test_train_and_bench_take_it_as_a_flag_and_it_is_off_by_default():
    from lasp2.cli import build_parser
    from lasp2.train.config import TrainConfig

    assert TrainConfig().tuned_allocator is False
    parser = build_parser()
    assert parser.parse_args(["bench", "--tuned-allocator"]).tuned_allocator is True
    assert parser.parse_args(["bench"]).tuned_allocator is False
    assert parser.parse_args(["train", "--tuned-allocator"]).tuned_allocator is True
