"""Configs and models from local files only (no network): the tiny configs shipped under
``lasp2/hf/configs`` (one per family: ``config_names()``, e.g. ``qwen3-next-tiny``, ``mamba2-tiny``),
any config JSON, and safetensors weights in a local directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


def config_names():
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str, **overrides):
    """A transformers config from a shipped name, a JSON file, or a directory with config.json.

    ``overrides`` replace fields (e.g. ``num_hidden_layers=2``). Raises ValueError naming the
    shipped configs when nothing matches.
    """
    from transformers import AutoConfig

    path = Path(name_or_path)
    if (CONFIG_DIR / f"{name_or_path}.json").is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"hf config {name_or_path!r} is neither a shipped config ({', '.join(config_names())}) "
                         f"nor a JSON file / directory with config.json")
    fields = json.loads(path.read_text())
    if "model_type" not in fields:
        raise ValueError(f"{path} has no 'model_type' field; it is not a transformers config")
    fields.update(overrides)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


_ATTENTION_FREE = ("mamba", "mamba2", "falcon_mamba")  # transformers model types without softmax attention


def _has_attention(config) -> bool:
    return getattr(config, "model_type", None) not in _ATTENTION_FREE


def build_model(config, *, weights: Optional[str] = None, dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None):
    """An ``AutoModelForCausalLM`` from ``config`` (random init under the caller's seed), or with
    the safetensors weights of the local directory ``weights``. Softmax attention runs with
    ``sdpa`` and MoE experts with the ``eager`` loop (both exact in fp64) until ``parallelize``
    swaps in lasp2's SP attention. Models without softmax attention (Mamba, Mamba2), which
    refuse ``sdpa``, are built with ``eager`` (which they never use)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(attn_implementation="sdpa" if _has_attention(config) else "eager", experts_implementation="eager")
    if weights is not None:
        if not Path(weights).is_dir() or not any(Path(weights).glob("*.safetensors")):
            raise ValueError(f"--hf-weights {weights!r} must be a local directory holding *.safetensors")
        model = AutoModelForCausalLM.from_pretrained(weights, config=config, dtype=dtype, local_files_only=True,
                                                     **kwargs)
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # buffers computed at init (decays, slopes) in the model's dtype
        try:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        finally:
            torch.set_default_dtype(previous)
        model = model.to(dtype)
    return model if device is None else model.to(device)


def use_torch_kernels(model) -> None:
    """Make ``model``'s family run transformers' own PyTorch kernels (its fallbacks) in this
    process, instead of fla / causal-conv1d / mamba_ssm kernels that transformers picks when those
    packages are installed and that need a GPU. For CPU baselines of an *unmodified* model (the
    parallelized layers never call these kernels). Affects every model of that family in this
    process; a no-op for kernels that already are the PyTorch ones."""
    import transformers

    from .compat import torch_fallbacks
    from .families import family_of

    torch_fallbacks(family_of(model).modeling(), transformers.__version__)
