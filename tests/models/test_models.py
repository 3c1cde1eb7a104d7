"""Layers, Linear-Llama models and ``lasp2.parallelize``.

One device: config validation, every linear variant runs forward/backward, packed documents equal
separate sequences, causality, deterministic init.
Parity (gloo; fp32, and fp64 for a few cases): the debug model trained for 3 optimizer steps
under SP = 2, DP = 2 (x SP = 1) and DP = 2 x SP = 2 gives the same losses and gradients (every
step) as one process on the whole batch; pure ("L") and hybrid ("LLLN") models, both layouts,
packed documents, unequal token counts per rank. One spawn per world size runs the whole table;
the one-process references run in the pytest process.

The optimizer is SGD with momentum, not Adam: Adam's first steps are ~lr * sign(grad), which
amplifies fp32 rounding (a one-device fp32 run already differs from fp64 by 1e-4..1e-2 in its
third-step gradients), so it could not tell an SP bug from rounding at 1e-5.
"""
from __future__ import annotations

import contextlib
import functools
import traceback
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Shard

import lasp2
from lasp2.models import LinearLlama, LinearLlamaConfig
from lasp2.nn import DELTA_VARIANTS, LINEAR_VARIANTS
from tests.dist import Spawns, run_distributed, run_sections

STEPS, LR, MOMENTUM = 3, 0.1, 0.9
# Tolerances (relative; gradients per parameter tensor, against that tensor's largest entry).
# fp64 is the exactness claim: fp64 rounding (u = 1.1e-16) through these few hundred-term sums
# stays below 1e-12, and any algorithmic error in the SP path shows at >= 1e-4, so 1e-10.
# fp32 has no useful a-priori bound here: after SGD steps the gradients depend on weights that
# already carry the previous steps' rounding, and cancellation in small gradients (e.g. Gated
# DeltaNet's dt_bias) amplifies it per model and per CPU (the one-device fp32 run alone is 1e-6
# .. 1.4e-5 away from fp64). So each fp32 case measures its own floor: the error of the
# one-process fp32 run against the same run in fp64. The SP run computes the same sums in
# another order, so its rounding error is of the same size; FP32_FLOOR_FACTOR times the floor
# leaves room for that without admitting an algorithmic error (those are pinned in fp64), and a
# floor above FP32_FLOOR_MAX (a broken fp32 path) fails the case instead of widening it.
FP64_TOL = 1e-10
FP32_FLOOR_FACTOR = 10.0
FP32_FLOOR_MAX = 1e-3

# --------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("overrides, field", [
    (dict(hidden=60, heads=8), "hidden"),
    (dict(heads=4, kv_heads=3), "kv_heads"),
    (dict(layer_pattern="LLXN"), "layer_pattern"),
    (dict(layer_pattern=""), "layer_pattern"),
    (dict(linear_variant="mamba3"), "linear_variant"),
    (dict(layers=0), "layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(init_std=0.0), "init_std"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(hidden=36, heads=4, layer_pattern="LN"), "even head_dim"),  # head_dim 9: RoPE needs even
    (dict(head_dim=32), "head_dim is derived"),
    (dict(hiden=64), "unknown LinearLlamaConfig field"),
])
def test_config_rejects_bad_fields(overrides, field):
    with pytest.raises(ValueError, match=field):
        LinearLlamaConfig.preset("debug", **overrides)


def test_presets():
    c = LinearLlamaConfig.preset("debug")
    assert (c.hidden, c.heads, c.head_dim, c.layer_types) == (64, 4, 16, ("L", "L", "L", "N"))
    assert LinearLlamaConfig.preset("debug", layers=6, layer_pattern="LLN").layer_types == ("L", "L", "N") * 2
    big = LinearLlamaConfig.preset("linear-llama3-1b")
    assert (big.layers, big.hidden, big.heads, big.head_dim, big.vocab_size) == (16, 2048, 16, 128, 128256)
    assert LinearLlamaConfig.from_dict(big.to_dict()) == big
    n = LinearLlama(big, device="meta").num_params()
    assert 1.3e9 < n < 1.5e9, n
    with pytest.raises(ValueError, match="unknown preset"):
        LinearLlamaConfig.preset("llama-7b")
    with pytest.raises(ValueError, match="LinearLlamaConfig"):
        LinearLlama({"hidden": 64})


