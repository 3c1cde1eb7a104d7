"""Input checks shared by the public functions. Every failure is a ValueError that names the
argument and says how to fix it; nothing is silently truncated, padded or cast away."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .ops.common import default_scale

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {x.dtype}; "
                         f"convert it with .float()")


def check_qkv(q, k, v, *, kv_heads_may_differ: bool = False) -> None:
    """q [B, T, H, K], k [B, T, Hk, K], v [B, T, Hk, V]; same dtype and device, T >= 1."""
    check_tensor("q", q, 4, "[B, T, H, K]")
    check_tensor("k", k, 4, "[B, T, H, K]")
    check_tensor("v", v, 4, "[B, T, H, V]")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one "
                         f"(e.g. .to(v.dtype)), or call the op inside torch.autocast, which casts them to the "
                         f"autocast dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1 in [B, T, H, K])")
    if min(q.shape) < 1 or min(k.shape) < 1 or min(v.shape) < 1:
        raise ValueError(f"q, k, v must have no empty dimension, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        raise ValueError(f"q, k, v must agree on [B, T]: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[3] != K:
        raise ValueError(f"k's last dim must equal q's (K = {K}), got k {tuple(k.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[2]} and {v.shape[2]}")
    Hk = k.shape[2]
    if kv_heads_may_differ:
        if H % Hk != 0:
            raise ValueError(f"q's heads ({H}) must be a multiple of k/v's heads ({Hk}) for "
                             f"grouped-query attention; choose kv heads that divide {H}")
    elif Hk != H:
        raise ValueError(f"k and v must have as many heads as q (H = {H}), got {Hk}")


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (or None for K**-0.5), got {scale!r}")


def check_gate(g, q: torch.Tensor, values: bool = True) -> None:
    """g None | [B, T, H] | [B, T, H, K], log space, every value <= 0 (that value check, a host
    sync, only when ``values``)."""
    if g is None:
        return
    B, T, H, K = q.shape
    if not isinstance(g, torch.Tensor) or g.dtype not in FLOAT_DTYPES:
        raise ValueError("g must be a floating tensor [B, T, H] (scalar gate) or [B, T, H, K] (per-channel gate)")
    if tuple(g.shape) not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"g must have shape [B, T, H] = {(B, T, H)} or [B, T, H, K] = {(B, T, H, K)}, "
                         f"got {tuple(g.shape)}")
    if g.device != q.device:
        raise ValueError(f"g must be on q's device {q.device}, got {g.device}")
    if values and not bool((g <= 0).all()):
        raise ValueError("g is a log-space decay and must be <= 0 everywhere (and not NaN); "
                         "pass e.g. F.logsigmoid(x) or -softplus(x), not the decay itself")


def check_beta(beta, q: torch.Tensor, values: bool = True) -> None:
    """beta None | [B, T, H] in [0, 2] (the range, a host sync, checked only when ``values``).

    With L2-normalised keys the delta-rule transition I - beta k k^T has eigenvalues 1 and
    1 - beta, so beta in [0, 2] keeps them in [-1, 1] (beta > 1: negative eigenvalues, e.g. OLMo
    hybrid's ``linear_allow_neg_eigval``); the chunked and SP forms are exact for any beta, and
    beta is never clamped."""
    if beta is None:
        return
    B, T, H, _ = q.shape
    if not isinstance(beta, torch.Tensor) or beta.dtype not in FLOAT_DTYPES:
        raise ValueError("beta must be a floating tensor [B, T, H]")
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must have shape [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if beta.device != q.device:
        raise ValueError(f"beta must be on q's device {q.device}, got {beta.device}")
    if values and not bool(((beta >= 0) & (beta <= 2)).all()):
        raise ValueError("beta must lie in [0, 2] (e.g. torch.sigmoid(x), or 2 * torch.sigmoid(x) for negative "
                         "eigenvalues) and not be NaN")


def check_cu_seqlens(cu_seqlens, total: int, batch: int, name: str = "cu_seqlens",
                     device: Optional[torch.device] = None) -> None:
    """Global cumulative document lengths: 1-D integers, 0 first, strictly increasing, ``total`` last;
    on the CPU or on ``device`` (q's) when given."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor [N + 1] of cumulative document lengths")
    if device is not None and cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}; pass {name} on the CPU or "
                         f"on q's device ({name}.to(q.device))")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or cu_seqlens.is_complex():
        raise ValueError(f"{name} must hold integers (torch.int32 or torch.int64), got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"{name} packs documents along T and needs B == 1, got B = {batch}; "
                         f"concatenate the batch into one row")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries [0, ..., T], got {cu_seqlens.tolist()}")
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b <= a for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f"{name} must be strictly increasing (every document holds >= 1 token), "
                         f"got {values if len(values) <= 16 else str(values[:16]) + '...'}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the total token count {total}, got {values[-1]}")


def check_initial_state(initial_state, q: torch.Tensor, v: torch.Tensor, cu_seqlens) -> None:
    if initial_state is None:
        return
    B, _, H, K = q.shape
    V = v.shape[-1]
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    what = "[B, H, K, V]" if cu_seqlens is None else "[N, H, K, V] (one per document)"
    if not isinstance(initial_state, torch.Tensor) or initial_state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"initial_state must be a floating tensor {what}")
    if initial_state.device != q.device:
        raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}; move it with "
                         f"initial_state.to(q.device)")
    if tuple(initial_state.shape) != (n, H, K, V):
        raise ValueError(f"initial_state must have shape {what} = {(n, H, K, V)}, got {tuple(initial_state.shape)}")


def check_group(group) -> None:
    """``group`` is a real ProcessGroup: None (torch's WORLD default) is refused, since it silently
    means every rank once SP sits inside DP."""
    if group is None and not torch.distributed.is_initialized():
        raise ValueError("group is required, and it is None here because the default process group is not "
                         "initialised (dist.group.WORLD is None until then): call "
                         "torch.distributed.init_process_group('gloo') ('nccl' on GPUs) first, e.g. in a script "
                         "started with torchrun, then pass group=dist.group.WORLD or your sequence-parallel group")
    if group is None:
        raise ValueError("group is required: pass the sequence-parallel process group explicitly "
                         "(e.g. mesh['sp'].get_group(), or dist.group.WORLD when SP spans every rank); "
                         "None would silently mean WORLD, which is wrong once SP sits inside DP")
    if not isinstance(group, torch.distributed.ProcessGroup):
        raise ValueError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def resolve_scale(scale: Optional[float], q: torch.Tensor) -> float:
    """The scale to use for q [..., K]: ``scale``, or K**-0.5 when it is None."""
    return default_scale(scale, q.shape[-1])


def check_conv(x, weight, bias, activation) -> None:
    """Short causal depthwise conv: x [B, T, C], weight [C, k], bias [C] or None, one dtype/device."""
    check_tensor("x", x, 3, "[B, T, C]")
    check_tensor("weight", weight, 2, "[C, k] (a depthwise Conv1d weight [C, 1, k] squeezed)")
    B, T, C = x.shape
    if T < 1 or B < 1 or C < 1:
        raise ValueError(f"x must have no empty dimension, got {tuple(x.shape)}")
    if weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape [C, k] = [{C}, k >= 1], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1, "[C]")
        if bias.shape[0] != C:
            raise ValueError(f"bias must have shape [C] = [{C}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got "
                             f"({t.dtype}, {t.device}); cast it with .to(x)")
    check_choice("activation", activation, (None, "silu", "swish"))
