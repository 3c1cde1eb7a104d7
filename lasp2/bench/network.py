"""Alpha-beta (latency-bandwidth) times of the communication the cost model charges
(:mod:`lasp2.bench.cost_model`), and the two-level network (NVLink inside a node, one inter-node
link per GPU) that picks the link.

Collectives over W ranks, each costed as the ring algorithm (what NCCL uses for large
all-gathers and what comm.py's byte accounting assumes); ``b`` is the *whole* buffer:

    all-gather      gathered buffer b (b / W from each rank): time (W-1)(alpha + beta b/W),
                    each rank sends and receives (W-1)/W * b
    reduce-scatter  input buffer b on every rank, b / W kept:  same time and bytes as all-gather
    all-to-all      b on every rank, b / W to each peer:       same time and bytes (pairwise)
    P2P hop         m bytes: p2p_alpha + p2p_beta m; a chain of W-1 *dependent* hops (LASP-1's
                    running state) costs (W-1)(p2p_alpha + p2p_beta m) and cannot overlap

``alpha`` is the per-step latency inside one collective; ``p2p_alpha`` is the latency of one
dependent hop, which also pays a launch, a synchronisation and the small fold kernel on the
critical path, so it is larger. Reduction arithmetic in reduce-scatter is ignored. NCCL's
tree/PAT all-gather algorithms have log(W) latency: the ring form is the conservative choice
for LASP-2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Link:
    """One interconnect level. alpha, p2p_alpha in seconds; bandwidth in bytes/s per GPU and
    direction, as achieved by the collective library (not the link's peak); p2p_bandwidth the
    same for point-to-point sends when it differs (gloo's loopback sends are several times
    faster per byte than its collectives; on NCCL they are about equal)."""

    name: str
    alpha: float
    bandwidth: float
    p2p_alpha: float
    p2p_bandwidth: Optional[float] = None

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth

    @property
    def p2p_beta(self) -> float:
        return 1.0 / (self.p2p_bandwidth or self.bandwidth)

    def scaled(self, factor: float) -> "Link":
        """Every cost stretched by ``factor`` (ranks sharing CPU cores)."""
        return Link(self.name, self.alpha * factor, self.bandwidth / factor, self.p2p_alpha * factor,
                    self.p2p_bandwidth / factor if self.p2p_bandwidth else None)


@dataclass(frozen=True)
class Network:
    """Two-level cluster: a ring or exchange spanning more than one node is bound by the
    inter-node link (one NIC per GPU assumed)."""

    intra: Link
    inter: Link
    gpus_per_node: int = 8

    def link(self, W: int) -> Link:
        return self.intra if W <= self.gpus_per_node else self.inter


def all_gather_time(W: int, gathered_bytes: float, link: Link) -> float:
    return (W - 1) * (link.alpha + link.beta * gathered_bytes / W) if W > 1 else 0.0


def reduce_scatter_time(W: int, buffer_bytes: float, link: Link) -> float:
    return all_gather_time(W, buffer_bytes, link)


def all_to_all_time(W: int, buffer_bytes: float, link: Link) -> float:
    return all_gather_time(W, buffer_bytes, link)


def collective_bytes_per_rank(W: int, buffer_bytes: float) -> float:
    """Bytes each rank sends (and receives) in a ring all-gather, reduce-scatter or all-to-all."""
    return (W - 1) / W * buffer_bytes


def p2p_time(nbytes: float, link: Link) -> float:
    return link.p2p_alpha + link.p2p_beta * nbytes


def chain_time(W: int, nbytes: float, link: Link) -> float:
    """W - 1 dependent hops of ``nbytes`` (the LASP-1 running state), one after the other."""
    return (W - 1) * p2p_time(nbytes, link)
