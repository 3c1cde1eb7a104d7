"""The exactness sections of ``lasp2 bench --suite gpu`` (``gpu_check``): kernels against lasp2's
PyTorch references, and CUDA against CPU, by relative RMS error (``||x - ref|| / ||ref||``).

Each section returns ``{"status", "rows", "note"}``: ``status`` "pass" / "fail" against the
bound in ``TOL`` (per dtype: fp32 allows TF32-class rounding on GPUs, bf16 its 8-bit mantissa),
rows of what was compared. On CPU (``--smoke``) a section runs what CPU can run and marks the
rest "skipped: needs CUDA" in its rows; nothing is faked.
"""
from __future__ import annotations

import importlib.util
import os
import time
from typing import Dict, List

import torch

from .inputs import VARIANTS, make_inputs

TOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.bfloat16: 2e-2}
SKIP_CUDA = "skipped: needs CUDA"


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def _status(rows: List[dict]) -> str:
    judged = [r for r in rows if "pass" in r]
    if not judged:
        return SKIP_CUDA
    return "pass" if all(r["pass"] for r in judged) else "fail"


def section(rows: List[dict], note: str = "") -> dict:
    return {"status": _status(rows), "rows": rows, "note": note}


def _judge(row: dict, errs: Dict[str, float], dtype) -> dict:
    row.update({k: float(v) for k, v in errs.items()})
    row["max_rel_rms"] = max(errs.values())
    row["tol"] = TOL[dtype]
    row["pass"] = row["max_rel_rms"] <= TOL[dtype]
    return row


# ----------------------------------------------------------------------------- linear: fla vs torch


def _linear_run(backend, leaves, do, dS):
    import lasp2

    xs = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    o, S = lasp2.linear_attention(*xs, output_final_state=True, backend=backend)
    loss = (o.float() * do.float()).sum() + (S.float() * dS).sum()
    grads = torch.autograd.grad(loss, [t for t in xs if t is not None])
    return o, S, grads


def linear_fla_vs_torch(device, dtypes, variants=VARIANTS, T=256, H=2, D=32, deadline=None) -> dict:
    """Every variant: fla's kernels vs lasp2's torch ops on the same inputs (fwd o, final state,
    every gradient, the final state's gradient path included), per dtype; no new variant after
    ``deadline`` (time.time()), the ones left reported as not run."""
    rows = []
    interp = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    for variant in variants:
        for dtype in dtypes:
            row = {"variant": variant, "dtype": str(dtype).replace("torch.", ""), "T": T}
            if importlib.util.find_spec("fla") is None:
                rows.append({**row, "result": "not run: fla-core is not installed (pip install '.[gpu]')",
                             "pass": False})
                continue
            if device.type == "cpu" and not interp:
                rows.append({**row, "result": "skipped: fla on CPU needs TRITON_INTERPRET=1"})
                continue
            if deadline is not None and time.time() > deadline:
                rows.append({**row, "result": "not run: time budget", "pass": False})
                continue
            leaves, do = make_inputs(variant, T, H, D, dtype, device, seed=7)
            dS = torch.randn(1, H, D, D, generator=torch.Generator().manual_seed(8)).to(device)
            o, S, g = _linear_run("fla", leaves, do, dS)
            o_r, S_r, g_r = _linear_run("torch", leaves, do, dS)
            names = ["dq", "dk", "dv", "dg", "dbeta"]
            present = [n for n, t in zip(names, leaves) if t is not None]
            errs = {"o": rel_rms(o, o_r), "final_state": rel_rms(S, S_r)}
            errs.update({n: rel_rms(a, b) for n, a, b in zip(present, g, g_r)})
            rows.append(_judge(row, errs, dtype))
    return section(rows, "fla (backend='fla') vs lasp2's chunked PyTorch ops (backend='torch'), same inputs")


# ----------------------------------------------------------------------------- softmax: kernel vs blockwise


