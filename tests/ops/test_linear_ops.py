"""Single-device chunked linear attention vs the per-token specification (ops/naive.py).

The reference always runs in fp64 on the very values the op under test received (inputs
rounded to the test dtype first), so the tolerance measures the op, not input rounding.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import lasp2
from lasp2.ops.chunk import chunk_linear_attention
from lasp2.ops.naive import naive_bidirectional_linear_attention, naive_linear_attention
from tests.helpers import DIAGONAL_VARIANTS, assert_close, loss_weights, make_inputs, run_with_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

LENGTHS = (1, 7, 64, 100, 257)
DOCS = {1: [0, 1], 7: [0, 2, 3, 7], 64: [0, 10, 32, 33, 64], 100: [0, 5, 17, 18, 50, 100],
        257: [0, 64, 65, 200, 256, 257]}
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
B_, H_, K_, V_ = 1, 2, 8, 6




# The default run: every length up to two chunks, every (initial state, documents) combination in
# fp64 and the two extreme ones in fp32/bf16. The slow run adds T = 257 (several chunks, one
# partial) and fp32/bf16 for every combination.
FULL = pytest.param(True, marks=pytest.mark.slow, id="full")


@pytest.mark.parametrize("full", [pytest.param(False, id="short"), FULL])
@pytest.mark.parametrize("variant", DIAGONAL_VARIANTS)
def test_chunk_matches_naive(variant, full):
    """Every T x with/without initial state x with/without documents x fp64/fp32/bf16."""
    failures = []
    lengths = LENGTHS if full else LENGTHS[:-1]
    for T, with_h0, with_docs in itertools.product(lengths, (False, True), (False, True)):
        cu = torch.tensor(DOCS[T]) if with_docs else None
        n_states = (len(DOCS[T]) - 1 if with_docs else B_) if with_h0 else None
        base = make_inputs(variant, B_, T, H_, K_, V_, seed=T, n_states=n_states)
        weights = loss_weights(B_, T, H_, K_, V_, len(DOCS[T]) - 1 if with_docs else B_, seed=1)
        for dtype in DTYPES if full or with_h0 == with_docs else DTYPES[:1]:
            rounded = {n: (None if t is None else t.to(dtype) if n != "initial_state" else t)
                       for n, t in base.items()}
            ref_in = {n: (None if t is None else t.double()) for n, t in rounded.items()}
            ref = run_with_loss(naive_linear_attention, ref_in, weights, cu)
            got = run_with_loss(lasp2.linear_attention, rounded, weights, cu)
            for name in ref:
                try:
                    # depth T + K: the state runs over T tokens, then K-term products (helpers.py)
                    assert_close(name, got[name], ref[name], dtype, depth=T + K_)
                except AssertionError as e:
                    failures.append(f"T={T} h0={with_h0} docs={with_docs} {dtype}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_small_chunks_with_documents(chunk_size):
    """Documents inside, across and exactly on chunk boundaries, each with its own h0."""
    cu = torch.tensor([0, 1, 2, 3, 9, 16, 17, 40])
    for variant in DIAGONAL_VARIANTS:
        inputs = make_inputs(variant, 1, 40, 2, 4, 3, seed=5, n_states=7)
        weights = loss_weights(1, 40, 2, 4, 3, 7, seed=2)
        ref = run_with_loss(naive_linear_attention, inputs, weights, cu)
        got = run_with_loss(chunk_linear_attention, inputs, weights, cu, chunk_size=chunk_size)
        for name in ref:
            assert_close(f"{variant} {name}", got[name], ref[name], torch.float64)


def test_batch_and_heads_without_documents():
    for variant in DIAGONAL_VARIANTS:
        inputs = make_inputs(variant, 3, 70, 4, 5, 7, seed=3, n_states=3)
        weights = loss_weights(3, 70, 4, 5, 7, 3, seed=3)
        ref = run_with_loss(naive_linear_attention, inputs, weights, None)
        got = run_with_loss(lasp2.linear_attention, inputs, weights, None)
        for name in ref:
            assert_close(f"{variant} {name}", got[name], ref[name], torch.float64)


def test_strong_decay_does_not_underflow_into_nan():
    """Gates of -60 per token (and per-channel gates x100): cumulative decays underflow, nothing
    becomes NaN. dg is ~1e-26 here, below the rounding noise of the O(1) terms that cancel in
    it, so it is checked against the scale of the other gradients instead of its own."""
    inputs = make_inputs("scalar", 1, 130, 2, 4, 4, seed=9, n_states=1)
    inputs["g"] = torch.full((1, 130, 2), -60.0, dtype=torch.float64)
    gch = make_inputs("channel", 1, 130, 2, 4, 4, seed=9)["g"]
    weights = (torch.randn(1, 130, 2, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64))
    for g in (inputs["g"], gch * 100):
        case = dict(inputs, g=g)
        ref = run_with_loss(naive_linear_attention, case, weights, None)
        got = run_with_loss(lasp2.linear_attention, case, weights, None)
        for name in ref:
            if name == "dg":
                scale = ref["dq"].abs().max()
                assert torch.isfinite(got["dg"]).all()
                assert (got["dg"] - ref["dg"]).abs().max() <= 1e-12 * scale
            else:
                assert_close(name, got[name], ref[name], torch.float64)


def test_bidirectional_matches_naive():
    for cu in (None, torch.tensor([0, 3, 4, 20, 33])):
        inputs = make_inputs("basic", 1, 33, 2, 5, 3, seed=4)
        leaves = [inputs[n].clone().requires_grad_() for n in "qkv"]
        leaves_ref = [inputs[n].clone().requires_grad_() for n in "qkv"]
        w = torch.randn(1, 33, 2, 3, dtype=torch.float64)
        o, _ = lasp2.linear_attention(*leaves, causal=False, cu_seqlens=cu)
        o_ref = naive_bidirectional_linear_attention(*leaves_ref, cu_seqlens=cu)
        grads = torch.autograd.grad((o * w).sum(), leaves)
        grads_ref = torch.autograd.grad((o_ref * w).sum(), leaves_ref)
        assert_close("o", o, o_ref, torch.float64)
        for n, a, b in zip("qkv", grads, grads_ref):
            assert_close(f"d{n}", a, b, torch.float64)


def test_delta_rule_matches_recurrence():
    inputs = make_inputs("scalar", 1, 20, 2, 4, 3, seed=6, n_states=1)
    beta = torch.rand(1, 20, 2, dtype=torch.float64)
    k = torch.nn.functional.normalize(inputs["k"], dim=-1)
    o, ht = lasp2.linear_attention(inputs["q"], k, inputs["v"], inputs["g"], beta,
                                   initial_state=inputs["initial_state"], output_final_state=True)
    o_ref, ht_ref = naive_linear_attention(inputs["q"], k, inputs["v"], inputs["g"], beta,
                                           initial_state=inputs["initial_state"], output_final_state=True)
    assert_close("o", o, o_ref, torch.float64)
    assert_close("final_state", ht, ht_ref, torch.float64)


def test_naive_delta_rule_stores_and_recalls():
    """The specification itself: with beta = 1 and orthonormal keys, a delta-rule state returns
    exactly the last value written under each key (independent of any op under test)."""
    K = 4
    keys = torch.eye(K, dtype=torch.float64)
    k = torch.cat([keys, keys]).view(1, 2 * K, 1, K)  # each key written twice
    v = torch.randn(1, 2 * K, 1, 3, dtype=torch.float64)
    beta = torch.ones(1, 2 * K, 1, dtype=torch.float64)
    _, S = naive_linear_attention(k, k, v, None, beta, scale=1.0, output_final_state=True)
    torch.testing.assert_close(S[0, 0], v[0, K:, 0], rtol=0, atol=1e-12)


def test_gradcheck_tiny():
    for variant in DIAGONAL_VARIANTS:
        inputs = make_inputs(variant, 1, 6, 1, 3, 2, seed=8, n_states=2)
        cu = torch.tensor([0, 4, 6])
        names = [n for n in ("q", "k", "v", "g", "initial_state") if inputs[n] is not None]
        if variant == "constant":
            names.remove("g")

        def fn(*xs):
            kw = dict(inputs, **dict(zip(names, xs)))
            o, ht = chunk_linear_attention(kw["q"], kw["k"], kw["v"], kw["g"], scale=0.5,
                                           initial_state=kw["initial_state"], output_final_state=True,
                                           cu_seqlens=cu, chunk_size=4)
            return o, ht

        xs = [inputs[n].clone().requires_grad_() for n in names]
        # fp64 central differences: truncation ~eps^2, rounding ~u/eps = 1e-10, so atol 1e-8.
        # fast_mode compares random projections u^T J v of the Jacobian (PyTorch's fast
        # gradcheck): a wrong gradient fails it with probability 1, at a fraction of the cost.
        assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-8, fast_mode=True)
