"""sp_softmax_attention(backend="flex") forward on CPU, shard by shard against the single-device
blockwise op on the whole sequence: every softmax strategy, zigzag positions, packed documents,
GQA (FlexAttention has no CPU backward in torch 2.13; the backward is measured on CUDA by
``lasp2 bench --suite gpu``, and its math by tests/ops/test_softmax_flex.py). Runs at W = 2 in the
shared "sp" spawn (the other world sizes skip it: W = 1 dispatches to the one-device op, tested
there)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp2
from tests.dist import Spawns, run_cases, run_sections
from tests.helpers import assert_close


def compare(group, *, strategy: str, layout: str, docs: bool, heads=(4, 2), dtype=torch.float64):
    """Forward with a batch context, against the reference shard; the second call (block masks
    cached, shapes agreed) reads no tensor on the host inside lasp2 (each a sync on GPUs)."""
    from tests.models.test_no_host_syncs import count_host_reads

    W = dist.get_world_size(group)
    T = 16 * W
    gen = torch.Generator().manual_seed(5)
    H, Hkv = heads
    q, k, v = (torch.randn(1, T, h, d, generator=gen, dtype=dtype) for h, d in ((H, 8), (Hkv, 8), (Hkv, 4)))
    cu = torch.tensor([0, 5, T - 9, T]) if docs else None
    ref = lasp2.softmax_attention(q, k, v, cu_seqlens=cu, backend="torch")
    local = [lasp2.shard(x, group=group, layout=layout) for x in (q, k, v)]
    batch = lasp2.SPBatch.build(group, layout, T, 1, cu_seqlens=cu)
    with torch.no_grad():
        lasp2.sp_softmax_attention(*local, strategy=strategy, batch=batch, backend="flex")  # builds, agrees
        reads = count_host_reads(lambda: local.append(
            lasp2.sp_softmax_attention(*local[:3], strategy=strategy, batch=batch, backend="flex")))
    assert not reads, f"{strategy}: host reads in lasp2 with a batch context: {dict(reads)}"
    assert_close(f"{strategy} {layout} docs={docs} o", local[3], lasp2.shard(ref, group=group, layout=layout), dtype,
                 whole=ref)


def flex_backward_wiring(group, strategy: str, layout: str = "zigzag"):
    """The SP strategies' flex backward path (``block_bwd`` -> ``recompute_bwd``: a slot's attention
    recomputed with autograd and the log-sum-exp merge backpropagated into it) on CPU, with the
    one piece CPU lacks, FlexAttention's own backward, stood in for by the blockwise op (same
    contract: differentiable (o, lse)). Output and every gradient against the one-device op, fp64."""
    from lasp2.ops import softmax_backends
    from lasp2.ops.softmax import BlockwiseAttention, doc_ids_from_cu_seqlens
    from lasp2.parallel import agreement, strategies
    from lasp2.parallel.layout import Layout
    from lasp2.parallel.softmax_common import SoftmaxCall

    W = dist.get_world_size(group)
    T = 16 * W
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, T, h, d, generator=gen, dtype=torch.float64) for h, d in ((4, 8), (2, 8), (2, 4)))
    w = torch.randn(1, T, 4, 4, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 5, T - 9, T])
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = lasp2.softmax_attention(*ref, cu_seqlens=cu, backend="torch")
    g_ref = torch.autograd.grad((o_ref * w).sum(), ref)
    shard = lambda x: lasp2.shard(x, group=group, layout=layout)  # noqa: E731
    call = SoftmaxCall(8 ** -0.5, True, Layout(layout, W, T // W), group, doc_ids_from_cu_seqlens(cu, T),
                       digest=agreement.UNCHECKED, cu_list=tuple(cu.tolist()), backend="flex")
    saved = softmax_backends.flex_attention_lse
    softmax_backends.flex_attention_lse = lambda a, b, c, mask, scale: BlockwiseAttention.apply(a, b, c, mask, scale, 8)
    try:
        leaves = [shard(x).clone().requires_grad_() for x in (q, k, v)]
        o = strategies.softmax(strategy).load().apply(*leaves, call)
        grads = torch.autograd.grad((o * shard(w)).sum(), leaves)
    finally:
        softmax_backends.flex_attention_lse = saved
    assert_close(f"{strategy} o", o, shard(o_ref), torch.float64, whole=o_ref)
    for name, got, r in zip(("dq", "dk", "dv"), grads, g_ref):
        assert_close(f"{strategy} {name}", got, shard(r), torch.float64, whole=r)


def _cases(full: bool):
    out = [(f"{s}-zigzag-docs", dict(strategy=s, layout="zigzag", docs=True)) for s in ("allgather", "ring", "ulysses")]
    if full:
        out += [(f"{s}-contiguous-{d}-{dt}", dict(strategy=s, layout="contiguous", docs=d, dtype=dt, heads=h))
                for s in ("allgather", "ring", "ulysses") for d in (False, True)
                for dt, h in ((torch.float64, (4, 4)), (torch.float32, (4, 1)))]
    return out


def _worker(group, full: bool):
    if dist.get_world_size(group) != 2:
        return run_sections(group, [("table", lambda g: None)])

    def table(g):
        run_cases(_cases(full), lambda **p: compare(g, **p))
        run_cases([(f"wiring-{s}", dict(strategy=s)) for s in ("allgather", "ring", "ulysses")],
                  lambda **p: flex_backward_wiring(g, **p))
        if dist.get_rank(g) == 0:  # the refusal comes before any communication, so one rank may test it
            x = torch.randn(1, 8, 4, 8, requires_grad=True)
            with pytest.raises(ValueError, match="no backward on CPU"):
                lasp2.sp_softmax_attention(x, x, x, group=g, backend="flex")
    return run_sections(group, [("table", table)])


SPAWNS = Spawns(_worker, False, pool="sp")
SPAWNS_FULL = Spawns(_worker, True, pool="sp-full")


def test_sp_softmax_flex_forward_w2():
    SPAWNS.results(2, "table")


@pytest.mark.slow
def test_sp_softmax_flex_forward_w2_full():
    SPAWNS_FULL.results(2, "table")
