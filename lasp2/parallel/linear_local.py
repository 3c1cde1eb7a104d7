"""The rank-local half of the linear sequence-parallel strategies (LASP-2, the LASP-1 ring, ...).

Every strategy splits each local segment's work the same way (DESIGN §1); the work itself is done
by a *backend* (``ops/backends``: ``torch`` = lasp2's chunked PyTorch ops, ``fla`` = fla's Triton
kernels), which these functions call without knowing which one runs:

1. ``summarise``: each local segment's summary (Ŝ, Â) from a zero incoming state; Â is stored as
   its kind says (``ops.transition``: a decay vector, or a K x K matrix for the delta rule), 0
   when the segment holds a document start. This is all another rank ever needs from this one.
2. ``intra_outputs``: the work that needs no incoming state (the zero-state outputs), done while
   the summaries travel.
3. ``add_incoming``: once the incoming state P is known, the output term linear in P.

In backward, ``inter_backward`` gives G = dL/dP from each segment's own outputs; once the strategy
knows the gradient reaching each segment's final state (D_{j+1} in DESIGN §1), one
``torch.autograd.grad`` call over ``grad_targets`` finishes the local backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..ops import backends
from ..ops.transition import Kind
from .layout import Layout, Segment, local_starts


def apply_transition(kind: Kind, A: torch.Tensor, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Â X (or Â^T X) for a transition Â of ``kind`` (``ops.transition``: a decay vector
    [..., Kg] or a matrix [..., K, K]) and states X [..., K, V]."""
    return kind.apply(A, X, transpose)


@dataclass
class SegmentWork:
    """One local segment: where it lives (``seg``), its backend's local work (``local``, a
    ``backends.torch.TorchSegment`` or ``backends.fla.FlaSegment``) and the kind of its
    transition (``kind``, ``ops.transition``), which the strategies' algebra dispatches on."""

    seg: Segment
    local: object
    kind: Kind
    entering: Optional[torch.Tensor] = None

    @property
    def summary_state(self) -> torch.Tensor:
        """Ŝ [B, H, K, V] (fp32; fp64 for fp64 inputs): the state leaving the segment for a zero
        incoming state. For the sequence's first segment under an initial state S0
        (``entering``, a constant) it is Â S0 + Ŝ, the state leaving it: the strategies' fold
        starts from P_0 = 0, so S0 rides inside segment 0's summary and no strategy changes."""
        if self.entering is None:
            return self.local.summary_state
        return self.kind.apply(self.local.transition.detach(), self.entering) + self.local.summary_state

    @property
    def transition(self) -> torch.Tensor:
        """Â in its kind's form: [B, H, Kg] (decay vector) or [B, H, K, K] (matrix)."""
        return self.local.transition


def summarise(q, k, v, g, beta, kind: Kind, scale: float, layout: Layout, rank: int, cu_list,
              backend: str = "torch", *, initial_state: bool = False, final_state: bool = False) -> List[SegmentWork]:
    """Step 1 for every local segment (in local order). Inputs are the rank's [B, T, ...] leaves;
    ``kind`` the transition (g, beta) name (``ops.transition.classify``); ``cu_list`` the global
    document boundaries as host ints (or None); ``backend`` a resolved name (``backends.resolve``).
    ``initial_state`` / ``final_state``: whether the call has a state entering the sequence / returns
    the one leaving it. Without them the fold never reads segment 0's transition nor dL/dP_0
    (P_0 = 0) and never the last segment's summary (no later segment): the backend is told
    (``incoming`` / ``outgoing`` of the contract) and may skip that work."""
    impl = backends.get(backend)
    last = layout.num_segments - 1
    work = []
    for seg in layout.local_segments(rank):
        sl = slice(seg.local_start, seg.local_start + seg.length)
        part = [None if t is None else t[:, sl] for t in (q, k, v, g, beta)]
        local = impl.segment_work(*part, kind, scale, local_starts(cu_list, seg),
                                  incoming=seg.index != 0 or initial_state, outgoing=seg.index != last or final_state)
        work.append(SegmentWork(seg, local, kind))
    return work


