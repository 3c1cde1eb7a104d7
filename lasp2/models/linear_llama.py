"""Linear-Llama3: Llama 3 with some or all softmax attention layers replaced by linear attention.

    input_ids [B, T] -> embedding -> blocks -> RMSNorm -> LM head -> logits [B, T, vocab]
    block: x = x + attn(norm(x)); x = x + mlp(norm(x))   (pre-norm; attn per ``layer_types``)

Single-device code: ``lasp2.parallelize`` makes it sequence/data parallel from outside. Then T is
this rank's share of the sequence (``lasp2.shard``) and ``cu_seqlens`` stays global.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import LinearAttention, RMSNorm, SoftmaxAttention, SwiGLU
from .config import LinearLlamaConfig


class Block(nn.Module):
    """One pre-norm residual block; ``layer_type`` 'L' (linear) or 'N' (softmax attention)."""

    def __init__(self, config: LinearLlamaConfig, layer_type: str):
        super().__init__()
        c = config
        self.layer_type = layer_type
        self.attn_norm = RMSNorm(c.hidden, c.norm_eps)
        if layer_type == "L":
            self.attn = LinearAttention(c.hidden, c.heads, c.head_dim, c.linear_variant, feature_dim=c.feature_dim,
                                        gate_low_rank=c.gate_low_rank, norm_eps=c.norm_eps)
        else:
            self.attn = SoftmaxAttention(c.hidden, c.heads, c.kv_heads, c.head_dim, rope_theta=c.rope_theta)
        self.mlp_norm = RMSNorm(c.hidden, c.norm_eps)
        self.mlp = SwiGLU(c.hidden, c.mlp_hidden)

    def forward(self, x: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None, batch=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cu_seqlens=cu_seqlens, batch=batch)
        return x + self.mlp(self.mlp_norm(x))


class LinearLlama(nn.Module):
    """The model. ``LinearLlama(config, seed=0, device="cpu")``.

    Parameters are created on the meta device and then materialised on ``device`` and
    initialised from ``seed`` with a private generator: the same seed gives the same weights
    (on the same kind of device) and the global RNG is never touched. ``device="meta"`` leaves
    the model unmaterialised (call ``to_empty(device=...)`` and then ``init_weights(seed)``, which
    also re-ties the embeddings).

    ``activation_checkpointing`` (default False; ``lasp2.parallelize(..., activation_checkpointing=True)``
    sets it): when grad is enabled, every block is called through ``torch.utils.checkpoint``
    (non-reentrant), so only block inputs stay alive between forward and backward and each block
    is recomputed in backward. Parameter names do not change.
    """

    def __init__(self, config: LinearLlamaConfig, *, seed: int = 0, device="cpu"):
        super().__init__()
        if not isinstance(config, LinearLlamaConfig):
            raise ValueError(f"config must be a LinearLlamaConfig, got {type(config).__name__}; "
                             f"e.g. LinearLlamaConfig.preset('debug')")
        self.config = config
        self.activation_checkpointing = False
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden)
            self.layers = nn.ModuleList(Block(config, t) for t in config.layer_types)
            self.norm = RMSNorm(config.hidden, config.norm_eps)
            self.output = nn.Linear(config.hidden, config.vocab_size, bias=False)
        self._tie()
        if torch.device(device).type != "meta":
            self.to_empty(device=device)
            self.init_weights(seed)

    def _tie(self) -> None:
        # Also called by init_weights: to_empty gives the two modules separate tensors.
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init: normal(0, init_std); the residual-stream writes (attention o_proj,
        MLP w2) use init_std / sqrt(2 * layers) so the residual variance does not grow with depth."""
        c = self.config
        self._tie()
        gen = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        out_std = c.init_std / math.sqrt(2 * c.layers)
        nn.init.normal_(self.tok_embeddings.weight, 0.0, c.init_std, generator=gen)
        for block in self.layers:
            block.attn_norm.init_weights()
            block.attn.init_weights(gen, c.init_std, out_std)
            block.mlp_norm.init_weights()
            block.mlp.init_weights(gen, c.init_std, out_std)
        self.norm.init_weights()
        if not c.tie_embeddings:
            nn.init.normal_(self.output.weight, 0.0, c.init_std, generator=gen)

    def forward(self, input_ids: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                batch=None) -> torch.Tensor:
        """input_ids [B, T] int -> logits [B, T, vocab_size] in the parameters' dtype.

        cu_seqlens: global cumulative document lengths [N + 1] (B == 1): linear-attention states
        reset, softmax attention stays within each document and RoPE positions restart at each
        document start.
        batch: under sequence parallelism, this batch's context (``lasp2.SPBatch.build``) in place
        of cu_seqlens: positions and documents fixed once per batch, no value checks or host syncs
        in the layers.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an int tensor [B, T], got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        x = self.tok_embeddings(input_ids)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:
                x = checkpoint(block, x, cu_seqlens=cu_seqlens, batch=batch, use_reentrant=False)
            else:
                x = block(x, cu_seqlens=cu_seqlens, batch=batch)
        return self.output(self.norm(x))

    def num_params(self) -> int:
        """Distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())
