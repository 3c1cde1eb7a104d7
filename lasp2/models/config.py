"""LinearLlamaConfig: the typed, validated description of a Linear-Llama3 model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

from ..nn.linear_attention import LINEAR_VARIANTS

LAYER_TYPES = {"L": "linear attention", "N": "softmax (normal) attention"}

PRESETS: Dict[str, Dict[str, Any]] = {
    # Tiny: a training step on a few thousand tokens takes well under a second on CPU. Hybrid by
    # default so that it exercises both kinds of layer; used by the README and the parity tests.
    "debug": dict(vocab_size=256, hidden=64, layers=4, heads=4, kv_heads=2, mlp_hidden=128,
                  layer_pattern="LLLN", linear_variant="bla", rope_theta=10000.0,
                  tie_embeddings=False, feature_dim=8),
    # Mid-size (44M parameters, 8 blocks of width 512, 32K vocabulary, hybrid): large enough that
    # parameters and optimizer state dominate a rank's memory, small enough for a CPU box; the
    # DDP vs FSDP2 memory table of the README uses it.
    "linear-llama3-mid": dict(vocab_size=32000, hidden=512, layers=8, heads=8, kv_heads=4, mlp_hidden=1536,
                              layer_pattern="LLLN", linear_variant="mamba2", rope_theta=500000.0,
                              tie_embeddings=True),
    # The LASP-2 paper's Linear-Llama3-1B: Llama 3 1B shape (16 layers, width 2048, vocabulary
    # 128256) with 16 heads; GQA with 8 KV heads in the softmax layers as Llama 3. Pure linear
    # by default; the paper's hybrid is layer_pattern="LLLN" (one softmax layer in four).
    "linear-llama3-1b": dict(vocab_size=128256, hidden=2048, layers=16, heads=16, kv_heads=8,
                             mlp_hidden=8192, layer_pattern="L", linear_variant="bla",
                             rope_theta=500000.0, tie_embeddings=True),
}


@dataclass
class LinearLlamaConfig:
    """Shape and options of a :class:`LinearLlama`. Validated on construction (ValueError).

    Fields:
        vocab_size: tokens in the vocabulary.
        hidden: model width. layers: number of blocks.
        heads: attention heads (both kinds of layer); kv_heads: key/value heads of the softmax
            layers (GQA; heads % kv_heads == 0). head_dim = hidden // heads is derived.
        mlp_hidden: inner width of the SwiGLU MLP.
        layer_pattern: one letter per layer, repeated (and cut) to ``layers``: "L" linear
            attention, "N" softmax ("normal") attention; e.g. "LLLN" puts a softmax layer at
            every fourth block. ``layer_types`` gives the expanded pattern.
        linear_variant: the linear-attention variant of every "L" layer (``lasp2.nn.LINEAR_VARIANTS``).
        rope_theta: RoPE base of the softmax layers.
        tie_embeddings: share the input embedding and the LM head.
        init_std: std of the normal init; residual-stream writes use init_std / sqrt(2 layers).
        norm_eps: RMSNorm epsilon. feature_dim: q/k width per head for "based" / "rebased".
        gate_low_rank: rank of the "gla" gate projection.
    """

    vocab_size: int = 256
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    mlp_hidden: int = 128
    layer_pattern: str = "LLLN"
    linear_variant: str = "bla"
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    norm_eps: float = 1e-5
    feature_dim: int = 16
    gate_low_rank: int = 16
    head_dim: int = field(init=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "mlp_hidden", "feature_dim",
                     "gate_low_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "init_std", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads}); choose "
                             f"heads that divide hidden (head_dim = hidden // heads)")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads}); "
                             f"choose kv_heads that divide heads (kv_heads = heads disables GQA)")
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern:
            raise ValueError(f"layer_pattern must be a non-empty string of 'L' / 'N', got {self.layer_pattern!r}")
        bad = sorted(set(self.layer_pattern) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_pattern {self.layer_pattern!r} has unknown letter(s) {bad}; use 'L' "
                             f"(linear attention) and 'N' (softmax attention), e.g. 'LLLN'")
        if self.linear_variant not in LINEAR_VARIANTS:
            raise ValueError(f"unknown linear_variant {self.linear_variant!r}; choose one of "
                             f"{', '.join(LINEAR_VARIANTS)}")
        self.head_dim = self.hidden // self.heads
        if "N" in self.layer_types and self.head_dim % 2:
            raise ValueError(f"softmax layers need an even head_dim for RoPE, got hidden // heads = "
                             f"{self.head_dim}; change hidden or heads")

    @property
    def layer_types(self) -> Tuple[str, ...]:
        """'L' or 'N' for every layer: ``layer_pattern`` repeated to depth."""
        p = self.layer_pattern
        return tuple(p[i % len(p)] for i in range(self.layers))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LinearLlamaConfig":
        """A named preset (``PRESETS``: "debug", "linear-llama3-mid", "linear-llama3-1b") with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "LinearLlamaConfig":
        """Inverse of ``to_dict``; unknown keys raise ValueError (head_dim is derived, not set)."""
        allowed = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown LinearLlamaConfig field(s) {unknown}; valid fields: {', '.join(allowed)}"
                             + (" (head_dim is derived as hidden // heads)" if "head_dim" in unknown else ""))
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """The settable fields (for checkpoints and logs); ``from_dict`` rebuilds the config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
