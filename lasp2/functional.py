"""Single-device public functions (DESIGN §2): validate, then dispatch to ``lasp2.ops``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .ops import backends, chunk
from .ops import softmax_backends
from .ops.attention_mask import AttentionMask, HostRanges
from .ops.softmax import attention_blockwise, doc_ids_from_cu_seqlens
from .ops.softmax_backends import needs_grad
from .ops.transition import classify
from .validation import (check_beta, check_cu_seqlens, check_gate, check_initial_state, check_qkv,
                         check_scale, resolve_scale)
from .ops.precision import follow_autocast, no_autocast


@follow_autocast
def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Linear attention on one device, every variant of DESIGN §1.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; one floating dtype (inside torch.autocast,
            different dtypes are cast to the autocast dtype first).
        g: None (basic / no decay), [B, T, H] (constant decay or scalar gate) or [B, T, H, K]
            (per-channel gate); log space, <= 0.
        beta: None, or [B, T, H] in [0, 2] for the delta rule (DeltaNet; Gated DeltaNet with g
            [B, T, H]; beta > 1: negative eigenvalues, never clamped). Keys are used as given (not
            normalised). The delta rule runs the chunked WY/UT-transform op of ``ops/delta.py``.
        scale: defaults to K**-0.5.
        causal: False gives bidirectional basic linear attention (no g, beta or states).
        initial_state: [B, H, K, V], or [N, H, K, V] (one per document) with cu_seqlens.
        output_final_state: also return the final state(s), same shape as initial_state.
        cu_seqlens: [N + 1] int cumulative document lengths (B == 1); states reset at every
            document start.
        backend: "auto" (fla on CUDA tensors when fla is installed, else torch), "torch"
            (lasp2's chunked PyTorch ops) or "fla" (fla's Triton kernels; CPU tensors need
            TRITON_INTERPRET=1; not fp64). See ``lasp2.ops.backends``.

    Returns:
        (o [B, T, H, V] in q's dtype, final state fp32 — fp64 for fp64 inputs — or None).

    Communication: none.
    """
    check_qkv(q, k, v)
    check_scale(scale)
    check_gate(g, q)
    check_beta(beta, q)
    check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0], device=q.device)
    check_initial_state(initial_state, q, v, cu_seqlens)
    scale = resolve_scale(scale, q)
    resolved = backends.resolve(backend, q, v.shape[-1])  # validated for every call; bidirectional is one matmul (torch)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device)  # the ops index q's tensors with it
    if not causal:
        if g is not None or beta is not None or initial_state is not None or output_final_state:
            raise ValueError("causal=False supports basic linear attention only: pass g=None, beta=None, "
                             "initial_state=None and output_final_state=False")
        return chunk.bidirectional_linear_attention(q, k, v, scale=scale, cu_seqlens=cu_seqlens), None
    kind = classify(g, beta)
    impl = backends.get(resolved)
    return impl.linear_attention(q, k, v, g, beta, kind=kind, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@follow_autocast
def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention on one device, blockwise (never a whole [T, T] score matrix).

    Args:
        q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv] with H % Hkv == 0 (GQA); one
            floating dtype (inside torch.autocast, different dtypes are cast to the autocast dtype).
        scale: defaults to D**-0.5. causal: mask keys after the query.
        cu_seqlens: [N + 1] int cumulative document lengths (B == 1): no attention across documents.
        backend: the kernel, "auto" (flex on CUDA tensors, else torch), "torch" (lasp2's blockwise
            PyTorch loop, the reference) or "flex" (FlexAttention; on CPU forward only, under
            torch.no_grad()). See ``lasp2.ops.softmax_backends``.

    Returns:
        o [B, T, H, Dv] in q's dtype (computed in fp32 for half precision inputs).

    Communication: none.
    """
    check_qkv(q, k, v, kv_heads_may_differ=True)
    check_scale(scale)
    check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0], device=q.device)
    name = softmax_backends.resolve(backend, q, needs_grad=needs_grad(q, k, v))
    scale = resolve_scale(scale, q)
    if name == "torch":
        doc = None if cu_seqlens is None else doc_ids_from_cu_seqlens(cu_seqlens.to(q.device), q.shape[1])
        return attention_blockwise(q, k, v, scale=scale, causal=causal, q_doc=doc, k_doc=doc)
    # The kernel's block mask is keyed by this host description (built once per shape and documents).
    T = q.shape[1]
    cu = None if cu_seqlens is None else tuple(cu_seqlens.tolist())
    mask = AttentionMask(causal, host=HostRanges(((0, 0, T),), ((0, 0, T),), cu))
    return softmax_backends.attention(q, k, v, mask, scale=scale, block_size=256, name=name)[0]


@no_autocast
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  activation: Optional[str] = None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Short causal depthwise conv on one device (the conv of Gated DeltaNet / Mamba2 layers).

    Args:
        x: [B, T, C]; weight: [C, k] (``conv1d.weight.squeeze(1)``); bias: [C] or None; one dtype.
        activation: None, "silu" or "swish", applied after the conv.
        cu_seqlens: [N + 1] int cumulative document lengths (B == 1): the conv restarts at every
            document start.

    Returns:
        y [B, T, C] in x's dtype: y[t] = bias + sum_i weight[:, i] * x[t - (k-1) + i] (zeros
        before the first token / document start), then the activation.

    Communication: none.
    """
    from .ops.conv import causal_conv1d as _conv
    from .validation import check_conv

    check_conv(x, weight, bias, activation)
    check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])
    return _conv(x, weight, bias, activation=activation, cu_seqlens=cu_seqlens)
