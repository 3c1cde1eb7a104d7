"""Training checkpoints: tensors and plain containers only, loaded with ``weights_only=True``.

Two kinds, named by ``meta.json``'s "kind". DDP runs write a single-file checkpoint (the
parameters are replicated, rank 0 writes them)::

    OUT/checkpoints/step-000100/
        meta.json      format, kind "single-file", step, the run's config, world (dp, sp), torch
                       version, sha256 of each file
        model.pt       model state_dict (the module inside DDP; replicated on every rank)
        optimizer.pt   AdamW state_dict
        rng.pt         {"cpu": [W, n] uint8, "cuda": [W, m] uint8 or absent}: every rank's RNG state

FSDP2 runs write a sharded checkpoint with ``torch.distributed.checkpoint`` (DCP): every rank
writes its own shards of the model and the optimizer state; nothing is gathered to one rank::

    OUT/checkpoints/step-000100/
        meta.json      as above with kind "sharded", sha256 of rng.pt and the size of every DCP file
        dcp/           .metadata + one __<rank>_0.distcp file per rank (model and optimizer shards)
        rng.pt         as above

A sharded checkpoint loads at any dp x sp and under DDP too: DCP reads, on each rank, exactly the
slices that rank's parameters and optimizer state need (resharding). The RNG states are restored
only at the same world size; training draws no random numbers after the model's initialisation
(the data of a step depend only on (seed, step)), so a resharded run continues the same
trajectory up to the floating-point order of the new reductions.

Rank 0 writes into ``step-<step, 6 digits>.tmp`` and renames it when complete, so a crash mid-save never
leaves a half checkpoint under a final name. Loading never runs code from the file:
``torch.load(..., weights_only=True)`` only rebuilds tensors, dicts, lists and numbers, and
``meta.json`` is JSON. A file whose sha256 differs from ``meta.json`` (truncated, overwritten) or
that cannot be read is a ``ValueError`` naming it. Every rank reads the checkpoint from the same
path, so on several nodes OUT must be on a shared file system.

The data position is the step number: the data of a step depends only on (seed, step).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

FORMAT, VERSION = "lasp2-train-checkpoint", 1
FILES = ("model.pt", "optimizer.pt", "rng.pt")
SINGLE_FILE, SHARDED = "single-file", "sharded"
KIND_FILES = {SINGLE_FILE: FILES, SHARDED: ("rng.pt",)}
DCP_DIR = "dcp"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(out: str, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:06d}"


def _tmp_dir(out: str, step: int) -> Path:
    final = checkpoint_dir(out, step)
    return final.with_name(final.name + ".tmp")


def save(out: str, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         rng: Dict[str, torch.Tensor], config: Dict[str, Any], world: Dict[str, int]) -> Path:
    """Write the single-file checkpoint of ``step`` (call on rank 0 only); returns its directory."""
    tmp = prepare_dir(out, step)
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    return _finish(out, step, SINGLE_FILE, rng=rng, config=config, world=world)


def prepare_dir(out: str, step: int) -> Path:
    """Create an empty ``step-<step, 6 digits>.tmp`` (rank 0 only, before the ranks write into it)."""
    tmp = _tmp_dir(out, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_sharded(out: str, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group) -> None:
    """Every rank of ``group`` writes its shards of the model and optimizer state (DCP) into the
    step's temporary directory, which rank 0 must have made with :func:`prepare_dir` before a
    collective that every rank entered after it. Rank 0 then calls :func:`finish_sharded`.

    Communication: DCP's own planning collectives over ``group`` (a gather and a broadcast of the
    save plans, a gather of the write results); tensor data is only written to files.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=_tmp_dir(out, step) / DCP_DIR,
             process_group=group)


def finish_sharded(out: str, step: int, *, rng: Dict[str, torch.Tensor], config: Dict[str, Any],
                   world: Dict[str, int]) -> Path:
    """Rank 0, after every rank's :func:`save_sharded` returned: meta.json, rng.pt, rename."""
    return _finish(out, step, SHARDED, rng=rng, config=config, world=world)


def _dcp_files(ckpt: Path) -> Dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted((ckpt / DCP_DIR).iterdir()) if p.is_file()}


