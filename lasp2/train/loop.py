"""The training loop of ``lasp2 train``; one call of :func:`train` per rank.

Per step, on every rank of a (dp, sp) mesh:

1. the step's global batch is built from (seed, step) and this rank keeps its DP rows and its
   SP shard (``lasp2.train.data``);
2. forward/backward of the ``lasp2.parallelize``-d model, one micro-batch per packed text
   sequence (MQAR: one micro-batch), the loss being the mean over every counted token of the
   global batch (``lasp2.global_token_mean``, weighted across micro-batches);
3. gradient-norm clipping, AdamW with linear warm-up and cosine decay to ``lr * min_lr_ratio``;
4. rank 0 appends a line to ``OUT/metrics.jsonl`` and updates the progress bar; checkpoints
   every ``save_every`` steps and at the end.

**``no_state_passing`` (ablation).** ``parallelize(..., state_passing=False)`` gives the attention
modules no SP context (``module.sp is None``), so every layer runs the single-device op on this rank's
tokens only: linear layers call ``lasp2.linear_attention`` starting from a zero state, softmax
layers attend to local keys only. Each contiguous run of global tokens a rank holds is processed
as an independent sequence (one per rank under ``contiguous``; two under ``zigzag``, fed as two
rows of the batch, or split by document boundaries in the local ``cu_seqlens`` of packed text).
Packed documents keep their boundaries inside a run. RoPE positions restart at each run (local
positions), which leaves relative positions inside a run exact. Everything else -- data,
gradients (still averaged over all ranks by DDP or FSDP2), optimizer -- is unchanged, so the difference
from a normal run is exactly the information LASP-2 moves between ranks.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from ..models import LinearLlama
from ..models.parallelize import parallelize
from ..parallel import comm
from ..parallel.layout import Layout
from ..parallel.mesh import dp_sp_group, global_token_mean
from . import checkpoint, state
from .memory import ActivationPeak, state_bytes
from .config import TrainConfig
from .data import MicroBatch, RankData
from .packing import IGNORE_INDEX

# Per-rank bytes in every metrics row (the largest rank's): the state a rank holds, then the
# activation peak of the run's first step (lasp2/train/memory.py).
MEMORY_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_peak_bytes")
DTYPES = {"float32": torch.float32, "bfloat16": torch.float32, "float64": torch.float64}


def run_rank(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Entry point of a rank started by ``lasp2.launch.spawn`` (``config`` is ``to_dict()``)."""
    return train(TrainConfig.from_dict(config))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of ``step`` (1-based): linear warm-up, then cosine to lr * min_lr_ratio over
    ``schedule_steps`` (default: ``steps``), then constant (steps a resume added)."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    span = max(1, (cfg.schedule_steps or cfg.steps) - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and (not torch.cuda.is_available()
                                                         or dist.get_backend() != "nccl")):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu")
    return torch.device("cuda", torch.cuda.current_device())


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- the no-state-passing ablation ---------------------------------------------------------------


