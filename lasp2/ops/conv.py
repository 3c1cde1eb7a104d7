"""Short causal depthwise convolution on one device: the local half of the SP halo conv
(``lasp2.parallel.halo``). Gated DeltaNet and Mamba2 layers run it (kernel 4) before the scan.

Convention (that of ``torch.nn.Conv1d(C, C, k, groups=C, padding=k-1)`` cut to the first T
outputs, as transformers' ``causal_conv1d_fn``): with x [B, T, C] and weight [C, k],

    y[t, c] = bias[c] + sum_{i=0}^{k-1} weight[c, i] * x[t - (k-1) + i, c]

where x before the first token is 0. With documents, x[u] contributes to y[t] only when u and t
lie in the same document (the conv restarts at every document start, as causal-conv1d's
``seq_idx`` does).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")


def doc_ids(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Document index of every global position (int64, same shape as ``positions``); positions
    before 0 get -1 (the zero padding belongs to no document)."""
    cu = cu_seqlens.to(device=positions.device, dtype=torch.long)
    return torch.searchsorted(cu, positions, right=True) - 1


def conv_with_context(x_ext: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      doc_ext: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The conv of the last L tokens of ``x_ext`` given the k-1 tokens before them.

    Args:
        x_ext: [B, k-1 + L, C]: k-1 tokens of left context (zeros where there are none) then the
            L tokens to convolve.
        weight: [C, k]; bias: [C] or None; same dtype as x_ext.
        doc_ext: None, or int [k-1 + L] document index of every position of x_ext: a tap is used
            only when its token and the output token share a document.

    Returns:
        y [B, L, C] in x_ext's dtype, before any activation. Communication: none.
    """
    k = weight.shape[1]
    L = x_ext.shape[1] - (k - 1)
    if doc_ext is None:
        y = F.conv1d(x_ext.transpose(1, 2), weight.unsqueeze(1), bias, groups=weight.shape[0])
        return y.transpose(1, 2)
    out_doc = doc_ext[k - 1:]
    y = None
    for i in range(k):  # tap i reads the token (k-1-i) before the output token
        keep = (doc_ext[i:i + L] == out_doc).to(x_ext.dtype).view(1, L, 1)
        term = x_ext[:, i:i + L] * weight[:, i] * keep
        y = term if y is None else y + term
    return y if bias is None else y + bias


def activate(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    return y if activation is None else F.silu(y)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  activation: Optional[str] = None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal depthwise conv of the whole sequence on one device (inputs already validated).

    x [B, T, C]; weight [C, k]; bias [C] or None; activation None | "silu" | "swish";
    cu_seqlens [N + 1] (B == 1) restarts the conv at every document. Returns y [B, T, C].
    Communication: none.
    """
    k = weight.shape[1]
    x_ext = F.pad(x, (0, 0, k - 1, 0))
    doc = None
    if cu_seqlens is not None:
        doc = doc_ids(cu_seqlens, torch.arange(-(k - 1), x.shape[1], device=x.device))
    return activate(conv_with_context(x_ext, weight, bias, doc), activation)
