"""Known-answer tests of the on-the-fly augmentation (:mod:`deepabdominalreg.training.augmentation`)."""

from __future__ import annotations

import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.training import augmentation as aug


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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
