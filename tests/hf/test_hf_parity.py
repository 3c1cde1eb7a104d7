"""lasp2.hf: transformers hybrid models under sequence parallelism vs the unmodified model on one
process (``tests/hf_reference.py``): logits shard by shard and every parameter gradient (the sum
over the SP ranks of each rank's gradient of its share of the loss), fp64 to ~1e-10 and fp32;
both layouts, packed documents, the collective count, bad input on every rank.

One spawn per world size runs a table of cases; the references are computed once, here."""
from __future__ import annotations

import copy
import re
import sys
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("transformers")

import lasp2  # noqa: E402
import lasp2.hf  # noqa: E402
from lasp2.parallel import comm  # noqa: E402
from tests.dist import Spawns, run_cases, run_distributed, run_sections, scratch_dir  # noqa: E402
from tests.helpers import assert_close, max_rel_err  # noqa: E402
from tests.hf_reference import gdn_fp64, make_model, mamba2_fp64, reference  # noqa: E402

T = 24          # global tokens: W = 2 and 4, both layouts; not a multiple of any chunk size
DOCS = [0, 5, 13, 24]
# fp32 vs the unmodified model: a few layers of fp32 matmuls, reductions in a different order
# (chunked scans, blockwise softmax, split sums over ranks): ~1e-6 observed; 2e-4 leaves margin
# for depth, not for algorithmic errors (those show at 1e-2 and above).
FP32_TOL = 2e-4
# Per parameter, L2-relative: a few small gate biases (dt_bias) get sums of a few dozen cancelling
# per-token terms whose fp32 rounding differs between the two algorithms (3e-4 observed).
FP32_GRAD_TOL = 2e-3
# Parameters that transformers casts to fp32 inside an fp64 model (``A_log.float()``, the
# Qwen RMSNorms' ``weight.float()``): their gradients are sums over tokens taken in fp32, so a sum
# split over ranks differs from the whole sum by fp32 rounding. They are held to fp32 precision.
FP32_REDUCED = {
    "qwen3_next": re.compile(r"(A_log|layernorm\.weight|q_norm\.weight|k_norm\.weight|model\.norm\.weight)$"),
    "qwen3_5": re.compile(r"(A_log|layernorm\.weight|q_norm\.weight|k_norm\.weight|model\.norm\.weight)$"),
    "qwen3_5_moe": re.compile(r"(A_log|layernorm\.weight|q_norm\.weight|k_norm\.weight|model\.norm\.weight)$"),
    "bamba": re.compile(r"A_log$"),
}


def _ids(seed=0):
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(seed))


