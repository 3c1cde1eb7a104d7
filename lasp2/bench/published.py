"""Published sequence-parallel measurements, the planner's calibration fitted to some of them,
and its predictions of the others (docs/planner.md shows the tables; tests/bench/test_plan_published.py
asserts them).

Source: Sun, Lan, Zhong, Qu, Cheng, "LASP-2: Rethinking Sequence Parallelism for Linear Attention
and Its Hybrid", arXiv 2502.07563 (ICML 2025 version). Setting: Linear-Llama3-1B (16 layers,
basic linear attention), batch 1, SP size = GPU count, DGX-A100 80GB nodes of 8, Megatron-Core 0.9.

- Table 6 (Appendix A.5.4): LASP-2 throughput (tokens/s, of the whole sequence: seq_len / step
  time) and memory per GPU (GB), 2K-4096K tokens on 16, 32, 64, 128 GPUs, OOM cells.
- Table 5 (Appendix A.5.3): LASP-2 at 1024K on 64 GPUs, mean of 10 runs: 486,183 tokens/s (Table 6
  reports 442,221 for the same point: the two published runs differ by 9.5%).
- Figure 3 (Section 4.2, 64 A100s, 512K and 2048K): only the ratios are stated in the text; the
  bars' absolute values are not, so they are not used here.

Calibration (``paper_calibration()``), a100-80gb preset, DDP model states (the paper's memory floor
does not shrink with the GPU count), no activation checkpointing:
- fitted: ``mfu``, ``bandwidth_efficiency`` and ``step_overhead_s`` by least squares on Table 6's
  step times at W = 16 and 64 (``FIT_W``); ``reserved_bytes`` on Table 6's memory at W = 16;
- fixed a priori (not fitted): link peaks (datasheets), latencies (the presets' defaults),
  grad_overlap 1 (PyTorch's bucketed overlap; see ``BASE``);
- held out (predicted): Table 6 at W = 32 and 128 (times and memory), every memory cell at
  W != 16, every OOM cell, Table 5, and Figure 3's ratios (nothing was fitted to LASP-1 or Ring).
"""
from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

from .hardware import PRESETS, Calibration

K = 1024
# Table 6: (tokens, GPUs, throughput tokens/s or None for OOM, memory GB per GPU or None).
TABLE6: Tuple[Tuple[int, int, Optional[int], Optional[float]], ...] = tuple(
    (n * K, w, thr, mem) for n, rows in (
        (2, ((16, 1254, 25.6), (32, 1209, 25.6), (64, 1285, 25.6), (128, 1205, 25.6))),
        (4, ((16, 2478, 25.6), (32, 2446, 25.6), (64, 2327, 25.6), (128, 2344, 25.6))),
        (8, ((16, 4835, 25.6), (32, 4784, 25.6), (64, 4693, 25.6), (128, 4678, 25.6))),
        (16, ((16, 9530, 25.6), (32, 9494, 25.6), (64, 9305, 25.6), (128, 9313, 25.6))),
        (32, ((16, 18105, 28.7), (32, 17755, 25.6), (64, 17835, 25.6), (128, 17807, 25.6))),
        (64, ((16, 35507, 33.8), (32, 34240, 28.7), (64, 34118, 25.6), (128, 33344, 25.6))),
        (128, ((16, 68406, 40.2), (32, 68545, 33.8), (64, 67344, 28.7), (128, 66811, 25.6))),
        (256, ((16, 135635, 57.8), (32, 132605, 40.2), (64, 130215, 33.8), (128, 131550, 28.7))),
        (512, ((16, None, None), (32, 250586, 57.8), (64, 245353, 40.2), (128, 233442, 33.8))),
        (1024, ((16, None, None), (32, None, None), (64, 442221, 57.8), (128, 416465, 40.2))),
        (2048, ((16, None, None), (32, None, None), (64, None, None), (128, 769030, 57.8))),
        (4096, ((16, None, None), (32, None, None), (64, None, None), (128, None, None))),
    ) for w, thr, mem in rows)
TABLE5 = (1024 * K, 64, 486183)
# Figure 3 (text of Section 4.2): LASP-2's throughput over the baseline's, 64 GPUs.
FIGURE3 = (("LASP-1", 512 * K, 1.073), ("LASP-1", 2048 * K, 1.152),
           ("Ring Attention", 512 * K, 1.178), ("Ring Attention", 2048 * K, 1.366))
