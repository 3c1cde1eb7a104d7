"""Tests of lasp2.ops.softmax: the oracle against a per-query loop, the blockwise forward and
backward against the oracle's autograd, the log-sum-exp merge, key-subset backward (what ring
attention relies on) and gradcheck."""


import pytest
import torch

from lasp2.ops.softmax import (
    AttentionMask,
    BlockwiseAttention,
    attention_block_bwd,
    attention_block_fwd,
    attention_blockwise,
    attention_reference,
    doc_ids_from_cu_seqlens,
    merge_attention,
)
from tests.helpers import FP64_TOL, assert_close, fp32_tol

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

CU = [0, 5, 17, 18, 50]  # documents of lengths 5, 12, 1, 32 over 50 tokens


def rel_err(a, b):
    """max|a - b| / max|b| (absolute error when b is all zero)."""
    a, b = a.double(), b.double()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    ref = b.abs().max().item() if b.numel() else 0.0
    return diff / ref if ref > 0 else diff


def make_qkv(b, tq, tk, h, hkv, d, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, tk, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, tk, hkv, dv, generator=gen, dtype=torch.float64)
    do = torch.randn(b, tq, h, dv, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, do)]


def scenario(name, causal):
    """Returns (tq, tk, mask kwargs) for a named mask scenario over a 50-token sequence."""
    t = 50
    ar = torch.arange(t)
    docs = doc_ids_from_cu_seqlens(torch.tensor(CU), t)
    if name == "full":  # Tq == Tk == 50, default positions
        return t, t, {}
    if name == "shard":  # queries are the shard [30, 50) of the sequence, keys all of it
        return 20, t, dict(q_pos=ar[30:], k_pos=ar)
    if name == "zigzag":  # queries are two non-adjacent segments, as in the zigzag layout
        qp = torch.cat([ar[10:20], ar[40:50]])
        return 20, t, dict(q_pos=qp, k_pos=ar)
    if name == "docs":  # packed documents, all queries
        return t, t, dict(q_doc=docs, k_doc=docs)
    if name == "empty_rows":
        # Keys: documents 1 and 3 only, shifted by 3 positions so that the first queries of a
        # document see nothing under the causal mask. Queries of documents 0 and 2 see no key.
        keep = (docs == 1) | (docs == 3)
        kp = ar[keep] + 3
        return t, int(keep.sum()), dict(q_pos=ar, k_pos=kp, q_doc=docs, k_doc=docs[keep])
    raise ValueError(name)


# ----------------------------------------------------------------------------- oracle


def loop_attention(q, k, v, scale, causal, q_pos, k_pos, q_doc, k_doc):
    """Per-query definition in fp64: softmax over the visible keys, 0 when there are none."""
    b, tq, h, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    o = torch.zeros(b, tq, h, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // hkv)
            for i in range(tq):
                keys = [
                    j for j in range(tk)
                    if (not causal or k_pos[j] <= q_pos[i])
                    and (q_doc is None or q_doc[i] == k_doc[j])
                ]
                if not keys:
                    continue
                s = torch.stack([scale * (q[bi, i, hi] @ k[bi, j, kv]) for j in keys])
                w = torch.softmax(s, dim=0)
                o[bi, i, hi] = sum(w[n] * v[bi, j, kv] for n, j in enumerate(keys))
    return o


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["full", "zigzag", "empty_rows"])
def test_reference_matches_loop(causal, name):
    tq, tk, kw = scenario(name, causal)
    q, k, v, _ = make_qkv(1, tq, tk, 4, 2, 3, 5, torch.float64)
    o = attention_reference(q, k, v, causal=causal, **kw)
    kw = dict(kw)
    q_pos = kw.get("q_pos", torch.arange(tq))
    k_pos = kw.get("k_pos", torch.arange(tk))
    expected = loop_attention(
        q, k, v, 3 ** -0.5, causal, q_pos, k_pos, kw.get("q_doc"), kw.get("k_doc")
    )
    assert rel_err(o, expected) <= FP64_TOL
    if name == "empty_rows":
        assert (o[:, :5] == 0).all()  # document 0 has no key


def test_reference_scale_and_dtype():
    q, k, v, _ = make_qkv(2, 7, 9, 2, 1, 4, 4, torch.float32)
    o = attention_reference(q, k, v, scale=0.3, causal=False)
    expected = loop_attention(
        q.double(), k.double(), v.double(), 0.3, False, torch.arange(7), torch.arange(9),
        None, None,
    )
    assert o.dtype == torch.float32
    assert rel_err(o, expected) <= fp32_tol(9 + 4)  # softmax over 9 keys of 4-term scores


