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

The code follows those parts, as torchtitan's trainer does: ``build`` (model, optimizer, data,
checkpoint resume, the run's log) once, then per step ``train_step`` (schedule, batch, clipping,
optimizer, metrics row) around ``forward_backward`` (the micro-batches), and ``RunLog``
(``run_log.py``) for what rank 0 writes.

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
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from ..models import LinearLlama
from ..models.parallelize import parallelize
from ..parallel import comm
from ..parallel.batch import SPBatch
from ..parallel.layout import Layout
from ..parallel.mesh import dp_sp_group, global_token_mean
from . import state
from .config import TrainConfig
from .data import MicroBatch, RankData
from .memory import ActivationPeak, state_bytes
from .packing import IGNORE_INDEX
from .run_log import MEMORY_KEYS, RunLog

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


# ---- build ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One rank's run as ``build`` leaves it: what every step reads, and ``activation_peak``
    (bytes, measured on the run's first step and reported on every row)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    group: Any                      # the flattened dp x sp group: every rank of the run
    sp_rank: int
    model: torch.nn.Module          # the single-device model (parameters, checkpoints)
    wrapped: torch.nn.Module        # the parallelized one that runs (DDP or FSDP2)
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], Any]
    loss_dtype: torch.dtype
    start_step: int
    data: RankData
    log: RunLog
    t_start: float
    activation_peak: int = 0
    sp_group: Any = None            # the sequence-parallel group (a mesh row)


def _build_model(cfg: TrainConfig, mesh, device: torch.device):
    """(model, wrapped): the single-device model and the ``parallelize``-d module that runs."""
    if cfg.hf:  # a transformers model (lasp2.hf), same loop
        from .hf_model import build_hf

        return build_hf(cfg, mesh, device, DTYPES[cfg.dtype])
    model = LinearLlama(cfg.model_config(), seed=cfg.seed, device=device).to(DTYPES[cfg.dtype])
    wrapped = parallelize(model, mesh, strategy=cfg.strategy, softmax_strategy=cfg.softmax_strategy,
                          layout=cfg.layout, data_parallel=cfg.data_parallel,
                          activation_checkpointing=cfg.activation_checkpointing,
                          state_passing=not cfg.no_state_passing, backend=cfg.backend,
                          softmax_backend=cfg.softmax_backend)
    return model, wrapped


def _build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def build(cfg: TrainConfig) -> Run:
    """Everything before the first step, on every rank: the (dp, sp) mesh, model, optimizer,
    checkpoint resume, rank 0's OUT/config.json and metrics.jsonl, this rank's data.

    Communication: the resume's collectives (``state.restore``) and 1 all-gather of one int64
    per rank (the placement).
    """
    t_start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg.resolve_world(world)
    device = pick_device(cfg)
    mesh = init_device_mesh(device.type, (cfg.dp, cfg.sp), mesh_dim_names=("dp", "sp"))
    sp_group, dp_rank, sp_rank = mesh["sp"].get_group(), mesh.get_local_rank("dp"), mesh.get_local_rank("sp")
    group = dp_sp_group(mesh)
    model, wrapped = _build_model(cfg, mesh, device)
    optimizer = _build_optimizer(cfg, model)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.dtype == "bfloat16" \
        else contextlib.nullcontext
    loss_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32  # bf16 logits: the loss in fp32

    start_step = state.restore(cfg, model, optimizer, group, device, rank, world) if cfg.resume else 0
    placement = _placement(mesh, group, device)
    log = RunLog(cfg, rank, start_step)
    log.open(model, world, dist.get_backend(), placement)
    data = RankData(cfg, dp_rank=dp_rank, sp_group=sp_group)
    return Run(cfg, rank, world, device, group, sp_rank, model, wrapped, optimizer, autocast, loss_dtype,
               start_step, data, log, t_start, sp_group=sp_group)


# ---- one step ------------------------------------------------------------------------------------


@dataclass
class StepSums:
    """fp64 scalars a step accumulates over its micro-batches: this rank's share of the global
    loss, its correct predictions and its scored tokens (accuracy: the queries for MQAR)."""

    loss: torch.Tensor
    correct: torch.Tensor
    scored: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> "StepSums":
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)))


