"""Chunked DeltaNet and Gated DeltaNet in pure PyTorch (DESIGN §1, the delta-rule rows).

Per batch element and head, rows q_s, k_s in R^K, v_s in R^V, state S in R^{K x V}:

    S_s = A_s S_{s-1} + beta_s k_s^T v_s        A_s = exp(g_s) (I - beta_s k_s^T k_s)
    o_s = scale * q_s S_s                        (g = 0 for DeltaNet)

Keys are used as given: nothing here normalises them (DeltaNet layers L2-normalise k before
calling; with unnormalised keys and beta |k|^2 > 2 the recurrence itself is unstable).

Shape legend: B batch, T tokens, H heads, K key dim, V value dim, C chunk size, N chunks (T
zero-padded to N * C). Inside this module tensors are chunked as ``[B, H, N, C, D]`` (the
layout of ``chunk.py``); beta and the scalar gate are ``[B, H, N, C]``. Pad tokens have
beta = 0, g = 0, k = v = 0: their transition is the identity and they write nothing.

The chunk form (the WY / UT-transform representation of a product of Householder-like
matrices: Bischof & Van Loan 1987, Joffrain et al. 2006; applied to DeltaNet by Yang et al.,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length", NeurIPS 2024,
and to Gated DeltaNet by Yang, Kautz & Hatamizadeh, ICLR 2025). Within one chunk with entry
state S_n, let Cs_i = sum_{t <= i} g_t (inclusive, in the chunk, log space) and write every
token's update as S_i = exp(g_i) S_{i-1} + k_i^T d_i with the "delta" row

    d_i = beta_i (v_i - k_i exp(g_i) S_{i-1}).

Unrolling exp(g_i) S_{i-1} = exp(Cs_i) S_n + sum_{j<i} exp(Cs_i - Cs_j) k_j^T d_j gives a unit
lower-triangular system for the C rows d:

    (I + L) d = beta*v - (beta*exp(Cs)*k) S_n,   L_ij = beta_i (k_i . k_j) exp(Cs_i - Cs_j), j < i
    => d = u - w S_n  with  u = T (beta*v),  w = T (beta*exp(Cs)*k),  T = (I + L)^{-1}

(T applied by one batched ``torch.linalg.solve_triangular`` per chunk, not a loop over tokens).
With A_ij = (q_i . k_j) exp(Cs_i - Cs_j) for j <= i and Kd_j = k_j exp(Cs_last - Cs_j):

    o        = A u + Q_eff S_n,           Q_eff = exp(Cs) * q - A w          (intra + inter)
    S_{n+1}  = M_n S_n + U_n,             M_n = exp(Cs_last) I - Kd^T w,  U_n = Kd^T u

Every exponent is "later minus earlier" of a non-increasing cumulative sum (<= 0) and pairs that
must not interact are masked in the exponent (-inf) before ``exp``: nothing overflows, nothing is
divided by a decay, gradients stay finite. Resets (g = -inf, or below ``chunk.reset_floor``) are
counted rather than summed, as in ``chunk.py``: a decay across one is exactly 0 (the limit
g -> -inf: within the chunk the reset acts like a document start with a zero initial state), and
its gradient is 0.

Documents (``starts``, masks from ``common.DocMasks``): a start token resets the state before
its own transition. L and A only couple tokens of one document, so T is block diagonal by
document. The exp(Cs) factor in w and Q_eff is taken relative to the token's *own document
entry* (exp(Cs_i - Cs_{s-1}) for a document starting at s inside the chunk; exp(Cs_i) for the
chunk's continuing document): then row i of w / Q_eff is the coefficient of *its document's*
entry state — S_n for the continuing document, the document's own initial state otherwise.
The parts that multiply S_n are these rows masked to the continuing document (``DocMasks.cont``);
a chunk containing a start has M_n = 0 exactly and U_n holds only its last document.

Per-document initial states (``cu_seqlens`` with ``initial_state`` [N, H, K, V]): document 0
continues from the segment entry (the scan's S_0); every later document's h0_d is injected, in
the chunk of its start only, through those same doc-relative rows: o += Q'_rows(d) h0_d and, if
d is still open at the chunk's end, U_n += M'_n h0_d (M'_n: the last document's transition from
its own entry to the chunk end). Later chunks see h0_d through the scanned state. This is exact,
vectorised over documents (one gathered chunk per document), and needs no split of the sequence.

Memory is linear in T: the largest tensors are [B, H, N, C, C] and N + 1 states [K, V] (plus
N + 1 matrices [K, K] for the entry transitions the sequence-parallel layer uses). Gradients come
from autograd (``solve_triangular`` has an exact backward), except the sequential scan over
chunks, which has a hand-written backward like ``chunk._StateScan``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from .common import (ChunkedShape, DocMasks, causal_pair, compute_dtype, doc_positions, from_chunks,
                     segment_starts, to_chunks)
from .chunk import at, before, decay_between, split_resets
from .precision import no_autocast
from .transition import Kind, classify

DEFAULT_DELTA_CHUNK = 64
DEFAULT_KDA_CHUNK = 16  # per-channel gates form [C, C, K] decays per chunk (as chunk.py's diagonal kind)


def default_delta_chunk(kind: Kind) -> int:
    """The chunk length of ``kind``: 64 for the scalar-gated delta rule, 16 for KDA."""
    return DEFAULT_KDA_CHUNK if kind.gate == "channel" else DEFAULT_DELTA_CHUNK


@dataclass
class DeltaChunked(ChunkedShape):
    """One segment prepared for the delta-rule chunk form. q is pre-multiplied by ``scale``.

    q, k [B, H, N, C, K]; v [B, H, N, C, V]; beta [B, H, N, C]; g, Cs None | [B, H, N, C, Kg]
    (Kg = 1 for a scalar gate, K per channel (KDA); Cs the inclusive within-chunk cumsum of g);
    Cd None | [B, H, N, C, Kg] = Cs relative to the token's document entry (Cs_i - Cs_{s-1};
    equal to Cs on the chunk's continuing document);
    docs None | DocMasks; T the unpadded length. The UT-transform results shared by every piece:
    w [B, H, N, C, K] = T (beta exp(Cd) k), u [B, H, N, C, V] = T (beta v), and
    A [B, H, N, C, C] = sum_c q_ic k_jc exp(Cs_ic - Cs_jc) on j <= i of one document.
    entry None | [B, H, N, C, Kg] = exp(Cd), 0 where a reset lies between the document entry and
    the token; R, resets None | int64 [B, H, N, C, Kg]: reset counts and indicators
    (``chunk.split_resets``; resets are 0 in g and Cs).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor
    g: Optional[torch.Tensor]
    Cs: Optional[torch.Tensor]
    Cd: Optional[torch.Tensor]
    docs: Optional[DocMasks]
    T: int
    w: torch.Tensor
    u: torch.Tensor
    A: torch.Tensor
    entry: Optional[torch.Tensor] = None
    R: Optional[torch.Tensor] = None
    resets: Optional[torch.Tensor] = None


