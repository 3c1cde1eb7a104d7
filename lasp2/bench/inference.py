"""``lasp2 bench --suite inference``: prefill time vs prompt length at SP = 1, 2, 4 and decode
tokens/s vs context length with the cache's bytes, for Linear-Llama pure linear and hybrid
(``lasp2.generate``'s prefill / decode) and a transformers model (``lasp2.hf.sp_prefill``, then
the model's own decode step), in one run.

Prefill at SP = W: W ranks (one thread each), the prompt of L + 1 tokens prefilled under SP (L
tokens sharded, the last one decoded), timed from a barrier to the slowest rank. SP = 1 is the
same function on one process (the one-device path: the native model's chunked forward, the HF
model's SP code on a group of one), so the ratio is the speedup of sequence parallelism and
nothing else. Rounds interleave the world sizes (every W once per round, then again), medians
over rounds: on a loaded machine every W sees the same load. Decode: one process, one thread,
tokens/s over ``decode_tokens`` greedy steps after a prefill of L tokens; cache bytes are the
states (constant in L) plus the softmax K/V (linear in L).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch

MODELS = ("native-pure", "native-hybrid", "qwen3.5-tiny")


@dataclass
class InferenceSpec:
    lengths: Tuple[int, ...] = (1024, 4096, 16384, 32768)
    world_sizes: Tuple[int, ...] = (1, 2, 4)
    models: Tuple[str, ...] = MODELS
    rounds: int = 3
    decode_tokens: int = 32
    layout: str = "zigzag"
    extra: Dict[str, str] = field(default_factory=dict)


def _native(name: str):
    from ..models import LinearLlama, LinearLlamaConfig

    pattern = "L" if name == "native-pure" else "LLLN"
    cfg = LinearLlamaConfig.preset("debug", layer_pattern=pattern, linear_variant="gated_deltanet")
    return LinearLlama(cfg, seed=0).eval()


def _hf(name: str):
    from ..hf.loading import build_model, load_config, use_torch_kernels

    torch.manual_seed(0)
    model = build_model(load_config(name)).eval()
    use_torch_kernels(model)
    return model


def _build(name: str):
    return _native(name) if name.startswith("native") else _hf(name)


def _prefill(name, model, ids, group, layout):
    """The prefill of ``ids`` [1, L + 1] under SP over ``group``; returns (cache, logits or None)."""
    if name.startswith("native"):
        from ..models.generate import plan_for, prefill

        return prefill(model, ids, plan_for(model, group, layout))
    from ..hf.prefill import sp_prefill

    cache = sp_prefill(model, ids, group=group, layout=layout)
    with torch.no_grad():  # the tail token, as generate's first step feeds it
        out = model(ids[:, cache.get_seq_length():], cache=cache, use_cache=True)
    return cache, out.logits[:, -1]


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    seen = []
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                seen.append(t)
        for name in ("conv_states", "recurrent_states"):
            seen += [t for t in getattr(layer, name, {}).values() if isinstance(t, torch.Tensor)]
    seen += [t for t in getattr(cache, "linear_cache", []) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in seen)


def _decode(name, model, cache, logits, n: int) -> float:
    """Seconds per token over ``n`` greedy steps from ``cache``."""
    from ..models.generate import extend

    token = logits.argmax(-1)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            if name.startswith("native"):
                logits = extend(model, token[:, None], cache)
            else:
                logits = model(token[:, None], cache=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1)
    return (time.perf_counter() - start) / n


def rank_work(spec: dict, decode: bool) -> List[dict]:
    """One rank of one world size: every model and length once; rank 0 returns the records."""
    import torch.distributed as dist

    group = dist.group.WORLD
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    out = []
    for name in spec["models"]:
        model = _build(name)
        vocab = model.config.vocab_size
        for L in spec["lengths"]:
            ids = torch.randint(0, vocab, (1, L + 1), generator=torch.Generator().manual_seed(L))
            dist.barrier(group)
            start = time.perf_counter()
            with torch.no_grad():
                cache, logits = _prefill(name, model, ids, group, spec["layout"])
            took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX, group=group)
            rec = {"model": name, "L": L, "W": W, "prefill_s": took.item()}
            if decode and W == 1:
                rec["cache_bytes"] = _cache_bytes(cache)
                rec["decode_s_per_token"] = _decode(name, model, cache, logits, spec["decode_tokens"])
            out.append(rec)
    return out if rank == 0 else []


def run(spec: InferenceSpec, verbose: bool = True) -> List[dict]:
    """Every round: each world size once (interleaved); W = 1 also times decoding in round 0."""
    from ..launch import spawn

    records = []
    for r in range(spec.rounds):
        for W in spec.world_sizes:
            if verbose:
                print(f"round {r + 1}/{spec.rounds}: SP={W}", flush=True)
            recs = spawn(rank_work, W, asdict(spec), r == 0, threads_per_rank=1, timeout_s=7200)[0]
            records += [dict(rec, round=r) for rec in recs]
    return records


def summarize(records: List[dict], spec: InferenceSpec) -> List[dict]:
    rows = []
    for name in spec.models:
        for L in spec.lengths:
            row = {"model": name, "L": L}
            base = None
            for W in spec.world_sizes:
                times = [r["prefill_s"] for r in records if r["model"] == name and r["L"] == L and r["W"] == W]
                if not times:
                    continue
                row[f"prefill_s_sp{W}"] = statistics.median(times)
                base = row[f"prefill_s_sp{W}"] if W == 1 else base
                if base and W > 1:
                    row[f"speedup_sp{W}"] = base / row[f"prefill_s_sp{W}"]
            dec = [r for r in records if r["model"] == name and r["L"] == L and "decode_s_per_token" in r]
            if dec:
                row["decode_tok_s"] = 1.0 / dec[0]["decode_s_per_token"]
                row["cache_bytes"] = dec[0]["cache_bytes"]
            rows.append(row)
    return rows


def markdown(rows: List[dict], spec: InferenceSpec, meta: dict) -> str:
    ws = [w for w in spec.world_sizes if w > 1]
    head = ("| model | prompt L | prefill SP=1 (s) | " + " | ".join(f"SP={w} (s) | speedup" for w in ws) +
            " | decode tok/s (SP=1, 1 thread) | cache bytes |")
    sep = "|" + "---|" * (4 + 2 * len(ws) + 1)
    lines = [f"Command: `{meta.get('command', '')}`; {meta.get('hardware', '')}; load: {meta.get('load', '')}; "
             f"medians of {spec.rounds} interleaved rounds, one thread per rank.", "", head, sep]
    for r in rows:
        cells = [r["model"], str(r["L"]), f"{r.get('prefill_s_sp1', float('nan')):.3f}"]
        for w in ws:
            cells += [f"{r.get(f'prefill_s_sp{w}', float('nan')):.3f}", f"{r.get(f'speedup_sp{w}', float('nan')):.2f}x"]
        cells += [f"{r.get('decode_tok_s', float('nan')):.1f}", str(r.get("cache_bytes", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_cli(args) -> int:
    """``lasp2 bench --suite inference`` (flags: --seq-lens, --world-sizes, --repeats = rounds, --quick, --out)."""
    import os
    import shlex

    from . import report

    spec = InferenceSpec()
    if args.quick:
        spec = InferenceSpec(lengths=(256, 512), world_sizes=(1, 2), rounds=1, decode_tokens=4)
    if args.seq_lens:
        spec.lengths = tuple(args.seq_lens)
    if args.world_sizes:
        spec.world_sizes = tuple(args.world_sizes)
    if args.repeats:
        spec.rounds = args.repeats
    if 1 not in spec.world_sizes:
        spec.world_sizes = (1,) + tuple(spec.world_sizes)  # the baseline
    records = run(spec, not args.quiet)
    rows = summarize(records, spec)
    meta = {"command": "lasp2 " + shlex.join(args.argv), "torch": torch.__version__,
            "hardware": report.hardware(cuda=False), "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    out = Path(args.out or report.default_out("inference"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps({"spec": asdict(spec), "meta": meta, "records": records,
                                                    "rows": rows}, indent=1))
    text = markdown(rows, spec, meta)
    (out / "inference.md").write_text(text + "\n")
    if not args.quiet:
        print(text)
        print(f"wrote {out / 'inference.json'}, {out / 'inference.md'}")
    return 0
