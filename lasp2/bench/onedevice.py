"""The one-device suites of ``lasp2 bench``, public APIs only:

- ``ops``: ``lasp2.linear_attention`` (the chunked op) on CPU against a one-device baseline in
  the same run: the masked quadratic form ``((q k^T) * decay) v`` for the basic and scalar-gate variants,
  the per-token recurrence for the others. The chunked op runs at every ``--seq-lens`` T and at
  the baseline's length ``--baseline-len`` (equal work for one ratio); peak memory per point
  shows the chunked op's linear growth against the quadratic form's [T, T] matrices.
- ``gpu``: the fla backend at SP = 1 against fla's own op called directly (``fla``):
  ``lasp2.linear_attention(backend="fla")`` (``linear_attention``) and
  ``lasp2.sp_linear_attention`` on a group of one rank (``sp_linear_attention``: the work every
  rank of an SP run does besides communication). On CUDA (one rank started by ``lasp2.launch.spawn``, NCCL); on CPU only under
  ``TRITON_INTERPRET=1`` (a smoke run: timings there mean nothing). Each point also reports how
  closely the outputs agree (relative RMS against fla's).

Every point runs fwd + bwd (output gradient ``do``); the configurations of a variant run in the
same process, interleaved round by round in a rotating order after ``warmup`` untimed calls;
time = median of ``repeats`` (CUDA events on a GPU). Peak memory is measured in a separate pass
as the SP harness does (:mod:`.harness`): CUDA's allocator peak, or sampled RSS on CPU, above
what was allocated before the call.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .inputs import VARIANTS, make_inputs

OPS_DEFAULT_VARIANTS = ("scalar", "deltanet", "gated_deltanet")
GPU_CONFIGS = ("fla", "linear_attention", "sp_linear_attention")
SIZES = {  # (full, --quick) per suite; the gpu quick sizes on CPU are the interpreter's smoke sizes
    "ops": (dict(seq_lens=(8192, 16384, 32768), baseline_len=2048, heads=8, dim=64, repeats=5, warmup=1),
            dict(seq_lens=(512, 1024), baseline_len=128, heads=2, dim=32, repeats=2, warmup=1)),
    "gpu": (dict(seq_lens=(8192, 16384, 32768, 65536), baseline_len=0, heads=16, dim=128, repeats=5, warmup=2),
            dict(seq_lens=(48,), baseline_len=0, heads=2, dim=16, repeats=1, warmup=0)),
}


@dataclass(frozen=True)
class LocalSpec:
    suite: str  # "ops" or "gpu"
    variants: Tuple[str, ...]
    seq_lens: Tuple[int, ...]
    baseline_len: int  # ops: the quadratic form's / recurrence's T
    heads: int
    dim: int
    dtype: str
    backend: str  # ops: lasp2.linear_attention's backend
    repeats: int
    warmup: int
    threads: Optional[int] = None
    budget_s: Optional[float] = None  # gpu: start no new point after this many seconds


def baseline_name(variant: str) -> str:
    return "quadratic" if variant in ("basic", "scalar") else "recurrence"


def quadratic(q, k, v, g, beta, scale):
    """o_i = scale sum_{j <= i} (q_i . k_j) exp(G_i - G_j) v_j with [T, T] matrices (G = cumsum g)."""
    T = q.shape[1]
    A = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * scale
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if g is None:
        A = A.masked_fill(~mask, 0)
    else:
        G = g.cumsum(1).transpose(1, 2)  # [B, H, T]
        A = A * torch.where(mask, G[..., :, None] - G[..., None, :], float("-inf")).exp()
    return (A @ v.transpose(1, 2)).transpose(1, 2)


def recurrence(q, k, v, g, beta, scale):
    """The per-token recurrence S_t = a_t S_{t-1} + k_t u_t^T, o_t = scale S_t^T q_t, where a_t is
    exp(g_t) (a scalar or per key channel) and u_t = v_t, or beta_t (v_t - S^T k_t) for the delta rule."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    out = []
    for t in range(T):
        if g is not None:
            a = g[:, t].float().exp()
            S = S * (a[..., None, None] if a.dim() == 2 else a[..., None])
        kt, vt = k[:, t].float(), v[:, t].float()
        u = vt if beta is None else beta[:, t, :, None].float() * (vt - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt[..., None] * u[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float() * scale, S))
    return torch.stack(out, 1).to(q.dtype)


