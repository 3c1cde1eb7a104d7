"""GPU suite for the fla backend: what lasp2 adds on top of fla's kernels at SP = 1.

    bash benchmarks/gpu_suite.sh             # one GPU, < 5 minutes: T = 8K..64K, H = 16, K = V = 128, bf16
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --smoke   # CPU: tiny shapes, checks the script runs

Per variant and sequence length T (B = 1), three configurations, fwd + bwd, interleaved repeat
by repeat (medians of CUDA-event timings; peak memory above the inputs):
  fla          fla's op called directly (the natural kernel: chunk_linear_attn(normalize=False),
               chunk_simple_gla, chunk_gla, chunk_delta_rule, chunk_gated_delta_rule)
  lasp2        ``lasp2.linear_attention(..., backend="fla")``: the public one-device path
  lasp2-local  lasp2's SP local path with the fla backend on a group of one rank
               (``linear_sp.LinearSPFunction`` with the ``lasp2`` exchange): the work every rank of
               an SP run does besides communication (summary, incoming-state term, G), i.e. the
               overhead of the SP machinery; for the delta rule this includes the [v | 0] widening
Ratios are t(config) / t(fla); each point also reports how closely the three outputs agree
(relative RMS vs fla's). Writes JSON + markdown (default benchmarks/results/gpu_suite.*).
On CPU (``--smoke``) the kernels run in the Triton interpreter: timings there mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("basic", "scalar", "channel", "deltanet", "gated_deltanet")
CONFIGS = ("fla", "lasp2", "lasp2-local")


def _inputs(variant, T, H, D, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    q, k, v = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
    g = beta = None
    if variant in ("scalar", "gated_deltanet"):
        g = F.logsigmoid(rnd(1, T, H) + 4.0)
    if variant == "channel":
        g = F.logsigmoid(rnd(1, T, H, D) + 4.0) / 16
    if variant in ("deltanet", "gated_deltanet"):
        k = F.normalize(k, dim=-1)
        beta = torch.sigmoid(rnd(1, T, H)).to(dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return [t if t is None else t.requires_grad_() for t in (q, k, v, g, beta)]


def _fla_direct(variant):
    from lasp2.ops.backends import fla as backend

    backend._fla()  # imports fla with lasp2's settings
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla

    def run(q, k, v, g, beta, scale):
        if variant == "basic":
            return chunk_linear_attn(q, k, v, scale=scale, normalize=False)[0]
        if variant == "scalar":
            return chunk_simple_gla(q, k, v, g=g, scale=scale)[0]
        if variant == "channel":
            return chunk_gla(q, k, v, g, scale=scale)[0]
        if variant == "deltanet":
            if q.dtype == torch.float32:  # fla's chunk_delta_rule refuses fp32 (the --smoke run)
                return chunk_gated_delta_rule(q, k, v, torch.zeros_like(beta, dtype=torch.float32), beta,
                                              scale=scale)[0]
            return chunk_delta_rule(q, k, v, beta, scale=scale)[0]
        return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)[0]
    return run


def _runners(variant, group):
    import lasp2
    from lasp2.parallel import agreement
    from lasp2.parallel.context import LinearCall
    from lasp2.parallel.layout import Layout
    from lasp2.parallel.linear_sp import LinearSPFunction
    from lasp2.parallel.strategies import linear

    direct = _fla_direct(variant)

    def local(q, k, v, g, beta, scale):
        call = LinearCall(group, Layout("contiguous", 1, q.shape[1]), scale, digest=agreement.call_digest("gpu-suite"),
                          backend="fla")
        return LinearSPFunction.apply(q, k, v, g, beta, call, linear("lasp2").exchange)

    return {"fla": direct,
            "lasp2": lambda q, k, v, g, beta, scale: lasp2.linear_attention(q, k, v, g, beta, scale=scale,
                                                                             backend="fla")[0],
            "lasp2-local": local}


def _measure(fn, leaves, do, device, scale):
    """(seconds, peak bytes above the current allocation, output) of one fwd + bwd."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    o = fn(*leaves, scale)
    torch.autograd.grad(o, [t for t in leaves if t is not None and t.requires_grad], do)
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated() - base, o.detach()
    return time.perf_counter() - t0, 0, o.detach()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="stop starting new points after this many seconds (the suite must fit in 5 minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (checks the script)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32  # the interpreter does not emulate bf16 faithfully
        args.seq_lens, args.heads, args.dim, args.repeats, args.warmup = [48], 2, 16, 1, 0
        from lasp2.ops.backends import interpret

        interpret.prepare(torch.empty(0))  # the direct fla calls need the interpreter compatibility too
    elif not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; run it on a machine with a GPU (or --smoke on CPU with "
              "TRITON_INTERPRET=1 to check the script)", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda", 0), torch.bfloat16
        torch.cuda.set_device(device)
    store = tempfile.mkdtemp(prefix="gpu-suite-")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}/rdzv",
                            rank=0, world_size=1)
    group = dist.group.WORLD
    t_start, rows, skipped = time.time(), [], []
    try:
        for variant in args.variants:
            runners = _runners(variant, group)
            for T in args.seq_lens:
                if time.time() - t_start > args.budget_s:
                    skipped.append(f"{variant} T={T}")
                    continue
                leaves = _inputs(variant, T, args.heads, args.dim, dtype, device)
                do = torch.randn(1, T, args.heads, args.dim, device=device, dtype=dtype)
                scale = args.dim ** -0.5
                times = {c: [] for c in CONFIGS}
                peaks = {c: 0 for c in CONFIGS}
                outputs = {}
                for rep in range(args.warmup + args.repeats):
                    for c in CONFIGS:  # interleaved: machine noise hits every config alike
                        t, peak, outputs[c] = _measure(runners[c], leaves, do, device, scale)
                        if rep >= args.warmup:
                            times[c].append(t)
                            peaks[c] = max(peaks[c], peak)
                ref = outputs["fla"].double()
                agree = max(((outputs[c].double() - ref).norm() / ref.norm()).item() for c in CONFIGS)
                del outputs
                med = {c: statistics.median(times[c]) for c in CONFIGS}
                rows.append({"variant": variant, "T": T, **{f"{c}_ms": 1e3 * med[c] for c in CONFIGS},
                             **{f"{c}_peak_MiB": peaks[c] / 2**20 for c in CONFIGS},
                             "lasp2_ratio": med["lasp2"] / med["fla"], "local_ratio": med["lasp2-local"] / med["fla"],
                             "output_rel_rms_vs_fla": agree})
                print(f"{variant:15s} T={T:6d}  fla {1e3 * med['fla']:8.2f} ms  lasp2 x{rows[-1]['lasp2_ratio']:.3f}"
                      f"  lasp2-local x{rows[-1]['local_ratio']:.3f}  outputs agree to {agree:.1e}", flush=True)
                del leaves, do
    finally:
        dist.destroy_process_group()
    _write(args, device, dtype, rows, skipped, time.time() - t_start)
    return 0


