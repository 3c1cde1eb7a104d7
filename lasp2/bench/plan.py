"""``lasp2 plan``: whole-step predictions per strategy and split, and a recommendation with the
model's uncertainty.

G GPUs are split into dp x sp (``--split 8x8``, or every power-of-two split the sequence allows
with ``--split auto``, the default being sp = G); each SP group trains one sequence per step. The
per-step terms (compute, each communication, exposed vs overlapped, gradient sync, optimizer,
fixed overhead) and the memory per GPU are :mod:`lasp2.bench.step_model`'s; the hardware and
calibration :mod:`lasp2.bench.hardware`'s; the calibration is fitted to the LASP-2 paper
(:mod:`lasp2.bench.published`), whose held-out error is the uncertainty every prediction carries.

Strategies: the registry's (``lasp2.parallel.strategies``) and the modelled baselines of
:mod:`lasp2.bench.baselines` (compared, never recommended: lasp2 does not ship them); hybrids
pair each with every softmax strategy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..models.config import PRESETS
from ..parallel.strategies import LINEAR, LINEAR_STRATEGIES, SOFTMAX, SOFTMAX_STRATEGIES
from .baselines import BASELINES, linear_entry
from .step_model import Setup, Term, step_cost

# Linear exchange patterns a published GPU measurement covers (the LASP-2 paper: its all-gather and
# LASP-1's chain; lasp2/bench/published.py). The others' terms are unvalidated on GPUs.
MEASURED_PATTERNS = ("all-gather", "chain")


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

    def layer_params(self) -> float:
        d, K = self.hidden, self.head_dim
        return d * (self.heads * K + 2 * self.kv_heads * K) + self.heads * K * d + 3 * d * self.ffn

    def params(self) -> float:
        return self.layers * self.layer_params() + (1 if self.tied else 2) * self.vocab * self.hidden

    def dense_flops_per_token(self) -> float:
        d, K = self.hidden, self.head_dim
        proj = 2 * d * (self.heads * K + 2 * self.kv_heads * K) + 2 * self.heads * K * d + 6 * d * self.ffn
        return self.layers * proj + 2 * d * self.vocab

    def layer_activation_bytes_per_token(self, kind: str) -> float:
        """Kept for backward by one layer, per token: bf16 norms' inputs, q, k, v, attention output,
        MLP inputs and SwiGLU intermediates, 2 (6d + 2 Hkv K + 3F); a linear layer also keeps its
        chunked kernel's per-chunk fp32 states, 4 H K V / 64 (fla's chunk size)."""
        d, K = self.hidden, self.head_dim
        states = 4 * self.heads * K * K / 64 if kind == "L" else 0.0
        return 2 * (6 * d + 2 * self.kv_heads * K + 3 * self.ffn) + states

    def head_activation_bytes_per_token(self) -> float:
        """bf16 logits and the fp32 copy the cross-entropy keeps: 6 bytes per vocabulary entry."""
        return 6 * self.vocab

    def activation_bytes_per_token(self) -> float:
        layers = sum(self.layer_activation_bytes_per_token(k) for k in self.kinds())
        return layers + self.head_activation_bytes_per_token()


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
    memory: float
    fits: bool
    tokens_per_s_per_gpu: float
    note: str = ""
    dp_fraction: float = 0.0       # tokens/s/GPU of this / tokens/s/GPU of data parallel on T-token sequences
    dp_tokens_per_s_per_gpu: float = 0.0
    blocks: Optional[int] = None
    dp: int = 1
    sp: int = 1
    terms: List[Term] = field(default_factory=list)
    memory_parts: Dict[str, float] = field(default_factory=dict)
    baseline: bool = False         # modelled only: lasp2 does not ship it
    pair: tuple = ()

    @property
    def split(self) -> str:
        return f"{self.dp}x{self.sp}"


def strategy_pairs(model: ModelConfig, linear_names: Optional[List[str]] = None,
                   baselines: bool = False) -> List[tuple]:
    """(linear, softmax) combinations for this layer pattern: the registry's linear strategies
    (plus the modelled baselines when asked, or exactly ``linear_names``) x its softmax ones."""
    if linear_names:
        for n in linear_names:
            linear_entry(n)  # ValueError naming the choices
    lin = (list(linear_names) if linear_names else list(LINEAR_STRATEGIES) + (list(BASELINES) if baselines else [])) \
        if "L" in model.pattern else [None]
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
    hybrid = all(x in reg and reg[x].pattern == "all-gather" for x, reg in zip(pair, (LINEAR, SOFTMAX)))
    return text + " (LASP-2H)" if hybrid else text


def splits(gpus: int, seq_len: int) -> List[int]:
    """SP sizes to try: powers of two dividing the GPU count and the sequence."""
    return [sp for sp in (1 << i for i in range(gpus.bit_length())) if gpus % sp == 0 and seq_len % sp == 0]


def predict(model: ModelConfig, gpus: int, seq_len: int, setup: Setup, pair: tuple,
            sp: Optional[int] = None) -> Prediction:
    """One training step per GPU of ``pair`` with ``sp`` GPUs per sequence (default all)."""
    sp = sp or gpus
    if gpus % sp or seq_len % sp:
        raise ValueError(f"split {gpus // max(sp, 1)}x{sp}: sp must divide --gpus {gpus} and the sequence ({seq_len})")
    dp, T = gpus // sp, seq_len // sp
    base = any(x in BASELINES for x in pair)
    try:
        cost = step_cost(model, dp, sp, seq_len, setup, pair)
    except ValueError as e:
        return Prediction(label(pair), float("inf"), 0, 0, 0, False, 0.0, f"not applicable: {e}", dp=dp, sp=sp,
                          baseline=base, pair=pair)
    memory = sum(cost.memory.values())
    fits = memory <= setup.hardware.memory_bytes
    reference = by_pattern("all-gather", "all-gather" if "N" in model.pattern else None)
    dp_ref = step_cost(model, gpus, 1, T, setup, reference)
    note = "" if fits else f"needs {memory / 1e9:.0f} GB > {setup.hardware.memory_bytes / 1e9:.0f} GB"
    return Prediction(label(pair), cost.time, cost.total("compute"), cost.total("comm"), memory, fits, T / cost.time,
                      note,
                      dp_ref.time / cost.time, T / dp_ref.time, cost.blocks, dp, sp, cost.terms, dict(cost.memory),
                      base, pair)


def best_split(model: ModelConfig, gpus: int, seq_len: int, setup: Setup, pair: tuple) -> Prediction:
    """The fastest split that fits (the smallest-memory one when none fits)."""
    preds = [predict(model, gpus, seq_len, setup, pair, sp) for sp in splits(gpus, seq_len)]
    ok = [p for p in preds if p.fits]
    return min(ok, key=lambda p: p.time) if ok else min(preds, key=lambda p: (p.memory or float("inf"), p.time))


def recommend(preds: List[Prediction]) -> Optional[Prediction]:
    """Fastest library strategy that fits in memory (ties: fewer GPUs per sequence); None when
    nothing fits. Modelled baselines are compared, never recommended."""
    ok = [p for p in preds if p.fits and not p.baseline]
    return min(ok, key=lambda p: (round(p.time, 9), p.sp)) if ok else None


def reason(best: Prediction, preds: List[Prediction], uncertainty: float) -> str:
    """Why ``best`` wins, in one sentence from the predicted terms, with the model's uncertainty."""
    rivals = sorted((p for p in preds if p.fits and p is not best and not p.baseline), key=lambda p: p.time)
    oom = [p.label for p in preds if not p.fits and not p.note.startswith("not applicable")]
    tail = f"; {', '.join(oom)} would not fit in memory" if oom else ""
    dp = (f"; {best.tokens_per_s_per_gpu:,.0f} tokens/s per GPU = {best.dp_fraction:.2f} x the "
          f"{best.dp_tokens_per_s_per_gpu:,.0f} tokens/s per GPU of plain data parallel (every GPU training whole "
          f"{best.tokens_per_s_per_gpu * best.time:,.0f}-token sequences, no SP)")
    if not rivals:
        return "the only library strategy that fits in memory" + dp + tail
    ru = rivals[0]
    gain = ru.time / best.time - 1
    theirs, ours = ({t.name: t.exposed for t in p.terms} for p in (ru, best))
    diff, name = max((theirs.get(n, 0.0) - ours.get(n, 0.0), n) for n in {**theirs, **ours})
    why = f"; the largest difference is {name}: {diff * 1e3:+.1f} ms per step for the runner-up" if diff > 0 else ""
    close = (f" -- within the model's +-{uncertainty:.0%} uncertainty: measure both (lasp2 bench) before "
             "choosing" if gain < uncertainty else f" (beyond the model's +-{uncertainty:.0%} uncertainty)")
    lin = linear_entry(best.pair[0]) if best.pair and best.pair[0] else None
    unmeasured = (f"; no published GPU measurement covers {lin.name}'s {lin.pattern} exchange: its terms are "
                  "first-principles only" if lin is not None and lin.pattern not in MEASURED_PATTERNS else "")
    return f"{gain:.1%} faster per step than the runner-up {ru.label} ({ru.split}){close}{why}{dp}{unmeasured}{tail}"


