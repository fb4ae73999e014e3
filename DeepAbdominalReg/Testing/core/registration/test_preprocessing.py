"""Preprocessing: HU window, body mask (CT-table removal), modality check, working images."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.geometry import Grid, make_working_grid, resample_image
from deepabdominalreg.registration.preprocessing import (
    _dilate,
    _ellipsoid,
    _erode,
    _fill_holes,
    body_mask,
    field_of_view,
    looks_like_ct,
    prepare_working_image,
    window_and_scale,
)
from deepabdominalreg.synthetic.anatomy import PHANTOM_LABELS, render_phantom
from scipy import ndimage


@pytest.fixture(scope="module")
def phantom_4mm() -> tuple[sitk.Image, sitk.Image]:
    return render_phantom(seed=1, spacing_mm=4.0)


def test_window_and_scale_clips_and_scales():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(window_and_scale(hu, (-160.0, 240.0)), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert window_and_scale(hu, (-160.0, 240.0)).dtype == np.float32
    with pytest.raises(ValueError, match="high > low"):
        window_and_scale(hu, (240.0, -160.0))


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_equals_scipys_flood_fill_per_slice_and_in_3d(seed):
    """The labelling-based hole filling gives exactly ``ndimage.binary_fill_holes`` (per axial slice and in 3D)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(1, 25, 3))
    mask = rng.random(shape) < rng.uniform(0.3, 0.8)
    if seed % 2:
        mask = ndimage.binary_opening(mask)  # larger blobs with real holes
    per_slice = np.stack([ndimage.binary_fill_holes(m) for m in mask])
    assert np.array_equal(_fill_holes(mask, in_plane=True), per_slice)
    assert np.array_equal(_fill_holes(mask, in_plane=False), ndimage.binary_fill_holes(mask))
    ring = np.zeros((3, 9, 9), bool)
    ring[:, 2:7, 2:7] = True
    ring[1, 4, 4] = False  # a hole in the middle slice, closed in 3D too
    assert _fill_holes(ring, in_plane=True).all() == ring[:, 2:7, 2:7].all()
    assert _fill_holes(ring, in_plane=True)[1, 4, 4] and _fill_holes(ring, in_plane=False)[1, 4, 4]