def _finish(out: str, step: int, kind: str, *, rng, config, world) -> Path:
    final, tmp = checkpoint_dir(out, step), _tmp_dir(out, step)
    torch.save({k: v.cpu() for k, v in rng.items()}, tmp / "rng.pt")
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "step": step, "config": config, "world": world,
            "torch": torch.__version__, "sha256": {name: _sha256(tmp / name) for name in KIND_FILES[kind]}}
    if kind == SHARDED:
        meta["dcp_files"] = _dcp_files(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_sharded(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group) -> None:
    """Load a sharded checkpoint into ``model`` and ``optimizer`` in place, whatever their
    sharding (FSDP2 at any dp x sp, or a DDP replica): each rank reads the slices it holds.
    A checkpoint whose tensors do not fit the model (names or shapes) is a ValueError on every rank.

    Communication: DCP's planning collectives over ``group`` (as in :func:`save_sharded`).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=ckpt / DCP_DIR, process_group=group)
    # DCP gathers every rank's planning error and raises CheckpointException (a BaseException, not
    # an Exception) on every rank; I/O problems surface as RuntimeError / OSError.
    except (CheckpointException, Exception) as e:  # noqa: BLE001
        cause = next(iter(getattr(e, "failures", {}).values()), e)  # a rank's own error, when DCP has one
        cause = cause[0] if isinstance(cause, tuple) else cause  # DCP keeps (exception, stack summary)
        first = str(cause).strip().splitlines()
        raise ValueError(f"checkpoint {ckpt}: its sharded state does not fit this model and optimizer "
                         f"({type(cause).__name__}: {first[0] if first else ''}); resume with the flags of the run "
                         f"that wrote it") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def find(path: str) -> Path:
    """The checkpoint directory ``path`` names: a checkpoint itself, or the latest step of a run's
    output directory. ValueError when there is none."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    steps = []
    if (p / "checkpoints").is_dir():
        steps = [(int(m.group(1)), d) for d in (p / "checkpoints").iterdir()
                 if (m := _STEP_DIR.match(d.name)) and (d / "meta.json").is_file()]
    if not steps:
        raise ValueError(f"--resume {path!r}: no checkpoint there (expected a run directory with "
                         f"checkpoints/step-NNNNNN/meta.json, or such a step directory)")
    return max(steps)[1]


def read_meta(ckpt: Path) -> Dict[str, Any]:
    """meta.json of a checkpoint, checked for format and intact files (ValueError otherwise)."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {ckpt}: meta.json is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {ckpt}: meta.json is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ValueError(f"checkpoint {ckpt}: format version {meta.get('version')!r}, this lasp2 reads {VERSION}")
    kind = meta.setdefault("kind", SINGLE_FILE)  # checkpoints from before sharded ones were single-file
    if kind not in KIND_FILES:
        raise ValueError(f"checkpoint {ckpt}: unknown kind {kind!r} in meta.json")
    if kind == SHARDED:
        if not (ckpt / DCP_DIR).is_dir() or _dcp_files(ckpt) != meta.get("dcp_files"):
            raise ValueError(f"checkpoint {ckpt}: the files of {DCP_DIR}/ are missing or differ in size from "
                             f"meta.json (truncated or overwritten); resume from an earlier checkpoint")
    for name in KIND_FILES[kind]:
        path = ckpt / name
        if not path.is_file():
            raise ValueError(f"checkpoint {ckpt}: {name} is missing")
        if _sha256(path) != meta.get("sha256", {}).get(name):
            raise ValueError(f"checkpoint {ckpt}: {name} is corrupt (its sha256 differs from meta.json); "
                             f"resume from an earlier checkpoint")
    return meta


def check_compatible(meta: Dict[str, Any], cfg, ckpt: Path) -> None:
    """ValueError unless the checkpoint was written by a run this config can continue.

    A sharded (DCP) checkpoint may be resumed at another dp x sp and with either --data-parallel;
    a single-file one needs the same dp x sp and DDP."""
    world = meta.get("world", {})
    sharded = meta.get("kind", SINGLE_FILE) == SHARDED
    if not sharded and (world.get("dp"), world.get("sp")) != (cfg.dp, cfg.sp):
        raise ValueError(f"checkpoint {ckpt} was written by dp={world.get('dp')} x sp={world.get('sp')}; this run "
                         f"has dp={cfg.dp} x sp={cfg.sp}; resume with the same --dp/--sp (single-file DDP "
                         f"checkpoints do not reshard; sharded --data-parallel fsdp2 ones do)")
    if not sharded and getattr(cfg, "data_parallel", "ddp") != "ddp":
        raise ValueError(f"checkpoint {ckpt} is a single-file DDP checkpoint; resume it with --data-parallel ddp")
    diff = cfg.trajectory_diff(meta.get("config", {}))
    if sharded:  # DCP reshards: the mesh and the DP wrapper may change
        for name in ("dp", "sp", "data_parallel"):
            diff.pop(name, None)
    if diff:
        shown = "; ".join(f"--{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"checkpoint {ckpt} belongs to a different run ({shown}); drop those flags: --resume "
                         f"takes the run's configuration from the checkpoint, and only --steps, --out, --save-every, "
                         f"--log-every, --timeout-s, --plot, --device, --tuned-allocator may change")
    if meta["step"] >= cfg.steps:
        raise ValueError(f"checkpoint {ckpt} is at step {meta['step']}, already >= --steps {cfg.steps}; "
                         f"raise --steps to train further")


def load_file(ckpt: Path, name: str, device: Optional[torch.device] = None) -> Any:
    """torch.load with weights_only=True; any failure is a ValueError naming the file."""
    try:
        return torch.load(ckpt / name, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"checkpoint {ckpt}: {name} cannot be loaded safely ({type(e).__name__}: {first})") from None
