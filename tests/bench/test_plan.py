"""``lasp2 plan``: the step model's terms by hand, the baselines' cost terms, hardware as data,
lengths with K/M, splits, sharding, checkpointing, --explain and --json. Pure computation."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lasp2.bench import baselines, cost_model as cm, hardware, plan, step_model
from lasp2.cli import main

LINK = cm.Link("test", alpha=1e-5, bandwidth=1e9, p2p_alpha=2e-5)
TINY = plan.ModelConfig("tiny", hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=100, pattern="LN")
HW = hardware.Hardware("test", 1e12, 1e12, 1e11, 1e9 / 0.5, 1e9 / 0.5, 8, "made up")
CAL = hardware.Calibration(mfu=0.5, bandwidth_efficiency=0.5, nvlink_alpha_s=1e-5, nvlink_hop_s=2e-5,
                           step_overhead_s=0.01, grad_overlap=0.5, reserved_bytes=1e6)


def test_model_counts_by_hand():
    assert TINY.kinds() == ["L", "N"] and TINY.head_dim == 16
    per_layer = 64 * (4 * 16 + 2 * 2 * 16) + 4 * 16 * 64 + 3 * 64 * 128
    assert TINY.layer_params() == per_layer and TINY.params() == 2 * per_layer + 2 * 100 * 64
    lin = 2 * (6 * 64 + 2 * 2 * 16 + 3 * 128) + 4 * 4 * 16 * 16 / 64  # + the chunk states of the linear layer
    assert TINY.activation_bytes_per_token() == pytest.approx(lin + (lin - 4 * 4 * 16 * 16 / 64) + 6 * 100)
    with pytest.raises(ValueError, match="layer pattern"):
        plan.ModelConfig("bad", 64, 2, 4, 2, 128, pattern="LQ")


def test_step_terms_by_hand():
    setup = step_model.Setup(HW, CAL)
    assert setup.rate == 5e11 and replace(setup.network.intra, name="test") == LINK
    G, sp, n = 4, 4, 4096
    c = step_model.step_cost(TINY, 1, sp, n, setup, ("lasp2", "allgather"))
    shape = cm.Shape(B=1, T=1024, H=4, K=16, V=16, Hkv=2)
    lin = cm.linear_layer("lasp2", 4, replace(shape, Hkv=None), 5e11, LINK)
    soft = cm.softmax_layer("allgather", 4, shape, 5e11, LINK)
    t = {x.name: x for x in c.terms}
    dense_fwd = TINY.dense_flops_per_token() * 1024 / 5e11
    assert t["dense compute (projections, MLP, LM head)"].exposed == pytest.approx(3 * dense_fwd)
    assert t["attention compute"].exposed == pytest.approx(lin.compute + soft.compute)
    assert c.total("comm") - t[f"gradient sync over {G} GPUs (ddp)"].exposed == pytest.approx(lin.comm + soft.comm)
    sync = 2 * 3 * (1e-5 + 1e-9 * 4 * TINY.params() / 4)  # fp32 all-reduce = reduce-scatter + all-gather
    backward = 2 * dense_fwd + 2 / 3 * lin.compute + 2.5 / 3.5 * soft.compute
    assert t["gradient sync over 4 GPUs (ddp)"].seconds == pytest.approx(sync)
    assert t["gradient sync over 4 GPUs (ddp)"].exposed == pytest.approx(max(0.0, sync - 0.5 * backward))
    assert t["optimizer step (Adam, HBM-bound)"].exposed == pytest.approx(32 * TINY.params() / 1e11)
    assert c.time == pytest.approx(sum(x.exposed for x in c.terms)) and t["fixed per-step overhead"].exposed == 0.01
    assert list(c.memory.values()) == pytest.approx([16 * TINY.params(), TINY.activation_bytes_per_token() * 1024,
                                                     lin.saved + soft.saved + max(lin.transient, soft.transient), 1e6])
    # fsdp2 shards the 16 bytes over the 4 GPUs (+ one layer gathered); checkpointing reruns the forward
    ckpt = replace(setup, sharding="fsdp2", checkpointing=True)
    f = step_model.step_cost(TINY, 1, sp, n, ckpt, ("lasp2", "allgather"))
    assert f.memory["model states (fsdp2)"] == pytest.approx(4 * TINY.params() + 8 * TINY.layer_params())
    dense = {x.name: x for x in f.terms}["dense compute (projections, MLP, LM head)"]
    assert dense.exposed == pytest.approx(4 * dense_fwd)
    assert f.memory["activations (checkpointed)"] < c.memory["activations"]
    with pytest.raises(ValueError, match="--sharding"):
        step_model.Setup(HW, CAL, "zero9")


def test_serialised_inter_chunk_term_of_published_lasp1():
    """lasp1-serial = lasp1's hops + (W - 1) x the inter-chunk work per direction (2 + 4 T H K V)."""
    s = cm.Shape(B=1, T=4096, H=4, K=16, V=16)
    ours = cm.linear_layer("lasp1", 8, s, 1e12, LINK)
    paper = baselines.linear_cost("lasp1-serial", 8, s, 1e12, LINK)
    assert paper.compute == ours.compute
    assert paper.comm == pytest.approx(ours.comm + 7 * 6 * 4096 * 4 * 16 * 16 / 1e12)
    longer = baselines.linear_cost("lasp1-serial", 8, replace(s, T=8192), 1e12, LINK)
    assert longer.comm - cm.linear_layer("lasp1", 8, replace(s, T=8192), 1e12, LINK).comm > paper.comm - ours.comm


