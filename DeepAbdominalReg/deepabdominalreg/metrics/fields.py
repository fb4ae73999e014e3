"""Field metrics: the Jacobian determinant of a displacement field and statistics of it and of ``|u|``.

Pure functions on SimpleITK images (LPS, mm) or ``zyx`` numpy arrays, following :mod:`deepabdominalreg.geometry`.
Every distance is in **mm** (physical, using the grid's spacing and direction), never in voxels.

Conventions of the reported numbers (``metrics.json``):

* ``folding_percent``: % of voxels (inside the mask) with ``det J <= 0``.
* ``sdlogj``: standard deviation of ``log(clip(det J, 1e-9, 1e9))`` inside the mask.  Folded voxels enter as
  ``log(1e-9) ~ -20.7``, so a few folds dominate it: it measures smoothness *and* penalises folding.
* ``sdlogj_l2r``: the Learn2Reg evaluation convention, ``std(log(clip(det J + 3, 1e-9, 1e9)))`` (their evaluation
  script adds 3 before the log); only comparable to numbers published by Learn2Reg.
"""


from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch

from deepabdominalreg import spatial
from deepabdominalreg.geometry import Grid, check_displacement
from deepabdominalreg.io import writable_array_view

LOG_CLIP = (1e-9, 1e9)
"""Jacobian determinants are clipped to this range before the log (SDlogJ, the log-Jacobian image): folded voxels
count as log(1e-9) instead of NaN."""


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------




def as_array(image: sitk.Image | np.ndarray) -> np.ndarray:
    """A ``zyx`` array (a read-only view for SimpleITK images)."""
    if isinstance(image, sitk.Image):
        return sitk.GetArrayViewFromImage(image)
    return np.asarray(image)


def check_mask(mask_zyx: np.ndarray | None, shape: tuple[int, ...], name: str = "mask") -> np.ndarray | None:
    if mask_zyx is None:
        return None
    mask = np.asarray(mask_zyx).astype(bool, copy=False)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} has shape {mask.shape} (zyx) but the image has shape {tuple(shape)}")
    return mask


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    ga, gb = Grid.from_image(a), Grid.from_image(b)
    return (
        ga.size == gb.size
        and np.allclose(ga.spacing, gb.spacing, rtol=0, atol=tol)
        and np.allclose(ga.origin, gb.origin, rtol=0, atol=tol * max(1.0, max(ga.spacing)))
        and np.allclose(ga.direction, gb.direction, rtol=0, atol=tol)
    )


# --------------------------------------------------------------------------------------------------------------
# Jacobian determinant and displacement
# --------------------------------------------------------------------------------------------------------------


