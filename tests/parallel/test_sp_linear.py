"""sp_linear_attention (lasp2 and lasp1, both layouts) vs linear_attention on the whole sequence,
shard by shard: output and every gradient, plus the communication contract."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from lasp2.parallel.strategies import LINEAR_STRATEGIES
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
    # beta in (0, 2) (negative eigenvalues, OLMo hybrid's allow_neg_eigval): every strategy, exact as any beta
    for strategy, variant in zip(LINEAR_STRATEGIES, itertools.cycle(("gated_deltanet", "deltanet"))):
        cases.append((f"beta-to-2-{variant}-{strategy}", dict(
            variant=variant, B=1, T_local=12, H=2, K=4, V=3, dtype=torch.float64, strategy=strategy,
            layout="zigzag", cu=doc_scenarios(W, 12)["cut-mid-rank"], beta_max=2.0, W=W)))
    cases.append(("gated_deltanet-fp32", dict(variant="gated_deltanet", B=1, T_local=70, H=2, K=8, V=8,
                                              dtype=torch.float32, strategy="lasp2", layout="zigzag", W=W)))
    run_cases(cases, lambda W, **p: _expect_contract(compare_linear(group, **p), dict(p, W=W)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sp_delta_rule(world_size):
    SPAWNS.results(world_size, "delta")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sp_delta_rule_ends_skip_what_nothing_reads(world_size):
    """The sequence's first segment without an initial state runs neither the summary tree nor G's
    adjoint pass (P = 0), the last one without a final state no tree (nothing reads its summary);
    every other segment runs both once. With an initial and a final state every segment runs both."""
    from lasp2.parallel.layout import Layout

    got = SPAWNS.results(world_size, "delta_ends")
    for rank, counts in enumerate(got):
        for (layout, states), (trees, adjoints) in counts.items():
            split = Layout(layout, world_size, 8)
            segments = [s.index for s in split.local_segments(rank)]
            sp = world_size > 1  # a group of one runs the one-device op (``test_sp_contract``)
            want_trees = sum(sp and (states or 0 < j < split.num_segments - 1) for j in segments)
            want_adjoints = sum(sp and (states or j > 0) for j in segments)
            assert (trees, adjoints) == (want_trees, want_adjoints), (
                f"rank {rank}, {layout}, states={states}: segments {segments} ran {trees} trees and "
                f"{adjoints} adjoint passes, expected {want_trees} and {want_adjoints}")


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


def _delta_ends(group):
    """How often each rank runs the delta rule's two SP extras (``ops.delta``: the summary tree
    ``delta_segment_summary`` and G's adjoint pass ``delta_entry_adjoint``) in one fwd + bwd of
    ``sp_linear_attention``: per layout, without and with an initial and a final state. The
    outputs of these calls are checked against the single-device op by the "delta" section."""
    import lasp2
    from lasp2.ops import delta

    W, rank = dist.get_world_size(group), dist.get_rank(group)
    counts = {}
    originals = {name: getattr(delta, name) for name in ("delta_segment_summary", "delta_entry_adjoint")}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return call

    out = {}
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    g, beta = -torch.rand(1, 8, 2, generator=gen, dtype=torch.float64), torch.rand(1, 8, 2, generator=gen, dtype=torch.float64)
    try:
        for name in originals:
            setattr(delta, name, counting(name))
        for layout, states in itertools.product(LAYOUTS, (False, True)):
            counts.clear()
            leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
            extra = dict(initial_state=torch.ones(1, 2, 4, 4, dtype=torch.float64), output_final_state=True) if states else {}
            o = lasp2.sp_linear_attention(*leaves, scale=0.5, group=group, strategy="lasp2", layout=layout, **extra)
            loss = (o[0] if states else o).sum() + (o[1].sum() if states else 0)
            torch.autograd.grad(loss, leaves)
            out[layout, states] = (counts.get("delta_segment_summary", 0), counts.get("delta_entry_adjoint", 0))
    finally:
        for name, fn in originals.items():
            setattr(delta, name, fn)
    return out


def _worker(group, full_at_4: bool):
    """Every section of this module in one spawn per world size. At W = 4 the default run
    (``full_at_4`` False) keeps a short form of each table: the cases that differ from W = 2
    only in the number of ranks are the long ones (``test_sp_linear_full_tables_w4``, slow)."""
    W = dist.get_world_size(group)
    full = W < 4 or full_at_4
    sections = [("fp64", lambda g: _sp_table(g, _cases(lengths=(1, 37, 70) if full else (70,)))),
                ("bidirectional", _bidirectional), ("documents", lambda g: _documents(g, full)),
                ("delta", lambda g: _delta(g, full)), ("kda", lambda g: _kda(g, full_at_4)),
                ("delta_ends", _delta_ends)]
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
