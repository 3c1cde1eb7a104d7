"""Measuring: fwd+bwd time, communication and peak memory of every configuration of a suite.

Method:
- every configuration of a suite runs in the same processes on the same inputs, interleaved
  repeat by repeat (the starting configuration rotates), so that machine noise hits them alike;
- each rank also records the CPU seconds of its process in every timed call (a rank waiting
  for a peer sleeps): their spread over ranks is the load balance of the configuration;
- a point's time is the slowest rank's median over ``repeats`` timed fwd+bwd calls, taken after
  ``warmup`` calls and one call under ``comm.track()`` (which gives the communication per layer
  call: operations and bytes per rank, forward and backward separately);
- peak memory per rank is measured afterwards, in a separate pass, one untimed call per
  configuration: on CUDA the allocator's peak above what was allocated before the call; on CPU
  the resident set size sampled every 0.5 ms above the RSS right before the call (the inputs),
  with glibc told to serve every allocation above 64 KiB by mmap so that freed tensors leave
  the RSS. ``ru_maxrss`` cannot separate configurations that share a process: it is monotone.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .rss import RssPeak, libc_or_none
from .suites import get_suite


@dataclass(frozen=True)
class BenchSpec:
    """Everything a run needs; picklable (it travels to the spawned ranks)."""

    suite: str
    world_sizes: Tuple[int, ...]
    seq_lens: Tuple[int, ...]
    seq_is_global: bool = True  # --seq-lens (global tokens) vs --local-lens (tokens per rank)
    batch: int = 1
    heads: int = 8
    kv_heads: Optional[int] = None
    dim: int = 64
    dtype: str = "float32"
    layout: str = "contiguous"  # or "both": every SP configuration under contiguous and under zigzag
    backend: str = "torch"  # linear-attention kernels (``lasp2.ops.backends``)
    repeats: int = 5
    warmup: int = 1
    strategies: Optional[Tuple[str, ...]] = None  # a subset of the suite's configurations (None: all)
    hf_config: Optional[str] = None  # --suite hf: the transformers config (lasp2.hf.loading)
    variant: str = "scalar"  # --suite linear: the linear-attention variant (lasp2.bench.inputs.VARIANTS)

    def configs(self, suite) -> List[str]:
        """The suite's configurations this run measures (the baseline always)."""
        from .suites import IDEAL, LAYOUTS

        picked = [c for c in suite.configs() if self.strategies is None or c in self.strategies or c == IDEAL]
        if self.layout != "both":
            return picked
        return [x for c in picked for x in ([c] if c == IDEAL else [f"{c}@{lay}" for lay in LAYOUTS])]

    def local_len(self, T: int, W: int) -> int:
        return T // W if self.seq_is_global else T

    def global_len(self, T: int, W: int) -> int:
        return T if self.seq_is_global else T * W


