"""``lasp2 bench`` and ``lasp2 plan`` (registered by lasp2/cli.py through ``add_parser``)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

QUICK = dict(seq_lens=(512, 1024), heads=4, dim=32, repeats=2, world_sizes=(2,))
DEFAULT = dict(seq_lens=(4096, 8192, 16384), heads=8, dim=64, repeats=5, world_sizes=(2,))


LOCAL_SUITES = ("ops", "gpu", "memory")  # not sequence-parallel: lasp2/bench/onedevice.py, memory.py
SUITE_CHOICES = ("linear", "softmax", "model", "hf", "inference") + LOCAL_SUITES + ("trainer",)  # inference, trainer: their modules


def add_parser(subparsers) -> None:
    from ..parallel.strategies import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
    from . import onedevice

    b = subparsers.add_parser(
        "bench", help="measure sequence-parallel attention strategies against the ideal",
        description="Measure fwd+bwd time, tokens/s, efficiency vs the single-device ideal, peak memory and "
                    "communication per rank for every strategy of a suite, baselines in the same run. Not "
                    "under torchrun it starts W gloo ranks (1 thread each) per world size itself; under "
                    "torchrun it uses the given ranks (NCCL on GPUs), the first W of them for each W.")
    b.add_argument("--suite", choices=SUITE_CHOICES, default="linear",
                   help=f"linear: {', '.join(LINEAR_STRATEGIES)} | softmax: {', '.join(SOFTMAX_STRATEGIES)} | "
                        "model: lasp2.models | hf: a transformers model (--hf-config) parallelized by lasp2.hf vs "
                        "the unmodified model on each rank's shard | one device: ops: lasp2.linear_attention vs the "
                        "quadratic form / per-token recurrence; gpu: the fla backend vs fla's own op at SP = 1 (CUDA, "
                        "or CPU under TRITON_INTERPRET=1) | memory: per-rank bytes of lasp2 train, DDP vs FSDP2 | "
                        "trainer: a transformers Trainer step under lasp2.hf.sequence_parallel vs plain DDP on shards")
    b.add_argument("--strategies", type=lambda s: tuple(x for x in s.split(",") if x), metavar="A,B,...",
                   help="measure only these configurations of the suite (comma-separated; the ideal always)")
    b.add_argument("--world-sizes", type=int, nargs="+", metavar="W", help="SP group sizes (default 2)")
    lens = b.add_mutually_exclusive_group()
    lens.add_argument("--seq-lens", type=int, nargs="+", metavar="T",
                      help="GLOBAL sequence lengths, split over W ranks (default 4096 8192 16384); ops/gpu: T of one "
                           "call (default ops 8192 16384 32768, gpu 8192 ... 65536); memory: tokens per sequence")
    lens.add_argument("--local-lens", type=int, nargs="+", metavar="T",
                      help="tokens PER RANK instead (weak scaling: the global length is W x T)")
    b.add_argument("--heads", type=int, help="query heads H (default 8)")
    b.add_argument("--kv-heads", type=int, help="key/value heads for the softmax suite (default: --heads)")
    b.add_argument("--dim", type=int, help="head dimension K = V (default 64)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--hf-config", help="--suite hf: a transformers config (shipped name such as qwen3-next-tiny, "
                                       "a JSON file, or a directory with config.json); several, comma-separated, "
                                       "or 'all' (every family's tiny config): one summary table")
    b.add_argument("--dtype", choices=("float32", "bfloat16", "float64"),
                   help="default float32 (--suite gpu on CUDA: bfloat16)")
    b.add_argument("--layout", choices=("contiguous", "zigzag", "both"), default="contiguous",
                   help="how the sequence is sharded; both (linear, softmax): every strategy under each, side by "
                        "side (load balance: contiguous vs zigzag in the same run)")
    b.add_argument("--backend", choices=("auto", "torch", "fla"), default="torch",
                   help="linear-attention kernels for every strategy and the ideal (fla: its Triton kernels; "
                        "auto: fla on CUDA when installed)")
    b.add_argument("--repeats", type=int, help="timed calls per point (default 5)")
    b.add_argument("--warmup", type=int, help="untimed calls per point before the tracked one (default 1; "
                                                "gpu: 2, --quick 0)")
    one = b.add_argument_group("one-device and memory suites")
    one.add_argument("--variants", nargs="+", choices=onedevice.VARIANTS, metavar="V",
                     help=f"ops/gpu (linear: one): linear-attention variants ({', '.join(onedevice.VARIANTS)}; default ops: "
                          f"{' '.join(onedevice.OPS_DEFAULT_VARIANTS)}, gpu: all)")
    one.add_argument("--baseline-len", type=int, metavar="T",
                     help="ops: the quadratic form's / recurrence's length (default 2048; --quick 128)")
    one.add_argument("--threads", type=int, help="ops/gpu: torch threads (default: torch's)")
    one.add_argument("--budget-s", type=float, default=None,
                     help="gpu: start no new timed point after this many seconds (default 300)")
    one.add_argument("--smoke", action="store_true",
                     help="gpu: the CPU mode of the GPU check (toy sizes; TRITON_INTERPRET=1 for fla; --quick too)")
    one.add_argument("--presets", nargs="+", metavar="PRESET",
                     help="memory: lasp2 train presets (default debug linear-llama3-mid; --quick debug)")
    one.add_argument("--shapes", nargs="+", metavar="DPxSP",
                     help="memory: meshes (default 2x2 1x4; --quick 1x2); --seq-lens: tokens per sequence "
                          "(default 2048 for debug, 1024 for other presets; --quick 256)")
    b.add_argument("--out", type=Path, help="output directory (default ./<suite>_<machine>_<date>)")
    b.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke run (< 2 min): SP suites global 512 1024, H=4, D=32, 2 repeats; "
                        "ops, gpu, memory: their own tiny sizes")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    b.add_argument("--tuned-allocator", action="store_true",
                   help="CPU: keep large tensors on glibc's heap (lasp2/cpu_allocator.py): faster at long "
                        "sequences, more resident memory; results.json records it")
    b.add_argument("--note", help="a line added to results.md (e.g. what else ran on the machine)")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.add_argument("--from-json", type=Path, metavar="RESULTS_JSON",
                   help="measure nothing: rewrite results.md and the plots of an existing results.json "
                        "(e.g. from a machine without matplotlib) into --out (default: its directory)")
    b.set_defaults(func=run_bench)

    p = subparsers.add_parser(
        "plan", help="predict step time, communication and memory per strategy and split; recommend one",
        description="Calibrated analytical model (lasp2/bench/step_model.py, cost_model.py; fitted to the LASP-2 "
                    "paper, docs/planner.md). --explain breaks each step into its terms; --json prints one object; "
                    "--projection prints the 16-1024 GPU x 2K-8M table; --validate fits the model on this machine "
                    "and compares with lasp2 bench results.")
    p.add_argument("--model", choices=("linear-llama3-1b", "linear-llama3-8b"), default="linear-llama3-1b")
    for flag in ("--hidden", "--layers", "--heads", "--kv-heads", "--ffn", "--vocab"):
        p.add_argument(flag, type=int, help="override the preset")
    p.add_argument("--layer-pattern", help="'L' linear / 'N' softmax, cycled over layers (e.g. LLLN)")
    p.add_argument("--gpus", type=int, nargs="+", default=[16, 32, 64, 128], metavar="G")
    p.add_argument("--seq-lens", "--seq-len", type=_length, nargs="+", metavar="T",
                   help="GLOBAL tokens per sequence: 2097152, 2048K or 2M (default 64K 256K 1M)")
    p.add_argument("--hardware", default="h100", metavar="PRESET|FILE.json",
                   help="a100-40gb, a100-80gb, h100, h200, b200, or a JSON file (docs/planner.md)")
    p.add_argument("--strategies", metavar="A,B,...", help="linear strategies to compare (default: every library "
                   "strategy and the modelled baselines lasp1-serial, ring-linear, ring-linear-rp, megatron-sp)")
    p.add_argument("--split", metavar="DPxSP|auto", help="data x sequence parallel split of --gpus (e.g. 8x8), or "
                   "auto: the fastest that fits per strategy (default: SP over every GPU)")
    p.add_argument("--sharding", choices=("ddp", "zero1", "zero2", "fsdp2"), default="ddp",
                   help="model states: replicated (ddp), optimizer (zero1), + gradients (zero2), all (fsdp2)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (recompute forward)")
    p.add_argument("--mfu", type=float, help="override the calibration's achieved fraction of peak FLOP/s")
    p.add_argument("--explain", action="store_true", help="every term of the step: compute, each communication, "
                   "exposed vs overlapped; memory by part")
    p.add_argument("--json", action="store_true", help='one JSON object {"predictions": [...]} (one --gpus, one '
                   "--seq-len)")
    p.add_argument("--projection", action="store_true", help="the scaling table for linear and LLLN hybrid")
    p.add_argument("--validate", type=Path, nargs="+", metavar="RESULTS_JSON",
                   help="fit alpha/beta/compute on this machine, predict these lasp2 bench results")
    p.add_argument("--save-calibration", type=Path, metavar="FILE.json",
                   help="with --validate: write the fitted knobs as a --hardware file")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    p.set_defaults(func=run_plan)


def _usage(e: Exception):
    from lasp2.cli import UsageError

    return UsageError(str(e).splitlines()[0])


def bench_spec(args):
    """The BenchSpec of these flags (quick fills only what was not given)."""
    from .harness import BenchSpec, check_spec

    base = QUICK if args.quick else DEFAULT
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]  # noqa: E731
    spec = BenchSpec(suite=args.suite, world_sizes=tuple(pick("world_sizes")),
                     seq_lens=tuple(args.local_lens or pick("seq_lens")), seq_is_global=args.local_lens is None,
                     batch=args.batch, heads=pick("heads"), kv_heads=args.kv_heads, dim=pick("dim"),
                     dtype=args.dtype or "float32", layout=args.layout, backend=args.backend, repeats=pick("repeats"),
                     warmup=1 if args.warmup is None else args.warmup,
                     strategies=args.strategies, hf_config=args.hf_config)
    if args.variants:
        if len(args.variants) != 1:
            raise _usage(ValueError(f"--variants: one variant per run of --suite {args.suite}"))
        spec = dataclasses.replace(spec, variant=args.variants[0])
    try:
        check_spec(spec)
    except ValueError as e:
        raise _usage(e) from None
    return spec


def rerender(args) -> int:
    import json

    from . import report
    from .harness import BenchSpec

    try:
        data = json.loads(args.from_json.read_text())
        recs, meta = data["records"], data["meta"]
        if recs[0]["suite"] in LOCAL_SUITES:
            return _rerender_local(args, recs, meta)
        fields = {f: recs[0][f] for f in BenchSpec.__dataclass_fields__ if f in recs[0]}
        spec = BenchSpec(**{**fields, "suite": recs[0]["suite"], "world_sizes": tuple(sorted({r["W"] for r in recs})),
                            "seq_lens": tuple(sorted({r["T_global"] for r in recs}))})
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise _usage(ValueError(f"--from-json {args.from_json}: not a lasp2 bench results.json ({e})")) from None
    try:
        paths = report.write_all(recs, meta, spec, args.out or args.from_json.parent, not args.no_plots)
    except RuntimeError as e:
        raise _usage(e) from None
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _rerender_local(args, recs, meta) -> int:
    from . import memory, onedevice

    out = args.out or args.from_json.parent
    if recs[0]["suite"] == "memory":
        md, spec = memory.markdown(recs, meta), None
    else:
        spec = onedevice.LocalSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        md = onedevice.markdown(recs, meta, spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    paths = [out / "results.md"]
    if spec is not None and not args.no_plots:
        try:
            paths += onedevice.plot(recs, out, spec)
        except RuntimeError as e:
            raise _usage(e) from None
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def run_bench(args) -> int:
    from lasp2.launch import RankFailure, under_torchrun

    from . import harness, report

    if args.from_json:
        return rerender(args)
    if args.smoke and args.suite != "gpu":
        raise _usage(ValueError(f"--smoke: not a flag of --suite {args.suite} (use --quick)"))
    if args.suite in LOCAL_SUITES:
        return run_local(args)
    if args.suite == "trainer":  # transformers Trainer steps, sequence_parallel vs DDP on shards
        from .trainer import run_cli

        return run_cli(args, _usage)
    if args.suite == "inference":
        from .inference import run_cli as run_inference

        return run_inference(args)
    if args.tuned_allocator:  # before any large tensor; the spawned ranks inherit it
        from lasp2.cpu_allocator import tune_cpu_allocator

        tune_cpu_allocator()
    from . import hf_families

    if args.suite == "hf" and args.hf_config and hf_families.several(args.hf_config):  # several families, one table
        return hf_families.run_cli(args, bench_spec, _usage)
    spec = bench_spec(args)
    if not args.no_plots:
        try:
            report.matplotlib_pyplot()  # fail now, not after minutes of measuring
        except RuntimeError as e:
            raise _usage(e) from None
    out = args.out or report.default_out(spec.suite)
    try:
        per_w = harness.run_torchrun(spec, not args.quiet) if under_torchrun() else \
            harness.run_spawned(spec, not args.quiet)
    except ValueError as e:
        raise _usage(e) from None
    except RankFailure as e:
        return report.rank_failure(out, e)
    if per_w is None:  # a torchrun rank other than 0
        return 0
    meta = report.run_meta(args)
    records = report.build_records(spec, per_w, meta)
    paths = report.write_all(records, meta, spec, out, not args.no_plots)
    if not args.quiet:
        print(report.markdown(records, meta, spec))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def local_spec(args):
    """The LocalSpec of these flags for --suite ops / gpu."""
    import torch

    from . import onedevice

    base = onedevice.SIZES[args.suite][1 if args.quick else 0]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]  # noqa: E731
    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    spec = onedevice.LocalSpec(
        suite=args.suite, variants=tuple(args.variants or (onedevice.OPS_DEFAULT_VARIANTS if args.suite == "ops"
                                                          else onedevice.VARIANTS)),
        seq_lens=tuple(pick("seq_lens")), baseline_len=pick("baseline_len"), heads=pick("heads"), dim=pick("dim"),
        dtype=args.dtype or ("bfloat16" if args.suite == "gpu" and cuda else "float32"),
        backend="fla" if args.suite == "gpu" else args.backend, repeats=pick("repeats"),
        warmup=args.warmup if args.warmup is not None else base["warmup"], threads=args.threads,
        budget_s=args.budget_s)
    try:
        onedevice.check(spec)
    except ValueError as e:
        raise _usage(e) from None
    return spec


def run_local(args) -> int:
    """--suite ops, gpu (lasp2/bench/onedevice.py) and memory (lasp2/bench/memory.py)."""
    import json
    from dataclasses import asdict

    import torch

    from lasp2.launch import RankFailure

    from . import memory, onedevice, report

    given = {"--world-sizes": args.world_sizes, "--local-lens": args.local_lens, "--kv-heads": args.kv_heads,
             "--strategies": args.strategies, "--hf-config": args.hf_config, "--batch": args.batch != 1,
             "--layout": args.layout != "contiguous", "--variants": args.variants, "--baseline-len": args.baseline_len,
             "--threads": args.threads, "--budget-s": args.budget_s, "--presets": args.presets, "--shapes": args.shapes,
             "--heads": args.heads, "--dim": args.dim, "--dtype": args.dtype, "--repeats": args.repeats,
             "--warmup": args.warmup, "--backend": args.backend != "torch", "--tuned-allocator": args.tuned_allocator}
    takes = {"ops": ("--variants", "--baseline-len", "--threads", "--heads", "--dim", "--dtype", "--repeats", "--warmup",
                     "--backend", "--tuned-allocator"),
             "gpu": ("--variants", "--budget-s", "--repeats"),
             "memory": ("--presets", "--shapes")}[args.suite]
    foreign = [flag for flag, value in given.items() if value and flag not in takes]
    if foreign:
        raise _usage(ValueError(f"{', '.join(foreign)}: not a flag of --suite {args.suite}"))
    if args.suite == "gpu":  # the GPU check (lasp2/bench/gpu_check.py)
        from . import gpu_check

        try:
            return gpu_check.run(args, args.out or report.default_out("gpu"), "lasp2 " + shlex.join(args.argv))
        except ValueError as e:
            raise _usage(e) from None
    if args.tuned_allocator:
        from lasp2.cpu_allocator import tune_cpu_allocator

        tune_cpu_allocator()
    spec = None
    if args.suite == "memory":
        b = memory.QUICK if args.quick else memory.DEFAULT
        try:
            shapes = [memory.parse_shape(s) for s in args.shapes or b["shapes"]]
        except ValueError as e:
            raise _usage(e) from None
        config = {"presets": list(args.presets or b["presets"]), "shapes": [list(s) for s in shapes],
                  "seq_lens": args.seq_lens or b["seq_lens"]}
    else:
        spec = local_spec(args)
        config = asdict(spec)
        if not args.no_plots:
            try:
                report.matplotlib_pyplot()
            except RuntimeError as e:
                raise _usage(e) from None
    out = args.out or report.default_out(args.suite)
    meta = {"command": "lasp2 " + shlex.join(args.argv), "torch": torch.__version__,
            "hardware": report.hardware(cuda=args.suite == "gpu" and torch.cuda.is_available()
                                        and os.environ.get("TRITON_INTERPRET", "0") != "1"),
            "config": config, "tuned_allocator": args.tuned_allocator, "note": args.note}
    try:
        if args.suite == "memory":
            records = memory.run(config["presets"], shapes, config["seq_lens"], not args.quiet)
        else:
            records, extra = onedevice.run_ops(spec, not args.quiet)
            meta.update(extra)
    except (RankFailure, RuntimeError) as e:
        out.mkdir(parents=True, exist_ok=True)
        (out / "failure.txt").write_text(getattr(e, "traceback", None) or str(e))
        print(f"lasp2 bench: error: {str(e).splitlines()[0]} (details in {out / 'failure.txt'})", file=sys.stderr)
        return 1
    md = memory.markdown(records, meta) if spec is None else onedevice.markdown(records, meta, spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    (out / "results.md").write_text(md)
    paths = [out / "results.json", out / "results.md"]
    if spec is not None and not args.no_plots and records:
        paths += onedevice.plot(records, out, spec)
    if not args.quiet:
        print(md)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _length(text: str) -> int:
    from .hardware import parse_length

    try:
        return parse_length(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_plan(args) -> int:
    from . import plan_render

    parts = []
    try:
        if args.projection or not args.validate:
            parts.append(plan_render.render(args))
        if args.validate:
            from .validate import validate

            parts.append(validate(args.validate, save_calibration=args.save_calibration))
    except (ValueError, FileNotFoundError) as e:
        raise _usage(e) from None
    text = "\n".join(parts)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0
