"""Scale-out: ``lasp2 train --data-parallel fsdp2`` (FSDP2 x SP), sharded DCP checkpoints that
resume and reshard, the memory report, and a multi-node launch tested on one host (two torchrun
agents as two "nodes").

Every run here is fp64 (``--dtype float64``): runs at different (dp, sp) shapes and under DDP or
FSDP2 differ only in the order of their floating-point reductions, which fp64 keeps at ~1e-15
relative per step; AdamW's first steps (~lr * sign(grad)) amplify that by at most a few orders over
4 steps, so 1e-9 is far above rounding and far below any algorithmic error (a wrong shard, a lost
state, a loss scaled by the SP degree all change the loss in the 1e-3..1 range).

The default run keeps a short form of each feature; the full matrix (SP = 4 across two nodes,
DP x SP = 2 x 2, the 2x2 -> 1x4 reshard, errors under torchrun) is marked slow.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from lasp2.cli import main as cli_main
from lasp2.train import checkpoint
from tests.dist import parent_store

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-9
# 4 steps of 2 x 128 tokens, 2 blocks (one softmax, one linear layer), fp64.
QUICK = ["--steps", "4", "--seq-len", "128", "--batch-size", "2", "--mqar-pairs", "4", "--mqar-queries", "32",
         "--mqar-keys", "8", "--mqar-values", "8", "--layer-pattern", "NL", "--layers", "2", "--warmup", "1",
         "--lr", "3e-3", "--dtype", "float64", "--no-plot", "--device", "cpu"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def _train(*args) -> None:
    """``lasp2 train`` from this process (it spawns the ranks; no second interpreter to start)."""
    code = cli_main(["train", *QUICK, *args])
    out = Path(args[args.index("--out") + 1])
    failure = out / "failure.txt"
    assert code == 0, f"lasp2 train {' '.join(args)} exited {code}:\n" + \
        (failure.read_text()[-3000:] if failure.is_file() else "(no failure.txt)")


def _two_nodes(nproc: int, *args, timeout=600) -> List[subprocess.CompletedProcess]:
    """``lasp2 train`` under two torchrun agents on this host, one per "node" (c10d rendezvous on a
    free port). torchrun ignores --node-rank with c10d (ranks come from the rendezvous) but each
    agent still gets a contiguous block of ``nproc`` global ranks. The rendezvous store is this
    process's (``parent_store``): both agents join it as clients, no free-port race."""
    with parent_store() as store:
        return _agents(nproc, store.port, args, timeout)


def _agents(nproc: int, port: int, args, timeout) -> List[subprocess.CompletedProcess]:
    run_id = f"lasp2-test-{os.getpid()}-{port}"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-conf", "is_host=false", "--rdzv-id", run_id, "--max-restarts", "0", "-m", "lasp2", "train", *QUICK, *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # never leave an agent (or its workers) behind
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _ok(procs, what):
    for p in procs:
        assert p.returncode == 0, f"{what} failed:\n{p.stderr[-3000:]}"


