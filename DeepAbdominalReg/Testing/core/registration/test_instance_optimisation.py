"""Instance optimisation: its cropped NCC equals the plain loss, it recovers a known smooth displacement, and an
image registered to itself stays exactly in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from deepabdominalreg import spatial
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.nn.losses import local_ncc_loss
from deepabdominalreg.registration.instance_optimisation import (
    InstanceOptimisationSettings,
    _BoxSampler,
    _CroppedNcc,
    instance_optimise,
)


def _blobs(shape: tuple[int, int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A smooth image of a few Gaussian blobs, ``(1, 1, D, H, W)`` in [0, 1]."""
    d, h, w = (torch.arange(n, dtype=dtype) for n in shape)
    z, y, x = torch.meshgrid(d, h, w, indexing="ij")
    image = torch.zeros(shape, dtype=dtype)
    for cz, cy, cx, r in ((0.4, 0.4, 0.5, 3.0), (0.6, 0.65, 0.35, 2.5), (0.5, 0.5, 0.75, 2.0), (0.3, 0.7, 0.6, 2.0)):
        image += torch.exp(-(((z - cz * shape[0]) ** 2 + (y - cy * shape[1]) ** 2 + (x - cx * shape[2]) ** 2)
                             / (2 * r * r)))
    return (image / image.max())[None, None]


def test_cropped_ncc_equals_local_ncc_on_the_whole_grid_value_and_gradient():
    """On the mask's bounding box (channels in grid_sample's order) it is local_ncc_loss of the warped image."""
    shape = (14, 16, 18)
    fixed, moving = _blobs(shape, torch.float64), _blobs(shape, torch.float64).roll(1, dims=4)
    mask = torch.zeros(1, 1, *shape, dtype=torch.bool)
    mask[..., 4:9, 3:13, 7:16] = True  # its box grown by the window stays inside the grid on some sides only
    g = torch.Generator().manual_seed(0)
    disp = torch.randn(1, 3, *shape, generator=g, dtype=torch.float64) * 0.7
    ncc = _CroppedNcc(fixed, moving, mask, window=3, eps=1e-2)
    assert ncc.box != tuple(slice(0, s) for s in shape)
    ours_in, ref_in = disp.clone().requires_grad_(True), disp.clone().requires_grad_(True)
    ours = ncc(ours_in[(slice(None), slice(None), *ncc.box)].flip(1))
    ref = local_ncc_loss(fixed, spatial.warp(moving, ref_in), window=3, mask=mask, eps=1e-2, form="distance")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("transform", "bending_weight"), [("trilinear", 0.0), ("bspline", 10.0)])
def test_instance_optimisation_recovers_a_smooth_displacement_and_keeps_its_inputs(transform, bending_weight):
    """Both parameterisations recover a smooth field on a textured 1 mm pair (the B-spline with a bending weight
    suited to this field's small scale: the default's 100 mm^2 is chosen on 3 mm abdominal CT)."""
    shape = (24, 26, 28)
    g = torch.Generator().manual_seed(1)
    fixed = spatial.box_filter(spatial.box_filter(torch.rand(1, 1, *shape, generator=g), 3), 3)  # smooth texture
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    d, h, w = (torch.linspace(0, 1, n) for n in shape)
    z, y, _ = torch.meshgrid(d, h, w, indexing="ij")
    truth = torch.stack([1.5 * torch.sin(torch.pi * y), 1.0 + 0.0 * z, -1.2 * torch.sin(torch.pi * z)])[None]
    # moving sampled at p + truth(p) gives fixed: moving = fixed warped by the inverse of truth
    moving = spatial.warp(fixed, spatial.invert_displacement(truth))
    mask = torch.ones_like(fixed, dtype=torch.bool)
    inputs = [t.clone() for t in (fixed, moving, mask)]
    # 1 mm voxels, the default lengths scaled from 3 mm: 0.5 voxel steps, control points 2 voxels apart, a 5-voxel
    # NCC window, a gradient floor of 0.1 voxel
    config = RegistrationConfig(io_levels=(2, 1), io_iterations=60, io_fine_iterations=60, io_learning_rate_mm=0.5,
                                io_control_spacing_mm=2.0, io_ncc_window_mm=5.0, io_gradient_floor_mm=0.1,
                                io_transform=transform,
                                io_bending_weight=bending_weight)
    settings = InstanceOptimisationSettings.from_config(config, working_spacing_mm=1.0)
    found = instance_optimise(fixed, moving, None, mask, settings=settings)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    error_before = truth[inner].norm(dim=1).mean()
    error_after = (found - truth)[inner].norm(dim=1).mean()
    assert error_after < 0.25 * error_before, (float(error_before), float(error_after))
    for before, after in zip(inputs, (fixed, moving, mask)):
        assert torch.equal(before, after)