def intra_outputs(work: List[SegmentWork]) -> None:
    """Step 2: the work that needs no incoming state (overlaps the communication)."""
    for w in work:
        w.local.intra_outputs()


def add_incoming(w: SegmentWork, P: torch.Tensor) -> None:
    """Step 3 for one segment, P [B, H, K, V] the state entering it (a constant)."""
    w.local.add_incoming(P)


def inter_backward(w: SegmentWork, do_part: torch.Tensor):
    """(G [B, H, K, V], backend data for ``grad_targets``): G = dL/dP from this segment's own
    outputs; ``do_part`` from ``output_chunks_of``."""
    return w.local.inter_backward(do_part)


def grad_targets(o: torch.Tensor, do: torch.Tensor, work: List[SegmentWork], inter_grads, final_grads):
    """(outputs, grads) for the one ``autograd.grad`` over the local graph: the local output
    ``o`` (from ``assemble``, with graph) gets dO; each segment adds the pairs that carry its final
    state's gradient (D_{j+1}) and, through Â, <D_{j+1}, P> (``grad_targets`` of its backend)."""
    outputs, grads = [o], [do]
    for w, (_, data), final in zip(work, inter_grads, final_grads):
        more_outputs, more_grads = w.local.grad_targets(data, final)
        outputs += more_outputs
        grads += more_grads
    return outputs, grads


def output_chunks_of(do: torch.Tensor, w: SegmentWork) -> torch.Tensor:
    """The slice of a [B, T, H, V] output gradient that belongs to ``w``, in its backend's form
    (chunked for ``torch``)."""
    return w.local.output_grad(do[:, w.seg.local_start: w.seg.local_start + w.seg.length])


def assemble(work: List[SegmentWork], dtype: torch.dtype) -> torch.Tensor:
    """Local output [B, T, H, V] with graph from the segments' outputs, which it then releases:
    the caller's output is then the only copy held until backward."""
    return torch.cat([w.local.take_outputs(w.seg.length) for w in work], dim=1).to(dtype)


def compose(kind: Kind, later, earlier):
    """The summary of two adjacent segments, ``earlier`` then ``later`` (DESIGN §1):
    (Â2, X2) ∘ (Â1, X1) = (Â2 Â1, Â2 X1 + X2). Associative, not commutative.

    Each argument is (Â, X) with Â in ``kind``'s form, X [..., K, V] (a state, or any term the
    transitions act on: the backward scans compose (Â^T, G) the same way). Returns the composed
    (Â, X).
    """
    return kind.compose(later, earlier)


def fold_forward(kind: Kind, S_hat: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """Prefix fold over segments in sequence order (DESIGN §1, P_0 = 0, P_{j+1} = Â_j P_j + Ŝ_j).

    S_hat [J, B, H, K, V], A_hat [J, ...] in ``kind``'s form ([J, B, H, Kg] or [J, B, H, K, K]).
    Returns the incoming states P [J, B, H, K, V].
    """
    P = torch.zeros_like(S_hat)
    for j in range(1, S_hat.shape[0]):
        P[j] = kind.apply(A_hat[j - 1], P[j - 1]) + S_hat[j - 1]
    return P


def fold_backward(kind: Kind, G: torch.Tensor, A_hat: torch.Tensor,
                  tail: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Suffix fold (DESIGN §1): D_j = G_j + Â_j^T D_{j+1}, D_J = ``tail`` (the gradient of the
    sequence's final state [B, H, K, V]; 0 when None).

    G [J, B, H, K, V] (dL/dP_j from segment j's own outputs), A_hat as in ``fold_forward``.
    Returns N_j = D_{j+1}, the gradient reaching segment j's final state, [J, B, H, K, V].
    """
    nxt = torch.zeros_like(G)
    if tail is not None:
        nxt[-1] = tail
    for j in range(G.shape[0] - 2, -1, -1):
        nxt[j] = G[j + 1] + kind.apply(A_hat[j + 1], nxt[j + 1], transpose=True)
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
