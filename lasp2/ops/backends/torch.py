"""The PyTorch backend (default): lasp2's chunked einsum ops (``ops/chunk.py``, ``ops/delta.py``).

Runs anywhere torch runs, in any floating dtype (fp64 included, for the exactness tests).

Local work of one segment for the SP strategies (``TorchSegment``, the contract of
``ops/backends/__init__.py``):

1. construction: chunk the segment and scan its chunk states from a zero incoming state; the last
   one is the segment's Ŝ, and Â is its transition (a decay vector for the diagonal family, a
   K x K matrix for the delta rule; 0 when the segment holds a document start);
2. ``intra_outputs``: the intra-chunk outputs, which need no state: the bulk of the work, done
   while the summaries travel;
3. ``add_incoming``: once the incoming state P is known, the chunk-entry states become
   S_in + Λ P (one [N, K, V] update, no extra matmul) and the inter-chunk term is computed with
   them; the last entry is the segment's final state Â P + Ŝ.

Everything but the inter-chunk matmul is ordinary differentiable PyTorch on leaves the strategy
owns. In backward, ``inter_backward`` forms that matmul's gradients by hand, which also yields
G = dL/dP (P is a constant here) at no extra cost; once the strategy knows the gradient reaching
the segment's final state (D_{j+1} in DESIGN §1), ``grad_targets`` gives the (tensor, gradient)
pairs for the strategy's one ``torch.autograd.grad`` call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import chunk, delta
from ..common import from_chunks, to_chunks
from ..precision import no_autocast

name = "torch"


def linear_attention(q, k, v, g, beta, *, scale: float, initial_state, output_final_state: bool,
                     cu_seqlens) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention on one device (inputs validated by the caller): the delta rule when
    ``beta`` is given, else the diagonal family. Shapes and dtypes as ``lasp2.linear_attention``."""
    if beta is not None:
        return delta.delta_linear_attention(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return chunk.chunk_linear_attention(q, k, v, g, scale=scale, initial_state=initial_state,
                                        output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def transition_grad(Lam: torch.Tensor, dX: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """dL/dΛ for X = Λ P given dL/dX [B, H, M, K, V], P [B, H, K, V]; Λ [B, H, M, Kg] (decay
    vectors, Kg = 1 or K) or [B, H, M, K, K] (matrices)."""
    if Lam.dim() == dX.dim():  # matrices: dΛ_n = dX_n P^T
        return _stacked(dX, P.transpose(-1, -2)).reshape(*dX.shape[:-1], P.shape[-2])
    if Lam.shape[-1] == 1:  # scalar decays
        return torch.einsum("bhnkv,bhkv->bhn", dX, P).unsqueeze(-1)
    return torch.einsum("bhnkv,bhkv->bhnk", dX, P)


def _stacked(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """[B, H, M, R, C] @ [B, H, C, D] as one [B, H, M * R, C] @ [B, H, C, D] matmul, [B, H, M * R, D]
    (broadcasting Y over M instead would copy it M times)."""
    B, H, M, R, C = X.shape
    return X.reshape(B, H, M * R, C) @ Y


class TorchSegment:
    """One segment's local work in the chunk form.

    c: the chunked inputs (``chunk.Chunked`` or ``delta.DeltaChunked``);
    states [B, H, N + 1, K, V]: chunk-entry states for a zero incoming state (with graph); the
        real ones are states + Λ P (``entry_states``);
    decays Λ: segment start -> chunk entries, [B, H, N + 1, Kg] (decay vectors) or
        [B, H, N + 1, K, K] (delta rule); Λ_N = Â;
    intra [B, H, N, C, V], q_inter [B, H, N, C, K], outputs [B, H, N, C, V] (intra + inter, with
        graph; replaces ``intra``, released by ``take_outputs``); P [B, H, K, V] (a constant).
    """

    def __init__(self, q, k, v, g, beta, scale: float, starts: Optional[torch.Tensor]):
        if beta is None:
            self.c = chunk.prepare(q, k, v, g, scale, starts)
            a, U = chunk.chunk_transitions(self.c)
            self.states, self.decays = chunk.scan_states(a, U, None), chunk.entry_decays(self.c)
        else:
            self.c = delta.prepare_delta(q, k, v, g, beta, scale, starts)
            M, U = delta.delta_chunk_transitions(self.c)
            self.states = delta.scan_matrix_states(M, U, None)
            self.decays = delta.delta_entry_transitions(self.c, M)
        self.intra = self.q_inter = self.outputs = self.P = None

    @property
    def delta(self) -> bool:
        return isinstance(self.c, delta.DeltaChunked)

    @property
    def summary_state(self) -> torch.Tensor:
        """Ŝ [B, H, K, V] (with graph): the state leaving the segment for a zero incoming state."""
        return self.states[:, :, -1]

    @property
    def transition(self) -> torch.Tensor:
        """Â [B, H, Kg] or [B, H, K, K] (with graph)."""
        return self.decays[:, :, -1]

    def intra_outputs(self) -> None:
        """The intra-chunk outputs, which need no state (overlaps the communication)."""
        self.intra = delta.delta_intra_outputs(self.c) if self.delta else chunk.intra_outputs(self.c)

    def add_incoming(self, P: torch.Tensor) -> None:
        """P [B, H, K, V] the state entering the segment (a constant): the inter-chunk term
        Q_n S_n with the entry states S_n = S_in(0) + Λ_n P.

        The entry states exist only inside that matmul (``_InterTerm``), so no second copy of
        the states is kept; their gradient dS = Q^T dO (and through it those of the zero-state
        scan and of Λ) is formed by ``inter_backward`` / ``grad_targets``, which need dS anyway
        to build G, so backward never computes Q^T dO twice. The inter term joins the intra-chunk
        outputs through one addition, which saves nothing, so the intra-chunk outputs are freed
        here instead of living until backward.
        """
        self.P = P
        self.q_inter = delta.delta_inter_query(self.c) if self.delta else chunk.inter_query(self.c)
        self.outputs, self.intra = self.intra + _InterTerm.apply(self.q_inter, self), None

    def take_outputs(self, length: int) -> torch.Tensor:
        """The segment's outputs [B, length, H, V] (with graph), releasing the chunked copy."""
        o, self.outputs = from_chunks(self.outputs, length), None
        return o

    def output_grad(self, do: torch.Tensor) -> torch.Tensor:
        """The segment's slice [B, length, H, V] of dL/do in this backend's form (chunked)."""
        return to_chunks(do, self.c.C, self.states.dtype)

    def inter_backward(self, do_chunks: torch.Tensor):
        """(G [B, H, K, V], dS [B, H, N, K, V]): G = dL/dP from the segment's own outputs and the
        entry states' gradient dS_n = Q_n^T dO_n. G = sum_n Λ_n^T dS_n, since the entry states
        are S_in + Λ P. (dQ comes from ``_InterTerm`` during the local backward.)"""
        dS = self.q_inter.detach().transpose(-1, -2) @ do_chunks
        Lam = self.decays[:, :, :-1].detach()
        if Lam.dim() == dS.dim() - 1 and Lam.shape[-1] == 1:  # scalar decays: a batched matmul over
            G = torch.einsum("bhn,bhnkv->bhkv", Lam.squeeze(-1), dS)  # n, no [N, K, V] temporary
        elif Lam.dim() == dS.dim():  # matrices: sum_n Λ_n^T dS_n is one matmul over stacked rows
            B, H, N, K, V = dS.shape
            G = Lam.reshape(B, H, N * K, K).transpose(-1, -2) @ dS.reshape(B, H, N * K, V)
        else:
            G = (Lam.unsqueeze(-1) * dS).sum(2)
        return G, dS

    def grad_targets(self, dS: torch.Tensor, final_grad: torch.Tensor):
        """(tensors, grads) of this segment for the strategy's one ``autograd.grad`` (besides the
        output, which the caller adds): the zero-state scan's states [N + 1] get dS with the final
        state's gradient (D_{j+1}) appended, and Λ its share <dS, P>. (One target for all the
        states: separate views of the entry and final states would each expand their gradient to
        the full [N + 1] size inside autograd.)"""
        dS_all = torch.cat([dS, final_grad.unsqueeze(2).to(dS.dtype)], dim=2)  # entry states, then final
        return [self.states, self.decays], [dS_all, transition_grad(self.decays, dS_all, self.P)]


def entry_states(w: TorchSegment) -> torch.Tensor:
    """The chunk-entry states S_in(0) + Λ P [B, H, N, K, V], without graph (a temporary: never
    kept between forward and backward)."""
    S, Lam = w.states[:, :, :-1].detach(), w.decays[:, :, :-1].detach()
    if Lam.dim() == S.dim():  # delta rule: Λ_n are K x K matrices
        return S + _stacked(Lam, w.P).reshape(S.shape)
    return torch.addcmul(S, Lam.unsqueeze(-1), w.P.unsqueeze(2))


class _InterTerm(torch.autograd.Function):
    """Q_n S_n for the entry states S_n of ``w`` (``entry_states``), formed on the fly in forward
    and again in backward, never kept. Backward returns dQ = dO S^T only: dS = Q^T dO is formed by
    ``inter_backward`` before the local backward starts (the strategy needs G from it), so this
    node computes dQ when autograd reaches it and frees it right after, as the one-device op does."""

    @staticmethod
    def forward(ctx, q_inter: torch.Tensor, w: TorchSegment) -> torch.Tensor:
        ctx.w = w
        return q_inter @ entry_states(w)

    @staticmethod
    @no_autocast
    def backward(ctx, d_inter: torch.Tensor):
        return d_inter @ entry_states(ctx.w).transpose(-1, -2), None


segment_work = TorchSegment
"""The contract's constructor: ``segment_work(q, k, v, g, beta, scale, starts)`` for one segment."""
