"""SwiGLU feed-forward block (Llama): w2(silu(w1 x) * w3 x)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """x [B, T, hidden] -> [B, T, hidden] through an inner width ``mlp_hidden``."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, mlp_hidden, bias=False)  # gate
        self.w3 = nn.Linear(hidden, mlp_hidden, bias=False)  # value
        self.w2 = nn.Linear(mlp_hidden, hidden, bias=False)  # back to the residual stream

    def init_weights(self, generator: Optional[torch.Generator] = None, std: float = 0.02,
                     out_std: Optional[float] = None) -> None:
        """Normal(0, std) inputs; the residual-stream write ``w2`` uses ``out_std`` (default std)."""
        for lin in (self.w1, self.w3):
            nn.init.normal_(lin.weight, 0.0, std, generator=generator)
        nn.init.normal_(self.w2.weight, 0.0, std if out_std is None else out_std, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
