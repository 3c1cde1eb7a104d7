"""``lasp2.hf.sp_prefill``: prefill a long prompt under sequence parallelism into the transformers
``Cache`` that the model's own ``generate`` continues from.

    cache = lasp2.hf.sp_prefill(model, input_ids, group=group, layout="zigzag")   # every rank
    out = model.generate(input_ids, cache=cache, use_cache=True, max_new_tokens=64, do_sample=False)

How. The prompt's longest prefix that splits over the group (a multiple of W, 2W under zigzag)
and leaves at least one token runs once through the model, sharded (``shard_batch``), with every
mixer's forward replaced by its adapter's SP forward that also writes the layer's states
(``prefill_mixers.py``: ``sp_causal_conv1d`` / ``sp_linear_attention`` with
``output_final_state=True``, identical on every rank without extra communication) and every
softmax layer run through ``sp_softmax_attention(..., return_kv=True)`` (the prefix's K/V in
sequence order, written with ``cache.update``). The model is restored afterwards: a plain model
is left unmodified, a parallelized one parallelized. ``generate`` then feeds the rest of the
prompt (at least its last token: a cache covering the whole prompt would make it feed the prompt
again) and decodes on every rank from the same cache, with no communication per token.

Models parallelized by ``lasp2.hf.parallelize`` generate from such a cache (their ``generate``
runs the model's own decode path for the call); without one it raises ValueError.

Communication: one all-gather of an 8-byte digest (every rank holds the same prompt), then the
model's SP forward on the prefix (per layer the linear strategy's all-gather plus the conv's
halo P2P, or LASP-2H's K/V all-gather; an MLA layer also one all-gather of its latent).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Dict

import torch

from ..parallel import comm
from ..parallel.api import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES, sp_softmax_attention
from ..parallel.layout import LAYOUTS
from ..ops.backends import BACKENDS
from ..validation import check_choice, check_group
from . import prefill_mixers as mixers
from .common import SP_KEY, BatchSlot, HFContext, batch_context, make_pre_hook
from .compat import check_family_release
from .decode import PREFILLED, Patches, base_module as _base
from .families import family_of, mixer_class, model_class

ATTN_PREFILL = "lasp2_prefill"


def _gdn(fn):
    return lambda layer, modeling, cache: (lambda *a, **k: fn(layer, modeling.l2norm, cache, *a, **k))


def _plain(fn):
    return lambda layer, modeling, cache: (lambda *a, **k: fn(layer, cache, *a, **k))


# mixer class -> (layer, modeling, cache) -> the layer's prefill forward
MIXER_PREFILL: Dict[str, Callable] = {
    "Qwen3NextGatedDeltaNet": _gdn(mixers.qwen3_next_prefill),
    "Qwen3_5GatedDeltaNet": _gdn(mixers.qwen3_5_prefill),
    "Qwen3_5MoeGatedDeltaNet": _gdn(mixers.qwen3_5_prefill),
    "OlmoHybridGatedDeltaNet": _gdn(mixers.olmo_hybrid_prefill),
    "BambaMixer": _plain(mixers.mamba2_prefill),
    "Mamba2Mixer": _plain(mixers.mamba2_prefill),
    "NemotronHMamba2Mixer": _plain(mixers.mamba2_prefill),
    "GraniteMoeHybridMambaLayer": _plain(mixers.mamba2_prefill),
    "FalconH1Mixer": _plain(mixers.falcon_h1_prefill),
    "Zamba2MambaMixer": _plain(mixers.mamba2_prefill),
    "MambaMixer": _plain(mixers.mamba_prefill),
    "FalconMambaMixer": _plain(mixers.mamba_prefill),
    "JambaMambaMixer": _plain(mixers.mamba_prefill),
    "MiniMaxLightningAttention": _plain(mixers.lightning_prefill),
    "Lfm2ShortConv": _plain(mixers.lfm2_prefill),
    "KimiLinearDeltaAttention": _gdn(mixers.kda_prefill),
    "BailingHybridDeltaAttention": _gdn(mixers.kda_prefill),
    "KimiLinearAttention": _plain(mixers.kimi_mla_prefill),
    "BailingHybridAttention": lambda layer, modeling, cache: (
        lambda *a, **k: mixers.bailing_mla_prefill(layer, modeling, cache, *a, **k)),
}

# family -> why sp_prefill refuses it (never a wrong cache)
UNSUPPORTED: Dict[str, str] = {
    "falcon_mamba": ("transformers 5.25's Falcon-Mamba decode path from a cache does not reproduce its own forward "
                     "(its own prefill cache of a prefix continues with other greedy tokens than plain generate), "
                     "so no cache can; generate Falcon-Mamba without a prefilled cache"),
    "zamba2": ("its attention block is shared by several depths, each caching its own K/V under a layer index "
               "passed at call time, which the attention interface does not see; prefill Zamba2 prompts on one process"),
}
SINCE = (5, 25)  # the transformers release whose Cache layout (conv / recurrent states per layer) the fillers write


def _new_cache(model, family):
    """The cache the model's own forward would create (``DynamicCache(config=...)``, MiniMax's own)."""
    if family.name == "minimax":
        return family.modeling().MiniMaxCache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_PREFILL, prefill_attention)


def prefill_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention interface ``"lasp2_prefill"``: ``common.attention_function`` that also writes the
    prefix's K/V [B, Hkv, P, D] (in sequence order, after RoPE) into the layer's cache."""
    ctx = module._lasp2
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported under sequence parallelism; call model.eval()")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("sliding-window attention is not supported under sequence parallelism")
    o, (k, v) = sp_softmax_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scaling,
                                     causal=True, strategy=ctx.softmax_strategy, batch=batch_context(module, kwargs),
                                     return_kv=True)
    module._lasp2_cache.update(k.transpose(1, 2), v.transpose(1, 2), module.layer_idx)
    return o, None


