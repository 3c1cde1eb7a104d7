"""``lasp2 bench --suite memory``: per-rank memory of ``lasp2 train`` under DDP and FSDP2.

Each configuration is one optimizer step of ``lasp2 train`` (self-launched gloo ranks on CPU,
fp32, MQAR, global batch 4 sequences of T tokens), run through the CLI as a user would, and
reads that step's metrics row: parameter, gradient and AdamW-state bytes of the largest rank and
the step's activation peak (exact bytes counted by ``lasp2 train``, not RSS). The baseline is DDP
at the same preset, mesh and T, in the same run; bytes are deterministic, so no times.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import List, Tuple

MODES = ("ddp", "fsdp2")
FIELDS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_peak_bytes")
DEFAULT = dict(presets=("debug", "linear-llama3-mid"), shapes=("2x2", "1x4"), seq_lens=None)
PRESET_LEN = {"debug": 2048}  # tokens per sequence when --seq-lens is not given (others: 1024)
QUICK = dict(presets=("debug",), shapes=("1x2",), seq_lens=(256,))


def parse_shape(text: str) -> Tuple[int, int]:
    """'DPxSP' -> (dp, sp)."""
    try:
        dp, sp = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes {text}: write DPxSP, e.g. 2x2") from None
    if dp < 1 or sp < 1:
        raise ValueError(f"--shapes {text}: both sizes must be >= 1")
    return dp, sp


def _one(preset: str, dp: int, sp: int, mode: str, T: int, tmp: Path) -> dict:
    from lasp2.cli import main as cli_main

    out = tmp / f"{preset}-{mode}-{dp}x{sp}-{T}"
    argv = ["train", "--preset", preset, "--dp", str(dp), "--sp", str(sp), "--data-parallel", mode, "--steps", "1",
            "--seq-len", str(T), "--batch-size", "4", "--save-every", "0", "--no-plot", "--device", "cpu",
            "--out", str(out)]
    if cli_main(argv) != 0:
        raise RuntimeError(f"lasp2 {' '.join(argv)} failed: {(out / 'failure.txt').read_text()[-2000:]}")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    params = json.loads((out / "config.json").read_text())["parameters"]
    return {"suite": "memory", "preset": preset, "parameters": params, "dp": dp, "sp": sp, "data_parallel": mode,
            "T": T, "baseline": mode == "ddp", "train_command": "lasp2 " + " ".join(argv[:-2]),
            **{k: row[k] for k in FIELDS}}


def run(presets, shapes, seq_lens, progress: bool = True) -> List[dict]:
    """One record per (preset, mesh, T, ddp | fsdp2), with ratios against DDP; ``seq_lens`` None:
    one length per preset (``PRESET_LEN``)."""
    records = []
    with tempfile.TemporaryDirectory(prefix="lasp2-bench-memory-") as tmp:
        for preset in presets:
            for dp, sp in shapes:
                for T in seq_lens or (PRESET_LEN.get(preset, 1024),):
                    pair = [_one(preset, dp, sp, mode, T, Path(tmp)) for mode in MODES]
                    held = [r["param_bytes"] + r["optimizer_bytes"] for r in pair]
                    for r, h in zip(pair, held):
                        r["params_and_state_vs_ddp"] = h / held[0]
                        r["grads_vs_ddp"] = r["grad_bytes"] / pair[0]["grad_bytes"]
                    records += pair
                    if progress:
                        print(f"{preset} {dp}x{sp} T={T}: fsdp2 holds {pair[1]['params_and_state_vs_ddp']:.3f} of "
                              "DDP's params + state per rank", flush=True)
    return records


def markdown(records: List[dict], meta: dict) -> str:
    mib = 2 ** 20
    lines = ["# lasp2 bench --suite memory", "", f"Command: `{meta['command']}`", "",
             f"torch {meta['torch']}; {meta['hardware']}; one `lasp2 train` step per row (fp32, AdamW, MQAR, "
             "global batch 4, CPU/gloo), bytes of the largest rank, exact (counted by lasp2 train); DDP is the "
             "baseline at the same preset, mesh and T.", ""]
    if meta.get("note"):
        lines += [f"**Note:** {meta['note']}", ""]
    lines += ["| preset (parameters) | dp x sp | T | DP | params + AdamW state / rank | gradients / rank | "
              "activation peak / rank | params + state vs DDP |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['preset']} ({r['parameters'] / 1e6:.2f} M) | {r['dp']} x {r['sp']} | {r['T']} | "
                     f"{r['data_parallel']} | {(r['param_bytes'] + r['optimizer_bytes']) / mib:,.2f} MiB | "
                     f"{r['grad_bytes'] / mib:,.2f} MiB | {r['activation_peak_bytes'] / mib:,.2f} MiB | "
                     f"{r['params_and_state_vs_ddp']:.3f} |")
    return "\n".join(lines) + "\n"
