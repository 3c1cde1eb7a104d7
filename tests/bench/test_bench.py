"""lasp2 bench / lasp2 plan: a smoke run of the CLI, its errors, and the cost model's formulas
against hand-computed values. Benchmarks are not timed here: only files, fields and formulas."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lasp2.bench import cost_model as cm
from lasp2.bench import plan
from lasp2.cli import main
from lasp2.parallel.strategies import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
LINK = cm.Link("test", alpha=1e-5, bandwidth=1e9, p2p_alpha=2e-5)  # beta = 1 ns per byte


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ------------------------------------------------------------------ the smoke run of the CLI
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "linear"
    cmd = [sys.executable, "-m", "lasp2", "bench", "--quick", "--suite", "linear", "--world-sizes", "2",
           "--out", str(out)] + ([] if HAVE_MPL else ["--no-plots"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc


def test_quick_bench_writes_every_file_and_field(quick_run):
    out, data, proc = quick_run
    assert "W=2 T=512" in proc.stdout  # progress lines while it ran
    md = (out / "results.md").read_text()
    assert "| W | T global | T local | strategy |" in md and "lasp2 bench --quick" in md
    if HAVE_MPL:
        for name in ("time_vs_T.png", "efficiency_vs_W.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = data["records"]
    assert sorted((r["T_global"], r["strategy"]) for r in recs) == sorted(
        (T, s) for T in (512, 1024) for s in (*LINEAR_STRATEGIES, "ideal"))
    for r in recs:
        assert r["W"] == 2 and r["T_local"] == r["T_global"] // 2 and r["skipped"] is None
        assert r["time_s"] > 0 and r["time_s"] == max(r["per_rank_time_s"]) and len(r["per_rank_time_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(r["T_global"] / r["time_s"])
        assert 0 < r["efficiency"] and len(r["per_rank_peak_mem_mb"]) == 2 and r["peak_mem_mb"] >= 0
        assert len(r["bytes_sent_per_rank"]) == len(r["bytes_received_per_rank"]) == 2
        assert all(len(t) == 2 for t in r["per_rank_times_s"])  # --quick: 2 repeats
        assert r["torch"] and r["hardware"] and r["command"].startswith("lasp2 bench --quick")
    by = {(r["T_global"], r["strategy"]): r for r in recs}
    assert by[(512, "ideal")]["efficiency"] == 1.0
    assert by[(512, "ideal")]["comm_fwd"] == {} and by[(512, "ideal")]["bytes_sent_per_rank"] == [0, 0]
    assert by[(512, "lasp2")]["comm_fwd"] == {"all_gather": 1} == by[(512, "lasp2")]["comm_bwd"]
    # time blocked in communication: none without it, some for the backward gather's wait
    assert by[(512, "ideal")]["per_rank_comm_wait_s"] == [[0.0, 0.0], [0.0, 0.0]]
    assert all(w[1] > 0 for w in by[(512, "lasp2")]["per_rank_comm_wait_s"]) and "blocked fwd/bwd (ms)" in md
    for p2p in ("lasp1", "allscan", "tree"):  # W = 2: one hop (one block, one round) each way
        assert by[(512, p2p)]["comm_fwd"] == {"send": 1, "recv": 1} == by[(512, p2p)]["comm_bwd"], p2p


def test_measured_bytes_match_the_cost_model(quick_run):
    """comm.track()'s per-rank bytes equal the model's for the quick shape (H=4, K=V=32, fp32)."""
    recs = quick_run[1]["records"]
    shape = cm.Shape(B=1, T=256, H=4, K=32, V=32, elt=4)
    for strategy in LINEAR_STRATEGIES:
        rec = next(r for r in recs if r["strategy"] == strategy and r["T_global"] == 512)
        model = cm.linear_layer(strategy, 2, shape, 1e9, LINK).bytes_sent
        if strategy == "lasp2":  # both ranks send (W-1)/W of each gathered buffer
            assert rec["bytes_sent_per_rank"] == [model, model] == rec["bytes_received_per_rank"]
        else:  # P2P: rank 0 sends in forward, rank 1 in backward; model counts per direction
            assert sum(rec["bytes_sent_per_rank"]) == model


def test_from_json_rewrites_the_report_without_measuring(quick_run, tmp_path):
    out = quick_run[0]
    argv = ["bench", "--from-json", str(out / "results.json"), "--out", str(tmp_path)]
    assert main(argv + ([] if HAVE_MPL else ["--no-plots"])) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text()) == quick_run[1]
    assert main(["bench", "--from-json", str(tmp_path / "missing.json")]) == 2


# ------------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("argv, needle", [
    (["bench", "--world-sizes", "0"], "--world-sizes"),
    (["bench", "--seq-lens", "1000", "--world-sizes", "3"], "--seq-lens 1000"),
    (["bench", "--local-lens", "7", "--layout", "zigzag"], "--local-lens 7"),
    (["bench", "--heads", "8", "--kv-heads", "3"], "--kv-heads 3"),
    (["bench", "--suite", "bogus"], "invalid choice"),
    (["bench", "--seq-lens", "512", "--local-lens", "256"], "not allowed with"),
    (["bench", "--suite", "model", "--layout", "both"], "--layout both"),
    (["bench", "--suite", "softmax", "--variants", "deltanet"], "--variants"),
    (["bench", "--variants", "deltanet", "scalar"], "one variant per run"),
    (["bench", "--suite", "memory", "--shapes", "2by2"], "--shapes 2by2"),
    (["bench", "--suite", "ops", "--heads", "0"], "--heads"),
    (["bench", "--suite", "ops", "--world-sizes", "2"], "not a flag of --suite ops"),
    (["bench", "--suite", "memory", "--heads", "2", "--shapes", "1x2"], "--heads: not a flag of --suite memory"),
    (["plan", "--layer-pattern", "LXS"], "layer pattern"),
    (["plan", "--gpus", "3", "--seq-lens", "1000"], "does not split"),
    (["plan", "--mfu", "2"], "--mfu"),
    ([], "a command is required"),
])
def test_bad_flags_give_one_error_line(argv, needle, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.strip().count("\n") == 0, err


def test_results_folder_defaults_to_suite_machine_date(monkeypatch):
    from lasp2.bench import report

    monkeypatch.setattr(report.platform, "node", lambda: "gpu-box_7.example.org")
    monkeypatch.setattr(report.time, "strftime", lambda fmt: "2026-12-07")
    assert str(report.default_out("ops")) == "ops_gpu-box-7_2026-12-07"


def test_missing_matplotlib_is_a_clear_error_before_anything_runs(monkeypatch, capsys, tmp_path):
    # In this process (a subprocess only to hide matplotlib costs seconds of imports): a None
    # entry in sys.modules makes every `import matplotlib` fail, as if it were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["bench", "--quick", "--out", str(tmp_path / "unused")])
    out, err = capsys.readouterr()
    assert code == 2 and "pip install 'lasp2[bench]'" in err, err
    assert err.strip().count("\n") == 0 and "launching" not in out
    assert not (tmp_path / "unused").exists()


# -------------------------------------------------------------------- cost model formulas
def test_collective_formulas_by_hand():
    # ring all-gather of an 8 MB buffer over 4 ranks: 3 steps of (10 us + 2 MB at 1 GB/s)
    assert cm.all_gather_time(4, 8e6, LINK) == pytest.approx(3 * (1e-5 + 2e-3))
    assert cm.reduce_scatter_time(4, 8e6, LINK) == pytest.approx(3 * (1e-5 + 2e-3))
    assert cm.all_to_all_time(4, 8e6, LINK) == pytest.approx(3 * (1e-5 + 2e-3))
    assert cm.collective_bytes_per_rank(4, 8e6) == pytest.approx(6e6)  # (W-1)/W of the buffer
    assert cm.p2p_time(1e6, LINK) == pytest.approx(2e-5 + 1e-3)
    assert cm.chain_time(4, 1e6, LINK) == pytest.approx(3 * (2e-5 + 1e-3))
    assert cm.all_gather_time(1, 8e6, LINK) == 0.0 and cm.chain_time(1, 1e6, LINK) == 0.0


def test_linear_layer_by_hand():
    s = cm.Shape(B=1, T=1024, H=2, K=4, V=4, elt=4, chunk=64)
    intra, inter = cm.linear_core_flops(s)
    assert (intra, inter) == (1024 * 2 * 2 * 64 * 8, 1024 * 2 * 4 * 16)
    state, row = 2 * 4 * 4 * 4, 2 * 4 * 4 * 4 + 2 * 1 * 4 + 8  # [B,H,K,V] fp32; + gate + agreement digest
    rate = 1e9
    lasp2 = cm.linear_layer("lasp2", 4, s, rate, LINK)
    assert lasp2.compute == pytest.approx(3 * (intra + inter) / rate)
    # the forward gather (3 x 10 us) hides under the intra-chunk work (2.1 ms); backward is exposed
    assert lasp2.comm == pytest.approx(3 * (1e-5 + 1e-9 * state))
    assert lasp2.bytes_sent == 3 * (row + state) and lasp2.calls == (1, 1)
    slow = cm.linear_layer("lasp2", 4, s, 1e12, LINK)  # intra work now 2 us: the gather shows
    assert slow.comm == pytest.approx(3 * (1e-5 + 1e-9 * row) - intra / 1e12 + 3 * (1e-5 + 1e-9 * state))
    lasp1 = cm.linear_layer("lasp1", 4, s, rate, LINK)
    assert lasp1.comm == pytest.approx(2 * 3 * (2e-5 + 1e-9 * state)) and lasp1.bytes_sent == 2 * (state + 8 * 4)
    assert cm.linear_layer("lasp1", 4, s, rate, LINK, segments=2).comm == pytest.approx(2 * 7 * (2e-5 + 1e-9 * state))
    assert cm.linear_layer("ideal", 4, s, rate, LINK).comm == 0.0


def test_scan_strategies_by_hand():
    """allscan: J + k - 2 hops of state / k; tree: ceil(log2 J) rounds of state + Â. Forward hidden
    behind the intra-chunk work (helper thread) up to its length, backward exposed."""
    s = cm.Shape(B=1, T=1024, H=2, K=4, V=4, elt=4, chunk=64)
    intra = cm.linear_core_flops(s)[0]
    state, a = 2 * 4 * 4 * 4, 2 * 1 * 4
    for rate in (1e9, 1e14):  # intra-chunk work 2.1 ms (hides the forward) or 21 ns (hides nothing)
        hidden = intra / rate
        scan = cm.linear_layer("allscan", 8, s, rate, LINK, blocks=2)
        t = (8 + 2 - 2) * (2e-5 + 1e-9 * state / 2)
        assert scan.comm == pytest.approx(max(0.0, t - hidden) + t)
        digests = 8 * 8  # every whole message carries the W = 8 agreement digests
        assert scan.bytes_sent == 2 * (state + digests) and scan.calls == (2 * 2, 2 * 2)
        tree = cm.linear_layer("tree", 8, s, rate, LINK)
        t = 3 * (2e-5 + 1e-9 * (state + a))
        assert tree.comm == pytest.approx(max(0.0, t - hidden) + t) and tree.bytes_sent == 2 * 3 * (state + a + digests)
        z = cm.linear_layer("tree", 3, s, rate, LINK, segments=2)  # zigzag: J = 6 -> 3 rounds
        assert z.comm == pytest.approx(2 * 3 * (2e-5 + 1e-9 * (state + a)) - min(hidden, 3 * (2e-5 + 1e-9 * (state + a))))
    # k* for a chain of 8: sqrt(6 * s / alpha) with s = 128 ns, alpha = 20 us -> 0.2: one block
    assert cm.scan_blocks(8, s, LINK) == 1
    big = cm.Shape(B=1, T=1024, H=16, K=128, V=128)  # a 1 MiB state: s = 1.05 ms at 1 GB/s
    assert cm.scan_blocks(8, big, LINK) == 18  # sqrt(6 * 1.05e-3 / 2e-5) = 17.7 -> 18 (the cheaper neighbour)


def test_softmax_layer_by_hand():
    s = cm.Shape(B=1, T=512, H=8, K=16, V=16, Hkv=2, elt=2)
    W, rate = 4, 1e12
    t_fwd = (512 * (4 * 512 / 2) * 8 * 2 * 32) / rate
    kv, kv32 = 512 * 2 * 32 * 2, 512 * 2 * 32 * 4
    ag = cm.softmax_layer("allgather", W, s, rate, LINK)
    assert ag.compute == pytest.approx(3.5 * t_fwd)
    assert ag.comm == pytest.approx(max(0, 3 * (1e-5 + 1e-9 * (kv + 8)) - t_fwd / 4) + 3 * (1e-5 + 1e-9 * kv32))
    assert ag.bytes_sent == 3 * (kv + 8 + kv32) and ag.saved == 4 * kv  # + the 8-byte agreement digest
    ring = cm.softmax_layer("ring", W, s, rate, LINK)
    assert ring.comm == pytest.approx(3 * max(0, 2e-5 + 1e-9 * (kv + 8) - t_fwd / 4)
                                      + 3 * max(0, 2e-5 + 1e-9 * (kv + kv32) - 2.5 * t_fwd / 4))
    assert cm.kv_replication(8, 2, 4) == 2 and cm.kv_replication(8, 8, 4) == 1
    uly = cm.softmax_layer("ulysses", W, s, rate, LINK)
    qkv, o = 512 * (8 * 16 + 2 * 2 * 32) * 2, 512 * 8 * 16 * 2
    grads = qkv * 2  # fp32 because KV heads are replicated
    assert uly.bytes_sent == pytest.approx(0.75 * (qkv + 8 * 4 + 2 * o + grads))
    with pytest.raises(ValueError, match="H % W"):
        cm.softmax_layer("ulysses", 3, s, rate, LINK)
    contiguous = cm.softmax_layer("ring", W, s, rate, LINK, layout="contiguous")
    assert contiguous.compute == pytest.approx(ag.compute * 2 * 4 / 5)  # last rank: 2W/(W+1)


def test_validation_fit_recovers_a_known_machine():
    """Records generated by the model itself: the fit returns its rate and c0, and the W = 4
    predictions (cores shared 2x) reproduce the generated times."""
    from lasp2.bench import validate as v

    link = cm.Link("gloo-like", alpha=3e-4, bandwidth=4e8, p2p_alpha=1e-4, p2p_bandwidth=2e9)
    assert link.p2p_beta == pytest.approx(5e-10) and link.scaled(2).p2p_alpha == pytest.approx(2e-4)
    assert link.scaled(2).bandwidth == pytest.approx(2e8) and link.scaled(2).p2p_beta == pytest.approx(1e-9)
    rate, c0, cores = 5e9, 2e-3, 2

    def rec(strategy, W, T_local):
        r = {"suite": "linear", "strategy": strategy, "baseline": strategy == "ideal", "W": W, "T_local": T_local,
             "T_global": W * T_local, "batch": 1, "heads": 4, "dim": 64, "kv_heads": None, "dtype": "float32",
             "layout": "contiguous"}
        r["time_s"] = v.predict_record(r, rate, c0, link, cores)
        return r

    for strategy in ("ideal", "lasp2", "lasp1"):
        fit_rate, fit_c0 = v.fit_compute([rec(strategy, 2, t) for t in (1024, 2048, 4096)], link, cores)
        assert fit_rate == pytest.approx(rate, rel=1e-6) and fit_c0 == pytest.approx(c0, rel=1e-6)
        r4 = rec(strategy, 4, 8192)
        assert v.predict_record(r4, fit_rate, fit_c0, link, cores) == pytest.approx(r4["time_s"], rel=1e-6)
    assert v._linfit([1, 2, 3], [0.5, 2.5, 4.5]) == pytest.approx((0.0, 19 / 14))  # intercept < 0: through the origin
