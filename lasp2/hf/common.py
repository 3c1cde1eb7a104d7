"""What every family shares: the per-model SP context, the softmax attention function registered
with transformers (LASP-2H / ring / Ulysses through ``lasp2.sp_softmax_attention``), the forward
pre-hook of the base model (global positions, no masks, no cache) and the linear-attention core.

Documents travel through the model's ``**kwargs`` as ``lasp2_cu_seqlens`` (global [N + 1]
cumulative lengths, identical on every rank); transformers passes such kwargs down to every
decoder layer and attention module unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ops.common import compute_dtype  # transformers' scans run in fp32; fp64 stays fp64
from ..parallel import comm
from ..parallel.api import sp_linear_attention, sp_softmax_attention
from ..parallel.layout import Layout

CU_KEY = "lasp2_cu_seqlens"
ATTN_IMPLEMENTATION = "lasp2"


@dataclass(frozen=True)
class HFContext:
    """How one parallelized model runs: its SP group, layout and strategies."""

    group: object
    layout: str
    strategy: str
    softmax_strategy: str
    backend: str = "auto"


def local_positions(ctx: HFContext, T: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """Position of every local token: its global position, or its offset in its document when
    documents are packed (as if each document were fed alone). int64 [T]."""
    rank, world = comm.rank_and_size(ctx.group)
    pos = Layout(ctx.layout, world, T).global_positions(rank, device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        pos = pos - cu[torch.searchsorted(cu, pos, right=True) - 1]
    return pos


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
    o = sp_softmax_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), group=ctx.group,
                             scale=scaling, causal=True, strategy=ctx.softmax_strategy, layout=ctx.layout,
                             cu_seqlens=kwargs.get(CU_KEY))
    return o, None


def linear_core(ctx: HFContext, q, k, v, g, beta=None, *, scale: float, cu_seqlens=None) -> torch.Tensor:
    """``lasp2.sp_linear_attention`` in the compute dtype; returns o [B, T, H, V] in v's dtype."""
    cdt = compute_dtype(v.dtype)
    o = sp_linear_attention(q.to(cdt), k.to(cdt), v.to(cdt), None if g is None else g.to(cdt),
                            None if beta is None else beta.to(cdt), group=ctx.group, scale=scale,
                            strategy=ctx.strategy, layout=ctx.layout, cu_seqlens=cu_seqlens, backend=ctx.backend)
    return o.to(v.dtype)


def make_pre_hook(ctx: HFContext, layer_types):
    """Forward pre-hook (with kwargs) of the base model: global ``position_ids`` when none are
    given, attention masks replaced by ``None`` per layer type (the SP ops apply causality and
    documents from global positions), and no KV/recurrent cache."""
    no_masks = {t: None for t in set(layer_types)}

    def hook(module, args, kwargs):
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise ValueError("a parallelized model trains on whole sequences: pass use_cache=False and no "
                             "past_key_values (generation under sequence parallelism is not supported)")
        kwargs["use_cache"] = False
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            raise ValueError("a parallelized model takes no attention_mask (padding is not supported under "
                             "sequence parallelism); pack documents and pass lasp2.hf.shard_batch(..., "
                             "cu_seqlens=...)'s output, which carries the document boundaries")
        kwargs["attention_mask"] = dict(no_masks)
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("pass input_ids (or inputs_embeds) to the parallelized model")
        if kwargs.get("position_ids") is None:
            pos = local_positions(ctx, x.shape[1], kwargs.get(CU_KEY), x.device)
            kwargs["position_ids"] = pos.unsqueeze(0).expand(x.shape[0], -1)
        return args, kwargs

    return hook
