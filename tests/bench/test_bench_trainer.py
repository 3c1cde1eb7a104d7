"""``lasp2 bench --suite trainer`` in its tiny CPU mode, started as a user would (timings mean nothing
here): every record carries finite step times, peak memory and the ratio against DDP, and the
modes the flags ask for."""
from __future__ import annotations

import json
import math

import pytest

from tests.bench.test_scripts import _run

pytest.importorskip("transformers")
pytest.importorskip("datasets")


@pytest.mark.slow  # ~15 s idle, ~100 s on the loaded 2-core box: the CI budget is spent
def test_bench_trainer_suite(tmp_path):
    _run(["-m", "lasp2", "bench", "--suite", "trainer", "--quick", "--world-sizes", "2", "--seq-lens", "32",
          "--layout", "both", "--quiet", "--no-plots", "--out", str(tmp_path)], tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["command"].startswith("lasp2 bench --suite trainer") and data["meta"]["hardware"]
    records = data["records"]
    assert sorted(r["mode"] for r in records) == ["ddp", "ddp-lasp2", "sp@contiguous", "sp@zigzag"]
    for r in records:
        assert r["sp"] == 2 and r["T"] == 32 and r["tokens_per_rank"] == 16 and r["steps_timed"] >= 2, r
        for field in ("step_s", "peak_rss_mb", "ratio_vs_ddp", "ratio_vs_ddp_lasp2"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] >= 0, (field, r)
    assert (tmp_path / "results.md").read_text().count("\n| qwen3.5-tiny") == 4
