"""Linear-attention layer with every variant of DESIGN §1 (one module, selected by ``variant``).

    x [B, T, hidden] -> q, k [B, T, H, K], v [B, T, H, V], g, beta -> linear attention
      -> per-head RMSNorm over V -> * output gate -> o_proj -> [B, T, hidden]

| variant          | q, k feature            | gate g (log space, <= 0)                      | beta        | kind     |
|------------------|-------------------------|-----------------------------------------------|-------------|----------|
| bla              | identity                | none                                          |             | identity |
| lightning        | silu (TransNormerLLM)   | fixed per head: -2^(-8(h+1)/H) (ALiBi slopes) |             | scalar   |
| retention        | identity                | fixed per head: log(1 - 2^(-5-h)) (RetNet)    |             | scalar   |
| mamba2           | identity                | -softplus(W x + dt_bias) * exp(A_log), [B,T,H] |            | scalar   |
| gla              | identity                | logsigmoid(W_up W_down x) / 16, [B,T,H,K]     |             | diagonal |
| based            | Taylor map, K=1+d+d^2   | none                                          |             | identity |
| rebased          | (gamma norm(x)+beta)^2  | none                                          |             | identity |
| deltanet         | l2norm(silu)            | none                                          | sigmoid(Wx) | matrix   |
| gated_deltanet   | l2norm(silu)            | as mamba2                                     | sigmoid(Wx) | matrix   |
| kda              | l2norm(silu)            | -softplus(W_b W_a x + dt_bias) * exp(A_log_h), [B,T,H,K] | sigmoid(Wx) | channel_matrix |

The table is ``VARIANTS``: one ``Variant`` row per variant (feature map, gate parameterisation from
``gates.py``, beta, output gate); the row's transition kind (``lasp2.ops.transition``: identity,
scalar, diagonal, matrix, channel_matrix) follows from its gate and beta. A new variant of an existing kind is one
row.

There is no normaliser denominator (as in the papers' chunked forms): the per-head output RMSNorm
keeps the scale in check. Gates are computed in fp32 whatever the activations' dtype, because the
op sums them over thousands of tokens (fp64 when the model runs in fp64). No short convolutions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import linear_attention
from ..ops.common import compute_dtype
from ..ops.backends import BACKENDS
from ..ops.transition import Kind, kind_of
from ..parallel.api import sp_linear_attention
from .context import SPContext, where
from .feature_maps import ReBasedFeatureMap, TaylorFeatureMap
from .gates import FixedGate, KDAGate, LowRankChannelGate, Mamba2Gate, lightning_log_decay, retention_log_decay
from .norm import RMSNorm

OUTPUT_GATES = ("swish", "sigmoid", "none")


def unit_norm_silu(x: torch.Tensor) -> torch.Tensor:
    """l2norm(silu(x)) over the last dim: the delta rule needs unit-norm keys to stay stable."""
    return F.normalize(F.silu(x), p=2, dim=-1)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Variant:
    """One row of the layer table (module docstring).

    features: the q/k map on [B, T, H, d] when there is no ``feature_map``; feature_map: a module
    class built as ``feature_map(feature_dim)`` (its ``out_dim`` becomes K, and the op runs with
    scale 1: phi(q).phi(k) is already a similarity); gate: None or a gate parameterisation
    (``FixedGate``, ``Mamba2Gate``, ``LowRankChannelGate``); beta: the delta rule (beta =
    sigmoid(W x)); output_gate: the paper's output gate.
    """

    features: Callable[[torch.Tensor], torch.Tensor] = identity
    feature_map: Optional[type] = None
    gate: Optional[object] = None
    beta: bool = False
    output_gate: str = "swish"

    @property
    def kind(self) -> Kind:
        """The recurrence's transition kind (``ops.transition``); ValueError if not supported."""
        return kind_of(None if self.gate is None else self.gate.gate, self.beta)


