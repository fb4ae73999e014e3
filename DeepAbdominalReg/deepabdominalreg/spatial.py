"""Pure tensor functions on a regular voxel grid: dense displacement fields (warp, compose, integrate, invert,
Jacobian) and the box filter of images and fields.

Conventions (all functions):

* images are ``(B, C, D, H, W)`` tensors; D, H, W are the array axes ``z, y, x`` (``k, j, i``) of the grid;
* a displacement ``disp_vox`` is ``(B, 3, D, H, W)`` in **voxel units of that grid**, channel order ``(d, h, w)``
  matching the tensor axes; a point at voxel ``p`` maps to ``p + disp_vox(p)``;
* ``warp(moving, disp)`` samples ``moving`` at ``p + disp(p)``: the output lives on the (fixed) grid of ``disp``.

:func:`disp_vox_to_mm_lps` and :func:`mm_lps_to_disp_vox` convert between that layout and ``(D, H, W, 3)`` LPS mm
fields through the grid (:meth:`deepabdominalreg.geometry.Grid.displacement_to_mm`, its spacing and direction).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from deepabdominalreg.geometry import Grid

__all__ = [
    "box_filter",
    "bspline_basis_matrix",
    "bspline_control_size",
    "bspline_gram_matrix",
    "compose",
    "disp_vox_to_mm_lps",
    "identity_grid",
    "integrate_velocity",
    "invert_displacement",
    "invert_displacement_at",
    "jacobian_determinant",
    "mm_lps_to_disp_vox",
    "normalising_scale",
    "resize_displacement",
    "warp",
]


def disp_vox_to_mm_lps(disp_vox: torch.Tensor, grid: Grid) -> np.ndarray:
    """``(1, 3, D, H, W)`` voxel displacement (channels d, h, w) on ``grid`` -> ``(D, H, W, 3)`` LPS mm, float64."""
    return grid.displacement_to_mm(disp_vox[0].flip(0).permute(1, 2, 3, 0).double().cpu().numpy())


def mm_lps_to_disp_vox(field_mm_zyx3: np.ndarray, grid: Grid, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(D, H, W, 3)`` LPS mm -> ``(1, 3, D, H, W)`` voxel displacement (channels d, h, w) on ``grid``, in
    ``dtype`` on ``device``."""
    vox_xyz = grid.displacement_to_voxels(field_mm_zyx3)
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    tensor = torch.as_tensor(vox_xyz.astype(numpy_dtype), device=device).permute(3, 0, 1, 2).flip(0)
    return tensor.unsqueeze(0).contiguous()


def _check_disp(disp: torch.Tensor) -> None:
    if disp.ndim != 5 or disp.shape[1] != 3:
        raise ValueError(f"displacement must be (B, 3, D, H, W), got {tuple(disp.shape)}")


