"""Known-answer tests of the on-the-fly augmentation (:mod:`deepabdominalreg.augmentation`)."""

from __future__ import annotations

import math

import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.training import augmentation as aug


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ TPS


def test_tps_interpolates_control_points_exactly():
    shape = (9, 10, 11)
    g = _gen(1)
    control = torch.stack([torch.randint(0, s, (12,), generator=g) for s in shape], dim=1).double()
    control = torch.unique(control, dim=0)
    vectors = torch.randn(len(control), 3, generator=g, dtype=torch.float64)
    field = aug.tps_displacement(shape, control, vectors)
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
    field = aug.tps_displacement(shape, control, control @ a.T + b, stride=stride)
    grid = spatial.identity_grid(shape, dtype=torch.float64)[0].reshape(3, -1)
    expected = (a @ grid + b[:, None]).reshape(1, 3, *shape).float()
    torch.testing.assert_close(field, expected, atol=1e-4, rtol=0)


def test_tps_rejects_bad_control_points():
    with pytest.raises(ValueError):
        aug.tps_displacement((4, 4, 4), torch.zeros(3, 3), torch.zeros(3, 3))


def test_tps_gradient_flows_to_control_displacements():
    shape = (6, 6, 6)
    axes = [torch.linspace(0, 5, 3, dtype=torch.float64)] * 3
    control = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    vectors = torch.zeros(len(control), 3, dtype=torch.float64, requires_grad=True)
    aug.tps_displacement(shape, control, vectors).pow(2).sum().backward()
    assert vectors.grad is not None
    vectors2 = torch.ones(len(control), 3, dtype=torch.float64, requires_grad=True)
    aug.tps_displacement(shape, control, vectors2).sum().backward()
    assert vectors2.grad.abs().sum() > 0


def test_random_tps_is_deterministic_and_scales_with_amplitude():
    shape = (16, 20, 24)
    a = aug.random_tps_displacement(shape, 2.0, max_displacement_mm=6.0, generator=_gen(3))
    b = aug.random_tps_displacement(shape, 2.0, max_displacement_mm=6.0, generator=_gen(3))
    c = aug.random_tps_displacement(shape, 2.0, max_displacement_mm=3.0, generator=_gen(3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, a / 2, atol=1e-5, rtol=0)
    # at the 8 corner control points the field equals the random vectors: |component| <= 6 mm = 3 voxels
    corners = a[0][:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]]
    assert corners.abs().max() <= 3.0 + 1e-4
    assert a.abs().max() > 0.5


# ------------------------------------------------------------------------------------------------ rigid


def test_rotation_matrix_known_quarter_turn():
    r = aug.rotation_matrix([90.0, 0.0, 0.0])  # about d: rotates the (h, w) plane
    torch.testing.assert_close(r @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
                               torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)
    r = aug.rotation_matrix([10.0, -7.0, 3.0])
    torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.det(r).item() == pytest.approx(1.0)


