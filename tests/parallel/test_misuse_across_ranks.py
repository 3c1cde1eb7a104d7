"""Misuse and edge cases that need ranks: -inf gates under SP, ranks that disagree within
a call, for every strategy, ``unshard`` with parts of different lengths.

ONE spawn of 2 gloo ranks (module fixture) runs every section as a table of cases and returns a
report per section; each test asserts on its section. Every case runs its collectives before it
asserts, so a failing case cannot leave the ranks in mismatched collectives.
"""
from __future__ import annotations

import traceback
from typing import Callable, Dict

import pytest
import torch
import torch.distributed as dist

import lasp2
from tests.dist import run_cases, run_distributed
from tests.helpers import assert_close, make_inputs

WORLD = 2


def _raises(match: str, fn) -> None:
    """pytest.raises(ValueError) inside a worker case: a miss becomes an AssertionError, which
    ``run_cases`` reports and moves on from (pytest's Failed is a BaseException), so the ranks
    stay in step."""
    try:
        with pytest.raises(ValueError, match=match):
            fn()
    except pytest.fail.Exception as e:
        raise AssertionError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# -inf gates under SP, shard by shard against the single-device op (itself compared
# with naive.py in test_neg_inf_gates.py). Resets on both ranks, at a rank's first token (so the
# incoming state must vanish), on a chunk's last token and next to a document start.

