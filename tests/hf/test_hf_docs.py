"""docs/hf.md runs as written: its ``python`` blocks, concatenated in order, are one script, run on 2
ranks in the environment torchrun gives its workers (two plain processes, which is what torchrun
starts; as ``test_readme.py`` does for the README). What the script prints is checked: fp32 logits
and gradient against the unmodified model, the DDP recipe's gradient (the data-parallel advice
used to give 0.5x the gradient at SP = 2), bf16 autocast, and the exact fp64 recipe."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.dist import run_as_torchrun_workers

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"([0-9.]+e[-+][0-9]+)"


def docs_blocks() -> list:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "hf.md").read_text(), flags=re.S)
    assert len(blocks) >= 5, f"expected the quick start, check, DDP, bf16 and fp64 blocks, found {len(blocks)}"
    return blocks


def docs_script() -> str:
    return "\n".join(docs_blocks())


def _values(out: str, pattern: str) -> dict:
    found = {int(r): float(v) for r, v in re.findall(r"rank (\d): " + pattern, out)}
    assert sorted(found) == [0, 1], (pattern, out)
    return found


def test_docs_hf_snippets_run_as_written(tmp_path):
    script = tmp_path / "hf_docs.py"
    script.write_text(docs_script())
    codes, out = run_as_torchrun_workers(script, ROOT)
    assert codes == [0, 0], out
    # fp32 against the unmodified model: ~1e-6 (reduction order); 2e-4 as in test_hf.
    assert all(e < 2e-4 for e in _values(out, f"fp32 logits error {NUMBER}").values()), out
    assert all(e < 2e-4 for e in _values(out, f"fp32 logits error \\S+, gradient error {NUMBER}").values()), out
    # The DDP recipe gives the single-device gradient (the old advice: error 0.5 at SP = 2).
    assert all(e < 2e-4 for e in _values(out, f"DDP gradient error {NUMBER}").values()), out
    # bf16 logits within a few bf16 roundings of the fp32 ones (eps = 7.8e-3).
    assert all(e < 3.2e-2 for e in _values(out, f"bf16 autocast logits torch.bfloat16, relative RMS vs fp32 {NUMBER}")
               .values()), out
    # fp64 with fp64 reference kernels: rounding only.
    assert all(e < 1e-10 for e in _values(out, f"fp64 logits error {NUMBER}").values()), out


def test_docs_install_and_imports_work_from_a_checkout():
    """lasp2 is not on a package index: the docs install from the checkout, the script imports
    ``lasp2.hf`` itself (``import lasp2`` does not), and training output stays out of git."""
    text = (ROOT / "docs" / "hf.md").read_text()
    assert 'pip install -e ".[hf]"' in text and 'pip install "lasp2[hf]"' not in text
    assert "import lasp2.hf" in docs_blocks()[0]
    assert "/lasp2_train/" in (ROOT / ".gitignore").read_text().splitlines()
