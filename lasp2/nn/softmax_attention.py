"""Softmax attention layer (Llama 3): GQA, RoPE from global positions, causal."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..functional import softmax_attention
from ..ops.softmax_backends import SOFTMAX_BACKENDS
from ..validation import check_choice
from ..parallel import api as sp_api
from .context import SPContext, token_positions, where
from .rope import apply_rope, rope_tables


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with H query heads and ``kv_heads`` key/value heads.

    ``forward(x [B, T, hidden], *, cu_seqlens=None) -> [B, T, hidden]``.

    RoPE positions are the *global* positions of the local tokens (``token_positions``): under
    SP with the zigzag layout, a rank's second half sits at the end of the sequence and is rotated
    accordingly. With ``cu_seqlens`` positions restart at every document start (each packed
    document is encoded as if it were alone, which is what packed pre-training wants; the mask
    already keeps documents apart).

    ``backend``: the attention kernel, "auto" (flex on CUDA, else torch), "torch" or "flex"
    (``lasp2.ops.softmax_backends``).
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, rope_theta: float = 500000.0,
                 backend: str = "auto"):
        super().__init__()
        check_choice("backend", backend, SOFTMAX_BACKENDS)
        self.backend = backend  # an attribute: lasp2.parallelize(..., softmax_backend=...) may set it
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads}) for GQA")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.heads, self.kv_heads, self.head_dim, self.rope_theta = heads, kv_heads, head_dim, rope_theta
        self.sp: Optional[SPContext] = None  # set by lasp2.parallelize
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.init_weights()

    def init_weights(self, generator: Optional[torch.Generator] = None, std: float = 0.02,
                     out_std: Optional[float] = None) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, 0.0, std, generator=generator)
        nn.init.normal_(self.o_proj.weight, 0.0, std if out_std is None else out_std, generator=generator)

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """q [B, T, H, D], k, v [B, T, Hkv, D] from x [B, T, hidden], RoPE applied at the global
        ``positions`` (int64 [T]); ``lasp2.generate`` calls it with a cache's positions."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, T, self.heads, D)
        k = self.k_proj(x).view(B, T, self.kv_heads, D)
        v = self.v_proj(x).view(B, T, self.kv_heads, D)
        cos, sin = rope_tables(positions, D, self.rope_theta, torch.promote_types(x.dtype, torch.float32))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """Attention output o [B, T, H, D] -> o_proj -> [B, T, hidden]."""
        B, T = o.shape[:2]
        return self.o_proj(o.reshape(B, T, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None, batch=None) -> torch.Tensor:
        positions = token_positions(x.shape[1], self.sp, cu_seqlens, x.device, batch)
        q, k, v = self.project(x, positions)
        if self.sp is None:
            o = softmax_attention(q, k, v, cu_seqlens=cu_seqlens if batch is None else batch.cu_seqlens,
                                  backend=self.backend)
        else:
            o = sp_api.sp_softmax_attention(q, k, v, strategy=self.sp.strategy, backend=self.backend,
                                            **where(self.sp, cu_seqlens, batch))
        return self.output(o)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, rope_theta={self.rope_theta}, "
                f"backend={self.backend}")
