"""Label-map metrics (mm, physical spacing): Dice per label, surface distances (HD, HD95, ASD), centroid distance,
and the per-label report the pipeline writes into ``metrics.json``.

* Surface distances are symmetric and surface-voxel based: ``hd`` is the Hausdorff distance, ``hd95`` the larger of
  the two directed 95th percentiles (the MONAI / DeepMind ``surface-distance`` convention), ``asd`` the average
  symmetric surface distance (mean over the surface voxels of both masks of the distance to the other surface).
* ``label_overlap_report`` measures every label from one pass over each map: the surface voxels of all labels
  (a face-neighbour of another value, or on the array's border), and voxel counts and centroids summed over runs
  along the last axis.  A surface voxel shared by both maps is at distance 0; only the others are looked up in a
  k-d tree of the other surface.  The numbers are those of the per-label definition (a crop per label, erosion,
  k-d trees of whole surfaces) to the last bits of rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy.spatial import cKDTree

from deepabdominalreg.geometry import Grid, mask_bounding_box
from deepabdominalreg.metrics.fields import as_array, same_grid


def _label_array(labels: sitk.Image | np.ndarray, role: str) -> np.ndarray:
    array = as_array(labels)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(array == np.round(array)):
            raise ValueError(f"{role} has non-integer values; a label map is required")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"{role} has negative values; labels must be >= 0 (0 = background)")
    return array


# --------------------------------------------------------------------------------------------------------------
# label metrics
# --------------------------------------------------------------------------------------------------------------


def _face_change(array: np.ndarray, axis: int) -> np.ndarray:
    """``True`` between face-neighbours along ``axis`` whose values differ (shape one shorter along ``axis``)."""
    upper = [slice(None)] * array.ndim
    lower = [slice(None)] * array.ndim
    upper[axis], lower[axis] = slice(1, None), slice(None, -1)
    return array[tuple(upper)] != array[tuple(lower)]


class _Runs(NamedTuple):
    """Runs of voxels along the last array axis over which neither of two label maps changes."""

    start: np.ndarray  # flat (C-order) index of each run's first voxel
    length: np.ndarray  # voxels
    label_a: np.ndarray
    label_b: np.ndarray


def _runs(a: np.ndarray, b: np.ndarray, change_a: np.ndarray, change_b: np.ndarray) -> _Runs:
    """The runs of two C-contiguous label maps of one shape; ``change_*``: ``_face_change(map, -1)``.

    Counting and summing per run instead of per voxel: a row of a few hundred voxels crosses a few tens of label
    changes, so the per-label sums touch a small fraction of the voxels (only the comparisons are per voxel).
    """
    first = np.empty(a.shape, dtype=bool)
    first[..., 0] = True
    np.logical_or(change_a, change_b, out=first[..., 1:])
    start = np.flatnonzero(first)
    length = np.diff(start, append=a.size)
    return _Runs(start, length, a.reshape(-1)[start].astype(np.intp), b.reshape(-1)[start].astype(np.intp))


def _counts(labels: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Per-label sums of integer ``weights`` (int64, exact: float64 adds integers exactly below 2**53)."""
    return np.bincount(labels, weights=weights, minlength=size).astype(np.int64)


def _dice_from_counts(count_a, count_b, count_ab, labels: Iterable[int] | None) -> dict[int, float]:
    size = len(count_a)
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


def _label_size(a: np.ndarray, b: np.ndarray) -> int:
    return int(max(a.max(initial=0), b.max(initial=0))) + 1


