"""Output of ``lasp2 plan``: the per-point table (default), ``--explain`` (every term of the step),
``--json`` (one object, for scripts), and the labelled ``--projection``."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import List

from .hardware import load_hardware
from .memory import parse_shape
from .plan import (MODELS, ModelConfig, Prediction, assumptions, by_pattern, label, plan_table, predict,
                   reason, recommend, strategy_pairs)
from .published import paper_calibration, uncertainty
from .step_model import Setup

PROJ_GPUS = [16, 32, 64, 128, 256, 512, 1024]
PROJ_LENS = [2048 << i for i in range(13)]  # 2K .. 8192K
DP_LENS = [65536, 1 << 20, 1 << 23]  # the fraction-of-data-parallel tables: 64K, 1M, 8M tokens


def _k(n: int) -> str:
    return f"{n // (1 << 20)}M" if n % (1 << 20) == 0 and n >= 1 << 22 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def model_from_args(args) -> ModelConfig:
    m = MODELS[args.model]
    over = {f: getattr(args, f) for f in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab")
            if getattr(args, f) is not None}
    if args.layer_pattern:
        over["pattern"] = args.layer_pattern.upper()
    for f, v in over.items():
        if f != "pattern" and v < 1:
            raise ValueError(f"--{f.replace('_', '-')} must be >= 1, got {v}")
    return replace(m, **over) if over else m


def setup_from_args(args) -> Setup:
    hw, cal = load_hardware(args.hardware, paper_calibration())
    if args.mfu is not None:
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
        cal = replace(cal, mfu=args.mfu)
    return Setup(hw, cal, args.sharding, args.checkpointing)


def _header(model: ModelConfig, setup: Setup) -> List[str]:
    u = uncertainty()
    return [f"Model: {model.name}, hidden {model.hidden}, {model.layers} layers (pattern {model.pattern}: "
            f"{model.kinds().count('L')} linear, {model.kinds().count('N')} softmax), {model.heads} heads "
            f"({model.kv_heads} KV), head dim {model.head_dim}, FFN {model.ffn}, vocab {model.vocab}, "
            f"{model.params() / 1e9:.2f} B parameters; one sequence per SP group and step.", "",
            f"Uncertainty: +-{u:.0%} on every step time (held-out error against the LASP-2 paper's Table 6, and "
            "the paper's own run-to-run spread; docs/planner.md). Other hardware, models and lengths extrapolate.",
            "", "Assumptions (presets and a calibration, not measurements):", *assumptions(setup), ""]


def _split_of(args, gpus: int):
    """(sp or None, auto): --split DPxSP, 'auto', or None (SP over every GPU)."""
    if not args.split:
        return None, False
    if args.split == "auto":
        return None, True
    dp, sp = parse_shape(args.split)
    if dp * sp != gpus:
        raise ValueError(f"--split {args.split}: dp x sp = {dp * sp} must equal --gpus {gpus}")
    return sp, False


def render(args) -> str:
    if any(w < 1 for w in args.gpus):
        raise ValueError("--gpus must be positive")
    model, setup = model_from_args(args), setup_from_args(args)
    if args.projection:
        return projection(model, setup)
    lens = args.seq_lens or [65536, 262144, 1048576]
    names = [n.strip() for n in args.strategies.split(",")] if args.strategies else None
    if args.json and (len(args.gpus) > 1 or len(lens) > 1):
        raise ValueError("--json prints one point: give one --gpus and one --seq-len")
    rows = []
    for G in args.gpus:
        sp, auto = _split_of(args, G)
        for n in lens:
            if n % (sp or (1 if auto else G)):
                raise ValueError(f"--seq-lens {n} does not split over {sp or G} GPUs per sequence (--gpus {G})")
        rows += plan_table(model, [G], lens, setup, names, sp, auto)["rows"]
    if args.json:
        return json.dumps({"predictions": [_json(p) for p in rows[0]["predictions"]]}, indent=1) + "\n"
    lines = ["# lasp2 plan (analytical model: predictions, not measurements)", "", *_header(model, setup)]
    u = uncertainty()
    for row in rows:
        lines += _point(row, u, args.explain)
    return "\n".join(lines) + "\n"


def _json(p: Prediction) -> dict:
    ok = p.time != float("inf")
    return {"strategy": p.label, "step_time_s": p.time if ok else None,
            "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu if ok else None,
            "memory_per_gpu_bytes": p.memory if ok else None, "fits": bool(p.fits)}


def _point(row, u: float, explain: bool) -> List[str]:
    G, n = row["W"], row["seq_len"]
    lines = [f"## {G} GPUs, {_k(n)} tokens per sequence", "",
             "| strategy | dp x sp | step (ms) | compute (ms) | exposed comm (ms) | tokens/s/GPU | vs data parallel "
             "| memory/GPU (GB) |", "|---|---|---|---|---|---|---|---|"]
    for p in row["predictions"]:
        name = p.label + (" (modelled baseline)" if p.baseline else "") + (f" (k = {p.blocks})" if p.blocks else "")
        if p.note.startswith("not applicable"):
            lines.append(f"| {name} | {p.split} | {p.note} | | | | | |")
            continue
        lines.append(f"| {name} | {p.split} | {p.time * 1e3:,.0f} +- {u * p.time * 1e3:,.0f} | "
                     f"{p.compute * 1e3:,.0f} | "
                     f"{p.comm * 1e3:,.1f} | {p.tokens_per_s_per_gpu:,.0f} | {p.dp_fraction:.2f} x "
                     f"{p.dp_tokens_per_s_per_gpu:,.0f} | {p.memory / 1e9:.1f}{'' if p.fits else ' (does not fit)'} |")
    best = row["best"]
    lines += ["", f"Recommended: **{best.label}** at dp x sp = {best.split}: {reason(best, row['predictions'], u)}."
              if best else "Recommended: nothing fits in memory; add GPUs, shard the model states (--sharding) or "
              "checkpoint activations (--checkpointing).", "",
              "(vs data parallel: this strategy's tokens/s per GPU as a fraction of plain data parallel's, whose "
              "tokens/s per GPU follows: every GPU trains whole sequences of the per-GPU length, no SP.)", ""]
    if explain:
        lines += _explain(row["predictions"])
    return lines


def _explain(preds: List[Prediction]) -> List[str]:
    out = []
    for p in preds:
        if not p.terms:
            continue
        out += [f"### {p.label} ({p.split}): where the {p.time * 1e3:,.0f} ms go", "",
                "| term | in all (ms) | exposed (ms) | hidden behind compute (ms) |", "|---|---|---|---|"]
        out += [f"| {t.name} | {t.seconds * 1e3:,.1f} | {t.exposed * 1e3:,.1f} | {(t.seconds - t.exposed) * 1e3:,.1f} |"
                for t in p.terms]
        out += ["", "| memory per GPU | GB |", "|---|---|"]
        out += [f"| {k} | {v / 1e9:.2f} |" for k, v in p.memory_parts.items()] + [""]
    return out


def _grid(model, setup, pair, metric) -> List[str]:
    rows = ["| tokens | " + " | ".join(f"W={W}" for W in PROJ_GPUS) + " |", "|---|" + "---|" * len(PROJ_GPUS)]
    for T in PROJ_LENS:
        cells = [metric(predict(model, W, T, setup, pair), W, T) for W in PROJ_GPUS]
        rows.append(f"| {_k(T)} | " + " | ".join(cells) + " |")
    return rows


def projection(model: ModelConfig, setup: Setup) -> str:
    u = uncertainty()
    lines = ["# lasp2 plan --projection", "",
             f"**PROJECTION from the calibrated model (lasp2/bench/step_model.py), not a measurement.** The "
             f"calibration was fitted to the LASP-2 paper's Table 6 (64 A100s; docs/planner.md): +-{u:.0%} there; "
             "other hardware, sizes and lengths extrapolate it.", ""]
    tput = lambda p, W, T: f"{p.tokens_per_s_per_gpu:,.0f}" + ("" if p.fits else " (OOM)")  # noqa: E731
    mem = lambda p, W, T: f"{p.memory / 1e9:.1f}" + ("" if p.fits else " (OOM)")  # noqa: E731

    def gain(new, old):
        return lambda p, W, T: f"{predict(model_, W, T, setup, old).time / p.time - 1:+.1%}"

    def best(p, W, T):
        preds = [predict(model_, W, T, setup, pair) for pair in strategy_pairs(model_)]
        b = recommend(preds)
        close = b and any(q is not b and q.fits and q.time < b.time * (1 + u) for q in preds)
        return (b.label + ("*" if close else "")) if b else "nothing fits"
    for pattern, new, old in (("L", by_pattern("all-gather", None), by_pattern("chain", None)),
                              ("LLLN", by_pattern("all-gather", "all-gather"), by_pattern("chain", "ring-pass"))):
        model_ = replace(model, pattern=pattern, name=model.name.split(" ")[0] + (" hybrid" if "N" in pattern else ""))
        kind = "pure linear" if pattern == "L" else "1 softmax layer in 4 (LLLN)"
        lines += [f"## {model_.name}: {kind}", "", *_header(model_, setup),
                  f"### Throughput, tokens/s per GPU, {label(new)}, SP over all W GPUs", "",
                  *_grid(model_, setup, new, tput), "",
                  f"### Speed-up of {label(new)} over {label(old)} (step time of {label(old)} / {label(new)} - 1)", "",
                  *_grid(model_, setup, new, gain(new, old)), "",
                  f"### Memory per GPU (GB), {label(new)}", "", *_grid(model_, setup, new, mem), "",
                  "### Recommended: the fastest library strategy that fits in memory", "",
                  f"(* the runner-up is within the model's +-{u:.0%}: measure both before choosing)", "",
                  *_grid(model_, setup, new, best), "", *_dp_fraction(model_, setup)]
    return "\n".join(lines) + "\n"


def _dp_fraction(model, setup) -> List[str]:
    """tokens/s per GPU of every linear strategy (hybrids: with the all-gather softmax strategy)
    as a fraction of plain data parallel's, with data parallel's absolute figure, at ``DP_LENS``."""
    soft = by_pattern(None, "all-gather")[1] if "N" in model.pattern else None
    pairs = [(lin, s) for lin, s in strategy_pairs(model) if s == soft]
    out = [f"### Fraction of data-parallel throughput ({'softmax layers: ' + soft + '; ' if soft else ''}tokens/s "
           "per GPU of the strategy / tokens/s per GPU of plain data parallel on sequences of the per-GPU length, "
           "which the last row gives)", ""]
    for T in DP_LENS:
        out += [f"{_k(T)} tokens per sequence:", "", "| strategy | " + " | ".join(f"W={W}" for W in PROJ_GPUS) + " |",
                "|---|" + "---|" * len(PROJ_GPUS)]
        preds = {pair: [predict(model, W, T, setup, pair) for W in PROJ_GPUS] for pair in pairs}
        for pair, ps in preds.items():
            out.append(f"| {label(pair)} | " + " | ".join(
                f"{p.dp_fraction:.3f}" + (f" (k={p.blocks})" if p.blocks else "") + ("" if p.fits else " (OOM)")
                for p in ps) + " |")
        out += ["| data parallel, tokens/s/GPU | " + " | ".join(f"{p.dp_tokens_per_s_per_gpu:,.0f}"
                                                                for p in next(iter(preds.values()))) + " |", ""]
    return out

