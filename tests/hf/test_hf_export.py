"""Back to transformers: ``lasp2 export --checkpoint DIR --out HF_DIR`` writes a directory that an
unmodified ``AutoModelForCausalLM.from_pretrained(HF_DIR)`` loads, with the trained model's logits.

Before, a ``lasp2 train --hf-config`` checkpoint was ``model.pt`` with every key prefixed ``hf.``
(``load_state_dict`` on the unmodified model missed every key) and nothing wrote safetensors.

One 2-rank spawn writes the two kinds of checkpoint and computes the trained models' logits under
SP = 2 (lasp2's parallelized model, the reference here): a real ``lasp2 train --hf-config
qwen3.5-tiny --sp 2 --layout zigzag`` run (single-file ``model.pt``) and an FSDP2-sharded DCP
checkpoint of a (perturbed) Qwen3-Next. The test process then exports both with the CLI and runs
the loaded models on one process: the logits agree with the SP logits to fp32 precision (two
different computations: lasp2's SP kernels and transformers' own), and every tensor is
bit-identical to the checkpoint's, loaded by hand into a model built from the config (DCP read
back with torch's own ``dcp_to_torch_save``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import lasp2  # noqa: E402,F401
from tests.dist import Spawns, run_sections, scratch_dir  # noqa: E402

T = 32
FP32_TOL = 2e-4  # as tests/hf/test_hf_parity.py: fp32, reductions in another order (~1e-6 observed)


def _ids():
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(7))


def _sp_logits(group, hf_model, layout: str) -> torch.Tensor:
    """The whole logits of ``hf_model`` (already parallelized) on ``_ids()``, gathered."""
    import lasp2.hf

    with torch.no_grad():
        out = hf_model(**lasp2.hf.shard_batch(_ids(), group=group, layout=layout))
    return lasp2.unshard(out.logits, group=group, layout=layout)


def _worker(group, out: str) -> dict:
    sys.modules.setdefault("fla", None)
    import lasp2.hf
    from lasp2.hf.loading import build_model, load_config
    from lasp2.train import checkpoint
    from lasp2.train.config import TrainConfig
    from lasp2.train.hf_model import HFCausalLM
    from lasp2.train.loop import train

    rank = dist.get_rank(group)
    # 1. A real single-file run; its trained weights reloaded into the loop's own wrapper.
    cfg = TrainConfig(hf_config="qwen3.5-tiny", task="mqar", seq_len=32, batch_size=2, steps=2, warmup=1,
                      mqar_pairs=2, mqar_queries=8, mqar_keys=4, mqar_values=4, save_every=2, plot=False,
                      device="cpu", layout="zigzag", sp=2, out=str(Path(out) / "run"), lr=1e-2,
                      export_hf=str(Path(out) / "hf-flag"))
    summary = train(cfg)
    if rank == 0:  # what `lasp2 train ... --export-hf DIR` does after the run
        from lasp2.train.cli import _export_hf

        assert _export_hf(cfg, summary) == 0
    dist.barrier(group)
    trained = build_model(load_config("qwen3.5-tiny"))
    lasp2.hf.parallelize(trained, group, layout="zigzag")
    wrapper = HFCausalLM(trained, group, "zigzag")
    wrapper.load_state_dict(checkpoint.load_file(checkpoint.find(cfg.out), "model.pt"))
    single = _sp_logits(group, trained, "zigzag")

    # 2. An FSDP2-sharded DCP checkpoint (every rank writes its shards).
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = build_model(load_config("qwen3-next-tiny"))
    with torch.no_grad():  # not the initial weights: the export must carry these
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lasp2.hf.parallelize(model, group, layout="contiguous")
    sharded_logits = _sp_logits(group, model, "contiguous")
    wrapped = HFCausalLM(model, group, "contiguous")
    fully_shard(wrapped, mesh=DeviceMesh("cpu", list(range(dist.get_world_size(group)))))
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    run2 = str(Path(out) / "sharded")
    if rank == 0:
        checkpoint.prepare_dir(run2, 1)
    dist.barrier(group)
    checkpoint.save_sharded(run2, 1, model=wrapped, optimizer=optimizer, group=group)
    dist.barrier(group)
    if rank == 0:
        config = TrainConfig(hf_config="qwen3-next-tiny", data_parallel="ddp", sp=2, seq_len=32, save_every=1,
                             out=run2, plot=False, device="cpu").to_dict()
        checkpoint.finish_sharded(run2, 1, rng={"cpu": torch.get_rng_state()[None]}, config=config,
                                  world={"dp": 1, "sp": 2})
    dist.barrier(group)
    return {"single": single, "sharded": sharded_logits}


def _export(tmp_path: Path, run: Path, name: str) -> Path:
    from lasp2.cli import main

    out = tmp_path / name
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    return out


def _by_hand(run: Path):
    """The checkpoint's weights loaded by hand into the unmodified model built from the config."""
    from lasp2.hf.loading import build_model, load_config
    from lasp2.train import checkpoint

    ckpt = checkpoint.find(str(run))
    meta = checkpoint.read_meta(ckpt)
    model = build_model(load_config(meta["config"]["hf_config"]))
    if meta["kind"] == checkpoint.SHARDED:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(ckpt / checkpoint.DCP_DIR, run / "whole.pt")
        state = torch.load(run / "whole.pt", weights_only=True)["model"]
    else:
        state = checkpoint.load_file(ckpt, "model.pt")
    model.load_state_dict({k.removeprefix("hf."): v for k, v in state.items()})
    return model


