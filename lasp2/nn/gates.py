"""Gate parameterisations of the linear-attention layers: the parameters a gate adds to the layer
and how it computes g (log space, <= 0) from x [B, T, hidden].

Each is an object with ``gate`` (the g it produces: "scalar" [B, T, H] or "channel"
[B, T, H, K], naming the transition kind with the layer's beta, ``lasp2.ops.transition``),
``build(layer, hidden, gate_low_rank)`` (registers its parameters on the layer, under the names
checkpoints already use) and ``__call__(layer, x, dtype) -> g`` in ``dtype`` (fp32, or fp64 for
fp64 models: the op sums gates over thousands of tokens).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FixedGate:
    """One fixed decay per head, no parameters: g = log lambda_h, [B, T, H] (constant decay).
    ``log_decay(h, H)``: log lambda for head indices h (fp64 [H])."""

    gate = "scalar"

    def __init__(self, log_decay: Callable[[torch.Tensor, int], torch.Tensor]):
        self.log_decay = log_decay

    def build(self, layer: nn.Module, hidden: int, gate_low_rank: int) -> None:
        """No parameters."""

    def __call__(self, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        B, T, _ = x.shape
        H = layer.heads
        h = torch.arange(H, dtype=torch.float64, device=x.device)
        return self.log_decay(h, H).to(dtype).view(1, 1, H).expand(B, T, H)


class Mamba2Gate:
    """Mamba2's data-dependent scalar gate: g = -softplus(W x + dt_bias) * exp(A_log), [B, T, H]."""

    gate = "scalar"

    @staticmethod
    def build(layer: nn.Module, hidden: int, gate_low_rank: int) -> None:
        layer.a_proj = nn.Linear(hidden, layer.heads, bias=False)
        layer.A_log = nn.Parameter(torch.empty(layer.heads))
        layer.dt_bias = nn.Parameter(torch.empty(layer.heads))

    def __call__(self, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        dt = F.softplus(layer.a_proj(x).to(dtype) + layer.dt_bias.to(dtype))
        return -dt * layer.A_log.to(dtype).exp()


class LowRankChannelGate:
    """GLA's per-channel gate: g = logsigmoid(W_up W_down x) / gate_normalizer, [B, T, H, K]."""

    gate = "channel"

    @staticmethod
    def build(layer: nn.Module, hidden: int, gate_low_rank: int) -> None:
        layer.gk_down = nn.Linear(hidden, gate_low_rank, bias=False)
        layer.gk_up = nn.Linear(gate_low_rank, layer.heads * layer.head_dim, bias=True)

    def __call__(self, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        B, T, _ = x.shape
        gk = layer.gk_up(layer.gk_down(x)).to(dtype).view(B, T, layer.heads, layer.head_dim)
        return F.logsigmoid(gk) / layer.gate_normalizer


class KDAGate:
    """Kimi Linear's per-channel gate (KDA): g = -exp(A_log_h) * softplus(W_b W_a x + dt_bias),
    [B, T, H, K]; A_log one per head, dt_bias one per channel (transformers'
    ``KimiLinearForgetGate``; the low rank is ``gate_low_rank``, Kimi uses the head dim)."""

    gate = "channel"

    @staticmethod
    def build(layer: nn.Module, hidden: int, gate_low_rank: int) -> None:
        layer.f_a_proj = nn.Linear(hidden, gate_low_rank, bias=False)
        layer.f_b_proj = nn.Linear(gate_low_rank, layer.heads * layer.head_dim, bias=False)
        layer.A_log = nn.Parameter(torch.empty(layer.heads))
        layer.dt_bias = nn.Parameter(torch.empty(layer.heads * layer.head_dim))

    def __call__(self, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        B, T, _ = x.shape
        pre = layer.f_b_proj(layer.f_a_proj(x)).to(dtype) + layer.dt_bias.to(dtype)
        g = -F.softplus(pre).view(B, T, layer.heads, layer.head_dim)
        return g * layer.A_log.to(dtype).exp()[:, None]


def lightning_log_decay(h: torch.Tensor, heads: int) -> torch.Tensor:
    """lambda_h = exp(-slope_h), slopes as ALiBi / TransNormerLLM."""
    return -(2.0 ** (-8.0 * (h + 1) / heads))


def retention_log_decay(h: torch.Tensor, heads: int) -> torch.Tensor:
    """RetNet: gamma_h = 1 - 2^(-5-h); log1p keeps gamma ~ 1 exact."""
    return torch.log1p(-(2.0 ** (-5.0 - h)))
