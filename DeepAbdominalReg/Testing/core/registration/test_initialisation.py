"""Global translation search before the affine: masked NCC at every shift, and known offsets of hundreds of mm."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from deepabdominalreg.geometry import Grid, make_working_grid, resample_image
from deepabdominalreg.nn.losses import global_ncc_loss
from deepabdominalreg.registration.initialisation import OffsetSearchSettings, masked_ncc_map, search_offset
from deepabdominalreg.registration.preprocessing import prepare_working_image
from deepabdominalreg.synthetic.anatomy import render_phantom
from geometry_helpers import oblique_direction

SETTINGS = OffsetSearchSettings(spacing_mm=8.0, range_mm=300.0, min_overlap=0.3)


def test_masked_ncc_map_is_the_pearson_correlation_over_the_overlap():
    """Every entry equals the masked global NCC (nn.losses.global_ncc_loss, negated) of the overlapping parts."""
    rng = np.random.default_rng(0)
    fixed, moving = rng.random((6, 7, 5)), rng.random((5, 4, 6))
    fixed_mask, moving_mask = rng.random(fixed.shape) > 0.2, rng.random(moving.shape) > 0.3
    ncc, overlap = masked_ncc_map(fixed, fixed_mask, moving, moving_mask)
    assert ncc.shape == (10, 10, 10)
    checked = 0
    for entry in np.ndindex(ncc.shape):
        k = np.asarray(entry) - (np.asarray(fixed.shape) - 1)
        lo, hi = np.maximum(0, -k), np.minimum(fixed.shape, np.asarray(moving.shape) - k)
        if np.any(hi <= lo):
            assert overlap[entry] == 0
            continue
        f_box = tuple(slice(a, b) for a, b in zip(lo, hi))
        m_box = tuple(slice(a + s, b + s) for a, b, s in zip(lo, hi, k))
        both = fixed_mask[f_box] & moving_mask[m_box]
        assert overlap[entry] == both.sum()
        if both.sum() >= 3:
            expected = -float(global_ncc_loss(torch.as_tensor(fixed[f_box]), torch.as_tensor(moving[m_box]),
                                              torch.as_tensor(both), eps=0.0))
            assert ncc[entry] == pytest.approx(expected, abs=1e-8)
            checked += 1
    assert checked > 300


@pytest.fixture(scope="module")
def phantom():
    image, _ = render_phantom(seed=1, spacing_mm=4.0)
    return image


def _working(image: sitk.Image):
    return prepare_working_image(image, make_working_grid(image, 4.0, 160), (-160.0, 240.0))


def _search(fixed: sitk.Image, moving: sitk.Image):
    w_fixed, w_moving = _working(fixed), _working(moving)
    return search_offset(w_fixed.grid, w_fixed.intensity, w_moving.grid, w_moving.intensity, SETTINGS,
                         fixed_field_of_view=w_fixed.field_of_view, moving_field_of_view=w_moving.field_of_view)


def _moved_origin(image: sitk.Image, offset_lps: np.ndarray) -> sitk.Image:
    moved = sitk.Image(image)
    moved.SetOrigin(tuple(np.asarray(image.GetOrigin()) + offset_lps))
    return moved


@pytest.mark.parametrize("cut", ["none", "upper_half"])
def test_search_recovers_a_400mm_cranio_caudal_offset(phantom, cut):
    """Origins moved by 400 mm (same anatomy): the fixed point x is the moving point x + (0, 0, 400); with the
    moving scan cut to the upper half of the fixed's field of view the centre-of-mass start is ~100 mm off, the
    search still within a lattice voxel."""
    offset = np.array([0.0, 0.0, 400.0])
    moving = phantom if cut == "none" else phantom[:, :, phantom.GetSize()[2] // 2:]
    result = _search(phantom, _moved_origin(moving, offset))
    assert np.all(np.abs(result.translation_mm - offset) < 8.0), result
    if cut != "none":
        assert abs(result.centre_of_mass_translation_mm[2] - offset[2]) > 40.0
        assert result.overlap_fraction > 0.9  # the whole moving scan overlaps


def test_search_places_a_partial_scan_with_oblique_direction_and_anisotropic_spacing(phantom):
    """Moving: a slab of the phantom (its lower 40 %) on an oblique grid of 2.5 x 3 x 6 mm, its origin 250 mm
    away: the known translation (fixed -> moving) is recovered within a lattice voxel along every axis."""
    grid = Grid.from_image(phantom)
    direction = np.asarray(oblique_direction(12.0, flip=False)).reshape(3, 3)
    extent = np.asarray(grid.size) * np.asarray(grid.spacing) * np.array([0.9, 0.9, 0.4])
    spacing = np.array([2.5, 3.0, 6.0])
    size = np.round(extent / spacing).astype(int)
    low_centre = grid.index_to_physical([[(grid.size[0] - 1) / 2, (grid.size[1] - 1) / 2, grid.size[2] * 0.25]])[0]
    origin = low_centre - direction @ ((size - 1) / 2 * spacing)
    slab = resample_image(phantom, Grid(tuple(int(s) for s in size), tuple(spacing), tuple(origin),
                                        tuple(direction.ravel())), None, "linear", -1024.0)
    offset = np.array([30.0, -20.0, -250.0])
    result = _search(phantom, _moved_origin(slab, offset))
    assert np.all(np.abs(result.translation_mm - offset) < 8.0), result


@pytest.mark.parametrize("geometry", ["plain", "oblique anisotropic"])
def test_identical_scans_give_exactly_the_zero_translation(phantom, geometry):
    """Both scans are sampled on one lattice (the moving one's nodes are the fixed one's, extended), so identical
    scans correlate best at exactly 0 with symmetric neighbours: no sub-lattice offset for the affine to undo."""
    image = phantom
    if geometry != "plain":
        grid = Grid(size=(45, 38, 27), spacing=(3.7, 4.3, 6.1), origin=(-93.0, -71.0, 12.5),
                    direction=oblique_direction(17.0))
        image = resample_image(phantom, grid, None, "linear", -1024.0)
    result = _search(image, image)
    assert np.abs(result.translation_mm).max() < 1e-6, result
    assert result.correlation > 0.999 and not result.at_overlap_limit


def test_disjoint_scans_peak_at_the_overlap_limit(phantom):
    """Two slabs that share no anatomy correlate best on the smallest overlap allowed (``at_overlap_limit``, which
    the plausibility checks flag); two that share 57 % of their slices peak inside the allowed overlaps."""
    nz = phantom.GetSize()[2]
    upper, lower = phantom[:, :, int(0.6 * nz):], phantom[:, :, : int(0.4 * nz)]
    assert _search(upper, lower).at_overlap_limit
    partial = _search(phantom[:, :, int(0.3 * nz):], phantom[:, :, : int(0.7 * nz)])
    assert not partial.at_overlap_limit and 0.45 < partial.overlap_fraction < 0.7, partial
    np.testing.assert_allclose(partial.translation_mm, 0.0, atol=8.0)


def test_no_overlap_possible_falls_back_to_the_centres_of_mass(phantom):
    settings = OffsetSearchSettings(spacing_mm=8.0, range_mm=0.0, min_overlap=1.0)
    w = _working(phantom)
    slab = _working(phantom[:, :, :10])
    result = search_offset(w.grid, w.intensity, slab.grid, slab.intensity, settings)
    assert result.correlation == 0.0 and result.overlap_fraction == 0.0
    np.testing.assert_allclose(result.translation_mm, result.centre_of_mass_translation_mm)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="min_overlap"):
        OffsetSearchSettings(spacing_mm=8.0, range_mm=100.0, min_overlap=0.0)
