"""Public sequence-parallel functions (DESIGN §2): validate, check that ranks agree, dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from .. import functional
from ..ops import backends
from ..ops.transition import classify
from ..validation import (check_beta, check_choice, check_cu_seqlens, check_gate, check_group, check_initial_state,
                          check_qkv, check_scale, resolve_scale)
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
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
):
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
        initial_state: None, or [B, H, K, V] (any floating dtype; used in the state dtype, fp32
            — fp64 for fp64 inputs): the state before the first token of the whole sequence,
            identical on every rank (part of the agreement digest, unless a batch context
            without ``checks`` says the ranks agree). Causal only; not with ``cu_seqlens``.
        output_final_state: also return the state after the last token of the whole sequence
            (causal only; not with ``cu_seqlens``: per-document states are not supported under
            SP yet, ValueError).

    Returns:
        o [B, T, H, V], this rank's shard, in q's dtype; with ``output_final_state`` the pair
        (o, final_state [B, H, K, V] fp32 — fp64 for fp64 inputs —), final_state bitwise
        identical on every rank. Differentiable w.r.t. q, k, v, g, beta and initial_state.
        Gradient convention (that of collectives' autograd): the gradient a rank feeds into its
        copy of final_state is one term of a sum over the ranks (a loss on the final state taken
        on one rank, zero elsewhere, gives the single-device gradient); each rank's gradient of
        initial_state is its share of the single-device one (the sum over ranks is it: the owner
        of the first segment, rank 0, gets all of it, the others zeros). Every rank must still
        backpropagate through the call.

    Communication (causal, per call): "lasp2": forward 1 all-gather of [W, S, B*H*(K*V + a) + 1]
    fp32 (S = 1 contiguous, 2 zigzag; a = 1 without or with a scalar gate, K per-channel, K*K
    for the delta rule), backward 1 all-gather of [W, S, B, H, K, V]
    fp32 ([W, S + 1, ...] with output_final_state); initial and final states add no collective. "lasp1": W - 1 sequential sends of [B, H, K, V] per direction (contiguous). "allscan":
    per direction one [B, H, K, V] state received per segment in k blocks, J + k - 2 block hops
    (J = W contiguous, 2W zigzag). "tree": ceil(log2 J) rounds of P2P exchanges of one summary
    [B*H*(K*V + a)] per segment. "lasp1", "allscan", "tree" with output_final_state: + 1
    all-gather of [W, B, H, K, V] per direction (the final state from the last segment's owner;
    its gradient's terms). An initial state adds nothing to any strategy. Agreement between the ranks is checked on every call by an
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
    _check_states(initial_state, output_final_state, q, v, causal, cu_seqlens)
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
                 f"docs={cu_seqlens is not None} blocks={scan_blocks} initial_state={_describe(initial_state)} "
                 f"final_state={output_final_state}")
    comm.ensure_agreement(group, signature)  # shapes: once per signature and group
    if world == 1:
        o, final = functional.linear_attention(q, k, v, g, beta, scale=scale, causal=causal, cu_seqlens=cu_seqlens,
                                               backend=backend, initial_state=initial_state,
                                               output_final_state=output_final_state)
        return (o, final) if output_final_state else o
    # Everything, every call, rides the first message; with a batch context, checked once per batch.
    digest = (agreement.call_digest(signature + _value_tag(initial_state), cu_seqlens) if checks
              else agreement.UNCHECKED)
    cu_list = _host_documents(batch, cu_seqlens)
    if not causal:
        return entry.bidirectional.apply(q, k, v, scale, lay, group, cu_list, digest)
    call = LinearCall(group, lay, scale, cu_list, digest=digest, grad_enabled=torch.is_grad_enabled(),
                      blocks=scan_blocks, backend=backend, output_final_state=output_final_state)
    return LinearSPFunction.apply(q, k, v, g, beta, initial_state, call, entry.exchange, kind)


def _check_states(initial_state, output_final_state, q, v, causal: bool, cu_seqlens) -> None:
    """``initial_state`` / ``output_final_state`` of ``sp_linear_attention``: ValueError naming the
    argument (same on every rank: it depends only on arguments the ranks agree on)."""
    if not isinstance(output_final_state, bool):
        raise ValueError(f"output_final_state must be True or False, got {output_final_state!r}")
    if initial_state is None and not output_final_state:
        return
    if not causal:
        raise ValueError("initial_state and output_final_state need causal=True (bidirectional attention has "
                         "no running state); pass initial_state=None and output_final_state=False")
    if cu_seqlens is not None:
        raise ValueError("initial_state and output_final_state are not supported with cu_seqlens under sequence "
                         "parallelism (per-document states would need states inside a segment); run each "
                         "document as its own sequence, or pass cu_seqlens=None")
    check_initial_state(initial_state, q, v, None)


def _value_tag(initial_state: Optional[torch.Tensor]) -> str:
    """The initial state's bits as a short hash for the agreement digest ('' without one): ranks
    whose initial states differ in any bit get the digest error, never a mixed result. One host
    read of the state (on CUDA: a sync), only on calls that check agreement."""
    if initial_state is None:
        return ""
    import hashlib

    raw = initial_state.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return " initial_state_bits=" + hashlib.blake2b(raw, digest_size=8).hexdigest()


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
    return_kv: bool = False,
):
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
        return_kv: also return the K/V of the whole sequence (a decode cache).

    Returns:
        o [B, T, H, Dv], this rank's shard, in q's dtype (computed in fp32 for half precision).
        Differentiable w.r.t. q, k, v. With ``return_kv``: (o, (K [B, W T, Hkv, D],
        V [B, W T, Hkv, Dv])) in k's / v's dtype, in global sequence order (zigzag segments put
        back), identical on every rank; not differentiable.

    Communication (per call, W > 1): "allgather": forward 1 all-gather of [W, B, T, Hkv, D + Dv]
    in the input dtype; backward 1 reduce-scatter of the same shape in fp32 (fp64 for fp64).
    "ring": W - 1 send/recv hops per direction; forward K/V [B, T, Hkv, D + Dv] (input dtype),
    backward the fp32 dK/dV accumulator of that shape (plus a K/V block on hops 1..W-3).
    "ulysses": 2 all-to-alls per direction (q, k, v packed, then o; dO, then dq, dk, dv packed),
    KV heads repeated when W does not divide Hkv. Agreement between the ranks (document
    boundaries included) is checked on every call by an 8-byte digest inside the first message
    (``agreement``); the first call with new shapes on a group adds one small all-gather that
    compares the shapes before anything of that size moves (then cached). return_kv: "allgather"
    adds nothing (its gather already holds them); "ring" and "ulysses" add 1 all-gather of
    [W, B, T, Hkv, D + Dv] in the input dtype.
    """
    from ..ops.softmax import doc_ids_from_cu_seqlens
    from .softmax_common import SoftmaxCall

    group, layout, cu_seqlens = resolve_placement(batch, group, layout, cu_seqlens, "sp_softmax_attention")
    check_group(group)
    entry = strategies.softmax(strategy)
    _check_layout(entry, layout)
    check_qkv(q, k, v, kv_heads_may_differ=True)
    check_scale(scale)
    if not isinstance(return_kv, bool):
        raise ValueError(f"return_kv must be True or False, got {return_kv!r}")
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
    signature = (f"sp_softmax_attention strategy={strategy} layout={layout} causal={causal} scale={scale!r} "
                 f"q={_describe(q)} k={_describe(k)} v={_describe(v)} docs={cu_seqlens is not None} "
                 f"return_kv={return_kv}")
    # Shapes once per signature and group; everything else (the document boundaries included)
    # every call, inside the strategy's first message (``agreement``).
    comm.ensure_agreement(group, signature)
    if world == 1:
        o = functional.softmax_attention(q, k, v, scale=scale, causal=causal, cu_seqlens=cu_seqlens)
        return (o, (k.detach(), v.detach())) if return_kv else o
    doc = None if cu_seqlens is None else doc_ids_from_cu_seqlens(cu_seqlens.to(q.device), lay.global_len)
    checks = batch is None or batch.checks
    digest = agreement.call_digest(signature, cu_seqlens) if checks else agreement.UNCHECKED
    cu_list = _host_documents(batch, cu_seqlens)
    call = SoftmaxCall(scale, causal, lay, group, doc, digest=digest, cu_list=cu_list)
    if not return_kv:
        return entry.load().apply(q, k, v, call)
    from .softmax_allgather import kv_in_sequence_order

    if entry.pattern == "all-gather":  # its one gather already holds every rank's K/V
        o, kv_all = entry.load().apply(q, k, v, call, True)
    else:  # gather once more, K and V packed in one message
        o = entry.load().apply(q, k, v, call)
        kv_all = comm.all_gather(torch.cat([k.detach(), v.detach().to(k.dtype)], dim=-1).contiguous(), group)
    k_all, v_all = kv_in_sequence_order(kv_all, lay, k.shape[-1])
    return o, (k_all, v_all.to(v.dtype))
