"""One decode step of linear attention: the recurrent form (DESIGN §1) for one token.

After a prefill (``linear_attention`` or ``sp_linear_attention`` with ``output_final_state``)
has left the state S after the prompt, each generated token costs one step:

    S' = A S + k^T vbar          o = scale * q S'

with A and vbar of the variant (``ops.transition``: identity, scalar or per-channel gate, the
delta rule with an optional scalar gate): the same loop body as ``naive.py``, one token at a
time, no chunking. Shapes (one token, no T axis):

    q, k  [B, H, K]     v  [B, H, V]     g  None | [B, H] | [B, H, K]     beta  None | [B, H]
    state [B, H, K, V]
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..validation import check_beta, check_gate, check_qkv, check_scale, check_tensor
from .common import compute_dtype, default_scale
from .transition import Kind, classify


def recurrent_step(q, k, v, g, beta, kind: Kind, scale: float, state: torch.Tensor):
    """The step on validated tensors in the compute dtype: (o [B, H, V], new state [B, H, K, V])."""
    S = state
    if g is not None:  # exp(g) I or diag(exp(g)): the rows of S scaled
        S = S * (g.unsqueeze(-1) if kind.gate == "channel" else g[..., None, None]).exp()
    if kind.delta:  # S <- (I - b k^T k) S + b k^T v: replace the value stored under k
        predicted = torch.einsum("bhk,bhkv->bhv", k, S)
        S = S + torch.einsum("bhk,bhv->bhkv", k, beta.unsqueeze(-1) * (v - predicted))
    else:
        S = S + torch.einsum("bhk,bhv->bhkv", k, v)
    return scale * torch.einsum("bhk,bhkv->bhv", q, S), S


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    *,
    state: torch.Tensor,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token of causal linear attention in the recurrent form, every variant of DESIGN §1.

    Args:
        q, k: [B, H, K]; v: [B, H, V] — one token (``x[:, -1]`` of a [B, T, H, D] tensor), one
            floating dtype.
        g: None, [B, H] (scalar gate / constant decay) or [B, H, K] (per-channel gate), log
            space, <= 0. beta: None, or [B, H] in [0, 1] for the delta rule (g then None or [B, H]).
        state: [B, H, K, V], the state after the previous token (any floating dtype; e.g. the
            final state of ``linear_attention`` / ``sp_linear_attention``).
        scale: defaults to K**-0.5 (pass the same scale as the prefill).

    Returns:
        (o [B, H, V] in q's dtype, new state [B, H, K, V] fp32 — fp64 for fp64 inputs —).
        Exactly the token's row of ``linear_attention`` run on the whole sequence with
        ``initial_state=state``. Differentiable w.r.t. every input.

    Communication: none (after an SP prefill every rank holds the same state and steps alone).
    """
    _check_step(q, k, v, g, beta, state, scale)
    kind = classify(None if g is None else g.unsqueeze(1), beta)
    dt = compute_dtype(q.dtype)
    scale = default_scale(scale, q.shape[-1])
    as_dt = [None if t is None else t.to(dt) for t in (q, k, v, g, beta, state)]
    o, S = recurrent_step(*as_dt[:5], kind, scale, as_dt[5])
    return o.to(q.dtype), S


def _check_step(q, k, v, g, beta, state, scale) -> None:
    """ValueError naming the argument (shapes in the one-token form, then the shared checks on a
    T = 1 view: dtypes, devices, gate and beta values)."""
    check_tensor("q", q, 3, "[B, H, K] (one token)")
    check_tensor("k", k, 3, "[B, H, K] (one token)")
    check_tensor("v", v, 3, "[B, H, V] (one token)")
    B, H, K = q.shape
    if g is not None:
        if not isinstance(g, torch.Tensor) or tuple(g.shape) not in ((B, H), (B, H, K)):
            raise ValueError(f"g must have shape [B, H] = {(B, H)} (scalar gate) or [B, H, K] = {(B, H, K)} "
                             f"(per-channel gate) for one token, got "
                             f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
    if beta is not None:
        if not isinstance(beta, torch.Tensor) or tuple(beta.shape) != (B, H):
            raise ValueError(f"beta must have shape [B, H] = {(B, H)} for one token, got "
                             f"{tuple(beta.shape) if isinstance(beta, torch.Tensor) else type(beta).__name__}")
    q1 = q.unsqueeze(1)
    check_qkv(q1, k.unsqueeze(1), v.unsqueeze(1))
    check_gate(None if g is None else g.unsqueeze(1), q1)
    check_beta(None if beta is None else beta.unsqueeze(1), q1)
    check_scale(scale)
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"state must be a tensor [B, H, K, V] (the state after the previous token; zeros "
                         f"before the first), got {type(state).__name__}")
    check_tensor("state", state, 4, "[B, H, K, V]")
    if tuple(state.shape) != (B, H, K, v.shape[-1]):
        raise ValueError(f"state must have shape [B, H, K, V] = {(B, H, K, v.shape[-1])}, got {tuple(state.shape)}")
    if state.device != q.device:
        raise ValueError(f"state is on {state.device} but q is on {q.device}; move it with state.to(q.device)")
