"""lasp2.hf under bf16 autocast, as people train: every family's parallelized model (SP = 2) inside
``torch.autocast("cpu", torch.bfloat16)`` against the unmodified transformers model under the same
autocast on one process (relative RMS of the logits and of the whole gradient), and
``lasp2 train --hf-config NAME --dtype bfloat16 --sp 2`` for every shipped config.

Before, every family stopped at its first softmax layer: under autocast the RoPE / q-k norms leave
q and k in fp32 while v is bf16, and the attention ops required one dtype. The attention ops now
cast q, k, v of different dtypes to the autocast dtype, as autocast does for transformers' sdpa.

These sections share one spawn with ``test_hf_misuse.py`` (pool ``hf-usage``); each rank builds
the (deterministic) references itself.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import lasp2  # noqa: E402
import lasp2.hf  # noqa: E402
from tests.dist import Spawns, run_cases, run_sections  # noqa: E402
from tests.hf_reference import make_model, reference  # noqa: E402

FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "minimax", "bamba")
CONFIGS = ("qwen3-next-tiny", "qwen3.5-tiny", "qwen3.5-moe-tiny", "minimax-tiny", "bamba-tiny")
# The families added later (supported from transformers 5.25 on): two in the default run (Mamba2's
# SSD with its fp32 logits; OLMo hybrid's delta rule with beta in [0, 2]), the rest slow.
NEW_FAMILIES = ("mamba2", "olmo_hybrid", "nemotron_h", "granitemoehybrid", "falcon_h1", "zamba2", "mamba",
                "falcon_mamba", "jamba", "lfm2")
NEW_DEFAULT = NEW_FAMILIES[:2]
NEW_CONFIGS = ("mamba2-tiny", "olmo-hybrid-tiny", "nemotron-h-tiny", "granite-4.0-h-tiny", "falcon-h1-tiny",
               "zamba2-tiny", "mamba-tiny", "falcon-mamba-tiny", "jamba-tiny", "lfm2-tiny")
NEW_OK = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 25)
needs_new = pytest.mark.skipif(not NEW_OK, reason="these families are supported from transformers 5.25 on")
LAYOUTS = ("zigzag", "contiguous")
T = 32
# bf16 keeps 8 significant bits (eps = 2^-7 = 7.8e-3; unit roundoff u = 3.9e-3). Both models round
# the inputs of every matmul / attention to bf16 under autocast, but at different places
# (transformers' scans run their matmuls in bf16; lasp2 keeps states and scans in fp32), so after a
# few layers they differ by a few roundings: relative RMS 2.3e-3 - 5.8e-3 on the logits and
# 2.3e-3 - 7.0e-3 on the whole gradient (0.6 - 1.8 u; Bamba the largest) for the first five;
# 3.0e-3 - 7.4e-3 and 3.0e-3 - 9.2e-3 (up to 2.4 u; Mamba2 the largest) for the ten added. An
# algorithmic error (a wrong position, a missing state, a lost multiplier) is O(1e-1) and above.
# Bound: 4 eps = 8 u.
BF16_RMS = 4 * torch.finfo(torch.bfloat16).eps


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ids(seed=0):
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(seed))


def _autocast_case(group, family: str, layout: str) -> dict:
    ids = _ids()
    ref = reference(family, torch.float32, ids, autocast=True)
    model = make_model(family, torch.float32)
    model.load_state_dict(ref["state"])
    lasp2.hf.parallelize(model, group, layout=layout)
    batch = lasp2.hf.shard_batch(ids, ids, group=group, layout=layout)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(**batch)
    loss = F.cross_entropy(out.logits.double().flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100,
                           reduction="sum") / ref["n"]
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten().double() for p, g in zip(params, grads)])
    dist.all_reduce(flat, group=group)  # the sum of the ranks' shares: the whole-sequence gradient
    errors = {"logits": _rel_rms(out.logits, lasp2.shard(ref["logits"], group=group, layout=layout)),
              "grad": _rel_rms(flat, torch.cat([ref["grads"][n].flatten().double() for n in ref["names"]]))}
    # bf16 logits, or the fp32 cast of them some causal LMs return (Mamba, Mamba2, Nemotron-H), as unmodified
    assert out.logits.dtype == ref["logits"].dtype, (out.logits.dtype, ref["logits"].dtype)
    assert all(math.isfinite(e) and e <= BF16_RMS for e in errors.values()), (errors, BF16_RMS)
    return errors


def _autocast(group, families=FAMILIES) -> dict:
    """Each family on one layout (alternating)."""
    found = {}

    def case(family, layout):
        found[f"{family}-{layout}"] = _autocast_case(group, family, layout)

    run_cases([(f"{f}-{LAYOUTS[i % 2]}", dict(family=f, layout=LAYOUTS[i % 2])) for i, f in enumerate(families)], case)
    return found


def _train_bf16(group, out: str, configs=CONFIGS) -> dict:
    """``lasp2 train --hf-config NAME --dtype bfloat16 --sp 2`` for every shipped config: the run
    finishes its steps with finite losses (it stopped at step 1 with a dtype ValueError before)."""
    from lasp2.train.config import TrainConfig
    from lasp2.train.loop import train

    losses = {}

    def case(name):
        run = Path(out) / name
        train(TrainConfig(hf_config=name, task="mqar", seq_len=32, batch_size=2, steps=2, warmup=1, mqar_pairs=2,
                          mqar_queries=8, mqar_keys=4, mqar_values=4, dtype="bfloat16", save_every=0, plot=False,
                          device="cpu", layout="zigzag", sp=2, out=str(run)))
        dist.barrier(group)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2], rows
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows), rows
        losses[name] = [r["loss"] for r in rows]

    run_cases([(n, dict(name=n)) for n in configs], case)
    return losses


def _scratch(group) -> str:
    """A fresh directory made by rank 0, its path known to every rank (removed at exit)."""
    import atexit
    import shutil
    import tempfile

    path = [tempfile.mkdtemp(prefix="lasp2-hf-bf16-") if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(path, group_src=0, group=group)
    if dist.get_rank(group) == 0:
        atexit.register(shutil.rmtree, path[0], True)
    return path[0]


def _worker(group) -> dict:
    sys.modules.setdefault("fla", None)  # the parallelized models never call fla; keep it unimported
    out = _scratch(group)
    sections = [("autocast", _autocast), ("train-bf16", lambda g: _train_bf16(g, out))]
    if NEW_OK:
        sections.append(("autocast-new", lambda g: _autocast(g, NEW_DEFAULT)))
    return run_sections(group, sections)


def _worker_slow(group) -> dict:
    """The other added families under autocast; every added family's shipped config trained in bf16."""
    sys.modules.setdefault("fla", None)
    out = _scratch(group)
    return run_sections(group, [("autocast-new", lambda g: _autocast(g, NEW_FAMILIES[len(NEW_DEFAULT):])),
                                ("train-bf16-new", lambda g: _train_bf16(g, out, NEW_CONFIGS))])


