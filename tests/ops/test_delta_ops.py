"""Chunked DeltaNet / Gated DeltaNet / KDA (ops/delta.py) vs the per-token specification (ops/naive.py),
and the pieces of the chunk decomposition the sequence-parallel layer relies on.

The reference always runs in fp64 on the very values the op under test received (inputs rounded
to the test dtype first), so the tolerance measures the op, not input rounding. Keys are
L2-normalised and beta = sigmoid(x), as DeltaNet layers produce them.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2.ops.delta import (delta_chunk_transitions, delta_entry_adjoint, delta_entry_transitions,
                             delta_inter_query, delta_intra_outputs, delta_linear_attention,
                             delta_segment_summary, prepare_delta, scan_matrix_states)
from lasp2.ops.common import from_chunks
from lasp2.ops.naive import naive_linear_attention
from tests.helpers import assert_close, loss_weights, run_with_loss

VARIANTS = ("delta", "gated_delta", "kda")  # kda: the per-channel gate g [B, T, H, K]
LENGTHS = (1, 7, 64, 100, 257)
# Default chunk 64: documents inside chunks, on chunk boundaries (64, 256) and of length 1.
DOCS = {1: [0, 1], 7: [0, 2, 3, 7], 64: [0, 10, 32, 33, 64], 100: [0, 5, 17, 18, 50, 100],
        257: [0, 64, 65, 200, 256, 257]}
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
B_, H_, K_, V_ = 1, 2, 8, 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def make_delta_inputs(variant, B, T, H, K, V, seed, n_states=None, beta_max=1.0):
    """fp64 q, k (L2-normalised), v, beta = beta_max * sigmoid(x), g (None for DeltaNet,
    [B, T, H, K] for KDA), h0."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    out = {"q": r(B, T, H, K), "k": F.normalize(r(B, T, H, K), dim=-1), "v": r(B, T, H, V),
           "beta": beta_max * r(B, T, H).sigmoid(),
           "g": {"gated_delta": lambda: F.logsigmoid(r(B, T, H) + 2.0),
                 "kda": lambda: F.logsigmoid(r(B, T, H, K) + 2.0)}.get(variant, lambda: None)()}
    out["initial_state"] = None if n_states is None else r(n_states, H, K, V)
    return out




@pytest.mark.parametrize("variant", VARIANTS)
def test_delta_beta_up_to_two_matches_naive(variant):
    """beta in (0, 2) (OLMo hybrid's ``allow_neg_eigval``: I - beta k k^T has the eigenvalue
    1 - beta in (-1, 1) along k) through the public op, fp64 vs the per-token recurrence: several
    chunks, initial states, documents; beta's range is accepted and nothing is clamped."""
    T = 100
    cu = torch.tensor(DOCS[T])
    base = make_delta_inputs(variant, B_, T, H_, K_, V_, seed=3, n_states=len(DOCS[T]) - 1, beta_max=2.0)
    assert base["beta"].max() > 1.5, "the inputs must exercise beta > 1"
    weights = loss_weights(B_, T, H_, K_, V_, len(DOCS[T]) - 1, seed=1)
    ref = run_with_loss(naive_linear_attention, base, weights, cu)
    got = run_with_loss(lasp2.linear_attention, base, weights, cu)
    for name in ref:
        assert_close(name, got[name], ref[name], torch.float64, depth=T + K_)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 2\]"):
        lasp2.linear_attention(base["q"], base["k"], base["v"], base["g"], base["beta"] + 1.0)


# The default run: every length up to two chunks, every (initial state, documents) combination in
# fp64 and the two extreme ones in fp32/bf16. The slow run adds T = 257 (several chunks, one
# partial) and fp32/bf16 for every combination.
FULL = pytest.param(True, marks=pytest.mark.slow, id="full")


