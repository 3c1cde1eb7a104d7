"""``lasp2.hf.parallelize`` and ``lasp2.hf.shard_batch``."""
from __future__ import annotations

import copy
import re
import types
from typing import Dict, Optional

import torch

from ..ops.backends import BACKENDS
from ..ops.softmax_backends import SOFTMAX_BACKENDS
from ..parallel import comm
from ..parallel.api import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES, check_group, shard
from ..parallel.layout import LAYOUTS
from ..validation import check_choice, check_cu_seqlens
from ..parallel.batch import SPBatch, batch_digest
from .common import ATTN_IMPLEMENTATION, SP_KEY, BatchSlot, HFContext, attention_function, make_pre_hook
from .router_aux import exact_router_aux_loss
from .decode import generate_parallelized
from .compat import check_family_release
from .families import FAMILIES, family_of, loss_problem, mixer_class, model_class

# Class names that mix tokens; any such module that a family does not know is refused.
_MIXER_NAME = re.compile(r"(Attention|Mixer|DeltaNet|Mamba\w*|SSM|Conv\w*)$")


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_function)


def _known_mixers(family):
    return set(family.linear) | set(family.softmax)


def _check_modules(model, family) -> None:
    known = _known_mixers(family)
    everything = {c for f in FAMILIES for c in _known_mixers(f)}
    for name, m in model.named_modules():
        if mixer_class(m, known) is not None or type(m).__name__ in family.tokenwise + family.models:
            continue
        cls = type(m).__name__
        inside_linear = name.rsplit(".", 1)[0] if "." in name else ""
        if isinstance(m, torch.nn.Conv1d) and mixer_class(model.get_submodule(inside_linear), family.linear):
            continue  # the mixer's own short conv, replaced with the mixer's forward
        mixes = isinstance(m, (torch.nn.Conv1d, torch.nn.MultiheadAttention))
        subclass = [c.__name__ for c in type(m).__mro__ if c.__name__ in everything]
        if subclass and cls not in everything:
            raise ValueError(f"{type(model).__name__} contains {name} = {cls}, a subclass of {subclass[0]} that "
                             f"overrides forward; lasp2.hf replaces the forward of {subclass[0]} itself and would "
                             f"drop that code. Keep {subclass[0]}'s forward, or parallelize the layer yourself")
        if _MIXER_NAME.search(cls) or mixes or subclass:
            raise ValueError(f"{type(model).__name__} contains {name} = {cls}, a sequence-mixing layer lasp2.hf "
                             f"does not know how to parallelize; supported mixers for {family.name}: "
                             f"{', '.join(sorted(known))}")


def _generate(model, *args, **kwargs):
    """``model.generate`` of a parallelized model: continues from ``lasp2.hf.sp_prefill``'s cache,
    refuses otherwise (``decode.generate_parallelized``)."""
    return generate_parallelized(model, *args, **kwargs)