def prepare_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: torch.Tensor,
    scale: float,
    starts: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    kind: Optional[Kind] = None,
) -> DeltaChunked:
    """Chunk one segment and apply the UT transform (the work every later piece shares).

    q, k [B, T, H, K]; v [B, T, H, V]; g None | [B, T, H] | [B, T, H, K] (log space, <= 0; the
    per-channel gate is KDA, ``kind`` channel_matrix); beta [B, T, H];
    starts None | bool [T] (document starts; meaningful per document with B == 1).
    kind: ``transition.classify(g, beta)``, computed here when not given.
    Computes in fp32 (fp64 for fp64 inputs).
    """
    kind = classify(g, beta) if kind is None else kind
    dt = compute_dtype(q.dtype)
    C, T = int(chunk_size or default_delta_chunk(kind)), q.shape[1]
    qc, kc, vc = to_chunks(q, C, dt) * scale, to_chunks(k, C, dt), to_chunks(v, C, dt)
    bc = to_chunks(beta.unsqueeze(-1), C, dt)[..., 0]  # [B, H, N, C]; zero on pad tokens
    docs = DocMasks.maybe(starts, C)
    pair = docs.pair if docs is not None else causal_pair(C, qc.device)

    gc = Cs = Cd = R = resets = None
    if g is None:
        # [N, C, C]: 1 on same-document causal pairs; None without documents (a plain tril)
        decay = None if docs is None else pair.to(dt)[..., None]
        entry = None  # exp(Cd) == 1
    else:
        gc, R, resets = split_resets(to_chunks(kind.gate_channels(g), C, dt), 3)  # [B, H, N, C, Kg]
        Cs = gc.cumsum(3)
        c0 = SimpleNamespace(Cs=Cs, R=R, g=gc, resets=resets)  # what chunk.at / chunk.before read
        if docs is None:
            Cd, entry = Cs, decay_between(at(c0, ...), None, None)
        else:
            # Index of the first token of each token's document within the chunk (0 for the
            # continuing document): the first True of its row of the pair mask. Cs - g at that
            # token is Cs just before the document; gathering by index (not a cummin over
            # values) keeps the gradient right when gates are exactly 0.
            first = pair.to(torch.uint8).argmax(-1)  # [N, C]; argmax returns the first maximum
            base = tuple(None if x is None else x.gather(3, first[..., None].expand_as(Cs)) for x in before(c0))
            Cd = Cs - base[0]
            entry = decay_between(at(c0, ...), base, None)
        decay = decay_between(at(c0, (..., slice(None), None, slice(None))),
                              at(c0, (..., None, slice(None), slice(None))), pair[..., None])  # [B, H, N, C, C, Kg]

    # The UT system (I + L) X = [beta exp(Cd) k | beta v], both right-hand sides in one solve.
    # L is strictly lower triangular; unitriangular=True supplies the unit diagonal.
    L = _decayed_scores(kc, kc, decay).tril(-1) * bc[..., :, None]
    bk = kc * (bc[..., None] if entry is None else bc[..., None] * entry)
    X = torch.linalg.solve_triangular(L, torch.cat([bk, vc * bc[..., None]], dim=-1),
                                      upper=False, unitriangular=True)
    w, u = X.split([kc.shape[-1], vc.shape[-1]], dim=-1)
    A = _decayed_scores(qc, kc, decay)
    if decay is None:
        A = A.tril()
    return DeltaChunked(qc, kc, vc, bc, gc, Cs, Cd, docs, T, w, u, A, entry, R, resets)


