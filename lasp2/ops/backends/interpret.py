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


def _check_triton() -> None:
    """The interpreter internals ``_patch`` reaches into (private to triton) exist in this release;
    a clear error otherwise. Verified with triton 3.7.1 - 3.9 (README, Known Limitations)."""
    import triton
    from triton.runtime import autotuner, interpreter

    needed = {"triton.runtime.interpreter.GridExecutor": getattr(interpreter, "GridExecutor", None),
              "triton.runtime.interpreter._implicit_cvt": getattr(interpreter, "_implicit_cvt", None),
              "triton.runtime.interpreter.InterpretedFunction": getattr(interpreter, "InterpretedFunction", None),
              "triton.runtime.autotuner.Autotuner.do_bench": getattr(getattr(autotuner, "Autotuner", None),
                                                                     "do_bench", None)}
    missing = [name for name, found in needed.items() if found is None]
    if missing:
        raise RuntimeError(f"triton {triton.__version__} lacks {', '.join(missing)}, which lasp2 patches to run "
                           f"fla's kernels in the Triton interpreter on CPU (verified with triton 3.7.1 - 3.9); "
                           f"install a verified triton (pip install -c constraints.txt triton) or use "
                           f"backend='torch' on CPU")


def _patch() -> None:
    from triton.runtime import autotuner, interpreter

    _check_triton()

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