def test_ring_linear_and_megatron_sp_terms():
    s = cm.Shape(B=1, T=1024, H=4, K=16, V=16)
    ring = baselines.linear_cost("ring-linear", 4, s, 1e12, LINK)
    pairs = 1024 * (4 * 1024 / 2) * 4  # queries x average keys x heads
    assert ring.compute == pytest.approx(pairs * 2 * 32 / 1e12 * 3)  # left product: quadratic, fwd + 2 x bwd
    kv = 1024 * 4 * 32 * 2
    assert ring.bytes_sent == 3 * (2 * kv + 2 * kv)
    rp = baselines.linear_cost("ring-linear-rp", 4, s, 1e12, LINK)
    own = 1024 * 4 * (2 * 64 * 32 + 4 * 16 * 16)  # the own block's chunked causal linear attention
    received = 3 * 4 * 1024 * 4 * 16 * 16  # W - 1 blocks: K_j^T V_j and q (K_j^T V_j)
    assert rp.compute == pytest.approx((own + received) / 1e12 * 3)
    assert rp.bytes_sent == ring.bytes_sent and rp.calls == ring.calls  # the same K/V ring
    assert rp.comm >= ring.comm  # less work per block to hide each hop behind
    meg = baselines.linear_cost("megatron-sp", 4, s, 1e12, LINK)
    full = 4 * 1024 * 64 * 2
    assert meg.comm == pytest.approx(8 * 3 * (1e-5 + 1e-9 * full / 4)) and meg.compute == ring.compute
    with pytest.raises(ValueError, match="H % W"):
        baselines.linear_cost("megatron-sp", 8, s, 1e12, LINK)
    with pytest.raises(ValueError, match="lasp1-serial"):
        baselines.linear_entry("nope")


@pytest.mark.parametrize("text,tokens", [("2097152", 1 << 21), ("2048K", 1 << 21), ("2M", 1 << 21), ("64k", 65536)])
def test_lengths_with_suffixes(text, tokens):
    assert hardware.parse_length(text) == tokens


def test_bad_lengths_and_hardware_are_refused(tmp_path, capsys):
    for bad in ("2G", "K", "-1", "0"):
        with pytest.raises(ValueError, match="K or M"):
            hardware.parse_length(bad)
    with pytest.raises(SystemExit) as e:  # argparse's own error
        main(["plan", "--seq-lens", "2Q"])
    assert e.value.code == 2 and "'2Q': write a positive integer" in capsys.readouterr().err
    (tmp_path / "mine.json").write_text(json.dumps({"name": "x", "peak_flops": 1e15}))
    cases = [("nope", "choose a preset"), (str(tmp_path / "none.json"), "no such file"),
             (str(tmp_path / "mine.json"), r"missing field\(s\) \['memory_bytes'")]
    for spec, msg in cases:
        with pytest.raises(ValueError, match=msg):
            hardware.load_hardware(spec)
    (tmp_path / "nested.json").write_text(json.dumps({"preset": str(tmp_path / "mine.json")}))
    with pytest.raises(ValueError, match="preset .*choose one of a100-40gb"):
        hardware.load_hardware(str(tmp_path / "nested.json"))
    (tmp_path / "typo.json").write_text(json.dumps({"preset": "h100", "memroy_bytes": 1}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['memroy_bytes'\]"):
        hardware.load_hardware(str(tmp_path / "typo.json"))


def test_presets_and_a_users_own_cluster(tmp_path):
    assert set(hardware.PRESETS) == {"a100-40gb", "a100-80gb", "h100", "h200", "b200"}
    assert all(hw.source and hw.peak_flops > 1e14 for hw in hardware.PRESETS.values())
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"preset": "h100", "inter_bandwidth": 25e9, "calibration": {"mfu": 0.3}}))
    hw, cal = hardware.load_hardware(str(path))
    assert hw.inter_bandwidth == 25e9 and hw.peak_flops == 989e12 and cal.mfu == 0.3 and cal.step_overhead_s == 0
    full = dict(name="mine", peak_flops=5e14, memory_bytes=96e9, hbm_bandwidth=4e12, nvlink_bandwidth=400e9,
                inter_bandwidth=50e9, gpus_per_node=4)
    path.write_text(json.dumps(full))
    hw, cal = hardware.load_hardware(str(path), CAL)
    assert hw.gpus_per_node == 4 and cal == CAL == hardware.load_hardware("h100", CAL)[1]  # the default given


