"""The label metrics computed for all labels in one pass give the numbers of the straightforward per-label algorithm.

The oracle below is a plain copy of the per-label implementation the metrics had before (a crop per label, surfaces
by binary erosion, two k-d trees per label, centroids from ``np.nonzero``, Dice from ``np.bincount``); it shares no
code with ``deepabdominalreg.metrics.labels`` beyond the grid.  On tiny cases the surface distances are also checked
against scipy's Euclidean distance transform.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.geometry import Grid, resample_image
from deepabdominalreg.metrics.labels import _surface, dice_per_label, label_overlap_report, surface_distances
from geometry_helpers import oblique_direction
from scipy import ndimage
from scipy.spatial import cKDTree

# --------------------------------------------------------------------------------------------------------------
# the oracle: the per-label algorithm, written out
# --------------------------------------------------------------------------------------------------------------

_FACES = ndimage.generate_binary_structure(3, 1)


def _oracle_surface(mask):
    return mask & ~ndimage.binary_erosion(mask, structure=_FACES, border_value=0)


def _oracle_distances(mask_a, mask_b, spacing_zyx):
    nan = float("nan")
    sa, sb = _oracle_surface(mask_a), _oracle_surface(mask_b)
    if not sa.any() or not sb.any():
        return {"hd": nan, "hd95": nan, "asd": nan}
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    pa, pb = np.argwhere(sa) * spacing, np.argwhere(sb) * spacing
    d_ab = cKDTree(pb).query(pa, k=1)[0]
    d_ba = cKDTree(pa).query(pb, k=1)[0]
    return {
        "hd": float(max(d_ab.max(), d_ba.max())),
        "hd95": float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))),
        "asd": float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size)),
    }


def _oracle_dice(ref, test):
    size = int(max(ref.max(initial=0), test.max(initial=0))) + 1
    count_a = np.bincount(ref.ravel(), minlength=size)
    count_b = np.bincount(test.ravel(), minlength=size)
    count_ab = np.bincount(ref[ref == test].ravel(), minlength=size)
    return {int(v): 2.0 * float(count_ab[v]) / (int(count_a[v]) + int(count_b[v]))
            for v in np.flatnonzero((count_a + count_b) > 0) if v != 0}


def _oracle_report(reference: sitk.Image, test_image: sitk.Image) -> dict:
    ref = sitk.GetArrayFromImage(reference).astype(np.int64)
    test = sitk.GetArrayFromImage(test_image).astype(np.int64)
    grid = Grid.from_image(reference)
    spacing_zyx = tuple(reversed(grid.spacing))
    per_label, nan = {}, float("nan")
    for label, dice in sorted(_oracle_dice(ref, test).items()):
        in_ref, in_test = (ref == label).any(), (test == label).any()
        if in_ref and in_test:
            hits = np.argwhere((ref == label) | (test == label))
            start = np.maximum(hits.min(axis=0) - 1, 0)
            stop = np.minimum(hits.max(axis=0) + 2, ref.shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
            mask_ref, mask_test = ref[box] == label, test[box] == label
            dist = _oracle_distances(mask_ref, mask_test, spacing_zyx)
            ca = (np.array([i.mean() for i in np.nonzero(mask_ref)]) + start)[::-1]
            cb = (np.array([i.mean() for i in np.nonzero(mask_test)]) + start)[::-1]
            pa, pb = grid.index_to_physical(np.stack([ca, cb]))
            centroid = float(np.linalg.norm(pa - pb))
        else:
            dist, centroid = {"hd": nan, "hd95": nan, "asd": nan}, nan
        per_label[str(label)] = {"label": label, "dice": dice, "hd95_mm": dist["hd95"], "hd_mm": dist["hd"],
                                 "asd_mm": dist["asd"], "centroid_error_mm": centroid}
    entries = list(per_label.values())
    dice_values = sorted(e["dice"] for e in entries)
    n_low = max(1, math.ceil(0.3 * len(dice_values))) if dice_values else 0

    def nanmean(values):
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else nan

    return {
        "per_label": per_label,
        "num_labels": len(entries),
        "dice_mean": float(np.mean(dice_values)) if dice_values else nan,
        "dice30": float(np.mean(dice_values[:n_low])) if dice_values else nan,
        "hd95_mean_mm": nanmean([e["hd95_mm"] for e in entries]),
        "asd_mean_mm": nanmean([e["asd_mm"] for e in entries]),
        "centroid_error_mean_mm": nanmean([e["centroid_error_mm"] for e in entries]),
    }


_EXACT = {"label", "dice", "num_labels", "dice_mean", "dice30"}


def _assert_same_number(key: str, got: float, expected: float) -> None:
    if key in _EXACT:
        assert got == expected or (math.isnan(got) and math.isnan(expected)), (key, got, expected)
    elif math.isnan(expected):
        assert math.isnan(got), (key, got)
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-9), key


def _assert_same_report(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    assert list(got["per_label"]) == list(expected["per_label"])
    for name, entry in expected["per_label"].items():
        assert set(got["per_label"][name]) == set(entry)
        for key, value in entry.items():
            _assert_same_number(f"{name}/{key}", got["per_label"][name][key], value)
    for key, value in expected.items():
        if key != "per_label":
            _assert_same_number(key, got[key], value)


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------


def _grid(size_xyz, spacing_xyz, oblique: bool = True) -> Grid:
    direction = oblique_direction(20.0, flip=True) if oblique else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    return Grid(tuple(size_xyz), tuple(spacing_xyz), (12.0, -30.0, 7.5), tuple(float(v) for v in direction))


def _blobs(rng, shape_zyx, n_labels: int, smooth: float = 2.0, dtype=np.uint8) -> np.ndarray:
    """Smooth random regions: each voxel gets the label of the largest of ``n_labels`` smoothed noise fields, or 0
    where all are low."""
    fields = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape_zyx), smooth) for _ in range(n_labels)])
    labels = (np.argmax(fields, axis=0) + 1).astype(dtype)
    labels[fields.max(axis=0) < 0.05] = 0
    return labels


def _pair(seed: int, shape_zyx=(14, 23, 19), n_labels: int = 5, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    ref = _blobs(rng, shape_zyx, n_labels, dtype=dtype)
    test = ref.copy()
    moved = _blobs(rng, shape_zyx, n_labels, dtype=dtype)
    half = shape_zyx[0] // 2
    test[:half] = moved[:half]  # half the slices from other blobs, all shifted by a voxel along x
    return ref, np.roll(test, 1, axis=2)


def _images(ref: np.ndarray, test: np.ndarray, grid: Grid) -> tuple[sitk.Image, sitk.Image]:
    return grid.image_from_array(ref), grid.image_from_array(test)


# --------------------------------------------------------------------------------------------------------------
# the report against the oracle
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_report_matches_oracle_on_random_blobs_with_anisotropic_spacing(seed):
    ref, test = _pair(seed)
    grid = _grid(ref.shape[::-1], (0.7, 1.3, 3.1))
    reference, test_image = _images(ref, test, grid)
    report = label_overlap_report(reference, test_image)
    assert report["num_labels"] >= 4
    assert any(0.0 < e["hd_mm"] for e in report["per_label"].values())  # not a trivial pair
    _assert_same_report(report, _oracle_report(reference, test_image))


def test_report_matches_oracle_with_labels_touching_every_border():
    ref, test = _pair(5, shape_zyx=(9, 12, 10), n_labels=3)
    ref[0], ref[-1], ref[:, :, 0] = 1, 2, 3  # whole faces of the array
    test[:, 0], test[:, -1], test[:, :, -1] = 2, 1, 3
    grid = _grid(ref.shape[::-1], (1.9, 0.6, 2.4), oblique=False)
    reference, test_image = _images(ref, test, grid)
    _assert_same_report(label_overlap_report(reference, test_image), _oracle_report(reference, test_image))


def test_report_matches_oracle_with_a_label_in_only_one_map():
    ref, test = _pair(6, n_labels=4)
    ref[ref == 2] = 0
    ref[3, 4, 5] = 9  # one voxel, only in the reference
    test[test == 3] = 0
    grid = _grid(ref.shape[::-1], (0.8, 0.8, 2.5))
    reference, test_image = _images(ref, test, grid)
    report = label_overlap_report(reference, test_image)
    for label in ("2", "3", "9"):
        entry = report["per_label"][label]
        assert entry["dice"] == 0.0 and math.isnan(entry["hd_mm"]) and math.isnan(entry["centroid_error_mm"])
    _assert_same_report(report, _oracle_report(reference, test_image))


def test_report_of_empty_maps():
    grid = _grid((7, 6, 5), (1.0, 2.0, 3.0))
    empty = np.zeros((5, 6, 7), np.uint8)
    some = empty.copy()
    some[1:3, 2:4, 3:6] = 4
    for ref, test in ((empty, empty), (empty, some), (some, empty)):
        reference, test_image = _images(ref, test, grid)
        _assert_same_report(label_overlap_report(reference, test_image), _oracle_report(reference, test_image))
    report = label_overlap_report(*_images(empty, empty, grid))
    assert report["num_labels"] == 0 and math.isnan(report["dice_mean"]) and math.isnan(report["hd95_mean_mm"])


def test_report_matches_oracle_with_many_labels():
    """300 labels (uint16), some a single voxel, some split in pieces, label values with gaps."""
    rng = np.random.default_rng(7)
    shape = (12, 30, 34)
    ref = np.zeros(shape, np.uint16)
    test = np.zeros(shape, np.uint16)
    values = rng.choice(np.arange(1, 2000), size=300, replace=False)
    for value in values:
        for target in (ref, test):
            for _ in range(int(rng.integers(1, 3))):
                z, y, x = (int(rng.integers(0, n)) for n in shape)
                dz, dy, dx = (int(v) for v in rng.integers(1, 5, size=3))
                target[z:z + dz, y:y + dy, x:x + dx] = value
    grid = _grid(shape[::-1], (0.6, 0.9, 2.0))
    reference, test_image = _images(ref, test, grid)
    report = label_overlap_report(reference, test_image)
    assert report["num_labels"] > 250
    _assert_same_report(report, _oracle_report(reference, test_image))


def test_report_matches_oracle_for_other_pixel_types_and_identical_maps():
    ref, test = _pair(8, n_labels=3)
    grid = _grid(ref.shape[::-1], (1.1, 0.9, 2.0))
    for dtype in (np.int32, np.float32):
        reference, test_image = _images(ref.astype(dtype), test.astype(dtype), grid)
        _assert_same_report(label_overlap_report(reference, test_image), _oracle_report(reference, test_image))
    reference = grid.image_from_array(ref)
    same = label_overlap_report(reference, reference)
    assert all(e["hd_mm"] == 0.0 and e["centroid_error_mm"] == 0.0 and e["dice"] == 1.0
               for e in same["per_label"].values())


def test_report_matches_oracle_on_the_real_ct_labels(shared_data):
    """The real 60-organ segmentation (3 mm) against itself moved by a smooth random warp of a few mm."""
    seg = sitk.ReadImage(str(shared_data / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"))
    transform = sitk.BSplineTransformInitializer(seg, [3, 3, 3], order=3)
    transform.SetParameters(np.random.default_rng(0).normal(0.0, 4.0, len(transform.GetParameters())).tolist())
    moved = resample_image(seg, seg, transform, "nearest")
    report = label_overlap_report(seg, moved)
    assert report["num_labels"] >= 55 and 0.3 < report["dice_mean"] < 0.99
    _assert_same_report(report, _oracle_report(seg, moved))


# --------------------------------------------------------------------------------------------------------------
# the building blocks: surfaces, Dice, two-mask distances
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_surface_matches_binary_erosion(seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.standard_normal((9, 11, 13)), 1.2) > 0.0
    mask[0, :4, :4] = True  # on the array border
    np.testing.assert_array_equal(_surface(mask), _oracle_surface(mask))


def test_dice_per_label_matches_bincount_for_views_and_label_lists():
    ref, test = _pair(9, n_labels=6, dtype=np.uint16)
    assert dice_per_label(ref, test) == _oracle_dice(ref.astype(np.int64), test.astype(np.int64))
    view_a, view_b = ref[:, ::-1, 1::2], np.flip(test, axis=2)[::-1, :, 1::2]  # not C-contiguous
    assert dice_per_label(view_a, view_b) == _oracle_dice(view_a.astype(np.int64), view_b.astype(np.int64))
    expected = _oracle_dice(ref.astype(np.int64), test.astype(np.int64))
    assert dice_per_label(ref, test, labels=[2, 4, 99]) == {k: expected[k] for k in (2, 4)}
    assert dice_per_label(ref[0, 0], test[0, 0]) == _oracle_dice(ref[0, 0].astype(np.int64),
                                                                 test[0, 0].astype(np.int64))  # 1D


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_distances_match_oracle_and_distance_transform(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (7, 9, 8), (2.5, 0.7, 1.1)
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2) > 0.1
    b = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2) > 0.1
    a[:, 0, :2] = True  # touching the border
    result = surface_distances(a, b, spacing)
    expected = _oracle_distances(a, b, spacing)
    for key in expected:
        assert result[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-9), key
    # the same directed distances from Euclidean distance transforms of the other surface's complement
    sa, sb = _oracle_surface(a), _oracle_surface(b)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    assert result["hd"] == pytest.approx(max(d_ab.max(), d_ba.max()), rel=1e-9)
    assert result["hd95"] == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), rel=1e-9)
