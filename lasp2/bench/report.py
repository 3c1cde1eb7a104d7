"""Turning rank results into records, and writing results.json, results.md and PNG plots."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import torch

from .suites import IDEAL, split_layout


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hardware(cuda: bool = False) -> str:
    """One line: the CPU model and the cores this process may use, and the GPU if the run used
    CUDA (a CPU run on a GPU host does not name the GPU)."""
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores"
    if cuda and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}; " + text
    return text


def machine_tag() -> str:
    """A short name of this machine for results folders: the host name's first label."""
    name = platform.node().split(".")[0] or platform.machine()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in name)[:32] or "machine"


def default_out(suite: str) -> Path:
    """``<suite>_<machine>_<date>`` in the working directory (the default of ``lasp2 bench --out``)."""
    return Path(f"{suite}_{machine_tag()}_{time.strftime('%Y-%m-%d')}")


def run_meta(args) -> dict:
    """What results.json records of an SP suite's run: the command, torch, hardware, launcher."""
    import shlex

    from lasp2.launch import under_torchrun

    return {"command": "lasp2 " + shlex.join(args.argv), "torch": torch.__version__,
            "hardware": hardware(cuda=under_torchrun() and torch.cuda.is_available()),
            "launcher": "torchrun" if under_torchrun() else "self-launched gloo, 1 thread per rank", "note": args.note}


def rank_failure(out: Path, e) -> int:
    """A rank's error: its traceback in ``out``/failure.txt, one line on stderr; exit status 1."""
    import sys

    out.mkdir(parents=True, exist_ok=True)
    (out / "failure.txt").write_text(e.traceback or str(e))
    print(f"lasp2 bench: error: {e} (traceback in {out / 'failure.txt'})", file=sys.stderr)
    return 1


