"""Peak memory of a CPU call: the resident set size sampled by a thread, above the RSS at entry.
``ru_maxrss`` cannot separate calls that share a process (it is monotone)."""
from __future__ import annotations

import ctypes
import os
import threading


class RssPeak:
    """Peak RSS above the RSS at entry, sampled by a thread (CPU memory pass only)."""

    _page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls._page

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def libc_or_none():
    """glibc (to set its mmap threshold and trim its heap), or None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
