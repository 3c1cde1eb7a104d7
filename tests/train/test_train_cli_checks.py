"""``lasp2 train`` before any rank starts: an --out that holds
an earlier run, an --out that cannot be written, --device cuda without CUDA, tensors on the wrong
device, resuming from the stored configuration, and --help naming the defaults the run uses.

All in-process through ``lasp2.cli.main`` with ``launch.spawn`` replaced by a stub that records
that it was reached: a check that is missing shows up as "spawn reached", never as a training
run. The end-to-end resume without retyped flags is in ``test_train.py`` (its "resumed" run).
"""
from __future__ import annotations

import pytest
import torch

import lasp2
from lasp2 import launch
from lasp2.cli import build_parser
from lasp2.cli import main as cli_main
from lasp2.train import checkpoint, cli
from lasp2.train.config import TrainConfig
from lasp2.train.loop import lr_at


class SpawnReached(Exception):
    pass


@pytest.fixture
def no_spawn(monkeypatch):
    def stub(*args, **kwargs):
        raise SpawnReached()

    monkeypatch.setattr(launch, "spawn", stub)


def _train(argv, capsys):
    """(exit code, stderr) of ``lasp2 train ARGV``, or "spawn reached"."""
    try:
        code = cli_main(["train", *argv])
    except SpawnReached:
        return "spawn reached", capsys.readouterr().err
    return code, capsys.readouterr().err


def test_out_holding_an_earlier_run_needs_overwrite(tmp_path, capsys, no_spawn):
    """A run without checkpoints used to be silently replaced."""
    out = tmp_path / "run"
    out.mkdir()
    earlier = {"metrics.jsonl": '{"step": 1}\n', "config.json": "{}", "loss.png": "png", "notes.txt": "mine"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    code, err = _train(["--out", str(out)], capsys)
    assert code == 2 and "already holds" in err and "--overwrite" in err, err
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier  # nothing touched
    code, err = _train(["--out", str(out), "--overwrite"], capsys)
    assert code == "spawn reached", err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the earlier run's outputs only
    fresh = tmp_path / "fresh"
    assert _train(["--out", str(fresh)], capsys)[0] == "spawn reached" and fresh.is_dir()


def test_unwritable_out_is_refused_before_any_rank_starts(tmp_path, capsys, no_spawn):
    """An existing file, or a place nobody can create a directory."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, err = _train(["--out", str(a_file)], capsys)
    assert code == 2 and "is not a directory" in err, err
    code, err = _train(["--out", "/proc/lasp2-cannot-exist/run"], capsys)
    assert code == 2 and "is not writable" in err, err
    # The failure handler itself must not fail on such an --out: it falls back to stderr.
    where = cli._write_failure(a_file / "sub", "failure.txt", "Traceback: boom\n")
    assert "could not be written" in where and "Traceback: boom" in capsys.readouterr().err


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="needs a torch build without CUDA")
def test_device_cuda_without_cuda_says_so(tmp_path, capsys, no_spawn):
    """This used to end in AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'."""
    code, err = _train(["--device", "cuda", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "CUDA is not available in this torch build" in err and "--device cpu" in err, err


def test_tensors_on_another_device_are_named():
    """Cu_seqlens / initial_state elsewhere than q (a meta tensor stands in for another
    device on a CPU-only machine) get a ValueError naming them, not a copy failure inside."""
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="initial_state is on meta but q is on cpu"):
        lasp2.linear_attention(q, q, q, initial_state=torch.zeros(1, 2, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="cu_seqlens is on meta but q is on cpu"):
        lasp2.linear_attention(q, q, q, cu_seqlens=torch.tensor([0, 3, 8], device="meta"))
    with pytest.raises(ValueError, match="cu_seqlens is on meta"):
        lasp2.softmax_attention(q, q, q, cu_seqlens=torch.tensor([0, 3, 8], device="meta"))


def test_resume_takes_the_stored_configuration(tmp_path, monkeypatch):
    """The checkpoint's configuration is the run's; flags on top may restate resolved
    values (the preset's NLLL / mamba2) or change the resumable ones, nothing else."""
    stored = TrainConfig(steps=100, seq_len=256, lr=1e-3, mqar_queries=64, out=str(tmp_path / "run")).resolve_world(2)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000050"
    monkeypatch.setattr(checkpoint, "find", lambda path: ckpt)
    monkeypatch.setattr(checkpoint, "read_meta", lambda path: {"step": 50, "config": stored.to_dict(),
                                                               "world": {"dp": 1, "sp": 2}})
    parser = build_parser()

    def resumed(*flags):
        return cli.config_from_args(parser.parse_args(["train", "--resume", str(ckpt), *flags]))

    cfg = resumed()
    assert cfg.resolved() == {**stored.resolved(), "resume": str(ckpt)} and cfg.out == str(tmp_path / "run")
    assert cfg.trajectory_diff(stored.to_dict()) == {}
    restated = resumed("--layer-pattern", "NLLL", "--linear", "mamba2", "--seq-len", "256", "--steps", "300")
    assert restated.trajectory_diff(stored.to_dict()) == {} and restated.steps == 300
    assert restated.schedule_steps == 100  # the schedule stays the checkpoint run's ...
    assert lr_at(restated, 200) == pytest.approx(1e-3 * restated.min_lr_ratio)  # ... added steps at its end
    assert [lr_at(restated, s) for s in range(1, 101)] == [lr_at(stored, s) for s in range(1, 101)]
    changed = resumed("--lr", "2e-3", "--layer-pattern", "LLLN")
    assert changed.trajectory_diff(stored.to_dict()) == {"lr": (1e-3, 2e-3), "layer_pattern": ("NLLL", "LLLN")}
    with pytest.raises(ValueError, match=r"different run \(--layer-pattern: checkpoint 'NLLL', now 'LLLN'; "
                                         r"--lr: checkpoint 0.001, now 0.002\); drop those flags"):
        checkpoint.check_compatible({"step": 50, "config": stored.to_dict(), "world": {"dp": 1, "sp": 2}},
                                    changed.resolve_world(2), ckpt)


def test_help_names_the_defaults_the_run_uses(capsys):
    """--help used to name the raw debug preset (LLLN / bla) while the run builds NLLL /
    mamba2. The expected values are derived from the default TrainConfig, not written here."""
    used = TrainConfig().model_config()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    pattern, variant = "".join(used.layer_types), used.linear_variant
    assert f"layer_pattern={pattern}" in text and f"linear_variant={variant}" in text
    assert f"but {pattern} for the debug preset" in text and f"but {variant} for the debug preset" in text
