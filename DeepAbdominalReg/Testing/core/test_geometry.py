"""Geometry: the Grid's conversions, resampling and warping on oblique directions and anisotropic spacing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.geometry import (
    Grid,
    displacement_transform,
    make_working_grid,
    resample_image,
    warp_with_displacement,
)
from scipy import ndimage


def test_grid_index_physical_round_trip_matches_sitk(oblique_image):
    grid = Grid.from_image(oblique_image)
    index = np.array([[0, 0, 0], [3, 7, 2], [23, 19, 15], [1.5, 2.25, 0.5]])
    ours = grid.index_to_physical(index)
    theirs = np.array([oblique_image.TransformContinuousIndexToPhysicalPoint(list(map(float, i))) for i in index])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    np.testing.assert_allclose(grid.physical_to_index(ours), index, atol=1e-9)


def test_grid_displacement_conversions_on_a_flipped_anisotropic_grid(oblique_image):
    grid = Grid(size=(4, 5, 6), spacing=(2.0, 3.0, 4.0), origin=(7.0, -3.0, 1.0),
                direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    # LPS mm (2, 6, -8): -1 voxel along i, -2 along j, -2 along k; vectors, so the origin plays no part
    np.testing.assert_allclose(grid.displacement_to_voxels(np.array([2.0, 6.0, -8.0])), [-1.0, -2.0, -2.0])
    field = np.broadcast_to([2.0, 6.0, -8.0], (6, 5, 4, 3))
    assert grid.displacement_to_voxels(field).shape == (6, 5, 4, 3)
    # on an oblique grid: the difference of two voxels' physical points, and back
    oblique = Grid.from_image(oblique_image)
    vox = np.array([[1.0, 0.0, 0.0], [0.5, -2.0, 3.25]])
    expected = oblique.index_to_physical(vox + 3.0) - oblique.index_to_physical(np.full((1, 3), 3.0))
    np.testing.assert_allclose(oblique.displacement_to_mm(vox), expected, atol=1e-12)
    np.testing.assert_allclose(oblique.displacement_to_voxels(oblique.displacement_to_mm(vox)), vox, atol=1e-12)


def _smooth_field(image: sitk.Image) -> sitk.Image:
    """A smooth displacement (LPS mm, up to ~3 mm) on ``image``'s grid."""
    grid = Grid.from_image(image)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.shape_zyx], indexing="ij")
    p = grid.index_to_physical(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*grid.shape_zyx, 3)
    u = np.stack([2.0 * np.sin(p[..., 1] / 9.0), 1.5 * np.cos(p[..., 2] / 7.0), np.sin(p[..., 0] / 11.0)], -1)
    return grid.image_from_array(u, is_vector=True)


def test_warp_with_displacement_samples_the_moving_image_at_x_plus_u(oblique_image):
    u = _smooth_field(oblique_image)
    warped = warp_with_displacement(oblique_image, u, "linear", -1024.0)
    # independent oracle: the moving image sampled at x + u(x) with numpy
    grid = Grid.from_image(oblique_image)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.shape_zyx], indexing="ij")
    points = grid.index_to_physical(np.stack([i, j, k], -1).reshape(-1, 3))
    index = grid.physical_to_index(points + sitk.GetArrayFromImage(u).reshape(-1, 3))
    inside = np.all((index >= 0) & (index <= np.asarray(grid.size) - 1), axis=1)
    expected = ndimage.map_coordinates(sitk.GetArrayFromImage(oblique_image), index[inside][:, ::-1].T, order=1)
    out = sitk.GetArrayFromImage(warped).reshape(-1)
    np.testing.assert_allclose(out[inside], expected, atol=1e-2)
    # the fill value beyond the moving image (ITK's buffer reaches half a voxel past the border voxel centres)
    outside = np.any((index < -0.51) | (index > np.asarray(grid.size) - 0.49), axis=1)
    assert outside.any() and np.all(out[outside] == -1024.0)
    assert warped.GetPixelID() == oblique_image.GetPixelID()
    # the transform borrows a copy: the caller's field is untouched
    assert u.GetSize() == oblique_image.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(u), sitk.GetArrayFromImage(_smooth_field(oblique_image)))
    # x -> x + u(x) as a transform of points
    transform = displacement_transform(u)
    point = points[500]
    np.testing.assert_allclose(transform.TransformPoint(point.tolist()),
                               point + sitk.GetArrayFromImage(u).reshape(-1, 3)[500], atol=1e-9)


