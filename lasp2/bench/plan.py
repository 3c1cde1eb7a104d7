"""``lasp2 plan``: whole-model predictions from the per-layer cost model, and a recommendation.

A training step of one sequence of ``seq_len`` tokens sharded over W GPUs (the SP group is all
of them). Per GPU and step:

    time    = dense compute + sum over layers of (attention compute + exposed communication)
    dense   = 3 x (forward FLOPs per token) x T_local / rate, forward FLOPs per token =
              per layer 2 d (H K + 2 Hkv K) + 2 H V d (projections) + 6 d F (SwiGLU), plus
              2 d vocab for the LM head (norms, embeddings and the optimizer step ignored)
    memory  = model states 16 bytes/parameter (bf16 weights and grads, fp32 master and two Adam
              moments) sharded over the W GPUs (ZeRO-3/FSDP over the same GPUs, assumed)
              + activations kept for backward, 2 bytes x (6d + 2 Hkv K + 3F) per token and layer
              (bf16, no activation checkpointing) + bf16 logits
              + the strategy's own buffers (LayerCost.mem; one layer live at a time, plus the
              gathered K/V that LASP-2H keeps for backward in every softmax layer)

Presets are *assumptions*, printed with every plan: H100 SXM, 989 TFLOP/s dense bf16 at 40% of
peak, 80 GB; NVLink 4 inside a node of 8 (achieved ~300 GB/s per GPU and direction, 5 us per
collective step, 20 us per dependent P2P hop); InfiniBand NDR, one 400 Gb/s NIC per GPU
(achieved ~40 GB/s, 10 us per step, 25 us per dependent hop). Data-parallel gradient traffic
is the same for every SP strategy and is not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from ..models.config import PRESETS
from ..parallel.strategies import LINEAR, LINEAR_STRATEGIES, SOFTMAX, SOFTMAX_STRATEGIES
from .cost_model import Link, Network, Shape, linear_layer, scan_blocks, softmax_layer

NVLINK = Link("NVLink4 (intra-node)", alpha=5e-6, bandwidth=300e9, p2p_alpha=20e-6)
INFINIBAND = Link("InfiniBand NDR 400G per GPU", alpha=10e-6, bandwidth=40e9, p2p_alpha=25e-6)
NETWORKS = {"cluster": Network(NVLINK, INFINIBAND, 8), "nvlink": Network(NVLINK, NVLINK, 1 << 30),
            "infiniband": Network(INFINIBAND, INFINIBAND, 1)}


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float
    efficiency: float
    memory: float

    @property
    def rate(self) -> float:
        return self.peak_flops * self.efficiency


DEVICES = {"h100": Device("H100 SXM (bf16 dense)", 989e12, 0.40, 80e9),
           "h200": Device("H200 SXM (bf16 dense)", 989e12, 0.40, 141e9)}


@dataclass(frozen=True)
class ModelConfig:
    """Llama-3 shaped model; ``pattern`` cycles over the layers: 'L' linear attention, 'N'
    softmax ("normal") attention, e.g. "LLLN": a hybrid with one softmax layer in four (the
    letters of lasp2.models.LinearLlamaConfig.layer_pattern)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int = 128256
    pattern: str = "L"
    tied: bool = False  # input embedding shared with the LM head

    def __post_init__(self):
        if not self.pattern or set(self.pattern) - {"L", "N"}:
            raise ValueError(f"layer pattern {self.pattern!r} must be made of 'L' (linear) and 'N' (softmax)")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden} must divide by heads {self.heads}, and heads by kv_heads "
                             f"{self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def kinds(self) -> List[str]:
        return [self.pattern[i % len(self.pattern)] for i in range(self.layers)]

    def params(self) -> float:
        d, K = self.hidden, self.head_dim
        per_layer = d * (self.heads * K + 2 * self.kv_heads * K) + self.heads * K * d + 3 * d * self.ffn
        return self.layers * per_layer + (1 if self.tied else 2) * self.vocab * d

    def dense_flops_per_token(self) -> float:
        d, K = self.hidden, self.head_dim
        proj = 2 * d * (self.heads * K + 2 * self.kv_heads * K) + 2 * self.heads * K * d + 6 * d * self.ffn
        return self.layers * proj + 2 * d * self.vocab

    def activation_bytes_per_token(self) -> float:
        d = self.hidden
        return 2 * self.layers * (6 * d + 2 * self.kv_heads * self.head_dim + 3 * self.ffn) + 2 * self.vocab


