"""States in and out of ``sp_linear_attention`` (initial_state, output_final_state) for every
causal strategy, both layouts, one variant per transition kind: shard by shard against
``linear_attention(..., initial_state=, output_final_state=True)`` on the whole sequence, fp64
(outputs, every gradient, the final state, d(initial_state) summed over the ranks); the final
state bitwise identical on every rank; the collectives each strategy adds; the misuse errors.

The default run is one spawn at W = 2 (pool "sp", shared with test_sp_linear); W = 3, 4 and every
variant are ``slow``.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2.parallel import comm, strategies
from tests.dist import Spawns, run_cases, run_sections
from tests.helpers import DELTA_VARIANTS, DIAGONAL_VARIANTS, assert_close, make_inputs

NAMES = ("q", "k", "v", "g", "beta")
ONE_PER_KIND = ("basic", "scalar", "channel", "gated_deltanet")  # identity, scalar, diagonal, matrix
STATE_USES = {"in+out": (True, True), "in": (True, False), "out": (False, True)}


def compare_states(group, *, variant: str, strategy: str, layout: str, init: bool, final: bool,
                   B: int = 2, T_local: int = 6, H: int = 2, K: int = 3, V: int = 4, seed: int = 3) -> dict:
    """One case: SP vs the single-device op on the whole sequence. The loss on the final state
    is split unevenly over the ranks (rank r feeds (r + 1) / sum of its weight): their terms must
    add up to the single-device gradient. Returns the collective counts per direction."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    T = W * T_local
    x = make_inputs(variant, B, T, H, K, V, seed=seed, n_states=B if init else None)
    gen = torch.Generator().manual_seed(seed + 1)
    w_o = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    w_f = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    names = [n for n in NAMES if x.get(n) is not None] + (["initial_state"] if init else [])

    ref = {n: x[n].clone().requires_grad_() for n in names}
    o_ref, f_ref = lasp2.linear_attention(*(ref.get(n) for n in NAMES), initial_state=ref.get("initial_state"),
                                          output_final_state=True)
    loss_ref = (o_ref * w_o).sum() + ((f_ref * w_f).sum() if final else 0)
    ref_grads = dict(zip(names, torch.autograd.grad(loss_ref, [ref[n] for n in names])))

    def local(t):
        return lasp2.shard(t, group=group, layout=layout)

    leaves = {n: (x[n] if n == "initial_state" else local(x[n])).clone().requires_grad_() for n in names}
    call = dict(group=group, strategy=strategy, layout=layout, initial_state=leaves.get("initial_state"),
                output_final_state=final)
    with torch.no_grad():  # the first call with new shapes may add a one-off agreement check
        lasp2.sp_linear_attention(*(leaves.get(n) for n in NAMES), **call)
    with comm.track() as fwd_log:
        out = lasp2.sp_linear_attention(*(leaves.get(n) for n in NAMES), **call)
    o, f = out if final else (out, None)
    share = (rank + 1) / (W * (W + 1) / 2)
    loss = (o * local(w_o)).sum() + ((f * (w_f * share)).sum() if final else 0)
    with comm.track() as bwd_log:
        grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
    # collectives of the test itself, before any assert (DESIGN §5: compute, then compare)
    d_init_sum = None
    if init:
        d_init_sum = grads["initial_state"].clone()
        dist.all_reduce(d_init_sum, group=group)
    finals = [torch.empty_like(f) for _ in range(W)] if final else None
    if final:
        dist.all_gather(finals, f.contiguous(), group=group)

    assert_close("o", o, local(o_ref), torch.float64, whole=o_ref)
    for n in names:
        if n == "initial_state":
            assert_close("d_initial_state (sum over ranks)", d_init_sum, ref_grads[n], torch.float64)
        else:
            assert_close(f"d{n}", grads[n], local(ref_grads[n]), torch.float64, whole=ref_grads[n])
    if final:
        assert_close("final_state", f, f_ref, torch.float64)
        assert all(torch.equal(finals[0], other) for other in finals), "final_state differs between ranks"
        assert f.dtype == f_ref.dtype and f.shape == f_ref.shape
    return {"fwd_gathers": fwd_log.count("all_gather"), "bwd_gathers": bwd_log.count("all_gather")}


