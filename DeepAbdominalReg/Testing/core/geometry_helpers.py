"""Geometry helpers shared by the core tests."""

from __future__ import annotations

import numpy as np


def oblique_direction(angle_deg: float = 20.0, flip: bool = True) -> tuple[float, ...]:
    """A rotation about an oblique axis, optionally composed with a flip of x and y (LPS <-> RAS-like)."""
    a = np.deg2rad(angle_deg)
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    if flip:
        rot = rot @ np.diag([-1.0, -1.0, 1.0])
    return tuple(rot.ravel())
