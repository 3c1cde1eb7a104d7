"""``lasp2.hf.sp_prefill``: a prompt prefilled under SP, then the model's own ``generate``.

Every case, on every rank: the greedy tokens from the SP-prefilled cache equal plain
single-process ``generate`` (and the no-cache recompute, which that is for these models), the
prefilled states equal transformers' own prefill of the same prefix (shapes, dtypes; values to
fp32 precision: transformers' scans run in fp32), and a positive control: the same generate from
the cache with its linear states zeroed gives other tokens (so a lost state cannot pass).
Prompts of 15 tokens: W = 2 prefills 12 (zigzag, 2W = 4) or 14 (contiguous), the rest is fed by
``generate``. The pitfalls of transformers' caches each have a check (named in the case).
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import lasp2.hf  # noqa: E402
from lasp2.hf.families import family_of, mixer_class  # noqa: E402
from lasp2.hf.loading import use_torch_kernels  # noqa: E402
from tests.dist import Spawns, run_sections  # noqa: E402
from tests.helpers import max_rel_err  # noqa: E402
from tests.hf_reference import make_model  # noqa: E402

T, NEW = 15, 5
STATE_TOL = 1e-4  # fp32 scans (transformers') vs fp64 (lasp2), relative to the largest entry
DEFAULT = ("qwen3_5", "qwen3_next", "bamba", "minimax", "kimi_linear")
SLOW = ("qwen3_5_moe", "olmo_hybrid", "mamba2", "nemotron_h", "granitemoehybrid", "falcon_h1", "mamba", "jamba",
        "lfm2", "bailing_hybrid")


AMPLIFY = 8.0  # linear mixers' output projections scaled: with default init the tokens ignore the states
# Falcon-H1 runs attention beside every mixer: its attention output is silenced too (its K/V are
# still checked against transformers' own cache). Jamba and LFM2: no weights found under which the
# tokens follow the states (LFM2's state is 2 conv inputs; Jamba's MoE dominates): their cases
# check the states against transformers' own prefill and the tokens, without the token control.
SILENCE_ATTENTION = ("falcon_h1",)
NO_TOKEN_CONTROL = ("jamba", "lfm2")


def state_sensitive(model):
    """``model`` with its linear mixers' output projections scaled by AMPLIFY (and, for the
    families in SILENCE_ATTENTION, its attention outputs zeroed), so that the greedy tokens depend
    on the carried states (the positive control of every case shows they do)."""
    family = family_of(model)
    with torch.no_grad():
        for m in model.modules():
            if mixer_class(m, set(family.linear)) is not None:
                for name in ("out_proj", "o_proj"):
                    if hasattr(m, name):
                        getattr(m, name).weight.mul_(AMPLIFY)
            elif family.name in SILENCE_ATTENTION and mixer_class(m, set(family.softmax)) is not None:
                m.o_proj.weight.zero_()
    return model


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache=None):
    kw = {} if cache is None else {"cache": cache}
    out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True, **kw)
    return out[0, ids.shape[1]:].tolist()


def _linear_states(cache, kv: bool = False):
    """(kind, layer, tensor) of every state the prefill wrote (with ``kv``: the K/V too)."""
    out = []
    for i, layer in enumerate(cache.layers):
        if kv and getattr(layer, "keys", None) is not None and layer.keys.shape[-1] > 1:  # not MiniMax's placeholder
            out += [("keys", i, layer.keys), ("values", i, layer.values)]
        for name in ("conv_states", "recurrent_states"):
            for t in getattr(layer, name, {}).values():
                if t is not None:
                    out.append((name, i, t))
    for i, t in enumerate(getattr(cache, "linear_cache", [])):
        if isinstance(t, torch.Tensor):
            out.append(("linear_cache", i, t))
    return out


def _own_prefill(model, ids, P):
    with torch.no_grad():
        out = model(ids[:, :P], use_cache=True)
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _case(group, family: str, layout: str, parallelized: bool = False):
    sys.modules.setdefault("fla", None)
    model = state_sensitive(make_model(family, torch.float64).eval())
    use_torch_kernels(model)
    ids = _ids(model.config.vocab_size)
    want = _generate(model, ids)
    if parallelized:
        lasp2.hf.parallelize(model, group, layout=layout)
    cache = lasp2.hf.sp_prefill(model, ids, group=group, layout=layout)
    P = cache._lasp2_prefilled
    mine = [(k, i, t.clone()) for k, i, t in _linear_states(cache, kv=True)]
    length = int(cache.get_seq_length())
    got = _generate(model, ids, cache)
    control = lasp2.hf.sp_prefill(model, ids, group=group, layout=layout)
    for _, _, t in _linear_states(control):
        t.zero_()
    zeroed = _generate(model, ids, control)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, got, group=group)
    # checks, after every collective
    assert P == (T - 1) // (dist.get_world_size(group) * (2 if layout == "zigzag" else 1)) * \
        (dist.get_world_size(group) * (2 if layout == "zigzag" else 1)) and 0 < P < T
    assert length == P, f"cache.get_seq_length() = {length}, not the {P} prefilled tokens (generate would re-feed)"
    assert all(g == got for g in gathered), f"ranks generated different tokens: {gathered}"
    assert zeroed != want or family in NO_TOKEN_CONTROL, "control: the tokens do not depend on the carried states"
    assert got == want, f"sp_prefill + generate {got} != plain generate {want}"
    if not parallelized:
        theirs = _linear_states(_own_prefill(model, ids, P), kv=True)
        assert [(k, i, tuple(t.shape), t.dtype) for k, i, t in mine] == \
            [(k, i, tuple(t.shape), t.dtype) for k, i, t in theirs], "cache layout differs from transformers' own"
        for (k, i, a), (_, _, b) in zip(mine, theirs):
            a, b = (a[..., 1:], b[..., 1:]) if k == "conv_states" else (a, b)  # the oldest conv slot is never read
            assert max_rel_err(a, b) < STATE_TOL, (k, i, max_rel_err(a, b))
    return got


def _gdn_reads_state_after_conv(group):
    """Qwen3.5's get_recurrent_state is None until the conv state is set: the prefill sets it."""
    model = make_model("qwen3_5", torch.float64).eval()
    cache = lasp2.hf.sp_prefill(model, _ids(model.config.vocab_size), group=group, layout="zigzag")
    for i, kind in enumerate(model.config.layer_types):
        if kind == "linear_attention":
            assert cache.get_recurrent_state(i) is not None and cache.has_previous_state(i)