def test_init_is_deterministic_and_private():
    cfg = LinearLlamaConfig.preset("debug", linear_variant="mamba2", tie_embeddings=True)
    state = torch.get_rng_state()
    a, b, c = LinearLlama(cfg, seed=3), LinearLlama(cfg, seed=3), LinearLlama(cfg, seed=4)
    assert torch.equal(state, torch.get_rng_state()), "model construction touched the global RNG"
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)
    assert a.output.weight is a.tok_embeddings.weight
    assert all(torch.isfinite(p).all() for p in a.parameters())


# --------------------------------------------------------------------------------------------
# One device.


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
def test_every_variant_forward_backward(variant):
    cfg = LinearLlamaConfig.preset("debug", linear_variant=variant)
    model = LinearLlama(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    assert logits.shape == (2, 24, cfg.vocab_size) and torch.isfinite(logits).all()
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "tok_embeddings" not in name:  # embedding rows of unseen tokens are legitimately 0
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("variant", ["bla", "retention", "mamba2", "gla", "based", "gated_deltanet"])
def test_packed_documents_equal_separate_sequences(variant):
    """With cu_seqlens, states reset, softmax stays within documents and RoPE positions restart:
    the packed logits equal the logits of each document run alone."""
    cfg = LinearLlamaConfig.preset("debug", linear_variant=variant)
    model = LinearLlama(cfg, seed=1).double()
    lengths = [5, 11, 8]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 5, 16, 24])
    packed = model(ids, cu_seqlens=cu)
    alone = torch.cat([model(d) for d in ids.split(lengths, dim=1)], dim=1)
    assert (packed - alone).abs().max() <= 1e-10 * alone.abs().max()


def test_causal():
    cfg = LinearLlamaConfig.preset("debug", linear_variant="gla")
    model = LinearLlama(cfg, seed=2).double()
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % cfg.vocab_size
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    """The switch at the block call site: each block runs again in backward (its forward pre-hook
    fires twice), the gradients are bitwise those without it, and parameter names do not change."""
    cfg = LinearLlamaConfig.preset("debug", linear_variant="mamba2")
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    grads, calls = {}, {}
    for ac in (False, True):
        model = LinearLlama(cfg, seed=5).double()
        model.activation_checkpointing = ac
        calls[ac] = 0
        model.layers[1].register_forward_pre_hook(lambda *_, ac=ac: calls.__setitem__(ac, calls[ac] + 1))
        F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads[ac] = {n: p.grad for n, p in model.named_parameters()}
    assert (calls[False], calls[True]) == (1, 2)
    assert grads[False].keys() == grads[True].keys()
    assert all(torch.equal(grads[False][n], grads[True][n]) for n in grads[False])


def test_parallelize_needs_a_mesh():
    with pytest.raises(ValueError, match="DeviceMesh"):
        lasp2.parallelize(LinearLlama(LinearLlamaConfig.preset("debug")), {"dp": 1, "sp": 1})


# --------------------------------------------------------------------------------------------
# Parity: data, the one-process reference and the distributed worker.


def _case(name: str, dp: int, sp: int, pattern: str = "LLLN", layout: str = "contiguous", variant: str = "bla",
          docs: bool = False, strategy: str = "lasp2", softmax_strategy: str = "allgather", seed: int = 0,
          dtype: torch.dtype = torch.float32, ac: bool = False, data_parallel: str = "ddp"):
    name += "-fp64" if dtype == torch.float64 else ""
    name += "-ac" if ac else ""
    name += "-fsdp2" if data_parallel == "fsdp2" else ""
    return name, dict(dp=dp, sp=sp, pattern=pattern, layout=layout, variant=variant, docs=docs,
                      strategy=strategy, softmax_strategy=softmax_strategy, seed=seed, dtype=dtype, ac=ac,
                      data_parallel=data_parallel)


def _config(case) -> LinearLlamaConfig:
    return LinearLlamaConfig.preset("debug", layer_pattern=case["pattern"], linear_variant=case["variant"])


