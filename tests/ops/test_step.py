"""``linear_attention_step`` (one decode token, the recurrent form) against ``linear_attention`` on
the whole sequence, token by token, fp64, for every variant of the layer table (``VARIANTS`` of
``lasp2.nn.linear_attention``: feature maps, fixed and learned gates, the delta rule), from a
nonzero initial state: every output row, the final state, and the gradients of every input."""
from __future__ import annotations

import pytest
import torch

import lasp2
from lasp2.nn.linear_attention import VARIANTS, LinearAttention
from tests.helpers import assert_close

B, T, HIDDEN, H, D = 2, 7, 12, 2, 4


def _variant_inputs(variant: str, seed: int = 0):
    """q, k, v, g, beta [B, T, ...] as the variant's layer forms them (fp64), and its scale."""
    torch.manual_seed(seed)
    layer = LinearAttention(HIDDEN, H, D, variant, feature_dim=3).double()
    x = torch.randn(B, T, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        q = layer._features(layer.q_proj(x).view(B, T, H, -1))
        k = layer._features(layer.k_proj(x).view(B, T, H, -1))
        v = layer.v_proj(x).view(B, T, H, D) * 10  # O(1) values: the checks are relative
        beta = torch.sigmoid(layer.b_proj(x) * 10) if layer.row.beta else None
        g = layer._gate(x)
    return dict(q=q, k=k, v=v, g=g, beta=beta), layer.scale


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_matches_linear_attention_token_by_token(variant):
    inputs, scale = _variant_inputs(variant)
    K = inputs["q"].shape[-1]
    S0 = torch.randn(B, H, K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = [n for n in ("q", "k", "v", "g", "beta") if inputs[n] is not None]
    w_o = torch.randn(B, T, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w_s = torch.randn(B, H, K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    ref = {n: inputs[n].clone().requires_grad_() for n in names}
    ref_S0 = S0.clone().requires_grad_()
    o_ref, s_ref = lasp2.linear_attention(*(ref.get(n) for n in ("q", "k", "v", "g", "beta")), scale=scale,
                                          initial_state=ref_S0, output_final_state=True, backend="torch")
    ref_grads = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), [ref[n] for n in names] + [ref_S0])

    leaves = {n: inputs[n].clone().requires_grad_() for n in names}
    leaf_S0 = S0.clone().requires_grad_()
    state, outs = leaf_S0, []
    for t in range(T):
        o_t, state = lasp2.linear_attention_step(*(None if leaves.get(n) is None else leaves[n][:, t]
                                                   for n in ("q", "k", "v", "g", "beta")), state=state, scale=scale)
        assert o_t.shape == (B, H, D) and state.dtype == torch.float64
        outs.append(o_t)
    o = torch.stack(outs, dim=1)
    grads = torch.autograd.grad((o * w_o).sum() + (state * w_s).sum(), [leaves[n] for n in names] + [leaf_S0])

    assert_close("o", o, o_ref, torch.float64)
    assert_close("final state", state, s_ref, torch.float64)
    for n, got, want in zip(names + ["initial_state"], grads, ref_grads):
        assert_close(f"d{n}", got, want, torch.float64)
    # the state matters: from a zero state the outputs differ (so a lost state cannot pass)
    o_zero, _ = lasp2.linear_attention_step(*(None if inputs[n] is None else inputs[n][:, 0]
                                              for n in ("q", "k", "v", "g", "beta")),
                                            state=torch.zeros_like(S0), scale=scale)
    assert (o_zero - o_ref[:, 0]).abs().max() > 1e-3


def test_step_fp32_state_from_half_inputs():
    """bf16 tokens keep an fp32 state (DESIGN §1, numerics) and return a bf16 output."""
    q, k = torch.randn(2, B, H, 3, dtype=torch.bfloat16)
    v = torch.randn(B, H, D, dtype=torch.bfloat16)
    o, S = lasp2.linear_attention_step(q, k, v, state=torch.zeros(B, H, 3, D))
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.randn(B, 1, H, 3)), "q must have 3 dims"),
    (dict(g=torch.zeros(B, H, 5)), "g must have shape"),
    (dict(g=torch.ones(B, H)), "g is a log-space decay"),
    (dict(beta=torch.zeros(B, 1, H)), "beta must have shape"),
    (dict(state=torch.zeros(B, H, D, 3)), "state must have shape"),
    (dict(state=None), "state must be a tensor"),
    (dict(scale=-1.0), "scale must be a positive"),
])
def test_step_misuse(bad, match):
    args = dict(q=torch.randn(B, H, 3), k=torch.randn(B, H, 3), v=torch.randn(B, H, D), g=None, beta=None,
                state=torch.zeros(B, H, 3, D), scale=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        lasp2.linear_attention_step(args["q"], args["k"], args["v"], args["g"], args["beta"], state=args["state"],
                                    scale=args["scale"])