# ----------------------------------------------------------------------------- blockwise


CASES = [
    # (scenario, Hkv, block_size)
    ("full", 4, 16),
    ("full", 2, 256),
    ("full", 1, 7),
    ("shard", 2, 16),
    ("shard", 1, 8),
    ("zigzag", 2, 16),
    ("docs", 4, 16),
    ("docs", 1, 9),
    ("empty_rows", 2, 16),
    ("empty_rows", 4, 64),
]


def _mask_dtype_params():
    """fp64 with and without the causal mask; fp32/bf16 (rounding only, the same code paths)
    with it in the default run, without it in the slow run."""
    for causal in (True, False):
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            slow = not causal and dtype != torch.float64
            yield pytest.param(causal, dtype, marks=[pytest.mark.slow] if slow else [],
                               id=f"{'causal' if causal else 'bidir'}-{str(dtype)[6:]}")


@pytest.mark.parametrize("causal,dtype", list(_mask_dtype_params()))
@pytest.mark.parametrize("name,hkv,block_size", CASES)
def test_blockwise_matches_reference(name, hkv, block_size, causal, dtype):
    tq, tk, kw = scenario(name, causal)
    q, k, v, do = make_qkv(2, tq, tk, 4, hkv, 8, 6, dtype, seed=block_size + hkv)

    # Oracle: autograd through attention_reference on the same (rounded) inputs, in fp64.
    qr, kr, vr = (t.double().clone().requires_grad_() for t in (q, k, v))
    o_ref = attention_reference(qr, kr, vr, causal=causal, **kw)
    o_ref.backward(do.double())

    qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = attention_blockwise(
        qb, kb, vb, causal=causal, block_size=block_size, return_lse=True, **kw
    )
    o.backward(do)

    assert o.dtype == dtype and o.shape == o_ref.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (2, 4, tq)
    assert qb.grad.dtype == dtype and kb.grad.dtype == dtype and vb.grad.dtype == dtype
    assert kb.grad.shape == k.shape and vb.grad.shape == v.shape
    depth = tk + 8  # softmax over Tk keys of D = 8 term scores (see tests/helpers.py)
    assert_close("o", o, o_ref, dtype, depth=depth)
    assert_close("dq", qb.grad, qr.grad, dtype, depth=depth)
    assert_close("dk", kb.grad, kr.grad, dtype, depth=depth)
    assert_close("dv", vb.grad, vr.grad, dtype, depth=depth)

    # lse against its definition, with -inf exactly on rows that see no key.
    kq = kr.detach().repeat_interleave(4 // hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qr.detach(), kq) * 8 ** -0.5
    qp = kw.get("q_pos", torch.arange(tq))
    kp = kw.get("k_pos", torch.arange(tk))
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed &= kp[None, :] <= qp[:, None]
    if "q_doc" in kw:
        allowed &= kw["q_doc"][:, None] == kw["k_doc"][None, :]
    lse_ref = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1)
    empty = ~allowed.any(dim=1)
    assert torch.equal(torch.isneginf(lse), empty.expand_as(lse))
    assert_close("lse", lse[..., ~empty], lse_ref[..., ~empty], dtype, depth=depth)
    if empty.any():
        assert (o[:, empty] == 0).all()
        assert (qb.grad[:, empty] == 0).all()
    if name == "empty_rows":
        assert empty.any()  # the scenario really has empty rows


def test_all_keys_masked():
    """Every row empty (keys all in the future): zeros everywhere, no NaN."""
    q, k, v, do = make_qkv(1, 10, 12, 2, 1, 4, 4, torch.float32)
    qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = attention_blockwise(
        qb, kb, vb, causal=True, q_pos=torch.arange(10), k_pos=torch.arange(12) + 10,
        block_size=4, return_lse=True,
    )
    (o.sum() + lse.clamp_min(-1e4).sum()).backward()
    assert (o == 0).all() and torch.isneginf(lse).all()
    for grad in (qb.grad, kb.grad, vb.grad):
        assert (grad == 0).all()