def _rows(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_losses(a: Path, b: Path, steps=None):
    ra, rb = {r["step"]: r for r in _rows(a)}, {r["step"]: r for r in _rows(b)}
    steps = steps or sorted(ra)
    assert steps and all(s in ra and s in rb for s in steps), (sorted(ra), sorted(rb))
    for s in steps:
        assert abs(ra[s]["loss"] - rb[s]["loss"]) <= TOL * abs(rb[s]["loss"]), (s, ra[s]["loss"], rb[s]["loss"])
        assert abs(ra[s]["grad_norm"] - rb[s]["grad_norm"]) <= TOL * rb[s]["grad_norm"], s


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (the reference); FSDP2 at SP = 2 launched as two torchrun agents on this host
    (two "nodes", one rank each: the SP group spans both) with a checkpoint at step 2; and that
    checkpoint resumed resharded at DP = 2 x SP = 1."""
    base = tmp_path_factory.mktemp("scale")
    out = {name: base / name for name in ("one", "fsdp", "reshard")}
    _train("--sp", "1", "--save-every", "4", "--out", str(out["one"]))
    procs = _two_nodes(1, "--sp", "2", "--data-parallel", "fsdp2", "--save-every", "2", "--out", str(out["fsdp"]))
    _ok(procs, "2-node fsdp2 run")
    out["fsdp_stdout"] = "".join(p.stdout for p in procs)
    _train("--sp", "1", "--dp", "2", "--data-parallel", "fsdp2", "--save-every", "2", "--out", str(out["reshard"]),
           "--resume", str(out["fsdp"] / "checkpoints" / "step-000002"))
    return out


def test_fsdp2_sp_matches_one_process_and_shards_the_state(runs):
    _same_losses(runs["fsdp"], runs["one"])
    one, fsdp = _rows(runs["one"])[-1], _rows(runs["fsdp"])[-1]
    # Parameters, gradients and AdamW state: 1/(dp * sp) per rank, up to FSDP2's dim-0 padding of
    # each tensor to a multiple of the world size (here at most one row per tensor).
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        assert one[key] / 2 <= fsdp[key] <= one[key] / 2 * 1.05, (key, one[key], fsdp[key])
    assert one["param_bytes"] == 8 * json.loads((runs["one"] / "config.json").read_text())["parameters"]
    assert one["activation_peak_bytes"] > one["param_bytes"] and fsdp["activation_peak_bytes"] > 0


def test_sharded_checkpoint_resumes_resharded(runs):
    ckpt = runs["fsdp"] / "checkpoints" / "step-000002"
    meta = checkpoint.read_meta(ckpt)
    assert meta["kind"] == "sharded" and meta["world"] == {"dp": 1, "sp": 2}
    assert sorted(meta["dcp_files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.pt").exists()  # nothing gathered to one rank
    rows = _rows(runs["reshard"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 1-2 carried over from the checkpoint's run
    _same_losses(runs["reshard"], runs["one"], steps=[3, 4])
    _same_losses(runs["reshard"], runs["fsdp"], steps=[3, 4])
    record = json.loads((runs["reshard"] / "config.json").read_text())
    assert record["world"]["mesh"] == [[0], [1]] and record["resumed_from_step"] == 2


def test_checkpoint_errors_name_the_problem(runs, capsys, tmp_path):
    ckpt = runs["fsdp"] / "checkpoints" / "step-000002"

    def resume_error(*extra, ckpt=ckpt):
        code = cli_main(["train", *QUICK, "--out", str(tmp_path / "o"), "--resume", str(ckpt), *extra])
        assert code == 2
        return capsys.readouterr().err

    assert "belongs to a different run (--hidden: checkpoint 64, now 128)" in resume_error("--hidden", "128")
    # A single-file (DDP) checkpoint neither reshards nor loads into FSDP2.
    single = runs["one"] / "checkpoints" / "step-000004"
    assert checkpoint.read_meta(single)["kind"] == "single-file"
    assert "resume it with --data-parallel ddp" in resume_error("--sp", "1", "--data-parallel", "fsdp2", ckpt=single)
    assert "do not reshard" in resume_error("--sp", "2", ckpt=single)
    # A DCP file cut short is found before any rank starts.
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    shard = bad / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert "differ in size" in resume_error("--sp", "2", ckpt=bad)


def test_two_torchrun_agents_as_two_nodes(runs):
    """The FSDP2 run above ran under two torchrun agents, one rank per "node"."""
    world = json.loads((runs["fsdp"] / "config.json").read_text())["world"]
    assert world["ranks"] == 2 and world["mesh"] == [[0, 1]] and sorted(world["node_of_rank"].values()) == [0, 1]
    summary = runs["fsdp_stdout"].strip().splitlines()[-1]
    assert "fsdp2: parameters + optimizer state" in summary and "activation peak" in summary


@pytest.mark.slow
def test_two_nodes_sp4_and_dp2_x_sp2(runs, tmp_path):
    """2 agents x 2 ranks: SP = 4 spans both nodes (DDP); DP = 2 x SP = 2 keeps each SP group
    inside one node (FSDP2). Both give the losses of one process."""
    sp4, hybrid = tmp_path / "sp4", tmp_path / "dp2sp2"
    _ok(_two_nodes(2, "--sp", "4", "--save-every", "0", "--out", str(sp4)), "sp4 run")
    _ok(_two_nodes(2, "--sp", "2", "--data-parallel", "fsdp2", "--save-every", "0", "--out", str(hybrid)), "2x2 run")
    for out in (sp4, hybrid):
        _same_losses(out, runs["one"])
    world = json.loads((hybrid / "config.json").read_text())["world"]
    node = {int(r): n for r, n in world["node_of_rank"].items()}
    assert world["mesh"] == [[0, 1], [2, 3]] and sorted(node.values()) == [0, 0, 1, 1]
    assert all(len({node[r] for r in sp_group}) == 1 for sp_group in world["mesh"]), world  # SP inside a node


@pytest.mark.slow
def test_reshard_2x2_to_1x4_continues_like_an_uninterrupted_1x4_run(runs, tmp_path):
    saved, resumed, straight = tmp_path / "2x2", tmp_path / "2x2-to-1x4", tmp_path / "1x4"
    _train("--sp", "2", "--dp", "2", "--data-parallel", "fsdp2", "--save-every", "2", "--out", str(saved))
    _train("--sp", "4", "--data-parallel", "fsdp2", "--save-every", "0", "--out", str(resumed),
             "--resume", str(saved / "checkpoints" / "step-000002"))
    _train("--sp", "4", "--data-parallel", "fsdp2", "--save-every", "0", "--out", str(straight))
    _same_losses(resumed, straight, steps=[3, 4])
    _same_losses(straight, runs["one"])
    # The same sharded checkpoint also loads into DDP replicas (each rank reads the whole tensors).
    as_ddp = tmp_path / "2x2-to-ddp-1x4"
    _train("--sp", "4", "--data-parallel", "ddp", "--save-every", "0", "--out", str(as_ddp),
           "--resume", str(saved / "checkpoints" / "step-000002"))
    _same_losses(as_ddp, straight, steps=[3, 4])


@pytest.mark.slow
def test_bad_input_under_torchrun_fails_on_every_rank_without_hanging(runs, tmp_path):
    """A mesh that does not match the world, and a checkpoint of another model: every rank exits
    with an error (rank 0 says why), none waits in a collective."""
    procs = _two_nodes(1, "--sp", "2", "--dp", "2", "--out", str(tmp_path / "mesh"), timeout=600)
    assert all(p.returncode != 0 for p in procs)
    assert "--dp 2 x --sp 2 = 4 ranks, but this run has 2" in procs[0].stderr + procs[1].stderr
    ckpt = runs["fsdp"] / "checkpoints" / "step-000002"
    procs = _two_nodes(1, "--sp", "2", "--data-parallel", "fsdp2", "--hidden", "128", "--resume", str(ckpt),
                       "--out", str(tmp_path / "other"), timeout=600)
    assert all(p.returncode != 0 for p in procs)
    failures = sorted((tmp_path / "other").glob("failure-rank*.txt"))
    assert [f.name for f in failures] == ["failure-rank0.txt", "failure-rank1.txt"]
    assert all("belongs to a different run" in f.read_text() for f in failures)
    # The same, with the config check fooled (meta.json edited to claim the other width): DCP finds
    # that the tensors do not fit, and every rank says so.
    forged = tmp_path / "forged"
    shutil.copytree(ckpt, forged)
    meta = json.loads((forged / "meta.json").read_text())
    meta["config"]["model"] = {**meta["config"]["model"], "hidden": 128}
    (forged / "meta.json").write_text(json.dumps(meta))
    procs = _two_nodes(1, "--sp", "2", "--data-parallel", "fsdp2", "--hidden", "128", "--resume", str(forged),
                       "--out", str(tmp_path / "forged-run"), timeout=600)
    assert all(p.returncode != 0 for p in procs)
    failures = sorted((tmp_path / "forged-run").glob("failure-rank*.txt"))
    assert [f.name for f in failures] == ["failure-rank0.txt", "failure-rank1.txt"]
    assert all("sharded state does not fit this model" in f.read_text() and "Size mismatch" in f.read_text()
               for f in failures)


@pytest.mark.slow
def test_fsdp2_accumulates_micro_batches_like_ddp(tmp_path):
    """Packed text runs one micro-batch per sequence: FSDP2 skips the gradient reduction on all
    but the last (set_requires_gradient_sync) and must match DDP's no_sync accumulation."""
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Document {i}: " + "the quick brown fox " * (i % 5 + 1) for i in range(40)))
    flags = ["--task", "text", "--data", str(text), "--seq-len", "256", "--layout", "zigzag", "--sp", "2",
             "--save-every", "0"]
    _train(*flags, "--out", str(tmp_path / "ddp"))
    _train(*flags, "--data-parallel", "fsdp2", "--out", str(tmp_path / "fsdp2"))
    _same_losses(tmp_path / "fsdp2", tmp_path / "ddp")
