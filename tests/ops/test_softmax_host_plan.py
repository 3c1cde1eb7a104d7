"""The softmax masks' host-side planning (``HostRanges``: runs of global positions and a host
document list) gives exactly what the tensor planning gives (per-block min/max, rank-pair
visibility), for every layout, world size, document layout and block size; and the dense mask
is the reference for visibility."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from lasp2.ops.attention_mask import AttentionMask, HostRanges, runs_min_max, runs_visible
from lasp2.ops.softmax import doc_ids_from_cu_seqlens
from lasp2.parallel.layout import Layout
from lasp2.parallel.softmax_common import SoftmaxCall, any_visible


def _docs(total: int, rng: random.Random):
    cuts = sorted(rng.sample(range(1, total), rng.randint(0, min(6, total - 1))))
    return [0, *cuts, total]


def _cases():
    rng = random.Random(0)
    for layout, W, T in itertools.product(("contiguous", "zigzag"), (1, 2, 3, 4), (4, 10, 24)):
        for docs in (None, "random", "random", "aligned"):
            total = W * T
            cu = None if docs is None else ([0, T, total] if docs == "aligned" and W > 1 else _docs(total, rng))
            yield layout, W, T, cu


@pytest.mark.parametrize("causal", [True, False])
def test_host_plan_and_visibility_equal_the_tensor_ones(causal):
    checked = 0
    for layout, W, T, cu in _cases():
        lay = Layout(layout, W, T)
        doc = None if cu is None else doc_ids_from_cu_seqlens(torch.tensor(cu), W * T)
        call = SoftmaxCall(1.0, causal, lay, None, doc, cu_list=None if cu is None else tuple(cu))
        for qr, kr in itertools.product(range(W), repeat=2):
            host = call.mask(qr, kr, "cpu")
            assert host.host is not None
            tensor = AttentionMask(causal, host.q_pos, host.k_pos, host.q_doc, host.k_doc)
            for bs in (1, 3, 4, 7, 64):
                assert host.plan(bs) == tensor.plan(bs), (layout, W, T, cu, qr, kr, bs)
            dense = tensor.visible()
            want = True if dense is None else bool(dense.any())
            got = runs_visible(call.runs(qr), call.runs(kr), None if cu is None else tuple(cu), causal)
            assert got == want == any_visible(host.q_pos, host.q_doc, host.k_pos, host.k_doc, causal)
            checked += 1
        glob = call.global_mask("cpu")
        ref = AttentionMask(causal, glob.q_pos, glob.k_pos, glob.q_doc, glob.k_doc)
        assert glob.plan(5) == ref.plan(5)
    assert checked > 500


def test_runs_min_max_spans_segments():
    # zigzag W = 2, T = 8: rank 0 holds global [0, 4) then [12, 16); a block of 6 spans both runs
    runs = ((0, 0, 4), (4, 12, 4))
    assert runs_min_max(runs, 6) == [(0, 13), (14, 15)]
    assert HostRanges(runs, runs).cu is None
