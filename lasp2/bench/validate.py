"""``lasp2 plan --validate``: fit the cost model on this machine, predict measured points.

1. Communication: gloo microbenchmarks on self-launched ranks (1 thread each). alpha and beta
   from all-gathers at W = 2 over message sizes; p2p_alpha and p2p_beta from single hops at
   W = 2. The W = 4 all-gathers and 3-hop chains are then *predicted* and compared.
2. Compute: for every configuration (the ideal and each strategy: their local work differs),
   a FLOP rate and a fixed per-call overhead c0 (t = FLOPs / rate + c0 + modelled exposed
   communication, least squares, c0 >= 0) from its records at the smallest W, all lengths but
   the longest.
3. Held out, and predicted: the longest length at the smallest W, and every record at larger W.

Input that cannot support this is refused (``ValueError`` saying what to measure): a
configuration with fewer than two lengths at the smallest W, a suite with nothing held out
(two lengths and a single W, as ``lasp2 bench --quick`` gives), or times that do not grow with
the work between the fitted lengths (noise larger than the difference: no FLOP rate exists).

This machine's ranks share its cores: with W ranks of one thread on C cores every cost, compute
and loopback copies alike, stretches by max(1, W / C). That factor is part of the model here.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist

from ..parallel.allscan import default_blocks
from ..parallel.strategies import LINEAR_STRATEGIES, linear
from .cost_model import Link, Shape, all_gather_time, chain_time, linear_layer, softmax_layer

SIZES = (1 << 10, 16 << 10, 128 << 10, 512 << 10, 2 << 20)  # bytes per rank


def _comm_rank(sizes, reps: int) -> Dict[str, Dict[int, float]]:
    """On every rank: median seconds of an all-gather and of a W-1 hop chain per message size."""
    from lasp2.parallel import comm

    group, rank, W = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    out = {"all_gather": {}, "chain": {}}
    for n in sizes:
        x = torch.zeros(n // 4)
        for kind in ("all_gather", "chain"):
            times = []
            for i in range(reps + 2):
                dist.barrier(group)
                t0 = time.perf_counter()
                if kind == "all_gather":
                    comm.all_gather(x, group)
                else:  # rank r waits for r - 1, then passes on: the LASP-1 pattern
                    y = comm.recv(x, rank - 1, group) if rank > 0 else x
                    if rank < W - 1:
                        comm.send(y, rank + 1, group)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            out[kind][n] = statistics.median(times)
    return out


def measure_comm(world_sizes=(2, 4), reps: int = 15) -> Dict[int, Dict[str, Dict[int, float]]]:
    """{W: {"all_gather"|"chain": {bytes per rank: seconds on the slowest rank}}}."""
    from lasp2.launch import spawn

    res = {}
    for W in world_sizes:
        ranks = spawn(_comm_rank, W, SIZES, reps, threads_per_rank=1)
        res[W] = {k: {n: max(r[k][n] for r in ranks) for n in SIZES} for k in ("all_gather", "chain")}
    return res


def _linfit(xs, ys):
    """Least squares y = a + b x with a >= 0 (refit through the origin when a < 0)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if my - b * mx < 0:
        return 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return my - b * mx, b


def fit_link(comm: Dict) -> Link:
    """alpha/beta from W = 2 all-gathers (one step: t = alpha + beta n), p2p from W = 2 hops."""
    ag, ch = comm[2]["all_gather"], comm[2]["chain"]
    alpha, beta = _linfit(list(ag), list(ag.values()))
    p_alpha, p_beta = _linfit(list(ch), list(ch.values()))
    return Link("gloo loopback (fitted)", alpha, 1 / max(beta, 1e-15), p_alpha, 1 / max(p_beta, 1e-15))


def _shape(r: dict) -> Shape:
    elt = torch.tensor([], dtype=getattr(torch, r["dtype"])).element_size()
    return Shape(B=r["batch"], T=r["T_local"], H=r["heads"], K=r["dim"], V=r["dim"], Hkv=r["kv_heads"], elt=elt)


def _cost(r: dict, rate: float, link: Link, cores: int):
    slow = max(1.0, r["W"] / cores)
    strategy = "ideal" if r["baseline"] else r["strategy"].partition("@")[0]  # "ring@zigzag": --layout both
    layout = r.get("config_layout") or r["layout"]
    if r["suite"] == "linear":
        segs = 2 if layout == "zigzag" and r["W"] > 1 else 1
        s = _shape(r)
        # the block count the measured run used: the library's default for that state
        blocks = default_blocks(r["W"] * segs, s.B * s.H * s.K * s.V * 4, s.V) if strategy in LINEAR_STRATEGIES \
            and linear(strategy).pipelined else None
        return linear_layer(strategy, r["W"], s, rate / slow, link.scaled(slow), segs, blocks), slow
    return softmax_layer(strategy, r["W"], _shape(r), rate / slow, link.scaled(slow), layout), slow


