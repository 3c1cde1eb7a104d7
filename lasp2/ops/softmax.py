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

Mask (``attention_mask.AttentionMask``, one frozen value: causal, q_pos, k_pos, q_doc,
k_doc): key j is visible to query i iff ``k_pos[j] <= q_pos[i]`` (when ``causal``) and
``k_doc[j] == q_doc[i]`` (when document ids are given). Positions need not be sorted or
contiguous (zigzag shards, permuted key sets). A query with no visible key outputs 0 and has
lse = -inf; nothing produces NaN, forward or backward.

Precision: fp16/bf16 inputs are computed in fp32 (scores, softmax statistics, accumulators),
fp32 in fp32, fp64 in fp64. Outputs are cast back to the input dtypes; lse stays in the
compute dtype because callers merge partial results with it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .attention_mask import MASKED, SKIP, AttentionMask
from .common import compute_dtype, default_scale
from .precision import no_autocast

__all__ = [
    "AttentionMask",
    "attention_reference",
    "attention_block_fwd",
    "attention_block_bwd",
    "merge_attention",
    "BlockwiseAttention",
    "attention_blockwise",
    "doc_ids_from_cu_seqlens",
]

_NEG_INF = float("-inf")

# ----------------------------------------------------------------------------- helpers


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


class _Tiles:
    """What the blockwise forward and backward share: heads split for GQA, q scaled, the mask
    with positions resolved, and the plan of [block, block] tiles."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[AttentionMask],
                 scale: Optional[float], block_size: int):
        self.b, self.tq, h, d = q.shape
        self.tk, self.hkv = k.shape[1], k.shape[2]
        if h % self.hkv or k.shape[0] != self.b or v.shape[:2] != k.shape[:2]:
            raise ValueError(f"softmax attention needs q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] "
                             f"with H % Hkv == 0; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        self.g, self.ct = h // self.hkv, compute_dtype(q.dtype)
        self.scale = default_scale(scale, d)
        self.mask = (mask or AttentionMask()).resolved(self.tq, self.tk, q.device)
        self.bs = int(block_size)
        # Fold the scale into q once instead of scaling every score tile.
        # Not in place: _split_heads may return a view of the caller's q (fp32, Hkv == 1).
        self.qh = _split_heads(q, self.hkv, self.ct) * self.scale  # [B, Hkv, Tq, G, D]
        self.kh = k.to(self.ct).permute(0, 2, 1, 3).contiguous()  # [B, Hkv, Tk, D]
        self.vh = v.to(self.ct).permute(0, 2, 1, 3).contiguous()  # [B, Hkv, Tk, Dv]

    def query_blocks(self):
        """(q0, q1, that row of the plan) for every query block."""
        for i, row in enumerate(self.mask.plan(self.bs)):
            yield i * self.bs, min((i + 1) * self.bs, self.tq), row

    def key_blocks(self, row):
        """(k0, k1, code) for every key block of a plan row that is not skipped."""
        for j, code in enumerate(row):
            if code != SKIP:
                yield j * self.bs, min((j + 1) * self.bs, self.tk), code

    def scores(self, qb: Tensor, q0: int, q1: int, k0: int, k1: int, code: int) -> Tensor:
        """The masked score tile [B, Hkv, n G, bk] of query rows qb (masked entries -inf)."""
        s = torch.matmul(qb, self.kh[:, :, k0:k1].transpose(-1, -2))
        if code == MASKED:
            allowed = self.mask.tile(slice(q0, q1), slice(k0, k1))
            n, bk = q1 - q0, k1 - k0
            s = s.view(self.b, self.hkv, n, self.g, bk).masked_fill_(~allowed[:, None, :], _NEG_INF)
            s = s.view(self.b, self.hkv, n * self.g, bk)
        return s


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
    ct = compute_dtype(q.dtype)
    scale = default_scale(scale, d)
    mask = AttentionMask(causal, q_pos, k_pos, q_doc, k_doc).resolved(tq, tk, q.device)

    # GQA the obvious way: repeat every kv head for the G query heads that read it.
    kf = k.to(ct).repeat_interleave(h // hkv, dim=2)
    vf = v.to(ct).repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.to(ct), kf) * scale
    allowed = mask.visible()
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
    mask: Optional[AttentionMask] = None,
    *,
    scale: Optional[float] = None,
    block_size: int = 256,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """Blockwise forward with online softmax; never holds more than one [block, block] score
    tile per (B, H).

    Args:
        q: [B, Tq, H, D]; k: [B, Tk, Hkv, D]; v: [B, Tk, Hkv, Dv].
        mask: which keys each query sees (``AttentionMask``); None: causal, positions arange.
        scale: default D ** -0.5.  block_size: rows of a query block and of a key block.
        out_dtype: dtype of o, default q's dtype. Callers that merge several partial results
            (ring attention) can ask for fp32 to keep the accumulator exact.

    Returns:
        o [B, Tq, H, Dv] (out_dtype) and lse [B, H, Tq] (fp32, fp64 for fp64 inputs; -inf on
        rows with no visible key, whose o is 0). Not differentiable by itself; see
        ``BlockwiseAttention``.
    """
    t = _Tiles(q, k, v, mask, scale, block_size)
    b, hkv, g, dv = t.b, t.hkv, t.g, v.shape[3]
    o = t.qh.new_zeros(b, hkv, t.tq, g, dv)
    lse = t.qh.new_full((b, hkv, t.tq, g), _NEG_INF)

    for q0, q1, row in t.query_blocks():
        n = q1 - q0
        qb = t.qh[:, :, q0:q1].reshape(b, hkv, n * g, -1)  # a view: (t, g) rows are adjacent
        m = t.qh.new_full((b, hkv, n * g), _NEG_INF)  # running max of the scores
        l = t.qh.new_zeros(b, hkv, n * g)  # running sum of exp(s - m)
        acc = t.qh.new_zeros(b, hkv, n * g, dv)  # running sum of exp(s - m) v
        for k0, k1, code in t.key_blocks(row):
            s = t.scores(qb, q0, q1, k0, k1, code)  # [B, Hkv, n*G, bk]
            m_new = torch.maximum(m, s.amax(dim=-1))
            # A row that has seen only masked keys keeps m = -inf; shifting by 0 there makes
            # exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
            m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            p = s.sub_(m_safe.unsqueeze(-1)).exp_()
            alpha = torch.exp(m - m_safe)  # rescales the old statistics to the new max
            l = l.mul_(alpha).add_(p.sum(dim=-1))
            acc = acc.mul_(alpha.unsqueeze(-1)).add_(torch.matmul(p, t.vh[:, :, k0:k1]))
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
    mask: Optional[AttentionMask] = None,
    *,
    scale: Optional[float] = None,
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
        mask, scale, block_size: as in the forward.
        delta: optional [B, H, Tq] = rowsum(dO * O) in the compute dtype (fp32, fp64 for fp64),
            precomputed by a caller that runs this on several key blocks. A gradient ``dlse``
            of lse can be folded in as ``delta - dlse``.

    Returns:
        dq [B, Tq, H, D] (q's dtype), dk [B, Tk, Hkv, D] (k's dtype), dv [B, Tk, Hkv, Dv]
        (v's dtype); dk and dv are summed over the G query heads of each kv head.
    """
    t = _Tiles(q, k, v, mask, scale, block_size)
    b, hkv, g, ct = t.b, t.hkv, t.g, t.ct
    d, dv_ = q.shape[3], v.shape[3]
    if delta is None:
        # delta_i = sum_e dO_ie O_ie = sum_j P_ij dP_ij: the softmax Jacobian's row term.
        delta = (do.to(ct) * o.to(ct)).sum(dim=-1).transpose(1, 2)  # [B, H, Tq]
    delta_h = _lse_to_internal(delta.to(ct), hkv).contiguous()  # [B, Hkv, Tq, G]
    # Rows with lse = -inf have no visible key; subtracting +inf sends every score (finite or
    # -inf) to -inf, so P = 0 there instead of exp(+inf) or NaN.
    lse_h = _lse_to_internal(lse.to(ct), hkv)
    lse_h = lse_h.masked_fill(lse_h == _NEG_INF, float("inf")).contiguous()

    doh = _split_heads(do, hkv, ct)  # [B, Hkv, Tq, G, Dv]; t.qh is the scaled q: dK = dS^T qh
    dqh = torch.zeros_like(t.qh)
    dkh = torch.zeros_like(t.kh)
    dvh = torch.zeros_like(t.vh)

    for q0, q1, row in t.query_blocks():
        n = q1 - q0
        qb = t.qh[:, :, q0:q1].reshape(b, hkv, n * g, d)
        dob = doh[:, :, q0:q1].reshape(b, hkv, n * g, dv_)
        lse_b = lse_h[:, :, q0:q1].reshape(b, hkv, n * g, 1)
        delta_b = delta_h[:, :, q0:q1].reshape(b, hkv, n * g, 1)
        dqb = dqh[:, :, q0:q1].view(b, hkv, n * g, d)  # accumulate in place into dqh
        for k0, k1, code in t.key_blocks(row):
            kb, vb = t.kh[:, :, k0:k1], t.vh[:, :, k0:k1]
            p = t.scores(qb, q0, q1, k0, k1, code).sub_(lse_b).exp_()  # this tile's final softmax
            # The G query heads of a group are rows of p, so these matmuls also sum over G.
            dvh[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), dob)
            dp = torch.matmul(dob, vb.transpose(-1, -2))
            ds = dp.sub_(delta_b).mul_(p)  # dS = P * (dP - delta); 0 where masked (P = 0)
            dqb += torch.matmul(ds, kb)
            dkh[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb)

    dq = _merge_heads(dqh.mul_(t.scale)).to(q.dtype)
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
    ct = torch.promote_types(compute_dtype(out_dtype), compute_dtype(lse_dtype))
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

    ``apply(q, k, v, mask, scale, block_size) -> (o, lse)`` with shapes and dtypes as in
    ``attention_block_fwd`` (``mask`` an ``AttentionMask`` or None). Saves q, k, v, o, lse (the
    mask holds only small position / document vectors), so memory stays linear in T. Gradients
    flow to q, k, v from both o and lse (a gradient of lse enters as ``delta - dlse``); the
    other inputs get None.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, block_size):
        o, lse = attention_block_fwd(q, k, v, mask, scale=scale, block_size=block_size)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale, ctx.block_size = mask, scale, block_size
        # Unused outputs (often lse) arrive as None instead of zero tensors.
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    @no_autocast
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return (None,) * 6
        ct = compute_dtype(q.dtype)
        if do is None:
            do = torch.zeros_like(o)
            delta = torch.zeros_like(lse)
        else:
            delta = (do.to(ct) * o.to(ct)).sum(dim=-1).transpose(1, 2)
        if dlse is not None:
            # d lse_i / d s_ij = P_ij, so dS gains P * dlse: the same as lowering delta.
            delta = delta - torch.nan_to_num(dlse.to(ct), nan=0.0, posinf=0.0, neginf=0.0)
        dq, dk, dv = attention_block_bwd(do, q, k, v, None, lse, ctx.mask, scale=ctx.scale,
                                         block_size=ctx.block_size, delta=delta)
        return dq, dk, dv, None, None, None


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
    mask = AttentionMask(causal, q_pos, k_pos, q_doc, k_doc)
    o, lse = BlockwiseAttention.apply(q, k, v, mask, default_scale(scale, q.shape[-1]), block_size)
    return (o, lse) if return_lse else o