def test_affine_displacement_translation_in_mm():
    field = aug.affine_displacement((5, 6, 7), torch.eye(3), (4.0, -2.0, 6.0), spacing_mm=(2.0, 1.0, 3.0))
    expected = torch.tensor([2.0, -2.0, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, 5, 6, 7)
    torch.testing.assert_close(field, expected)


def test_affine_displacement_rotation_about_centre():
    shape = (5, 5, 5)
    field = aug.affine_displacement(shape, aug.rotation_matrix([90.0, 0.0, 0.0]), spacing_mm=2.0)
    assert field[0, :, 2, 2, 2].abs().max() < 1e-6  # the centre stays
    # voxel (2, 3, 2) is one voxel along +h from the centre: it goes to one voxel along +w
    torch.testing.assert_close(field[0, :, 2, 3, 2], torch.tensor([0.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_random_rigid_is_rigid_and_bounded():
    shape = (12, 12, 12)
    field = aug.random_rigid_displacement(shape, 3.0, max_rotation_deg=10, max_translation_mm=30, generator=_gen(4))
    det = spatial.jacobian_determinant(field)
    torch.testing.assert_close(det, torch.ones_like(det), atol=1e-4, rtol=0)
    centre = field[0, :, 5:7, 5:7, 5:7].mean(dim=(1, 2, 3)) * 3.0  # mm, near the rotation centre
    assert centre.abs().max() <= 30.0 + 3.0 * math.sin(math.radians(10)) * 3
    no_motion = aug.random_rigid_displacement(shape, 3.0, max_rotation_deg=0, max_translation_mm=0)
    assert no_motion.abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------ van Eijnatten


def test_gaussian_smooth_preserves_constants_and_has_the_right_width():
    x = torch.zeros(1, 1, 31, 31, 31)
    x[0, 0, 15, 15, 15] = 1.0
    y = aug.gaussian_smooth(x, 2.5)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    profile = y[0, 0, :, 15, 15] / y[0, 0, :, 15, 15].sum()
    d = torch.arange(31.0) - 15
    assert (profile * d**2).sum().item() == pytest.approx(2.5**2, rel=0.02)
    ones = aug.gaussian_smooth(torch.ones(1, 1, 31, 31, 31), 2.0)
    assert ones[0, 0, 15, 15, 15].item() == pytest.approx(1.0, abs=1e-5)


def test_van_eijnatten_peak_amplitude_and_support():
    shape = (24, 24, 24)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[8:16, 8:16, 8:16] = True
    field = aug.van_eijnatten_displacement(mask, 2.0, amplitude_mm=7.0, n_points=5, min_distance_mm=4.0,
                                           sigma_mm=3.0, generator=_gen(5))
    norm_mm = torch.linalg.norm(field * 2.0, dim=1)[0]
    assert norm_mm.max().item() == pytest.approx(7.0, rel=1e-5)
    peak = torch.nonzero(norm_mm == norm_mm.max())[0]
    assert all(6 <= int(p) <= 17 for p in peak)  # the vectors sit inside the mask
    assert norm_mm[0, 0, 0].item() < 1e-3  # and vanish far away
    again = aug.van_eijnatten_displacement(mask, 2.0, amplitude_mm=7.0, n_points=5, min_distance_mm=4.0,
                                           sigma_mm=3.0, generator=_gen(5))
    torch.testing.assert_close(field, again)


def test_van_eijnatten_respects_min_distance():
    shape = (20, 20, 20)
    mask = torch.ones(shape, dtype=torch.bool)
    # sigma tiny: the smoothed field keeps its spikes where the points are
    field = aug.van_eijnatten_displacement(mask, 1.0, amplitude_mm=1.0, n_points=100, min_distance_mm=8.0,
                                           sigma_mm=0.01, generator=_gen(6))
    points = torch.nonzero(torch.linalg.norm(field[0], dim=0) > 1e-6).float()
    assert 2 <= len(points) < 100
    distances = torch.cdist(points, points) + 1e6 * torch.eye(len(points))
    assert distances.min().item() >= 8.0


def test_van_eijnatten_empty_mask_gives_zeros():
    field = aug.van_eijnatten_displacement(torch.zeros(4, 4, 4, dtype=torch.bool), 1.0)
    assert field.abs().max() == 0


# ------------------------------------------------------------------------------------------------ intensity


def test_gamma_and_brightness_known_values():
    x = torch.linspace(0, 1, 11).view(1, 1, 11, 1, 1)
    torch.testing.assert_close(aug.gamma_augment(x, gamma=2.0), x**2)
    g = aug.gamma_augment(x, generator=_gen(7))
    assert g[0, 0, 0].item() == 0.0 and g[0, 0, -1].item() == 1.0
    b = aug.brightness_augment(x, factor=1.2)
    torch.testing.assert_close(b, (x * 1.2).clamp(0, 1))
    for seed in range(20):
        y = aug.brightness_augment(x[:, :, 5:6], 0.2, generator=_gen(seed))  # x = 0.5
        assert 0.4 - 1e-6 <= y.item() <= 0.6 + 1e-6


# ------------------------------------------------------------------------------------------------ the layer


def _volume(shape=(16, 20, 20)):
    d, h, w = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    image = (0.5 + 0.4 * torch.sin(d / 3) * torch.cos(h / 4) * torch.sin(w / 5 + 1)).view(1, 1, *shape)
    labels = torch.where((w > 12) & (d < 8), 2.0, ((d > 4) & (d < 12) & (h > 5) & (h < 15)).float())
    return image, labels.view(1, 1, *shape), torch.ones(1, 1, *shape)


def test_pair_augmentation_keeps_the_true_field():
    config = aug.AugmentationConfig(gamma_probability=0, brightness_probability=0, noise_std=(0.0, 0.0),
                                    base_tps_probability=0, van_eijnatten_probability=1.0,
                                    van_eijnatten_points=10, van_eijnatten_min_distance_mm=10.0,
                                    van_eijnatten_sigma_mm=8.0)
    layer = aug.PairAugmentation(config)
    image, labels, mask = _volume()
    pair = layer(image, labels, mask, 2.0, generator=_gen(8))
    assert pair["disp"].abs().max() > 0.5
    torch.testing.assert_close(pair["moving"], image)
    expected = spatial.warp(image, pair["disp"]) * pair["fixed_mask"]
    torch.testing.assert_close(pair["fixed"], expected)
    torch.testing.assert_close(pair["fixed_labels"], spatial.warp(labels, pair["disp"], mode="nearest"))
    assert set(pair["fixed_labels"].unique().tolist()) <= {0.0, 1.0, 2.0}


def test_pair_augmentation_prior_field_and_determinism():
    config = aug.AugmentationConfig(tps_probability=0, van_eijnatten_probability=0, rigid_probability=0,
                                    base_tps_probability=0, prior_field_scale=(2.0, 2.0), noise_std=(0.0, 0.0),
                                    gamma_probability=0, brightness_probability=0)
    image, labels, mask = _volume()
    prior = torch.zeros(1, 3, *image.shape[2:])
    prior[:, 1] = 0.75
    pair = aug.PairAugmentation(config)(image, labels, mask, 2.0, prior_field=prior, generator=_gen(0))
    torch.testing.assert_close(pair["disp"], 2.0 * prior)
    full = aug.PairAugmentation()
    a = full(image, labels, mask, 2.0, generator=_gen(9))
    b = full(image, labels, mask, 2.0, generator=_gen(9))
    for key in ("fixed", "moving", "disp", "fixed_labels"):
        torch.testing.assert_close(a[key], b[key])
    assert a["fixed"].min() >= 0 and a["fixed"].max() <= 1


def test_augmentation_config_round_trip_and_unknown_keys():
    config = aug.AugmentationConfig(max_rotation_deg=4.0)
    assert aug.AugmentationConfig.from_dict(config.as_dict()) == config
    with pytest.raises(ValueError):
        aug.AugmentationConfig.from_dict({"max_rotation": 3})
