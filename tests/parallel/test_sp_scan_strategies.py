"""``allscan`` (pipelined chain) and ``tree`` (log-depth scan) vs the single-device op on the whole
sequence, shard by shard (output and every gradient, fp64, 1e-10 relative), and their
communication per rank: P2P only; allscan receives one state per segment and direction whatever
W; tree takes ceil(log2 J) rounds. One spawn per world size runs the whole table (tiny shapes:
W = 8 oversubscribes a 2-core machine)."""
from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.distributed as dist

from lasp2.parallel.layout import Layout
from lasp2.parallel.tree import tree_rounds
from tests.dist import DistributedError, run_cases, run_distributed
from tests.helpers import DIAGONAL_VARIANTS, KDA, MATRIX_VARIANTS
from tests.sp_cases import compare_linear

B, H, K, V = 1, 2, 3, 4
STATE_BYTES = B * H * K * V * 8  # one fp64 state


def _expect(result, params, rank, W):
    """The per-rank communication contract of the scan strategies."""
    assert result["fwd_gathers"] == result["bwd_gathers"] == 0, "P2P only: no all-gather"
    lay = Layout(params["layout"], W, params["T_local"])
    J, mine = lay.num_segments, lay.segment_indices(rank)
    # segments whose neighbour in the scan direction lives on another rank
    remote_prev = sum(1 for j in mine if j > 0 and lay.owner(j - 1) != rank)
    remote_next = sum(1 for j in mine if j < J - 1 and lay.owner(j + 1) != rank)
    if params["strategy"] == "allscan":
        # one state per such segment and direction, in k blocks: independent of W
        k = params.get("scan_blocks") or 1
        # + block 0 carries the W 8-byte agreement digests seen upstream (parallel.agreement)
        assert result["fwd_recv_bytes"] == remote_prev * (STATE_BYTES + 8 * W), result
        assert result["bwd_recv_bytes"] == remote_next * (STATE_BYTES + 8 * W), result
        assert result["fwd_recvs"] == remote_prev * k and result["bwd_recvs"] == remote_next * k, result
    else:
        # round d: scan position i receives from position i - 2^d (another rank's, or handed over)
        rounds = tree_rounds(J)
        pos_fwd, pos_bwd = list(mine), [J - 1 - j for j in mine]
        order_bwd = list(range(J - 1, -1, -1))
        exp_fwd = sum(1 for d in range(rounds) for i in pos_fwd
                      if i >= 1 << d and lay.owner(i - (1 << d)) != rank)
        exp_bwd = sum(1 for d in range(rounds) for i in pos_bwd
                      if i >= 1 << d and lay.owner(order_bwd[i - (1 << d)]) != rank)
        assert result["fwd_recvs"] == exp_fwd and result["bwd_recvs"] == exp_bwd, result
        summary = STATE_BYTES + (B * H * (K * K if params["variant"] in MATRIX_VARIANTS else
                                          (K if params["variant"] == "channel" else 1)) * 8) + 8 * W  # + digests
        assert result["fwd_recv_bytes"] == exp_fwd * summary, result
        if params["layout"] == "contiguous" and rank == W - 1:
            assert result["fwd_recvs"] == rounds == (W - 1).bit_length(), "last rank: one receive per round"


def _worker(group, tables):
    """``tables``: {W: cases}. Runs each table on the group of ranks 0..W-1 (new_group is
    collective over the world, so every rank creates every group; ranks outside a group skip its
    table): several world sizes in one spawn."""
    rank = dist.get_rank(group)
    groups = {W: group if W == dist.get_world_size(group) else dist.new_group(list(range(W)))
              for W in sorted(tables)}
    for W, cases in sorted(tables.items()):
        if rank < W:
            sub = groups[W]
            run_cases([(f"W{W}-{name}", p) for name, p in cases],
                      lambda **p: _expect(compare_linear(sub, B=B, H=H, K=K, V=V, dtype=torch.float64, **p),
                                          p, rank, W))
    return True


def _cases(W, variants, strategies=("allscan", "tree"), layouts=("contiguous", "zigzag"), docs=True,
           doc_variants=("scalar", "gated_deltanet")):
    T_local = 10
    out = []
    for variant, strategy, layout in itertools.product(variants, strategies, layouts):
        extra = {"scan_blocks": 3} if strategy == "allscan" and variant != "basic" else {}
        out.append((f"{variant}-{strategy}-{layout}", dict(variant=variant, T_local=T_local, strategy=strategy,
                                                           layout=layout, **extra)))
    if docs:  # documents cut mid-rank, one on a rank boundary, a rank without a start
        T = W * T_local
        cu = [0, 3, T_local, T_local + 7, T]
        for variant, strategy in itertools.product(doc_variants, strategies):
            out.append((f"docs-{variant}-{strategy}", dict(variant=variant, T_local=T_local, strategy=strategy,
                                                           layout="zigzag", cu=cu)))
    return out


