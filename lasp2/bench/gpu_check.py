"""``lasp2 bench --suite gpu``: the one prepared GPU check (``benchmarks/gpu_suite.sh``).

One command on one GPU answers every GPU question at once and writes one report
(``results.json`` + ``results.md``), section by section (``results.partial.json`` after each, so
a run cut short still leaves what it measured), in this order:

    sp_one_device    W = 2 gloo ranks with CUDA tensors on one GPU, every strategy (``gpu_steps``)
    exact_linear     every linear variant, backend fla vs torch: o, final state, every gradient;
                     fp32 and bf16, by relative RMS                              (``gpu_exact``)
    exact_softmax    softmax kernel backend (flex) vs the blockwise loop: causal, zigzag
                     positions, documents, GQA; fwd, and bwd incl. a key subset   (``gpu_exact``)
    exact_steps      a hybrid Linear-Llama step and a lasp2.hf Qwen3.5-tiny step, CUDA vs CPU
    perf_softmax     (b) lasp2 flex vs blockwise vs flex / SDPA direct           (``gpu_perf``)
    perf_step        (c) one LLLN training step of linear-llama3-1b-shaped blocks at T = 32K
    host_syncs       (d) host syncs per step and per layer
    perf_linear      (a) linear local path vs fla direct, T = 8K..64K, with what is left of the
                     time budget (compiling fla's kernels dominates its first points)

``--smoke`` is the CPU mode (CI): toy sizes, fla in the Triton interpreter (``TRITON_INTERPRET=1``
set before Python starts), flex forward only; what needs CUDA says "skipped: needs CUDA" in the
report. Exit status 1 when a section raised (its traceback is in the report), else 0 whatever
the targets say (the report says pass / fail per target).
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch

from .inputs import VARIANTS

SIZES = {  # full (one H100) / smoke (CPU)
    False: dict(exact_T=1024, linear_lens=(8192, 16384, 32768, 65536), softmax_lens=(8192, 16384, 32768),
                step_len=32768, sync_len=8192, sp_len=256, repeats=5, budget_s=300.0),
    True: dict(exact_T=64, linear_lens=(48,), softmax_lens=(64,), step_len=64, sync_len=64, sp_len=32,
               repeats=1, budget_s=600.0),
}


@dataclass(frozen=True)
class GpuCheckSpec:
    smoke: bool
    variants: Tuple[str, ...]
    exact_T: int
    linear_lens: Tuple[int, ...]
    softmax_lens: Tuple[int, ...]
    step_len: int
    sync_len: int
    sp_len: int
    repeats: int
    budget_s: float  # no new timed point after this many seconds from the start


def spec_from_args(args) -> GpuCheckSpec:
    smoke = bool(args.smoke or args.quick)
    base = dict(SIZES[smoke])
    if args.seq_lens:
        base["linear_lens"] = tuple(args.seq_lens)
    if args.budget_s is not None:
        base["budget_s"] = float(args.budget_s)
    if args.repeats is not None:
        base["repeats"] = args.repeats
    variants = tuple(args.variants or VARIANTS)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"--variants {' '.join(bad)}: choose from {', '.join(VARIANTS)}")
    if not smoke and not torch.cuda.is_available():
        raise ValueError("--suite gpu needs a CUDA device; --smoke runs its CPU mode (toy sizes, timings "
                         "meaningless, with TRITON_INTERPRET=1 for fla's kernels)")
    return GpuCheckSpec(smoke=smoke, variants=variants, **base)


def _sections(spec: GpuCheckSpec, group, cpu_group, start: float, deadline: float):
    """(name, thunk) in the order they run: exactness first, then the timed sections."""
    from . import gpu_exact, gpu_perf, gpu_steps

    cuda = not spec.smoke
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    soft_dtypes = dtypes  # fp64 on CPU: tests/ops/test_softmax_flex.py
    lin_T = 512 if cuda else 32
    return [
        # Compiling fla's kernels dominates: no new variant after 40 % of the budget.
        ("exact_linear", lambda: gpu_exact.linear_fla_vs_torch(device, dtypes, spec.variants, T=lin_T,
                                                                H=4 if cuda else 2, D=64 if cuda else 16,
                                                                deadline=start + 0.4 * spec.budget_s)),
        ("exact_softmax", lambda: gpu_exact.softmax_kernel_vs_blockwise(device, soft_dtypes, T=spec.exact_T,
                                                                        D=64 if cuda else 16)),
        ("exact_steps", lambda: gpu_steps.steps_cuda_vs_cpu(cuda, group, cpu_group, T=256 if cuda else 32)),
        ("perf_softmax", lambda: gpu_perf.softmax_kernels(cuda, spec.softmax_lens, spec.repeats, deadline)),
        ("perf_step", lambda: gpu_perf.training_step(cuda, spec.step_len, spec.repeats)),
        ("host_syncs", lambda: gpu_perf.host_syncs(cuda, spec.sync_len)),
        ("perf_linear", lambda: gpu_perf.linear_vs_fla(cuda, spec.variants, spec.linear_lens, spec.repeats,
                                                       max(0.0, deadline - time.time()))),
    ]


def _run_one(name, thunk, out: Path, done: Dict[str, dict]) -> None:
    t0 = time.time()
    try:
        res = thunk()
    except Exception:  # noqa: BLE001 - one broken section must not cost the others' GPU minutes
        res = {"status": "error", "rows": [], "note": traceback.format_exc()[-3000:]}
    res["seconds"] = round(time.time() - t0, 1)
    done[name] = res
    (out / "results.partial.json").write_text(json.dumps(done, indent=1, default=str) + "\n")
    print(f"[gpu check] {name}: {res['status']} ({res['seconds']} s)", flush=True)


def _rank(spec: GpuCheckSpec, out: str, start: float, done: Dict[str, dict]) -> Dict[str, dict]:
    """Rank 0 of a one-rank group (``lasp2.launch.spawn``): every one-device section, added to
    ``done`` (the sections run before it)."""
    import torch.distributed as dist

    cpu_group = dist.group.WORLD
    if not spec.smoke:
        torch.cuda.set_device(0)
        cpu_group = dist.new_group(backend="gloo")  # the CPU reference of the hf step (NCCL takes CUDA tensors only)
        # This run compiles FlexAttention for many (shape, dtype, mask) combinations; past dynamo's
        # default of 8 recompiles it would fall back to eager flex, which materialises the scores.
        torch._dynamo.config.recompile_limit = 64
    for name, thunk in _sections(spec, dist.group.WORLD, cpu_group, start, start + spec.budget_s):
        _run_one(name, thunk, Path(out), done)
    return done


def _versions(cuda: bool) -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__, "cuda_device": torch.cuda.get_device_name(0) if cuda else None}
    for pkg in ("triton", "fla-core", "transformers", "flash-attn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run(args, out: Path, command: str) -> int:
    from ..launch import spawn
    from . import gpu_steps

    spec = spec_from_args(args)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")  # the kernels the tables name
    start = time.time()
    cuda = not spec.smoke
    # SP first: it is exactness (ahead of the timed sections) and needs its own two ranks.
    sections: Dict[str, dict] = {}
    _run_one("sp_one_device", lambda: gpu_steps.sp_on_one_device(cuda, spec.sp_len, 240.0), out, sections)
    sections = spawn(_rank, 1, spec, str(out), start, sections, backend="nccl" if cuda else "gloo",
                     timeout_s=spec.budget_s + 900.0)[0]
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "mode": "smoke (CPU)" if spec.smoke else "CUDA", "elapsed_s": round(time.time() - start, 1),
            "spec": asdict(spec), **_versions(cuda)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "sections": sections}, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(meta, sections))
    (out / "results.partial.json").unlink(missing_ok=True)
    if not getattr(args, "quiet", False):
        print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    return 1 if any(s["status"] == "error" for s in sections.values()) else 0


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


def markdown(meta: dict, sections: Dict[str, dict]) -> str:
    lines = ["# lasp2 GPU check (`lasp2 bench --suite gpu`)", "", f"Command: `{meta['command']}`", "",
             f"{meta['date']}; mode: {meta['mode']}; device: {meta['cuda_device'] or 'cpu'}; torch {meta['torch']}, "
             f"triton {meta['triton']}, fla-core {meta['fla-core']}, transformers {meta['transformers']}, "
             f"flash-attn {meta['flash-attn']}; {meta['elapsed_s']} s in all.", "",
             "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {s['status']} | {s['seconds']} |" for n, s in sections.items()]
    for name, s in sections.items():
        lines += ["", f"## {name}: {s['status']}", ""]
        if s.get("note"):
            lines += [("```\n" + s["note"] + "\n```") if s["status"] == "error" else s["note"], ""]
        cols = list(dict.fromkeys(k for r in s["rows"] for k in r))
        if cols:
            lines += ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
            lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in s["rows"]]
    return "\n".join(lines) + "\n"
