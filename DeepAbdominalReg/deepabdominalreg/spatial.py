"""Pure tensor functions for dense displacement fields on a regular voxel grid.

Conventions (all functions):

* images are ``(B, C, D, H, W)`` tensors; D, H, W are the array axes ``z, y, x`` (``k, j, i``) of the grid;
* a displacement ``disp_vox`` is ``(B, 3, D, H, W)`` in **voxel units of that grid**, channel order ``(d, h, w)``
  matching the tensor axes; a point at voxel ``p`` maps to ``p + disp_vox(p)``;
* ``warp(moving, disp)`` samples ``moving`` at ``p + disp(p)``: the output lives on the (fixed) grid of ``disp``.

Conversions to physical LPS millimetres happen in :mod:`deepabdominalreg.registration`, using the grid's spacing
and direction.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = [
    "compose",
    "identity_grid",
    "integrate_velocity",
    "invert_displacement",
    "invert_displacement_at",
    "jacobian_determinant",
    "normalising_scale",
    "resize_displacement",
    "warp",
]


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


def jacobian_determinant(disp: torch.Tensor, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """det(I + grad disp) ``(B, D, H, W)`` by central differences (one-sided at borders), in voxel space.

    ``spacing`` (d, h, w) is only needed when ``disp`` is in physical units on an anisotropic grid.
    """
    _check_disp(disp)
    grads = []
    for axis, h in zip((2, 3, 4), spacing):
        grads.append(torch.gradient(disp, dim=axis, spacing=h)[0])
    # J[b, i, j] = d disp_i / d x_j + delta_ij
    j = torch.stack(grads, dim=2)  # (B, 3 comps, 3 axes, D, H, W)
    eye = torch.eye(3, dtype=disp.dtype, device=disp.device).view(1, 3, 3, 1, 1, 1)
    j = j + eye
    return (
        j[:, 0, 0] * (j[:, 1, 1] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 1])
        - j[:, 0, 1] * (j[:, 1, 0] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 0])
        + j[:, 0, 2] * (j[:, 1, 0] * j[:, 2, 1] - j[:, 1, 1] * j[:, 2, 0])
    )
