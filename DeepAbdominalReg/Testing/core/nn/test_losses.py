"""Known-answer tests of every loss term in :mod:`deepabdominalreg.nn.losses` (values, signs, gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deepabdominalreg import spatial
from deepabdominalreg.nn import losses


def _smooth_image(shape=(12, 12, 12), seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    x = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x.to(dtype)


def _cube(shape, lo, hi) -> torch.Tensor:
    m = torch.zeros(1, 1, *shape)
    m[0, 0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0
    return m


def _linear_field(shape, a: float, channel: int = 0, axis: int = 2, dtype=torch.float32) -> torch.Tensor:
    disp = torch.zeros(1, 3, *shape, dtype=dtype)
    coord = torch.arange(shape[axis - 2], dtype=dtype)
    view = [1, 1, 1]
    view[axis - 2] = -1
    disp[0, channel] = a * coord.view(*view).expand(*shape)
    return disp


# ------------------------------------------------------------------------------------------------ similarity


def test_local_ncc_perfect_and_linear_intensity_change():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 12, 12, 12, generator=g)  # zero mean, unit variance: well above eps
    assert losses.local_ncc_loss(x, x, window=5).item() == pytest.approx(-1.0, abs=2e-3)
    # NCC is invariant to a positive scaling (an offset too, away from the zero-padded borders)
    assert losses.local_ncc_loss(x, 3.0 * x, window=5).item() == pytest.approx(-1.0, abs=2e-3)
    assert losses.local_ncc_loss(x, 3.0 * x + 0.5, window=5).item() < -0.9
    # independent noise: squared local correlation ~ 1 / window³
    other = torch.randn(1, 1, 12, 12, 12, generator=g)
    assert losses.local_ncc_loss(x, other, window=5).item() > -0.05


def test_local_ncc_window_must_be_odd():
    x = _smooth_image()
    with pytest.raises(ValueError):
        losses.local_ncc_loss(x, x, window=4)


def test_global_ncc_signs():
    x = _smooth_image()
    assert losses.global_ncc_loss(x, x).item() == pytest.approx(-1.0, abs=1e-5)
    assert losses.global_ncc_loss(x, -x).item() == pytest.approx(1.0, abs=1e-5)


def test_mse_known_value_and_mask():
    a = torch.zeros(1, 1, 4, 4, 4)
    b = torch.full((1, 1, 4, 4, 4), 2.0)
    assert losses.mse_loss(a, b).item() == pytest.approx(4.0)
    b[..., :2] = 0.0
    mask = torch.zeros_like(a)
    mask[..., :2] = 1
    assert losses.mse_loss(a, b, mask).item() == pytest.approx(0.0)
    assert losses.mse_loss(a, b).item() == pytest.approx(2.0)


def test_ssim_identity_zero_and_worse_for_different_images():
    x = _smooth_image()
    assert losses.ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = _smooth_image(seed=3)
    value = losses.ssim_loss(x, y).item()
    assert 0.05 < value <= 2.0
    # a brightness offset lowers only the luminance term: less than a different image
    assert 0.0 < losses.ssim_loss(x, x + 0.05).item() < value


def test_ssim_gradcheck_float64():
    x = _smooth_image((4, 4, 5), dtype=torch.float64)
    y = _smooth_image((4, 4, 5), seed=2, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: losses.ssim_loss(x, t, window=3), (y,))


def _reference_window_statistics(fixed, warped, window):
    """Textbook window covariance and variances: means by zero-padded average pooling, autograd through it all."""

    def mean(x):
        return F.avg_pool3d(x, window, stride=1, padding=window // 2, count_include_pad=True)

    mu_f, mu_w = mean(fixed), mean(warped)
    cov = mean(fixed * warped) - mu_f * mu_w
    var_f = (mean(fixed * fixed) - mu_f**2).clamp_min(0)
    var_w = (mean(warped * warped) - mu_w**2).clamp_min(0)
    return cov, var_f, var_w


def _reference_local_ncc_map(fixed, warped, window, eps=1e-5):
    """The local squared NCC map."""
    cov, var_f, var_w = _reference_window_statistics(fixed, warped, window)
    return cov**2 / (var_f * var_w + eps)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masking", ["no mask", "bool mask", "weights"])
def test_local_ncc_equals_the_reference_formula_for_every_reduction_value_and_gradient(reduction, masking):
    """One local NCC for training, the affine and instance optimisation: the value and the analytic gradient equal
    autograd through the reference formula, for every reduction and mask, batches and channels, with the fixed
    image's statistics given or not; a constant patch (zero variance) included."""
    g = torch.Generator().manual_seed(5)
    shape = (2, 2, 7, 9, 8)
    fixed = torch.rand(shape, generator=g, dtype=torch.float64)
    warped = torch.rand(shape, generator=g, dtype=torch.float64)
    warped[0, 0, :4, :4, :4] = 0.3  # zero local variance: no gradient through the clamp
    mask = {"no mask": None, "bool mask": torch.rand(2, 1, 7, 9, 8, generator=g) > 0.3,
            "weights": torch.rand(2, 1, 7, 9, 8, generator=g, dtype=torch.float64)}[masking]
    weight = torch.ones(2, 1, 7, 9, 8, dtype=torch.float64) if mask is None else mask.to(torch.float64)
    upstream = torch.rand(shape, generator=g, dtype=torch.float64)  # a non-uniform gradient for "none"
    for window in (3, 5):
        ref_in = warped.clone().requires_grad_(True)
        terms = -_reference_local_ncc_map(fixed, ref_in, window) * weight
        ref = {"mean": terms.sum() / weight.expand(shape).sum(), "sum": terms.sum(), "none": terms}[reduction]
        for statistics in (None, losses.local_statistics(fixed, window)):
            ours_in = warped.clone().requires_grad_(True)
            ours = losses.local_ncc_loss(fixed, ours_in, window, mask=mask, reduction=reduction,
                                         fixed_statistics=statistics)
            assert ours.shape == ref.shape
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
            (ours * upstream if reduction == "none" else ours).sum().backward()
            ref_in.grad = None
            (ref * upstream if reduction == "none" else ref).sum().backward(retain_graph=True)
            torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-12)
            assert ours_in.grad.abs().max() > 0