def softmax_cases(T: int):
    """(name, H, Hkv, Tq, mask) with the masks SP builds: causal, a zigzag shard's queries
    against the whole sequence, packed documents, GQA with documents."""
    from ..ops.attention_mask import AttentionMask, HostRanges

    full = ((0, 0, T),)
    q4 = T // 4
    zig = ((0, 0, q4), (q4, 3 * q4, q4))  # rank 0 of W = 2 under zigzag
    cu = (0, T // 3, T // 3 + 5, T)
    return [("causal", 4, 4, T, AttentionMask(True, host=HostRanges(full, full))),
            ("zigzag", 4, 4, 2 * q4, AttentionMask(True, host=HostRanges(zig, full))),
            ("documents", 4, 4, T, AttentionMask(True, host=HostRanges(full, full, cu))),
            ("gqa-documents", 4, 1, T, AttentionMask(True, host=HostRanges(full, full, cu)))]


def _resolved(mask, tq, tk, device):
    """The same mask with device tensors (the blockwise reference plans from them)."""
    from ..ops import softmax_backends as sb
    from ..ops.attention_mask import AttentionMask

    h = mask.host
    qp, kp = sb._positions(h.q, tq, device), sb._positions(h.k, tk, device)
    qd = kd = None
    if h.cu is not None:
        qd, kd = sb._docs(qp, h.cu), sb._docs(kp, h.cu)
    return AttentionMask(mask.causal, qp, kp, qd, kd, h)


def softmax_kernel_vs_blockwise(device, dtypes, T=256, D=64) -> dict:
    """flex vs the blockwise loop on fp64 inputs (the reference): o and lse; on CUDA also the
    one-device backward (flex's autograd) and a key subset's backward (the SP strategies' path:
    recompute with the log-sum-exp gradient)."""
    from ..ops import softmax_backends as sb
    from ..ops.attention_mask import AttentionMask
    from ..ops.softmax import BlockwiseAttention, attention_block_bwd, attention_block_fwd

    rows = []
    for name, H, Hkv, tq, mask in softmax_cases(T):
        m = _resolved(mask, tq, T, device)
        gen = torch.Generator().manual_seed(3)
        q64, k64, v64, do64 = (torch.randn(1, n, h, D, generator=gen, dtype=torch.float64).to(device)
                               for n, h in ((tq, H), (T, Hkv), (T, Hkv), (tq, H)))
        for dtype in dtypes:
            row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "T": T, "H": H, "Hkv": Hkv}
            q, k, v, do = (x.to(dtype) for x in (q64, k64, v64, do64))
            o_ref, lse_ref = attention_block_fwd(q64, k64, v64, m, scale=D ** -0.5, block_size=64)
            o, lse = sb.block_fwd("flex", q, k, v, mask, scale=D ** -0.5, block_size=64)
            fin = torch.isfinite(lse_ref)
            errs = {"o": rel_rms(o, o_ref), "lse": rel_rms(lse[fin], lse_ref[fin])}
            if device.type == "cuda":
                leaves = [x.clone().requires_grad_() for x in (q, k, v)]
                ref_leaves = [x.clone().requires_grad_() for x in (q64, k64, v64)]
                o_k, _ = sb.attention(*leaves, mask, scale=D ** -0.5, block_size=64, name="flex")
                o_b, _ = BlockwiseAttention.apply(*ref_leaves, m, D ** -0.5, 64)
                g_k = torch.autograd.grad(o_k, leaves, do)
                g_b = torch.autograd.grad(o_b, ref_leaves, do64)
                errs.update({f"{n}": rel_rms(a, b) for n, a, b in zip(("dq", "dk", "dv"), g_k, g_b)})
                # A key subset (the first half of the keys), as allgather / ring compute it.
                h = T // 2
                sub = AttentionMask(True, m.q_pos, m.k_pos[:h], m.q_doc, None if m.k_doc is None else m.k_doc[:h])
                delta = (do64 * o_ref).sum(-1).transpose(1, 2)
                ref_sub = attention_block_bwd(do64, q64, k64[:, :h], v64[:, :h], None, lse_ref, sub,
                                              scale=D ** -0.5, block_size=64, delta=delta)
                got_sub = sb.block_bwd("flex", do, q, k[:, :h].contiguous(), v[:, :h].contiguous(), lse_ref.float(),
                                       sub, scale=D ** -0.5, block_size=64, delta=delta.float())
                errs.update({f"subset_{n}": rel_rms(a, b) for n, a, b in zip(("dq", "dk", "dv"), got_sub, ref_sub)})
            else:
                row["backward"] = SKIP_CUDA + " (FlexAttention has no CPU backward in torch 2.13)"
            rows.append(_judge(row, errs, dtype))
    return section(rows, "softmax_backends flex vs the blockwise PyTorch loop on the fp64 inputs")
