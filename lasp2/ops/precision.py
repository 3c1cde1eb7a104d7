"""Keep lasp2's ops out of ``torch.autocast``.

The ops choose their own precision: inputs in any floating dtype, running states, summaries and
everything sent between ranks in fp32 (fp64 for fp64 inputs), outputs in the inputs' dtype.
Under an enclosing autocast region, PyTorch would instead run their matmuls in bf16/fp16, so the
states would drift (~3e-2 at 32K tokens in bf16) and the packed all-gather buffer would lose its
fp32 header. Every public op and every hand-written backward therefore runs with autocast off;
callers get their usual low-precision outputs either way.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

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