def _batches(case, step: int) -> List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """Every DP rank's (inputs [B, T], labels [B, T], global cu_seqlens or None) for one step.

    Labels are next tokens with ~10% ignored (-100), so ranks hold different token counts; with
    documents the last token of each document predicts nothing. Documents cross rank and zigzag
    segment boundaries.
    """
    gen = torch.Generator().manual_seed(1000 * case["seed"] + step)
    B, T = (1, 96) if case["docs"] else (2, 64)
    out = []
    for d in range(case["dp"]):
        ids = torch.randint(0, 256, (B, T + 1), generator=gen)
        inputs, labels = ids[:, :-1], ids[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=gen) < 0.1] = -100
        cu = None
        if case["docs"]:
            cu = torch.tensor([0, 21 + 3 * d, 50, 96])
            labels[0, cu[1:] - 1] = -100
        out.append((inputs, labels, cu))
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2 keeps DTensor shards (``full_tensor`` all-gathers them)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([_full(p.grad.detach()).flatten() for p in model.parameters()])


def _flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([_full(p.detach()).flatten() for p in model.parameters()])


@contextlib.contextmanager
def _one_thread():
    """The debug model's ops are tiny: threads only add overhead (and contention on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _reference(case) -> Dict[str, list]:
    """One process, whole sequences and the whole global batch: the global token-mean loss.
    Cached by what the reference depends on (not layout, strategies or SP size)."""
    return _reference_cached(case["pattern"], case["variant"], case["docs"], case["seed"], case["dp"],
                             case["dtype"])


@functools.lru_cache(maxsize=None)
@_one_thread()
def _reference_cached(pattern, variant, docs, seed, dp, dtype) -> Dict[str, list]:
    case = dict(pattern=pattern, variant=variant, docs=docs, seed=seed, dp=dp, dtype=dtype)
    model = LinearLlama(_config(case), seed=case["seed"]).to(case["dtype"])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses, grads = [], []
    for step in range(STEPS):
        loss_sum, n = 0.0, 0
        for inputs, labels, cu in _batches(case, step):
            logits = model(inputs, cu_seqlens=cu)
            loss_sum = loss_sum + F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            n += int((labels != -100).sum())
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        grads.append(_flat_grads(model))
        opt.step()
    return dict(losses=losses, grads=grads, params=_flat_params(model))


def _train_parallel(mesh, case) -> Dict[str, list]:
    """The same training under lasp2.parallelize: this rank's shard of its DP rank's batch."""
    sp_group, layout = mesh["sp"].get_group(), case["layout"]
    model = lasp2.parallelize(LinearLlama(_config(case), seed=case["seed"]).to(case["dtype"]), mesh,
                              strategy=case["strategy"],
                              softmax_strategy=case["softmax_strategy"], layout=layout,
                              activation_checkpointing=case["ac"], data_parallel=case["data_parallel"])
    if case["data_parallel"] == "fsdp2":  # sharded over all dp x sp ranks (not HSDP), dp = 1 included
        for n, p in model.named_parameters():
            assert isinstance(p, DTensor) and p.placements == (Shard(0),) and p.device_mesh.ndim == 1 \
                and p.device_mesh.size() == case["dp"] * case["sp"], f"{n} is not sharded over dp x sp: {p}"
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    dp_rank = mesh.get_local_rank("dp")
    losses, grads = [], []
    for step in range(STEPS):
        inputs, labels, cu = _batches(case, step)[dp_rank]
        inputs = lasp2.shard(inputs, group=sp_group, layout=layout)
        labels = lasp2.shard(labels, group=sp_group, layout=layout)
        logits = model(inputs, cu_seqlens=cu)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss = lasp2.global_token_mean(loss_sum, (labels != -100).sum(), mesh)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        grads.append(_flat_grads(getattr(model, "module", model)))
        opt.step()
    return dict(losses=losses, grads=grads, params=_flat_params(getattr(model, "module", model)))


def _api_errors(mesh) -> Dict[str, str]:
    """parallelize's argument checks (ValueError messages, keyed by what was wrong)."""
    out = {}
    model = LinearLlama(LinearLlamaConfig.preset("debug"))
    for what, kwargs in (("strategy", dict(strategy="lasp3")), ("softmax_strategy", dict(softmax_strategy="flash")),
                         ("layout", dict(layout="striped")), ("data_parallel", dict(data_parallel="zero3")),
                         ("mp_policy", dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)))):
        try:
            lasp2.parallelize(model, mesh, **kwargs)
        except ValueError as e:
            out[what] = str(e)
    wrapped = lasp2.parallelize(model, mesh)
    sharded = lasp2.parallelize(LinearLlama(LinearLlamaConfig.preset("debug")), mesh, data_parallel="fsdp2")
    for what, arg in (("twice", model), ("wrapped", wrapped), ("sharded", sharded)):
        try:
            lasp2.parallelize(arg, mesh)
        except ValueError as e:
            out[what] = str(e)
    try:
        lasp2.parallelize(LinearLlama(LinearLlamaConfig.preset("debug")),
                          init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("data", "seq")))
    except ValueError as e:
        out["mesh_dims"] = str(e)
    return out


