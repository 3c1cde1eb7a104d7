"""``lasp2 bench --suite hf --hf-config A,B,...`` / ``--hf-config all``: several transformers
families in one run, one summary table.

Each family is the hf suite (``suites.HFSuite``) run as it runs alone: its parallelized model and
the unmodified model on the same rank's shard, in the same processes, interleaved repeat by
repeat (the harness), medians. Every family gets fresh rank processes (one spawn per family and
W; under torchrun the same ranks, one family after the other): the harness sets glibc's mmap
threshold for its memory pass after the timed calls, and that must not reach the next family's
timed calls. ``all`` is the shipped tiny config of every family in ``lasp2.hf.families``.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, List, Tuple

from .suites import IDEAL

ALL = "all"


def several(value: str) -> bool:
    """Whether ``--hf-config`` names several configs (a comma-separated list, or ``all``)."""
    return value == ALL or "," in value


def config_names(value: str) -> Tuple[str, ...]:
    """The configs ``--hf-config`` names: ``all`` (every family's shipped tiny config, in the
    families table's order) or comma-separated names; ValueError for an empty or repeated name."""
    if value == ALL:
        from lasp2.hf.families import FAMILIES

        return tuple(f.config for f in FAMILIES)
    names = tuple(x.strip() for x in value.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"--hf-config {value!r}: give distinct config names separated by commas, or 'all'")
    return names


def measure(args, bench_spec, progress: bool) -> Tuple[List[dict], dict]:
    """Every named family through the harness: (records of all families, one spec per name).
    ``bench_spec(args)`` checks the flags of each family's run (its config loads, lengths split)."""
    from lasp2.launch import under_torchrun

    from . import harness, report

    specs = {name: bench_spec(argparse.Namespace(**{**vars(args), "hf_config": name}))
             for name in config_names(args.hf_config)}  # every name checked before anything runs
    records: List[dict] = []
    for name, spec in specs.items():
        if progress:
            print(f"--hf-config {name}", flush=True)
        per_w = harness.run_torchrun(spec, progress) if under_torchrun() else harness.run_spawned(spec, progress)
        if per_w is not None:  # None: a torchrun rank other than 0
            records += report.build_records(spec, per_w, {})
    return records, specs


def summary_rows(records: List[dict]) -> List[dict]:
    """One row per (family config, W, T): the parallelized model's and the unmodified model's time
    (slowest rank's median) and peak memory (max over ranks), and their ratios."""
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for r in records:
        by_key.setdefault((r["hf_config"], r["W"], r["T_global"]), {})[IDEAL if r["baseline"] else "sp"] = r
    rows = []
    for (name, W, T), pair in by_key.items():
        sp, plain = pair.get("sp"), pair.get(IDEAL)
        if not sp or not plain or not sp.get("time_s") or not plain.get("time_s"):
            continue
        rows.append({"hf_config": name, "W": W, "T_global": T, "T_local": sp["T_local"],
                     "time_s": sp["time_s"], "plain_time_s": plain["time_s"],
                     "time_ratio": sp["time_s"] / plain["time_s"],
                     "peak_mem_mb": sp["peak_mem_mb"], "plain_peak_mem_mb": plain["peak_mem_mb"],
                     "mem_ratio": sp["peak_mem_mb"] / max(plain["peak_mem_mb"], 1e-9),
                     "comm_fwd": sp["comm_fwd"], "comm_bwd": sp["comm_bwd"]})
    return rows


def markdown(records: List[dict], meta: dict, spec) -> str:
    """results.md: the summary table, one row per family and point."""
    from .report import _ops

    lines = ["# lasp2 bench --suite hf (several families)", "", f"Command: `{meta['command']}`", "",
             f"torch {meta['torch']}; {meta['hardware']}; {meta['launcher']}; {spec.dtype}, B={spec.batch}, "
             f"layout {spec.layout}. Per family: the parallelized model (`lasp2.hf.parallelize`, "
             f"lasp2 + allgather) against the unmodified model on the same rank's shard (no SP), in the same "
             f"processes, interleaved repeat by repeat; time = the slowest rank's median of {spec.repeats} "
             f"fwd+bwd calls (after {spec.warmup} warm-up + 1 tracked call); peak memory per rank above the "
             f"inputs, max over ranks ({records[0]['mem_method'] if records else ''}). Ratio = parallelized / "
             f"unmodified. Communication per rank and model step.", ""]
    if meta.get("note"):
        lines += [f"**Note:** {meta['note']}", ""]
    lines += ["| config | W | T global | T local | parallelized ms | unmodified ms | time ratio | parallelized MB "
              "| unmodified MB | memory ratio | comm fwd | comm bwd |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(records):
        lines.append(f"| `{r['hf_config']}` | {r['W']} | {r['T_global']} | {r['T_local']} | {r['time_s'] * 1e3:.1f} | "
                     f"{r['plain_time_s'] * 1e3:.1f} | {r['time_ratio']:.2f} | {r['peak_mem_mb']:.1f} | "
                     f"{r['plain_peak_mem_mb']:.1f} | {r['mem_ratio']:.2f} | {_ops(r['comm_fwd'])} | "
                     f"{_ops(r['comm_bwd'])} |")
    return "\n".join(lines) + "\n"


def run_cli(args, bench_spec, usage) -> int:
    """``lasp2 bench --suite hf`` with several configs: measure, then write results.json (every
    record, as a one-family run writes them, each with its ``hf_config``) and results.md (the
    summary; no plots) into ``--out``; print the table. ``usage(e)``: the CLI's usage error."""
    import json

    from lasp2.launch import RankFailure

    from . import report

    progress = not args.quiet
    try:
        config_names(args.hf_config)
    except ValueError as e:
        raise usage(e) from None
    out = args.out or report.default_out("hf")
    try:
        records, specs = measure(args, bench_spec, progress)
    except ValueError as e:
        raise usage(e) from None
    except RankFailure as e:
        return report.rank_failure(out, e)
    if not records:  # a torchrun rank other than 0
        return 0
    meta = report.run_meta(args)
    records = [{**r, **meta} for r in records]
    spec = dataclasses.replace(next(iter(specs.values())), hf_config=args.hf_config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    md = markdown(records, meta, spec)
    (out / "results.md").write_text(md)
    if progress:
        print(md)
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    return 0