@pytest.mark.parametrize("full", [pytest.param(False, id="short"), FULL])
@pytest.mark.parametrize("variant", VARIANTS)
def test_delta_matches_naive(variant, full):
    """Every T x with/without initial state x with/without documents x fp64/fp32/bf16, through
    the public ``lasp2.linear_attention`` (which dispatches the delta rule to ops/delta.py)."""
    failures = []
    lengths = LENGTHS if full else LENGTHS[:-1]
    for T, with_h0, with_docs in itertools.product(lengths, (False, True), (False, True)):
        cu = torch.tensor(DOCS[T]) if with_docs else None
        n_docs = len(DOCS[T]) - 1 if with_docs else B_
        base = make_delta_inputs(variant, B_, T, H_, K_, V_, seed=T, n_states=n_docs if with_h0 else None)
        weights = loss_weights(B_, T, H_, K_, V_, n_docs, seed=1)
        for dtype in DTYPES if full or with_h0 == with_docs else DTYPES[:1]:
            state_dt = torch.float64 if dtype == torch.float64 else torch.float32
            rounded = {n: (None if t is None else t.to(state_dt if n == "initial_state" else dtype))
                       for n, t in base.items()}
            ref_in = {n: (None if t is None else t.double()) for n, t in rounded.items()}
            ref = run_with_loss(naive_linear_attention, ref_in, weights, cu)
            got = run_with_loss(lasp2.linear_attention, rounded, weights, cu)
            for name in ref:
                # A gradient that is exactly 0 (dg at T = 1 without an initial state: the gate only
                # scales the zero state) is judged against dq's scale: cancelling O(1) terms leave
                # rounding noise (~1e-17 with KDA's per-channel decays), never a relative error.
                whole = ref["dq"] if not bool(ref[name].any()) else None
                try:
                    # depth T + K: the state runs over T tokens, then K-term products (helpers.py)
                    assert_close(name, got[name], ref[name], dtype, whole=whole, depth=T + K_)
                except AssertionError as e:
                    failures.append(f"T={T} h0={with_h0} docs={with_docs} {dtype}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_small_chunks_with_documents(chunk_size):
    """Documents inside, across and exactly on chunk boundaries, length-1 documents, each with
    its own initial state; T not a multiple of the chunk."""
    cu = torch.tensor([0, 1, 2, 3, 9, 16, 17, 40, 41])
    for variant in VARIANTS:
        inputs = make_delta_inputs(variant, 1, 41, 2, 4, 3, seed=5, n_states=8)
        weights = loss_weights(1, 41, 2, 4, 3, 8, seed=2)
        ref = run_with_loss(naive_linear_attention, inputs, weights, cu)
        got = run_with_loss(delta_linear_attention, inputs, weights, cu, chunk_size=chunk_size)
        for name in ref:
            assert_close(f"{variant} C={chunk_size} {name}", got[name], ref[name], torch.float64)


def test_batch_and_heads_without_documents():
    for variant in VARIANTS:
        inputs = make_delta_inputs(variant, 3, 70, 4, 5, 7, seed=3, n_states=3)
        weights = loss_weights(3, 70, 4, 5, 7, 3, seed=3)
        ref = run_with_loss(naive_linear_attention, inputs, weights, None)
        got = run_with_loss(delta_linear_attention, inputs, weights, None, chunk_size=16)
        for name in ref:
            assert_close(f"{variant} {name}", got[name], ref[name], torch.float64)


def test_strong_decay_stays_finite():
    """Gates of -60 per token: within-chunk decays underflow to 0, nothing becomes NaN. dg is
    ~1e-26 here, below the rounding noise of the O(1) terms that cancel in it, so it is judged
    against the scale of dq instead of its own."""
    inputs = make_delta_inputs("gated_delta", 1, 130, 2, 4, 4, seed=9, n_states=1)
    inputs["g"] = torch.full((1, 130, 2), -60.0, dtype=torch.float64)
    weights = (torch.randn(1, 130, 2, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64))
    ref = run_with_loss(naive_linear_attention, inputs, weights, None)
    got = run_with_loss(delta_linear_attention, inputs, weights, None)
    for name in ref:
        if name == "dg":
            assert torch.isfinite(got["dg"]).all()
            assert (got["dg"] - ref["dg"]).abs().max() <= 1e-12 * ref["dq"].abs().max()
        else:
            assert_close(name, got[name], ref[name], torch.float64)


def _token_transitions(inputs):
    """A_t = (I - beta_t k_t^T k_t) Diag(exp(g_t)) per token: [B, H, T, K, K] (fp64); a scalar
    g_t is the same decay on every channel."""
    k, beta, g = inputs["k"], inputs["beta"], inputs["g"]
    K = k.shape[-1]
    A = torch.eye(K, dtype=k.dtype) - beta[..., None, None] * k[..., :, None] * k[..., None, :]
    if g is not None:
        A = A * (g.exp()[..., None, None] if g.dim() == 3 else g.exp()[..., None, :])  # columns scaled
    return A.transpose(1, 2)


def _product(A, a, b):
    """A_{b-1} ... A_a for A [B, H, T, K, K] (identity when a == b)."""
    P = torch.eye(A.shape[-1], dtype=A.dtype).expand(*A.shape[:2], -1, -1)
    for t in range(a, b):
        P = A[:, :, t] @ P
    return P


def _starts(T, cu):
    s = torch.zeros(T, dtype=torch.bool)
    s[torch.tensor(cu[:-1])] = True
    s[0] = False
    return s


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunk_transitions_are_token_products(variant):
    """M_n is the product of the chunk's per-token K x K transitions (0 for a chunk holding a
    document start); U_n is the state the chunk leaves from zero (its last document only)."""
    T, C = 37, 8
    inputs = make_delta_inputs(variant, 2, T, 3, 5, 4, seed=11)
    A = _token_transitions(inputs)
    for cu in (None, [0, 3, 16, 21, 22, 37]):
        starts = None if cu is None else _starts(T, cu)
        c = prepare_delta(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], 0.7,
                          starts, chunk_size=C)
        M, U = delta_chunk_transitions(c)
        assert M.shape == (2, 3, 5, 5, 5) and U.shape == (2, 3, 5, 5, 4)
        for n in range(c.N):
            a, b = n * C, min((n + 1) * C, T)
            if starts is not None and bool(starts[a:b].any()):
                assert bool((M[:, :, n] == 0).all()), f"chunk {n} holds a start: M must be exactly 0"
                first = a + int(torch.nonzero(starts[a:b])[-1])  # the chunk's last document
            else:
                assert_close(f"M[{n}] cu={cu}", M[:, :, n], _product(A, a, b), torch.float64)
                first = a
            # Zero-state contribution of the chunk: the recurrence from zero over [first, b).
            sl = slice(first, b)
            _, ref_U = naive_linear_attention(
                inputs["q"][:, sl], inputs["k"][:, sl], inputs["v"][:, sl],
                None if inputs["g"] is None else inputs["g"][:, sl], inputs["beta"][:, sl],
                output_final_state=True)
            assert_close(f"U[{n}] cu={cu}", U[:, :, n], ref_U, torch.float64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_entry_transitions_and_linearity_in_the_incoming_state(variant):
    """Λ_n is the product of all token transitions before chunk n (Λ_N = Â), exactly 0 from a
    document start on; and with an incoming state P the segment's outputs and final state are
    intra + Q_eff (S_in(0) + Λ P) and S_N(0) + Λ_N P (what the sequence-parallel layer uses)."""
    T, C = 45, 8
    inputs = make_delta_inputs(variant, 1, T, 2, 4, 3, seed=12)
    A = _token_transitions(inputs)
    P = torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # The last case starts a document at the segment's first token: P must reach nothing.
    for cu, segment_starts_doc in ((None, False), ([0, 19, 24, 25, 45], False), ([0, 16, 45], False),
                                   ([0, 30, 45], True)):
        starts = None if cu is None else _starts(T, cu)
        if segment_starts_doc:
            starts[0] = True
        c = prepare_delta(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], 0.7,
                          starts, chunk_size=C)
        M, U = delta_chunk_transitions(c)
        Lam = delta_entry_transitions(c, M)
        assert Lam.shape == (1, 2, c.N + 1, 4, 4)
        first_start = None if cu is None else 0 if segment_starts_doc else cu[1]
        for n in range(c.N + 1):
            if first_start is not None and n * C > first_start:
                assert bool((Lam[:, :, n] == 0).all()), f"Λ[{n}] after a document start must be 0"
            else:
                assert_close(f"Λ[{n}] cu={cu}", Lam[:, :, n], _product(A, 0, min(n * C, T)), torch.float64)
        # The SP local work's forms without Λ (backends/torch_delta.py): the tree summary
        # (N = 6 chunks: rounds of 6, 3 (an odd carry), 2) and the adjoint sum G = Σ Λ_nᵀ dS_n.
        A_tree, S_tree = delta_segment_summary(M, U)
        assert_close(f"tree Â cu={cu}", A_tree, Lam[:, :, -1], torch.float64)
        assert_close(f"tree Ŝ cu={cu}", S_tree, scan_matrix_states(M, U, None)[:, :, -1], torch.float64)
        dS = torch.randn(1, 2, c.N, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        G_ref = (Lam[:, :, :-1].transpose(-1, -2) @ dS).sum(2)
        assert_close(f"adjoint G cu={cu}", delta_entry_adjoint(M, dS), G_ref, torch.float64)
        # Linearity in P: P enters only the segment's continuing document (0); later
        # documents start from zero.
        S = scan_matrix_states(M, U, None) + Lam @ P.unsqueeze(2)
        o = from_chunks(delta_intra_outputs(c) + delta_inter_query(c) @ S[:, :, :-1], T)
        bounds = torch.tensor([0, T] if cu is None else cu)
        h0 = torch.zeros(len(bounds) - 1, 2, 4, 3, dtype=torch.float64)
        if not segment_starts_doc:
            h0[0] = P[0]
        o_ref, ht_ref = naive_linear_attention(inputs["q"], inputs["k"], inputs["v"], inputs["g"],
                                               inputs["beta"], scale=0.7, initial_state=h0,
                                               output_final_state=True, cu_seqlens=bounds)
        assert_close(f"o cu={cu}", o, o_ref, torch.float64)
        assert_close(f"final cu={cu}", S[:, :, -1], ht_ref[-1:], torch.float64)


def test_scan_backward_matches_autograd_loop():
    """The hand-written adjoint of the matrix-state scan equals autograd through a plain loop."""
    gen = torch.Generator().manual_seed(7)
    M, U, S0 = (torch.randn(*s, generator=gen, dtype=torch.float64) * 0.5
                for s in ((2, 3, 5, 4, 4), (2, 3, 5, 4, 3), (2, 3, 4, 3)))
    W = torch.randn(2, 3, 6, 4, 3, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (M, U, S0)]
    got = torch.autograd.grad((scan_matrix_states(*leaves) * W).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (M, U, S0)]
    states = [ref_leaves[2]]
    for n in range(5):
        states.append(ref_leaves[0][:, :, n] @ states[-1] + ref_leaves[1][:, :, n])
    ref = torch.autograd.grad((torch.stack(states, 2) * W).sum(), ref_leaves)
    for name, a, b in zip(("dM", "dU", "dS0"), got, ref):
        assert_close(name, a, b, torch.float64)


def test_gradcheck_tiny():
    for variant in VARIANTS:
        inputs = make_delta_inputs(variant, 1, 7, 1, 3, 2, seed=8, n_states=3)
        cu = torch.tensor([0, 4, 5, 7])
        names = [n for n in ("q", "k", "v", "beta", "g", "initial_state") if inputs[n] is not None]

        def fn(*xs):
            kw = dict(inputs, **dict(zip(names, xs)))
            return delta_linear_attention(kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], scale=0.5,
                                          initial_state=kw["initial_state"], output_final_state=True,
                                          cu_seqlens=cu, chunk_size=3)

        xs = [inputs[n].clone().requires_grad_() for n in names]
        # fp64 central differences: truncation ~eps^2, rounding ~u/eps = 1e-10, so atol 1e-8.
        # fast_mode compares random projections u^T J v of the Jacobian (PyTorch's fast
        # gradcheck): a wrong gradient fails it with probability 1, at a fraction of the cost.
        assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-8, fast_mode=True)
