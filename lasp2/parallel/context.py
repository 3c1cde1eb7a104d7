"""Per-call state of the linear sequence-parallel strategies, bundled once.

``sp_linear_attention`` validates its arguments and builds one :class:`LinearCall`; every linear
strategy (``lasp2``, ``lasp1``, ``allscan``, ``tree``) and the shared autograd Function take that
object instead of a growing list of positional parameters. A new strategy option or backend adds
a field here (with a default), not a parameter to every function in between.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .layout import Layout


@dataclass(frozen=True, eq=False)
class LinearCall:
    """Everything a linear SP strategy needs to know about one call, besides the tensors.

    group: the SP process group (rank and size come from it).
    layout: where every token lives (``Layout``: contiguous or zigzag, W, T local).
    scale: the resolved query scale (float).
    cu_list: the global document boundaries [N + 1] as host ints, or None (one document): the
        local work finds each segment's document starts from them without a device read.
    digest: the call's 64-bit agreement digest (``agreement.call_digest``); every strategy sends
        it inside its first message and checks the other ranks' (DESIGN §2, ``agreement``).
    grad_enabled: whether autograd was on at the call (the Function's forward runs without it).
    overlap: launch the exchange before the intra-chunk work (False only for benchmarks).
    blocks: pipeline blocks of the ``allscan`` chain (states split along V); None lets the
        strategy choose (``allscan.pipeline_blocks``).
    backend: the resolved local-work backend, "torch" or "fla" (``ops.backends.resolve``).
    output_final_state: the call also returns the state after the sequence's last token.

    ``eq=False``: identity semantics (the object is never compared).
    """

    group: object
    layout: Layout
    scale: float
    cu_list: Optional[Tuple[int, ...]] = None
    digest: int = 0
    grad_enabled: bool = True
    overlap: bool = True
    blocks: Optional[int] = None
    backend: str = "torch"
    output_final_state: bool = False

    @property
    def world(self) -> int:
        return self.layout.world