# The planner's baselines each published one is compared with (lasp2/bench/baselines.py): Ring
# Attention as the paper's text describes it (left product) and with the right product per block.
MODELLED_AS = {"LASP-1": ("lasp1-serial",), "Ring Attention": ("ring-linear", "ring-linear-rp")}
FIT_W = (16, 64)
HARDWARE = "a100-80gb"
MODEL = "linear-llama3-1b"
# Fixed a priori: latencies and grad_overlap (1: PyTorch's bucketed overlap) are the Calibration
# defaults. With grad_overlap 0 the least-squares fit is slightly closer but needs mfu 0.85 (not
# credible for this model on an A100) and gets the held-out GPU-count trend wrong at long lengths;
# near_optimal_fits() spans both, and a slow test checks Figure 3's LASP-1 ratios over all of them.
BASE = Calibration()
# The result of fit_paper_calibration() (stored: the fit takes a second; a test refits it).
PAPER_CALIBRATION = replace(BASE, mfu=0.35, bandwidth_efficiency=0.5, step_overhead_s=0.8354, reserved_bytes=3214e6)


def _setup(cal: Calibration):
    from .step_model import Setup

    return Setup(PRESETS[HARDWARE], cal, "ddp", False)


def _lasp2_pair():
    from .plan import by_pattern

    return by_pattern("all-gather", None)


def step(cal: Calibration, seq_len: int, W: int, linear: Optional[str] = None):
    from .plan import MODELS
    from .step_model import step_cost

    return step_cost(MODELS[MODEL], 1, W, seq_len, _setup(cal), (linear, None) if linear else _lasp2_pair())


def _overhead(cal: Calibration, points) -> Tuple[float, float]:
    """(step_overhead_s, sum of squared relative errors): the overhead is the mean residual."""
    base = [step(replace(cal, step_overhead_s=0.0), n, w).time for n, w, _ in points]
    c0 = max(0.0, statistics.fmean(t - b for (_, _, t), b in zip(points, base)))
    return c0, sum(((b + c0) / t - 1) ** 2 for (_, _, t), b in zip(points, base))


def fit_time(cal: Calibration = BASE) -> Calibration:
    """mfu and bandwidth_efficiency (grids of 0.05) and step_overhead_s (the mean residual): least
    relative squares on Table 6's step times (seq_len / throughput) at ``FIT_W``."""
    points = [(n, w, n / thr) for n, w, thr, _ in TABLE6 if thr and w in FIT_W]
    grid = [replace(cal, mfu=m / 20, bandwidth_efficiency=b / 20) for m in range(2, 21) for b in range(2, 21)]
    (c0, _), best = min(((_overhead(c, points), c) for c in grid), key=lambda f: f[0][1])
    return replace(best, step_overhead_s=round(c0, 4))


def near_optimal_fits(within: float = 1.25) -> List[Calibration]:
    """Every (mfu, bandwidth_efficiency, grad_overlap in {0, 1}) on the grid of ``fit_time`` whose
    squared error on the fitted points is within ``within`` x the best: Table 6 cannot choose
    between them, so a held-out prediction is only as sure as its spread over them."""
    points = [(n, w, n / thr) for n, w, thr, _ in TABLE6 if thr and w in FIT_W]
    fits = [(_overhead(c, points), c) for go in (0.0, 1.0) for m in range(2, 21) for b in range(2, 21)
            for c in [replace(BASE, mfu=m / 20, bandwidth_efficiency=b / 20, grad_overlap=go)]]
    best = min(sse for (_, sse), _ in fits)
    return [replace(c, step_overhead_s=c0) for (c0, sse), c in fits if sse <= within * best]


def fit_memory(cal: Calibration) -> Calibration:
    """reserved_bytes: the mean residual of Table 6's memory at W = ``FIT_W[0]``."""
    rows = [(n, w, mem) for n, w, thr, mem in TABLE6 if mem and w == FIT_W[0]]
    resid = [mem * 1e9 - sum(step(replace(cal, reserved_bytes=0.0), n, w).memory.values()) for n, w, mem in rows]
    return replace(cal, reserved_bytes=round(max(0.0, statistics.fmean(resid)) / 1e6) * 1e6)


def fit_paper_calibration() -> Calibration:
    """The fit behind ``PAPER_CALIBRATION`` (about a second; a test checks the two agree)."""
    return fit_memory(fit_time(BASE))


def paper_calibration() -> Calibration:
    return PAPER_CALIBRATION