@pytest.mark.parametrize("seed", range(40))
def test_shifted_row_morphology_equals_scipy(seed):
    """Dilation and erosion by shifted rows give exactly scipy's ``binary_dilation`` / ``binary_erosion`` (outside
    the array is background): ellipsoids of any radii (the body mask's elements), crosses and boxes, arrays thinner
    than the element."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(1, 16, 3))
    mask = rng.random(shape) < rng.uniform(0.2, 0.95)
    if seed % 3 == 0:
        structure = ndimage.generate_binary_structure(3, int(rng.integers(1, 4)))
    else:
        structure = _ellipsoid(rng.integers(0, 4, 3))
    assert np.array_equal(_dilate(mask, structure), ndimage.binary_dilation(mask, structure=structure))
    assert np.array_equal(_erode(mask, structure), ndimage.binary_erosion(mask, structure=structure))


def test_shifted_row_morphology_rejects_elements_it_cannot_decompose():
    off_centre = np.zeros((3, 3, 3), dtype=bool)
    off_centre[1, 1, 1:] = True
    with pytest.raises(ValueError, match="centred"):
        _dilate(np.ones((4, 4, 4), dtype=bool), off_centre)
    with pytest.raises(ValueError, match="odd"):
        _erode(np.ones((4, 4, 4), dtype=bool), np.ones((2, 3, 3), dtype=bool))


def test_body_mask_removes_the_table_and_keeps_gas_and_every_organ(phantom_4mm):
    image, labels = phantom_4mm
    hu = sitk.GetArrayFromImage(image)
    lab = sitk.GetArrayFromImage(labels)
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    body = body_mask(hu, spacing_zyx)
    assert body.shape == hu.shape and body.dtype == bool
    assert np.all(body[lab > 0]), "an organ voxel was left out of the body"
    # the table: dense (> 100 HU) voxels that are neither labelled nor connected to the patient
    components, _ = ndimage.label(hu > -500)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    table = (hu > 100) & (components != np.argmax(sizes))
    assert table.sum() > 50
    assert not np.any(body & table), "the CT table is inside the body mask"
    # gas in the bowel and stomach (< -900 HU inside the hollow organs) stays in the body
    gas = (hu < -900) & np.isin(lab, [k for k, v in PHANTOM_LABELS.items() if v in ("stomach", "colon",
                                                                                       "small_bowel")])
    assert gas.sum() > 0 and np.all(body[gas])
    # the body reaches the first and last slices (the scan cuts through the patient)
    assert body[0].sum() > 0.5 * body[body.shape[0] // 2].sum()
    assert body[-1].sum() > 0.5 * body[body.shape[0] // 2].sum()
    # the input is not modified
    assert np.array_equal(hu, sitk.GetArrayFromImage(image))


def test_body_mask_of_air_is_empty_and_anisotropic_spacing_is_respected():
    assert not body_mask(np.full((6, 7, 8), -1000.0, np.float32), (3.0, 3.0, 3.0)).any()
    # a 60 mm thick slab with a 4 mm bridge to a "table" slab: the opening (6 mm radius) cuts the bridge whatever
    # the voxel size, given in mm
    for spacing_zyx in ((2.0, 2.0, 2.0), (5.0, 1.0, 1.0)):
        shape = (int(90 / spacing_zyx[0]), int(120 / spacing_zyx[1]), int(120 / spacing_zyx[2]))
        y = (np.arange(shape[1]) + 0.5) * spacing_zyx[1]
        hu = np.full(shape, -1000.0, np.float32)
        hu[:, (y > 20) & (y < 80), 10:-10] = 40.0  # patient
        hu[:, (y > 96) & (y < 106), :] = 300.0  # table
        hu[:, (y >= 80) & (y <= 96), 55:57] = 40.0  # thin bridge
        body = body_mask(hu, spacing_zyx)
        assert np.all(body[:, (y > 24) & (y < 76), 14:-14])
        assert not body[:, (y > 96) & (y < 106), :].any()


def test_looks_like_ct(phantom_4mm):
    image, _ = phantom_4mm
    assert looks_like_ct(image) == (True, "")
    mr_like = sitk.Cast(sitk.RescaleIntensity(image, 0.0, 800.0), sitk.sitkFloat32)
    ok, why = looks_like_ct(mr_like)
    assert not ok and "do not look like CT" in why


def test_prepare_working_image_masks_fills_field_of_view_and_keeps_the_input(phantom_4mm):
    image, _ = phantom_4mm
    before = sitk.GetArrayFromImage(image).copy()
    grid = make_working_grid(image, 9.0, 160)
    # a grid shifted by 60 mm along x: part of it lies outside the scan
    shifted = Grid(grid.size, grid.spacing, tuple(np.add(grid.origin, (60.0, 0.0, 0.0))), grid.direction)
    working = prepare_working_image(image, shifted, (-160.0, 240.0))
    assert working.intensity.shape == tuple(reversed(shifted.size))
    assert 0.0 <= working.intensity.min() and working.intensity.max() <= 1.0
    assert working.field_of_view.any() and not working.field_of_view.all()
    assert not np.any(working.mask & ~working.field_of_view)
    assert np.all(working.intensity[~working.mask] == 0.0)
    assert np.array_equal(before, sitk.GetArrayFromImage(image))


def _field_of_view_by_resampling(image_grid: Grid, grid: Grid, transform) -> np.ndarray:
    """The reference: an image of ones resampled (nearest, default 0) onto ``grid``, as ITK decides inside."""
    ones = image_grid.apply_to(sitk.Image([int(v) for v in image_grid.size], sitk.sitkUInt8) + 1)
    return sitk.GetArrayFromImage(
        resample_image(ones, grid, transform=transform, interpolator="nearest", default_value=0)).astype(bool)


@pytest.mark.parametrize("seed", range(8))
def test_field_of_view_equals_itks_inside_test_on_oblique_anisotropic_grids(seed):
    """The analytic field of view is exactly where ITK's resampler reads image data, for no transform, an affine
    and a non-affine transform (which takes the resampling path), on oblique grids with anisotropic spacing."""
    rng = np.random.default_rng(seed)
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*rng.uniform(-0.5, 0.5, 3))
    image_grid = Grid(tuple(int(v) for v in rng.integers(8, 40, 3)), tuple(rng.uniform(0.6, 3.5, 3)),
                      tuple(rng.uniform(-60.0, 60.0, 3)), tuple(rotation.GetMatrix()))
    working = make_working_grid(image_grid, 2.5)
    # shifted so that part of the grid lies outside the image, and with other axes than the image
    other_rotation = sitk.Euler3DTransform()
    other_rotation.SetRotation(*rng.uniform(-0.3, 0.3, 3))
    grid = Grid(working.size, working.spacing,
                tuple(np.add(working.origin, rng.uniform(-0.3, 0.3, 3) * working.physical_extent_mm())),
                tuple(other_rotation.GetMatrix()) if seed % 2 else working.direction)
    centre = image_grid.index_to_physical((np.asarray(image_grid.size) - 1.0) / 2.0)[0]
    extent = float(np.min(image_grid.physical_extent_mm()))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple((np.eye(3) + rng.normal(0.0, 0.08, (3, 3))).ravel()))
    affine.SetTranslation(tuple(rng.uniform(-0.2, 0.2, 3) * extent))
    affine.SetCenter(tuple(centre + rng.normal(0.0, 10.0, 3)))
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(centre))
    euler.SetRotation(0.1, -0.2, 0.05)
    euler.SetTranslation(tuple(rng.uniform(-0.2, 0.2, 3) * extent))
    for transform in (None, affine, euler):
        expected = _field_of_view_by_resampling(image_grid, grid, transform)
        got = field_of_view(image_grid, grid, transform)
        assert got.shape == expected.shape == tuple(reversed(grid.size))
        assert expected.any() and not expected.all()
        assert np.array_equal(got, expected)


def test_prepare_working_image_reuses_a_body_mask_through_the_transform(phantom_4mm):
    """``body_mask_of``: the mask is the other working image's mask resampled (nearest) through the transform and
    cut to the field of view; no new mask is computed from the resampled intensities, and the inputs are kept."""
    image, _ = phantom_4mm
    before = sitk.GetArrayFromImage(image).copy()
    own = prepare_working_image(image, make_working_grid(image, 6.0, 160), (-160.0, 240.0))
    own_mask_before = own.mask.copy()
    grid = make_working_grid(image, 6.0, 160)
    shift = sitk.AffineTransform(3)
    shift.SetTranslation((30.0, -12.0, 6.0))
    moved = prepare_working_image(image, grid, (-160.0, 240.0), transform=shift, body_mask_of=own)
    expected = sitk.GetArrayFromImage(resample_image(
        own.grid.image_from_array(own.mask.astype(np.uint8)), grid, transform=shift, interpolator="nearest",
    )).astype(bool) & moved.field_of_view
    assert np.array_equal(moved.mask, expected)
    assert moved.mask.any() and not moved.field_of_view.all()
    assert np.all(moved.intensity[~moved.mask] == 0.0)
    # the same body as a mask computed again on the moved image, up to its border voxels
    recomputed = prepare_working_image(image, grid, (-160.0, 240.0), transform=shift)
    assert (moved.mask != recomputed.mask).mean() < 0.02
    assert np.array_equal(own.mask, own_mask_before)
    assert np.array_equal(before, sitk.GetArrayFromImage(image))
