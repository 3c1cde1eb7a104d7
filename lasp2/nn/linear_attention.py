"""Linear-attention layer with every variant of DESIGN §1 (one module, selected by ``variant``).

    x [B, T, hidden] -> q, k [B, T, H, K], v [B, T, H, V], g, beta -> linear attention
      -> per-head RMSNorm over V -> * output gate -> o_proj -> [B, T, hidden]

| variant          | q, k feature            | gate g (log space, <= 0)                      | beta        |
|------------------|-------------------------|-----------------------------------------------|-------------|
| bla              | identity                | none                                          |             |
| lightning        | silu (TransNormerLLM)   | fixed per head: -2^(-8(h+1)/H) (ALiBi slopes) |             |
| retention        | identity                | fixed per head: log(1 - 2^(-5-h)) (RetNet)    |             |
| mamba2           | identity                | -softplus(W x + dt_bias) * exp(A_log), [B,T,H] |            |
| gla              | identity                | logsigmoid(W_up W_down x) / 16, [B,T,H,K]     |             |
| based            | Taylor map, K=1+d+d^2   | none                                          |             |
| rebased          | (gamma norm(x)+beta)^2  | none                                          |             |
| deltanet         | l2norm(silu)            | none                                          | sigmoid(Wx) |
| gated_deltanet   | l2norm(silu)            | as mamba2                                     | sigmoid(Wx) |

There is no normaliser denominator (as in the papers' chunked forms): the per-head output RMSNorm
keeps the scale in check. Gates are computed in fp32 whatever the activations' dtype, because the
op sums them over thousands of tokens (fp64 when the model runs in fp64). No short convolutions.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import linear_attention
from ..ops.common import compute_dtype
from ..ops.backends import BACKENDS
from ..parallel.api import sp_linear_attention
from .context import SPContext
from .feature_maps import ReBasedFeatureMap, TaylorFeatureMap
from .norm import RMSNorm

LINEAR_VARIANTS = ("bla", "lightning", "retention", "mamba2", "gla", "based", "rebased", "deltanet",
                   "gated_deltanet")
DELTA_VARIANTS = ("deltanet", "gated_deltanet")
OUTPUT_GATES = ("swish", "sigmoid", "none")


def fixed_log_decay(variant: str, heads: int, device=None) -> torch.Tensor:
    """log lambda_h, fp64 [H], for the constant-decay variants."""
    h = torch.arange(heads, dtype=torch.float64, device=device)
    if variant == "lightning":  # lambda_h = exp(-slope_h), slopes as ALiBi / TransNormerLLM
        return -(2.0 ** (-8.0 * (h + 1) / heads))
    if variant == "retention":  # RetNet: gamma_h = 1 - 2^(-5-h); log1p keeps gamma ~ 1 exact
        return torch.log1p(-(2.0 ** (-5.0 - h)))
    raise ValueError(f"variant {variant!r} has no fixed decay")


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

    ``forward(x [B, T, hidden], *, cu_seqlens=None) -> [B, T, hidden]``. Without an SP context
    (``self.sp is None``) T is the whole sequence and ``lasp2.linear_attention`` runs; with one
    (set by ``lasp2.parallelize``) x holds this rank's tokens in ``self.sp.layout`` and
    ``lasp2.sp_linear_attention`` runs. ``cu_seqlens`` are always the *global* document boundaries.
    """

    def __init__(self, hidden: int, heads: int, head_dim: int, variant: str = "bla", *,
                 feature_dim: int = 16, gate_low_rank: int = 16, gate_normalizer: float = 16.0,
                 output_gate: Optional[str] = None, norm_eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        if variant not in LINEAR_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(LINEAR_VARIANTS)}")
        output_gate = output_gate or ("sigmoid" if variant == "lightning" else "swish")
        if output_gate not in OUTPUT_GATES:
            raise ValueError(f"unknown output_gate {output_gate!r}; choose one of {', '.join(OUTPUT_GATES)}")
        for name, value in (("hidden", hidden), ("heads", heads), ("head_dim", head_dim),
                            ("feature_dim", feature_dim), ("gate_low_rank", gate_low_rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.variant, self.heads, self.head_dim, self.backend = variant, heads, head_dim, backend
        self.output_gate, self.gate_normalizer = output_gate, gate_normalizer
        self.sp: Optional[SPContext] = None  # set by lasp2.parallelize

        self.feature_map: Optional[nn.Module] = None
        if variant == "based":
            self.feature_map = TaylorFeatureMap(feature_dim)
        elif variant == "rebased":
            self.feature_map = ReBasedFeatureMap(feature_dim)
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
        if variant in ("mamba2", "gated_deltanet"):  # Mamba2's scalar gate parameterisation
            self.a_proj = nn.Linear(hidden, heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(heads))
            self.dt_bias = nn.Parameter(torch.empty(heads))
        if variant == "gla":  # low-rank per-channel gate
            self.gk_down = nn.Linear(hidden, gate_low_rank, bias=False)
            self.gk_up = nn.Linear(gate_low_rank, heads * head_dim, bias=True)
        if variant in DELTA_VARIANTS:
            self.b_proj = nn.Linear(hidden, heads, bias=False)
        self.init_weights()

    # ---- parameters -------------------------------------------------------------------------

    def init_weights(self, generator: Optional[torch.Generator] = None, std: float = 0.02,
                     out_std: Optional[float] = None) -> None:
        """Normal(0, std) projections, ``out_std`` for o_proj (the residual-stream write);
        Mamba2's A in [1, 16] and dt in [1e-3, 1e-1] (log-uniform) as in Mamba2."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, getattr(self, "a_proj", None),
                    getattr(self, "gk_down", None), getattr(self, "gk_up", None), getattr(self, "b_proj", None)):
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
        """Per-variant q/k feature map on [B, T, H, d]."""
        if self.feature_map is not None:
            return self.feature_map(x)
        if self.variant == "lightning":
            return F.silu(x)
        if self.variant in DELTA_VARIANTS:  # the delta rule needs unit-norm keys to stay stable
            return F.normalize(F.silu(x), p=2, dim=-1)
        return x

    def _gate(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """g in log space, fp32 (fp64 for fp64 x): None, [B, T, H] or [B, T, H, K] (gla)."""
        B, T, _ = x.shape
        H = self.heads
        dtype = compute_dtype(x.dtype)  # fp32 at least
        if self.variant in ("lightning", "retention"):
            return fixed_log_decay(self.variant, H, x.device).to(dtype).view(1, 1, H).expand(B, T, H)
        if self.variant in ("mamba2", "gated_deltanet"):
            dt = F.softplus(self.a_proj(x).to(dtype) + self.dt_bias.to(dtype))
            return -dt * self.A_log.to(dtype).exp()
        if self.variant == "gla":
            gk = self.gk_up(self.gk_down(x)).to(dtype).view(B, T, H, self.head_dim)
            return F.logsigmoid(gk) / self.gate_normalizer
        return None

    def _attend(self, q, k, v, g, beta, cu_seqlens) -> torch.Tensor:
        if self.sp is None:
            o, _ = linear_attention(q, k, v, g, beta, scale=self.scale, cu_seqlens=cu_seqlens, backend=self.backend)
            return o
        return sp_linear_attention(q, k, v, g, beta, group=self.sp.group, scale=self.scale,
                                   strategy=self.sp.strategy, layout=self.sp.layout, cu_seqlens=cu_seqlens,
                                   backend=self.backend)

    def forward(self, x: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, V = self.heads, self.head_dim
        q = self._features(self.q_proj(x).view(B, T, H, -1))
        k = self._features(self.k_proj(x).view(B, T, H, -1))
        v = self.v_proj(x).view(B, T, H, V)
        beta = torch.sigmoid(self.b_proj(x)) if self.variant in DELTA_VARIANTS else None
        o = self.o_norm(self._attend(q, k, v, self._gate(x), beta, cu_seqlens))  # [B, T, H, V]
        if self.g_proj is not None:
            gate = self.g_proj(x).view(B, T, H, V)
            o = o * (F.silu(gate) if self.output_gate == "swish" else torch.sigmoid(gate))
        return self.o_proj(o.reshape(B, T, H * V))

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, heads={self.heads}, key_dim={self.key_dim}, "
                f"head_dim={self.head_dim}, output_gate={self.output_gate!r}")
