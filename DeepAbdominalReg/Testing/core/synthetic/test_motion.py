"""Known-answer tests of the motion models on a tensor grid (:mod:`deepabdominalreg.synthetic.motion`): thin-plate
splines, rigid / affine motion and the van Eijnatten generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.geometry import Grid
from deepabdominalreg.synthetic import motion
from geometry_helpers import oblique_direction


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ TPS


def test_tps_interpolates_control_points_exactly():
    shape = (9, 10, 11)
    g = _gen(1)
    control = torch.stack([torch.randint(0, s, (12,), generator=g) for s in shape], dim=1).double()
    control = torch.unique(control, dim=0)
    vectors = torch.randn(len(control), 3, generator=g, dtype=torch.float64)
    field = motion.tps_displacement(shape, control, vectors)
    assert field.shape == (1, 3, *shape)
    idx = control.long()
    sampled = field[0, :, idx[:, 0], idx[:, 1], idx[:, 2]].T
    torch.testing.assert_close(sampled, vectors.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("stride", [1, 3])
def test_tps_reproduces_an_affine_field_exactly(stride):
    shape = (8, 9, 10)
    a = torch.tensor([[0.05, -0.02, 0.01], [0.0, 0.03, 0.02], [-0.04, 0.01, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    control = torch.tensor([[0, 0, 0], [7, 0, 0], [0, 8, 0], [0, 0, 9], [7, 8, 9], [3, 4, 5], [5, 1, 7]],
                           dtype=torch.float64)
    field = motion.tps_displacement(shape, control, control @ a.T + b, stride=stride)
    grid = spatial.identity_grid(shape, dtype=torch.float64)[0].reshape(3, -1)
    expected = (a @ grid + b[:, None]).reshape(1, 3, *shape).float()
    torch.testing.assert_close(field, expected, atol=1e-4, rtol=0)


def test_tps_rejects_bad_control_points():
    with pytest.raises(ValueError):
        motion.tps_displacement((4, 4, 4), torch.zeros(3, 3), torch.zeros(3, 3))


def test_tps_gradient_flows_to_control_displacements():
    shape = (6, 6, 6)
    axes = [torch.linspace(0, 5, 3, dtype=torch.float64)] * 3
    control = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    vectors = torch.zeros(len(control), 3, dtype=torch.float64, requires_grad=True)
    motion.tps_displacement(shape, control, vectors).pow(2).sum().backward()
    assert vectors.grad is not None
    vectors2 = torch.ones(len(control), 3, dtype=torch.float64, requires_grad=True)
    motion.tps_displacement(shape, control, vectors2).sum().backward()
    assert vectors2.grad.abs().sum() > 0


def test_random_tps_is_deterministic_and_scales_with_amplitude():
    shape = (16, 20, 24)
    a = motion.random_tps_displacement(shape, 2.0, max_displacement_mm=6.0, generator=_gen(3))
    b = motion.random_tps_displacement(shape, 2.0, max_displacement_mm=6.0, generator=_gen(3))
    c = motion.random_tps_displacement(shape, 2.0, max_displacement_mm=3.0, generator=_gen(3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, a / 2, atol=1e-5, rtol=0)
    # at the 8 corner control points the field equals the random vectors: |component| <= 6 mm = 3 voxels
    corners = a[0][:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]]
    assert corners.abs().max() <= 3.0 + 1e-4
    assert a.abs().max() > 0.5


# ------------------------------------------------------------------------------------------------ rigid


def test_rotation_matrix_known_quarter_turn():
    r = motion.rotation_matrix([90.0, 0.0, 0.0])  # about d: rotates the (h, w) plane
    torch.testing.assert_close(r @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
                               torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)
    r = motion.rotation_matrix([10.0, -7.0, 3.0])
    torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.det(r).item() == pytest.approx(1.0)


def test_affine_displacement_translation_in_mm():
    field = motion.affine_displacement((5, 6, 7), torch.eye(3), (4.0, -2.0, 6.0), spacing_mm=(2.0, 1.0, 3.0))
    expected = torch.tensor([2.0, -2.0, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, 5, 6, 7)
    torch.testing.assert_close(field, expected)


def test_affine_displacement_rotation_about_centre():
    shape = (5, 5, 5)
    field = motion.affine_displacement(shape, motion.rotation_matrix([90.0, 0.0, 0.0]), spacing_mm=2.0)
    assert field[0, :, 2, 2, 2].abs().max() < 1e-6  # the centre stays
    # voxel (2, 3, 2) is one voxel along +h from the centre: it goes to one voxel along +w
    torch.testing.assert_close(field[0, :, 2, 3, 2], torch.tensor([0.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_random_rigid_is_rigid_and_bounded():
    shape = (12, 12, 12)
    field = motion.random_rigid_displacement(shape, 3.0, max_rotation_deg=10, max_translation_mm=30, generator=_gen(4))
    det = spatial.jacobian_determinant(field)
    torch.testing.assert_close(det, torch.ones_like(det), atol=1e-4, rtol=0)
    centre = field[0, :, 5:7, 5:7, 5:7].mean(dim=(1, 2, 3)) * 3.0  # mm, near the rotation centre
    assert centre.abs().max() <= 30.0 + 3.0 * math.sin(math.radians(10)) * 3
    no_motion = motion.random_rigid_displacement(shape, 3.0, max_rotation_deg=0, max_translation_mm=0)
    assert no_motion.abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------ van Eijnatten


def test_gaussian_smooth_preserves_constants_and_has_the_right_width():
    x = torch.zeros(1, 1, 31, 31, 31)
    x[0, 0, 15, 15, 15] = 1.0
    y = motion.gaussian_smooth(x, 2.5)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    profile = y[0, 0, :, 15, 15] / y[0, 0, :, 15, 15].sum()
    d = torch.arange(31.0) - 15
    assert (profile * d**2).sum().item() == pytest.approx(2.5**2, rel=0.02)
    ones = motion.gaussian_smooth(torch.ones(1, 1, 31, 31, 31), 2.0)
    assert ones[0, 0, 15, 15, 15].item() == pytest.approx(1.0, abs=1e-5)


def test_van_eijnatten_peak_amplitude_and_support():
    shape = (24, 24, 24)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[8:16, 8:16, 8:16] = True
    grid = motion.tensor_grid(shape, 2.0)
    field = motion.van_eijnatten_displacement(mask, grid, amplitude_mm=7.0, n_points=5, min_distance_mm=4.0,
                                              sigma_mm=3.0, generator=_gen(5))
    assert field.shape == (*shape, 3) and field.dtype == np.float64  # (D, H, W, 3) LPS mm
    norm_mm = np.linalg.norm(field, axis=-1)
    assert norm_mm.max() == pytest.approx(7.0, rel=1e-5)
    peak = np.argwhere(norm_mm == norm_mm.max())[0]
    assert all(6 <= int(p) <= 17 for p in peak)  # the vectors sit inside the mask
    assert norm_mm[0, 0, 0] < 1e-3  # and vanish far away
    again = motion.van_eijnatten_displacement(mask, grid, amplitude_mm=7.0, n_points=5, min_distance_mm=4.0,
                                              sigma_mm=3.0, generator=_gen(5))
    np.testing.assert_array_equal(field, again)
    # the peak over a part of the grid only
    half = torch.zeros(shape, dtype=torch.bool)
    half[:12] = True
    part = motion.van_eijnatten_displacement(mask, grid, amplitude_mm=7.0, n_points=5, min_distance_mm=4.0,
                                             sigma_mm=3.0, generator=_gen(5), peak_within=half)
    assert np.linalg.norm(part, axis=-1)[:12].max() == pytest.approx(7.0, rel=1e-5)
    np.testing.assert_allclose(part / np.abs(part).max(), field / np.abs(field).max(), atol=1e-6)


def test_van_eijnatten_respects_min_distance():
    shape = (20, 20, 20)
    mask = torch.ones(shape, dtype=torch.bool)
    # sigma tiny: the smoothed field keeps its spikes where the points are
    field = motion.van_eijnatten_displacement(mask, motion.tensor_grid(shape, 1.0), amplitude_mm=1.0, n_points=100,
                                              min_distance_mm=8.0, sigma_mm=0.01, generator=_gen(6))
    points = torch.as_tensor(np.argwhere(np.linalg.norm(field, axis=-1) > 1e-6), dtype=torch.float32)
    assert 2 <= len(points) < 100
    distances = torch.cdist(points, points) + 1e6 * torch.eye(len(points))
    assert distances.min().item() >= 8.0


def test_van_eijnatten_empty_mask_or_zero_amplitude_gives_zeros_and_draws_nothing():
    grid = motion.tensor_grid((4, 4, 4), 1.0)
    generator = _gen(0)
    state = generator.get_state()
    assert np.abs(motion.van_eijnatten_displacement(torch.zeros(4, 4, 4, dtype=torch.bool), grid,
                                                    generator=generator)).max() == 0
    assert np.abs(motion.van_eijnatten_displacement(torch.ones(4, 4, 4, dtype=torch.bool), grid,
                                                    amplitude_mm=0.0, generator=generator)).max() == 0
    assert torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match="differs from the grid"):
        motion.van_eijnatten_displacement(torch.ones(4, 4, 5, dtype=torch.bool), grid)


def test_van_eijnatten_vectors_follow_the_grid_direction():
    """The field is drawn along the grid's axes: on an oblique grid the same draws give the same field in voxels,
    rotated into LPS by the grid's direction (a rotation: the peak amplitude is kept)."""
    shape = (12, 14, 16)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:9, 4:10, 5:12] = True
    plain = motion.tensor_grid(shape, (3.0, 2.0, 2.5))
    oblique = Grid(plain.size, plain.spacing, (5.0, -2.0, 1.0), oblique_direction(25.0))
    options = {"amplitude_mm": 6.0, "n_points": 4, "min_distance_mm": 5.0, "sigma_mm": 4.0}
    a = motion.van_eijnatten_displacement(mask, plain, generator=_gen(2), **options)
    b = motion.van_eijnatten_displacement(mask, oblique, generator=_gen(2), **options)
    np.testing.assert_allclose(np.linalg.norm(b, axis=-1).max(), 6.0, rtol=1e-6)
    np.testing.assert_allclose(oblique.displacement_to_voxels(b), plain.displacement_to_voxels(a), atol=1e-9)


def test_tensor_grid_orders_the_axes_as_sitk():
    grid = motion.tensor_grid((4, 5, 6), (3.0, 2.0, 1.0))
    assert grid.size == (6, 5, 4) and grid.spacing == (1.0, 2.0, 3.0) and grid.shape_zyx == (4, 5, 6)
    np.testing.assert_allclose(grid.displacement_to_voxels(np.array([1.0, 2.0, 3.0])), [1.0, 1.0, 1.0])
