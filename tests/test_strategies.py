"""The strategy registry is the only list of strategy names, and every consumer reads it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lasp2.parallel import allscan, strategies

ROOT = Path(__file__).resolve().parent.parent


def test_no_other_list_of_strategy_names_in_the_package():
    """No tuple/list/set literal outside the registry holds two or more strategy names."""
    names = set(strategies.LINEAR) | set(strategies.SOFTMAX)
    offenders = []
    for path in sorted((ROOT / "lasp2").rglob("*.py")):
        if path.name == "strategies.py" and path.parent.name == "parallel":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                found = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
                if len(found) >= 2:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {found}")
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
    for name in strategies.LINEAR_STRATEGIES:
        assert TrainConfig(strategy=name).strategy == name
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="nope")
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'; choose one of 'lasp2'"):
        strategies.linear("nope")


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