def _run_case(group, *, family: str, layout: str, dtype, ref: dict, cu: Optional[list] = None,
              count_comm: bool = False):
    ids = _ids()
    model = make_model(family, dtype)
    model.load_state_dict(ref["state"])
    lasp2.hf.parallelize(model, group, layout=layout)
    cu_t = None if cu is None else torch.tensor(cu)
    batch = lasp2.hf.shard_batch(ids, ids, group=group, layout=layout, cu_seqlens=cu_t)
    if count_comm:
        with torch.no_grad():  # first calls run one-off agreement checks
            model(**batch)
    with comm.track() as fwd:
        out = model(**batch)
    loss = F.cross_entropy(out.logits.double().flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100,
                           reduction="sum") / ref["n"]
    params = list(model.named_parameters())
    with comm.track() as bwd:
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(params, grads)]
    flat = torch.cat([g.flatten().double() for g in grads] + [out.loss.detach().double().view(1)])
    dist.all_reduce(flat, group=group)  # every rank's share: the sum is the whole-sequence gradient
    # compare (after all communication)
    logits_ref = lasp2.shard(ref["logits"], group=group, layout=layout)
    if dtype == torch.float64:
        assert_close("logits", out.logits, logits_ref, dtype, whole=ref["logits"])
    else:
        err = max_rel_err(out.logits, logits_ref, ref["logits"].abs().max())
        assert err <= FP32_TOL, f"logits: {err:.2e}"
    offset = 0
    fp32_sums = FP32_REDUCED.get(family)
    for (name, p), ref_name in zip(params, ref["names"]):
        assert name == ref_name
        g = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        r = ref["grads"][name]
        if dtype == torch.float32:
            err = (g - r).norm() / r.norm().clamp_min(1e-30)
            assert err <= FP32_GRAD_TOL or r.abs().max() == 0 == g.abs().max(), f"d {name}: {err:.2e}"
        elif fp32_sums is not None and fp32_sums.search(name):  # an fp32 sum over the T tokens
            assert_close(f"d {name}", g, r, torch.float32, depth=T)
        else:
            assert_close(f"d {name}", g, r, dtype)
    if dtype == torch.float32:
        g_all, r_all = flat[:-1], torch.cat([ref["grads"][n].flatten().double() for n in ref["names"]])
        err = (g_all - r_all).norm() / r_all.norm()
        assert err <= FP32_TOL, f"whole gradient: {err:.2e}"
    # transformers' own loss (computed in fp32) with shard_batch's shift_labels / num_items_in_batch
    assert abs(flat[-1].item() - ref["hf_loss"].item()) <= 1e-5 * abs(ref["hf_loss"].item())
    if count_comm:  # per layer and direction: one collective; plus one halo exchange per conv
        cfg = model.config
        kinds = getattr(cfg, "layers_block_type", None) or cfg.layer_types
        n_layers, n_conv = len(kinds), sum(k == "linear_attention" for k in kinds) * (family != "minimax")
        W = dist.get_world_size(group)
        assert fwd.count("all_gather") == n_layers, fwd.records
        assert bwd.count("all_gather") + bwd.count("reduce_scatter") == n_layers, bwd.records
        assert fwd.count("send") == bwd.count("recv") and 1 <= fwd.count("send") / max(n_conv, 1) <= 2
        assert fwd.count() == n_layers + fwd.count("send") + fwd.count("recv") and W > 1


