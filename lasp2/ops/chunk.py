"""Chunked linear attention for the decay-vector kinds of transition, in pure PyTorch.

Kinds (``transition``): identity (no gate), scalar (constant decay and scalar gate,
g [B, T, H]), diagonal (per-channel gate, g [B, T, H, K]). The delta rule (the matrix kind) is in
``delta.py``.

Shape legend: B batch, T tokens, H heads, K key dim, V value dim, C chunk size, N chunks
(after zero-padding T up to N * C). Inside this module tensors are chunked as
``[B, H, N, C, D]``; gates keep a trailing dim ``Kg`` that is 1 (scalar gate) or K (per channel).

The algorithm (DESIGN §1, the right-product chunk form). Within chunk n, with
Cs_i = sum_{t <= i in the chunk} g_t (inclusive, log space, <= 0):

    intra   o_i += scale * sum_{j <= i} (q_i . k_j exp(Cs_i - Cs_j)) v_j      (a C x C matmul)
    inter   o_i += scale * (q_i * exp(Cs_i)) S_n                            (S_n enters chunk n)
    state   S_{n+1} = exp(Cs_last) * S_n + sum_j (k_j * exp(Cs_last - Cs_j))^T v_j

Every exponent is a difference "later minus earlier" of a non-increasing cumulative sum, so it
is <= 0: nothing can overflow and nothing is ever divided by a decay. Pairs that must not
interact are masked *in the exponent* (-inf) before ``exp``, which also keeps gradients finite.

Resets (``g = -inf``, or any gate whose decay exp(g) is below the compute dtype's smallest
normal number: g < -87.3 in fp32, < -708.4 in fp64; see ``reset_floor``). A cumulative sum
through such a gate would be -inf and a difference of two of them NaN (-inf - -inf), so these
gates never enter the sums: they are replaced by 0 and counted instead (R, the inclusive count
of resets in the chunk up to each token, per channel). A decay "later minus earlier" is then
exactly 0 whenever a reset lies between the two points (their counts differ), and exp of the
finite difference otherwise. That is the limit g -> -inf of every term, so outputs, states and
gradients match the per-token recurrence (``naive.py``, where exp(-inf) = 0) and g = -800.
Gradient at a reset: exactly 0. Every path through the gate carries the factor exp(g_s), whose
derivative exp(g_s) is 0 at -inf (and below the dtype's smallest normal above the floor, so 0
is also what the recurrence computes there); the other gates' gradients are unchanged.

Documents (``starts``): a token that starts a document resets the state (A = 0). Pairs across
documents are masked, the state entering a chunk reaches only the tokens before the chunk's first
start, and a chunk containing a start passes on only its last document. A document's own initial
state is injected at its start token (``doc_initial``).

Memory is linear in T: the largest tensors are [B, H, N, C, C] (scalar gates) or
[B, H, N, C, C, K] with a smaller C (per-channel gates), and N + 1 states of [K, V].
Gradients come from autograd through these ops, except the sequential state scan, which has a
hand-written backward (one loop over chunks each way, no per-step autograd nodes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import chunk_recurrent
from .common import (ChunkedShape, DocMasks, causal_pair, compute_dtype, doc_positions, from_chunks,
                     masked_exp, segment_starts, to_chunks)
from .precision import no_autocast
from .transition import DIAGONAL, IDENTITY, SCALAR, Kind, classify

DEFAULT_CHUNK = 64
DEFAULT_CHUNK_PER_CHANNEL = 16  # the per-channel intra term is [C, C, K] per chunk: keep C small


def default_chunk_size(K: int, V: int, per_channel: bool = False) -> int:
    """The chunk length C for head dims K, V: the intra-chunk [C, C] scores cost C per token and
    the states K x V per chunk, so C tracks the head size between 16 and 64 (small heads would
    otherwise spend most memory and time on [64, 64] score blocks: 4x the memory at K = V = 16).
    Per-channel gates form [C, C, K] per chunk and always use 16."""
    if per_channel:
        return DEFAULT_CHUNK_PER_CHANNEL
    return max(16, min(DEFAULT_CHUNK, 1 << (max(K, V) - 1).bit_length()))


def reset_floor(dtype: torch.dtype) -> float:
    """Gates below this are exact resets (decay 0): exp(g) would be below the smallest normal
    number of ``dtype`` (the compute dtype: fp32 or fp64)."""
    return math.log(torch.finfo(dtype).tiny)


def split_resets(gc: torch.Tensor, dim: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Chunked gates -> (gates with every reset replaced by 0, R, resets): R the inclusive count
    of resets along ``dim`` (the tokens of a chunk), ``resets`` 1 at a reset (both int64, same
    shape as gc); both None when there is no reset (the common case: nothing extra is formed)."""
    reset = gc < reset_floor(gc.dtype)
    if not bool(reset.any()):
        return gc, None, None
    reset = reset.long()
    return gc.masked_fill(reset.bool(), 0.0), reset.cumsum(dim), reset


