"""sp_softmax_attention (allgather / ring / ulysses, both layouts) vs softmax_attention on the whole
sequence, shard by shard: output, dq, dk, dv; packed-document scenarios; the communication
contract (collectives per direction, P2P sends per rank); skipped hidden blocks; bad input.

One spawn per world size runs the whole table (start-up costs seconds per spawn)."""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2.parallel import comm
from lasp2.parallel import ring_attention, softmax_allgather
from tests.dist import WORLD_SIZES, Spawns, run_cases, run_sections
from tests.helpers import assert_close

STRATEGIES = ("allgather", "ring", "ulysses")
LAYOUTS = ("contiguous", "zigzag")
HEADS = {"mha": (4, 4), "gqa2": (4, 2), "gqa1": (4, 1)}
T_LOCAL, D, DV = 8, 6, 4  # Dv != D so that K/V packing mistakes show


def _cu(points, T: int) -> List[int]:
    """Strictly increasing document boundaries from ``points`` (those inside [0, T]) plus 0, T."""
    return sorted({p for p in points if 0 <= p <= T} | {0, T})


def doc_scenarios(W: int, L: int = T_LOCAL) -> Dict[str, List[int]]:
    """Packed-document layouts over T = W * L tokens (L tokens per rank, contiguous numbering;
    under zigzag the same global boundaries fall elsewhere in the ranks)."""
    T = W * L
    return {
        "cut-mid-rank": _cu([r * L + 3 for r in range(W)], T),  # every rank cuts a document
        "rank-aligned": _cu(range(0, T, L), T),  # boundaries exactly on rank boundaries
        "many-short": _cu([1, 3, 4, 6, 7], T),  # many short documents in one rank
        "one-doc": [0, T],  # one document spanning every rank
        "no-start-rank": _cu([2], T),  # ranks > 0 (contiguous) hold no document start
        "length-1": _cu([1, 2, L - 1, L, L + 1, T - 1], T),  # length-1 documents, incl. at edges
        "mixed": _cu([3, L + 1, T - 5, T - 1], T),
    }


def compare(group, *, strategy: str, layout: str, causal: bool, heads: str, docs: Optional[str],
            dtype: torch.dtype = torch.float64, scale: Optional[float] = None, seed: int = 0,
            sum_loss: bool = False):
    """Run one case against the single-device op; return the ops recorded per direction.
    ``sum_loss``: backward from o.sum(), whose cotangent reaches the op as an expanded
    (stride-0) tensor, instead of a random weight."""
    W = dist.get_world_size(group)
    H, Hkv = HEADS[heads]
    T = W * T_LOCAL
    cu = None if docs is None else torch.tensor(doc_scenarios(W)[docs])
    B = 2 if cu is None else 1
    gen = torch.Generator().manual_seed(seed)
    full = [torch.randn(B, T, h, d, generator=gen, dtype=torch.float64)
            for h, d in ((H, D), (Hkv, D), (Hkv, DV), (H, DV))]
    q, k, v = (x.to(dtype) for x in full[:3])
    weight = torch.ones_like(full[3]).expand_as(full[3]) if sum_loss else full[3]  # the cotangent

    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = lasp2.softmax_attention(*ref_leaves, scale=scale, causal=causal, cu_seqlens=cu)
    ref_grads = torch.autograd.grad(o_ref.sum() if sum_loss else (o_ref.double() * weight).sum(), ref_leaves)

    def local(x):
        return lasp2.shard(x, group=group, layout=layout)

    leaves = [local(x).clone().requires_grad_() for x in (q, k, v)]
    call = dict(group=group, scale=scale, causal=causal, strategy=strategy, layout=layout, cu_seqlens=cu)
    with torch.no_grad():  # the first call with new shapes may add a one-off agreement check
        lasp2.sp_softmax_attention(*leaves, **call)
    with comm.track() as fwd_log:
        o = lasp2.sp_softmax_attention(*leaves, **call)
    with comm.track() as bwd_log:
        grads = torch.autograd.grad(o.sum() if sum_loss else (o.double() * local(weight)).sum(), leaves)

    # Every collective has run: now compare.
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close("o", o, local(o_ref), dtype, whole=o_ref)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, got, local(ref), dtype, whole=ref)
    return Counter(r.op for r in fwd_log.records), Counter(r.op for r in bwd_log.records)