def _fla_direct(variant: str):
    """fla's own op for the variant (imported after lasp2's fla backend ran once, so that on CPU
    the interpreter compatibility lasp2 applies is in place for these calls too)."""
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.kda import chunk_kda
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
            if q.dtype == torch.float32:  # fla's chunk_delta_rule refuses fp32 (the CPU smoke run)
                return chunk_gated_delta_rule(q, k, v, torch.zeros_like(beta, dtype=torch.float32), beta,
                                              scale=scale)[0]
            return chunk_delta_rule(q, k, v, beta, scale=scale)[0]
        if variant == "kda":
            return chunk_kda(q, k, v, g, beta, scale=scale)[0]
        return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)[0]
    return run


def _timer(device):
    """start() -> stop() -> seconds: CUDA events on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        def start():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()

            def stop():
                e.record()
                torch.cuda.synchronize(device)
                return s.elapsed_time(e) / 1e3
            return stop
        return start

    def start_cpu():
        t0 = time.perf_counter()
        return lambda: time.perf_counter() - t0
    return start_cpu


def _fwd_bwd(fn, leaves, do, scale):
    o = fn(*leaves, scale)
    torch.autograd.grad(o, [t for t in leaves if t is not None and t.requires_grad], do)
    return o.detach()


def measure(points: List[Tuple[str, Callable, list, torch.Tensor]], spec: LocalSpec, device) -> Dict[str, dict]:
    """points: (name, fn, leaves, do). Interleaved timing, then one memory pass; {name: result}."""
    from .rss import RssPeak, libc_or_none

    scale = spec.dim ** -0.5
    start = _timer(device)
    times = {name: [] for name, *_ in points}
    outputs = {}
    for rep in range(spec.warmup + spec.repeats):
        k = rep % len(points)
        for name, fn, leaves, do in points[k:] + points[:k]:
            stop = start()
            outputs[name] = _fwd_bwd(fn, leaves, do, scale)
            seconds = stop()
            if rep >= spec.warmup:
                times[name].append(seconds)
    res = {name: {"times": times[name], "output": outputs[name]} for name in times}
    libc = libc_or_none() if device.type != "cuda" else None
    for name, fn, leaves, do in points:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            _fwd_bwd(fn, leaves, do, scale)
            torch.cuda.synchronize(device)
            res[name].update(peak_mem_mb=(torch.cuda.max_memory_allocated(device) - before) / 2**20,
                             mem_method="cuda max_memory_allocated")
            continue
        if libc is not None:
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: freed tensors leave the RSS
            libc.malloc_trim(0)
        with RssPeak() as peak:
            _fwd_bwd(fn, leaves, do, scale)
        res[name].update(peak_mem_mb=peak.mb, mem_method="sampled RSS")
    return res


def _record(spec, variant, config, T, r, baseline) -> dict:
    sec = statistics.median(r["times"])
    return {"suite": spec.suite, "variant": variant, "config": config, "T": T, "baseline": baseline,
            "time_s": sec, "tokens_per_s": T / sec, "times_s": r["times"], "peak_mem_mb": r["peak_mem_mb"],
            "mb_per_1k_tokens": r["peak_mem_mb"] / T * 1024, "mem_method": r["mem_method"]}


def run_ops(spec: LocalSpec, progress: bool = True) -> Tuple[List[dict], dict]:
    """In this process: the chunked op at every length and the variant's baseline."""
    import lasp2

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device, dtype = torch.device("cpu"), getattr(torch, spec.dtype)
    chunked = lambda q, k, v, g, beta, scale: lasp2.linear_attention(  # noqa: E731
        q, k, v, g, beta, scale=scale, backend=spec.backend)[0]
    records = []
    for variant in spec.variants:
        base = baseline_name(variant)
        lengths = sorted(set(spec.seq_lens) | {spec.baseline_len})
        points = [(f"chunked T={T}", chunked, *make_inputs(variant, T, spec.heads, spec.dim, dtype, device))
                  for T in lengths]
        points.append((f"{base} T={spec.baseline_len}", quadratic if base == "quadratic" else recurrence,
                       *make_inputs(variant, spec.baseline_len, spec.heads, spec.dim, dtype, device)))
        res = measure(points, spec, device)
        recs = [_record(spec, variant, "chunked", T, res[f"chunked T={T}"], False) for T in lengths]
        recs.append(_record(spec, variant, base, spec.baseline_len, res[points[-1][0]], True))
        for r in recs:
            r["tokens_per_s_vs_baseline"] = r["tokens_per_s"] / recs[-1]["tokens_per_s"]
        # the two ops agree at the baseline's length (a check that the comparison is fair)
        a, b = res[f"chunked T={spec.baseline_len}"]["output"], res[points[-1][0]]["output"]
        recs[-1]["output_rel_rms_vs_chunked"] = ((b.double() - a.double()).norm() / a.double().norm()).item()
        records += recs
        if progress:
            print(f"{variant}: " + ", ".join(f"{r['config']} T={r['T']} {r['time_s'] * 1e3:.1f} ms" for r in recs),
                  flush=True)
    return records, {"threads": torch.get_num_threads()}


