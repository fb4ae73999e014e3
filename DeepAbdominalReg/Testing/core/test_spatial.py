"""Spatial transformer, composition, integration, inversion and Jacobian: known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from deepabdominalreg import spatial


def _smooth_field(shape=(12, 14, 16), amplitude=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 3, 3, 3, generator=g, dtype=torch.float64) * amplitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_identity_warp_is_exact():
    image = torch.rand(1, 2, 9, 10, 11, dtype=torch.float64)
    out = spatial.warp(image, torch.zeros(1, 3, 9, 10, 11, dtype=torch.float64))
    torch.testing.assert_close(out, image, atol=1e-12, rtol=0)


def test_integer_translation_is_exact_per_axis():
    image = torch.rand(1, 1, 8, 9, 10, dtype=torch.float64)
    for axis in range(3):
        disp = torch.zeros(1, 3, 8, 9, 10, dtype=torch.float64)
        disp[:, axis] = 2.0
        out = spatial.warp(image, disp)
        src = [slice(None)] * 5
        dst = [slice(None)] * 5
        src[2 + axis] = slice(2, None)
        dst[2 + axis] = slice(0, -2)
        torch.testing.assert_close(out[tuple(dst)], image[tuple(src)], atol=1e-12, rtol=0)


def test_compose_with_inverse_translation_is_identity():
    disp = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    disp[:, 1] = 1.25
    composed = spatial.compose(-disp, disp)
    torch.testing.assert_close(composed[:, :, 2:-2, 2:-2, 2:-2], torch.zeros_like(composed[:, :, 2:-2, 2:-2, 2:-2]))


def test_jacobian_of_uniform_scaling_is_s_cubed():
    s = 1.2
    grid = spatial.identity_grid((10, 11, 12), dtype=torch.float64)
    det = spatial.jacobian_determinant((s - 1.0) * grid)
    torch.testing.assert_close(det, torch.full_like(det, s**3), atol=1e-12, rtol=0)


def test_jacobian_of_general_linear_field_matches_determinant():
    a = torch.tensor([[0.1, 0.2, -0.05], [0.0, -0.15, 0.1], [0.3, 0.05, 0.2]], dtype=torch.float64)
    grid = spatial.identity_grid((9, 9, 9), dtype=torch.float64)
    disp = torch.einsum("ij,bjdhw->bidhw", a, grid)
    det = spatial.jacobian_determinant(disp)
    expected = torch.det(torch.eye(3, dtype=torch.float64) + a)
    torch.testing.assert_close(det, torch.full_like(det, float(expected)), atol=1e-12, rtol=0)


def test_scaling_and_squaring_of_translation_velocity_is_that_translation():
    vel = torch.zeros(1, 3, 10, 10, 10, dtype=torch.float64)
    vel[:, 2] = 0.8
    disp = spatial.integrate_velocity(vel, steps=6)
    torch.testing.assert_close(disp[:, :, 2:-2, 2:-2, 2:-2], vel[:, :, 2:-2, 2:-2, 2:-2], atol=1e-10, rtol=0)


def test_integrated_smooth_velocity_does_not_fold():
    vel = _smooth_field(amplitude=3.0)
    disp = spatial.integrate_velocity(vel, steps=7)
    assert spatial.jacobian_determinant(disp).min() > 0


def test_inverse_of_smooth_field_composes_to_identity():
    disp = _smooth_field(shape=(20, 20, 20), amplitude=0.8)
    inv = spatial.invert_displacement(disp, iterations=40)
    margin = int(disp.abs().max().ceil()) + 1  # points that map outside the grid have no inverse there
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin), slice(margin, -margin))
    # disp(q + inv(q)) = -inv(q) holds exactly at grid points (the fixed point that was solved for)
    assert spatial.compose(disp, inv)[inner].abs().max() < 1e-6
    # the other order samples inv between grid points: interpolation error only
    assert spatial.compose(inv, disp)[inner].abs().max() < 0.1


def test_resize_displacement_rescales_vectors():
    disp = torch.zeros(1, 3, 5, 5, 5, dtype=torch.float64)
    disp[:, 0] = 1.0  # one coarse voxel along d
    fine = spatial.resize_displacement(disp, (9, 9, 9))
    torch.testing.assert_close(fine[:, 0], torch.full_like(fine[:, 0], 2.0))
    torch.testing.assert_close(fine[:, 1:], torch.zeros_like(fine[:, 1:]))


def test_warp_gradcheck_float64():
    image = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64)
    disp = (torch.rand(1, 3, 4, 4, 4, dtype=torch.float64) - 0.5) * 0.6
    disp.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d: spatial.warp(image, d), (disp,), eps=1e-6, atol=1e-4)


def test_coarse_to_fine_inverse_matches_the_full_resolution_fixed_point():
    torch.manual_seed(0)
    coarse = torch.randn(1, 3, 6, 7, 8, dtype=torch.float64) * 0.15
    disp = spatial.resize_displacement(coarse, (21, 25, 29))  # smooth, like instance optimisation's fields
    full = spatial.invert_displacement(disp, iterations=60)
    fast = spatial.invert_displacement(disp, iterations=60, tolerance=1e-6, coarse_factor=2, fine_iterations=30)
    assert (fast - full).abs().max() < 1e-3
    assert spatial.compose(disp, fast).abs().mean() < 1e-3  # disp(q + inv(q)) = -inv(q)


@pytest.mark.parametrize("control, shape", [((5, 4, 6), (9, 7, 11)), ((1, 3, 2), (4, 5, 3)), ((3, 3, 3), (3, 3, 3))])
def test_control_upsampler_equals_trilinear_interpolation_forward_and_backward(control, shape):
    """Instance optimisation's separable upsampling is F.interpolate(trilinear, align_corners=True)."""
    from deepabdominalreg.registration.instance_optimisation import _ControlUpsampler

    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, *control, generator=g, dtype=torch.float64)
    weight = torch.rand(2, 3, *shape, generator=g, dtype=torch.float64)
    ours_in, ref_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = _ControlUpsampler(control, shape, x.device, x.dtype)(ours_in)
    ref = F.interpolate(ref_in, size=shape, mode="trilinear", align_corners=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    (ours * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-12)
    # on a sub-box: that part of the same interpolation
    box = (slice(1, shape[0]), slice(0, max(1, shape[1] - 2)), slice(shape[2] // 2, shape[2]))
    cropped = _ControlUpsampler(control, shape, x.device, x.dtype, box=box)(x)
    torch.testing.assert_close(cropped, ref.detach()[(slice(None), slice(None), *box)], rtol=0, atol=1e-12)


def test_inverse_stops_voxel_by_voxel_and_iterates_only_the_voxels_still_moving(monkeypatch):
    """With a tolerance, voxels stop on their own; once few are moving only they are resampled (point sampling),
    which must give the values the dense iteration gives."""
    torch.manual_seed(1)
    coarse = torch.randn(1, 3, 5, 6, 5, dtype=torch.float64) * 0.1
    coarse[..., 2, 3, 2] *= 3.0  # a region of larger gradients, which converges more slowly than the rest
    disp = spatial.resize_displacement(coarse, (19, 23, 17))
    assert spatial.jacobian_determinant(disp).min() > 0.2  # invertible
    sampled_points = []
    original = spatial._sample_border

    def recording(field, location):
        sampled_points.append(location[0, ..., 0].numel())
        return original(field, location)

    monkeypatch.setattr(spatial, "_sample_border", recording)
    converged = spatial.invert_displacement(disp, iterations=200)
    stopped = spatial.invert_displacement(disp, iterations=200, tolerance=1e-7)
    assert sampled_points and min(sampled_points) < 0.05 * disp[0, 0].numel()  # the sparse path ran
    assert (stopped - converged).abs().max() < 1e-6
    assert spatial.compose(disp, stopped).abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------ box filter


@pytest.mark.parametrize("window", [1, 3, 5, 9])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_box_filter_equals_average_pooling_forward_and_backward(window, count_include_pad):
    """The one box filter (sums of shifted slices, its adjoint as backward pass) is ``avg_pool3d`` with zero
    padding, the border means divided by window³ or by the neighbours inside; also for axes shorter than it."""
    g = torch.Generator().manual_seed(window)
    x = torch.rand(2, 3, 7, 11, 10, generator=g, dtype=torch.float64)
    weight = torch.rand(x.shape, generator=g, dtype=torch.float64)
    ours_in, ref_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = spatial.box_filter(ours_in, window, count_include_pad=count_include_pad)
    kernel = torch.ones((3, 1, window, window, window), dtype=torch.float64)
    sums = F.conv3d(ref_in, kernel, padding=window // 2, groups=3)  # zero padding: any size
    counts = F.conv3d(torch.ones_like(x[:, :1]), kernel[:1], padding=window // 2)
    ref = sums / (window**3 if count_include_pad else counts)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    (ours * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-12)
    assert torch.equal(x, ours_in.detach())  # the input is not modified
    with torch.no_grad():  # the path without autograd gives the same values
        assert torch.equal(spatial.box_filter(x, window, count_include_pad), ours.detach())
    if window == 3:
        pooled = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=count_include_pad)
        torch.testing.assert_close(ours.detach(), pooled, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [3, 5])
def test_box_filter_equals_scipy_uniform_filter(window):
    """Against an independent implementation: ``scipy.ndimage.uniform_filter`` with zero padding (``mode="constant"``)
    is the mean with the padding counted."""
    from scipy import ndimage

    x = torch.rand(1, 2, 9, 6, 11, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = ndimage.uniform_filter(x.numpy(), size=(1, 1, window, window, window), mode="constant", cval=0.0)
    torch.testing.assert_close(spatial.box_filter(x, window), torch.from_numpy(expected), rtol=0, atol=1e-12)


def test_box_filter_gradcheck_and_checks():
    x = torch.rand(1, 2, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    for count_include_pad in (True, False):
        assert torch.autograd.gradcheck(lambda v, count=count_include_pad: spatial.box_filter(v, 3, count), (x,))
    with pytest.raises(ValueError):
        spatial.box_filter(x, 4)
    with pytest.raises(ValueError):
        spatial.box_filter(x[0], 3)


@pytest.mark.parametrize("slab_elements", [1, 60, 10**12], ids=["one slice per slab", "a few slices", "one piece"])
def test_box_filter_in_slabs_is_bit_identical(monkeypatch, slab_elements):
    """On a CPU the box filter runs slab by slab along D (cache blocking): the same numbers bit for bit, for windows
    wider than the axis, axes of size 1 and 2 and a last slab shorter than the others."""
    g = torch.Generator().manual_seed(9)
    for shape, window in [((1, 3, 11, 6, 7), 5), ((2, 2, 9, 1, 3), 3), ((1, 1, 3, 4, 4), 9), ((1, 27, 7, 5, 6), 3)]:
        x = torch.rand(shape, generator=g)
        for count_include_pad in (True, False):
            monkeypatch.setattr(spatial, "_BOX_SLAB_ELEMENTS", 10**12)
            whole = spatial.box_filter(x, window, count_include_pad)
            monkeypatch.setattr(spatial, "_BOX_SLAB_ELEMENTS", slab_elements)
            assert torch.equal(spatial.box_filter(x, window, count_include_pad), whole)


# ------------------------------------------------------------------------------------------------ Jacobian


@pytest.mark.parametrize("amplitude", [0.05, 0.8], ids=["smooth", "folding"])
def test_jacobian_with_and_without_autograd_agree_bit_for_bit(amplitude):
    """The in-place path (no autograd: the metrics' slabs, the folding count) and the autograd path (the penalty) are
    one formula: the same values bit for bit, in float32 and float64, for spacing and for an oblique axis matrix."""
    g = torch.Generator().manual_seed(3)
    oblique = [[0.9, -0.3, 0.0], [0.25, 1.1, 0.1], [0.0, 0.05, 0.5]]
    for dtype in (torch.float32, torch.float64):
        disp = (torch.randn(2, 3, 6, 7, 5, generator=g, dtype=torch.float64) * amplitude).to(dtype)
        for kwargs in ({}, {"spacing": (2.5, 0.7, 0.8)}, {"axis_matrix": oblique}):
            with torch.no_grad():
                in_place = spatial.jacobian_determinant(disp, **kwargs)
            with_grad = spatial.jacobian_determinant(disp.clone().requires_grad_(True), **kwargs)
            assert with_grad.requires_grad
            assert torch.equal(in_place, with_grad.detach()), kwargs
    with pytest.raises(ValueError):
        spatial.jacobian_determinant(torch.zeros(1, 3, 1, 4, 4))


def test_jacobian_axis_matrix_gives_the_physical_determinant_of_an_oblique_grid():
    """With ``axis_matrix`` the derivatives are physical: a numpy reference (``np.gradient`` per index axis, then
    ``d index / d x``) on a rotated anisotropic grid, with channels the physical components."""
    import numpy as np

    rng = np.random.default_rng(0)
    angle = 0.4
    direction = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
    spacing = np.array([0.8, 1.1, 2.5])  # index axes i, j, k = array axes x, y, z
    u = rng.standard_normal((6, 7, 8, 3)) * 0.3  # (z, y, x, components x y z), mm
    d_index_d_x = np.linalg.inv(direction @ np.diag(spacing))
    grads = np.stack([np.gradient(u, axis=axis) for axis in (2, 1, 0)], axis=-1)  # (..., component, index)
    expected = np.linalg.det(np.eye(3) + grads @ d_index_d_x)
    disp = torch.from_numpy(np.ascontiguousarray(np.moveaxis(u, -1, 0)))[None]
    det = spatial.jacobian_determinant(disp, axis_matrix=d_index_d_x[::-1].tolist())
    torch.testing.assert_close(det[0], torch.from_numpy(expected), rtol=0, atol=1e-12)
    # an axis-aligned grid: the matrix diag(1 / spacing) and ``spacing`` agree
    by_spacing = spatial.jacobian_determinant(disp, spacing=(2.5, 1.1, 0.8))
    by_matrix = spatial.jacobian_determinant(disp, axis_matrix=[[1 / 2.5, 0, 0], [0, 1 / 1.1, 0], [0, 0, 1 / 0.8]])
    torch.testing.assert_close(by_spacing, by_matrix, rtol=0, atol=1e-12)


def test_scaling_and_squaring_runs_in_float64():
    """Scaling and squaring keeps float64 (the synthetic motion integrates in float64) and agrees with float32."""
    vel = _smooth_field(amplitude=2.0)
    disp64 = spatial.integrate_velocity(vel, steps=6)
    disp32 = spatial.integrate_velocity(vel.float(), steps=6)
    assert disp64.dtype == torch.float64
    torch.testing.assert_close(disp32.double(), disp64, rtol=0, atol=1e-4)
    # an exact known answer in float64: a translation velocity is that translation inside
    translation = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    translation[:, 0] = 0.3
    torch.testing.assert_close(spatial.integrate_velocity(translation, 5)[:, :, 1:-1, 1:-1, 1:-1],
                               translation[:, :, 1:-1, 1:-1, 1:-1], rtol=0, atol=1e-13)