def _bad_inputs(group):
    """Each raises ValueError on every rank (all checks precede any communication)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    W = dist.get_world_size(group)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*supported models: Qwen3NextForCausalLM"):
        lasp2.hf.parallelize(llama, group)
    model = make_model("qwen3_next", torch.float32)
    odd = copy.deepcopy(model)
    odd.model.layers[0].linear_attn = torch.nn.Conv1d(4, 4, 2)
    with pytest.raises(ValueError, match="Conv1d.*does not know"):
        lasp2.hf.parallelize(odd, group)
    with pytest.raises(ValueError, match="group is required"):
        lasp2.hf.parallelize(model, None)
    with pytest.raises(ValueError, match="unknown layout"):
        lasp2.hf.parallelize(model, group, layout="striped")
    sw = make_model("minimax", torch.float32)
    sw.config.sliding_window = 4
    with pytest.raises(ValueError, match="sliding_window"):
        lasp2.hf.parallelize(sw, group)
    ids = _ids()
    with pytest.raises(ValueError, match="does not split"):
        lasp2.hf.shard_batch(ids[:, :2 * W + 1], group=group, layout="contiguous")
    with pytest.raises(ValueError, match="labels must have"):
        lasp2.hf.shard_batch(ids, ids[:, :4], group=group)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="padding"):
        lasp2.hf.shard_batch(ids, group=group, attention_mask=mask)
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        lasp2.hf.shard_batch(ids, group=group, cu_seqlens=torch.tensor([0, 5]))
    lasp2.hf.parallelize(model, group)
    with pytest.raises(ValueError, match="already parallelized"):
        lasp2.hf.parallelize(model, group)
    batch = lasp2.hf.shard_batch(ids, group=group)
    with pytest.raises(ValueError, match="no attention_mask"):
        model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(ValueError, match="use_cache=False"):
        model(**batch, use_cache=True)
    # ranks that disagree (here: on the softmax strategy) fail together at parallelize, not in a hang
    other = make_model("qwen3_next", torch.float32)
    with pytest.raises(ValueError, match="different arguments"):
        lasp2.hf.parallelize(other, group, softmax_strategy="ring" if dist.get_rank(group) == 0 else "ulysses")


def _train_sp2_equals_sp1(group, out: str):
    """``lasp2 train --hf-config qwen3-next-tiny`` in fp64: SP=2 (zigzag) and SP=1 x DP=2 see the same
    global batches, so every step's loss, accuracy and gradient norm agree."""
    import json
    from pathlib import Path

    from lasp2.train.config import TrainConfig
    from lasp2.train.loop import train

    common = dict(hf_config="qwen3-next-tiny", task="mqar", seq_len=32, batch_size=2, steps=3, warmup=1,
                  mqar_pairs=2, mqar_queries=8, mqar_keys=4, mqar_values=4, dtype="float64", save_every=0,
                  plot=False, device="cpu", layout="zigzag", lr=1e-2)
    for name, sp in (("sp2", 2), ("sp1", 1)):
        train(TrainConfig(**common, sp=sp, out=str(Path(out) / name)))
    dist.barrier(group)
    rows = {n: [json.loads(x) for x in (Path(out) / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("sp2", "sp1")}
    assert [r["step"] for r in rows["sp2"]] == [1, 2, 3]
    # Step 1 (same weights): the fp64 losses agree to rounding. Later steps: transformers computes
    # A_log and the Qwen RMSNorm weights in fp32 inside an fp64 model, so their gradients (token
    # sums split differently over ranks) agree to fp32 precision only, and AdamW carries that
    # into the next losses (~1e-9 observed); an algorithmic error would show at 1e-2.
    for a, b in zip(rows["sp2"], rows["sp1"]):
        tol = 1e-10 if a["step"] == 1 else 1e-6
        for key in ("loss", "grad_norm", "accuracy"):
            assert abs(a[key] - b[key]) <= tol * max(1.0, abs(b[key])), (key, a, b)
    assert rows["sp2"][-1]["loss"] < rows["sp2"][0]["loss"]  # it trains


def _worker(group, table, out=None):
    # The parallelized models never call transformers' fla-backed kernels; keep transformers from
    # importing fla (seconds per rank) when it resolves them. This process only.
    sys.modules.setdefault("fla", None)
    cases = [(name, dict(params, group=group)) for name, params in table]
    cases.append(("bad-inputs", dict(group=group, bad=True)))
    if out is not None:
        cases.append(("train-sp2-equals-sp1", dict(group=group, train=out)))

    def check(bad=False, train=None, **p):
        if train is not None:
            return _train_sp2_equals_sp1(p["group"], train)
        return _bad_inputs(p["group"]) if bad else _run_case(**p)
    run_cases(cases, check)


def _table(families, layouts, dtypes, docs=True, comm_case=True):
    """The cases: every family in fp64 on both layouts; fp32 (contiguous) and documents for all but
    the families in LIGHT, whose layer code another family's cases already cover."""
    refs = {}
    table = []
    for fam in families:
        for dtype in dtypes if fam not in LIGHT else dtypes[:1]:
            refs[fam, dtype] = reference(fam, dtype, _ids())
            for layout in layouts if dtype == torch.float64 else layouts[:1]:
                table.append((f"{fam}-{layout}-{str(dtype)[6:]}", dict(family=fam, layout=layout, dtype=dtype,
                                                                      ref=refs[fam, dtype])))
        if docs and fam not in LIGHT:
            ref = reference(fam, torch.float64, _ids(), DOCS)
            table.append((f"{fam}-docs", dict(family=fam, layout="zigzag", dtype=torch.float64, ref=ref, cu=DOCS)))
    if comm_case:
        fam = families[0]
        table.append((f"{fam}-comm", dict(family=fam, layout="zigzag", dtype=torch.float64,
                                          ref=refs[fam, torch.float64], count_comm=True)))
    return table


# Qwen3.5-MoE runs Qwen3.5's Gated DeltaNet and attention code (with MoE MLPs): fp64 cases only.
LIGHT = ("qwen3_5_moe",)
FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "minimax", "bamba")


def _pool_worker(group, table, out):
    return run_sections(group, [("sp2", lambda g: _worker(g, table, out))])


# The default run's table runs in the "hf-usage" spawn of the other tests/hf modules (the ranks import
# transformers once); its references are computed here, single-process, when that spawn starts.
SPAWNS = Spawns(_pool_worker, pool="hf-usage", timeout=900, more_args=lambda: (
    _table(FAMILIES, ("contiguous", "zigzag"), (torch.float64, torch.float32)), scratch_dir("lasp2-hf-parity-")))


def test_hf_sp2():
    SPAWNS.results(2, "sp2")


@pytest.mark.slow
def test_hf_sp4():
    table = _table(("qwen3_next",), ("contiguous", "zigzag"), (torch.float64, torch.float32), docs=True)
    run_distributed(_worker, 4, table, timeout=900)


@pytest.mark.parametrize("family", ["qwen3_next", "bamba"])
def test_fp64_kernels_match_transformers(family):
    """The fp64 reference kernels equal transformers' PyTorch fallbacks to fp32 precision."""
    import importlib

    from lasp2.hf.loading import use_torch_kernels
    from tests.hf_reference import MODULES

    modeling = importlib.import_module(MODULES[family])
    use_torch_kernels(make_model(family, torch.float32))  # transformers' PyTorch kernels for CPU tensors
    gen = torch.Generator().manual_seed(3)
    B, L, H, Hk, K, V = 1, 37, 4, 2, 8, 6
    if family == "qwen3_next":
        q, k = (torch.randn(B, L, Hk, K, generator=gen) for _ in range(2))
        v = torch.randn(B, L, H, V, generator=gen)
        g = F.logsigmoid(torch.randn(B, L, H, generator=gen) + 2)
        beta = torch.rand(B, L, H, generator=gen)
        args = (q, k, v, g, beta)
        ours, _ = gdn_fp64(modeling)(*args, use_qk_l2norm_in_kernel=True)
        theirs, _ = modeling.torch_chunk_gated_delta_rule(*args, chunk_size=16, use_qk_l2norm_in_kernel=True)
    else:
        x = torch.randn(B, L, H, V, generator=gen)
        dt = torch.randn(B, L, H, generator=gen)
        A = -torch.rand(H, generator=gen) - 0.5
        Bm, Cm = (torch.randn(B, L, 2, K, generator=gen) for _ in range(2))
        D, dt_bias = torch.randn(H, generator=gen), torch.randn(H, generator=gen)
        kw = dict(chunk_size=16, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.0, float("inf")))
        ours = mamba2_fp64(x, dt, A, Bm, Cm, **kw)
        theirs = modeling.mamba2_chunk_scan(x, dt, A, Bm, Cm, **kw)
    assert max_rel_err(ours, theirs.double()) < 1e-5