def jacobian_determinant(displacement_lps: sitk.Image, chunk_slices: int | None = None,
                         device: str | torch.device = "cpu") -> sitk.Image:
    """``det(I + du/dx)`` of the mapping ``x -> x + u(x)``; ``u`` in LPS mm on any grid (oblique, anisotropic).

    Derivatives are with respect to **physical** coordinates: ``du/dindex`` by central differences (one-sided at
    the borders: ``torch.gradient``, as ``numpy.gradient``), then
    ``du/dx = du/dindex @ inv(direction @ diag(spacing))``:
    :func:`deepabdominalreg.spatial.jacobian_determinant` with that matrix.  Computed with torch in float32 on
    ``device`` (the pipeline's CPU or GPU; the determinant of a near-identity mapping keeps ~1e-6 relative
    precision), slab by slab: ``chunk_slices`` z-slices (default: ~2 M voxels, 8 slices of 512 x 512) plus one
    overlapping slice each side, so the extra memory is about 16 slab-sized float32 arrays (~130 MB at the
    default).  The result does not depend on ``chunk_slices``; the default is small so that a slab's temporaries
    stay in the CPU's caches.  Returns ``sitkFloat32`` on the field's grid (dimensionless: 1 = volume
    preserved, < 1 compression, > 1 expansion, <= 0 folding).
    """
    check_displacement(displacement_lps)
    grid = Grid.from_image(displacement_lps)
    view = sitk.GetArrayViewFromImage(displacement_lps)  # (nz, ny, nx, 3): components (x, y, z) LPS
    nz, ny, nx = view.shape[:3]
    if min(nz, ny, nx) < 2:
        raise ValueError(f"the displacement field needs at least 2 voxels along every axis, got size {grid.size}")
    device = torch.device(device)
    # d index_a / d x_b: rows a = index axes (i, j, k), columns b = physical axes (x, y, z); the slabs' tensor
    # axes are (z, y, x) = (k, j, i): the rows reversed
    d_index_d_x = np.linalg.inv(grid.voxel_to_mm_matrix)
    axis_matrix = d_index_d_x[::-1].tolist()
    chunk = max(1, int(chunk_slices) if chunk_slices else (1 << 21) // (ny * nx))
    image = grid.apply_to(sitk.Image(displacement_lps.GetSize(), sitk.sitkFloat32))
    out = writable_array_view(image)  # filled in place: no second full-size copy
    with torch.inference_mode():
        for z0 in range(0, nz, chunk):
            z1 = min(z0 + chunk, nz)
            lo, hi = max(z0 - 1, 0), min(z1 + 1, nz)  # one more slice each side: central differences at z0, z1 - 1
            slab = np.ascontiguousarray(np.moveaxis(view[lo:hi], -1, 0), dtype=np.float32)  # (x, y, z) components
            det = spatial.jacobian_determinant(torch.from_numpy(slab).to(device)[None], axis_matrix=axis_matrix)
            out[z0:z1] = det[0, z0 - lo: z0 - lo + (z1 - z0)].cpu().numpy()
            del slab, det
    del out
    return image


def jacobian_statistics(jacobian_zyx: np.ndarray, mask_zyx: np.ndarray | None = None) -> dict:
    """Summary of a Jacobian determinant map inside ``mask_zyx`` (all voxels when ``None``).

    Returns ``folding_percent`` (% of voxels with ``det <= 0``), ``folding_voxels``, ``voxels``,
    ``jacobian_min``, ``jacobian_max``, ``jacobian_mean``, ``jacobian_std``, ``sdlogj``
    (``std(log(clip(det, 1e-9, 1e9)))``) and ``sdlogj_l2r`` (Learn2Reg: ``std(log(clip(det + 3, 1e-9, 1e9)))``).
    An empty mask gives ``voxels = 0`` and NaN for every statistic.
    """
    jac = as_array(jacobian_zyx)
    mask = check_mask(mask_zyx, jac.shape)
    # slab by slab in float32, sums in float64: a clinical-size map has ~10^8 voxels (float64 copies: GBs)
    n = folded = 0
    low, high = math.inf, -math.inf
    sums = np.zeros(6, dtype=np.float64)  # x, x^2, log x, (log x)^2, log(x+3), (log(x+3))^2
    step = 16
    for z0 in range(0, jac.shape[0], step):
        block = np.asarray(jac[z0: z0 + step], dtype=np.float32)
        values = block[mask[z0: z0 + step]] if mask is not None else block.ravel()
        if values.size == 0:
            continue
        n += int(values.size)
        folded += int(np.count_nonzero(values <= 0))
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        for i, v in enumerate((values, np.log(np.clip(values, *LOG_CLIP)),
                               np.log(np.clip(values + np.float32(3.0), *LOG_CLIP)))):
            sums[2 * i] += np.sum(v, dtype=np.float64)
            sums[2 * i + 1] += np.sum(np.square(v, dtype=np.float64))
    if n == 0:
        nan = float("nan")
        return {
            "folding_percent": nan, "folding_voxels": 0, "voxels": 0, "jacobian_min": nan, "jacobian_max": nan,
            "jacobian_mean": nan, "jacobian_std": nan, "sdlogj": nan, "sdlogj_l2r": nan,
        }
    means = sums[0::2] / n
    stds = np.sqrt(np.maximum(sums[1::2] / n - means**2, 0.0))
    return {
        "folding_percent": 100.0 * folded / n,
        "folding_voxels": folded,
        "voxels": n,
        "jacobian_min": low,
        "jacobian_max": high,
        "jacobian_mean": float(means[0]),
        "jacobian_std": float(stds[0]),
        "sdlogj": float(stds[1]),
        "sdlogj_l2r": float(stds[2]),
    }


def _magnitude_zyx(displacement_lps: sitk.Image, out: np.ndarray | None = None) -> np.ndarray:
    """``|u|`` per voxel (float32, ``zyx``), a few slices at a time in float32 (relative precision ~1e-7, enough for a
    magnitude in mm; float64 slabs would double the memory traffic and be new memory at every slab)."""
    view = sitk.GetArrayViewFromImage(displacement_lps)
    out = np.empty(view.shape[:3], dtype=np.float32) if out is None else out
    step = max(1, (1 << 20) // max(view.shape[1] * view.shape[2], 1))
    with torch.inference_mode():
        for z in range(0, view.shape[0], step):
            slab = torch.from_numpy(np.require(view[z: z + step], dtype=np.float32, requirements="W"))
            torch.linalg.vector_norm(slab, dim=-1, out=torch.from_numpy(out[z: z + step]))
    return out


def displacement_magnitude(displacement_lps: sitk.Image) -> sitk.Image:
    """``|u(x)|`` in mm as ``sitkFloat32`` on the field's grid."""
    check_displacement(displacement_lps)
    image = Grid.from_image(displacement_lps).apply_to(sitk.Image(displacement_lps.GetSize(), sitk.sitkFloat32))
    _magnitude_zyx(displacement_lps, out=writable_array_view(image))  # filled in place: no second copy
    return image


def displacement_statistics(
    displacement_lps: sitk.Image, mask_zyx: np.ndarray | None = None, magnitude: sitk.Image | None = None
) -> dict:
    """``max_mm``, ``p95_mm``, ``mean_mm`` (and ``median_mm``) of ``|u|`` inside the mask (all voxels if ``None``).

    ``magnitude``: :func:`displacement_magnitude` of the field when already computed (saves recomputing it).
    An empty mask gives NaN.
    """
    check_displacement(displacement_lps)
    magnitude = _magnitude_zyx(displacement_lps) if magnitude is None else as_array(magnitude)
    mask = check_mask(mask_zyx, magnitude.shape)
    values = magnitude[mask] if mask is not None else magnitude.ravel()
    if values.size == 0:
        nan = float("nan")
        return {"max_mm": nan, "p95_mm": nan, "mean_mm": nan, "median_mm": nan}
    maximum, mean = float(values.max()), float(np.mean(values, dtype=np.float64))
    # values is a copy when masked: the percentiles may reorder it in place (one copy fewer of ~10^7-10^8 floats)
    p50, p95 = np.percentile(values, [50, 95], overwrite_input=mask is not None)
    return {"max_mm": maximum, "p95_mm": float(p95), "mean_mm": mean, "median_mm": float(p50)}
