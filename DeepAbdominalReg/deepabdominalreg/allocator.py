"""Heap reuse for the pipeline's large temporary CPU tensors (glibc ``malloc`` on Linux; a no-op elsewhere).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back to
the kernel on ``free``.  The pipeline allocates and frees such tensors thousands of times (cost volumes, box-filter
sums, IO gradients: 10-100 MB each), so every one is page-faulted in again, zero-filled by the kernel.  Measured
here (``benchmarks/README.md``, "Performance"): the shipped network's forward pass at one thread, 4.06 s with the default allocator,
2.39 s with freed memory kept for reuse; 39 % of that process's CPU time had been kernel time.

:func:`reuse_freed_memory` switches glibc to serving everything from its heap (``M_MMAP_MAX = 0``) and to keeping
freed memory there (a high ``M_TRIM_THRESHOLD``) for the duration of a block, then restores glibc's defaults and
returns the heap's free memory to the system (``malloc_trim``), so a long-lived process (the Slicer module runs the
pipeline in a child process anyway) does not keep its peak.  Nested and concurrent blocks share one setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["reuse_freed_memory", "supported"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's defaults (malloc/malloc.c)
_DEFAULT_MMAP_MAX = 65536
_KEEP_BYTES = 1 << 62

_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None = None
_loaded = False

DISABLE_VARIABLE = "DEEPABDOMINALREG_DEFAULT_ALLOCATOR"
"""Set to ``1`` to leave the allocator alone (e.g. when running under jemalloc/tcmalloc or a memory debugger)."""


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or ``None`` (not Linux, musl, or it cannot be loaded)."""
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such symbol)
                libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                libc.mallopt.restype = ctypes.c_int
                libc.malloc_trim.argtypes = (ctypes.c_size_t,)
                libc.malloc_trim.restype = ctypes.c_int
                _libc = libc
            except (OSError, AttributeError):
                _libc = None
    return _libc


def supported() -> bool:
    """Whether :func:`reuse_freed_memory` changes anything here (Linux with glibc, not disabled)."""
    return os.environ.get(DISABLE_VARIABLE, "") not in ("1", "true", "yes") and _glibc() is not None


def _set(mmap_max: int, trim_threshold: int) -> bool:
    libc = _glibc()
    # mallopt takes an int: the threshold is clamped to INT_MAX (2 GiB of free heap kept at most)
    trim = min(trim_threshold, 2**31 - 1)
    return bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))


@contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Keep freed memory in the heap for reuse inside the block (yields whether the setting is active)."""
    global _depth
    entered = supported()
    active = False
    if entered:
        with _lock:
            active = _set(0, _KEEP_BYTES) if _depth == 0 else True
            _depth += 1
    try:
        yield active
    finally:
        if entered:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    _set(_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
                    _glibc().malloc_trim(0)
