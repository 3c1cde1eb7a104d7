"""Analytical latency-bandwidth (alpha-beta) cost model of one sequence-parallel attention layer.

Used by ``lasp2 plan`` (whole-model predictions, :mod:`lasp2.bench.plan`) and validated against
``lasp2 bench`` measurements (:mod:`lasp2.bench.validate`). Everything here is closed-form so
that it can be unit-tested against hand-computed values.

Communication times (collectives costed as ring algorithms, point-to-point hops, the two-level
network that picks the link) are :mod:`lasp2.bench.network`'s.

Compute: a rank's time is FLOPs / rate; backward costs ``BWD_FACTOR`` x forward (2 for
matmuls; softmax attention recomputes scores: 2.5). Overlap is modelled exactly as the library
implements it: LASP-2's forward all-gather overlaps the intra-chunk work, LASP-2H's forward
all-gather overlaps the diagonal block, ring hops overlap one block each; LASP-2's and LASP-2H's
backward collectives and every Ulysses all-to-all are exposed. Causal softmax work is assumed
balanced (zigzag layout) unless ``layout="contiguous"``, where the last rank does 2W/(W+1) of
the mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

# Network, chain_time: not used here, re-exported (this module's public names since before the split).
from .network import (Link, Network, all_gather_time, all_to_all_time, chain_time,  # noqa: F401
                      collective_bytes_per_rank, p2p_time, reduce_scatter_time)
from ..parallel.agreement import DIGEST_BYTES
from ..parallel.allscan import pipeline_blocks
from ..parallel.softmax_common import kv_replication
from ..parallel.tree import tree_rounds
from ..parallel.strategies import SOFTMAX, linear, softmax

BWD_FACTOR = {"linear": 2.0, "softmax": 2.5}
FP32 = 4


@dataclass(frozen=True)
class Shape:
    """One attention layer on one rank: T is the *local* length; elt the bytes per element of
    the activations (2 for bf16); chunk the linear-attention chunk size."""

    B: int
    T: int
    H: int
    K: int
    V: int
    Hkv: Optional[int] = None
    elt: int = 2
    chunk: int = 64
    gate_dim: int = 1  # 1: scalar gate / constant decay, K: per-channel gate, 0: no gate

    @property
    def kv_heads(self) -> int:
        return self.Hkv or self.H


def linear_core_flops(s: Shape) -> tuple:
    """Forward FLOPs of chunked linear attention on the local shard: (intra, inter).

    Per token and head: intra-chunk Q K^T and (masked) A V on full C x C blocks, 2C(K + V);
    inter-chunk q S and the state update K^T V, 4KV.
    """
    tokens = s.B * s.T * s.H
    return tokens * 2 * s.chunk * (s.K + s.V), tokens * 4 * s.K * s.V


def softmax_core_flops(s: Shape, W: int) -> float:
    """Forward FLOPs of causal softmax attention per rank with balanced work: T local queries
    against W T / 2 keys on average, 2(K + V) FLOPs per query-key pair and head."""
    return s.B * s.T * (W * s.T / 2) * s.H * 2 * (s.K + s.V)


def imbalance(strategy: str, W: int, layout: str) -> float:
    """Slowest rank's causal softmax work over the mean: contiguous shards give the last rank
    W of the W(W+1)/2 diagonal-or-below blocks; zigzag and Ulysses are balanced."""
    if strategy in SOFTMAX and SOFTMAX[strategy].work_follows_layout and layout == "contiguous":
        return 2 * W / (W + 1)
    return 1.0


@dataclass
class LayerCost:
    """fwd+bwd of one layer on the slowest rank. ``comm`` is the exposed communication time;
    ``bytes_sent`` per rank (fwd + bwd); ``calls`` communication calls per rank (fwd, bwd);
    ``transient`` the largest buffer the strategy allocates while the layer runs, ``saved``
    what it keeps for backward, both beyond the local shard's own activations."""

    strategy: str
    compute: float
    comm: float
    bytes_sent: float
    calls: tuple
    transient: float
    saved: float
    parts: tuple = ()  # (term, seconds in all, seconds exposed) per communication term, for --explain

    @property
    def time(self) -> float:
        return self.compute + self.comm


