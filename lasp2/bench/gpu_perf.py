"""The performance sections of ``lasp2 bench --suite gpu`` (``gpu_check``), each with its target:

(a) lasp2's linear local path vs fla's op called directly, every variant (target: >= 0.90 of
    fla's throughput at T >= 16K); (b) softmax local work: lasp2's kernel backend (flex) vs the
    blockwise loop vs FlexAttention and SDPA called directly (target: lasp2 flex >= 0.90 of flex
    direct); (c) one training step of linear-llama3-1b-shaped hybrid blocks (LLLN): tokens/s,
    peak memory, time share of linear / softmax layers / the rest (reported); (d) host syncs per
    step, ``torch.cuda.set_sync_debug_mode`` (target: zero inside the layers).

Timing: configurations interleaved round by round, CUDA events, medians (``onedevice``). On CPU
(``--smoke``) the same code runs at toy sizes and the timings mean nothing: targets are "not
judged (smoke)"; (b) times forwards only there (FlexAttention has no CPU backward) and (d) is
"skipped: needs CUDA".
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable, Dict, List

import torch

from .gpu_exact import SKIP_CUDA
from .onedevice import LocalSpec, _timer, gpu_points

NOT_JUDGED = "not judged (smoke: timings on CPU mean nothing)"


def _median_times(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int, device) -> Dict[str, float]:
    """Median seconds of each thunk, interleaved round by round in a rotating order."""
    start, names, times = _timer(device), list(fns), {n: [] for n in fns}
    for rep in range(warmup + repeats):
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            stop = start()
            fns[n]()
            t = stop()
            if rep >= warmup:
                times[n].append(t)
    return {n: statistics.median(ts) for n, ts in times.items()}


def linear_vs_fla(cuda: bool, variants, seq_lens, repeats: int, budget_s: float) -> dict:
    """(a): ``onedevice``'s gpu points (fla direct, linear_attention, sp_linear_attention at
    SP = 1), judged at T >= 16K."""
    spec = LocalSpec(suite="gpu", variants=tuple(variants), seq_lens=tuple(seq_lens), baseline_len=0,
                     heads=16 if cuda else 2, dim=128 if cuda else 16, dtype="bfloat16" if cuda else "float32",
                     backend="fla", repeats=repeats, warmup=2 if cuda else 0, budget_s=budget_s)
    records, extra = gpu_points(spec, False)
    rows = []
    for r in records:
        if r["config"] == "fla":
            continue
        row = {"variant": r["variant"], "T": r["T"], "config": r["config"], "ms": r["time_s"] * 1e3,
               "throughput_vs_fla": 1 / r["time_vs_fla"], "output_rel_rms_vs_fla": r["output_rel_rms_vs_fla"],
               "peak_mib": r["peak_mem_mb"]}
        if not cuda:
            row["target"] = NOT_JUDGED
        elif r["T"] >= 16384:
            row["pass"] = row["throughput_vs_fla"] >= 0.90
        rows.append(row)
    return _section(rows, f"B=1, H={spec.heads}, K=V={spec.dim}, {spec.dtype}, fwd+bwd; target >= 0.90 of fla at "
                          f"T >= 16K; not run (budget): {extra['skipped (time budget)'] or 'none'}")


def softmax_kernels(cuda: bool, seq_lens, repeats: int, deadline: float) -> dict:
    """(b): causal attention fwd+bwd (fwd only on CPU) of lasp2 flex, lasp2 torch (blockwise),
    FlexAttention direct (compiled, causal block mask built once) and SDPA (is_causal)."""
    import lasp2
    from torch.nn.attention.flex_attention import create_block_mask

    from ..ops.softmax_backends import _flex_fn

    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype, H, D = (torch.bfloat16, 16, 128) if cuda else (torch.float32, 2, 16)
    rows, skipped = [], []
    for T in seq_lens:
        if time.time() > deadline:
            skipped.append(T)
            continue
        gen = torch.Generator().manual_seed(T)
        leaves = [torch.randn(1, T, H, D, generator=gen).to(device, dtype).requires_grad_(cuda) for _ in range(3)]
        do = torch.randn(1, T, H, D, generator=gen).to(device, dtype)
        bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, T, T, device=device, _compile=cuda)
        flex = _flex_fn(device.type)
        t = lambda x: x.transpose(1, 2)  # noqa: E731  [B, T, H, D] <-> [B, H, T, D]
        calls = {"lasp2 flex": lambda q, k, v: lasp2.softmax_attention(q, k, v, backend="flex"),
                 "lasp2 torch (blockwise)": lambda q, k, v: lasp2.softmax_attention(q, k, v, backend="torch"),
                 "flex direct": lambda q, k, v: t(flex(t(q), t(k), t(v), block_mask=bm)),
                 "sdpa": lambda q, k, v: t(torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v),
                                                                                         is_causal=True))}

        def thunk(fn):
            if not cuda:
                return lambda: fn(*leaves)
            return lambda: torch.autograd.grad(fn(*leaves), leaves, do)
        with torch.no_grad() if not cuda else torch.enable_grad():
            med = _median_times({n: thunk(f) for n, f in calls.items()}, repeats, 2 if cuda else 0, device)
        for n, s in med.items():
            row = {"T": T, "config": n, "ms": s * 1e3, "throughput_vs_flex_direct": med["flex direct"] / s}
            if n == "lasp2 flex":
                if cuda:
                    row["pass"] = row["throughput_vs_flex_direct"] >= 0.90
                else:
                    row["target"] = NOT_JUDGED
            rows.append(row)
    return _section(rows, f"causal, B=1, H={H}, D={D}, {str(dtype)[6:]}, {'fwd+bwd' if cuda else 'fwd only (CPU)'}; "
                          f"target lasp2 flex >= 0.90 of flex direct; not run (budget): {skipped or 'none'}")


def _hybrid(cuda: bool, T: int):
    from ..models import LinearLlama, LinearLlamaConfig

    if cuda:  # linear-llama3-1b's shape, one LLLN group of blocks
        cfg = LinearLlamaConfig.preset("linear-llama3-1b", layer_pattern="LLLN", layers=4)
    else:
        cfg = LinearLlamaConfig(vocab_size=256, hidden=64, layers=4, heads=4, kv_heads=2, mlp_hidden=128,
                                layer_pattern="LLLN")
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = LinearLlama(cfg, seed=0, device=device).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0)).to(device)
    return cfg, model, ids, device, dtype


def training_step(cuda: bool, T: int, repeats: int) -> dict:
    """(c): one fwd+bwd of the hybrid blocks (gradient on the logits), and each attention kind
    alone on the same activations shape, for the time shares."""
    cfg, model, ids, device, dtype = _hybrid(cuda, T)
    do = torch.randn(1, T, cfg.vocab_size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    x = torch.randn(1, T, cfg.hidden, generator=torch.Generator().manual_seed(2)).to(device, dtype).requires_grad_()
    dx = torch.randn_like(x)
    kinds = [b.attn for b in model.layers]
    lin = next(m for m, t in zip(kinds, cfg.layer_types) if t == "L")
    soft = next(m for m, t in zip(kinds, cfg.layer_types) if t == "N")
    def step():
        model(ids).backward(do)

    def layer(m):
        return lambda: torch.autograd.grad(m(x), [x] + list(m.parameters()), dx)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    med = _median_times({"step": step, "linear layer": layer(lin), "softmax layer": layer(soft)}, repeats, 1, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else "n/a (CPU)"
    n_lin, n_soft = cfg.layer_types.count("L"), cfg.layer_types.count("N")
    share_lin, share_soft = n_lin * med["linear layer"] / med["step"], n_soft * med["softmax layer"] / med["step"]
    row = {"T": T, "layers": "".join(cfg.layer_types), "hidden": cfg.hidden, "vocab": cfg.vocab_size,
           "step_ms": med["step"] * 1e3, "tokens_per_s": T / med["step"], "peak_gib": peak,
           "share_linear": share_lin, "share_softmax": share_soft, "share_rest": 1 - share_lin - share_soft,
           "target": "reported" if cuda else NOT_JUDGED}
    return {"status": "reported" if cuda else NOT_JUDGED, "rows": [row],
            "note": f"{str(dtype)[6:]}, backend auto (fla + flex on CUDA); shares from each attention kind timed "
                    f"alone (fwd+bwd, same activation shape) times its layer count, over the step time"}


def host_syncs(cuda: bool, T: int) -> dict:
    """(d): host syncs counted by ``torch.cuda.set_sync_debug_mode('warn')`` in one step and in
    each attention layer alone (after a warm-up step: block masks and compilations cached)."""
    if not cuda:
        return {"status": SKIP_CUDA, "rows": [{"result": SKIP_CUDA + " (set_sync_debug_mode is CUDA's)"}],
                "note": ""}
    cfg, model, ids, device, dtype = _hybrid(cuda, T)
    x = torch.randn(1, T, cfg.hidden, device=device, dtype=dtype, requires_grad=True)

    def count(fn) -> int:
        fn()  # warm-up: compile, cache the block mask
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    rows = []
    for kind in ("L", "N"):
        m = next(b.attn for b, t in zip(model.layers, cfg.layer_types) if t == kind)
        n = count(lambda: m(x).sum().backward())
        rows.append({"where": f"{'linear' if kind == 'L' else 'softmax'} layer fwd+bwd", "syncs": n, "pass": n == 0})
    rows.append({"where": "whole step (embedding, loss-free logits gradient)",
                 "syncs": count(lambda: model(ids).sum().backward()), "target": "reported"})
    return _section(rows, f"T = {T}; target: zero host syncs inside the layers")


def _section(rows: List[dict], note: str) -> dict:
    judged = [r["pass"] for r in rows if "pass" in r]
    status = ("pass" if all(judged) else "fail") if judged else (NOT_JUDGED if rows else "nothing run")
    return {"status": status, "rows": rows, "note": note}
