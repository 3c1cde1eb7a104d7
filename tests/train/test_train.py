"""``lasp2 train``: end-to-end CLI runs, exact resume, the no-state-passing ablation, bad input,
safe checkpoints, and the data (determinism, MQAR layout, sharding, packed text).

Spawns are the expensive part (every rank imports torch), so the four training runs are module
fixtures shared by the tests, started in-process through ``lasp2.cli.main`` (it spawns the ranks
itself: a launcher interpreter per run would only import torch once more), and the error paths
run in-process too (they fail before any rank starts). Two real ``python -m lasp2 train``
subprocesses check what only a subprocess shows: the exit code and a single stderr line, for bad
input and for a failing rank.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lasp2.cli import main as cli_main
from lasp2.parallel.layout import Layout
from lasp2.train import checkpoint
from lasp2.train.config import TrainConfig
from lasp2.train.data import EOS_ID, PAD_ID, MicroBatch, TextData, mqar_batch, read_documents
from lasp2.train.loop import local_runs_view, lr_at
from lasp2.train.packing import IGNORE_INDEX
from tests.dist import run_distributed

ROOT = Path(__file__).resolve().parents[2]
# Tiny: 4 steps of 2 x 128 tokens, SP = 2. A hybrid model (N and L layers) so both kinds of SP op run.
QUICK = ["--steps", "4", "--seq-len", "128", "--batch-size", "2", "--mqar-pairs", "4", "--mqar-queries", "32",
         "--mqar-keys", "8", "--mqar-values", "8", "--layer-pattern", "NL", "--layers", "2", "--warmup", "1",
         "--lr", "3e-3", "--sp", "2"]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lasp2", "train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _train(*args) -> subprocess.CompletedProcess:
    """``lasp2 train`` from this process; its exit code and what the launcher printed (a rank's
    error is in the run's failure.txt, added to stderr here)."""
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli_main(["train", *args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    failure = Path(args[args.index("--out") + 1]) / "failure.txt"
    err = stderr.getvalue() + (failure.read_text() if failure.is_file() else "")
    return subprocess.CompletedProcess(["lasp2", "train", *args], code, stdout.getvalue(), err)


def _rows(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four CLI runs: a full one, a resume from its step-2 checkpoint, the ablation, packed text."""
    base = tmp_path_factory.mktemp("train")
    full, resumed, ablated = base / "full", base / "resumed", base / "ablated"
    procs = {"full": _train(*QUICK, "--save-every", "2", "--out", str(full))}
    # No flags retyped: the configuration comes from the checkpoint; restating a resolved default
    # (the debug preset trains mamba2 layers) is no change.
    procs["resumed"] = _train("--out", str(resumed), "--resume", str(full / "checkpoints" / "step-000002"),
                              "--linear", "mamba2")
    procs["ablated"] = _train(*QUICK, "--save-every", "0", "--no-plot", "--no-state-passing", "--out", str(ablated))
    text = base / "text.txt"
    text.write_text("\n\n".join(f"Document {i}: " + "the quick brown fox " * (i % 5 + 1) for i in range(40)))
    procs["text"] = _train("--task", "text", "--data", str(text), "--seq-len", "256", "--batch-size", "2",
                           "--steps", "2", "--layout", "zigzag", "--layer-pattern", "NL", "--layers", "2",
                           "--save-every", "0", "--no-plot", "--out", str(base / "text"))
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} run failed:\n{p.stderr[-3000:]}"
    return {"full": full, "resumed": resumed, "ablated": ablated, "text": base / "text", "procs": procs}


def test_cli_end_to_end_writes_outputs(runs):
    out, proc = runs["full"], runs["procs"]["full"]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in ("loss", "accuracy", "tokens_per_s", "peak_mem_mb", "lr", "grad_norm"):
            assert isinstance(r[key], float) and r[key] == r[key], key
        assert r["tokens"] == 2 * 128 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 10
        assert 0.0 <= r["accuracy"] <= 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["sp"] == 2 and cfg["config"]["dp"] == 1 and cfg["world"]["ranks"] == 2
    assert cfg["model"]["layer_pattern"] == "NL" and cfg["model"]["layers"] == 2
    assert TrainConfig.from_dict(cfg["config"]).seq_len == 128  # config.json rebuilds the config
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for step in (2, 4):
        meta = checkpoint.read_meta(out / "checkpoints" / f"step-{step:06d}")
        assert meta["step"] == step and meta["world"] == {"dp": 1, "sp": 2}
    summary = proc.stdout.strip().splitlines()[-1]
    assert "final loss" in summary and "tokens/s" in summary and str(out) in summary


def test_resume_gives_identical_losses(runs):
    full, resumed = _rows(runs["full"]), _rows(runs["resumed"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # rows 1-2 carried over from the checkpoint's run
    assert [(r["loss"], r["accuracy"], r["grad_norm"]) for r in resumed[2:]] == \
        [(r["loss"], r["accuracy"], r["grad_norm"]) for r in full[2:]]
    a = checkpoint.load_file(runs["full"] / "checkpoints" / "step-000004", "model.pt")
    b = checkpoint.load_file(runs["resumed"] / "checkpoints" / "step-000004", "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_state_passing_changes_results(runs):
    full, ablated = _rows(runs["full"]), _rows(runs["ablated"])
    assert len(ablated) == 4 and not (runs["ablated"] / "checkpoints").exists()
    # Same weights at step 1, but the queries on rank 1 no longer see rank 0's tokens.
    assert all(a["loss"] != f["loss"] for a, f in zip(ablated, full))
    assert "NO state passing" in runs["procs"]["ablated"].stdout


def test_text_run_packs_documents(runs):
    rows = _rows(runs["text"])
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 10 for r in rows)
    cfg = json.loads((runs["text"] / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 258  # 256 bytes + pad + end-of-document
    assert "text from" in runs["procs"]["text"].stdout


# ---- bad input: one line on stderr, exit code != 0 -----------------------------------------------


def test_bad_input_subprocess_one_line():
    p = _cli("--sp", "3", "--seq-len", "100", timeout=600)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lasp2 train: error: --seq-len 100") and "Traceback" not in p.stderr


@pytest.mark.parametrize("argv, message", [
    (["--layer-pattern", "LXN"], "unknown letter"),
    (["--heads", "4", "--kv-heads", "3"], "kv_heads"),
    (["--sp", "4", "--layout", "zigzag", "--seq-len", "1028"], "2 x sp = 8"),
    (["--dp", "2", "--batch-size", "3"], "--batch-size 3"),
    (["--task", "text"], "--data"),
    (["--task", "text", "--data", "/nonexistent/file.txt"], "not a readable file"),
    (["--mqar-queries", "2045"], "MQAR"),
    (["--mqar-keys", "300"], "vocabulary"),
    (["--lr", "-1"], "--lr"),
    (["--steps", "0"], "--steps"),
    (["--linear", "mamba3"], "invalid choice"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
])
def test_bad_input_in_process(argv, message, capsys, tmp_path):
    try:
        code = cli_main(["train", *argv, "--out", str(tmp_path / "x")])
    except SystemExit as e:  # argparse's own errors (also one line, see lasp2.cli.Parser)
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_resume_refuses_corrupt_and_mismatched_checkpoints(runs, capsys, tmp_path):
    import shutil

    src = runs["full"] / "checkpoints" / "step-000002"

    def resume_error(*extra, ckpt=src):
        code = cli_main(["train", *QUICK, "--out", str(tmp_path / "o"), "--resume", str(ckpt), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        return err[0]

    assert "--lr: checkpoint 0.003, now 0.01" in resume_error("--lr", "1e-2")
    assert "dp=1 x sp=2" in resume_error("--sp", "1")
    bad = tmp_path / "corrupt"
    shutil.copytree(src, bad)
    data = bytearray((bad / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.pt").write_bytes(bytes(data))
    assert "model.pt is corrupt" in resume_error(ckpt=bad)
    (bad / "meta.json").write_text("{not json")
    assert "meta.json is unreadable" in resume_error(ckpt=bad)
    # A fresh run must not silently mix with another run's checkpoints.
    code = cli_main(["train", *QUICK, "--out", str(runs["full"])])
    assert code == 2 and "already holds checkpoints" in capsys.readouterr().err


def test_code_in_a_checkpoint_is_never_run_and_the_failing_ranks_stop(runs, tmp_path):
    """A model.pt that smuggles a callable (with meta.json's sha256 updated to match, as an
    attacker would): every rank refuses it with weights_only, the run stops with one error line."""
    import hashlib
    import shutil

    flag = tmp_path / "executed"
    bad = tmp_path / "step-000002"
    shutil.copytree(runs["full"] / "checkpoints" / "step-000002", bad)
    with open(bad / "model.pt", "wb") as f:
        pickle.dump({"w": _Evil(flag)}, f, protocol=2)
    meta = json.loads((bad / "meta.json").read_text())
    meta["sha256"]["model.pt"] = hashlib.sha256((bad / "model.pt").read_bytes()).hexdigest()
    (bad / "meta.json").write_text(json.dumps(meta))
    p = _cli(*QUICK, "--out", str(tmp_path / "o"), "--resume", str(bad))
    assert p.returncode == 1 and not flag.exists()
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "failed: ValueError" in err[0] and "model.pt cannot be loaded safely" in err[0]
    assert "Traceback" in (tmp_path / "o" / "failure.txt").read_text()  # the details are kept


class _Evil:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def test_checkpoint_loading_is_weights_only(tmp_path):
    flag = tmp_path / "executed"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with open(ckpt / "model.pt", "wb") as f:
        pickle.dump({"w": _Evil(flag)}, f, protocol=2)
    with pytest.raises(ValueError, match="model.pt cannot be loaded safely"):
        checkpoint.load_file(ckpt, "model.pt")
    assert not flag.exists()
    torch.save({"w": torch.ones(2)}, ckpt / "ok.pt")
    assert torch.equal(checkpoint.load_file(ckpt, "ok.pt")["w"], torch.ones(2))


# ---- data ----------------------------------------------------------------------------------------


def test_mqar_is_deterministic_and_laid_out_for_cross_rank_recall():
    kw = dict(pairs=4, keys=16, values=16, seed=3)
    t1, l1, s1 = mqar_batch(4, 256, step=5, **kw)
    t2, l2, s2 = mqar_batch(4, 256, step=5, **kw)
    assert torch.equal(t1, t2) and torch.equal(l1, l2) and torch.equal(s1, s2)
    assert not torch.equal(t1, mqar_batch(4, 256, step=6, **kw)[0])
    assert not torch.equal(t1, mqar_batch(4, 256, step=5, **{**kw, "seed": 4})[0])
    C = 128  # default: the second half of the sequence is queries, scored for accuracy
    assert s1[:, C:].all() and not s1[:, :C].any() and (l1[:, C:] != IGNORE_INDEX).all()
    for b in range(4):
        keys, values = t1[b, 0:8:2], t1[b, 1:8:2]  # the first block shows each pair once
        assert len(set(keys.tolist())) == 4 and 1 <= keys.min() and keys.max() <= 16
        assert 17 <= values.min() and values.max() <= 32
        answer = dict(zip(keys.tolist(), values.tolist()))
        ctx_keys, ctx_values = t1[b, 0:C:2].tolist(), t1[b, 1:C:2].tolist()
        assert [answer[k] for k in ctx_keys] == ctx_values  # the context only repeats the pairs
        assert (l1[b, 1:C:2] == IGNORE_INDEX).all() and (l1[b, 0:8] == IGNORE_INDEX).all()
        assert l1[b, 8:C:2].tolist() == ctx_values[4:]  # later context keys: recall of an earlier pair
        assert [answer[k] for k in t1[b, C:].tolist()] == l1[b, C:].tolist()  # queries: their key's value
        assert not set(values.tolist()) & set(t1[b, C:].tolist())  # answers never shown near the queries
    _, l3, _ = mqar_batch(1, 256, step=5, context_labels=False, queries=16, **kw)
    assert (l3[:, :240] == IGNORE_INDEX).all() and (l3[:, 240:] != IGNORE_INDEX).all()


def test_text_documents_and_packing(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"first doc\nline two\n\n\nsecond\n \nthird one\n")
    docs = read_documents(str(path))
    assert docs == [list(b"first doc\nline two") + [EOS_ID], list(b"second") + [EOS_ID], list(b"third one") + [EOS_ID]]
    assert len(read_documents(str(path), "line")) == 4 and len(read_documents(str(path), "none")) == 1
    data = TextData(str(path), 16, multiple_of=4, seed=0)
    assert all(s.tokens.numel() == 16 for s in data.sequences)
    assert data.n_tokens == sum(len(d) for d in docs)
    last = data.sequences[-1]
    assert last.n_padding > 0 and (last.tokens[-last.n_padding:] == PAD_ID).all()
    assert (last.labels[-last.n_padding:] == IGNORE_INDEX).all()
    n = len(data)  # every epoch visits every sequence once, in a seed-determined order
    for epoch in range(2):
        seen = sorted(id(data.sequence(epoch * n + i)) for i in range(n))
        assert seen == sorted(id(s) for s in data.sequences)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(cfg, 1) == pytest.approx(1e-4) and lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 100) == pytest.approx(1e-4) and lr_at(cfg, 55) == pytest.approx(5.5e-4)


def test_ablation_view_makes_every_run_independent():
    cfg = TrainConfig(sp=2, layout="zigzag", seq_len=16, mqar_pairs=1, mqar_queries=2)
    tokens = torch.arange(8).view(1, 8)
    view, cu = local_runs_view(MicroBatch(tokens, tokens), cfg, sp_rank=1)
    assert cu is None and view.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # zigzag: two rows
    # Packed documents: global [0, 6, 13, 16] over 4 segments of 4 (zigzag, W = 2).
    cu_global = torch.tensor([0, 6, 13, 16])
    _, cu0 = local_runs_view(MicroBatch(tokens, tokens, cu_global), cfg, sp_rank=0)  # segments 0 and 3
    assert cu0.tolist() == [0, 4, 5, 8]   # segment 3 = global 12..15: a document starts at 13
    _, cu1 = local_runs_view(MicroBatch(tokens, tokens, cu_global), cfg, sp_rank=1)  # segments 1 and 2
    assert cu1.tolist() == [0, 2, 4, 8]   # global 6 is local 2; segment 2 starts a run at local 4
    contiguous = TrainConfig(sp=2, seq_len=16, mqar_pairs=1, mqar_queries=2)
    view, cu = local_runs_view(MicroBatch(tokens, tokens, cu_global), contiguous, sp_rank=0)
    assert cu.tolist() == [0, 6, 8] and view is tokens


def _shards(group, text_path):
    """Each rank's MQAR and text micro-batches for step 3, both layouts (W = 2, dp = 1)."""
    from lasp2.train.data import RankData

    out = {}
    for layout in ("contiguous", "zigzag"):
        mq = TrainConfig(sp=2, dp=1, seq_len=64, batch_size=3, layout=layout, mqar_pairs=4, mqar_queries=16, seed=1)
        tx = TrainConfig(sp=2, dp=1, seq_len=32, batch_size=2, layout=layout, task="text", data=text_path, seed=1)
        out[layout] = [[(mb.tokens, mb.labels, mb.cu_seqlens) for mb in RankData(c, dp_rank=0, sp_group=group).batch(3)]
                       for c in (mq, tx)]
    return out


def test_rank_data_shards_the_global_batch(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"document number {i} " + "x" * (7 * i) for i in range(12)))
    per_rank = run_distributed(_shards, 2, str(path))
    for layout in ("contiguous", "zigzag"):
        index = Layout(layout, 2, 32).global_index()  # rank-major slot -> global position
        mq_tokens, mq_labels, _ = mqar_batch(3, 64, pairs=4, queries=16, keys=16, values=16, seed=1, step=3)
        (t, l, cu), = per_rank[0][layout][0]
        (t1, l1, _), = per_rank[1][layout][0]
        assert cu is None and t.shape == (3, 32)
        joined = torch.empty_like(mq_tokens)
        joined[:, index] = torch.cat([t, t1], dim=1)
        assert torch.equal(joined, mq_tokens)
        joined[:, index] = torch.cat([l, l1], dim=1)
        assert torch.equal(joined, mq_labels)
        text = TextData(str(path), 32, multiple_of=4 if layout == "zigzag" else 2, seed=1)
        index = Layout(layout, 2, 16).global_index()
        for i, (a, b) in enumerate(zip(per_rank[0][layout][1], per_rank[1][layout][1])):
            seq = text.sequence(2 * 2 + i)  # step 3, batch 2: sequences 4 and 5
            joined = torch.empty(1, 32, dtype=torch.long)
            joined[:, index] = torch.cat([a[0], b[0]], dim=1)
            assert torch.equal(joined[0], seq.tokens) and torch.equal(a[2], seq.cu_seqlens)