MP_CASE = _case("sp2-LLLN-mixed-precision", 1, 2, data_parallel="fsdp2")


def _mixed_precision(mesh) -> Dict[str, object]:
    """FSDP2 with bf16 compute and fp32 gradient reduction: the first step's loss and the dtypes
    of the sharded parameters and gradients (which must stay fp32)."""
    case = MP_CASE[1]
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = lasp2.parallelize(LinearLlama(_config(case), seed=case["seed"]), mesh, data_parallel="fsdp2",
                              mp_policy=policy)
    inputs, labels, cu = _batches(case, 0)[0]
    sp_group = mesh["sp"].get_group()
    logits = model(lasp2.shard(inputs, group=sp_group), cu_seqlens=cu)
    labels = lasp2.shard(labels, group=sp_group)
    loss = lasp2.global_token_mean(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum"),
                                   (labels != -100).sum(), mesh)
    loss.backward()
    return dict(loss=loss.item(), logits_dtype=str(logits.dtype),
                dtypes={str(p.dtype) for p in model.parameters()} | {str(p.grad.dtype) for p in model.parameters()})


def _worker(group, cases, meshes):
    """Run every case on this rank; a failing case records its traceback and the table goes on
    (every case's collectives come before anything that can raise in the comparison)."""
    world = dist.get_world_size(group)
    mesh_of = {shape: init_device_mesh("cpu", shape, mesh_dim_names=("dp", "sp")) for shape in meshes}
    results = {}
    for name, case in cases:
        assert case["dp"] * case["sp"] == world
        try:
            results[name] = _train_parallel(mesh_of[case["dp"], case["sp"]], case)
        except Exception:  # noqa: BLE001 - reported per case by the caller
            results[name] = dict(error=traceback.format_exc())
    results["_api_errors"] = _api_errors(mesh_of[meshes[0]])
    if meshes[0] == (1, 2):
        results["_mixed_precision"] = _mixed_precision(mesh_of[1, 2])
    return results


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _errors(case, run: dict, ref: dict) -> Tuple[float, float]:
    """(worst relative loss error, worst relative gradient error) of ``run`` against ``ref``."""
    worst_loss = max(abs(l - rl) / abs(rl) for l, rl in zip(run["losses"], ref["losses"]))
    sizes = [p.numel() for p in LinearLlama(_config(case), device="meta").parameters()]
    worst_grad = 0.0  # per parameter tensor, relative to that tensor's largest gradient
    for g, rg in zip(run["grads"], ref["grads"]):
        worst_grad = max(worst_grad, *(_max_rel(a, b) for a, b in zip(g.split(sizes), rg.split(sizes))))
    # Parameters after the last step (gathered from the FSDP2 shards): the steps' gradient errors,
    # scaled by lr, are all that can separate them, so the gradient bound covers them.
    worst_grad = max(worst_grad, *(_max_rel(a, b) for a, b in zip(run["params"].split(sizes),
                                                                    ref["params"].split(sizes))))
    return worst_loss, worst_grad


def _tolerances(case) -> Tuple[float, float]:
    """(loss, gradient) tolerance of a case: FP64_TOL, or FP32_FLOOR_FACTOR x the fp32 floor."""
    if case["dtype"] == torch.float64:
        return FP64_TOL, FP64_TOL
    floor = _errors(case, _reference(case), _reference(dict(case, dtype=torch.float64)))
    assert max(floor) <= FP32_FLOOR_MAX, f"the one-process fp32 run is {floor} away from fp64"
    return tuple(FP32_FLOOR_FACTOR * max(f, 1e-7) for f in floor)  # 1e-7 ~ 2 fp32 ulps: never 0