def forward_backward(run: Run, micro: List[MicroBatch], counts: torch.Tensor, global_counts: torch.Tensor,
                     sums: StepSums) -> None:
    """Forward and backward of this rank's micro-batches, gradients accumulated in the model and
    reduced over the data-parallel ranks on the last one. The loss is the mean over every counted
    token of the global batch: micro-batch i is weighted by its share of the global count.

    counts: fp64 [micro-batches], this rank's counted tokens; global_counts: the same summed over
    every rank. Adds into ``sums`` (allocated by the caller, outside the activation tracker).
    Communication: the model's (SP inside the layers, the gradient reduction), and one
    all-reduce per micro-batch in ``global_token_mean``.
    """
    cfg = run.cfg
    total = float(global_counts.sum())
    for i, mb in enumerate(micro):
        with _grad_sync(run.wrapped, i == len(micro) - 1):
            with run.autocast():
                if cfg.no_state_passing:
                    tokens, cu = local_runs_view(mb, cfg, run.sp_rank)
                    logits = run.wrapped(tokens, cu_seqlens=cu).reshape(*mb.labels.shape, -1)
                else:  # this micro-batch's SP context: positions and documents fixed once, not per layer
                    batch = SPBatch.build(run.sp_group, cfg.layout, mb.tokens.shape[1] * cfg.sp, mb.tokens.shape[0],
                                          cu_seqlens=mb.cu_seqlens, tokens=mb.tokens)
                    logits = run.wrapped(mb.tokens, batch=batch)
                loss_sum = F.cross_entropy(logits.flatten(0, 1).to(run.loss_dtype), mb.labels.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum")
            mask = mb.labels != IGNORE_INDEX
            if mb.scored is not None:
                mask &= mb.scored
            sums.correct += (logits.detach().argmax(-1)[mask] == mb.labels[mask]).sum().to(torch.float64)
            sums.scored += mask.sum().to(torch.float64)
            del logits  # [b, T, vocab] need not outlive the loss: memory for long sequences
            loss = global_token_mean(loss_sum, counts[i], run.group) * (float(global_counts[i]) / total)
            loss.backward()
        sums.loss += loss.detach().to(torch.float64)


def train_step(run: Run, step: int) -> Dict[str, Any]:
    """Step ``step`` (1-based) on every rank: learning rate, this rank's micro-batches,
    ``forward_backward``, clipping, the optimizer step; returns the metrics row (global loss and
    accuracy, the largest rank's memory). FloatingPointError when the loss is not finite.

    Communication: 1 all-gather of the micro-batches' token counts, ``forward_backward``'s, the
    gradient norm's (FSDP2), and 1 all-gather of 7 fp64 statistics per rank.
    """
    cfg, device, optimizer = run.cfg, run.device, run.optimizer
    t0 = time.perf_counter()
    lr = lr_at(cfg, step)
    for pg in optimizer.param_groups:
        pg["lr"] = lr
    micro = [MicroBatch(mb.tokens.to(device), mb.labels.to(device), mb.cu_seqlens,
                        None if mb.scored is None else mb.scored.to(device)) for mb in run.data.batch(step)]
    counts = torch.tensor([float((mb.labels != IGNORE_INDEX).sum()) for mb in micro],
                          dtype=torch.float64, device=device)
    global_counts = comm.all_gather(counts, run.group).sum(0)  # [micro-batches]
    sums = StepSums.zeros(device)
    # The activation peak is measured on this run's first step (exact bytes: train/memory.py);
    # later steps have the same shapes and run without the tracker's per-op bookkeeping.
    tracker = ActivationPeak() if step == run.start_step + 1 else None
    with tracker or contextlib.nullcontext():
        forward_backward(run, micro, counts, global_counts, sums)
    if tracker is not None:
        run.activation_peak = tracker.peak_bytes(exclude=[p.grad for p in run.model.parameters()
                                                          if p.grad is not None])
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                               else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor reduced over the shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    held = state_bytes(run.model, optimizer)  # parameters, gradients, optimizer state (this rank's)
    optimizer.zero_grad(set_to_none=True)
    stats = torch.tensor([float(sums.correct), float(sums.scored), peak_memory_mb(device), held["param_bytes"],
                          held["grad_bytes"], held["optimizer_bytes"], run.activation_peak],
                         dtype=torch.float64, device=device)
    gathered = comm.all_gather(stats, run.group)  # [W, 7]; bytes < 2**53 are exact in fp64
    step_time = time.perf_counter() - t0
    accuracy = float(gathered[:, 0].sum() / gathered[:, 1].sum().clamp(min=1))
    worst = gathered.max(0).values  # memory: the largest rank
    tokens_per_step = cfg.batch_size * cfg.seq_len
    row = {"step": step, "loss": float(sums.loss), "accuracy": accuracy,
           "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens_per_step,
           "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
           "peak_mem_mb": float(worst[2]), "elapsed_s": time.perf_counter() - run.t_start,
           **{key: int(worst[3 + j]) for j, key in enumerate(MEMORY_KEYS)}}
    if not math.isfinite(row["loss"]):
        raise FloatingPointError(f"loss became {row['loss']} at step {step}; lower --lr or check the data")
    return row


# ---- the loop ------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Optional[Dict[str, Any]]:
    """Train on the current process group (every rank calls it). Rank 0 returns the summary."""
    run = build(cfg)
    run.log.start_bar()
    last_ckpt = None
    t_train = time.perf_counter()
    try:
        for step in range(run.start_step + 1, cfg.steps + 1):
            row = train_step(run, step)
            if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
                last_ckpt = state.save(cfg, step, run.model, run.optimizer, run.group, run.device, run.rank)
            run.log.step(row)
    finally:
        run.log.close()
    if run.rank != 0:
        return None
    train_time = time.perf_counter() - t_train
    return run.log.summary(wall_s=time.perf_counter() - run.t_start, train_s=train_time, last_checkpoint=last_ckpt,
                           world=run.world)


def _grad_sync(wrapped: torch.nn.Module, sync: bool):
    """Context for one micro-batch's backward: reduce gradients only on the last one."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    wrapped.set_requires_gradient_sync(sync)  # FSDP2: the flag holds until changed
    return contextlib.nullcontext()
