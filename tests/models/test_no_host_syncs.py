"""One context per batch: inside the layers of a parallelized model, lasp2 reads no tensor on the
host (``.item()``, ``.tolist()``, ``bool()``, ``int()``, ``float()``, ``nonzero``: each a host
sync on a GPU, and a graph break for ``torch.compile``). Positions, documents and rank agreement
are fixed when the batch's context is built (``lasp2.SPBatch.build``), not per layer call.

Counted on CPU by patching those tensor methods for every thread of the rank (the scans run part
of their exchange in a helper thread) and attributing each call to the innermost lasp2 frame. The
same model called with raw ``cu_seqlens`` instead of a context is the positive control: the
counter sees its per-call checks.

One read remains, and is the only one allowed: ``ops/chunk.py: split_resets`` asks once per
prepared segment whether any gate is an exact reset (below the compute dtype's smallest normal,
e.g. ``logsigmoid(-120.)`` = -inf in fp32), so that the common case forms no reset counts. It
depends on the gate values the layer computes, not on the batch; the README lists it under Known
Limitations.
"""
from __future__ import annotations

import collections
import traceback

import pytest
import torch
import torch.distributed as dist

import lasp2
from tests.dist import Spawns, run_sections

READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero")
ALLOWED = "ops/chunk.py"  # split_resets, see the module docstring
T, DOCS = 64, [0, 20, 37, 64]


def count_host_reads(fn) -> collections.Counter:
    """Run ``fn()``; count the host reads of tensors that lasp2's own code makes (the caller of
    the tensor method is a lasp2 source line; reads inside torch or transformers are theirs)."""
    seen: collections.Counter = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name, original):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack()[-2]
            if "/lasp2/" in caller.filename:
                seen[f"{name} at {caller.filename.rsplit('/lasp2/', 1)[-1]}:{caller.lineno}"] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        fn()
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
    return seen


def _model(group, layout, variant):
    from torch.distributed.device_mesh import init_device_mesh

    from lasp2.models import LinearLlama, LinearLlamaConfig

    # a softmax layer and gated linear layers: Mamba2 (scalar gate), GLA (per channel), Gated DeltaNet
    cfg = LinearLlamaConfig.preset("debug", layer_pattern="NLLL", linear_variant=variant)
    model = LinearLlama(cfg, seed=0)
    mesh = init_device_mesh("cpu", (1, dist.get_world_size(group)), mesh_dim_names=("dp", "sp"))
    return lasp2.parallelize(model, mesh, layout=layout), mesh["sp"].get_group(), cfg


def _worker(group, variant):
    model, sp_group, cfg = _model(group, "zigzag", variant)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor(DOCS)
    local = lasp2.shard(ids, group=sp_group, layout="zigzag")
    batch = lasp2.SPBatch.build(sp_group, "zigzag", T, 1, cu_seqlens=cu)

    def step(**where):
        model.zero_grad()
        model(local, **where).float().square().mean().backward()

    step(batch=batch)  # first call of each signature: the one-off shape agreement
    step(cu_seqlens=cu)
    with_batch = count_host_reads(lambda: step(batch=batch))
    raw = count_host_reads(lambda: step(cu_seqlens=cu))
    checked = count_host_reads(lambda: step(batch=lasp2.SPBatch.build(sp_group, "zigzag", T, 1, cu_seqlens=cu,
                                                                       checks=True)))
    # The same model with a batch sharded in the other layout: refused, on every rank.
    other = lasp2.SPBatch.build(sp_group, "contiguous", T, 1, cu_seqlens=cu)
    try:
        model(lasp2.shard(ids, group=sp_group, layout="contiguous"), batch=other)
        mismatch = None
    except ValueError as e:
        mismatch = str(e)
    return dict(with_batch=dict(with_batch), raw=dict(raw), checked=dict(checked), mismatch=mismatch)


VARIANTS = ("mamba2", "gla", "gated_deltanet")
HF_ALLOWED = "hf/common.py"  # the model-level check that the batch is this model's (once per forward)


def _hf_worker(group):
    """Qwen3-Next (Gated DeltaNet with its short conv, and gated softmax attention) through
    lasp2.hf: the batch context from shard_batch reaches every layer."""
    import lasp2.hf as lhf
    from lasp2.hf.loading import build_model, load_config

    torch.manual_seed(0)
    model = build_model(load_config("qwen3-next-tiny", num_hidden_layers=2,
                                    layer_types=["linear_attention", "full_attention"]))
    lhf.parallelize(model, group, layout="zigzag")
    ids = torch.randint(0, 200, (1, T), generator=torch.Generator().manual_seed(1))
    batch = lhf.shard_batch(ids, ids, group=group, layout="zigzag", cu_seqlens=torch.tensor(DOCS))

    def step():
        model.zero_grad()
        model(**batch).loss.backward()

    step()
    return dict(with_batch=dict(count_host_reads(step)))


def _all(group):
    """Every variant and the hf model, at W = 2 only: this worker shares the "sp" spawn of the
    parallel and models modules (one start-up per world size), which also runs at W = 1 and 4."""
    if dist.get_world_size(group) != 2:
        return run_sections(group, [])
    return run_sections(group, [("all", lambda g: {**{v: _worker(g, v) for v in VARIANTS}, "hf": _hf_worker(g)})])


SPAWNS = Spawns(_all, pool="sp")


@pytest.fixture(scope="module")
def reports():
    runs = SPAWNS.results(2, "all")
    return [rep for by_variant in runs for rep in by_variant.values()]


def test_no_host_reads_inside_the_layers_with_a_batch_context(reports):
    for rep in reports:
        others = {k: n for k, n in rep["with_batch"].items() if ALLOWED not in k and HF_ALLOWED not in k}
        assert others == {}, others
        assert sum(n for k, n in rep["with_batch"].items() if ALLOWED in k) <= 2 * 3  # segments x gated layers


def test_the_counter_sees_per_call_checks(reports):
    """Positive controls: raw cu_seqlens are validated per call, and batch.checks=True restores
    the per-call value checks and agreement digests (for debugging)."""
    for rep in (r for r in reports if "raw" in r):
        assert any("check_cu_seqlens" in k or "validation.py" in k for k in rep["raw"]), rep["raw"]
        assert sum(rep["raw"].values()) > 0 and sum(rep["checked"].values()) > 0
        assert any("agreement.py" in k for k in rep["checked"]), rep["checked"]


def test_layout_mismatch_is_a_value_error_on_every_rank(reports):
    for rep in (r for r in reports if "raw" in r):
        assert rep["mismatch"] and "layout='contiguous'" in rep["mismatch"] and "zigzag" in rep["mismatch"]
