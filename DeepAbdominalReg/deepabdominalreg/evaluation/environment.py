"""What a result was measured on: code version, CPU, memory, load and niceness of the machine.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path


def code_version() -> str:
    """First 12 hex digits of the SHA-256 of the core package's ``*.py`` files (which pipeline code produced a row,
    even in an uncommitted working tree)."""
    import hashlib

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def niceness() -> int:
    """This process's scheduling niceness (> 0: it yielded the CPU to other jobs, so its runtime is not comparable)."""
    try:
        return int(os.nice(0))
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return 0


def load_average() -> float:
    """The machine's 1-minute load average when the run starts (other processes competing for the CPU)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return float("nan")


# --------------------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _git_state() -> str | None:
    """``<commit> (+ uncommitted changes)`` of the checkout holding this package, or None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[3]  # the repository root, above DeepAbdominalReg/
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" + uncommitted changes" if dirty else "")


def environment_info(threads: int | None = None) -> dict:
    """Machine, package versions and thread settings, for the results' record."""
    from importlib import metadata

    versions = {}
    for package in ("deepabdominalreg", "torch", "SimpleITK", "numpy", "scipy", "scikit-image", "itk-elastix",
                    "itk", "antspyx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "memory_gb": _memory_gb(),
                    "os": platform.platform(), "python": sys.version.split()[0]},
        "threads_per_method": threads,
        "packages": versions,
        "code_version": code_version(),
        "git": _git_state(),
    }
    try:
        import torch

        info["torch_threads_default"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a dependency
        info["cuda"] = None
    return info
