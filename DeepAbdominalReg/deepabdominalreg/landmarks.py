"""Landmark files: CSV ``x,y,z`` (mm, LPS, one point a row) and Slicer markups ``.mrk.json`` (LPS or RAS)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from deepabdominalreg.image import ImageValidationError

__all__ = ["read_landmarks", "write_landmarks"]


def read_landmarks(path: str | os.PathLike, role: str = "landmarks") -> np.ndarray:
    """Points ``(N, 3)`` in LPS mm from a CSV (``x,y,z`` header optional, extra columns ignored) or ``.mrk.json``.

    Markups in RAS (Slicer's default) are converted to LPS (x and y negated).
    """
    path = Path(path)
    if not path.exists():
        raise ImageValidationError(f"{role} file '{path}' does not exist; check the path.")
    try:
        if path.name.endswith(".json"):
            return _read_markups(path, role)
        return _read_csv(path, role)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageValidationError(f"{role} file '{path}' cannot be read ({exc}).") from exc


def _read_csv(path: Path, role: str) -> np.ndarray:
    rows = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            cells = [c.strip() for c in row if c.strip() != ""]
            if not cells or cells[0].startswith("#"):
                continue
            try:
                rows.append([float(c) for c in cells[:3]])
            except ValueError:
                if number == 1 and not rows:
                    continue  # header
                raise ImageValidationError(f"{role} file '{path}', line {number}: expected numbers x,y,z, got {row}")
            if len(rows[-1]) != 3:
                raise ImageValidationError(f"{role} file '{path}', line {number}: expected 3 coordinates, got {row}")
    if not rows:
        raise ImageValidationError(f"{role} file '{path}' holds no points (CSV x,y,z in mm, LPS, one per row).")
    return np.asarray(rows, dtype=np.float64)


def _read_markups(path: Path, role: str) -> np.ndarray:
    data = json.loads(path.read_text())
    markups = data.get("markups") or []
    if not markups:
        raise ImageValidationError(f"{role} file '{path}' is not a Slicer markups file (no 'markups').")
    markup = markups[0]
    system = str(markup.get("coordinateSystem", "LPS")).upper()
    points = [p["position"] for p in markup.get("controlPoints", []) if "position" in p]
    if not points:
        raise ImageValidationError(f"{role} file '{path}' holds no control points.")
    array = np.asarray(points, dtype=np.float64)
    if system == "RAS":
        array[:, :2] *= -1.0
    elif system != "LPS":
        raise ImageValidationError(f"{role} file '{path}': unknown coordinate system '{system}'.")
    return array


def write_landmarks(points_lps: np.ndarray, path: str | os.PathLike) -> Path:
    """Write points (LPS mm) as CSV with an ``x,y,z`` header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "z"])
        for p in np.asarray(points_lps, dtype=np.float64):
            writer.writerow([f"{v:.4f}" for v in p])
    os.replace(tmp, path)
    return path