def fit_compute(points: List[dict], link: Link, cores: int):
    """(rate, c0) of one configuration: t - exposed comm = FLOPs / rate + c0, in units of one
    unshared core (times divided by the core-sharing factor)."""
    rate = 1e10
    for _ in range(3):  # the exposed communication depends on the rate (overlap): iterate
        xs, ys = [], []
        for r in points:
            cost, slow = _cost(r, rate, link, cores)
            xs.append(cost.compute * rate / slow)  # FLOPs
            ys.append(max(r["time_s"] - cost.comm, 1e-9) / slow)
        c0, inv_rate = _linfit(xs, ys)
        if not inv_rate > 0:
            lens = ", ".join(f"T_local {r['T_local']}: {r['time_s'] * 1e3:.1f} ms" for r in points)
            raise ValueError(f"lasp2 plan --validate: suite {points[0]['suite']}, {points[0]['strategy']}: the measured "
                             f"time does not grow with the work ({lens}), so no compute rate can be fitted: the "
                             f"noise is larger than what these lengths differ by; bench longer sequences with more "
                             f"repeats (e.g. lasp2 bench --suite {points[0]['suite']} --seq-lens 2048 8192 32768 "
                             f"--repeats 9)")
        rate = 1 / inv_rate
    return rate, c0


def check_fit_input(records: List[dict]) -> None:
    """ValueError unless every suite can be fitted (two lengths per configuration at the smallest
    W) and has something held out to predict (a third length there, or a larger W)."""
    for suite in sorted({r["suite"] for r in records}):
        rs = [r for r in records if r["suite"] == suite]
        w0 = min(r["W"] for r in rs)
        held_out = any(r["W"] > w0 for r in rs)
        for config in dict.fromkeys(r["strategy"] for r in rs):
            lengths = sorted({r["T_global"] for r in rs if r["strategy"] == config and r["W"] == w0})
            if len(lengths) < 2:
                raise ValueError(f"lasp2 plan --validate: suite {suite}, {config} has records at {len(lengths)} "
                                 f"length(s) at W={w0} {lengths}; fitting its compute needs two lengths and checking "
                                 f"it a third: run lasp2 bench --suite {suite} with three or more --seq-lens "
                                 f"(e.g. 2048 8192 32768)")
            held_out |= len(lengths) >= 3
        if not held_out:
            raise ValueError(f"lasp2 plan --validate: suite {suite} has two lengths at W={w0} and no other W: both "
                             f"are needed to fit the model and nothing is left to predict (lasp2 bench --quick "
                             f"results are of this kind); add a third, longer --seq-lens or a larger "
                             f"--world-sizes (e.g. lasp2 bench --suite {suite} --world-sizes 2 4 --seq-lens 2048 "
                             f"8192 32768)")


def predict_record(r: dict, rate: float, c0: float, link: Link, cores: int) -> float:
    cost, slow = _cost(r, rate, link, cores)
    return cost.time + c0 * slow


def calibration_file(link: Link, rates: List[tuple], cores: int) -> dict:
    """A ``lasp2 plan --hardware FILE.json`` of this machine: the fitted compute rate per unshared
    core as its peak (mfu 1), the fitted collective link as both levels (one 'node' of ``cores``
    ranks), the fitted latencies and the median per-call overhead c0 as the knobs. Not measured
    here: memory bandwidth (10 GB/s assumed; only the optimizer term reads it) and p2p bandwidth
    (the collective one is used)."""
    rate = statistics.median(r for r, _ in rates)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"name": "this machine (gloo, fitted by lasp2 plan --validate)", "peak_flops": rate, "memory_bytes": mem,
            "hbm_bandwidth": 10e9, "nvlink_bandwidth": link.bandwidth, "inter_bandwidth": link.bandwidth,
            "gpus_per_node": cores, "source": "lasp2 plan --validate",
            "calibration": {"mfu": 1.0, "bandwidth_efficiency": 1.0, "nvlink_alpha_s": link.alpha,
                            "inter_alpha_s": link.alpha, "nvlink_hop_s": link.p2p_alpha, "inter_hop_s": link.p2p_alpha,
                            "step_overhead_s": statistics.median(c for _, c in rates), "reserved_bytes": 0.0}}


