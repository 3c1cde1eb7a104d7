"""Markdown for ``lasp2 plan``: per-point predictions, and the labelled scaling projection."""
from __future__ import annotations

from dataclasses import replace
from typing import List

from .plan import (DEVICES, MODELS, NETWORKS, ModelConfig, assumptions, by_pattern, label, plan_table, predict,
                   reason, recommend, strategy_pairs)

PROJ_GPUS = [16, 32, 64, 128, 256, 512, 1024]
PROJ_LENS = [2048 << i for i in range(13)]  # 2K .. 8192K
DP_LENS = [65536, 1 << 20, 1 << 23]  # the fraction-of-data-parallel tables: 64K, 1M, 8M tokens


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


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


def _header(model: ModelConfig, network, device) -> List[str]:
    return [f"Model: {model.name}, hidden {model.hidden}, {model.layers} layers (pattern {model.pattern}: "
            f"{model.kinds().count('L')} linear, {model.kinds().count('N')} softmax), {model.heads} heads "
            f"({model.kv_heads} KV), head dim {model.head_dim}, FFN {model.ffn}, vocab {model.vocab}, "
            f"{model.params() / 1e9:.2f} B parameters; one sequence per step, SP over all W GPUs.", "",
            "Assumptions (presets, not measurements):", *assumptions(network, device), ""]


def render(args) -> str:
    if any(w < 1 for w in args.gpus) or any(t < 1 for t in (args.seq_lens or [1])):
        raise ValueError("--gpus and --seq-lens must be positive")
    model = model_from_args(args)
    network, device = NETWORKS[args.network], DEVICES[args.device]
    if args.mfu is not None:
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
        device = replace(device, efficiency=args.mfu)
    if args.projection:
        return projection(model, network, device)
    lens = args.seq_lens or [65536, 262144, 1048576]
    for W in args.gpus:
        for T in lens:
            if T % W:
                raise ValueError(f"--seq-lens {T} does not split over --gpus {W}")
    table = plan_table(model, args.gpus, lens, network, device)
    lines = ["# lasp2 plan (analytical model: predictions, not measurements)", "", *_header(model, network, device)]
    for row in table["rows"]:
        W, T = row["W"], row["seq_len"]
        lines += [f"## W = {W} GPUs, {_k(T)} tokens ({T // W} per GPU)", "",
                  "| strategy | step (ms) | compute (ms) | exposed comm (ms) | tokens/s/GPU | of DP | MB sent/GPU "
                  "| comm calls/GPU | memory/GPU (GB) |", "|---|---|---|---|---|---|---|---|---|"]
        for p in row["predictions"]:
            if p.note.startswith("not applicable"):
                lines.append(f"| {p.label} | {p.note} | | | | | | | |")
                continue
            lines.append(f"| {p.label}{f' (k = {p.blocks})' if p.blocks else ''} | {p.time * 1e3:.1f} | "
                         f"{p.compute * 1e3:.1f} | {p.comm * 1e3:.2f} | {p.tokens_per_s_per_gpu:,.0f} | "
                         f"{p.dp_fraction:.3f} | {p.bytes_sent / 2**20:.1f} | {p.calls} | "
                         f"{p.memory / 1e9:.1f}{'' if p.fits else ' (does not fit)'} |")
        best = recommend(row["predictions"])
        lines += ["", f"Recommended: **{row['best']}**: {reason(best, row['predictions'])}." if best else
                  "Recommended: nothing fits in memory; add GPUs or shorten the sequence.",
                  "", "(of DP: fraction of the throughput of the same model trained data-parallel with the same "
                  "tokens per GPU and no SP.)", ""]
    return "\n".join(lines) + "\n"


def _grid(model, network, device, pair, metric) -> List[str]:
    rows = ["| tokens | " + " | ".join(f"W={W}" for W in PROJ_GPUS) + " |", "|---|" + "---|" * len(PROJ_GPUS)]
    for T in PROJ_LENS:
        cells = [metric(predict(model, W, T, network, device, pair), W, T) for W in PROJ_GPUS]
        rows.append(f"| {_k(T)} | " + " | ".join(cells) + " |")
    return rows


def _gain(model, network, device, new, old):
    def cell(p, W, T):
        q = predict(model, W, T, network, device, old)
        return f"{q.time / p.time - 1:+.1%}"
    return cell


def _best(model, network, device):
    def cell(p, W, T):
        best = recommend([predict(model, W, T, network, device, pair) for pair in strategy_pairs(model)])
        return best.label if best else "nothing fits"
    return cell