MAMBA2_GATE = Mamba2Gate()
VARIANTS = {
    "bla": Variant(),
    "lightning": Variant(features=F.silu, gate=FixedGate(lightning_log_decay), output_gate="sigmoid"),
    "retention": Variant(gate=FixedGate(retention_log_decay)),
    "mamba2": Variant(gate=MAMBA2_GATE),
    "gla": Variant(gate=LowRankChannelGate()),
    "based": Variant(feature_map=TaylorFeatureMap),
    "rebased": Variant(feature_map=ReBasedFeatureMap),
    "deltanet": Variant(features=unit_norm_silu, beta=True),
    "gated_deltanet": Variant(features=unit_norm_silu, gate=MAMBA2_GATE, beta=True),
    "kda": Variant(features=unit_norm_silu, gate=KDAGate(), beta=True, output_gate="sigmoid"),  # Kimi Linear
}
"""Variant name -> its row. A new variant of an existing kind is one row here."""
LINEAR_VARIANTS = tuple(VARIANTS)
DELTA_VARIANTS = tuple(name for name, row in VARIANTS.items() if row.beta)


def fixed_log_decay(variant: str, heads: int, device=None) -> torch.Tensor:
    """log lambda_h, fp64 [H], for the constant-decay variants."""
    gate = VARIANTS[variant].gate if variant in VARIANTS else None
    if not isinstance(gate, FixedGate):
        raise ValueError(f"variant {variant!r} has no fixed decay")
    return gate.log_decay(torch.arange(heads, dtype=torch.float64, device=device), heads)