def test_local_ncc_gradcheck_float64_and_sign():
    x = _smooth_image((4, 4, 5), dtype=torch.float64)
    y = _smooth_image((4, 4, 5), seed=2, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(1, 1, 4, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda t, reduction=reduction: losses.local_ncc_loss(x, t, 3, mask=mask, reduction=reduction), (y,))
    # squared correlation: an inverted image matches as well as the image itself
    assert losses.local_ncc_loss(x, -x, 3).item() == pytest.approx(losses.local_ncc_loss(x, x, 3).item())
    with pytest.raises(ValueError):
        losses.local_ncc_loss(x, y.detach(), 3, reduction="max")
    with pytest.raises(ValueError):  # the gradient is with respect to warped only
        losses.local_ncc_loss(y, x, 3)


def _reference_distance_ncc_map(fixed, warped, window, eps):
    """The distance form written out: 1 - (var_w/(var_w+eps) + var_f/(var_f+eps) - 2 cov/sqrt(..))."""
    cov, var_f, var_w = _reference_window_statistics(fixed, warped, window)
    s = var_w / (var_w + eps) + var_f / (var_f + eps) - 2 * cov / ((var_w + eps) * (var_f + eps)).sqrt()
    return 1 - s


@pytest.mark.parametrize("eps", [1e-5, 3e-2])
def test_distance_ncc_equals_its_formula_and_is_exactly_stationary_at_a_match(eps):
    """The distance form's value and analytic gradient equal autograd through the formula (masks, channels, a flat
    patch); at w = f its gradient is zero whatever eps (the squared form's is not: it moves an image registered to
    itself), and it still rewards correlation, not covariance."""
    g = torch.Generator().manual_seed(7)
    shape = (2, 2, 7, 9, 8)
    fixed = torch.rand(shape, generator=g, dtype=torch.float64)
    warped = torch.rand(shape, generator=g, dtype=torch.float64)
    warped[0, 0, :4, :4, :4] = 0.3
    mask = torch.rand(2, 1, 7, 9, 8, generator=g, dtype=torch.float64)
    for window in (3, 5):
        ref_in, ours_in = warped.clone().requires_grad_(True), warped.clone().requires_grad_(True)
        ref = -(_reference_distance_ncc_map(fixed, ref_in, window, eps) * mask).sum() / mask.expand(shape).sum()
        ours = losses.local_ncc_loss(fixed, ours_in, window, mask=mask, eps=eps, form="distance")
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
        ref.backward()
        ours.backward()
        torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-12)
        assert ours_in.grad.abs().max() > 1e-6
    x = _smooth_image((6, 7, 8), dtype=torch.float64)
    for form, stationary in (("distance", True), ("squared", False)):
        at_match = x.clone().requires_grad_(True)
        losses.local_ncc_loss(x, at_match, 3, eps=eps, form=form).backward()
        assert (at_match.grad.abs().max() < 1e-15) == stationary, (form, at_match.grad.abs().max())
    match = losses.local_ncc_loss(x, x, 3, eps=eps, form="distance")
    assert match.item() == pytest.approx(-1.0, abs=1e-12)  # the two windows are equal: distance 0
    # a positive gain is a match
    assert losses.local_ncc_loss(x, 2 * x, 3, eps=1e-9, form="distance").item() == pytest.approx(-1.0, abs=1e-4)
    assert losses.local_ncc_loss(x, -x, 3, eps=eps, form="distance") > match  # a negative correlation is no match
    assert torch.autograd.gradcheck(
        lambda t: losses.local_ncc_loss(x, t, 3, eps=eps, form="distance", reduction="none"),
        (_smooth_image((6, 7, 8), seed=3, dtype=torch.float64).requires_grad_(True),))
    with pytest.raises(ValueError, match="form"):
        losses.local_ncc_loss(x, x, 3, form="absolute")


