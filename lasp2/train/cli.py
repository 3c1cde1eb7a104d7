"""``lasp2 train`` (registered by lasp2/cli.py through ``add_parser``).

Flags are generated from :class:`TrainConfig` (``--seq-len`` for ``seq_len``) and, in the
"model" group, from :class:`lasp2.models.LinearLlamaConfig` (``--hidden``, ``--kv-heads``, ...,
overriding the preset). Only the flags given reach the config; the rest keep its defaults.

Not under torchrun the command starts dp x sp local gloo ranks itself (``lasp2.launch.spawn``;
``--device cuda`` uses NCCL, one GPU per rank); under torchrun it uses the launched ranks (NCCL
on GPUs) with a process-group timeout of ``--timeout-s``.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import typing
from pathlib import Path

from .config import DEVICES, DOC_SEPS, DTYPES, TASKS, TRAIN_DEFAULTS, TrainConfig, flag

MODEL_PREFIX = "model__"
# LinearLlamaConfig fields that TrainConfig sets under its own name (--linear, --layer-pattern).
MODEL_FIELDS_SKIPPED = ("layer_pattern", "linear_variant")

EXAMPLES = """examples:
  lasp2 train                                  # MQAR, debug preset, SP=2 on 2 local CPU ranks (~2 min)
  lasp2 train --no-state-passing --out ablate  # the same without LASP-2 state passing: recall collapses
  lasp2 train --task text --data book.txt --seq-len 4096 --sp 4 --steps 200
  lasp2 prepare book.txt --tokenizer tokenizer.json --out book.bin && lasp2 train --task tokens --data book.bin
  lasp2 train --resume lasp2_train --steps 600 # continue a run (identical losses to an uninterrupted one)
  torchrun --nproc-per-node 8 -m lasp2 train --preset linear-llama3-1b --sp 4 --seq-len 65536 --dtype bfloat16
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m lasp2 train \\
      --preset linear-llama3-1b --sp 8 --data-parallel fsdp2 --seq-len 65536   # sharded, SP inside each node
"""


def _choices():
    from ..models import PRESETS
    from ..models.parallelize import DATA_PARALLEL
    from ..nn import LINEAR_VARIANTS
    from ..parallel.strategies import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
    from ..parallel.layout import LAYOUTS
    from ..ops.backends import BACKENDS
    from ..ops.softmax_backends import SOFTMAX_BACKENDS

    return {"preset": tuple(PRESETS), "task": TASKS, "dtype": DTYPES, "device": DEVICES, "doc_sep": DOC_SEPS,
            "layout": LAYOUTS, "strategy": LINEAR_STRATEGIES, "softmax_strategy": SOFTMAX_STRATEGIES,
            "linear": tuple(LINEAR_VARIANTS), "data_parallel": DATA_PARALLEL,
            "backend": BACKENDS, "softmax_backend": SOFTMAX_BACKENDS}


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _add_field_flags(group, cls, *, dest_prefix: str = "", skip=(), choices=None, defaults=None):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or f.metadata.get("flag") is False:
            continue
        kind = _base_type(hints[f.name])
        default = defaults.get(f.name) if defaults is not None else f.default
        text = f.metadata.get("help", f.name.replace("_", " "))
        kwargs = dict(dest=dest_prefix + f.name, default=argparse.SUPPRESS)
        if kind is bool and default is False:
            group.add_argument(f"--{flag(f.name)}", action="store_true", help=text, **kwargs)
            continue
        if kind is bool:
            group.add_argument(f"--{flag(f.name)}", action=argparse.BooleanOptionalAction,
                               help=f"{text} (default: {default})", **kwargs)
            continue
        if choices and f.name in choices:
            kwargs["choices"] = choices[f.name]
        shown = "" if default is None or default is dataclasses.MISSING else f" (default: {default})"
        group.add_argument(f"--{flag(f.name)}", type=kind, metavar=f.name.upper().split("_")[-1] if "choices"
                           not in kwargs else None, help=text + shown, **kwargs)


def add_parser(subparsers) -> None:
    from ..models import PRESETS, LinearLlamaConfig

    p = subparsers.add_parser(
        "train", help="train a Linear-Llama model with LASP-2 sequence parallelism (MQAR or text)",
        description="Train Linear-Llama (pure linear or hybrid) with sequence parallelism over --sp ranks and data "
                    "parallelism over --dp. Writes OUT/metrics.jsonl (one JSON object per step), OUT/config.json, "
                    "OUT/loss.png and OUT/checkpoints/step-NNNNNN/. Not under torchrun it starts dp x sp local "
                    "gloo ranks itself; under torchrun it uses the launched ranks (NCCL on GPUs).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_field_flags(p.add_argument_group("training"), TrainConfig, choices=_choices())
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that is not empty: the earlier run's metrics.jsonl, config.json, "
                        "loss.png, failure files and checkpoints there are deleted (other files are left alone)")
    used = {**PRESETS["debug"], **TRAIN_DEFAULTS.get("debug", {})}  # what `lasp2 train` builds by default
    model = p.add_argument_group("model (override fields of the --preset; debug as lasp2 train uses it: "
                                 + ", ".join(f"{k}={v}" for k, v in used.items()) + ")")
    _add_field_flags(model, LinearLlamaConfig, dest_prefix=MODEL_PREFIX, skip=MODEL_FIELDS_SKIPPED,
                     defaults={})
    p.set_defaults(func=run)


def config_from_args(args) -> TrainConfig:
    """The TrainConfig of the given flags (ValueError on bad values). With ``--resume`` it is the
    checkpoint's stored configuration with the given flags on top (``resume_config``)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    model = {k[len(MODEL_PREFIX):]: v for k, v in vars(args).items() if k.startswith(MODEL_PREFIX)}
    if given.get("resume"):
        return resume_config(given, model)
    return TrainConfig(**given, model=model)


