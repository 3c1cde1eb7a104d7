"""Small shared helpers for the tests: error metrics and random inputs for every variant."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

# Diagonal-gate variants of DESIGN §1 and the shape of their gate.
DIAGONAL_VARIANTS = ("basic", "constant", "scalar", "channel")
DELTA_VARIANTS = ("deltanet", "gated_deltanet")
KDA = "kda"  # the per-channel gated delta rule (g [B, T, H, K] with beta); not in DELTA_VARIANTS, whose
MATRIX_VARIANTS = DELTA_VARIANTS + (KDA,)  # tables predate it: tests add it where they cover it
# Tolerances, relative to the reference's largest entry (max error) or its RMS (bf16):
# - fp64 is the exactness claim. Its unit roundoff u = 2^-53 = 1.1e-16 grows to at most ~1e-13
#   through the depth-<=1000 computations here; any algorithmic error shows at >= 1e-4. So 1e-10.
# - fp32 (u = 2^-24 = 6e-8) is a rounding bound from the depth n of the computation: the longest
#   chain of roundings into one output (the running state over the T tokens of the sequence, then
#   a K-term dot product: n = T + K). Accumulated rounding grows like sqrt(n) u on average and
#   n u at worst; FP32_FACTOR sqrt(n) u with FP32_FACTOR = 32 is >= n u for every n <= 1024, so it
#   covers the worst case of every computation here (n <= ~600) on any CPU and summation order.
# - bf16 (u = 2^-8): outputs and gradients are rounded to bf16 at least once and pass through
#   bf16 dO: each rounding adds ~u/sqrt(3) = 2.3e-3 relative RMS; 5 u = 2e-2 allows a few.
FP64_TOL = 1e-10
FP32_UNIT_ROUNDOFF = 2.0 ** -24
FP32_FACTOR = 32
BF16_RMS_TOL = 5 * 2.0 ** -8


def fp32_tol(depth: int) -> float:
    """The fp32 relative bound for a computation of depth ``depth`` (see above)."""
    return FP32_FACTOR * FP32_UNIT_ROUNDOFF * max(depth, 1) ** 0.5


def rel_tol(dtype: torch.dtype, depth: int) -> float:
    """Max-relative-error tolerance for fp64/fp32 results (bf16 is judged by RMS_TOL)."""
    return FP64_TOL if dtype == torch.float64 else fp32_tol(depth)


def depth_of(x: torch.Tensor) -> int:
    """T + K for a [B, T, H, D] tensor (or a gradient shaped like one); numel otherwise."""
    return x.shape[1] + x.shape[-1] if x.dim() >= 3 else x.numel()


def max_rel_err(a: torch.Tensor, b: torch.Tensor, scale: Optional[torch.Tensor] = None) -> float:
    """max |a - b| / max |b| (b is the reference; ``scale`` overrides max |b|)."""
    a, b = a.double(), b.double()
    scale = b.abs().max() if scale is None else scale.double()
    return ((a - b).abs().max() / scale.clamp_min(1e-300)).item()


def rms_rel_err(a: torch.Tensor, b: torch.Tensor, scale: Optional[torch.Tensor] = None) -> float:
    a, b = a.double(), b.double()
    scale = b.pow(2).mean().sqrt() if scale is None else scale.double()
    return ((a - b).pow(2).mean().sqrt() / scale.clamp_min(1e-300)).item()


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                 whole: Optional[torch.Tensor] = None, depth: Optional[int] = None) -> None:
    """Relative error of ``got`` against ``ref``. When ``ref`` is one shard of a whole tensor,
    pass ``whole``: errors are then relative to the whole tensor's magnitude, so a shard whose
    exact value is 0 (e.g. dg of the first token) is not judged against its own rounding noise.
    ``depth``: of the computation, for the fp32 bound (default ``depth_of`` the whole tensor)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if dtype in (torch.float64, torch.float32):
        tol = rel_tol(dtype, depth_of(ref if whole is None else whole) if depth is None else depth)
        err = max_rel_err(got, ref, None if whole is None else whole.abs().max())
        assert err <= tol, f"{name}: max relative error {err:.3e} > {tol:.1e}"
    else:
        err = rms_rel_err(got, ref, None if whole is None else whole.double().pow(2).mean().sqrt())
        assert err <= BF16_RMS_TOL, f"{name}: relative RMS error {err:.3e} > {BF16_RMS_TOL:.0e}"


def make_gate(variant: str, B: int, T: int, H: int, K: int, generator: torch.Generator,
              dtype=torch.float64) -> Optional[torch.Tensor]:
    """Log-space gate for a diagonal variant (None for basic linear attention)."""
    if variant in ("basic", "deltanet"):
        return None
    if variant == "constant":  # Lightning / RetNet: one fixed decay per head
        lam = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
        return lam.log().view(1, 1, H).expand(B, T, H).to(dtype).contiguous()
    shape = (B, T, H) if variant in ("scalar", "gated_deltanet") else (B, T, H, K)  # channel, kda: [B,T,H,K]
    x = torch.randn(shape, generator=generator, dtype=torch.float64) + 2.0
    return F.logsigmoid(x).to(dtype)


def make_inputs(variant: str, B: int, T: int, H: int, K: int, V: int, seed: int,
                dtype=torch.float64, n_states: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """q, k, v, g (maybe None), beta (delta variants only) and an initial state
    [n_states, H, K, V] (None if n_states is None)."""
    gen = torch.Generator().manual_seed(seed)
    out = {
        "q": torch.randn(B, T, H, K, generator=gen, dtype=torch.float64).to(dtype),
        "k": torch.randn(B, T, H, K, generator=gen, dtype=torch.float64).to(dtype),
        "v": torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dtype),
        "g": make_gate(variant, B, T, H, K, gen, dtype),
    }
    if variant in MATRIX_VARIANTS:  # DeltaNet / KDA layers L2-normalise keys; beta = sigmoid(x)
        out["k"] = F.normalize(out["k"].double(), dim=-1).to(dtype)
        out["beta"] = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)).to(dtype)
    out["initial_state"] = (None if n_states is None else
                            torch.randn(n_states, H, K, V, generator=gen, dtype=torch.float64).float()
                            .to(torch.float64 if dtype == torch.float64 else torch.float32))
    return out


def loss_weights(B: int, T: int, H: int, K: int, V: int, n_states: int, seed: int):
    """Fixed random weights (fp64) of a linear loss on (o [B, T, H, V], final states [n, H, K, V])."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, V, generator=gen, dtype=torch.float64),
            torch.randn(n_states, H, K, V, generator=gen, dtype=torch.float64))


def run_with_loss(fn, inputs: Dict[str, Optional[torch.Tensor]], weights, cu, **kw) -> Dict[str, torch.Tensor]:
    """``fn(q, k, v, g[, beta], scale=0.7, initial_state, output_final_state=True, cu_seqlens)``
    (any linear-attention op: naive, chunked, delta, public) with a fixed random linear loss on
    (o, final state); returns o, the final state and the gradient of every given input."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    args = [leaves["q"], leaves["k"], leaves["v"], leaves.get("g")] + ([leaves["beta"]] if "beta" in leaves else [])
    o, ht = fn(*args, scale=0.7, initial_state=leaves.get("initial_state"), output_final_state=True,
               cu_seqlens=cu, **kw)
    loss = (o.double() * weights[0]).sum() + (ht.double() * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "final_state": ht, **{f"d{n}": gr for n, gr in zip(leaves, grads)}}