def _compare(name: str, case, per_rank: List[dict]) -> Optional[str]:
    """None if every rank matches the one-process reference, else a line naming the problem."""
    for rank, r in enumerate(per_rank):
        if "error" in r:
            return f"{name}: rank {rank} raised:\n{r['error']}"
    ref = _reference(case)
    errs = [_errors(case, r, ref) for r in per_rank]
    worst_loss, worst_grad = max(e[0] for e in errs), max(e[1] for e in errs)
    loss_tol, grad_tol = _tolerances(case)
    if worst_loss > loss_tol or worst_grad > grad_tol:
        return (f"{name}: max relative loss error {worst_loss:.2e} (tol {loss_tol:.1e}), gradient error "
                f"{worst_grad:.2e} (tol {grad_tol:.1e}; parameters after the last step included); losses {per_rank[0]['losses']} vs {ref['losses']}")
    _SUMMARY[name] = (worst_loss, worst_grad)
    return None


_SUMMARY: Dict[str, Tuple[float, float]] = {}

W2_CASES = [
    _case("sp2-L-contiguous", 1, 2, "L"),
    _case("sp2-L-zigzag", 1, 2, "L", "zigzag"),
    _case("sp2-LLLN-contiguous", 1, 2),
    _case("sp2-LLLN-zigzag", 1, 2, layout="zigzag"),
    _case("sp2-LLLN-zigzag-docs", 1, 2, layout="zigzag", docs=True, seed=1),
    _case("sp2-LLLN-contiguous-docs-lasp1-ring", 1, 2, docs=True, strategy="lasp1", softmax_strategy="ring"),
    _case("sp2-LLLN-zigzag-ulysses", 1, 2, layout="zigzag", softmax_strategy="ulysses", seed=2),
    *[_case(f"sp2-LN-zigzag-docs-{v}", 1, 2, "LN", "zigzag", v, docs=True, seed=3)
      for v in ("lightning", "retention", "mamba2", "gla", "based", "rebased")],
    _case("dp2-LLLN", 2, 1),
    _case("sp2-L-contiguous", 1, 2, "L", dtype=torch.float64),
    _case("sp2-LLLN-zigzag-docs", 1, 2, layout="zigzag", docs=True, seed=1, dtype=torch.float64),
    _case("sp2-LLLN-zigzag-docs", 1, 2, layout="zigzag", docs=True, seed=1, dtype=torch.float64, ac=True),
    # FSDP2 over the flattened dp x sp mesh: sharded over the SP ranks too (dp = 1), and over DP.
    _case("sp2-LLLN-zigzag-docs", 1, 2, layout="zigzag", docs=True, seed=1, dtype=torch.float64, ac=True,
          data_parallel="fsdp2"),
    _case("sp2-L-contiguous", 1, 2, "L", data_parallel="fsdp2"),
    _case("dp2-LLLN", 2, 1, data_parallel="fsdp2"),
]
W2_DELTA_CASES = [*(_case(f"sp2-LN-zigzag-{v}", 1, 2, "LN", "zigzag", v) for v in DELTA_VARIANTS),
                  _case("sp2-LN-zigzag-gated_deltanet", 1, 2, "LN", "zigzag", "gated_deltanet",
                        dtype=torch.float64)]
W4_CASES = [
    _case("dp2xsp2-L-contiguous", 2, 2, "L"),
    _case("dp2xsp2-L-zigzag", 2, 2, "L", "zigzag"),
    _case("dp2xsp2-LLLN-contiguous", 2, 2),
    _case("dp2xsp2-LLLN-zigzag-docs", 2, 2, layout="zigzag", docs=True, seed=4),
    _case("dp2xsp2-LLLN-zigzag-docs", 2, 2, layout="zigzag", docs=True, seed=4, dtype=torch.float64),
    _case("dp2xsp2-LLLN-contiguous", 2, 2, data_parallel="fsdp2"),
    _case("sp4-LLLN-zigzag-docs", 1, 4, layout="zigzag", docs=True, seed=5, dtype=torch.float64, data_parallel="fsdp2"),
]
# The rest of the FSDP2 x SP matrix (slow): 1x4 and 2x2, pure and hybrid, DDP beside FSDP2 at 1x4.
W4_FSDP2_CASES = [
    _case("sp4-L-contiguous", 1, 4, "L"),
    _case("sp4-L-contiguous", 1, 4, "L", data_parallel="fsdp2"),
    _case("sp4-LLLN-zigzag", 1, 4, layout="zigzag"),
    _case("sp4-LLLN-zigzag", 1, 4, layout="zigzag", data_parallel="fsdp2"),
    _case("sp4-LLLN-contiguous", 1, 4, ac=True, data_parallel="fsdp2"),
    _case("dp2xsp2-L-zigzag", 2, 2, "L", "zigzag", data_parallel="fsdp2"),
    _case("dp2xsp2-LLLN-zigzag-docs", 2, 2, layout="zigzag", docs=True, seed=4, ac=True, data_parallel="fsdp2"),
]


