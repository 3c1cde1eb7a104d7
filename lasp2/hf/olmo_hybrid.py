"""OLMo hybrid: Gated DeltaNet layers (separate q / k / v projections, a short conv, an output
gate ``g_proj`` with a gated RMSNorm) + softmax attention (q/k RMSNorm, RoPE).

The forward below is transformers' ``OlmoHybridGatedDeltaNet.forward`` for whole sequences with
the layer's own parameters; the conv is ``lasp2.sp_causal_conv1d`` and
``torch_chunk_gated_delta_rule(use_qk_l2norm_in_kernel=True)`` is Qwen3-Next's mapping
(``qwen3_next.gated_delta_core``: l2norm on q, k, scale K^-1/2, ``sp_linear_attention(q, k, v, g,
beta)``). beta = sigmoid(b_proj(x)), doubled when ``linear_allow_neg_eigval`` (the config's
default): beta in [0, 2], so I - beta k k^T has the eigenvalue 1 - beta in [-1, 1] along the unit
key; lasp2's delta rule takes beta in [0, 2] and is exact for it (never clamped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import batch_context
from .qwen3_next import _conv, gated_delta_core


def olmo_hybrid_gdn_forward(layer, l2norm, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Replacement forward of ``OlmoHybridGatedDeltaNet``."""
    batch_size, seq_len, _ = hidden_states.shape
    sp = batch_context(layer, kwargs)
    mixed = torch.cat([layer.q_proj(hidden_states), layer.k_proj(hidden_states), layer.v_proj(hidden_states)], dim=-1)
    q, k, v = torch.split(_conv(layer, mixed, sp), [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    q = q.reshape(batch_size, seq_len, -1, layer.head_k_dim)
    k = k.reshape(batch_size, seq_len, -1, layer.head_k_dim)
    v = v.reshape(batch_size, seq_len, -1, layer.head_v_dim)
    beta = layer.b_proj(hidden_states).sigmoid()
    if layer.allow_neg_eigval:
        beta = beta * 2.0
    g = -layer.A_log.float().exp() * F.softplus(layer.a_proj(hidden_states).float() + layer.dt_bias)
    out = gated_delta_core(layer, l2norm, q, k, v, g, beta, sp)
    gate = layer.g_proj(hidden_states)
    out = layer.o_norm(out.reshape(-1, layer.head_v_dim), gate.reshape(-1, layer.head_v_dim))
    return layer.o_proj(out.reshape(batch_size, seq_len, -1))