def parallelize(model: torch.nn.Module, group, *, layout: str = "contiguous", strategy: str = "lasp2",
                softmax_strategy: str = "allgather", backend: str = "auto",
                softmax_backend: str = "auto") -> torch.nn.Module:
    """Make a transformers hybrid model sequence parallel over ``group``, in place.

    Args:
        model: a causal LM (or its base model) of a family in ``lasp2.hf.FAMILIES`` (Qwen3-Next,
            Qwen3.5, MiniMax, Bamba, Mamba2, Nemotron-H, Granite-4.0 hybrid, Falcon-H1, Zamba2,
            Mamba, Falcon-Mamba, Jamba, OLMo hybrid, LFM2, Kimi Linear, Ling hybrid), identical on every
            rank of ``group``.
        group: the sequence-parallel process group (required; ``mesh["sp"].get_group()``).
        layout: "contiguous" or "zigzag", how ``shard_batch`` splits the tokens.
        strategy: linear-attention strategy from the registry ("lasp2", "lasp1", "allscan", "tree").
        softmax_strategy: "allgather" (LASP-2H), "ring" or "ulysses".
        backend: the linear scans' local kernels, "auto" (fla on CUDA when installed), "torch" or
            "fla" (``lasp2.ops.backends``); the communication is the same.
        softmax_backend: the softmax attention's local kernel, "auto" (flex on CUDA, else torch),
            "torch" or "flex" (``lasp2.ops.softmax_backends``).

    Returns:
        ``model`` itself. Its linear mixers (Gated DeltaNet, Lightning, Mamba2, Mamba1, short
        convs) run their own
        projections, norms and gates with ``lasp2.sp_causal_conv1d`` and
        ``lasp2.sp_linear_attention`` as the conv and scan; its softmax attention modules run
        their own forward with ``lasp2.sp_softmax_attention`` as the attention function. Its
        forward takes ``shard_batch``'s output (``model(**batch)``): this rank's tokens and the
        batch's SP context, without which (or with one of another layout, group or batch) it
        raises ValueError; positions default to the global ones; ``logits`` are this rank's
        shard of the single-device logits. ``model.generate`` continues from the cache of
        ``lasp2.hf.sp_prefill`` (``past_key_values=cache``) and raises ValueError without it. No DP wrapping: gradients are partial sums over each
        rank's tokens (all-reduce them with SUM over the SP group; under DDP, which averages,
        multiply the loss share by the SP size). Loss terms that are means over the whole sequence
        are made exact shares (summed over the SP group: the model's term, value and gradient):
        the MoE router auxiliary loss (``output_router_logits=True``: one all-gather of E floats
        per forward) and Bamba's z-loss.
        Subclasses of the supported model classes are accepted (their layers are checked).

    Communication: per layer and direction, the linear strategy's collective (LASP-2: one
    all-gather) plus one P2P halo exchange for convs, or the softmax strategy's collective; at
    the first call, one small agreement check over the group.
    """
    check_group(group)
    check_choice("layout", layout, LAYOUTS)
    check_choice("strategy", strategy, LINEAR_STRATEGIES)
    check_choice("softmax_strategy", softmax_strategy, SOFTMAX_STRATEGIES)
    check_choice("backend", backend, BACKENDS)
    check_choice("softmax_backend", softmax_backend, SOFTMAX_BACKENDS)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}")
    family = family_of(model)
    check_family_release(family)
    if getattr(model, "_lasp2", None) is not None:
        raise ValueError("model was already parallelized by lasp2.hf.parallelize; build or load a fresh model")
    config = model.config
    problem = (family.unsupported_config(config) if family.unsupported_config else None) or loss_problem(config, family)
    if problem:
        raise ValueError(f"{type(model).__name__}: {problem}")
    _check_modules(model, family)
    comm.ensure_agreement(group, f"lasp2.hf.parallelize {type(model).__name__} layout={layout} strategy={strategy} "
                                 f"softmax={softmax_strategy} params={sum(p.numel() for p in model.parameters())}")
    _register_attention()
    ctx = HFContext(group, layout, strategy, softmax_strategy, backend, softmax_backend)
    if family.prepare is not None:
        family.prepare(model, comm.rank_and_size(group)[1])
    if family.router_aux and model_class(model, family) == family.models[0]:
        exact_router_aux_loss(model, group)
    modeling = family.modeling()
    sp_config = None
    slot = BatchSlot() if family.slot else None
    for m in model.modules():
        cls = mixer_class(m, _known_mixers(family))
        if cls in family.linear:
            m._lasp2, m._lasp2_slot = ctx, slot
            m.forward = family.linear[cls](m, modeling)
        elif cls in family.softmax:
            if sp_config is None:  # a private config: the model's own (maybe shared) one is untouched
                sp_config = copy.deepcopy(m.config)
                sp_config._attn_implementation = ATTN_IMPLEMENTATION
            m._lasp2, m.config = ctx, sp_config
    # the hook sits on the base model (which gets **kwargs), or on the model when it drops them
    top = model_class(model, family) == family.models[0] and family.base is not None
    base = getattr(model, family.base) if top else model
    kinds = family.layer_types if family.layer_types is None or isinstance(family.layer_types, tuple) else \
        getattr(config, family.layer_types)
    model._lasp2_hook = base.register_forward_pre_hook(make_pre_hook(ctx, kinds, slot), with_kwargs=True)
    model._lasp2 = ctx
    model.generate = types.MethodType(_generate, model)  # this instance only
    return model