def scan_blocks(W: int, s: Shape, link: Link, segments: int = 1) -> int:
    """The block count k the model picks for a pipelined chain: k* = sqrt((J - 2) s / alpha) for
    J = W * segments segments, s = one state's transfer time, alpha = one hop's latency."""
    state = s.B * s.H * s.K * s.V * FP32
    return pipeline_blocks(W * segments, state * link.p2p_beta, link.p2p_alpha, s.V)


@dataclass(frozen=True)
class P2PTerms:
    """Cost terms of a linear exchange made of dependent point-to-point steps, per direction.

    steps(J, k)     dependent communication steps on the critical path, for J = W * S segments
                    (S = 1 contiguous, 2 zigzag) and k pipeline blocks (1 unless pipelined)
    message(state, transition, k)
                    bytes of one step's message (state = one [B, H, K, V] fp32 state,
                    transition = one Â in fp32)
    received(J, S)  whole messages (states, or summaries) a rank receives
    """

    steps: Callable[[int, int], int]
    message: Callable[[float, float, int], float]
    received: Callable[[int, int], float]


# The P2P terms by the registry's communication pattern (``strategies.LinearStrategy.pattern``).
LINEAR_P2P_TERMS: Dict[str, P2PTerms] = {
    "chain": P2PTerms(steps=lambda J, k: J - 1, message=lambda s, a, k: s,
                      received=lambda J, S: S if J > S else 0),
    "pipelined-chain": P2PTerms(steps=lambda J, k: J + k - 2 if J > 1 else 0, message=lambda s, a, k: s / k,
                                received=lambda J, S: S if J > S else 0),
    "recursive-doubling": P2PTerms(steps=lambda J, k: tree_rounds(J), message=lambda s, a, k: s + a,
                                   received=lambda J, S: S * tree_rounds(J)),
}


def _linear_all_gather(entry, W: int, s: Shape, link: Link, segments: int, blocks, compute: float,
                       intra_s: float, inter_rate: float) -> LayerCost:
    state = s.B * s.H * s.K * s.V * FP32
    row = state + s.B * s.H * s.gate_dim * FP32 + DIGEST_BYTES
    t_fwd = all_gather_time(W, W * segments * row, link)
    fwd = max(0.0, t_fwd - intra_s) if entry.overlaps_intra else t_fwd
    bwd = all_gather_time(W, W * segments * state, link)
    sent = collective_bytes_per_rank(W, W * segments * (row + state))
    parts = (("state all-gather, forward", t_fwd, fwd), ("state-gradient all-gather, backward", bwd, bwd))
    return LayerCost(entry.name, compute, fwd + bwd, sent, (1, 1), W * segments * row, segments * (state + row), parts)


def _linear_p2p(entry, W: int, s: Shape, link: Link, segments: int, blocks, compute: float,
                intra_s: float, inter_rate: float) -> LayerCost:
    terms, J = LINEAR_P2P_TERMS[entry.pattern], W * segments
    state = s.B * s.H * s.K * s.V * FP32
    trans = s.B * s.H * s.gate_dim * FP32  # one Â (diagonal family; the 1B presets use scalar gates)
    k = (blocks or scan_blocks(W, s, link, segments)) if entry.pipelined else 1
    hop = p2p_time(terms.message(state, trans, k), link)
    t = terms.steps(J, k) * hop
    fwd = max(0.0, t - intra_s) if entry.overlaps_intra else t
    unit = terms.message(state, trans, 1) + DIGEST_BYTES * W  # one whole message (state or summary)
    msgs = terms.received(J, segments)
    parts = [(f"{entry.pattern} hops, forward", t, fwd), (f"{entry.pattern} hops, backward", t, t)]
    serial = 0.0
    if entry.serial_inter:
        # The published LASP-1 (LASP-2 paper, Algorithm 6 and its backward) computes each segment's
        # inter-chunk term between receive and send: q S forward (2 T H K V FLOPs per segment), V dM
        # and K dM backward (4 T H K V): that work is serialised along the chain.
        per_seg = s.B * (s.T / segments) * s.H * s.K * s.V / inter_rate
        serial = terms.steps(J, k) * per_seg * (2 + 4)
        parts.append(("serialised inter-chunk compute (critical path)", serial, serial))
    return LayerCost(entry.name, compute, fwd + t + serial, 2 * msgs * unit, (2 * msgs * k, 2 * msgs * k), 2 * unit,
                     segments * state, tuple(parts))


