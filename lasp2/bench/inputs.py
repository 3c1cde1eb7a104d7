"""Inputs of the linear-attention benchmarks (the ops, gpu and linear suites), one variant each."""
from __future__ import annotations

import torch
import torch.nn.functional as F

VARIANTS = ("basic", "scalar", "channel", "deltanet", "gated_deltanet", "kda")


def make_inputs(variant: str, T: int, H: int, D: int, dtype, device, seed: int = 0, batch: int = 1):
    """(leaves (q, k, v, g, beta), do): unit keys for the delta rule, g = logsigmoid(x + 4) (per
    channel for channel and kda: [B, T, H, D])."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(batch, T, *s, generator=gen).to(device)  # noqa: E731
    q, k, v = rnd(H, D), rnd(H, D), rnd(H, D)
    g = beta = None
    if variant in ("scalar", "gated_deltanet"):
        g = F.logsigmoid(rnd(H) + 4.0)
    elif variant == "channel":
        g = F.logsigmoid(rnd(H, D) + 4.0) / 16
    elif variant == "kda":
        g = F.logsigmoid(rnd(H, D) + 4.0)
    if variant in ("deltanet", "gated_deltanet", "kda"):
        k = F.normalize(k, dim=-1)
        beta = torch.sigmoid(rnd(H)).to(dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    do = rnd(H, D).to(dtype)
    return [t if t is None else t.requires_grad_() for t in (q, k, v, g, beta)], do
