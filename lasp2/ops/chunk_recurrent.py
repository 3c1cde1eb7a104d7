"""The intra-chunk term of the per-channel (diagonal) gate for small V: the recurrence inside every
chunk, run for all chunks at once.

Shape legend as ``chunk.py``: B batch, H heads, N chunks, C chunk size, K key dim, V value dim;
chunked tensors are [B, H, N, C, D].

Why: the pair form of ``chunk.intra_outputs`` forms exp(Cs_i - Cs_j) for every pair of a chunk
and channel, a [C, C, K] tensor per chunk (C^2 K per chunk), because a per-channel gate does not
factor into one matmul without dividing by a decay. With V = 1 (Mamba1: one head per channel,
K = N, V = 1) the state of a chunk is only K x V, so the recurrence

    h_t = a_t ⊙ h_{t-1} + k_t v_t^T   (h_{-1} = 0 at every chunk entry),    o_t = q_t^T h_t

costs C K V per chunk: C steps of elementwise ops on [B, H, N, K, V] tensors, every chunk at
once. It is the same sum as the pair form (summation order changes only): unrolled,
o_i = sum_{j <= i} (q_i ⊙ k_j ⊙ prod_{j < s <= i} a_s)^T v_j, with prod a_s = exp(Cs_i - Cs_j).

Numerical safety: a_t = exp(g_t) with g_t <= 0 (never exp of a positive number, nothing divided
by a decay). Resets (``chunk.split_resets``: g below the dtype's reset floor, or -inf) and
document starts (the state restarts at the start token) are a_t = 0 exactly, masked in log space
(``masked_exp``), so their gate gradient is exactly 0, as in the pair form.

Memory: the saved states [B, H, N, C, K, V] (T K V per head) and the decays [B, H, N, C, K],
against [B, H, N, C, C, K] (T C K per head) and its autograd copies in the pair form: 16x
less at C = 16, V = 1. A hand-written backward (the adjoint recurrence, one loop of C steps each
way) keeps autograd from recording per-step nodes.
"""
from __future__ import annotations

import torch

from .common import masked_exp
from .precision import no_autocast

MAX_RECURRENT_V = 4
"""The largest V that takes the recurrence. Its work and saved memory are C K V per chunk against
C^2 K, so it wins while V is well below C (= 16). Measured (CPU, whole op fwd+bwd, B = 1, T = 512,
H = 64, K = 16, recurrent / pair form, interleaved medians): time 0.41 / 0.60 / 0.71 / 0.79 / 0.82,
peak memory 0.16 / 0.20 / 0.27 / 0.41 / 0.68 at V = 1 / 2 / 4 / 8 / 16. Above 4 the gain shrinks
and the pair form (tested at V = 6 in tests/ops/test_linear_ops.py) is kept."""


def applies(c) -> bool:
    """Whether the per-channel chunk ``c`` (a ``chunk.Chunked``) takes the recurrent form: the
    gate is per channel (Kg = K) and V is small."""
    return c.g is not None and c.g.shape[-1] > 1 and c.v.shape[-1] <= MAX_RECURRENT_V


def token_decays(c) -> torch.Tensor:
    """a_t = exp(g_t) [B, H, N, C, K], exactly 0 at a reset and at a document start (the state
    restarts there), masked in log space so that the gate's gradient is 0 there and finite."""
    keep = None
    if c.docs is not None:
        # A start at column i > 0 of chunk n: token i-1 is not in i's document (pair is [N, C, C]).
        start = torch.zeros_like(c.docs.cont)
        start[:, 1:] = ~torch.diagonal(c.docs.pair, -1, dim1=-2, dim2=-1)
        keep = ~start[..., None]  # [N, C, 1]
    if c.resets is not None:
        no_reset = c.resets == 0
        keep = no_reset if keep is None else keep & no_reset
    return masked_exp(c.g, keep)


def intra_outputs(c) -> torch.Tensor:
    """The intra-chunk term [B, H, N, C, V] of ``chunk.intra_outputs`` for a per-channel gate, by
    the recurrence inside every chunk (``applies(c)``). q already carries the scale."""
    return _ChunkRecurrence.apply(c.q, c.k, c.v, token_decays(c))


class _ChunkRecurrence(torch.autograd.Function):
    """o_t = q_t^T h_t, h_t = a_t ⊙ h_{t-1} + k_t v_t^T within every chunk (h = 0 at its entry).

    q, k, a [B, H, N, C, K]; v [B, H, N, C, V] -> o [B, H, N, C, V]. Internally the token axis C
    is moved first so that each step works on one contiguous [B, H, N, K, V] slab.
    Backward, with lam_t = dL/dh_t = q_t do_t^T + a_{t+1} ⊙ lam_{t+1}:
    dq_t = h_t do_t, dk_t = lam_t v_t, dv_t = lam_t^T k_t, da_t = <lam_t, h_{t-1}> (over V).
    """

    @staticmethod
    def forward(ctx, q, k, v, a):
        at = a.movedim(3, 0).unsqueeze(-1)  # [C, B, H, N, K, 1]
        hs = (k.unsqueeze(-1) * v.unsqueeze(-2)).movedim(3, 0).contiguous()  # k_t v_t^T, [C, B, H, N, K, V]
        for t in range(1, hs.shape[0]):
            torch.addcmul(hs[t], at[t], hs[t - 1], out=hs[t])  # hs[t] becomes h_t
        o = (q.movedim(3, 0).unsqueeze(-1) * hs).sum(-2)  # [C, B, H, N, V]
        ctx.save_for_backward(q, k, v, a, hs)
        return o.movedim(0, 3)

    @staticmethod
    @no_autocast
    def backward(ctx, do):
        q, k, v, a, hs = ctx.saved_tensors
        at = a.movedim(3, 0).unsqueeze(-1)
        dot = do.movedim(3, 0).unsqueeze(-2)  # [C, B, H, N, 1, V]
        dq = (hs * dot).sum(-1)  # [C, B, H, N, K]
        lam = (q.movedim(3, 0).unsqueeze(-1) * dot).contiguous()  # q_t do_t^T, becomes lam_t
        for t in range(lam.shape[0] - 2, -1, -1):
            torch.addcmul(lam[t], at[t + 1], lam[t + 1], out=lam[t])
        dk = (lam * v.movedim(3, 0).unsqueeze(-2)).sum(-1)
        dv = (lam * k.movedim(3, 0).unsqueeze(-1)).sum(-2)
        da = torch.zeros_like(at[..., 0])
        da[1:] = (lam[1:] * hs[:-1]).sum(-1)
        return dq.movedim(0, 3), dk.movedim(0, 3), dv.movedim(0, 3), da.movedim(0, 3)
