"""A parallelized transformers model refuses what it cannot compute, with a ValueError on every
rank (never a hang, never a silently wrong answer). Each case is a move a user made that used to
return wrong numbers on some ranks without an error:

- the whole, unsharded sequence fed to the model (rank 1's logits were off by 6.4), or tokens
  sharded by hand without ``shard_batch``'s context;
- ``model.generate(..., use_cache=False)`` (rank 1 decoded other tokens);
- ranks fed different data of the same shapes (rank 1 off by ~20): ``shard_batch`` compares a
  digest of the whole batch across the group, once per batch;
- ``shard_batch(layout=...)`` different from ``parallelize(layout=...)`` (off by 0.1);
- a batch's context reused with other tokens, or position_ids that are not the batch's.

And what must keep working: a user subclass of a supported model class (same layers) is accepted
and exact; a mixer subclass that overrides ``forward`` is refused (its code would be replaced);
the same-data check is one 8-byte all-gather per batch and nothing per layer.

Shares one spawn with ``test_hf_autocast.py`` (pool ``hf-usage``).
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import lasp2  # noqa: E402
import lasp2.hf  # noqa: E402
from lasp2.parallel import comm  # noqa: E402
from tests.dist import Spawns, run_sections  # noqa: E402
from tests.hf_reference import make_model, reference  # noqa: E402

T = 24


def _ids(seed=0):
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(seed))


def _model(group, layout="zigzag", family="qwen3_next"):
    return lasp2.hf.parallelize(make_model(family, torch.float32), group, layout=layout)


def _refusals(group) -> list:
    """Every misuse raises ValueError on this rank; all checks precede any communication of the
    model (or are a collective every rank enters), so the ranks raise together."""
    rank = dist.get_rank(group)
    ids = _ids()
    model = _model(group)
    batch = lasp2.hf.shard_batch(ids, ids, group=group, layout="zigzag")
    seen = []

    def refuses(name, pattern, fn):
        with pytest.raises(ValueError, match=pattern):
            fn()
        seen.append(name)

    refuses("whole sequence", "needs this batch's sequence-parallel context.*shard_batch",
            lambda: model(input_ids=ids))
    refuses("hand-sharded ids", "needs this batch's sequence-parallel context",
            lambda: model(input_ids=lasp2.shard(ids, group=group, layout="zigzag")))
    refuses("whole sequence with a context", r"shape \(1, 24\).*\[1, 12\]",
            lambda: model(input_ids=ids, lasp2_sp=batch["lasp2_sp"]))
    other = lasp2.hf.shard_batch(_ids(1), group=group, layout="zigzag")
    refuses("context of another batch", "not the tokens this batch's context was built for",
            lambda: model(input_ids=other["input_ids"], lasp2_sp=batch["lasp2_sp"]))
    refuses("bad position_ids", "position_ids differ",
            lambda: model(**{**batch, "position_ids": batch["position_ids"] + 1}))
    refuses("not a context", "must be the SPBatch", lambda: model(**{**batch, "lasp2_sp": {"layout": "zigzag"}}))
    contiguous = lasp2.hf.shard_batch(ids, ids, group=group, layout="contiguous")
    refuses("layout mismatch", "layout='contiguous' but the model was parallelized with layout='zigzag'",
            lambda: model(**contiguous))
    refuses("generate", r"lasp2\.hf\.sp_prefill", lambda: model.generate(batch["input_ids"], max_new_tokens=2))
    refuses("generate without cache", r"lasp2\.hf\.sp_prefill",
            lambda: model.generate(ids, max_new_tokens=2, use_cache=False))
    # Different data on the ranks: the same shapes, other content. All ranks enter the digest
    # all-gather and all raise, naming the split.
    mine = _ids(rank)
    refuses("different input_ids", r"different batches.*ranks \[0\].*ranks \[1\]",
            lambda: lasp2.hf.shard_batch(mine, mine, group=group, layout="zigzag"))
    labels = ids.clone()
    labels[0, 5] = -100 if rank else labels[0, 5]
    refuses("different labels", "different batches", lambda: lasp2.hf.shard_batch(ids, labels, group=group))
    docs = torch.tensor([0, 8 + 4 * rank, T])
    refuses("different documents", "different batches",
            lambda: lasp2.hf.shard_batch(ids, group=group, cu_seqlens=docs))
    refuses("different layouts", "different batches",
            lambda: lasp2.hf.shard_batch(ids, group=group, layout=("zigzag", "contiguous")[rank % 2]))
    return seen


def _one_check_per_batch(group) -> dict:
    """shard_batch's same-data check is one all-gather of 8 bytes; the model's forward adds no
    collective for it (its count is the layers' own: one per layer)."""
    ids = _ids()
    model = _model(group)
    with torch.no_grad():
        model(**lasp2.hf.shard_batch(ids, group=group, layout="zigzag"))  # first calls: agreement checks
    with comm.track() as at_shard:
        batch = lasp2.hf.shard_batch(ids, group=group, layout="zigzag")
    with comm.track() as at_forward, torch.no_grad():
        model(**batch)
    assert [(r.op, r.bytes_sent) for r in at_shard.records] == [("all_gather", 8 * (dist.get_world_size(group) - 1))]
    n_layers = model.config.num_hidden_layers
    assert at_forward.count("all_gather") == n_layers, at_forward.records
    return {"shard": at_shard.count(), "forward": at_forward.count()}


def _context(group) -> list:
    """The batch's context, by hand for W = 2, zigzag, T = 24, documents [0, 5, 13, 24]: rank 0
    holds global segments [0, 6) and [18, 24), rank 1 [6, 12) and [12, 18)."""
    ids = _ids()
    batch = lasp2.hf.shard_batch(ids, ids, group=group, layout="zigzag", cu_seqlens=torch.tensor([0, 5, 13, 24]))
    sp = batch["lasp2_sp"]
    rank = dist.get_rank(group)
    positions = [list(range(0, 6)) + list(range(18, 24)), list(range(6, 18))][rank]
    in_document = [[0, 1, 2, 3, 4, 0] + list(range(5, 11)), [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4]][rank]
    local_runs = [[0, 5, 6, 12], [0, 6, 7, 12]][rank]  # cut at document starts and at the segment start
    assert sp.positions.tolist() == positions and sp.position_ids.tolist() == in_document
    assert batch["position_ids"].tolist() == [in_document]
    assert sp.local_cu_seqlens.tolist() == local_runs and sp.cu_seqlens.tolist() == [0, 5, 13, 24]
    assert (sp.layout.name, sp.world, sp.local_len, sp.batch_size) == ("zigzag", 2, 12, 1)
    with pytest.raises(Exception, match="cannot assign"):  # frozen: one batch, one context
        sp.layout = None
    return local_runs


def _subclasses(group) -> float:
    """A subclass of a supported model class (same layers) is parallelized and exact; a mixer
    subclass that overrides forward is refused."""
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    class MyQwen3Next(m.Qwen3NextForCausalLM):
        pass

    class MyGatedDeltaNet(m.Qwen3NextGatedDeltaNet):
        def forward(self, hidden_states, **kwargs):
            return 2 * super().forward(hidden_states, **kwargs)

    ids = _ids()
    ref = reference("qwen3_next", torch.float64, ids)
    base = make_model("qwen3_next", torch.float64)
    model = MyQwen3Next(base.config).to(torch.float64)
    model.load_state_dict(ref["state"])
    lasp2.hf.parallelize(model, group, layout="zigzag")
    logits = model(**lasp2.hf.shard_batch(ids, group=group, layout="zigzag")).logits
    err = ((logits - lasp2.shard(ref["logits"], group=group, layout="zigzag")).abs().max()
           / ref["logits"].abs().max()).item()
    odd = make_model("qwen3_next", torch.float32)
    layer = odd.model.layers[0].linear_attn
    layer.__class__ = MyGatedDeltaNet
    with pytest.raises(ValueError, match="subclass of Qwen3NextGatedDeltaNet that overrides forward"):
        lasp2.hf.parallelize(odd, group)
    assert err < 1e-10, err  # fp64, same computation as test_hf's fp64 cases
    return err


def _worker(group) -> dict:
    sys.modules.setdefault("fla", None)
    return run_sections(group, [("refusals", _refusals), ("one-check", _one_check_per_batch),
                                ("context", _context), ("subclasses", _subclasses)])


SPAWNS = Spawns(_worker, pool="hf-usage", timeout=900)


def test_misuse_is_a_value_error_on_every_rank():
    per_rank = SPAWNS.results(2, "refusals")
    assert per_rank[0] == per_rank[1] and len(per_rank[0]) == 13, per_rank


def test_same_data_check_is_one_tiny_collective_per_batch():
    per_rank = SPAWNS.results(2, "one-check")
    assert all(r["shard"] == 1 for r in per_rank), per_rank


def test_subclass_of_a_supported_model_is_accepted():
    assert all(e < 1e-10 for e in SPAWNS.results(2, "subclasses"))


def test_batch_context_holds_positions_and_documents():
    assert SPAWNS.results(2, "context") == [[0, 5, 6, 12], [0, 6, 7, 12]]
