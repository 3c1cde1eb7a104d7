"""Rotary position embeddings (RoPE), "rotate half" convention (as Llama in Hugging Face)."""
from __future__ import annotations

from typing import Tuple

import torch


def rope_tables(positions: torch.Tensor, dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, dim] in ``dtype`` (fp32, or fp64) for integer positions [T].

    Angles are computed from the integer positions, so a token gets the same rotation whichever
    rank holds it (the positions are global, see ``token_positions``).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]  # [T, dim / 2]
    angles = torch.cat([angles, angles], dim=-1)                        # [T, dim]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the tables [T, D]; computed in the tables' dtype, returned in x's."""
    xf = x.to(cos.dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * cos + rotated * sin).to(x.dtype)
