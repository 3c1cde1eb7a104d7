"""Backends for the local work of linear attention: one contract, two implementations.

``torch`` (``backends/torch.py``, the default): lasp2's chunked PyTorch ops; any device, any
floating dtype. ``fla`` (``backends/fla.py``): flash-linear-attention's Triton kernels
(``pip install lasp2[gpu]``); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (the
Triton interpreter, for exactness tests; lasp2 applies the compatibility it needs itself).
``auto`` picks ``fla`` for CUDA tensors (not fp64) when fla is installed, ``torch`` otherwise.

The contract, per backend module (the SP strategies call it through ``parallel/linear_local.py``
and never know which backend runs):

    linear_attention(q, k, v, g, beta, *, kind, scale, initial_state, output_final_state, cu_seqlens)
        -> (o [B, T, H, V] in q's dtype, final state(s) fp32 or None)        one device, causal
    segment_work(q, k, v, g, beta, kind, scale, starts, *, incoming=True, outgoing=True) -> a segment with
        summary_state  Ŝ [B, H, K, V]: the state leaving the segment from zero
        transition     Â in the kind's form, [B, H, Kg] (Kg = 1 or K) or [B, H, K, K]
                       (the strategies use both as values; a backend may keep a graph for them)
        intra_outputs()          the work that needs no incoming state
        add_incoming(P)          the output term linear in the incoming state P [B, H, K, V]
        take_outputs(length)     outputs [B, length, H, V] with graph (released after)
        output_grad(do)          dL/do of the segment in the backend's form
        inter_backward(do_b)     (G = dL/dP [B, H, K, V], data for grad_targets)
        grad_targets(data, D)    (tensors, grads) for the one autograd.grad, given the gradient D
                                 [B, H, K, V] reaching the segment's final state Â P + Ŝ
    ``kind``: the transition (g, beta) name (``ops.transition.classify``), classified once by the
    caller; each backend maps kind names to its kernels in one table.
    ``incoming=False``: no state ever enters the segment (the sequence's first segment without an
    initial state): P is the constant 0, Â may be 0 and G 0 (nothing reads dL/dP). ``outgoing=False``:
    nothing reads the segment's summary (the last segment when no final state is returned): Ŝ and Â
    may be left 0. A backend may ignore both (its summaries then cost what they cost).
    ``starts``: the document starts in the segment as host positions, a sorted tuple of ints in
    [0, T) (None or empty without documents): known on the host from the batch's documents, so
    no backend reads a device tensor to find them.

Shapes follow DESIGN §1-2. Every running state and summary is fp32 (fp64 for fp64 inputs with
``torch``), whatever the input dtype.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch as _torch

BACKENDS = ("auto", "torch", "fla")
FLA_MAX_HEAD_DIM = 256  # fla's chunk kernels tile K in blocks of 64 up to 256


class HeldSummary:
    """For segments whose constructor computes the summary as values: ``summary_state`` Ŝ
    [B, H, K, V] and ``transition`` Â (the kind's form) are the attributes ``_S`` and ``_A``."""

    @property
    def summary_state(self):
        return self._S

    @property
    def transition(self):
        return self._A


class TokenOutputs:
    """For segments that hold their outputs in the [B, T, H, V] layout (``outputs``, released by
    ``take_outputs``) and take dL/do as it is."""

    def take_outputs(self, length: int):
        o, self.outputs = self.outputs, None
        return o

    def output_grad(self, do):
        return do


def fla_installed() -> bool:
    """Whether ``fla`` (fla-core) and ``triton`` can be imported (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("fla", "triton"))


def resolve(backend: str, x: _torch.Tensor, head_dim: int = 0) -> str:
    """The concrete backend ("torch" or "fla") for ``backend`` and an input tensor ``x``.

    ``head_dim``: the largest of K and V when known (``auto`` keeps torch above fla's limit).
    Raises ValueError for an unknown name, or for "fla" where it cannot run (fla not installed,
    fp64 inputs, CPU tensors without ``TRITON_INTERPRET=1``), saying how to fix it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        usable = (x.is_cuda and x.dtype != _torch.float64 and max(x.shape[-1], head_dim) <= FLA_MAX_HEAD_DIM
                  and fla_installed() and os.environ.get("TRITON_INTERPRET", "0") != "1")
        return "fla" if usable else "torch"
    if backend == "fla":
        if not fla_installed():
            raise ValueError("backend='fla' needs flash-linear-attention's kernels: pip install 'lasp2[gpu]' "
                             "(fla-core and triton), or use backend='torch'")
        if x.dtype == _torch.float64:
            raise ValueError("backend='fla' runs fp32/bf16/fp16 inputs (fla's kernels have no fp64 path); "
                             "use backend='torch' for fp64")
        if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError("backend='fla' on CPU tensors runs fla's Triton kernels in the Triton interpreter: "
                             "set TRITON_INTERPRET=1 in the environment before Python starts (before triton "
                             "or fla is imported), e.g. `TRITON_INTERPRET=1 python ...`; or use CUDA tensors, "
                             "or backend='torch'")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='fla' runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got "
                             f"device {x.device}; use backend='torch'")
    return backend


def get(name: str):
    """The backend module for a resolved name ("torch" or "fla"); fla is imported on first use."""
    if name not in ("torch", "fla"):
        raise ValueError(f"backends.get takes a resolved backend ('torch' or 'fla'), got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")