# Linear layer cost by communication pattern: every pattern of the registry has one entry.
LINEAR_COSTS = {"all-gather": _linear_all_gather, **{pattern: _linear_p2p for pattern in LINEAR_P2P_TERMS}}


def linear_layer(strategy: str, W: int, s: Shape, rate: float, link: Link, segments: int = 1,
                 blocks: Optional[int] = None) -> LayerCost:
    """Linear attention (a registered strategy, or "ideal": the local op alone) at ``rate`` FLOP/s,
    costed by the strategy's communication pattern (``LINEAR_COSTS``).

    all-gather (lasp2): fwd 1 all-gather of W*segments rows of [B H (K V + gate_dim)] fp32 (+ the
    8-byte agreement digest) overlapping the intra-chunk work; bwd 1 all-gather of W*segments
    [B H K V] fp32, exposed. P2P patterns (``LINEAR_P2P_TERMS``), with J = W*segments: chain
    (lasp1) J-1 dependent hops of one [B H K V] fp32 state per direction; pipelined chain
    (allscan) J+k-2 hops of state/k (k = ``blocks`` or ``scan_blocks``); recursive doubling
    (tree) ceil(log2 J) rounds of one summary (state + Â); every whole P2P message also carries
    the W 8-byte agreement digests seen upstream (``parallel.agreement``). A strategy that
    overlaps the intra-chunk work (the registry's ``overlaps_intra``: allscan and tree run their
    forward exchange in a helper thread beside it) exposes only what exceeds that work; backward
    steps are exposed. An entry with ``serial_inter`` (the published LASP-1, a planner baseline)
    also puts each segment's inter-chunk compute on the chain: 2 T H K V FLOPs per forward step,
    4 T H K V per backward step, at ``rate``. ``LayerCost.parts`` lists every term for --explain.
    """
    if strategy == "ideal" or W == 1:
        return LayerCost(strategy, linear_compute(s, rate), 0.0, 0.0, (0, 0), 0.0, 0.0)
    entry = linear(strategy)  # ValueError naming the registry's choices for an unknown name
    return linear_layer_of(entry, W, s, rate, link, segments, blocks)


def linear_compute(s: Shape, rate: float) -> float:
    """fwd + bwd seconds of the chunked linear attention on the local shard."""
    intra, inter = linear_core_flops(s)
    return (intra + inter) / rate * (1 + BWD_FACTOR["linear"])


def linear_layer_of(entry, W: int, s: Shape, rate: float, link: Link, segments: int = 1,
                    blocks: Optional[int] = None, costs: Optional[Dict[str, Callable]] = None) -> LayerCost:
    """``linear_layer`` for a registry-like entry (name, pattern and capabilities), costed by
    ``costs[entry.pattern]`` (default ``LINEAR_COSTS``; the planner's baselines bring their own)."""
    intra = linear_core_flops(s)[0]
    return (costs or LINEAR_COSTS)[entry.pattern](entry, W, s, link, segments, blocks, linear_compute(s, rate),
                                                  intra / rate, rate)


def _softmax_all_gather(W: int, s: Shape, link: Link, kv: float, kv32: float, t_fwd: float, t_bwd: float):
    """(exposed comm, bytes sent, calls, transient, saved): the K/V gather overlaps the diagonal
    block; the dK/dV reduce-scatter is exposed."""
    fwd = max(0.0, all_gather_time(W, W * (kv + DIGEST_BYTES), link) - t_fwd / W)
    bwd = reduce_scatter_time(W, W * kv32, link)
    sent = collective_bytes_per_rank(W, W * (kv + DIGEST_BYTES + kv32))
    return fwd + bwd, sent, (1, 1), W * kv32, W * kv


