"""The transition kinds (``lasp2.ops.transition``) against dense K x K matrices.

Every kind stores a segment's transition Â in its own form (a decay vector [B, H, 1] or
[B, H, K], or a matrix [B, H, K, K]); each operation the strategies use is checked against the
same operation on the dense matrix that form stands for, built here from the DESIGN §1 table and
never through the module's own algebra. Gradients are checked against autograd through the dense
product. fp64 throughout: exact identities, so 1e-12 relative leaves no room for an algorithmic
error.
"""
from __future__ import annotations

import pytest
import torch

import lasp2
from lasp2.ops import transition
from lasp2.nn.gates import LowRankChannelGate, Mamba2Gate
from lasp2.nn.linear_attention import VARIANTS, LinearAttention, Variant
from lasp2.ops.transition import CHANNEL_MATRIX, DIAGONAL, IDENTITY, MATRIX, SCALAR, classify
from tests.helpers import max_rel_err

TOL = 1e-12
B, H, K, V, M = 2, 3, 4, 5, 6
SUPPORTED = (IDENTITY, SCALAR, DIAGONAL, MATRIX, CHANNEL_MATRIX)
# Â's stored shape per kind (DESIGN §1: a scalar, a K-vector, or a full matrix per batch and head).
STORED = {"identity": (1,), "scalar": (1,), "diagonal": (K,), "matrix": (K, K), "channel_matrix": (K, K)}


def _random_transition(kind, *lead, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, *STORED[kind.name], generator=gen, dtype=torch.float64)


def _dense(A: torch.Tensor, kind) -> torch.Tensor:
    """The K x K matrix a stored Â stands for: diag of the (broadcast) decay vector, or Â itself.
    Differentiable, so autograd through it is an independent reference for the gradients."""
    if len(STORED[kind.name]) == 2:
        return A
    return torch.diag_embed(A.expand(*A.shape[:-1], K))


