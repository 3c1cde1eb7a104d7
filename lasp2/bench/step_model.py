"""One training step per GPU, term by term: what ``lasp2 plan`` predicts and ``--explain`` prints.

G = dp x sp GPUs; every SP group of ``sp`` GPUs trains one sequence of ``seq_len`` tokens
(T = seq_len / sp per GPU, batch 1 per SP group). Per GPU and step (seconds):

    dense compute     3 x forward FLOPs per token x T / (peak x mfu), 4 x with activation
                      checkpointing (the forward runs again in backward)
    attention compute per layer, from the cost model (cost_model.py / baselines.py), the forward
                      again under checkpointing
    SP communication  per layer and term, exposed part (what the overlap the library implements
                      does not hide); LASP-1-serial's serialised inter-chunk compute is one of them
    gradient sync     over all G GPUs (SP ranks hold partial gradients of the same weights, DP ranks
                      of other sequences): ddp / zero1: all-reduce of fp32 gradients (reduce-scatter
                      + all-gather); zero2: reduce-scatter fp32 + all-gather bf16 weights; fsdp2
                      (ZeRO-3): all-gather bf16 weights forward and backward + reduce-scatter fp32;
                      exposed: what exceeds grad_overlap x the backward compute
    optimizer step    Adam, HBM-bound: 32 bytes read or written per parameter held (fp32 master,
                      m, v, gradient; bf16 copy) / HBM bandwidth
    fixed overhead    calibration.step_overhead_s

Memory per GPU (bytes): model states (fp32 weights and gradients, Adam m and v: 16 per parameter;
ddp keeps all, zero1 shards the 8 optimizer bytes over G, zero2 also the gradients, fsdp2
everything, plus one layer gathered) + activations kept for backward (``ModelConfig`` counts
them; checkpointing keeps each layer's input and one layer's full set) + the strategy's buffers
+ calibration.reserved_bytes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import List, Optional, Tuple

from .baselines import linear_cost, linear_entry
from .cost_model import BWD_FACTOR, Shape, scan_blocks, softmax_layer
from .hardware import Calibration, Hardware, links
from .network import all_gather_time, reduce_scatter_time

SHARDING = ("ddp", "zero1", "zero2", "fsdp2")
ADAM_BYTES_TOUCHED = 32


@dataclass(frozen=True)
class Setup:
    """Everything but the model, the GPU count and the strategy."""

    hardware: Hardware
    calibration: Calibration
    sharding: str = "ddp"
    checkpointing: bool = False

    def __post_init__(self):
        if self.sharding not in SHARDING:
            raise ValueError(f"--sharding {self.sharding!r}: choose one of {', '.join(SHARDING)}")

    @property
    def rate(self) -> float:
        return self.hardware.peak_flops * self.calibration.mfu

    @property
    def network(self):
        return links(self.hardware, self.calibration)


@dataclass(frozen=True)
class Term:
    name: str
    seconds: float       # the whole term
    exposed: float       # on the critical path (seconds - exposed is hidden behind compute)
    kind: str = "comm"   # "compute" | "comm" | "fixed" (optimizer, overhead)


@dataclass
class StepCost:
    terms: List[Term]
    memory: "OrderedDict[str, float]"
    blocks: Optional[int] = None

    @property
    def time(self) -> float:
        return sum(t.exposed for t in self.terms)

    def total(self, kind: str) -> float:
        return sum(t.exposed for t in self.terms if t.kind == kind)


def model_state_bytes(params: float, layer_params: float, gpus: int, sharding: str) -> float:
    """16 bytes per parameter (fp32 weights and gradients, Adam m and v) sharded as chosen."""
    return {"ddp": 16 * params, "zero1": 8 * params + 8 * params / gpus, "zero2": 4 * params + 12 * params / gpus,
            "fsdp2": 16 * params / gpus + 2 * 4 * layer_params}[sharding]


def grad_sync_time(params: float, gpus: int, sharding: str, link) -> float:
    if sharding in ("ddp", "zero1"):
        return 2 * reduce_scatter_time(gpus, 4 * params, link)
    if sharding == "zero2":
        return reduce_scatter_time(gpus, 4 * params, link) + all_gather_time(gpus, 2 * params, link)
    return reduce_scatter_time(gpus, 4 * params, link) + 2 * all_gather_time(gpus, 2 * params, link)


@lru_cache(maxsize=8192)  # the projection asks for the same points many times; callers do not mutate
def step_cost(model, dp: int, sp: int, seq_len: int, setup: Setup, pair: Tuple) -> StepCost:
    """Every term of one step on the slowest GPU; ValueError when the pair cannot run here."""
    T, G, cal, hw = seq_len // sp, dp * sp, setup.calibration, setup.hardware
    net, rate = setup.network, setup.rate
    link = net.link(sp)
    shape = Shape(B=1, T=T, H=model.heads, K=model.head_dim, V=model.head_dim, Hkv=model.kv_heads)
    layers = [linear_cost(pair[0], sp, replace(shape, Hkv=None), rate, link) if kind == "L"
              else softmax_layer(pair[1], sp, shape, rate, link) for kind in model.kinds()]
    recompute = 1 if setup.checkpointing else 0
    dense_fwd = model.dense_flops_per_token() * T / rate
    attn = sum(c.compute for c in layers)
    attn_fwd = sum(c.compute / (1 + BWD_FACTOR["linear" if k == "L" else "softmax"])
                   for c, k in zip(layers, model.kinds()))
    dense = (3 + recompute) * dense_fwd
    terms = [Term("dense compute (projections, MLP, LM head)", dense, dense, "compute"),
             Term("attention compute", attn + recompute * attn_fwd, attn + recompute * attn_fwd, "compute")]
    comm = OrderedDict()
    for c in layers:
        for name, secs, exposed in c.parts:
            a, b = comm.get(name, (0.0, 0.0))
            comm[name] = (a + secs, b + exposed)
    terms += [Term(f"SP: {name}", *v) for name, v in comm.items()]
    backward = 2 * dense_fwd + (attn - attn_fwd) + recompute * (dense_fwd + attn_fwd)
    sync = grad_sync_time(model.params(), G, setup.sharding, net.link(G)) if G > 1 else 0.0
    terms.append(Term(f"gradient sync over {G} GPUs ({setup.sharding})", sync,
                      max(0.0, sync - cal.grad_overlap * backward)))
    held = model.params() / (1 if setup.sharding in ("ddp",) else G)
    opt = ADAM_BYTES_TOUCHED * held / hw.hbm_bandwidth
    terms += [Term("optimizer step (Adam, HBM-bound)", opt, opt, "fixed"),
              Term("fixed per-step overhead", cal.step_overhead_s, cal.step_overhead_s, "fixed")]
    acts = model.activation_bytes_per_token() * T
    if setup.checkpointing:  # each layer's bf16 input, one layer's full set, the LM head's
        acts = (2 * model.hidden * model.layers + max(model.layer_activation_bytes_per_token(k) for k in "LN")
                + model.head_activation_bytes_per_token()) * T
    memory = OrderedDict([
        (f"model states ({setup.sharding})",
         model_state_bytes(model.params(), model.layer_params(), G, setup.sharding)),
        ("activations" + (" (checkpointed)" if setup.checkpointing else ""), acts),
        ("strategy buffers", sum(c.saved for c in layers) + max((c.transient for c in layers), default=0.0)),
        ("reserved (CUDA context, NCCL, allocator)", cal.reserved_bytes)])
    entry = linear_entry(pair[0]) if pair[0] else None
    pipelined = entry is not None and entry.pipelined and sp > 1
    blocks = scan_blocks(sp, replace(shape, Hkv=None), link) if pipelined else None
    return StepCost(terms, memory, blocks)