def validate(paths: List[Path], cores: int = None, save_calibration: Path = None) -> str:
    cores = cores or len(os.sched_getaffinity(0))
    records = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        records += [r for r in data["records"] if not r["skipped"]]
    if not records:
        raise ValueError("no measured records in " + ", ".join(map(str, paths)))
    check_fit_input(records)  # before the communication microbenchmarks: refuse early
    comm = measure_comm()
    link = fit_link(comm)
    from .report import hardware

    lines = ["## Validation of the cost model on this machine", "", f"Machine: {hardware()}. Measurements: "
             + ", ".join(map(str, paths)) + ".", "",
             f"Communication fitted from gloo all-gathers and single hops at W = 2 ({cores} cores, 1 thread "
             f"per rank): alpha = {link.alpha * 1e6:.0f} us, beta = 1 / ({link.bandwidth / 1e9:.2f} GB/s); "
             f"p2p_alpha = {link.p2p_alpha * 1e6:.0f} us, p2p_beta = 1 / ({link.p2p_bandwidth / 1e9:.2f} GB/s).",
             "", "### Communication at W = 4 (predicted from the W = 2 fit)", "",
             "| bytes/rank | all-gather measured (ms) | predicted (ms) | error | 3-hop chain measured (ms) "
             "| predicted (ms) | error |", "|---|---|---|---|---|---|---|"]
    link4 = link.scaled(max(1.0, 4 / cores))
    for n in SIZES:
        ag, ch = comm[4]["all_gather"][n], comm[4]["chain"][n]
        pa, pc = all_gather_time(4, 4 * n, link4), chain_time(4, n, link4)
        lines.append(f"| {n} | {ag * 1e3:.2f} | {pa * 1e3:.2f} | {pa / ag - 1:+.0%} | {ch * 1e3:.2f} | "
                     f"{pc * 1e3:.2f} | {pc / ch - 1:+.0%} |")
    summary, all_fits = [], []
    for suite in sorted({r["suite"] for r in records}):
        rs = [r for r in records if r["suite"] == suite]
        w0 = min(r["W"] for r in rs)
        fits, fitted = {}, set()
        for config in dict.fromkeys(r["strategy"] for r in rs):
            pts = sorted((r for r in rs if r["strategy"] == config and r["W"] == w0), key=lambda r: r["T_local"])
            pts = pts[:-1] if len(pts) >= 3 else pts
            if len(pts) < 2:
                raise ValueError(f"suite {suite}, {config}: need records at two lengths at W={w0} to fit compute")
            fits[config] = fit_compute(pts, link, cores)
            fitted |= {id(r) for r in pts}
        all_fits.append(fits)
        lines += ["", f"### Suite {suite}: compute per configuration, fitted at W={w0} on all lengths but the "
                  "longest", "", "| configuration | GFLOP/s per unshared core | c0 (ms) |", "|---|---|---|"]
        lines += [f"| {c} | {rate / 1e9:.2f} | {c0 * 1e3:.1f} |" for c, (rate, c0) in fits.items()]
        lines += ["", "| W | T global | strategy | measured (ms) | predicted (ms) | error |", "|---|---|---|---|---|---|"]
        errs = {"longest length, W=%d" % w0: [], "W > %d" % w0: []}
        for r in sorted(rs, key=lambda r: (r["W"], r["T_global"], r["strategy"])):
            pred = predict_record(r, *fits[r["strategy"]], link, cores)
            err = pred / r["time_s"] - 1
            if id(r) not in fitted:
                errs["longest length, W=%d" % w0 if r["W"] == w0 else "W > %d" % w0].append(abs(err))
            lines.append(f"| {r['W']} | {r['T_global']} | {r['strategy']} | {r['time_s'] * 1e3:.1f} | "
                         f"{pred * 1e3:.1f} | {err:+.1%}{' (fit point)' if id(r) in fitted else ''} |")
        for group, e in errs.items():
            if e:
                summary.append(f"- {suite}, held out ({group}): {len(e)} points, median |error| "
                               f"{statistics.median(e):.1%}, max {max(e):.1%}")
    if save_calibration:
        rates = [fit for suite_fits in all_fits for fit in suite_fits.values()]
        Path(save_calibration).write_text(json.dumps(calibration_file(link, rates, cores), indent=1) + "\n")
        summary.append(f"- calibration written to {save_calibration} (lasp2 plan --hardware {save_calibration})")
    return "\n".join(lines + ["", "### Summary", ""] + summary) + "\n"
