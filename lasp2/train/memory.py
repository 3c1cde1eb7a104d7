"""Per-rank memory of a training step, in bytes, split the way FSDP2 changes it.

* ``param_bytes``, ``grad_bytes``, ``optimizer_bytes``: the state a rank keeps, counted from the
  tensors themselves (this rank's local shards under FSDP2; shared storage counted once).
* ``activation_peak_bytes``: the peak, during forward and backward, of the bytes allocated in them
  and alive at once, minus the gradients the step leaves behind: saved activations, temporaries,
  recomputed blocks under activation checkpointing, and (FSDP2) the all-gathered parameters and
  unsharded gradients of the blocks being computed.

Both are exact and deterministic (no allocator or resident-set noise) on any device: allocations
are seen by a ``TorchDispatchMode`` (every op's fresh output storages) and frees by weak
references to those storages. Allocations outside torch's operators (DDP's gradient buckets, made
at wrap time, and allocator caching) are not counted.
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, List, Tuple

import torch

try:  # torch's dispatch-mode extension point and pytree, public in use but under private module names
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
except ImportError as e:  # pragma: no cover - a torch that moved them
    raise ImportError(f"lasp2's activation-memory accounting needs torch.utils._python_dispatch.TorchDispatchMode "
                      f"and torch.utils._pytree.tree_flatten (verified with torch 2.4 - 2.13); found torch "
                      f"{torch.__version__} without them") from e


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


def _storages(tensors: Iterable[torch.Tensor]) -> Dict[int, int]:
    """id -> nbytes of the distinct storages behind ``tensors``."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = _local(t).untyped_storage()
            out[id(st)] = st.nbytes()
    return out


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes."""
    params = list(model.parameters())
    optim = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {"param_bytes": sum(_storages(params).values()),
            "grad_bytes": sum(_storages(p.grad for p in params if p.grad is not None).values()),
            "optimizer_bytes": sum(_storages(optim).values())}


class ActivationPeak(TorchDispatchMode):
    """``with ActivationPeak() as m: forward and backward`` then ``m.peak_bytes(exclude=grads)``."""

    def __init__(self):
        super().__init__()
        self._events: List[Tuple[int, int]] = []  # (allocation number, +bytes or -bytes)
        self._live: Dict[int, int] = {}  # id(storage) -> allocation number
        self._recording = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(_local(t).untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = _local(t).untyped_storage()
            key = id(st)
            if key in inputs or key in self._live or not self._recording:
                continue  # in place, a view, or already counted
            n = len(self._events)
            self._live[key] = n
            self._events.append((n, st.nbytes()))
            weakref.finalize(st, self._free, key, n, st.nbytes())
        return out

    def _free(self, key: int, n: int, nbytes: int) -> None:
        if self._live.get(key) == n:
            del self._live[key]
        if self._recording:
            self._events.append((n, -nbytes))

    def __exit__(self, *exc):
        self._recording = False
        return super().__exit__(*exc)

    def peak_bytes(self, exclude: Iterable[torch.Tensor] = ()) -> int:
        """Peak live bytes over the recorded window, not counting the storages of ``exclude``
        (the gradients the step leaves behind) from the moment they were allocated."""
        skip = {self._live[k] for k in _storages(exclude) if k in self._live}
        live = peak = 0
        for n, delta in self._events:
            if n not in skip:
                live += delta
                peak = max(peak, live)
        return peak
