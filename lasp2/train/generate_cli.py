"""``lasp2 generate``: continue a prompt with the LinearLlama of a ``lasp2 train`` checkpoint, the
prompt prefilled across ``--sp`` ranks (``lasp2.generate``).

Self-launched like ``lasp2 train`` (``--sp`` local processes on gloo), or under ``torchrun`` (one
SP group of WORLD_SIZE ranks); every rank loads the checkpoint, every rank computes the same
tokens, rank 0 prints them. Prompts: the bytes of the text for a ``--task text`` run (its
vocabulary is 256 bytes, padding and end-of-document, which ends generation), else token ids
separated by spaces (``--task mqar`` / ``--task tokens``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List

TEXT_SPECIAL = {256: "<pad>", 257: "<eos>"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="continue a prompt with a lasp2 train checkpoint (SP prefill, then decoding)",
        description="Continue a prompt with the LinearLlama of a 'lasp2 train' checkpoint: the prompt is prefilled "
                    "across --sp ranks (LASP-2: one all-gather per linear layer), then every rank decodes the same "
                    "tokens from the states (no communication per token); rank 0 prints them.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a run directory (its latest checkpoint) or a checkpoints/step-NNNNNN directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt (text for --task text runs, else token ids)")
    src.add_argument("--prompt-file", metavar="F", help="a file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, required=True, metavar="N", help="tokens to generate")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel ranks for the prefill (default 1)")
    p.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag"), help="token layout of the prefill")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same tokens for every --sp)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="stop at this token (default: end-of-document for --task text runs, none otherwise)")
    p.add_argument("--print-ids", action="store_true", help="also print the generated token ids")
    p.set_defaults(func=run)


def load_run(checkpoint_path: str) -> Dict[str, Any]:
    """The checkpoint's run config (``TrainConfig.to_dict``) and model weights; ValueError when it
    is not a LinearLlama checkpoint."""
    import torch

    from . import checkpoint

    try:
        ckpt = checkpoint.find(checkpoint_path)
    except ValueError as e:
        raise ValueError(str(e).replace("--resume", "--checkpoint", 1)) from None
    meta = checkpoint.read_meta(ckpt)
    run = meta.get("config") or {}
    if run.get("hf_config") or run.get("hf_weights"):
        raise ValueError(f"checkpoint {ckpt} is a transformers run (--hf-config / --hf-weights): export it with "
                         f"'lasp2 export' and generate with lasp2.hf.sp_prefill and the model's own generate")
    if meta["kind"] == checkpoint.SHARDED:
        state = _read_dcp(ckpt / checkpoint.DCP_DIR, ckpt, run)
    else:
        state = checkpoint.load_file(ckpt, "model.pt", torch.device("cpu"))
    return {"ckpt": str(ckpt), "run": run, "state": state}


def build_model(run: Dict[str, Any], state=None):
    """The run's LinearLlama in its dtype (fp64 runs in fp64, others in fp32), with ``state``'s weights."""
    import torch

    from ..models import LinearLlama
    from .config import TrainConfig

    cfg = TrainConfig.from_dict(run)
    model = LinearLlama(cfg.model_config(), seed=cfg.seed)
    if cfg.dtype == "float64":
        model = model.double()
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"the checkpoint's weights do not fit its model config: {str(e).splitlines()[0]}") from None
    return model.eval(), cfg


def _read_dcp(dcp_dir: Path, ckpt: Path, run: Dict[str, Any]):
    import torch
    import torch.distributed.checkpoint as dcp

    model, _ = build_model(run)
    want = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
    try:
        dcp.load(want, checkpoint_id=dcp_dir, no_dist=True)
    except BaseException as e:  # DCP raises CheckpointException (a BaseException) for missing keys
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"checkpoint {ckpt}: its sharded model state does not fit its model config "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return want["model"]


def encode(text: str, task: str, vocab_size: int) -> List[int]:
    """Prompt ids: UTF-8 bytes for a text run, else integers separated by whitespace."""
    if task == "text":
        ids = list(text.encode("utf-8"))
    else:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            raise ValueError(f"a --task {task} run takes its prompt as token ids separated by spaces "
                             f"(e.g. --prompt '3 17 5'), got {text[:40]!r}") from None
    if not ids:
        raise ValueError("the prompt is empty; give at least one token")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside this model's vocabulary [0, {vocab_size})")
    return ids


def decode(ids: List[int], task: str) -> str:
    if task != "text":
        return " ".join(map(str, ids))
    out, run = [], bytearray()
    for i in ids:
        if i < 256:
            run.append(i)
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        out.append(TEXT_SPECIAL.get(i, f"<{i}>"))
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


def generate_rank(job: Dict[str, Any]) -> List[int]:
    """One rank: load the checkpoint, generate over the default group; the new token ids."""
    import torch
    import torch.distributed as dist

    from ..models.generate import generate

    loaded = load_run(job["checkpoint"])
    model, _ = build_model(loaded["run"], loaded["state"])
    group = dist.group.WORLD if dist.is_initialized() else None
    prompt = torch.tensor([job["prompt"]], dtype=torch.long)
    out = generate(model, prompt, group=group, layout=job["layout"], **job["settings"])
    return out[0, prompt.shape[1]:].tolist()


def run(args) -> int:
    from ..cli import UsageError
    from ..launch import RankFailure, init_from_env, spawn, under_torchrun

    try:
        if args.sp < 1:
            raise ValueError(f"--sp must be >= 1, got {args.sp}")
        loaded = load_run(args.checkpoint)
        model, cfg = build_model(loaded["run"], loaded["state"])
        text = Path(args.prompt_file).read_text() if args.prompt_file is not None else args.prompt
        prompt = encode(text, cfg.task, model.config.vocab_size)
        eos = args.eos_id if args.eos_id is not None else (257 if cfg.task == "text" else None)
        settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        seed=args.seed, eos_id=eos)
        from ..models.generate import Sampling

        Sampling(vocab_size=model.config.vocab_size, **settings)  # the same checks, before any rank starts
    except (ValueError, OSError) as e:
        raise UsageError(str(e).strip().splitlines()[0]) from None
    job = {"checkpoint": loaded["ckpt"], "prompt": prompt, "layout": args.layout, "settings": settings}
    if under_torchrun():
        import torch.distributed as dist

        rank, _ = init_from_env(backend="gloo")
        try:
            new = generate_rank(job)
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return 0
    elif args.sp == 1:
        new = generate_rank(job)
    else:
        try:
            new = spawn(generate_rank, args.sp, job)[0]
        except RankFailure as e:
            print(f"lasp2 generate: error: {e}", file=sys.stderr)
            return 1
    print(decode(new, cfg.task))
    if args.print_ids:
        print("ids: " + " ".join(map(str, new)))
    return 0