Point = Tuple[torch.Tensor, Optional[torch.Tensor]]  # (Cs, R) at some tokens


def before(c) -> Point:
    """(Cs, R) just before every token: Cs_{i-1} = Cs_i - g_i, R_{i-1} = R_i - reset_i. ``c`` is a
    ``Chunked`` or a ``delta.DeltaChunked`` with gates (anything with Cs, R, g, resets)."""
    return c.Cs - c.g, (None if c.R is None else c.R - c.resets)


def decay_between(later: Point, earlier: Optional[Point], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """exp(Cs_later - Cs_earlier) where ``mask`` (None: everywhere) and no reset lies between the
    two points (equal reset counts); exactly 0 elsewhere, finite gradients. ``earlier`` None is
    the chunk entry (Cs = 0, R = 0). Shapes broadcast."""
    Cs_l, R_l = later
    x = Cs_l if earlier is None else Cs_l - earlier[0]
    if R_l is not None:
        same = R_l == (0 if earlier is None else earlier[1])
        mask = same if mask is None else mask & same
    return masked_exp(x, mask)


def at(c, index) -> Point:
    """(Cs[index], R[index]) of ``c`` (R None without resets)."""
    return c.Cs[index], (None if c.R is None else c.R[index])


@dataclass
class Chunked(ChunkedShape):
    """One segment prepared for the chunk form. q is pre-multiplied by ``scale``.

    q, k [B, H, N, C, K]; v [B, H, N, C, V]; g, Cs None | [B, H, N, C, Kg] (Cs = inclusive
    within-chunk cumsum of g); docs None | DocMasks; T the unpadded length; kind the transition
    (``ops.transition``: identity, scalar or diagonal).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: Optional[torch.Tensor]
    Cs: Optional[torch.Tensor]
    docs: Optional[DocMasks]
    T: int
    R: Optional[torch.Tensor] = None
    resets: Optional[torch.Tensor] = None
    kind: Kind = IDENTITY


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    scale: float,
    starts: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    kind: Optional[Kind] = None,
) -> Chunked:
    """Chunk the inputs of one segment (the tokens one rank or one device holds).

    q, k [B, T, H, K]; v [B, T, H, V]; g None | [B, T, H] | [B, T, H, K] (log space);
    starts None | bool [T] (document starts; needs B == 1 to be meaningful per document);
    kind: ``transition.classify(g, None)``, computed here when not given.
    """
    kind = classify(g, None) if kind is None else kind
    dt = compute_dtype(q.dtype)
    if chunk_size is None:
        chunk_size = default_chunk_size(q.shape[-1], v.shape[-1], per_channel=kind is DIAGONAL)
    C = chunk_size
    T = q.shape[1]
    gc = Cs = R = resets = None
    if g is not None:
        gc, R, resets = split_resets(to_chunks(kind.gate_channels(g), C, dt), 3)
        Cs = gc.cumsum(3)
    docs = DocMasks.maybe(starts, C)
    return Chunked(to_chunks(q, C, dt) * scale, to_chunks(k, C, dt), to_chunks(v, C, dt), gc, Cs, docs, T,
                   R, resets, kind)


def intra_outputs(c: Chunked) -> torch.Tensor:
    """The intra-chunk term: [B, H, N, C, V]. Needs no state: the bulk of the work."""
    if c.kind is DIAGONAL and chunk_recurrent.applies(c):  # small V: C K V per chunk, not C^2 K
        return chunk_recurrent.intra_outputs(c)
    C = c.C
    if c.docs is not None:
        mask = c.docs.pair  # [N, C, C]
    else:
        mask = causal_pair(C, c.q.device)
    if c.Cs is None:
        A = (c.q @ c.k.transpose(-1, -2)).masked_fill(~mask, 0.0)
    elif c.kind is SCALAR:
        decay = decay_between(at(c, (..., slice(None), None, 0)), at(c, (..., None, slice(None), 0)), mask)
        A = (c.q @ c.k.transpose(-1, -2)) * decay
    else:
        # Per-channel gates do not factor into one matmul without dividing by a decay, so the
        # [C, C, K] decay tensor is formed explicitly, exponent masked before exp.
        decay = decay_between(at(c, (..., slice(None), None, slice(None))),
                              at(c, (..., None, slice(None), slice(None))), mask[..., None])  # [B, H, N, C, C, K]
        A = (c.q[..., :, None, :] * c.k[..., None, :, :] * decay).sum(-1)
    return A @ c.v


def chunk_transitions(c: Chunked) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Per-chunk summaries: transition a [B, H, N, Kg, 1] (None without gates and documents)
    and zero-state contribution U [B, H, N, K, V]; the state leaving chunk n is a_n * S_n + U_n.
    """
    last_mask = None if c.docs is None else c.docs.last[..., None]  # [N, C, 1]
    if c.Cs is None:
        k_w = c.k if last_mask is None else c.k * last_mask
        a = None
        if c.docs is not None:
            a = c.docs.chunk_cont.to(c.k.dtype)[None, None, :, None, None].expand(*c.k.shape[:3], 1, 1)
    else:
        last = at(c, (..., slice(-1, None), slice(None)))  # [B, H, N, 1, Kg]
        k_w = c.k * decay_between(last, at(c, ...), last_mask)
        a = decay_between(last, None, None).transpose(-1, -2)  # [B, H, N, Kg, 1]
        if c.docs is not None:
            a = a * c.docs.chunk_cont[:, None, None].to(a.dtype)
    return a, k_w.transpose(-1, -2) @ c.v


class _StateScan(torch.autograd.Function):
    """S_0 = S0, S_{n+1} = a_n * S_n + U_n for n < N. Returns all N + 1 states [B, H, N+1, K, V].

    A hand-written backward keeps the sequential loop cheap: autograd through N small steps
    would record 2N nodes. The adjoint runs the same recurrence backwards:
    lam_N = dS_N, lam_n = dS_n + a_n * lam_{n+1}; dU_n = lam_{n+1}; da_n = <lam_{n+1}, S_n>.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, U: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
        N = U.shape[2]
        S = U.new_empty(U.shape[0], U.shape[1], N + 1, *U.shape[3:])
        S[:, :, 0] = S0
        for n in range(N):
            torch.addcmul(U[:, :, n], a[:, :, n], S[:, :, n], out=S[:, :, n + 1])
        ctx.save_for_backward(a, S)
        return S

    @staticmethod
    @no_autocast
    def backward(ctx, dS: torch.Tensor):
        a, S = ctx.saved_tensors
        N = a.shape[2]
        dU = torch.empty_like(dS[:, :, 1:])
        lam = dS[:, :, N]
        for n in range(N - 1, -1, -1):
            dU[:, :, n] = lam
            lam = torch.addcmul(dS[:, :, n], a[:, :, n], lam)
        da = (dU * S[:, :, :-1]).sum(-1, keepdim=True)
        if a.shape[-2] == 1:
            da = da.sum(-2, keepdim=True)
        return da, dU, lam


def scan_states(a: Optional[torch.Tensor], U: torch.Tensor, S0: Optional[torch.Tensor]) -> torch.Tensor:
    """All chunk-boundary states [B, H, N+1, K, V]; S0 [B, H, K, V] or None (zero)."""
    S0 = U.new_zeros(U.shape[0], U.shape[1], *U.shape[3:]) if S0 is None else S0.to(U.dtype)
    if a is None:  # no decay and no resets: a prefix sum
        return torch.cat([S0.unsqueeze(2), S0.unsqueeze(2) + U.cumsum(2)], dim=2)
    return _StateScan.apply(a, U, S0)


def inter_query(c: Chunked) -> torch.Tensor:
    """q_i * exp(Cs_i), zero for tokens the chunk's entry state does not reach: [B, H, N, C, K]."""
    cont = None if c.docs is None else c.docs.cont[..., None]
    if c.Cs is None:
        return c.q if cont is None else c.q * cont
    return c.q * decay_between(at(c, ...), None, cont)


def inter_outputs(c: Chunked, S_in: torch.Tensor) -> torch.Tensor:
    """The inter-chunk term from the states entering each chunk, S_in [B, H, N, K, V]."""
    return inter_query(c) @ S_in


def entry_decays(c: Chunked) -> torch.Tensor:
    """Transition from the segment start to each chunk start, as decay vectors
    Λ [B, H, N + 1, Kg] (Kg = 1 without gates); Λ_N is the segment's transition Â.

    The state entering the segment, P, reaches chunk n's entry as Λ_n * P, so the entry states
    of the segment are S_in(zero incoming) + Λ * P (DESIGN §1: the output is linear in P).
    Λ_n is exactly 0 once a document start precedes chunk n (masked in log space).
    """
    B, H, N = c.q.shape[:3]
    reach = None
    if c.Cs is None:
        log_decay = c.q.new_zeros(B, H, N + 1, 1)
    else:
        chunk_total = c.Cs[..., -1, :]  # [B, H, N, Kg]
        log_decay = torch.cat([chunk_total.new_zeros(B, H, 1, chunk_total.shape[-1]),
                               chunk_total.cumsum(2)], dim=2)
        if c.R is not None:  # no reset in any chunk before n
            clear = (c.R[..., -1, :] == 0).long().cumprod(2).bool()
            reach = torch.cat([clear.new_ones(B, H, 1, clear.shape[-1]), clear], dim=2)
    if c.docs is not None:
        doc_reach = torch.cat([c.docs.chunk_cont.new_ones(1), c.docs.chunk_cont.cumprod(0).bool()])[:, None]
        reach = doc_reach if reach is None else reach & doc_reach
    return log_decay.exp() if reach is None else masked_exp(log_decay, reach)


def inject_doc_states(c: Chunked, o: torch.Tensor, U: torch.Tensor, cu_seqlens: torch.Tensor,
                      h0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Add each document's initial state h0 [Nd, H, K, V] at its start (B == 1).

    Token i of document d in the start's chunk gets q_i exp(Cs_i - Cs_{s-1}) h0_d; if d is still
    open at the chunk's end, the chunk's state contribution gets exp(Cs_last - Cs_{s-1}) h0_d.
    Later chunks see h0_d through the scanned state. Returns updated (o, U).
    """
    n, col, _, _ = doc_positions(cu_seqlens, c.C)
    h0 = h0.to(U.dtype).unsqueeze(0)  # [1, Nd, H, K, V]
    h0 = h0.transpose(1, 2)  # [1, H, Nd, K, V]
    q_d = c.q[:, :, n]  # [1, H, Nd, C, K]
    docs = c.docs
    same = docs.pair[n, :, col]  # [Nd, C]: token i is in the document and at or after its start
    if c.Cs is None:
        w = same[..., None].to(q_d.dtype).expand(*q_d.shape[:3], c.C, 1)
    else:
        before_start = _gather_point(before(c), n, col)  # Cs_{s-1}, R_{s-1} at the start token
        w = decay_between(at(c, (slice(None), slice(None), n)), before_start, same[..., None])
    o = o.index_add(2, n, (q_d * w) @ h0)
    if c.Cs is None:
        w_last = w[..., -1:, :].transpose(-1, -2)  # [1, H, Nd, 1, 1]
    else:
        w_last = w[..., -1, :].unsqueeze(-1)  # [1, H, Nd, Kg, 1]
    U = U.index_add(2, n, w_last * h0)
    return o, U


def doc_final_states(c: Chunked, S_in: torch.Tensor, cu_seqlens: torch.Tensor,
                     h0: Optional[torch.Tensor]) -> torch.Tensor:
    """State at the last token of every document: [Nd, H, K, V] (B == 1).

    S_in [1, H, N, K, V] are the scanned states entering each chunk. Document 0 is the
    segment's continuing document and reaches its end through S_in; documents 1.. that start
    and end inside one chunk never pass their injected h0 (``h0[d]``) through S_in, so it is
    added here.
    """
    n_s, col_s, m, col = doc_positions(cu_seqlens, c.C)
    if c.docs is not None:
        pair, cont = c.docs.pair[m, col], c.docs.cont[m, col]  # [Nd, C], [Nd]
    else:
        pair = torch.arange(c.C, device=col.device)[None, :] <= col[:, None]
        cont = torch.ones_like(col, dtype=torch.bool)
    k_d, v_d = c.k[:, :, m], c.v[:, :, m]  # [1, H, Nd, C, K/V]
    if c.Cs is None:
        w = pair[..., None].to(k_d.dtype)
        carry = cont.to(k_d.dtype)[None, None, :, None, None]
    else:
        at_end = _gather_point(at(c, ...), m, col)  # [1, H, Nd, 1, Kg]
        w = decay_between(at_end, at(c, (slice(None), slice(None), m)), pair[..., None])
        carry = decay_between(at_end, None, None).transpose(-1, -2) * cont[None, None, :, None, None]
    ht = (k_d * w).transpose(-1, -2) @ v_d + carry * S_in[:, :, m]
    same_chunk = (n_s == m) & (torch.arange(len(m), device=m.device) > 0)
    if h0 is not None and bool(same_chunk.any()):
        h0c = h0.to(ht.dtype).transpose(0, 1).unsqueeze(0)  # [1, H, Nd, K, V]
        if c.Cs is None:
            w0 = same_chunk.to(ht.dtype)[None, None, :, None, None]
        else:
            w0 = decay_between(at_end, _gather_point(before(c), m, col_s), None).transpose(-1, -2)
            w0 = w0 * same_chunk[None, None, :, None, None]
        ht = ht + w0 * h0c
    return ht[0].transpose(0, 1)  # [Nd, H, K, V]


def _gather_point(p: Point, n: torch.Tensor, col: torch.Tensor) -> Point:
    """(Cs, R) [B, H, N, C, Kg] at token col[d] of chunk n[d]: [B, H, Nd, 1, Kg] each."""
    return tuple(None if x is None else _gather_col(x[:, :, n], col) for x in p)


def _gather_col(x: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """x [B, H, Nd, C, Kg], col [Nd] -> x[:, :, d, col[d]] as [B, H, Nd, 1, Kg]."""
    idx = col.view(1, 1, -1, 1, 1).expand(*x.shape[:3], 1, x.shape[-1])
    return x.gather(3, idx)


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    *,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    kind: Optional[Kind] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention, decay-vector kinds (identity, scalar, diagonal), chunk form.
    Inputs assumed validated.

    q, k [B, T, H, K]; v [B, T, H, V]; g None | [B, T, H] | [B, T, H, K]; kind
    ``transition.classify(g, None)`` when known;
    initial_state None | [B, H, K, V] | [N, H, K, V] with cu_seqlens [N + 1] (B == 1).
    Returns o [B, T, H, V] in q's dtype and the final state(s) (fp32; fp64 for fp64 inputs).
    """
    T = q.shape[1]
    starts = segment_starts(cu_seqlens, T, q.device)
    c = prepare(q, k, v, g, scale, starts, chunk_size, kind)
    a, U = chunk_transitions(c)
    o = intra_outputs(c)
    S0 = initial_state
    if cu_seqlens is not None and initial_state is not None:
        S0 = initial_state[:1]
        if initial_state.shape[0] > 1:
            # Documents 1.. get their own initial states injected at their starts.
            o, U = inject_doc_states(c, o, U, cu_seqlens[1:], initial_state[1:])
    S = scan_states(a, U, S0)
    o = o + inter_outputs(c, S[:, :, :-1])
    o = from_chunks(o, T).to(q.dtype)
    if not output_final_state:
        return o, None
    if cu_seqlens is None:
        return o, S[:, :, -1]
    return o, doc_final_states(c, S[:, :, :-1], cu_seqlens, initial_state)


def bidirectional_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Non-causal basic linear attention: o_i = scale * q_i (sum_{j in doc(i)} k_j^T v_j).

    q, k [B, T, H, K]; v [B, T, H, V]; returns [B, T, H, V] in q's dtype. Sums in fp32 (fp64
    for fp64 inputs). With documents, one [K, V] sum per document (a loop over documents).
    """
    dt = compute_dtype(q.dtype)
    q, k, v, out_dtype = q.to(dt) * scale, k.to(dt), v.to(dt), q.dtype
    if cu_seqlens is None:
        return (q.transpose(1, 2) @ (k.transpose(1, 2).transpose(-1, -2) @ v.transpose(1, 2))
                ).transpose(1, 2).to(out_dtype)
    bounds = cu_seqlens.tolist()
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[:, a:b].transpose(1, 2) for x in (q, k, v))  # [B, H, Td, D]
        pieces.append((qd @ (kd.transpose(-1, -2) @ vd)).transpose(1, 2))
    return torch.cat(pieces, dim=1).to(out_dtype)
