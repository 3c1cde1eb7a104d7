"""The public contract of ``sp_linear_attention`` / ``shard`` / ``unshard`` (DESIGN §2, §5),
beyond numerical agreement (that is ``test_sp_linear.py``):

- bad arguments raise ``ValueError`` naming the argument, symmetrically on every rank;
- ranks that disagree get a ``ValueError`` on every rank (no hang, no wrong answer);
- the collective contract, counted independently with ``CommDebugMode`` (which sees plain c10d
  collectives on gloo: ``all_gather_single`` shows up as ``c10d._allgather_base_``; it does NOT
  see point-to-point send/recv, so "no P2P" is checked with ``comm.track()``), plus the exact
  byte count of the LASP-2 forward gather;
- a group of size 1 is exactly the single-device op;
- inference (no_grad, inputs without grad);
- ``shard`` / ``unshard`` against an independent definition of the layouts;
- an enclosing ``torch.autocast`` region changes no output or gradient (bf16 inputs too).

Spawning costs seconds, so there is ONE spawn per world size (1, 2, 4): the worker runs every
section as a table of cases and returns a report per section; each test below asserts on its
section. Every case runs its collectives before it asserts, so a failing case cannot leave the
ranks in mismatched collectives.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.debug import CommDebugMode

import lasp2
from lasp2.parallel import comm
from tests.dist import Spawns, run_cases, run_sections
from tests.helpers import assert_close

B, H, K, V, T_LOCAL = 2, 2, 4, 3, 6


# ---------------------------------------------------------------------------------------------
# Helpers (run inside the workers).


def _raises_value_error(fn: Callable[[], object], match: str) -> None:
    """``pytest.raises(ValueError, match=match)`` semantics with a plain AssertionError (pytest's
    ``Failed`` is a BaseException, which ``run_cases`` would not catch)."""
    try:
        fn()
    except ValueError as e:
        if not re.search(match, str(e), flags=re.S):
            raise AssertionError(f"ValueError message does not match {match!r}: {str(e)!r}") from None
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"expected ValueError matching {match!r}, got {type(e).__name__}: {e}") from None
    raise AssertionError(f"expected ValueError matching {match!r}, nothing was raised")


def _inputs(gate: Optional[str], T: int, *, b: int = B, h: int = H, kdim: int = K, vdim: int = V,
            dtype=torch.float32, seed: int = 0) -> Dict[str, Optional[torch.Tensor]]:
    """Global (or local: it is just a length) q, k, v, g; gate None | "scalar" | "channel"."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, T, h, kdim, generator=gen, dtype=torch.float64)
    k = torch.randn(b, T, h, kdim, generator=gen, dtype=torch.float64)
    v = torch.randn(b, T, h, vdim, generator=gen, dtype=torch.float64)
    g = None
    if gate is not None:
        shape = (b, T, h) if gate == "scalar" else (b, T, h, kdim)
        g = F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64) + 2.0)
    return {n: None if t is None else t.to(dtype) for n, t in dict(q=q, k=k, v=v, g=g).items()}


def _qkvg(d):
    return d["q"], d["k"], d["v"], d["g"]


def _comm_counts(mode: CommDebugMode) -> Dict[str, int]:
    return {str(op): n for op, n in mode.get_comm_counts().items() if n}


# ---------------------------------------------------------------------------------------------
# 1. Bad input -> ValueError naming the argument. All of these are rank-independent and raise
# before any collective, so every rank raises and no collective is left half-entered.


