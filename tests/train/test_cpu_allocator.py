"""lasp2.cpu_allocator: opt-in, honours the user's settings and the opt-out, reaches children."""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# One subprocess (importing lasp2 costs seconds) runs every scenario: it starts with no MALLOC_*
# variables, records what importing lasp2 left, then for each scenario sets the environment a
# user would have set and calls tune_cpu_allocator() (which reads the environment when called).
_PROBE = """
import json, os, sys
before = os.environ.get('MALLOC_MMAP_THRESHOLD_')
import lasp2
from lasp2.cpu_allocator import tune_cpu_allocator
out = {'before': before, 'after_import': os.environ.get('MALLOC_MMAP_THRESHOLD_')}
for name, env in json.loads(sys.argv[1]).items():
    for k in [k for k in os.environ if k.startswith('MALLOC_') or k == 'LASP2_DEFAULT_ALLOCATOR']:
        del os.environ[k]
    os.environ.update(env)
    applied = tune_cpu_allocator()
    out[name] = [applied, os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TRIM_THRESHOLD_')]
print(json.dumps(out))
"""
_SCENARIOS = {"default": {}, "user_value": {"MALLOC_MMAP_THRESHOLD_": "4194304"},
              "opt_out": {"LASP2_DEFAULT_ALLOCATOR": "1"}}


@functools.lru_cache(maxsize=None)
def _probe() -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LASP2_DEFAULT_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(_SCENARIOS)], capture_output=True, text=True,
                         timeout=600, env=base, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_lasp2_changes_nothing_and_tuning_sets_both_thresholds():
    r = _probe()
    assert r["before"] is None and r["after_import"] is None  # importing lasp2 did not touch the allocator
    assert r["default"] == [True, str(1 << 30), str(1 << 30)]


def test_user_values_win_and_the_opt_out_is_honoured():
    assert _probe()["user_value"][:2] == [True, "4194304"]
    assert _probe()["opt_out"][:2] == [False, None]


def test_train_and_bench_take_it_as_a_flag_and_it_is_off_by_default():
    from lasp2.cli import build_parser
    from lasp2.train.config import TrainConfig

    assert TrainConfig().tuned_allocator is False
    parser = build_parser()
    assert parser.parse_args(["bench", "--tuned-allocator"]).tuned_allocator is True
    assert parser.parse_args(["bench"]).tuned_allocator is False
    assert parser.parse_args(["train", "--tuned-allocator"]).tuned_allocator is True