class LinearAttention(nn.Module):
    """Linear attention of one ``variant`` (see the module docstring), causal.

    Args:
        hidden: model width. heads: H. head_dim: V (and K unless a feature map sets it).
        variant: one of ``LINEAR_VARIANTS``.
        feature_dim: d, the per-head q/k projection width for "based" (K = 1 + d + d^2) and
            "rebased" (K = d).
        gate_low_rank: rank of the "gla" gate projection. gate_normalizer: "gla" divides the
            logsigmoid gate by it (16 in GLA), keeping decays close to 1.
        output_gate: "swish" / "sigmoid" / "none"; None picks the paper's choice (sigmoid for
            lightning, swish otherwise).
        norm_eps: epsilon of the per-head output RMSNorm.
        backend: the op's kernels, "auto" / "torch" / "fla" (``lasp2.ops.backends``; an attribute,
            which ``lasp2.parallelize(..., backend=...)`` may set).

    ``forward(x [B, T, hidden], *, cu_seqlens=None, batch=None) -> [B, T, hidden]`` (``batch``:
    this batch's ``SPBatch`` in place of ``cu_seqlens``, checked once when it was built). Without an SP context
    (``self.sp is None``) T is the whole sequence and ``lasp2.linear_attention`` runs; with one
    (set by ``lasp2.parallelize``) x holds this rank's tokens in ``self.sp.layout`` and
    ``lasp2.sp_linear_attention`` runs. ``cu_seqlens`` are always the *global* document boundaries.
    """

    def __init__(self, hidden: int, heads: int, head_dim: int, variant: str = "bla", *,
                 feature_dim: int = 16, gate_low_rank: int = 16, gate_normalizer: float = 16.0,
                 output_gate: Optional[str] = None, norm_eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        row = VARIANTS[variant]
        output_gate = output_gate or row.output_gate
        if output_gate not in OUTPUT_GATES:
            raise ValueError(f"unknown output_gate {output_gate!r}; choose one of {', '.join(OUTPUT_GATES)}")
        for name, value in (("hidden", hidden), ("heads", heads), ("head_dim", head_dim),
                            ("feature_dim", feature_dim), ("gate_low_rank", gate_low_rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.variant, self.row, self.heads, self.head_dim, self.backend = variant, row, heads, head_dim, backend
        self.output_gate, self.gate_normalizer = output_gate, gate_normalizer
        self.kind = row.kind  # ops.transition; a row of a declared but unsupported kind raises here
        self.sp: Optional[SPContext] = None  # set by lasp2.parallelize

        self.feature_map: Optional[nn.Module] = None if row.feature_map is None else row.feature_map(feature_dim)
        qk_dim = head_dim if self.feature_map is None else feature_dim  # per-head projection width
        self.key_dim = head_dim if self.feature_map is None else self.feature_map.out_dim  # K in the op
        # phi(q).phi(k) is already a similarity (Based, ReBased): no extra 1/sqrt(K).
        self.scale = 1.0 if self.feature_map is not None else None

        self.q_proj = nn.Linear(hidden, heads * qk_dim, bias=False)
        self.k_proj = nn.Linear(hidden, heads * qk_dim, bias=False)
        self.v_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.o_norm = RMSNorm(head_dim, eps=norm_eps)  # weight shared by the heads, as fla
        self.g_proj = nn.Linear(hidden, heads * head_dim, bias=False) if output_gate != "none" else None
        if row.gate is not None:
            row.gate.build(self, hidden, gate_low_rank)
        if row.beta:
            self.b_proj = nn.Linear(hidden, heads, bias=False)
        self.init_weights()

    # ---- parameters -------------------------------------------------------------------------

    def init_weights(self, generator: Optional[torch.Generator] = None, std: float = 0.02,
                     out_std: Optional[float] = None) -> None:
        """Normal(0, std) projections, ``out_std`` for o_proj (the residual-stream write);
        Mamba2's A in [1, 16] and dt in [1e-3, 1e-1] (log-uniform) as in Mamba2."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, getattr(self, "a_proj", None),
                    getattr(self, "gk_down", None), getattr(self, "gk_up", None), getattr(self, "b_proj", None),
                    getattr(self, "f_a_proj", None), getattr(self, "f_b_proj", None)):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, std, generator=generator)
        nn.init.normal_(self.o_proj.weight, 0.0, std if out_std is None else out_std, generator=generator)
        if hasattr(self, "gk_up"):
            nn.init.zeros_(self.gk_up.bias)
        if hasattr(self, "A_log"):
            with torch.no_grad():
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0, generator=generator).log())
                dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1), generator=generator).exp()
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt
        self.o_norm.init_weights()
        if isinstance(self.feature_map, ReBasedFeatureMap):
            self.feature_map.init_weights()

    # ---- forward ----------------------------------------------------------------------------

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The variant's q/k feature map on [B, T, H, d]."""
        return self.row.features(x) if self.feature_map is None else self.feature_map(x)

    def _gate(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """g in log space, fp32 (fp64 for fp64 x): None, [B, T, H] or [B, T, H, K] (per channel)."""
        return None if self.row.gate is None else self.row.gate(self, x, compute_dtype(x.dtype))  # fp32 at least

    def _attend(self, q, k, v, g, beta, cu_seqlens, batch) -> torch.Tensor:
        if self.sp is None:
            if batch is not None:
                cu_seqlens = batch.cu_seqlens
            o, _ = linear_attention(q, k, v, g, beta, scale=self.scale, cu_seqlens=cu_seqlens, backend=self.backend)
            return o
        return sp_linear_attention(q, k, v, g, beta, scale=self.scale, strategy=self.sp.strategy,
                                   backend=self.backend, **where(self.sp, cu_seqlens, batch))

    def forward(self, x: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None, batch=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, V = self.heads, self.head_dim
        q = self._features(self.q_proj(x).view(B, T, H, -1))
        k = self._features(self.k_proj(x).view(B, T, H, -1))
        v = self.v_proj(x).view(B, T, H, V)
        beta = torch.sigmoid(self.b_proj(x)) if self.row.beta else None
        o = self.o_norm(self._attend(q, k, v, self._gate(x), beta, cu_seqlens, batch))  # [B, T, H, V]
        if self.g_proj is not None:
            gate = self.g_proj(x).view(B, T, H, V)
            o = o * (F.silu(gate) if self.output_gate == "swish" else torch.sigmoid(gate))
        return self.o_proj(o.reshape(B, T, H * V))

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, heads={self.heads}, key_dim={self.key_dim}, "
                f"head_dim={self.head_dim}, output_gate={self.output_gate!r}")
