"""The PyTorch backend's local work of one segment for the delta rule (the matrix kinds: DeltaNet,
Gated DeltaNet, KDA; ``ops/delta.py``), the contract of ``ops/backends/__init__.py``.

The segment's extra work over the one-device op on the same tokens is kept to two small pieces:

1. construction: the chunk form's UT transform and chunk summaries (M_n, U_n), as the one-device
   op; the segment's summary (Â, Ŝ) by a pairwise tree over the chunks
   (``delta.delta_segment_summary``: N K^2 (K + V) multiply-adds in log2 N batched rounds; values
   only, the strategies never differentiate them);
2. ``intra_outputs``: the intra-chunk outputs A u (no state needed);
3. ``add_incoming(P)``: the chunk-entry states by the one-device op's own scan started from P
   (S_0 = P, S_{n+1} = M_n S_n + U_n), and the inter-chunk term Q_n S_n: exactly the one-device
   op's forward with initial state P; the last state is the segment's final state Â P + Ŝ.

No entry-transition matrices Λ_n [N, K, K] are formed or differentiated. In backward,
``inter_backward`` gives dS_n = Q_n^T dO_n and G = dL/dP = sum_n Λ_n^T dS_n by the adjoint
recurrence lam_n = dS_n + M_n^T lam_{n+1} (``delta.delta_entry_adjoint``, N K^2 V); once the
strategy knows the gradient D reaching the final state, ``grad_targets`` hands the scan's states
(dS, D) and autograd runs the one-device op's backward (the scan's own adjoint with D as its
tail). Extra over the one-device op: the tree (forward) and one adjoint pass (backward).

Per chunk at C = K = V the one-device op costs ~25 [K, K]-sized matmul units (fwd + bwd); the tree
(Â, Ŝ) adds ~2 and the adjoint pass ~1, so a segment in the middle of the sequence runs at ~0.89 of
the one-device op's work. The ends skip what nothing reads (``incoming`` / ``outgoing``, the
contract's flags): the sequence's first segment without an initial state has P = 0, so its scan
from zero runs in the constructor (Ŝ is its last state, Â = 0, G = 0: no tree, no adjoint, the
one-device op's work exactly); the last segment without a final state skips the tree (its summary
is never read) and pays only the adjoint pass. At W = 2 (contiguous) both ranks hold an end.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from .. import delta
from . import HeldSummary
from ..common import from_chunks, start_mask, to_chunks
from ..precision import no_autocast


class ChunkedSegment:
    """What both torch segments share: chunked outputs (``outputs``, ``c.C``) and states."""

    def take_outputs(self, length: int) -> torch.Tensor:
        """The segment's outputs [B, length, H, V] (with graph), releasing the chunked copy."""
        o, self.outputs = from_chunks(self.outputs, length), None
        return o

    def output_grad(self, do: torch.Tensor) -> torch.Tensor:
        """The segment's slice [B, length, H, V] of dL/do in this backend's form (chunked)."""
        return to_chunks(do, self.c.C, self.states.dtype)


