"""Keep glibc from handing large tensors' memory back to the OS after every free (CPU only).

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB, adjusted dynamically)
with a fresh ``mmap`` and unmaps them on ``free``. The tensors of long-sequence attention are
exactly that size (one [1, 32768, 8, 64] fp32 tensor is 64 MiB), so every temporary costs a
round trip to the kernel plus a page fault per 4 KiB touched: on the 2-core development machine
the chunked op's fwd+bwd at T = 32768 spends as much time in the kernel as in arithmetic, and
takes ~2x as long as with the thresholds raised (``lasp2 bench --suite ops`` measures both in
one run). PyTorch's CPU performance guide recommends a caching allocator (jemalloc, tcmalloc)
for the same reason; raising glibc's thresholds gets most of that without a new library.

:func:`tune_cpu_allocator` is opt-in: importing lasp2 changes nothing; ``lasp2 train`` and
``lasp2 bench`` apply it with ``--tuned-allocator`` (ranks they start inherit the settings
through the environment). The cost is memory: freed blocks stay in the process and the heap
fragments, so peak resident memory grows (1.7x for the chunked op at T = 32768; on the 24 GiB
development machine a debug-preset run with 786,432 tokens per step and SP = 4, which fitted
with glibc's defaults at 5.3 GB per rank, was killed for memory with the tuning). Speed for
moderate lengths, defaults for the longest.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers (glibc malloc.h) and the environment variables glibc reads at start.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 1 << 30),  # 1 GiB: big tensors on the heap
             "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 1 << 30)}  # keep up to 1 GiB of free heap
OPT_OUT = "LASP2_DEFAULT_ALLOCATOR"


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds in this process and in processes it starts later.

    Values the user already set in the environment win. Returns True if applied; False where
    the C library is not glibc, or ``LASP2_DEFAULT_ALLOCATOR=1`` opts out.
    """
    if os.environ.get(OPT_OUT, "") not in ("", "0") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for env, (param, default) in _SETTINGS.items():
        value = int(os.environ.setdefault(env, str(default)))  # children read it at start-up
        if libc.mallopt(param, value) != 1:  # this process is already running: set it directly
            return False
    return True
