"""The README's usage snippet runs as pasted. It is taken from README.md (the
``python`` block that calls ``sp_linear_attention``), written to a file and run on 2 ranks in
the environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
two plain processes, which is what torchrun starts. The same under the real ``torchrun`` is slow.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import parent_store

ROOT = Path(__file__).resolve().parents[1]
ERR = re.compile(r"rank (\d): max \|sp - single device\| = (\S+)")


def readme_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if "sp_linear_attention" in b]
    assert len(found) == 1, f"expected one README python block using sp_linear_attention, found {len(found)}"
    return found[0]


def _check(outputs: str) -> None:
    errs = {int(r): float(e) for r, e in ERR.findall(outputs)}
    assert sorted(errs) == [0, 1], outputs
    assert all(e < 1e-4 for e in errs.values()), errs  # fp32 over 4096 tokens: ~1e-6 measured


def test_readme_snippet_runs_as_written(tmp_path):
    script = tmp_path / "demo.py"
    script.write_text(readme_snippet())
    with parent_store() as store:  # torchrun's agent holds the store; here this process does (no port race)
        _run_two_workers(script, tmp_path, store.port)


def _run_two_workers(script, tmp_path, port: int) -> None:
    base = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "True"}
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        finally:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    _check("".join(outs))


@pytest.mark.slow
def test_readme_snippet_under_torchrun(tmp_path):
    script = tmp_path / "demo.py"
    script.write_text(readme_snippet())
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    _check(p.stdout)


def _bound(pattern: str) -> float:
    m = re.search(pattern, " ".join((ROOT / "README.md").read_text().split()))
    assert m, f"README no longer states {pattern!r}"
    return float(m.group(1))


def test_main_job_bounds_hold_on_every_recorded_run():
    """The README's machine-independent claims about the main job are checked against
    every recorded run (benchmarks/results/train/*_metrics.jsonl), not restated from one run."""
    import json

    acc_min = _bound(r"mean query accuracy of the last 10 steps above \*\*([0-9.]+)\*\*")
    loss_max = _bound(r"final loss below \*\*([0-9.]+)\*\*")
    ablation_max = _bound(r"`--no-state-passing`, last-10 accuracy below \*\*([0-9.]+)\*\*")
    runs = sorted((ROOT / "benchmarks" / "results" / "train").glob("*_metrics.jsonl"))
    assert len(runs) >= 4, runs  # the default run, two more seeds, the ablation
    for path in runs:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 251)), path.name
        last10 = sum(r["accuracy"] for r in rows[-10:]) / 10
        if path.name.startswith("no_state_passing"):
            assert last10 < ablation_max, (path.name, last10)
        else:
            assert last10 > acc_min and rows[-1]["loss"] < loss_max, (path.name, last10, rows[-1]["loss"])


def test_ci_runs_exactly_the_readme_test_command():
    """`.ci/run` runs the README's test command verbatim (pinned by constraints.txt), so what CI
    proves is what a new user types; both README commands install from the pins."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = [b.strip() for b in blocks if "pip install" in b and ("pytest" in b or "lasp2 train" in b)]
    test_cmd = [c for c in commands if c.endswith("pytest -q")]
    assert len(test_cmd) == 1, commands
    assert test_cmd[0] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(c.count("-c constraints.txt") == 2 for c in commands), commands
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^transformers==\d", pins, flags=re.M) and re.search(r"^fla-core==\d", pins, flags=re.M)
