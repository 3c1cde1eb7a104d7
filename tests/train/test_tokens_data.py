"""Your own data. ``lasp2 prepare`` writes a token file (byte-level or with a
local tokenizer.json), ``--task tokens`` memory-maps it and every rank reads only its own rows
and positions; too little data is a clear error (token files and ``--task text``).

Single-process: the rank-local reads are checked per (rank, layout) against an independent
definition of the layouts. The end-to-end CLI run (prepare, then train on 2 ranks) is slow.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lasp2.cli import main as cli_main
from lasp2.train.config import TrainConfig
from lasp2.train.data import EOS_ID, TextData
from lasp2.train.tokens import TokenData, inspect

ROOT = Path(__file__).resolve().parents[2]
TEXT = "the cat sat\non the mat\n\nthe dog ran\n\n\nfar away"


def _text(tmp_path) -> Path:
    p = tmp_path / "book.txt"
    p.write_text(TEXT)
    return p


def test_prepare_bytes(tmp_path, capsys):
    out = tmp_path / "book.bin"
    assert cli_main(["prepare", str(_text(tmp_path)), "--out", str(out)]) == 0
    assert "lasp2 train --task tokens --data" in capsys.readouterr().out
    docs = ["the cat sat\non the mat", "the dog ran", "far away"]
    want = [t for d in docs for t in list(d.encode()) + [EOS_ID]]
    assert np.fromfile(out, dtype=np.uint16).tolist() == want
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert (meta["dtype"], meta["n_tokens"], meta["vocab_size"], meta["eos_id"]) == ("uint16", len(want), 258, EOS_ID)
    cfg = TrainConfig(task="tokens", data=str(out), seq_len=16)
    assert cfg.model_config().vocab_size == 258  # from the sidecar


def test_prepare_with_a_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(TEXT.split()))
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "book.npy"
    assert cli_main(["prepare", str(_text(tmp_path)), "--tokenizer", str(tmp_path / "tokenizer.json"),
                     "--out", str(out), "--doc-sep", "none"]) == 0
    want = [vocab[w] for w in TEXT.split()] + [vocab["</s>"]]
    assert np.load(out).tolist() == want
    info = inspect(str(out))
    assert (info.dtype, info.n_tokens, info.vocab_size, info.eos_id) == ("uint16", len(want), len(vocab), 1)


def _owned(layout: str, rank: int, W: int, T: int):
    """Global positions rank ``rank`` holds, by the layouts' definition (README / DESIGN §1)."""
    if layout == "contiguous":
        return list(range(rank * T // W, (rank + 1) * T // W))
    seg = T // (2 * W)
    return list(range(rank * seg, (rank + 1) * seg)) + list(range((2 * W - 1 - rank) * seg, (2 * W - rank) * seg))


class Recording:
    """A token array that records which ranges are read."""

    def __init__(self, data):
        self.data, self.reads = data, []

    def __getitem__(self, sl):
        self.reads.append((sl.start, sl.stop))
        return self.data[sl]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_each_rank_reads_only_its_own_slice(tmp_path, layout):
    data = np.arange(1000, dtype=np.uint32) % 500
    path = tmp_path / "t.npy"
    np.save(path, data)
    W, T, B = 2, 32, 4
    windows = {}
    for rank in range(W):
        rec = Recording(data)
        td = TokenData(str(path), T, vocab_size=500, seed=3, layout=layout, sp=W, sp_rank=rank, tokens=rec)
        starts = td.offsets(step=7, batch_size=B).tolist()
        tokens, labels = td.rows(7, B, range(1, 3))  # data-parallel rows 1 and 2 of the global batch
        for i, b in enumerate((1, 2)):
            pos = _owned(layout, rank, W, T)
            assert tokens[i].tolist() == [int(data[starts[b] + p]) for p in pos]
            assert labels[i].tolist() == [int(data[starts[b] + p + 1]) for p in pos]
            windows.setdefault(b, {}).update({p: int(data[starts[b] + p]) for p in pos})
        read = sum(stop - start for start, stop in rec.reads)
        assert read == 2 * (T // W + (1 if layout == "contiguous" else 2))  # its positions + one label each segment
        assert min(s for s, _ in rec.reads) >= min(starts[1], starts[2])
    for b, got in windows.items():  # the ranks together hold every position of the window once
        assert sorted(got) == list(range(T))


def test_too_little_data_is_a_clear_error(tmp_path):
    np.save(tmp_path / "few.npy", np.arange(16, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"holds 16 tokens, fewer than one sequence needs \(--seq-len 16 \+ 1"):
        TrainConfig(task="tokens", data=str(tmp_path / "few.npy"), seq_len=16, model={"vocab_size": 64})
    TrainConfig(task="tokens", data=str(tmp_path / "few.npy"), seq_len=14, model={"vocab_size": 64})
    with pytest.raises(ValueError, match="no sidecar.*--vocab-size"):
        TrainConfig(task="tokens", data=str(tmp_path / "few.npy"), seq_len=8)
    td = TokenData(str(tmp_path / "few.npy"), 8, vocab_size=10, seed=0, layout="contiguous", sp=1, sp_rank=0)
    with pytest.raises(ValueError, match="token id 1[0-5] but the model's vocabulary has 10 ids"):
        for step in range(1, 20):
            td.rows(step, 4, range(4))
    short = _text(tmp_path)  # 41 bytes + 3 end-of-document marks = 44 tokens: less than 64
    cfg = TrainConfig(task="text", data=str(short), seq_len=64)
    with pytest.raises(ValueError, match="holds 44 byte tokens.*less than one --seq-len 64 sequence"):
        cfg.check_data()
    with pytest.raises(ValueError, match="holds 44 byte tokens"):
        TextData(str(short), 64, multiple_of=2)


@pytest.mark.slow
def test_prepare_then_train_on_two_ranks(tmp_path):
    """End to end through the CLI: prepare a text, train 3 steps with SP = 2 on its tokens."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}: " + "the quick brown fox jumps " * (i % 7 + 1) for i in range(200)))
    env = {"PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "lasp2", *a], cwd=ROOT, capture_output=True, text=True,
                                    timeout=300, env={**__import__("os").environ, **env})
    p = run("prepare", str(text), "--out", str(tmp_path / "corpus.bin"))
    assert p.returncode == 0, p.stderr
    p = run("train", "--task", "tokens", "--data", str(tmp_path / "corpus.bin"), "--seq-len", "256",
            "--batch-size", "2", "--steps", "3", "--layers", "2", "--layer-pattern", "NL", "--save-every", "0",
            "--no-plot", "--out", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