def check_spec(spec: BenchSpec) -> None:
    """ValueError naming the flag for every combination that cannot run (before anything starts)."""
    suite = get_suite(spec.suite)
    if spec.strategies is not None:
        unknown = [s for s in spec.strategies if s not in suite.configs()]
        if unknown or not spec.strategies:
            raise ValueError(f"--strategies {','.join(spec.strategies)}: {', '.join(unknown) or 'empty'} not in the "
                             f"{spec.suite} suite; choose from {', '.join(suite.configs())}")
    if spec.variant != "scalar" and spec.suite != "linear":
        raise ValueError(f"--variants: the linear suite only (and the ops and gpu suites), not {spec.suite}")
    if spec.layout == "both" and spec.suite not in ("linear", "softmax"):
        raise ValueError(f"--layout both: the linear and softmax suites only, not {spec.suite}")
    if spec.suite == "hf":
        if not spec.hf_config:
            raise ValueError("--suite hf needs --hf-config (e.g. qwen3-next-tiny)")
        from lasp2.hf.loading import load_config

        load_config(spec.hf_config)  # fails now, naming the shipped configs, not in the ranks
    flag = "--seq-lens" if spec.seq_is_global else "--local-lens"
    for name, value, low in (("--heads", spec.heads, 1), ("--dim", spec.dim, 1), ("--batch", spec.batch, 1),
                             ("--repeats", spec.repeats, 1), ("--warmup", spec.warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if spec.backend == "fla":  # where the ranks will run: CUDA when available, else the CPU interpreter
        from ..ops import backends

        probe = torch.empty(0, dtype=getattr(torch, spec.dtype), device="cuda" if torch.cuda.is_available() else "cpu")
        try:
            backends.resolve("fla", probe)
        except ValueError as e:
            raise ValueError(f"--backend fla: {e}") from None
    if spec.kv_heads is not None and (spec.kv_heads < 1 or spec.heads % spec.kv_heads):
        raise ValueError(f"--kv-heads {spec.kv_heads} must divide --heads {spec.heads}")
    for W in spec.world_sizes:
        if W < 1:
            raise ValueError(f"--world-sizes must be >= 1, got {W}")
        parts = 2 if spec.layout in ("zigzag", "both") and W > 1 else 1
        for T in spec.seq_lens:
            if T < 1 or (spec.seq_is_global and T % (W * parts)) or spec.local_len(T, W) % parts:
                unit = f"{W * parts} (W={W}{' x 2 segments for zigzag' if parts == 2 else ''})"
                what = "global length" if spec.seq_is_global else "tokens per rank"
                raise ValueError(f"{flag} {T}: the {what} must be a positive multiple of "
                                 f"{unit if spec.seq_is_global else parts}")


def _step(suite, config, x, group, spec, sync):
    o = suite.forward(config, x, group, spec)
    o.backward(x["do"])
    for t in x["leaves"]:
        t.grad = None
    sync()


def _tracked_step(suite, config, x, group, spec, sync) -> dict:
    """One fwd+bwd with its communication per direction and the bytes its forward saves for
    backward (the distinct storages given to autograd)."""
    from lasp2.parallel import comm

    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with comm.track() as fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = suite.forward(config, x, group, spec)
    with comm.track() as bwd:
        o.backward(x["do"])
    for t in x["leaves"]:
        t.grad = None
    sync()
    ops = lambda log: {op: log.count(op) for op in sorted({r.op for r in log.records})}  # noqa: E731
    return {"comm_fwd": ops(fwd), "comm_bwd": ops(bwd), "comm_wait_s": [fwd.waited_s, bwd.waited_s],
            "saved_bytes": sum(saved.values()),
            "bytes_sent": fwd.bytes_sent + bwd.bytes_sent, "bytes_received": fwd.bytes_received + bwd.bytes_received}


def _peak_memory_mb(suite, config, x, group, spec, device, sync) -> Tuple[float, str]:
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(suite, config, x, group, spec, sync)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda max_memory_allocated"
    libc = libc_or_none()
    if libc is not None:
        libc.malloc_trim(0)
    dist.barrier(group)
    with RssPeak() as peak:
        _step(suite, config, x, group, spec, sync)
    return peak.mb, "sampled RSS" + (" (glibc mmap threshold 64 KiB)" if libc is not None else "")


def measure_rank(spec: BenchSpec, W: int, group, device: torch.device, progress: bool = False) -> List[dict]:
    """Run every point of the sweep at world size W on this rank; one dict per (T, config)."""
    suite = get_suite(spec.suite)
    rank = dist.get_rank(group)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    configs = spec.configs(suite)
    active = [c for c in configs if suite.skip_reason(c, spec, W) is None]
    lengths = sorted(set(spec.seq_lens))
    bar = _progress_bar(rank == 0 and progress, len(lengths) * len(active) * (spec.warmup + spec.repeats + 1), W)
    results: Dict[Tuple[int, str], dict] = {}
    for T in lengths:
        x = suite.inputs(spec, spec.local_len(T, W), W, rank, device, group)
        for c in configs:
            results[(T, c)] = {"T": T, "config": c, "skip": suite.skip_reason(c, spec, W), "times": [], "cpu": [],
                               "visible_pairs": _visible_pairs(suite, c, spec, spec.global_len(T, W), group)}
        for c in active:
            for _ in range(spec.warmup):
                _step(suite, c, x, group, spec, sync)
                bar.update()
            results[(T, c)].update(_tracked_step(suite, c, x, group, spec, sync))
            bar.update()
        for rep in range(spec.repeats):
            for c in active[rep % len(active):] + active[:rep % len(active)]:
                dist.barrier(group)
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                _step(suite, c, x, group, spec, sync)
                results[(T, c)]["times"].append(time.perf_counter() - t0)
                results[(T, c)]["cpu"].append(time.process_time() - c0)
                bar.update()
        if rank == 0 and progress:
            bar.write(f"  W={W} T={T} (rank 0 medians): " + ", ".join(
                f"{c} {statistics.median(results[(T, c)]['times']) * 1e3:.1f} ms" for c in active))
        del x
    bar.close()
    # Memory pass last, so that the allocator setting it needs never touches a timed call.
    libc = libc_or_none() if device.type != "cuda" else None
    if libc is not None:
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    for T in lengths:
        x = suite.inputs(spec, spec.local_len(T, W), W, rank, device, group)
        for c in configs:
            if results[(T, c)]["skip"] is None:
                mb, how = _peak_memory_mb(suite, c, x, group, spec, device, sync)
                results[(T, c)].update(peak_mem_mb=mb, mem_method=how)
        del x
    return list(results.values())


def _visible_pairs(suite, config, spec, T_global: int, group) -> Optional[int]:
    """Causal (query, key) pairs of this rank's queries, for suites whose work grows with them."""
    import lasp2

    from .suites import IDEAL, split_layout

    strategy, layout = split_layout(config, spec)
    if config == IDEAL or not hasattr(suite, "shards_queries") or not suite.shards_queries(strategy):
        return None
    pos = lasp2.shard(torch.arange(T_global)[None], group=group, layout=layout)
    return int((pos + 1).sum())


class _NoBar:
    def update(self, n=1):
        pass

    def write(self, s):
        print(s, flush=True)

    def close(self):
        pass


def _progress_bar(enabled: bool, total: int, W: int):
    """A tqdm bar on a terminal; elsewhere (logs, CI) only the one line per point."""
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"W={W}", unit="call", leave=False, dynamic_ncols=True)


def spawned_rank(spec: BenchSpec, W: int, progress: bool) -> List[dict]:
    """Entry point of a rank started by ``lasp2.launch.spawn`` (gloo, CPU)."""
    return measure_rank(spec, W, dist.group.WORLD, torch.device("cpu"), progress)


def run_spawned(spec: BenchSpec, progress: bool = True) -> Dict[int, List[List[dict]]]:
    """Self-launch W gloo ranks with one thread each for every W; {W: [rank results]}."""
    from lasp2.launch import spawn

    out = {}
    for W in spec.world_sizes:
        if progress:
            print(f"W={W}: launching {W} gloo rank(s), 1 thread each", flush=True)
        out[W] = spawn(spawned_rank, W, spec, W, progress, threads_per_rank=1)
    return out


def run_torchrun(spec: BenchSpec, progress: bool = True) -> Optional[Dict[int, List[List[dict]]]]:
    """Under torchrun: the given ranks (NCCL on GPUs, else gloo), one subgroup of the first W
    ranks per world size. Returns the results on global rank 0, None elsewhere."""
    from lasp2.launch import init_from_env

    # Ranks outside a small W wait in gather_object while the others measure: a long timeout.
    rank, world = init_from_env(timeout_s=4 * 3600.0)
    too_big = [W for W in spec.world_sizes if W > world]
    if too_big:
        raise ValueError(f"--world-sizes {too_big} exceed the {world} ranks torchrun started")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for W in spec.world_sizes:
        group = dist.new_group(list(range(W)))  # every rank must create every group
        mine = measure_rank(spec, W, group, device, progress) if rank < W else None
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank == 0:
            out[W] = gathered[:W]
    return out if rank == 0 else None
