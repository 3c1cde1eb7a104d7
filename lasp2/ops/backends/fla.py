"""The fla backend: flash-linear-attention's Triton chunk kernels (fla-core 0.6.0, public API only).

Variant -> kernel: basic linear attention -> ``chunk_linear_attn(normalize=False)``; constant
decay and scalar gate (g [B, T, H]) -> ``chunk_simple_gla``; per-channel gate (g [B, T, H, K])
-> ``chunk_gla``; KDA (g [B, T, H, K] with beta) -> ``chunk_kda`` (g precomputed in log space: its
``use_gate_in_kernel``, ``use_qk_l2norm_in_kernel`` and ``use_beta_sigmoid_in_kernel`` stay off,
the layer computes those); DeltaNet and Gated DeltaNet -> ``chunk_gated_delta_rule`` (DeltaNet with g = 0:
fla's ``chunk_delta_rule`` refuses fp32, and the Triton interpreter does not emulate bf16
faithfully, so one kernel path for every dtype is the one the CPU tests can prove; the zero gate
costs an elementwise pass, which ``benchmarks/gpu_suite.sh`` measures against
``chunk_delta_rule``). fla's public ``g`` is natural-log like lasp2's (its kernels convert to log2
internally), ``scale`` is passed explicitly, ``initial_state`` is passed in fp32.

Precision: the kernels take q, k, v in their dtype (bf16/fp16/fp32) with fp32 accumulation and
fp32 states; final states and everything lasp2 sends between ranks are fp32. fp64 is refused
(``backends.resolve``). On CPU tensors the kernels run in the Triton interpreter
(``interpret.py``), for exactness tests.

Local work of one segment for the SP strategies (DESIGN §1), without running the op twice:
- decay-vector kinds (identity, scalar, diagonal; ``ops.transition``; ``FlaSegment``): ONE
  zero-state fla call gives the zero-state outputs and Ŝ (its final state); Â = exp(sum g) and
  the inter query q̃_s = scale * q_s ⊙ exp(cumsum g) (over the tokens before the segment's first
  document start) come from the gates in PyTorch, and the incoming state's term q̃ P (one
  [T, K] x [K, V] matmul) is added, and differentiated, in PyTorch. Backward is one fla backward
  per segment (the outputs' and the final state's gradients through fla's autograd Function,
  the inter term's through PyTorch); G = dL/dP = q̃^T dO is one matmul. The kernels compute Ŝ
  and the zero-state outputs in one call, so under ``lasp2`` the all-gather of the summaries
  overlaps only the PyTorch part of the local work with this backend;
- the delta rule (DeltaNet, Gated DeltaNet, KDA; ``fla_delta.FlaDeltaSegment``): fla's kernel
  functions at the segment's own shapes (WY form once, Ŝ and Â by the state scan, the outputs
  from P by one state scan and the output kernel, G by the state-gradient scan, fla's backward
  with dht = D); see ``fla_delta.py`` and docs/algorithm.md for its kernel calls and cost.
"""
from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from . import FLA_MAX_HEAD_DIM as MAX_HEAD_DIM
from . import HeldSummary, TokenOutputs
from . import interpret

name = "fla"


@functools.lru_cache(maxsize=None)
def _fla():
    """fla's chunk ops, imported on first use (``TRITON_INTERPRET`` must already be set for CPU)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Triton is not supported on current platform.*")
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.kda import chunk_kda
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
        from fla.ops.utils import cumsum
    return SimpleNamespace(chunk_gated_delta_rule=chunk_gated_delta_rule, chunk_kda=chunk_kda,
                           chunk_gla=chunk_gla, chunk_linear_attn=chunk_linear_attn,
                           chunk_simple_gla=chunk_simple_gla, cumsum_module=cumsum)


def _ready(q: torch.Tensor, v: torch.Tensor) -> SimpleNamespace:
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"backend='fla' supports head dims K, V <= {MAX_HEAD_DIM} (fla's chunk kernels), got "
                         f"K={q.shape[-1]}, V={v.shape[-1]}; use backend='torch'")
    interpret.prepare(q)
    ops = _fla()
    if interpret.active(q):
        interpret.check_interpreted(ops.cumsum_module.chunk_local_cumsum_scalar_kernel)
    return ops


def _gated_delta_rule(ops, q, k, v, g, beta, **common):
    gate = q.new_zeros(q.shape[:3], dtype=torch.float32) if g is None else g.float()  # DeltaNet: g = 0
    return ops.chunk_gated_delta_rule(q, k, v, gate, beta.to(q.dtype), **common)


KERNELS = {
    "identity": lambda ops, q, k, v, g, beta, **common: ops.chunk_linear_attn(q, k, v, normalize=False, **common),
    "scalar": lambda ops, q, k, v, g, beta, **common: ops.chunk_simple_gla(q, k, v, g=g.float(), **common),
    "diagonal": lambda ops, q, k, v, g, beta, **common: ops.chunk_gla(q, k, v, g.float(), **common),
    "matrix": _gated_delta_rule,
    "channel_matrix": lambda ops, q, k, v, g, beta, **common: ops.chunk_kda(q, k, v, g.float(), beta.to(q.dtype),
                                                                           **common),
}
"""Kind name (``ops.transition``) -> fla's chunk op for it: one row per supported kind."""