def local_runs_view(mb: MicroBatch, cfg: TrainConfig, sp_rank: int):
    """(tokens, cu_seqlens) that make each contiguous run of a rank's tokens an independent
    sequence when the attention modules have no SP context (see the module docstring)."""
    b, T = mb.tokens.shape
    lay = Layout(cfg.layout, cfg.sp, T)
    if mb.cu_seqlens is None:
        S = lay.segments_per_rank
        return mb.tokens.reshape(b * S, T // S), None
    cu = mb.cu_seqlens.tolist()
    bounds = {T}
    for seg in lay.local_segments(sp_rank):
        bounds.add(seg.local_start)
        bounds.update(c - seg.global_start + seg.local_start for c in cu
                      if seg.global_start < c < seg.global_start + seg.length)
    return mb.tokens, torch.tensor(sorted(bounds), dtype=torch.long, device=mb.tokens.device)


# ---- the loop ------------------------------------------------------------------------------------


class _Bar:
    """tqdm on rank 0 (nothing elsewhere)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            import threading

            from tqdm import tqdm

            # tqdm's default lock is a multiprocessing semaphore, which leaks (and makes the
            # resource tracker warn on stderr) when a failing run stops this rank.
            tqdm.set_lock(threading.RLock())
            self.bar = tqdm(total=total, initial=initial, desc="lasp2 train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, postfix: Optional[Dict[str, str]]):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _write_config(cfg: TrainConfig, out: Path, model: LinearLlama, world: int, backend: str, start_step: int,
                  placement: Dict[str, Any]):
    record = {"config": cfg.to_dict(), "model": model.config.to_dict(), "parameters": model.num_params(),
              "world": {"dp": cfg.dp, "sp": cfg.sp, "ranks": world, "backend": backend, **placement},
              "torch": torch.__version__, "resumed_from_step": start_step or None}
    (out / "config.json").write_text(json.dumps(record, indent=1))


def _placement(mesh, group, device: torch.device) -> Dict[str, Any]:
    """The (dp, sp) mesh of global ranks and the node of each rank (torchrun's GROUP_RANK; 0 when
    self-launched). torchrun gives each node a contiguous block of ranks and the mesh is
    row-major, so an SP group (a mesh row: consecutive ranks) stays inside a node whenever sp
    divides the ranks per node.

    Communication: 1 all-gather of one int64 per rank over ``group``.
    """
    node = torch.tensor([int(os.environ.get("GROUP_RANK", "0"))], dtype=torch.int64, device=device)
    nodes = comm.all_gather(node, group).flatten().tolist()  # group order = mesh order (row-major)
    return {"mesh": mesh.mesh.tolist(), "node_of_rank": {int(r): n for r, n in zip(mesh.mesh.flatten(), nodes)}}


def _metrics_file(out: Path, cfg: TrainConfig, start_step: int):
    """Open OUT/metrics.jsonl for appending; on resume keep the resumed run's rows up to start_step."""
    path = out / "metrics.jsonl"
    rows = []
    if start_step:
        source = checkpoint.find(cfg.resume).parents[1] / "metrics.jsonl"  # OUT/checkpoints/step-N
        if source.is_file():
            for line in source.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= start_step:
                        rows.append(line)
    path.write_text("".join(r + "\n" for r in rows))
    return open(path, "a")


def train(cfg: TrainConfig) -> Optional[Dict[str, Any]]:
    """Train on the current process group (every rank calls it). Rank 0 returns the summary."""
    t_start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg.resolve_world(world)
    device = pick_device(cfg)
    mesh = init_device_mesh(device.type, (cfg.dp, cfg.sp), mesh_dim_names=("dp", "sp"))
    sp_group, dp_rank, sp_rank = mesh["sp"].get_group(), mesh.get_local_rank("dp"), mesh.get_local_rank("sp")
    group = dp_sp_group(mesh)

    if cfg.hf:  # a transformers model (lasp2.hf), same loop
        from .hf_model import build_hf

        model, wrapped = build_hf(cfg, mesh, device, DTYPES[cfg.dtype])
    else:
        model = LinearLlama(cfg.model_config(), seed=cfg.seed, device=device).to(DTYPES[cfg.dtype])
        wrapped = parallelize(model, mesh, strategy=cfg.strategy, softmax_strategy=cfg.softmax_strategy,
                              layout=cfg.layout, data_parallel=cfg.data_parallel,
                              activation_checkpointing=cfg.activation_checkpointing,
                              state_passing=not cfg.no_state_passing, backend=cfg.backend)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.dtype == "bfloat16" \
        else contextlib.nullcontext
    loss_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32  # bf16 logits: the loss in fp32

    start_step = state.restore(cfg, model, optimizer, group, device, rank, world) if cfg.resume else 0
    placement = _placement(mesh, group, device)

    out = Path(cfg.out)
    metrics = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, out, model, world, dist.get_backend(), start_step, placement)
        metrics = _metrics_file(out, cfg, start_step)
    data = RankData(cfg, dp_rank=dp_rank, sp_group=sp_group)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = _Bar(rank == 0, cfg.steps, start_step)
    history: List[Dict[str, Any]] = []
    last_ckpt = None
    t_train = time.perf_counter()
    activation_peak = 0
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(cfg, step)
            for pg in optimizer.param_groups:
                pg["lr"] = lr
            micro = [MicroBatch(mb.tokens.to(device), mb.labels.to(device), mb.cu_seqlens,
                                None if mb.scored is None else mb.scored.to(device)) for mb in data.batch(step)]
            counts = torch.tensor([float((mb.labels != IGNORE_INDEX).sum()) for mb in micro],
                                  dtype=torch.float64, device=device)
            global_counts = comm.all_gather(counts, group).sum(0)  # [micro-batches]
            total = float(global_counts.sum())
            loss_value = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.float64, device=device)
            scored = torch.zeros((), dtype=torch.float64, device=device)
            # The activation peak is measured on this run's first step (exact bytes: train/memory.py);
            # later steps have the same shapes and run without the tracker's per-op bookkeeping.
            tracker = ActivationPeak() if step == start_step + 1 else None
            with tracker or contextlib.nullcontext():
                for i, mb in enumerate(micro):
                    with _grad_sync(wrapped, i == len(micro) - 1):
                        with autocast():
                            if cfg.no_state_passing:
                                tokens, cu = local_runs_view(mb, cfg, sp_rank)
                                logits = wrapped(tokens, cu_seqlens=cu).reshape(*mb.labels.shape, -1)
                            else:
                                logits = wrapped(mb.tokens, cu_seqlens=mb.cu_seqlens)
                            loss_sum = F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), mb.labels.flatten(),
                                                       ignore_index=IGNORE_INDEX, reduction="sum")
                        mask = mb.labels != IGNORE_INDEX
                        if mb.scored is not None:
                            mask &= mb.scored
                        correct += (logits.detach().argmax(-1)[mask] == mb.labels[mask]).sum().to(torch.float64)
                        scored += mask.sum().to(torch.float64)
                        del logits  # [b, T, vocab] need not outlive the loss: memory for long sequences
                        loss = global_token_mean(loss_sum, counts[i], group) * (float(global_counts[i]) / total)
                        loss.backward()
                    loss_value += loss.detach().to(torch.float64)
            if tracker is not None:
                activation_peak = tracker.peak_bytes(exclude=[p.grad for p in model.parameters() if p.grad is not None])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                       else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor reduced over the shards
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            held = state_bytes(model, optimizer)  # parameters, gradients, optimizer state (this rank's)
            optimizer.zero_grad(set_to_none=True)
            stats = torch.tensor([float(correct), float(scored), peak_memory_mb(device), held["param_bytes"],
                                  held["grad_bytes"], held["optimizer_bytes"], activation_peak],
                                 dtype=torch.float64, device=device)
            gathered = comm.all_gather(stats, group)  # [W, 7]; bytes < 2**53 are exact in fp64
            step_time = time.perf_counter() - t0
            accuracy = float(gathered[:, 0].sum() / gathered[:, 1].sum().clamp(min=1))
            worst = gathered.max(0).values  # memory: the largest rank
            row = {"step": step, "loss": float(loss_value), "accuracy": accuracy,
                   "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens_per_step,
                   "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                   "peak_mem_mb": float(worst[2]), "elapsed_s": time.perf_counter() - t_start,
                   **{key: int(worst[3 + j]) for j, key in enumerate(MEMORY_KEYS)}}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss became {row['loss']} at step {step}; lower --lr or check the data")
            if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
                last_ckpt = state.save(cfg, step, model, optimizer, group, device, rank)
            if rank == 0:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                history.append(row)
                show = step % cfg.log_every == 0 or step == cfg.steps
                bar.update({"loss": f"{row['loss']:.3f}", "acc": f"{row['accuracy']:.3f}",
                            "tok/s": f"{row['tokens_per_s']:.0f}"} if show else None)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if rank != 0:
        return None
    train_time = time.perf_counter() - t_train
    summary = {"out": str(out), "steps": cfg.steps, "start_step": start_step, "wall_s": time.perf_counter() - t_start,
               "train_s": train_time, "checkpoint": str(last_ckpt) if last_ckpt else None, "task": cfg.task,
               "world": world}
    if history:
        tail = history[-min(10, len(history)):]
        summary.update(final_loss=history[-1]["loss"], final_accuracy=history[-1]["accuracy"],
                       accuracy_last10=sum(r["accuracy"] for r in tail) / len(tail),
                       tokens_per_s=tokens_per_step * len(history) / train_time,
                       peak_mem_mb=max(r["peak_mem_mb"] for r in history),
                       **{key: history[0][key] for key in MEMORY_KEYS})
    if cfg.plot:
        summary["plot"] = plot_metrics(out)
    return summary


def _grad_sync(wrapped: torch.nn.Module, sync: bool):
    """Context for one micro-batch's backward: reduce gradients only on the last one."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    wrapped.set_requires_gradient_sync(sync)  # FSDP2: the flag holds until changed
    return contextlib.nullcontext()


def plot_metrics(out: Path) -> str:
    """OUT/loss.png (loss, and accuracy on a second panel) from metrics.jsonl; returns its path or
    a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped (matplotlib is not installed: pip install matplotlib)"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, [r["loss"] for r in rows])
    axes[0].set(xlabel="step", ylabel="loss (global token mean)", title="loss")
    axes[1].plot(steps, [r["accuracy"] for r in rows], color="tab:green")
    axes[1].set(xlabel="step", ylabel="accuracy", title="accuracy (MQAR: the queries; text: next token)", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