def expect_contract(W: int, strategy: str, fwd: Counter, bwd: Counter) -> None:
    if W == 1:  # dispatches to the single-device op
        expected = Counter()
        assert fwd == bwd == expected, f"W = 1 must not communicate: {fwd}, {bwd}"
        return
    if strategy == "allgather":
        assert fwd == Counter(all_gather=1), f"forward: {dict(fwd)}, expected exactly 1 all-gather"
        assert bwd == Counter(reduce_scatter=1), f"backward: {dict(bwd)}, expected exactly 1 reduce-scatter"
    elif strategy == "ring":
        hops = Counter(send=W - 1, recv=W - 1)
        assert fwd == hops, f"forward: {dict(fwd)}, expected {W - 1} sends and recvs on this rank"
        assert bwd == hops, f"backward: {dict(bwd)}, expected {W - 1} sends and recvs on this rank"
    else:
        assert fwd == Counter(all_to_all=2), f"forward: {dict(fwd)}, expected 2 all-to-alls"
        assert bwd == Counter(all_to_all=2), f"backward: {dict(bwd)}, expected 2 all-to-alls"


def _cases(W: int, full: bool = True):
    """(name, params) for the whole table of one world size."""
    out = []
    # At W = 4 the default run keeps GQA-2 heads and the zigzag layout for the document
    # scenarios (the head counts and layouts are exercised at W = 2); the slow run has them all.
    heads_all, doc_layouts = (HEADS, LAYOUTS) if full else (("gqa2",), ("zigzag",))
    # Every strategy x layout x mask x heads x {no docs, docs}, fp64.
    for s, lay, causal, heads, docs in itertools.product(STRATEGIES, LAYOUTS, (True, False), heads_all,
                                                         (None, "mixed")):
        name = f"{s}-{lay}-{'causal' if causal else 'bidir'}-{heads}-{docs or 'nodocs'}-fp64"
        out.append((name, dict(kind="compare", strategy=s, layout=lay, causal=causal, heads=heads, docs=docs)))
    # Document scenarios, causal under both layouts (bidirectional on two of them), GQA.
    for s, lay, docs in itertools.product(STRATEGIES, doc_layouts, doc_scenarios(W)):
        for causal in (True, False) if docs in ("cut-mid-rank", "length-1") else (True,):
            name = f"docs:{docs}-{s}-{lay}-{'causal' if causal else 'bidir'}"
            out.append((name, dict(kind="compare", strategy=s, layout=lay, causal=causal, heads="gqa2",
                                   docs=docs)))
    # fp32 and bf16 subsets (and a non-default scale).
    for s, lay in itertools.product(STRATEGIES, LAYOUTS):
        out.append((f"{s}-{lay}-fp32-docs", dict(kind="compare", strategy=s, layout=lay, causal=True,
                                                 heads="gqa2", docs="mixed", dtype=torch.float32)))
        out.append((f"{s}-{lay}-fp32-bidir", dict(kind="compare", strategy=s, layout=lay, causal=False,
                                                  heads="gqa1", docs=None, dtype=torch.float32, scale=0.3)))
        out.append((f"{s}-{lay}-bf16", dict(kind="compare", strategy=s, layout=lay, causal=True,
                                            heads="gqa2", docs="cut-mid-rank", dtype=torch.bfloat16)))
        if lay == "zigzag":
            out.append((f"{s}-sum-loss", dict(kind="compare", strategy=s, layout=lay, causal=True,
                                              heads="gqa1", docs="mixed", sum_loss=True)))
    out.append(("skips-hidden-blocks", dict(kind="skips")))
    out.append(("bad-input", dict(kind="errors")))
    return out


