"""Mamba (Mamba1), Falcon-Mamba and Jamba: the selective scan as per-channel gated linear attention.

transformers' ``MambaMixer.forward`` / ``FalconMambaMixer.forward`` / ``JambaMambaMixer.forward``
(whole sequences, their torch path) with the layer's own parameters: ``in_proj`` -> x | z, the
depthwise conv (kernel ``conv_kernel``) -> ``lasp2.sp_causal_conv1d``, ``x_proj`` -> dt | B | C
(Falcon-Mamba and Jamba: their RMSNorms on dt, B, C), dt = softplus(dt_proj.weight dt + bias).
The selective scan, per channel d of the I = ``intermediate_size`` channels,

    h_t[d] = exp(dt_t[d] A[d]) ⊙ h_{t-1}[d] + dt_t[d] x_t[d] B_t,    y_t[d] = C_t · h_t[d] + D[d] x_t[d]

(h[d] in R^N, A = -exp(A_log) [I, N]) is lasp2's per-channel (diagonal) gate with **one head per
channel**: H = I heads, K = N, V = 1, q = C and k = B (shared by every channel), v = dt ⊙ x,
g = dt ⊗ A [B, T, I, N], scale 1, through ``lasp2.sp_linear_attention``. Then y ⊙ silu(z) and
``out_proj``. As transformers does, A_log, D and the dt bias enter in fp32.

Cost: the gate is [B, T, I, N] (what transformers materialises as ``discrete_A``); the state of
a layer is I x N per sequence, so LASP-2's one all-gather carries B * I * N fp32 per rank and layer
(64 KiB for I = 1024, N = 16): small next to the activations. The local work is the chunked
per-channel-gate op over I heads of K = N, V = 1, whose intra-chunk term is the recurrence inside
every chunk (``ops/chunk_recurrent.py``: C N work and N floats saved per token and channel, not
the C x C x N pair tensor). Measured (CPU, SP = 2, 256 tokens per rank, benchmarks/results):
0.25-0.6x the time of transformers' own torch path on the shard (a Python loop over tokens) and
1.6-2x its memory (the chunked copies of B, C and the gate per channel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import batch_context, compute_dtype, conv_maybe_storing, linear_core


def mamba_forward(layer, hidden_states, cache=None, attention_mask=None, store=None, **kwargs):
    """Replacement forward of ``MambaMixer``, ``FalconMambaMixer`` and ``JambaMambaMixer``.
    ``store``: a prefill's transformers ``Cache`` (``prefill.py``), else None; with it the conv
    state [B, I, k] and the scan state [B, I, N] (in the model's dtype, as transformers keeps it)
    after the last token are written there."""
    ctx, sp = layer._lasp2, batch_context(layer, kwargs)
    dtype = hidden_states.dtype
    batch_size, seq_len, _ = hidden_states.shape
    x, gate = layer.in_proj(hidden_states).chunk(2, dim=-1)
    x = conv_maybe_storing(layer, layer.conv1d, x, sp, layer.activation, store)
    dt, B, C = torch.split(layer.x_proj(x), [layer.time_step_rank, layer.ssm_state_size, layer.ssm_state_size], dim=-1)
    if hasattr(layer, "dt_layernorm"):  # Falcon-Mamba, Jamba
        dt, B, C = layer.dt_layernorm(dt), layer.b_layernorm(B), layer.c_layernorm(C)
    dt = dt @ layer.dt_proj.weight.t()
    if layer.dt_proj.bias is not None:
        dt = dt + layer.dt_proj.bias.float().to(dt.dtype)
    cdt = compute_dtype(dtype)
    dt = F.softplus(dt).to(cdt)                                  # [B, T, I]
    A = -torch.exp(layer.A_log.float()).to(cdt)                  # [I, N]
    I, N = A.shape
    x = x.to(cdt)
    q = C.to(cdt)[:, :, None, :].expand(batch_size, seq_len, I, N)
    k = B.to(cdt)[:, :, None, :].expand(batch_size, seq_len, I, N)
    y = linear_core(ctx, q, k, (dt * x)[..., None], dt[..., None] * A, scale=1.0, batch=sp,
                    output_final_state=store is not None)
    if store is not None:  # lasp2's [B, I, N, 1]; transformers keeps Mamba1's state in the model's dtype
        y, state = y
        store.update_recurrent_state(state[..., 0].to(dtype), layer.layer_idx)
    y = (y[..., 0] + x * layer.D.float().to(cdt)) * F.silu(gate.to(cdt))
    return layer.out_proj(y.to(dtype))
