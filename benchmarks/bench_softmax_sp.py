"""Sequence-parallel softmax attention on this machine: LASP-2H all-gather vs ring vs Ulysses.

    python benchmarks/bench_softmax_sp.py --long-repeats 3   # the README numbers (~20 min, 2 cores)
    python benchmarks/bench_softmax_sp.py --quick   # tiny sizes, seconds

1. Step time: W gloo ranks (spawned, 1 thread each, file:// rendezvous in a temp dir) run
   fwd+bwd of ``sp_softmax_attention`` for every strategy, causal, zigzag layout (the balanced
   one, fair to all three), fp32, B = 1. Strategies are interleaved repeat by repeat, in a
   rotating order, so that machine noise hits them alike; a repeat's time is the slowest
   rank's; reported: the median over repeats after the warm-up ones, and the ratio to
   "allgather". T_global >= --long-from gets its own (smaller) warm-up and repeat counts.
2. Memory: bytes each rank saves for backward (``saved_tensors_hooks``), and the K/V a rank
   holds: gathered (allgather), kept + in flight (ring), head-sharded whole sequence (Ulysses).
3. Load balance of causal attention: the compute one rank does under LASP-2H (its queries
   against every visible K/V slot, fwd+bwd, the same blocks the ring computes), timed rank by
   rank in one process with 1 thread so that neither communication nor the other ranks
   disturb it; max/min over ranks for contiguous vs zigzag (target <= 1.15 with zigzag),
   next to the exact ratio of visible (query, key) pairs.

Writes benchmarks/results/softmax_sp.{json,md} (not with --quick unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lasp2  # noqa: E402
from lasp2.bench.report import cpu_model  # noqa: E402
from lasp2.ops.softmax import AttentionMask, attention_block_bwd, attention_block_fwd, merge_attention  # noqa: E402
from lasp2.parallel.layout import Layout  # noqa: E402
from lasp2.parallel.softmax_common import any_visible, positions_and_docs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("allgather", "ring", "ulysses")


def _inputs(T: int, H: int, Hkv: int, D: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, D, generator=gen)
    k = torch.randn(1, T, Hkv, D, generator=gen)
    v = torch.randn(1, T, Hkv, D, generator=gen)
    do = torch.randn(1, T, H, D, generator=gen)
    return q, k, v, do


def _step(strategy: str, layout: str, q, k, v, do, group) -> None:
    o = lasp2.sp_softmax_attention(q, k, v, group=group, causal=True, strategy=strategy, layout=layout)
    o.backward(do)
    q.grad = k.grad = v.grad = None


def _saved_bytes(strategy: str, layout: str, q, k, v, do, group) -> int:
    """Bytes of the distinct storages saved for backward by one forward (then run backward, so
    that every rank enters the backward's collectives)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = lasp2.sp_softmax_attention(q, k, v, group=group, causal=True, strategy=strategy, layout=layout)
    o.backward(do)
    q.grad = k.grad = v.grad = None
    return sum(storages.values())


def plan(T: int, cfg: dict):
    """(warm-up, repeats) for T_global = T: long sequences get their own (smaller) counts."""
    if T >= cfg["long_from"]:
        return cfg["long_warmup"], cfg["long_repeats"]
    return cfg["warmup"], cfg["repeats"]


def _rank_main(group, cfg: dict) -> dict:
    """One rank: {T: {strategy: [seconds per repeat]}} and saved bytes per (T, strategy)."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    out = {"times": {}, "saved_bytes": {}}
    for T in cfg["seqlens"]:
        warmup, repeats = plan(T, cfg)
        q, k, v, do = _inputs(T // W, cfg["H"], cfg["Hkv"], cfg["D"], seed=rank)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        times = {s: [] for s in STRATEGIES}
        for i in range(warmup + repeats):
            # Rotate the order every repeat so that slow phases of a shared machine do not
            # always hit the same strategy.
            for s in STRATEGIES[i % 3:] + STRATEGIES[:i % 3]:
                dist.barrier(group)
                t0 = time.perf_counter()
                _step(s, "zigzag", q, k, v, do, group)
                if i >= warmup:
                    times[s].append(time.perf_counter() - t0)
        out["times"][T] = times
        if T < cfg["long_from"]:  # saved bytes scale linearly in T: skip the long runs
            out["saved_bytes"][T] = {s: _saved_bytes(s, "zigzag", q, k, v, do, group) for s in STRATEGIES}
    return out


def _rank_on_world(cfg: dict) -> dict:
    return _rank_main(dist.group.WORLD, cfg)


def run_world(W: int, cfg: dict) -> list:
    """Spawn W ranks (``lasp2.launch.spawn``: gloo, 1 thread each), run ``_rank_main`` on each,
    return their results in rank order."""
    from lasp2.launch import spawn

    os.environ["OMP_NUM_THREADS"] = "1"
    return spawn(_rank_on_world, W, cfg, timeout_s=3600, threads_per_rank=1)


# ----------------------------------------------------------------------------- load balance


def _rank_compute(layout: Layout, rank: int, q, k, v, do, block_size: int = 256) -> None:
    """What rank ``rank`` computes under LASP-2H (and, block for block, under the ring)."""
    q_pos, _ = positions_and_docs(layout, rank, None, None)
    ql, dol = q[:, q_pos], do[:, q_pos]
    slots = []
    for j in range(layout.world):
        k_pos, _ = positions_and_docs(layout, j, None, None)
        if any_visible(q_pos, None, k_pos, None, True):
            slots.append((k_pos, k[:, k_pos], v[:, k_pos]))
    o = lse = None
    for k_pos, kj, vj in slots:
        o_j, lse_j = attention_block_fwd(ql, kj, vj, AttentionMask(True, q_pos, k_pos), block_size=block_size)
        o, lse = (o_j, lse_j) if o is None else merge_attention(o, lse, o_j, lse_j)
    delta = (dol * o).sum(-1).transpose(1, 2)
    for k_pos, kj, vj in slots:
        attention_block_bwd(dol, ql, kj, vj, None, lse, AttentionMask(True, q_pos, k_pos), delta=delta,
                            block_size=block_size)


def load_balance(W: int, T: int, cfg: dict) -> dict:
    torch.set_num_threads(1)
    q, k, v, do = _inputs(T, cfg["H"], cfg["Hkv"], cfg["D"], seed=0)
    out = {"W": W, "T_global": T}
    for name in ("contiguous", "zigzag"):
        lay = Layout(name, W, T // W)
        per_rank, pairs = [], []
        for r in range(W):
            _rank_compute(lay, r, q, k, v, do)  # warm-up
            ts = []
            for _ in range(cfg["balance_repeats"]):
                t0 = time.perf_counter()
                _rank_compute(lay, r, q, k, v, do)
                ts.append(time.perf_counter() - t0)
            per_rank.append(statistics.median(ts))
            pos = lay.global_positions(r)
            pairs.append(int((pos + 1).sum()))  # causal: query at position p sees p + 1 keys
        out[name] = {"per_rank_s": per_rank, "max_over_min_time": max(per_rank) / min(per_rank),
                     "max_over_min_pairs": max(pairs) / min(pairs)}
    return out


# ----------------------------------------------------------------------------- report


def kv_bytes(strategy: str, W: int, T: int, cfg: dict) -> int:
    """K/V bytes a rank holds for attention (fp32): gathered / kept + in flight / head-sharded."""
    H, Hkv, D = cfg["H"], cfg["Hkv"], cfg["D"]
    block = (T // W) * Hkv * 2 * D * 4
    if strategy == "allgather":
        return W * block
    if strategy == "ring":
        return min(W, 3) * block + block  # own + up to 2 kept for backward, + 1 in flight
    m = next(m for m in range(1, H // Hkv + 1) if (H // Hkv) % m == 0 and (Hkv * m) % W == 0)
    return T * (Hkv * m // W) * 2 * D * 4



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds); writes nothing unless --out")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768], help="T_global values")
    ap.add_argument("--balance-seqlens", type=int, nargs="+", default=[8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--long-from", type=int, default=16384,
                    help="T_global from which --long-warmup / --long-repeats apply (and memory is not measured)")
    ap.add_argument("--long-warmup", type=int, default=0)
    ap.add_argument("--long-repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg = dict(H=8, Hkv=2, D=64, seqlens=args.seqlens, repeats=args.repeats, warmup=args.warmup,
               long_from=args.long_from, long_warmup=args.long_warmup, long_repeats=args.long_repeats,
               balance_repeats=3)
    if args.quick:
        cfg.update(seqlens=[256, 512], repeats=2, balance_repeats=2, long_from=512, long_repeats=1)
        args.balance_seqlens = [512]
    out_dir = args.out or (None if args.quick else RESULTS)

    t_start = time.time()
    timings, memory, balance = [], [], []
    for W in args.worlds:
        ranks = run_world(W, cfg)
        for T in cfg["seqlens"]:
            warmup, repeats = plan(T, cfg)
            step = {s: [max(r["times"][T][s][i] for r in ranks) for i in range(repeats)]
                    for s in STRATEGIES}
            med = {s: statistics.median(v) for s, v in step.items()}
            for s in STRATEGIES:
                timings.append({"W": W, "T_global": T, "strategy": s, "layout": "zigzag",
                                "warmup": warmup, "median_s": med[s], "repeats_s": step[s],
                                "vs_allgather": med[s] / med["allgather"]})
                if T in ranks[0]["saved_bytes"]:
                    memory.append({"W": W, "T_global": T, "strategy": s,
                                   "kv_bytes_per_rank": kv_bytes(s, W, T, cfg),
                                   "saved_for_backward_bytes_per_rank":
                                       max(r["saved_bytes"][T][s] for r in ranks)})
            print(f"W={W} T={T}: " + ", ".join(f"{s} {med[s]:.3f}s" for s in STRATEGIES), flush=True)
        for T in args.balance_seqlens:
            b = load_balance(W, T, cfg)
            balance.append(b)
            print(f"balance W={W} T={T}: contiguous {b['contiguous']['max_over_min_time']:.2f}, "
                  f"zigzag {b['zigzag']['max_over_min_time']:.2f}", flush=True)

    report = {
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
        "cores": os.cpu_count(), "backend": "gloo (CPU), 1 thread per rank",
        "config": {"H": cfg["H"], "Hkv": cfg["Hkv"], "D": cfg["D"], "dtype": "float32", "causal": True,
                   "B": 1, "layout (timings)": "zigzag", "warmup": cfg["warmup"], "repeats": cfg["repeats"],
                   "long_from": cfg["long_from"], "long_warmup": cfg["long_warmup"],
                   "long_repeats": cfg["long_repeats"],
                   "worlds": args.worlds, "seqlens": cfg["seqlens"], "balance_seqlens": args.balance_seqlens},
        "wall_s": time.time() - t_start,
        "timings": timings, "memory": memory, "balance": balance,
    }
    md = render(report)
    print(md)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "softmax_sp.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "softmax_sp.md").write_text(md)
        print(f"wrote {out_dir / 'softmax_sp.json'} and {out_dir / 'softmax_sp.md'}")


def render(rep: dict) -> str:
    c = rep["config"]
    lines = [
        "# Sequence-parallel softmax attention: allgather (LASP-2H) vs ring vs Ulysses", "",
        f"`{rep['command']}`  ", f"torch {rep['torch']}, Python {rep['python']}, {rep['cpu']} "
        f"({rep['cores']} cores), {rep['backend']}; total wall time {rep['wall_s']:.0f} s.  ",
        f"Config: H={c['H']}, Hkv={c['Hkv']}, D={c['D']}, fp32, causal, B=1; timings under "
        f"layout={c['layout (timings)']}; median of {c['repeats']} repeats after {c['warmup']} warm-up "
        f"(T_global >= {c['long_from']}: {c['long_repeats']} repeat(s) after {c['long_warmup']} warm-up, "
        "for time); a repeat's time is the slowest rank's fwd+bwd.", "",
        "W ranks share the machine's cores: with W > cores the ranks time-share, so absolute times "
        "are not per-GPU-like; compare strategies within a row.", "",
        "## fwd+bwd step time", "", "| W | T_global | allgather (s) | ring (s) | ulysses (s) | ring / allgather "
        "| ulysses / allgather |", "|---|---|---|---|---|---|---|",
    ]
    rows = {}
    for t in rep["timings"]:
        rows.setdefault((t["W"], t["T_global"]), {})[t["strategy"]] = t
    for (W, T), r in rows.items():
        lines.append(f"| {W} | {T} | {r['allgather']['median_s']:.3f} | {r['ring']['median_s']:.3f} | "
                     f"{r['ulysses']['median_s']:.3f} | {r['ring']['vs_allgather']:.2f} | "
                     f"{r['ulysses']['vs_allgather']:.2f} |")
    lines += ["", "## Memory per rank (MiB)", "",
              f"Measured for T_global < {c['long_from']} (everything here scales linearly in T).", "",
              "K/V held = gathered K/V (allgather), own + 2 kept + 1 in flight (ring), head-sharded "
              "whole-sequence K/V (Ulysses). Saved = all storages saved for backward (q, o, lse, K/V, ...).", "",
              "| W | T_global | strategy | K/V held | saved for backward |", "|---|---|---|---|---|"]
    for m in rep["memory"]:
        lines.append(f"| {m['W']} | {m['T_global']} | {m['strategy']} | {m['kv_bytes_per_rank'] / 2**20:.1f} | "
                     f"{m['saved_for_backward_bytes_per_rank'] / 2**20:.1f} |")
    lines += ["", "## Load balance of causal attention (per-rank compute, max / min over ranks)", "",
              "| W | T_global | layout | per-rank fwd+bwd (s) | max/min time | max/min visible pairs |",
              "|---|---|---|---|---|---|"]
    for b in rep["balance"]:
        for name in ("contiguous", "zigzag"):
            x = b[name]
            lines.append(f"| {b['W']} | {b['T_global']} | {name} | "
                         f"{', '.join(f'{t:.3f}' for t in x['per_rank_s'])} | {x['max_over_min_time']:.2f} | "
                         f"{x['max_over_min_pairs']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
