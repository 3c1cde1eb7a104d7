"""Keep lasp2's ops out of ``torch.autocast``.

The ops choose their own precision: inputs in any floating dtype, running states, summaries and
everything sent between ranks in fp32 (fp64 for fp64 inputs), outputs in the inputs' dtype.
Under an enclosing autocast region, PyTorch would instead run their matmuls in bf16/fp16, so the
states would drift (~3e-2 at 32K tokens in bf16) and the packed all-gather buffer would lose its
fp32 header. Every public op and every hand-written backward therefore runs with autocast off;
callers get their usual low-precision outputs either way.

The public attention ops accept inputs the way transformers' attention does under autocast
(``follow_autocast``): when q, k and v arrive in different dtypes inside an autocast region (a
model whose RoPE or norms leave q and k in fp32 while v is bf16), they are cast to the autocast
dtype of their device, as autocast casts the inputs of ``scaled_dot_product_attention`` (floating
tensors other than fp64); the op then computes as above (states and messages fp32) and returns
that dtype. Inputs that already share one dtype are taken as they are (an autocast region then
changes nothing), and different dtypes outside autocast stay a ValueError.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional, TypeVar

import torch

F = TypeVar("F", bound=Callable)

_DEVICE_TYPES = ("cpu", "cuda")


@contextlib.contextmanager
def autocast_disabled() -> Iterator[None]:
    """Turn off every autocast region that is active on this thread, for the duration."""
    with contextlib.ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def no_autocast(fn: F) -> F:
    """Decorator form of :func:`autocast_disabled`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_disabled():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype of the autocast region active for ``device``'s type on this thread, or None."""
    if device.type in _DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_inputs(*xs):
    """The tensors among ``xs`` brought to one dtype the way autocast would: if they differ in
    dtype and an autocast region is active for the first one's device, the floating ones other
    than fp64 are cast to the autocast dtype (None and non-tensors are passed through). Otherwise
    ``xs`` unchanged (the caller's dtype check reports a remaining mismatch)."""
    tensors = [x for x in xs if isinstance(x, torch.Tensor)]
    if len({x.dtype for x in tensors}) <= 1:
        return xs
    dtype = autocast_dtype(tensors[0].device)
    if dtype is None:
        return xs
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                 else x for x in xs)


_QKV = ("q", "k", "v")


def follow_autocast(fn: F) -> F:
    """Decorator for a public op ``fn(q, k, v, ...)``: q, k and v (positional or keyword) of
    different dtypes inside an autocast region are cast to the autocast dtype
    (``autocast_inputs``); ``fn`` then runs with autocast off (:func:`autocast_disabled`). Other
    arguments (gates, states) are passed as given."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = min(len(args), 3)
        named = [k for k in _QKV[n:] if k in kwargs]
        cast = autocast_inputs(*args[:n], *(kwargs[k] for k in named))
        args = tuple(cast[:n]) + tuple(args[n:])
        kwargs.update(zip(named, cast[n:]))
        with autocast_disabled():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
