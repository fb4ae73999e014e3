"""Landmark metrics: target registration error (TRE) between paired points (mm, LPS)."""

from __future__ import annotations

import numpy as np


def landmark_errors(points_a_lps: np.ndarray, points_b_lps: np.ndarray) -> dict:
    """Euclidean distances (mm) between corresponding LPS points ``(N, 3)``: ``mean``, ``std``, ``p95``, ``max``,
    ``count`` and ``per_point`` (list of N floats).  No points gives NaN statistics."""
    a = np.asarray(points_a_lps, dtype=np.float64)
    b = np.asarray(points_b_lps, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3 or a.shape != b.shape:
        raise ValueError(
            f"landmark arrays must both have shape (N, 3) with the same N (corresponding points in the same order), "
            f"got {a.shape} and {b.shape}"
        )
    errors = np.linalg.norm(a - b, axis=1)
    if errors.size == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "p95": nan, "max": nan, "count": 0, "per_point": []}
    return {
        "mean": float(errors.mean()),
        "std": float(errors.std()),
        "p95": float(np.percentile(errors, 95)),
        "max": float(errors.max()),
        "count": int(errors.size),
        "per_point": [float(e) for e in errors],
    }
