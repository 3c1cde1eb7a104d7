"""RMSNorm (Llama style): y = x / rms(x) * weight, computed in fp32 whatever the input dtype."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalise the last dim. x [..., dim] -> [..., dim] in x's dtype.

    The reduction runs in fp32 (fp64 for fp64 inputs) because bf16 sums of squares lose several
    bits at dim = 2048.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(ct)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(ct)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
