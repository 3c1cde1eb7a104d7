"""Training checkpoints: tensors and plain containers only, loaded with ``weights_only=True``.

    OUT/checkpoints/step-000100/
        meta.json      format, step, the run's config, world (dp, sp), torch version, sha256 of each file
        model.pt       model state_dict (the module inside DDP; replicated on every rank)
        optimizer.pt   AdamW state_dict
        rng.pt         {"cpu": [W, n] uint8, "cuda": [W, m] uint8 or absent}: every rank's RNG state

Rank 0 writes into ``step-XXXXXX.tmp`` and renames it when complete, so a crash mid-save never
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
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(out: str, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:06d}"


def save(out: str, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         rng: Dict[str, torch.Tensor], config: Dict[str, Any], world: Dict[str, int]) -> Path:
    """Write the checkpoint of ``step`` (call on rank 0 only); returns its directory."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({k: v.cpu() for k, v in rng.items()}, tmp / "rng.pt")
    meta = {"format": FORMAT, "version": VERSION, "step": step, "config": config, "world": world,
            "torch": torch.__version__, "sha256": {name: _sha256(tmp / name) for name in FILES}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


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
    for name in FILES:
        path = ckpt / name
        if not path.is_file():
            raise ValueError(f"checkpoint {ckpt}: {name} is missing")
        if _sha256(path) != meta.get("sha256", {}).get(name):
            raise ValueError(f"checkpoint {ckpt}: {name} is corrupt (its sha256 differs from meta.json); "
                             f"resume from an earlier checkpoint")
    return meta


def check_compatible(meta: Dict[str, Any], cfg, ckpt: Path) -> None:
    """ValueError unless the checkpoint was written by a run this config can continue."""
    world = meta.get("world", {})
    if (world.get("dp"), world.get("sp")) != (cfg.dp, cfg.sp):
        raise ValueError(f"checkpoint {ckpt} was written by dp={world.get('dp')} x sp={world.get('sp')}; this run "
                         f"has dp={cfg.dp} x sp={cfg.sp}; resume with the same --dp/--sp")
    diff = cfg.trajectory_diff(meta.get("config", {}))
    if diff:
        shown = "; ".join(f"--{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"checkpoint {ckpt} belongs to a different run ({shown}); resume with the same flags "
                         f"(only --steps, --out, --save-every, --log-every, --timeout-s, --plot, --device may change)")
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