def _validation_cases(group, W: int):
    T = T_LOCAL
    x = _inputs(None, T)
    xg = _inputs("scalar", T)
    x1 = _inputs(None, T, b=1)
    x2 = _inputs(None, T, b=2)
    q, k, v, _ = _qkvg(x)
    sp = lasp2.sp_linear_attention
    odd = _inputs(None, 5)
    pos_g = xg["g"].clone()
    pos_g[0, 1, 0] = 0.25  # the same positive entry on every rank
    beta = torch.full((B, T, H), 2.5)  # outside [0, 2] (beta in (1, 2]: negative eigenvalues, accepted)
    cu_local = torch.tensor([0, 2, T])  # ends at the local length: a classic mistake
    cu_global = torch.tensor([0, 2, W * T])
    whole = torch.randn(2, 2 * W * 3, 4)
    cases = {
        "unknown strategy": (lambda: sp(q, k, v, group=group, strategy="lasp3"), r"strategy.*'lasp3'"),
        "unknown layout": (lambda: sp(q, k, v, group=group, layout="striped"), r"layout.*'striped'"),
        "cu_seqlens ends at the local length": (
            lambda: sp(*_qkvg(x1)[:3], group=group, cu_seqlens=cu_local),
            rf"cu_seqlens.*end.*{W * T}\b"),
        "cu_seqlens with B > 1": (
            lambda: sp(*_qkvg(x2)[:3], group=group, cu_seqlens=cu_global), r"cu_seqlens.*B == 1"),
        "positive g": (lambda: sp(xg["q"], xg["k"], xg["v"], pos_g, group=group), r"\bg\b.*<= 0"),
        "beta outside [0, 2]": (lambda: sp(q, k, v, None, beta, group=group), r"beta must lie in \[0, 2\]"),
        "delta rule (KDA) with a gate of another K": (
            lambda: sp(q, k, v, -torch.ones(B, T, H, K + 1), beta.clamp(0, 1), group=group),
            r"g must have shape \[B, T, H\].*or \[B, T, H, K\]"),
        "causal=False with g": (
            lambda: sp(*_qkvg(xg), group=group, causal=False), r"causal=False.*g=None"),
        "causal=False with lasp1": (
            lambda: sp(q, k, v, group=group, causal=False, strategy="lasp1"), r"causal=False.*strategy='lasp2'"),
        "shard: length does not split over W": (
            lambda: lasp2.shard(torch.randn(2, W * 3 + 1, 4), group=group),
            rf"length {W * 3 + 1}.*split into {W} equal parts"),
        "shard: bad dim": (lambda: lasp2.shard(whole, group=group, dim=3), r"dim=3 is out of range"),
        "shard: bad negative dim": (lambda: lasp2.shard(whole, group=group, dim=-4), r"dim=-4 is out of range"),
        "shard: unknown layout": (lambda: lasp2.shard(whole, group=group, layout="striped"), r"layout.*'striped'"),
        "unshard: bad dim": (lambda: lasp2.unshard(whole, group=group, dim=5), r"dim=5 is out of range"),
    }
    if W > 1:  # zigzag needs two segments per rank only when there are several ranks
        cases["zigzag with odd local T"] = (
            lambda: sp(*_qkvg(odd)[:3], group=group, layout="zigzag"), r"zigzag.*even.*T = 5")
        cases["shard zigzag: length splits over W but not 2W"] = (
            lambda: lasp2.shard(torch.randn(2, W * 3, 4), group=group, layout="zigzag"),
            rf"length {W * 3}.*split into {2 * W} equal parts.*zigzag")
    return [(name, dict(fn=fn, match=match)) for name, (fn, match) in cases.items()]


def _validation(group, W: int) -> int:
    cases = _validation_cases(group, W)
    run_cases(cases, _raises_value_error)
    return len(cases)


# ---------------------------------------------------------------------------------------------
# 2. Disagreeing ranks. Each case returns what happened on this rank (no assert in the worker:
# the parent checks every rank). Each "fresh" case uses a head count no other call in the
# worker uses, so its signature is new on every rank and ``ensure_agreement`` runs.


def _outcome(fn) -> List[Optional[str]]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return [type(e).__name__, str(e)]
    return [None, None]


