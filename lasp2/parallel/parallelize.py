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

DDP (not FSDP2) because it behaves the same on gloo/CPU and NCCL/GPU and keeps plain tensors as
parameters; the 1B preset fits replicated on one GPU.
"""
from __future__ import annotations

from typing import Union

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from ..nn import LinearAttention, SoftmaxAttention, SPContext
from ..validation import check_choice
from . import comm
from .api import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
from .layout import LAYOUTS

MESH_DIMS = ("dp", "sp")


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}; "
                         f"create it with init_device_mesh(device_type, (dp, sp), mesh_dim_names=('dp', 'sp'))")
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(f"mesh must have the dims ('dp', 'sp') in that order, got {mesh.mesh_dim_names}; "
                         f"use init_device_mesh(device_type, (dp, sp), mesh_dim_names=('dp', 'sp')) (sizes may be 1)")


def dp_sp_group(mesh: DeviceMesh):
    """The process group of every rank in the ("dp", "sp") mesh: gradients are averaged and token
    losses reduced over it.

    Communication: the first call creates the group (every rank of the mesh must call it); the
    mesh caches it, so later calls return the same group and communicate nothing.
    """
    _check_mesh(mesh)
    return mesh._flatten("dp_sp").get_group()


def _as_group(group):
    return dp_sp_group(group) if isinstance(group, DeviceMesh) else group


def parallelize(model: torch.nn.Module, mesh: DeviceMesh, *, strategy: str = "lasp2",
                softmax_strategy: str = "allgather", layout: str = "contiguous") -> DistributedDataParallel:
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

    Returns:
        The model wrapped in ``DistributedDataParallel`` over ``dp_sp_group(mesh)`` (the original
        module is ``.module``, its attention modules now carry ``.sp``). Its forward takes this
        rank's tokens [B, T_global / sp] of this DP rank's batch, and the global ``cu_seqlens``.
        Use ``global_token_mean`` for the loss.

    Communication: per step, each attention layer's SP collectives on the sp group; one DDP
    gradient all-reduce (bucketed) over the dp x sp group, overlapped with backward.
    """
    _check_mesh(mesh)
    check_choice("strategy", strategy, LINEAR_STRATEGIES)
    check_choice("softmax_strategy", softmax_strategy, SOFTMAX_STRATEGIES)
    check_choice("layout", layout, LAYOUTS)
    if isinstance(model, DistributedDataParallel):
        raise ValueError("model is already wrapped in DistributedDataParallel; pass the plain module "
                         "(lasp2.parallelize applies DP itself)")
    attention = [m for m in model.modules() if isinstance(m, (LinearAttention, SoftmaxAttention))]
    if not attention:
        raise ValueError("model has no lasp2.nn.LinearAttention / SoftmaxAttention module to parallelise")
    if any(m.sp is not None for m in attention):
        raise ValueError("model was already parallelised (an attention module has an SP context); "
                         "build a fresh model")
    sp_group = mesh["sp"].get_group()
    linear_ctx = SPContext(sp_group, strategy, layout)
    softmax_ctx = SPContext(sp_group, softmax_strategy, layout)
    for m in attention:
        m.sp = linear_ctx if isinstance(m, LinearAttention) else softmax_ctx
    device = next(model.parameters()).device
    # lasp2 modules keep no buffers (RoPE tables and fixed decays are recomputed), so DDP has no
    # per-forward buffer broadcast to do.
    return DistributedDataParallel(model, process_group=dp_sp_group(mesh),
                                   device_ids=[device.index] if device.type == "cuda" else None)


def global_token_mean(loss_sum: torch.Tensor, n_tokens: Union[int, torch.Tensor],
                      group: Union[DeviceMesh, "torch.distributed.ProcessGroup"]) -> torch.Tensor:
    """The mean token loss over the global batch (every token of every DP and SP rank).

    Args:
        loss_sum: scalar, differentiable: the sum of this rank's per-token losses (e.g.
            ``F.cross_entropy(..., reduction="sum")``, ignored tokens excluded).
        n_tokens: how many tokens that sum covers on this rank (int or scalar tensor); ranks may
            differ (padding, ignore_index).
        group: the mesh given to ``parallelize`` (its dp x sp group is used), or that process group.

    Returns:
        A scalar in loss_sum's dtype whose **value** is sum(loss_sum) / sum(n_tokens) over the
        group, identical on every rank (log it), and whose **gradient** on this rank is
        W * d(loss_sum) / N (W ranks, N tokens in all). DDP averages gradients over the same W
        ranks, so the synchronised gradient is exactly that of the global token mean, whatever
        each rank's token count.

    The global token count must be positive (a global batch with no counted token gives NaN);
    it is not checked here because that would cost a host-device sync every step.

    Communication: 1 all-gather of 2 fp64 values over the group.
    """
    group = _as_group(group)
    if not isinstance(loss_sum, torch.Tensor) or loss_sum.dim() != 0:
        raise ValueError("loss_sum must be a scalar tensor (a sum of per-token losses, reduction='sum')")
    _, world = comm.rank_and_size(group)
    n = torch.as_tensor(n_tokens, dtype=torch.float64, device=loss_sum.device)
    stats = comm.all_gather(torch.stack([loss_sum.detach().to(torch.float64), n]), group)  # [W, 2]
    total, count = stats.sum(0).unbind()
    share = loss_sum * (world / count).to(loss_sum.dtype)
    # value: the global mean; gradient: that of ``share`` (share - share.detach() is exactly 0).
    return share - share.detach() + (total / count).to(loss_sum.dtype)