def identity_grid(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates ``(1, 3, D, H, W)`` with channels ``(d, h, w)``."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return grid.unsqueeze(0)


def normalising_scale(sizes: Iterable[int], device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-axis factors ``2 / (n - 1)`` that turn voxel indices along axes of ``sizes`` into ``grid_sample``
    coordinates (``align_corners=True``: ``index * factor - 1``); 2 for an axis of one voxel."""
    return torch.tensor([2.0 / max(float(n) - 1.0, 1.0) for n in sizes], device=device, dtype=dtype)


def _normalised_sampling_grid(disp: torch.Tensor) -> torch.Tensor:
    """``p + disp(p)`` in grid_sample's normalised ``(x, y, z)`` = ``(w, h, d)`` order, ``(B, D, H, W, 3)``."""
    shape = disp.shape[2:]
    coords = identity_grid(shape, device=disp.device, dtype=disp.dtype) + disp
    scale = normalising_scale(shape, disp.device, disp.dtype)
    coords = coords * scale.view(1, 3, 1, 1, 1) - 1.0
    return coords.permute(0, 2, 3, 4, 1).flip(-1)


def warp(
    image: torch.Tensor,
    disp: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Sample ``image`` ``(B, C, D, H, W)`` at ``p + disp(p)``; same spatial size as ``disp``.

    ``mode``: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.  ``padding_mode``: ``"zeros"``, ``"border"``.
    Identity displacement returns ``image`` exactly (up to float rounding of the normalisation).
    """
    _check_disp(disp)
    if image.ndim != 5:
        raise ValueError(f"image must be (B, C, D, H, W), got {tuple(image.shape)}")
    if image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} differs from displacement grid {tuple(disp.shape[2:])}")
    grid = _normalised_sampling_grid(disp)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def compose(disp_outer: torch.Tensor, disp_inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``outer ∘ inner``: ``p -> p + inner(p) + outer(p + inner(p))``."""
    return disp_inner + warp(disp_outer, disp_inner, padding_mode="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity field (voxels) into a diffeomorphic displacement (voxels)."""
    _check_disp(velocity)
    disp = velocity / (2**steps)
    for _ in range(steps):
        disp = compose(disp, disp)
    return disp


def resize_displacement(disp: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resample a displacement to a grid of ``shape`` covering the same physical box (corner voxels aligned).

    Components are rescaled to the new voxel size: ``(new - 1) / (old - 1)`` per axis.
    """
    _check_disp(disp)
    old = disp.shape[2:]
    if tuple(old) == tuple(shape):
        return disp
    out = F.interpolate(disp, size=tuple(shape), mode="trilinear", align_corners=True)
    scale = torch.tensor([(n - 1) / max(o - 1, 1) for n, o in zip(shape, old)], dtype=disp.dtype, device=disp.device)
    return out * scale.view(1, 3, 1, 1, 1)


def invert_displacement(
    disp: torch.Tensor,
    iterations: int = 30,
    tolerance: float = 0.0,
    coarse_factor: int = 1,
    fine_iterations: int = 5,
) -> torch.Tensor:
    """Inverse field by fixed-point iteration ``inv(q) = -disp(q + inv(q))`` (converges for det J > 0 fields).

    Each voxel's iteration depends only on ``disp``, not on its neighbours' iterates.  With a ``tolerance`` the
    iteration runs as :func:`invert_displacement_at` at the grid's own voxels: each voxel until it moves by no more
    than ``tolerance`` voxels, at most ``iterations`` in all.  ``coarse_factor`` > 1 first inverts the field resampled
    to a grid ``coarse_factor`` times coarser (``iterations`` there, at ~1/factor^3 of the cost), then refines the
    upsampled inverse with at most ``fine_iterations`` on the full grid: for smooth fields (e.g. instance
    optimisation's, interpolated from a control grid) the same fixed point at a fraction of the time.
    """
    _check_disp(disp)
    shape = tuple(disp.shape[2:])
    if coarse_factor > 1 and min(shape) > 2 * coarse_factor:
        coarse_shape = tuple(max(2, round((s - 1) / coarse_factor) + 1) for s in shape)
        coarse = invert_displacement(resize_displacement(disp, coarse_shape), iterations, tolerance)
        inverse = resize_displacement(coarse, shape)
        iterations = fine_iterations
    else:
        inverse = -disp.clone()
    if tolerance <= 0 or disp.shape[0] != 1:
        for _ in range(iterations):
            inverse = -warp(disp, inverse, padding_mode="border")
        return inverse
    points = identity_grid(shape, device=disp.device, dtype=disp.dtype)
    return invert_displacement_at(disp, points, inverse, iterations, tolerance)


def invert_displacement_at(
    disp: torch.Tensor,
    points: torch.Tensor,
    initial: torch.Tensor,
    iterations: int = 30,
    tolerance: float = 1e-2,
) -> torch.Tensor:
    """The inverse of ``p -> p + disp(p)`` at any points ``q``: ``v`` with ``v = -disp(q + v)``.

    ``disp``: ``(1, 3, D, H, W)`` voxels; ``points``: ``q`` as voxel coordinates of ``disp``'s grid, ``(1, 3, *S)``
    (channels ``d, h, w``; ``S`` any 3-D shape, e.g. another grid's voxels mapped onto this one); ``initial``: the
    first guess of ``v``, same shape.  ``disp`` is sampled trilinearly with border padding.  The whole set is
    iterated until fewer than 5 % of the points moved by more than ``tolerance`` voxels (any component) in the last
    iteration; from then on only those are (point sampling), each until it moves by no more than ``tolerance``; at
    most ``iterations`` in all.  Returns ``v`` ``(1, 3, *S)``.
    """
    _check_disp(disp)
    if disp.shape[0] != 1 or points.shape[0] != 1 or points.shape != initial.shape:
        raise ValueError("invert_displacement_at takes one field and points/initial of one shape (1, 3, ...)")
    scale = normalising_scale(disp.shape[2:], disp.device, disp.dtype).flip(0)  # grid_sample's (x, y, z) order
    base = (points[0].permute(1, 2, 3, 0).flip(-1) * scale - 1.0).unsqueeze(0)  # q as grid_sample coordinates
    inverse = initial
    active = None  # flat indices of the points still moving, once they are few
    for _ in range(iterations):
        if active is None:
            updated = _sample_border(disp, base + inverse[0].permute(1, 2, 3, 0).flip(-1) * scale).neg_()
            moving = ((updated - inverse).abs() > tolerance).any(dim=1).flatten()
            inverse = updated
            count = int(moving.sum())
            if count == 0:
                break
            if count < 0.05 * moving.numel():
                active = torch.nonzero(moving).flatten()
                flat, flat_base = inverse.view(3, -1), base.view(-1, 3)
            continue
        location = flat_base[active] + flat[:, active].T.flip(-1) * scale
        updated = _sample_border(disp, location.reshape(1, -1, 1, 1, 3)).reshape(3, -1).neg_()
        still = ((updated - flat[:, active]).abs() > tolerance).any(dim=0)
        flat[:, active] = updated
        active = active[still]
        if active.numel() == 0:
            break
    return inverse


def _sample_border(field: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``field`` at ``grid_sample`` coordinates ``location`` (border padding)."""
    return F.grid_sample(field, location, mode="bilinear", padding_mode="border", align_corners=True)


_BOX_SLAB_ELEMENTS = 500_000
"""Elements (all channels) per slab along D of :func:`box_filter` without autograd on a CPU: a slab stays in the
caches through the three passes, instead of each pass streaming the whole volume through memory."""


def box_filter(volume: torch.Tensor, window: int = 3, count_include_pad: bool = True) -> torch.Tensor:
    """Mean over the ``window``³ neighbourhood (voxels, odd) of every voxel, per channel of ``(B, C, D, H, W)``:
    ``F.avg_pool3d(volume, window, stride=1, padding=window // 2, count_include_pad=...)`` for any size, also axes
    shorter than the window.  Zero padding: with ``count_include_pad`` every mean is the window's sum divided by
    ``window``³ (the local NCC's and SSIM's window means), without it the sum divided by the number of
    neighbours inside the grid (the mean of the voxels inside).

    Separable: per axis, the input plus its shifted slices (no padded copy), then one scaling; ``avg_pool3d`` visits
    all ``window``³ neighbours of every voxel.  Differentiable, with the same filter (its adjoint) as the backward
    pass instead of autograd through the sums.  On a CPU, volumes larger than a few slabs are filtered slab by slab
    along D, with the same operations in the same order per voxel (bit-identical).  The input is not modified.
    """
    if window % 2 == 0 or window < 1:
        raise ValueError(f"window must be a positive odd number of voxels, got {window}")
    if volume.ndim != 5:
        raise ValueError(f"volume must be (B, C, D, H, W), got {tuple(volume.shape)}")
    if window == 1:
        return volume
    if torch.is_grad_enabled() and volume.requires_grad:
        return _BoxFilter.apply(volume, window, count_include_pad)
    return _scaled_window_sums(volume, window // 2, _box_scale(volume, window, count_include_pad))


class _BoxFilter(torch.autograd.Function):
    """:func:`box_filter` with its adjoint as the backward pass: the window sums ``S`` are symmetric, so the
    gradient of ``scale * S x`` is ``S (scale * grad)``."""

    @staticmethod
    def forward(ctx, volume: torch.Tensor, window: int, count_include_pad: bool) -> torch.Tensor:
        scale = _box_scale(volume, window, count_include_pad)
        ctx.window, ctx.scale = window, scale
        return _scaled_window_sums(volume, window // 2, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        if isinstance(ctx.scale, float):
            return _scaled_window_sums(grad, ctx.window // 2, ctx.scale), None, None
        return _scaled_window_sums(grad * ctx.scale, ctx.window // 2, None), None, None


def _box_scale(volume: torch.Tensor, window: int, count_include_pad: bool) -> float | torch.Tensor:
    """``1 / window``³, or the ``(D, H, W)`` reciprocal of every voxel's number of window neighbours in the grid."""
    if count_include_pad:
        return 1.0 / window**3
    pad = window // 2
    reciprocal = None
    for axis, n in enumerate(volume.shape[2:]):
        index = torch.arange(n, device=volume.device)
        counts = (index.clamp(max=pad) + (n - 1 - index).clamp(max=pad) + 1).to(volume.dtype)
        view = [1, 1, 1]
        view[axis] = n
        factor = counts.reciprocal().view(view)
        reciprocal = factor if reciprocal is None else reciprocal * factor
    return reciprocal


def _scaled_window_sums(x: torch.Tensor, pad: int, scale: float | torch.Tensor | None) -> torch.Tensor:
    """``scale`` times the sums over the ``(2 pad + 1)``³ windows of ``x`` (no autograd), slab by slab along D on a
    CPU; ``scale``: a number, a ``(D, H, W)`` tensor or ``None`` (1)."""
    b, c, d, h, w = x.shape
    slab = max(1, _BOX_SLAB_ELEMENTS // max(b * c * h * w, 1))
    if x.device.type != "cpu" or d <= 2 * slab:
        total = _window_sums(x, 0, d, pad)
        return total if scale is None else total.mul_(scale)
    out = torch.empty_like(x)
    for z0 in range(0, d, slab):
        z1 = min(d, z0 + slab)
        total = _window_sums(x, z0, z1, pad)
        if scale is None:
            out[:, :, z0:z1] = total
        else:
            torch.mul(total, scale if isinstance(scale, float) else scale[z0:z1], out=out[:, :, z0:z1])
    return out


def _window_sums(x: torch.Tensor, z0: int, z1: int, pad: int) -> torch.Tensor:
    """Sums over the ``(2 pad + 1)``³ window, neighbours outside the grid left out, of ``x``'s slices ``z0:z1``
    (``(B, C, z1 - z0, H, W)``; D neighbours read from ``x``).  Per axis D, H, W: ``x[i]``, then ``+ x[i - o]`` and
    ``+ x[i + o]`` for ``o = 1 ... pad``, in that order (the slab-wise and whole-volume filters agree bit for bit)."""
    d = x.shape[2]
    total = x[:, :, z0:z1].clone()
    for offset in range(1, min(pad, d - 1) + 1):
        lo = max(z0, offset)  # + x[z - offset] where z - offset >= 0
        if lo < z1:
            total[:, :, lo - z0:].add_(x[:, :, lo - offset: z1 - offset])
        hi = min(z1, d - offset)  # + x[z + offset] where z + offset < d
        if hi > z0:
            total[:, :, : hi - z0].add_(x[:, :, z0 + offset: hi + offset])
    for dim in (3, 4):
        n = total.shape[dim]
        source = total
        total = source.clone()
        for offset in range(1, min(pad, n - 1) + 1):
            total.narrow(dim, offset, n - offset).add_(source.narrow(dim, 0, n - offset))
            total.narrow(dim, 0, n - offset).add_(source.narrow(dim, offset, n - offset))
    return total


def jacobian_determinant(
    disp: torch.Tensor,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    axis_matrix: Sequence[Sequence[float]] | None = None,
) -> torch.Tensor:
    """det(I + grad disp) ``(B, D, H, W)`` by central differences (one-sided at the borders, as ``torch.gradient``
    and ``numpy.gradient``); the one implementation of the project's Jacobian determinant.

    By default the derivatives are along the tensor axes: ``disp`` in voxels with channels ``(d, h, w)`` (this
    module's convention), or in physical units with ``spacing`` (d, h, w) of an axis-aligned grid.  ``axis_matrix``
    (3 x 3, replaces ``spacing``) covers any other coordinates, e.g. LPS mm of an oblique grid with channels
    ``(x, y, z)``: entry ``[a, b]`` is the derivative of the index along tensor axis ``2 + a`` with respect to the
    coordinate of channel ``b``; ``J[c, b] = delta_cb + sum_a d disp_c / d index_a * axis_matrix[a, b]`` (the
    default is ``diag(1 / spacing)``).  Every axis needs at least 2 voxels.

    Differentiable.  Without autograd the entries and the cofactor expansion are formed in place (fewer
    temporaries: :func:`deepabdominalreg.metrics.fields.jacobian_determinant` runs it slab by slab on clinical-size
    fields); both ways give the same values bit for bit.
    """
    _check_disp(disp)
    if min(disp.shape[2:]) < 2:
        raise ValueError(f"the Jacobian needs at least 2 voxels along every axis, got {tuple(disp.shape[2:])}")
    if axis_matrix is None:
        weights = [[1.0 / float(spacing[a]) if a == b else 0.0 for b in range(3)] for a in range(3)]
    else:
        weights = [[float(v) for v in row] for row in axis_matrix]
        if len(weights) != 3 or any(len(row) != 3 for row in weights):
            raise ValueError("axis_matrix must be 3 x 3")
    if torch.is_grad_enabled() and disp.requires_grad:
        return _jacobian_determinant_autograd(disp, weights)
    return _jacobian_determinant_in_place(disp, weights)


# the sums over the axes run from the last tensor axis (W) to the first (D); both paths below form the same
# products in the same order (multiplications by 0.5 and 2 are exact, so twice the differences times half the
# weight is the gradient times the weight to the last bit)
_AXIS_ORDER = (2, 1, 0)


def _jacobian_determinant_autograd(disp: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    grads = [torch.gradient(disp, dim=2 + a)[0] for a in range(3)]  # d disp / d index_a, unit spacing

    def entry(c: int, b: int) -> torch.Tensor:
        total = None
        for a in _AXIS_ORDER:
            w = weights[a][b]
            if w == 0.0:
                continue
            g = grads[a][:, c]
            if total is None:
                total = g if w == 1.0 else g * w
            else:
                total = torch.add(total, g, alpha=w)
        if total is None:
            total = torch.zeros_like(disp[:, 0])
        return total + 1.0 if c == b else total

    (j00, j01, j02), (j10, j11, j12), (j20, j21, j22) = [[entry(c, b) for b in range(3)] for c in range(3)]
    return (
        j00 * (j11 * j22 - j12 * j21)
        - j01 * (j10 * j22 - j12 * j20)
        + j02 * (j10 * j21 - j11 * j20)
    )


def _jacobian_determinant_in_place(disp: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    jac: list[list[torch.Tensor | None]] = [[None] * 3 for _ in range(3)]
    for c in range(3):
        component = disp[:, c]
        for a in _AXIS_ORDER:
            used_by = [b for b in range(3) if weights[a][b] != 0.0]
            if not used_by:
                continue
            grad = _twice_gradient(component, 1 + a)
            for b in used_by:
                w = 0.5 * weights[a][b]
                if jac[c][b] is None:
                    jac[c][b] = grad.mul_(w) if len(used_by) == 1 else grad * w
                else:
                    jac[c][b].add_(grad, alpha=w)
            del grad
    for c in range(3):
        for b in range(3):
            if jac[c][b] is None:
                jac[c][b] = torch.zeros_like(disp[:, 0])
        jac[c][c].add_(1.0)
    (j00, j01, j02), (j10, j11, j12), (j20, j21, j22) = jac
    # the cofactor expansion along the first row with separate products and differences (addcmul_ may fuse them,
    # which would round differently from the autograd path)
    minor = torch.mul(j11, j22)
    product = torch.mul(j12, j21)
    det = torch.mul(j00, minor.sub_(product))
    torch.mul(j10, j22, out=minor).sub_(torch.mul(j12, j20, out=product))
    det.sub_(torch.mul(j01, minor, out=product))
    torch.mul(j10, j21, out=minor).sub_(torch.mul(j11, j20, out=product))
    det.add_(torch.mul(j02, minor, out=product))
    return det


def _twice_gradient(volume: torch.Tensor, dim: int) -> torch.Tensor:
    """Twice ``torch.gradient(volume, dim=dim)`` (unit spacing; ``dim`` of length >= 2): central differences
    ``f[i+1] - f[i-1]`` inside, twice the one-sided differences at the two ends; one subtraction per voxel into one
    new tensor (``torch.gradient`` makes several passes and a concatenation)."""
    n = volume.shape[dim]
    out = torch.empty_like(volume)
    if n > 2:
        torch.sub(volume.narrow(dim, 2, n - 2), volume.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2))
    for edge, (hi, lo) in ((0, (1, 0)), (n - 1, (n - 1, n - 2))):
        torch.sub(volume.select(dim, hi), volume.select(dim, lo), out=out.select(dim, edge)).mul_(2.0)
    return out


def bspline_control_size(n: int, knot_spacing: float) -> int:
    """Number of control points along an axis of ``n`` voxels for a uniform cubic B-spline whose knots lie
    ``knot_spacing`` voxels apart, the first one a knot before voxel 0 (knot ``j`` at voxel ``(j - 1) *
    knot_spacing``): every voxel ``0 .. n - 1`` then has its four control points (one border point before the first
    voxel, up to two after the last)."""
    if not knot_spacing > 0:
        raise ValueError(f"knot spacing must be > 0 voxels, got {knot_spacing!r}")
    return math.floor((n - 1) / knot_spacing + 1e-9) + 4


def _cubic_bspline(t: torch.Tensor, derivative: int) -> torch.Tensor:
    """The centred uniform cubic B-spline ``beta3(t)`` (support ``|t| < 2``, knots at the integers) or its first or
    second derivative with respect to ``t``."""
    a = t.abs()
    inner, outer = a < 1, (a >= 1) & (a < 2)
    if derivative == 0:
        values = torch.where(inner, 2.0 / 3.0 - a ** 2 + 0.5 * a ** 3, (2.0 - a).clamp_min(0) ** 3 / 6.0)
    elif derivative == 1:
        values = torch.where(inner, -2.0 * t + 1.5 * t * a, -torch.sign(t) * (2.0 - a).clamp_min(0) ** 2 / 2.0)
    elif derivative == 2:
        values = torch.where(inner, -2.0 + 3.0 * a, (2.0 - a).clamp_min(0))
    else:
        raise ValueError(f"derivative must be 0, 1 or 2, got {derivative!r}")
    return torch.where(inner | outer, values, torch.zeros_like(values))


def bspline_basis_matrix(positions: torch.Tensor | int, knot_spacing: float, n_control: int | None = None,
                         derivative: int = 0, dtype: torch.dtype = torch.float64,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """``(len(positions), n_control)`` weights of a uniform cubic B-spline (C²; knots ``knot_spacing`` voxels apart,
    knot ``j`` at voxel ``(j - 1) * knot_spacing``: :func:`bspline_control_size`) at ``positions`` (voxels; an int
    ``n`` means ``0 .. n - 1``), or of its ``derivative``-th derivative with respect to the voxel coordinate.

    A field on a control grid ``c`` of shape ``(nz, ny, nx)`` is ``sum_ijk c_ijk Mz[:, i] My[:, j] Mx[:, k]``:
    three small matrix products, one per axis.  ``n_control`` defaults to :func:`bspline_control_size` of the
    positions' span.  The weights of every position inside the span sum to 1 (and the derivatives' to 0): a
    constant field is reproduced exactly, and so is any polynomial of degree <= 3.
    """
    if isinstance(positions, int):
        n = positions
        positions = torch.arange(positions, dtype=torch.float64, device=device)
    else:
        positions = positions.to(device=device, dtype=torch.float64)
        n = math.floor(float(positions.max())) + 1 if positions.numel() else 1
    if n_control is None:
        n_control = bspline_control_size(n, knot_spacing)
    knots = torch.arange(n_control, dtype=torch.float64, device=positions.device) - 1.0
    t = positions[:, None] / knot_spacing - knots[None, :]
    return (_cubic_bspline(t, derivative) / knot_spacing ** derivative).to(dtype)


def bspline_gram_matrix(n: int, knot_spacing: float, derivative: int, n_control: int | None = None,
                        dtype: torch.dtype = torch.float64,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``G[i, j] = integral over [0, n - 1] of B_i^(k)(x) B_j^(k)(x) dx`` (voxel units; ``k = derivative``) of
    :func:`bspline_basis_matrix`'s basis: the exact quadratic form of the field's squared ``k``-th derivative along
    one axis (Gauss-Legendre quadrature with 4 nodes between consecutive knots or domain ends: exact for the
    degree-6 products).  For bending energy on a control grid, axis by axis."""
    if n_control is None:
        n_control = bspline_control_size(n, knot_spacing)
    end = float(n - 1)
    breaks = torch.arange(0, math.floor(end / knot_spacing + 1e-9) + 1, dtype=torch.float64) * knot_spacing
    breaks = torch.unique(torch.cat([breaks[breaks < end], torch.tensor([0.0, end], dtype=torch.float64)]))
    nodes, weights = np.polynomial.legendre.leggauss(4)
    nodes, weights = torch.as_tensor(nodes), torch.as_tensor(weights)
    lo, hi = breaks[:-1, None], breaks[1:, None]
    x = (0.5 * (lo + hi) + 0.5 * (hi - lo) * nodes[None]).reshape(-1)
    w = (0.5 * (hi - lo) * weights[None]).reshape(-1)
    basis = bspline_basis_matrix(x, knot_spacing, n_control, derivative, device=device)
    return (basis.T @ (basis * w.to(basis.device)[:, None])).to(dtype)