def assumptions(setup: Setup) -> List[str]:
    hw, cal, net = setup.hardware, setup.calibration, setup.network
    out = [f"- hardware: {hw.name} ({hw.source}): {hw.peak_flops / 1e12:.0f} TFLOP/s bf16 peak x {cal.mfu:.0%} "
           f"achieved (mfu) = {setup.rate / 1e12:.0f} TFLOP/s; {hw.memory_bytes / 1e9:.0f} GB; "
           f"{hw.gpus_per_node} GPUs per node",
           f"- {net.intra.name}: {net.intra.alpha * 1e6:.0f} us per collective step, "
           f"{net.intra.p2p_alpha * 1e6:.0f} us per dependent hop; {net.inter.name}: "
           f"{net.inter.alpha * 1e6:.0f} us, {net.inter.p2p_alpha * 1e6:.0f} us",
           f"- per step: {cal.step_overhead_s * 1e3:.0f} ms fixed overhead; gradient sync hidden behind "
           f"{cal.grad_overlap:.0%} of backward; model states {setup.sharding}; activation checkpointing "
           f"{'on' if setup.checkpointing else 'off'}; {cal.reserved_bytes / 1e9:.1f} GB reserved per GPU",
           "- ring algorithms for every collective; zigzag layout for causal softmax; bf16 activations, fp32 states"]
    return out


def plan_table(model: ModelConfig, gpus: List[int], seq_lens: List[int], setup: Setup,
               linear_names: Optional[List[str]] = None, sp: Optional[int] = None, auto_split: bool = False,
               baselines: bool = True) -> Dict:
    """Predictions for every (G, length) and strategy pair, at the given split (sp per sequence,
    default all G) or each pair's best split; the recommended pair per point."""
    rows = []
    for G in gpus:
        for n in seq_lens:
            preds = []
            for pair in strategy_pairs(model, linear_names, baselines):
                preds.append(best_split(model, G, n, setup, pair) if auto_split
                             else predict(model, G, n, setup, pair, sp))
            best = recommend(preds)
            rows.append({"W": G, "seq_len": n, "predictions": preds, "best": best})
    return {"model": model, "rows": rows}