def _disagreement(group, W: int) -> Dict[str, List[Optional[str]]]:
    rank = dist.get_rank(group)
    odd_one = rank == 1
    sp = lasp2.sp_linear_attention
    out = {}

    x = _inputs(None, 8 if odd_one else 6, h=5)
    out["fresh: local T"] = _outcome(lambda: sp(*_qkvg(x)[:3], group=group))

    x = _inputs("scalar", 6, h=6)
    out["fresh: strategy"] = _outcome(
        lambda: sp(*_qkvg(x), group=group, strategy="lasp1" if odd_one else "lasp2"))

    x = _inputs("channel", 6, h=7)
    out["fresh: layout"] = _outcome(
        lambda: sp(*_qkvg(x), group=group, layout="zigzag" if odd_one else "contiguous"))

    # Steady state: the signature (docs=True, same shapes) is already verified on every rank, so
    # only the header inside the one LASP-2 all-gather can catch the different documents.
    for layout in ("contiguous", "zigzag"):
        x = _inputs("scalar", 6, b=1, h=8)
        T = W * 6
        same = torch.tensor([0, 5, T])
        other = torch.tensor([0, 7, T])
        sp(*_qkvg(x), group=group, layout=layout, cu_seqlens=same)  # warm-up: everyone agrees
        out[f"steady: cu_seqlens ({layout})"] = _outcome(
            lambda: sp(*_qkvg(x), group=group, layout=layout, cu_seqlens=other if odd_one else same))
    return out


# ---------------------------------------------------------------------------------------------
# 3. The collective contract of strategy="lasp2": exactly one all-gather per direction (counted
# by CommDebugMode and by comm.track), no P2P, and the exact bytes of the forward gather.


def _contract_case(group, *, gate, layout, cu):
    W = dist.get_world_size(group)
    b = 1 if cu else B
    S = 2 if layout == "zigzag" else 1
    Kg = K if gate == "channel" else 1
    whole = _inputs(gate, W * T_LOCAL, b=b)
    leaves = {n: lasp2.shard(t, group=group, layout=layout).requires_grad_()
              for n, t in whole.items() if t is not None}
    args = [leaves.get(n) for n in ("q", "k", "v", "g")]
    call = dict(group=group, layout=layout, strategy="lasp2",
                cu_seqlens=torch.tensor([0, 5, W * T_LOCAL]) if cu else None)
    lasp2.sp_linear_attention(*args, **call)  # warm-up: the one-off agreement check happens here
    with comm.track() as flog, CommDebugMode() as fmode:
        o = lasp2.sp_linear_attention(*args, **call)
    with comm.track() as blog, CommDebugMode() as bmode:
        grads = torch.autograd.grad(o.sum(), list(leaves.values()))

    fwd, bwd = _comm_counts(fmode), _comm_counts(bmode)
    assert fmode.get_total_counts() == 1 and all("allgather" in op for op in fwd), f"forward: {fwd}"
    assert bmode.get_total_counts() == 1 and all("allgather" in op for op in bwd), f"backward: {bwd}"
    assert [r.op for r in flog.records] == ["all_gather"], f"forward comm.track: {flog.records}"
    assert [r.op for r in blog.records] == ["all_gather"], f"backward comm.track: {blog.records}"
    expected_fwd = (W - 1) * S * ((b * H * K * V + b * H * Kg) * 4 + 8)  # fp32 summaries + agreement digest
    assert flog.bytes_sent == expected_fwd, f"forward bytes_sent {flog.bytes_sent} != {expected_fwd}"
    expected_bwd = (W - 1) * S * b * H * K * V * 4
    assert blog.bytes_sent == expected_bwd, f"backward bytes_sent {blog.bytes_sent} != {expected_bwd}"
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def _contract(group, W: int) -> int:
    cases = [(f"g={gate}-{layout}", dict(gate=gate, layout=layout, cu=False))
             for gate in (None, "scalar", "channel") for layout in ("contiguous", "zigzag")]
    cases += [(f"g=scalar-{layout}-docs", dict(gate="scalar", layout=layout, cu=True))
              for layout in ("contiguous", "zigzag")]
    run_cases(cases, lambda **p: _contract_case(group, **p))
    return len(cases)


