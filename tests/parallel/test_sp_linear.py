"""sp_linear_attention (lasp2 and lasp1, both layouts) vs linear_attention on the whole sequence,
shard by shard: output and every gradient, plus the communication contract."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from tests.dist import WORLD_SIZES, Spawns, run_cases, run_sections
from tests.helpers import DELTA_VARIANTS, DIAGONAL_VARIANTS, KDA
from tests.sp_cases import compare_linear

LAYOUTS = ("contiguous", "zigzag")


def _expect_contract(result, params):
    W = params["W"]
    if W == 1:
        return
    if params["strategy"] == "lasp2":
        assert result["fwd_gathers"] == 1, f"forward issued {result['fwd_gathers']} all-gathers, expected 1"
        assert result["bwd_gathers"] == 1, f"backward issued {result['bwd_gathers']} all-gathers, expected 1"
        assert result["fwd_sends"] == result["bwd_sends"] == 0
    elif params.get("causal", True):
        assert result["fwd_gathers"] == result["bwd_gathers"] == 0, "lasp1 must not all-gather"
        return result


def _sp_table(group, cases):
    W = dist.get_world_size(group)
    cases = [(name, dict(params, W=W)) for name, params in cases]
    sends = {}

    def check(W, **params):
        result = compare_linear(group, **params)
        _expect_contract(result, dict(params, W=W))
        sends[params["strategy"], params["layout"], params["variant"], params["T_local"]] = (
            result["fwd_sends"], result["bwd_sends"])

    run_cases(cases, check)
    return sends


def _cases(dtypes=(torch.float64,), lengths=(1, 37, 70)):
    out = []
    for variant, strategy, layout, T_local, dtype in itertools.product(
            DIAGONAL_VARIANTS, ("lasp2", "lasp1"), ("contiguous", "zigzag"), lengths, dtypes):
        if layout == "zigzag" and T_local % 2:
            T_local += 1
        name = f"{variant}-{strategy}-{layout}-T{T_local}-{str(dtype)[6:]}"
        out.append((name, dict(variant=variant, B=2, T_local=T_local, H=3, K=5, V=4, dtype=dtype,
                               strategy=strategy, layout=layout)))
    return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sp_linear_matches_single_device_fp64(world_size):
    sends = SPAWNS.results(world_size, "fp64")
    # LASP-1 contiguous: ranks 0..W-2 send once per direction, so W - 1 sends in all.
    for key in sends[0]:
        strategy, layout = key[:2]
        if strategy == "lasp1" and layout == "contiguous" and world_size > 1:
            fwd = [s[key][0] for s in sends]
            bwd = [s[key][1] for s in sends]
            assert fwd == [1] * (world_size - 1) + [0], f"{key}: forward sends per rank {fwd}"
            assert bwd == [0] + [1] * (world_size - 1), f"{key}: backward sends per rank {bwd}"


@pytest.mark.parametrize("world_size", [2, 4])
def test_sp_linear_fp32_and_bf16(world_size):
    SPAWNS.results(world_size, "fp32_bf16")


def _bidirectional(group):
    W = dist.get_world_size(group)
    cases = [(f"bidir-{layout}-{dtype}", dict(variant="basic", B=2, T_local=6, H=2, K=3, V=5, dtype=dtype,
                                              strategy="lasp2", layout=layout, causal=False))
             for layout in ("contiguous", "zigzag") for dtype in (torch.float64, torch.float32)]
    cases += [(f"bidir-docs-{scenario}-{layout}", dict(variant="basic", B=1, T_local=12, H=2, K=3, V=5,
                                                        dtype=torch.float64, strategy="lasp2", layout=layout,
                                                        causal=False, cu=cu))
              for scenario, cu in doc_scenarios(W, 12).items() for layout in ("contiguous", "zigzag")]
    run_cases(cases, lambda **p: compare_linear(group, **p))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sp_bidirectional(world_size):
    SPAWNS.results(world_size, "bidirectional")


def doc_scenarios(W: int, T_local: int):
    """Packed-document layouts of DESIGN §5, as global cu_seqlens for W ranks of T_local."""
    T = W * T_local
    return {
        "cut-mid-rank": [0, T_local // 2 + 1, T],
        "on-rank-boundaries": list(range(0, T + 1, T_local)),
        "many-short-in-one-rank": [0, 1, 2, 3, 5, 8, T],
        "one-doc-spans-all": [0, T],
        "ranks-without-start": [0, 3, T],
        "length-one-docs": [0, 1, 2, T - 2, T - 1, T],
    }


def _documents(group, full: bool):
    W = dist.get_world_size(group)
    cases = []
    variants, layouts = (DIAGONAL_VARIANTS, LAYOUTS) if full else (("scalar", "channel"), ("zigzag",))
    for (scenario, cu), variant, strategy, layout in itertools.product(
            doc_scenarios(W, 12).items(), variants, ("lasp2", "lasp1"), layouts):
        cases.append((f"{scenario}-{variant}-{strategy}-{layout}",
                      dict(variant=variant, B=1, T_local=12, H=2, K=4, V=3, dtype=torch.float64,
                           strategy=strategy, layout=layout, cu=cu, W=W)))
    run_cases(cases, lambda W, **p: _expect_contract(compare_linear(group, **p), dict(p, W=W)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sp_linear_documents(world_size):
    SPAWNS.results(world_size, "documents")


def _delta(group, full: bool):
    """DeltaNet / Gated DeltaNet: K x K transitions in the same single all-gather."""
    W = dist.get_world_size(group)
    cases = []
    for variant, strategy, layout, T_local in itertools.product(
            DELTA_VARIANTS, ("lasp2", "lasp1"), ("contiguous", "zigzag"), (1, 38, 70) if full else (38,)):
        if layout == "zigzag" and T_local % 2:
            T_local += 1
        cases.append((f"{variant}-{strategy}-{layout}-T{T_local}",
                      dict(variant=variant, B=2, T_local=T_local, H=2, K=4, V=3, dtype=torch.float64,
                           strategy=strategy, layout=layout, W=W)))
    for (scenario, cu), variant, layout in itertools.product(
            doc_scenarios(W, 12).items(), DELTA_VARIANTS, LAYOUTS if full else ("zigzag",)):
        cases.append((f"docs-{scenario}-{variant}-{layout}",
                      dict(variant=variant, B=1, T_local=12, H=2, K=4, V=3, dtype=torch.float64,
                           strategy="lasp2", layout=layout, cu=cu, W=W)))
    cases.append(("gated_deltanet-fp32", dict(variant="gated_deltanet", B=1, T_local=70, H=2, K=8, V=8,
                                              dtype=torch.float32, strategy="lasp2", layout="zigzag", W=W)))
    run_cases(cases, lambda W, **p: _expect_contract(compare_linear(group, **p), dict(p, W=W)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sp_delta_rule(world_size):
    SPAWNS.results(world_size, "delta")


def _kda(group, full: bool):
    """KDA (the per-channel gated delta rule): its K x K transitions travel in the same single
    all-gather per direction (``_expect_contract``). The default run keeps one case per strategy
    and layout and two document layouts; the full table (slow, W = 4) is every length, layout
    and document scenario."""
    W = dist.get_world_size(group)
    common = dict(variant=KDA, H=2, K=4, V=3, dtype=torch.float64, W=W)
    if full and W >= 4:
        plain = [(s, lay, T) for s, lay, T in itertools.product(("lasp2", "lasp1"), LAYOUTS, (1, 38, 70))]
        docs = [(sc, cu, lay) for (sc, cu), lay in itertools.product(doc_scenarios(W, 12).items(), LAYOUTS)]
    else:
        plain = [("lasp2", "contiguous", 38), ("lasp1", "zigzag", 38)]
        scenarios = doc_scenarios(W, 12)
        docs = [(sc, scenarios[sc], "zigzag") for sc in ("cut-mid-rank", "length-one-docs")]
    cases = [(f"kda-{s}-{lay}-T{T + (lay == 'zigzag' and T % 2)}",
              dict(common, B=2, T_local=T + (lay == "zigzag" and T % 2), strategy=s, layout=lay))
             for s, lay, T in plain]
    cases += [(f"kda-docs-{sc}-{lay}", dict(common, B=1, T_local=12, strategy="lasp2", layout=lay, cu=cu))
              for sc, cu, lay in docs]
    run_cases(cases, lambda W, **p: _expect_contract(compare_linear(group, **p), dict(p, W=W)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sp_kda(world_size):
    SPAWNS.results(world_size, "kda")


def _worker(group, full_at_4: bool):
    """Every section of this module in one spawn per world size. At W = 4 the default run
    (``full_at_4`` False) keeps a short form of each table: the cases that differ from W = 2
    only in the number of ranks are the long ones (``test_sp_linear_full_tables_w4``, slow)."""
    W = dist.get_world_size(group)
    full = W < 4 or full_at_4
    sections = [("fp64", lambda g: _sp_table(g, _cases(lengths=(1, 37, 70) if full else (70,)))),
                ("bidirectional", _bidirectional), ("documents", lambda g: _documents(g, full)),
                ("delta", lambda g: _delta(g, full)), ("kda", lambda g: _kda(g, full_at_4))]
    if W > 1:
        sections.append(("fp32_bf16", lambda g: _sp_table(g, _cases(dtypes=(torch.float32, torch.bfloat16),
                                                                     lengths=(37,)))))
    return run_sections(group, sections)


# One spawn per world size for test_sp_contract, test_sp_linear and test_sp_softmax together.
SPAWNS = Spawns(_worker, False, pool="sp")
SPAWNS_FULL = Spawns(_worker, True, pool="sp-full")


@pytest.mark.slow
@pytest.mark.parametrize("section", ["fp64", "documents", "delta", "kda"])
def test_sp_linear_full_tables_w4(section):
    SPAWNS_FULL.results(4, section)
