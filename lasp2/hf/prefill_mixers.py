"""The prefill forwards of every family's mixers: the SP forward of the family's adapter
(``qwen3_next.py``, ``bamba.py``, ...: the model's own projections, gates and norms around
``lasp2.sp_causal_conv1d`` and ``lasp2.sp_linear_attention``) that also writes the layer's states
after the last prompt token into a transformers ``Cache`` (``store``), in the layout the model's own decode
path reads:

| mixer | conv state (``update_conv_state``) | recurrent state (``update_recurrent_state``) |
|---|---|---|
| Gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo hybrid) | [B, C, k] pre-conv q|k|v | [B, Hv, K, V] = lasp2's |
| Mamba2 SSD (Bamba, Mamba2, Nemotron-H, Granite, Falcon-H1, Zamba2) | [B, C, k] pre-conv x|B|C | [B, H, P, N]: lasp2's [B, H, N, P] transposed |
| Mamba1 (Mamba, Falcon-Mamba, Jamba) | [B, I, k] pre-conv x | [B, I, N]: lasp2's [B, I, N, 1], in the model's dtype |
| Lightning (MiniMax) | — | [B, H, D, D] = lasp2's, in the model's dtype (``MiniMaxCache``) |
| LFM2 short conv | [B, C, k] pre-conv B*x | — |
| KDA (Kimi Linear, Ling hybrid) | [B, C, k] pre-conv q|k|v | [B, H, K, V] = lasp2's (g per channel) |

MLA layers (Kimi Linear, Ling hybrid) cache the latent as transformers does (``cache.update``):
keys = c [B, 1, P, r], values = k_rot [B, 1, P, Dr] (``store_latent``).

transformers keeps the recurrent states in fp32 whatever the model's dtype (its scans compute in
fp32; Mamba1's and MiniMax's in the model's dtype), and the conv states in the model's dtype; the prefill stores them so. The conv state holds
k inputs, of which the decode step reads the last k - 1 (``sp_causal_conv1d`` returns those); the
oldest slot is never read and is stored as 0.

Communication: per mixer, that of its SP ops (the conv's halo P2P, the linear strategy's
all-gather); the states add none (every rank already holds them after the all-gather). An MLA
layer adds 1 all-gather of its latent [B, T, r + Dr].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.common import compute_dtype
from .common import STATE_DTYPE, batch_context, conv_maybe_storing, linear_core

# ---- Gated DeltaNet -------------------------------------------------------------------------------

def _gdn_core(layer, l2norm, mixed, g, beta, sp, store, out, split=None):
    """After the projections and gates: conv (+ state), split (``split``, default Qwen's
    ``_split_qkv``), the delta rule (+ state), ``out``."""
    from .qwen3_next import _split_qkv

    batch_size, seq_len, _ = mixed.shape
    y = conv_maybe_storing(layer, layer.conv1d, mixed, sp, layer.activation, store)
    query, key, value = (split or (lambda y: _split_qkv(layer, y, batch_size, seq_len)))(y)
    rep = value.shape[2] // key.shape[2]
    if rep != 1:
        query, key = query.repeat_interleave(rep, dim=2), key.repeat_interleave(rep, dim=2)
    cdt = compute_dtype(value.dtype)
    query, key = l2norm(query.to(cdt), dim=-1, eps=1e-6), l2norm(key.to(cdt), dim=-1, eps=1e-6)
    core, state = linear_core(layer._lasp2, query, key, value, g, beta, scale=query.shape[-1] ** -0.5, batch=sp,
                              output_final_state=True)
    store.update_recurrent_state(state.to(STATE_DTYPE), layer.layer_idx)
    return out(core)


def qwen3_next_prefill(layer, l2norm, store, hidden_states, *args, **kwargs):
    """``qwen3_next.qwen3_next_gdn_forward`` + the layer's states into ``store``."""
    from .qwen3_next import _finish, _gates

    batch_size, seq_len, _ = hidden_states.shape
    sp = batch_context(layer, kwargs)
    query, key, value, z, b, a = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(hidden_states),
                                                                     layer.in_proj_ba(hidden_states))
    mixed = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value)], dim=-1)
    return _gdn_core(layer, l2norm, mixed, *_gates(layer, a, b), sp, store,
                     lambda core: _finish(layer, core, z, batch_size, seq_len))


