"""Baselines the planner costs but the library does not ship: the methods the LASP-2 paper
compares against, as the paper describes them (Section 4.1: "When implement other SP methods
(e.g., Ring Attention, Megatron-SP) on linear attention instances ... we do not incorporate the
right-product kernel trick").

Each entry has a communication ``pattern`` and capabilities like the registry's linear
strategies (``lasp2.parallel.strategies``), and its cost terms are keyed by that pattern here
(``BASELINE_COSTS``) or in ``cost_model.LINEAR_COSTS``. Nothing branches on a name.

    lasp1-serial   LASP-1 as published (paper Algorithm 6 and its backward): the state hops rank
                   to rank and each rank's inter-chunk compute runs between receive and send, so
                   it sits on the critical path W - 1 times per direction (the registry's lasp1
                   forwards the state first and does not)
    ring-linear    Ring Attention on linear attention: K/V blocks rotate around the ring (W - 1
                   hops of K, V forward; of dK, dV fp32 and K, V backward, each overlapping one
                   block), every block's term (Q K^T) V in the left-product order: the
                   attention work is quadratic in the length, as for softmax
    ring-linear-rp Ring Attention on linear attention with the right product per block: the same
                   K/V ring, but each rank folds every received block j as K_j^T V_j ([K, V] per
                   head, 2 T H K V FLOPs) and q_i (K_j^T V_j) (2 T H K V), plus the causal chunked
                   linear attention of its own block: per-rank work O(W T d^2) per head, the
                   whole length's, where LASP-2's is O(T d^2) (T the local length). Not what the
                   paper's text describes; modelled to test whether its Ring numbers fit it
    megatron-sp    Megatron-SP (Korthikanti et al. 2022, sequence + tensor parallel over the W
                   GPUs): per layer the input is all-gathered over the sequence before the
                   attention and MLP blocks and reduce-scattered after, forward and backward (8
                   collectives of [B, L, d] bf16); each GPU runs H / W heads over the whole
                   sequence, left product (quadratic); needs H % W == 0
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from .cost_model import (BWD_FACTOR, FP32, LINEAR_COSTS, LayerCost, Shape, linear_core_flops, linear_layer,
                         linear_layer_of, softmax_core_flops)
from .network import Link, all_gather_time, collective_bytes_per_rank, p2p_time
from ..parallel.strategies import LINEAR


@dataclass(frozen=True)
class Baseline:
    """A modelled-only linear SP method: the capabilities the cost terms read."""

    name: str
    summary: str
    pattern: str
    point_to_point: bool = False
    overlaps_intra: bool = False
    serial_inter: bool = False
    pipelined: bool = False
    heads_divisible: bool = False


BASELINES: Dict[str, Baseline] = {b.name: b for b in (
    Baseline("lasp1-serial", "LASP-1 as published: state chain with the inter-chunk compute between receive and send",
             "chain", point_to_point=True, serial_inter=True),
    Baseline("ring-linear", "Ring Attention on linear attention, left product (K/V ring, quadratic work)",
             "kv-ring", point_to_point=True),
    Baseline("ring-linear-rp", "Ring Attention on linear attention, right product per received K/V block (K/V ring, "
             "work linear in the whole length per rank)", "kv-ring-right-product", point_to_point=True),
    Baseline("megatron-sp", "Megatron-SP: all-gather of activations, H/W heads over the whole sequence, left product",
             "activation-all-gather", heads_divisible=True),
)}


def quadratic_compute(W: int, s: Shape, rate: float) -> float:
    """fwd + bwd seconds of causal linear attention in the left-product order per rank, balanced:
    T local queries against W T / 2 keys on average, as softmax attention (no score materialised:
    a fused kernel is assumed, the cheapest left-product form)."""
    return softmax_core_flops(s, W) / rate * (1 + BWD_FACTOR["linear"])


def right_product_ring_compute(W: int, s: Shape, rate: float) -> float:
    """fwd + bwd seconds per rank of ``ring-linear-rp``: the chunked causal linear attention of the
    own block, and for each of the W - 1 received K/V blocks K_j^T V_j then q (K_j^T V_j), 4 T H K V
    FLOPs forward (the slowest rank of the contiguous layout folds every one of them; backward
    BWD_FACTOR x: dQ, dM, dK, dV products)."""
    intra, inter = linear_core_flops(s)
    received = (W - 1) * 4 * s.B * s.T * s.H * s.K * s.V
    return (intra + inter + received) / rate * (1 + BWD_FACTOR["linear"])


def _kv_ring_hops(entry, W, s: Shape, link: Link, work: float) -> LayerCost:
    """W - 1 hops of this rank's K/V forward, of dK/dV fp32 + K/V backward, each overlapping one
    block's share (1 / W) of ``work`` (fwd + bwd seconds)."""
    t_fwd = work / (1 + BWD_FACTOR["linear"])
    kv = s.B * s.T * s.kv_heads * (s.K + s.V) * s.elt
    kv32 = kv * FP32 / s.elt
    hop_f, hop_b = p2p_time(kv, link), p2p_time(kv32 + kv, link)
    fwd = (W - 1) * max(0.0, hop_f - t_fwd / W)
    bwd = (W - 1) * max(0.0, hop_b - BWD_FACTOR["linear"] * t_fwd / W)
    parts = (("K/V ring hops, forward", (W - 1) * hop_f, fwd),
             ("dK/dV + K/V ring hops, backward", (W - 1) * hop_b, bwd))
    return LayerCost(entry.name, work, fwd + bwd, (W - 1) * (2 * kv + kv32), (2 * (W - 1), 2 * (W - 1)),
                     2 * (kv + kv32), 2 * kv, parts)


