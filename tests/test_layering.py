"""Layers point one way (DESIGN.md §3): ``ops`` < ``parallel`` < ``nn`` < ``models``, ``hf`` < ``train``,
``bench`` < ``cli``. Checked by parsing every ``import`` statement (module level and inside
functions) of the package's source, relative imports resolved; nothing is imported or run."""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lasp2"

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


def imported_modules(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from X import y`` yields both
    ``X`` and ``X.y`` (y may be a submodule, e.g. ``from .. import nn``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


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
