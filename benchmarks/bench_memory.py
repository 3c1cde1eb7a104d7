"""Per-rank memory of ``lasp2 train`` under DDP and FSDP2, one invocation.

    python benchmarks/bench_memory.py            # debug and linear-llama3-mid, dp x sp = 2x2 and 1x4
    python benchmarks/bench_memory.py --quick    # debug only

Each configuration is one optimizer step of ``lasp2 train`` (self-launched gloo ranks on CPU,
fp32, MQAR, global batch 4 x --seq-len tokens) and reads the step's metrics row: parameter,
gradient and AdamW-state bytes of the largest rank, and the activation peak of that step
(``lasp2/train/memory.py``: exact bytes, not RSS). Bytes are deterministic; no times are
reported. Writes benchmarks/results/memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from lasp2.cli import main as cli_main

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((2, 2), (1, 4))
MODES = ("ddp", "fsdp2")


def measure(preset: str, dp: int, sp: int, mode: str, seq_len: int, tmp: Path) -> dict:
    out = tmp / f"{preset}-{mode}-{dp}x{sp}"
    args = ["train", "--preset", preset, "--dp", str(dp), "--sp", str(sp), "--data-parallel", mode,
            "--steps", "1", "--seq-len", str(seq_len), "--batch-size", "4", "--save-every", "0", "--no-plot",
            "--device", "cpu", "--out", str(out)]
    if cli_main(args) != 0:
        raise SystemExit(f"lasp2 {' '.join(args)} failed: see {out}/failure.txt")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    params = json.loads((out / "config.json").read_text())["parameters"]
    return {"preset": preset, "parameters": params, "dp": dp, "sp": sp, "data_parallel": mode, "seq_len": seq_len,
            **{k: row[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_peak_bytes")}}


def table(rows) -> str:
    mib = 2 ** 20
    lines = ["| preset (parameters) | dp x sp | DP | params + AdamW state / rank | gradients / rank | "
             "activation peak / rank | params + state vs DDP |", "|---|---|---|---|---|---|---|"]
    ddp = {(r["preset"], r["dp"], r["sp"]): r for r in rows if r["data_parallel"] == "ddp"}
    for r in rows:
        held = r["param_bytes"] + r["optimizer_bytes"]
        base = ddp[r["preset"], r["dp"], r["sp"]]
        ratio = held / (base["param_bytes"] + base["optimizer_bytes"])
        lines.append(f"| {r['preset']} ({r['parameters'] / 1e6:.2f} M) | {r['dp']} x {r['sp']} | {r['data_parallel']} | "
                     f"{held / mib:,.2f} MiB | {r['grad_bytes'] / mib:,.2f} MiB | "
                     f"{r['activation_peak_bytes'] / mib:,.2f} MiB | {ratio:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="debug preset only")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for the results (default benchmarks/results)")
    ap.add_argument("--shapes", nargs="+", default=[f"{dp}x{sp}" for dp, sp in SHAPES], metavar="DPxSP",
                    help="mesh shapes (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 2048 for debug, "
                    "1024 for linear-llama3-mid)")
    args = ap.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    presets = [("debug", 2048)] + ([] if args.quick else [("linear-llama3-mid", 1024)])
    presets = [(preset, args.seq_len or seq_len) for preset, seq_len in presets]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lasp2-mem-") as tmp:
        for preset, seq_len in presets:
            for dp, sp in shapes:
                for mode in MODES:
                    rows.append(measure(preset, dp, sp, mode, seq_len, Path(tmp)))
                    print(json.dumps(rows[-1]), file=sys.stderr)
    command = "python " + " ".join(sys.argv)
    md = (f"Per-rank memory of one `lasp2 train` step (fp32, AdamW, MQAR, global batch 4), CPU/gloo, torch "
          f"{torch.__version__}. Command: `{command}`. Bytes are exact (lasp2/train/memory.py).\n\n{table(rows)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "memory_quick" if args.quick else "memory"
    (args.out / f"{name}.json").write_text(json.dumps({"command": command, "torch": torch.__version__,
                                                      "rows": rows}, indent=1))
    (args.out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