@contextmanager
def _prefill_mode(model, family, ctx: HFContext, cache):
    """Mixers run their prefill forwards and softmax layers ``"lasp2_prefill"`` for the call; a
    plain model also gets parallelize's pre-hook (the batch's SP context, positions, no masks)."""
    patches, modeling = Patches(), family.modeling()
    slot = BatchSlot() if family.slot else None
    config = None
    hook = None
    try:
        for m in model.modules():
            cls = mixer_class(m, set(family.linear) | set(family.softmax))
            if cls in family.linear:
                patches.put(m, "_lasp2", ctx)
                patches.put(m, "_lasp2_slot", getattr(m, "_lasp2_slot", None) or slot)
                patches.put(m, "forward", MIXER_PREFILL[cls](m, modeling, cache))
            elif cls in family.softmax:
                if config is None:
                    config = copy.deepcopy(m.config)
                    config._attn_implementation = ATTN_PREFILL
                patches.put(m, "_lasp2", ctx)
                patches.put(m, "config", config)
                patches.put(m, "_lasp2_cache", cache)
        if getattr(model, "_lasp2", None) is None:
            kinds = family.layer_types if family.layer_types is None or isinstance(family.layer_types, tuple) else \
                getattr(model.config, family.layer_types)
            hook = _base(model, family).register_forward_pre_hook(make_pre_hook(ctx, kinds, slot), with_kwargs=True)
        yield
    finally:
        if hook is not None:
            hook.remove()
        patches.restore()


def _context(model, group, layout, strategy, softmax_strategy, backend) -> HFContext:
    """The model's SP context when ``lasp2.hf.parallelize`` prepared it (the arguments must agree),
    else a new one (the checks ``parallelize`` makes on the model)."""
    ctx = getattr(model, "_lasp2", None)
    if ctx is None:
        from .api import _check_modules
        from .families import loss_problem

        family = family_of(model)
        problem = (family.unsupported_config(model.config) if family.unsupported_config else None) or \
            loss_problem(model.config, family)
        if problem:
            raise ValueError(f"{type(model).__name__}: {problem}")
        _check_modules(model, family)
        return HFContext(group, layout, strategy, softmax_strategy, backend)
    if ctx.layout != layout:
        raise ValueError(f"the model was parallelized with layout={ctx.layout!r}; pass layout={ctx.layout!r}")
    if comm.rank_and_size(ctx.group) != comm.rank_and_size(group):
        raise ValueError("group is not the sequence-parallel group the model was parallelized over; pass that group")
    return ctx


