"""Kimi Linear: KDA layers (the per-channel gated delta rule) + MLA softmax layers (no RoPE).

The KDA forward below is transformers' ``KimiLinearDeltaAttention.forward`` for whole sequences,
with the layer's own projections, forget gate (``forget_gate``: -exp(A_log) softplus(W_b W_a x +
dt_bias), per channel), beta = sigmoid(b_proj(x)), gated RMSNorm (``o_norm``, sigmoid gate
g_b_proj(g_a_proj(x))) and output projection, and two calls replaced:

- ``causal_conv1d_forward(conv1d, [q | k | v], activation)`` -> ``lasp2.sp_causal_conv1d``;
- ``chunk_kimi_delta_attention(..., use_qk_l2norm_in_kernel=True)`` -> transformers' ``l2norm`` of
  q and k, scale K**-0.5, ``lasp2.sp_linear_attention(q, k, v, g, beta)`` with g [B, T, H, K]: KDA
  (S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, the gate first, as
  transformers' and fla's recurrences).

The MLA forward is transformers' ``KimiLinearAttention.forward`` (q from ``q_proj`` or the q
LoRA, the latent c = kv_a_layernorm(kv part of ``kv_a_proj_with_mqa``) and the shared key part
k_rot, K and V by the layer's own ``expand_kv``) with the attention function replaced: when the
softmax strategy is "allgather" and the latent [c | k_rot] (kv_lora_rank + qk_rope_head_dim values
per token) is smaller than the up-projected K and V (H (qk_head_dim + v_head_dim)), by
``lasp2.parallel.mla.sp_mla_attention``, which all-gathers the latent and expands it on every
rank; otherwise by ``lasp2.sp_softmax_attention`` on the expanded K, V (any softmax strategy).
``mla_inputs`` / ``mla_attend`` are shared with Ling's ``bailing_hybrid`` (MLA with RoPE), whose KDA
layers run ``kda_forward`` too.
"""
from __future__ import annotations

import torch

from ..parallel import strategies
from ..parallel.api import sp_softmax_attention
from ..parallel.mla import sp_mla_attention
from .common import batch_context
from .qwen3_next import _conv, gated_delta_core


def kda_forward(layer, l2norm, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Replacement forward of ``KimiLinearDeltaAttention``."""
    batch_size, seq_len, _ = hidden_states.shape
    sp = batch_context(layer, kwargs)
    shape = (batch_size, seq_len, -1, layer.head_dim)
    mixed = torch.cat([layer.q_proj(hidden_states), layer.k_proj(hidden_states), layer.v_proj(hidden_states)], dim=-1)
    q, k, v = (x.reshape(shape) for x in torch.split(_conv(layer, mixed, sp), [layer.qkv_dim] * 3, dim=-1))
    g = layer.forget_gate(hidden_states)  # [B, T, H, K] (fp32 in Kimi Linear: transformers computes it so)
    beta = torch.sigmoid(layer.b_proj(hidden_states))
    core = gated_delta_core(layer, l2norm, q, k, v, g, beta, sp)
    # the output gate: low rank in Kimi Linear, one projection in Ling's bailing_hybrid
    gate = layer.g_proj(hidden_states) if hasattr(layer, "g_proj") else layer.g_b_proj(layer.g_a_proj(hidden_states))
    return layer.o_proj(layer.o_norm(core, gate.view(shape)).reshape(batch_size, seq_len, -1))


def latent_is_smaller(layer) -> bool:
    """Whether one token's latent [c | k_rot] has fewer values than its up-projected K and V."""
    latent = layer.kv_lora_rank + layer.qk_rope_head_dim
    return latent < layer.num_heads * (layer.qk_head_dim + layer.v_head_dim)


def mla_inputs(layer, hidden_states):
    """The MLA layer's own q [B, T, H, Dk] and latent parts: c = kv_a_layernorm(kv part) [B, T, r]
    and the shared key part k_rot [B, T, Dr] (before any RoPE)."""
    batch_size, seq_len = hidden_states.shape[:-1]
    if layer.q_lora_rank is None:
        q = layer.q_proj(hidden_states)
    else:
        q = layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(hidden_states)))
    kv_nope, k_rot = torch.split(layer.kv_a_proj_with_mqa(hidden_states), [layer.kv_lora_rank, layer.qk_rope_head_dim],
                                 dim=-1)
    return q.view(batch_size, seq_len, -1, layer.qk_head_dim), layer.kv_a_layernorm(kv_nope), k_rot


def mla_attend(layer, q, c, k_rot, kwargs):
    """o [B, T, H, Dv] of the MLA layer over the SP group, from q [B, T, H, Dk] and the latent
    [c | k_rot] (RoPE already applied where the model applies it): ``sp_mla_attention`` or the
    expanded K/V through ``sp_softmax_attention`` (module docstring)."""
    ctx, sp = layer._lasp2, batch_context(layer, kwargs)
    if layer.training and layer.attention_dropout:
        raise ValueError(f"attention dropout {layer.attention_dropout} is not supported under sequence parallelism; "
                         f"set config.attention_dropout = 0 (or call model.eval())")
    latent = torch.cat([c, k_rot], dim=-1)  # [B, T, R]

    def expand(lat):
        """[B', T', R] -> k [B', T', H, Dk], v [B', T', H, Dv] by the layer's own expand_kv."""
        c, rot = torch.split(lat, [layer.kv_lora_rank, layer.qk_rope_head_dim], dim=-1)
        k, v = layer.expand_kv(c.unsqueeze(1), rot.unsqueeze(1))
        return k.transpose(1, 2), v.transpose(1, 2)

    # The latent all-gather replaces the K/V all-gather of LASP-2H only: other softmax strategies
    # (ring, ulysses) move the expanded K/V their own way.
    if strategies.softmax(ctx.softmax_strategy).pattern == "all-gather" and latent_is_smaller(layer):
        return sp_mla_attention(q, latent, expand, scale=layer.scaling, batch=sp)
    k, v = expand(latent)
    return sp_softmax_attention(q, k, v, scale=layer.scaling, strategy=ctx.softmax_strategy, batch=sp)


def mla_forward(layer, hidden_states, attention_mask=None, cache=None, **kwargs):
    """Replacement forward of ``KimiLinearAttention`` (no RoPE; returns (output, None) as it does)."""
    batch_size, seq_len = hidden_states.shape[:-1]
    q, c, k_rot = mla_inputs(layer, hidden_states)
    o = mla_attend(layer, q, c, k_rot, kwargs)
    return layer.o_proj(o.reshape(batch_size, seq_len, -1)), None
