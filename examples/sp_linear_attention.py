"""Sequence-parallel linear attention gives the single-device answer, with one all-gather each way.

Every rank builds the same global q, k, v (and gate g) from a seed, keeps its shard of the
sequence (``lasp2.shard``), runs ``lasp2.sp_linear_attention`` forward and backward, and
compares the output and every gradient with ``lasp2.linear_attention`` run on the whole
sequence. Rank 0 prints the configuration, the max abs / relative error of o, dq, dk, dv, dg,
and the bytes each rank communicated (``lasp2.parallel.comm.track``). The exit code is 0 only
if every relative error is within tolerance (1e-5 in fp32, 1e-10 in fp64).

    python examples/sp_linear_attention.py                    # starts 2 local gloo ranks itself
    python examples/sp_linear_attention.py --world-size 4 --variant channel --layout zigzag
    torchrun --standalone --nproc-per-node 2 examples/sp_linear_attention.py --seq-len 128
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import lasp2
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lasp2
from lasp2.launch import RankFailure, init_from_env, spawn, under_torchrun
from lasp2.parallel import comm

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def make_inputs(args) -> dict:
    """The global q, k, v, g and output weight (the loss is sum(o * weight)), same on every rank."""
    gen = torch.Generator().manual_seed(args.seed)
    B, T, H, D = args.batch, args.seq_len, args.heads, args.dim
    dtype = getattr(torch, args.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = {"q": randn(B, T, H, D), "k": randn(B, T, H, D), "v": randn(B, T, H, D), "g": None}
    if args.variant == "constant":  # Lightning / RetNet: one fixed decay per head
        lam = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
        x["g"] = lam.log().view(1, 1, H).expand(B, T, H).to(dtype).contiguous()
    elif args.variant in ("scalar", "channel"):  # Mamba2 / GLA data-dependent gates, log space
        shape = (B, T, H) if args.variant == "scalar" else (B, T, H, D)
        x["g"] = F.logsigmoid(randn(*shape) + 2.0)
    x["weight"] = randn(B, T, H, D)
    return x


def run(args) -> dict:
    """Body of one rank: SP op vs the single-device op; returns the report on every rank."""
    group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    x = make_inputs(args)
    names = [n for n in ("q", "k", "v", "g") if x[n] is not None]

    # Reference: the whole sequence on one device.
    ref = {n: x[n].clone().requires_grad_() for n in names}
    o_ref, _ = lasp2.linear_attention(*(ref.get(n) for n in ("q", "k", "v", "g")))
    (o_ref * x["weight"]).sum().backward()

    # Sequence parallel: this rank's shard only.
    def local(t):
        return lasp2.shard(t, group=group, layout=args.layout)

    mine = {n: local(x[n]).clone().requires_grad_() for n in names}
    call = dict(group=group, strategy=args.strategy, layout=args.layout)
    with torch.no_grad():  # the first call with new shapes adds a one-off agreement check
        lasp2.sp_linear_attention(*(mine.get(n) for n in ("q", "k", "v", "g")), **call)
    with comm.track() as fwd:
        o = lasp2.sp_linear_attention(*(mine.get(n) for n in ("q", "k", "v", "g")), **call)
    with comm.track() as bwd:
        (o * local(x["weight"])).sum().backward()

    # Gather the shards back into whole tensors and compare (same result on every rank).
    got = {"o": o.detach(), **{f"d{n}": mine[n].grad for n in names}}
    want = {"o": o_ref.detach(), **{f"d{n}": ref[n].grad for n in names}}
    errors = {}
    for name in got:
        whole = lasp2.unshard(got[name], group=group, layout=args.layout)
        abs_err = (whole.double() - want[name].double()).abs().max().item()
        errors[name] = (abs_err, abs_err / max(want[name].double().abs().max().item(), 1e-300))
    traffic = [None] * world
    dist.all_gather_object(traffic, {"fwd": _summary(fwd), "bwd": _summary(bwd)}, group=group)
    ok = all(rel <= TOLERANCE[args.dtype] for _, rel in errors.values())
    if rank == 0:
        print(_report(args, world, errors, traffic, ok), flush=True)
    return {"ok": ok, "errors": errors}


def _summary(log) -> str:
    ops = sorted({r.op for r in log.records})
    calls = ", ".join(f"{log.count(op)} {op}" for op in ops) or "nothing"
    return f"{calls}: sent {log.bytes_sent:,} B, received {log.bytes_received:,} B"


def _report(args, world: int, errors: dict, traffic: list, ok: bool) -> str:
    tol = TOLERANCE[args.dtype]
    lines = [f"sp_linear_attention: variant={args.variant} strategy={args.strategy} layout={args.layout} "
             f"world={world} B={args.batch} T={args.seq_len} (T/rank={args.seq_len // world}) "
             f"H={args.heads} D={args.dim} {args.dtype}",
             "error vs lasp2.linear_attention on the whole sequence (max abs, max abs / max |ref|):"]
    lines += [f"  {name:3s} abs {a:.2e}  rel {r:.2e}  {'ok' if r <= tol else 'FAIL'}"
              for name, (a, r) in errors.items()]
    lines.append("communication per rank (forward | backward):")
    lines += [f"  rank {r}: {t['fwd']} | {t['bwd']}" for r, t in enumerate(traffic)]
    worst = max(r for _, r in errors.values())
    lines.append(f"{'PASS' if ok else 'FAIL'}: max relative error {worst:.2e} (tolerance {tol:.0e})")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=_positive, default=None,
                   help="ranks to start without torchrun (default 2); under torchrun, its world size")
    p.add_argument("--seq-len", type=_positive, default=1024, help="global sequence length")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--heads", type=_positive, default=4)
    p.add_argument("--dim", type=_positive, default=32, help="key and value head dimension")
    p.add_argument("--variant", choices=("basic", "constant", "scalar", "channel"), default="scalar")
    p.add_argument("--strategy", choices=("lasp2", "lasp1"), default="lasp2")
    p.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    p.add_argument("--dtype", choices=tuple(TOLERANCE), default="float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else (args.world_size or 2)
    if args.world_size is not None and args.world_size != world:
        p.error(f"--world-size {args.world_size} disagrees with torchrun's WORLD_SIZE={world}")
    parts = world * (2 if args.layout == "zigzag" else 1)
    if args.seq_len % parts:
        p.error(f"--seq-len {args.seq_len} must split into {parts} equal parts for layout={args.layout} "
                f"on {world} ranks; try {math.ceil(args.seq_len / parts) * parts}")
    args.world_size = world
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if under_torchrun():
        init_from_env(backend="gloo")  # CPU tensors: gloo, even on a machine with GPUs
        try:
            return 0 if run(args)["ok"] else 1
        finally:
            dist.destroy_process_group()
    try:
        results = spawn(run, args.world_size, args)
    except RankFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if results[0]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
