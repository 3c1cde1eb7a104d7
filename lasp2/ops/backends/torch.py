"""The PyTorch backend (default): lasp2's chunked einsum ops (``ops/chunk.py``, ``ops/delta.py``).

Runs anywhere torch runs, in any floating dtype (fp64 included, for the exactness tests).

Local work of one segment for the SP strategies (``TorchSegment``, the contract of
``ops/backends/__init__.py``):

1. construction: chunk the segment and scan its chunk states from a zero incoming state; the last
   one is the segment's Ŝ, and Â is its transition in its kind's form (``ops.transition``: a decay
   vector, or a K x K matrix for the delta rule; 0 when the segment holds a document start);
2. ``intra_outputs``: the intra-chunk outputs, which need no state: the bulk of the work, done
   while the summaries travel;
3. ``add_incoming``: once the incoming state P is known, the chunk-entry states become
   S_in + Λ P (one [N, K, V] update, no extra matmul) and the inter-chunk term is computed with
   them; the last entry is the segment's final state Â P + Ŝ.

The delta rule (the matrix kinds) has its own segment (``torch_delta.DeltaSegment``): it forms no
K x K entry transitions Λ, running the one-device op's scan from P instead.

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
from ..common import start_mask
from ..precision import no_autocast
from .torch_delta import ChunkedSegment, DeltaSegment

name = "torch"


class DecayForm:
    """The chunk form of the decay-vector kinds (identity, scalar, diagonal): ``ops/chunk.py``."""

    @staticmethod
    def linear_attention(q, k, v, g, beta, kind, **options):
        return chunk.chunk_linear_attention(q, k, v, g, kind=kind, **options)

    @staticmethod
    def summarise(q, k, v, g, beta, kind, scale: float, starts):
        """(chunked inputs, zero-state chunk-entry states [N + 1], entry decays Λ [N + 1])."""
        c = chunk.prepare(q, k, v, g, scale, starts, kind=kind)
        a, U = chunk.chunk_transitions(c)
        return c, chunk.scan_states(a, U, None), chunk.entry_decays(c)

    intra_outputs = staticmethod(chunk.intra_outputs)
    inter_query = staticmethod(chunk.inter_query)
    segment = None  # set below: TorchSegment


class DeltaForm:
    """The chunk form of the delta rule (the matrix kinds: scalar gate, and KDA's per-channel
    gate): ``ops/delta.py``; its SP local work is ``torch_delta.DeltaSegment``."""

    @staticmethod
    def linear_attention(q, k, v, g, beta, kind, **options):
        return delta.delta_linear_attention(q, k, v, g, beta, kind=kind, **options)

    segment = DeltaSegment  # the SP local work (``torch_delta.py``)


FORMS = {"identity": DecayForm, "scalar": DecayForm, "diagonal": DecayForm, "matrix": DeltaForm,
         "channel_matrix": DeltaForm}
"""Kind name (``ops.transition``) -> its chunk form: one row per supported kind."""


def linear_attention(q, k, v, g, beta, *, kind, scale: float, initial_state, output_final_state: bool,
                     cu_seqlens) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention on one device (inputs validated by the caller) in the chunk form
    of ``kind`` (``ops.transition.classify(g, beta)``). Shapes and dtypes as
    ``lasp2.linear_attention``."""
    return FORMS[kind.name].linear_attention(q, k, v, g, beta, kind, scale=scale, initial_state=initial_state,
                                             output_final_state=output_final_state, cu_seqlens=cu_seqlens)


