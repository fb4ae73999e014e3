"""The instance optimisation's cubic B-spline: its basis against scipy, its bending energy against the analytic
value, its registration of a known smooth displacement, a Jacobian without control-cell steps, and the same field
(in mm) at two working spacings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.nn.losses import BSplineBendingEnergy, bending_energy
from deepabdominalreg.registration.instance_optimisation import (
    InstanceOptimisationSettings,
    _BSplineBasis,
    instance_optimise,
)
from scipy.interpolate import BSpline, NdBSpline


def _scipy_knots(n_control: int, knot_spacing: float) -> np.ndarray:
    """scipy's knot vector of our basis: control ``j`` centred on voxel ``(j - 1) * knot_spacing``."""
    return (np.arange(n_control + 4) - 3.0) * knot_spacing


@pytest.mark.parametrize("shape, knots", [((9, 12, 17), (2.0, 3.0, 4.5)), ((5, 6, 7), (1.0, 0.75, 6.0))])
def test_bspline_upsampling_equals_scipy_tensor_product_bspline(shape, knots):
    """The separable upsampling of a random control grid is scipy's tensor-product cubic B-spline (NdBSpline), its
    values and its first derivatives (the Jacobian's ingredients)."""
    # knots of 1 mm on voxels of 1 / k mm: k voxels apart along each axis
    basis = _BSplineBasis(shape, tuple(1.0 / k for k in knots), 1.0, torch.device("cpu"), torch.float64)
    np.testing.assert_allclose(basis.knots, knots, rtol=1e-12)
    g = torch.Generator().manual_seed(3)
    control = torch.randn(1, 2, *basis.cshape, generator=g, dtype=torch.float64)
    ours = basis.upsampler()(control)[0].numpy()
    t = tuple(_scipy_knots(n, k) for n, k in zip(basis.cshape, knots))
    points = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij"), -1).reshape(-1, 3)
    for c in range(2):
        reference = NdBSpline(t, control[0, c].numpy(), 3)
        np.testing.assert_allclose(ours[c].reshape(-1), reference(points), rtol=0, atol=1e-12)
        for axis in range(3):
            nu = [0, 0, 0]
            nu[axis] = 1
            matrices = list(basis.matrices)
            matrices[axis] = spatial.bspline_basis_matrix(shape[axis], knots[axis], basis.cshape[axis], 1)
            derivative = np.einsum("ai,bj,ck,ijk->abc", *(m.numpy() for m in matrices), control[0, c].numpy())
            np.testing.assert_allclose(derivative.reshape(-1), reference(points, nu=nu), rtol=0, atol=1e-11)


