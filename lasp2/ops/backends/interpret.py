"""Running fla's Triton kernels on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``).

For exactness tests only: the interpreter executes every kernel program in NumPy, so the very
kernels that run on a GPU can be checked against fp64 references on a CPU-only machine. Two
gaps of triton 3.x's interpreter stop fla 0.6.0's kernels; ``prepare`` bridges them, once per
process, and only when ``TRITON_INTERPRET=1`` and the tensors are on the CPU:

1. the autotuner benchmarks every config through a GPU driver ("0 active drivers"): under the
   interpreter its ``do_bench`` returns constant timings (every config computes the same result;
   only speed differs, and the interpreter's speed means nothing);
2. fla's kernels loop with the builtin ``range(NT)`` and call ``i_t.to(tl.int64)`` on the index,
   which is a plain Python int in the interpreter: while a kernel runs
   (``GridExecutor.__call__``), its module's globals get a ``range`` that yields interpreter
   tensors, restored right after.

``TRITON_INTERPRET`` is read when a kernel is *defined* (``triton.jit`` at fla's import), so it
must be set before fla is imported; ``prepare`` checks that the kernels really are interpreted.
"""
from __future__ import annotations

import builtins
import functools
import os
import threading

import torch

_lock = threading.Lock()
_applied = False


def active(x: torch.Tensor) -> bool:
    """Whether fla will run ``x``'s computation in the interpreter (CPU tensor, TRITON_INTERPRET=1)."""
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def prepare(x: torch.Tensor) -> None:
    """Apply the interpreter compatibility if ``x`` is a CPU tensor (idempotent); a ValueError if
    the environment does not allow fla on CPU."""
    if x.device.type != "cpu":
        return
    if not active(x):
        raise ValueError("backend='fla' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                         "in the environment before Python starts, or use backend='torch'")
    global _applied
    with _lock:
        if not _applied:
            _patch()
            _applied = True


def _interpreter_range(*args):
    from triton.runtime.interpreter import _implicit_cvt

    return (_implicit_cvt(i) for i in builtins.range(*args))


def _patch() -> None:
    from triton.runtime import autotuner, interpreter

    def constant_timings(self):
        return lambda kernel_call, quantiles=None, **kwargs: [1.0, 1.0, 1.0]

    autotuner.Autotuner.do_bench = property(constant_timings)
    original = interpreter.GridExecutor.__call__

    @functools.wraps(original)
    def call(self, *args, **kwargs):
        namespace = self.fn.__globals__
        missing = object()
        saved = namespace.get("range", missing)
        namespace["range"] = _interpreter_range
        try:
            return original(self, *args, **kwargs)
        finally:
            if saved is missing:
                del namespace["range"]
            else:
                namespace["range"] = saved

    interpreter.GridExecutor.__call__ = call


def check_interpreted(kernel) -> None:
    """ValueError if ``kernel`` (a triton kernel, possibly autotuned) was compiled for a GPU
    although the interpreter is wanted: fla was imported before TRITON_INTERPRET=1 was set."""
    from triton.runtime.interpreter import InterpretedFunction

    fn = kernel
    while hasattr(fn, "fn") and not isinstance(fn, InterpretedFunction):
        fn = fn.fn
    if not isinstance(fn, InterpretedFunction):
        raise ValueError("fla was imported before TRITON_INTERPRET=1 was set, so its kernels were compiled "
                         "for a GPU: set TRITON_INTERPRET=1 in the environment before Python starts")
