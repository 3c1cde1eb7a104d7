"""Falcon-H1: every layer runs a Mamba2 mixer and softmax attention **in parallel** on the same
normed input, outputs scaled and summed, with µP multipliers throughout.

The mixer forward below is transformers' ``FalconH1Mixer.forward`` for whole sequences: the
input scaled by ``ssm_in_multiplier``, ``in_proj``, the projection scaled by the layer's
``mup_vector`` (the ``ssm_multipliers`` of z, x, B, C, dt), then Bamba's Mamba2 mapping
(``sp_causal_conv1d`` + the SSD scan as ``sp_linear_attention``, ``bamba.mamba2_mix``), then the
gated RMSNorm (``mamba_rms_norm``) or ``y * silu(z)``, ``out_proj``. The attention branch, the
decoder layer's in/out multipliers, ``key_multiplier``, the embedding and LM-head multipliers
all run unchanged (both branches see the same SP shard; attention through ``"lasp2"``).
"""
from __future__ import annotations

import torch.nn.functional as F

from .bamba import mamba2_mix


def _gated(y, gate):
    return y * F.silu(gate)


def falcon_h1_mixer_forward(layer, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Replacement forward of ``FalconH1Mixer``."""
    projected = layer.in_proj(hidden_states * layer.ssm_in_multiplier) * layer.mup_vector
    return mamba2_mix(layer, projected, hidden_states.dtype, kwargs, layer.norm if layer.mamba_rms_norm else _gated)