def resume_config(given: dict, model: dict) -> TrainConfig:
    """The run a ``--resume`` continues: the configuration stored in the checkpoint, with the
    given flags on top, in the resumed run's directory unless --out says otherwise. Flags outside
    ``RESUMABLE_CHANGES`` may be restated but not changed: ``checkpoint.check_compatible`` compares
    resolved values, so ``--layer-pattern NLLL`` where the preset's default was NLLL is no change.
    The learning-rate schedule stays the checkpoint run's (``schedule_steps``)."""
    from . import checkpoint

    ckpt = checkpoint.find(given["resume"])
    stored = dict(checkpoint.read_meta(ckpt).get("config") or {})
    stored.pop("export_hf", None)  # an export is asked for by the run that wants it, not inherited
    values = {**stored, **given, "model": {**(stored.get("model") or {}), **model}}
    if "sp" in given and "dp" not in given and given["sp"] != stored.get("sp"):
        values["dp"] = None  # a new --sp re-derives --dp (a sharded checkpoint reshards; single-file ones refuse)
    if "out" not in given:
        values["out"] = str(ckpt.parents[1])  # continue in the resumed run's directory
    if values.get("schedule_steps") is None:
        values["schedule_steps"] = stored.get("steps", values.get("steps"))
    return TrainConfig.from_dict(values)


def _usage(e: Exception):
    from ..cli import UsageError

    text = str(e).strip().splitlines()
    return UsageError(text[0] if text else type(e).__name__)


RUN_OUTPUTS = ("metrics.jsonl", "config.json", "loss.png", "checkpoints")  # what a run writes in --out


def _check_out(cfg: TrainConfig, overwrite: bool, *, act: bool = True) -> None:
    """Before any rank starts: --out must be a writable directory (created here), empty unless this
    run continues the run that lives there (--resume) or --overwrite is given, in which case the
    earlier run's outputs are deleted (``act``: on one rank only); --export-hf must be new or an
    empty directory. ValueError otherwise."""
    if cfg.export_hf is not None:
        target = Path(cfg.export_hf)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ValueError(f"--export-hf {cfg.export_hf} exists and is not an empty directory; choose a new one")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {cfg.out} exists and is not a directory; choose another --out")
    continuing = False
    if cfg.resume:
        from .checkpoint import find

        continuing = out.resolve() == find(cfg.resume).parents[1].resolve()
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not continuing:
        if not overwrite:
            held = "checkpoints of a run" if "checkpoints" in entries else \
                f"{', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}"
            hint = f"continue it with --resume {cfg.out}, " if "checkpoints" in entries else ""
            raise ValueError(f"--out {cfg.out} already holds {held}; {hint}choose another --out, or pass --overwrite "
                             f"to replace the earlier run's outputs ({', '.join(RUN_OUTPUTS)})")
        if act:
            for name in entries:
                if name in RUN_OUTPUTS or name.startswith("failure"):
                    path = out / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    if act:
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".lasp2-write-test-"):
                pass
        except OSError as e:
            raise ValueError(f"--out {cfg.out} is not writable ({e.strerror or e}); choose another --out") from None