ALL = DIAGONAL_VARIANTS + MATRIX_VARIANTS


def _w8_cases():
    return [c for c in _cases(8, ("scalar", "gated_deltanet"), docs=False)
            if (c[1]["strategy"] == "tree") != (c[1]["variant"] == "scalar") and c[1]["layout"] == "zigzag"]


def test_scan_strategies_match_single_device():
    """Default run, one spawn of 4 ranks: W = 3 (non-power-of-two) on both families, both layouts
    and documents; W = 2 and 4 on a few cases each (tree: 1, 2 and 3 rounds)."""
    tables = {
        2: [c for c in _cases(2, ("channel",), docs=False) if c[1]["layout"] == "zigzag"],
        3: [c for c in _cases(3, ("scalar", "gated_deltanet"))  # documents: one case per strategy
            if not c[0].startswith("docs") or (c[1]["strategy"] == "tree") == (c[1]["variant"] != "scalar")],
        4: [c for c in _cases(4, ("constant", "deltanet"), docs=False)
            if (c[1]["strategy"] == "tree") == (c[1]["layout"] == "contiguous")]
        # KDA: allscan zigzag with documents, tree contiguous
        + [c for c in _cases(4, (KDA,), doc_variants=(KDA,))
           if c[0] in ("kda-tree-contiguous", "docs-kda-allscan")],
    }
    run_distributed(_worker, 4, tables)


@pytest.mark.slow
def test_scan_strategies_w8():
    """W = 8 (2W = 16 zigzag segments: 5 tree rounds; a 15-hop chain): 8 spawned ranks cost ~16 s
    of CPU on their own, so this runs with the slow tests."""
    run_distributed(_worker, 8, {8: _w8_cases()})


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_scan_strategies_every_variant(world_size):
    variants = ALL if world_size < 8 else ("basic", "channel", "gated_deltanet")
    run_distributed(_worker, world_size, {world_size: _cases(world_size, variants)})


def _raise_mid_chain(group, strategy):
    """Rank 1 raises while its successors wait for the state it should forward."""
    import lasp2
    from lasp2.parallel import allscan, tree

    if dist.get_rank(group) == 1:
        def boom(*a, **k):
            raise RuntimeError("injected failure on rank 1")
        allscan.apply_transition = boom
        tree.compose = boom
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    lasp2.sp_linear_attention(q, k, v, group=group, strategy=strategy, scan_blocks=2 if strategy == "allscan" else None)
    return dist.get_rank(group)


@pytest.mark.slow  # ~5 s of CPU but ~20 s of wall: the harness waits for the ranks to exit
@pytest.mark.parametrize("strategy", ["allscan", "tree"])
def test_rank_raising_mid_chain_does_not_hang(strategy):
    timeout = 120.0
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match="injected failure on rank 1"):
        run_distributed(_raise_mid_chain, 3, strategy, timeout=timeout)
    assert time.monotonic() - t0 < timeout / 2, "the others were not released promptly"


def test_exchange_thread_errors_reach_the_caller_promptly():
    """The short form of the test above, in one process: an exchange running beside the local
    work (``linear_sp.overlapped``) that raises, e.g. because its peer died mid-chain, raises in
    the caller; a local-work error is raised at once even while the exchange still blocks."""
    import threading

    from lasp2.parallel.linear_sp import overlapped

    def broken_exchange():
        raise RuntimeError("peer closed the connection")

    with pytest.raises(RuntimeError, match="peer closed"):
        overlapped(broken_exchange, lambda: None)
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="local"):
        overlapped(lambda: release.wait(60), lambda: (_ for _ in ()).throw(ValueError("local work failed")))
    assert time.monotonic() - t0 < 30, "waited for the blocked exchange"  # it would take 60 s
    release.set()
    assert overlapped(lambda: 7, lambda: None) == 7


def test_chain_digests_survive_messages_of_odd_size():
    """A state of odd fp32 size (e.g. H = 1, K = V = 8 plus a scalar gate: 65 elements) puts the
    digests after it at an address an int64 view cannot start from; they are read all the same."""
    from lasp2.parallel.agreement import ChainDigests

    x = torch.randn(65)
    msg = ChainDigests(3, 0, 12345).attach(x)
    receiver = ChainDigests(3, 1, 12345)
    assert torch.equal(receiver.detach(msg, x), x)
    assert receiver.seen == [12345, 12345, 0]
