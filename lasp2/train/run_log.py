"""What a training run writes on rank 0: ``OUT/config.json``, one ``OUT/metrics.jsonl`` row per
step, the progress bar, the summary ``train`` returns and the ``OUT/loss.png`` plot."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import checkpoint
from .config import TrainConfig

# Per-rank bytes in every metrics row (the largest rank's): the state a rank holds, then the
# activation peak of the run's first step (lasp2/train/memory.py).
MEMORY_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_peak_bytes")


class _Bar:
    """tqdm on rank 0 (nothing elsewhere)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            import threading

            from tqdm import tqdm

            # tqdm's default lock is a multiprocessing semaphore, which leaks (and makes the
            # resource tracker warn on stderr) when a failing run stops this rank.
            tqdm.set_lock(threading.RLock())
            self.bar = tqdm(total=total, initial=initial, desc="lasp2 train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, postfix: Optional[Dict[str, str]]):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def write_config(cfg: TrainConfig, out: Path, model: torch.nn.Module, world: int, backend: str, start_step: int,
                 placement: Dict[str, Any]):
    """OUT/config.json: the run's configuration, model, world and placement (enough to rebuild the
    config: ``TrainConfig.from_dict(record["config"])``)."""
    record = {"config": cfg.to_dict(), "model": model.config.to_dict(), "parameters": model.num_params(),
              "world": {"dp": cfg.dp, "sp": cfg.sp, "ranks": world, "backend": backend, **placement},
              "torch": torch.__version__, "resumed_from_step": start_step or None}
    (out / "config.json").write_text(json.dumps(record, indent=1))


def _metrics_file(out: Path, cfg: TrainConfig, start_step: int):
    """Open OUT/metrics.jsonl for appending; on resume keep the resumed run's rows up to start_step."""
    path = out / "metrics.jsonl"
    rows = []
    if start_step:
        source = checkpoint.find(cfg.resume).parents[1] / "metrics.jsonl"  # OUT/checkpoints/step-N
        if source.is_file():
            for line in source.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= start_step:
                        rows.append(line)
    path.write_text("".join(r + "\n" for r in rows))
    return open(path, "a")


class RunLog:
    """Rank 0's record of the run (every other rank holds a silent one): ``open`` writes
    config.json and starts metrics.jsonl and the bar, ``step(row)`` records a step, ``close``
    flushes, ``summary`` is what ``train`` returns."""

    def __init__(self, cfg: TrainConfig, rank: int, start_step: int):
        self.cfg, self.rank, self.start_step = cfg, rank, start_step
        self.out = Path(cfg.out)
        self.metrics = None
        self.bar = None
        self.history: List[Dict[str, Any]] = []

    def open(self, model: torch.nn.Module, world: int, backend: str, placement: Dict[str, Any]) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_config(self.cfg, self.out, model, world, backend, self.start_step, placement)
            self.metrics = _metrics_file(self.out, self.cfg, self.start_step)

    def start_bar(self) -> None:
        self.bar = _Bar(self.rank == 0, self.cfg.steps, self.start_step)

    def step(self, row: Dict[str, Any]) -> None:
        """Append ``row`` to metrics.jsonl and the history; show it every ``log_every`` steps."""
        if self.rank != 0:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.history.append(row)
        show = row["step"] % self.cfg.log_every == 0 or row["step"] == self.cfg.steps
        self.bar.update({"loss": f"{row['loss']:.3f}", "acc": f"{row['accuracy']:.3f}",
                         "tok/s": f"{row['tokens_per_s']:.0f}"} if show else None)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()

    def summary(self, *, wall_s: float, train_s: float, last_checkpoint, world: int) -> Dict[str, Any]:
        """The run in one dict: where it wrote, the last row's loss and accuracy, the mean accuracy
        of the last 10 steps, throughput over the steps run, memory, and the plot."""
        cfg, history = self.cfg, self.history
        tokens_per_step = cfg.batch_size * cfg.seq_len
        summary = {"out": str(self.out), "steps": cfg.steps, "start_step": self.start_step, "wall_s": wall_s,
                   "train_s": train_s, "checkpoint": str(last_checkpoint) if last_checkpoint else None,
                   "task": cfg.task, "world": world}
        if history:
            tail = history[-min(10, len(history)):]
            summary.update(final_loss=history[-1]["loss"], final_accuracy=history[-1]["accuracy"],
                           accuracy_last10=sum(r["accuracy"] for r in tail) / len(tail),
                           tokens_per_s=tokens_per_step * len(history) / train_s,
                           peak_mem_mb=max(r["peak_mem_mb"] for r in history),
                           **{key: history[0][key] for key in MEMORY_KEYS})
        if cfg.plot:
            summary["plot"] = plot_metrics(self.out)
        return summary


def plot_metrics(out: Path) -> str:
    """OUT/loss.png (loss, and accuracy on a second panel) from metrics.jsonl; returns its path or
    a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped (matplotlib is not installed: pip install matplotlib)"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, [r["loss"] for r in rows])
    axes[0].set(xlabel="step", ylabel="loss (global token mean)", title="loss")
    axes[1].plot(steps, [r["accuracy"] for r in rows], color="tab:green")
    axes[1].set(xlabel="step", ylabel="accuracy", title="accuracy (MQAR: the queries; text: next token)", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
