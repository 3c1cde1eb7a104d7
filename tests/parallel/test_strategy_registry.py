"""The strategy registry is the only list of strategy names, every consumer reads it, and none
branches on a name: they read the entries' capabilities (and the bench its per-pattern costs)."""
from __future__ import annotations

import ast
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lasp2.parallel import allscan, strategies

ROOT = Path(__file__).resolve().parents[2]


def _package_nodes():
    """(path relative to the repository, AST node) of every node of the package's modules but the
    registry's."""
    for path in sorted((ROOT / "lasp2").rglob("*.py")):
        if path.name == "strategies.py" and path.parent.name == "parallel":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            yield path.relative_to(ROOT), node


def _strategy_names(nodes) -> list:
    """The registered strategy names among ``nodes`` that are string constants."""
    names = set(strategies.LINEAR) | set(strategies.SOFTMAX)
    return [n.value for n in nodes if isinstance(n, ast.Constant) and n.value in names]


def test_no_other_list_of_strategy_names_in_the_package():
    """No tuple/list/set literal outside the registry holds two or more strategy names."""
    offenders = [f"{path}:{node.lineno} {found}" for path, node in _package_nodes()
                 if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(found := _strategy_names(node.elts)) >= 2]
    assert not offenders, "strategy names listed outside lasp2/parallel/strategies.py:\n" + "\n".join(offenders)


def test_consumers_read_the_registry():
    from lasp2.bench import cost_model, plan, suites
    from lasp2.train.config import TrainConfig

    assert suites.LinearSuite().configs() == [*strategies.LINEAR_STRATEGIES, suites.IDEAL]
    assert suites.SoftmaxSuite().configs() == [*strategies.SOFTMAX_STRATEGIES, suites.IDEAL]
    pairs = plan.strategy_pairs(plan.MODELS["linear-llama3-1b"])
    assert {p[0] for p in pairs} == set(strategies.LINEAR_STRATEGIES)
    shape = cost_model.Shape(B=1, T=4096, H=8, K=64, V=64)
    link = cost_model.Link("test", 1e-5, 1e10, 2e-5)
    for name in strategies.LINEAR_STRATEGIES:  # the cost model knows every registered strategy
        assert cost_model.linear_layer(name, 8, shape, 1e12, link).comm > 0, name
    for name in strategies.SOFTMAX_STRATEGIES:
        assert cost_model.softmax_layer(name, 8, shape, 1e12, link).bytes_sent > 0, name
    for name in strategies.LINEAR_STRATEGIES:
        assert TrainConfig(strategy=name).strategy == name
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="nope")
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'; choose one of 'lasp2'"):
        strategies.linear("nope")


def test_no_module_branches_on_a_strategy_name():
    """Outside the registry no comparison involves a strategy name (``strategy == "ulysses"``,
    ``name in ("lasp1", ...)``) and no dict is keyed by one: code asks what a strategy can do."""
    offenders = []
    for path, node in _package_nodes():
        if isinstance(node, ast.Compare):
            found = _strategy_names([node.left, *node.comparators])
        elif isinstance(node, ast.Dict):
            found = _strategy_names(node.keys)
        else:
            continue
        if found:
            offenders.append(f"{path}:{node.lineno} {found}")
    assert not offenders, "branches on strategy names outside lasp2/parallel/strategies.py:\n" + "\n".join(offenders)


def test_the_name_checks_can_fail(tmp_path, monkeypatch):
    """Both checks above see a synthetic module that compares with registered names, keys a dict
    by one and lists two."""
    fake = tmp_path / "lasp2"
    fake.mkdir()
    (fake / "bad.py").write_text("CHAINS = ('lasp1', 'tree')\n\ndef f(s):\n    return s == 'ulysses' or {'ring': 1}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"bad.py:4 \['ulysses'\][\s\S]*bad.py:4 \['ring'\]"):
        test_no_module_branches_on_a_strategy_name()
    with pytest.raises(AssertionError, match=r"bad.py:1 \['lasp1', 'tree'\]"):
        test_no_other_list_of_strategy_names_in_the_package()


def test_every_pattern_has_cost_terms_and_a_new_strategy_needs_none(monkeypatch):
    """The cost model costs strategies by their registry ``pattern``: every registered pattern
    has an entry, and a new strategy with an existing pattern is costed without a bench change
    (here a copy of the chain registered under another name costs what the chain does)."""
    from lasp2.bench import cost_model

    assert {e.pattern for e in strategies.LINEAR.values()} <= set(cost_model.LINEAR_COSTS)
    assert {e.pattern for e in strategies.SOFTMAX.values()} <= set(cost_model.SOFTMAX_COSTS)
    chain = next(e for e in strategies.LINEAR.values() if e.pattern == "chain")
    monkeypatch.setitem(strategies.LINEAR, "chain-copy", replace(chain, name="chain-copy"))
    shape = cost_model.Shape(B=1, T=4096, H=8, K=64, V=64)
    link = cost_model.Link("test", 1e-5, 1e10, 2e-5)
    new, old = (cost_model.linear_layer(n, 8, shape, 1e12, link, segments=2) for n in ("chain-copy", chain.name))
    assert new.strategy == "chain-copy"
    assert replace(new, strategy=chain.name) == old
    assert old.comm == pytest.approx(2 * 15 * (2e-5 + 1e-10 * 64 * 64 * 8 * 4))  # J - 1 = 15 hops each way


def test_capabilities():
    """What the public API reads: causal=False has a Function only where one exists, scan_blocks
    only for pipelined exchanges, every strategy runs under every layout today."""
    from lasp2.parallel.lasp2 import BidirectionalLASP2Function
    from lasp2.parallel.layout import LAYOUTS

    assert strategies.with_capability(strategies.LINEAR, lambda e: not e.causal_only) == ("lasp2",)
    assert strategies.linear("lasp2").bidirectional is BidirectionalLASP2Function
    assert strategies.with_capability(strategies.LINEAR, lambda e: e.pipelined) == ("allscan",)
    assert strategies.with_capability(strategies.LINEAR, lambda e: e.point_to_point) == ("lasp1", "allscan", "tree")
    assert strategies.with_capability(strategies.SOFTMAX, lambda e: e.heads_divisible) == ("ulysses",)
    assert strategies.with_capability(strategies.SOFTMAX, lambda e: e.point_to_point) == ("ring",)
    assert all(e.layouts == LAYOUTS for e in (*strategies.LINEAR.values(), *strategies.SOFTMAX.values()))


@pytest.mark.parametrize("J,state_time,alpha,V,expected", [
    (2, 1e-3, 1e-5, 64, 1),        # one hop: nothing to pipeline
    (10, 8e-5, 1e-5, 64, 8),       # sqrt(8 * 8) = 8
    (10, 8e-5, 1e-5, 4, 4),        # at most V blocks (the state splits along V)
    (258, 26e-6, 25e-6, 64, 16),   # 256 ranks, 1 MiB state over 40 GB/s, 25 us hops: sqrt(256 * 1.04)
])
def test_pipeline_blocks(J, state_time, alpha, V, expected):
    k = allscan.pipeline_blocks(J, state_time, alpha, V)
    assert k == expected
    cost = lambda k: (J + k - 2) * (alpha + state_time / k)  # noqa: E731
    assert all(cost(k) <= cost(m) + 1e-18 for m in range(1, V + 1)), "not the minimum over 1..V"