def _pool_worker(group, tables):
    """The default run's tables in the shared "sp" spawn (one spawn per world size for the
    parallel and models modules: the ranks' start-up, torch's import, is paid once): ``tables``
    maps a world size to (cases, meshes); at any other world size this worker does nothing."""
    table = tables.get(dist.get_world_size(group))
    return run_sections(group, [] if table is None else [("table", lambda g: _worker(g, *table))])


@pytest.fixture(scope="module")
def world2():
    return SPAWNS.results(2, "table")


def _check_table(cases, results):
    problems = [p for name, case in cases
                if (p := _compare(name, case, [r[name] for r in results])) is not None]
    assert not problems, f"{len(problems)} of {len(cases)} cases failed:\n" + "\n".join(problems)


def test_parity_sp2_and_dp2(world2):
    _check_table(W2_CASES, world2)


def test_delta_rule_under_sp(world2):
    _check_table(W2_DELTA_CASES, world2)


def test_parallelize_rejects_bad_arguments(world2):
    errors = world2[0]["_api_errors"]
    assert "unknown strategy 'lasp3'" in errors["strategy"]
    assert "unknown softmax_strategy 'flash'" in errors["softmax_strategy"]
    assert "unknown layout 'striped'" in errors["layout"]
    assert "already parallelised" in errors["twice"]
    assert "already wrapped in DistributedDataParallel" in errors["wrapped"]
    assert "already wrapped in FSDPLinearLlama" in errors["sharded"]
    assert "unknown data_parallel 'zero3'" in errors["data_parallel"]
    assert "needs data_parallel='fsdp2'" in errors["mp_policy"]
    assert "mesh must have the dims ('dp', 'sp')" in errors["mesh_dims"]


def test_fsdp2_mixed_precision(world2):
    """bf16 parameters in compute, fp32 shards and gradients: the loss is the fp32 one to bf16
    accuracy. Bound: bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3); the logits pass
    through ~10 bf16 matmuls and norms of the 4-block model, so ~1e-2 relative is the expected
    scale, 3e-2 the bound (fp32 SP errors are 1e-5 here, far below it)."""
    ref = _reference(MP_CASE[1])["losses"][0]
    for r in world2:
        mp = r["_mixed_precision"]
        assert mp["dtypes"] == {"torch.float32"} and mp["logits_dtype"] == "torch.bfloat16"
        assert abs(mp["loss"] - ref) <= 3e-2 * abs(ref), (mp["loss"], ref)
        assert mp["loss"] != ref  # it did compute in bf16


# The default run keeps the FSDP2 cases and one DDP dp2 x sp2 case (hybrid, zigzag, documents:
# every piece on the 2-D mesh); the other DDP cases differ from it or from the W = 2 table only in
# the layer mix (slow).
W4_SHORT = [c for c in W4_CASES if c[1]["data_parallel"] == "fsdp2"
            or (c[0] == "dp2xsp2-LLLN-zigzag-docs" and c[1]["dtype"] == torch.float32)]


SPAWNS = Spawns(_pool_worker, {2: (W2_CASES + W2_DELTA_CASES, [(1, 2), (2, 1)]), 4: (W4_SHORT, [(2, 2), (1, 4)])},
                pool="sp")


def test_parity_dp2_x_sp2():
    _check_table(W4_SHORT, SPAWNS.results(4, "table"))


@pytest.mark.slow
def test_parity_dp2_x_sp2_all():
    _check_table(W4_CASES, run_distributed(_worker, 4, W4_CASES, [(2, 2), (1, 4)]))


@pytest.mark.slow
def test_fsdp2_parity_matrix_w4():
    _check_table(W4_FSDP2_CASES, run_distributed(_worker, 4, W4_FSDP2_CASES, [(1, 4), (2, 2)]))
