"""lasp2.causal_conv1d vs torch's depthwise conv (the op transformers' causal_conv1d_fn runs), and
sp_causal_conv1d (the halo exchange) vs causal_conv1d on the whole sequence, shard by shard:
output, dx, and dweight / dbias summed over the ranks; kernel sizes 1-4, both layouts, packed
documents, the exchange count, segments shorter than k - 1, bad input on every rank."""
from __future__ import annotations

from typing import List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from lasp2.parallel import comm
from tests.dist import run_cases, run_distributed
from tests.helpers import assert_close

C = 5


def torch_conv(x, weight, bias, activation, cu: Optional[List[int]]):
    """The reference: nn.functional.conv1d with padding k-1 cut to T (transformers' fallback),
    run on each document separately when there are documents."""
    def one(seg):
        k = weight.shape[1]
        y = F.conv1d(seg.transpose(1, 2), weight.unsqueeze(1), bias, padding=k - 1, groups=weight.shape[0])
        y = y[:, :, :seg.shape[1]].transpose(1, 2)
        return y if activation is None else F.silu(y)
    if cu is None:
        return one(x)
    return torch.cat([one(x[:, a:b]) for a, b in zip(cu[:-1], cu[1:])], dim=1)


def inputs(B, T, k, seed, bias=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(C, k, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(C, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("cu", [None, [0, 1, 4, 5, 11, 13]])
def test_causal_conv1d_matches_torch(k, cu):
    B = 1 if cu else 2
    x, w, b = inputs(B, 13, k, seed=k)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    cu_t = None if cu is None else torch.tensor(cu)
    y = lasp2.causal_conv1d(*leaves, activation="silu", cu_seqlens=cu_t)
    y_ref = torch_conv(*ref_leaves, "silu", cu)
    cot = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y * cot).sum(), leaves)
    ref_grads = torch.autograd.grad((y_ref * cot).sum(), ref_leaves)
    assert_close("y", y, y_ref, torch.float64)
    for n, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert_close(n, g, r, torch.float64)


def _check(group, *, k: int, layout: str, T_local: int, cu: Optional[List[int]], bias: bool,
           activation: Optional[str], dtype=torch.float64):
    W = dist.get_world_size(group)
    T = W * T_local
    B = 1 if cu else 2
    x, w, b = inputs(B, T, k, seed=k + T_local, bias=bias, dtype=dtype)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    y_ref = torch_conv(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, activation, cu)
    cot = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    ref_grads = torch.autograd.grad((y_ref * cot).sum(), ref_leaves)

    def local(t):
        return lasp2.shard(t, group=group, layout=layout)

    leaves = [local(x).clone().requires_grad_(), w.clone().requires_grad_()]
    leaves += [b.clone().requires_grad_()] if bias else []
    call = dict(group=group, layout=layout, activation=activation, cu_seqlens=None if cu is None else torch.tensor(cu))
    with torch.no_grad():  # the first call with new shapes may add a one-off agreement check
        lasp2.sp_causal_conv1d(leaves[0], leaves[1], leaves[2] if bias else None, **call)
    with comm.track() as fwd:
        y = lasp2.sp_causal_conv1d(leaves[0], leaves[1], leaves[2] if bias else None, **call)
    with comm.track() as bwd:
        grads = list(torch.autograd.grad((y * local(cot)).sum(), leaves))
    for g in grads[1:]:  # parameter gradients are partial sums over each rank's tokens
        dist.all_reduce(g, group=group)
    rank = dist.get_rank(group)
    assert_close("y", y, local(y_ref), dtype, whole=y_ref)
    assert_close("dx", grads[0], local(ref_grads[0]), dtype, whole=ref_grads[0])
    for n, g, r in zip(("dweight", "dbias"), grads[1:], ref_grads[1:]):
        assert_close(n, g, r, dtype)
    # The contract: one batched exchange per direction; a tail goes to each remote successor.
    if W > 1 and k > 1:
        lay = lasp2.parallel.layout.Layout(layout, W, T_local)
        plan = lasp2.parallel.halo.halo_plan(lay, rank)
        assert fwd.count("send") == len(plan.sends) and fwd.count("recv") == len(plan.recvs), fwd.records
        assert bwd.count("send") == len(plan.recvs) and bwd.count("recv") == len(plan.sends), bwd.records
        assert fwd.count() == len(plan.sends) + len(plan.recvs)
        assert 1 <= len(plan.sends) + len(plan.recvs) <= 4


def _errors(group, *, layout: str):
    """Each bad call raises ValueError on every rank (checks run before any communication)."""
    W = dist.get_world_size(group)
    x = torch.randn(1, 4, C, dtype=torch.float64)
    w = torch.randn(C, 4, dtype=torch.float64)
    bad = {
        "short-segment": dict(x=x[:, :2] if layout == "contiguous" else x, weight=w),
        "weight-shape": dict(x=x, weight=w[:3]),
        "weight-dtype": dict(x=x, weight=w.float()),
        "x-dims": dict(x=x[0], weight=w),
        "bad-cu": dict(x=x, weight=w[:, :2], cu_seqlens=torch.tensor([0, 3, 2])),
        "activation": dict(x=x, weight=w[:, :2], activation="gelu"),
    }
    for name, kw in bad.items():
        with pytest.raises(ValueError) as e:
            lasp2.sp_causal_conv1d(kw.pop("x"), kw.pop("weight"), group=group, layout=layout, **kw)
        assert str(e.value), name
    with pytest.raises(ValueError, match="group is required"):
        lasp2.sp_causal_conv1d(x, w, group=None)
    return W


def _worker(group):
    W = dist.get_world_size(group)
    T_local = 6
    T = W * T_local
    docs = {"cut-mid": [0, 2, 5, 9, T], "aligned": list(range(0, T + 1, 3)), "len-1": [0, 1, 2, 3, T - 1, T]}
    cases = []
    for layout in ("contiguous", "zigzag"):
        for k in (1, 2, 3, 4):
            cases.append((f"{layout}-k{k}", dict(k=k, layout=layout, T_local=T_local, cu=None, bias=True,
                                                 activation="silu")))
        for name, cu in docs.items():
            cases.append((f"{layout}-docs-{name}", dict(k=4, layout=layout, T_local=T_local, cu=cu,
                                                          bias=False, activation=None)))
        # segments exactly k - 1 long (zigzag: T_local = 2 (k - 1))
        cases.append((f"{layout}-tight", dict(k=4, layout=layout, T_local=3 if layout == "contiguous" else 6,
                                              cu=None, bias=True, activation=None)))
        cases.append((f"{layout}-fp32", dict(k=4, layout=layout, T_local=T_local, cu=None, bias=True,
                                             activation="silu", dtype=torch.float32)))
        cases.append((f"{layout}-errors", dict(layout=layout)))
    run_cases(cases, lambda **p: _errors(group, **p) if "k" not in p else _check(group, **p))


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sp_causal_conv1d(world_size):
    run_distributed(_worker, world_size, timeout=600)