def from_preset(name: str, label: str) -> ModelConfig:
    """The shape of ``lasp2.models`` preset ``name`` (read from it, never copied)."""
    p = PRESETS[name]
    return ModelConfig(label, p["hidden"], p["layers"], p["heads"], p["kv_heads"], p["mlp_hidden"],
                       vocab=p["vocab_size"], pattern=p["layer_pattern"], tied=p["tie_embeddings"])


MODELS = {
    # The paper's model, as lasp2.models builds it: 16 heads of 128.
    "linear-llama3-1b": from_preset("linear-llama3-1b", "Linear-Llama3-1B"),
    "linear-llama3-8b": ModelConfig("Linear-Llama3-8B", 4096, 32, 32, 8, 14336),
}


@dataclass
class Prediction:
    label: str
    time: float
    compute: float
    comm: float
    bytes_sent: float
    calls: int
    memory: float
    fits: bool
    tokens_per_s_per_gpu: float
    note: str = ""
    dp_fraction: float = 0.0       # data-parallel step time (same tokens per GPU, no SP) / this one
    blocks: Optional[int] = None   # the pipelined chain's block count k* (allscan)


def strategy_pairs(model: ModelConfig) -> List[tuple]:
    """(linear strategy, softmax strategy) combinations that matter for this layer pattern."""
    lin = list(LINEAR_STRATEGIES) if "L" in model.pattern else [None]
    soft = list(SOFTMAX_STRATEGIES) if "N" in model.pattern else [None]
    return [(a, b) for a in lin for b in soft]


def by_pattern(linear_pattern: Optional[str], softmax_pattern: Optional[str]) -> tuple:
    """The (linear, softmax) pair of the registry with these communication patterns."""
    lin = next(n for n, e in LINEAR.items() if e.pattern == linear_pattern) if linear_pattern else None
    soft = next(n for n, e in SOFTMAX.items() if e.pattern == softmax_pattern) if softmax_pattern else None
    return lin, soft


def label(pair: tuple) -> str:
    """"a + b"; LASP-2H is the pair that all-gathers in both kinds of layer."""
    text = " + ".join(x for x in pair if x)
    hybrid = all(x and reg[x].pattern == "all-gather" for x, reg in zip(pair, (LINEAR, SOFTMAX)))
    return text + " (LASP-2H)" if hybrid else text


def predict(model: ModelConfig, W: int, seq_len: int, network: Network, device: Device, pair: tuple,
            batch: int = 1) -> Prediction:
    """One training step (fwd + bwd) per GPU for the (linear, softmax) strategy pair."""
    if seq_len % W:
        raise ValueError(f"seq_len {seq_len} does not split over {W} GPUs")
    T = seq_len // W
    link = network.link(W)
    shape = Shape(B=batch, T=T, H=model.heads, K=model.head_dim, V=model.head_dim, Hkv=model.kv_heads)
    dense = 3 * model.dense_flops_per_token() * batch * T / device.rate
    costs = []
    try:
        for kind in model.kinds():
            if kind == "L":
                costs.append(linear_layer(pair[0], W, replace(shape, Hkv=None), device.rate, link))
            else:
                costs.append(softmax_layer(pair[1], W, shape, device.rate, link))
    except ValueError as e:
        return Prediction(label(pair), float("inf"), 0, 0, 0, 0, 0, False, 0.0, f"not applicable: {e}")
    compute = dense + sum(c.compute for c in costs)
    comm = sum(c.comm for c in costs)
    memory = (16 * model.params() / W + model.activation_bytes_per_token() * batch * T
              + sum(c.saved for c in costs) + max((c.transient for c in costs), default=0))
    fits = memory <= device.memory
    time = compute + comm
    k = scan_blocks(W, replace(shape, Hkv=None), link) if pair[0] and LINEAR[pair[0]].pipelined else None
    return Prediction(label(pair), time, compute, comm, sum(c.bytes_sent for c in costs),
                      sum(sum(c.calls) for c in costs), memory, fits, batch * T / time,
                      "" if fits else f"needs {memory / 1e9:.0f} GB > {device.memory / 1e9:.0f} GB",
                      data_parallel_time(model, T, device, batch) / time, k)


