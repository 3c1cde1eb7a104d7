"""Weak scaling of sequence-parallel linear attention on this machine.

    python benchmarks/bench_linear_sp.py           # the README numbers (a few minutes)
    python benchmarks/bench_linear_sp.py --quick   # tiny sizes, seconds

Baseline: one process, 1 thread, fwd+bwd of ``linear_attention`` on T_local tokens (the ideal:
each rank doing only its own share). Then W ranks, 1 thread each, on W * T_local tokens:
every registered strategy (``lasp2.parallel.strategies``) and ``lasp2`` without overlap. Efficiency = t(baseline) / t(SP), where t(SP) is
the slowest rank's median fwd+bwd time; "vs no-SP ranks" divides by ideal-concurrent instead. ``ideal-concurrent`` runs the one-device op on every
rank at once without communication: the gap between it and the single process is the cost of
W processes sharing this machine's cores, caches and memory bandwidth, and the gap between it
and lasp2 is what the algorithm itself costs. Every configuration runs in the same invocation and
the configurations are interleaved round by round (each round starting at the next one) so
that machine noise and order effects hit them alike.
Peak memory per rank is ru_maxrss of one fwd+bwd above the RSS after inputs were built, each
configuration in its own fresh processes, relative to the single process measured the same way. Writes benchmarks/results/linear_sp.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lasp2.bench.report import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
from lasp2.parallel.strategies import LINEAR_STRATEGIES  # noqa: E402

# Every registered strategy, LASP-2 without overlap (ablation), and the ranks without SP.
CONFIGS = (*LINEAR_STRATEGIES, "lasp2-no-overlap", "ideal-concurrent")


def _inputs(T: int, H: int, D: int, seed: int, delta: bool) -> tuple:
    """(q, k, v, g) with a scalar gate, or with ``delta`` (q, k, v, g, beta) for Gated DeltaNet
    (unit-norm keys, as the DeltaNet layers feed the op). Leaves that require grad."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, T, H, D, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen) + 4)
    xs = (q, F.normalize(k, dim=-1) if delta else k, v, g)
    if delta:
        xs += (torch.sigmoid(torch.randn(1, T, H, generator=gen)),)
    return tuple(t.requires_grad_() for t in xs)


def _sp_step(config: str, xs: tuple, group):
    import lasp2
    from lasp2.parallel import strategies
    from lasp2.parallel.context import LinearCall
    from lasp2.parallel.layout import Layout
    from lasp2.parallel.linear_sp import LinearSPFunction

    if config == "ideal-concurrent":
        # Every rank runs the one-device op on its own shard at the same time, with no
        # communication: what the ranks would take if sharing the machine were the only cost.
        o, _ = lasp2.linear_attention(*xs)
    elif config == "lasp2-no-overlap":
        # The public function always overlaps; the ablation calls the autograd.Function with
        # overlap=False (same code, the gather is waited for before the intra-chunk work).
        q, k, v, g, beta = (*xs, None)[:5]
        layout = Layout("contiguous", dist.get_world_size(group), q.shape[1])
        call = LinearCall(group, layout, q.shape[-1] ** -0.5, overlap=False)
        o = LinearSPFunction.apply(q, k, v, g, beta, call, strategies.linear("lasp2").exchange)
    else:
        o = lasp2.sp_linear_attention(*xs, group=group, strategy=config)
    o.sum().backward()


def _clear_grads(xs: tuple) -> None:
    for t in xs:
        t.grad = None


