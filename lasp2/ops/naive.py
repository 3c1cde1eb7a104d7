"""The specification: per-token recurrences for every linear-attention variant.

Written to be read, not to be fast. Every faster op in lasp2 is tested against these loops.

Shape legend (fla layout): B batch, T tokens, H heads, K key/query dim, V value dim,
N documents (with ``cu_seqlens``).

    q, k  [B, T, H, K]      v  [B, T, H, V]
    g     None | [B, T, H] (scalar gate, log space, <= 0) | [B, T, H, K] (per-channel gate)
    beta  None | [B, T, H]  (delta rule)
    state [B, H, K, V]  (or [N, H, K, V] with cu_seqlens, B == 1)

The recurrence (DESIGN §1), per batch element and head, rows q_s, k_s in R^K, v_s in R^V; the
kind of A_s is ``transition.classify(g, beta)`` (identity, scalar, diagonal, matrix, channel_matrix):

    S_s = A_s S_{s-1} + k_s^T vbar_s          o_s = scale * q_s S_s

    no g, no beta   A_s = I                                vbar_s = v_s
    g [B,T,H]       A_s = exp(g_s) I                       vbar_s = v_s
    g [B,T,H,K]     A_s = diag(exp(g_s))                   vbar_s = v_s
    beta            A_s = exp(g_s) (I - beta_s k_s^T k_s)  vbar_s = beta_s v_s  (g None or [B,T,H])
    g [B,T,H,K] + beta  A_s = (I - beta_s k_s^T k_s) diag(exp(g_s))  vbar_s = beta_s v_s  (KDA: the
                    gate first, then the delta step, as transformers' kimi_linear and fla's naive KDA)

A document start resets the state to the document's initial state (zero when none is given),
*before* the start token's own transition is applied: S_s = A_s h0 + k_s^T vbar_s.

Computation happens in float64 for float64 inputs and in float32 otherwise; states are returned
in that dtype, outputs in the input dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .common import compute_dtype, default_scale
from .transition import classify


def _recurrent_one_sequence(q, k, v, g, beta, kind, scale, h0):
    """One sequence, all batch elements and heads at once.

    q, k [B, T, H, K]; v [B, T, H, V]; g None | [B, T, H] | [B, T, H, K]; beta None | [B, T, H];
    kind = ``transition.classify(g, beta)``; h0 [B, H, K, V]. Returns o [B, T, H, V] and the
    final state [B, H, K, V].
    """
    S = h0.clone()
    gk = kind.gate_channels(g)  # [B, T, H, Kg]: Kg = 1 (scalar gate) or K (per channel)
    outputs = []
    for s in range(q.shape[1]):
        q_s, k_s, v_s = q[:, s], k[:, s], v[:, s]  # [B, H, K], [B, H, K], [B, H, V]
        if gk is not None:
            S = S * gk[:, s].exp()[..., None]  # exp(g_s) I or diag(exp(g_s)): rows of S scaled
        if kind.delta:
            b = beta[:, s][..., None]  # [B, H, 1]
            # Delta rule: S <- (I - b k^T k) S + b k^T v, i.e. replace the value stored under k.
            predicted = torch.einsum("bhk,bhkv->bhv", k_s, S)
            S = S + torch.einsum("bhk,bhv->bhkv", k_s, b * (v_s - predicted))
        else:
            S = S + torch.einsum("bhk,bhv->bhkv", k_s, v_s)
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q_s, S))
    return torch.stack(outputs, dim=1), S


def naive_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention by the per-token recurrence (the specification).

    Args: see the module docstring for shapes. ``cu_seqlens`` [N + 1] int: packed documents
    (B must be 1); ``initial_state`` is then [N, H, K, V], one per document.
    Returns (o [B, T, H, V] in q's dtype, final state [B or N, H, K, V] or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    kind = classify(g, beta)
    dt, out_dtype = compute_dtype(q.dtype), q.dtype
    scale = default_scale(scale, K)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    g = None if g is None else g.to(dt)
    beta = None if beta is None else beta.to(dt)
    if cu_seqlens is None:
        h0 = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
        o, ht = _recurrent_one_sequence(q, k, v, g, beta, kind, scale, h0)
        return o.to(out_dtype), (ht if output_final_state else None)

    bounds = [int(x) for x in cu_seqlens.tolist()]
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = q.new_zeros(1, H, K, V) if initial_state is None else initial_state[n : n + 1].to(dt)
        sl = slice(a, b)
        o_n, ht_n = _recurrent_one_sequence(
            q[:, sl], k[:, sl], v[:, sl],
            None if g is None else g[:, sl],
            None if beta is None else beta[:, sl],
            kind, scale, h0,
        )
        outs.append(o_n)
        finals.append(ht_n)
    o = torch.cat(outs, dim=1).to(out_dtype)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def naive_bidirectional_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Non-causal basic linear attention: o_s = scale * q_s * sum_t k_t^T v_t over the document.

    q, k [B, T, H, K]; v [B, T, H, V]; returns o [B, T, H, V] in q's dtype.
    """
    B, T, H, K = q.shape
    dt = compute_dtype(q.dtype)
    scale = default_scale(scale, K)
    bounds = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = q[:, a:b].to(dt), k[:, a:b].to(dt), v[:, a:b].to(dt)
        S = torch.zeros(B, H, K, v.shape[-1], dtype=dt)
        for t in range(b - a):
            S = S + torch.einsum("bhk,bhv->bhkv", kd[:, t], vd[:, t])
        outs.append(scale * torch.einsum("bthk,bhkv->bthv", qd, S))
    return torch.cat(outs, dim=1).to(q.dtype)
