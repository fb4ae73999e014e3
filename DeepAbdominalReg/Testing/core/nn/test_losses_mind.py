"""MIND-SSC (:func:`deepabdominalreg.nn.losses.mind_ssc`): ConvexAdam's values, shift equivariance, contrast
invariance, and a loss minimised at the true shift."""

from __future__ import annotations

import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.nn import losses


def _textured(shape=(20, 22, 24), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    return spatial.box_filter(spatial.box_filter(x, 3), 3)


@pytest.mark.parametrize("radius, dilation", [(2, 2), (1, 2), (1, 1), (0, 3)])
def test_mind_ssc_equals_convexadam(radius, dilation):
    convex = pytest.importorskip("convexAdam.convex_adam_utils")
    image = _textured((14, 15, 16)).float()
    reference = convex.MINDSSC(image, radius, dilation, device="cpu")
    ours = losses.mind_ssc(image, radius, dilation)
    assert ours.shape == (1, 12, 14, 15, 16)
    torch.testing.assert_close(ours, reference, rtol=0, atol=5e-5)


def test_mind_of_a_shifted_image_is_the_shifted_mind_and_ignores_contrast():
    image = _textured()
    shift = (2, -3, 1)
    shifted = torch.roll(image, shifts=shift, dims=(2, 3, 4))
    mind, mind_shifted = losses.mind_ssc(image, 1, 2), losses.mind_ssc(shifted, 1, 2)
    # away from the borders (the roll wraps, the descriptor's reach is radius + dilation = 3 voxels)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8), slice(8, -8))
    # the image-wide variance level of the clamp differs between the two (it is never reached here)
    torch.testing.assert_close(torch.roll(mind, shifts=shift, dims=(2, 3, 4))[inner], mind_shifted[inner],
                               rtol=0, atol=1e-12)
    # a linear intensity change leaves the descriptor unchanged (patch distances scale, the variance with them)
    torch.testing.assert_close(losses.mind_ssc(3.0 * image - 7.0, 1, 2), mind, rtol=0, atol=1e-12)
    assert 0 < float(mind.min()) and float(mind.max()) <= 1.0


def test_mind_loss_is_minimised_at_the_true_shift():
    """Translations of the moving image around the true (whole-voxel) one, by half voxels: the loss is smallest,
    and 0, at the true one."""
    fixed = _textured((24, 24, 24), seed=1)
    true = torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64)
    moving = spatial.warp(fixed, -true.view(1, 3, 1, 1, 1).expand(1, 3, 24, 24, 24).contiguous(),
                          padding_mode="border")  # moving(q) = fixed(q - t): warp(moving, t) = fixed
    mask = torch.zeros_like(fixed, dtype=torch.bool)
    mask[..., 5:-5, 5:-5, 5:-5] = True
    candidates = [true + torch.tensor(o, dtype=torch.float64) * 0.5 for o in
                  [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1), (1, 1, 1)]]
    values = []
    for t in candidates:
        disp = t.view(1, 3, 1, 1, 1).expand(1, 3, 24, 24, 24).contiguous()
        values.append(float(losses.mind_loss(fixed, spatial.warp(moving, disp, padding_mode="border"), 1, 2, mask)))
    assert values[0] < 1e-12, values
    assert min(values[1:]) > 1e-3, values


def test_mind_ssc_rejects_bad_input():
    with pytest.raises(ValueError, match="B, 1"):
        losses.mind_ssc(torch.zeros(1, 2, 5, 5, 5))
    with pytest.raises(ValueError, match="dilation"):
        losses.mind_ssc(torch.zeros(1, 1, 5, 5, 5), radius=1, dilation=0)