def test_box_sampler_is_exact_at_zero_displacement_and_keeps_the_gradient():
    """grid_sample at a voxel's own coordinates is off by float rounding; the sampler returns the voxels exactly
    (what makes an image registered to itself stay in place) and its gradient is grid_sample's."""
    moving = _blobs((13, 17, 19))
    box = (slice(2, 11), slice(0, 17), slice(3, 15))
    sampler = _BoxSampler(moving, box, "zeros")
    zero = torch.zeros(1, 3, 9, 17, 12, requires_grad=True)
    assert torch.equal(sampler(zero), moving[(slice(None), slice(None), *box)])
    sampler(zero).sum().backward()
    base, scale = sampler.base, sampler.scale
    reference = zero.detach().clone().requires_grad_(True)
    F.grid_sample(moving, torch.addcmul(base, reference.permute(0, 2, 3, 4, 1), scale), align_corners=True).sum() \
        .backward()
    torch.testing.assert_close(zero.grad, reference.grad)


@pytest.mark.parametrize("similarity", ["ncc", "mind"])
@pytest.mark.parametrize("transform", ["trilinear", "bspline", "svf"])
def test_an_image_registered_to_itself_stays_exactly_in_place(transform, similarity):
    """Identical inputs give a zero displacement (up to float rounding: 1e-6 voxels is 3 nm), not a drift of
    rounding amplified by Adam, with and without a mask, whatever the parameterisation and the similarity."""
    g = torch.Generator().manual_seed(2)
    image = spatial.box_filter(torch.rand(1, 1, 20, 22, 24, generator=g), 3)
    image = image + 0.02 * torch.rand(image.shape, generator=g)  # noise: gradients of rounding everywhere
    mask = torch.zeros_like(image, dtype=torch.bool)
    mask[..., 3:17, 4:20, 2:21] = True
    config = RegistrationConfig(io_levels=(2, 1), io_iterations=30, io_fine_iterations=30, io_transform=transform,
                                io_similarity=similarity)
    settings = InstanceOptimisationSettings.from_config(config, working_spacing_mm=3.0)
    for m in (mask, None):
        found = instance_optimise(image, image.clone(), None, m, settings=settings)
        assert found.abs().max() < 1e-6, (m is None, float(found.abs().max()))


@pytest.mark.parametrize(("n", "knot_voxels"), [(36, 1.2), (40, 2.0), (25, 3.7)])
def test_the_b_spline_start_fit_stays_bounded_and_the_level_field_keeps_the_start(n, knot_voxels):
    """The control points past the last voxel barely touch the grid: a plain least-squares fit of a smooth start
    gave them thousands of voxels (and the level then folded).  The ridge fit keeps every control value near the
    field's size, and the level field (fit + residual) is the start exactly."""
    from deepabdominalreg.registration.instance_optimisation import _BSplineBasis, _LevelField

    shape = (n, n - 3, n + 2)
    basis = _BSplineBasis(shape, (knot_voxels,) * 3, knot_voxels * knot_voxels, torch.device("cpu"), torch.float32)
    d, h, w = (torch.linspace(0, 1, s) for s in shape)
    z, y, x = torch.meshgrid(d, h, w, indexing="ij")
    start = torch.stack([1.0 + 0.5 * torch.sin(3 * y), 0.8 * x * z, -0.6 + 0.0 * x])[None]
    control = basis.fit(start)
    assert control.abs().max() < 3 * start.abs().max(), float(control.abs().max())
    field = _LevelField(basis.upsampler(), basis.upsampler(tuple(slice(0, s) for s in shape)),
                        (slice(None), slice(None), *(slice(0, s) for s in shape)),
                        residual=start - basis.upsampler()(control))
    torch.testing.assert_close(field(control), start, rtol=0, atol=1e-5)


def test_the_symmetric_svf_gives_the_inverse_when_the_inputs_are_swapped():
    """With ``symmetric`` the loss for (b, a) at ``-v`` is the loss for (a, b) at ``v`` and Adam is sign-equivariant,
    so the two runs' transforms are inverses up to the scaling and squaring's error: the round trip stays below
    0.02 voxel (measured 0.003 mean, 0.007 max) where the plain svf's is ~0.15 (max 0.5)."""
    g = torch.Generator().manual_seed(3)
    shape = (24, 28, 26)
    a = spatial.box_filter(spatial.box_filter(torch.rand(1, 1, *shape, generator=g), 3), 3)
    a = (a - a.min()) / (a.max() - a.min())
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    b = spatial.warp(a, torch.stack([1.5 * torch.sin(y / 6), 1.2 * torch.cos(x / 7), torch.sin(z / 5)])[None])
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    round_trip = {}
    for symmetric in (False, True):
        config = RegistrationConfig(io_levels=(2, 1), io_iterations=60, io_fine_iterations=60, io_transform="svf",
                                    io_symmetric=symmetric, io_jacobian_weight=0.0, io_ncc_window_mm=15.0,
                                    io_control_spacing_mm=6.0)
        settings = InstanceOptimisationSettings.from_config(config, 3.0)
        forward = instance_optimise(a, b, None, None, settings=settings)
        backward = instance_optimise(b, a, None, None, settings=settings)
        assert float(forward.abs().max()) > 0.5  # it registered
        round_trip[symmetric] = spatial.compose(backward, forward)[inner].norm(dim=1)
        if symmetric:
            assert float(instance_optimise(a, a.clone(), None, None, settings=settings).abs().max()) < 1e-6
    assert float(round_trip[True].max()) < 0.02 and float(round_trip[False].mean()) > 5 * float(round_trip[True].mean())
    with pytest.raises(ValueError, match="io_symmetric needs io_transform='svf'"):
        RegistrationConfig(io_symmetric=True)