def test_lse_gradient():
    """lse is differentiable: compare d(sum w * lse) with autograd through logsumexp."""
    q, k, v, _ = make_qkv(1, 13, 13, 2, 1, 4, 3, torch.float64, seed=3)
    w = torch.randn(1, 2, 13, dtype=torch.float64)
    qb, kb = q.clone().requires_grad_(), k.clone().requires_grad_()
    _, lse = attention_blockwise(qb, kb, v, causal=True, block_size=4, return_lse=True)
    (lse * w).sum().backward()
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    s = torch.einsum("bihd,bjhd->bhij", qr, kr.expand(-1, -1, 2, -1)) * 0.5
    mask = torch.ones(13, 13, dtype=torch.bool).tril()
    (torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1) * w).sum().backward()
    assert rel_err(qb.grad, qr.grad) <= FP64_TOL
    assert rel_err(kb.grad, kr.grad) <= FP64_TOL


def test_does_not_modify_inputs():
    q, k, v, do = make_qkv(1, 9, 9, 2, 1, 4, 4, torch.float32)
    copies = [t.clone() for t in (q, k, v, do)]
    o, lse = attention_block_fwd(q, k, v, AttentionMask(causal=True), block_size=4)
    attention_block_bwd(do, q, k, v, o, lse, AttentionMask(causal=True), block_size=4)
    for t, c in zip((q, k, v, do), copies):
        assert torch.equal(t, c)


# ----------------------------------------------------------------------------- merge / subsets


@pytest.mark.parametrize("causal", [True, False])
def test_merge_of_two_key_sets(causal):
    tq, tk, kw = scenario("zigzag", causal)
    q, k, v, _ = make_qkv(2, tq, tk, 4, 2, 8, 6, torch.float64)
    qp, kp = kw["q_pos"], kw["k_pos"]
    perm = torch.randperm(tk, generator=torch.Generator().manual_seed(1))
    a, b = perm[:23], perm[23:]  # two disjoint, unsorted key sets
    o1, l1 = attention_block_fwd(q, k[:, a], v[:, a], AttentionMask(causal, qp, kp[a]), block_size=8)
    o2, l2 = attention_block_fwd(q, k[:, b], v[:, b], AttentionMask(causal, qp, kp[b]), block_size=8)
    o, lse = merge_attention(o1, l1, o2, l2)
    o_all, lse_all = attention_block_fwd(q, k, v, AttentionMask(causal, qp, kp))
    assert rel_err(o, o_all) <= FP64_TOL
    assert rel_err(lse, lse_all) <= FP64_TOL
    o_swapped, lse_swapped = merge_attention(o2, l2, o1, l1)
    assert rel_err(o_swapped, o_all) <= FP64_TOL and rel_err(lse_swapped, lse_all) <= FP64_TOL


def test_merge_with_masked_side():
    q, k, v, _ = make_qkv(1, 10, 20, 2, 2, 4, 4, torch.float32)
    qp = torch.arange(10)
    # Keys at positions 10..19 are all in the future of every query: that side is empty.
    o_past, l_past = attention_block_fwd(q, k[:, :10], v[:, :10], AttentionMask(True, qp, torch.arange(10)))
    o_fut, l_fut = attention_block_fwd(q, k[:, 10:], v[:, 10:], AttentionMask(True, qp, torch.arange(10, 20)))
    assert torch.isneginf(l_fut).all() and (o_fut == 0).all()
    for o, lse in (merge_attention(o_past, l_past, o_fut, l_fut),
                   merge_attention(o_fut, l_fut, o_past, l_past)):
        assert torch.equal(o, o_past) and torch.equal(lse, l_past)
    # Both sides empty: zero output, -inf lse, and autograd through the merge is NaN-free.
    o1 = o_fut.clone().requires_grad_()
    l1 = l_fut.clone().requires_grad_()
    o, lse = merge_attention(o1, l1, o_fut, l_fut)
    assert (o == 0).all() and torch.isneginf(lse).all()
    (o.sum() + lse.clamp_min(-1e4).sum()).backward()
    assert torch.isfinite(o1.grad).all() and torch.isfinite(l1.grad).all()


def test_merge_dtypes():
    q, k, v, _ = make_qkv(1, 6, 8, 2, 1, 4, 4, torch.bfloat16)
    o1, l1 = attention_block_fwd(q, k[:, :4], v[:, :4], AttentionMask(causal=False))
    o2, l2 = attention_block_fwd(q, k[:, 4:], v[:, 4:], AttentionMask(causal=False), out_dtype=torch.float32)
    assert o1.dtype == torch.bfloat16 and o2.dtype == torch.float32
    o, lse = merge_attention(o1, l1, o2, l2)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [2, 1])
