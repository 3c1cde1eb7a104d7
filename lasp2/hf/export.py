"""``lasp2 export``: a ``lasp2 train --hf-config / --hf-weights`` checkpoint as a transformers
directory (``config.json`` + safetensors, written by ``save_pretrained``) that
``AutoModelForCausalLM.from_pretrained(dir)`` loads unmodified.

A training checkpoint holds the transformers model's own parameters: ``model.pt`` (single-file,
DDP runs) with every key prefixed ``hf.`` (the loop's wrapper ``HFCausalLM.hf``), or a sharded
DCP directory (``dcp/``, FSDP2 runs) whose "model" entries carry the same names. Export rebuilds
the unmodified model from the run's stored config (the shipped name, JSON or directory given to
``--hf-config`` / ``--hf-weights``), loads every parameter and buffer strictly (a missing or
unexpected key is a ValueError), and saves it in the dtype it was trained in (fp32 for
``--dtype bfloat16``: fp32 weights under autocast). One process, no process group.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

PREFIX = "hf."  # the loop's wrapper holds the transformers model as ``.hf``
_DTYPES = {"float32": torch.float32, "bfloat16": torch.float32, "float64": torch.float64}


def _strip(state: Dict[str, torch.Tensor], ckpt: Path) -> Dict[str, torch.Tensor]:
    foreign = [k for k in state if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(f"checkpoint {ckpt}: keys without the {PREFIX!r} prefix of a --hf-config run "
                         f"(e.g. {foreign[0]!r}); it was not written by lasp2 train --hf-config")
    return {k[len(PREFIX):]: v for k, v in state.items()}


def _sharded_state(ckpt: Path, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model entries of a DCP checkpoint, read on this one process into tensors shaped like
    ``model``'s (no process group)."""
    import torch.distributed.checkpoint as dcp

    from ..train.checkpoint import DCP_DIR

    want = {f"{PREFIX}{k}": torch.empty_like(v) for k, v in model.state_dict().items()}
    state = {"model": want}
    try:
        dcp.load(state, checkpoint_id=ckpt / DCP_DIR, no_dist=True)
    except BaseException as e:  # DCP raises CheckpointException (a BaseException) for missing keys
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        first = str(e).strip().splitlines()
        raise ValueError(f"checkpoint {ckpt}: its sharded model state does not fit the model of its config "
                         f"({type(e).__name__}: {first[0] if first else ''})") from None
    return _strip(state["model"], ckpt)


def export_checkpoint(checkpoint_path: str, out: str) -> Path:
    """Write the transformers model of the ``lasp2 train --hf-config`` checkpoint at
    ``checkpoint_path`` (a step directory, or a run directory: its latest step) to the directory
    ``out`` with ``save_pretrained`` (safetensors). Returns ``Path(out)``.

    ValueError (naming the fix) for a path without a checkpoint, a corrupt checkpoint, a
    checkpoint of a LinearLlama run (no transformers model to export), keys that do not fit, or an
    ``out`` that is a file or a non-empty directory. Communication: none.
    """
    from ..train import checkpoint
    from .loading import build_model, load_config

    try:
        ckpt = checkpoint.find(checkpoint_path)
    except ValueError as e:
        raise ValueError(str(e).replace("--resume", "--checkpoint", 1)) from None
    meta = checkpoint.read_meta(ckpt)
    run = meta.get("config") or {}
    source = run.get("hf_config") or run.get("hf_weights")
    if not source:
        raise ValueError(f"checkpoint {ckpt} is a LinearLlama run (no --hf-config / --hf-weights): lasp2 export "
                         f"writes transformers models; load LinearLlama checkpoints with lasp2 train --resume")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; choose a new directory")
    dtype = _DTYPES.get(run.get("dtype", "float32"), torch.float32)
    model = build_model(load_config(source), dtype=dtype)  # the run's architecture; weights replaced below
    if meta["kind"] == checkpoint.SHARDED:
        state = _sharded_state(ckpt, model)
    else:
        state = _strip(checkpoint.load_file(ckpt, "model.pt", torch.device("cpu")), ckpt)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"checkpoint {ckpt} does not fit the model of its config {source!r}: missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    return target
