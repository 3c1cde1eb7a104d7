"""LASP-2: sequence-parallel linear attention with one all-gather per direction (DESIGN §1).

Forward, on every rank:
  1. summarise each local segment (Ŝ, Â) from a zero incoming state;
  2. launch ONE all-gather of all summaries (fp32, packed with the call's agreement digest);
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

The local work and the autograd Function are shared with the other linear strategies
(``linear_sp``); this module is the exchange (``AllGatherExchange``) and the bidirectional op.
"""
from __future__ import annotations

import bisect
from typing import List, Tuple

import torch

from ..ops.common import compute_dtype
from . import agreement, comm
from .context import LinearCall
from .layout import Layout
from .linear_local import SegmentWork, fold_backward, fold_forward
from ..ops.precision import no_autocast


def _pack(work: List[SegmentWork], digest: int) -> torch.Tensor:
    """One row per local segment: [Ŝ flat, Â flat, digest], in the state dtype (fp32; fp64 for
    fp64 inputs), never in the input's half precision; the digest's 8 bytes are raw bits."""
    rows = [torch.cat([w.summary_state.detach().reshape(-1), w.transition.detach().reshape(-1)]) for w in work]
    return agreement.stamp_rows(torch.stack(rows), digest)


def _by_segment(gathered: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[W, S_local, ...] rank-major -> [J, ...] in sequence order."""
    rows = [gathered[s.owner, layout.segment_indices(s.owner).index(s.index)]
            for s in (layout.segment(j) for j in range(layout.num_segments))]
    return torch.stack(rows)


class AllGatherExchange:
    """LASP-2's exchange (``linear_sp`` protocol): one all-gather of every segment's summary.

    Forward: pack [Ŝ, Â, digest] per local segment, launch ONE async all-gather, run the
    intra-chunk work while it is in flight (``call.overlap``), check the digests, fold
    (``fold_forward``). Saved for backward: the gathered transitions Â [J, B, H, Kg | K, K].
    Backward: ONE all-gather of G and the suffix fold (``fold_backward``).
    Communication: forward 1 all-gather of [W, S_local, B*H*K*V + |Â| + 2] fp32 (+ 1 for fp64
    inputs: the 8-byte digest), |Â| = B*H*Kg for decay vectors, B*H*K*K for matrices (``ops.transition``); backward
    1 all-gather of [W, S_local, B, H, K, V] ([W, S_local + 1, ...] with a final state: its
    gradient's terms ride along). Initial and final states add no collective.
    """

    name = "lasp2"

    @staticmethod
    def forward(work: List[SegmentWork], call: LinearCall, local_work):
        B, H, K, V = work[0].summary_state.shape
        pending = comm.all_gather(_pack(work, call.digest), call.group, async_op=True)
        if call.overlap:
            local_work()
        gathered = pending.wait()
        if not call.overlap:
            local_work()
        agreement.check_stamped(gathered, call.digest, "sp_linear_attention")
        rows = _by_segment(gathered, call.layout)  # [J, n]
        dt, width = work[0].summary_state.dtype, agreement.digest_width(gathered.dtype)
        S_all = rows[:, : B * H * K * V].reshape(-1, B, H, K, V).to(dt)
        A_all = rows[:, B * H * K * V: -width].reshape(-1, *work[0].transition.shape).to(dt)
        P = fold_forward(work[0].kind, S_all, A_all)
        saved = A_all
        if call.output_final_state:  # one more fold step, from gathered bits: identical on every rank
            saved = (A_all, work[0].kind.apply(A_all[-1], P[-1]) + S_all[-1])
        return [P[w.seg.index] for w in work], saved

    @staticmethod
    def final_state(work: List[SegmentWork], call: LinearCall, saved) -> torch.Tensor:
        """The state after the last token, P_J = Â_{J-1} P_{J-1} + Ŝ_{J-1}, folded by every rank
        from the same gathered summaries (bitwise identical everywhere; no communication)."""
        return saved[1]

    @staticmethod
    def backward(G: List[torch.Tensor], work: List[SegmentWork], call: LinearCall, saved, final_grad=None):
        """With ``final_grad`` (this rank's term of dL/dF), each rank's term rides as one more
        row of the same all-gather; D_J is their sum in rank order (identical on every rank)."""
        A_all = saved[0] if isinstance(saved, tuple) else saved
        rows = torch.stack(G if final_grad is None else [*G, final_grad])
        gathered = comm.all_gather(rows, call.group)  # [W, S_local (+1), B, H, K, V]
        tail = None
        if final_grad is not None:
            tail, gathered = gathered[:, -1].sum(0), gathered[:, :-1]
        G_all = _by_segment(gathered, call.layout)
        nxt = fold_backward(work[0].kind, G_all.to(A_all.dtype), A_all,
                            None if tail is None else tail.to(A_all.dtype))
        return [nxt[w.seg.index] for w in work]


def _doc_pieces(layout: Layout, rank: int, cu_seqlens) -> List[List[Tuple[slice, int]]]:
    """Per local segment, its tokens split at document boundaries: (local slice, global doc id).

    Only a segment's first and last piece can belong to a document that other segments also
    hold; pieces in between are whole documents. Without cu_seqlens the sequence is document 0.
    """
    cu = [0, layout.global_len] if cu_seqlens is None else list(cu_seqlens)  # host ints
    per_segment = []
    for seg in layout.local_segments(rank):
        a, b = seg.global_start, seg.global_start + seg.length
        bounds = [a] + [x for x in cu if a < x < b] + [b]
        first = bisect.bisect_right(cu, a) - 1
        per_segment.append([(slice(s - a + seg.local_start, e - a + seg.local_start), first + n)
                            for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])
    return per_segment


def _document_sums(partial: List[List[torch.Tensor]], pieces, group, digest: int) -> List[List[torch.Tensor]]:
    """Per-piece sums [B, H, K, V] -> per-piece sums over the piece's whole document.

    Every segment publishes two rows, its first and its last piece with their document ids
    (the second row is empty, id -1, when the segment is one piece), in ONE all-gather; a
    document's total is the sum of every published row with its id. Pieces strictly inside a
    segment are whole documents already. Every row carries the call's ``digest`` (``agreement``).
    """
    rows = []
    for seg_sums, seg_pieces in zip(partial, pieces):
        first, last = seg_sums[0], seg_sums[-1]
        last_id = seg_pieces[-1][1] if len(seg_pieces) > 1 else -1
        if len(seg_pieces) == 1:
            last = torch.zeros_like(last)
        for S, doc in ((first, seg_pieces[0][1]), (last, last_id)):
            rows.append(torch.cat([S.reshape(-1), S.new_full((1,), float(doc))]))
    gathered = comm.all_gather(agreement.stamp_rows(torch.stack(rows), digest), group)
    agreement.check_stamped(gathered, digest, "sp_linear_attention(causal=False)")
    width = agreement.digest_width(gathered.dtype)
    gathered = gathered.reshape(-1, gathered.shape[-1])[:, :-width]
    ids, sums = gathered[:, -1], gathered[:, :-1]
    out = []
    for seg_sums, seg_pieces in zip(partial, pieces):
        n_last = len(seg_pieces) - 1
        out.append([sums[ids == doc].sum(0).view_as(S) if n in (0, n_last) else S
                    for n, (S, (_, doc)) in enumerate(zip(seg_sums, seg_pieces))])
    return out


class BidirectionalLASP2Function(torch.autograd.Function):
    """Non-causal basic linear attention: o_i = scale * q_i S_doc(i), with S_d the sum of
    k^T v over document d, wherever its tokens live (one document without cu_seqlens).

    Communication: forward 1 all-gather of [W, 2 S, B*H*K*V + 1 + 8 bytes] (per segment: the sums
    of its first and last document pieces, with their ids and the call's agreement digest);
    backward 1 all-gather of the same size for
    G_d = scale * sum q^T dO. An all-reduce would do without documents; the gather keeps one
    code path (DESIGN §1).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, layout, group, cu_seqlens, digest):
        dt = compute_dtype(q.dtype)
        qf, kf, vf = (t.to(dt).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        pieces = _doc_pieces(layout, comm.rank_and_size(group)[0], cu_seqlens)
        partial = [[kf[:, :, sl].transpose(-1, -2) @ vf[:, :, sl] for sl, _ in seg] for seg in pieces]
        S = _document_sums(partial, pieces, group, digest)
        o = torch.empty(*qf.shape[:3], vf.shape[-1], dtype=dt, device=q.device)
        for seg, seg_S in zip(pieces, S):
            for (sl, _), S_d in zip(seg, seg_S):
                o[:, :, sl] = scale * qf[:, :, sl] @ S_d
        ctx.save_for_backward(qf, kf, vf)
        ctx.S, ctx.pieces, ctx.scale, ctx.group, ctx.dtypes = S, pieces, scale, group, (q.dtype, k.dtype, v.dtype)
        ctx.digest = digest
        return o.transpose(1, 2).to(q.dtype)

    @staticmethod
    @no_autocast
    def backward(ctx, do):
        qf, kf, vf = ctx.saved_tensors
        dof = do.to(qf.dtype).transpose(1, 2)
        partial = [[ctx.scale * qf[:, :, sl].transpose(-1, -2) @ dof[:, :, sl] for sl, _ in seg]
                   for seg in ctx.pieces]
        G = _document_sums(partial, ctx.pieces, ctx.group, ctx.digest)
        dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
        for seg, seg_S, seg_G in zip(ctx.pieces, ctx.S, G):
            for (sl, _), S_d, G_d in zip(seg, seg_S, seg_G):
                dq[:, :, sl] = ctx.scale * dof[:, :, sl] @ S_d.transpose(-1, -2)
                dk[:, :, sl] = vf[:, :, sl] @ G_d.transpose(-1, -2)
                dv[:, :, sl] = kf[:, :, sl] @ G_d
        grads = (t.transpose(1, 2).to(d) for t, d in zip((dq, dk, dv), ctx.dtypes))
        return (*grads, None, None, None, None, None)