def _pair_counts(runs: _Runs, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels per label in each map and in both (``count_ab``: voxels carrying the label in both maps)."""
    same = runs.label_a == runs.label_b
    return (_counts(runs.label_a, runs.length, size), _counts(runs.label_b, runs.length, size),
            _counts(runs.label_a[same], runs.length[same], size))


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
    arr_a, arr_b = np.ascontiguousarray(np.atleast_1d(arr_a)), np.ascontiguousarray(np.atleast_1d(arr_b))
    size = _label_size(arr_a, arr_b)
    if arr_a.size == 0:
        zeros = np.zeros(size, dtype=np.int64)
        return _dice_from_counts(zeros, zeros, zeros, labels)
    runs = _runs(arr_a, arr_b, _face_change(arr_a, -1), _face_change(arr_b, -1))
    return _dice_from_counts(*_pair_counts(runs, size), labels)


class _Surfaces(NamedTuple):
    """The surface voxels of every label of a label map, grouped by label."""

    mask: np.ndarray  # bool, the map's shape: surface voxels of any label
    index: np.ndarray  # (n,) flat C-order indices, grouped by label, raster order within a label
    label: np.ndarray  # (n,) their labels, ascending
    voxel: tuple[np.ndarray, ...]  # ndim arrays (n,): their array indices
    groups: dict[int, slice]  # label -> its rows


def _surface_mask(labels: np.ndarray, last_axis_change: np.ndarray | None = None) -> np.ndarray:
    """Non-zero voxels with a face-neighbour of another value or on the array's border (any number of axes)."""
    surface = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        change = last_axis_change if axis == labels.ndim - 1 and last_axis_change is not None else None
        change = _face_change(labels, axis) if change is None else change
        upper = [slice(None)] * labels.ndim
        lower = [slice(None)] * labels.ndim
        upper[axis], lower[axis] = slice(1, None), slice(None, -1)
        surface[tuple(upper)] |= change
        surface[tuple(lower)] |= change
        upper[axis], lower[axis] = 0, -1
        surface[tuple(upper)] = True
        surface[tuple(lower)] = True
    surface &= labels != 0
    return surface


def _surfaces(labels: np.ndarray, last_axis_change: np.ndarray | None = None) -> _Surfaces:
    """One pass over the map for all its labels (``labels``: C-contiguous)."""
    mask = _surface_mask(labels, last_axis_change)
    index = np.flatnonzero(mask)
    label = labels.reshape(-1)[index]
    order = np.argsort(label, kind="stable")
    index, label = index[order], label[order]
    voxel = tuple(np.unravel_index(index, labels.shape))
    first = np.flatnonzero(np.diff(label, prepend=-1, append=-1))  # label is sorted: where each label begins
    groups = {int(label[b]): slice(int(b), int(e)) for b, e in zip(first[:-1], first[1:])}
    return _Surfaces(mask, index, label, voxel, groups)


def _points_mm(surfaces: _Surfaces, rows: slice, origin: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``(n, ndim)`` positions (mm) of a label's surface voxels relative to the voxel ``origin``."""
    return np.stack([(axis[rows] - o) * s for axis, o, s in zip(surfaces.voxel, origin, spacing)], axis=-1)


def _first_voxel(surfaces: _Surfaces, rows: slice) -> np.ndarray:
    """The lowest index along each axis of a label's surface voxels (= of the label: its extreme voxels are on its
    surface)."""
    return np.array([axis[rows].min() for axis in surfaces.voxel], dtype=np.int64)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (outside the array counts as outside)."""
    return _surface_mask(np.asarray(mask, dtype=bool))


def _on_other_surface(own: _Surfaces, other: _Surfaces, other_labels: np.ndarray) -> np.ndarray:
    """For each of ``own``'s surface voxels: is it on the surface of the same label in the other map?"""
    return other.mask.reshape(-1)[own.index] & (other_labels.reshape(-1)[own.index] == own.label)


def _distances_from_points(points_a: np.ndarray, points_b: np.ndarray, a_on_b: np.ndarray,
                           b_on_a: np.ndarray) -> dict:
    """``hd``/``hd95``/``asd`` (mm) of two non-empty surface point sets (mm, any common origin).

    ``a_on_b``: which points of ``a`` are also points of ``b`` (their distance is 0, so only the others are
    looked up in the other set's k-d tree; a registered pair shares most of its surface).
    """
    def directed(points, on_other, other) -> np.ndarray:
        distance = np.zeros(len(points), dtype=np.float64)
        off = ~on_other
        if off.any():
            tree = cKDTree(other, balanced_tree=False, compact_nodes=False)  # same answers, cheaper build
            distance[off] = tree.query(points[off], k=1)[0]
        return distance

    # distance (mm) of every surface voxel to the nearest surface voxel of the other mask: nearest neighbours
    # between the two point sets (k-d trees; the same distances as Euclidean distance transforms of the box, which
    # cost more and grow with the box's volume instead of its surface)
    d_ab = directed(points_a, a_on_b, points_b)
    d_ba = directed(points_b, b_on_a, points_a)
    return {
        "hd": float(max(d_ab.max(), d_ba.max())),
        "hd95": float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))),
        "asd": float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size)),
    }