def projection(model: ModelConfig, network, device) -> str:
    lines = ["# lasp2 plan --projection", "",
             "**PROJECTION from the analytical model in lasp2/bench/cost_model.py, not a measurement.** "
             "The model was checked against measurements only on a 2-core CPU with gloo at W = 2 and 4 "
             "(see the validation section of benchmarks/results/plan.md); every number below extrapolates "
             "the presets listed here.", ""]
    tput = lambda p, W, T: f"{p.tokens_per_s_per_gpu:,.0f}" + ("" if p.fits else " (OOM)")  # noqa: E731
    mem = lambda p, W, T: f"{p.memory / 1e9:.1f}" + ("" if p.fits else " (OOM)")  # noqa: E731
    for pattern, new, old in (("L", by_pattern("all-gather", None), by_pattern("chain", None)),
                              ("LLLN", by_pattern("all-gather", "all-gather"), by_pattern("chain", "ring-pass"))):
        m = replace(model, pattern=pattern, name=f"{model.name.split(' ')[0]}" + (" hybrid" if "N" in pattern else ""))
        kind = "pure linear" if pattern == "L" else "1 softmax layer in 4 (LLLN)"
        lines += [f"## {m.name}: {kind}", "", *_header(m, network, device),
                  f"### Throughput, tokens/s per GPU, {label(new)}", "", *_grid(m, network, device, new, tput), "",
                  f"### Speed-up of {label(new)} over {label(old)} (step time of {label(old)} / "
                  f"{label(new)} - 1)", "", *_grid(m, network, device, new, _gain(m, network, device, new, old)), "",
                  f"### Memory per GPU (GB), {label(new)}", "", *_grid(m, network, device, new, mem), "",
                  "### Recommended: the fastest strategy that fits in memory", "",
                  *_grid(m, network, device, new, _best(m, network, device)), "",
                  *_dp_fraction(m, network, device)]
        lines += _summary(m, network, device, new, old) + [""]
    return "\n".join(lines) + "\n"


def _dp_fraction(model, network, device) -> List[str]:
    """Fraction of data-parallel throughput (same model, same tokens per GPU, no SP) of every
    linear strategy (hybrids: with the softmax strategy that all-gathers, LASP-2H's), at the
    lengths of ``DP_LENS``; k* of the pipelined chain in brackets."""
    soft = by_pattern(None, "all-gather")[1] if "N" in model.pattern else None
    pairs = [(lin, soft) for lin, s in strategy_pairs(model) if s == soft]
    out = [f"### Fraction of data-parallel throughput ({'softmax layers: ' + soft + '; ' if soft else ''}"
           "1.00 = the same model trained data-parallel on sequences of the per-GPU length, no SP)", ""]
    for T in DP_LENS:
        out += [f"{_k(T)} tokens per sequence:", "", "| strategy | " + " | ".join(f"W={W}" for W in PROJ_GPUS) + " |",
                "|---|" + "---|" * len(PROJ_GPUS)]
        for pair in pairs:
            cells = []
            for W in PROJ_GPUS:
                p = predict(model, W, T, network, device, pair)
                cells.append(f"{p.dp_fraction:.3f}" + (f" (k={p.blocks})" if p.blocks else "") +
                             ("" if p.fits else " (OOM)"))
            out.append(f"| {label(pair)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _summary(model, network, device, new, old) -> List[str]:
    """Plain sentences: where the new strategy wins and how the margin moves with W and T."""
    gain = {(W, T): predict(model, W, T, network, device, old).time / predict(model, W, T, network, device, new).time - 1
            for W in PROJ_GPUS for T in PROJ_LENS}
    best = max(gain, key=gain.get)
    lo, hi = PROJ_LENS[0], PROJ_LENS[-1]
    out = [f"Summary ({label(new)} vs {label(old)}): largest predicted gain {gain[best]:+.1%} at W={best[0]}, "
           f"{_k(best[1])} tokens."]
    for W in PROJ_GPUS:
        out.append(f"- W={W}: {gain[(W, lo)]:+.1%} at {_k(lo)}, {gain[(W, 65536)]:+.1%} at 64K, "
                   f"{gain[(W, hi)]:+.1%} at {_k(hi)}.")
    # Sensitivity: how much of the gain is the assumed extra latency of a dependent hop.
    flat = replace(network, intra=replace(network.intra, p2p_alpha=network.intra.alpha),
                   inter=replace(network.inter, p2p_alpha=network.inter.alpha))
    W = PROJ_GPUS[-1]
    g = [predict(model, W, T, flat, device, old).time / predict(model, W, T, flat, device, new).time - 1
         for T in (lo, hi)]
    out.append(f"- Sensitivity: with p2p_alpha = alpha (a dependent hop no dearer than a collective step), "
               f"the W={W} gain would be {g[0]:+.1%} at {_k(lo)} and {g[1]:+.1%} at {_k(hi)}. What is left "
               "then is only what LASP-2 hides behind the work it overlaps (the intra-chunk attention, or the "
               "diagonal softmax block); the difference is the assumed extra latency of LASP-1's dependent hops.")
    return out