def test_global_ncc_is_the_image_metric_negated():
    """One global NCC: the NumPy metric is the loss in float64 without eps, negated (NaN for a constant image)."""
    from deepabdominalreg.metrics.images import normalized_cross_correlation

    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(6, 7, 8, generator=g, dtype=torch.float64), torch.rand(6, 7, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 7, 8, generator=g) > 0.5
    for m in (None, mask):
        loss = losses.global_ncc_loss(a, b, mask=m, eps=0.0)
        metric = normalized_cross_correlation(a.numpy(), b.numpy(), None if m is None else m.numpy())
        assert metric == pytest.approx(-float(loss), rel=1e-12, abs=1e-15)
        va, vb = (a[m] if m is not None else a.ravel()).numpy(), (b[m] if m is not None else b.ravel()).numpy()
        assert metric == pytest.approx(float(np.corrcoef(va, vb)[0, 1]), rel=1e-12)
    assert math.isnan(float(losses.global_ncc_loss(a, torch.ones_like(a), eps=0.0)))
    grad_in = b.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: losses.global_ncc_loss(a, t, mask=mask), (grad_in,))


# ------------------------------------------------------------------------------------------------ labels


def test_one_hot_known_channels():
    labels = torch.tensor([0, 3, 5, 3, 7]).view(1, 1, 5, 1, 1)
    out = losses.one_hot(labels, [3, 5])
    assert out.shape == (1, 2, 5, 1, 1)
    assert out[0, 0, :, 0, 0].tolist() == [0, 1, 0, 1, 0]
    assert out[0, 1, :, 0, 0].tolist() == [0, 0, 1, 0, 0]
    with pytest.raises(ValueError):
        losses.one_hot(labels[:, 0], [3])


def test_dice_loss_known_overlaps():
    shape = (8, 8, 8)
    a = _cube(shape, (0, 0, 0), (4, 4, 4))
    assert losses.dice_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = _cube(shape, (4, 4, 4), (8, 8, 8))
    assert losses.dice_loss(a, disjoint).item() == pytest.approx(1.0, abs=1e-6)
    half = _cube(shape, (2, 0, 0), (6, 4, 4))  # shares half of its 64 voxels with a
    assert losses.dice_loss(a, half).item() == pytest.approx(0.5, abs=1e-6)


