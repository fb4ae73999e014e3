"""Known-answer tests for deepabdominalreg.metrics (CPU, small images)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.device import PeakMemory, peak_memory_mb
from deepabdominalreg.geometry import Grid, resample_image
from deepabdominalreg.metrics.fields import (
    displacement_magnitude,
    displacement_statistics,
    jacobian_determinant,
    jacobian_statistics,
)
from deepabdominalreg.metrics.images import normalized_cross_correlation, structural_similarity
from deepabdominalreg.metrics.labels import (
    _surface,
    centroid_distance_mm,
    dice_per_label,
    label_overlap_report,
    surface_distances,
)
from deepabdominalreg.metrics.landmarks import landmark_errors
from geometry_helpers import oblique_direction

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def make_grid(oblique: bool, size=(14, 12, 10), spacing=(1.5, 0.9, 2.5)) -> Grid:
    return Grid(
        size=size,
        spacing=spacing,
        origin=(-12.0, 30.0, 7.5),
        direction=oblique_direction(25.0) if oblique else IDENTITY,
    )


def voxel_points(grid: Grid) -> np.ndarray:
    """LPS points (mm) of every voxel, ``(D, H, W, 3)``."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid.shape_zyx), indexing="ij")
    index = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    return grid.index_to_physical(index).reshape(*grid.shape_zyx, 3)


def field_from_function(grid: Grid, function) -> sitk.Image:
    """A ``sitkVectorFloat64`` displacement field ``u(x)`` (LPS mm) sampled at the voxel centres of ``grid``."""
    return grid.image_from_array(function(voxel_points(grid)), is_vector=True)


def jac_array(field: sitk.Image, **kwargs) -> np.ndarray:
    return sitk.GetArrayFromImage(jacobian_determinant(field, **kwargs)).astype(np.float64)


CENTRE = np.array([-5.0, 33.0, 15.0])


def quadratic_field(points: np.ndarray) -> np.ndarray:
    """u = (a x y, b z^2, c x z) about CENTRE: central differences are exact for it."""
    x, y, z = np.moveaxis(points - CENTRE, -1, 0)
    return np.stack([0.004 * x * y, 0.003 * z * z, -0.005 * x * z], axis=-1)


def quadratic_jacobian(points: np.ndarray) -> np.ndarray:
    x, y, z = np.moveaxis(points - CENTRE, -1, 0)
    jac = np.zeros(points.shape[:-1] + (3, 3))
    jac[..., 0, 0] = 0.004 * y
    jac[..., 0, 1] = 0.004 * x
    jac[..., 1, 2] = 0.006 * z
    jac[..., 2, 0] = -0.005 * z
    jac[..., 2, 2] = -0.005 * x
    return np.linalg.det(jac + np.eye(3))


# --------------------------------------------------------------------------------------------------------------
# Jacobian determinant
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("oblique", [False, True])
@pytest.mark.parametrize("scale", [0.8, 1.0, 1.25])
def test_uniform_scaling_gives_s_cubed(oblique, scale):
    grid = make_grid(oblique)
    jac = jac_array(field_from_function(grid, lambda p: (scale - 1.0) * (p - CENTRE)))
    np.testing.assert_allclose(jac, scale**3, rtol=0, atol=1e-5)


@pytest.mark.parametrize("oblique", [False, True])
def test_shear_preserves_volume(oblique):
    grid = make_grid(oblique)
    shear = np.array([[0.0, 0.7, 0.0], [0.0, 0.0, 0.0], [0.4, 0.0, 0.0]])
    jac = jac_array(field_from_function(grid, lambda p: p @ shear.T))
    # u = (0.7 y, 0, 0.4 x): I + A = [[1, .7, 0], [0, 1, 0], [.4, 0, 1]], det = 1
    np.testing.assert_allclose(jac, 1.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("oblique", [False, True])
def test_general_linear_field(seed, oblique):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.3, 0.3, size=(3, 3))
    if seed == 2:
        a = np.diag([-1.5, 0.2, 0.1])  # folding: det(I + A) < 0
    grid = make_grid(oblique)
    jac = jac_array(field_from_function(grid, lambda p: (p - CENTRE) @ a.T + np.array([3.0, -2.0, 1.0])))
    expected = np.linalg.det(np.eye(3) + a)
    np.testing.assert_allclose(jac, expected, rtol=0, atol=1e-5)