def _write_failure(out: Path, name: str, text: str) -> str:
    """Write a failing rank's traceback to OUT/name; returns where it is (stderr when OUT cannot
    take it: the failure handler must not fail in turn)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
        return f"traceback in {out / name}"
    except OSError as e:
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        return f"traceback above: {out / name} could not be written ({e.strerror or e})"


def summary_text(summary: dict, cfg: TrainConfig) -> str:
    m = cfg.model_config()
    what = "MQAR" if cfg.task == "mqar" else f"text from {cfg.data}"
    model = (f"transformers model {cfg.hf_config or cfg.hf_weights} (lasp2.hf)" if cfg.hf else
             f"Linear-Llama '{cfg.preset}' (layers {''.join(m.layer_types)}, linear '{m.linear_variant}')")
    parts = [f"Trained {model} "
             f"on {what} for steps {summary['start_step'] + 1}-{summary['steps']} with SP={cfg.sp} x DP={cfg.dp} "
             f"({cfg.strategy}/{cfg.softmax_strategy}, {cfg.layout}"
             f"{', NO state passing' if cfg.no_state_passing else ''}) on {summary['world']} rank(s)"]
    if "final_loss" in summary:
        chance = f"; chance {1 / cfg.mqar_values:.3f}" if cfg.task == "mqar" else ""
        parts.append(f"final loss {summary['final_loss']:.4f}, accuracy {summary['final_accuracy']:.3f} "
                     f"(mean of the last 10 steps {summary['accuracy_last10']:.3f}{chance}), "
                     f"{summary['tokens_per_s']:,.0f} tokens/s, peak memory {summary['peak_mem_mb']:,.0f} MB per rank")
        mib = 2 ** 20
        parts.append(f"{cfg.data_parallel}: parameters + optimizer state "
                     f"{(summary['param_bytes'] + summary['optimizer_bytes']) / mib:,.2f} MiB, gradients "
                     f"{summary['grad_bytes'] / mib:,.2f} MiB, activation peak {summary['activation_peak_bytes'] / mib:,.2f} "
                     f"MiB per rank")
    parts.append(f"wall time {summary['wall_s']:.1f} s")
    files = ["metrics.jsonl", "config.json"]
    if str(summary.get("plot", "")).endswith(".png"):
        files.append("loss.png")
    elif summary.get("plot"):
        parts.append(f"plot {summary['plot']}")
    if summary.get("checkpoint"):
        files.append(str(Path(summary["checkpoint"]).relative_to(summary["out"])))
    return "; ".join(parts) + f". Output: {summary['out']}/ ({', '.join(files)})."


def run(args) -> int:
    from ..launch import RankFailure, init_from_env, spawn, under_torchrun

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise _usage(e) from None
    if cfg.tuned_allocator:  # before any large tensor; ranks started from here inherit it
        from ..cpu_allocator import tune_cpu_allocator

        tune_cpu_allocator()
    if under_torchrun():
        import os

        try:  # the same checks fail on every rank: rank 0 says it, the others just exit
            cfg.resolve_world(int(os.environ["WORLD_SIZE"]))
            cfg.check_device()
            cfg.check_data()
            _check_out(cfg, args.overwrite, act=os.environ["RANK"] == "0")
        except ValueError as e:
            if os.environ["RANK"] == "0":
                raise _usage(e) from None
            return 2
        return _run_torchrun(cfg, args, init_from_env)
    try:
        cfg.resolve_world(cfg.world)
        cfg.check_device()
        cfg.check_data()
        _check_out(cfg, args.overwrite)
        if cfg.resume:  # fail here, before starting any rank
            from . import checkpoint

            ckpt = checkpoint.find(cfg.resume)
            checkpoint.check_compatible(checkpoint.read_meta(ckpt), cfg, ckpt)
    except ValueError as e:
        raise _usage(e) from None
    from .loop import run_rank

    backend = "nccl" if cfg.device == "cuda" else "gloo"
    try:
        # spawn's limit covers the whole run; a failing rank stops the others at once anyway.
        results = spawn(run_rank, cfg.world, cfg.to_dict(), backend=backend,
                        timeout_s=max(cfg.timeout_s, 7 * 86400.0))
    except RankFailure as e:
        where = _write_failure(Path(cfg.out), "failure.txt", e.traceback or str(e))
        print(f"lasp2 train: error: {e} ({where})", file=sys.stderr)
        return 1
    print(summary_text(results[0], cfg))
    return _export_hf(cfg, results[0])


def _export_hf(cfg: TrainConfig, summary: dict) -> int:
    """--export-hf: the final checkpoint as a transformers directory (rank 0 / the launcher)."""
    if not cfg.export_hf:
        return 0
    from .export import export_checkpoint

    try:
        out = export_checkpoint(summary["checkpoint"], cfg.export_hf)
    except ValueError as e:
        print(f"lasp2 train: error: --export-hf: {e}", file=sys.stderr)
        return 1
    print(f"Exported the final checkpoint to {out}/ (AutoModelForCausalLM.from_pretrained({str(out)!r})).")
    return 0


def _run_torchrun(cfg: TrainConfig, args, init_from_env) -> int:
    import traceback

    import torch.distributed as dist

    from .loop import train

    backend = "gloo" if cfg.device == "cpu" else None  # None: nccl with CUDA, else gloo
    rank, world = init_from_env(backend=backend, timeout_s=cfg.timeout_s)
    try:
        cfg.resolve_world(world)
        summary = train(cfg)
        if summary is not None:
            print(summary_text(summary, cfg))
            return _export_hf(cfg, summary)
        return 0
    except Exception as e:  # noqa: BLE001 - one line per failing rank, the traceback in a file
        where = _write_failure(Path(cfg.out), f"failure-rank{rank}.txt", traceback.format_exc())
        first = str(e).strip().splitlines()
        print(f"lasp2 train: error: rank {rank}: {type(e).__name__}: {first[0] if first else ''} ({where})",
              file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