def _peak_main(config: str, T_local: int, H: int, D: int, delta: bool) -> float:
    """Peak resident memory (MB) of one fwd+bwd of ``config`` above the RSS after the inputs
    were built, in a fresh process (ru_maxrss only grows, so each config gets its own)."""
    import lasp2

    rank = dist.get_rank() if dist.is_initialized() else 0
    xs = _inputs(T_local, H, D, rank, delta)
    # A tiny warm-up first, so that one-time costs (libraries, gloo buffers) are not counted.
    small = tuple(t[:, :64].detach().requires_grad_() for t in xs)
    if config == "single-process":
        lasp2.linear_attention(*small)[0].sum().backward()
    else:
        _sp_step(config, small, dist.group.WORLD)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if config == "single-process":
        o, _ = lasp2.linear_attention(*xs)
        o.sum().backward()
    else:
        _sp_step(config, xs, dist.group.WORLD)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def _rank_main(T_local: int, H: int, D: int, repeats: int, delta: bool):
    """One SP rank: returns {config: [seconds per repeat]}."""
    group = dist.group.WORLD
    xs = _inputs(T_local, H, D, dist.get_rank(), delta)
    times = {c: [] for c in CONFIGS}
    cpu = {c: [] for c in CONFIGS}  # this process's CPU seconds (all its threads) per call
    for i in range(repeats + 1):
        # Round i runs every configuration once, starting at a different one each round, so
        # that drift of the shared machine and order effects hit every configuration alike.
        for c in CONFIGS[i % len(CONFIGS):] + CONFIGS[:i % len(CONFIGS)]:
            dist.barrier(group)
            t0, c0 = time.perf_counter(), time.process_time()
            _sp_step(c, xs, group)
            if i:
                times[c].append(time.perf_counter() - t0)
                cpu[c].append(time.process_time() - c0)
            _clear_grads(xs)
    return {"times": times, "cpu": cpu}


def _baseline_main(T_local: int, H: int, D: int, repeats: int, delta: bool):
    import lasp2

    xs = _inputs(T_local, H, D, 0, delta)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        o, _ = lasp2.linear_attention(*xs)
        o.sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
        _clear_grads(xs)
    return {"times": times}


def _set_allocator(allocator: str) -> None:
    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        del os.environ[name]
    if allocator == "tuned":
        from lasp2.cpu_allocator import tune_cpu_allocator

        if not tune_cpu_allocator():
            raise SystemExit("could not tune the allocator (not glibc?): run with --allocators default")


def _measure(spawn, args, allocator: str) -> list:
    """Baseline and every SP configuration with one allocator setting; rows for the report."""
    # The baseline runs in its own spawned process with 1 thread, exactly like a rank, once
    # before and once after the SP runs (the machine's speed drifts; its samples are pooled).
    def baseline_times() -> list:
        return spawn(_baseline_main, 1, args.local_len, args.heads, args.dim, args.repeats, args.delta,
                     threads_per_rank=1)[0]["times"]

    base_times = baseline_times()
    base_peak = float("nan") if args.no_memory else spawn(
        _peak_main, 1, "single-process", args.local_len, args.heads, args.dim, args.delta, threads_per_rank=1)[0]
    rows, sp_runs = [], {}
    for W in args.world_size:
        sp_runs[W] = spawn(_rank_main, W, args.local_len, args.heads, args.dim, args.repeats, args.delta,
                           threads_per_rank=1)
    base_times += baseline_times()
    t_base = statistics.median(base_times)
    print(f"[{allocator} allocator] single process, T={args.local_len}: {t_base:.3f} s, peak {base_peak:.0f} MB")
    rows.append({"allocator": allocator, "config": "single-process", "W": 1, "T_global": args.local_len,
                 "seconds": t_base, "efficiency": 1.0, "vs_no_sp_ranks": float("nan"), "cpu_seconds": float("nan"),
                 "cpu_vs_no_sp_ranks": float("nan"), "peak_mem_mb": base_peak, "mem_ratio": 1.0})
    for W, ranks in sp_runs.items():
        for c in CONFIGS:
            per_rank = [statistics.median(r["times"][c]) for r in ranks]
            t = max(per_rank)
            peak = float("nan") if args.no_memory else max(spawn(
                _peak_main, W, c, args.local_len, args.heads, args.dim, args.delta, threads_per_rank=1))
            # vs the same W ranks without SP, measured in the same rounds (interleaved)
            t_nosp = max(statistics.median(r["times"]["ideal-concurrent"]) for r in ranks)
            # CPU seconds per call (max over ranks): what the rank computed, whatever else ran on
            # the machine; the wall-clock ratios on a shared machine also measure the neighbours.
            cpu_c = max(statistics.median(r["cpu"][c]) for r in ranks)
            cpu_nosp = max(statistics.median(r["cpu"]["ideal-concurrent"]) for r in ranks)
            rows.append({"allocator": allocator, "config": c, "W": W, "T_global": W * args.local_len,
                         "seconds": t, "per_rank_seconds": per_rank, "efficiency": t_base / t,
                         "vs_no_sp_ranks": t_nosp / t, "cpu_seconds": cpu_c, "cpu_vs_no_sp_ranks": cpu_nosp / cpu_c,
                         "peak_mem_mb": peak, "mem_ratio": peak / base_peak})
            print(f"[{allocator} allocator] W={W} {c:>17}: {t:.3f} s, efficiency {t_base / t:.3f}, "
                  f"vs no-SP ranks {t_nosp / t:.3f} (CPU {cpu_nosp / cpu_c:.3f}), peak/rank {peak:.0f} MB")
    return rows


