"""The cross-segment algebra of the linear SP strategies, in one process.

``fold_forward`` / ``fold_backward`` and the summary composition ``compose`` are checked against
references that do not use them: the single-device op run on whole prefixes of the sequence
(the state entering each segment), transitions Â built token by token from the gates, and
autograd through the forward fold. fp64 throughout: these are exact algebraic identities, so
the only error is rounding (~1e-13 here); 1e-10 relative leaves no room for an algorithmic one.
"""
from __future__ import annotations

import pytest
import torch

import lasp2
from lasp2.ops.transition import DIAGONAL, MATRIX, classify
from lasp2.parallel.linear_local import compose, fold_backward, fold_forward
from tests.helpers import DELTA_VARIANTS, DIAGONAL_VARIANTS, max_rel_err, make_inputs

TOL = 1e-10
VARIANTS = DIAGONAL_VARIANTS + DELTA_VARIANTS
B, H, K, V = 2, 2, 3, 4
BOUNDS = [0, 5, 6, 13, 21, 22]  # 5 segments of unequal length, one of a single token


def _slice(x, a, b):
    return None if x is None else x[:, a:b]


def _transition(variant, inp, a, b):
    """Â of tokens [a, b) token by token from the definition (DESIGN §1 table):
    [B, H, Kg] decay vectors (Kg = 1 scalar, K per-channel) or [B, H, K, K] matrices."""
    g, beta, k = _slice(inp["g"], a, b), _slice(inp.get("beta"), a, b), inp["k"][:, a:b]
    if variant in DIAGONAL_VARIANTS:
        if g is None:
            return torch.ones(B, H, 1, dtype=torch.float64)
        total = g.sum(1)
        return total.exp().unsqueeze(-1) if total.dim() == 2 else total.exp()
    A = torch.eye(K, dtype=torch.float64).expand(B, H, K, K).clone()
    for t in range(b - a):
        kt = k[:, t]  # [B, H, K]
        step = torch.eye(K, dtype=torch.float64) - beta[:, t, :, None, None] * kt.unsqueeze(-1) * kt.unsqueeze(-2)
        if g is not None:
            step = step * g[:, t].exp()[..., None, None]
        A = step @ A
    return A


def _state_after(variant, inp, a, b):
    """The state at token b for a zero state at token a: the single-device op's final state."""
    if b == a:
        return torch.zeros(B, H, K, V, dtype=torch.float64)
    args = [_slice(inp.get(n), a, b) for n in ("q", "k", "v", "g", "beta")]
    return lasp2.linear_attention(*args, output_final_state=True)[1]


def _summaries(variant, inp, bounds=BOUNDS):
    pairs = list(zip(bounds[:-1], bounds[1:]))
    S = torch.stack([_state_after(variant, inp, a, b) for a, b in pairs])
    A = torch.stack([_transition(variant, inp, a, b) for a, b in pairs])
    return S, A


@pytest.mark.parametrize("variant", VARIANTS)
def test_fold_forward_gives_the_state_entering_each_segment(variant):
    inp = make_inputs(variant, B, BOUNDS[-1], H, K, V, seed=3)
    S, A = _summaries(variant, inp)
    P = fold_forward(classify(inp["g"], inp.get("beta")), S, A)
    ref = torch.zeros(B, H, K, V, dtype=torch.float64)  # the state entering segment 0
    for j, (a, b) in enumerate(zip(BOUNDS[:-1], BOUNDS[1:])):
        assert max_rel_err(P[j], ref, ref.abs().max() + 1) <= TOL, f"P_{j}"
        # the next segment's incoming state: the single-device op run on this segment from `ref`
        args = [_slice(inp.get(n), a, b) for n in ("q", "k", "v", "g", "beta")]
        ref = lasp2.linear_attention(*args, initial_state=ref, output_final_state=True)[1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_gives_the_summary_of_the_joined_segments(variant):
    inp = make_inputs(variant, B, BOUNDS[-1], H, K, V, seed=4)
    S, A = _summaries(variant, inp)
    kind = classify(inp["g"], inp.get("beta"))
    for i, j in ((0, 1), (1, 3), (0, 4)):  # segments i..j joined
        got_A, got_S = A[i], S[i]
        for m in range(i + 1, j + 1):
            got_A, got_S = compose(kind, (A[m], S[m]), (got_A, got_S))
        a, b = BOUNDS[i], BOUNDS[j + 1]
        ref_S, ref_A = _state_after(variant, inp, a, b), _transition(variant, inp, a, b)
        assert max_rel_err(got_S, ref_S) <= TOL, f"Ŝ of segments {i}..{j}"
        assert max_rel_err(got_A, ref_A) <= TOL, f"Â of segments {i}..{j}"


@pytest.mark.parametrize("matrices", [False, True])
def test_compose_is_associative_and_zero_transition_resets(matrices):
    gen = torch.Generator().manual_seed(5)
    shape = (B, H, K, K) if matrices else (B, H, K)
    kind = MATRIX if matrices else DIAGONAL
    x = [(torch.randn(*shape, generator=gen, dtype=torch.float64),
          torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)) for _ in range(3)]
    left = compose(kind, compose(kind, x[2], x[1]), x[0])
    right = compose(kind, x[2], compose(kind, x[1], x[0]))
    for got, ref in zip(left, right):
        assert max_rel_err(got, ref) <= TOL
    # A document start inside the later segment (Â = 0) forgets everything before it.
    reset = (torch.zeros(shape, dtype=torch.float64), x[2][1])
    A, S = compose(kind, reset, x[0])
    assert bool((A == 0).all()) and torch.equal(S, x[2][1])