def qwen3_5_prefill(layer, l2norm, store, hidden_states, *args, **kwargs):
    """``qwen3_next.qwen3_5_gdn_forward`` + the layer's states into ``store``."""
    from .qwen3_next import _finish, _gates

    batch_size, seq_len, _ = hidden_states.shape
    sp = batch_context(layer, kwargs)
    z = layer.in_proj_z(hidden_states).reshape(batch_size, seq_len, -1, layer.head_v_dim)
    b, a = layer.in_proj_b(hidden_states), layer.in_proj_a(hidden_states)
    return _gdn_core(layer, l2norm, layer.in_proj_qkv(hidden_states), *_gates(layer, a, b), sp, store,
                     lambda core: _finish(layer, core, z, batch_size, seq_len))


def olmo_hybrid_prefill(layer, l2norm, store, hidden_states, *args, **kwargs):
    """``olmo_hybrid.olmo_hybrid_gdn_forward`` + the layer's states into ``store``."""
    batch_size, seq_len, _ = hidden_states.shape
    sp = batch_context(layer, kwargs)
    mixed = torch.cat([layer.q_proj(hidden_states), layer.k_proj(hidden_states), layer.v_proj(hidden_states)], dim=-1)
    beta = layer.b_proj(hidden_states).sigmoid()
    if layer.allow_neg_eigval:  # refused by parallelize; kept as the adapter has it
        beta = beta * 2.0
    g = -layer.A_log.float().exp() * F.softplus(layer.a_proj(hidden_states).float() + layer.dt_bias)

    def out(core):
        gate = layer.g_proj(hidden_states)
        o = layer.o_norm(core.reshape(-1, layer.head_v_dim), gate.reshape(-1, layer.head_v_dim))
        return layer.o_proj(o.reshape(batch_size, seq_len, -1))

    return _gdn_core(layer, l2norm, mixed, g, beta, sp, store, out)


def kda_prefill(layer, l2norm, store, hidden_states, *args, **kwargs):
    """``kimi_linear.kda_forward`` (Kimi Linear, Ling hybrid) + the layer's states into ``store``:
    KDA's g is per channel, [B, T, H, K]; the state [B, H, K, V] as the Gated DeltaNet's."""
    batch_size, seq_len, _ = hidden_states.shape
    sp = batch_context(layer, kwargs)
    shape = (batch_size, seq_len, -1, layer.head_dim)
    mixed = torch.cat([layer.q_proj(hidden_states), layer.k_proj(hidden_states), layer.v_proj(hidden_states)], dim=-1)

    def out(core):
        gate = layer.g_proj(hidden_states) if hasattr(layer, "g_proj") else layer.g_b_proj(layer.g_a_proj(hidden_states))
        return layer.o_proj(layer.o_norm(core, gate.view(shape)).reshape(batch_size, seq_len, -1))

    return _gdn_core(layer, l2norm, mixed, layer.forget_gate(hidden_states), torch.sigmoid(layer.b_proj(hidden_states)),
                     sp, store, out, split=lambda y: [x.reshape(shape) for x in torch.split(y, [layer.qkv_dim] * 3, -1)])


# ---- MLA (Kimi Linear, Ling hybrid) ---------------------------------------------------------------

def store_latent(layer, store, c, k_rot, sp) -> None:
    """Write what transformers' MLA caches: the latent, not the expanded K/V: keys = c [B, 1, P, r]
    (after ``kv_a_layernorm``), values = k_rot [B, 1, P, Dr] (after RoPE where the model applies it),
    in sequence order. Communication: 1 all-gather of the latent [B, T, r + Dr] (the attention's own
    gather is inside ``sp_mla_attention``)."""
    from ..parallel import comm
    from ..parallel.softmax_allgather import kv_in_sequence_order

    gathered = comm.all_gather(torch.cat([c, k_rot], dim=-1).detach(), sp.group)  # [W, B, T, r + Dr]
    c_all, rot_all = kv_in_sequence_order(gathered.unsqueeze(3), sp.layout, layer.kv_lora_rank)  # [B, P, 1, .]
    store.update(c_all.transpose(1, 2), rot_all.transpose(1, 2), layer.layer_idx)