def test_warp_with_displacement_identity_and_whole_voxel_shift_are_exact():
    labels = sitk.GetImageFromArray(np.arange(6 * 7 * 8, dtype=np.uint8).reshape(6, 7, 8))
    labels.SetSpacing((2.0, 1.0, 3.0))
    zero = sitk.Image(labels.GetSize(), sitk.sitkVectorFloat64)
    zero.CopyInformation(labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warp_with_displacement(labels, zero, "nearest")),
                                  sitk.GetArrayViewFromImage(labels))
    shift = sitk.Compose(*[sitk.Image(labels.GetSize(), sitk.sitkFloat64) + v for v in (4.0, 0.0, -3.0)])
    shift.CopyInformation(labels)
    shifted = sitk.GetArrayFromImage(warp_with_displacement(labels, shift, "nearest"))
    original = sitk.GetArrayFromImage(labels)
    np.testing.assert_array_equal(shifted[1:, :, :-2], original[:-1, :, 2:])  # +2 voxels in x, -1 in z
    assert np.all(shifted[:, :, -2:] == 0) and np.all(shifted[0] == 0)  # outside: the default 0


def test_displacement_transform_refuses_a_scalar_image(oblique_image):
    with pytest.raises(ValueError, match="3 components"):
        displacement_transform(oblique_image)


def test_resample_identity_on_same_grid_is_exact(oblique_image):
    out = resample_image(oblique_image, oblique_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(oblique_image))


def test_resample_to_other_grid_and_back_preserves_physical_content(oblique_image):
    working = make_working_grid(oblique_image, 1.0)
    there = resample_image(oblique_image, working, default_value=-500)
    # the working grid keeps the direction and covers every voxel centre of the reference
    assert working.direction == Grid.from_image(oblique_image).direction
    back = resample_image(there, oblique_image, default_value=-500)
    a, b = sitk.GetArrayFromImage(oblique_image), sitk.GetArrayFromImage(back)
    assert np.abs(a - b).max() < 60.0  # smooth blob of amplitude 1000, two linear interpolations
    assert np.abs(a - b).mean() < 5.0


def test_working_grid_covers_reference_voxel_centres(oblique_image):
    grid = make_working_grid(oblique_image, 4.0)
    ref = Grid.from_image(oblique_image)
    idx = grid.physical_to_index(ref.corners())
    assert np.all(idx >= -1e-6) and np.all(idx <= np.asarray(grid.size) - 1 + 1e-6)
    assert grid.spacing == (4.0, 4.0, 4.0)
    capped = make_working_grid(oblique_image, 0.1, max_voxels_per_axis=32)
    assert max(capped.size) <= 32


def test_translation_resampling_matches_known_shift():
    array = np.zeros((20, 20, 20), np.float32)
    array[8:12, 8:12, 8:12] = 100
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    # output point x samples input at x + t: content moves by -t
    shifted = resample_image(image, image, sitk.TranslationTransform(3, (4.0, 0.0, 0.0)))
    out = sitk.GetArrayFromImage(shifted)
    np.testing.assert_array_equal(out[8:12, 8:12, 6:10], 100)
    assert out[8:12, 8:12, 10:12].max() == 0


def test_with_size_keeps_the_box_of_an_oblique_anisotropic_grid(oblique_image):
    grid = Grid.from_image(oblique_image)
    finer = grid.with_size((2 * grid.size[0], 3 * grid.size[1], grid.size[2] + 1))
    assert finer.direction == grid.direction
    np.testing.assert_allclose(finer.physical_extent_mm(), grid.physical_extent_mm(), rtol=1e-12)
    for far in (-0.5, 1.0):  # the first and the last voxel borders coincide
        ours = finer.index_to_physical(np.array([[(n - 0.5) if far > 0 else -0.5 for n in finer.size]]))
        theirs = grid.index_to_physical(np.array([[(n - 0.5) if far > 0 else -0.5 for n in grid.size]]))
        np.testing.assert_allclose(ours, theirs, atol=1e-9)
    with pytest.raises(ValueError, match="three positive voxel counts"):
        grid.with_size((4, 0, 4))