@pytest.mark.parametrize("variant", ["scalar", "channel", "gated_deltanet"])
def test_fold_backward_is_the_gradient_of_the_forward_fold(variant):
    """N_j = D_{j+1} is dL/dŜ_j for L = sum_j <G_j, P_j>, P = fold_forward(Ŝ, Â): checked with
    autograd through the forward fold (a different computation from the suffix fold)."""
    inp = make_inputs(variant, B, BOUNDS[-1], H, K, V, seed=6)
    S, A = _summaries(variant, inp)
    kind = classify(inp["g"], inp.get("beta"))
    S = S.clone().requires_grad_()
    G = torch.randn(S.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (dS,) = torch.autograd.grad((fold_forward(kind, S, A) * G).sum(), [S])
    N = fold_backward(kind, G, A)
    assert max_rel_err(N, dS) <= TOL
    assert bool((N[-1] == 0).all()), "nothing follows the last segment"


def _in_memory_deliver(d, outgoing):
    """Round d of the doubling scan with every element in this process: i receives i - 2^d's."""
    return {i + (1 << d): s for i, s in outgoing.items()}


@pytest.mark.parametrize("matrices", [False, True])
def test_tree_scan_matches_the_sequential_folds(matrices):
    """``tree.doubling_scan`` (recursive doubling over J elements, any J) gives fold_forward's P
    on (Â, Ŝ) in sequence order and fold_backward's N on (Â^T, G) in reverse order."""
    from lasp2.parallel.tree import doubling_scan, tree_rounds

    gen = torch.Generator().manual_seed(8)
    kind = MATRIX if matrices else DIAGONAL
    for J in range(1, 10):
        shape = (J, B, H, K, K) if matrices else (J, B, H, K)
        A = torch.rand(*shape, generator=gen, dtype=torch.float64) * (0.5 if matrices else 1.0)
        S = torch.randn(J, B, H, K, V, generator=gen, dtype=torch.float64)
        rounds = []

        def deliver(d, outgoing):
            rounds.append(d)
            return _in_memory_deliver(d, outgoing)

        P = doubling_scan(kind, {j: (A[j], S[j]) for j in range(J)}, J, deliver)
        ref = fold_forward(kind, S, A)
        for j in range(J):
            assert max_rel_err(P[j], ref[j], ref.abs().max() + 1) <= TOL, f"J={J} P_{j}"
        assert len(rounds) == tree_rounds(J) == (J - 1).bit_length(), f"J={J}: {len(rounds)} rounds"
        At = A.transpose(-1, -2) if matrices else A
        N = doubling_scan(kind, {J - 1 - j: (At[j], S[j]) for j in range(J)}, J, _in_memory_deliver)
        ref = fold_backward(kind, S, A)
        for j in range(J):
            assert max_rel_err(N[J - 1 - j], ref[j], ref.abs().max() + 1) <= TOL, f"J={J} N_{j}"
