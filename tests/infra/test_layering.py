"""Layers point one way (DESIGN.md §3): ``ops`` < ``parallel`` < ``nn`` < ``models``, ``hf`` < ``train``,
``bench`` < ``cli``, and no module of the package imports itself through others (no import
cycles, lazy imports inside functions included). Checked by parsing every ``import`` statement
(module level and inside functions) of the package's source, relative imports resolved; nothing
is imported or run."""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lasp2"

# Subpackage -> the lasp2 subpackages it must never import (directly or lazily in a function).
FORBIDDEN = {
    "ops": ("parallel", "nn", "models", "hf", "train", "bench"),
    "parallel": ("nn", "models", "hf", "train", "bench"),
    "nn": ("models", "hf", "train", "bench"),
    "models": ("hf", "train", "bench"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_statements(path: Path) -> Iterator[Tuple[int, str, Tuple[str, ...]]]:
    """(line, absolute module, imported names) of every import in ``path`` (module level and
    inside functions); ``import a.b`` gives (line, "a.b", ())."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module, tuple(alias.name for alias in node.names)


def imported_modules(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from X import y`` yields both
    ``X`` and ``X.y`` (y may be a submodule, e.g. ``from .. import nn``)."""
    for line, module, names in _import_statements(path):
        yield line, module
        for name in names:
            yield line, f"{module}.{name}"


def _violations(layer: str):
    banned = tuple(f"lasp2.{b}" for b in FORBIDDEN[layer])
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == b or module.startswith(b + ".") for b in banned):
                yield f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(layer):
    assert list(_violations(layer)) == []


def test_the_import_parser_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    """The checker itself can fail: a relative import and an import inside a function are found."""
    fake = tmp_path / "lasp2"
    (fake / "parallel").mkdir(parents=True)
    (fake / "parallel" / "bad.py").write_text("from ..nn import LinearAttention\n\ndef f():\n"
                                              "    from lasp2.models import parallelize\n    import lasp2.train.loop\n")
    (fake / "parallel" / "__init__.py").write_text("from . import comm\nfrom .. import bench\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = list(_violations("parallel"))
    assert any("bad.py:1 imports lasp2.nn" in v for v in found)
    assert any("bad.py:4 imports lasp2.models" in v for v in found)
    assert any("bad.py:5 imports lasp2.train.loop" in v for v in found)
    assert any("__init__.py:2 imports lasp2.bench" in v for v in found)
    assert not any("comm" in v for v in found)


def test_strategy_modules_do_not_import_the_public_api():
    """``parallel/api.py`` validates and dispatches to the strategy modules; they never import it."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}"
             for path in sorted((PACKAGE / "parallel").glob("*.py")) if path.name != "api.py"
             for line, module in imported_modules(path)
             if module == "lasp2.parallel.api" or module.startswith("lasp2.parallel.api.")]
    assert found == []


# ---- import cycles --------------------------------------------------------------------------------


def module_graph() -> Dict[str, Set[str]]:
    """module -> the package's modules it imports. ``from X import y`` points at ``X.y`` when that
    is a module, else at ``X``; a module's parent packages (which Python runs first anyway) are no
    edge, or every ``from . import comm`` would close a circle through ``__init__``."""
    paths = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for _, module, names in _import_statements(path):
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in paths]
            targets.update(subs)
            if module in paths and (not names or len(subs) < len(names)):
                targets.add(module)
        graph[name] = targets - {name}
    return graph


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every
    import cycle lies inside one of them."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_cycles():
    cycles = import_cycles(module_graph())
    assert cycles == [], "modules that import each other (directly or round a circle): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f", "a"}, "f": {"e"}, "g": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_a_lazy_import_that_closes_a_circle_is_a_cycle(tmp_path, monkeypatch):
    """Two modules of a synthetic package, one importing the other at module level and the other
    importing back inside a function (the pattern a registry and a strategy fall into); a third
    importing the package's ``__init__`` siblings via ``from . import`` is no cycle."""
    fake = tmp_path / "lasp2"
    (fake / "parallel").mkdir(parents=True)
    (fake / "__init__.py").write_text("from .parallel import registry\n")
    (fake / "parallel" / "__init__.py").write_text("")
    (fake / "parallel" / "registry.py").write_text("from .scan import Exchange\n")
    (fake / "parallel" / "scan.py").write_text("from . import comm\n\ndef blocks():\n"
                                               "    from .registry import default_blocks\n")
    (fake / "parallel" / "comm.py").write_text("import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = module_graph()
    assert graph["lasp2.parallel.scan"] == {"lasp2.parallel.comm", "lasp2.parallel.registry"}
    assert import_cycles(graph) == [["lasp2.parallel.registry", "lasp2.parallel.scan"]]