def sp_prefill(model: torch.nn.Module, input_ids: torch.Tensor, *, group, layout: str = "zigzag",
               strategy: str = "lasp2", softmax_strategy: str = "allgather", backend: str = "auto"):
    """The transformers ``Cache`` after the prompt's SP-prefilled prefix, on every rank.

    Args:
        model: a causal LM of a family ``lasp2.hf`` supports, identical on every rank, plain or
            parallelized by ``lasp2.hf.parallelize`` (then with its group and layout); left as it
            was. In eval mode (no dropout).
        input_ids: [B, T] integer, the whole prompt, identical on every rank (checked); any T >= 1.
        group: the SP group. layout: "contiguous" or "zigzag". strategy, softmax_strategy, backend:
            as ``lasp2.hf.parallelize`` (a parallelized model keeps its own).

    Returns:
        The model's own cache class (``DynamicCache(config=model.config)``, MiniMax's
        ``MiniMaxCache``) holding, per layer, the conv and recurrent states (linear mixers) or the
        K/V (softmax layers) after the first P tokens, P the largest multiple of W (2W under
        zigzag) below T (P = 0: an empty cache); ``model.generate(input_ids, past_key_values=cache,
        ...)`` continues with the remaining T - P >= 1 tokens, identically on every rank.

    Raises ValueError (on every rank, before any communication) for families it cannot fill (naming
    the family), bad arguments, or ranks holding different prompts (after one 8-byte all-gather).

    Communication: 1 all-gather of an 8-byte digest, then one SP forward of the prefix (per
    linear layer: the strategy's all-gather and the conv's halo P2P; per softmax layer: LASP-2H's
    K/V all-gather); the states add none.
    """
    from .api import _check_ids, shard_batch

    check_group(group)
    check_choice("layout", layout, LAYOUTS)
    check_choice("strategy", strategy, LINEAR_STRATEGIES)
    check_choice("softmax_strategy", softmax_strategy, SOFTMAX_STRATEGIES)
    check_choice("backend", backend, BACKENDS)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}")
    family = family_of(model)
    if family.name in UNSUPPORTED:
        raise ValueError(f"lasp2.hf.sp_prefill does not support the {family.name} family: {UNSUPPORTED[family.name]}")
    check_family_release(family)
    _check_release()
    check_prefill_support(model, family)
    if model_class(model, family) != family.models[0]:
        raise ValueError(f"sp_prefill needs the causal LM ({family.models[0]}), which generate runs, "
                         f"got {type(model).__name__}")
    if model.training:
        raise ValueError("the model is in training mode (dropout); call model.eval() before sp_prefill")
    _check_ids("input_ids", input_ids)
    ctx = _context(model, group, layout, strategy, softmax_strategy, backend)
    _, world = comm.rank_and_size(group)
    multiple = world * (2 if layout == "zigzag" and world > 1 else 1)
    P = (input_ids.shape[1] - 1) // multiple * multiple
    cache = _new_cache(model, family)
    setattr(cache, PREFILLED, P)
    if P == 0:
        return cache
    batch = shard_batch(input_ids[:, :P], group=group, layout=layout)
    _register_attention()
    with torch.no_grad(), _prefill_mode(model, family, ctx, cache):
        _base(model, family)(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **{SP_KEY: batch[SP_KEY]})
    _count_tokens(cache, P, input_ids)
    return cache


def check_prefill_support(model, family) -> None:
    """ValueError naming the family and the layer class when a mixer of ``model`` has no prefill
    forward in ``MIXER_PREFILL`` (a family added to ``lasp2.hf`` before its prefill)."""
    missing = sorted({cls for m in model.modules()
                      for cls in [mixer_class(m, set(family.linear))] if cls is not None and cls not in MIXER_PREFILL})
    if missing:
        raise ValueError(f"lasp2.hf.sp_prefill does not support the {family.name} family yet: no prefill for its "
                         f"layer class(es) {', '.join(missing)}; generate without a prefilled cache")


def _check_release() -> None:
    import transformers

    have = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if have < SINCE:
        raise ValueError(f"lasp2.hf.sp_prefill writes the Cache layout of transformers >= {SINCE[0]}.{SINCE[1]}; this "
                         f"is {transformers.__version__}: upgrade transformers")


def _count_tokens(cache, P: int, input_ids: torch.Tensor) -> None:
    """Make ``cache.get_seq_length()`` (what ``generate`` skips of the prompt) P.

    Linear layers count the tokens they have seen by the width of the conv states they were given
    (the whole prompt, in transformers' own prefill); ours were given k: set them to P. MiniMax's
    cache reads its length from layer 0's K/V, an empty placeholder when layer 0 is linear: it
    gets a placeholder of length P (one zero per token and row; no layer reads it)."""
    from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            layer.cumulative_length_linear.fill_(P)
    if hasattr(cache, "linear_cache") and cache.get_seq_length() != P:  # MiniMaxCache
        if not cache.layers:
            cache.layers.append(DynamicLayer())
        placeholder = torch.zeros(input_ids.shape[0], 1, P, 1, device=input_ids.device)
        cache.layers[0].update(placeholder, placeholder)