class DeltaSegment(ChunkedSegment, HeldSummary):
    """One segment's local work in the delta-rule chunk form.

    c: ``delta.DeltaChunked``; M [B, H, N, K, K], U [B, H, N, K, V]: the chunk summaries (with
    graph); Â [B, H, K, K], Ŝ [B, H, K, V]: the segment's summary (values); after
    ``add_incoming``: states [B, H, N + 1, K, V], the chunk-entry states from P and the final
    state (with graph), q_inter [B, H, N, C, K], outputs [B, H, N, C, V] (released by
    ``take_outputs``); P [B, H, K, V] (a constant).
    """

    def __init__(self, q, k, v, g, beta, kind, scale: float, starts: Optional[Tuple[int, ...]], *,
                 incoming: bool = True, outgoing: bool = True):
        self.kind, self.incoming = kind, incoming
        self.c = delta.prepare_delta(q, k, v, g, beta, scale, start_mask(starts, q.shape[1], q.device), kind=kind)
        self.M, self.U = delta.delta_chunk_transitions(self.c)
        self.intra = self.q_inter = self.outputs = self.states = self.P = None
        if not incoming:
            # No state ever enters (the sequence's first segment, no initial state): P = 0, so
            # the one-device op's own scan from zero is the forward, run now; Ŝ is its last state
            # and Â = 0 (as for a segment that starts a document) — no tree, no extra work.
            self.states = delta.scan_matrix_states(self.M, self.U, None)
            self._S = self.states[:, :, -1].detach()
            self._A = self.M.new_zeros(self.M.shape[:2] + self.M.shape[-2:])
        elif outgoing:
            self._A, self._S = delta.delta_segment_summary(self.M.detach(), self.U.detach())
        else:  # nothing reads the summary (the last segment, no final state): no tree
            self._A = self.M.new_zeros(self.M.shape[:2] + self.M.shape[-2:])
            self._S = self.U.new_zeros(self.U.shape[:2] + self.U.shape[-2:])

    def intra_outputs(self) -> None:
        """The intra-chunk outputs, which need no state (overlaps the communication)."""
        self.intra = delta.delta_intra_outputs(self.c)

    def add_incoming(self, P: torch.Tensor) -> None:
        """P [B, H, K, V] the state entering the segment (a constant): the chunk-entry states by
        the scan from P and the inter-chunk term Q_n S_n (whose dS = Q^T dO ``inter_backward``
        forms once; ``_InterTerm`` gives only dQ)."""
        self.P = P
        if self.incoming:  # otherwise P = 0 and the constructor ran this scan from zero
            self.states = delta.scan_matrix_states(self.M, self.U, P)
        self.q_inter = delta.delta_inter_query(self.c)
        inter = _InterTerm.apply(self.q_inter, self.states.detach()[:, :, :-1])
        self.outputs, self.intra = self.intra + inter, None
        # Backward needs only what the graph saved, M (G's adjoint) and the chunk size: dropping the
        # chunked inputs and U here frees what the graph does not keep (the one-device op frees it
        # when its forward returns), so the segment holds no more than that op between the passes.
        self.c, self.U = SimpleNamespace(C=self.c.C), None

    def inter_backward(self, do_chunks: torch.Tensor):
        """(G [B, H, K, V], dS [B, H, N, K, V]): dS_n = Q_n^T dO_n and G = dL/dP from the
        segment's own outputs (the adjoint recurrence over the chunks, no Λ)."""
        B, H, N, _, V = do_chunks.shape
        # dS_all [B, H, N + 1, K, V]: the entry states' gradients, then (``grad_targets``) the final
        # state's; one buffer instead of dS plus a concatenated copy held through the local backward
        dS_all = do_chunks.new_empty(B, H, N + 1, self.M.shape[-1], V)
        dS = dS_all[:, :, :N]
        dS.copy_(self.q_inter.detach().transpose(-1, -2) @ do_chunks)
        self.q_inter = None
        if not self.incoming:  # P is the constant 0 of the fold: nothing reads dL/dP
            return dS.new_zeros(B, H, *dS.shape[-2:]), dS_all
        return delta.delta_entry_adjoint(self.M.detach(), dS), dS_all

    def grad_targets(self, dS_all: torch.Tensor, final_grad: torch.Tensor):
        """The scan's states [N + 1] get dS with the final state's gradient D in the last slot:
        autograd then runs the one-device op's backward (the scan's adjoint with tail D)."""
        dS_all[:, :, -1] = final_grad.to(dS_all.dtype)
        return [self.states], [dS_all]


class _InterTerm(torch.autograd.Function):
    """Q_n S_n for entry states S (a constant here: their gradient goes through ``grad_targets``);
    backward returns dQ = dO S^T only."""

    @staticmethod
    def forward(ctx, q_inter: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(S)
        return q_inter @ S

    @staticmethod
    @no_autocast
    def backward(ctx, d_inter: torch.Tensor):
        (S,) = ctx.saved_tensors
        return d_inter @ S.transpose(-1, -2), None