def kimi_mla_prefill(layer, store, hidden_states, *args, **kwargs):
    """``kimi_linear.mla_forward`` + the latent into ``store``."""
    from .kimi_linear import mla_attend, mla_inputs

    batch_size, seq_len = hidden_states.shape[:-1]
    q, c, k_rot = mla_inputs(layer, hidden_states)
    store_latent(layer, store, c, k_rot, batch_context(layer, kwargs))
    o = mla_attend(layer, q, c, k_rot, kwargs)
    return layer.o_proj(o.reshape(batch_size, seq_len, -1)), None


def bailing_mla_prefill(layer, modeling, store, hidden_states, position_embeddings=None, *args, **kwargs):
    """``bailing_hybrid.bailing_mla_forward`` + the latent (k_rot after RoPE) into ``store``."""
    from .kimi_linear import mla_attend, mla_inputs

    batch_size, seq_len = hidden_states.shape[:-1]
    q, c, k_rot = mla_inputs(layer, hidden_states)
    q_pass, q_rot = torch.split(q.transpose(1, 2), [layer.qk_nope_head_dim, layer.qk_rope_head_dim], dim=-1)
    cos, sin = position_embeddings
    q_rot, k_rot = modeling.apply_rotary_pos_emb_interleave(q_rot, k_rot.unsqueeze(1), cos, sin)
    q, k_rot = torch.cat((q_pass, q_rot), dim=-1).transpose(1, 2), k_rot.squeeze(1)
    store_latent(layer, store, c, k_rot, batch_context(layer, kwargs))
    o = mla_attend(layer, q, c, k_rot, kwargs)
    o = o * torch.sigmoid(layer.g_proj(hidden_states).float()).to(hidden_states.dtype).unsqueeze(-1)
    return layer.o_proj(o.reshape(batch_size, seq_len, -1)), None


# ---- Mamba2 SSD -----------------------------------------------------------------------------------

def mamba2_prefill(layer, store, hidden_states, *args, **kwargs):
    """``bamba.mamba2_forward`` + states (``bamba.mamba2_mix`` with ``store``)."""
    from .bamba import mamba2_mix

    return mamba2_mix(layer, layer.in_proj(hidden_states), hidden_states.dtype, kwargs, layer.norm, store)


def falcon_h1_prefill(layer, store, hidden_states, *args, **kwargs):
    """``falcon_h1.falcon_h1_mixer_forward`` + states."""
    from .bamba import mamba2_mix
    from .falcon_h1 import _gated

    projected = layer.in_proj(hidden_states * layer.ssm_in_multiplier) * layer.mup_vector
    return mamba2_mix(layer, projected, hidden_states.dtype, kwargs, layer.norm if layer.mamba_rms_norm else _gated,
                      store)


# ---- Mamba1, Lightning, LFM2 ----------------------------------------------------------------------

def mamba_prefill(layer, store, hidden_states, *args, **kwargs):
    """``mamba.mamba_forward`` + the conv state [B, I, k] and the scan state [B, I, N]."""
    from .mamba import mamba_forward

    return mamba_forward(layer, hidden_states, store=store, **kwargs)


def lightning_prefill(layer, store, hidden_states, *args, **kwargs):
    """``minimax.lightning_forward`` + the state [B, H, D, D] (``MiniMaxCache.set_linear_cache``)."""
    batch_size, seq_len, _ = hidden_states.shape
    H, D = layer.num_attention_heads, layer.head_dim
    qkv = layer.act_fn(layer.qkv_proj(hidden_states)).reshape(batch_size, seq_len, H, 3 * D)
    query, key, value = torch.split(qkv, D, dim=3)
    g = (-layer.slope_rate.reshape(1, 1, H)).expand(batch_size, seq_len, H)
    out, state = linear_core(layer._lasp2, query, key, value, g, scale=1.0, batch=batch_context(layer, kwargs),
                             output_final_state=True)
    store.set_linear_cache(layer.layer_idx, state.to(value.dtype))  # MiniMax keeps K^T V in the model's dtype
    out = layer.norm(out.reshape(batch_size, seq_len, H * D))
    out = torch.sigmoid(layer.output_gate(hidden_states)) * out
    return layer.out_proj(out), None


def lfm2_prefill(layer, store, hidden_states, *args, **kwargs):
    """``lfm2.lfm2_conv_forward`` + the conv state [B, C, k] of B * x."""
    sp = batch_context(layer, kwargs)
    B, C, x = layer.in_proj(hidden_states).chunk(3, dim=-1)
    bx = B * x
    return layer.out_proj(C * conv_maybe_storing(layer, layer.conv, bx, sp, None, store))
