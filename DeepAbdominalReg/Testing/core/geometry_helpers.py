"""Helpers shared by the core tests (a plain module: test files must not import ``conftest``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def oblique_direction(angle_deg: float = 20.0, flip: bool = True) -> tuple[float, ...]:
    """A rotation about an oblique axis, optionally composed with a flip of x and y (LPS <-> RAS-like)."""
    a = np.deg2rad(angle_deg)
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    if flip:
        rot = rot @ np.diag([-1.0, -1.0, 1.0])
    return tuple(rot.ravel())


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository (or ``$DEEPABDOMINALREG_SHARED_DATA``); ``None`` when absent."""
    env = os.environ.get("DEEPABDOMINALREG_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "data")
    for candidate in candidates:
        if (candidate / "totalsegmentator").is_dir():
            return candidate
    return None


def smooth_texture(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A (1, 1, *shape) random texture smoothed by three 3-voxel box filters, scaled to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g)
    for _ in range(3):
        x = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    return (x - x.min()) / (x.max() - x.min())