def test_bspline_basis_and_its_derivatives_match_scipy_in_1d():
    n, k = 23, 3.7
    m = spatial.bspline_control_size(n, k)
    c = np.random.default_rng(0).normal(size=m)
    spline = BSpline(_scipy_knots(m, k), c, 3)
    x = np.linspace(0, n - 1, 101)
    for order in range(3):
        ours = spatial.bspline_basis_matrix(torch.as_tensor(x), k, m, order).numpy() @ c
        np.testing.assert_allclose(ours, spline.derivative(order)(x) if order else spline(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(spatial.bspline_basis_matrix(n, k).sum(1).numpy(), 1.0, rtol=0, atol=1e-14)


def _fit(basis: _BSplineBasis, field: torch.Tensor) -> torch.Tensor:
    """The exact control values of a field the spline represents (plain least squares: the basis's own fit is
    ridge-regularised, a start rather than an interpolation)."""
    from deepabdominalreg.registration.instance_optimisation import _ControlUpsampler

    exact = _ControlUpsampler(basis.shape, basis.cshape, field.device, field.dtype,
                              matrices=tuple(torch.linalg.pinv(m) for m in basis.matrices))
    control = exact(field)
    torch.testing.assert_close(basis.upsampler()(control), field, rtol=0, atol=1e-9)  # reproduced exactly
    return control


def test_bending_energy_is_zero_for_affine_and_exact_for_a_quadratic_in_mm():
    """Anisotropic voxels (mm): an affine field has no bending energy; ``u_w = a x_mm²`` (x along d) has
    ``(d² u / dx²)² = 4 a²`` everywhere, whatever the knots and the voxel size."""
    shape, spacing = (11, 13, 9), (2.5, 1.5, 3.0)
    extent = [(n - 1) * h for n, h in zip(shape, spacing)]
    for knot_mm in (4.0, 7.5):
        basis = _BSplineBasis(shape, spacing, knot_mm, torch.device("cpu"), torch.float64)
        z, y, x = (torch.arange(n, dtype=torch.float64) * h for n, h in zip(shape, spacing))
        zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
        affine_mm = torch.stack([0.1 * xx - 0.05 * yy + 2, 0.02 * zz + 0.07 * xx, -0.03 * yy + 0.01 * zz - 1])[None]
        to_vox = torch.tensor(spacing, dtype=torch.float64).view(1, 3, 1, 1, 1)
        control = _fit(basis, affine_mm / to_vox)
        assert abs(float(basis.bending(control))) < 1e-12
        a = 0.003  # 1/mm
        quadratic_mm = torch.zeros(1, 3, *shape, dtype=torch.float64)
        quadratic_mm[0, 2] = a * (zz - extent[0] / 2) ** 2
        control = _fit(basis, quadratic_mm / to_vox)
        assert float(basis.bending(control)) == pytest.approx(4 * a * a, rel=1e-9)


def test_bending_energy_matches_finite_differences_of_the_dense_field():
    """The exact quadratic form equals the second differences of the densely sampled field (to discretisation)."""
    shape, spacing = (12, 10, 14), (2.0, 2.0, 2.0)
    basis = _BSplineBasis(shape, spacing, 8.0, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(2)
    control = torch.randn(1, 3, *basis.cshape, generator=g, dtype=torch.float64)
    exact = float(basis.bending(control))
    # the same field sampled 4x finer in each direction (voxels of 0.5 mm), its derivatives by central differences
    fine = _BSplineBasis(tuple(4 * (n - 1) + 1 for n in shape), (0.5, 0.5, 0.5), 8.0, torch.device("cpu"),
                         torch.float64)
    assert fine.cshape == basis.cshape
    dense_mm = fine.upsampler()(control * 2.0)  # control values of 2 mm voxels -> mm
    # bending_energy: voxel units of the fine grid (0.5 mm), the mean over the 3 channels too; one-sided
    # differences at the border, hence the tolerance
    approx = 3 * float(bending_energy(dense_mm)) / 0.5 ** 4
    assert approx == pytest.approx(exact, rel=0.1)
    assert float(BSplineBendingEnergy(shape, basis.knots, spacing, dtype=torch.float64)(control)) == exact


def _smooth_pair(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    fixed = spatial.box_filter(spatial.box_filter(torch.rand(1, 1, *shape, generator=g), 3), 3)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    d, h, w = (torch.linspace(0, 1, n) for n in shape)
    z, y, _ = torch.meshgrid(d, h, w, indexing="ij")
    truth = torch.stack([1.5 * torch.sin(torch.pi * y), 1.0 + 0.0 * z, -1.2 * torch.sin(torch.pi * z)])[None]
    moving = spatial.warp(fixed, spatial.invert_displacement(truth))
    return fixed, moving, truth


def _register(fixed, moving, **changes):
    values = {"io_levels": (2, 1), "io_iterations": 60, "io_fine_iterations": 60, "io_learning_rate_mm": 0.5,
              "io_control_spacing_mm": 4.0, "io_ncc_window_mm": 5.0, "io_bending_weight": 1.0}
    values.update(changes)
    settings = InstanceOptimisationSettings.from_config(RegistrationConfig(**values), working_spacing_mm=1.0)
    return instance_optimise(fixed, moving, None, torch.ones_like(fixed, dtype=torch.bool), settings=settings)


@pytest.mark.parametrize("transform, similarity", [("bspline", "ncc"), ("svf", "ncc"), ("bspline", "mind")])
def test_bspline_and_svf_recover_a_known_smooth_displacement(transform, similarity):
    fixed, moving, truth = _smooth_pair((24, 26, 28))
    found = _register(fixed, moving, io_transform=transform, io_similarity=similarity, io_mind_radius_mm=1.0,
                      io_mind_dilation_mm=2.0)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    error_before = truth[inner].norm(dim=1).mean()
    error_after = (found - truth)[inner].norm(dim=1).mean()
    assert error_after < 0.15 * error_before, (float(error_before), float(error_after))
    assert float(spatial.jacobian_determinant(found).min()) > 0.3


def _largest_jump(det: torch.Tensor) -> float:
    """Largest change of det J between neighbouring voxels (away from the border)."""
    inner = det[0, 3:-3, 3:-3, 3:-3]
    return max(float(inner.diff(dim=a).abs().max()) for a in range(3))


def test_bspline_jacobian_has_no_control_cell_steps():
    """Trilinear between control points, det J jumps at every control-cell face; the C² B-spline's varies
    smoothly (on the same pair, the same similarity, a similar accuracy)."""
    fixed, moving, _ = _smooth_pair((24, 26, 28))
    trilinear = _register(fixed, moving, io_transform="trilinear", io_control_spacing_mm=3.0, io_smoothness_weight=0.5)
    bspline = _register(fixed, moving, io_transform="bspline", io_control_spacing_mm=3.0, io_bending_weight=1.0)
    jump_trilinear = _largest_jump(spatial.jacobian_determinant(trilinear))
    jump_bspline = _largest_jump(spatial.jacobian_determinant(bspline))
    assert jump_bspline < 0.35 * jump_trilinear, (jump_bspline, jump_trilinear)


def _analytic_pair(spacing_mm: float, extent_mm: float = 60.0):
    """A textured image and its deformed copy sampled analytically on a grid of ``spacing_mm`` (origin 0), and the true
    displacement in mm (channels d, h, w)."""
    n = round(extent_mm / spacing_mm) + 1
    x = torch.arange(n, dtype=torch.float64) * spacing_mm
    z, y, w = torch.meshgrid(x, x, x, indexing="ij")

    def image(z, y, w):
        # plane waves of 18-30 mm wavelength in several directions: texture everywhere, smooth at 3 mm voxels
        out = torch.zeros_like(z)
        g = torch.Generator().manual_seed(4)
        for _ in range(8):
            direction = torch.randn(3, generator=g, dtype=torch.float64)
            k = direction / direction.norm() * 2 * torch.pi / (18.0 + 12.0 * torch.rand(1, generator=g).item())
            out = out + torch.cos(k[0] * z + k[1] * y + k[2] * w + 6.28 * torch.rand(1, generator=g).item())
        return out

    truth = torch.stack([2.0 * torch.sin(torch.pi * y / extent_mm), 1.0 + 0 * z,
                         -1.5 * torch.sin(torch.pi * z / extent_mm)])
    fixed = image(z, y, w)
    # moving(p + u(p)) = fixed(p): moving(q) = fixed(q - u(q)) to first order (the pair is the same at every spacing)
    moving = image(z - truth[0], y - truth[1], w - truth[2])
    return fixed[None, None].float(), moving[None, None].float(), truth


@pytest.mark.parametrize("transform", ["bspline", "svf"])
def test_the_same_pair_at_two_working_spacings_gives_the_same_field_in_mm(transform):
    """Knots, bending energy and steps in mm: the field found at 3 mm and at 1 mm working voxels agrees at their
    common points to within 0.15 mm on average (the motion: ~2 mm; a 9 mm NCC window at both, 3 and 9 voxels; one
    level, as the pyramid's smoothing is in working voxels)."""
    fields = []
    for spacing in (3.0, 1.0):
        fixed, moving, truth = _analytic_pair(spacing)
        config = RegistrationConfig(io_levels=(1,), io_fine_iterations=80,
                                    io_learning_rate_mm=0.6, io_control_spacing_mm=12.0, io_ncc_window_mm=9.0,
                                    io_transform=transform, io_bending_weight=5.0)
        settings = InstanceOptimisationSettings.from_config(config, working_spacing_mm=spacing)
        found = instance_optimise(fixed, moving, None, None, settings=settings)
        fields.append((found.double() * spacing, truth))
    (coarse, truth), (fine, _) = fields
    fine = fine[:, :, ::3, ::3, ::3]
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    difference = (coarse - fine)[inner].norm(dim=1).mean()
    error = (coarse[0] - truth)[inner[1:]].norm(dim=0).mean()
    assert error < 0.5 * truth[inner[1:]].norm(dim=0).mean()
    assert difference < 0.15, (float(difference), float(error))
