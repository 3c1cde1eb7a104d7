"""The model factory of ``lasp2 train --hf-config / --hf-weights``: a transformers model from local
files, parallelized by ``lasp2.hf`` over the SP group and wrapped in DDP over dp x sp, behind the
same interface the loop uses for LinearLlama (``model(tokens, cu_seqlens=...) -> logits``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

from ..parallel.mesh import dp_sp_group


class HFCausalLM(torch.nn.Module):
    """A parallelized transformers causal LM seen as the loop's model: forward(tokens [b, T_local],
    cu_seqlens=None (global)) -> logits [b, T_local, vocab]; positions are the global ones.

    The loop's ranks draw the same batch by construction (the data of a step depend only on
    (seed, step)) and shard it in ``layout``; each forward builds that batch's SP context
    (``SPBatch``) for the model from the local tokens, without the same-data all-gather that
    ``lasp2.hf.shard_batch`` adds for batches it cannot vouch for."""

    def __init__(self, hf_model: torch.nn.Module, group, layout: str):
        super().__init__()
        self.hf = hf_model
        self.group, self.layout = group, layout

    @property
    def config(self):
        return self.hf.config

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, batch=None) -> torch.Tensor:
        from ..hf.common import SP_KEY
        from ..parallel.batch import SPBatch

        W = torch.distributed.get_world_size(self.group)
        sp = batch if batch is not None else SPBatch.build(self.group, self.layout, tokens.shape[1] * W,
                                                           tokens.shape[0], cu_seqlens=cu_seqlens, tokens=tokens)
        return self.hf(input_ids=tokens, **{SP_KEY: sp}).logits


def check_hf_config(cfg) -> None:
    """What a transformers run cannot combine with (ValueError naming the flag)."""
    from ..hf.loading import load_config

    for name in ("no_state_passing", "activation_checkpointing"):
        if getattr(cfg, name):
            raise ValueError(f"--{name.replace('_', '-')} is not supported with --hf-config / --hf-weights")
    if cfg.model or cfg.linear or cfg.layer_pattern:
        raise ValueError("the LinearLlama model flags (--hidden, --linear, --layer-pattern, ...) do not apply to "
                         "--hf-config / --hf-weights; edit the config JSON instead")
    if cfg.data_parallel != "ddp":
        raise ValueError("--hf-config / --hf-weights train with --data-parallel ddp")
    vocab = load_config(cfg.hf_config or cfg.hf_weights).vocab_size
    if cfg.task == "text":
        from .data import TEXT_VOCAB

        if vocab < TEXT_VOCAB:
            raise ValueError(f"--task text uses {TEXT_VOCAB} token ids but the hf config's vocab_size is {vocab}")
    if cfg.task == "tokens":
        from .tokens import inspect

        need = inspect(cfg.data).vocab_size
        if need is not None and need > vocab:
            raise ValueError(f"--data {cfg.data!r} holds token ids up to {need - 1} but the hf config's vocab_size "
                             f"is {vocab}; use a model whose vocabulary covers the tokenizer's")


def build_hf(cfg, mesh, device: torch.device, dtype: torch.dtype) -> Tuple[HFCausalLM, DistributedDataParallel]:
    """(model, DDP-wrapped model) for ``cfg``: seeded init (or ``--hf-weights``), lasp2.hf SP over
    ``mesh["sp"]``, DDP over dp x sp (MoE experts that get no token on a rank have no gradient
    there: ``find_unused_parameters`` for MoE models; the models' buffers are constants: no
    per-step broadcast)."""
    from .. import hf as lasp2_hf
    from ..hf.loading import build_model, load_config

    torch.manual_seed(cfg.seed)
    config = load_config(cfg.hf_config or cfg.hf_weights)
    model = build_model(config, weights=cfg.hf_weights, dtype=dtype, device=device)
    lasp2_hf.parallelize(model, mesh["sp"].get_group(), layout=cfg.layout, strategy=cfg.strategy,
                         softmax_strategy=cfg.softmax_strategy, backend=cfg.backend,
                         softmax_backend=cfg.softmax_backend)
    wrapped = HFCausalLM(model, mesh["sp"].get_group(), cfg.layout)
    import inspect

    # Buffers (RoPE frequencies, decay tables) are constants computed at init: never re-broadcast.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    moe = any(getattr(model.config, k, 0) for k in ("num_experts", "num_local_experts"))
    ddp = DistributedDataParallel(wrapped, process_group=dp_sp_group(mesh), find_unused_parameters=moe,
                                  device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    return wrapped, ddp
