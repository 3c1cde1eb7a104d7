"""Chunked DeltaNet / Gated DeltaNet (ops/delta.py) vs the per-token recurrence (ops/naive.py).

    python benchmarks/bench_delta.py            # the README numbers (a few minutes on 2 cores)
    python benchmarks/bench_delta.py --quick    # tiny sizes, seconds; writes nothing
    python benchmarks/bench_delta.py --threads 1   # on a shared, loaded box (the stored results)

On a box whose cores other tenants also load, 2 OpenMP threads made every small op (and so the
per-token recurrence most of all) 10-25x slower than 1 thread; compare runs at equal threads only.

fwd+bwd (loss = o.sum() + final_state.sum()) of the chunked op at a long T and of the per-token
recurrence at a shorter T, in the same process and run, fp32, B=1, L2-normalised keys,
beta = sigmoid(x), g = logsigmoid(x + 4) for the gated variant. The chunked op also runs at the
recurrence's T so that one ratio compares equal work. Medians over repeats after one warm-up;
the configurations of a variant run interleaved, round by round (shared machines are noisy).
Writes benchmarks/results/delta.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lasp2.ops.delta import delta_linear_attention  # noqa: E402
from lasp2.bench.report import cpu_model  # noqa: E402
from lasp2.ops.naive import naive_linear_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPS = {"chunk": delta_linear_attention, "recurrence": naive_linear_attention}


def make_inputs(T: int, H: int, D: int, gated: bool):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, H, D, generator=gen)
    k = F.normalize(torch.randn(1, T, H, D, generator=gen), dim=-1)
    v = torch.randn(1, T, H, D, generator=gen)
    beta = torch.randn(1, T, H, generator=gen).sigmoid()
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen) + 4) if gated else None
    return [x if x is None else x.requires_grad_() for x in (q, k, v, g, beta)]


def fwd_bwd(op: str, inputs, D: int) -> None:
    q, k, v, g, beta = inputs
    o, ht = OPS[op](q, k, v, g, beta, scale=D ** -0.5, output_final_state=True)
    (o.sum() + ht.sum()).backward()


def measure_interleaved(variant: str, plan, H: int, D: int) -> list:
    """plan: [(op, T, repeats)]. One warm-up each, then rounds that run every configuration once
    (while it still has repeats left), so load changes on a shared machine hit all of them alike."""
    inputs = {(op, T): make_inputs(T, H, D, variant == "gated_delta") for op, T, _ in plan}
    times = {(op, T): [] for op, T, _ in plan}
    for round_ in range(max(r for _, _, r in plan) + 1):
        for op, T, reps in plan:
            if round_ > reps:
                continue
            t0 = time.perf_counter()
            fwd_bwd(op, inputs[op, T], D)
            if round_:  # round 0 is the warm-up
                times[op, T].append(time.perf_counter() - t0)
            for x in inputs[op, T]:
                if x is not None:
                    x.grad = None
    rows = []
    for op, T, _ in plan:
        sec = statistics.median(times[op, T])
        rows.append({"op": op, "variant": variant, "T": T, "seconds": sec, "tokens_per_s": T / sec,
                     "all_seconds": times[op, T]})
    return rows



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run), writes nothing")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk-length", type=int, default=16384)
    p.add_argument("--recurrence-length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recurrence-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--variants", nargs="+", default=["delta", "gated_delta"], choices=["delta", "gated_delta"])
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the results (default benchmarks/results; --quick writes only with --out)")
    args = p.parse_args()
    if args.quick:
        args.chunk_length, args.recurrence_length, args.repeats, args.recurrence_repeats = 512, 128, 2, 1
    torch.set_num_threads(args.threads)
    rows = []
    plan = [("chunk", args.chunk_length, args.repeats), ("chunk", args.recurrence_length, args.repeats),
            ("recurrence", args.recurrence_length, args.recurrence_repeats)]
    for variant in args.variants:
        rows += measure_interleaved(variant, plan, args.heads, args.dim)
        for r in rows[-len(plan):]:
            print(f"{variant:<12} {r['op']:<10} T={r['T']:>6}: {r['seconds']:.3f} s, "
                  f"{r['tokens_per_s']:.0f} tokens/s", flush=True)
    for variant in args.variants:
        by = {(r["op"], r["T"]): r for r in rows if r["variant"] == variant}
        rec = by[("recurrence", args.recurrence_length)]
        for r in (by[("chunk", args.chunk_length)], by[("chunk", args.recurrence_length)]):
            r["speedup_tokens_per_s_vs_recurrence"] = r["tokens_per_s"] / rec["tokens_per_s"]
    meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": args.threads, "load_average_at_end": os.getloadavg(),
            "config": {"B": 1, "H": args.heads, "K": args.dim, "V": args.dim, "dtype": "float32",
                       "chunk_size": 64, "repeats": args.repeats,
                       "recurrence_repeats": args.recurrence_repeats,
                       "loss": "o.sum() + final_state.sum()"}}
    lines = [f"# Chunked DeltaNet / Gated DeltaNet, fwd+bwd (`{meta['command']}`)", "",
             f"torch {meta['torch']}, CPU {meta['cpu']}, {meta['cores']} cores, {args.threads} threads "
             f"(load average at the end {meta['load_average_at_end'][0]:.1f}); B=1, H={args.heads}, "
             f"K=V={args.dim}, fp32, chunk 64; median of {args.repeats} (recurrence: "
             f"{args.recurrence_repeats}) after a warm-up; both ops in the same run, interleaved "
             f"round by round.", "",
             "| variant | op | T | fwd+bwd (s) | tokens/s | tokens/s vs recurrence |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("speedup_tokens_per_s_vs_recurrence")
        lines.append(f"| {r['variant']} | {r['op']} | {r['T']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{'1.0' if ratio is None else f'{ratio:.1f}'} |")
    print("\n".join(lines))
    out = args.out or (None if args.quick else RESULTS)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "delta.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "delta.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
