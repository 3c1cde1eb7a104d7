"""LASP-2: sequence-parallel linear attention with one all-gather per direction (DESIGN §1).

Forward, on every rank:
  1. summarise each local segment (Ŝ, Â) from a zero incoming state;
  2. launch ONE all-gather of all summaries (fp32, packed with a small agreement header);
  3. compute the intra-chunk outputs while it is in flight (the bulk of the work);
  4. fold the gathered summaries of earlier segments into each local segment's incoming state P
     (P_{j+1} = Â_j P_j + Ŝ_j); the chunk-entry states become S_in + Λ P and the
     inter-chunk term is computed with them.
Backward:
  1. G_j = dL/dP_j from the local outputs (one decay-weighted Q^T dO product per segment);
  2. ONE all-gather of G; every rank runs the suffix fold D_j = G_j + Â_j^T D_{j+1};
  3. one local ``autograd.grad`` with D_{j+1} as the gradient of segment j's final state.
Cached for backward: the local autograd graph, P (one state per local segment) and the W
gathered transitions Â (vectors, not states).

The local graph is built inside ``forward`` on detached leaves and kept for ``backward``: this
is what lets the backward issue its collective on *every* rank, including rank 0 (whose
outputs depend on no gathered state) and the last rank (whose summary nobody uses).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..ops.chunk import compute_dtype
from . import comm
from .layout import Layout
from .linear_local import (SegmentWork, add_incoming, assemble, detached_leaves, fold_backward,
                           fold_forward, incoming_grad, leaf_grads, output_chunks_of, summarise,
                           intra_outputs)


def _pack(work: List[SegmentWork], header: float) -> torch.Tensor:
    """One row per local segment: [Ŝ flat, Â flat, header], in the state dtype (fp32; fp64 for
    fp64 inputs), never in the input's half precision."""
    rows = []
    for w in work:
        S, A = w.summary_state.detach(), w.transition.detach()
        rows.append(torch.cat([S.reshape(-1), A.reshape(-1), S.new_full((1,), header)]))
    return torch.stack(rows)


def _check_headers(gathered: torch.Tensor, header: float) -> None:
    codes = gathered[..., -1]
    if not bool((codes == header).all()):
        bad = sorted({r for r in range(codes.shape[0]) if not bool((codes[r] == header).all())})
        raise ValueError(f"ranks disagree on the call (shapes, gates, cu_seqlens, strategy or layout): "
                         f"rank(s) {bad} differ from this rank; pass identical arguments on every rank")


def _by_segment(gathered: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[W, S_local, ...] rank-major -> [J, ...] in sequence order."""
    rows = [gathered[s.owner, layout.segment_indices(s.owner).index(s.index)]
            for s in (layout.segment(j) for j in range(layout.num_segments))]
    return torch.stack(rows)


def lasp2_fwd(q, k, v, g, *, scale: float, layout: Layout, group, cu_seqlens, header: float,
              overlap: bool = True):
    """Forward on plain tensors (leaves may require grad: the graph is kept in the result).

    Returns (o [B, T, H, V] with graph, work, A_all [J, B, H, Kg]).
    Communication: 1 all-gather of [W, S_local, B*H*K*V + B*H*Kg + 1] fp32 (fp64 for fp64 inputs).
    """
    rank = comm.rank_and_size(group)[0]
    B, _, H, K = q.shape
    V = v.shape[-1]
    work = summarise(q, k, v, g, scale, layout, rank, cu_seqlens)
    pending = comm.all_gather(_pack(work, header), group, async_op=True)
    if overlap:
        intra_outputs(work)
    gathered = pending.wait()
    if not overlap:
        intra_outputs(work)
    _check_headers(gathered, header)
    rows = _by_segment(gathered, layout)  # [J, n]
    dt = work[0].states.dtype
    S_all = rows[:, : B * H * K * V].reshape(-1, B, H, K, V).to(dt)
    A_all = rows[:, B * H * K * V: -1].reshape(-1, B, H, work[0].transition.shape[-1]).to(dt)
    P = fold_forward(S_all, A_all)
    for w in work:
        add_incoming(w, P[w.seg.index])
    return assemble(work, q.dtype), work, A_all


def lasp2_bwd(do: torch.Tensor, work: List[SegmentWork], A_all: torch.Tensor, layout: Layout, group):
    """From dL/do [B, T, H, V]: the gradients reaching each segment's outputs and final state.

    Returns (grad tensors, grad outputs) for one ``torch.autograd.grad`` call.
    Communication: 1 all-gather of [W, S_local, B, H, K, V] fp32.
    """
    do_chunks = [output_chunks_of(do, w) for w in work]
    G_local = torch.stack([incoming_grad(w, d) for w, d in zip(work, do_chunks)])
    G_all = _by_segment(comm.all_gather(G_local, group), layout).to(A_all.dtype)
    nxt = fold_backward(G_all, A_all)
    outputs = [w.outputs for w in work] + [w.final for w in work]
    grads = do_chunks + [nxt[w.seg.index] for w in work]
    return outputs, grads


class LASP2Function(torch.autograd.Function):
    """Thin autograd wrapper: exactly one gradient per forward input."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, layout, group, cu_seqlens, header, overlap, grad_enabled):
        leaves = detached_leaves((q, k, v, g), grad_enabled)
        with torch.set_grad_enabled(any(t is not None and t.requires_grad for t in leaves)):
            o, work, A_all = lasp2_fwd(*leaves, scale=scale, layout=layout, group=group,
                                       cu_seqlens=cu_seqlens, header=header, overlap=overlap)
        ctx.leaves, ctx.work, ctx.A_all, ctx.layout, ctx.group = leaves, work, A_all, layout, group
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        outputs, grads = lasp2_bwd(do, ctx.work, ctx.A_all, ctx.layout, ctx.group)
        dq, dk, dv, dg = leaf_grads(ctx.leaves, outputs, grads)
        ctx.work = ctx.leaves = None  # free the graph
        return dq, dk, dv, dg, None, None, None, None, None, None, None


class BidirectionalLASP2Function(torch.autograd.Function):
    """Non-causal basic linear attention: o = scale * q (sum over all ranks of k^T v).

    Communication: forward 1 all-gather of [W, B, H, K, V]; backward 1 all-gather of the same
    size (the summed G = scale * sum q^T dO). An all-reduce would do as well; the gather keeps
    one code path (DESIGN §1).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, group):
        dt = compute_dtype(q)
        qf, kf, vf = (t.to(dt).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        S = comm.all_gather(kf.transpose(-1, -2) @ vf, group).sum(0)
        ctx.save_for_backward(qf, kf, vf, S)
        ctx.scale, ctx.group, ctx.dtypes = scale, group, (q.dtype, k.dtype, v.dtype)
        return (scale * qf @ S).transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        qf, kf, vf, S = ctx.saved_tensors
        dof = do.to(qf.dtype).transpose(1, 2)
        G = comm.all_gather(ctx.scale * qf.transpose(-1, -2) @ dof, ctx.group).sum(0)
        dq = ctx.scale * dof @ S.transpose(-1, -2)
        dk, dv = vf @ G.transpose(-1, -2), kf @ G
        return (*(t.transpose(1, 2).to(d) for t, d in zip((dq, dk, dv), ctx.dtypes)), None, None)

