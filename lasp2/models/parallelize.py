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
   partial sums over their own sequences. Both are reduced the same way: the model is wrapped
   in ``DistributedDataParallel`` over the flattened dp x sp group (every rank of the mesh),
   which averages gradients over all dp * sp ranks. ``global_token_mean`` defines the loss so
   that this average is the gradient of the mean token loss over the global batch.
3. Optionally, activation checkpointing (every block recomputed in backward, at the block's
   call site in the model) and the no-state-passing ablation (no SP context at all).

This module sits above ``lasp2.nn`` (it knows the layers); the SP strategies below it do not.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from ..nn import LinearAttention, SoftmaxAttention, SPContext
from ..parallel.api import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
from ..parallel.layout import LAYOUTS
from ..parallel.mesh import check_mesh, dp_sp_group
from ..validation import check_choice


def attention_modules(model: torch.nn.Module):
    """Every ``lasp2.nn`` attention module of ``model`` (linear and softmax), in module order."""
    return [m for m in model.modules() if isinstance(m, (LinearAttention, SoftmaxAttention))]


def parallelize(model: torch.nn.Module, mesh: DeviceMesh, *, strategy: str = "lasp2",
                softmax_strategy: str = "allgather", layout: str = "contiguous",
                activation_checkpointing: bool = False, state_passing: bool = True) -> DistributedDataParallel:
    """Make ``model`` sequence parallel over ``mesh["sp"]`` and data parallel over the whole mesh.

    Args:
        model: a single-device model built from ``lasp2.nn`` attention modules (e.g.
            ``lasp2.models.LinearLlama``), on this rank's device, identical on every rank (the
            same seed; DDP also broadcasts rank 0's parameters).
        mesh: a 2-D DeviceMesh with dims ("dp", "sp"); either size may be 1.
        strategy: linear-attention SP strategy, "lasp2" (one all-gather) or "lasp1" (ring).
        softmax_strategy: "allgather" (LASP-2H), "ring" or "ulysses".
        layout: "contiguous" or "zigzag": how the caller shards tokens (``lasp2.shard``) and how
            the SP ops read them. One layout for every layer.
        activation_checkpointing: recompute every block in backward (``torch.utils.checkpoint``,
            non-reentrant, at the block's call site; the model must have an
            ``activation_checkpointing`` attribute, as ``LinearLlama`` does). Parameter names are
            unchanged. Every rank recomputes the same blocks in the same order, so the SP
            collectives of the recomputation pair up across ranks as in the forward.
        state_passing: False is an ablation: the attention modules get no SP context, so each
            rank attends only to its own tokens (nothing crosses a rank boundary) while gradients
            are still averaged over the mesh. See ``lasp2/train/loop.py``.

    Returns:
        The model wrapped in ``DistributedDataParallel`` over ``dp_sp_group(mesh)`` (the original
        module is ``.module``, its attention modules now carry ``.sp``). Its forward takes this
        rank's tokens [B, T_global / sp] of this DP rank's batch, and the global ``cu_seqlens``.
        Use ``global_token_mean`` for the loss.

    Communication: per step, each attention layer's SP collectives on the sp group; one DDP
    gradient all-reduce (bucketed) over the dp x sp group, overlapped with backward.
    """
    check_mesh(mesh)
    check_choice("strategy", strategy, LINEAR_STRATEGIES)
    check_choice("softmax_strategy", softmax_strategy, SOFTMAX_STRATEGIES)
    check_choice("layout", layout, LAYOUTS)
    if isinstance(model, DistributedDataParallel):
        raise ValueError("model is already wrapped in DistributedDataParallel; pass the plain module "
                         "(lasp2.parallelize applies DP itself)")
    attention = attention_modules(model)
    if not attention:
        raise ValueError("model has no lasp2.nn.LinearAttention / SoftmaxAttention module to parallelise")
    if any(m.sp is not None for m in attention):
        raise ValueError("model was already parallelised (an attention module has an SP context); "
                         "build a fresh model")
    if activation_checkpointing and not hasattr(model, "activation_checkpointing"):
        raise ValueError(f"activation_checkpointing=True needs a model with an 'activation_checkpointing' switch "
                         f"at its block call site (e.g. lasp2.models.LinearLlama), got {type(model).__name__}")
    if state_passing:
        sp_group = mesh["sp"].get_group()
        linear_ctx = SPContext(sp_group, strategy, layout)
        softmax_ctx = SPContext(sp_group, softmax_strategy, layout)
        for m in attention:
            m.sp = linear_ctx if isinstance(m, LinearAttention) else softmax_ctx
    if activation_checkpointing:
        model.activation_checkpointing = True
    device = next(model.parameters()).device
    # lasp2 modules keep no buffers (RoPE tables and fixed decays are recomputed), so DDP has no
    # per-forward buffer broadcast to do.
    return DistributedDataParallel(model, process_group=dp_sp_group(mesh),
                                   device_ids=[device.index] if device.type == "cuda" else None)