class TorchSegment(ChunkedSegment):
    """One segment's local work in the chunk form.

    kind: the transition (``ops.transition``); form: its chunk form (``FORMS``);
    c: the chunked inputs (``chunk.Chunked`` or ``delta.DeltaChunked``);
    states [B, H, N + 1, K, V]: chunk-entry states for a zero incoming state (with graph); the
        real ones are states + Λ P (``entry_states``);
    decays Λ: segment start -> chunk entries in the kind's form, [B, H, N + 1, Kg] (decay
        vectors) or [B, H, N + 1, K, K] (matrices); Λ_N = Â;
    intra [B, H, N, C, V], q_inter [B, H, N, C, K], outputs [B, H, N, C, V] (intra + inter, with
        graph; replaces ``intra``, released by ``take_outputs``); P [B, H, K, V] (a constant).
    """

    def __init__(self, q, k, v, g, beta, kind, scale: float, starts: Optional[Tuple[int, ...]], *,
                 incoming: bool = True, outgoing: bool = True):
        # incoming / outgoing (the contract) are not used: a decay vector's summary is a cumsum
        self.kind, self.form = kind, FORMS[kind.name]
        self.c, self.states, self.decays = self.form.summarise(q, k, v, g, beta, kind, scale,
                                                               start_mask(starts, q.shape[1], q.device))
        self.intra = self.q_inter = self.outputs = self.P = None

    @property
    def summary_state(self) -> torch.Tensor:
        """Ŝ [B, H, K, V] (with graph): the state leaving the segment for a zero incoming state."""
        return self.states[:, :, -1]

    @property
    def transition(self) -> torch.Tensor:
        """Â in the kind's form, [B, H, Kg] or [B, H, K, K] (with graph)."""
        return self.decays[:, :, -1]

    def intra_outputs(self) -> None:
        """The intra-chunk outputs, which need no state (overlaps the communication)."""
        self.intra = self.form.intra_outputs(self.c)

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
        self.q_inter = self.form.inter_query(self.c)
        self.outputs, self.intra = self.intra + _InterTerm.apply(self.q_inter, self), None

    def inter_backward(self, do_chunks: torch.Tensor):
        """(G [B, H, K, V], dS [B, H, N, K, V]): G = dL/dP from the segment's own outputs and the
        entry states' gradient dS_n = Q_n^T dO_n. G = sum_n Λ_n^T dS_n, since the entry states
        are S_in + Λ P. (dQ comes from ``_InterTerm`` during the local backward.)"""
        dS = self.q_inter.detach().transpose(-1, -2) @ do_chunks
        return self.kind.algebra.adjoint_sum(self.decays[:, :, :-1].detach(), dS), dS

    def grad_targets(self, dS: torch.Tensor, final_grad: torch.Tensor):
        """(tensors, grads) of this segment for the strategy's one ``autograd.grad`` (besides the
        output, which the caller adds): the zero-state scan's states [N + 1] get dS with the final
        state's gradient (D_{j+1}) appended, and Λ its share <dS, P>. (One target for all the
        states: separate views of the entry and final states would each expand their gradient to
        the full [N + 1] size inside autograd.)"""
        dS_all = torch.cat([dS, final_grad.unsqueeze(2).to(dS.dtype)], dim=2)  # entry states, then final
        return [self.states, self.decays], [dS_all, self.kind.algebra.stacked_grad(self.decays, dS_all, self.P)]


DecayForm.segment = TorchSegment


def entry_states(w: TorchSegment) -> torch.Tensor:
    """The chunk-entry states S_in(0) + Λ P [B, H, N, K, V], without graph (a temporary: never
    kept between forward and backward)."""
    return w.kind.algebra.entry_states(w.states[:, :, :-1].detach(), w.decays[:, :, :-1].detach(), w.P)


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


def segment_work(q, k, v, g, beta, kind, scale: float, starts: Optional[Tuple[int, ...]], *,
                 incoming: bool = True, outgoing: bool = True):
    """The contract's constructor for one segment: ``TorchSegment`` for the decay-vector kinds,
    ``torch_delta.DeltaSegment`` for the delta rule (which uses ``incoming``/``outgoing`` to skip
    the summary tree and the adjoint pass where nothing reads them)."""
    return FORMS[kind.name].segment(q, k, v, g, beta, kind, scale, starts, incoming=incoming, outgoing=outgoing)
