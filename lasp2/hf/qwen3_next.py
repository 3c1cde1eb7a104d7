"""Qwen3-Next, Qwen3.5 and Qwen3.5-MoE: Gated DeltaNet layers + gated softmax attention (partial RoPE).

The Gated DeltaNet forward below is transformers' ``Qwen3NextGatedDeltaNet.forward`` /
``Qwen3_5GatedDeltaNet.forward`` (``Qwen3_5MoeGatedDeltaNet`` is the same code) for whole
sequences, with the layer's own projections, gates (``A_log``, ``dt_bias``), gated RMSNorm and
output projection, and two calls replaced:

- ``causal_conv1d_fn`` (kernel ``linear_conv_kernel_dim``) -> ``lasp2.sp_causal_conv1d``;
- ``torch_chunk_gated_delta_rule(..., use_qk_l2norm_in_kernel=True)`` -> the same L2 norm of q
  and k (transformers' ``l2norm``), key heads repeated to the value heads, scale K**-0.5, then
  ``lasp2.sp_linear_attention(q, k, v, g, beta)`` (LASP-2 over the SP group).

The softmax layers run unchanged with ``attn_implementation="lasp2"`` (``common.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import batch_context, compute_dtype, conv_core, linear_core


def gated_delta_core(layer, l2norm, query, key, value, g, beta, batch) -> torch.Tensor:
    """What ``torch_chunk_gated_delta_rule(use_qk_l2norm_in_kernel=True)`` computes, under SP.
    query/key [B, T, Hk, K], value [B, T, Hv, V], g/beta [B, T, Hv] -> o [B, T, Hv, V]; ``batch``
    this batch's SP context."""
    ctx = layer._lasp2
    rep = value.shape[2] // key.shape[2]
    if rep != 1:
        query, key = query.repeat_interleave(rep, dim=2), key.repeat_interleave(rep, dim=2)
    cdt = compute_dtype(value.dtype)
    query, key = l2norm(query.to(cdt), dim=-1, eps=1e-6), l2norm(key.to(cdt), dim=-1, eps=1e-6)
    return linear_core(ctx, query, key, value, g, beta, scale=query.shape[-1] ** -0.5, batch=batch)


def _conv(layer, mixed_qkv: torch.Tensor, batch) -> torch.Tensor:
    """transformers' causal_conv1d_fn (conv in the weight's dtype, activation, back) under SP."""
    return conv_core(layer.conv1d, mixed_qkv, batch, layer.activation)


def _finish(layer, core_attn_out, z, batch_size, seq_len):
    core_attn_out = layer.norm(core_attn_out.reshape(-1, layer.head_v_dim), z.reshape(-1, layer.head_v_dim))
    return layer.out_proj(core_attn_out.reshape(batch_size, seq_len, -1))


def _split_qkv(layer, mixed_qkv, batch_size, seq_len):
    query, key, value = torch.split(mixed_qkv, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    return (query.reshape(batch_size, seq_len, -1, layer.head_k_dim),
            key.reshape(batch_size, seq_len, -1, layer.head_k_dim),
            value.reshape(batch_size, seq_len, -1, layer.head_v_dim))


def _gates(layer, a, b):
    beta = b.sigmoid()
    # As transformers computes it (fp32 A_log and a, then promoted with dt_bias).
    g = -layer.A_log.float().exp() * F.softplus(a.float() + layer.dt_bias)
    return g, beta


def qwen3_next_gdn_forward(layer, l2norm, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """Replacement forward of ``Qwen3NextGatedDeltaNet`` (fused qkvz / ba projections)."""
    batch_size, seq_len, _ = hidden_states.shape
    sp = batch_context(layer, kwargs)
    query, key, value, z, b, a = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(hidden_states),
                                                                     layer.in_proj_ba(hidden_states))
    query, key, value = (x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value))
    mixed_qkv = _conv(layer, torch.cat((query, key, value), dim=-1), sp)
    query, key, value = _split_qkv(layer, mixed_qkv, batch_size, seq_len)
    g, beta = _gates(layer, a, b)
    core = gated_delta_core(layer, l2norm, query, key, value, g, beta, sp)
    return _finish(layer, core, z, batch_size, seq_len)


def qwen3_5_gdn_forward(layer, l2norm, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """Replacement forward of ``Qwen3_5GatedDeltaNet`` / ``Qwen3_5MoeGatedDeltaNet`` (separate
    qkv / z / b / a projections)."""
    batch_size, seq_len, _ = hidden_states.shape
    sp = batch_context(layer, kwargs)
    mixed_qkv = _conv(layer, layer.in_proj_qkv(hidden_states), sp)
    z = layer.in_proj_z(hidden_states).reshape(batch_size, seq_len, -1, layer.head_v_dim)
    b, a = layer.in_proj_b(hidden_states), layer.in_proj_a(hidden_states)
    query, key, value = _split_qkv(layer, mixed_qkv, batch_size, seq_len)
    g, beta = _gates(layer, a, b)
    core = gated_delta_core(layer, l2norm, query, key, value, g, beta, sp)
    return _finish(layer, core, z, batch_size, seq_len)
