"""``lasp2 plan --validate`` on input that cannot support a fit (``lasp2 bench
--quick`` results: two lengths, one W) used to print a nonsense fit (a compute rate of 1e21
GFLOP/s, errors up to +185 %, an empty summary). It now refuses, saying what to measure.

Synthetic records and a stubbed communication microbenchmark: no ranks start.
"""
from __future__ import annotations

import json

import pytest

from lasp2.bench import validate
from lasp2.cli import main as cli_main


def _records(lengths, times_ms, W=2):
    return [dict(suite="linear", strategy="lasp2", baseline=False, W=W, T_global=T, T_local=T // W, batch=1,
                 heads=4, kv_heads=None, dim=32, dtype="float32", layout="contiguous", skipped=None, time_s=t / 1e3)
            for T, t in zip(lengths, times_ms)]


def _write(tmp_path, records):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": {}, "records": records}))
    return path


@pytest.fixture
def fake_comm(monkeypatch):
    calls = []

    def measure(*args, **kwargs):
        calls.append(1)
        link = {n: 2e-4 + n * 1e-9 for n in validate.SIZES}
        return {W: {"all_gather": dict(link), "chain": dict(link)} for W in (2, 4)}

    monkeypatch.setattr(validate, "measure_comm", measure)
    return calls


def test_quick_results_are_refused_before_measuring(tmp_path, fake_comm, capsys):
    path = _write(tmp_path, _records([512, 1024], [9.0, 8.5]))  # what --quick gives
    code = cli_main(["plan", "--validate", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "nothing is left to predict" in err[0] and "--seq-lens" in err[0] and "--world-sizes" in err[0]
    assert not fake_comm  # refused before the microbenchmarks start any rank
    with pytest.raises(ValueError, match=r"1 length\(s\) at W=2 \[1024\].*needs two lengths"):
        validate.validate([_write(tmp_path, _records([1024], [9.0]) + _records([1024], [9.0], W=4))])


def test_times_that_do_not_grow_with_the_work_are_refused(tmp_path, fake_comm):
    path = _write(tmp_path, _records([512, 1024, 2048], [9.0, 8.5, 30.0]))
    with pytest.raises(ValueError, match="does not grow with the work.*T_local 256: 9.0 ms.*bench longer sequences"):
        validate.validate([path])


def test_input_that_supports_a_fit_is_validated(tmp_path, fake_comm):
    """The positive control: times that grow with the work give a report with held-out points."""
    lengths = [2048, 8192, 32768]
    path = _write(tmp_path, _records(lengths, [2.0 + 0.004 * T for T in lengths]))
    text = validate.validate([path])
    assert "linear, held out (longest length, W=2): 1 points" in text


def test_validate_writes_a_calibration_that_plan_reads(tmp_path, fake_comm, capsys):
    """--save-calibration: the fitted link and compute rate of this machine as a --hardware file."""
    from lasp2.bench.hardware import load_hardware

    lengths = [2048, 8192, 32768]
    path = _write(tmp_path, _records(lengths, [2.0 + 0.004 * T for T in lengths]))
    out = tmp_path / "me.json"
    text = validate.validate([path], save_calibration=out)
    hw, cal = load_hardware(str(out))
    link = validate.fit_link(validate.measure_comm())  # the stubbed microbenchmark's link
    assert f"calibration written to {out}" in text
    assert hw.nvlink_bandwidth == pytest.approx(link.bandwidth) and cal.inter_hop_s == pytest.approx(link.p2p_alpha)
    assert cal.mfu == 1.0 and hw.peak_flops > 0
    assert cli_main(["plan", "--hardware", str(out), "--gpus", "2", "--seq-lens", "4K", "--strategies", "lasp2"]) == 0
    assert "this machine (gloo, fitted" in capsys.readouterr().out