def _decayed_scores(a: torch.Tensor, b: torch.Tensor, decay: Optional[torch.Tensor]) -> torch.Tensor:
    """S_ij = sum_c a_ic b_jc decay_ijc, [B, H, N, C, C], for a, b [B, H, N, C, K] and decay None
    (all ones) | [B, H, N, C, C, Kg]. A scalar gate (Kg = 1) factors out of the dot product (one
    matmul); a per-channel gate does not without dividing by a decay, so its [C, C, K] product is
    formed explicitly, exponent masked before exp (as ``chunk.intra_outputs``)."""
    scores = None if decay is not None and decay.shape[-1] != 1 else a @ b.transpose(-1, -2)
    if decay is None:
        return scores
    if scores is not None:
        return scores * decay[..., 0]
    return torch.einsum("...ic,...jc,...ijc->...ij", a, b, decay)


def delta_intra_outputs(c: DeltaChunked) -> torch.Tensor:
    """Outputs with a zero state entering every chunk: A u, [B, H, N, C, V]. Needs no state."""
    return c.A @ c.u


def _doc_query(c: DeltaChunked) -> torch.Tensor:
    """Q' = exp(Cd) * q - A w: row i is the coefficient of its own document's entry state."""
    entry_q = c.q if c.entry is None else c.q * c.entry
    return entry_q - c.A @ c.w


