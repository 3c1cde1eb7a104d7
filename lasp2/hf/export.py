"""The transformers side of ``lasp2 export`` (``lasp2.train.export`` reads the checkpoint): the
model entries of a training checkpoint written as a transformers directory (``config.json`` +
safetensors, by ``save_pretrained``) that ``AutoModelForCausalLM.from_pretrained(dir)`` loads
unmodified.

The loop's wrapper holds the transformers model as ``.hf``, so every key of a
``lasp2 train --hf-config`` checkpoint carries the prefix ``hf.`` (single-file ``model.pt`` and
the "model" entries of a sharded DCP directory alike). The unmodified model is rebuilt from the
run's config (the shipped name, JSON or directory given to ``--hf-config`` / ``--hf-weights``),
every parameter and buffer is loaded strictly (a missing or unexpected key is a ValueError), and
it is saved in the dtype it was trained in (fp32 for ``--dtype bfloat16``: fp32 weights under
autocast). One process, no process group.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

PREFIX = "hf."  # the loop's wrapper holds the transformers model as ``.hf``
_DTYPES = {"float32": torch.float32, "bfloat16": torch.float32, "float64": torch.float64}


def strip_prefix(state: Dict[str, torch.Tensor], ckpt: Path) -> Dict[str, torch.Tensor]:
    """The transformers model's own keys: ``hf.`` removed (ValueError if a key lacks it)."""
    foreign = [k for k in state if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(f"checkpoint {ckpt}: keys without the {PREFIX!r} prefix of a --hf-config run "
                         f"(e.g. {foreign[0]!r}); it was not written by lasp2 train --hf-config")
    return {k[len(PREFIX):]: v for k, v in state.items()}


def read_dcp_model(dcp_dir: Path, ckpt: Path, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model entries of the DCP checkpoint in ``dcp_dir``, read on this one process into
    tensors shaped like ``model``'s (no process group); ``ckpt`` names it in errors."""
    import torch.distributed.checkpoint as dcp

    want = {f"{PREFIX}{k}": torch.empty_like(v) for k, v in model.state_dict().items()}
    state = {"model": want}
    try:
        dcp.load(state, checkpoint_id=dcp_dir, no_dist=True)
    except BaseException as e:  # DCP raises CheckpointException (a BaseException) for missing keys
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        first = str(e).strip().splitlines()
        raise ValueError(f"checkpoint {ckpt}: its sharded model state does not fit the model of its config "
                         f"({type(e).__name__}: {first[0] if first else ''})") from None
    return strip_prefix(state["model"], ckpt)


def build_run_model(source: str, dtype_name: str) -> torch.nn.Module:
    """The unmodified transformers model of a run (``--hf-config`` / ``--hf-weights`` ``source``,
    ``--dtype`` ``dtype_name``), initialised; its weights are replaced by ``save_exported``."""
    from .loading import build_model, load_config

    return build_model(load_config(source), dtype=_DTYPES.get(dtype_name, torch.float32))


def save_exported(model: torch.nn.Module, state: Dict[str, torch.Tensor], ckpt: Path, source: str, out: str) -> Path:
    """Load ``state`` (the model's own keys) into ``model`` strictly and ``save_pretrained`` it
    (safetensors) into the new or empty directory ``out``. ValueError when keys do not fit or
    ``out`` is a file or a non-empty directory."""
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; choose a new directory")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"checkpoint {ckpt} does not fit the model of its config {source!r}: missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    return target