def test_configs_weights_and_train_flags(tmp_path):
    """Shipped configs load by name; --hf-weights reloads save_pretrained safetensors exactly;
    bad names and flag combinations are ValueErrors naming the fix."""
    from lasp2.hf.loading import build_model, config_names, load_config
    from lasp2.train.config import TrainConfig

    assert config_names() == ["bamba-tiny", "falcon-h1-tiny", "falcon-mamba-tiny", "granite-4.0-h-tiny",
                              "jamba-tiny", "kimi-linear-tiny", "lfm2-tiny", "ling-hybrid-tiny", "mamba-tiny",
                              "mamba2-tiny", "minimax-tiny",
                              "nemotron-h-tiny", "olmo-hybrid-tiny", "qwen3-next-tiny", "qwen3.5-moe-tiny",
                              "qwen3.5-tiny", "zamba2-tiny"]
    model = make_model("minimax", torch.float32)
    model.save_pretrained(tmp_path / "w")
    assert any((tmp_path / "w").glob("*.safetensors"))
    again = build_model(load_config(str(tmp_path / "w")), weights=str(tmp_path / "w"))
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ValueError, match="qwen3-next-tiny"):
        load_config("qwen4-huge")
    with pytest.raises(ValueError, match="safetensors"):
        build_model(load_config("minimax-tiny"), weights=str(tmp_path))
    with pytest.raises(ValueError, match="do not apply"):
        TrainConfig(hf_config="qwen3-next-tiny", layer_pattern="NL")
    with pytest.raises(ValueError, match="not supported with --hf-config"):
        TrainConfig(hf_config="bamba-tiny", no_state_passing=True)
    assert TrainConfig(hf_config="qwen3.5-tiny", task="mqar").hf
