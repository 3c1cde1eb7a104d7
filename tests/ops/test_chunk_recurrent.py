"""The per-channel gate's small-V intra-chunk form (``ops/chunk_recurrent.py``, Mamba1: V = 1)
against the per-token recurrence of ``ops/naive.py``, fp64 to 1e-10: outputs, final states and
every gradient (q, k, v, g, initial states), with and without documents (per-document initial
states, a document start inside a chunk), with resets (-inf and underflowing gates at a chunk's
first and last token, two in a row, on a document start, on one channel only). A spy checks that
the recurrent form is the one that ran. The sequence-parallel paths take the same form through
``chunk.intra_outputs`` (``tests/parallel/test_sp_linear.py``: per-channel gates at V = 3, 4).
"""
from __future__ import annotations

import pytest
import torch

import lasp2
from lasp2.ops import chunk, chunk_recurrent
from lasp2.ops.naive import naive_linear_attention
from tests.helpers import assert_close, loss_weights, make_inputs, run_with_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

T, H, K = 100, 2, 8  # chunks of 16: six full, one partial
CU = [0, 5, 16, 17, 50, 100]  # starts inside a chunk and on a chunk's first token; [16, 17) one token
RESETS = (0, 15, 31, 32, 50, 70)  # a chunk's first / last token, two in a row, a document start


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = chunk_recurrent.intra_outputs

    def counted(c):
        calls.append(c.v.shape[-1])
        return real(c)

    monkeypatch.setattr(chunk_recurrent, "intra_outputs", counted)
    return calls


@pytest.mark.parametrize("V", [1, 2])
@pytest.mark.parametrize("docs", [False, True], ids=["one-sequence", "documents"])
@pytest.mark.parametrize("resets", [False, True], ids=["no-reset", "resets"])
def test_recurrent_intra_matches_naive(V, docs, resets, spy):
    n_states = len(CU) - 1 if docs else 1
    x = make_inputs("channel", 1, T, H, K, V, seed=V, n_states=n_states)
    if resets:
        g = x["g"].clone()
        g[:, list(RESETS)] = float("-inf")
        g[:, 40, :, 3] = -800.0  # below fp64's reset floor on one channel: a reset too
        x["g"] = g
    cu = torch.tensor(CU) if docs else None
    weights = loss_weights(1, T, H, K, V, n_states, seed=1)
    got = run_with_loss(lasp2.linear_attention, x, weights, cu)
    assert spy == [V], f"the recurrent intra-chunk form must run once (V = {V}): {spy}"
    ref = run_with_loss(naive_linear_attention, x, weights, cu)
    for name in ref:
        assert_close(name, got[name], ref[name], torch.float64)
    if resets:
        reset = x["g"] < chunk.reset_floor(torch.float64)
        assert bool((got["dg"][reset] == 0).all()), "the gradient at a reset gate is exactly 0"
        assert bool((got["dg"][~reset] != 0).any())


def test_pair_form_keeps_larger_v(spy):
    """V above ``MAX_RECURRENT_V`` keeps the pair form (C^2 K per chunk); scalar gates never use
    the recurrence (their pair form is one matmul)."""
    V = chunk_recurrent.MAX_RECURRENT_V + 1
    for variant, v in (("channel", V), ("scalar", 1)):
        x = make_inputs(variant, 1, 20, 1, 4, v, seed=0)
        lasp2.linear_attention(x["q"], x["k"], x["v"], x["g"])
    assert spy == []