def _gpu_rank(spec: LocalSpec, progress: bool) -> Tuple[List[dict], dict]:
    """Rank 0 of a one-rank group (``lasp2.launch.spawn``): every variant and length."""
    import torch.distributed as dist

    import lasp2

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype, group = getattr(torch, spec.dtype), dist.group.WORLD
    warm = make_inputs("scalar", 64, 1, 16, dtype, device)[0]
    lasp2.linear_attention(*warm, backend="fla")  # imports fla with lasp2's settings (CPU: the interpreter's)
    t_start, records, skipped = time.time(), [], []
    for variant in spec.variants:
        runners = {"fla": _fla_direct(variant),
                   "linear_attention": lambda q, k, v, g, beta, scale: lasp2.linear_attention(
                       q, k, v, g, beta, scale=scale, backend="fla")[0],
                   "sp_linear_attention": lambda q, k, v, g, beta, scale: lasp2.sp_linear_attention(
                       q, k, v, g, beta, group=group, scale=scale, backend="fla")}  # the default strategy
        for T in spec.seq_lens:
            if spec.budget_s is not None and time.time() - t_start > spec.budget_s:
                skipped.append(f"{variant} T={T}")
                continue
            leaves, do = make_inputs(variant, T, spec.heads, spec.dim, dtype, device)
            res = measure([(c, runners[c], leaves, do) for c in GPU_CONFIGS], spec, device)
            ref = res["fla"]["output"].double()
            recs = [_record(spec, variant, c, T, res[c], c == "fla") for c in GPU_CONFIGS]
            for r in recs:
                r["time_vs_fla"] = r["time_s"] / recs[0]["time_s"]
                r["output_rel_rms_vs_fla"] = ((res[r["config"]]["output"].double() - ref).norm() / ref.norm()).item()
            records += recs
            if progress:
                print(f"{variant} T={T}: fla {recs[0]['time_s'] * 1e3:.2f} ms, " + ", ".join(
                    f"{r['config']} x{r['time_vs_fla']:.3f}" for r in recs[1:]), flush=True)
            del leaves, do, res
    import triton

    import fla

    return records, {"device": torch.cuda.get_device_name(device) if cuda else
                     "cpu (Triton interpreter: timings mean nothing)", "triton": triton.__version__,
                     "fla": getattr(fla, "__version__", "?"), "skipped (time budget)": skipped,
                     "elapsed_s": round(time.time() - t_start, 1)}


def run_gpu(spec: LocalSpec, progress: bool = True) -> Tuple[List[dict], dict]:
    from lasp2.launch import spawn

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")  # the rank inherits it: the kernels the table names
    timeout = (spec.budget_s or 3600.0) + 600.0  # the point under way when the budget runs out, compiles
    return spawn(_gpu_rank, 1, spec, progress, backend="nccl" if cuda else "gloo", timeout_s=timeout,
                 threads_per_rank=spec.threads)[0]


