"""Single-device chunked linear attention: fwd+bwd time and peak memory vs the quadratic form.

    python benchmarks/bench_chunk.py            # the README numbers (a few minutes)
    python benchmarks/bench_chunk.py --quick    # tiny sizes, seconds

Every measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is
its own; the reported memory is the peak minus the RSS right after the inputs were created.
The chunked op runs at several T (memory must grow linearly); the baseline is the masked
quadratic form o = ((q k^T) * D) v with the full [T, T] decay matrix D, at a shorter T, in the
same run. Every point runs twice: with glibc's malloc as it comes and with
``lasp2.cpu_allocator.tune_cpu_allocator()`` (large tensors stay on the heap instead of a fresh
mmap per allocation). Medians over repeats after one warm-up. Writes
benchmarks/results/chunk.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lasp2.bench.report import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def quadratic_scalar_gate(q, k, v, g, scale):
    """o_i = scale * sum_{j <= i} (q_i . k_j) exp(G_i - G_j) v_j with [T, T] matrices."""
    G = g.cumsum(1).transpose(1, 2)  # [B, H, T]
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    diff = torch.where(mask, G[..., :, None] - G[..., None, :], torch.tensor(float("-inf")))
    A = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * diff.exp() * scale
    return (A @ v.transpose(1, 2)).transpose(1, 2)


def _run_once(op: str, q, k, v, g, D: int) -> None:
    import lasp2

    if op == "chunk":
        o, _ = lasp2.linear_attention(q, k, v, g)
    else:
        o = quadratic_scalar_gate(q, k, v, g, D ** -0.5)
    o.sum().backward()


def measure(op: str, T: int, H: int, D: int, repeats: int, threads: int, allocator: str) -> dict:
    """Runs inside the subprocess: returns median fwd+bwd seconds and peak memory in MB."""
    from lasp2.cpu_allocator import tune_cpu_allocator

    if allocator == "tuned" and not tune_cpu_allocator():
        raise RuntimeError("could not tune the allocator (not glibc?): run with --allocators default")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, generator=gen).requires_grad_() for _ in range(3))
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen) + 4).requires_grad_()
    _run_once(op, *(x[:, :64].detach().requires_grad_() for x in (q, k, v, g)), D)  # load kernels
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        _run_once(op, q, k, v, g, D)
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = g.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"op": op, "T": T, "allocator": allocator, "seconds": statistics.median(times), "all_seconds": times,
            "peak_mem_mb": (peak - base_rss) / 1024}


def run_isolated(op: str, T: int, allocator: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", op, str(T), "--heads", str(args.heads), "--dim", str(args.dim),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--allocators", allocator]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc defaults unless tuned
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--chunk-lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--quadratic-length", type=int, default=8192)
    p.add_argument("--allocators", nargs="+", choices=("default", "tuned"), default=["default", "tuned"],
                   help="glibc malloc as it comes, and/or with lasp2.cpu_allocator.tune_cpu_allocator()")
    p.add_argument("--child", nargs=2, metavar=("OP", "T"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the results (default benchmarks/results; --quick writes only with --out)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.heads, args.dim, args.repeats,
                                 args.threads, args.allocators[0])))
        return
    if args.quick:
        args.chunk_lengths, args.quadratic_length, args.repeats = [512, 1024], 512, 2
    rows = []
    points = [("chunk", T) for T in args.chunk_lengths] + [("quadratic", args.quadratic_length)]
    for allocator in args.allocators:
        for op, T in points:
            print(f"{op:<9} T={T:>6} allocator {allocator:<7} ...", end=" ", flush=True)
            rows.append(run_isolated(op, T, allocator, args))
            print(f"{rows[-1]['seconds']:.3f} s, {rows[-1]['peak_mem_mb']:.0f} MB")
    meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": args.threads, "config": {"B": 1, "H": args.heads, "K": args.dim, "V": args.dim,
                                                "dtype": "float32", "gate": "scalar", "repeats": args.repeats}}
    out = args.out or (None if args.quick else RESULTS)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunk.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Chunked linear attention, fwd+bwd ({meta['command']})", "",
             f"torch {meta['torch']}, {meta['cores']} cores, {args.threads} threads; B=1, H={args.heads}, "
             f"K=V={args.dim}, fp32, scalar gate; median of {args.repeats} after a warm-up. Allocator "
             f"'default': glibc malloc as it comes; 'tuned': lasp2.cpu_allocator.tune_cpu_allocator() "
             f"(what --tuned-allocator of lasp2 train and lasp2 bench applies).", "",
             "| op | T | allocator | fwd+bwd (s) | peak memory (MB) | MB per 1K tokens |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['T']} | {r['allocator']} | {r['seconds']:.3f} | {r['peak_mem_mb']:.0f} | "
                     f"{r['peak_mem_mb'] / r['T'] * 1024:.1f} |")
    (out / "chunk.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
