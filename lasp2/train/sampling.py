"""The random stream of one training step, shared by every data source (MQAR, text, token files)."""
from __future__ import annotations

import torch


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, stream) only: the data of a step never depends on
    what ran before it, which is what makes resuming exact. ``stream`` separates the draws of
    different consumers of one step (0 MQAR, 1 the text epoch order, 2 token-file offsets)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)
