"""Public sequence-parallel functions (DESIGN §2): validate, check that ranks agree, dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from .. import functional
from ..ops import backends, softmax_backends
from ..ops.transition import classify
from ..validation import (check_beta, check_choice, check_cu_seqlens, check_gate, check_group, check_qkv,
                          check_scale, resolve_scale)
from . import agreement, comm, strategies
from .batch import SPBatch, resolve_placement
from .context import LinearCall
from .layout import LAYOUTS, Layout
from .linear_sp import LinearSPFunction
from .strategies import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
from ..ops.precision import follow_autocast


def _check_layout(entry, layout: str) -> None:
    """``layout`` is a known layout and one the strategy runs under."""
    check_choice("layout", layout, LAYOUTS)
    if layout not in entry.layouts:
        raise ValueError(f"strategy={entry.name!r} does not run under layout={layout!r}; use layout="
                         f"{' or '.join(map(repr, entry.layouts))}, or another strategy")


def _host_documents(batch, cu_seqlens) -> Optional[tuple]:
    """The global document boundaries as host ints: the batch's (read once when it was built),
    or read from ``cu_seqlens`` now (one host read per call without a batch context)."""
    if cu_seqlens is None:
        return None
    return batch.cu_list if batch is not None else tuple(cu_seqlens.tolist())


def _describe(t: Optional[torch.Tensor]) -> str:
    return "None" if t is None else f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}"


@follow_autocast
def sp_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    *,
    group=None,
    scale: Optional[float] = None,
    causal: bool = True,
    strategy: str = "lasp2",
    layout: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    scan_blocks: Optional[int] = None,
    backend: str = "auto",
    batch: Optional[SPBatch] = None,
) -> torch.Tensor:
    """Sequence-parallel linear attention: this rank's shard of ``linear_attention`` on the
    whole sequence.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g: None | [B, T, H] | [B, T, H, K] (log space,
            <= 0) — this rank's shard in ``layout`` (T local; the global length is W * T).
            q, k, v share one dtype; inside torch.autocast, q, k, v of different dtypes are cast
            to the autocast dtype first (as for ``scaled_dot_product_attention``).
        beta: None, or [B, T, H] in [0, 1] for DeltaNet / Gated DeltaNet (g then [B, T, H] or
            None); keys are used as given (normalise them in the layer, as DeltaNet does).
        group: the sequence-parallel process group (required unless ``batch`` gives it).
        scale: defaults to K**-0.5. causal: False is bidirectional basic linear attention
            (no g, no beta; a strategy with a bidirectional op: "lasp2").
        strategy: a linear strategy of the registry (``lasp2.parallel.strategies``): "lasp2"
            (one all-gather per direction), "lasp1" (ring chain of P2P hops), "allscan"
            (pipelined chain of state blocks), "tree" (log-depth scan); the last three are
            causal only.
        layout: "contiguous" (default) or "zigzag" (see ``lasp2.shard``).
        cu_seqlens: global [N + 1] cumulative document lengths, identical on every rank (B == 1).
        batch: this batch's sequence-parallel context (``SPBatch``), in place of group, layout
            and cu_seqlens: their values were checked once when it was built, so the call skips
            the document checks, the gate/beta value checks and the per-call agreement digest
            (no host syncs), unless ``batch.checks``.
        scan_blocks: pipeline blocks of a pipelined strategy's chain (the state split along V;
            1..V); None picks k* = sqrt((J - 2) s / alpha) for an InfiniBand-class link
            (``allscan.default_blocks``; ``lasp2 plan`` gives k* for your network).
        backend: the local work's kernels: "auto" (fla on CUDA tensors when installed, else
            torch), "torch" or "fla" (see ``lasp2.ops.backends``). The communication is the same.

    Returns:
        o [B, T, H, V], this rank's shard, in q's dtype. Differentiable w.r.t. q, k, v, g.

    Communication (causal, per call): "lasp2": forward 1 all-gather of [W, S, B*H*(K*V + a) + 1]
    fp32 (S = 1 contiguous, 2 zigzag; a = 1 without or with a scalar gate, K per-channel, K*K
    for the delta rule), backward 1 all-gather of [W, S, B, H, K, V]
    fp32. "lasp1": W - 1 sequential sends of [B, H, K, V] per direction (contiguous). "allscan":
    per direction one [B, H, K, V] state received per segment in k blocks, J + k - 2 block hops
    (J = W contiguous, 2W zigzag). "tree": ceil(log2 J) rounds of P2P exchanges of one summary
    [B*H*(K*V + a)] per segment. Agreement between the ranks is checked on every call by an
    8-byte digest inside the first message (``agreement``); the first call with new shapes on a
    group adds one small all-gather that compares the shapes before anything of that size moves
    (then cached).
    """
    group, layout, cu_seqlens = resolve_placement(batch, group, layout, cu_seqlens, "sp_linear_attention")
    check_group(group)
    entry = strategies.linear(strategy)
    _check_layout(entry, layout)
    check_qkv(q, k, v)
    check_scale(scale)
    checks = batch is None or batch.checks  # value checks: per call, or once per batch
    check_gate(g, q, values=checks)
    check_beta(beta, q, values=checks)
    kind = classify(g, beta)
    rank, world = comm.rank_and_size(group)
    lay = Layout(layout, world, q.shape[1])
    if batch is None:
        check_cu_seqlens(cu_seqlens, lay.global_len, q.shape[0], device=q.device)
    else:
        batch.check_local(q.shape[1], q.shape[0], "sp_linear_attention")
    if not causal:
        if g is not None or beta is not None:
            raise ValueError("causal=False supports basic linear attention only: pass g=None and beta=None")
        if entry.causal_only:
            both = strategies.with_capability(strategies.LINEAR, lambda e: not e.causal_only)
            raise ValueError(f"causal=False needs strategy={both[0]!r} (strategy={strategy!r} is causal only)")
    if scan_blocks is not None:
        if not entry.pipelined:
            pipelined = strategies.with_capability(strategies.LINEAR, lambda e: e.pipelined)
            raise ValueError(f"scan_blocks applies to a pipelined strategy ({', '.join(pipelined) or 'none'}), "
                             f"not strategy={strategy!r}; drop scan_blocks or change the strategy")
        if isinstance(scan_blocks, bool) or not isinstance(scan_blocks, int) or not 1 <= scan_blocks <= v.shape[-1]:
            raise ValueError(f"scan_blocks must be an int in [1, V={v.shape[-1]}] (the state splits along V), "
                             f"got {scan_blocks!r}")
    scale = resolve_scale(scale, q)
    backend = backends.resolve(backend, q, v.shape[-1])
    signature = (f"sp_linear_attention strategy={strategy} layout={layout} causal={causal} scale={scale!r} "
                 f"q={_describe(q)} k={_describe(k)} v={_describe(v)} g={_describe(g)} beta={_describe(beta)} "
                 f"docs={cu_seqlens is not None} blocks={scan_blocks}")
    comm.ensure_agreement(group, signature)  # shapes: once per signature and group
    if world == 1:
        o, _ = functional.linear_attention(q, k, v, g, beta, scale=scale, causal=causal, cu_seqlens=cu_seqlens,
                                           backend=backend)
        return o
    # Everything, every call, rides the first message; with a batch context, checked once per batch.
    digest = agreement.call_digest(signature, cu_seqlens) if checks else agreement.UNCHECKED
    cu_list = _host_documents(batch, cu_seqlens)
    if not causal:
        return entry.bidirectional.apply(q, k, v, scale, lay, group, cu_list, digest)
    call = LinearCall(group, lay, scale, cu_list, digest=digest, grad_enabled=torch.is_grad_enabled(),
                      blocks=scan_blocks, backend=backend)
    return LinearSPFunction.apply(q, k, v, g, beta, call, entry.exchange, kind)


def _check_shard_args(x, group, layout: str, dim: int):
    check_group(group)
    check_choice("layout", layout, LAYOUTS)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dims")
    return dim % x.dim()


def shard(x: torch.Tensor, *, group, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's part of the whole tensor ``x`` (identical on every rank) along ``dim``.

    contiguous: rank r gets [r T, (r + 1) T); zigzag: the 2W equal segments r and 2W-1-r,
    concatenated. The length along ``dim`` must split evenly (W parts, or 2W for zigzag).
    Communication: none.
    """
    dim = _check_shard_args(x, group, layout, dim)
    rank, world = comm.rank_and_size(group)
    parts = world if layout == "contiguous" or world == 1 else 2 * world
    if x.shape[dim] % parts:
        raise ValueError(f"x has length {x.shape[dim]} along dim {dim}, which does not split into {parts} "
                         f"equal parts for layout={layout!r} over {world} ranks; pad or trim the "
                         f"sequence to a multiple of {parts} yourself (lasp2 never does it silently)")
    lay = Layout(layout, world, x.shape[dim] // world)
    return torch.cat([x.narrow(dim, s.global_start, s.length) for s in lay.local_segments(rank)], dim=dim)


def unshard(x_local: torch.Tensor, *, group, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """The whole tensor from every rank's part (inverse of ``shard``); not differentiable.

    Every rank must hold a part of the same shape and dtype (checked first: ValueError on every
    rank otherwise, never a scrambled result).
    Communication: 1 all-gather of a small fixed-size code (the agreement check), then
    1 all-gather of x_local.
    """
    dim = _check_shard_args(x_local, group, layout, dim)
    comm.ensure_agreement(group, f"unshard x_local={_describe(x_local)} layout={layout} dim={dim}", cached=False)
    rank, world = comm.rank_and_size(group)
    lay = Layout(layout, world, x_local.shape[dim])
    gathered = comm.all_gather(x_local.detach(), group)  # [W, ...]
    pieces = []
    for j in range(lay.num_segments):
        s = lay.segment(j)
        pieces.append(gathered[s.owner].narrow(dim, s.local_start, s.length))
    return torch.cat(pieces, dim=dim)



@follow_autocast
def sp_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    scale: Optional[float] = None,
    causal: bool = True,
    strategy: str = "allgather",
    layout: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    batch: Optional[SPBatch] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sequence-parallel softmax attention: this rank's shard of ``softmax_attention`` on the
    whole sequence.

    Args:
        q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv], H % Hkv == 0 (GQA) — this rank's
            shard in ``layout`` (T local; the global length is W * T). One floating dtype
            (inside torch.autocast, different dtypes are cast to the autocast dtype first).
        group: the sequence-parallel process group (required unless ``batch`` gives it).
        scale: defaults to D**-0.5. causal: False gives bidirectional attention.
        strategy: "allgather" (LASP-2H, one collective per direction), "ring" (K/V rotate
            around the ring) or "ulysses" (all-to-all to head sharding; needs H % W == 0).
        layout: "contiguous" (default) or "zigzag" (see ``lasp2.shard``); zigzag balances causal work.
        cu_seqlens: global [N + 1] cumulative document lengths, identical on every rank (B == 1);
            no attention across documents, whichever ranks they span.
        batch: this batch's sequence-parallel context (``SPBatch``) in place of group, layout and
            cu_seqlens (checked once when it was built; no per-call agreement digest unless
            ``batch.checks``).
        backend: the local work's kernel: "auto" (flex on CUDA tensors, else torch), "torch"
            (the blockwise PyTorch loop) or "flex" (FlexAttention with a block mask from global
            positions and documents, cached per batch; on CPU forward only). See
            ``lasp2.ops.softmax_backends``. The communication is the same.

    Returns:
        o [B, T, H, Dv], this rank's shard, in q's dtype (computed in fp32 for half precision).
        Differentiable w.r.t. q, k, v.

    Communication (per call, W > 1): "allgather": forward 1 all-gather of [W, B, T, Hkv, D + Dv]
    in the input dtype; backward 1 reduce-scatter of the same shape in fp32 (fp64 for fp64).
    "ring": W - 1 send/recv hops per direction; forward K/V [B, T, Hkv, D + Dv] (input dtype),
    backward the fp32 dK/dV accumulator of that shape (plus a K/V block on hops 1..W-3).
    "ulysses": 2 all-to-alls per direction (q, k, v packed, then o; dO, then dq, dk, dv packed),
    KV heads repeated when W does not divide Hkv. Agreement between the ranks (document
    boundaries included) is checked on every call by an 8-byte digest inside the first message
    (``agreement``); the first call with new shapes on a group adds one small all-gather that
    compares the shapes before anything of that size moves (then cached).
    """
    from ..ops.softmax import doc_ids_from_cu_seqlens
    from .softmax_common import SoftmaxCall

    group, layout, cu_seqlens = resolve_placement(batch, group, layout, cu_seqlens, "sp_softmax_attention")
    check_group(group)
    entry = strategies.softmax(strategy)
    _check_layout(entry, layout)
    check_qkv(q, k, v, kv_heads_may_differ=True)
    check_scale(scale)
    rank, world = comm.rank_and_size(group)
    lay = Layout(layout, world, q.shape[1])
    if batch is None:
        check_cu_seqlens(cu_seqlens, lay.global_len, q.shape[0], device=q.device)
    else:
        batch.check_local(q.shape[1], q.shape[0], "sp_softmax_attention")
    if entry.heads_divisible and q.shape[2] % world:
        any_heads = " or ".join(map(repr, strategies.with_capability(strategies.SOFTMAX,
                                                                     lambda e: not e.heads_divisible)))
        raise ValueError(f"strategy={strategy!r} shards the query heads over the group, so H = {q.shape[2]} "
                         f"must be a multiple of the group size W = {world}; use a head count divisible "
                         f"by {world}, or strategy={any_heads}, which work with any H")
    scale = resolve_scale(scale, q)
    kernel = softmax_backends.resolve(backend, q, needs_grad=softmax_backends.needs_grad(q, k, v))
    signature = (f"sp_softmax_attention strategy={strategy} layout={layout} causal={causal} scale={scale!r} "
                 f"q={_describe(q)} k={_describe(k)} v={_describe(v)} docs={cu_seqlens is not None}")
    # Shapes once per signature and group; everything else (the document boundaries included)
    # every call, inside the strategy's first message (``agreement``).
    comm.ensure_agreement(group, signature)
    if world == 1:
        return functional.softmax_attention(q, k, v, scale=scale, causal=causal, cu_seqlens=cu_seqlens,
                                            backend=kernel)
    doc = None if cu_seqlens is None else doc_ids_from_cu_seqlens(cu_seqlens.to(q.device), lay.global_len)
    checks = batch is None or batch.checks
    digest = agreement.call_digest(signature, cu_seqlens) if checks else agreement.UNCHECKED
    cu_list = _host_documents(batch, cu_seqlens)
    return entry.load().apply(q, k, v, SoftmaxCall(scale, causal, lay, group, doc, digest=digest, cu_list=cu_list,
                                                   backend=kernel))