def test_dice_loss_ignores_absent_channels_and_has_gradient():
    shape = (8, 8, 8)
    a = torch.cat([_cube(shape, (0, 0, 0), (4, 4, 4)), torch.zeros(1, 1, *shape)], dim=1)
    assert losses.dice_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.dice_loss(a, a.clone(), ignore_empty=False).item() == pytest.approx(0.0, abs=1e-6)
    soft = (0.5 * a).requires_grad_(True)
    loss = losses.dice_loss(a, soft)
    loss.backward()
    assert loss.item() > 0 and soft.grad is not None and soft.grad.abs().sum() > 0
    # more mass on the target lowers the loss: gradient points that way
    assert soft.grad[a.bool()].mean() < 0


def test_hausdorff_dt_loss_zero_and_grows_with_distance():
    shape = (16, 16, 16)
    target = _cube(shape, (4, 4, 4), (10, 10, 10))
    assert losses.hausdorff_dt_loss(target, target).item() == pytest.approx(0.0, abs=1e-7)
    near = _cube(shape, (5, 4, 4), (11, 10, 10))
    far = _cube(shape, (7, 4, 4), (13, 10, 10))
    assert 0 < losses.hausdorff_dt_loss(target, near).item() < losses.hausdorff_dt_loss(target, far).item()
    pred = far.clone().requires_grad_(True)
    losses.hausdorff_dt_loss(target, pred).backward()
    assert pred.grad.abs().sum() > 0


def test_hausdorff_dt_loss_penalises_far_outliers_more_than_dice():
    shape = (20, 20, 20)
    target = _cube(shape, (2, 2, 2), (8, 8, 8))
    close = target.clone()
    close[0, 0, 8, 2, 2] = 1  # one stray voxel next to the object
    far = target.clone()
    far[0, 0, 18, 18, 18] = 1  # one stray voxel far away
    assert losses.dice_loss(target, close).item() == pytest.approx(losses.dice_loss(target, far).item())
    assert losses.hausdorff_dt_loss(target, far).item() > 10 * losses.hausdorff_dt_loss(target, close).item()


# ------------------------------------------------------------------------------------------------ fields


def test_inverse_consistency_translation():
    shape = (6, 6, 6)
    t = torch.tensor([0.5, -1.0, 0.25]).view(1, 3, 1, 1, 1)
    forward = t.expand(1, 3, *shape).clone()
    assert losses.inverse_consistency_loss(forward, -forward).item() == pytest.approx(0.0, abs=1e-10)
    expected = float((t**2).sum())
    assert losses.inverse_consistency_loss(forward, torch.zeros_like(forward)).item() == pytest.approx(expected)
    back = torch.zeros_like(forward).requires_grad_(True)
    losses.inverse_consistency_loss(forward, back).backward()
    assert back.grad.abs().sum() > 0


def test_supervised_displacement_loss_known_values():
    shape = (4, 4, 4)
    true = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0))
    assert losses.supervised_displacement_loss(true, true).item() == pytest.approx(0.0)
    offset = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1, 1)
    # 1 voxel along d at 2 mm spacing: 2 mm endpoint error, 4 mm² squared
    assert losses.supervised_displacement_loss(true + offset, true, spacing_mm=2.0).item() == pytest.approx(4.0)
    assert losses.supervised_displacement_loss(true + offset, true, spacing_mm=2.0, squared=False).item() == \
        pytest.approx(2.0, abs=1e-5)
    anisotropic = losses.supervised_displacement_loss(true + offset, true, spacing_mm=(3.0, 1.0, 1.0))
    assert anisotropic.item() == pytest.approx(9.0)
    mask = torch.zeros(1, 1, *shape)
    pred = true.clone()
    pred[..., 0] += 5.0
    mask[..., 1:] = 1
    assert losses.supervised_displacement_loss(pred, true, mask).item() == pytest.approx(0.0)