def test_bwd_on_key_subsets(causal, hkv):
    """With the global (o, lse), per-subset backward sums to the full dq and gives the
    matching slices of dk, dv: the contract ring attention relies on."""
    tq, tk, kw = scenario("docs", causal)
    kw["q_pos"] = kw["k_pos"] = torch.arange(tk)
    q, k, v, do = make_qkv(1, tq, tk, 4, hkv, 8, 6, torch.float64, seed=7)
    mask = AttentionMask(causal, **kw)
    o, lse = attention_block_fwd(q, k, v, mask, block_size=16)
    dq, dk, dv = attention_block_bwd(do, q, k, v, o, lse, mask, block_size=16)
    delta = (do * o).sum(-1).transpose(1, 2)
    perm = torch.randperm(tk, generator=torch.Generator().manual_seed(2))
    dq_sum = torch.zeros_like(dq)
    for idx in (perm[:11], perm[11:30], perm[30:], torch.arange(40, 50)[:0]):
        sub = dict(q_pos=kw["q_pos"], k_pos=kw["k_pos"][idx], q_doc=kw["q_doc"],
                   k_doc=kw["k_doc"][idx])
        # Half the subsets use the caller's delta, half let the function compute it.
        extra = dict(delta=delta) if len(idx) % 2 else {}
        dq_i, dk_i, dv_i = attention_block_bwd(
            do, q, k[:, idx], v[:, idx], o, lse, AttentionMask(causal, **sub), block_size=8, **extra
        )
        dq_sum += dq_i
        assert rel_err(dk_i, dk[:, idx]) <= FP64_TOL
        assert rel_err(dv_i, dv[:, idx]) <= FP64_TOL
    assert rel_err(dq_sum, dq) <= FP64_TOL


# ----------------------------------------------------------------------------- autograd


def test_gradcheck_with_lse():
    q, k, v, _ = make_qkv(1, 7, 7, 2, 1, 3, 2, torch.float64, seed=4)
    docs = doc_ids_from_cu_seqlens(torch.tensor([0, 3, 7]), 7)
    inputs = [t.requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return BlockwiseAttention.apply(q, k, v, AttentionMask(True, None, None, docs, docs), 0.7, 4)

    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_with_empty_rows():
    q, k, v, _ = make_qkv(1, 6, 5, 2, 2, 3, 2, torch.float64, seed=5)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    k_pos = torch.arange(5) + 2  # queries 0 and 1 see no key

    def f(q, k, v):
        return BlockwiseAttention.apply(q, k, v, AttentionMask(True, None, k_pos), 0.5, 3)[0]

    assert torch.autograd.gradcheck(f, inputs)


def test_backward_returns_one_gradient_per_input():
    q, k, v, do = make_qkv(1, 5, 5, 2, 1, 3, 3, torch.float64)
    q.requires_grad_()
    o, lse = BlockwiseAttention.apply(q, k, v, AttentionMask(causal=True), 0.5, 4)
    grads = BlockwiseAttention.backward(o.grad_fn, do, None)
    assert len(grads) == 6 and grads[0] is not None and all(g is None for g in grads[3:])


# ----------------------------------------------------------------------------- doc ids


def test_doc_ids_from_cu_seqlens():
    ids = doc_ids_from_cu_seqlens(torch.tensor(CU, dtype=torch.int32), 50)
    expected = torch.tensor(sum(([i] * (CU[i + 1] - CU[i]) for i in range(4)), []))
    assert ids.dtype == torch.int64 and torch.equal(ids, expected)
    # An empty document (repeated boundary) owns no token.
    ids = doc_ids_from_cu_seqlens(torch.tensor([0, 3, 3, 5]), 5)
    assert ids.tolist() == [0, 0, 0, 2, 2]


@pytest.mark.parametrize("tq,tk", [(5, 0), (0, 3)])
def test_empty_query_or_key_set(tq, tk):
    q, k, v, do = make_qkv(1, tq, tk, 2, 1, 4, 3, torch.float32)
    qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = attention_blockwise(qb, kb, vb, causal=True, return_lse=True)
    o.backward(do)
    assert o.shape == (1, tq, 2, 3) and lse.shape == (1, 2, tq)
    assert (o == 0).all() and torch.isneginf(lse).all()
    assert (qb.grad == 0).all() and (kb.grad == 0).all() and (vb.grad == 0).all()
