"""Evaluation metrics: Jacobian determinant, displacement, label overlap, landmarks, similarity, memory.

Pure functions on SimpleITK images (LPS, mm) or ``zyx`` numpy arrays, following :mod:`deepabdominalreg.image`.
Every distance is in **mm** (physical, using the grid's spacing and direction), never in voxels.

Conventions of the reported numbers:

* ``folding_percent``: % of voxels (inside the mask) with ``det J <= 0``.
* ``sdlogj``: standard deviation of ``log(clip(det J, 1e-9, 1e9))`` inside the mask.  Folded voxels enter as
  ``log(1e-9) ~ -20.7``, so a few folds dominate it: it measures smoothness *and* penalises folding.
* ``sdlogj_l2r``: the Learn2Reg evaluation convention, ``std(log(clip(det J + 3, 1e-9, 1e9)))`` (their evaluation
  script adds 3 before the log); only comparable to numbers published by Learn2Reg.
* Surface distances are symmetric and surface-voxel based: ``hd`` is the Hausdorff distance, ``hd95`` the larger of
  the two directed 95th percentiles (the MONAI / DeepMind ``surface-distance`` convention), ``asd`` the average
  symmetric surface distance (mean over the surface voxels of both masks of the distance to the other surface).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from deepabdominalreg.image import Grid, mask_bounding_box, writable_array_view

__all__ = [
    "PeakMemory",
    "centroid_distance_mm",
    "dice_per_label",
    "displacement_magnitude",
    "displacement_statistics",
    "jacobian_determinant",
    "jacobian_statistics",
    "label_overlap_report",
    "landmark_errors",
    "normalized_cross_correlation",
    "peak_memory_mb",
    "structural_similarity",
    "surface_distances",
]

_LOG_CLIP = (1e-9, 1e9)
_FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _check_displacement(field_lps: sitk.Image) -> None:
    if field_lps.GetDimension() != 3 or field_lps.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(
            "expected a 3D displacement field with 3 components per voxel (LPS mm), got "
            f"{field_lps.GetDimension()}D with {field_lps.GetNumberOfComponentsPerPixel()} components"
        )


def _as_array(image: sitk.Image | np.ndarray) -> np.ndarray:
    """A ``zyx`` array (a read-only view for SimpleITK images)."""
    if isinstance(image, sitk.Image):
        return sitk.GetArrayViewFromImage(image)
    return np.asarray(image)


def _check_mask(mask_zyx: np.ndarray | None, shape: tuple[int, ...], name: str = "mask") -> np.ndarray | None:
    if mask_zyx is None:
        return None
    mask = np.asarray(mask_zyx).astype(bool, copy=False)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} has shape {mask.shape} (zyx) but the image has shape {tuple(shape)}")
    return mask


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    ga, gb = Grid.from_image(a), Grid.from_image(b)
    return (
        ga.size == gb.size
        and np.allclose(ga.spacing, gb.spacing, rtol=0, atol=tol)
        and np.allclose(ga.origin, gb.origin, rtol=0, atol=tol * max(1.0, max(ga.spacing)))
        and np.allclose(ga.direction, gb.direction, rtol=0, atol=tol)
    )


def _label_array(labels: sitk.Image | np.ndarray, role: str) -> np.ndarray:
    array = _as_array(labels)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(array == np.round(array)):
            raise ValueError(f"{role} has non-integer values; a label map is required")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"{role} has negative values; labels must be >= 0 (0 = background)")
    return array


# --------------------------------------------------------------------------------------------------------------
# Jacobian determinant and displacement
# --------------------------------------------------------------------------------------------------------------


def jacobian_determinant(displacement_lps: sitk.Image, chunk_slices: int | None = None,
                         device: str | torch.device = "cpu") -> sitk.Image:
    """``det(I + du/dx)`` of the mapping ``x -> x + u(x)``; ``u`` in LPS mm on any grid (oblique, anisotropic).

    Derivatives are with respect to **physical** coordinates: ``du/dindex`` by central differences (one-sided at
    the borders: ``torch.gradient``, as ``numpy.gradient``), then ``du/dx = du/dindex @ inv(direction @ diag(spacing))``.  Computed
    with torch in float32 on ``device`` (the pipeline's CPU or GPU; the determinant of a near-identity mapping
    keeps ~1e-6 relative precision), slab by slab: ``chunk_slices`` z-slices (default: ~2 M voxels, 8 slices of
    512 x 512) plus one overlapping slice each side, so the extra memory is about 14 slab-sized float32 arrays
    (~120 MB at the default).  The result does not depend on ``chunk_slices``; small slabs stay in the CPU's
    caches (512 x 512 x 100 at one thread: 0.93 s with 32 slices, 0.50 s with 8).  Returns ``sitkFloat32`` on the field's grid (dimensionless: 1 = volume
    preserved, < 1 compression, > 1 expansion, <= 0 folding).
    """
    _check_displacement(displacement_lps)
    grid = Grid.from_image(displacement_lps)
    view = sitk.GetArrayViewFromImage(displacement_lps)  # (nz, ny, nx, 3): components (x, y, z) LPS
    nz, ny, nx = view.shape[:3]
    if min(nz, ny, nx) < 2:
        raise ValueError(f"the displacement field needs at least 2 voxels along every axis, got size {grid.size}")
    device = torch.device(device)
    # d index_a / d x_b: rows a = index axes (i, j, k), columns b = physical axes (x, y, z)
    d_index_d_x = np.linalg.inv(grid.direction_matrix @ np.diag(grid.spacing))
    array_dim_of_index = (2, 1, 0)  # index i, j, k live on array axes x, y, z (dims of a (z, y, x) slab)
    chunk = max(1, int(chunk_slices) if chunk_slices else (1 << 21) // (ny * nx))
    image = grid.apply_to(sitk.Image(displacement_lps.GetSize(), sitk.sitkFloat32))
    out = writable_array_view(image)  # filled in place: no second full-size copy
    with torch.inference_mode():
        for z0 in range(0, nz, chunk):
            z1 = min(z0 + chunk, nz)
            lo, hi = max(z0 - 1, 0), min(z1 + 1, nz)
            keep = slice(z0 - lo, z0 - lo + (z1 - z0))
            # one contiguous (z, y, x) block per component; grads d u_c / d index_a accumulated into
            # jac[c][b] = delta_cb + sum_a grad_ca * d index_a / d x_b (zero weights skipped: axis-aligned grids)
            jac: list[list[torch.Tensor | None]] = [[None] * 3 for _ in range(3)]
            for c in range(3):
                component = torch.from_numpy(np.ascontiguousarray(view[lo:hi, :, :, c], dtype=np.float32)).to(device)
                for a in range(3):
                    grad = _twice_gradient(component, array_dim_of_index[a])[keep]
                    for b in range(3):
                        weight = 0.5 * float(d_index_d_x[a, b])
                        if weight == 0.0:
                            continue
                        if jac[c][b] is None:
                            jac[c][b] = grad.mul_(weight) if _only_nonzero(d_index_d_x[a], b) else grad * weight
                        else:
                            jac[c][b].add_(grad, alpha=weight)
                    del grad
                del component
            shape = (z1 - z0, ny, nx)
            for c in range(3):
                for b in range(3):
                    if jac[c][b] is None:
                        jac[c][b] = torch.zeros(shape, device=device)
                jac[c][c].add_(1.0)
            (j00, j01, j02), (j10, j11, j12), (j20, j21, j22) = jac
            # cofactor expansion along the first row, in place (9 passes over the slab instead of 17)
            minor = torch.mul(j11, j22).addcmul_(j12, j21, value=-1.0)
            det = minor.mul_(j00)
            minor = torch.mul(j10, j22).addcmul_(j12, j20, value=-1.0)
            det.addcmul_(j01, minor, value=-1.0)
            minor = torch.mul(j10, j21).addcmul_(j11, j20, value=-1.0)
            det.addcmul_(j02, minor)
            del minor
            out[z0:z1] = det.cpu().numpy()
            del jac, det
    del out
    return image


def _twice_gradient(volume: torch.Tensor, dim: int) -> torch.Tensor:
    """Twice ``torch.gradient(volume, dim=dim)`` (unit spacing): central differences ``f[i+1] - f[i-1]`` inside,
    twice the one-sided differences at the two ends; one subtraction per voxel into one new tensor (``torch.gradient``
    took ~4x as many passes, and a concatenation)."""
    n = volume.shape[dim]
    out = torch.empty_like(volume)
    if n < 2:
        return out.zero_()
    if n > 2:
        torch.sub(volume.narrow(dim, 2, n - 2), volume.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2))
    for edge, (hi, lo) in ((0, (1, 0)), (n - 1, (n - 1, n - 2))):
        torch.sub(volume.select(dim, hi), volume.select(dim, lo), out=out.select(dim, edge)).mul_(2.0)
    return out


def _only_nonzero(row: np.ndarray, column: int) -> bool:
    """Whether ``row[column]`` is the row's only non-zero weight (its gradient is then used by one Jacobian entry,
    which may take it over in place)."""
    return int(np.count_nonzero(row)) == 1 and row[column] != 0


def jacobian_statistics(jacobian_zyx: np.ndarray, mask_zyx: np.ndarray | None = None) -> dict:
    """Summary of a Jacobian determinant map inside ``mask_zyx`` (all voxels when ``None``).

    Returns ``folding_percent`` (% of voxels with ``det <= 0``), ``folding_voxels``, ``voxels``,
    ``jacobian_min``, ``jacobian_max``, ``jacobian_mean``, ``jacobian_std``, ``sdlogj``
    (``std(log(clip(det, 1e-9, 1e9)))``) and ``sdlogj_l2r`` (Learn2Reg: ``std(log(clip(det + 3, 1e-9, 1e9)))``).
    An empty mask gives ``voxels = 0`` and NaN for every statistic.
    """
    jac = _as_array(jacobian_zyx)
    mask = _check_mask(mask_zyx, jac.shape)
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
        for i, v in enumerate((values, np.log(np.clip(values, *_LOG_CLIP)),
                               np.log(np.clip(values + np.float32(3.0), *_LOG_CLIP)))):
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
    """``|u|`` per voxel (float32, ``zyx``), a few slices at a time in float32 (relative precision ~1e-7; float64
    slabs took 2.8 s at 512 x 512 x 400, one thread)."""
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
    _check_displacement(displacement_lps)
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
    _check_displacement(displacement_lps)
    magnitude = _magnitude_zyx(displacement_lps) if magnitude is None else _as_array(magnitude)
    mask = _check_mask(mask_zyx, magnitude.shape)
    values = magnitude[mask] if mask is not None else magnitude.ravel()
    if values.size == 0:
        nan = float("nan")
        return {"max_mm": nan, "p95_mm": nan, "mean_mm": nan, "median_mm": nan}
    maximum, mean = float(values.max()), float(np.mean(values, dtype=np.float64))
    # values is a copy when masked: the percentiles may reorder it in place (one copy fewer of ~10^7-10^8 floats)
    p50, p95 = np.percentile(values, [50, 95], overwrite_input=mask is not None)
    return {"max_mm": maximum, "p95_mm": float(p95), "mean_mm": mean, "median_mm": float(p50)}


# --------------------------------------------------------------------------------------------------------------
# label metrics
# --------------------------------------------------------------------------------------------------------------


def dice_per_label(
    a: sitk.Image | np.ndarray,
    b: sitk.Image | np.ndarray,
    labels: Iterable[int] | None = None,
) -> dict[int, float]:
    """Dice ``2|A∩B| / (|A| + |B|)`` per label of two label maps on the same grid.

    ``labels``: which labels to report (default: every non-zero label present in ``a`` or ``b``).  A label absent
    from both maps is not reported (Dice of two empty sets is undefined); present in only one it scores 0.
    """
    arr_a, arr_b = _label_array(a, "first label map"), _label_array(b, "second label map")
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"label maps differ in shape: {arr_a.shape} vs {arr_b.shape} (zyx); resample first")
    size = int(max(arr_a.max(initial=0), arr_b.max(initial=0))) + 1
    count_a = np.bincount(arr_a.ravel(), minlength=size)
    count_b = np.bincount(arr_b.ravel(), minlength=size)
    count_ab = np.bincount(arr_a[arr_a == arr_b].ravel(), minlength=size)
    if labels is None:
        wanted = [int(v) for v in np.flatnonzero((count_a + count_b) > 0) if v != 0]
    else:
        wanted = [int(v) for v in labels]
    result: dict[int, float] = {}
    for label in wanted:
        if label < 0 or label >= size:
            continue
        total = int(count_a[label]) + int(count_b[label])
        if total > 0:
            result[label] = 2.0 * float(count_ab[label]) / total
    return result


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (outside the array counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_CONNECTIVITY, border_value=0)




def _grow(box: tuple[slice, ...], shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union(box_a: tuple[slice, ...] | None, box_b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if box_a is None:
        return box_b
    if box_b is None:
        return box_a
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box_a, box_b))


def _surface_distances_cropped(mask_a: np.ndarray, mask_b: np.ndarray, spacing_zyx: tuple[float, ...]) -> dict:
    """Surface distances of two boolean masks already cropped with a margin of >= 1 voxel (or touching the border)."""
    nan = float("nan")
    surface_a, surface_b = _surface(mask_a), _surface(mask_b)
    if not surface_a.any() or not surface_b.any():
        return {"hd": nan, "hd95": nan, "asd": nan}
    # distance (mm) of every surface voxel to the nearest surface voxel of the other mask: nearest neighbours
    # between the two point sets (k-d trees; the same distances as Euclidean distance transforms of the box, which
    # cost ~10x more and grow with the box's volume instead of its surface)
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    points_a, points_b = np.argwhere(surface_a) * spacing, np.argwhere(surface_b) * spacing
    d_ab = cKDTree(points_b).query(points_a, k=1)[0]
    d_ba = cKDTree(points_a).query(points_b, k=1)[0]
    return {
        "hd": float(max(d_ab.max(), d_ba.max())),
        "hd95": float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))),
        "asd": float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size)),
    }


def surface_distances(
    mask_a: np.ndarray | sitk.Image,
    mask_b: np.ndarray | sitk.Image,
    spacing_zyx: tuple[float, float, float] | None = None,
) -> dict:
    """Symmetric surface distances (mm) between two masks on the same grid: ``hd``, ``hd95``, ``asd``.

    ``spacing_zyx``: voxel spacing in mm in array (z, y, x) order; taken from the image when masks are SimpleITK
    images.  Surfaces are the mask voxels with a face-neighbour outside the mask; distances are Euclidean, in mm,
    from each surface voxel's centre to the nearest surface voxel centre of the other mask.  ``hd95`` is the larger of the two directed 95th percentiles.  If either
    mask is empty every value is NaN.  The masks are cropped to their joint bounding box before the transforms.
    """
    if spacing_zyx is None:
        if not isinstance(mask_a, sitk.Image):
            raise ValueError("spacing_zyx (mm) is required for numpy masks")
        spacing_zyx = tuple(reversed(mask_a.GetSpacing()))
    a = _as_array(mask_a).astype(bool, copy=False)
    b = _as_array(mask_b).astype(bool, copy=False)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape} (zyx)")
    box_a, box_b = mask_bounding_box(a, 1), mask_bounding_box(b, 1)
    if box_a is None or box_b is None:
        nan = float("nan")
        return {"hd": nan, "hd95": nan, "asd": nan}
    box = _union(box_a, box_b)
    return _surface_distances_cropped(a[box], b[box], tuple(float(s) for s in spacing_zyx))


def _centroid_index_xyz(mask: np.ndarray, offset_zyx: Iterable[int] = (0, 0, 0)) -> np.ndarray | None:
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    centre_zyx = np.array([i.mean() for i in idx]) + np.asarray(list(offset_zyx), dtype=np.float64)
    return centre_zyx[::-1]


def centroid_distance_mm(
    mask_a: np.ndarray | sitk.Image,
    mask_b: np.ndarray | sitk.Image,
    reference: sitk.Image | Grid | None = None,
) -> float:
    """Distance (mm) between the centroids of two masks on the same grid, in physical (LPS) space.

    ``reference`` gives the geometry (spacing, direction, origin); taken from ``mask_a`` when it is a SimpleITK
    image.  NaN when either mask is empty.
    """
    if reference is None:
        if not isinstance(mask_a, sitk.Image):
            raise ValueError("a reference grid/image is required for numpy masks")
        reference = mask_a
    grid = reference if isinstance(reference, Grid) else Grid.from_image(reference)
    a = _as_array(mask_a).astype(bool, copy=False)
    b = _as_array(mask_b).astype(bool, copy=False)
    if a.shape != b.shape or a.shape != grid.shape_zyx:
        raise ValueError(f"mask shapes {a.shape}, {b.shape} must both equal the grid's {grid.shape_zyx} (zyx)")
    ca, cb = _centroid_index_xyz(a), _centroid_index_xyz(b)
    if ca is None or cb is None:
        return float("nan")
    pa, pb = grid.index_to_physical(np.stack([ca, cb]))
    return float(np.linalg.norm(pa - pb))


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def label_overlap_report(
    reference_labels: sitk.Image,
    test_labels: sitk.Image,
    label_names: dict[int, str] | None = None,
) -> dict:
    """Per-label Dice, surface distances (mm) and centroid error (mm) of ``test_labels`` against ``reference_labels``.

    Both maps must be on the same grid.  Every non-zero label present in either map is reported, keyed by its name
    (``label_names``, else ``str(label)``)::

        {"per_label": {name: {"label", "dice", "hd95_mm", "hd_mm", "asd_mm", "centroid_error_mm"}},
         "num_labels", "dice_mean", "dice30" (mean of the lowest 30 % of Dice values, at least one),
         "hd95_mean_mm", "asd_mean_mm", "centroid_error_mean_mm"}

    Distances are NaN for a label missing from one map; means ignore NaN (NaN when nothing is left).
    """
    if not _same_grid(reference_labels, test_labels):
        raise ValueError(
            "reference and test label maps must be on the same grid (size, spacing, origin, direction); "
            "resample the test labels onto the reference first"
        )
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    ref = _label_array(reference_labels, "reference labels")
    test = _label_array(test_labels, "test labels")
    grid = Grid.from_image(reference_labels)
    spacing_zyx = tuple(reversed(grid.spacing))
    dice = dice_per_label(ref, test)
    boxes_ref = ndimage.find_objects(ref)
    boxes_test = ndimage.find_objects(test)
    per_label: dict[str, dict] = {}
    nan = float("nan")
    for label, dice_value in sorted(dice.items()):
        box_ref = boxes_ref[label - 1] if label - 1 < len(boxes_ref) else None
        box_test = boxes_test[label - 1] if label - 1 < len(boxes_test) else None
        box = _grow(_union(box_ref, box_test), ref.shape, 1)
        mask_ref = ref[box] == label
        mask_test = test[box] == label
        if box_ref is not None and box_test is not None:
            dist = _surface_distances_cropped(mask_ref, mask_test, spacing_zyx)
            offset = [s.start for s in box]
            ca, cb = _centroid_index_xyz(mask_ref, offset), _centroid_index_xyz(mask_test, offset)
            pa, pb = grid.index_to_physical(np.stack([ca, cb]))
            centroid = float(np.linalg.norm(pa - pb))
        else:
            dist, centroid = {"hd": nan, "hd95": nan, "asd": nan}, nan
        name = names.get(label, str(label))
        if name in per_label:  # two ids with one name: keep both
            name = f"{name} ({label})"
        per_label[name] = {
            "label": int(label),
            "dice": float(dice_value),
            "hd95_mm": dist["hd95"],
            "hd_mm": dist["hd"],
            "asd_mm": dist["asd"],
            "centroid_error_mm": centroid,
        }
    entries = list(per_label.values())
    dice_values = sorted(e["dice"] for e in entries)
    n_low = max(1, math.ceil(0.3 * len(dice_values))) if dice_values else 0
    return {
        "per_label": per_label,
        "num_labels": len(entries),
        "dice_mean": float(np.mean(dice_values)) if dice_values else nan,
        "dice30": float(np.mean(dice_values[:n_low])) if dice_values else nan,
        "hd95_mean_mm": _nanmean([e["hd95_mm"] for e in entries]),
        "asd_mean_mm": _nanmean([e["asd_mm"] for e in entries]),
        "centroid_error_mean_mm": _nanmean([e["centroid_error_mm"] for e in entries]),
    }


# --------------------------------------------------------------------------------------------------------------
# landmarks and intensity similarity
# --------------------------------------------------------------------------------------------------------------


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


def _paired_arrays(a, b, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    arr_a = np.asarray(_as_array(a), dtype=np.float64)
    arr_b = np.asarray(_as_array(b), dtype=np.float64)
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"images differ in shape: {arr_a.shape} vs {arr_b.shape} (zyx); resample first")
    return arr_a, arr_b, _check_mask(None if mask is None else _as_array(mask), arr_a.shape)


def normalized_cross_correlation(
    a: sitk.Image | np.ndarray,
    b: sitk.Image | np.ndarray,
    mask: sitk.Image | np.ndarray | None = None,
) -> float:
    """Global Pearson correlation of the intensities inside ``mask`` (all voxels if ``None``): 1 = identical up to
    a positive linear intensity map, 0 = uncorrelated.  NaN when the mask is empty or an image is constant there."""
    arr_a, arr_b, m = _paired_arrays(a, b, mask)
    va = arr_a[m] if m is not None else arr_a.ravel()
    vb = arr_b[m] if m is not None else arr_b.ravel()
    if va.size == 0:
        return float("nan")
    va = va - va.mean()
    vb = vb - vb.mean()
    denominator = math.sqrt(float(np.dot(va, va)) * float(np.dot(vb, vb)))
    return float(np.dot(va, vb) / denominator) if denominator > 0 else float("nan")


def structural_similarity(
    a: sitk.Image | np.ndarray,
    b: sitk.Image | np.ndarray,
    mask: sitk.Image | np.ndarray | None = None,
    data_range: float | None = None,
) -> float:
    """Mean SSIM (scikit-image, 7-voxel window or smaller for tiny images) over ``mask`` (all voxels if ``None``).

    ``data_range`` (intensity units, e.g. the HU window width) defaults to the joint range of ``a`` and ``b``.
    NaN for an empty mask.
    """
    from skimage.metrics import structural_similarity as ssim

    arr_a, arr_b, m = _paired_arrays(a, b, mask)
    if data_range is None:
        data_range = float(max(arr_a.max(), arr_b.max()) - min(arr_a.min(), arr_b.min())) or 1.0
    win = min(7, min(arr_a.shape))
    win -= 1 - win % 2  # odd
    if win < 3:
        raise ValueError(f"images of shape {arr_a.shape} are too small for SSIM (need >= 3 voxels per axis)")
    _, ssim_map = ssim(arr_a, arr_b, data_range=float(data_range), win_size=win, full=True)
    values = ssim_map[m] if m is not None else ssim_map.ravel()
    return float(values.mean()) if values.size else float("nan")


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
    torch = sys.modules.get("torch")  # if torch was never imported, CUDA was never used: do not import it here
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
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
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
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