def table6_rows(cal: Optional[Calibration] = None) -> List[Dict]:
    """Every Table 6 cell beside the prediction: time error, memory error, fits vs OOM."""
    cal = cal or paper_calibration()
    memory = PRESETS[HARDWARE].memory_bytes
    out = []
    for n, w, thr, mem in TABLE6:
        c = step(cal, n, w)
        pred_mem = sum(c.memory.values())
        out.append(dict(seq_len=n, W=w, paper_tps=thr, paper_mem_gb=mem, pred_tps=n / c.time,
                        pred_mem_gb=pred_mem / 1e9, pred_fits=pred_mem <= memory,
                        fitted=w in FIT_W and thr is not None))
    return out


def heldout_time_error(cal: Optional[Calibration] = None) -> Tuple[float, float]:
    """(median, max) |relative error| of the predicted throughput on the held-out Table 6 cells."""
    errs = [abs(r["pred_tps"] / r["paper_tps"] - 1) for r in table6_rows(cal) if r["paper_tps"] and not r["fitted"]]
    return statistics.median(errs), max(errs)


def oom_boundary(rows: List[Dict], W: int, key: str) -> Optional[int]:
    """The shortest length at W that is out of memory (paper: key 'paper'; model: 'pred')."""
    lens = [r["seq_len"] for r in rows if r["W"] == W and
            (r["paper_mem_gb"] is None if key == "paper" else not r["pred_fits"])]
    return min(lens) if lens else None


def figure3_rows(cal: Optional[Calibration] = None) -> List[Dict]:
    """LASP-2's predicted throughput over each baseline's (step time ratio) beside the paper's."""
    cal = cal or paper_calibration()
    out = []
    for published, n, paper in FIGURE3:
        ours = step(cal, n, 64)
        for baseline in MODELLED_AS[published]:
            theirs = step(cal, n, 64, baseline)
            out.append(dict(published=published, baseline=baseline, seq_len=n, paper=paper,
                            predicted=theirs.time / ours.time, lasp2_s=ours.time, baseline_s=theirs.time))
    return out


def paper_ring_step_s(seq_len: int = 512 * K, W: int = 64) -> float:
    """The paper's Ring Attention step: Table 6's LASP-2 step time x Figure 3's ratio (512K: the
    only Figure 3 length whose LASP-2 point Table 6 reports)."""
    ratio = next(r for b, n, r in FIGURE3 if (b, n) == ("Ring Attention", seq_len))
    return ratio * seq_len / next(thr for n, w, thr, _ in TABLE6 if (n, w) == (seq_len, W))


def kv_ring_traffic_s(seq_len: int, W: int) -> float:
    """Seconds per step a K/V ring needs just to move its blocks, whatever product order it
    computes with: per layer W - 1 hops of this rank's bf16 K and V forward and of fp32 dK/dV +
    bf16 K/V backward (4 x the bf16 K/V bytes in all), at 100% of one GPU's inter-node line rate
    (a 64-GPU ring crosses 8 node boundaries and every hop waits for the slowest)."""
    from .plan import MODELS

    m = MODELS[MODEL]
    kv = seq_len // W * m.heads * 2 * m.head_dim * 2
    return m.layers * (W - 1) * 4 * kv / PRESETS[HARDWARE].inter_bandwidth


