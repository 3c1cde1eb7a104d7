"""A gate of -inf ("forget everything", what logsigmoid(-120.) gives in fp32)
must not turn the chunked ops' masked exponents into NaN (-inf - -inf).

The chunked ops are compared with the per-token recurrence of ``naive.py`` (where exp(-inf) = 0)
in fp64 to 1e-10: outputs, final states and every gradient, for every gated variant, with and
without documents and per-document initial states, with resets at a chunk's first and last
token, on a document start, and on one channel only. The gradient with respect to a -inf gate
is exactly 0 (the limit: every path through gate s carries exp(g_s), whose derivative is 0).
The sequence-parallel paths are covered in ``test_reliab_dist.py``.
"""
from __future__ import annotations

import pytest
import torch

import lasp2
from lasp2.ops.naive import naive_linear_attention
from tests.helpers import assert_close, make_inputs

INF = float("-inf")
# T = 80; chunks of 16 (K = V = 8, diagonal gates) or 64 (delta rule), the last one partial.
# Resets at token 0 (a chunk's first), 15 and 63 (a chunk's last), 40 and 41 (two in a row), 70
# (a document start below) and, for per-channel gates, one channel of token 5.
RESETS = (0, 15, 40, 41, 63, 70)
CU = [0, 30, 70, 80]


def _inputs(variant: str, dtype=torch.float64, docs: bool = False, fill: float = INF):
    x = make_inputs(variant, 1, 80, 2, 8, 8, seed=3, dtype=dtype, n_states=3 if docs else 1)
    g = x["g"].clone()
    g[:, list(RESETS)] = fill
    if g.dim() == 4:
        g[:, 5, :, 1] = fill
    x["g"] = g
    return x


def _run(fn, x, cu):
    names = [n for n in ("q", "k", "v", "g", "beta", "initial_state") if x.get(n) is not None]
    leaves = {n: x[n].clone().requires_grad_() for n in names}
    o, ht = fn(*(leaves.get(n) for n in ("q", "k", "v", "g", "beta")), initial_state=leaves["initial_state"],
               output_final_state=True, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(7)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    wh = torch.randn(ht.shape, generator=gen, dtype=torch.float64)
    loss = (o.double() * wo).sum() + (ht.double() * wh).sum()
    return o, ht, dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))


@pytest.mark.parametrize("docs", [False, True], ids=["one-sequence", "documents"])
@pytest.mark.parametrize("variant", ["scalar", "channel", "gated_deltanet", "kda"])
def test_neg_inf_gate_matches_naive(variant, docs):
    x = _inputs(variant, docs=docs)
    cu = torch.tensor(CU) if docs else None
    o, ht, grads = _run(lasp2.linear_attention, x, cu)
    o_ref, ht_ref, grads_ref = _run(naive_linear_attention, x, cu)
    assert_close("o", o, o_ref, torch.float64)
    assert_close("final state", ht, ht_ref, torch.float64)
    for n, ref in grads_ref.items():
        assert_close(f"d{n}", grads[n], ref, torch.float64)
    reset = x["g"] == INF
    assert bool((grads["g"][reset] == 0).all()), "the gradient at a -inf gate is exactly 0"
    assert bool((grads["g"][~reset] != 0).any())


@pytest.mark.parametrize("variant", ["scalar", "channel", "gated_deltanet"])
def test_neg_inf_equals_any_underflowing_gate(variant):
    """g = -inf, -800 (and -1e30) give identical results in fp32: exp underflows to 0 for all of
    them, so they are resets (-1e30 used to swallow every later gate of its chunk in the sums)."""
    fills = (INF, -800.0, -1e30) if variant == "scalar" else (INF, -800.0)
    outs = [_run(lasp2.linear_attention, _inputs(variant, torch.float32, fill=f), None) for f in fills]
    for o, ht, grads in outs:
        assert torch.isfinite(o).all() and torch.isfinite(ht).all()
        assert all(torch.isfinite(t).all() for t in grads.values())
    for o, ht, grads in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(ht, outs[0][1])
        for n in grads:
            assert torch.equal(grads[n], outs[0][2][n]), n
