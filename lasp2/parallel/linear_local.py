"""The rank-local half of the linear sequence-parallel strategies (LASP-2 and the LASP-1 ring).

Both strategies split each local segment's work the same way (DESIGN §1):

1. ``summarise``: chunk the segment and scan its chunk states from a zero incoming state;
   the last one is the segment's Ŝ, and Â is its transition (a decay vector for the diagonal
   family, a K x K matrix for the delta rule; 0 when the segment holds a document start). This is
   all another rank ever needs from this one.
2. ``intra_outputs``: the intra-chunk outputs, which need no state: the bulk of the work,
   done while the summaries travel.
3. ``add_incoming``: once the incoming state P is known, the chunk-entry states become
   S_in + Λ P (one [N, K, V] update, no extra matmul) and the inter-chunk term is computed
   with them; the last entry is the segment's final state Â P + Ŝ.

Everything but the inter-chunk matmul is ordinary differentiable PyTorch on leaves the strategy
owns. In backward, ``inter_backward`` forms that matmul's gradients by hand, which also yields
G = dL/dP (P is a constant here) at no extra cost; once the strategy knows the gradient reaching
each segment's final state (D_{j+1} in DESIGN §1), one ``torch.autograd.grad`` call
(``grad_targets``) finishes the local backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..ops import chunk, delta
from ..ops.common import from_chunks, to_chunks
from ..ops.precision import no_autocast
from .layout import Layout, Segment, local_starts


def apply_transition(A: torch.Tensor, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """A X (or A^T X) for a transition A that is a decay vector [..., Kg] (diagonal family) or
    a matrix [..., K, K] (delta rule), and states X [..., K, V]."""
    if A.dim() == X.dim():
        return (A.transpose(-1, -2) if transpose else A) @ X
    return A.unsqueeze(-1) * X


@dataclass
class SegmentWork:
    seg: Segment
    c: "chunk.Chunked | delta.DeltaChunked"
    states: torch.Tensor     # [B, H, N + 1, K, V] chunk-entry states for a zero incoming state
                             # (with graph); the real ones are states + Λ P (``entry_states``)
    decays: torch.Tensor     # Λ: segment start -> chunk entries, [B, H, N + 1, Kg] (decay
                             # vectors) or [B, H, N + 1, K, K] (delta rule); Λ_N = Â
    intra: Optional[torch.Tensor] = None    # intra-chunk outputs with graph [B, H, N, C, V]
    q_inter: Optional[torch.Tensor] = None  # inter-chunk query Q_n with graph [B, H, N, C, K]
    outputs: Optional[torch.Tensor] = None  # intra + inter with graph [B, H, N, C, V]; replaces
                                            # ``intra``, released by ``assemble``
    P: Optional[torch.Tensor] = None        # the incoming state [B, H, K, V], a constant

    @property
    def summary_state(self) -> torch.Tensor:
        """Ŝ: the state leaving the segment for a zero incoming state."""
        return self.states[:, :, -1]

    @property
    def transition(self) -> torch.Tensor:
        """Â [B, H, Kg] or [B, H, K, K]."""
        return self.decays[:, :, -1]


def summarise(q, k, v, g, beta, scale: float, layout: Layout, rank: int, cu_seqlens) -> List[SegmentWork]:
    """Step 1 for every local segment (in local order). Inputs are the rank's [B, T, ...] leaves;
    ``beta`` None selects the diagonal family (``ops/chunk.py``), else the delta rule
    (``ops/delta.py``)."""
    work = []
    for seg in layout.local_segments(rank):
        sl = slice(seg.local_start, seg.local_start + seg.length)
        g_s = None if g is None else g[:, sl]
        starts = local_starts(cu_seqlens, seg)
        if beta is None:
            c = chunk.prepare(q[:, sl], k[:, sl], v[:, sl], g_s, scale, starts)
            a, U = chunk.chunk_transitions(c)
            work.append(SegmentWork(seg, c, chunk.scan_states(a, U, None), chunk.entry_decays(c)))
        else:
            c = delta.prepare_delta(q[:, sl], k[:, sl], v[:, sl], g_s, beta[:, sl], scale, starts)
            M, U = delta.delta_chunk_transitions(c)
            work.append(SegmentWork(seg, c, delta.scan_matrix_states(M, U, None),
                                    delta.delta_entry_transitions(c, M)))
    return work


def intra_outputs(work: List[SegmentWork]) -> None:
    """Step 2: the intra-chunk outputs, which need no state (overlaps the communication)."""
    for w in work:
        w.intra = delta.delta_intra_outputs(w.c) if _is_delta(w) else chunk.intra_outputs(w.c)


def _is_delta(w: SegmentWork) -> bool:
    return isinstance(w.c, delta.DeltaChunked)


def entry_states(w: SegmentWork) -> torch.Tensor:
    """The chunk-entry states S_in(0) + Λ P [B, H, N, K, V], without graph (a temporary: never
    kept between forward and backward)."""
    S, Lam = w.states[:, :, :-1].detach(), w.decays[:, :, :-1].detach()
    if Lam.dim() == S.dim():  # delta rule: Λ_n are K x K matrices
        return S + _stacked(Lam, w.P).reshape(S.shape)
    return torch.addcmul(S, Lam.unsqueeze(-1), w.P.unsqueeze(2))


def _stacked(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """[B, H, M, R, C] @ [B, H, C, D] as one [B, H, M * R, C] @ [B, H, C, D] matmul, [B, H, M * R, D]
    (broadcasting Y over M instead would copy it M times)."""
    B, H, M, R, C = X.shape
    return X.reshape(B, H, M * R, C) @ Y


def transition_grad(Lam: torch.Tensor, dX: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """dL/dΛ for X = Λ P (``apply_transition``) given dL/dX [B, H, M, K, V], P [B, H, K, V]."""
    if Lam.dim() == dX.dim():  # matrices: dΛ_n = dX_n P^T
        return _stacked(dX, P.transpose(-1, -2)).reshape(*dX.shape[:-1], P.shape[-2])
    if Lam.shape[-1] == 1:  # scalar decays
        return torch.einsum("bhnkv,bhkv->bhn", dX, P).unsqueeze(-1)
    return torch.einsum("bhnkv,bhkv->bhnk", dX, P)


class _InterTerm(torch.autograd.Function):
    """Q_n S_n for the entry states S_n of ``w`` (``entry_states``), formed on the fly in forward
    and again in backward, never kept. Backward returns dQ = dO S^T only: dS = Q^T dO is formed by
    ``inter_backward`` before the local backward starts (the strategy needs G from it), so this
    node computes dQ when autograd reaches it and frees it right after, as the one-device op does."""

    @staticmethod
    def forward(ctx, q_inter: torch.Tensor, w: "SegmentWork") -> torch.Tensor:
        ctx.w = w
        return q_inter @ entry_states(w)

    @staticmethod
    @no_autocast
    def backward(ctx, d_inter: torch.Tensor):
        return d_inter @ entry_states(ctx.w).transpose(-1, -2), None


def add_incoming(w: SegmentWork, P: torch.Tensor) -> None:
    """Step 3 for one segment, P [B, H, K, V] the state entering it (a constant): the inter-chunk
    term Q_n S_n with the entry states S_n = S_in(0) + Λ_n P.

    The entry states exist only inside that matmul (``_InterTerm``), so no second copy of the
    states is kept; their gradient dS = Q^T dO (and through it those of the zero-state scan and
    of Λ) is formed by ``inter_backward`` / ``grad_targets``, which need dS anyway to build G, so
    backward never computes Q^T dO twice. The inter term joins the intra-chunk outputs through one
    addition, which saves nothing, so the intra-chunk outputs are freed here instead of living
    until backward.
    """
    w.P = P
    w.q_inter = delta.delta_inter_query(w.c) if _is_delta(w) else chunk.inter_query(w.c)
    w.outputs, w.intra = w.intra + _InterTerm.apply(w.q_inter, w), None


def inter_backward(w: SegmentWork, do_chunks: torch.Tensor):
    """The entry states' gradient and G = dL/dP from this segment's own outputs.

    Returns (G [B, H, K, V], dS [B, H, N, K, V]) where dS_n = Q_n^T dO_n is the gradient of the
    chunk-entry states. G = sum_n Λ_n^T dS_n, since the entry states are S_in + Λ P. (dQ comes
    from ``_InterTerm`` during the local backward.)
    """
    dS = w.q_inter.detach().transpose(-1, -2) @ do_chunks
    Lam = w.decays[:, :, :-1].detach()
    if Lam.dim() == dS.dim() - 1 and Lam.shape[-1] == 1:  # scalar decays: a batched matmul over
        G = torch.einsum("bhn,bhnkv->bhkv", Lam.squeeze(-1), dS)  # n, no [N, K, V] temporary
    elif Lam.dim() == dS.dim():  # matrices: sum_n Λ_n^T dS_n is one matmul over stacked rows
        B, H, N, K, V = dS.shape
        G = Lam.reshape(B, H, N * K, K).transpose(-1, -2) @ dS.reshape(B, H, N * K, V)
    else:
        G = apply_transition(Lam, dS, transpose=True).sum(2)
    return G, dS


def grad_targets(o: torch.Tensor, do: torch.Tensor, work: List[SegmentWork], inter_grads, final_grads):
    """(outputs, grads) for the one ``autograd.grad`` over the local graph: the local output
    ``o`` (from ``assemble``, with graph) gets dO, which reaches the intra-chunk part and, through
    ``_InterTerm``, the inter queries; the zero-state scan's states [N + 1] get dS with the final
    state's gradient (D_{j+1}) appended, and Λ its share <dS, P>.
    (One target for all the states: separate views of the entry and final states would each
    expand their gradient to the full [N + 1] size inside autograd.)"""
    outputs, grads = [o], [do]
    for w, (_, dS), final in zip(work, inter_grads, final_grads):
        dS_all = torch.cat([dS, final.unsqueeze(2).to(dS.dtype)], dim=2)  # entry states, then final
        outputs += [w.states, w.decays]  # states + Λ P: the same dS reaches both terms
        grads += [dS_all, transition_grad(w.decays, dS_all, w.P)]
    return outputs, grads


def output_chunks_of(do: torch.Tensor, w: SegmentWork) -> torch.Tensor:
    """The slice of a [B, T, H, V] output gradient that belongs to ``w``, chunked."""
    sl = slice(w.seg.local_start, w.seg.local_start + w.seg.length)
    return to_chunks(do[:, sl], w.c.C, w.states.dtype)


def assemble(work: List[SegmentWork], dtype: torch.dtype) -> torch.Tensor:
    """Local output [B, T, H, V] with graph from the segments' chunked outputs, which it then
    releases: the caller's output is then the only copy held until backward."""
    o = torch.cat([from_chunks(w.outputs, w.seg.length) for w in work], dim=1).to(dtype)
    for w in work:
        w.outputs = None
    return o