def _count_calls(module, name: str, counter: Counter):
    """Wrap ``module.name`` so that every call is counted; returns the original."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        counter[name] += 1
        return original(*args, **kwargs)

    setattr(module, name, wrapped)
    return original


def check_skips(group) -> None:
    """Blocks the mask fully hides are not computed (forward and backward) but the ring still
    forwards them: causal contiguous rank r computes r + 1 blocks; with documents aligned to
    the rank boundaries every rank computes only its own block."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    if W == 1:
        return
    results = {}
    for module, strategy in ((ring_attention, "ring"), (softmax_allgather, "allgather")):
        for docs in (None, "rank-aligned"):
            calls = Counter()
            saved = [_count_calls(module, n, calls) for n in ("block_fwd", "block_bwd")]
            try:
                fwd, bwd = compare(group, strategy=strategy, layout="contiguous", causal=True,
                                   heads="gqa2", docs=docs)
            finally:
                module.block_fwd, module.block_bwd = saved
            # compare() calls the op twice forward (warm-up, measured) and once backward.
            results[strategy, docs] = (calls["block_fwd"] / 2, calls["block_bwd"], fwd, bwd)
    for (strategy, docs), (nf, nb, fwd, bwd) in results.items():
        blocks = rank + 1 if docs is None else 1
        assert nf == nb == blocks, f"{strategy} docs={docs}: computed {nf} fwd / {nb} bwd blocks, expected {blocks}"
        expect_contract(W, strategy, fwd, bwd)  # hidden blocks still travel (ring: W - 1 sends)


def check_errors(group) -> None:
    """Bad input raises ValueError naming the argument and the fix, on every rank alike."""
    W = dist.get_world_size(group)
    q = torch.randn(1, 8, 4, D)
    k, v = torch.randn(1, 8, 2, D), torch.randn(1, 8, 2, DV)
    with pytest.raises(ValueError, match="strategy"):
        lasp2.sp_softmax_attention(q, k, v, group=group, strategy="flash")
    with pytest.raises(ValueError, match="group is required"):
        lasp2.sp_softmax_attention(q, k, v, group=None)
    with pytest.raises(ValueError, match="multiple of k/v's heads"):
        lasp2.sp_softmax_attention(q, torch.randn(1, 8, 3, D), torch.randn(1, 8, 3, DV), group=group)
    with pytest.raises(ValueError, match="cu_seqlens"):
        lasp2.sp_softmax_attention(q, k, v, group=group, cu_seqlens=torch.tensor([0, 5, 7]))
    if W > 1:
        with pytest.raises(ValueError, match="zigzag"):
            lasp2.sp_softmax_attention(q[:, :7], k[:, :7], v[:, :7], group=group, layout="zigzag")
        q3 = torch.randn(1, 8, W + 1, D)
        k3, v3 = torch.randn(1, 8, 1, D), torch.randn(1, 8, 1, DV)
        with pytest.raises(ValueError, match=r"multiple of the group size.*strategy='allgather' or 'ring'"):
            lasp2.sp_softmax_attention(q3, k3, v3, group=group, strategy="ulysses")
        # The same heads work with the other strategies (no ValueError, finite output).
        assert torch.isfinite(lasp2.sp_softmax_attention(q3, k3, v3, group=group, strategy="ring")).all()
        # Document boundaries that differ on one rank: ValueError on every rank, every strategy.
        rank = dist.get_rank(group)
        cu = torch.tensor([0, 5 if rank == 1 else 3, 8 * W])
        for strategy in ("allgather", "ring", "ulysses"):
            with pytest.raises(ValueError, match="different arguments"):
                lasp2.sp_softmax_attention(q, k, v, group=group, strategy=strategy, cu_seqlens=cu)


def _table(group, full_at_4: bool = False):
    W = dist.get_world_size(group)

    def check(kind, **params):
        if kind == "skips":
            return check_skips(group)
        if kind == "errors":
            return check_errors(group)
        fwd, bwd = compare(group, **params)
        expect_contract(W, params["strategy"], fwd, bwd)

    run_cases(_cases(W, full=W < 4 or full_at_4), check)


def _worker(group, full_at_4: bool):
    return run_sections(group, [("table", lambda g: _table(g, full_at_4))])


# One spawn per world size for test_sp_contract, test_sp_linear and test_sp_softmax together.
SPAWNS = Spawns(_worker, False, pool="sp")
SPAWNS_FULL = Spawns(_worker, True, pool="sp-full")


@pytest.mark.slow
def test_sp_softmax_full_table_w4():
    SPAWNS_FULL.results(4, "table")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sp_softmax_matches_single_device(world_size):
    SPAWNS.results(world_size, "table")