def _op(kind, q, k, v, g, beta, scale: float, initial_state, output_final_state: bool, cu_seqlens):
    """One fla chunk op, the one of ``kind`` (``KERNELS``); initial_state fp32 or None,
    cu_seqlens long or None. Returns (o in v's dtype, final state fp32 or None)."""
    ops = _ready(q, v)
    return KERNELS[kind.name](ops, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def linear_attention(q, k, v, g, beta, *, kind, scale: float, initial_state, output_final_state: bool,
                     cu_seqlens) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention on one device by fla's kernel for ``kind`` (inputs validated by
    the caller). Shapes as ``lasp2.linear_attention``; returns (o in q's dtype, final state(s)
    fp32 or None)."""
    h0 = None if initial_state is None else initial_state.float()
    cu = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.long)
    o, ht = _op(kind, q, k, v.to(q.dtype), g, beta, scale, h0, output_final_state, cu)
    return o.to(q.dtype), ht


class FlaSegment(HeldSummary, TokenOutputs):
    """One segment's local work with fla's kernels for the decay-vector kinds (the contract of
    ``backends/__init__.py``; the delta rule: ``fla_delta.FlaDeltaSegment``).

    reach: the number of leading tokens the incoming state reaches (those before the segment's
    first document start; 0 when a document starts at its first token).
    """

    def __init__(self, q, k, v, g, beta, kind, scale: float, starts: Optional[Tuple[int, ...]], *,
                 incoming: bool = True, outgoing: bool = True):
        # incoming / outgoing (the contract) are not used: the summaries come with the one fla call
        T = q.shape[1]
        positions = list(starts or ())  # host positions: no device read
        inner = [p for p in positions if p > 0]
        self.reach = positions[0] if positions else T
        cu = None if not inner else torch.tensor([0, *inner, T], dtype=torch.long, device=q.device)
        v = v.to(q.dtype)
        self.kind = kind
        o0, ht = _op(kind, q, k, v, g, None, scale, None, True, cu)
        self._S = ht[-1:] if cu is not None else ht
        self._A, self.q_tilde = self._decay_terms(q, kind.gate_channels(g), scale)
        self.o0, self.P, self.outputs = o0, None, None

    def _decay_terms(self, q, gk, scale: float):
        """(Â [B, H, Kg], q̃ [B, reach, H, K]) from the gates gk [B, T, H, Kg] (None: no gate),
        fp32, with graph."""
        B, T, H, K = q.shape
        r = self.reach
        q_tilde = q[:, :r].float() * scale
        if gk is None:
            A = q.new_full((B, H, 1), 1.0 if r == T else 0.0, dtype=torch.float32)
            return A, q_tilde
        decay = gk[:, :r].float().cumsum(1).exp()  # [B, r, H, Kg]; the cumsum is non-increasing: no overflow
        if r < T:  # a document starts inside the segment: the incoming state stops there
            A = q.new_zeros(self.kind.algebra.shape(B, H, K), dtype=torch.float32)
        else:
            A = decay[:, -1]
        return A, q_tilde * decay

    def intra_outputs(self) -> None:
        """Nothing left: fla's call in the constructor produced the zero-state outputs with Ŝ."""

    def add_incoming(self, P: torch.Tensor) -> None:
        """o = o(zero state) + q̃ P on the tokens the incoming state reaches (PyTorch, fp32)."""
        self.P = P
        o0, self.o0 = self.o0, None
        inter = torch.einsum("brhk,bhkv->brhv", self.q_tilde, P.to(self.q_tilde.dtype))
        if self.reach == o0.shape[1]:  # no document start in the segment: no copy of the rest
            self.outputs = o0 + inter  # fp32 sum, rounded once to the input dtype by ``assemble``
        else:
            o = o0.to(inter.dtype)
            self.outputs = torch.cat([o[:, : self.reach] + inter, o[:, self.reach:]], dim=1)

    def inter_backward(self, do: torch.Tensor):
        """(G = q̃^T dO [B, H, K, V] fp32, None)."""
        G = torch.einsum("brhk,brhv->bhkv", self.q_tilde.detach(), do[:, : self.reach].to(self.q_tilde.dtype))
        return G, None

    def grad_targets(self, _unused, final_grad: torch.Tensor):
        """Ŝ gets D (fla's dht), Â gets D P^T in its kind's form (``Kind.grad``: the matrix, its
        diagonal for per-channel decays, its trace for scalar ones)."""
        D, P = final_grad.to(self._S.dtype), self.P.to(self._S.dtype)
        return [self._S, self._A], [D, self.kind.grad(D, P)]


def segment_work(q, k, v, g, beta, kind, scale: float, starts: Optional[Tuple[int, ...]], *,
                 incoming: bool = True, outgoing: bool = True):
    """The contract's constructor for one segment: the delta-rule kinds (DeltaNet, Gated DeltaNet,
    KDA) -> ``fla_delta.FlaDeltaSegment`` (fla's kernels at the segment's own shapes, skipping the
    scans nothing reads: ``incoming`` / ``outgoing``); the decay-vector kinds -> ``FlaSegment``."""
    if kind.matrix:
        _ready(q, v)  # head-dim check and the interpreter's compatibility before fla is imported
        from .fla_delta import FlaDeltaSegment

        return FlaDeltaSegment(q, k, v, g, beta, kind, scale, starts, incoming=incoming, outgoing=outgoing)
    return FlaSegment(q, k, v, g, beta, kind, scale, starts, incoming=incoming, outgoing=outgoing)
