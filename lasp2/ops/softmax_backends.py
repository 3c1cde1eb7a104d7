"""Kernels for the local work of softmax attention: one contract, two implementations.

``torch`` (the reference and the CPU default): ``ops/softmax.py``'s blockwise loop in pure
PyTorch; any device, any floating dtype, forward and backward. ``flex``: PyTorch's
FlexAttention (``torch.nn.attention.flex_attention``) with a block mask built from the **global
positions and document ids** of the queries and keys (causal, zigzag shards and packed documents
in one ``mask_mod``), GQA without repeating K/V (``enable_gqa``), and the log-sum-exp returned
where a strategy merges partial results. On CUDA the kernel is ``torch.compile``-d (the first
call per shape compiles for tens of seconds; later calls reuse it); on CPU it runs eagerly
(forward only: in torch 2.13 FlexAttention has no backward on CPU, see ``resolve``).
``auto`` picks ``flex`` for CUDA tensors (not fp64) and ``torch`` otherwise.

The contract (the SP strategies and the one-device op call it and never know which runs)::

    block_fwd(name, q, k, v, mask, scale, block_size, out_dtype)  -> (o, lse)          no graph
    block_bwd(name, do, q, k, v, lse, mask, scale, block_size, delta) -> (dq, dk, dv)

with the shapes, dtypes and key-subset semantics of ``softmax.attention_block_fwd`` /
``attention_block_bwd``: ``lse`` [B, H, Tq] and ``delta`` [B, H, Tq] belong to the *whole*
attention that k, v are a subset of, so the result is that subset's share of dq and exactly its
dk, dv. ``flex``'s backward recomputes the subset's (o_j, lse_j) with autograd and backpropagates
the merge into it: with w_j = exp(lse_j - lse), dL/do_j = w_j dO and dL/dlse_j = w_j (rowsum(dO
o_j) - delta), so FlexAttention's own backward (which takes a log-sum-exp gradient) gives the
subset's gradients (one extra forward per key block, as flash attention recomputes too).

Block masks are cached by their host description (``AttentionMask.host``: the runs of global
positions and the document boundaries, known once per batch), so every layer of a batch and its
backward reuse the one built for the first layer; a mask given only as device tensors is built
per call.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .attention_mask import AttentionMask, HostRanges
from .common import compute_dtype
from .softmax import attention_block_bwd, attention_block_fwd

SOFTMAX_BACKENDS = ("auto", "torch", "flex", "flash")
FLEX_BLOCK = 128  # FlexAttention's sparse block size (its default)


def flash_installed() -> bool:
    """Whether flash-attn can be imported (without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def needs_grad(*xs: Tensor) -> bool:
    """Whether a call on these inputs will build a graph (grad mode on and an input requires grad)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def resolve(backend: str, x: Tensor, *, needs_grad: bool) -> str:
    """The concrete kernel ("torch" or "flex") for ``backend`` and an input ``x``.

    ``needs_grad``: whether the call will be differentiated. ValueError (naming the fix) for an
    unknown name; for "flex" with fp64 CUDA tensors; for "flex" on CPU when a gradient is needed
    (torch 2.13's FlexAttention has no CPU backward: an explicit request fails here, before any
    work, instead of deep inside torch's autograd; lasp2 does not silently swap kernels); for
    "flash" (flash-attn's varlen functions take contiguous sequences, not lasp2's global-position
    masks: without flash-attn installed the error names the install, with it, names flex).
    """
    if backend not in SOFTMAX_BACKENDS:
        raise ValueError(f"softmax backend must be one of {SOFTMAX_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flex" if x.is_cuda and x.dtype != torch.float64 else "torch"
    if backend == "flash":
        if not flash_installed():
            raise ValueError("softmax backend='flash' needs flash-attn (pip install flash-attn --no-build-isolation); "
                             "use backend='flex' (FlexAttention, in torch) or 'torch'")
        raise ValueError("softmax backend='flash' is not wired to lasp2's global-position masks yet (zigzag shards "
                         "and ring blocks are not contiguous sequences); use backend='flex' or 'auto' on CUDA")
    if backend == "flex":
        if x.is_cuda and x.dtype == torch.float64:
            raise ValueError("softmax backend='flex' on CUDA runs fp32/bf16/fp16 (its compiled kernels have no "
                             "fp64 path); use backend='torch' for fp64")
        if x.device.type == "cpu" and needs_grad:
            raise ValueError("softmax backend='flex' has no backward on CPU in torch 2.13 (FlexAttention's CPU "
                             "path is forward only): run under torch.no_grad(), use CUDA tensors, or use "
                             "backend='torch' (or 'auto', which picks torch on CPU)")
    return backend


# ----------------------------------------------------------------------------- flex kernels


def _flex_fn(device_type: str):
    """flex_attention, compiled on CUDA (eager it materialises the scores), eager on CPU (CPU
    compilation refuses the log-sum-exp in torch 2.13)."""
    return _compiled_flex() if device_type == "cuda" else _eager_flex()


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=None)
def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    def run(*args, **kwargs):
        with warnings.catch_warnings():  # "called without torch.compile": known, on CPU by design
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex_attention(*args, **kwargs)
    return run


def _positions(runs, n: int, device) -> Tensor:
    """[n] int64 global positions from runs (local start, global start, length)."""
    pos = torch.empty(n, dtype=torch.int64)
    for start, g, length in runs:
        pos[start:start + length] = torch.arange(g, g + length)
    return pos.to(device)


def _docs(pos: Tensor, cu) -> Tensor:
    return torch.searchsorted(torch.tensor(cu, dtype=torch.int64, device=pos.device), pos, right=True) - 1


def _build_block_mask(causal: bool, q_pos: Tensor, k_pos: Tensor, q_doc: Optional[Tensor],
                      k_doc: Optional[Tensor]):
    """FlexAttention BlockMask of ``AttentionMask``'s rule: visible iff (not causal or
    k_pos <= q_pos) and same document. Batch and heads broadcast (the mask is theirs all)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        ok = k_pos[ki] <= q_pos[qi] if causal else qi >= 0
        return ok if q_doc is None else ok & (q_doc[qi] == k_doc[ki])

    return create_block_mask(mask_mod, None, None, q_pos.numel(), k_pos.numel(), device=q_pos.device,
                             BLOCK_SIZE=FLEX_BLOCK, _compile=q_pos.is_cuda)


@functools.lru_cache(maxsize=64)
def _block_mask_from_host(causal: bool, host: HostRanges, tq: int, tk: int, device: str):
    """The block mask of a host-described mask, built once and reused (every layer of a batch,
    forward and backward, asks with the same runs and documents)."""
    q_pos, k_pos = _positions(host.q, tq, device), _positions(host.k, tk, device)
    q_doc = k_doc = None
    if host.cu is not None:
        q_doc, k_doc = _docs(q_pos, host.cu), _docs(k_pos, host.cu)
    return _build_block_mask(causal, q_pos, k_pos, q_doc, k_doc)


def block_mask(mask: Optional[AttentionMask], tq: int, tk: int, device):
    """The FlexAttention block mask of ``mask`` (None: causal, arange positions) for Tq x Tk."""
    mask = mask or AttentionMask(host=HostRanges(((0, 0, tq),), ((0, 0, tk),)))
    if mask.host is not None:
        return _block_mask_from_host(mask.causal, mask.host, tq, tk, str(torch.device(device)))
    m = mask.resolved(tq, tk, device)
    return _build_block_mask(m.causal, m.q_pos, m.k_pos, m.q_doc, m.k_doc)


def flex_attention_lse(q: Tensor, k: Tensor, v: Tensor, mask: Optional[AttentionMask], scale: float
                       ) -> Tuple[Tensor, Tensor]:
    """FlexAttention in lasp2's layout, differentiable (CUDA) w.r.t. q, k, v through o and lse.

    q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] -> o [B, Tq, H, Dv] (q's dtype) and
    lse [B, H, Tq] fp32 (natural log; -inf on rows with no visible key, whose o is 0).
    """
    from torch.nn.attention.flex_attention import AuxRequest

    tq, tk, h, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    bm = block_mask(mask, tq, tk, q.device)
    o, aux = _flex_fn(q.device.type)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
                                     scale=scale, enable_gqa=h != hkv, return_aux=AuxRequest(lse=True))
    return o.transpose(1, 2), aux.lse


