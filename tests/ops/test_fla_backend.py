"""The fla backend (fla's Triton kernels) against the torch backend and the fp64 references.

On CPU the kernels run in the Triton interpreter: ``TRITON_INTERPRET`` must be set before fla is
imported, so every fla case runs in spawned worlds (``tests/dist.py``) whose environment has
``TRITON_INTERPRET=1`` and ``FLA_DISABLE_BACKEND_DISPATCH=1`` (fla's optional FlashQLA/TileLang
dispatch could otherwise swap kernels); the pytest process itself never imports fla. The
interpreter is slow, so shapes are tiny and one spawn runs a whole table per world size.

Tolerances: fla computes in fp32 (its kernels have no fp64 path), so the fla results are compared
with fp64 references (``ops/naive.py`` on one device; the single-device fp64 op on the whole
sequence for SP) at the fp32 bound of ``tests/helpers.py`` for the computation's depth T + K
(``fp32_tol``, relative to the tensor's largest entry).
"""
from __future__ import annotations

import collections
import itertools
import sys

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2.ops.naive import naive_linear_attention
from lasp2.parallel.strategies import LINEAR_STRATEGIES
from tests.dist import run_cases, run_distributed
from tests.helpers import DELTA_VARIANTS, DIAGONAL_VARIANTS, MATRIX_VARIANTS, fp32_tol, make_inputs, max_rel_err

VARIANTS = DIAGONAL_VARIANTS + MATRIX_VARIANTS  # kda: fla's chunk_kda
needs_fla = pytest.mark.skipif(sys.version_info < (3, 10), reason="fla-core 0.6.0 needs Python >= 3.10")
INTERPRETER_ENV = {"TRITON_INTERPRET": "1", "FLA_DISABLE_BACKEND_DISPATCH": "1"}
NAMES = ("q", "k", "v", "g", "beta")


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, whole=None) -> None:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = max_rel_err(got, ref, None if whole is None else whole.abs().max())
    assert err <= tol, f"{name}: max relative error {err:.2e} > {tol:.0e}"


def _run_single(fn, inputs, h0, cu, out_weight, state_weight, dtype):
    """fn's outputs, final state and gradients of <o, W> + <ht, W_h> w.r.t. every input and h0."""
    leaves = {n: inputs[n].to(dtype).clone().requires_grad_() for n in NAMES if inputs.get(n) is not None}
    h0 = h0.to(torch.float32 if dtype != torch.float64 else dtype).clone().requires_grad_()
    o, ht = fn(*(leaves.get(n) for n in NAMES), initial_state=h0, output_final_state=True, cu_seqlens=cu)
    loss = (o.double() * out_weight).sum() + (ht.double() * state_weight).sum()
    grads = torch.autograd.grad(loss, [*leaves.values(), h0])
    return {"o": o, "ht": ht, **{f"d{n}": d for n, d in zip([*leaves, "h0"], grads)}}


def _single_case(variant, B, T, H, K, V, cu, beta_max=1.0):
    cu_t = None if cu is None else torch.tensor(cu)
    n_states = B if cu is None else len(cu) - 1
    inputs = make_inputs(variant, B, T, H, K, V, seed=3, n_states=n_states, beta_max=beta_max)
    gen = torch.Generator().manual_seed(4)
    out_weight = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    state_weight = torch.randn(n_states, H, K, V, generator=gen, dtype=torch.float64)
    h0 = inputs["initial_state"]
    ref = _run_single(naive_linear_attention, inputs, h0, cu_t, out_weight, state_weight, torch.float64)
    results = {backend: _run_single(lambda *a, **kw: lasp2.linear_attention(*a, backend=backend, **kw),
                                    inputs, h0, cu_t, out_weight, state_weight, torch.float32)
               for backend in ("fla", "torch")}
    for backend, got in results.items():
        assert set(got) == set(ref)
        for name in ref:
            _close(f"{backend} {name}", got[name], ref[name], fp32_tol(T + K))
    assert results["fla"]["ht"].dtype == torch.float32


def _single_cases(full: bool):
    """(name, params) per variant; the default run gives every variant one shape, alternating
    batched inputs and packed documents (a document cut mid-chunk, a length-1 document), each
    with initial states and final states."""
    out = []
    for i, variant in enumerate(VARIANTS):
        for docs in ((False, True) if full else (variant in ("constant", "channel", "gated_deltanet", "kda"),)):
            cu = [0, 9, 10, 27, 32] if docs else None
            out.append((f"{variant}{'-docs' if docs else ''}",
                        dict(variant=variant, B=1 if docs else 2, T=32, H=2, K=16, V=12, cu=cu)))
    # beta in (0, 2) (negative eigenvalues): fla's kernels take it as given, like the torch backend
    out.append(("gated_deltanet-beta-to-2", dict(variant="gated_deltanet", B=2, T=32, H=2, K=16, V=12, cu=None,
                                                 beta_max=2.0)))
    return out