def _states(*lead, seed=1):
    return torch.randn(*lead, K, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kind", SUPPORTED, ids=lambda k: k.name)
def test_apply_and_transpose_match_the_dense_matrix(kind):
    A, X = _random_transition(kind, B, H), _states(B, H)
    assert tuple(A.shape) == kind.algebra.shape(B, H, K)
    assert max_rel_err(kind.apply(A, X), _dense(A, kind) @ X) <= TOL
    assert max_rel_err(kind.apply(A, X, transpose=True), _dense(A, kind).transpose(-1, -2) @ X) <= TOL
    assert max_rel_err(_dense(kind.transpose(A), kind), _dense(A, kind).transpose(-1, -2)) <= TOL


@pytest.mark.parametrize("kind", SUPPORTED, ids=lambda k: k.name)
def test_compose_matches_dense_products_and_is_associative(kind):
    summaries = [(_random_transition(kind, B, H, seed=s), _states(B, H, seed=10 + s)) for s in range(3)]
    A, X = kind.compose(summaries[1], summaries[0])
    (A2, X2), (A1, X1) = summaries[1], summaries[0]
    assert max_rel_err(_dense(A, kind), _dense(A2, kind) @ _dense(A1, kind)) <= TOL
    assert max_rel_err(X, _dense(A2, kind) @ X1 + X2) <= TOL
    left = kind.compose(kind.compose(summaries[2], summaries[1]), summaries[0])
    right = kind.compose(summaries[2], kind.compose(summaries[1], summaries[0]))
    for got, ref in zip(left, right):
        assert max_rel_err(got, ref) <= TOL
    # a document start in the later segment (Â = 0) forgets everything before it
    A0, X0 = kind.compose((torch.zeros_like(A2), X2), summaries[0])
    assert bool((A0 == 0).all()) and torch.equal(X0, X2)


@pytest.mark.parametrize("kind", SUPPORTED, ids=lambda k: k.name)
def test_grad_is_autograd_through_the_dense_product(kind):
    """What Â receives from Y = Â P given D = dL/dY: D P^T in Â's own form (DESIGN §1)."""
    A = _random_transition(kind, B, H).requires_grad_()
    P, D = _states(B, H, seed=2), _states(B, H, seed=3)
    (ref,) = torch.autograd.grad(((_dense(A, kind) @ P) * D).sum(), [A])
    assert max_rel_err(kind.grad(D, P), ref) <= TOL


@pytest.mark.parametrize("kind", SUPPORTED, ids=lambda k: k.name)
def test_stacked_pieces_match_dense_loops(kind):
    """The chunk-entry forms the torch backend uses: S_n + Λ_n P, sum_n Λ_n^T dS_n and dL/dΛ_n."""
    Lam = _random_transition(kind, B, H, M).requires_grad_()
    S, dS = _states(B, H, M, seed=4), _states(B, H, M, seed=5)
    P = _states(B, H, seed=6)
    dense = _dense(Lam, kind)  # [B, H, M, K, K]
    algebra = kind.algebra
    assert max_rel_err(algebra.entry_states(S, Lam.detach(), P), S + dense.detach() @ P.unsqueeze(2)) <= TOL
    G = sum(dense[:, :, n].detach().transpose(-1, -2) @ dS[:, :, n] for n in range(M))
    assert max_rel_err(algebra.adjoint_sum(Lam.detach(), dS), G) <= TOL
    (ref,) = torch.autograd.grad(((dense @ P.unsqueeze(2)) * dS).sum(), [Lam])
    assert max_rel_err(algebra.stacked_grad(Lam.detach(), dS, P), ref) <= TOL


def test_classify_names_every_argument_combination():
    q = torch.zeros(B, 7, H, K)
    scalar, channel, beta = torch.zeros(B, 7, H), torch.zeros(B, 7, H, K), torch.zeros(B, 7, H)
    assert classify(None, None) is IDENTITY
    assert classify(scalar, None) is SCALAR
    assert classify(channel, None) is DIAGONAL
    assert classify(None, beta) is MATRIX and classify(scalar, beta) is MATRIX
    assert tuple(SCALAR.gate_channels(scalar).shape) == (B, 7, H, 1)
    assert DIAGONAL.gate_channels(channel) is channel and IDENTITY.gate_channels(None) is None
    assert classify(channel, beta) is CHANNEL_MATRIX  # KDA
    assert CHANNEL_MATRIX.gate_channels(channel) is channel and CHANNEL_MATRIX.matrix


def test_a_declared_unsupported_kind_is_refused_in_one_place(monkeypatch):
    """``kind_of`` is the one place a declared kind without an implementation is refused; the
    public function reaches it before any work (no kind is unsupported today: declare one)."""
    q, channel, beta = torch.zeros(B, 7, H, K), torch.zeros(B, 7, H, K), torch.zeros(B, 7, H)
    declared = transition.Kind("declared", "channel", True, transition.MATRICES, unsupported="not built yet: use X")
    monkeypatch.setitem(transition._BY_ARGUMENTS, ("channel", True), declared)
    with pytest.raises(ValueError, match="not built yet: use X"):
        classify(channel, beta)
    with pytest.raises(ValueError, match="not built yet: use X"):
        lasp2.linear_attention(q, q, q, -channel.abs() - 1, beta)


# --------------------------------------------------------------------------------------------
# The layer table: each row names its kind, and the layer passes the op arguments of that kind.


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_rows_name_the_kind_their_arguments_have(variant):
    layer = LinearAttention(16, 2, 4, variant, feature_dim=3).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = layer._gate(x)
    beta = torch.sigmoid(layer.b_proj(x)) if VARIANTS[variant].beta else None
    assert classify(g, beta) is layer.kind is VARIANTS[variant].kind


def test_a_new_variant_of_an_existing_kind_is_one_row(monkeypatch):
    monkeypatch.setitem(VARIANTS, "simple_gla", Variant(gate=Mamba2Gate()))
    layer = LinearAttention(16, 2, 4, "simple_gla").double()
    x = torch.randn(1, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert layer.kind is SCALAR and torch.isfinite(layer(x)).all()
    # a row of a declared, unsupported kind is refused where the layer is built
    declared = transition.Kind("declared", "channel", True, transition.MATRICES, unsupported="not built yet")
    monkeypatch.setitem(transition._BY_ARGUMENTS, ("channel", True), declared)
    monkeypatch.setitem(VARIANTS, "gla_delta", Variant(gate=LowRankChannelGate(), beta=True))
    with pytest.raises(ValueError, match="not built yet"):
        LinearAttention(16, 2, 4, "gla_delta")