def delta_inter_query(c: DeltaChunked, doc_query: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Q_eff [B, H, N, C, K]: the chunk's outputs given entry state S_n are intra + Q_eff @ S_n.

    Q_eff = exp(Cs) * q - A w on the chunk's continuing document, 0 on tokens after a document
    start (the entry state does not reach them). ``doc_query``: a precomputed ``_doc_query(c)``.
    """
    Qp = _doc_query(c) if doc_query is None else doc_query
    return Qp if c.docs is None else Qp * c.docs.cont[..., None].to(Qp.dtype)


def _doc_transitions(c: DeltaChunked) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M', U): M'_n = Diag(exp(Cd_last)) - Kd^T w maps the entry state of the chunk's *last*
    document to the chunk end (= M_n when the chunk has no start); U_n = Kd^T u."""
    Kdim = c.k.shape[-1]
    last = None if c.docs is None else c.docs.last  # [N, C]
    if c.Cs is None:
        kd = c.k if last is None else c.k * last[..., None].to(c.k.dtype)
        entry_last = None
    else:
        kd = c.k * decay_between(at(c, (..., slice(-1, None), slice(None))), at(c, ...),
                                 None if last is None else last[..., None])
        entry_last = c.entry[..., -1:, :]  # [B, H, N, 1, Kg]
    kdT = kd.transpose(-1, -2)
    eye = torch.eye(Kdim, dtype=c.k.dtype, device=c.k.device)
    diag = eye if entry_last is None else entry_last * eye  # Diag(exp(Cd_last)): column j scaled, j's own decay
    return diag - kdT @ c.w, kdT @ c.u


def delta_chunk_transitions(c: DeltaChunked) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk summaries (M [B, H, N, K, K], U [B, H, N, K, V]): the state leaving chunk n
    is M_n S_n + U_n. M_n is the product of the chunk's token transitions, exactly 0 for a chunk
    that holds a document start; U_n then holds only the chunk's last document."""
    Mp, U = _doc_transitions(c)
    return _mask_reset(c, Mp), U


def _mask_reset(c: DeltaChunked, Mp: torch.Tensor) -> torch.Tensor:
    if c.docs is None:
        return Mp
    return Mp * c.docs.chunk_cont[:, None, None].to(Mp.dtype)


class _MatrixStateScan(torch.autograd.Function):
    """S_0 = S0, S_{n+1} = M_n S_n + U_n. Returns all N + 1 states [B, H, N+1, K, V].

    The adjoint runs the recurrence backwards: lam_N = dS_N, lam_n = dS_n + M_n^T lam_{n+1};
    dU_n = lam_{n+1}; dM_n = lam_{n+1} S_n^T (one batched matmul after the loop); dS0 = lam_0.
    """

    @staticmethod
    def forward(ctx, M: torch.Tensor, U: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
        N = U.shape[2]
        S = U.new_empty(U.shape[0], U.shape[1], N + 1, *U.shape[3:])
        S[:, :, 0] = S0
        for n in range(N):
            S[:, :, n + 1] = torch.baddbmm(U[:, :, n].flatten(0, 1), M[:, :, n].flatten(0, 1),
                                           S[:, :, n].flatten(0, 1)).view_as(S0)
        ctx.save_for_backward(M, S)
        return S

    @staticmethod
    @no_autocast
    def backward(ctx, dS: torch.Tensor):
        M, S = ctx.saved_tensors
        N = M.shape[2]
        dS = dS.contiguous()
        dU = torch.empty_like(dS[:, :, 1:])
        lam = dS[:, :, N]
        for n in range(N - 1, -1, -1):
            dU[:, :, n] = lam
            lam = torch.baddbmm(dS[:, :, n].flatten(0, 1), M[:, :, n].flatten(0, 1).transpose(-1, -2),
                                lam.flatten(0, 1)).view_as(lam)
        dM = dU @ S[:, :, :-1].transpose(-1, -2) if ctx.needs_input_grad[0] else None
        return dM, dU, lam


def scan_matrix_states(M: torch.Tensor, U: torch.Tensor, S0: Optional[torch.Tensor]) -> torch.Tensor:
    """All chunk-boundary states [B, H, N+1, K, V]: S_{n+1} = M_n S_n + U_n, S_0 = S0 (zero if
    None). M [B, H, N, K, K]; U [B, H, N, K, V]; S0 [B, H, K, V]."""
    S0 = U.new_zeros(U.shape[0], U.shape[1], *U.shape[3:]) if S0 is None else S0.to(U.dtype)
    return _MatrixStateScan.apply(M.contiguous(), U.contiguous(), S0.expand(U.shape[0], -1, -1, -1).contiguous())


def delta_entry_transitions(c: DeltaChunked, M: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Λ [B, H, N + 1, K, K]: transition from the segment start to each chunk entry
    (Λ_0 = I, Λ_{n+1} = M_n Λ_n); Λ_N is the segment's transition Â. Exactly 0 from the first
    chunk holding a document start on. The entry states for incoming state P are
    S_in(0) + Λ P. ``M``: the M of ``delta_chunk_transitions(c)`` if already computed."""
    if M is None:
        M = delta_chunk_transitions(c)[0]
    B, H, _, K, _ = M.shape
    eye = torch.eye(K, dtype=M.dtype, device=M.device).expand(B, H, K, K)
    return scan_matrix_states(M, torch.zeros_like(M), eye)


def delta_segment_summary(M: torch.Tensor, U: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Â [B, H, K, K], Ŝ [B, H, K, V]) of a whole segment from its chunk summaries M
    [B, H, N, K, K], U [B, H, N, K, V]: Â = M_{N-1} ... M_0 and Ŝ the state leaving it from a
    zero entry state. A pairwise tree of the summary composition (M2, U2) o (M1, U1) =
    (M2 M1, M2 U1 + U2) (DESIGN §1): log2 N rounds of batched [K, K] x [K, K] and [K, K] x [K, V]
    matmuls, N K^2 (K + V) multiply-adds in all, instead of a sequential scan of K x K products over the
    chunks. Without graph (the strategies use both only as values)."""
    with torch.no_grad():
        B, H = M.shape[:2]
        M, U = M.flatten(0, 1), U.flatten(0, 1)  # [BH, N, ...]: 4-d matmuls (5-d ones run slower on CPU)
        while M.shape[1] > 1:
            n = M.shape[1] // 2 * 2
            Mp, Up = M[:, :n].unflatten(1, (n // 2, 2)), U[:, :n].unflatten(1, (n // 2, 2))  # (earlier, later)
            later = Mp[:, :, 1]
            M2, U2 = later @ Mp[:, :, 0], (later @ Up[:, :, 0]).add_(Up[:, :, 1])
            if n < M.shape[1]:  # an odd last chunk waits for the next round
                M2, U2 = torch.cat([M2, M[:, n:]], 1), torch.cat([U2, U[:, n:]], 1)
            M, U = M2, U2
        return M[:, 0].unflatten(0, (B, H)), U[:, 0].unflatten(0, (B, H))


def delta_entry_adjoint(M: torch.Tensor, dS: torch.Tensor) -> torch.Tensor:
    """G = sum_n Λ_n^T dS_n [B, H, K, V] (Λ_n = M_{n-1} ... M_0, the segment start -> chunk n
    entry), without forming Λ: the adjoint recurrence lam_n = dS_n + M_n^T lam_{n+1} over the
    chunks, G = lam_0. M [B, H, N, K, K]; dS [B, H, N, K, V] (the entry states' gradients)."""
    N = dS.shape[2]
    lam = dS[:, :, N - 1]
    for n in range(N - 2, -1, -1):
        lam = torch.baddbmm(dS[:, :, n].flatten(0, 1), M[:, :, n].flatten(0, 1).transpose(-1, -2),
                            lam.flatten(0, 1)).view_as(lam)
    return lam


def inject_doc_states(c: DeltaChunked, o: torch.Tensor, U: torch.Tensor, Mp: torch.Tensor,
                      Qp: torch.Tensor, cu_seqlens: torch.Tensor, h0: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Add each document's initial state h0 [Nd, H, K, V] at its start (B == 1, documents whose
    start is a marked start token, i.e. not the segment's continuing document).

    In the start's chunk n: o_i += Q'_i h0_d for the document's tokens; if d is the chunk's last
    document, U_n += M'_n h0_d. Mp = M' and Qp = Q' of the chunk form. Returns (o, U)."""
    n, col, _, _ = doc_positions(cu_seqlens, c.C)
    h0 = h0.to(U.dtype).transpose(0, 1).unsqueeze(0)  # [1, H, Nd, K, V]
    same = c.docs.pair[n, :, col]  # [Nd, C]: token i is in document d, at or after its start
    o = o.index_add(2, n, (Qp[:, :, n] * same[..., None].to(Qp.dtype)) @ h0)
    open_at_end = c.docs.last[n, col].to(Mp.dtype)[None, None, :, None, None]  # [1, 1, Nd, 1, 1]
    U = U.index_add(2, n, (Mp[:, :, n] * open_at_end) @ h0)
    return o, U


def doc_final_states(c: DeltaChunked, S_in: torch.Tensor, cu_seqlens: torch.Tensor,
                     h0: Optional[torch.Tensor]) -> torch.Tensor:
    """State after the last token of every document: [Nd, H, K, V] (B == 1).

    For document d ending at e in chunk m, with E its entry state in that chunk (S_in[m] when d
    continues into chunk m, else its own h0_d, zero when none):
    ht_d = Kd^T u + (exp(Cd_e) I - Kd^T w) E, Kd_j = k_j exp(Cs_e - Cs_j) over j <= e in d.
    """
    _, _, m, col = doc_positions(cu_seqlens, c.C)
    if c.docs is not None:
        pair, cont = c.docs.pair[m, col], c.docs.cont[m, col]  # [Nd, C], [Nd]
    else:
        pair = torch.arange(c.C, device=col.device)[None, :] <= col[:, None]
        cont = torch.ones_like(col, dtype=torch.bool)
    k_d = c.k[:, :, m]  # [1, H, Nd, C, K]
    eye = torch.eye(c.k.shape[-1], dtype=c.k.dtype, device=c.k.device)
    if c.Cs is None:
        kd = k_d * pair[..., None].to(k_d.dtype)
        diag = eye
    else:
        idx = col.view(1, 1, -1, 1, 1).expand(*k_d.shape[:3], 1, c.Cs.shape[-1])
        at_m = at(c, (slice(None), slice(None), m))  # [1, H, Nd, C, Kg]
        at_e = tuple(None if x is None else x.gather(3, idx) for x in at_m)  # [1, H, Nd, 1, Kg]
        kd = k_d * decay_between(at_e, at_m, pair[..., None])
        diag = c.entry[:, :, m].gather(3, idx) * eye  # [1, H, Nd, K, K]: Diag(exp(Cd_e))
    kdT = kd.transpose(-1, -2)
    ht = kdT @ c.u[:, :, m]
    S_m = S_in[:, :, m]  # [1, H, Nd, K, V]
    if h0 is None:
        E = S_m * cont[None, None, :, None, None].to(S_m.dtype)
    else:
        h0c = h0.to(S_m.dtype).transpose(0, 1).unsqueeze(0)
        E = torch.where(cont[None, None, :, None, None], S_m, h0c)
    ht = ht + (diag - kdT @ c.w[:, :, m]) @ E
    return ht[0].transpose(0, 1)  # [Nd, H, K, V]


def delta_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    *,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    kind: Optional[Kind] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal DeltaNet (g None), Gated DeltaNet (g [B, T, H]) and KDA (g [B, T, H, K]), chunk
    form. Inputs assumed validated; keys are used as given (not normalised).

    q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H] in [0, 2] (required); kind
    ``transition.classify(g, beta)`` when known; chunk_size None: ``default_delta_chunk(kind)``;
    initial_state None | [B, H, K, V] | [N, H, K, V] with cu_seqlens [N + 1] (B == 1).
    Returns o [B, T, H, V] in q's dtype and the final state(s) [B or N, H, K, V] (fp32; fp64
    for fp64 inputs), or None. Accumulates in fp32 for half-precision inputs.
    """
    if beta is None:
        raise ValueError("delta_linear_attention needs beta [B, T, H]; use chunk_linear_attention without it")
    T = q.shape[1]
    starts = segment_starts(cu_seqlens, T, q.device)
    c = prepare_delta(q, k, v, g, beta, scale, starts, chunk_size, kind)
    Mp, U = _doc_transitions(c)
    M = _mask_reset(c, Mp)
    Qp = _doc_query(c)
    o = delta_intra_outputs(c)
    S0 = initial_state
    if cu_seqlens is not None and initial_state is not None:
        S0 = initial_state[:1]
        if initial_state.shape[0] > 1:
            o, U = inject_doc_states(c, o, U, Mp, Qp, cu_seqlens[1:], initial_state[1:])
    S = scan_matrix_states(M, U, S0)
    o = o + delta_inter_query(c, Qp) @ S[:, :, :-1]
    o = from_chunks(o, T).to(q.dtype)
    if not output_final_state:
        return o, None
    if cu_seqlens is None:
        return o, S[:, :, -1]
    return o, doc_final_states(c, S[:, :, :-1], cu_seqlens, initial_state)
