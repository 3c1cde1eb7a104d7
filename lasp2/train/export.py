"""``lasp2 export`` and ``lasp2 train --export-hf``: a ``lasp2 train --hf-config / --hf-weights``
checkpoint (single-file ``model.pt`` or sharded DCP) as a transformers directory that
``AutoModelForCausalLM.from_pretrained`` loads unmodified. The checkpoint is read here (the train
layer); the transformers side is ``lasp2.hf.export``."""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint


def export_checkpoint(checkpoint_path: str, out: str) -> Path:
    """Write the transformers model of the ``lasp2 train --hf-config`` checkpoint at
    ``checkpoint_path`` (a step directory, or a run directory: its latest step) to the new or
    empty directory ``out`` with ``save_pretrained`` (config.json + safetensors). Returns ``Path(out)``.

    ValueError (naming the fix) for a path without a checkpoint, a corrupt checkpoint, a
    checkpoint of a LinearLlama run (no transformers model to export), keys that do not fit, or an
    ``out`` that is a file or a non-empty directory. Communication: none (one process).
    """
    from ..hf.export import build_run_model, read_dcp_model, save_exported, strip_prefix

    try:
        ckpt = checkpoint.find(checkpoint_path)
    except ValueError as e:
        raise ValueError(str(e).replace("--resume", "--checkpoint", 1)) from None
    meta = checkpoint.read_meta(ckpt)
    run = meta.get("config") or {}
    source = run.get("hf_config") or run.get("hf_weights")
    if not source:
        raise ValueError(f"checkpoint {ckpt} is a LinearLlama run (no --hf-config / --hf-weights): lasp2 export "
                         f"writes transformers models; continue LinearLlama runs with lasp2 train --resume")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; choose a new directory")
    model = build_run_model(source, run.get("dtype", "float32"))
    if meta["kind"] == checkpoint.SHARDED:
        state = read_dcp_model(ckpt / checkpoint.DCP_DIR, ckpt, model)
    else:
        state = strip_prefix(checkpoint.load_file(ckpt, "model.pt", torch.device("cpu")), ckpt)
    return save_exported(model, state, ckpt, source, out)
