"""Every script under benchmarks/ and examples/ runs, in a tiny CPU mode, and writes what it says.

Scripts that no test runs rot silently (a renamed field once broke the GPU suite before it met a
GPU). Each runs here as a user would start it (a fresh interpreter from the repository root), at
the smallest sizes its flags allow, writing into a temporary directory; the test checks the exit
code and that every result row it wrote carries the measured fields with finite values. Timings
in these runs mean nothing. ``examples/sp_linear_attention.py`` is run by ``test_launch.py``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # generous: a loaded 2-core machine; each run takes seconds when the machine is idle


def _run(args, tmp_path, **env):
    cmd = args if args[0] == "bash" else [sys.executable, *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def _rows(path: Path, fields) -> list:
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert rows, f"{path.name} has no rows"
    for row in rows:
        for field in fields:
            value = row[field]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (path.name, field, row)
    assert path.with_suffix(".md").read_text().count("\n|") >= len(rows), f"{path.with_suffix('.md')} lacks its table"
    return rows


def test_bench_chunk(tmp_path):
    _run(["benchmarks/bench_chunk.py", "--chunk-lengths", "64", "128", "--quadratic-length", "64", "--repeats", "1",
          "--allocators", "default", "--heads", "1", "--dim", "8", "--threads", "1", "--out", str(tmp_path)], tmp_path)
    rows = _rows(tmp_path / "chunk.json", ("T", "seconds", "peak_mem_mb"))
    assert sorted((r["op"], r["T"]) for r in rows) == [("chunk", 64), ("chunk", 128), ("quadratic", 64)]


def test_bench_delta(tmp_path):
    _run(["benchmarks/bench_delta.py", "--chunk-length", "128", "--recurrence-length", "32", "--repeats", "1",
          "--recurrence-repeats", "1", "--heads", "1", "--dim", "8", "--threads", "1", "--out", str(tmp_path)], tmp_path)
    rows = _rows(tmp_path / "delta.json", ("T", "seconds", "tokens_per_s"))
    assert {(r["variant"], r["op"]) for r in rows} == {(v, op) for v in ("delta", "gated_delta")
                                                       for op in ("chunk", "recurrence")}


def test_bench_linear_sp(tmp_path):
    _run(["benchmarks/bench_linear_sp.py", "--world-size", "2", "--local-len", "64", "--heads", "1", "--dim", "8",
          "--repeats", "1", "--allocators", "default", "--no-memory", "--out", str(tmp_path)], tmp_path)
    rows = _rows(tmp_path / "linear_sp.json", ("W", "T_global", "seconds", "efficiency"))
    sp = [r for r in rows if r["W"] == 2]
    assert {r["config"] for r in sp} >= {"lasp2", "ideal-concurrent"}, [r["config"] for r in rows]
    assert all(r["T_global"] == 128 and math.isfinite(r["vs_no_sp_ranks"]) for r in sp)


def test_bench_softmax_sp(tmp_path):
    _run(["benchmarks/bench_softmax_sp.py", "--quick", "--worlds", "2", "--out", str(tmp_path)], tmp_path)
    report = json.loads((tmp_path / "softmax_sp.json").read_text())
    assert report["timings"] and report["balance"], sorted(report)
    assert {t["strategy"] for t in report["timings"]} == {"allgather", "ring", "ulysses"}


def test_bench_memory(tmp_path):
    _run(["benchmarks/bench_memory.py", "--quick", "--shapes", "1x2", "--seq-len", "256", "--out", str(tmp_path)],
         tmp_path)
    rows = _rows(tmp_path / "memory_quick.json", ("param_bytes", "grad_bytes", "optimizer_bytes",
                                                  "activation_peak_bytes"))
    assert {r["data_parallel"] for r in rows} == {"ddp", "fsdp2"} and all(r["param_bytes"] > 0 for r in rows)


def test_gpu_suite_smoke_on_cpu(tmp_path):
    pytest.importorskip("fla")
    _run(["bash", "benchmarks/gpu_suite.sh", "--smoke", "--out", str(tmp_path)], tmp_path, TRITON_INTERPRET="1",
         TRITON_CACHE_DIR=str(tmp_path / "triton"))
    rows = _rows(tmp_path / "gpu_suite_smoke.json", ("T", "fla_ms", "lasp2_ms", "lasp2-local_ms",
                                                     "output_rel_rms_vs_fla"))
    assert all(r["output_rel_rms_vs_fla"] < 1e-4 for r in rows), rows  # fp32 in the interpreter: the same math


def test_lasp2_bench_hf_suite(tmp_path):
    """The hf suite drives a parallelized transformers model the way users must (whole batch
    through ``shard_batch``, the batch's SP context in the forward)."""
    pytest.importorskip("transformers")
    _run(["-m", "lasp2", "bench", "--suite", "hf", "--hf-config", "qwen3-next-tiny", "--world-sizes", "2",
          "--seq-lens", "32", "--repeats", "1", "--warmup", "0", "--no-plots", "--quiet", "--out", str(tmp_path)],
         tmp_path)
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {r["strategy"] for r in records} == {"lasp2+allgather", "ideal"}, [r["strategy"] for r in records]
    for r in records:
        assert r["skipped"] is None and r["W"] == 2 and math.isfinite(r["time_s"]) and r["time_s"] > 0, r


def test_hf_trainer_sft_example(tmp_path):
    """examples/hf_trainer_sft.py as a user starts it (2 local gloo ranks, sp = 2, packed SFT with TRL):
    finite losses, and the saved model reloads into an unmodified transformers model."""
    pytest.importorskip("trl")
    _run(["examples/hf_trainer_sft.py", "--steps", "2", "--examples", "16", "--max-len", "48", "--out",
          str(tmp_path)], tmp_path)
    report = json.loads((tmp_path / "hf_trainer_sft.json").read_text())
    assert report["world_size"] == 2 and report["sp"] == 2 and len(report["losses"]) == 2, report
    assert all(math.isfinite(x) and x > 0 for x in report["losses"]) and report["reloaded_equal"], report
