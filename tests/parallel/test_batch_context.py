"""The per-batch context (``SPBatch``) in place of group / layout / cu_seqlens: the arguments it
replaces may not contradict it (a ValueError naming the fix), and its host views are right."""
from __future__ import annotations

import pytest
import torch

from lasp2.parallel.batch import SPBatch, resolve_placement
from lasp2.parallel.layout import Layout


def _batch(layout="zigzag"):
    cu = torch.tensor([0, 5, 16])
    group = object()
    return SPBatch(group, Layout(layout, 2, 8), 0, 1, torch.arange(8), torch.arange(8), cu, torch.tensor([0, 8]), 1,
                   cu_list=(0, 5, 16))


def test_the_batch_places_the_call():
    b = _batch()
    assert resolve_placement(b, None, None, None, "op") == (b.group, "zigzag", b.cu_seqlens)
    assert resolve_placement(None, "g", None, None, "op") == ("g", "contiguous", None)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(group="another"), "group differs"),
    (dict(layout="contiguous"), "layout='contiguous' but the batch was sharded with layout='zigzag'"),
    (dict(cu_seqlens=torch.tensor([0, 16])), "pass batch or cu_seqlens, not both"),
])
def test_contradicting_arguments_are_value_errors(kwargs, needle):
    args = {"group": None, "layout": None, "cu_seqlens": None, **kwargs}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        resolve_placement(_batch(), args["group"], args["layout"], args["cu_seqlens"], "op")


def test_not_a_batch_is_a_value_error():
    with pytest.raises(ValueError, match="batch must be an SPBatch"):
        resolve_placement({"cu_seqlens": None}, None, None, None, "op")


def test_local_shape_is_checked():
    with pytest.raises(ValueError, match="1 x 8"):
        _batch().check_local(6, 1, "op")