def expected_gathers(strategy: str, final: bool) -> int:
    """All-gathers per direction: LASP-2's one (states add none); the point-to-point strategies
    add one for the final state (forward) and its gradient (backward)."""
    entry = strategies.linear(strategy)
    if not entry.point_to_point:
        return 1
    return 1 if final else 0


def _cases(variants, uses, strategies_=None):
    out = []
    for variant, strategy, layout, use in itertools.product(
            variants, strategies_ or strategies.LINEAR_STRATEGIES, ("contiguous", "zigzag"), uses):
        init, final = STATE_USES[use]
        out.append((f"{variant}-{strategy}-{layout}-{use}",
                    dict(variant=variant, strategy=strategy, layout=layout, init=init, final=final)))
    return out


def _table(group, cases):
    def one(**p):
        got = compare_states(group, **p)
        want = expected_gathers(p["strategy"], p["final"])
        assert got["fwd_gathers"] == want and got["bwd_gathers"] == want, (
            f"all-gathers fwd {got['fwd_gathers']}, bwd {got['bwd_gathers']}; expected {want} each")
    run_cases(cases, one)


def _default_cases():
    # every strategy x both layouts x in+out for one variant per transition kind; "in" and "out"
    # alone for a decay and the matrix kind, on lasp2 and on a point-to-point strategy
    cases = _cases(ONE_PER_KIND, ("in+out",))
    cases += _cases(("scalar", "gated_deltanet"), ("in", "out"), ("lasp2", "lasp1"))
    return cases


def _raises(match: str, fn) -> None:
    """pytest.raises(ValueError) inside a worker case, reported as an AssertionError (``run_cases``
    goes on to the next case, so the ranks stay in step)."""
    try:
        with pytest.raises(ValueError, match=match):
            fn()
    except pytest.fail.Exception as e:
        raise AssertionError(str(e)) from None


def _misuse(group):
    """Each misuse raises a ValueError naming the argument, on every rank (before any
    communication, or, for initial states that differ between ranks, from the call's digest)."""
    rank = dist.get_rank(group)
    x = make_inputs("scalar", 1, 16, 2, 3, 4, seed=1, n_states=1)
    q, k, v, g = (lasp2.shard(x[n], group=group) for n in ("q", "k", "v", "g"))
    S0 = x["initial_state"]

    cu = torch.tensor([0, 5, 16])
    cases = [
        ("wrong-shape", dict(match="initial_state must have shape", kw=dict(initial_state=S0[:, :1]))),
        ("int-dtype", dict(match="initial_state must be a floating tensor", kw=dict(initial_state=S0.long()))),
        ("not-bool", dict(match="output_final_state must be True or False", kw=dict(output_final_state=1))),
        ("bidirectional-final", dict(match="need causal=True", kw=dict(causal=False, output_final_state=True),
                                     gate=False)),
        ("bidirectional-initial", dict(match="need causal=True", kw=dict(causal=False, initial_state=S0), gate=False)),
        ("documents-final", dict(match="not supported with cu_seqlens", kw=dict(cu_seqlens=cu, output_final_state=True))),
        ("documents-initial", dict(match="not supported with cu_seqlens", kw=dict(cu_seqlens=cu, initial_state=S0))),
    ]
    # the bits differ on rank 1 only: the digest (inside LASP-2's all-gather; inside the final
    # state's all-gather for the others) tells every rank, and no rank is left waiting
    cases += [(f"differs-across-ranks-{s}", dict(match="initial_state", kw=dict(
        initial_state=S0 + rank * 1e-12, output_final_state=True, strategy=s))) for s in strategies.LINEAR_STRATEGIES]

    def one(match, kw, gate=True):
        _raises(match, lambda: lasp2.sp_linear_attention(q, k, v, g if gate else None, group=group, **kw))
    run_cases(cases, one)


