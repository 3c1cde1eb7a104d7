"""The planner against the LASP-2 paper's published measurements (arXiv 2502.07563): Table 6
(LASP-2, 2K-4096K on 16-128 A100s), Table 5 and Figure 3's ratios. The calibration is fitted to
Table 6 at W = 16 and 64 only; everything asserted here as a prediction was held out
(lasp2/bench/published.py says which numbers were used for what)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lasp2.bench import published as P

ROOT = Path(__file__).resolve().parents[2]
ROWS = P.table6_rows()


def _figure3(baseline):
    return {r["seq_len"]: r for r in P.figure3_rows() if r["baseline"] == baseline}


def test_lasp2_over_published_lasp1_within_10_percent_and_growing_with_length():
    """Held out: nothing was fitted to LASP-1. The serialised inter-chunk compute makes the gap grow."""
    rows = _figure3("lasp1-serial")
    for n in (512 * 1024, 2048 * 1024):
        assert rows[n]["predicted"] == pytest.approx(rows[n]["paper"], rel=0.10), rows[n]
    assert rows[2048 * 1024]["predicted"] > rows[512 * 1024]["predicted"] > 1  # the paper: 1.073 -> 1.152


def test_ring_linear_grows_with_length_but_the_published_ratio_is_not_left_product_work():
    """The paper's Ring Attention baseline is described as left-product (quadratic) linear attention;
    its published step at 512K (1.178 x LASP-2's) is shorter than that quadratic work alone at 100%
    of an A100's peak, so no cost model of the described method can give the published ratio: the
    planner's ring-linear predicts far slower (docs/planner.md). What does hold: it is slower than
    LASP-2 and falls further behind with length, as in the paper."""
    rows = _figure3("ring-linear")
    lasp2_512k = 512 * 1024 / next(r["paper_tps"] for r in ROWS if (r["seq_len"], r["W"]) == (512 * 1024, 64))
    assert P.paper_ring_step_s() == pytest.approx(1.178 * lasp2_512k)
    assert P.quadratic_lower_bound_s(512 * 1024, 64) > P.paper_ring_step_s() - lasp2_512k
    assert rows[2048 * 1024]["predicted"] > rows[512 * 1024]["predicted"] > rows[512 * 1024]["paper"]


def test_right_product_ring_keeps_the_papers_direction_but_not_its_ratio():
    """Held out, calibration unchanged. A K/V ring with the right product per received block has
    work linear in the length (less than ring-linear's at 2048K) and still falls further behind
    LASP-2 with length, as in the paper; its ratio is not the paper's: moving the K/V blocks alone,
    at 100% of the InfiniBand line rate, takes longer than the paper's whole Ring Attention step."""
    rows, left = _figure3("ring-linear-rp"), _figure3("ring-linear")
    assert rows[2048 * 1024]["predicted"] > rows[512 * 1024]["predicted"] > 1
    assert rows[2048 * 1024]["baseline_s"] < left[2048 * 1024]["baseline_s"]
    assert P.kv_ring_traffic_s(512 * 1024, 64) > P.paper_ring_step_s()


def test_table6_held_out_throughput():
    med, worst = P.heldout_time_error()
    assert med < 0.10 and worst < 0.20, (med, worst)
    n, w, thr = P.TABLE5  # the same point measured again by the paper: predicted within its own spread
    assert n / P.step(P.paper_calibration(), n, w).time == pytest.approx(thr, rel=P.run_to_run_spread())


def test_table6_trends_have_the_papers_direction():
    """Throughput grows with length at every GPU count; at every length the largest GPU count is
    slower than the smallest (the paper's SP pays more per GPU as W grows)."""
    for key in ("paper_tps", "pred_tps"):
        for W in (16, 32, 64, 128):
            tps = [r[key] for r in ROWS if r["W"] == W and r["paper_tps"]]
            assert tps == sorted(tps), (key, W, tps)
        for n in sorted({r["seq_len"] for r in ROWS}):
            cells = [r for r in ROWS if r["seq_len"] == n and r["paper_tps"]]
            if len(cells) > 1:
                assert cells[-1][key] < cells[0][key], (key, n)


def test_memory_and_the_out_of_memory_boundary():
    """Memory was fitted (one knob, reserved_bytes) at W = 16 only; the other columns and every OOM
    cell are predicted. The boundary must be the paper's within one doubling (it is exact)."""
    held = [abs(r["pred_mem_gb"] / r["paper_mem_gb"] - 1) for r in ROWS if r["paper_mem_gb"] and r["W"] != 16]
    assert max(held) < 0.10, max(held)
    for W in (16, 32, 64, 128):
        paper, ours = P.oom_boundary(ROWS, W, "paper"), P.oom_boundary(ROWS, W, "pred")
        assert paper / 2 <= ours <= paper * 2, (W, paper, ours)


def test_docs_hold_the_generated_validation_tables():
    text = (ROOT / "docs" / "planner.md").read_text()
    assert P.render_markdown() in text, "docs/planner.md is stale: paste lasp2.bench.published.render_markdown()"


@pytest.mark.slow
def test_the_stored_calibration_is_the_fit():
    assert P.fit_paper_calibration() == P.PAPER_CALIBRATION


@pytest.mark.slow
def test_lasp1_ratios_hold_over_every_fit_table6_cannot_rule_out():
    """Table 6 cannot choose between many (mfu, bandwidth, grad_overlap) fits; the held-out Figure 3
    ratios stay within 10% of the paper's over all of them (docs/planner.md gives the range)."""
    fits = P.near_optimal_fits()
    assert len(fits) > 50 and {c.grad_overlap for c in fits} == {0.0, 1.0}
    for cal in fits:
        for r in P.figure3_rows(cal):
            if r["published"] == "LASP-1":
                assert r["predicted"] == pytest.approx(r["paper"], rel=0.10), (cal, r)