def _layer_case(variant):
    """A ``LinearAttention`` layer with backend="fla" gives the torch backend's outputs and
    parameter gradients (the selection reaches the op)."""
    from lasp2.nn import LinearAttention

    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(11))
    got = {}
    for backend in ("fla", "torch"):
        torch.manual_seed(12)
        layer = LinearAttention(32, 2, 16, variant, backend=backend)
        y = layer(x)
        grads = torch.autograd.grad((y * x).sum(), list(layer.parameters()))
        got[backend] = [y, *grads]
    for i, (a, b) in enumerate(zip(got["fla"], got["torch"])):
        _close(f"layer tensor {i}", a, b, fp32_tol(24 + 16 + 32))  # tokens + head dim + hidden


def _value_widths(run):
    """run() with the delta rule's fla kernel table (``backends.fla_delta.kernels``, lasp2's own
    wrapper) observed: {kernel name: the value widths (last dim of u / v / dO) it was called with}."""
    from lasp2.ops.backends import fla_delta

    ops, seen, saved = fla_delta.kernels(), collections.defaultdict(set), {}
    for name, arg in (("fwd_h", "u"), ("fwd_o", "v"), ("bwd_dhu", "do"), ("bwd", "v")):
        saved[name] = original = getattr(ops, name)

        def observed(*args, _original=original, _name=name, _arg=arg, **kwargs):
            seen[_name].add(kwargs[_arg].shape[-1])
            return _original(*args, **kwargs)

        setattr(ops, name, observed)
    try:
        run()
    finally:
        for name, original in saved.items():
            setattr(ops, name, original)
    return seen