def _pool_worker(group, out: str) -> dict:
    return run_sections(group, [("export", lambda g: _worker(g, out))])


_OUT: dict = {}  # the runs' directory, made when the spawn starts
# The ranks run in the "hf-usage" spawn of the other tests/hf modules (they import transformers once).
SPAWNS = Spawns(_pool_worker, pool="hf-usage", timeout=900,
                more_args=lambda: (_OUT.setdefault("dir", scratch_dir("lasp2-hf-export-")),))


def test_export_loads_into_unmodified_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    sp = SPAWNS.results(2, "export")[0]
    out = Path(_OUT["dir"])  # the ranks' runs; the exports go to tmp_path
    assert len(list((out / "sharded").glob("checkpoints/step-*/dcp/*.distcp"))) == 2  # one shard file per rank
    for name, run in (("single", out / "run"), ("sharded", out / "sharded")):
        exported = _export(tmp_path, run, f"hf-{name}")
        model = AutoModelForCausalLM.from_pretrained(exported)  # plain transformers, nothing of lasp2
        with torch.no_grad():
            logits = model(input_ids=_ids(), use_cache=False).logits
        mine, theirs = model.state_dict(), _by_hand(run).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
        if name == "single":  # --export-hf wrote the same model at the end of the run
            flag = AutoModelForCausalLM.from_pretrained(out / "hf-flag").state_dict()
            assert flag.keys() == mine.keys() and all(torch.equal(flag[k], mine[k]) for k in mine)
        err = ((logits - sp[name]).abs().max() / sp[name].abs().max()).item()
        assert err <= FP32_TOL, (name, err)


def test_export_refuses_what_it_cannot_write(tmp_path, capsys):
    from lasp2.cli import main
    from lasp2.train.config import TrainConfig

    with pytest.raises(ValueError, match="--export-hf writes a transformers model"):
        TrainConfig(export_hf=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="--save-every > 0"):
        TrainConfig(hf_config="minimax-tiny", export_hf=str(tmp_path / "x"), save_every=0)

    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="no checkpoint there"):
        from lasp2.train.export import export_checkpoint

        export_checkpoint(str(tmp_path), str(tmp_path / "full"))
    # refused before any rank starts: the export directory must be new or empty
    assert main(["train", "--hf-config", "minimax-tiny", "--export-hf", str(tmp_path / "full"),
                 "--out", str(tmp_path / "run")]) == 2
    assert "--export-hf" in capsys.readouterr().err and not (tmp_path / "run" / "metrics.jsonl").exists()
