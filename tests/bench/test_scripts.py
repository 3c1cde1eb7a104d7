"""Every ``lasp2 bench`` suite, benchmarks/gpu_suite.sh and the examples run, in a tiny CPU mode,
and write what they say.

Benchmarks that no test runs rot silently (a renamed field once broke the GPU suite before it met
a GPU). Each runs here as a user would start it (a fresh interpreter from the repository root), at
the smallest sizes its flags allow, writing into a temporary directory; the test checks the exit
code and that every record it wrote carries the measured fields with finite values, with the
command, torch version and hardware. Timings in these runs mean nothing. The linear suite's quick
run is in ``test_bench.py``; ``examples/sp_linear_attention.py`` is run by ``test_launch.py``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600  # generous: a loaded 2-core machine; each run takes seconds when the machine is idle


def _run(args, tmp_path, **env):
    cmd = args if args[0] == "bash" else [sys.executable, *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                            "PYTHON": sys.executable, **env})
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def _records(out: Path, fields) -> list:
    """results.json's records, each carrying ``fields`` as finite non-negative numbers, its command,
    torch version and hardware, and results.md with a table row per record."""
    data = json.loads((out / "results.json").read_text())
    records, meta = data["records"], data["meta"]
    assert records, f"{out} has no records"
    assert meta["command"].startswith("lasp2 bench") and meta["torch"] and meta["hardware"], meta
    for r in records:
        for field in fields:
            value = r[field]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (field, r)
    assert (out / "results.md").read_text().count("\n|") >= len(records) + 2, "results.md lacks its table"
    return records


def _bench(args, tmp_path, **env):
    _run(["-m", "lasp2", "bench", *args, "--no-plots", "--quiet", "--out", str(tmp_path)], tmp_path, **env)


def test_bench_ops_suite(tmp_path):
    """Chunked op vs the quadratic form (scalar gate) and vs the per-token recurrence (delta rule)."""
    _bench(["--suite", "ops", "--seq-lens", "64", "128", "--baseline-len", "32", "--repeats", "1", "--heads", "1",
            "--dim", "8", "--threads", "1"], tmp_path)
    recs = _records(tmp_path, ("T", "time_s", "tokens_per_s", "tokens_per_s_vs_baseline", "peak_mem_mb",
                               "mb_per_1k_tokens"))
    assert sorted((r["variant"], r["config"], r["T"]) for r in recs) == sorted(
        [(v, "chunked", T) for v in ("scalar", "deltanet", "gated_deltanet") for T in (32, 64, 128)]
        + [("scalar", "quadratic", 32), ("deltanet", "recurrence", 32), ("gated_deltanet", "recurrence", 32)])
    for r in recs:
        if r["baseline"]:  # the baseline computes what the chunked op computes
            assert r["tokens_per_s_vs_baseline"] == 1.0 and r["output_rel_rms_vs_chunked"] < 1e-5, r
    md = (tmp_path / "results.md").read_text()
    from lasp2.cli import main  # --from-json rewrites the same report without measuring

    assert main(["bench", "--from-json", str(tmp_path / "results.json"), "--out", str(tmp_path / "again"),
                 "--no-plots"]) == 0
    assert (tmp_path / "again" / "results.md").read_text() == md


def test_bench_memory_suite(tmp_path):
    _bench(["--suite", "memory", "--quick", "--shapes", "1x2", "--seq-lens", "256"], tmp_path)
    recs = _records(tmp_path, ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_peak_bytes",
                               "params_and_state_vs_ddp"))
    assert [r["data_parallel"] for r in recs] == ["ddp", "fsdp2"] and all(r["param_bytes"] > 0 for r in recs)
    assert recs[0]["params_and_state_vs_ddp"] == 1.0 and recs[1]["params_and_state_vs_ddp"] < 1.0


def test_bench_softmax_load_balance(tmp_path):
    """--layout both: every strategy contiguous and zigzag in one run, with per-rank CPU seconds,
    the causal pairs per rank and the bytes saved for backward."""
    _bench(["--suite", "softmax", "--world-sizes", "2", "--seq-lens", "64", "--layout", "both", "--heads", "2",
            "--kv-heads", "1", "--dim", "8", "--repeats", "1", "--warmup", "0"], tmp_path)
    recs = _records(tmp_path, ("time_s", "efficiency", "cpu_max_over_min", "cpu_efficiency"))
    assert {r["strategy"] for r in recs} == {f"{s}@{lay}" for s in ("allgather", "ring", "ulysses")
                                            for lay in ("contiguous", "zigzag")} | {"ideal"}
    for r in recs:
        assert len(r["per_rank_cpu_s"]) == 2 and min(r["saved_bytes_per_rank"]) > 0, r
        if r["strategy"] in ("allgather@zigzag", "ring@zigzag"):
            assert r["pairs_max_over_min"] == 1.0, r
        if r["strategy"] in ("allgather@contiguous", "ring@contiguous"):
            assert r["pairs_max_over_min"] > 2.5, r  # (3 T^2 / 8) / (T^2 / 8), up to the diagonal
    assert "Load balance" in (tmp_path / "results.md").read_text()


def test_bench_linear_weak_scaling_delta(tmp_path):
    """The linear suite's weak scaling against one process (W = 1 in the same run), for the
    Gated DeltaNet variant."""
    _bench(["--suite", "linear", "--variants", "gated_deltanet", "--world-sizes", "1", "2", "--local-lens", "64",
            "--strategies", "lasp2", "--heads", "1", "--dim", "8", "--repeats", "1", "--warmup", "0"], tmp_path)
    recs = _records(tmp_path, ("time_s", "efficiency", "efficiency_vs_one_process", "cpu_efficiency"))
    assert sorted((r["W"], r["strategy"]) for r in recs) == [(1, "ideal"), (1, "lasp2"), (2, "ideal"), (2, "lasp2")]
    assert all(r["variant"] == "gated_deltanet" and r["T_local"] == 64 for r in recs)


def test_gpu_suite_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_suite.sh --smoke (lasp2 bench --suite gpu, the GPU check's CPU mode): every
    section runs end to end at toy sizes (fla in the Triton interpreter, flex forward only) and
    writes its part of the report; what needs CUDA says so instead of a number."""
    pytest.importorskip("fla")
    # One variant (CI time; tests/ops/test_fla_backend.py proves every variant's kernels exact):
    # the script path is the same for all.
    _run(["bash", "benchmarks/gpu_suite.sh", "--smoke", "--variants", "scalar", "--quiet", "--out", str(tmp_path)],
         tmp_path, TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    data = json.loads((tmp_path / "results.json").read_text())
    meta, sections = data["meta"], data["sections"]
    assert meta["command"].startswith("lasp2 bench --suite gpu") and meta["mode"] == "smoke (CPU)", meta
    skipped, not_judged = "skipped: needs CUDA", "not judged (smoke: timings on CPU mean nothing)"
    assert {n: s["status"] for n, s in sections.items()} == {
        "exact_linear": "pass", "exact_softmax": "pass", "exact_steps": skipped, "perf_softmax": not_judged,
        "perf_step": not_judged, "host_syncs": skipped, "perf_linear": not_judged, "sp_one_device": "pass"}
    # The exactness rows measured something (finite errors within their bounds), every case of the softmax table.
    for name in ("exact_linear", "exact_softmax", "sp_one_device"):
        for r in sections[name]["rows"]:
            assert math.isfinite(r["max_rel_rms"]) and r["max_rel_rms"] <= r["tol"] and r["pass"], (name, r)
    cases = {r["case"] for r in sections["exact_softmax"]["rows"]}
    assert cases == {"causal", "zigzag", "documents", "gqa-documents"}, cases
    assert all("backward" in r for r in sections["exact_softmax"]["rows"])  # says the CPU backward is not there
    assert {r["strategy"] for r in sections["sp_one_device"]["rows"]} >= {"lasp2", "allgather", "ring", "ulysses"}
    assert all(math.isfinite(r["loss_cpu"]) for r in sections["exact_steps"]["rows"])  # the CPU side ran
    for name, field in (("perf_softmax", "ms"), ("perf_step", "tokens_per_s"), ("perf_linear", "ms")):
        assert sections[name]["rows"] and all(r[field] > 0 for r in sections[name]["rows"]), name
    md = (tmp_path / "results.md").read_text()
    assert all(f"## {n}: " in md for n in sections) and not (tmp_path / "results.partial.json").exists()


def test_lasp2_bench_hf_suite(tmp_path):
    """The hf suite drives a parallelized transformers model the way users must (whole batch
    through ``shard_batch``, the batch's SP context in the forward), several families in one run
    (``--hf-config all`` names every family's tiny config): one summary row per family."""
    pytest.importorskip("transformers")
    from lasp2.bench.hf_families import config_names
    from lasp2.hf.families import FAMILIES

    assert config_names("all") == tuple(f.config for f in FAMILIES)
    for bad in ("qwen3-next-tiny,,lfm2-tiny", "lfm2-tiny,lfm2-tiny"):
        with pytest.raises(ValueError, match="distinct config names"):
            config_names(bad)
    _run(["-m", "lasp2", "bench", "--suite", "hf", "--hf-config", "qwen3-next-tiny,lfm2-tiny", "--world-sizes", "2",
          "--seq-lens", "32", "--repeats", "1", "--warmup", "0", "--no-plots", "--quiet", "--out", str(tmp_path)],
         tmp_path)
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {(r["hf_config"], r["strategy"]) for r in records} == {
        (c, s) for c in ("qwen3-next-tiny", "lfm2-tiny") for s in ("lasp2+allgather", "ideal")}, records
    for r in records:
        assert r["skipped"] is None and r["W"] == 2 and math.isfinite(r["time_s"]) and r["time_s"] > 0, r
    table = [x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith("| `")]
    assert [x.split(" | ")[0] for x in table] == ["| `qwen3-next-tiny`", "| `lfm2-tiny`"], table


def test_lasp2_bench_model_suite(tmp_path):
    """The model suite: Linear-Llama with SP contexts on its layers against the ideal."""
    _run(["-m", "lasp2", "bench", "--suite", "model", "--strategies", "lasp2+allgather", "--world-sizes", "2",
          "--seq-lens", "64", "--heads", "2", "--dim", "16", "--repeats", "1", "--warmup", "0", "--no-plots",
          "--quiet", "--out", str(tmp_path)], tmp_path)
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