def _union(box_a: tuple[slice, ...] | None, box_b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if box_a is None:
        return box_b
    if box_b is None:
        return box_a
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box_a, box_b))


def _pair_surface_distances(a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, ...], label: int) -> dict:
    """Surface distances of ``label`` in two (cropped) C-contiguous maps; NaN when it is missing from either."""
    nan = {"hd": float("nan"), "hd95": float("nan"), "asd": float("nan")}
    surf_a, surf_b = _surfaces(a), _surfaces(b)
    rows_a, rows_b = surf_a.groups.get(label), surf_b.groups.get(label)
    if rows_a is None or rows_b is None:
        return nan
    spacing, origin = np.asarray(spacing_zyx, dtype=np.float64), np.zeros(a.ndim, dtype=np.int64)
    return _distances_from_points(_points_mm(surf_a, rows_a, origin, spacing),
                                  _points_mm(surf_b, rows_b, origin, spacing),
                                  _on_other_surface(surf_a, surf_b, b)[rows_a],
                                  _on_other_surface(surf_b, surf_a, a)[rows_b])


def surface_distances(
    mask_a: np.ndarray | sitk.Image,
    mask_b: np.ndarray | sitk.Image,
    spacing_zyx: tuple[float, float, float] | None = None,
) -> dict:
    """Symmetric surface distances (mm) between two masks on the same grid: ``hd``, ``hd95``, ``asd``.

    ``spacing_zyx``: voxel spacing in mm in array (z, y, x) order; taken from the image when masks are SimpleITK
    images.  Surfaces are the mask voxels with a face-neighbour outside the mask; distances are Euclidean, in mm,
    from each surface voxel's centre to the nearest surface voxel centre of the other mask.  ``hd95`` is the larger
    of the two directed 95th percentiles.  If either mask is empty every value is NaN.  The masks are cropped to
    their joint bounding box before the transforms.
    """
    if spacing_zyx is None:
        if not isinstance(mask_a, sitk.Image):
            raise ValueError("spacing_zyx (mm) is required for numpy masks")
        spacing_zyx = tuple(reversed(mask_a.GetSpacing()))
    a = as_array(mask_a).astype(bool, copy=False)
    b = as_array(mask_b).astype(bool, copy=False)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape} (zyx)")
    box_a, box_b = mask_bounding_box(a, 1), mask_bounding_box(b, 1)
    if box_a is None or box_b is None:
        nan = float("nan")
        return {"hd": nan, "hd95": nan, "asd": nan}
    box = _union(box_a, box_b)
    crop_a, crop_b = np.ascontiguousarray(a[box], dtype=np.uint8), np.ascontiguousarray(b[box], dtype=np.uint8)
    return _pair_surface_distances(crop_a, crop_b, tuple(float(s) for s in spacing_zyx), 1)


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
    a = as_array(mask_a).astype(bool, copy=False)
    b = as_array(mask_b).astype(bool, copy=False)
    if a.shape != b.shape or a.shape != grid.shape_zyx:
        raise ValueError(f"mask shapes {a.shape}, {b.shape} must both equal the grid's {grid.shape_zyx} (zyx)")
    ca, cb = _centroid_index_xyz(a), _centroid_index_xyz(b)
    if ca is None or cb is None:
        return float("nan")
    pa, pb = grid.index_to_physical(np.stack([ca, cb]))
    return float(np.linalg.norm(pa - pb))