def main() -> None:
    from lasp2.launch import spawn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--world-size", type=int, nargs="+", default=[2])
    p.add_argument("--local-len", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--name", help="results file name (default linear_sp, or linear_sp_delta with --delta)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory pass (time only)")
    p.add_argument("--note", default="", help="a line for the report (e.g. what else ran on the machine)")
    p.add_argument("--allocators", nargs="+", choices=("default", "tuned"), default=["default", "tuned"],
                   help="glibc malloc as it comes, and/or with lasp2.cpu_allocator.tune_cpu_allocator()")
    p.add_argument("--delta", action="store_true",
                   help="Gated DeltaNet (beta, scalar gate, unit-norm keys) instead of the scalar-gate "
                        "diagonal variant; writes linear_sp_delta.{json,md}")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the results (default benchmarks/results; --quick writes only with --out)")
    args = p.parse_args()
    if args.quick:
        args.local_len, args.repeats = 1024, 2
    rows = []
    for allocator in args.allocators:
        _set_allocator(allocator)  # spawned processes read glibc's MALLOC_* settings at start-up
        rows += _measure(spawn, args, allocator)
    out = args.out or (None if args.quick else RESULTS)
    if out is None:
        return
    variant = "Gated DeltaNet (beta, scalar gate)" if args.delta else "scalar gate"
    meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "config": {"T_local": args.local_len, "H": args.heads, "K": args.dim, "V": args.dim,
                       "dtype": "float32", "variant": variant, "threads_per_rank": 1, "repeats": args.repeats}}
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("linear_sp_delta" if args.delta else "linear_sp")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Sequence-parallel linear attention, weak scaling ({meta['command']})", "",
             f"torch {meta['torch']}, {meta['cores']} cores; T_local={args.local_len}, H={args.heads}, "
             f"K=V={args.dim}, fp32, {variant}, 1 thread per rank; median of {args.repeats} "
             f"(slowest rank). Allocator 'default': glibc malloc as it comes; 'tuned': "
             f"lasp2.cpu_allocator.tune_cpu_allocator() (what --tuned-allocator of lasp2 train and lasp2 bench applies); efficiency "
             f"and memory are relative to the single process with the same allocator; 'vs no-SP ranks' is "
             f"ideal-concurrent's time over the configuration's, both from the same interleaved rounds, in "
             f"wall-clock seconds and in CPU seconds of the rank's process (median per call, slowest rank). "
             f"{args.note}", "",
             "| allocator | config | W | T_global | fwd+bwd (s) | efficiency | vs no-SP ranks | CPU s/call "
             "| CPU vs no-SP ranks | peak MB/rank | memory vs single |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['allocator']} | {r['config']} | {r['W']} | {r['T_global']} | {r['seconds']:.3f} | "
                     f"{r['efficiency']:.3f} | {r['vs_no_sp_ranks']:.3f} | {r['cpu_seconds']:.3f} | "
                     f"{r['cpu_vs_no_sp_ranks']:.3f} | {r['peak_mem_mb']:.0f} | {r['mem_ratio']:.2f}x |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