def _conv_cache(group):
    """sp_causal_conv1d(output_final_state=True): y shard by shard, the cache equal to the last
    k - 1 inputs of the whole sequence on every rank (exact copies), and a decode step from it
    equal to the whole-sequence conv's next output."""
    W = dist.get_world_size(group)

    def one(layout, k, T_local=8, B=2, C=3):
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(B, W * T_local + 1, C, generator=gen, dtype=torch.float64)
        weight, bias = torch.randn(C, k, generator=gen, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
        prompt = x[:, :-1]
        y, cache = lasp2.sp_causal_conv1d(lasp2.shard(prompt, group=group, layout=layout), weight, bias,
                                          group=group, layout=layout, activation="silu", output_final_state=True)
        caches = [torch.empty_like(cache) for _ in range(W)]
        dist.all_gather(caches, cache.contiguous(), group=group)
        y_ref = lasp2.causal_conv1d(x, weight, bias, activation="silu")
        assert_close("y", y, lasp2.shard(y_ref[:, :-1], group=group, layout=layout), torch.float64)
        assert cache.shape == (B, k - 1, C) and torch.equal(cache, prompt[:, prompt.shape[1] - (k - 1):])
        assert all(torch.equal(caches[0], c) for c in caches), "conv cache differs between ranks"
        y_next = lasp2.causal_conv1d(torch.cat([cache, x[:, -1:]], dim=1), weight, bias, activation="silu")[:, -1]
        assert_close("decode step from the cache", y_next, y_ref[:, -1], torch.float64)

    run_cases([(f"{layout}-k{k}", dict(layout=layout, k=k)) for layout in ("contiguous", "zigzag") for k in (4, 1)],
              one)
    x = torch.zeros(1, 16, 2)
    _raises("not supported with cu_seqlens", lambda: lasp2.sp_causal_conv1d(
        lasp2.shard(x, group=group), torch.ones(2, 4), group=group, cu_seqlens=torch.tensor([0, 5, 16]),
        output_final_state=True))


def _return_kv(group):
    """sp_softmax_attention(return_kv=True): o unchanged, K/V of the whole sequence in global
    order on every rank (exact copies); all-gather adds no collective, ring/ulysses one."""
    W = dist.get_world_size(group)

    def one(strategy, layout, B=1, T_local=6, H=4, Hkv=2, D=3):
        gen = torch.Generator().manual_seed(7)
        q = torch.randn(B, W * T_local, H, D, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(B, W * T_local, Hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
        local = [lasp2.shard(t, group=group, layout=layout) for t in (q, k, v)]
        call = dict(group=group, strategy=strategy, layout=layout)
        with torch.no_grad():
            lasp2.sp_softmax_attention(*local, **call)  # first-call agreement checks
            lasp2.sp_softmax_attention(*local, **call, return_kv=True)
            with comm.track() as plain:
                o_plain = lasp2.sp_softmax_attention(*local, **call)
            with comm.track() as log:
                o, (k_all, v_all) = lasp2.sp_softmax_attention(*local, **call, return_kv=True)
        extra = log.count() - plain.count()
        assert torch.equal(o, o_plain)
        assert_close("o", o, lasp2.shard(lasp2.softmax_attention(q, k, v), group=group, layout=layout),
                     torch.float64)
        assert torch.equal(k_all, k) and torch.equal(v_all, v), "K/V not the whole sequence in order"
        want = 0 if strategies.softmax(strategy).pattern == "all-gather" else 1
        assert extra == want, f"return_kv added {extra} collectives, expected {want}"

    run_cases([(f"{s}-{lay}", dict(strategy=s, layout=lay)) for s in strategies.SOFTMAX_STRATEGIES
               for lay in strategies.softmax(s).layouts], one)


def _worker(group, full: bool):
    sections = [("states", lambda g: _table(g, _default_cases() if not full else
                                            _cases(DIAGONAL_VARIANTS + DELTA_VARIANTS, tuple(STATE_USES))))]
    if not full:
        sections += [("misuse", _misuse), ("conv_cache", _conv_cache), ("return_kv", _return_kv)]
    return run_sections(group, sections)


SPAWNS = Spawns(_worker, False, pool="sp")
SPAWNS_FULL = Spawns(_worker, True, pool="sp-full")


def test_sp_states_match_single_device_w2():
    SPAWNS.results(2, "states")


def test_sp_states_misuse_raises_on_all_ranks():
    SPAWNS.results(2, "misuse")


def test_sp_conv_cache_w2():
    SPAWNS.results(2, "conv_cache")


def test_sp_softmax_return_kv_w2():
    SPAWNS.results(2, "return_kv")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [3, 4])
def test_sp_states_every_variant(world_size):
    SPAWNS_FULL.results(world_size, "states")
