"""Single-device softmax attention with position / document masks (no torch.distributed).

This module is the softmax half of ``lasp2.ops``: a readable oracle, a blockwise
(flash-attention style) forward and backward in pure PyTorch, the log-sum-exp merge of two
partial results, and a thin ``torch.autograd.Function``. The sequence-parallel strategies
(all-gather LASP-2H, ring, Ulysses) call these functions on a *shard* of queries against
gathered or rotating *blocks* of keys, so masks are never "the upper triangle of a square":
they are given by the **global positions** and **document ids** of the queries and keys.

Shape legend (fla layout, ``[batch, time, heads, dim]``)::

    B    batch size
    Tq   number of queries (e.g. this rank's shard)      Tk  number of keys
    H    query heads                                     Hkv key/value heads, H % Hkv == 0
    G    = H // Hkv, query heads per kv head (GQA: query head h reads kv head h // G)
    D    query/key head dim                              Dv  value head dim

    q      [B, Tq, H, D]        k  [B, Tk, Hkv, D]        v  [B, Tk, Hkv, Dv]
    o      [B, Tq, H, Dv]       dtype of q
    lse    [B, H, Tq]           natural-log sum_j exp(s_ij) over the allowed keys; fp32
                                (fp64 when the inputs are fp64); -inf for a row with no key
    q_pos  [Tq] int64           global position of each query (default arange(Tq))
    k_pos  [Tk] int64           global position of each key   (default arange(Tk))
    q_doc  [Tq] int64           document id of each query (default None: one document)
    k_doc  [Tk] int64           document id of each key   (given together with q_doc)

Mask: key j is visible to query i iff ``k_pos[j] <= q_pos[i]`` (when ``causal``) and
``k_doc[j] == q_doc[i]`` (when document ids are given). Positions need not be sorted or
contiguous (zigzag shards, permuted key sets). A query with no visible key outputs 0 and has
lse = -inf; nothing produces NaN, forward or backward.

Precision: fp16/bf16 inputs are computed in fp32 (scores, softmax statistics, accumulators),
fp32 in fp32, fp64 in fp64. Outputs are cast back to the input dtypes; lse stays in the
compute dtype because callers merge partial results with it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from .precision import no_autocast

__all__ = [
    "attention_reference",
    "attention_block_fwd",
    "attention_block_bwd",
    "merge_attention",
    "BlockwiseAttention",
    "attention_blockwise",
    "doc_ids_from_cu_seqlens",
]

_NEG_INF = float("-inf")

# Codes of the per-(query block, key block) plan.
_SKIP, _FULL, _MASKED = 0, 1, 2


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, fp16, bf16) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _default_scale(scale: Optional[float], d: int) -> float:
    return d ** -0.5 if scale is None else float(scale)


def _default_pos(pos: Optional[Tensor], n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device, dtype=torch.int64) if pos is None else pos


def doc_ids_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Document id of every token of a packed sequence.

    Args:
        cu_seqlens: [N + 1] int, cumulative document lengths (starts at 0, ends at ``total``).
        total: number of tokens.

    Returns:
        [total] int64 on ``cu_seqlens.device``: token t belongs to document i when
        ``cu_seqlens[i] <= t < cu_seqlens[i + 1]``. Empty documents (repeated boundaries) get
        no token; ``right=True`` makes a token at a repeated boundary land in the last,
        non-empty document that starts there.
    """
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total, device=cu.device, dtype=torch.int64)
    return torch.searchsorted(cu, tokens, right=True) - 1


def _visible(
    q_pos: Tensor, k_pos: Tensor, q_doc: Optional[Tensor], k_doc: Optional[Tensor], causal: bool
) -> Optional[Tensor]:
    """[Tq, Tk] bool mask of visible keys, or None when every key is visible."""
    allowed = None
    if causal:
        allowed = k_pos[None, :] <= q_pos[:, None]
    if q_doc is not None:
        same = q_doc[:, None] == k_doc[None, :]
        allowed = same if allowed is None else allowed & same
    return allowed


