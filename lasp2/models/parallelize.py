"""Apply sequence and data parallelism to a single-device model from outside (torchtitan style).

    mesh  = init_device_mesh("cuda", (dp, sp), mesh_dim_names=("dp", "sp"))   # "cpu" for gloo
    model = lasp2.parallelize(LinearLlama(config), mesh, layout="zigzag")
    ids   = lasp2.shard(batch_ids, group=mesh["sp"].get_group(), layout="zigzag")   # [B, T / sp]
    logits = model(ids, cu_seqlens=cu_seqlens)                                      # cu_seqlens global
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    loss = lasp2.global_token_mean(loss_sum, n_tokens, mesh)   # same value on every rank
    loss.backward(); optimizer.step()

What ``parallelize`` does:
1. Sequence parallelism: every attention module (``lasp2.nn.LinearAttention``,
   ``lasp2.nn.SoftmaxAttention``) gets an ``SPContext`` holding ``mesh["sp"]``'s group, its
   strategy and the layout; its forward then calls the SP op on the local tokens. Everything else
   in the model is token-wise and runs unchanged on the local tokens.
2. Gradient synchronisation: SP ranks hold different tokens of the same sequences, so each
   rank's parameter gradient is a partial sum over its own tokens, exactly as DP ranks hold
   partial sums over their own sequences. Both are reduced the same way, over the flattened
   dp x sp mesh (every rank of the mesh), averaging over all dp * sp ranks; ``global_token_mean``
   defines the loss so that this average is the gradient of the mean token loss over the global
   batch (no factor of the SP degree anywhere).
   ``data_parallel="ddp"``: ``DistributedDataParallel`` over that group (full replicas).
   ``data_parallel="fsdp2"``: ``fully_shard`` over the **1-D** flattened mesh, so parameters,
   gradients and optimizer state are sharded over all dp * sp ranks (SP ranks hold the same
   parameters, so they are shard holders too; passing the 2-D mesh would be HSDP, replicating
   over dp). It shards when dp = 1 too. Each block is its own FSDP group (one all-gather of its
   parameters before it runs, one reduce-scatter of its gradients), the root holds the rest
   (embeddings, tied LM head, final norm).
3. Optionally, activation checkpointing (every block recomputed in backward, at the block's
   call site in the model) and the no-state-passing ablation (no SP context at all).

This module sits above ``lasp2.nn`` (it knows the layers); the SP strategies below it do not.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from ..nn import LinearAttention, SoftmaxAttention, SPContext
from ..ops.backends import BACKENDS
from ..ops.softmax_backends import SOFTMAX_BACKENDS
from ..parallel.strategies import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
from ..parallel.layout import LAYOUTS
from ..parallel.mesh import check_mesh, dp_sp_group, flat_mesh
from ..validation import check_choice

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy


DATA_PARALLEL = ("ddp", "fsdp2")


def attention_modules(model: torch.nn.Module):
    """Every ``lasp2.nn`` attention module of ``model`` (linear and softmax), in module order."""
    return [m for m in model.modules() if isinstance(m, (LinearAttention, SoftmaxAttention))]


def parallelize(model: torch.nn.Module, mesh: DeviceMesh, *, strategy: str = "lasp2",
                softmax_strategy: str = "allgather", layout: str = "contiguous",
                data_parallel: str = "ddp", mp_policy: Optional[MixedPrecisionPolicy] = None,
                activation_checkpointing: bool = False,
                state_passing: bool = True,
                backend: Optional[str] = None,
                softmax_backend: Optional[str] = None) -> Union[DistributedDataParallel, torch.nn.Module]:
    """Make ``model`` sequence parallel over ``mesh["sp"]`` and data parallel over the whole mesh.

    Args:
        model: a single-device model built from ``lasp2.nn`` attention modules (e.g.
            ``lasp2.models.LinearLlama``), on this rank's device, identical on every rank (the
            same seed; DDP also broadcasts rank 0's parameters).
        mesh: a 2-D DeviceMesh with dims ("dp", "sp"); either size may be 1.
        strategy: linear-attention SP strategy from the registry (``lasp2.parallel.strategies``):
            "lasp2" (one all-gather), "lasp1" (ring chain), "allscan" (pipelined chain), "tree".
        softmax_strategy: "allgather" (LASP-2H), "ring" or "ulysses".
        layout: "contiguous" or "zigzag": how the caller shards tokens (``lasp2.shard``) and how
            the SP ops read them. One layout for every layer.
        data_parallel: "ddp" (replicas, DistributedDataParallel) or "fsdp2" (``fully_shard`` over
            the flattened dp x sp mesh, one FSDP group per block in ``model.layers`` and the root).
        mp_policy: fsdp2 only: a ``torch.distributed.fsdp.MixedPrecisionPolicy``, e.g.
            ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``
            (bf16 compute, fp32 gradient reduction; the sharded parameters and the optimizer stay
            in their dtype). SP states and everything the SP ops exchange stay fp32 regardless.
        activation_checkpointing: recompute every block in backward (``torch.utils.checkpoint``,
            non-reentrant, at the block's call site; the model must have an
            ``activation_checkpointing`` attribute, as ``LinearLlama`` does). Parameter names are
            unchanged. Every rank recomputes the same blocks in the same order, so the SP
            collectives of the recomputation pair up across ranks as in the forward.
        state_passing: False is an ablation: the attention modules get no SP context, so each
            rank attends only to its own tokens (nothing crosses a rank boundary) while gradients
            are still averaged over the mesh. See ``lasp2/train/loop.py``.
        backend: the linear-attention kernels of every ``LinearAttention`` module, "auto",
            "torch" or "fla" (``lasp2.ops.backends``); None keeps each module's own choice.
        softmax_backend: the kernel of every ``SoftmaxAttention`` module, "auto", "torch" or
            "flex" (``lasp2.ops.softmax_backends``); None keeps each module's own choice.

    Returns:
        ddp: the model wrapped in ``DistributedDataParallel`` over ``dp_sp_group(mesh)`` (the
        original module is ``.module``). fsdp2: ``model`` itself, now an ``FSDPModule`` whose
        parameters are ``DTensor`` shards (``p.full_tensor()`` gathers one; skip gradient sync on
        accumulation micro-batches with ``set_requires_gradient_sync(False)``). Either way the
        attention modules carry ``.sp``, and the forward takes this rank's tokens
        [B, T_global / sp] of this DP rank's batch and the global ``cu_seqlens``. Use
        ``global_token_mean`` for the loss.

    Communication: per step, each attention layer's SP collectives on the sp group; then over
    the dp x sp group, ddp: one gradient all-reduce (bucketed) overlapped with backward; fsdp2:
    per FSDP group one parameter all-gather before forward, one again before backward (the
    blocks reshard after forward) and one gradient reduce-scatter.
    """
    check_mesh(mesh)
    check_choice("strategy", strategy, LINEAR_STRATEGIES)
    check_choice("softmax_strategy", softmax_strategy, SOFTMAX_STRATEGIES)
    check_choice("layout", layout, LAYOUTS)
    check_choice("data_parallel", data_parallel, DATA_PARALLEL)
    if mp_policy is not None and (data_parallel != "fsdp2"
                                  or not isinstance(mp_policy, _fsdp().MixedPrecisionPolicy)):
        raise ValueError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy and needs "
                         f"data_parallel='fsdp2'; got {type(mp_policy).__name__} with data_parallel={data_parallel!r}")
    if isinstance(model, DistributedDataParallel) or _is_fsdp_module(model):
        raise ValueError(f"model is already wrapped in {type(model).__name__}; pass the plain module "
                         f"(lasp2.parallelize applies DP itself)")
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    if softmax_backend is not None:
        check_choice("softmax_backend", softmax_backend, SOFTMAX_BACKENDS)
    attention = attention_modules(model)
    if not attention:
        raise ValueError("model has no lasp2.nn.LinearAttention / SoftmaxAttention module to parallelise")
    if any(m.sp is not None for m in attention):
        raise ValueError("model was already parallelised (an attention module has an SP context); "
                         "build a fresh model")
    if activation_checkpointing and not hasattr(model, "activation_checkpointing"):
        raise ValueError(f"activation_checkpointing=True needs a model with an 'activation_checkpointing' switch "
                         f"at its block call site (e.g. lasp2.models.LinearLlama), got {type(model).__name__}")
    if backend is not None:
        for m in attention:
            if isinstance(m, LinearAttention):
                m.backend = backend
    if softmax_backend is not None:
        for m in attention:
            if not isinstance(m, LinearAttention):
                m.backend = softmax_backend
    if state_passing:
        sp_group = mesh["sp"].get_group()
        linear_ctx = SPContext(sp_group, strategy, layout)
        softmax_ctx = SPContext(sp_group, softmax_strategy, layout)
        for m in attention:
            m.sp = linear_ctx if isinstance(m, LinearAttention) else softmax_ctx
    if activation_checkpointing:
        model.activation_checkpointing = True
    if data_parallel == "fsdp2":
        return _fully_shard(model, flat_mesh(mesh), mp_policy or _fsdp().MixedPrecisionPolicy())
    device = next(model.parameters()).device
    # lasp2 modules keep no buffers (RoPE tables and fixed decays are recomputed), so DDP has no
    # per-forward buffer broadcast to do.
    return DistributedDataParallel(model, process_group=dp_sp_group(mesh),
                                   device_ids=[device.index] if device.type == "cuda" else None)


def _fsdp():
    """torch.distributed.fsdp, imported on first use: importing it costs about half as much as
    importing torch itself, in every process that imports lasp2 (each test rank, each CLI rank)."""
    import torch.distributed.fsdp as fsdp

    return fsdp


def _is_fsdp_module(model) -> bool:
    """Whether ``model`` is an FSDPModule (it cannot be unless fsdp was imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _fully_shard(model: torch.nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy) -> torch.nn.Module:
    """FSDP2 bottom-up: each block of ``model.layers`` (when the model has them), then the root."""
    for block in getattr(model, "layers", ()):
        _fsdp().fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    # The root's parameters (embeddings, tied LM head, final norm) are needed first in forward and
    # first in backward: keep them gathered between the two (torchtitan does the same).
    _fsdp().fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model