def test_quadratic_field_same_values_on_any_grid():
    """Central differences are exact for quadratics: interior values equal the analytic det on every grid."""
    for grid in (make_grid(False), make_grid(True), make_grid(True, spacing=(0.7, 2.1, 3.3))):
        points = voxel_points(grid)
        jac = jac_array(field_from_function(grid, quadratic_field))
        expected = quadratic_jacobian(points)
        assert expected.max() - expected.min() > 0.1  # a non-trivial field
        np.testing.assert_allclose(jac[1:-1, 1:-1, 1:-1], expected[1:-1, 1:-1, 1:-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("orientation", ["RAI", "PIL", "SRA"])
def test_reoriented_grid_gives_identical_values(orientation):
    """The same voxels in another axis order/sign (DICOMOrient): the same det at every voxel, borders included."""
    grid = make_grid(False, spacing=(0.7, 2.1, 3.3))

    def smooth(p):
        x, y, z = np.moveaxis(p - CENTRE, -1, 0)
        return np.stack([2.0 * np.sin(y / 6.0), 1.5 * np.cos(x / 5.0) * np.sin(z / 7.0), 0.02 * x * y], -1)

    field = field_from_function(grid, smooth)
    reoriented = sitk.DICOMOrient(field, orientation)
    assert Grid.from_image(reoriented).direction != grid.direction
    jac = jacobian_determinant(reoriented)
    back = sitk.DICOMOrient(jac, "LPS")
    assert Grid.from_image(back).size == grid.size
    np.testing.assert_allclose(back.GetOrigin(), grid.origin, atol=1e-9)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), jac_array(field), rtol=0, atol=1e-6)


def test_chunking_does_not_change_the_result():
    field = field_from_function(make_grid(True), quadratic_field)
    full = jac_array(field, chunk_slices=1000)
    for chunk in (1, 2, 3, 7):
        np.testing.assert_array_equal(jac_array(field, chunk_slices=chunk), full)


def test_matches_simpleitk_on_identity_direction_grid():
    grid = make_grid(False, size=(16, 14, 12), spacing=(1.2, 0.8, 2.0))

    def smooth(p):
        x, y, z = np.moveaxis(p - CENTRE, -1, 0)
        return np.stack([2.0 * np.sin(y / 6.0), 1.5 * np.cos(x / 5.0) * np.sin(z / 7.0), 0.02 * x * y], -1)

    field = field_from_function(grid, smooth)
    ours = jac_array(field)
    reference = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    np.testing.assert_allclose(ours[1:-1, 1:-1, 1:-1], reference[1:-1, 1:-1, 1:-1], rtol=0, atol=1e-5)


def test_jacobian_output_type_grid_and_float32_input():
    grid = make_grid(True)
    field = sitk.Cast(field_from_function(grid, lambda p: 0.1 * (p - CENTRE)), sitk.sitkVectorFloat32)
    jac = jacobian_determinant(field)
    assert jac.GetPixelID() == sitk.sitkFloat32
    assert Grid.from_image(jac) == grid
    np.testing.assert_allclose(sitk.GetArrayFromImage(jac), 1.1**3, rtol=0, atol=1e-4)


def test_jacobian_rejects_scalar_image():
    with pytest.raises(ValueError, match="3 components"):
        jacobian_determinant(sitk.Image([4, 4, 4], sitk.sitkFloat32))


def test_jacobian_statistics_known_values():
    jac = np.array([2.0, -1.0, 0.0, 1.0, 0.5, 7.0]).reshape(1, 2, 3)
    mask = np.array([1, 1, 1, 1, 0, 0], bool).reshape(1, 2, 3)
    stats = jacobian_statistics(jac, mask)
    inside = np.array([2.0, -1.0, 0.0, 1.0])
    assert stats["folding_percent"] == pytest.approx(50.0)
    assert stats["folding_voxels"] == 2 and stats["voxels"] == 4
    assert stats["jacobian_min"] == -1.0 and stats["jacobian_max"] == 2.0
    assert stats["jacobian_std"] == pytest.approx(inside.std())
    assert stats["sdlogj"] == pytest.approx(np.std(np.log([2.0, 1e-9, 1e-9, 1.0])))
    assert stats["sdlogj_l2r"] == pytest.approx(np.std(np.log(inside + 3.0)))
    everything = jacobian_statistics(jac)
    assert everything["voxels"] == 6 and everything["jacobian_max"] == 7.0
    assert jacobian_statistics(np.ones((2, 2, 2)))["sdlogj"] == 0.0


