"""Whole-step sections of ``lasp2 bench --suite gpu`` (``gpu_check``): a hybrid Linear-Llama step
and a ``lasp2.hf`` Qwen3.5-tiny step on CUDA against the same step on CPU (the CPU result is
the reference: lasp2's PyTorch ops, fp32), and sequence parallelism at W = 2 with CUDA tensors
on one GPU over gloo (NCCL needs one GPU per rank, so two ranks on one GPU cannot use it).

On CPU (``--smoke``) the CPU side of every step runs (so the code path is exercised end to end)
and the CUDA comparison is marked "skipped: needs CUDA"; the SP section runs its ranks on CPU
tensors.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, List, Tuple

import torch

from .gpu_exact import SKIP_CUDA, TOL, rel_rms, section


def _llama_step(device, T: int, backend: str, softmax_backend: str) -> Tuple[float, Dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one LLLN step (seed 0, fp32) on ``device``."""
    from ..models import LinearLlama, LinearLlamaConfig

    cfg = LinearLlamaConfig(vocab_size=256, hidden=128, layers=4, heads=4, kv_heads=2, mlp_hidden=256,
                            layer_pattern="LLLN", linear_variant="mamba2")
    model = LinearLlama(cfg, seed=0, device=torch.device("cpu")).to(device)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = softmax_backend if type(m).__name__ == "SoftmaxAttention" else backend
    ids = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(1)).to(device)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.item(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _hf_step(device, T: int, group) -> Tuple[float, Dict[str, torch.Tensor]]:
    """Loss and gradients of one Qwen3.5-tiny step, ``lasp2.hf.parallelize``-d over ``group``
    (one rank here: the SP path with nothing to exchange), fp32."""
    from .. import hf
    from ..hf.loading import build_model, load_config, use_torch_kernels

    config = load_config("qwen3.5-tiny")
    torch.manual_seed(0)
    model = build_model(config, dtype=torch.float32, device=torch.device("cpu"))
    use_torch_kernels(model)
    model = model.to(device)
    hf.parallelize(model, group, layout="contiguous")
    ids = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(2)).to(device)
    batch = hf.shard_batch(ids, ids, group=group)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _compare(name: str, cpu, cuda) -> dict:
    (l_c, g_c), (l_g, g_g) = cpu, cuda
    worst = max(g_c, key=lambda n: rel_rms(g_g[n], g_c[n]))
    errs = {"loss": abs(l_g - l_c) / abs(l_c), "worst_grad": rel_rms(g_g[worst], g_c[worst])}
    return {"step": name, "loss_cpu": l_c, "loss_cuda": l_g, **errs, "worst_grad_param": worst,
            "max_rel_rms": max(errs.values()), "tol": TOL[torch.float32],
            "pass": max(errs.values()) <= TOL[torch.float32]}


def steps_cuda_vs_cpu(cuda: bool, group, cpu_group, T: int) -> dict:
    """Both steps on CPU (torch kernels; the hf one over ``cpu_group``, gloo) and, with CUDA, on
    CUDA (auto: fla + flex; over ``group``)."""
    cpu = torch.device("cpu")
    rows: List[dict] = []
    for name, run in (("linear-llama LLLN", lambda d, be, sbe: _llama_step(d, T, be, sbe)),
                      ("hf qwen3.5-tiny", lambda d, be, sbe: _hf_step(d, T, group if d.type == "cuda" else cpu_group))):
        if name.startswith("hf") and importlib.util.find_spec("transformers") is None:
            rows.append({"step": name, "result": "not run: transformers is not installed (pip install '.[hf]')",
                         "pass": False})
            continue
        ref = run(cpu, "torch", "torch")
        if cuda:
            rows.append(_compare(name, ref, run(torch.device("cuda"), "auto", "auto")))
        else:
            rows.append({"step": name, "loss_cpu": ref[0], "result": SKIP_CUDA + " (the CPU step ran)"})
    return section(rows, f"one fwd+bwd step, T = {T}, fp32; CUDA with backend auto (fla + flex) vs CPU torch")


# ----------------------------------------------------------------------------- SP on one GPU


def sp_rank(use_cuda: bool, T: int) -> List[dict]:
    """Rank body (W = 2 gloo ranks, ``lasp2.launch.spawn``): every strategy's output and
    gradients against the one-device op on the whole sequence, tensors on CUDA when asked."""
    import torch.distributed as dist

    import lasp2
    from ..parallel.strategies import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES

    group = dist.group.WORLD
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    gen = torch.Generator().manual_seed(4)
    H, D = 4, 16
    q, k, v = (torch.randn(1, T, H, D, generator=gen, dtype=torch.float32).to(device) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, H, generator=gen) + 4).to(device)
    rows = []
    cases = [("linear", s, lambda x, s=s: lasp2.sp_linear_attention(*x, group=group, strategy=s),
              lambda x: lasp2.linear_attention(*x)[0], (q, k, v, g)) for s in LINEAR_STRATEGIES]
    cases += [("softmax", s, lambda x, s=s: lasp2.sp_softmax_attention(*x, group=group, strategy=s),
               lambda x: lasp2.softmax_attention(*x), (q, k, v)) for s in SOFTMAX_STRATEGIES]
    for kind, strategy, sp_fn, ref_fn, whole in cases:
        row = {"op": kind, "strategy": strategy, "device": device.type}
        try:
            ref_x = [t.clone().requires_grad_() for t in whole]
            ref_o = ref_fn(ref_x)
            ref_g = torch.autograd.grad(ref_o.sum(), ref_x)
            xs = [lasp2.shard(t, group=group).clone().requires_grad_() for t in whole]
            o = sp_fn(xs)
            grads = torch.autograd.grad(o.sum(), xs)
            errs = {"o": rel_rms(o, lasp2.shard(ref_o, group=group))}
            errs.update({f"d{i}": rel_rms(a, lasp2.shard(b, group=group)) for i, a, b in zip("qkvg", grads, ref_g)})
            row.update(errs, max_rel_rms=max(errs.values()), tol=TOL[torch.float32])
            row["pass"] = row["max_rel_rms"] <= TOL[torch.float32]
        except Exception as e:  # noqa: BLE001 - report what does not work on this transport, and go on
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", **{"pass": False})
            # A rank that failed mid-collective may leave its peer waiting: end both at a barrier-free point.
            rows.append(row)
            break
        rows.append(row)
    return rows


def sp_on_one_device(cuda: bool, T: int, timeout_s: float) -> dict:
    from ..launch import RankFailure, spawn

    note = ("W = 2 gloo ranks holding CUDA tensors on one GPU (NCCL needs one GPU per rank)" if cuda else
            "W = 2 gloo ranks on CPU tensors (smoke: the CUDA-tensor run needs CUDA)")
    try:
        per_rank = spawn(sp_rank, 2, cuda, T, backend="gloo", timeout_s=timeout_s, threads_per_rank=1)
    except RankFailure as e:
        return {"status": "fail", "rows": [{"error": str(e).splitlines()[0][:300], "pass": False}], "note": note}
    return section([_worst(rows) for rows in zip(*per_rank)], note + "; errors: the worse of the two ranks' shards")


def _worst(rows) -> dict:
    """One row from the ranks' rows of one case: the larger error of every field, pass only if both pass."""
    out = dict(rows[0])
    for r in rows[1:]:
        for key, value in r.items():
            if isinstance(value, float):
                out[key] = max(out.get(key, value), value)
            elif key == "pass":
                out[key] = out.get(key, True) and value
            elif key == "error":
                out[key] = value
    return out