def matplotlib_pyplot():
    """pyplot with the file-only backend, or a one-line error telling how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib, which is not installed: pip install 'lasp2[bench]' "
                           "(or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def build_records(spec, per_w: Dict[int, List[List[dict]]], meta: dict) -> List[dict]:
    """One record per (W, T, configuration): the slowest rank's median time, efficiency against
    the ideal at the same point, peak memory and communication per rank."""
    records = []
    for W, ranks in sorted(per_w.items()):
        by_key = {}
        for rank_results in ranks:
            for r in rank_results:
                by_key.setdefault((r["T"], r["config"]), []).append(r)
        order = {c: i for i, c in enumerate(dict.fromkeys(r["config"] for r in ranks[0]))}  # suite order
        for (T, config), rs in sorted(by_key.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
            rec = {"suite": spec.suite, "strategy": config, "baseline": config == IDEAL, "W": W,
                   "T_global": spec.global_len(T, W), "T_local": spec.local_len(T, W),
                   **{k: v for k, v in asdict(spec).items() if k not in ("suite", "world_sizes", "seq_lens")},
                   "skipped": rs[0]["skip"]}
            rec["config_layout"] = None if config == IDEAL else split_layout(config, spec)[1]  # --layout both
            if rec["skipped"] is None:
                medians = [statistics.median(r["times"]) for r in rs]
                rec.update(time_s=max(medians), per_rank_time_s=medians,
                           tokens_per_s=spec.batch * rec["T_global"] / max(medians),
                           peak_mem_mb=max(r["peak_mem_mb"] for r in rs),
                           per_rank_peak_mem_mb=[r["peak_mem_mb"] for r in rs], mem_method=rs[0]["mem_method"],
                           bytes_sent_per_rank=[r["bytes_sent"] for r in rs],
                           bytes_received_per_rank=[r["bytes_received"] for r in rs],
                           comm_fwd=_max_counts(r["comm_fwd"] for r in rs),
                           comm_bwd=_max_counts(r["comm_bwd"] for r in rs),
                           per_rank_comm_wait_s=[r.get("comm_wait_s") for r in rs],
                           per_rank_times_s=[r["times"] for r in rs],
                           saved_bytes_per_rank=[r["saved_bytes"] for r in rs])
                # load balance: each rank's median CPU seconds per call (a rank waiting for a peer
                # sleeps), and the causal pairs its queries see
                cpu = [statistics.median(r["cpu"]) for r in rs]
                rec.update(per_rank_cpu_s=cpu, cpu_max_over_min=max(cpu) / max(min(cpu), 1e-9))
                if rs[0].get("visible_pairs"):
                    pairs = [r["visible_pairs"] for r in rs]
                    rec.update(per_rank_visible_pairs=pairs, pairs_max_over_min=max(pairs) / min(pairs))
            records.append({**rec, **meta})
    ideal = {(r["W"], r["T_global"]): r for r in records if r["baseline"] and r.get("time_s")}
    for r in records:
        base = ideal.get((r["W"], r["T_global"]))
        if r.get("time_s") and base:
            r["efficiency"] = base["time_s"] / r["time_s"]
            r["cpu_efficiency"] = max(base["per_rank_cpu_s"]) / max(max(r["per_rank_cpu_s"]), 1e-9)
    # weak scaling (--local-lens with --world-sizes 1 ...): against one process doing one rank's share
    single = {r["T_local"]: r["time_s"] for r in records if r["baseline"] and r["W"] == 1 and r.get("time_s")}
    for r in records:
        if r.get("time_s") and r["T_local"] in single and not spec.seq_is_global:
            r["efficiency_vs_one_process"] = single[r["T_local"]] / r["time_s"]
    return records


def _max_counts(dicts) -> Dict[str, int]:
    """Per operation, the largest count any rank issued (LASP-1's end ranks issue fewer)."""
    out: Dict[str, int] = {}
    for d in dicts:
        for op, n in d.items():
            out[op] = max(out.get(op, 0), n)
    return out


def _ops(d: Dict[str, int]) -> str:
    return ", ".join(f"{n} {op}" for op, n in d.items()) or "none"


def _blocked(r: dict) -> str:
    """Slowest rank's blocked communication time, fwd / bwd in ms ("" for older results)."""
    waits = [w for w in r.get("per_rank_comm_wait_s") or [] if w]
    if not waits:
        return ""
    return " / ".join(f"{max(w[i] for w in waits) * 1e3:.1f}" for i in (0, 1))


def _cpu(r: dict) -> str:
    """The busiest rank's CPU ms per call and the ideal's over it ("|" alone for older results)."""
    if "per_rank_cpu_s" not in r:
        return " |"
    return f"{max(r['per_rank_cpu_s']) * 1e3:.1f} | {r.get('cpu_efficiency', 0):.3f}"


def markdown(records: List[dict], meta: dict, spec) -> str:
    seq = "global tokens (split over W)" if spec.seq_is_global else "tokens per rank"
    shapes = (f"model {spec.hf_config} (its config fixes the shapes), B={spec.batch}" if spec.suite == "hf" else
              f"B={spec.batch}, H={spec.heads}, Hkv={spec.kv_heads or spec.heads}, D={spec.dim}"
              + (f", variant {getattr(spec, 'variant', 'scalar')}" if spec.suite == "linear" else ""))
    lines = [f"# lasp2 bench --suite {spec.suite}", "", f"Command: `{meta['command']}`", "",
             f"torch {meta['torch']}; {meta['hardware']}; {shapes}, {spec.dtype}, layout {spec.layout}; "
             f"lengths given as {seq}. Time: the slowest rank's median of {spec.repeats} fwd+bwd calls "
             f"(after {spec.warmup} warm-up + 1 tracked call), configurations interleaved repeat by repeat. "
             "Efficiency = ideal time / time, where the ideal is every rank running the one-device op on "
             "1/W of the work with no communication, at the same time; CPU efficiency is the same ratio of "
             "the busiest rank's CPU seconds per call (a rank waiting for a peer sleeps). Peak memory: per rank above the "
             "inputs, max over ranks. Communication per call of the measured op (one layer; one whole "
             "model step for --suite model and hf), per rank, forward and backward; 'blocked' is the "
             "time the slowest rank spent inside lasp2's communication calls in that tracked call (all "
             "threads: allscan and tree wait in a helper thread while the local work runs)."
             + (" hf: the ideal is the unmodified transformers model on this rank's tokens (no SP)."
                if spec.suite == "hf" else ""), ""]
    if meta.get("note"):
        lines += [f"**Note:** {meta['note']}", ""]
    lines += ["| W | T global | T local | strategy | fwd+bwd (ms) | tokens/s | efficiency | peak MB/rank "
              "| MB sent/rank | comm fwd | comm bwd | blocked fwd/bwd (ms) | CPU ms/rank | CPU efficiency |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        head = f"| {r['W']} | {r['T_global']} | {r['T_local']} | {r['strategy']} |"
        if r["skipped"]:
            lines.append(head + f" skipped: {r['skipped']} | | | | | | | | | |")
            continue
        lines.append(head + f" {r['time_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r.get('efficiency', 0):.3f} | "
                     f"{r['peak_mem_mb']:.0f} | {max(r['bytes_sent_per_rank']) / 2**20:.2f} | "
                     f"{_ops(r['comm_fwd'])} | {_ops(r['comm_bwd'])} | {_blocked(r)} | {_cpu(r)} |")
    if spec.suite == "softmax" and any("cpu_max_over_min" in r for r in records):
        lines += ["", "## Load balance and saved memory", "",
                  "CPU = the CPU seconds of a rank's process per fwd+bwd call (median over repeats; a rank "
                  "waiting for a peer sleeps, so on CPU ranks this is its compute); max/min over ranks, next to the "
                  "exact ratio of the causal (query, key) pairs the ranks' queries see (not for Ulysses, which "
                  "splits heads). Saved = bytes of the storages the forward saves for backward.", "",
                  "| W | T global | strategy | layout | CPU per rank (ms) | CPU max/min | pairs max/min | "
                  "saved MiB/rank |", "|---|---|---|---|---|---|---|---|"]
        for r in records:
            if r["skipped"] or "cpu_max_over_min" not in r:
                continue
            pairs = f"{r['pairs_max_over_min']:.2f}" if "pairs_max_over_min" in r else ""
            lines.append(f"| {r['W']} | {r['T_global']} | {r['strategy']} | {r['config_layout'] or ''} | "
                         f"{', '.join(f'{b * 1e3:.1f}' for b in r['per_rank_cpu_s'])} | "
                         f"{r['cpu_max_over_min']:.2f} | {pairs} | {max(r['saved_bytes_per_rank']) / 2**20:.2f} |")
    return "\n".join(lines) + "\n"


def plots(records: List[dict], out: Path, spec) -> List[Path]:
    """time_vs_T.png (one panel per W) and efficiency_vs_W.png (one panel per length)."""
    plt = matplotlib_pyplot()
    ok = [r for r in records if not r["skipped"]]
    key = "T_global" if spec.seq_is_global else "T_local"
    strategies = list(dict.fromkeys(r["strategy"] for r in ok))
    Ws = sorted({r["W"] for r in ok})
    fig, axes = plt.subplots(1, len(Ws), figsize=(4.5 * len(Ws), 3.6), squeeze=False)
    for ax, W in zip(axes[0], Ws):
        for s in strategies:
            pts = sorted((r[key], r["time_s"]) for r in ok if r["W"] == W and r["strategy"] == s)
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="--" if s == IDEAL else "-", label=s)
        ax.set(xscale="log", yscale="log", title=f"W = {W}", xlabel=key.replace("_", " "), ylabel="fwd+bwd (s)")
        ticks = sorted({r[key] for r in ok if r["W"] == W})
        ax.set_xticks(ticks, [f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in ticks])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.legend(fontsize=8)
    fig.suptitle(f"lasp2 bench --suite {spec.suite}: time vs sequence length")
    fig.tight_layout()
    paths = [out / "time_vs_T.png"]
    fig.savefig(paths[0], dpi=110)
    lengths = sorted({r[key] for r in ok})[-6:]  # the longest six
    cols = min(3, len(lengths))
    rows = -(-len(lengths) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(lengths):]:
        ax.set_visible(False)
    for ax, T in zip(axes.flat, lengths):
        for s in strategies:
            pts = sorted((r["W"], r["efficiency"]) for r in ok if r[key] == T and r["strategy"] == s
                         and "efficiency" in r and s != IDEAL)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        top = max([1.1] + [r["efficiency"] * 1.05 for r in ok if "efficiency" in r])
        ax.set(title=f"{key.replace('_', ' ')} = {T}", xlabel="W", ylabel="efficiency (ideal / time)",
               xticks=Ws, ylim=(0, top))
        ax.legend(fontsize=8)
    fig.suptitle(f"lasp2 bench --suite {spec.suite}: efficiency vs W")
    fig.tight_layout()
    paths.append(out / "efficiency_vs_W.png")
    fig.savefig(paths[1], dpi=110)
    plt.close("all")
    return paths


def write_all(records: List[dict], meta: dict, spec, out: Path, with_plots: bool) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(records, meta, spec))
    written = [out / "results.json", out / "results.md"]
    return written + (plots(records, out, spec) if with_plots else [])