SPAWNS = Spawns(_worker, pool="hf-usage", timeout=900)
SPAWNS_SLOW = Spawns(_worker_slow, pool="hf-autocast-slow", timeout=1800)


def _found(families):
    return sorted(f"{f}-{LAYOUTS[i % 2]}" for i, f in enumerate(families))


def test_bf16_autocast_matches_transformers_every_family():
    per_rank = SPAWNS.results(2, "autocast")
    assert sorted(per_rank[0]) == _found(FAMILIES)


@needs_new
def test_bf16_autocast_added_families():
    """Mamba2 and OLMo hybrid (beta in [0, 2]) in the default run."""
    per_rank = SPAWNS.results(2, "autocast-new")
    assert sorted(per_rank[0]) == _found(NEW_DEFAULT)


@needs_new
@pytest.mark.slow
def test_bf16_autocast_added_families_slow():
    per_rank = SPAWNS_SLOW.results(2, "autocast-new")
    assert sorted(per_rank[0]) == _found(NEW_FAMILIES[len(NEW_DEFAULT):])


@needs_new
@pytest.mark.slow
def test_train_hf_bf16_added_configs():
    per_rank = SPAWNS_SLOW.results(2, "train-bf16-new")
    assert sorted(per_rank[0]) == sorted(NEW_CONFIGS)


def test_train_hf_bf16_every_shipped_config():
    per_rank = SPAWNS.results(2, "train-bf16")
    assert sorted(per_rank[0]) == sorted(CONFIGS)


def test_mixed_dtypes_follow_autocast_on_one_device():
    """Single-device ops: q, k fp32 with v bf16 run inside autocast (bf16 out, equal to the op on
    inputs cast to bf16 by hand) and stay a ValueError naming the fix outside it."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 16, 2, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, 16, 2, 8, generator=gen).bfloat16()
    for op in (lambda q, k, v: lasp2.linear_attention(q, k, v)[0], lasp2.softmax_attention):
        with pytest.raises(ValueError, match="share one dtype.*autocast"):
            op(q, k, v)
        with torch.autocast("cpu", torch.bfloat16):
            o = op(q, k, v)
        assert o.dtype == torch.bfloat16
        assert torch.equal(o, op(q.bfloat16(), k.bfloat16(), v))
    with torch.autocast("cpu", torch.bfloat16):  # keywords too; one dtype: taken as given (fp32 out)
        assert lasp2.softmax_attention(q=q, k=k, v=v).dtype == torch.bfloat16
        assert lasp2.softmax_attention(q, k, v.float()).dtype == torch.float32