def _write(args, device, dtype, rows, skipped, elapsed):
    import triton

    import fla

    meta = {"command": " ".join(sys.argv), "torch": torch.__version__, "triton": triton.__version__,
            "fla": getattr(fla, "__version__", "?"), "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu (Triton interpreter: timings meaningless)", "dtype": str(dtype),
            "H": args.heads, "K=V": args.dim, "repeats": args.repeats, "warmup": args.warmup,
            "elapsed_s": round(elapsed, 1), "skipped (time budget)": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_suite_smoke" if args.smoke else "gpu_suite"
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# fla backend at SP = 1 ({meta['device']})", "", "`" + meta["command"] + "`", "",
             f"torch {meta['torch']}, triton {meta['triton']}, fla {meta['fla']}, {meta['dtype']}, B=1, "
             f"H={args.heads}, K=V={args.dim}; fwd+bwd, median of {args.repeats} (CUDA events), configs interleaved; "
             "peak = max memory allocated above the inputs.", "",
             "| variant | T | fla ms | lasp2 ms (x) | lasp2-local ms (x) | fla MiB | lasp2 MiB | lasp2-local MiB "
             "| output rel. RMS vs fla |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['T']} | {r['fla_ms']:.2f} | {r['lasp2_ms']:.2f} ({r['lasp2_ratio']:.3f}) | "
                     f"{r['lasp2-local_ms']:.2f} ({r['local_ratio']:.3f}) | {r['fla_peak_MiB']:.0f} | "
                     f"{r['lasp2_peak_MiB']:.0f} | {r['lasp2-local_peak_MiB']:.0f} | {r['output_rel_rms_vs_fla']:.1e} |")
    if skipped:
        lines += ["", f"Not run (time budget): {', '.join(skipped)}"]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / name}.json and .md ({elapsed:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
