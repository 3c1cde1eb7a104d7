"""LFM2 (Liquid): gated short-convolution layers + GQA softmax attention (q/k norms, RoPE).

The forward below is transformers' ``Lfm2ShortConv.forward`` for whole sequences with the layer's
own parameters: ``in_proj`` -> B | C | x, y = C * conv(B * x), ``out_proj``, where conv is the
depthwise causal conv (kernel ``conv_L_cache``, no activation) -> ``lasp2.sp_causal_conv1d`` (the
k - 1 boundary tokens from the sequence predecessor, one P2P exchange per layer and direction). No
scan: the conv is all the layer mixes. The attention layers run unchanged with ``"lasp2"``.
"""
from __future__ import annotations

from .common import batch_context, conv_core


def lfm2_conv_forward(layer, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Replacement forward of ``Lfm2ShortConv``."""
    sp = batch_context(layer, kwargs)
    B, C, x = layer.in_proj(hidden_states).chunk(3, dim=-1)
    return layer.out_proj(C * conv_core(layer.conv, B * x, sp, None))