def compose(later, earlier):
    """The summary of two adjacent segments, ``earlier`` then ``later`` (DESIGN §1):
    (Â2, X2) ∘ (Â1, X1) = (Â2 Â1, Â2 X1 + X2). Associative, not commutative.

    Each argument is (Â, X) with Â [..., Kg] (decay vectors, multiplied elementwise) or
    [..., K, K] (matrices), X [..., K, V] (a state, or any term the transitions act on: the
    backward scans compose (Â^T, G) the same way). Returns the composed (Â, X).
    """
    (A2, X2), (A1, X1) = later, earlier
    A = A2 @ A1 if A2.dim() == X2.dim() else A2 * A1
    return A, apply_transition(A2, X1) + X2


def fold_forward(S_hat: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """Prefix fold over segments in sequence order (DESIGN §1, P_0 = 0, P_{j+1} = Â_j P_j + Ŝ_j).

    S_hat [J, B, H, K, V], A_hat [J, B, H, Kg] or [J, B, H, K, K]. Returns the incoming states
    P [J, B, H, K, V].
    """
    P = torch.zeros_like(S_hat)
    for j in range(1, S_hat.shape[0]):
        P[j] = apply_transition(A_hat[j - 1], P[j - 1]) + S_hat[j - 1]
    return P


def fold_backward(G: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """Suffix fold (DESIGN §1): D_j = G_j + Â_j^T D_{j+1}, D_J = 0.

    G [J, B, H, K, V] (dL/dP_j from segment j's own outputs). Returns N_j = D_{j+1}, the
    gradient reaching segment j's final state, [J, B, H, K, V].
    """
    nxt = torch.zeros_like(G)
    for j in range(G.shape[0] - 2, -1, -1):
        nxt[j] = G[j + 1] + apply_transition(A_hat[j + 1], nxt[j + 1], transpose=True)
    return nxt


def detached_leaves(inputs, grad_enabled: bool) -> list:
    """Fresh leaves for the local graph; a leaf requires grad iff its input does."""
    return [None if t is None else t.detach().requires_grad_(grad_enabled and t.requires_grad)
            for t in inputs]


def leaf_grads(leaves, outputs, grads) -> list:
    """One ``autograd.grad`` over the kept local graph; None for leaves without grad.

    Outputs that do not depend on any leaf requiring grad (e.g. the final states when only q
    requires grad) are dropped: autograd refuses outputs without a graph."""
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return [next(got) if t is not None and t.requires_grad else None for t in leaves]
