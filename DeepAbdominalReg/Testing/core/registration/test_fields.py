"""The torch full-resolution outputs (:mod:`deepabdominalreg.registration.fields`) against ITK on oblique,
anisotropic grids."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.evaluation.peers import dense_displacement_image
from deepabdominalreg.geometry import Grid, make_working_grid, resample_image
from deepabdominalreg.registration.fields import affine_field_displacement, warp_image
from geometry_helpers import oblique_direction
from scipy import ndimage

# the "fixed" grid: anisotropic, oblique and flipped; the field grid: isotropic, another direction, not covering
# all of it (so that the field's zero outside its extent is exercised)
FIXED = Grid(size=(23, 19, 14), spacing=(1.3, 0.9, 2.5), origin=(-12.0, 30.0, 5.0),
             direction=oblique_direction(20.0, flip=True))
MOVING = Grid(size=(21, 25, 12), spacing=(1.1, 1.2, 2.8), origin=(-20.0, 20.0, -3.0),
              direction=oblique_direction(-10.0, flip=False))


def _field_grid(same_axes: bool = False) -> Grid:
    """3 mm isotropic, centred on FIXED but 3/4 of its extent per axis; FIXED's axes (as the pipeline's working
    grid: the separable path) or another direction (the general path)."""
    covering = make_working_grid(FIXED, 3.0)
    size = tuple(max(int(0.75 * s), 3) for s in covering.size)
    direction = FIXED.direction if same_axes else oblique_direction(35.0, flip=False)
    centre = FIXED.index_to_physical((np.asarray(FIXED.size, dtype=np.float64)[None] - 1) / 2)[0]
    half = np.asarray(direction).reshape(3, 3) @ (3.0 * (np.asarray(size, dtype=np.float64) - 1) / 2)
    return Grid(size=size, spacing=(3.0, 3.0, 3.0), origin=tuple(centre - half + 0.7), direction=direction)


def _smooth_field(grid: Grid, amplitude_mm: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = rng.normal(size=(*grid.shape_zyx, 3))
    field = np.stack([ndimage.gaussian_filter(field[..., c], 1.5) for c in range(3)], axis=-1)
    return amplitude_mm * field / np.abs(field).max()


def _affine(seed: int) -> sitk.AffineTransform:
    rng = np.random.default_rng(seed)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple((np.eye(3) + rng.normal(scale=0.05, size=(3, 3))).ravel()))
    transform.SetTranslation(tuple(rng.normal(scale=4.0, size=3)))
    transform.SetCenter(tuple(rng.normal(scale=10.0, size=3)))
    return transform


def _itk_field(field_mm: np.ndarray, grid: Grid) -> sitk.DisplacementFieldTransform:
    return sitk.DisplacementFieldTransform(grid.image_from_array(field_mm.astype(np.float64), is_vector=True))


@pytest.mark.parametrize("same_axes", [True, False], ids=["field on the output's axes", "oblique field"])
@pytest.mark.parametrize("order", ["affine after the field", "affine before the field"])
def test_affine_field_displacement_matches_itk_composite(order, same_axes):
    field_grid = _field_grid(same_axes)
    field = _smooth_field(field_grid, 6.0, seed=1)
    affine = _affine(2)
    if order == "affine after the field":
        composite = sitk.CompositeTransform([affine, _itk_field(field, field_grid)])  # x -> A(x + u(x))
        ours = affine_field_displacement(FIXED, field, field_grid, after=affine, slab=5)
    else:
        composite = sitk.CompositeTransform([_itk_field(field, field_grid), affine])  # x -> q + u(q), q = A(x)
        ours = affine_field_displacement(FIXED, field, field_grid, before=affine, slab=5)
    reference = sitk.GetArrayFromImage(dense_displacement_image(composite, FIXED))
    result = sitk.GetArrayFromImage(ours)
    assert ours.GetPixelID() == sitk.sitkVectorFloat32
    assert Grid.from_image(ours) == FIXED
    np.testing.assert_allclose(result, reference, rtol=0, atol=2e-4)
    # the test exercises both sides of the field's extent: voxels with and without a deformable part
    without_field = sitk.GetArrayFromImage(dense_displacement_image(affine, FIXED))
    differs = np.linalg.norm(reference - without_field, axis=-1) > 1e-6
    assert 0.05 < differs.mean() < 0.98


def test_affine_field_displacement_rejects_a_field_of_the_wrong_shape():
    field_grid = _field_grid()
    with pytest.raises(ValueError, match="does not match its grid"):
        affine_field_displacement(FIXED, np.zeros((2, 2, 2, 3)), field_grid)


@pytest.mark.parametrize("pixel_type", [sitk.sitkInt16, sitk.sitkFloat32])
def test_warp_image_matches_itk_resampling(pixel_type):
    """Warping by the dense displacement equals ITK resampling through the composite transform itself."""
    rng = np.random.default_rng(3)
    values = ndimage.gaussian_filter(rng.normal(size=MOVING.shape_zyx), 1.0) * 3000.0
    moving = MOVING.image_from_array(values.astype(sitk.GetArrayFromImage(sitk.Image(1, 1, 1, pixel_type)).dtype))
    original = sitk.GetArrayFromImage(moving).copy()
    field_grid = _field_grid()
    field = _smooth_field(field_grid, 5.0, seed=4)
    affine = _affine(5)
    composite = sitk.CompositeTransform([affine, _itk_field(field, field_grid)])
    displacement = affine_field_displacement(FIXED, field, field_grid, after=affine)
    reference = sitk.GetArrayFromImage(resample_image(moving, FIXED, composite, "linear", default_value=-1024.0))
    warped = warp_image(moving, displacement, default_value=-1024.0, slab=3)
    result = sitk.GetArrayFromImage(warped)
    assert warped.GetPixelID() == pixel_type and Grid.from_image(warped) == FIXED
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moving), original)  # the input is untouched
    outside = reference == -1024.0
    assert 0.05 < outside.mean() < 0.95  # both inside and outside the moving image are exercised
    # a voxel mapped to within float rounding of the extent's edge may fall on either side: allow a few
    mismatch = np.abs(result.astype(np.float64) - reference) > (1.0 if pixel_type == sitk.sitkInt16 else 1e-2)
    assert mismatch.mean() < 2e-3, mismatch.sum()
    assert abs(int((result == -1024.0).sum()) - int(outside.sum())) <= 3


def test_warp_image_by_a_zero_displacement_returns_the_integer_image_unchanged():
    """Integer images are truncated after sampling, as ITK does: float rounding must not turn 100 HU into 99 HU."""
    rng = np.random.default_rng(7)
    image = FIXED.image_from_array(rng.integers(-1024, 3000, size=FIXED.shape_zyx).astype(np.int16))
    zero = affine_field_displacement(FIXED, np.zeros((*_field_grid().shape_zyx, 3)), _field_grid())
    warped = warp_image(image, zero, default_value=-1024.0, slab=4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("interpolator", ["linear", "nearest"])
def test_warp_image_where_whole_slabs_map_outside_the_image(interpolator):
    """A displacement carrying the upper half of the output beyond the image's last slice (scans that overlap
    only in part): those slabs get the default value, the rest equals ITK's resampling."""
    rng = np.random.default_rng(5)
    image = FIXED.image_from_array(rng.integers(-1000, 1000, size=FIXED.shape_zyx).astype(np.int16))
    shift = np.asarray(FIXED.direction).reshape(3, 3)[:, 2] * FIXED.spacing[2] * (FIXED.size[2] // 2 + 0.3)
    translation = sitk.AffineTransform(3)
    translation.SetTranslation(tuple(shift))
    displacement = affine_field_displacement(FIXED, np.zeros((*_field_grid().shape_zyx, 3)), _field_grid(),
                                             after=translation)
    warped = sitk.GetArrayFromImage(warp_image(image, displacement, default_value=-1024.0, interpolator=interpolator,
                                               slab=2))
    reference = sitk.GetArrayFromImage(resample_image(image, FIXED, translation, interpolator, default_value=-1024.0))
    assert (reference[FIXED.size[2] // 2 + 1:] == -1024).all() and (reference[:3] != -1024).mean() > 0.5
    assert (np.abs(warped.astype(np.float64) - reference) > 1.0).mean() < 2e-3  # 1 HU: truncation ties


@pytest.mark.parametrize("pixel_type", [sitk.sitkUInt8, sitk.sitkInt32])
def test_warp_image_nearest_matches_itk_label_resampling(pixel_type):
    """Label maps: nearest-neighbour warping by the dense displacement equals ITK's through the composite."""
    rng = np.random.default_rng(11)
    labels = ndimage.zoom(rng.integers(0, 9, size=(4, 5, 4)), np.asarray(MOVING.shape_zyx) / (4, 5, 4), order=0)
    labels = labels[: MOVING.shape_zyx[0], : MOVING.shape_zyx[1], : MOVING.shape_zyx[2]]
    dtype = sitk.GetArrayFromImage(sitk.Image(1, 1, 1, pixel_type)).dtype
    moving = MOVING.image_from_array(labels.astype(dtype))
    field_grid = _field_grid(same_axes=True)
    field = _smooth_field(field_grid, 6.0, seed=12)
    affine = _affine(13)
    composite = sitk.CompositeTransform([affine, _itk_field(field, field_grid)])
    displacement = affine_field_displacement(FIXED, field, field_grid, after=affine)
    reference = sitk.GetArrayFromImage(resample_image(moving, FIXED, composite, "nearest", default_value=0))
    warped = warp_image(moving, displacement, default_value=0, interpolator="nearest", slab=4)
    result = sitk.GetArrayFromImage(warped)
    assert warped.GetPixelID() == pixel_type and Grid.from_image(warped) == FIXED
    assert len(np.unique(reference)) > 4 and (reference == 0).mean() > 0.05
    # a voxel whose mapped index lies within float rounding of a voxel boundary may take either neighbour
    assert (result != reference).mean() < 2e-3, int((result != reference).sum())
    zero = affine_field_displacement(MOVING, np.zeros((*field_grid.shape_zyx, 3)), field_grid)
    same = warp_image(moving, zero, interpolator="nearest")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same), labels.astype(dtype))
    with pytest.raises(ValueError, match="interpolator"):
        warp_image(moving, displacement, interpolator="cubic")
