"""Bamba (IBM's Mamba2 hybrid): Mamba2 mixer layers + softmax attention layers.

The forward below is transformers' ``BambaMixer.forward`` for whole sequences (its torch path:
``in_proj``, ``causal_conv1d_fn``, ``mamba2_chunk_scan``, gated RMSNorm, ``out_proj``), with the
layer's own parameters and two calls replaced:

- ``causal_conv1d_fn`` (kernel ``mamba_d_conv``) on x|B|C -> ``lasp2.sp_causal_conv1d``;
- ``mamba2_chunk_scan`` -> the SSD scan as lasp2's scalar-gate linear attention: per head h,
  dt = clamp(softplus(dt + dt_bias), time_step_limit), q = C, k = B (n_groups groups repeated to
  the heads), v = x * dt, g = A * dt with A = -exp(A_log), scale 1, then + D * x (the skip).
  S_t = exp(g_t) S_{t-1} + k_t^T v_t and y_t = q_t S_t are the SSD recurrence the chunked scan
  evaluates.

The softmax layers run unchanged with ``attn_implementation="lasp2"``. The z-loss
(``z_loss_coefficient > 0``) becomes each rank's share of it (``share_z_loss``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import STATE_DTYPE, batch_context, compute_dtype, conv_maybe_storing, linear_core


def mamba2_forward(layer, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """Replacement forward of ``BambaMixer`` (and of the Mamba2 mixers that run the same code:
    ``Mamba2Mixer``, ``NemotronHMamba2Mixer``, ``GraniteMoeHybridMambaLayer``)."""
    return mamba2_mix(layer, layer.in_proj(hidden_states), hidden_states.dtype, kwargs, layer.norm)


def mamba2_mix(layer, projected, dtype, kwargs, finish, store=None):
    """Everything after ``in_proj``: conv, SSD scan with the D skip, ``finish(y, gate)`` (the
    layer's gated norm), ``out_proj``. ``projected`` [B, T, intermediate + conv_dim + H].
    ``store``: a prefill's transformers ``Cache`` (``prefill.py``), else None; with it the conv
    state and the SSD state (transformers' [B, H, P, N], fp32) after the last token are written there."""
    ctx, sp = layer._lasp2, batch_context(layer, kwargs)
    batch_size, seq_len, _ = projected.shape
    H, P, G, N = layer.num_heads, layer.head_dim, layer.n_groups, layer.ssm_state_size
    gate, xbc, dt = projected.split([layer.intermediate_size, layer.conv_dim, H], dim=-1)
    xbc = conv_maybe_storing(layer, layer.conv1d, xbc, sp, layer.activation, store)
    x, B, C = torch.split(xbc, [layer.intermediate_size, G * N, G * N], dim=-1)

    cdt = compute_dtype(dtype)
    A = -torch.exp(layer.A_log.float())
    dt = F.softplus(dt + layer.dt_bias.to(dt.dtype))
    dt = torch.clamp(dt, min=layer.time_step_limit[0], max=layer.time_step_limit[1])
    x = x.reshape(batch_size, seq_len, H, P).to(cdt)
    B = B.reshape(batch_size, seq_len, G, N).to(cdt).repeat_interleave(H // G, dim=2, output_size=H)
    C = C.reshape(batch_size, seq_len, G, N).to(cdt).repeat_interleave(H // G, dim=2, output_size=H)
    dt = dt.to(cdt)
    y = linear_core(ctx, C, B, x * dt[..., None], A.to(cdt) * dt, scale=1.0, batch=sp,
                    output_final_state=store is not None)
    if store is not None:  # lasp2's state [B, H, N, P] is transformers' [B, H, P, N] transposed
        y, state = y
        store.update_recurrent_state(state.transpose(-1, -2).to(STATE_DTYPE), layer.layer_idx)
    y = y + layer.D[..., None] * x
    scan_output = finish(y.reshape(batch_size, seq_len, -1), gate)
    return layer.out_proj(scan_output.to(dtype))


def share_z_loss(model, world: int) -> None:
    """Make ``BambaForCausalLM``'s z-loss exact under SP. It adds coef * mean(logsumexp(logits)^2)
    over the B * T positions; each rank holds B * T / W of them (both layouts) and takes the mean
    over its own, so with coef / W each rank adds its share, and the shares sum over the SP group
    to the whole-sequence term (as the LM loss shares do). Sets the instance's
    ``z_loss_coefficient`` (read at every forward); the config is unchanged (export keeps it)."""
    coef = getattr(model, "z_loss_coefficient", 0) or 0
    if coef > 0:
        model.z_loss_coefficient = coef / world
