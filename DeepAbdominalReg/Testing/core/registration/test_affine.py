"""Affine pre-alignment: its objective's geometry (coordinates, field-of-view test) and recovery of a known affine."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.geometry import Grid, make_working_grid, resample_image
from deepabdominalreg.registration.affine import (
    AffineSettings,
    _box_index_axes,
    _box_of,
    _inside_box,
    optimise_affine,
)
from deepabdominalreg.registration.preprocessing import prepare_working_image
from deepabdominalreg.synthetic.anatomy import render_phantom


@pytest.mark.parametrize("seed", range(4))
def test_inside_box_is_what_grid_sample_gives_for_a_box_mask(seed):
    """The analytic field-of-view value equals trilinear sampling (zero padding, corners aligned) of a mask that is 1
    on a box, inside, at and beyond its faces and beyond the grid; thresholded at 0.999 the two agree everywhere
    except within float rounding of the threshold."""
    rng = np.random.default_rng(seed)
    size = rng.integers(4, 12, 3)  # x, y, z
    lo = np.array([int(rng.integers(0, s // 2)) for s in size])
    hi = np.array([int(rng.integers(s // 2, s)) for s in size])
    mask = np.zeros(size[::-1], dtype=np.float32)
    mask[lo[2]: hi[2] + 1, lo[1]: hi[1] + 1, lo[0]: hi[0] + 1] = 1.0
    assert np.array_equal(_box_of(mask > 0), np.stack([lo, hi], axis=1).astype(float))
    scale = 2.0 / (size - 1.0)
    bounds = torch.as_tensor(np.stack([lo, hi]) * scale - 1.0, dtype=torch.float32)
    coordinates = torch.as_tensor(rng.uniform(-1.3, 1.3, (1, 5, 6, 7, 3)), dtype=torch.float32)
    # half of the points on a face or within a voxel of one, where the value ramps
    face = torch.as_tensor(np.stack([lo, hi])[rng.integers(0, 2, (1, 5, 6, 7, 3)), np.arange(3)] * scale - 1.0,
                           dtype=torch.float32)
    near = face + torch.as_tensor(rng.uniform(-1.0, 1.0, face.shape) * scale, dtype=torch.float32)
    coordinates = torch.where(torch.rand(coordinates.shape[:-1] + (1,), generator=torch.Generator().manual_seed(seed))
                              < 0.5, coordinates, near)
    expected = F.grid_sample(torch.as_tensor(mask)[None, None], coordinates, mode="bilinear", padding_mode="zeros",
                             align_corners=True)
    got = _inside_box(coordinates, bounds, torch.as_tensor(scale, dtype=torch.float32))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    clear = (expected - 0.999).abs() > 1e-4
    assert torch.equal((got > 0.999)[clear], (expected > 0.999)[clear])
    assert bool(((expected > 0.0) & (expected < 1.0)).any())  # the ramps were sampled


def test_box_of_rejects_masks_that_do_not_fill_their_bounding_box():
    mask = np.zeros((5, 6, 7), dtype=bool)
    assert _box_of(mask) is None
    mask[1:4, 2:5, 0:7] = True
    assert np.array_equal(_box_of(mask), [[0, 6], [2, 4], [1, 3]])
    mask[1, 2, 0] = False
    assert _box_of(mask) is None


def test_box_index_axes_give_the_lps_points_of_the_box_voxels():
    """The per-axis terms sum to each box voxel's LPS position, on an oblique grid with anisotropic spacing."""
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.3, -0.2, 0.4)
    grid = Grid((9, 8, 7), (0.8, 1.3, 2.1), (-10.0, 25.0, 3.0), tuple(rotation.GetMatrix()))
    box = (slice(1, 6), slice(2, 8), slice(3, 9))  # z, y, x
    matrix, first, i, j, k = _box_index_axes(grid, box, torch.device("cpu"))
    points = (k * matrix[:, 2] + j * matrix[:, 1]) + (i * matrix[:, 0] + first)
    kk, jj, ii = np.meshgrid(*(np.arange(b.start, b.stop) for b in box), indexing="ij")
    expected = grid.index_to_physical(np.stack([ii, jj, kk], axis=-1).reshape(-1, 3)).reshape(*kk.shape, 3)
    np.testing.assert_allclose(points.numpy(), expected, atol=1e-4)


@pytest.fixture(scope="module")
def affine_pair() -> tuple[Grid, object, Grid, object, sitk.AffineTransform]:
    """A phantom and the same phantom through a known affine (fixed -> moving), as working images at 6 mm."""
    moving, _ = render_phantom(seed=2, spacing_mm=4.0)
    truth = sitk.AffineTransform(3)
    centre = moving.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in moving.GetSize()])
    truth.SetCenter(centre)
    truth.SetMatrix(tuple(sitk.Euler3DTransform(centre, 0.0, 0.0, 0.06).GetMatrix()))
    truth.SetTranslation((6.0, -4.0, 3.0))
    fixed = resample_image(moving, moving, truth, "linear", -1024.0)
    fixed_grid, moving_grid = make_working_grid(fixed, 6.0, 160), make_working_grid(moving, 6.0)
    w_fixed = prepare_working_image(fixed, fixed_grid, (-160.0, 240.0))
    w_moving = prepare_working_image(moving, moving_grid, (-160.0, 240.0))
    return fixed_grid, w_fixed, moving_grid, w_moving, truth


def _corner_error_mm(found: sitk.Transform, truth: sitk.Transform, grid: Grid) -> float:
    corners = grid.corners()
    return max(float(np.linalg.norm(np.subtract(found.TransformPoint(tuple(p)), truth.TransformPoint(tuple(p)))))
               for p in corners * 0.5 + corners.mean(axis=0) * 0.5)


def test_affine_recovers_a_known_affine_with_either_field_of_view_test(affine_pair):
    """A box-shaped moving field of view (the usual case) takes the analytic inside test; one with a corner cut
    away takes the sampled mask.  Both recover the known affine (halfway to the corners, within 1.5 mm at 6 mm)."""
    fixed_grid, w_fixed, moving_grid, w_moving, truth = affine_pair
    assert _box_of(w_moving.field_of_view) is not None
    settings = AffineSettings.from_config(RegistrationConfig(affine_levels_mm=(12.0, 6.0), affine_iterations=20))
    kwargs = {"fixed_field_of_view": w_fixed.field_of_view}
    boxed = optimise_affine(fixed_grid, w_fixed.intensity, moving_grid, w_moving.intensity, settings,
                            moving_field_of_view=w_moving.field_of_view, **kwargs)
    cut = w_moving.field_of_view.copy()
    cut[:2, :2, :2] = False  # a corner missing: not a box any more (in the air, so the alignment is the same)
    assert _box_of(cut) is None
    sampled = optimise_affine(fixed_grid, w_fixed.intensity, moving_grid, w_moving.intensity, settings,
                              moving_field_of_view=cut, **kwargs)
    assert _corner_error_mm(boxed, truth, fixed_grid) < 1.5
    assert _corner_error_mm(sampled, truth, fixed_grid) < 1.5
