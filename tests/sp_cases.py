"""Shard-by-shard comparison of a sequence-parallel op with the single-device op on the whole
sequence (DESIGN §5). Runs inside a distributed worker; every rank builds the same global inputs
from the seed, runs the reference on the whole sequence, and compares its own shard."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

import lasp2
from lasp2.parallel import comm
from tests.helpers import assert_close, make_inputs


def compare_linear(group, *, variant: str, B: int, T_local: int, H: int, K: int, V: int,
                   dtype: torch.dtype, strategy: str, layout: str, causal: bool = True,
                   cu: Optional[list] = None, seed: int = 0, beta_max: float = 1.0, **extra) -> Dict[str, int]:
    """Compare ``sp_linear_attention`` with ``linear_attention``: o and every gradient.

    Returns the number of all-gathers in forward and in backward (from ``comm.track``), and the
    P2P sends, receives and bytes received per direction, for the caller's contract checks.
    Collectives run before any assert. ``beta_max``: delta rule beta in (0, beta_max) (2: negative
    eigenvalues). ``extra`` goes to ``sp_linear_attention`` (e.g. scan_blocks).
    """
    W = torch.distributed.get_world_size(group)
    T = W * T_local
    inputs = make_inputs(variant, B, T, H, K, V, seed=seed, dtype=dtype, beta_max=beta_max)
    cu_t = None if cu is None else torch.tensor(cu)
    weight = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    names = [n for n in ("q", "k", "v", "g", "beta") if inputs.get(n) is not None]

    ref_leaves = {n: inputs[n].clone().requires_grad_() for n in names}
    o_ref, _ = lasp2.linear_attention(*(ref_leaves.get(n) for n in ("q", "k", "v", "g", "beta")),
                                      causal=causal, cu_seqlens=cu_t)
    ref_grads = torch.autograd.grad((o_ref.double() * weight).sum(), [ref_leaves[n] for n in names])

    def local(x):
        return lasp2.shard(x, group=group, layout=layout)

    leaves = {n: local(inputs[n]).clone().requires_grad_() for n in names}
    call = dict(group=group, causal=causal, strategy=strategy, layout=layout, cu_seqlens=cu_t, **extra)
    with torch.no_grad():  # the first call with new shapes may add a one-off agreement check
        lasp2.sp_linear_attention(*(leaves.get(n) for n in ("q", "k", "v", "g", "beta")), **call)
    with comm.track() as fwd_log:
        o = lasp2.sp_linear_attention(*(leaves.get(n) for n in ("q", "k", "v", "g", "beta")), **call)
    with comm.track() as bwd_log:
        grads = torch.autograd.grad((o.double() * local(weight)).sum(), [leaves[n] for n in names])

    assert_close("o", o, local(o_ref), dtype, whole=o_ref)
    for n, got, ref in zip(names, grads, ref_grads):
        assert_close(f"d{n}", got, local(ref), dtype, whole=ref)
    return {"fwd_gathers": fwd_log.count("all_gather"), "bwd_gathers": bwd_log.count("all_gather"),
            "fwd_sends": fwd_log.count("send"), "bwd_sends": bwd_log.count("send"),
            "fwd_bytes": fwd_log.bytes_sent, "fwd_recvs": fwd_log.count("recv"), "bwd_recvs": bwd_log.count("recv"),
            "fwd_recv_bytes": fwd_log.bytes_received, "bwd_recv_bytes": bwd_log.bytes_received}


def run_table(cases, check: Callable[..., Dict[str, int]], group, expect: Callable) -> None:
    """Run every case; ``expect(result, params)`` asserts the communication contract."""
    from tests.dist import run_cases

    def one(**params):
        expect(check(group, **params), params)

    run_cases(cases, one)