def data_parallel_time(model: ModelConfig, tokens_per_gpu: int, device: Device, batch: int = 1) -> float:
    """Step time per GPU of the same model trained data-parallel with the same tokens per GPU and
    no SP: every GPU holds whole sequences of ``tokens_per_gpu`` tokens (softmax layers attend
    over those only) and nothing crosses GPUs inside a layer. The gradient all-reduce is the same
    for SP and DP and, as everywhere here, not modelled."""
    T = tokens_per_gpu
    shape = Shape(B=batch, T=T, H=model.heads, K=model.head_dim, V=model.head_dim, Hkv=model.kv_heads)
    dense = 3 * model.dense_flops_per_token() * batch * T / device.rate
    link = Link("none", 0.0, 1.0, 0.0)
    return dense + sum((linear_layer("ideal", 1, replace(shape, Hkv=None), device.rate, link) if kind == "L"
                        else softmax_layer("ideal", 1, shape, device.rate, link)).compute for kind in model.kinds())


def recommend(preds: List[Prediction]) -> Optional[Prediction]:
    """Fastest strategy that fits in memory (ties: fewer bytes); None when nothing fits."""
    ok = [p for p in preds if p.fits]
    return min(ok, key=lambda p: (round(p.time, 9), p.bytes_sent)) if ok else None


def reason(best: Prediction, preds: List[Prediction]) -> str:
    """Why ``best`` (from ``recommend``) wins, in one sentence from the predicted components."""
    rivals = sorted((p for p in preds if p.fits and p is not best), key=lambda p: p.time)
    oom = [p.label for p in preds if not p.fits and not p.note.startswith("not applicable")]
    tail = f"; {', '.join(oom)} would not fit in memory" if oom else ""
    if not rivals:
        return "the only strategy that fits in memory" + tail
    ru = rivals[0]
    gain = ru.time / best.time - 1
    why = (f"exposed communication {best.comm * 1e3:.2f} ms vs {ru.comm * 1e3:.2f} ms per step"
           if abs(best.comm - ru.comm) >= abs(best.compute - ru.compute) else
           f"attention compute {best.compute * 1e3:.1f} ms vs {ru.compute * 1e3:.1f} ms per step")
    close = " (within 1%: the choice hardly matters here)" if gain < 0.01 else ""
    blocks = f"; chain in k* = {best.blocks} blocks" if best.blocks else ""
    return (f"{gain:.1%} faster per step than the runner-up {ru.label}{close}: {why}{blocks}; "
            f"{best.dp_fraction:.2f} of data-parallel throughput{tail}")


def assumptions(network: Network, device: Device) -> List[str]:
    links = [network.intra] if network.intra == network.inter else [network.intra, network.inter]
    out = [f"- compute: {device.name}, {device.peak_flops / 1e12:.0f} TFLOP/s peak x {device.efficiency:.0%} "
           f"achieved = {device.rate / 1e12:.0f} TFLOP/s; {device.memory / 1e9:.0f} GB per GPU"]
    for ln in links:
        out.append(f"- {ln.name}: {ln.bandwidth / 1e9:.0f} GB/s achieved per GPU and direction, "
                   f"alpha {ln.alpha * 1e6:.0f} us per collective step, {ln.p2p_alpha * 1e6:.0f} us per dependent hop")
    if network.intra != network.inter:
        out.append(f"- {network.gpus_per_node} GPUs per node: groups larger than a node are bound by the "
                   "inter-node link")
    out.append("- ring algorithms for every collective; zigzag layout for causal softmax; bf16 activations, "
               "fp32 states; no activation checkpointing; model states sharded over the W GPUs (ZeRO-3)")
    return out


def plan_table(model: ModelConfig, gpus: List[int], seq_lens: List[int], network: Network,
               device: Device) -> Dict:
    """Predictions for every (W, T) and strategy pair; the recommended pair per point."""
    rows = []
    for W in gpus:
        for T in seq_lens:
            preds = [predict(model, W, T, network, device, pair) for pair in strategy_pairs(model)]
            best = recommend(preds)
            rows.append({"W": W, "seq_len": T, "predictions": preds, "best": best.label if best else None})
    return {"model": model, "rows": rows}