# ---------------------------------------------------------------------------------------------
# 4. A group of size 1 is exactly the single-device op (bitwise: o and every gradient).


def _single_case(group, *, strategy, layout, cu, dtype):
    b = 1 if cu else B
    x = _inputs("scalar", 9, b=b, dtype=dtype)
    cu_t = torch.tensor([0, 4, 9]) if cu else None
    ref = {n: t.clone().requires_grad_() for n, t in x.items()}
    mine = {n: t.clone().requires_grad_() for n, t in x.items()}
    with CommDebugMode() as mode:
        o = lasp2.sp_linear_attention(*_qkvg(mine), group=group, strategy=strategy, layout=layout,
                                      cu_seqlens=cu_t)
        grads = torch.autograd.grad((o * o).sum(), list(mine.values()))
    o_ref, _ = lasp2.linear_attention(*_qkvg(ref), cu_seqlens=cu_t)
    ref_grads = torch.autograd.grad((o_ref * o_ref).sum(), list(ref.values()))
    assert mode.get_total_counts() == 0, f"W = 1 issued collectives: {_comm_counts(mode)}"
    assert o.dtype == o_ref.dtype and torch.equal(o, o_ref), "o differs from linear_attention"
    for n, a, r in zip(mine, grads, ref_grads):
        assert torch.equal(a, r), f"d{n} differs from linear_attention"


def _single(group) -> int:
    cases = [(f"{s}-{l}-{'docs' if cu else 'nodocs'}-{str(dt)[6:]}",
              dict(strategy=s, layout=l, cu=cu, dtype=dt))
             for s in ("lasp2", "lasp1") for l in ("contiguous", "zigzag") for cu in (False, True)
             for dt in (torch.float32,)]
    cases.append(("lasp2-contiguous-nodocs-float64",
                  dict(strategy="lasp2", layout="contiguous", cu=False, dtype=torch.float64)))
    run_cases(cases, lambda **p: _single_case(group, **p))
    return len(cases)


# ---------------------------------------------------------------------------------------------
# 5. Inference: no_grad gives the same output as with grad; inputs without grad work.


def _args(d):
    return [d.get(n) for n in ("q", "k", "v", "g")]


def _local_inputs(group, layout, gate):
    W = dist.get_world_size(group)
    whole = {n: t for n, t in _inputs(gate, W * T_LOCAL, dtype=torch.float64, seed=3).items() if t is not None}
    return whole, {n: lasp2.shard(t, group=group, layout=layout) for n, t in whole.items()}


def _no_grad_case(group, *, strategy, layout, gate):
    W = dist.get_world_size(group)
    whole, local = _local_inputs(group, layout, gate)
    call = dict(group=group, strategy=strategy, layout=layout)
    lasp2.sp_linear_attention(*_args(local), **call)  # warm-up (agreement check)
    leaves = {n: t.clone().requires_grad_() for n, t in local.items()}
    o_grad = lasp2.sp_linear_attention(*_args(leaves), **call)
    with torch.no_grad(), comm.track() as nolog:
        o_nograd = lasp2.sp_linear_attention(*_args(leaves), **call)
    o_plain = lasp2.sp_linear_attention(*_args(local), **call)  # grad mode on, no input needs grad
    o_ref, _ = lasp2.linear_attention(*_args(whole))

    assert o_grad.requires_grad and not o_nograd.requires_grad and not o_plain.requires_grad
    assert torch.equal(o_nograd, o_grad.detach()), "no_grad output differs from the output with grad"
    assert torch.equal(o_plain, o_grad.detach()), "output for inputs without grad differs"
    assert nolog.count("all_gather") == (1 if strategy == "lasp2" and W > 1 else 0), nolog.records
    assert_close("o", o_nograd, lasp2.shard(o_ref, group=group, layout=layout), torch.float64, whole=o_ref)


