"""Saving and restoring a run's training state (model, optimizer, RNG, step) on every rank.

``--data-parallel ddp`` writes single-file checkpoints from rank 0; ``fsdp2`` writes sharded DCP
checkpoints from every rank (``lasp2.train.checkpoint`` describes both). Either is restored by
:func:`restore`, which every rank calls with the same arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..parallel import comm
from . import checkpoint
from .config import TrainConfig


def restore(cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group,
            device: torch.device, rank: int, world: int) -> int:
    """Load ``cfg.resume`` into ``model`` / ``optimizer`` (and the RNG); return its step.

    Every check runs on every rank before any collective, so a checkpoint this run cannot continue
    is the same ValueError on every rank, never a hang.

    Communication: none for a single-file checkpoint; DCP's planning collectives for a sharded one.
    """
    ckpt = checkpoint.find(cfg.resume)
    meta = checkpoint.read_meta(ckpt)
    checkpoint.check_compatible(meta, cfg, ckpt)
    if meta["kind"] == checkpoint.SHARDED:
        checkpoint.load_sharded(ckpt, model, optimizer, group)
    else:
        model.load_state_dict(checkpoint.load_file(ckpt, "model.pt", device))
        optimizer.load_state_dict(checkpoint.load_file(ckpt, "optimizer.pt", device))
    rng = checkpoint.load_file(ckpt, "rng.pt")
    if rng["cpu"].shape[0] == world:
        # clone(): set_rng_state reads a row view of [W, n] from the start of its storage and
        # segfaults (torch 2.13), so hand it a tensor of its own.
        torch.set_rng_state(rng["cpu"][rank].clone())
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"][rank].clone())
    elif meta["kind"] != checkpoint.SHARDED:
        raise ValueError(f"checkpoint {ckpt}: rng.pt holds {rng['cpu'].shape[0]} ranks, this run has {world}")
    # (A resharded run starts from its own RNG state: training draws no random numbers after init.)
    return int(meta["step"])


def save(cfg: TrainConfig, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group,
         device: torch.device, rank: int) -> Optional[Path]:
    """Write the checkpoint of ``step`` (every rank calls it); rank 0 returns its directory.

    Communication: 1 all-gather of the RNG states over ``group`` (also the point after which the
    temporary directory rank 0 prepared exists for everyone); sharded: DCP's collectives.
    """
    sharded = cfg.data_parallel == "fsdp2"
    if sharded and rank == 0:
        checkpoint.prepare_dir(cfg.out, step)
    rng = {"cpu": comm.all_gather(torch.get_rng_state().to(device), group)}
    if device.type == "cuda":
        rng["cuda"] = comm.all_gather(torch.cuda.get_rng_state(device).to(device), group)
    world = {"dp": cfg.dp, "sp": cfg.sp}
    if sharded:
        checkpoint.save_sharded(cfg.out, step, model=model, optimizer=optimizer, group=group)
        return checkpoint.finish_sharded(cfg.out, step, rng=rng, config=cfg.to_dict(), world=world) \
            if rank == 0 else None
    if rank != 0:
        return None
    return checkpoint.save(cfg.out, step, model=model, optimizer=optimizer, rng=rng, config=cfg.to_dict(), world=world)
