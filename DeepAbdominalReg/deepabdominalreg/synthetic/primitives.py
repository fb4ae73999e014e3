"""Signed-distance primitives of the phantom (ellipses, ellipsoids, smooth union), rotations, textures and curves,
in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# small geometric helpers (all elementwise on float32 arrays of any shape; distances in mm)
# ----------------------------------------------------------------------------------------------------------------


def soft_edge(signed_distance: np.ndarray | float, width: float) -> np.ndarray:
    """Fraction inside (0..1) of a voxel whose centre lies ``signed_distance`` mm from a surface (negative inside)."""
    return np.clip(0.5 - np.asarray(signed_distance) / width, 0.0, 1.0)


def ellipse_sdf(u: np.ndarray, v: np.ndarray, ru: float, rv: float) -> np.ndarray:
    """Approximate signed distance (mm) to the ellipse ``(u/ru)^2 + (v/rv)^2 = 1`` (exact on the axes)."""
    k0 = np.sqrt((u / ru) ** 2 + (v / rv) ** 2)
    k1 = np.sqrt((u / ru**2) ** 2 + (v / rv**2) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def ellipsoid_sdf(p: tuple[np.ndarray, np.ndarray, np.ndarray], semi: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid centred at 0 (``p`` in its own frame)."""
    a, b, c = semi
    k0 = np.sqrt((p[0] / a) ** 2 + (p[1] / b) ** 2 + (p[2] / c) ** 2)
    k1 = np.sqrt((p[0] / a**2) ** 2 + (p[1] / b**2) ** 2 + (p[2] / c**2) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two signed distances with blending radius ``k`` mm."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


def rotation_xyz(rx_deg: float = 0.0, ry_deg: float = 0.0, rz_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` (angles in degrees, about the LPS axes)."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class Texture:
    """A smooth random field in physical space (sum of random plane waves), zero mean, about unit variance."""

    def __init__(self, rng: np.random.Generator, wavelength_mm: float, terms: int = 6):
        directions = rng.normal(size=(terms, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavenumber = 2.0 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.3, size=(terms, 1)))
        self.k = (directions * wavenumber).astype(np.float32)
        self.phase = rng.uniform(0.0, 2.0 * np.pi, size=terms).astype(np.float32)
        self.scale = np.float32(np.sqrt(2.0 / terms))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast(x, y, z).shape, dtype=np.float32)
        for k, phase in zip(self.k, self.phase):
            out += np.cos(k[0] * x + k[1] * y + k[2] * z + phase)
        return out * self.scale


def catmull_rom(points: np.ndarray, per_segment: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Dense Catmull-Rom curve through ``points`` ``(N, 3)``; returns the curve and its parameter (control index)."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) == 1:
        return p.copy(), np.zeros(1)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    curves, params = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        c = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                   + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        curves.append(c)
        params.append(i + t[:, 0])
    curves.append(p[-1:])
    params.append(np.array([len(p) - 1.0]))
    return np.vstack(curves), np.concatenate(params)


def segment_distance(px, py, a, b):
    """In-plane distance (mm) from points to the segment ``a``-``b`` and the position along it (0..1)."""
    ax, ay = a
    bx, by = b
    vx, vy = bx - ax, by - ay
    t = np.clip(((px - ax) * vx + (py - ay) * vy) / np.maximum(vx * vx + vy * vy, 1e-6), 0.0, 1.0)
    return np.sqrt((px - ax - t * vx) ** 2 + (py - ay - t * vy) ** 2), t
