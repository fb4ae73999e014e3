"""Known-answer tests of the domain randomisation (:mod:`deepabdominalreg.training.synthesis`) and of its use in
:class:`deepabdominalreg.training.augmentation.PairAugmentation`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deepabdominalreg.training import synthesis
from deepabdominalreg.training.augmentation import AugmentationConfig, PairAugmentation
from scipy import ndimage


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(shape=(12, 16, 20)) -> torch.Tensor:
    d, h, w = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    labels = torch.zeros(shape)
    labels[(d > 2) & (d < 9) & (h > 3) & (h < 12)] = 1
    labels[(w > 13) & (d < 6)] = 5
    labels[(w < 4) & (h > 9)] = 7
    return labels.view(1, 1, *shape)


_PLAIN = {"blur_sigma_mm": (0.0, 0.0), "bias_strength": (0.0, 0.0), "gamma_range": (1.0, 1.0),
          "noise_std": (0.0, 0.0)}
"""No blur, bias, gamma or noise: a synthesised image is one intensity per label."""


def test_a_plain_synthesis_is_one_intensity_per_label_and_reproducible():
    labels = _labels()
    image = synthesis.synthesise_from_labels(labels, _gen(3), **_PLAIN)
    assert image.shape == labels.shape and float(image.min()) == 0.0 and float(image.max()) == 1.0
    means = []
    for value in (0, 1, 5, 7):
        inside = image[labels == value]
        assert float(inside.max() - inside.min()) < 1e-6, value
        means.append(float(inside[0]))
    assert len({round(m, 4) for m in means}) == 4, means  # four classes, four different intensities
    torch.testing.assert_close(synthesis.synthesise_from_labels(labels, _gen(3), **_PLAIN), image)
    other = synthesis.synthesise_from_labels(labels, _gen(4), **_PLAIN)
    assert float((other - image).abs().max()) > 0.1


def test_outside_the_mask_is_one_more_class():
    labels = _labels()
    mask = torch.ones_like(labels)
    mask[..., :2] = 0  # part of the background (label 0) and of label 7 leave the body
    image = synthesis.synthesise_from_labels(labels, _gen(1), mask=mask, **_PLAIN)
    outside = image[mask == 0]
    assert float(outside.max() - outside.min()) < 1e-6
    background_inside = image[(mask == 1) & (labels == 0)]
    assert abs(float(outside[0]) - float(background_inside[0])) > 1e-3


def test_a_full_synthesis_stays_in_range_and_changes_appearance():
    labels = _labels()
    image = synthesis.synthesise_from_labels(labels, _gen(0), spacing_mm=(2.5, 1.0, 1.0), blur_sigma_mm=(2.0, 2.0),
                                             bias_strength=(0.3, 0.3), noise_std=(0.05, 0.05))
    assert torch.isfinite(image).all() and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    inside = image[labels == 1]
    assert float(inside.std()) > 0.01  # bias and noise vary a label's intensity


def test_blur_is_in_mm_and_keeps_a_constant_up_to_the_borders():
    constant = torch.full((1, 1, 8, 10, 12), 0.7)
    torch.testing.assert_close(synthesis.blur_mm(constant, 3.0, (2.0, 1.0, 0.5)), constant)
    impulse = torch.zeros(1, 1, 21, 31, 41)
    impulse[0, 0, 10, 15, 20] = 1.0
    spacing = (2.0, 1.0, 0.5)  # (d, h, w) mm: sigma 2 mm is 1, 2 and 4 voxels
    blurred = synthesis.blur_mm(impulse, 2.0, spacing)[0, 0].numpy()
    reference = ndimage.gaussian_filter(impulse[0, 0].numpy().astype(np.float64), sigma=(1.0, 2.0, 4.0),
                                        mode="constant", truncate=3.0)
    # where the kernel (radius 3 sigma) does not reach a border, blur_mm does not renormalise: the two agree
    inner = (slice(3, 18), slice(6, 25), slice(12, 29))
    np.testing.assert_allclose(blurred[inner], reference[inner], atol=1e-5)
    assert abs(float(blurred[inner].sum()) - float(reference.sum())) < 0.05


def test_the_bias_field_is_smooth_positive_and_one_at_zero_strength():
    torch.testing.assert_close(synthesis.bias_field((6, 7, 8), 2.0, 0.0, generator=_gen()), torch.ones(1, 1, 6, 7, 8))
    field = synthesis.bias_field((20, 20, 20), 4.0, 0.3, control_spacing_mm=64.0, generator=_gen(2))
    assert float(field.min()) > 0
    assert float(field.log().std()) > 0.01
    # 64 mm control spacing on 4 mm voxels: neighbouring voxels differ by a small share of the range
    step = (field[..., 1:] - field[..., :-1]).abs().max()
    assert float(step) < 0.2 * float(field.max() - field.min())


def test_cutting_the_moving_image_removes_the_correspondences_into_the_cut():
    shape = (10, 4, 4)
    fixed, moving = torch.rand(1, 1, *shape, generator=_gen(0)), torch.rand(1, 1, *shape, generator=_gen(1))
    fixed_mask, moving_mask = torch.ones_like(fixed), torch.ones_like(moving)
    disp = torch.zeros(1, 3, *shape)
    disp[:, 0] = 1.0  # fixed slice p corresponds to moving slice p + 1
    before = [t.clone() for t in (fixed, moving, fixed_mask, moving_mask, disp)]
    out = synthesis.cut_field_of_view(fixed, moving, fixed_mask, moving_mask, disp, "moving", 0, 3)
    for t, b in zip((fixed, moving, fixed_mask, moving_mask, disp), before):
        torch.testing.assert_close(t, b)  # inputs untouched
    assert float(out["moving"][:, :, :3].abs().max()) == 0 and float(out["moving_mask"][:, :, :3].max()) == 0
    torch.testing.assert_close(out["moving"][:, :, 3:], moving[:, :, 3:])
    # slices 0, 1 map to moving slices 1, 2 (cut); slice 2 maps to slice 3, interpolated from slices 3 only
    assert out["fixed_mask"][0, 0, :, 0, 0].tolist() == [0, 0] + [1] * 8
    torch.testing.assert_close(out["fixed"], fixed)
    cut_fixed = synthesis.cut_field_of_view(fixed, moving, fixed_mask, moving_mask, None, "fixed", 7, 10)
    assert cut_fixed["fixed_mask"][0, 0, :, 0, 0].tolist() == [1] * 7 + [0] * 3
    torch.testing.assert_close(cut_fixed["moving_mask"], moving_mask)
    with pytest.raises(ValueError, match="displacement"):
        synthesis.cut_field_of_view(fixed, moving, fixed_mask, moving_mask, None, "moving", 0, 3)
    with pytest.raises(ValueError, match="outside"):
        synthesis.cut_field_of_view(fixed, moving, fixed_mask, moving_mask, disp, "fixed", 4, 11)


def test_a_random_field_of_view_cuts_one_end_within_the_bound():
    shape = (20, 4, 4)
    images = [torch.rand(1, 1, *shape, generator=_gen(s)) for s in (0, 1)]
    masks = [torch.ones(1, 1, *shape) for _ in range(2)]
    disp = torch.zeros(1, 3, *shape)
    seen = set()
    for seed in range(30):
        out = synthesis.random_field_of_view(*images, *masks, disp, _gen(seed), max_fraction=0.3)
        image, start, stop = out["cut"]
        assert 1 <= stop - start <= 6 and (start == 0 or stop == 20)
        assert float(out[f"{image}_mask"][:, :, start:stop].max()) == 0
        seen.add((image, start == 0))
    assert len(seen) == 4  # both images, both ends


def test_pair_augmentation_synthesises_both_images_from_the_labels():
    shape = (12, 16, 20)
    labels = _labels(shape)
    image = torch.full_like(labels, 0.5)  # a synthesised pair must not show this constant
    config = AugmentationConfig(synth_probability=1.0, synth_blur_sigma_mm=(0.0, 0.0), synth_bias_strength=(0.0, 0.0),
                                synth_gamma_range=(1.0, 1.0), synth_noise_std=(0.0, 0.0), rigid_probability=0.0,
                                base_tps_probability=0.0, van_eijnatten_probability=0.0)
    pair = PairAugmentation(config)(image, labels, torch.ones_like(labels), 2.0, generator=_gen(5))
    for side in ("moving", "fixed"):
        values = pair[f"{side}_labels"]
        inside = pair[f"{side}_mask"] > 0.5
        intensities = [float(pair[side][inside & (values == v)].max() - pair[side][inside & (values == v)].min())
                       for v in (0, 1, 5, 7) if bool((inside & (values == v)).any())]
        assert max(intensities) < 1e-6, (side, intensities)
        assert float(pair[side].max() - pair[side].min()) > 0.1
    # the two images' appearance is drawn independently
    both = (pair["fixed_labels"] == 1) & (pair["moving_labels"] == 1)
    assert abs(float(pair["fixed"][both].mean() - pair["moving"][both].mean())) > 1e-3
    unlabelled = PairAugmentation(config)(image, None, torch.ones_like(labels), 2.0, generator=_gen(5))
    assert float(unlabelled["moving"].std()) < 0.1  # no label map: the image is kept (plus noise)
    with pytest.raises(ValueError, match="label map"):
        PairAugmentation(config)(image, None, torch.ones_like(labels), 2.0, generator=_gen(5), synthesise=True)