def _sp_case(group, variant, T_local, strategy, layout, cu=None, H=2, K=16, V=12, beta_max=1.0, widths=False):
    """SP with the fla backend vs the single-device fp64 op on the whole sequence, shard by
    shard: output and every gradient. Collectives run before any assert. ``widths``: the delta
    rule's kernels also run on the segment's own value width V (the transition's state scan on
    K columns), never on the V + K columns of a widened call (K != V here)."""
    W = dist.get_world_size(group)
    B = 1 if cu is not None else 2
    inputs = make_inputs(variant, B, W * T_local, H, K, V, seed=5, beta_max=beta_max)
    cu_t = None if cu is None else torch.tensor(cu)
    weight = torch.randn(B, W * T_local, H, V, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    names = [n for n in NAMES if inputs.get(n) is not None]
    ref_leaves = {n: inputs[n].clone().requires_grad_() for n in names}
    o_ref, _ = lasp2.linear_attention(*(ref_leaves.get(n) for n in NAMES), cu_seqlens=cu_t, backend="torch")
    ref_grads = torch.autograd.grad((o_ref * weight).sum(), [ref_leaves[n] for n in names])

    def local(x):
        return lasp2.shard(x, group=group, layout=layout)

    leaves = {n: local(inputs[n]).float().requires_grad_() for n in names}
    got = {}

    def run():
        got["o"] = lasp2.sp_linear_attention(*(leaves.get(n) for n in NAMES), group=group, strategy=strategy,
                                             layout=layout, cu_seqlens=cu_t, backend="fla")
        got["grads"] = torch.autograd.grad((got["o"].double() * local(weight)).sum(), [leaves[n] for n in names])

    seen = _value_widths(run) if widths else run()
    o, grads = got["o"], got["grads"]
    if widths:  # W = 2 zigzag, no document start: rank 0 holds the ends (segments 0 and 3), rank 1 the middle
        # Â's scan runs on K columns only for a middle segment: segment 0 (P = 0) and the last one
        # (no final state) skip it (the contract's incoming / outgoing); everything else runs on V
        scans = {V, K} if dist.get_rank(group) == 1 else {V}
        assert dict(seen) == {"fwd_h": scans, "fwd_o": {V}, "bwd_dhu": {V}, "bwd": {V}}, dict(seen)
    tol = fp32_tol(W * T_local + K)
    _close("o", o, local(o_ref), tol, whole=o_ref)
    for n, got, ref in zip(names, grads, ref_grads):
        _close(f"d{n}", got, local(ref), tol, whole=ref)


def _sp_cases(W: int, full: bool):
    """The default run covers every variant, every strategy, both layouts and documents (cut
    mid-rank, a start on a segment's first token, segments without a start) and the delta rule
    with beta in (0, 2) in 9 cases (KDA's SP case, ~40 s in the interpreter, is
    ``test_fla_sp_kda``, slow); ``full`` runs the whole product and beta in (0, 2) for both
    delta variants under every strategy."""
    docs = [0, 5, 8, 16, 27, W * 16]
    if not full:
        picks = [("basic", "lasp2", "contiguous", None), ("constant", "lasp1", "zigzag", None),
                 ("scalar", "lasp2", "zigzag", docs), ("channel", "lasp1", "contiguous", docs),
                 ("deltanet", "lasp2", "contiguous", docs),
                 ("gated_deltanet", "lasp1", "zigzag", None, 2.0),  # beta in (0, 2): negative eigenvalues
                 ("gated_deltanet", "lasp2", "zigzag", docs),
                 # the other strategies share the local work (linear_local) with lasp2 and lasp1
                 ("channel", "allscan", "zigzag", docs), ("gated_deltanet", "tree", "zigzag", None)]
    else:
        picks = list(itertools.product(VARIANTS, LINEAR_STRATEGIES, ("contiguous", "zigzag"), (None, docs)))
        picks += [(v, s, "zigzag", docs, 2.0) for v in DELTA_VARIANTS for s in LINEAR_STRATEGIES]
    return [(f"{variant}-{strategy}-{layout}{'-docs' if cu else ''}{'-beta-to-2' if beta else ''}",
             dict(variant=variant, T_local=16, strategy=strategy, layout=layout, cu=cu, beta_max=beta or 1.0,
                  widths=(variant, strategy, layout, cu, beta) == ("gated_deltanet", "tree", "zigzag", None, None)))
            for variant, strategy, layout, cu, beta in (p + (None,) * (5 - len(p)) for p in picks)]


def _worker(group, single, sp):
    """Single-device cases split over the ranks (no collectives), then the SP table on all."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    failures = []
    one_device = lambda layer=False, **p: _layer_case(**p) if layer else _single_case(**p)  # noqa: E731
    for table, check in ((single[rank::W], one_device), (sp, lambda **p: _sp_case(group, **p))):
        try:
            run_cases(table, check)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


def _run(monkeypatch, W: int, single, sp) -> None:
    for key, value in INTERPRETER_ENV.items():
        monkeypatch.setenv(key, value)
    run_distributed(_worker, W, single, sp, timeout=600)


@needs_fla
def test_fla_backend_matches_torch_and_references(monkeypatch):
    """One spawn of 2 ranks: every variant on one device (fla and torch vs naive fp64: outputs,
    final states, every gradient including the initial state's) and SP at W = 2."""
    _run(monkeypatch, 2, _single_cases(full=False), _sp_cases(2, full=False))


@needs_fla
@pytest.mark.slow  # CI time: W = 2 covers the SP path in the default run
def test_fla_sp_w4_gated_deltanet(monkeypatch):
    """W = 4, the variant with K x K transitions, zigzag, documents across ranks."""
    _run(monkeypatch, 4, [], [c for c in _sp_cases(4, full=False) if c[0] == "gated_deltanet-lasp2-zigzag-docs"])


@needs_fla
@pytest.mark.slow
def test_fla_sp_kda(monkeypatch):
    """KDA under SP with fla's KDA kernels as the local work (``backends/fla_delta.py``), W = 2,
    zigzag, documents across ranks; its kernel is in the default run on one device
    (``_single_cases``)."""
    docs = [0, 5, 8, 16, 27, 32]
    _run(monkeypatch, 2, [], [("kda-lasp2-zigzag-docs", dict(variant="kda", T_local=16, strategy="lasp2",
                                                              layout="zigzag", cu=docs))])


@needs_fla
@pytest.mark.slow
def test_fla_backend_full_tables(monkeypatch):
    """Every variant x strategy x layout x (no documents, documents) at W = 2."""
    _run(monkeypatch, 2, _single_cases(full=True), _sp_cases(2, full=True))


def test_fla_backend_errors_without_interpreter(monkeypatch):
    """In this process TRITON_INTERPRET is unset: backend='fla' on CPU says how to enable it
    (before importing fla); bad names and fp64 are refused with the fix."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lasp2.linear_attention(q, q, q, backend="fla")
    with pytest.raises(ValueError, match="backend must be one of"):
        lasp2.linear_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="fp64"):
        lasp2.linear_attention(q.double(), q.double(), q.double(), backend="fla")
    from lasp2.nn import LinearAttention
    from lasp2.train.config import TrainConfig

    with pytest.raises(ValueError, match="backend"):
        LinearAttention(8, 2, 4, "mamba2", backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        TrainConfig(backend="triton")
    o_auto, _ = lasp2.linear_attention(q, q, q, backend="auto")  # CPU: auto is the torch backend
    o_torch, _ = lasp2.linear_attention(q, q, q, backend="torch")
    assert torch.equal(o_auto, o_torch)


def _cuda_case(variant, dtype, cu):
    """On CUDA: fla and torch backends vs naive fp64 (all on the GPU)."""
    B, T, H, K, V = (1, 300, 4, 64, 64)
    cu_t = None if cu is None else torch.tensor(cu, device="cuda")
    n_states = B if cu is None else len(cu) - 1
    inputs = {n: (t.cuda() if t is not None else None)
              for n, t in make_inputs(variant, B, T, H, K, V, seed=7, n_states=n_states).items()}
    gen = torch.Generator().manual_seed(8)
    ow = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).cuda()
    sw = torch.randn(n_states, H, K, V, generator=gen, dtype=torch.float64).cuda()
    ref = _run_single(naive_linear_attention, inputs, inputs["initial_state"], cu_t, ow, sw, torch.float64)
    got = _run_single(lambda *a, **kw: lasp2.linear_attention(*a, backend="fla", **kw), inputs,
                      inputs["initial_state"], cu_t, ow, sw, dtype)
    for name in ref:
        if dtype == torch.float32:  # tf32 matmuls inside fla's kernels: ~1e-3 relative
            _close(name, got[name], ref[name], 5e-3)
        else:
            err = ((got[name].double() - ref[name]).norm() / ref[name].norm()).item()
            assert err <= 2e-2, f"{name}: relative RMS error {err:.2e} > 2e-2 ({dtype})"


def _cuda_worker(group, cases):
    run_cases(cases, _cuda_case)


def _gpu_env(monkeypatch):
    """fla reads FLA_DISABLE_BACKEND_DISPATCH at import: the GPU cases run in spawned processes
    with it set (and without the interpreter)."""
    monkeypatch.setenv("FLA_DISABLE_BACKEND_DISPATCH", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fla_cuda_single_device(monkeypatch):
    _gpu_env(monkeypatch)
    cases = [(f"{v}-{str(dt)[6:]}-{'docs' if cu else 'plain'}", dict(variant=v, dtype=dt, cu=cu))
             for v in VARIANTS for dt in (torch.float32, torch.bfloat16) for cu in (None, [0, 70, 71, 200, 300])]
    run_distributed(_cuda_worker, 1, cases, timeout=600)


def _nccl_worker(group, cases):
    rank = dist.get_rank(group)
    torch.cuda.set_device(rank)
    nccl = dist.new_group(backend="nccl")

    def check(variant, strategy, layout, cu=None):
        W = dist.get_world_size(nccl)
        T_local, H, K, V = 256, 4, 64, 64
        B = 1
        inputs = {n: (t.cuda() if t is not None else None)
                  for n, t in make_inputs(variant, B, W * T_local, H, K, V, seed=9).items()}
        cu_t = None if cu is None else torch.tensor(cu, device="cuda")
        names = [n for n in NAMES if inputs.get(n) is not None]
        weight = torch.randn(B, W * T_local, H, V, generator=torch.Generator().manual_seed(10),
                             dtype=torch.float64).cuda()
        ref_leaves = {n: inputs[n].clone().requires_grad_() for n in names}
        o_ref, _ = lasp2.linear_attention(*(ref_leaves.get(n) for n in NAMES), cu_seqlens=cu_t, backend="torch")
        ref_grads = torch.autograd.grad((o_ref * weight).sum(), [ref_leaves[n] for n in names])
        local = lambda x: lasp2.shard(x, group=nccl, layout=layout)  # noqa: E731
        leaves = {n: local(inputs[n]).float().requires_grad_() for n in names}
        o = lasp2.sp_linear_attention(*(leaves.get(n) for n in NAMES), group=nccl, strategy=strategy,
                                      layout=layout, cu_seqlens=cu_t, backend="fla")
        grads = torch.autograd.grad((o.double() * local(weight)).sum(), [leaves[n] for n in names])
        _close("o", o, local(o_ref), 5e-3, whole=o_ref)  # tf32 inside fla's kernels
        for n, got, ref in zip(names, grads, ref_grads):
            _close(f"d{n}", got, local(ref), 5e-3, whole=ref)

    run_cases(cases, check)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, one rank per GPU)")
def test_fla_cuda_sp_nccl(monkeypatch):
    _gpu_env(monkeypatch)
    cases = [(f"{v}-{s}-{l}", dict(variant=v, strategy=s, layout=l))
             for v in VARIANTS for s in ("lasp2", "lasp1") for l in ("contiguous", "zigzag")]
    run_distributed(_nccl_worker, 2, cases, timeout=600)
