"""``lasp2 bench --suite trainer``: a transformers ``Trainer`` step under ``lasp2.hf.sequence_parallel``
against the same ranks training the unmodified model on their shards.

For each model (``--hf-config``, comma-separated; default the shipped qwen3.5-tiny and ``qwen3.5-cpu``,
a larger CPU-sized Qwen3.5 built here), each global length T (``--seq-lens``) and each sp
(``--world-sizes``, default 1 2 4), one spawn of W = sp gloo ranks (1 thread each) alternates, repeat
by repeat (the order flipped every repeat), between Trainer runs of ``STEPS`` optimizer steps:

- ``sp@LAYOUT``: ``lasp2.hf.sequence_parallel(trainer, sp=W)``, one replica: a sequence of T tokens
  per step, each rank holding T / W of it (``--layout``; ``both``: contiguous and zigzag);
- ``ddp``: the same arguments, the unmodified model under the Trainer's plain DDP over the W ranks,
  each rank its own sequence of T / W tokens: the same tokens and work per rank, no state passing
  (the baseline the target names). On CPU the unmodified model runs transformers' PyTorch fallback
  kernels, which are not lasp2's;
- ``ddp-lasp2``: the same DDP on T / W shards with the model under ``sequence_parallel(sp=1)``
  (lasp2's local kernels, groups of one rank, no SP communication): the baseline that isolates what
  the SP machinery and its Trainer glue cost.
At sp = 1 (one process) the two baselines are the single-device Trainer on T.

Step time: the wall time from one optimizer step's end to the next's (callback on_step_end: the
batch, its sharding, forward, backward, all-reduce, clipping, AdamW), so the first step of every run
is untimed; the median over the timed steps, max over ranks per step. Peak memory: the resident set above its value before
``train()`` (sampled, ``lasp2.bench.rss``), max over ranks. ``ratio_vs_ddp`` = ddp median / this
median, ``ratio_vs_ddp_lasp2`` likewise (target >= 0.90 at sp = 2). ``sp_comm_wait_s``: the time per
step a rank spent blocked in lasp2's collectives (``comm.track``), waiting for the others included.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import List, Tuple

STEPS = 4  # optimizer steps per Trainer run; the first is a warm-up (untimed)
MODELS = {  # name -> (shipped config, overrides)
    "qwen3.5-tiny": ("qwen3.5-tiny", {}),
    "qwen3.5-cpu": ("qwen3.5-tiny", dict(vocab_size=4096, hidden_size=256, intermediate_size=768,
                                         num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                         linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
                                         linear_value_head_dim=32)),
}
BASELINES = ("ddp", "ddp-lasp2")
DEFAULT = dict(models=("qwen3.5-tiny", "qwen3.5-cpu"), seq_lens=(4096,), sps=(1, 2, 4), repeats=3)
QUICK = dict(models=("qwen3.5-tiny",), seq_lens=(64,), sps=(1, 2), repeats=1)


@dataclass(frozen=True)
class TrainerSpec:
    models: Tuple[str, ...]
    seq_lens: Tuple[int, ...]
    sps: Tuple[int, ...]
    layouts: Tuple[str, ...]
    repeats: int
    bf16: bool = False


def check(spec: TrainerSpec) -> None:
    """ValueError naming the flag, before anything starts."""
    for m in spec.models:
        if m not in MODELS:
            from lasp2.hf.loading import load_config

            load_config(m)  # a shipped name, a JSON file or a directory; raises ValueError otherwise
    for sp in spec.sps:
        if sp < 1:
            raise ValueError(f"--world-sizes: sp must be >= 1, got {sp}")
        for T in spec.seq_lens:
            if T % (2 * sp):
                raise ValueError(f"--seq-lens {T}: must be a multiple of 2 x sp = {2 * sp} (zigzag halves)")
    if spec.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {spec.repeats}")


def _config(name: str):
    from lasp2.hf.loading import load_config

    base, overrides = MODELS.get(name, (name, {}))
    return load_config(base, **overrides)


def _run_once(name: str, T: int, mode: str, spec: TrainerSpec, out: str) -> dict:
    """One Trainer run of STEPS steps on this rank; its timed step times and peak RSS."""
    import datasets
    import torch
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lasp2.hf import sequence_parallel
    from lasp2.hf.loading import build_model, use_torch_kernels
    from lasp2.parallel import comm

    from .rss import RssPeak, libc_or_none

    W = dist.get_world_size()
    config = _config(name)
    torch.manual_seed(0)
    model = build_model(config)
    if mode == "ddp":
        use_torch_kernels(model)  # transformers' PyTorch kernels (fla's need a GPU); SP layers never call them
    length, rows = (T, STEPS) if mode.startswith("sp@") else (T // W, STEPS * W)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (rows, length), generator=gen).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, max_steps=STEPS, learning_rate=1e-4,
                             logging_steps=10 ** 6, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                             disable_tqdm=True, bf16=spec.bf16, dataloader_drop_last=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    if mode.startswith("sp@"):
        sequence_parallel(trainer, sp=W, layout=mode.split("@")[1])
    elif mode == "ddp-lasp2":
        sequence_parallel(trainer, sp=1, layout="contiguous")
    stamps, waits = [], []

    class Clock(TrainerCallback):  # step end to step end: the batch, its sharding and the whole step
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())
            waits.append(log.waited_s)

    trainer.add_callback(Clock())
    libc = libc_or_none()
    if libc is not None:
        libc.malloc_trim(0)  # earlier runs' freed memory back to the OS: the peak below is this run's
    dist.barrier()
    with RssPeak() as peak, comm.track() as log:  # log: the time blocked in lasp2's collectives
        trainer.train()
    return {"times": [b - a for a, b in zip(stamps, stamps[1:])], "waits": [b - a for a, b in zip(waits, waits[1:])],
            "peak_mb": peak.mb}


def _rank(name: str, T: int, modes: List[str], spec: TrainerSpec) -> dict:
    """Body of one spawned rank: every mode, ``spec.repeats`` times, interleaved."""
    import os

    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    # accelerate (inside TrainingArguments) learns the world from torchrun's variables; the group exists
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    found = {m: {"times": [], "waits": [], "peak_mb": 0.0} for m in modes}
    with tempfile.TemporaryDirectory(prefix="lasp2-bench-trainer-") as out:
        for r in range(spec.repeats):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                one = _run_once(name, T, mode, spec, out)
                found[mode]["times"] += one["times"]
                found[mode]["waits"] += one["waits"]
                found[mode]["peak_mb"] = max(found[mode]["peak_mb"], one["peak_mb"])
    return found


def run(spec: TrainerSpec, progress: bool = True) -> List[dict]:
    """One record per (model, T, sp, mode); ``ratio`` = the ddp median over this mode's."""
    from lasp2.launch import spawn

    records = []
    for name in spec.models:
        params = sum(p.numel() for p in _build_meta(name))
        for T in spec.seq_lens:
            for sp in spec.sps:
                modes = list(BASELINES) + ([f"sp@{layout}" for layout in spec.layouts] if sp > 1 else [])
                ranks = spawn(_rank, sp, name, T, modes, spec, threads_per_rank=1, timeout_s=3600)
                # a step takes as long as its slowest rank: the max over ranks, step by step
                med = {m: statistics.median([max(t) for t in zip(*(rk[m]["times"] for rk in ranks))]) for m in modes}
                for mode in modes:
                    steps = [max(t) for t in zip(*(rk[mode]["times"] for rk in ranks))]
                    rec = {"suite": "trainer", "model": name, "parameters": params, "T": T, "sp": sp, "W": sp,
                           "mode": mode, "tokens_per_rank": T // sp, "step_s": med[mode], "steps_timed": len(steps),
                           "step_s_min": min(steps), "step_s_max": max(steps),
                           "peak_rss_mb": max(rk[mode]["peak_mb"] for rk in ranks),
                           # seconds per step blocked in lasp2's collectives (SP layers, the same-data check),
                           # median over steps of the mean over ranks: waiting for the other ranks included
                           "sp_comm_wait_s": statistics.median(
                               [sum(w) / len(w) for w in zip(*(rk[mode]["waits"] for rk in ranks))]),
                           **{f"ratio_vs_{b.replace('-', '_')}": med[b] / med[mode] for b in BASELINES}}
                    records.append(rec)
                    if progress:
                        print(f"{name} T={T} sp={sp} {mode}: step {med[mode]:.3f} s (vs ddp {rec['ratio_vs_ddp']:.3f}, "
                              f"vs ddp-lasp2 {rec['ratio_vs_ddp_lasp2']:.3f}), peak {rec['peak_rss_mb']:.0f} MB",
                              flush=True)
    return records