def test_jacobian_statistics_empty_mask_and_bad_shape():
    stats = jacobian_statistics(np.ones((2, 2, 2)), np.zeros((2, 2, 2), bool))
    assert stats["voxels"] == 0 and math.isnan(stats["sdlogj"]) and math.isnan(stats["folding_percent"])
    with pytest.raises(ValueError, match="shape"):
        jacobian_statistics(np.ones((2, 2, 2)), np.ones((2, 2, 3), bool))


# --------------------------------------------------------------------------------------------------------------
# displacement
# --------------------------------------------------------------------------------------------------------------


def test_displacement_magnitude_and_statistics():
    grid = make_grid(True)
    field = field_from_function(grid, lambda p: np.broadcast_to(np.array([3.0, -4.0, 0.0]), p.shape).copy())
    magnitude = displacement_magnitude(field)
    assert magnitude.GetPixelID() == sitk.sitkFloat32 and Grid.from_image(magnitude) == grid
    np.testing.assert_allclose(sitk.GetArrayFromImage(magnitude), 5.0, rtol=1e-7)

    # |u| = distance to CENTRE (mm): known max / mean inside a mask
    radial = field_from_function(grid, lambda p: p - CENTRE)
    expected = np.linalg.norm(voxel_points(grid) - CENTRE, axis=-1)
    mask = np.zeros(grid.shape_zyx, bool)
    mask[2:5, 3:7, 4:9] = True
    stats = displacement_statistics(radial, mask)
    assert stats["max_mm"] == pytest.approx(expected[mask].max(), rel=1e-6)
    assert stats["mean_mm"] == pytest.approx(expected[mask].mean(), rel=1e-6)
    assert stats["p95_mm"] == pytest.approx(np.percentile(expected[mask], 95), rel=1e-6)
    assert displacement_statistics(radial)["max_mm"] == pytest.approx(expected.max(), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------------------


def test_dice_per_label_known_values():
    a = np.zeros((1, 4, 4), np.uint8)
    b = np.zeros((1, 4, 4), np.uint8)
    a[0, 0, :4] = 1  # 4 voxels
    b[0, 0, :2] = 1  # 2 voxels, both inside a's label 1
    a[0, 1, 0] = 2  # label 2 only in a
    b[0, 3, 3] = 5  # label 5 only in b
    dice = dice_per_label(a, b)
    assert dice == {1: pytest.approx(2 * 2 / 6), 2: 0.0, 5: 0.0}
    assert dice_per_label(a, b, labels=[1, 3]) == {1: pytest.approx(2 / 3)}  # 3: empty in both
    image = sitk.GetImageFromArray(a)
    assert dice_per_label(image, image) == {1: 1.0, 2: 1.0}


def test_surface_distances_single_voxels_anisotropic():
    spacing = (2.5, 0.9, 1.5)  # zyx
    a = np.zeros((6, 7, 8), bool)
    b = np.zeros_like(a)
    a[1, 2, 3] = True
    b[4, 6, 1] = True
    expected = math.sqrt((3 * 2.5) ** 2 + (4 * 0.9) ** 2 + (2 * 1.5) ** 2)
    result = surface_distances(a, b, spacing)
    for key in ("hd", "hd95", "asd"):
        assert result[key] == pytest.approx(expected, abs=1e-9)


def test_surface_distances_one_point_against_two():
    spacing = (1.0, 2.0, 3.0)
    a = np.zeros((5, 5, 9), bool)
    b = np.zeros_like(a)
    a[2, 2, 0] = True
    b[2, 2, 2] = True  # 6 mm
    b[2, 2, 7] = True  # 21 mm
    result = surface_distances(a, b, spacing)
    assert result["hd"] == pytest.approx(21.0)
    assert result["hd95"] == pytest.approx(max(6.0, 6.0 + 0.95 * 15.0))  # larger directed 95th percentile
    assert result["asd"] == pytest.approx((6.0 + 6.0 + 21.0) / 3.0)


def test_surface_distances_identical_empty_and_shifted_box():
    a = np.zeros((12, 12, 14), bool)
    a[2:9, 3:10, 2:9] = True
    zero = surface_distances(a, a, (1.0, 1.0, 1.0))
    assert zero == {"hd": 0.0, "hd95": 0.0, "asd": 0.0}
    assert all(math.isnan(v) for v in surface_distances(a, np.zeros_like(a), (1, 1, 1)).values())
    assert all(math.isnan(v) for v in surface_distances(np.zeros_like(a), np.zeros_like(a), (1, 1, 1)).values())
    shifted = np.roll(a, 3, axis=2)  # 3 voxels along x (1.7 mm each)
    assert surface_distances(a, shifted, (2.0, 0.6, 1.7))["hd"] == pytest.approx(3 * 1.7)


def _brute_force_surface_distances(a, b, spacing):
    sa, sb = _surface(a), _surface(b)
    pa = np.argwhere(sa) * np.asarray(spacing)
    pb = np.argwhere(sb) * np.asarray(spacing)
    d = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    return {
        "hd": max(d_ab.max(), d_ba.max()),
        "hd95": max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)),
        "asd": (d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_distances_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (10, 13, 11)
    spacing = (2.5, 0.8, 1.3)
    a = ndimage_blob(rng, shape)
    b = ndimage_blob(rng, shape)
    a[0, :3, :3] = True  # touching the array border
    result = surface_distances(a, b, spacing)
    expected = _brute_force_surface_distances(a, b, spacing)
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
    # the sitk form takes the spacing from the image (xyz -> zyx)
    image_a = sitk.GetImageFromArray(a.astype(np.uint8))
    image_a.SetSpacing(spacing[::-1])
    image_b = sitk.GetImageFromArray(b.astype(np.uint8))
    assert surface_distances(image_a, image_b)["hd"] == pytest.approx(expected["hd"])


def ndimage_blob(rng, shape):
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return noise > 0.05


def test_centroid_distance_uses_physical_geometry():
    grid = make_grid(True)
    a = np.zeros(grid.shape_zyx, bool)
    b = np.zeros_like(a)
    a[1, 2, 3] = a[1, 2, 5] = True  # centroid index (i, j, k) = (4, 2, 1)
    b[7, 9, 11] = True  # (11, 9, 7)
    expected = np.linalg.norm(grid.index_to_physical([[4, 2, 1]]) - grid.index_to_physical([[11, 9, 7]]))
    assert centroid_distance_mm(a, b, grid) == pytest.approx(expected, abs=1e-9)
    # a non-orthogonal direction matrix is respected too (only direction @ spacing matters)
    sheared = Grid(grid.size, grid.spacing, grid.origin, (1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    expected = np.linalg.norm(sheared.index_to_physical([[4, 2, 1]]) - sheared.index_to_physical([[11, 9, 7]]))
    assert centroid_distance_mm(a, b, sheared) == pytest.approx(expected, abs=1e-9)
    assert math.isnan(centroid_distance_mm(a, np.zeros_like(a), grid))


def _box_labels(grid: Grid, shift_x: int = 0, drop: int | None = None) -> sitk.Image:
    array = np.zeros(grid.shape_zyx, np.uint16)
    array[2:8, 3:12, 2 + shift_x: 10 + shift_x] = 1  # 8 voxels along x, possibly shifted
    array[10:14, 3:8, 14:19] = 2
    array[10:14, 10:15, 14:19] = 7
    if drop is not None:
        array[array == drop] = 0
    return grid.image_from_array(array)


def test_label_overlap_report_known_values():
    grid = make_grid(True, size=(24, 18, 16), spacing=(1.4, 0.9, 2.2))
    reference = _box_labels(grid)
    test = _box_labels(grid, shift_x=2, drop=7)
    report = label_overlap_report(reference, test, {1: "liver", 2: "spleen"})
    per = report["per_label"]
    assert set(per) == {"liver", "spleen", "7"}
    liver = per["liver"]
    assert liver["label"] == 1
    assert liver["dice"] == pytest.approx(6 / 8)  # 8-voxel extent shifted by 2
    assert liver["hd_mm"] == pytest.approx(2 * 1.4)
    assert liver["centroid_error_mm"] == pytest.approx(2 * 1.4)
    assert 0 < liver["asd_mm"] < liver["hd95_mm"] <= liver["hd_mm"]
    assert per["spleen"] == {
        "label": 2, "dice": 1.0, "hd95_mm": 0.0, "hd_mm": 0.0, "asd_mm": 0.0, "centroid_error_mm": 0.0
    }
    assert per["7"]["dice"] == 0.0 and math.isnan(per["7"]["hd95_mm"]) and math.isnan(per["7"]["centroid_error_mm"])
    assert report["num_labels"] == 3
    assert report["dice_mean"] == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert report["dice30"] == pytest.approx(0.0)  # ceil(0.3 * 3) = 1 lowest value
    assert report["hd95_mean_mm"] == pytest.approx(liver["hd95_mm"] / 2)  # NaN of label 7 ignored
    assert report["centroid_error_mean_mm"] == pytest.approx(2 * 1.4 / 2)
    # the per-label distances agree with the stand-alone functions on the full arrays
    ref_arr, test_arr = sitk.GetArrayFromImage(reference), sitk.GetArrayFromImage(test)
    full = surface_distances(ref_arr == 1, test_arr == 1, grid.spacing[::-1])
    assert full["hd95"] == pytest.approx(liver["hd95_mm"]) and full["asd"] == pytest.approx(liver["asd_mm"])


def test_label_overlap_report_requires_same_grid():
    grid = make_grid(False, size=(24, 18, 16))
    other = Grid(grid.size, (1.0, 1.0, 1.0), grid.origin, grid.direction)
    with pytest.raises(ValueError, match="same grid"):
        label_overlap_report(_box_labels(grid), _box_labels(other))


def test_label_overlap_report_of_a_one_voxel_shift_of_60_real_labels(shared_data):
    """Every label of a real 60-class segmentation moved by one voxel (3 mm): each surface and centroid moves 3 mm."""
    seg = sitk.ReadImage(str(shared_data / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"))
    moved = resample_image(seg, seg, sitk.TranslationTransform(3, (3.0, 0.0, 0.0)), "nearest")  # one voxel
    report = label_overlap_report(seg, moved)
    assert report["num_labels"] >= 55
    assert 0.5 < report["dice_mean"] < 1.0
    assert report["hd95_mean_mm"] == pytest.approx(3.0)
    assert report["centroid_error_mean_mm"] == pytest.approx(3.0, abs=1e-6)
    identical = label_overlap_report(seg, seg)
    assert identical["dice_mean"] == 1.0 and identical["hd95_mean_mm"] == 0.0


# --------------------------------------------------------------------------------------------------------------
# landmarks, similarity, memory
# --------------------------------------------------------------------------------------------------------------


def test_landmark_errors_known_values():
    a = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    b = a + np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 6.0, 8.0]])
    result = landmark_errors(a, b)
    assert result["per_point"] == pytest.approx([5.0, 0.0, 10.0])
    assert result["mean"] == pytest.approx(5.0)
    assert result["std"] == pytest.approx(np.std([5.0, 0.0, 10.0]))
    assert result["max"] == pytest.approx(10.0)
    assert result["p95"] == pytest.approx(np.percentile([5.0, 0.0, 10.0], 95))
    assert result["count"] == 3


def test_landmark_errors_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(N, 3\).*\(3, 3\) and \(2, 3\)"):
        landmark_errors(np.zeros((3, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        landmark_errors(np.zeros((3, 2)), np.zeros((3, 2)))


def test_normalized_cross_correlation():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 7, 8))
    assert normalized_cross_correlation(a, 2.0 * a + 5.0) == pytest.approx(1.0)
    assert normalized_cross_correlation(a, -a) == pytest.approx(-1.0)
    mask = np.zeros(a.shape, bool)
    mask[:3] = True
    b = np.where(mask, 3.0 * a, rng.standard_normal(a.shape))  # equal only inside the mask
    assert normalized_cross_correlation(a, b, mask) == pytest.approx(1.0)
    assert normalized_cross_correlation(a, b) < 0.9
    assert math.isnan(normalized_cross_correlation(a, np.ones_like(a)))
    image = sitk.GetImageFromArray(a)
    assert normalized_cross_correlation(image, image) == pytest.approx(1.0)


def test_structural_similarity():
    rng = np.random.default_rng(1)
    a = np.cumsum(rng.standard_normal((12, 12, 12)), axis=0) * 100
    assert structural_similarity(a, a) == pytest.approx(1.0)
    noisy = a + rng.standard_normal(a.shape) * 200
    mask = np.zeros(a.shape, bool)
    mask[:6] = True
    partly = np.where(mask, a, noisy)
    assert structural_similarity(a, noisy, data_range=400.0) < 0.9
    assert structural_similarity(a, partly, mask=mask[::-1].copy(), data_range=400.0) < (
        structural_similarity(a, partly, mask=mask, data_range=400.0)
    )


def test_peak_memory():
    with PeakMemory() as peak:
        block = np.ones(4_000_000)  # 30 MiB touched
        block.sum()
    assert peak.rss_mb is not None and peak.rss_mb >= 30.0
    assert peak.rss_increase_mb is not None and peak.rss_increase_mb >= 0.0
    now = peak_memory_mb()
    assert now["rss_mb"] >= peak.rss_mb
    assert set(peak.as_dict()) == {"rss_mb", "rss_increase_mb", "cuda_max_allocated_mb"}
