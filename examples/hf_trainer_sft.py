"""Packed SFT of a hybrid (Gated DeltaNet + softmax) model with TRL's ``SFTTrainer`` under LASP-2
sequence parallelism: the single-GPU script plus one line, ``lasp2.hf.sequence_parallel``.

The model is the shipped tiny Qwen3.5 config (random weights) or your own local transformers model
directory (``--model DIR``: config, safetensors weights and tokenizer; nothing is downloaded). The
data are synthetic pre-tokenized examples of random lengths, packed into one row per batch
(``padding_free=True``: every example is its own document, nothing crosses example boundaries).
Rank 0 prints the logged losses, saves the trained model with ``trainer.save_model`` and loads it
back into an unmodified transformers model; ``--out`` also receives ``hf_trainer_sft.json``.

    python examples/hf_trainer_sft.py                       # starts 2 local gloo ranks itself (CPU)
    python examples/hf_trainer_sft.py --world-size 4 --sp 2 # dp = 2 replicas of sp = 2
    torchrun --standalone --nproc-per-node 2 examples/hf_trainer_sft.py --model /path/to/qwen3.5 --bf16
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer_sft.py  # CPU needs --multi_gpu
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

try:
    import lasp2
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lasp2
from lasp2.launch import RankFailure, spawn, under_torchrun


def tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer over ids 0 .. vocab_size - 1 (the synthetic data are token ids already)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1")


def build(args):
    """Model and tokenizer: a local model directory, or a shipped config with random weights."""
    from transformers import AutoTokenizer

    from lasp2.hf.loading import build_model, load_config

    torch.manual_seed(args.seed)
    if Path(args.model).is_dir():
        model = build_model(load_config(args.model), weights=args.model)
        return model, AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = build_model(load_config(args.model))
    return model, tiny_tokenizer(model.config.vocab_size)


def dataset(args, vocab_size: int):
    """Pre-tokenized examples of random lengths (stand-ins for tokenized chat turns)."""
    import datasets

    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.examples,), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": [torch.randint(2, vocab_size, (n,), generator=g).tolist()
                                                     for n in lengths]})


def train(args) -> dict:
    """Body of one rank (torch.distributed is up: torchrun, or the ranks spawn() started)."""
    from trl import SFTConfig, SFTTrainer

    import lasp2.hf

    model, tokenizer = build(args)
    out = args.out or tempfile.mkdtemp(prefix="hf-trainer-sft-")
    config = SFTConfig(
        output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps, learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
        seed=args.seed, bf16=args.bf16, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        padding_free=True, max_length=None, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset(args, model.config.vocab_size),
                         processing_class=tokenizer)
    # The one line: parallelize the model over groups of sp ranks; each group is one data-parallel
    # replica. Packed rows have any length: pad them with ignored labels to a multiple of 2 sp.
    lasp2.hf.sequence_parallel(trainer, sp=args.sp, layout=args.layout, pad_to_multiple=True)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    report = {"world_size": dist.get_world_size(), "sp": args.sp, "layout": args.layout, "losses": losses}
    trainer.save_model(out)  # the unmodified model's parameters and config, written by rank 0
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)  # a plain transformers model
        same = all(torch.equal(p.detach().cpu(), trainer.model.state_dict()[k].detach().cpu().to(p.dtype))
                   for k, p in reloaded.state_dict().items())
        report["reloaded_equal"] = same
        print(f"world={report['world_size']} sp={args.sp} layout={args.layout} steps={len(losses)}")
        print("losses: " + " ".join(f"{x:.4f}" for x in losses))
        print(f"saved to {out}; reloads into an unmodified {type(reloaded).__name__}: {same}")
        if args.out:
            Path(args.out, "hf_trainer_sft.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    return report


def spawned_rank(args) -> dict:
    """A rank that spawn() started: tell accelerate about the world the way torchrun would."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    return train(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen3.5-tiny", help="shipped config name or a local model directory")
    p.add_argument("--sp", type=int, default=2, help="ranks per sequence-parallel group (divides the world)")
    p.add_argument("--world-size", type=int, default=2, help="local ranks to start without torchrun")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="examples per packed row (per_device_train_batch_size)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (model and hf_trainer_sft.json)")
    args = p.parse_args(argv)
    if under_torchrun():  # TrainingArguments joins the process group from torchrun's environment
        from transformers import TrainingArguments  # noqa: F401 - SFTConfig below initializes distributed

        report = train(args)
    else:
        try:
            report = spawn(spawned_rank, args.world_size, args)[0]
        except RankFailure as e:
            print(f"failed: {e}\n{e.traceback or ''}", file=sys.stderr)
            return 1
    ok = bool(report["losses"]) and all(math.isfinite(x) for x in report["losses"])
    return 0 if ok and report.get("reloaded_equal", True) else 1


if __name__ == "__main__":
    sys.exit(main())