def _block_min_max(x: Tensor, bs: int) -> List[Tuple[int, int]]:
    """(min, max) of each length-``bs`` block of a 1-D int tensor, with a single host sync."""
    n = x.numel()
    if n == 0:
        return []
    nb = -(-n // bs)
    pad = nb * bs - n
    # Pad by repeating the last element: it does not change any block's min or max.
    xp = torch.cat([x, x[-1:].expand(pad)]) if pad else x
    xp = xp.view(nb, bs)
    return [tuple(r) for r in torch.stack([xp.amin(1), xp.amax(1)], 1).tolist()]


def _block_plan(
    q_pos: Tensor,
    k_pos: Tensor,
    q_doc: Optional[Tensor],
    k_doc: Optional[Tensor],
    causal: bool,
    bs: int,
) -> List[List[int]]:
    """For each (query block, key block): _SKIP, _FULL (no mask needed) or _MASKED.

    Decided from block min/max only (conservative: a block is skipped or declared fully
    visible only when that is certain), so it costs O(T / bs) host work and never looks at
    [Tq, Tk].
    """
    qp, kp = _block_min_max(q_pos, bs), _block_min_max(k_pos, bs)
    qd = _block_min_max(q_doc, bs) if q_doc is not None else None
    kd = _block_min_max(k_doc, bs) if k_doc is not None else None
    plan = []
    for i, (qp_lo, qp_hi) in enumerate(qp):
        row = []
        for j, (kp_lo, kp_hi) in enumerate(kp):
            hidden, full = False, True
            if causal:
                hidden = kp_lo > qp_hi  # every key is after every query
                full = kp_hi <= qp_lo  # every key is at or before every query
            if qd is not None:
                (qd_lo, qd_hi), (kd_lo, kd_hi) = qd[i], kd[j]
                hidden = hidden or kd_hi < qd_lo or kd_lo > qd_hi  # document ranges disjoint
                full = full and qd_lo == qd_hi == kd_lo == kd_hi  # all in one document
            row.append(_SKIP if hidden else (_FULL if full else _MASKED))
        plan.append(row)
    return plan


def _split_heads(q: Tensor, hkv: int, ct: torch.dtype) -> Tensor:
    """[B, T, H, D] -> [B, Hkv, T, G, D] contiguous in dtype ``ct``.

    Rows (t, g) of one kv head are then adjacent, so a query block ``[:, :, t0:t1]`` reshapes
    to ``[B, Hkv, (t1 - t0) * G, D]`` without a copy and one batched matmul against the kv
    head's keys serves all G query heads of the group (no repeat of k/v for GQA).
    """
    b, t, h, d = q.shape
    return q.to(ct).view(b, t, hkv, h // hkv, d).permute(0, 2, 1, 3, 4).contiguous()


def _merge_heads(x: Tensor) -> Tensor:
    """[B, Hkv, T, G, D] -> [B, T, H, D] (inverse of _split_heads' layout)."""
    b, hkv, t, g, d = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b, t, hkv * g, d)


def _lse_to_internal(lse: Tensor, hkv: int) -> Tensor:
    """[B, H, Tq] -> [B, Hkv, Tq, G] (head h = hkv * G + g)."""
    b, h, t = lse.shape
    return lse.view(b, hkv, h // hkv, t).transpose(2, 3)


def _lse_to_public(lse: Tensor) -> Tensor:
    """[B, Hkv, Tq, G] -> [B, H, Tq]."""
    b, hkv, t, g = lse.shape
    return lse.transpose(2, 3).reshape(b, hkv * g, t)


# ----------------------------------------------------------------------------- reference


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    q_pos: Optional[Tensor] = None,
    k_pos: Optional[Tensor] = None,
    q_doc: Optional[Tensor] = None,
    k_doc: Optional[Tensor] = None,
) -> Tensor:
    """Plain masked softmax attention: the readable oracle (materialises [B, H, Tq, Tk]).

    Args:
        q: [B, Tq, H, D]; k: [B, Tk, Hkv, D]; v: [B, Tk, Hkv, Dv]; any float dtype.
        scale: score scale, default D ** -0.5.
        causal, q_pos, k_pos, q_doc, k_doc: the mask, see the module docstring.

    Returns:
        o [B, Tq, H, Dv] in q's dtype, computed in fp32 (fp64 for fp64). Differentiable with
        autograd, and free of NaN for rows with no visible key (their output is 0).
    """
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    ct = _compute_dtype(q.dtype)
    scale = _default_scale(scale, d)
    q_pos = _default_pos(q_pos, tq, q.device)
    k_pos = _default_pos(k_pos, tk, q.device)

    # GQA the obvious way: repeat every kv head for the G query heads that read it.
    kf = k.to(ct).repeat_interleave(h // hkv, dim=2)
    vf = v.to(ct).repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.to(ct), kf) * scale
    allowed = _visible(q_pos, k_pos, q_doc, k_doc, causal)
    if allowed is not None:
        s = s.masked_fill(~allowed, _NEG_INF)
    # Softmax by hand so that an all-masked row gives 0 instead of 0/0: the max shift is a
    # constant (detached) used only for stability, and replaced by 0 on empty rows.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.einsum("bhij,bjhe->bihe", p, vf)
    return o.to(q.dtype)


# ----------------------------------------------------------------------------- blockwise


def attention_block_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    q_pos: Optional[Tensor] = None,
    k_pos: Optional[Tensor] = None,
    q_doc: Optional[Tensor] = None,
    k_doc: Optional[Tensor] = None,
    block_size: int = 256,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """Blockwise forward with online softmax; never holds more than one [block, block] score
    tile per (B, H).

    Args:
        q: [B, Tq, H, D]; k: [B, Tk, Hkv, D]; v: [B, Tk, Hkv, Dv].
        scale: default D ** -0.5.  causal, q_pos, k_pos, q_doc, k_doc: the mask (module doc).
        block_size: rows of a query block and of a key block.
        out_dtype: dtype of o, default q's dtype. Callers that merge several partial results
            (ring attention) can ask for fp32 to keep the accumulator exact.

    Returns:
        o [B, Tq, H, Dv] (out_dtype) and lse [B, H, Tq] (fp32, fp64 for fp64 inputs; -inf on
        rows with no visible key, whose o is 0). Not differentiable by itself; see
        ``BlockwiseAttention``.
    """
    b, tq, h, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    assert h % hkv == 0 and k.shape[0] == v.shape[0] == b and v.shape[1] == tk
    assert (q_doc is None) == (k_doc is None), "give document ids for both queries and keys"
    g = h // hkv
    ct = _compute_dtype(q.dtype)
    scale = _default_scale(scale, d)
    q_pos = _default_pos(q_pos, tq, q.device)
    k_pos = _default_pos(k_pos, tk, q.device)
    bs = int(block_size)

    # Fold the scale into q once instead of scaling every score tile.
    # Not in place: _split_heads may return a view of the caller's q (fp32, Hkv == 1).
    qh = _split_heads(q, hkv, ct) * scale  # [B, Hkv, Tq, G, D]
    kh = k.to(ct).permute(0, 2, 1, 3).contiguous()  # [B, Hkv, Tk, D]
    vh = v.to(ct).permute(0, 2, 1, 3).contiguous()  # [B, Hkv, Tk, Dv]
    o = qh.new_zeros(b, hkv, tq, g, dv)
    lse = qh.new_full((b, hkv, tq, g), _NEG_INF)
    plan = _block_plan(q_pos, k_pos, q_doc, k_doc, causal, bs)

    for i, row in enumerate(plan):
        q0, q1 = i * bs, min((i + 1) * bs, tq)
        n = q1 - q0
        qb = qh[:, :, q0:q1].reshape(b, hkv, n * g, d)  # a view: (t, g) rows are adjacent
        m = qh.new_full((b, hkv, n * g), _NEG_INF)  # running max of the scores
        l = qh.new_zeros(b, hkv, n * g)  # running sum of exp(s - m)
        acc = qh.new_zeros(b, hkv, n * g, dv)  # running sum of exp(s - m) v
        for j, code in enumerate(row):
            if code == _SKIP:
                continue
            k0, k1 = j * bs, min((j + 1) * bs, tk)
            s = torch.matmul(qb, kh[:, :, k0:k1].transpose(-1, -2))  # [B, Hkv, n*G, bk]
            if code == _MASKED:
                allowed = _visible(
                    q_pos[q0:q1], k_pos[k0:k1],
                    None if q_doc is None else q_doc[q0:q1],
                    None if k_doc is None else k_doc[k0:k1], causal,
                )
                s = s.view(b, hkv, n, g, k1 - k0).masked_fill_(~allowed[:, None, :], _NEG_INF)
                s = s.view(b, hkv, n * g, k1 - k0)
            m_new = torch.maximum(m, s.amax(dim=-1))
            # A row that has seen only masked keys keeps m = -inf; shifting by 0 there makes
            # exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
            m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            p = s.sub_(m_safe.unsqueeze(-1)).exp_()
            alpha = torch.exp(m - m_safe)  # rescales the old statistics to the new max
            l = l.mul_(alpha).add_(p.sum(dim=-1))
            acc = acc.mul_(alpha.unsqueeze(-1)).add_(torch.matmul(p, vh[:, :, k0:k1]))
            m = m_new
        # Rows with l == 0 saw no visible key: o = 0 (acc is 0 there) and lse = log 0 = -inf.
        nonempty = l > 0
        acc = acc / torch.where(nonempty, l, torch.ones_like(l)).unsqueeze(-1)
        o[:, :, q0:q1] = acc.view(b, hkv, n, g, dv)
        m_safe = m.masked_fill(~nonempty, 0.0)
        lse[:, :, q0:q1] = (m_safe + torch.log(l)).view(b, hkv, n, g)

    o = _merge_heads(o).to(out_dtype if out_dtype is not None else q.dtype)
    return o, _lse_to_public(lse)


def attention_block_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Optional[Tensor],
    lse: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    q_pos: Optional[Tensor] = None,
    k_pos: Optional[Tensor] = None,
    q_doc: Optional[Tensor] = None,
    k_doc: Optional[Tensor] = None,
    block_size: int = 256,
    delta: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Blockwise (flash-attention style) backward; recomputes P = exp(S - lse) per tile.

    ``o`` and ``lse`` are those of the *whole* attention the gradient belongs to, and k, v may
    be any subset of its keys: the result is then that subset's contribution (dq summed over
    a partition of the keys gives the full dq; dk, dv are exactly the subset's gradients).
    This is what ring attention needs, given the final merged o and lse.

    Args:
        do: [B, Tq, H, Dv], gradient of o.
        q: [B, Tq, H, D]; k: [B, Tk, Hkv, D]; v: [B, Tk, Hkv, Dv].
        o: [B, Tq, H, Dv], the forward output; only used to form delta, may be None when
            ``delta`` is given.
        lse: [B, H, Tq], the forward log-sum-exp (-inf on rows with no visible key).
        scale, causal, q_pos, k_pos, q_doc, k_doc, block_size: as in the forward.
        delta: optional [B, H, Tq] = rowsum(dO * O) in the compute dtype (fp32, fp64 for fp64),
            precomputed by a caller that runs this on several key blocks. A gradient ``dlse``
            of lse can be folded in as ``delta - dlse``.

    Returns:
        dq [B, Tq, H, D] (q's dtype), dk [B, Tk, Hkv, D] (k's dtype), dv [B, Tk, Hkv, Dv]
        (v's dtype); dk and dv are summed over the G query heads of each kv head.
    """
    b, tq, h, d = q.shape
    tk, hkv, dv_ = k.shape[1], k.shape[2], v.shape[3]
    assert h % hkv == 0 and (q_doc is None) == (k_doc is None)
    g = h // hkv
    ct = _compute_dtype(q.dtype)
    scale = _default_scale(scale, d)
    q_pos = _default_pos(q_pos, tq, q.device)
    k_pos = _default_pos(k_pos, tk, q.device)
    bs = int(block_size)

    if delta is None:
        # delta_i = sum_e dO_ie O_ie = sum_j P_ij dP_ij: the softmax Jacobian's row term.
        delta = (do.to(ct) * o.to(ct)).sum(dim=-1).transpose(1, 2)  # [B, H, Tq]
    delta_h = _lse_to_internal(delta.to(ct), hkv).contiguous()  # [B, Hkv, Tq, G]
    # Rows with lse = -inf have no visible key; subtracting +inf sends every score (finite or
    # -inf) to -inf, so P = 0 there instead of exp(+inf) or NaN.
    lse_h = _lse_to_internal(lse.to(ct), hkv)
    lse_h = lse_h.masked_fill(lse_h == _NEG_INF, float("inf")).contiguous()

    qh = _split_heads(q, hkv, ct) * scale  # scaled q: S = qh k^T and dK = dS^T qh
    doh = _split_heads(do, hkv, ct)  # [B, Hkv, Tq, G, Dv]
    kh = k.to(ct).permute(0, 2, 1, 3).contiguous()
    vh = v.to(ct).permute(0, 2, 1, 3).contiguous()
    dqh = torch.zeros_like(qh)
    dkh = torch.zeros_like(kh)
    dvh = torch.zeros_like(vh)
    plan = _block_plan(q_pos, k_pos, q_doc, k_doc, causal, bs)

    for i, row in enumerate(plan):
        q0, q1 = i * bs, min((i + 1) * bs, tq)
        n = q1 - q0
        qb = qh[:, :, q0:q1].reshape(b, hkv, n * g, d)
        dob = doh[:, :, q0:q1].reshape(b, hkv, n * g, dv_)
        lse_b = lse_h[:, :, q0:q1].reshape(b, hkv, n * g, 1)
        delta_b = delta_h[:, :, q0:q1].reshape(b, hkv, n * g, 1)
        dqb = dqh[:, :, q0:q1].view(b, hkv, n * g, d)  # accumulate in place into dqh
        for j, code in enumerate(row):
            if code == _SKIP:
                continue
            k0, k1 = j * bs, min((j + 1) * bs, tk)
            kb, vb = kh[:, :, k0:k1], vh[:, :, k0:k1]
            s = torch.matmul(qb, kb.transpose(-1, -2))  # [B, Hkv, n*G, bk]
            if code == _MASKED:
                allowed = _visible(
                    q_pos[q0:q1], k_pos[k0:k1],
                    None if q_doc is None else q_doc[q0:q1],
                    None if k_doc is None else k_doc[k0:k1], causal,
                )
                s = s.view(b, hkv, n, g, k1 - k0).masked_fill_(~allowed[:, None, :], _NEG_INF)
                s = s.view(b, hkv, n * g, k1 - k0)
            p = s.sub_(lse_b).exp_()  # the final softmax probabilities of this tile
            # The G query heads of a group are rows of p, so these matmuls also sum over G.
            dvh[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), dob)
            dp = torch.matmul(dob, vb.transpose(-1, -2))
            ds = dp.sub_(delta_b).mul_(p)  # dS = P * (dP - delta); 0 where masked (P = 0)
            dqb += torch.matmul(ds, kb)
            dkh[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb)

    dq = _merge_heads(dqh.mul_(scale)).to(q.dtype)
    dk = dkh.permute(0, 2, 1, 3).to(k.dtype)
    dv = dvh.permute(0, 2, 1, 3).to(v.dtype)
    return dq, dk.contiguous(), dv.contiguous()


def merge_attention(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> Tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets (log-sum-exp merge).

    Args:
        o1, o2: [B, Tq, H, Dv] partial outputs (each normalised over its own keys).
        lse1, lse2: [B, H, Tq] their log-sum-exps; -inf marks a row with no key on that side.

    Returns:
        o [B, Tq, H, Dv] in the promoted dtype of o1 and o2, and lse [B, H, Tq] in the
        promoted dtype of lse1 and lse2. Computed in fp32 at least. A row that is -inf on both
        sides gives o = 0 and lse = -inf; autograd through this function is NaN-free too.
    """
    out_dtype = torch.promote_types(o1.dtype, o2.dtype)
    lse_dtype = torch.promote_types(lse1.dtype, lse2.dtype)
    ct = torch.promote_types(_compute_dtype(out_dtype), _compute_dtype(lse_dtype))
    lse1, lse2 = lse1.to(ct), lse2.to(ct)
    m = torch.maximum(lse1, lse2)
    m_safe = torch.where(m == _NEG_INF, torch.zeros_like(m), m)
    w1, w2 = torch.exp(lse1 - m_safe), torch.exp(lse2 - m_safe)  # 0 for a -inf side
    total = w1 + w2
    nonempty = total > 0
    total_safe = torch.where(nonempty, total, torch.ones_like(total))
    # The inner where keeps log's backward away from log(0) on fully masked rows.
    lse = torch.where(nonempty, m_safe + torch.log(total_safe), torch.full_like(m, _NEG_INF))
    # [B, H, Tq] -> [B, Tq, H, 1] weights.
    w1 = (w1 / total_safe).transpose(1, 2).unsqueeze(-1)
    w2 = (w2 / total_safe).transpose(1, 2).unsqueeze(-1)
    o = w1 * o1.to(ct) + w2 * o2.to(ct)
    return o.to(out_dtype), lse.to(lse_dtype)


# ----------------------------------------------------------------------------- autograd


class BlockwiseAttention(torch.autograd.Function):
    """Autograd wrapper of ``attention_block_fwd`` / ``attention_block_bwd``.

    ``apply(q, k, v, scale, causal, q_pos, k_pos, q_doc, k_doc, block_size) -> (o, lse)``
    with shapes and dtypes as in ``attention_block_fwd``. Saves q, k, v, o, lse (and the
    small position / document vectors), so memory stays linear in T. Gradients flow to q, k,
    v from both o and lse (a gradient of lse enters as ``delta - dlse``); the other inputs
    get None.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, q_pos, k_pos, q_doc, k_doc, block_size):
        o, lse = attention_block_fwd(
            q, k, v, scale=scale, causal=causal, q_pos=q_pos, k_pos=k_pos,
            q_doc=q_doc, k_doc=k_doc, block_size=block_size,
        )
        ctx.save_for_backward(q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc)
        ctx.scale, ctx.causal, ctx.block_size = scale, causal, block_size
        # Unused outputs (often lse) arrive as None instead of zero tensors.
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    @no_autocast
    def backward(ctx, do, dlse):
        q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc = ctx.saved_tensors
        if do is None and dlse is None:
            return (None,) * 10
        ct = _compute_dtype(q.dtype)
        if do is None:
            do = torch.zeros_like(o)
            delta = torch.zeros_like(lse)
        else:
            delta = (do.to(ct) * o.to(ct)).sum(dim=-1).transpose(1, 2)
        if dlse is not None:
            # d lse_i / d s_ij = P_ij, so dS gains P * dlse: the same as lowering delta.
            delta = delta - torch.nan_to_num(dlse.to(ct), nan=0.0, posinf=0.0, neginf=0.0)
        dq, dk, dv = attention_block_bwd(
            do, q, k, v, None, lse, scale=ctx.scale, causal=ctx.causal, q_pos=q_pos,
            k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, block_size=ctx.block_size, delta=delta,
        )
        return dq, dk, dv, None, None, None, None, None, None, None


def attention_blockwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    q_pos: Optional[Tensor] = None,
    k_pos: Optional[Tensor] = None,
    q_doc: Optional[Tensor] = None,
    k_doc: Optional[Tensor] = None,
    block_size: int = 256,
    return_lse: bool = False,
):
    """Memory-efficient softmax attention with autograd (the convenient entry point).

    Args:
        q: [B, Tq, H, D]; k: [B, Tk, Hkv, D]; v: [B, Tk, Hkv, Dv] (H % Hkv == 0).
        scale: default D ** -0.5.  causal, q_pos, k_pos, q_doc, k_doc: the mask (module doc).
        block_size: tile size of the blockwise kernels.
        return_lse: also return lse.

    Returns:
        o [B, Tq, H, Dv] in q's dtype, or (o, lse) with lse [B, H, Tq] fp32 (fp64 for fp64
        inputs). lse is differentiable as well (its gradient reaches q and k); rows with no
        visible key have o = 0, lse = -inf and zero gradients.
    """
    scale = _default_scale(scale, q.shape[-1])
    o, lse = BlockwiseAttention.apply(
        q, k, v, scale, causal, q_pos, k_pos, q_doc, k_doc, block_size
    )
    return (o, lse) if return_lse else o
