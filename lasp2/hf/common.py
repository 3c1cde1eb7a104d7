"""What every family shares: the per-model SP context, the softmax attention function registered
with transformers (LASP-2H / ring / Ulysses through ``lasp2.sp_softmax_attention``), the forward
pre-hook of the base model (this batch's SP context checked, its positions, no masks, no cache)
and the linear-attention core.

The batch's sequence-parallel context (``lasp2.parallel.batch.SPBatch``, built by
``lasp2.hf.shard_batch``) travels through the model's ``**kwargs`` as ``lasp2_sp``; transformers
passes such kwargs down to every decoder layer and attention module unchanged, so every layer
reads the documents of *this* batch from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.common import compute_dtype  # transformers' scans run in fp32; fp64 stays fp64
from ..parallel.api import sp_linear_attention, sp_softmax_attention
from ..parallel.batch import SPBatch
from ..parallel.halo import sp_causal_conv1d

STATE_DTYPE = torch.float32  # transformers' recurrent states in a prefill's Cache (fp32 even for fp64 models)

SP_KEY = "lasp2_sp"
ATTN_IMPLEMENTATION = "lasp2"
SHARD_HINT = ("build each batch with batch = lasp2.hf.shard_batch(input_ids, labels, group=group, layout=layout) "
              "from the whole batch (identical on every rank) and call model(**batch)")


@dataclass(frozen=True)
class HFContext:
    """How one parallelized model runs: its SP group, layout and strategies."""

    group: object
    layout: str
    strategy: str
    softmax_strategy: str
    backend: str = "auto"
    softmax_backend: str = "auto"


class BatchSlot:
    """This forward's SP context, for models whose forward does not pass ``**kwargs`` down to
    their layers (Mamba, Falcon-Mamba): the model's pre-hook puts the checked context here at
    every forward and the model's mixers read it (``batch_context``). Under activation
    checkpointing a recomputation reads the context of the latest forward: run each backward
    before the next forward (as training loops do)."""

    sp: Optional[SPBatch] = None


def batch_context(module, kwargs) -> SPBatch:
    """This batch's SP context from ``kwargs`` (or the model's ``BatchSlot``); ValueError when a
    layer runs without one."""
    sp = kwargs.get(SP_KEY)
    slot = getattr(module, "_lasp2_slot", None)
    if sp is None and slot is not None:
        sp = slot.sp
    if not isinstance(sp, SPBatch):
        raise ValueError(f"{type(module).__name__} of a model parallelized by lasp2.hf ran without this batch's "
                         f"sequence-parallel context ({SP_KEY}); call the whole model: {SHARD_HINT}")
    return sp


def documents(module, kwargs) -> Optional[torch.Tensor]:
    """The global document boundaries of this batch (int64 [N + 1] on the CPU, or None) from the
    batch's SP context in ``kwargs``; ValueError when a layer runs without one."""
    return batch_context(module, kwargs).cu_seqlens


def attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface ``"lasp2"``: query [B, H, T, D], key/value [B, Hkv, T, D]
    (after RoPE) -> (o [B, T, H, D], None), by ``lasp2.sp_softmax_attention`` over the model's
    SP group. Registered once; only modules that ``lasp2.hf.parallelize`` prepared use it.

    Communication: that of the softmax strategy (LASP-2H: 1 all-gather forward, 1 reduce-scatter
    backward).
    """
    ctx = getattr(module, "_lasp2", None)
    if ctx is None:
        raise ValueError(f"{type(module).__name__} uses attn_implementation='lasp2' but was not prepared by "
                         f"lasp2.hf.parallelize; call parallelize on the whole model")
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported under sequence parallelism; set "
                         f"config.attention_dropout = 0 (or call model.eval())")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("sliding-window attention is not supported under sequence parallelism; "
                         "set config.sliding_window = None")
    o = sp_softmax_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scaling,
                             causal=True, strategy=ctx.softmax_strategy, batch=batch_context(module, kwargs),
                             backend=ctx.softmax_backend)
    return o, None


def linear_core(ctx: HFContext, q, k, v, g, beta=None, *, scale: float, cu_seqlens=None,
                batch: Optional[SPBatch] = None, output_final_state: bool = False):
    """``lasp2.sp_linear_attention`` in the compute dtype; returns o [B, T, H, V] in v's dtype,
    or (o, final state [B, H, K, V] in the compute dtype) with ``output_final_state`` (a prefill).
    With ``batch`` (this batch's context) the call runs without per-call value checks."""
    cdt = compute_dtype(v.dtype)
    where = dict(batch=batch) if batch is not None else dict(group=ctx.group, layout=ctx.layout, cu_seqlens=cu_seqlens)
    out = sp_linear_attention(q.to(cdt), k.to(cdt), v.to(cdt), None if g is None else g.to(cdt),
                              None if beta is None else beta.to(cdt), scale=scale, strategy=ctx.strategy,
                              backend=ctx.backend, output_final_state=output_final_state, **where)
    if output_final_state:
        return out[0].to(v.dtype), out[1]
    return out.to(v.dtype)


def conv_core(conv, x: torch.Tensor, batch: Optional[SPBatch], activation, *, output_final_state: bool = False):
    """transformers' depthwise causal conv (``conv`` an ``nn.Conv1d`` [C, 1, k]: in the weight's
    dtype, activation, back to x's dtype) under SP: ``lasp2.sp_causal_conv1d``. Returns
    y [B, T, C], or (y, tail [B, k - 1, C], the last k - 1 inputs) with ``output_final_state``."""
    w = conv.weight.squeeze(1)
    out = sp_causal_conv1d(x.to(w.dtype), w, conv.bias, activation=activation, batch=batch,
                           output_final_state=output_final_state)
    if output_final_state:
        return out[0].to(x.dtype), out[1]
    return out.to(x.dtype)


def store_conv(store, layer_idx: int, tail: torch.Tensor, kernel: int, dtype: torch.dtype) -> None:
    """Write a prefill's conv state into the transformers ``Cache`` ``store``: ``tail``
    [B, k - 1, C] (the last k - 1 conv inputs of the prompt) as transformers' [B, C, k] (oldest
    slot 0, never read). Before the recurrent state: transformers reads a layer's recurrent state
    only once its conv state is set (``has_previous_state``)."""
    conv = F.pad(tail.transpose(1, 2), (kernel - tail.shape[1], 0)).to(dtype)
    store.update_conv_state(conv, layer_idx, conv_kernel_size=kernel)


def conv_maybe_storing(layer, conv, x: torch.Tensor, batch, activation, store) -> torch.Tensor:
    """``conv_core``; with ``store`` (a prefill's ``Cache``, else None) the conv state is written
    there too (``store_conv``). Returns y [B, T, C] in x's dtype."""
    if store is None:
        return conv_core(conv, x, batch, activation)
    y, tail = conv_core(conv, x, batch, activation, output_final_state=True)
    store_conv(store, layer.layer_idx, tail, conv.kernel_size[0], x.dtype)
    return y


def _same_group(a, b) -> bool:
    if a is b:
        return True
    import torch.distributed as dist

    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


def check_batch(ctx: HFContext, sp, x: torch.Tensor, ids: Optional[torch.Tensor], position_ids) -> None:
    """ValueError unless ``sp`` is the SP context of this batch for this model: built by
    ``shard_batch`` over the model's group and layout, for these tokens. Runs on every rank before
    any communication (a refusal is the same on every rank, never a hang). Cost: one comparison
    of the [B, T_local] ids with the ones the context was built for."""
    if sp is None:
        raise ValueError(f"a model parallelized by lasp2.hf needs this batch's sequence-parallel context: "
                         f"{SHARD_HINT}. Feeding it whole sequences, or tokens sharded another way, would give "
                         f"wrong logits on every rank but the first. Under transformers' Trainer or TRL's "
                         f"SFTTrainer: hand the trainer the unmodified model and call "
                         f"lasp2.hf.sequence_parallel(trainer, sp=...), which parallelizes it and shards every batch")
    if not isinstance(sp, SPBatch):
        raise ValueError(f"{SP_KEY} must be the SPBatch that lasp2.hf.shard_batch returned, got {type(sp).__name__}")
    if not _same_group(sp.group, ctx.group):
        raise ValueError("this batch was sharded over another process group than the model's: pass the model's "
                         "sequence-parallel group to lasp2.hf.shard_batch")
    if sp.layout.name != ctx.layout:
        raise ValueError(f"this batch was sharded with layout={sp.layout.name!r} but the model was parallelized with "
                         f"layout={ctx.layout!r}: pass layout={ctx.layout!r} to lasp2.hf.shard_batch (the tokens "
                         f"of each rank would otherwise sit at the wrong global positions)")
    want = (sp.batch_size, sp.local_len)
    if tuple(x.shape[:2]) != want:
        raise ValueError(f"the model got {'input_ids' if ids is not None else 'inputs_embeds'} of shape "
                         f"{tuple(x.shape)}, but this batch's context is for this rank's {list(want)} tokens: "
                         f"pass the input_ids that shard_batch returned with it, not the whole sequences")
    if ids is not None and sp.tokens is not None and not torch.equal(ids, sp.tokens.to(ids.device)):
        raise ValueError(f"input_ids are not the tokens this batch's context was built for; {SHARD_HINT} "
                         f"for every batch (a context cannot be reused with other tokens)")
    if position_ids is not None:
        expected = sp.position_ids.to(position_ids.device)
        if position_ids.shape[-1] != expected.shape[0] or not bool((position_ids == expected).all()):
            raise ValueError("position_ids differ from the global positions of this rank's tokens in this batch; "
                             "pass the position_ids shard_batch returned, or none")


def make_pre_hook(ctx: HFContext, layer_types, slot: Optional[BatchSlot] = None):
    """Forward pre-hook (with kwargs) of the base model: this batch's SP context required and
    checked (``check_batch``), ``position_ids`` from it when none are given, attention masks
    replaced by ``None`` per layer type (the SP ops apply causality and documents from global
    positions), and no KV/recurrent cache. With a ``slot``, the checked context is put there too."""
    no_masks = None if layer_types is None else {t: None for t in set(layer_types)}  # None: one mask, no kinds

    def hook(module, args, kwargs):
        if getattr(module, "_lasp2_decoding", False):  # generate from lasp2.hf.sp_prefill's cache (prefill.py)
            return None
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise ValueError("a parallelized model trains on whole sequences: pass use_cache=False and no "
                             "past_key_values (to generate: cache = lasp2.hf.sp_prefill(model, input_ids, group=..., layout=...), "
                             "then model.generate(input_ids, past_key_values=cache))")
        kwargs["use_cache"] = False
        if kwargs.get(SP_KEY) is None:  # the most likely mistake first (e.g. a plain Trainer's batch)
            check_batch(ctx, None, None, None, None)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            raise ValueError("a parallelized model takes no attention_mask (padding is not supported under "
                             "sequence parallelism); pack documents and pass lasp2.hf.shard_batch(..., "
                             "cu_seqlens=...)'s output, which carries the document boundaries")
        kwargs["attention_mask"] = None if no_masks is None else dict(no_masks)
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("pass input_ids (or inputs_embeds) to the parallelized model")
        sp = kwargs.get(SP_KEY)
        check_batch(ctx, sp, x, ids, kwargs.get("position_ids"))
        if slot is not None:
            slot.sp = sp
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = sp.position_ids.to(x.device).unsqueeze(0).expand(x.shape[0], -1)
        return args, kwargs

    return hook
