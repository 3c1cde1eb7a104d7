"""The strategy registry: the ONE list of sequence-parallel strategy names (DESIGN §3).

Every other place that needs strategy names or what a strategy can do reads this module: the
public API's validation and dispatch (``api.py``), ``TrainConfig`` and the CLI choices, the bench
suites, the cost model and the planner. None of them branches on a strategy's name; they read
its capabilities. Adding a strategy is one entry here plus its exchange module (and, for a new
communication ``pattern``, its cost terms in ``lasp2/bench/cost_model.py``; the planner's
modelled-only baselines key theirs in ``lasp2/bench/baselines.py``).

Linear strategies share the local work and the autograd Function (``linear_sp``) and differ only
in their *exchange* (how summaries become incoming states). Capabilities of an entry:

    pattern          the communication pattern, "all-gather" | "chain" | "pipelined-chain" |
                     "recursive-doubling" (linear), "all-gather" | "ring-pass" | "all-to-all"
                     (softmax); the cost model keys its terms by it
    point_to_point   sends and receives between pairs of ranks rather than collectives
    layouts          the token layouts it runs under
    bidirectional    (linear) the autograd Function for ``causal=False`` (basic linear
                     attention); None: causal only
    overlaps_intra   (linear) the forward exchange runs while the intra-chunk work does
    pipelined        (linear) takes a block count (``scan_blocks``)
    serial_inter     (linear) each hop waits for the rank's inter-chunk compute before sending on
                     (the published LASP-1, Algorithm 6 of the LASP-2 paper); False for every
                     strategy shipped here (lasp1 forwards the state first). The planner's
                     ``lasp1-serial`` baseline (``lasp2/bench/baselines.py``) sets it
    heads_divisible  (softmax) needs H % W == 0 (it shards the heads)
    work_follows_layout (softmax) causal work per rank is what the layout gives each rank's
                     queries (unbalanced under contiguous); False: balanced whatever the layout
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .allscan import PipelinedChainExchange
from .lasp1 import ChainExchange
from .lasp2 import AllGatherExchange, BidirectionalLASP2Function
from .layout import LAYOUTS
from .tree import TreeExchange


@dataclass(frozen=True)
class LinearStrategy:
    """A linear SP strategy: its exchange (``linear_sp`` protocol) and capabilities."""

    name: str
    exchange: object
    summary: str                       # one line for --help and tables
    pattern: str
    point_to_point: bool
    overlaps_intra: bool
    bidirectional: Optional[type] = None
    pipelined: bool = False
    layouts: Tuple[str, ...] = LAYOUTS
    serial_inter: bool = False

    @property
    def causal_only(self) -> bool:
        return self.bidirectional is None


@dataclass(frozen=True)
class SoftmaxStrategy:
    """A softmax SP strategy. ``load()`` returns its autograd Function (imported lazily)."""

    name: str
    load: Callable[[], type]
    summary: str
    pattern: str
    point_to_point: bool = False
    heads_divisible: bool = False
    work_follows_layout: bool = True
    layouts: Tuple[str, ...] = LAYOUTS


LINEAR: Dict[str, LinearStrategy] = {s.name: s for s in (
    LinearStrategy("lasp2", AllGatherExchange, "one all-gather of every segment's summary per direction",
                   "all-gather", point_to_point=False, overlaps_intra=True, bidirectional=BidirectionalLASP2Function),
    LinearStrategy("lasp1", ChainExchange, "LASP-1 ring chain: the whole state hops segment to segment",
                   "chain", point_to_point=True, overlaps_intra=False),
    LinearStrategy("allscan", PipelinedChainExchange,
                   "pipelined chain (ZeCO All-Scan): the state travels in k blocks along V",
                   "pipelined-chain", point_to_point=True, overlaps_intra=True, pipelined=True),
    LinearStrategy("tree", TreeExchange, "log-depth scan: ceil(log2 J) rounds of (Â, Ŝ) exchanges",
                   "recursive-doubling", point_to_point=True, overlaps_intra=True),
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
                    "ring attention: K/V blocks rotate around the ring", "ring-pass", point_to_point=True),
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


def with_capability(registry: Dict[str, object], capability: Callable[[object], bool]) -> Tuple[str, ...]:
    """Names of the entries of ``registry`` (``LINEAR`` or ``SOFTMAX``) that have ``capability``
    (e.g. ``lambda e: not e.causal_only``), in registry order: what error messages offer."""
    return tuple(name for name, entry in registry.items() if capability(entry))