def _softmax_ring(W: int, s: Shape, link: Link, kv: float, kv32: float, t_fwd: float, t_bwd: float):
    fwd = (W - 1) * max(0.0, p2p_time(kv + DIGEST_BYTES, link) - t_fwd / W)
    bwd = (W - 1) * max(0.0, p2p_time(kv32 + kv, link) - t_bwd / W)
    sent = (W - 1) * (2 * kv + DIGEST_BYTES + kv32)
    return fwd + bwd, sent, (2 * (W - 1), 2 * (W - 1)), 2 * (kv + kv32), 2 * kv


def _softmax_all_to_all(W: int, s: Shape, link: Link, kv: float, kv32: float, t_fwd: float, t_bwd: float):
    rep = kv_replication(s.H, s.kv_heads, W)
    qkv = s.B * s.T * (s.H * s.K + s.kv_heads * rep * (s.K + s.V)) * s.elt
    o = s.B * s.T * s.H * s.V * s.elt
    grads = qkv * (FP32 / s.elt if rep > 1 else 1)
    t = sum(all_to_all_time(W, b, link) for b in (qkv + DIGEST_BYTES * W, o, o, grads))
    sent = collective_bytes_per_rank(W, qkv + DIGEST_BYTES * W + 2 * o + grads)
    return t, sent, (2, 2), 2 * (qkv + o), qkv + o


# Softmax layer communication by the registry's pattern (``strategies.SoftmaxStrategy.pattern``).
SOFTMAX_COSTS = {"all-gather": _softmax_all_gather, "ring-pass": _softmax_ring, "all-to-all": _softmax_all_to_all}


def softmax_layer(strategy: str, W: int, s: Shape, rate: float, link: Link, layout: str = "zigzag") -> LayerCost:
    """Causal softmax attention (allgather = LASP-2H, ring, ulysses, or "ideal": 1/W of the
    whole sequence's work with no communication), costed by the strategy's communication pattern
    (``SOFTMAX_COSTS``). Raises ValueError when a strategy that shards the heads cannot
    (the registry's ``heads_divisible``, H % W != 0).

    all-gather (allgather): fwd 1 all-gather of all K/V [W B T Hkv (K + V)] overlapping the
    diagonal block, kept for backward; bwd 1 reduce-scatter of fp32 dK/dV, exposed. ring pass
    (ring): W-1 hops of K/V fwd and of fp32 dK/dV + K/V bwd, each overlapping one block.
    all-to-all (ulysses): all-to-alls of packed q,k,v and of o fwd, of dO and packed grads bwd
    (fp32 when KV heads are replicated). Every strategy's first message carries the 8-byte
    agreement digest (per row for the all-to-all)."""
    t_fwd = softmax_core_flops(s, W) / rate * imbalance(strategy, W, layout)
    compute = t_fwd * (1 + BWD_FACTOR["softmax"])
    t_bwd = t_fwd * BWD_FACTOR["softmax"]
    kv = s.B * s.T * s.kv_heads * (s.K + s.V) * s.elt  # this rank's K and V
    kv32 = kv * FP32 / s.elt
    if strategy == "ideal" or W == 1:
        return LayerCost(strategy, compute, 0.0, 0.0, (0, 0), 0.0, 0.0)
    entry = softmax(strategy)
    if entry.heads_divisible and s.H % W:
        raise ValueError(f"{strategy} needs H % W == 0 (H={s.H}, W={W})")
    comm, sent, calls, transient, saved = SOFTMAX_COSTS[entry.pattern](W, s, link, kv, kv32, t_fwd, t_bwd)
    return LayerCost(strategy, compute, comm, sent, calls, transient, saved,
                     ((f"{entry.pattern} of K/V and their gradients (exposed part)", comm, comm),))