def _partial_grad_case(group, *, strategy, layout, gate, wanted):
    """Only the inputs in ``wanted`` require grad: the backward runs (its collectives on every
    rank) and fills exactly their gradients, which match the single-device ones."""
    W = dist.get_world_size(group)
    whole, local = _local_inputs(group, layout, gate)
    weight = torch.cos(torch.arange(B * W * T_LOCAL * H * V, dtype=torch.float64)).view(B, W * T_LOCAL, H, V)
    mixed = {n: (t.clone().requires_grad_() if n in wanted else t.clone()) for n, t in local.items()}
    o = lasp2.sp_linear_attention(*_args(mixed), group=group, strategy=strategy, layout=layout)
    with comm.track() as blog:
        o.backward(lasp2.shard(weight, group=group, layout=layout))
    ref = {n: t.clone().requires_grad_() for n, t in whole.items()}
    o_ref, _ = lasp2.linear_attention(*_args(ref))
    ref_grads = dict(zip(ref, torch.autograd.grad((o_ref * weight).sum(), list(ref.values()))))

    for n, t in mixed.items():
        if n in wanted:
            assert t.grad is not None, f"d{n} missing"
            assert_close(f"d{n}", t.grad, lasp2.shard(ref_grads[n], group=group, layout=layout),
                         torch.float64, whole=ref_grads[n])
        else:
            assert t.grad is None, f"d{n} should be None"
    if strategy == "lasp2" and W > 1:
        assert [r.op for r in blog.records] == ["all_gather"], f"backward: {blog.records}"


_STRATEGY_LAYOUTS = [(s, l) for s in ("lasp2", "lasp1") for l in ("contiguous", "zigzag")]


def _inference(group, W: int) -> int:
    cases = [(f"no_grad-{s}-{l}-g={gate}", (_no_grad_case, dict(strategy=s, layout=l, gate=gate)))
             for s, l in _STRATEGY_LAYOUTS for gate in (None, "channel")]
    wanted_sets = [("q", "v"), ("k",), ("q", "g")] + ([("q",)] if W == 1 else [])
    cases += [(f"grad{'+'.join(w)}-{s}-{l}", (_partial_grad_case, dict(strategy=s, layout=l, gate="scalar",
                                                                        wanted=w)))
              for s, l in _STRATEGY_LAYOUTS for w in wanted_sets]
    run_cases([(name, dict(case=c)) for name, c in cases], lambda case: case[0](group, **case[1]))
    return len(cases)


def _q_only_grad(group) -> int:
    cases = [(f"{s}-{l}-g={gate}", dict(strategy=s, layout=l, gate=gate, wanted=("q",)))
             for s, l in _STRATEGY_LAYOUTS for gate in (None, "scalar")]
    run_cases(cases, lambda **p: _partial_grad_case(group, **p))
    return len(cases)


# ---------------------------------------------------------------------------------------------
# 6. shard / unshard against an independent definition of the layouts.


def _expected_shard(x: torch.Tensor, rank: int, W: int, layout: str, dim: int) -> torch.Tensor:
    if layout == "contiguous":
        return x.chunk(W, dim=dim)[rank]
    parts = x.chunk(2 * W, dim=dim)  # zigzag: segments r and 2W-1-r
    return torch.cat([parts[rank], parts[2 * W - 1 - rank]], dim=dim)


def _roundtrip_case(group, *, layout, dim, shape):
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))  # identical on every rank
    part = lasp2.shard(x, group=group, layout=layout, dim=dim)
    with CommDebugMode() as mode:
        back = lasp2.unshard(part, group=group, layout=layout, dim=dim)
    back_nc = lasp2.unshard(part.transpose(0, -1).contiguous().transpose(0, -1), group=group,
                            layout=layout, dim=dim)  # non-contiguous input
    assert torch.equal(part, _expected_shard(x, rank, W, layout, dim)), "shard took the wrong part"
    assert torch.equal(back, x), "unshard(shard(x)) != x"
    assert torch.equal(back_nc, x), "unshard of a non-contiguous shard != x"
    # 2: the parts' shapes are compared first (a small fixed-size gather), then the data moves
    assert mode.get_total_counts() == (2 if W > 1 else 0), f"unshard: {_comm_counts(mode)}"