# ----------------------------------------------------------------------------- the contract


def block_fwd(name: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[AttentionMask], *, scale: float,
              block_size: int, out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """(o [B, Tq, H, Dv] in out_dtype (default q's), lse [B, H, Tq] in the compute dtype) of q
    against the key subset k, v; no graph. See ``softmax.attention_block_fwd``."""
    if name == "torch":
        return attention_block_fwd(q, k, v, mask, scale=scale, block_size=block_size, out_dtype=out_dtype)
    with torch.no_grad():
        o, lse = flex_attention_lse(q, k, v, mask, scale)
    # A row with no visible key: FlexAttention gives o = 0 and lse = -inf, as the blockwise loop
    # does (tests/ops/test_softmax_flex.py), which merge_attention relies on.
    return o.to(out_dtype or q.dtype), lse.to(compute_dtype(q.dtype))


def block_bwd(name: str, do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, mask: Optional[AttentionMask],
              *, scale: float, block_size: int, delta: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The key subset's share of (dq, dk, dv) given the whole attention's ``lse`` and ``delta``
    (= rowsum(dO O) [B, H, Tq] in the compute dtype, minus any lse gradient); dtypes of q, k, v.
    See ``softmax.attention_block_bwd``."""
    if name == "torch":
        return attention_block_bwd(do, q, k, v, None, lse, mask, scale=scale, block_size=block_size, delta=delta)
    # Recompute in the dtype the forward ran in (the strategies hand q, k, v over in the compute
    # dtype for the blockwise loop's partial sums); the gradients go back in the callers' dtypes.
    dt = do.dtype
    grads = recompute_bwd(lambda a, b, c: flex_attention_lse(a, b, c, mask, scale), do, q.to(dt), k.to(dt), v.to(dt),
                          lse, delta)
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))


def recompute_bwd(attend, do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """A key subset's gradients by recomputing its attention with autograd and backpropagating
    the log-sum-exp merge into it (module docstring). ``attend(q, k, v) -> (o_j, lse_j)`` is
    differentiable through both outputs; any kernel with that property works."""
    ct = compute_dtype(q.dtype)
    q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
    with torch.enable_grad():
        o_j, lse_j = attend(q_, k_, v_)
        lse_w, lse_c = lse.to(ct), lse_j.detach().to(ct)
        # w_j = 0 on rows this subset does not reach (lse_j = -inf), and on rows no key reaches.
        w = torch.where(lse_c == float("-inf"), torch.zeros_like(lse_c), torch.exp(lse_c - lse_w))
        w = torch.nan_to_num(w, nan=0.0)
        do_c = do.to(ct)
        row = (do_c * o_j.detach().to(ct)).sum(-1).transpose(1, 2)  # rowsum(dO o_j) [B, H, Tq]
        g_o = (w.transpose(1, 2).unsqueeze(-1) * do_c).to(o_j.dtype)
        g_lse = (w * (row - delta.to(ct))).to(lse_j.dtype)
        dq, dk, dv = torch.autograd.grad((o_j, lse_j), (q_, k_, v_), (g_o, g_lse))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[AttentionMask], *, scale: float, block_size: int,
              name: str) -> Tuple[Tensor, Tensor]:
    """The one-device op with autograd: (o [B, Tq, H, Dv] in q's dtype, lse [B, H, Tq] in the
    compute dtype), differentiable through both. ``torch``: ``softmax.BlockwiseAttention``;
    ``flex``: FlexAttention's own forward and backward (no recompute: nothing to merge)."""
    if name == "torch":
        from .softmax import BlockwiseAttention

        return BlockwiseAttention.apply(q, k, v, mask, scale, block_size)
    o, lse = flex_attention_lse(q, k, v, mask, scale)
    return o, lse.to(compute_dtype(q.dtype))
