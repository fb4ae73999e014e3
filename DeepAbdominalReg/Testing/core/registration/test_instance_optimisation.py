"""Instance optimisation: its cropped NCC equals the plain loss, and it recovers a known smooth displacement."""

from __future__ import annotations

import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.nn.losses import local_ncc_loss
from deepabdominalreg.registration.instance_optimisation import (
    InstanceOptimisationSettings,
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
    ncc = _CroppedNcc(fixed, moving, mask, window=3)
    assert ncc.box != tuple(slice(0, s) for s in shape)
    ours_in, ref_in = disp.clone().requires_grad_(True), disp.clone().requires_grad_(True)
    ours = ncc(ours_in[(slice(None), slice(None), *ncc.box)].flip(1))
    ref = local_ncc_loss(fixed, spatial.warp(moving, ref_in), window=3, mask=mask)
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
    # 1 mm voxels: 0.5 voxel steps, control points 2 voxels apart, a 5-voxel NCC window
    config = RegistrationConfig(io_levels=(2, 1), io_iterations=60, io_fine_iterations=60, io_learning_rate_mm=0.5,
                                io_control_spacing_mm=2.0, io_ncc_window_mm=5.0, io_transform=transform,
                                io_bending_weight=bending_weight)
    settings = InstanceOptimisationSettings.from_config(config, working_spacing_mm=1.0)
    found = instance_optimise(fixed, moving, None, mask, settings=settings)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    error_before = truth[inner].norm(dim=1).mean()
    error_after = (found - truth)[inner].norm(dim=1).mean()
    assert error_after < 0.25 * error_before, (float(error_before), float(error_after))
    for before, after in zip(inputs, (fixed, moving, mask)):
        assert torch.equal(before, after)