def test_diffusion_regulariser_known_values():
    shape = (5, 5, 5)
    translation = torch.ones(1, 3, *shape)
    assert losses.diffusion_regulariser(translation).item() == 0.0
    # disp_d = a * d: the only non-zero forward difference is a, in 1 of 3 channels, along 1 of 3 axes
    a = 0.3
    assert losses.diffusion_regulariser(_linear_field(shape, a)).item() == pytest.approx(a * a / 9, rel=1e-5)


def test_bending_energy_zero_for_affine_positive_for_curved():
    shape = (7, 7, 7)
    assert losses.bending_energy(_linear_field(shape, 0.4)).item() == pytest.approx(0.0, abs=1e-10)
    curved = torch.zeros(1, 3, *shape)
    d = torch.arange(7.0)
    curved[0, 0] = (0.1 * d**2).view(-1, 1, 1).expand(*shape)
    # second derivative of 0.1 d² is 0.2 in the interior (one of three channels; the one-sided borders give less)
    value = losses.bending_energy(curved).item()
    assert 0.5 * 0.2**2 / 3 < value <= 0.2**2 / 3 + 1e-6


def test_negative_jacobian_penalty():
    shape = (5, 5, 5)
    assert losses.negative_jacobian_penalty(torch.zeros(1, 3, *shape)).item() == 0.0
    folding = _linear_field(shape, -2.0)  # d -> -d: det J = -1 everywhere
    assert losses.negative_jacobian_penalty(folding).item() == pytest.approx(1.01, abs=1e-5)
    folding.requires_grad_(True)
    losses.negative_jacobian_penalty(folding).backward()
    assert folding.grad.abs().sum() > 0


@pytest.mark.parametrize("amplitude", [0.05, 0.8], ids=["no voxel below the margin", "some folding"])
def test_negative_jacobian_penalty_shortcut_gives_the_same_value_and_gradient(amplitude):
    """Without folding the penalty skips its autograd graph: the same (zero) value and (zero) gradient as the full
    computation, still attached to the field; with folding, the full computation."""
    g = torch.Generator().manual_seed(2)
    disp = torch.randn(1, 3, 6, 7, 5, generator=g, dtype=torch.float64) * amplitude
    ours_in, ref_in = disp.clone().requires_grad_(True), disp.clone().requires_grad_(True)
    ours = losses.negative_jacobian_penalty(ours_in)
    ref = torch.nn.functional.relu(0.01 - spatial.jacobian_determinant(ref_in)).mean()
    assert ours.requires_grad and float(ours.detach()) == float(ref.detach())
    (3.0 * ours).backward()
    (3.0 * ref).backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=0)
    assert (float(ref.detach()) == 0.0) == (amplitude < 0.1)


# ------------------------------------------------------------------------------------------------ weighting


def test_uncertainty_weighting_initial_weights_and_fixed_terms():
    uw = losses.UncertaintyWeighting({"ncc": 1.0, "dice": 2.0, "diffusion": 5e-3}, learnable={"ncc", "dice"},
                                     offsets={"ncc": 1.0})
    w = uw.weights()
    assert w["ncc"] == pytest.approx(1.0) and w["dice"] == pytest.approx(2.0) and w["diffusion"] == 5e-3
    assert set(dict(uw.named_parameters())) == {"log_variances.ncc", "log_variances.dice"}
    terms = {"ncc": torch.tensor(-0.5), "dice": torch.tensor(0.25), "diffusion": torch.tensor(2.0)}
    # 1 * (-0.5 + 1) + 0  +  2 * 0.25 - log 2  +  5e-3 * 2
    assert uw(terms).item() == pytest.approx(0.5 + 0.5 - math.log(2.0) + 0.01, abs=1e-6)
    with pytest.raises(ValueError):
        uw({"mse": torch.tensor(1.0)})


def test_uncertainty_weighting_learns_inverse_loss_weight():
    uw = losses.UncertaintyWeighting({"a": 1.0})
    optimiser = torch.optim.SGD(uw.parameters(), lr=0.1)
    for _ in range(400):
        optimiser.zero_grad()
        uw({"a": torch.tensor(4.0)}).backward()
        optimiser.step()
    # minimum of exp(-s) L + s is at s = log L: weight 1 / L
    assert uw.weights()["a"] == pytest.approx(0.25, rel=1e-3)