def _roundtrip(group, W: int) -> int:
    shape = (2, 2 * W * 3, 2 * W * 2, 2 * W)
    cases = [(f"{l}-dim{d}", dict(layout=l, dim=d, shape=shape))
             for l in ("contiguous", "zigzag") for d in (1, 2, -1)]
    run_cases(cases, lambda **p: _roundtrip_case(group, **p))
    return len(cases)


# ---------------------------------------------------------------------------------------------
# 7. Autocast: the ops pick their own precision (fp32 states and summaries), so an enclosing
#    torch.autocast region changes nothing, bf16 inputs included (it used to turn the gathered
#    fp32 summaries, header included, into bf16 and fail the agreement check).


def _fwd_bwd(fn, leaves: Dict[str, torch.Tensor], seed: int, autocast: bool):
    """Forward (inside an autocast region if asked), backward outside it, as PyTorch advises."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        o = fn(leaves)
    o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.dtype))
    return o.detach(), {n: t.grad for n, t in leaves.items()}


def _autocast_case(group, *, op, strategy, layout, dtype):
    _, local = _local_inputs(group, layout, "scalar" if op == "linear" else None)
    local = {n: t.to(dtype) for n, t in local.items()}
    call = dict(group=group, strategy=strategy, layout=layout)
    if op == "linear":
        fn = lambda d: lasp2.sp_linear_attention(*_args(d), **call)  # noqa: E731
    else:
        fn = lambda d: lasp2.sp_softmax_attention(d["q"], d["k"], d["v"], **call)  # noqa: E731
    o_plain, g_plain = _fwd_bwd(fn, local, seed=5, autocast=False)
    o_auto, g_auto = _fwd_bwd(fn, local, seed=5, autocast=True)
    assert o_auto.dtype == dtype, f"output dtype {o_auto.dtype}, expected the inputs' {dtype}"
    assert torch.equal(o_auto, o_plain), "autocast changed the output"
    for n in g_plain:
        assert torch.equal(g_auto[n], g_plain[n]), f"autocast changed d{n}"


def _autocast(group) -> int:
    cases = [(f"linear-{s}-{l}-{str(dt)[6:]}", dict(op="linear", strategy=s, layout=l, dtype=dt))
             for s, l in _STRATEGY_LAYOUTS for dt in (torch.float32, torch.bfloat16)]
    cases += [(f"softmax-{s}-{l}", dict(op="softmax", strategy=s, layout=l, dtype=torch.bfloat16))
              for s in ("allgather", "ring") for l in ("contiguous", "zigzag")]
    run_cases(cases, lambda **p: _autocast_case(group, **p))
    return len(cases)


# ---------------------------------------------------------------------------------------------
# The one worker per world size, and its cached result.


def _worker(group, full_at_4: bool):
    """Every section in one spawn per world size. The checks that do not depend on the number of
    ranks beyond 2 (argument validation, inference, shard round trips, autocast, q-only grads)
    run at W = 4 only in the slow run; so do the contract and the disagreement checks at W = 4
    (CI time: their W = 2 forms and the W = 4 SP tables of test_sp_linear stay in the default run)."""
    W = dist.get_world_size(group)
    if W == 1:
        sections = [("single", _single)]
    else:
        sections = [("disagreement", lambda g: _disagreement(g, W)), ("contract", lambda g: _contract(g, W))]
    if W < 4 or full_at_4:
        if W > 1:
            sections += [("validation", lambda g: _validation(g, W)), ("q_only_grad", _q_only_grad)]
        sections += [("inference", lambda g: _inference(g, W)), ("roundtrip", lambda g: _roundtrip(g, W)),
                     ("autocast", _autocast)]
    return run_sections(group, sections)


# One spawn per world size for test_sp_contract, test_sp_linear and test_sp_softmax together.
SPAWNS = Spawns(_worker, False, pool="sp")
SPAWNS_FULL = Spawns(_worker, True, pool="sp-full")


def _section_results(world_size: int, name: str) -> list:
    return (SPAWNS_FULL if world_size == 4 and name in _SLOW_AT_4 else SPAWNS).results(world_size, name)


_SLOW_AT_4 = ("validation", "q_only_grad", "inference", "roundtrip", "autocast")
W4_SLOW = pytest.param(4, marks=pytest.mark.slow)


# ---------------------------------------------------------------------------------------------
# Tests.


def test_group_is_required_without_a_process_group():
    q = k = v = torch.randn(1, 4, 2, 3)
    # Runs in the pytest process, where (normally) no process group exists: the error must be
    # about the argument, raised before anything touches torch.distributed.
    with pytest.raises(ValueError, match=r"group is required"):
        lasp2.sp_linear_attention(q, k, v, group=None)
    with pytest.raises(ValueError, match=r"group is required"):
        lasp2.shard(q, group=None)
    with pytest.raises(ValueError, match=r"group is required"):
        lasp2.unshard(q, group=None)
    with pytest.raises(ValueError, match=r"group must be a torch.distributed.ProcessGroup"):
        lasp2.sp_linear_attention(q, k, v, group="sp")


@pytest.mark.parametrize("world_size", [2, W4_SLOW])
def test_bad_arguments_raise_value_error_naming_them(world_size):
    counts = _section_results(world_size, "validation")
    assert counts == [counts[0]] * world_size and counts[0] == 16


@pytest.mark.parametrize("world_size", [2, W4_SLOW])
def test_disagreeing_ranks_all_raise(world_size):
    per_rank = _section_results(world_size, "disagreement")
    cases = list(per_rank[0])
    assert len(cases) == 5
    for case in cases:
        for rank, outcome in enumerate(per_rank):
            kind, msg = outcome[case]
            assert kind == "ValueError", f"{case}: rank {rank} got {kind}: {msg}"
            assert re.search(r"disagree|different arguments", msg), f"{case}: rank {rank}: {msg}"
            if case.startswith("fresh"):  # the agreement check shows every rank's arguments
                assert all(f"rank {r}:" in msg for r in range(world_size)), f"{case}: rank {rank}: {msg}"
                what = {"fresh: local T": r"\(2, 8, 5, 4\)", "fresh: strategy": "strategy=lasp1",
                        "fresh: layout": "layout=zigzag"}[case]
                assert re.search(what, msg), f"{case}: the message does not show the difference: {msg}"
            else:  # the header check names the ranks that differ from this one (rank 1 is odd)
                odd = [1] if rank != 1 else [r for r in range(world_size) if r != 1]
                assert f"rank(s) {odd}" in msg, f"{case}: rank {rank}: {msg}"


@pytest.mark.parametrize("world_size", [2, W4_SLOW])
def test_lasp2_collective_contract(world_size):
    assert _section_results(world_size, "contract") == [8] * world_size


def test_group_of_size_one_is_the_single_device_op():
    assert _section_results(1, "single") == [9]


@pytest.mark.parametrize("world_size", [1, 2, W4_SLOW])
def test_inference_and_partial_grads(world_size):
    n = 8 + 4 * (3 + (world_size == 1))
    assert _section_results(world_size, "inference") == [n] * world_size


@pytest.mark.parametrize("world_size", [2, W4_SLOW])
def test_only_q_requires_grad(world_size):
    assert _section_results(world_size, "q_only_grad") == [8] * world_size


@pytest.mark.parametrize("world_size", [1, 2, W4_SLOW])
def test_shard_unshard_roundtrip(world_size):
    assert _section_results(world_size, "roundtrip") == [6] * world_size


@pytest.mark.parametrize("world_size", [1, 2, W4_SLOW])
def test_autocast_changes_nothing(world_size):
    assert _section_results(world_size, "autocast") == [12] * world_size
