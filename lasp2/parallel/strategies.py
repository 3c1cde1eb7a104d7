"""The strategy registry: the ONE list of sequence-parallel strategy names (DESIGN §3).

Every other place that needs strategy names or properties reads this module: the public API's
validation and dispatch (``api.py``), ``TrainConfig`` and the CLI choices, the bench suites, the
cost model and the planner. Adding a strategy is one entry here (plus its exchange module).

Linear strategies share the local work and the autograd Function (``linear_sp``) and differ only
in their *exchange* (how summaries become incoming states). Each entry carries the properties
the rest of the code asks about and the terms the cost model needs, per direction:

    pattern        "all-gather" | "chain" | "pipelined-chain" | "tree"
    steps(J, k)    dependent communication steps on the critical path, for J = W * S segments
                   (S = 1 contiguous, 2 zigzag) and k pipeline blocks (1 except ``allscan``)
    message(state, transition, k)
                   bytes of one step's message (state = one [B, H, K, V] fp32 state,
                   transition = one Â in fp32)
    received(J, S) states (or summaries, for ``tree``) a rank receives per direction

The all-gather strategy's steps/message are those of one ring all-gather of J summaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .allscan import PipelinedChainExchange
from .lasp1 import ChainExchange
from .lasp2 import AllGatherExchange
from .tree import TreeExchange, tree_rounds


@dataclass(frozen=True)
class LinearStrategy:
    """A causal linear SP strategy: its exchange (``linear_sp`` protocol) and properties."""

    name: str
    exchange: object
    summary: str                       # one line for --help and tables
    pattern: str
    bidirectional: bool                # causal=False supported (basic linear attention)
    steps: Callable[[int, int], int]
    message: Callable[[float, float, int], float]
    received: Callable[[int, int], float]
    overlaps_intra: bool               # forward exchange runs while the intra-chunk work does
    pipelined: bool = False            # takes a block count (``scan_blocks``)

    @property
    def causal_only(self) -> bool:
        return not self.bidirectional


@dataclass(frozen=True)
class SoftmaxStrategy:
    """A softmax SP strategy. ``load()`` returns its autograd Function (imported lazily)."""

    name: str
    load: Callable[[], type]
    summary: str
    pattern: str
    heads_divisible: bool = False      # needs H % W == 0 (Ulysses shards heads)
    work_follows_layout: bool = True   # causal work per rank as the layout places the queries
                                       # (unbalanced under contiguous); False: balanced anyway


LINEAR: Dict[str, LinearStrategy] = {s.name: s for s in (
    LinearStrategy("lasp2", AllGatherExchange, "one all-gather of every segment's summary per direction",
                   "all-gather", True, steps=lambda J, k: J - 1, message=lambda s, a, k: s + a,
                   received=lambda J, S: J - S, overlaps_intra=True),
    LinearStrategy("lasp1", ChainExchange, "LASP-1 ring chain: the whole state hops segment to segment",
                   "chain", False, steps=lambda J, k: J - 1, message=lambda s, a, k: s,
                   received=lambda J, S: S if J > S else 0, overlaps_intra=False),
    LinearStrategy("allscan", PipelinedChainExchange,
                   "pipelined chain (ZeCO All-Scan): the state travels in k blocks along V",
                   "pipelined-chain", False, steps=lambda J, k: J + k - 2 if J > 1 else 0,
                   message=lambda s, a, k: s / k, received=lambda J, S: S if J > S else 0,
                   overlaps_intra=True, pipelined=True),
    LinearStrategy("tree", TreeExchange, "log-depth scan: ceil(log2 J) rounds of (Â, Ŝ) exchanges",
                   "tree", False, steps=lambda J, k: tree_rounds(J), message=lambda s, a, k: s + a,
                   received=lambda J, S: S * tree_rounds(J), overlaps_intra=True),
)}


def _softmax(module: str, cls: str):
    def load():
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), cls)
    return load


SOFTMAX: Dict[str, SoftmaxStrategy] = {s.name: s for s in (
    SoftmaxStrategy("allgather", _softmax("softmax_allgather", "AllGatherAttentionFunction"),
                    "LASP-2H: one all-gather of K/V forward, one reduce-scatter of dK/dV backward", "all-gather"),
    SoftmaxStrategy("ring", _softmax("ring_attention", "RingAttentionFunction"),
                    "ring attention: K/V blocks rotate around the ring", "ring"),
    SoftmaxStrategy("ulysses", _softmax("ulysses", "UlyssesAttentionFunction"),
                    "Ulysses: all-to-all from sequence to head sharding", "all-to-all", heads_divisible=True,
                    work_follows_layout=False),
)}

LINEAR_STRATEGIES: Tuple[str, ...] = tuple(LINEAR)
SOFTMAX_STRATEGIES: Tuple[str, ...] = tuple(SOFTMAX)


def linear(name: str) -> LinearStrategy:
    """The registry entry; ValueError naming the choices for an unknown name."""
    if name not in LINEAR:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(map(repr, LINEAR_STRATEGIES))}")
    return LINEAR[name]


def softmax(name: str) -> SoftmaxStrategy:
    if name not in SOFTMAX:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(map(repr, SOFTMAX_STRATEGIES))}")
    return SOFTMAX[name]
