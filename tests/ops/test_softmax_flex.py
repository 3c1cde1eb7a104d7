"""The softmax kernel seam (``lasp2.ops.softmax_backends``) on CPU: what runs there.

FlexAttention's forward (eager, fp32 and fp64) against the blockwise reference for every mask
the SP strategies build (causal, bidirectional, zigzag runs of global positions, permuted
positions, packed documents, GQA, a row with no visible key); the block-mask cache; the flex
backward's math (``recompute_bwd``: a key subset's gradients from the whole attention's lse and
delta) with the blockwise op as the differentiable kernel, against ``attention_block_bwd``; the
backend choice and its refusals. FlexAttention's own backward has no CPU path in torch 2.13: its
exactness is measured by ``lasp2 bench --suite gpu`` on CUDA.
"""
from __future__ import annotations

import pytest
import torch

import lasp2
from lasp2.ops import softmax_backends as sb
from lasp2.ops.attention_mask import AttentionMask, HostRanges
from lasp2.ops.softmax import BlockwiseAttention, attention_block_bwd, attention_block_fwd
from tests.helpers import assert_close

D, DV = 16, 8


def _qkv(tq, tk, h, hkv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, tq, h, D, generator=gen, dtype=dtype), torch.randn(2, tk, hkv, D, generator=gen, dtype=dtype),
            torch.randn(2, tk, hkv, DV, generator=gen, dtype=dtype))