def _refusals(group):
    for family in ("zamba2", "falcon_mamba"):  # never a wrong cache: refused, naming the family
        model = make_model(family, torch.float64).eval()
        with pytest.raises(ValueError, match=family):
            lasp2.hf.sp_prefill(model, _ids(model.config.vocab_size), group=group)
    qwen = make_model("qwen3_5", torch.float64)
    with pytest.raises(ValueError, match="eval"):
        lasp2.hf.sp_prefill(qwen.train(), _ids(qwen.config.vocab_size), group=group)
    with pytest.raises(ValueError, match="layout"):
        lasp2.hf.sp_prefill(qwen.eval(), _ids(qwen.config.vocab_size), group=group, layout="diagonal")
    ids = _ids(qwen.config.vocab_size, seed=dist.get_rank(group))
    with pytest.raises(ValueError, match="different"):
        lasp2.hf.sp_prefill(qwen, ids, group=group)


def _worker(group, families):
    sections = [(f"{fam}-{layout}", lambda g, f=fam, lay=layout: _case(g, f, lay))
                for fam in families for layout in ("zigzag", "contiguous")[:1 if fam != families[0] else 2]]
    if families == DEFAULT:
        sections += [("parallelized", lambda g: _case(g, "qwen3_5", "zigzag", parallelized=True)),
                     ("conv-first", _gdn_reads_state_after_conv), ("refusals", _refusals)]
    else:  # MLA + KDA, parallelized: the decode path drops the MLA layers' SP forwards too
        sections += [(f"{fam}-parallelized", lambda g, f=fam: _case(g, f, "zigzag", parallelized=True))
                     for fam in ("kimi_linear", "bailing_hybrid")]
    return run_sections(group, sections)


# The default run shares test_hf_autocast's and test_hf_misuse's spawn ("hf-usage": the ranks import
# transformers once for the three modules; every worker there keeps fla unimported, as _case does).
SPAWNS = Spawns(_worker, DEFAULT, pool="hf-usage", timeout=900)
SPAWNS_SLOW = Spawns(_worker, SLOW, pool="hf-prefill-slow", timeout=900)


@pytest.mark.parametrize("case", ["qwen3_5-zigzag", "qwen3_5-contiguous", "qwen3_next-zigzag", "bamba-zigzag",
                                  "minimax-zigzag", "kimi_linear-zigzag"])
def test_sp_prefill_generate_equals_plain_generate(case):
    SPAWNS.results(2, case)


def test_parallelized_model_generates_from_sp_prefill():
    SPAWNS.results(2, "parallelized")


def test_recurrent_state_readable_after_prefill():
    SPAWNS.results(2, "conv-first")


def test_sp_prefill_refusals():
    SPAWNS.results(2, "refusals")


@pytest.mark.slow
@pytest.mark.parametrize("family", SLOW)
def test_sp_prefill_every_family(family):
    SPAWNS_SLOW.results(2, f"{family}-zigzag")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["kimi_linear", "bailing_hybrid"])
def test_parallelized_mla_model_generates_from_sp_prefill(family):
    SPAWNS_SLOW.results(2, f"{family}-parallelized")


def test_mixer_without_prefill_is_a_value_error(monkeypatch):
    """A family whose mixer class has no prefill forward: a ValueError naming the family and the
    class (before any communication), never a KeyError."""
    from lasp2.hf import prefill

    model = make_model("qwen3_5", torch.float64).eval()
    monkeypatch.delitem(prefill.MIXER_PREFILL, "Qwen3_5GatedDeltaNet")
    with pytest.raises(ValueError, match="qwen3_5.*Qwen3_5GatedDeltaNet"):
        prefill.check_prefill_support(model, family_of(model))



def test_every_family_prefills_or_is_refused():
    """Every family lasp2.hf supports has a prefill for each of its mixers, or a reason in UNSUPPORTED."""
    from lasp2.hf import prefill
    from lasp2.hf.families import FAMILIES

    for f in FAMILIES:
        missing = set(f.linear) - set(prefill.MIXER_PREFILL)
        assert f.name in prefill.UNSUPPORTED or not missing, (f.name, missing)