def _plan(args, capsys):
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


def test_json_is_one_object_of_the_documented_form(capsys):
    out = _plan(["--model", "linear-llama3-1b", "--gpus", "64", "--hardware", "a100-80gb", "--seq-len", "2097152",
                 "--strategies", "lasp2,lasp1,ring-linear", "--json"], capsys)
    preds = json.loads(out)["predictions"]
    assert [p["strategy"] for p in preds] == ["lasp2", "lasp1", "ring-linear"]
    for p in preds:
        assert set(p) == {"strategy", "step_time_s", "tokens_per_s_per_gpu", "memory_per_gpu_bytes", "fits"}
        assert p["tokens_per_s_per_gpu"] == pytest.approx(2097152 / 64 / p["step_time_s"])
        assert p["fits"] is False  # the paper's Table 6: 2048K on 64 A100-80GB is out of memory
    assert preds[2]["step_time_s"] > preds[0]["step_time_s"]
    assert main(["plan", "--gpus", "8", "16", "--json"]) == 2 and "one --gpus" in capsys.readouterr().err
    na = json.loads(_plan(["--gpus", "64", "--seq-len", "64K", "--strategies", "megatron-sp", "--json"], capsys))
    assert na == {"predictions": [{"strategy": "megatron-sp", "step_time_s": None, "tokens_per_s_per_gpu": None,
                                   "memory_per_gpu_bytes": None, "fits": False}]}  # H % W != 0: cannot run


def test_explain_table_and_recommendation(capsys):
    out = _plan(["--gpus", "64", "--seq-lens", "512K", "--hardware", "a100-80gb", "--explain"], capsys)
    assert "lasp1-serial (modelled baseline)" in out and "ring-linear (modelled baseline)" in out
    assert "megatron-sp (modelled baseline) | 1x64 | not applicable" in out
    assert "SP: serialised inter-chunk compute (critical path)" in out and "hidden behind compute (ms)" in out
    assert "| SP: state all-gather, forward |" in out and "gradient sync over 64 GPUs (ddp)" in out
    assert "Recommended: **" in out and "uncertainty" in out and "+-" in out
    assert "tokens/s per GPU of plain data parallel" in out and "x the" in out
    rec = out.split("Recommended: **")[1].split("**")[0]
    assert "ring-linear" not in rec and "serial" not in rec  # baselines are compared, never recommended


def test_splits_and_memory_options(capsys):
    out = _plan(["--gpus", "64", "--seq-lens", "1M", "--hardware", "a100-80gb", "--split", "8x8",
                 "--strategies", "lasp2"], capsys)
    assert "| lasp2 | 8x8 |" in out
    auto = _plan(["--gpus", "64", "--seq-lens", "2M", "--hardware", "a100-80gb", "--split", "auto",
                  "--strategies", "lasp2"], capsys)
    assert "| lasp2 | 1x64 |" in auto and "(does not fit)" in auto  # every split is out of memory: the least-memory one
    shard = _plan(["--gpus", "64", "--seq-lens", "2M", "--hardware", "a100-80gb", "--strategies", "lasp2",
                   "--sharding", "fsdp2", "--checkpointing"], capsys)
    assert "Recommended: **lasp2** at dp x sp = 1x64" in shard
    assert main(["plan", "--gpus", "64", "--split", "4x8"]) == 2
    assert "dp x sp = 32 must equal --gpus 64" in capsys.readouterr().err
    assert main(["plan", "--gpus", "64", "--strategies", "lasp3"]) == 2
    assert "unknown linear strategy 'lasp3'" in capsys.readouterr().err


def test_hybrid_pairs_and_projection(capsys, tmp_path):
    out = _plan(["--gpus", "16", "--seq-lens", "65536", "--layer-pattern", "LLLN", "--strategies", "lasp2,ring-linear"],
                capsys)
    assert "| lasp2 + allgather (LASP-2H) | 1x16 |" in out and "| ring-linear + ulysses (modelled baseline) |" in out
    assert main(["plan", "--projection", "--out", str(tmp_path / "p.md")]) == 0
    text = (tmp_path / "p.md").read_text()
    assert "PROJECTION" in text and "| 2048K |" in text and "W=1024" in text and "Speed-up of lasp2 over lasp1" in text
    assert "Fraction of data-parallel throughput" in text and "| data parallel, tokens/s/GPU |" in text
