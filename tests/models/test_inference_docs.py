"""docs/inference.md runs as written: its python block, on 2 ranks in the environment torchrun
gives its workers (as tests/hf/test_hf_docs.py does for docs/hf.md). Both ranks print the same
tokens, equal to one process: the native model's no-cache recompute and transformers' plain
``generate`` of the same model."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.dist import run_as_torchrun_workers

ROOT = Path(__file__).resolve().parents[2]


def _printed(out: str, what: str) -> dict:
    found = {int(r): eval(v) for r, v in re.findall(rf"rank (\d): {what} (\[[0-9, ]*\])", out)}
    assert sorted(found) == [0, 1], (what, out)
    return found


def test_docs_inference_example_runs_as_written(tmp_path):
    pytest.importorskip("transformers")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "inference.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "inference_docs.py"
    script.write_text(blocks[0])
    codes, out = run_as_torchrun_workers(script, ROOT)
    assert codes == [0, 0], out

    from lasp2.hf.loading import build_model, load_config, use_torch_kernels
    from lasp2.models import LinearLlama, LinearLlamaConfig

    model = LinearLlama(LinearLlamaConfig.preset("debug"), seed=0).eval()
    ids = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert _printed(out, "native") == {0: ids[0, 37:].tolist(), 1: ids[0, 37:].tolist()}, out

    torch.manual_seed(0)
    hf = build_model(load_config("qwen3.5-tiny")).eval()
    use_torch_kernels(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(0))
    want = hf.generate(ids, use_cache=True, max_new_tokens=8, do_sample=False)[0, 37:].tolist()
    assert _printed(out, "hf") == {0: want, 1: want}, out