def _masks():
    """(name, Tq, Tk, mask) for the masks the strategies build."""
    zig_q = ((0, 0, 24), (24, 72, 24))  # a zigzag shard: global [0, 24) and [72, 96)
    keys = ((0, 24, 48),)  # another rank's contiguous keys [24, 72)
    cu = (0, 10, 50, 80, 96)
    pos = lambda runs, n: sb._positions(runs, n, "cpu")  # noqa: E731
    doc = lambda p: sb._docs(p, cu)  # noqa: E731
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    return [
        ("causal", 40, 40, AttentionMask(True, host=HostRanges(((0, 0, 40),), ((0, 0, 40),)))),
        ("bidir", 40, 40, AttentionMask(False, host=HostRanges(((0, 0, 40),), ((0, 0, 40),)))),
        ("zigzag-vs-block", 48, 48, AttentionMask(True, pos(zig_q, 48), pos(keys, 48),
                                                  host=HostRanges(zig_q, keys))),
        ("zigzag-docs", 48, 48, AttentionMask(True, pos(zig_q, 48), pos(keys, 48), doc(pos(zig_q, 48)),
                                              doc(pos(keys, 48)), HostRanges(zig_q, keys, cu))),
        # Device tensors only (no host description): permuted queries, documents; row 0 (doc 2) has no key.
        ("permuted-docs-empty-row", 40, 40, AttentionMask(True, perm, torch.arange(40),
                                                          torch.where(perm == perm[0], 2, perm // 20),
                                                          torch.arange(40) // 20)),
    ]


def _check_forward(dtype, heads, names=None):
    for name, tq, tk, mask in _masks():
        if names is not None and name not in names:
            continue
        q, k, v = _qkv(tq, tk, *heads, dtype)
        o_ref, lse_ref = attention_block_fwd(q, k, v, mask, scale=0.3, block_size=16)
        o, lse = sb.block_fwd("flex", q, k, v, mask, scale=0.3, block_size=16)
        assert o.dtype == dtype and lse.dtype == dtype, name
        assert_close(f"{name} o", o, o_ref, dtype)
        finite = torch.isfinite(lse_ref)
        assert torch.equal(finite, torch.isfinite(lse)), f"{name}: lse -inf rows differ"
        assert_close(f"{name} lse", lse[finite], lse_ref[finite], dtype)
        if name.endswith("empty-row"):
            assert not finite[:, :, 0].any() and (o[:, 0] == 0).all(), "a row with no key: o = 0, lse = -inf"


def test_flex_forward_matches_blockwise():
    """The default run keeps the masks the GPU check's smoke run does not build (bidirectional;
    device tensors only, permuted, with an empty row): eager flex on CPU costs ~0.1 s a call.
    Causal, zigzag, documents and GQA run in ``lasp2 bench --suite gpu --smoke``
    (tests/bench/test_scripts.py); the slow run has the whole product here."""
    _check_forward(torch.float64, (4, 2), ("bidir", "permuted-docs-empty-row"))
    _check_forward(torch.float32, (4, 1), ("zigzag-docs",))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("heads", ((4, 4), (4, 2), (4, 1)))
def test_flex_forward_matches_blockwise_every_case(dtype, heads):
    _check_forward(dtype, heads)


def test_block_mask_built_once_per_host_description():
    host = HostRanges(((0, 0, 24), (24, 72, 24)), ((0, 24, 48),), (0, 30, 96))
    a = sb.block_mask(AttentionMask(True, host=host), 48, 48, "cpu")
    b = sb.block_mask(AttentionMask(True, host=HostRanges(host.q, host.k, host.cu)), 48, 48, "cpu")
    assert a is b  # an equal description (the next layer of the batch) reuses the mask
    assert sb.block_mask(AttentionMask(False, host=host), 48, 48, "cpu") is not a


def test_recompute_bwd_gives_a_key_subsets_gradients():
    """The flex backward's math: split the keys in two, get (o, lse) of the whole, and each
    subset's recomputed gradients equal attention_block_bwd's on that subset (fp64)."""
    dtype = torch.float64
    name, tq, tk, mask = _masks()[3]  # zigzag queries, documents: rows some subset never reaches
    q, k, v = _qkv(tq, tk, 4, 2, dtype)
    do = torch.randn(2, tq, 4, DV, dtype=dtype)
    o, lse = attention_block_fwd(q, k, v, mask, scale=0.3, block_size=16)
    delta = (do * o).sum(-1).transpose(1, 2)
    for cols in (slice(0, 20), slice(20, 48)):
        sub = AttentionMask(True, mask.q_pos, mask.k_pos[cols], mask.q_doc, mask.k_doc[cols])
        ref = attention_block_bwd(do, q, k[:, cols], v[:, cols], None, lse, sub, scale=0.3, block_size=16,
                                  delta=delta)
        got = sb.recompute_bwd(lambda a, b, c: BlockwiseAttention.apply(a, b, c, sub, 0.3, 16), do, q,
                               k[:, cols], v[:, cols], lse, delta)
        for n, g, r in zip(("dq", "dk", "dv"), got, ref):
            assert_close(f"{cols} {n}", g, r, dtype)


def test_backend_choice_and_refusals():
    x = torch.zeros(1, 4, 2, 8)
    assert sb.resolve("auto", x, needs_grad=True) == "torch"  # CPU: the blockwise reference
    assert sb.resolve("flex", x, needs_grad=False) == "flex"
    with pytest.raises(ValueError, match="no backward on CPU"):
        sb.resolve("flex", x, needs_grad=True)
    with pytest.raises(ValueError, match="one of"):
        sb.resolve("cuda", x, needs_grad=False)
    if not sb.flash_installed():
        with pytest.raises(ValueError, match="pip install flash-attn"):
            sb.resolve("flash", x, needs_grad=False)
    q, k, v = _qkv(32, 32, 4, 2, torch.float64)
    cu = torch.tensor([0, 12, 32])
    with torch.no_grad():
        got = lasp2.softmax_attention(q[:1], k[:1], v[:1], cu_seqlens=cu, backend="flex")
    ref = lasp2.softmax_attention(q[:1], k[:1], v[:1], cu_seqlens=cu, backend="torch")
    assert_close("softmax_attention flex", got, ref, torch.float64)
    with pytest.raises(ValueError, match="no backward on CPU"):
        lasp2.softmax_attention(q.requires_grad_(), k, v, backend="flex")


def test_layer_takes_the_backend():
    """lasp2.nn.SoftmaxAttention(backend=...) reaches the op: flex with a gradient on CPU is the
    op's refusal (flex's forward values are tested above); a bad name is a ValueError."""
    from lasp2.nn import SoftmaxAttention

    layer = SoftmaxAttention(32, 4, 2, 8, backend="flex")
    with pytest.raises(ValueError, match="no backward on CPU"):
        layer(torch.randn(1, 24, 32))
    layer.backend = "torch"
    assert torch.isfinite(layer(torch.randn(1, 24, 32))).all()
    with pytest.raises(ValueError, match="backend"):
        SoftmaxAttention(32, 4, 2, 8, backend="sdpa")
