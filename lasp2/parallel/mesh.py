"""The ("dp", "sp") device mesh: its checks, its flattened dp x sp group, and the global token mean.

Nothing here knows layers or models (``lasp2.models.parallelize`` wires those): these helpers
only read the mesh given to them.

    mesh = init_device_mesh("cpu", (dp, sp), mesh_dim_names=("dp", "sp"))  # "cuda" for NCCL
    group = dp_sp_group(mesh)            # every rank of the mesh: gradients and token losses
    loss = global_token_mean(loss_sum, n_tokens, mesh)
"""
from __future__ import annotations

from typing import Union

import torch
from torch.distributed.device_mesh import DeviceMesh

from . import comm

MESH_DIMS = ("dp", "sp")
FLAT_DIM = "dp_sp"


def check_mesh(mesh) -> None:
    """ValueError unless ``mesh`` is a DeviceMesh with the dims ("dp", "sp") in that order."""
    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}; "
                         f"create it with init_device_mesh(device_type, (dp, sp), mesh_dim_names=('dp', 'sp'))")
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(f"mesh must have the dims ('dp', 'sp') in that order, got {mesh.mesh_dim_names}; "
                         f"use init_device_mesh(device_type, (dp, sp), mesh_dim_names=('dp', 'sp')) (sizes may be 1)")


def flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh ``"dp_sp"`` of every rank of the ("dp", "sp") mesh, in row-major (dp, sp) order.

    FSDP2 shards over it (a 1-D mesh: FSDP; the 2-D mesh would give HSDP, replicating over dp),
    DDP averages gradients over its group, and token losses are reduced over it.

    Communication: the first call creates the group (every rank of the mesh must call it); the
    root mesh caches the flattened mesh, so later calls return the same one and communicate nothing.
    """
    check_mesh(mesh)
    return _flatten(mesh, FLAT_DIM)


def _flatten(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """``mesh._flatten(name)``: the one use of a private torch API in lasp2 (README, Known
    Limitations). torch 2.4 - 2.13 has no public call that flattens mesh dims into a mesh attached
    to (and cached by) the root mesh; the public DeviceMesh(...) constructor would create a new
    process group on every call and leave mesh["dp_sp"] unknown. A clear error if it is gone."""
    flatten = getattr(mesh, "_flatten", None)
    if flatten is None:
        raise RuntimeError(f"torch {torch.__version__}: DeviceMesh has no _flatten, which lasp2 uses to build the "
                           f"flattened dp x sp mesh (verified with torch 2.4 - 2.13); install torch==2.13.0")
    return flatten(name)


def dp_sp_group(mesh: DeviceMesh):
    """The process group of ``flat_mesh(mesh)``: gradients are averaged and token losses reduced over it.

    Communication: as :func:`flat_mesh` (the group is created once, by its first call).
    """
    return flat_mesh(mesh).get_group()


def _as_group(group):
    return dp_sp_group(group) if isinstance(group, DeviceMesh) else group


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
        W * d(loss_sum) / N (W ranks, N tokens in all). DDP and FSDP2 average gradients over the
        same W ranks, so the synchronised gradient is exactly that of the global token mean,
        whatever each rank's token count.

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
