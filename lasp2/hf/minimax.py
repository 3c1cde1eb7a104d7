"""MiniMax (MiniMax-Text-01): Lightning attention layers + softmax attention layers.

The forward below is transformers' ``MiniMaxLightningAttention.forward`` for whole sequences, with
the layer's own ``qkv_proj`` (SiLU on q, k, v), RMSNorm, sigmoid ``output_gate`` and
``out_proj``; the block-wise decayed scan is replaced by ``lasp2.sp_linear_attention`` with the
constant per-head decay g = -slope_rate (the layer's ``slope_rate`` buffer) and scale 1 (the
layer applies no 1/sqrt(d)). State update per token: S_t = exp(-slope) S_{t-1} + k_t^T v_t,
o_t = q_t S_t, which is what the blocks compute (``query_decay``, ``key_decay``,
``diagonal_decay``). The softmax layers run unchanged with ``attn_implementation="lasp2"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import batch_context, linear_core


def lightning_forward(layer, hidden_states, position_embeddings=None, attention_mask=None,
                      past_key_values=None, **kwargs):
    """Replacement forward of ``MiniMaxLightningAttention``: returns (output, None)."""
    batch_size, seq_len, _ = hidden_states.shape
    H, D = layer.num_attention_heads, layer.head_dim
    qkv = layer.act_fn(layer.qkv_proj(hidden_states)).reshape(batch_size, seq_len, H, 3 * D)
    query, key, value = torch.split(qkv, D, dim=3)
    g = (-layer.slope_rate.reshape(1, 1, H)).expand(batch_size, seq_len, H)
    out = linear_core(layer._lasp2, query, key, value, g, scale=1.0, batch=batch_context(layer, kwargs))
    out = layer.norm(out.reshape(batch_size, seq_len, H * D))
    out = F.sigmoid(layer.output_gate(hidden_states)) * out
    return layer.out_proj(out), None