def check(spec: LocalSpec) -> None:
    """ValueError naming the flag, before anything runs."""
    from ..ops import backends

    for v in spec.variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants {v}: choose from {', '.join(VARIANTS)}")
    for name, value, low in (("--heads", spec.heads, 1), ("--dim", spec.dim, 1), ("--repeats", spec.repeats, 1),
                             ("--warmup", spec.warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if min(spec.seq_lens) < 1 or (spec.suite == "ops" and spec.baseline_len < 1):
        raise ValueError("--seq-lens and --baseline-len must be positive")
    if spec.suite == "gpu" or spec.backend == "fla":
        cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
        probe = torch.empty(0, dtype=getattr(torch, spec.dtype), device="cuda" if cuda and spec.suite == "gpu"
                            else "cpu")
        try:
            backends.resolve("fla", probe)
        except ValueError as e:
            raise ValueError(f"--suite {spec.suite}: {e}") from None


_TABLES = {  # suite: (the lines above the table, [(column, cell of a record)])
    "ops": ("Baseline per variant: the masked quadratic form (basic, scalar gate) or the per-token recurrence, at "
            "one length; 'vs baseline' = tokens/s over the baseline's tokens/s.",
            [("variant", lambda r: r["variant"]), ("op", lambda r: r["config"]), ("T", lambda r: str(r["T"])),
             ("fwd+bwd (ms)", lambda r: f"{r['time_s'] * 1e3:.1f}"), ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
             ("vs baseline", lambda r: f"{r['tokens_per_s_vs_baseline']:.2f}"),
             ("peak MB", lambda r: f"{r['peak_mem_mb']:.0f}"), ("MB per 1K tokens", lambda r: f"{r['mb_per_1k_tokens']:.1f}")]),
    "gpu": ("fla: fla's op called directly; linear_attention: `lasp2.linear_attention(backend=\"fla\")`; "
            "sp_linear_attention: `lasp2.sp_linear_attention(backend=\"fla\")` on a group of one rank (the SP "
            "local path).",
            [("variant", lambda r: r["variant"]), ("T", lambda r: str(r["T"])), ("config", lambda r: r["config"]),
             ("fwd+bwd (ms)", lambda r: f"{r['time_s'] * 1e3:.2f}"), ("x fla", lambda r: f"{r['time_vs_fla']:.3f}"),
             ("peak MiB", lambda r: f"{r['peak_mem_mb']:.0f}"),
             ("output rel. RMS vs fla", lambda r: f"{r['output_rel_rms_vs_fla']:.1e}")]),
}


def markdown(records: List[dict], meta: dict, spec: LocalSpec) -> str:
    cfg = (f"B=1, H={spec.heads}, K=V={spec.dim}, {spec.dtype}; fwd+bwd, median of {spec.repeats} after "
           f"{spec.warmup} warm-up, configurations interleaved round by round; peak memory above the inputs "
           f"({records[0]['mem_method'] if records else ''}).")
    lines = [f"# lasp2 bench --suite {spec.suite}", "", f"Command: `{meta['command']}`", "",
             f"torch {meta['torch']}; {meta['hardware']}; " + (
                 f"{meta['threads']} threads; backend {spec.backend}; "
                 f"allocator {'tuned (--tuned-allocator)' if meta.get('tuned_allocator') else 'glibc as it comes'}; "
                 if spec.suite == "ops" else
                 f"{meta['device']}; triton {meta['triton']}, fla {meta['fla']}; ") + cfg, ""]
    if meta.get("note"):
        lines += [f"**Note:** {meta['note']}", ""]
    intro, columns = _TABLES[spec.suite]
    lines += [intro, "", "| " + " | ".join(name for name, _ in columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in records]
    if meta.get("skipped (time budget)"):
        lines += ["", f"Not run (time budget): {', '.join(meta['skipped (time budget)'])}"]
    return "\n".join(lines) + "\n"


def plot(records: List[dict], out, spec: LocalSpec):
    """time_vs_T.png: one panel per variant, one line per configuration."""
    from .report import matplotlib_pyplot

    plt = matplotlib_pyplot()
    variants = list(dict.fromkeys(r["variant"] for r in records))
    fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 3.6), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for c in dict.fromkeys(r["config"] for r in records if r["variant"] == variant):
            pts = sorted((r["T"], r["time_s"]) for r in records if r["variant"] == variant and r["config"] == c)
            ax.plot(*zip(*pts), marker="o", ls="--" if c in ("fla", "quadratic", "recurrence") else "-", label=c)
        ax.set(xscale="log", yscale="log", title=variant, xlabel="T", ylabel="fwd+bwd (s)")
        ax.legend(fontsize=8)
    fig.suptitle(f"lasp2 bench --suite {spec.suite}: time vs sequence length")
    fig.tight_layout()
    path = out / "time_vs_T.png"
    fig.savefig(path, dpi=110)
    plt.close("all")
    return [path]