def _check_ids(name: str, x, shape=None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor [B, T] (the whole sequences, identical on every rank)")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} must have input_ids' shape {tuple(shape)}, got {tuple(x.shape)}")


def shard_batch(input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *, group, layout: str = "contiguous",
                cu_seqlens: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                ignore_index: int = -100) -> Dict[str, object]:
    """This rank's part of a batch of whole sequences, ready for ``model(**batch)``.

    Args:
        input_ids: [B, T] integer, the whole sequences, identical on every rank (checked); T
            must split into W equal parts (2W under zigzag).
        labels: None, or [B, T] integer targets *before* the next-token shift (as transformers
            takes them; usually ``input_ids``), ``ignore_index`` where not counted.
        group, layout: the SP group and the layout given to ``parallelize`` (a model refuses a
            batch sharded with another layout or group).
        cu_seqlens: None, or [N + 1] int cumulative document lengths (B == 1): documents packed
            in one row; positions restart and nothing crosses a document boundary.
        attention_mask: None or all ones (padding is not supported under SP: pack instead).

    Returns:
        ``input_ids`` [B, T / W] (this rank's tokens), ``position_ids`` [B, T / W] int64 (their
        global positions, or positions in their document), ``lasp2_sp``: the batch's
        sequence-parallel context (``lasp2.parallel.batch.SPBatch``: group, layout, positions,
        documents, digest), without which a parallelized model refuses to run; with labels also
        ``labels`` and ``shift_labels`` [B, T / W] (the next-token target of each local token,
        shifted on the whole sequence so that no rank loses its last label; ``ignore_index`` at
        each sequence / document end) and ``num_items_in_batch`` (the number of counted targets
        in the whole batch), so that ``model(**batch).loss`` is this rank's share: its sum over
        the SP group is the single-device loss.

    Raises ValueError on every rank when the ranks hold different batches (input ids, labels,
    document boundaries, layout or ignore_index), or for bad arguments (before any communication).

    Communication: 1 all-gather of an 8-byte digest of the batch per call (the same-data check);
    computing the digest hashes the bytes of input_ids and labels on the CPU (BLAKE2b, a few ms
    per MB of them; a copy to the CPU first for GPU tensors).
    """
    check_group(group)
    check_choice("layout", layout, LAYOUTS)
    _check_ids("input_ids", input_ids)
    B, T = input_ids.shape
    if labels is not None:
        _check_ids("labels", labels, input_ids.shape)
    check_cu_seqlens(cu_seqlens, T, B)
    if attention_mask is not None:
        _check_ids("attention_mask", attention_mask, input_ids.shape)
        if not bool((attention_mask != 0).all()):
            raise ValueError("attention_mask has padding (zeros), which sequence parallelism does not support; "
                             "pack the documents into one row and pass cu_seqlens instead")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    local_ids = shard(input_ids, group=group, layout=layout)  # checks that T splits over the group
    digest = batch_digest("lasp2.hf.shard_batch", layout, ignore_index, input_ids, labels, cu_seqlens)
    comm.check_same_digest(group, digest, "batches (input_ids, labels, cu_seqlens, layout or ignore_index)")
    sp = SPBatch.build(group, layout, T, B, cu_seqlens=cu_seqlens, digest=digest, tokens=local_ids)
    out = {"input_ids": local_ids,
           "position_ids": sp.position_ids.to(input_ids.device).unsqueeze(0).expand(B, -1), SP_KEY: sp}
    if labels is not None:
        shifted = torch.full_like(labels, ignore_index)
        shifted[:, :-1] = labels[:, 1:]
        if cu_seqlens is not None:
            shifted[:, sp.cu_seqlens[1:].to(labels.device) - 1] = ignore_index  # a document's last token predicts nothing
        out["labels"] = out["shift_labels"] = shard(shifted, group=group, layout=layout)
        out["num_items_in_batch"] = (shifted != ignore_index).sum()
    return out