def _inf_gates_sp(group, *, variant: str, strategy: str, layout: str, docs: bool) -> None:
    T = 4 * 20  # 2 ranks; zigzag: 4 segments of 20
    x = make_inputs(variant, 1, T, 2, 8, 8, seed=11)
    g = x["g"].clone()
    for t in (0, 15, 20, 40, 41, 63, 70):
        g[:, t] = float("-inf")
    if g.dim() == 4:
        g[:, 47, :, 2] = float("-inf")
    x["g"] = g
    cu = torch.tensor([0, 33, 70, T]) if docs else None
    names = [n for n in ("q", "k", "v", "g", "beta") if x.get(n) is not None]
    weight = torch.randn(1, T, 2, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = {n: x[n].clone().requires_grad_() for n in names}
    o_ref, _ = lasp2.linear_attention(*(ref.get(n) for n in ("q", "k", "v", "g", "beta")), cu_seqlens=cu)
    ref_grads = torch.autograd.grad((o_ref * weight).sum(), [ref[n] for n in names])

    def local(t):
        return lasp2.shard(t, group=group, layout=layout)

    leaves = {n: local(x[n]).clone().requires_grad_() for n in names}
    o = lasp2.sp_linear_attention(*(leaves.get(n) for n in ("q", "k", "v", "g", "beta")), group=group,
                                  strategy=strategy, layout=layout, cu_seqlens=cu)
    grads = torch.autograd.grad((o * local(weight)).sum(), [leaves[n] for n in names])
    assert_close("o", o, local(o_ref), torch.float64, whole=o_ref)
    for n, got, want in zip(names, grads, ref_grads):
        assert_close(f"d{n}", got, local(want), torch.float64, whole=want)
    reset = local(g) == float("-inf")
    assert bool((grads[names.index("g")][reset] == 0).all()), "dg at a -inf gate is exactly 0"


INF_CASES = [
    (f"{variant}-{strategy}-{layout}{'-docs' if docs else ''}",
     dict(variant=variant, strategy=strategy, layout=layout, docs=docs))
    for variant, strategy, layout, docs in [
        ("scalar", "lasp2", "contiguous", False), ("scalar", "lasp1", "zigzag", True),
        ("channel", "lasp2", "zigzag", True), ("channel", "lasp1", "contiguous", False),
        ("gated_deltanet", "lasp2", "contiguous", True), ("gated_deltanet", "lasp1", "zigzag", False),
    ]
]


# ---------------------------------------------------------------------------------------------
# unshard with parts of different lengths: ValueError on every rank, before any data
# moves (it used to SIGABRT one rank in gloo and return a scrambled, zero-filled tensor on the
# other). Parts of equal shape still work afterwards.

def _unshard_mismatch(group, *, layout: str, dim: int) -> None:
    rank = dist.get_rank(group)
    shape = [2, 4, 3]
    shape[dim] += 2 * rank  # rank 1's part is longer along ``dim``
    x = torch.randn(*shape)
    _raises(r"(?s)different arguments.*rank 0: unshard x_local=\(2, 4, 3\).*rank 1: unshard",
            lambda: lasp2.unshard(x, group=group, layout=layout, dim=dim))
    whole = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    back = lasp2.unshard(lasp2.shard(whole, group=group, layout=layout), group=group, layout=layout)
    assert torch.equal(back, whole)


UNSHARD_CASES = [(f"{layout}-dim{dim}", dict(layout=layout, dim=dim))
                 for layout, dim in (("contiguous", 1), ("zigzag", 1), ("contiguous", 2))]


# ---------------------------------------------------------------------------------------------
# Ranks that disagree within one call (different document boundaries, or different
# lengths after both signatures were seen) get a ValueError, for every strategy and direction.
# Every rank that uses another rank's data raises; only the head of a contiguous LASP-1 chain,
# which uses no other rank's data in forward (its shard is exact for its own arguments), returns.
# A following agreeing call works: the disagreement left no rank behind in a collective.

SP = {"lasp2": dict(strategy="lasp2"), "lasp1": dict(strategy="lasp1"),
      "lasp1-zigzag": dict(strategy="lasp1", layout="zigzag"), "allscan": dict(strategy="allscan"),
      "tree-zigzag": dict(strategy="tree", layout="zigzag"), "tree": dict(strategy="tree"),
      "bidirectional": dict(causal=False),
      "allgather": dict(strategy="allgather"), "ring": dict(strategy="ring"), "ulysses": dict(strategy="ulysses")}
LINEAR = ("lasp2", "lasp1", "lasp1-zigzag", "allscan", "tree-zigzag", "tree", "bidirectional")
CHAIN_HEADS = ("lasp1", "allscan", "tree")  # contiguous: rank 0 receives nothing in forward
AGREE = r"different arguments in this call.*rank\(s\) \[\d\] differ"


def _call(group, op: str, T_local: int, cu=None):
    gen = torch.Generator().manual_seed(T_local)
    q, k, v = (torch.randn(1, T_local, 2, 4, generator=gen) for _ in range(3))
    cu = None if cu is None else torch.tensor(cu)
    fn = lasp2.sp_linear_attention if op in LINEAR else lasp2.sp_softmax_attention
    with torch.no_grad():
        return fn(q, k, v, group=group, cu_seqlens=cu, **SP[op])


def _disagree(group, *, op: str, kind: str) -> None:
    rank = dist.get_rank(group)
    if kind == "cu_seqlens":  # same lengths, different document boundaries
        T, cus = 8, ([0, 5, 16], [0, 11, 16])
        call = lambda r: _call(group, op, T, cus[r])
    else:  # each rank has seen both signatures (cached as agreed); then they diverge
        call = lambda r: _call(group, op, 8 if r == 0 else 12) if op in LINEAR else \
            _call(group, op, 8, [[0, 16], [0, 3, 16]][r])
        for r in (0, 1):
            call(r)
    head_of_chain = op in CHAIN_HEADS and rank == 0
    if head_of_chain:
        call(rank)
    else:
        _raises(AGREE, lambda: call(rank))
    assert _call(group, op, 8).shape == (1, 8, 2, 4)  # in step again


AGREE_CASES = [(f"{op}-{kind}", dict(op=op, kind=kind)) for op in SP for kind in ("cu_seqlens", "after-warm-up")]


def _section(cases, fn, group) -> str:
    try:
        run_cases(cases, lambda **p: fn(group, **p))
        return "ok"
    except Exception:  # noqa: BLE001 - reported by the test that owns the section
        return traceback.format_exc()


def _worker(group) -> Dict[str, str]:
    torch.set_default_dtype(torch.float64)
    return {
        "inf_gates": _section(INF_CASES, _inf_gates_sp, group),
        "agreement": _section(AGREE_CASES, _disagree, group),
        "unshard": _section(UNSHARD_CASES, _unshard_mismatch, group),
    }


@pytest.fixture(scope="module")
def reports():
    return run_distributed(_worker, WORLD)


@pytest.mark.parametrize("section", ["inf_gates", "unshard", "agreement"])
def test_section(reports, section):
    for rank, report in enumerate(reports):
        assert report[section] == "ok", f"rank {rank}:\n{report[section]}"


def test_group_not_initialised_names_the_cause():
    """Without init_process_group, dist.group.WORLD is None; the error says so."""
    assert not dist.is_initialized()
    x = torch.randn(1, 8, 2, 4)
    for call in (lambda: lasp2.sp_linear_attention(x, x, x, group=dist.group.WORLD),
                 lambda: lasp2.sp_softmax_attention(x, x, x, group=dist.group.WORLD),
                 lambda: lasp2.shard(x, group=dist.group.WORLD)):
        with pytest.raises(ValueError, match="default process group is not initialised.*init_process_group"):
            call()
