"""``lasp2 bench --suite inference`` at tiny sizes: every record measured, the table built from them."""
from __future__ import annotations

from lasp2.bench.inference import InferenceSpec, markdown, run, summarize


def test_inference_suite_smoke():
    spec = InferenceSpec(lengths=(64,), world_sizes=(1, 2), models=("native-pure", "native-hybrid"), rounds=1,
                         decode_tokens=2)
    records = run(spec, verbose=False)
    assert {(r["model"], r["W"]) for r in records} == {(m, w) for m in spec.models for w in (1, 2)}
    assert all(r["prefill_s"] > 0 for r in records)
    rows = summarize(records, spec)
    pure, hybrid = rows
    assert pure["speedup_sp2"] > 0 and pure["decode_tok_s"] > 0
    # a pure linear model's cache is its states (4 layers x [1, H, K, V] fp32); the hybrid adds K/V
    assert pure["cache_bytes"] == 4 * 4 * 16 * 16 * 4
    assert hybrid["cache_bytes"] > 3 * 4 * 16 * 16 * 4
    text = markdown(rows, spec, {"command": "lasp2 bench --suite inference"})
    assert text.count("\n| native-") == 2