def _kv_ring(entry, W, s: Shape, link: Link, segments, blocks, compute, intra_s, rate) -> LayerCost:
    return _kv_ring_hops(entry, W, s, link, quadratic_compute(W, s, rate))


def _kv_ring_right_product(entry, W, s: Shape, link: Link, segments, blocks, compute, intra_s, rate) -> LayerCost:
    return _kv_ring_hops(entry, W, s, link, right_product_ring_compute(W, s, rate))


def _activation_all_gather(entry, W, s: Shape, link: Link, segments, blocks, compute, intra_s, rate) -> LayerCost:
    if s.H % W:
        raise ValueError(f"{entry.name} shards the heads: needs H % W == 0 (H={s.H}, W={W})")
    full = s.B * W * s.T * s.H * s.K * s.elt  # [B, L, d] bf16, d = H K
    t = all_gather_time(W, full, link)
    n = 8  # attention and MLP blocks: all-gather before, reduce-scatter after; forward and backward
    return LayerCost(entry.name, quadratic_compute(W, s, rate), n * t, n * collective_bytes_per_rank(W, full),
                     (4, 4), 2 * full, full,
                     (("activation all-gathers / reduce-scatters (8 per layer)", n * t, n * t),))


BASELINE_COSTS = {**LINEAR_COSTS, "kv-ring": _kv_ring, "kv-ring-right-product": _kv_ring_right_product,
                  "activation-all-gather": _activation_all_gather}


def linear_entry(name: str):
    """The registry's entry or a baseline's; ValueError naming both lists."""
    entry = LINEAR.get(name) or BASELINES.get(name)
    if entry is None:
        raise ValueError(f"unknown linear strategy {name!r}; choose one of {', '.join(LINEAR)} (library) or "
                         f"{', '.join(BASELINES)} (modelled baselines)")
    return entry


def linear_cost(name: str, W: int, s: Shape, rate: float, link: Link, segments: int = 1,
                blocks: Optional[int] = None) -> LayerCost:
    """``cost_model.linear_layer`` for registry strategies, the baselines' own terms otherwise."""
    if name in LINEAR or W == 1:
        return linear_layer(name if name in LINEAR else "ideal", W, s, rate, link, segments, blocks)
    return linear_layer_of(linear_entry(name), W, s, rate, link, segments, blocks, BASELINE_COSTS)
