"""Where and how the computation runs: the torch device, CPU features (native bfloat16), seeds, and process memory
(glibc heap reuse during a registration, peak-memory measurement).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from deepabdominalreg.io import ImageValidationError


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ImageValidationError(
                "device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto."
            )
        return torch.device("cuda")
    if requested == "cpu":
        return torch.device("cpu")
    raise ImageValidationError(f"unknown device '{requested}'; use auto, cpu or cuda.")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16 or
    AMX (elsewhere bf16 is emulated and slower than float32, so ``network_precision="bf16"`` runs in float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private but stable since torch 2.3
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def network_uses_bfloat16(precision: str, device: torch.device | str) -> bool:
    """Whether the network's forward pass runs in bf16 autocast for ``RegistrationConfig.network_precision``:
    ``fp32`` never; ``bf16`` where the device computes bf16 natively; ``auto`` (the default) where bf16 is also
    faster for the shipped network with the same fields to well under a voxel, i.e. on such CPUs, but not on CUDA,
    where this small network's casts cost more than bf16 saves (timings: ``benchmarks/README.md``)."""
    device = torch.device(device)
    if precision == "bf16":
        return native_bfloat16(device)
    if precision == "auto":
        return device.type == "cpu" and native_bfloat16(device)
    return False


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


# --------------------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------------------


def _rss_peak_mb() -> float | None:
    try:
        import resource  # POSIX only (absent on Windows)

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, AttributeError, OSError):  # pragma: no cover - Windows
        return None
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0  # macOS: bytes, Linux: KiB


def _cuda_max_allocated_mb() -> float | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / (1024.0 * 1024.0)


def peak_memory_mb() -> dict:
    """Peak memory of this process so far: ``rss_mb`` (peak resident set, MiB; None where unsupported) and
    ``cuda_max_allocated_mb`` (torch's peak allocated CUDA memory since the last reset, MiB; None without CUDA)."""
    return {"rss_mb": _rss_peak_mb(), "cuda_max_allocated_mb": _cuda_max_allocated_mb()}


@dataclass
class PeakMemory:
    """Context manager measuring peak memory over a block (MiB)::

        with PeakMemory() as peak:
            run()
        peak.rss_mb, peak.cuda_max_allocated_mb

    ``rss_mb`` is the process's lifetime peak RSS at exit (the OS cannot reset it, so it may predate the block);
    ``rss_increase_mb`` is how much the block raised that peak.  The CUDA peak counter is reset on entry.
    """

    rss_mb: float | None = None
    rss_increase_mb: float | None = None
    cuda_max_allocated_mb: float | None = None
    _rss_at_entry: float | None = field(default=None, repr=False)

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 - Self needs Python 3.11
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._rss_at_entry = _rss_peak_mb()
        return self

    def __exit__(self, *exc) -> None:
        self.rss_mb = _rss_peak_mb()
        if self.rss_mb is not None and self._rss_at_entry is not None:
            self.rss_increase_mb = self.rss_mb - self._rss_at_entry
        self.cuda_max_allocated_mb = _cuda_max_allocated_mb()

    def as_dict(self) -> dict:
        return {
            "rss_mb": self.rss_mb,
            "rss_increase_mb": self.rss_increase_mb,
            "cuda_max_allocated_mb": self.cuda_max_allocated_mb,
        }
