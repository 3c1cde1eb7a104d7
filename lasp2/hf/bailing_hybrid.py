"""Ling hybrid (transformers' ``bailing_hybrid``): KDA layers as Kimi Linear's (one output-gate
projection ``g_proj``; the forget gate's optional "safe gate" lb * sigmoid(...) is the module's own)
+ MLA with RoPE on the decoupled key and a head-wise sigmoid output gate.

The KDA layers run ``kimi_linear.kda_forward``. The MLA forward below is transformers'
``BailingHybridAttention.forward`` for whole sequences: q and the latent from the layer's own
modules, RoPE (``apply_rotary_pos_emb_interleave`` with the model's cos/sin of each token's *global*
position) on q's rope part and on k_rot *before* the latent leaves the rank (it is per token, so
gathering the rotated k_rot is exact), then ``kimi_linear.mla_attend`` (the latent all-gather, or
``sp_softmax_attention`` on the expanded K/V), the head-wise gate sigmoid(g_proj(x)) and ``o_proj``.
"""
from __future__ import annotations

import torch

from .kimi_linear import mla_attend, mla_inputs


def bailing_mla_forward(layer, modeling, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                        **kwargs):
    """Replacement forward of ``BailingHybridAttention`` (returns (output, None) as it does)."""
    batch_size, seq_len = hidden_states.shape[:-1]
    q, c, k_rot = mla_inputs(layer, hidden_states)
    q_pass, q_rot = torch.split(q.transpose(1, 2), [layer.qk_nope_head_dim, layer.qk_rope_head_dim], dim=-1)
    cos, sin = position_embeddings
    q_rot, k_rot = modeling.apply_rotary_pos_emb_interleave(q_rot, k_rot.unsqueeze(1), cos, sin)
    q = torch.cat((q_pass, q_rot), dim=-1).transpose(1, 2)  # [B, T, H, Dk]
    o = mla_attend(layer, q, c, k_rot.squeeze(1), kwargs)
    gate = torch.sigmoid(layer.g_proj(hidden_states).float()).to(hidden_states.dtype)
    o = o * gate.unsqueeze(-1)
    return layer.o_proj(o.reshape(batch_size, seq_len, -1)), None