def _build_meta(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(_config(name)).parameters())


def markdown(records: List[dict], meta: dict) -> str:
    lines = ["# lasp2 bench --suite trainer", "", f"`{meta['command']}`", "",
             f"{meta['hardware']}; torch {meta['torch']}, transformers {meta.get('transformers')}; "
             f"{meta.get('load', '')}", "",
             "ddp: the unmodified model (transformers' CPU kernels), plain DDP, each rank its own T/W-token "
             "sequence; ddp-lasp2: the same with lasp2's kernels (sequence_parallel(sp=1)); sp@layout: "
             "lasp2.hf.sequence_parallel(sp=W), one T-token sequence over W ranks. Median step time over "
             f"{STEPS - 1} timed steps x repeats (max over ranks), runs interleaved; ratio = baseline / this "
             "(target >= 0.90 at sp = 2).", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines += ["| model | params | T | sp | mode | tokens/rank | step (s) | min-max (s) | in SP comm (s) | "
              "peak RSS/rank (MB) | ratio vs ddp | ratio vs ddp-lasp2 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['T']} | {r['sp']} | {r['mode']} | "
                     f"{r['tokens_per_rank']} | {r['step_s']:.3f} | {r['step_s_min']:.3f}-{r['step_s_max']:.3f} | "
                     f"{r['sp_comm_wait_s']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['ratio_vs_ddp']:.3f} | {r['ratio_vs_ddp_lasp2']:.3f} |")
    return "\n".join(lines) + "\n"


def run_cli(args, usage) -> int:
    """``lasp2 bench --suite trainer`` (flags: --hf-config A,B --seq-lens --world-sizes --layout --repeats
    --dtype float32|bfloat16 --quick --out --note --quiet)."""
    import os
    import shlex
    import sys

    import torch
    import transformers

    from lasp2.launch import RankFailure

    from . import report

    foreign = [f for f, v in {"--local-lens": args.local_lens, "--strategies": args.strategies,
                              "--variants": args.variants, "--presets": args.presets, "--shapes": args.shapes,
                              "--heads": args.heads, "--dim": args.dim, "--kv-heads": args.kv_heads,
                              "--batch": args.batch != 1, "--warmup": args.warmup}.items() if v]
    if foreign:
        raise usage(ValueError(f"{', '.join(foreign)}: not a flag of --suite trainer"))
    if args.dtype not in (None, "float32", "bfloat16"):
        raise usage(ValueError("--suite trainer: --dtype float32 or bfloat16 (bf16=True autocast)"))
    base = QUICK if args.quick else DEFAULT
    spec = TrainerSpec(models=tuple(args.hf_config.split(",")) if args.hf_config else base["models"],
                       seq_lens=tuple(args.seq_lens or base["seq_lens"]), sps=tuple(args.world_sizes or base["sps"]),
                       layouts=("contiguous", "zigzag") if args.layout == "both" else (args.layout,),
                       repeats=args.repeats or base["repeats"], bf16=args.dtype == "bfloat16")
    try:
        check(spec)
    except ValueError as e:
        raise usage(e) from None
    out = args.out or report.default_out("trainer")
    meta = {"command": "lasp2 " + shlex.join(args.argv), "torch": torch.__version__,
            "transformers": transformers.__version__, "hardware": report.hardware(),
            "load": "load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "config": asdict(spec), "note": args.note}
    try:
        records = run(spec, not args.quiet)
    except RankFailure as e:
        out.mkdir(parents=True, exist_ok=True)
        (out / "failure.txt").write_text(e.traceback or str(e))
        print(f"lasp2 bench: error: {e} (traceback in {out / 'failure.txt'})", file=sys.stderr)
        return 1
    meta["load"] += "; at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    md = markdown(records, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    (out / "results.md").write_text(md)
    if not args.quiet:
        print(md)
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    return 0
