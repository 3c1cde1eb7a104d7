"""A model parallelized by ``lasp2.hf.parallelize`` generating from ``lasp2.hf.sp_prefill``'s
cache: for the call, the model runs its own one-process forward (the mixers' class forwards, the
model's attention implementation, the SP pre-hook standing aside) on every rank."""
from __future__ import annotations

import copy
from contextlib import contextmanager

from .families import family_of, mixer_class, model_class

PREFILLED = "_lasp2_prefilled"  # set on a cache sp_prefill returns: the number of prefilled tokens


class Patches:
    """Instance attributes set for one call and put back afterwards (absent ones removed)."""

    def __init__(self):
        self._saved = []

    def put(self, obj, name: str, value) -> None:
        self._saved.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def drop(self, obj, name: str) -> None:
        if name in obj.__dict__:
            self._saved.append((obj, name, True, obj.__dict__[name]))
            delattr(obj, name)

    def restore(self) -> None:
        for obj, name, had, old in reversed(self._saved):
            if had:
                setattr(obj, name, old)
            elif name in obj.__dict__:
                delattr(obj, name)
        self._saved = []


def base_module(model, family):
    """The module whose forward gets the batch's kwargs (where parallelize hooks)."""
    top = model_class(model, family) == family.models[0] and family.base is not None
    return getattr(model, family.base) if top else model


@contextmanager
def _decode_mode(model):
    """A parallelized model runs its own (one-process) forward for the call: the mixers' class
    forwards, the model's attention implementation, the pre-hook standing aside."""
    family = family_of(model)
    patches = Patches()
    config = None
    try:
        for m in model.modules():
            cls = mixer_class(m, set(family.linear) | set(family.softmax))
            if cls in family.linear:
                patches.drop(m, "forward")
            elif cls in family.softmax:
                if config is None:
                    config = copy.deepcopy(m.config)
                    config._attn_implementation = model.config._attn_implementation
                patches.put(m, "config", config)
        patches.put(base_module(model, family), "_lasp2_decoding", True)
        yield
    finally:
        patches.restore()


def generate_parallelized(model, *args, **kwargs):
    """``generate`` of a model parallelized by ``lasp2.hf.parallelize``: continues from a cache
    ``sp_prefill`` returned (``cache=``, or ``past_key_values=``), running the model's own decode path on
    every rank; ValueError otherwise (every rank would decode its own shard)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None or not hasattr(cache, PREFILLED):
        raise ValueError("generate() on a model parallelized by lasp2.hf needs the prompt prefilled across the group "
                         "first: cache = lasp2.hf.sp_prefill(model, input_ids, group=group, layout=...) on every "
                         "rank, then model.generate(input_ids, cache=cache, use_cache=True, ...) (the same tokens on every "
                         "rank). Without it each rank would continue its own shard of the prompt")
    with _decode_mode(model):
        return type(model).generate(model, *args, **kwargs)