def quadratic_lower_bound_s(seq_len: int, W: int) -> float:
    """Seconds a left-product (quadratic) attention needs per step on one A100 at 100% of peak,
    beyond LASP-2's own attention work: what the paper's Ring Attention bars would have to
    contain if its baseline did what its text says."""
    from .baselines import quadratic_compute
    from .cost_model import Shape, linear_compute
    from .plan import MODELS

    m = MODELS[MODEL]
    s = Shape(B=1, T=seq_len // W, H=m.heads, K=m.head_dim, V=m.head_dim)
    peak = PRESETS[HARDWARE].peak_flops
    return m.layers * (quadratic_compute(W, s, peak) - linear_compute(s, peak))


def run_to_run_spread() -> float:
    """|Table 5 / Table 6 - 1| for the one point the paper measured twice (1024K, 64 GPUs)."""
    n, w, thr = TABLE5
    return abs(thr / next(t for m, v, t, _ in TABLE6 if (m, v) == (n, w)) - 1)


def uncertainty() -> float:
    """The relative uncertainty every prediction carries: the larger of the held-out median error
    on Table 6 and the paper's own run-to-run spread (outside that setting: an extrapolation)."""
    return max(heldout_time_error()[0], run_to_run_spread())


def render_markdown() -> str:
    """The validation tables of docs/planner.md (a test checks the file holds exactly these)."""
    cal = paper_calibration()
    rows = table6_rows(cal)
    med, mx = heldout_time_error(cal)
    out = ["### Calibration (a100-80gb preset, ddp model states, no activation checkpointing)", "",
           "| knob | value | how |", "|---|---|---|",
           f"| mfu | {cal.mfu:.2f} | fitted: Table 6 step times at W = {' and '.join(map(str, FIT_W))} |",
           f"| bandwidth_efficiency | {cal.bandwidth_efficiency:.2f} | fitted: same points |",
           f"| step_overhead_s | {cal.step_overhead_s:.3f} | fitted: same points (mean residual) |",
           f"| reserved_bytes | {cal.reserved_bytes / 1e9:.2f} GB | fitted: Table 6 memory at W = {FIT_W[0]} |",
           f"| grad_overlap | {cal.grad_overlap:.0f} | a priori (PyTorch's bucketed overlap; see below) |",
           f"| latencies | {cal.nvlink_alpha_s * 1e6:.0f} / {cal.inter_alpha_s * 1e6:.0f} us per collective step, "
           f"{cal.nvlink_hop_s * 1e6:.0f} / {cal.inter_hop_s * 1e6:.0f} us per dependent hop (NVLink / inter-node) "
           "| a priori |", "",
           "### Figure 3: LASP-2's throughput over the baseline's, 64 A100s (held out: nothing fitted to it)", "",
           "| paper's baseline | planner's model | tokens | paper | planner | planner / paper |",
           "|---|---|---|---|---|---|"]
    for r in figure3_rows(cal):
        out.append(f"| {r['published']} | {r['baseline']} | {r['seq_len'] // K}K | {r['paper']:.3f} | "
                   f"{r['predicted']:.3f} | {r['predicted'] / r['paper']:.2f} |")
    out += ["", "Left-product attention alone, at 100% of an A100's peak, adds "
            f"{quadratic_lower_bound_s(512 * K, 64):.1f} s "
            f"per step at 512K and {quadratic_lower_bound_s(2048 * K, 64):.1f} s at 2048K over LASP-2's attention "
            f"work; the paper's Ring Attention step is 1.178 x {512 * K / 245353:.2f} s = {paper_ring_step_s():.2f} s "
            "at 512K (Table 6's LASP-2 step time x 1.178). Moving the K/V blocks around the ring, in either product "
            f"order, takes {kv_ring_traffic_s(512 * K, 64):.1f} s per step at 512K "
            f"({kv_ring_traffic_s(2048 * K, 64):.1f} s at 2048K) at 100% of an A100 node's per-GPU InfiniBand line "
            "rate.", "",
            f"### Table 6: LASP-2 throughput (tokens/s) and memory per GPU (GB); held-out median |error| {med:.1%}, "
            f"max {mx:.1%}", "",
            "| tokens | GPUs | paper tokens/s | planner | error | paper GB | planner GB | used for |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = f"{r['paper_tps']:,}" if r["paper_tps"] else "OOM"
        err = f"{r['pred_tps'] / r['paper_tps'] - 1:+.1%}" if r["paper_tps"] else ""
        pmem = f"{r['paper_mem_gb']:.1f}" if r["paper_mem_gb"] else "OOM"
        mine = f"{r['pred_mem_gb']:.1f}" + ("" if r["pred_fits"] else " (OOM)")
        use = "time fit" if r["fitted"] else "held out"
        use += ", memory fit" if r["W"] == FIT_W[0] and r["paper_mem_gb"] else ""
        out.append(f"| {r['seq_len'] // K}K | {r['W']} | {paper} | {r['pred_tps']:,.0f} | {err} | {pmem} | {mine} "
                   f"| {use} |")
    n, w, thr = TABLE5
    pred = n / step(cal, n, w).time
    out += ["", f"Table 5 (the same 1024K / 64-GPU point measured again, mean of 10 runs): paper {thr:,}, planner "
            f"{pred:,.0f} ({pred / thr - 1:+.1%}); the paper's two figures for it differ by "
            f"{run_to_run_spread():.1%}.", "",
            "### Out-of-memory boundary: the shortest length that does not fit", "", "| GPUs | paper | planner |",
            "|---|---|---|"]
    for W in sorted({r["W"] for r in rows}):
        out.append(f"| {W} | {oom_boundary(rows, W, 'paper') // K}K | {oom_boundary(rows, W, 'pred') // K}K |")
    return "\n".join(out) + "\n"