def _index_sums(runs: _Runs, run_labels: np.ndarray, shape: tuple[int, ...], size: int) -> np.ndarray:
    """``(ndim, size)``: per label, the sum over its voxels of each array index (exact integers)."""
    index = np.unravel_index(runs.start, shape)
    first = index[-1]
    sums = [_counts(run_labels, i * runs.length, size) for i in index[:-1]]
    # a run of n voxels from index x0 along the last axis sums x0 + ... + x0 + n - 1
    sums.append(_counts(run_labels, runs.length * (2 * first + runs.length - 1) // 2, size))
    return np.stack(sums)


def _centroid_from_sums(sums: np.ndarray, count: int, origin_zyx: np.ndarray) -> np.ndarray:
    """Centroid array index (x, y, z order) from exact index sums: mean relative to ``origin_zyx`` plus it, i.e.
    rounded as ``_centroid_index_xyz`` of the mask cropped at that origin."""
    relative = (sums - origin_zyx * count).astype(np.float64) / count
    return (relative + origin_zyx.astype(np.float64))[::-1]


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
    if not same_grid(reference_labels, test_labels):
        raise ValueError(
            "reference and test label maps must be on the same grid (size, spacing, origin, direction); "
            "resample the test labels onto the reference first"
        )
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    ref = _label_array(reference_labels, "reference labels")
    test = _label_array(test_labels, "test labels")
    grid = Grid.from_image(reference_labels)
    spacing_zyx = tuple(reversed(grid.spacing))
    ref, test = np.ascontiguousarray(ref), np.ascontiguousarray(test)
    size = _label_size(ref, test)
    # one pass per map for all labels: the changes along x give the runs (voxel counts, centroids, Dice) and,
    # with those along y and z, the surfaces
    change_ref, change_test = _face_change(ref, -1), _face_change(test, -1)
    runs = _runs(ref, test, change_ref, change_test)
    count_ref, count_test, count_both = _pair_counts(runs, size)
    dice = _dice_from_counts(count_ref, count_test, count_both, None)
    sums_ref, sums_test = _index_sums(runs, runs.label_a, ref.shape, size), _index_sums(runs, runs.label_b, ref.shape,
                                                                                        size)
    surf_ref, surf_test = _surfaces(ref, change_ref), _surfaces(test, change_test)
    del change_ref, change_test, runs
    ref_on_test, test_on_ref = _on_other_surface(surf_ref, surf_test, test), _on_other_surface(surf_test, surf_ref, ref)
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    per_label: dict[str, dict] = {}
    nan = float("nan")
    for label, dice_value in sorted(dice.items()):
        rows_ref, rows_test = surf_ref.groups.get(label), surf_test.groups.get(label)
        if rows_ref is not None and rows_test is not None:
            # the corner of the label's joint bounding box grown by one voxel: the origin of the point coordinates
            # and of the centroid sums, so that rounding is that of the label's mask cropped to that box
            start = np.maximum(np.minimum(_first_voxel(surf_ref, rows_ref), _first_voxel(surf_test, rows_test)) - 1, 0)
            dist = _distances_from_points(_points_mm(surf_ref, rows_ref, start, spacing),
                                          _points_mm(surf_test, rows_test, start, spacing),
                                          ref_on_test[rows_ref], test_on_ref[rows_test])
            ca = _centroid_from_sums(sums_ref[:, label], int(count_ref[label]), start)
            cb = _centroid_from_sums(sums_test[:, label], int(count_test[label]), start)
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
