"""Feature maps phi applied to q and k before linear attention (Based, ReBased).

phi turns the d-dim projections into K-dim features; the linear-attention op then sees K as the
key dim. Both papers rely on phi(q) . phi(k) being a non-negative similarity, so the op runs
with ``scale = 1``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TaylorFeatureMap(nn.Module):
    """Based: second-order Taylor expansion of exp(q . k / sqrt(d)).

    phi(x) = [1, x', x' (x) x' / sqrt(2)] with x' = x / d**(1/4), so that
    phi(q) . phi(k) = 1 + q.k/sqrt(d) + (q.k)^2 / (2 d). x [..., d] -> [..., 1 + d + d^2].
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    @property
    def out_dim(self) -> int:
        return 1 + self.dim + self.dim * self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.dim ** -0.25
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0)
        return torch.cat([torch.ones_like(x[..., :1]), x, x2], dim=-1)


class ReBasedFeatureMap(nn.Module):
    """ReBased: phi(x) = (gamma * norm(x) + beta)^2, a learnable quadratic kernel.

    norm is a LayerNorm without its own affine (gamma, beta play that role, shared by the heads).
    x [..., d] -> [..., d].
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    @property
    def out_dim(self) -> int:
        return self.dim

    def init_weights(self) -> None:
        nn.init.ones_(self.gamma)
        nn.init.zeros_(self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (self.dim,), eps=self.eps).to(x.dtype)
        return (self.gamma * y + self.beta).pow(2)
