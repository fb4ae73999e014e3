"""Instance optimisation: refine a displacement on one image pair with Adam (multi-level, smooth by construction).

The displacement of each level is parameterised on a control grid and evaluated on the level's grid by three small
matrix products (one per axis), with one of three transforms (``RegistrationConfig.io_transform``):

* ``trilinear``: control points ``control_spacing`` voxels apart, interpolated trilinearly (the field's derivatives
  are constant inside each control cell); diffusion regularisation and a negative-Jacobian penalty on the control
  grid;
* ``bspline``: a uniform cubic B-spline (C²: a continuous Jacobian) with knots ``control_spacing_mm`` apart (times
  the level's factor) and a border of control points, regularised by its exact bending energy in mm⁻²
  (:class:`~deepabdominalreg.nn.losses.BSplineBendingEnergy`) and the negative-Jacobian penalty on the control grid;
* ``svf``: the same B-spline as a stationary velocity field, integrated by scaling and squaring
  (:func:`~deepabdominalreg.spatial.integrate_velocity`): diffeomorphic by construction; optionally symmetric
  (``settings.symmetric``): the loss averages the forward similarity and that of the fixed image warped by
  ``exp(-v)`` to the moving one, so that swapping the inputs negates the optimal velocity (the inverse transform).

The similarity is local NCC or the squared difference of MIND-SSC descriptors
(:func:`~deepabdominalreg.nn.losses.mind_ssc`).  Displacements are in voxels (see :mod:`deepabdominalreg.spatial`):
the input and output in voxels of the working grid, each level's in voxels of that level's grid, where the
settings' lengths apply (:class:`InstanceOptimisationSettings`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from deepabdominalreg import spatial
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.geometry import mask_bounding_box
from deepabdominalreg.nn.losses import (
    BSplineBendingEnergy,
    diffusion_regulariser,
    local_ncc_loss,
    local_statistics,
    mind_ssc,
    negative_jacobian_penalty,
    strain_energy,
)

__all__ = ["IO_SIMILARITIES", "IO_TRANSFORMS", "InstanceOptimisationSettings", "instance_optimise", "level_shape"]

IO_TRANSFORMS = ("trilinear", "bspline", "svf")
IO_SIMILARITIES = ("ncc", "mind")


@dataclass(frozen=True)
class InstanceOptimisationSettings:
    """The stage's settings in voxels, from :meth:`from_config` (the ``io_*`` fields of ``RegistrationConfig``, whose
    docstring gives the conversion from mm).  Every length is in voxels of the level's own grid: the same count at
    every level, so about ``f`` working voxels at level factor ``f``."""

    levels: tuple[int, ...]
    """Pyramid levels as downsampling factors of the working grid, coarse to fine."""
    iterations: int
    """Adam iterations at each coarse level (factor > 1)."""
    fine_iterations: int
    """Adam iterations at the full working resolution (factor 1), the most expensive level."""
    learning_rate: float
    """Adam learning rate, in voxels of the level's grid per step."""
    control_spacing: int
    """Spacing of the control grid, in voxels of the level's grid."""
    ncc_window: int
    """Local NCC window (odd), in voxels of the level's grid."""
    ncc_eps: float
    """Variance regulariser of the local NCC, in squared [0, 1] intensity units (``io_ncc_noise_hu``)."""
    gradient_floor: float
    """Misalignment (voxels of the level's grid) whose gradient change is Adam's ``eps`` (``io_gradient_floor_mm``;
    0: Adam's 1e-8)."""
    smoothness_weight: float
    """Weight of the diffusion regulariser (on the control grid, in control-grid voxels)."""
    jacobian_weight: float
    """Weight of the negative-Jacobian penalty (on the control grid)."""
    transform: str
    """``trilinear``, ``bspline`` or ``svf`` (see the module's docstring)."""
    similarity: str
    """``ncc`` (local NCC, ``ncc_window``) or ``mind`` (MIND-SSC, ``mind_radius`` and ``mind_dilation``)."""
    working_spacing_mm: float
    """Spacing of the working grid (mm): the B-spline's knots and bending energy are in mm."""
    control_spacing_mm: float
    """Knot spacing of the B-spline (``bspline``, ``svf``) at the working resolution, in mm (``f`` times it at level
    factor ``f``); not rounded to voxels."""
    bending_weight: float
    """Weight of the B-spline's bending energy (mm², the energy being in mm⁻²)."""
    mind_radius: int
    """MIND-SSC patch radius, in voxels of the level's grid."""
    mind_dilation: int
    """MIND-SSC neighbour distance, in voxels of the level's grid."""
    svf_steps: int = 6
    """Scaling-and-squaring steps of the ``svf`` transform."""
    symmetric: bool = False
    """``svf`` only: the loss is the mean of the forward similarity and that of ``fixed`` warped by ``exp(-v)`` to
    ``moving`` (``io_symmetric``)."""
    rigidity_weight: float = 0.0
    """Weight of the strain energy of the control points inside the region kept rigid (``rigid_mask`` of
    :func:`instance_optimise`); dimensionless."""

    @classmethod
    def from_config(cls, config: RegistrationConfig, working_spacing_mm: float) -> InstanceOptimisationSettings:
        """The settings for a working grid of ``working_spacing_mm`` (the grid the pipeline actually uses: the
        configured spacing, or a coarser one that ``max_working_voxels`` imposed)."""
        spacing = float(working_spacing_mm)
        if not spacing > 0:
            raise ValueError(f"working spacing must be > 0 mm, got {working_spacing_mm!r}")
        return cls(
            levels=tuple(int(f) for f in config.io_levels),
            iterations=int(config.io_iterations),
            fine_iterations=int(config.io_fine_iterations),
            learning_rate=config.io_learning_rate_mm / spacing,
            control_spacing=max(1, math.floor(config.io_control_spacing_mm / spacing + 0.5)),
            ncc_window=max(3, 2 * math.floor(config.io_ncc_window_mm / spacing / 2) + 1),
            ncc_eps=(config.io_ncc_noise_hu / (config.hu_window[1] - config.hu_window[0])) ** 2,
            gradient_floor=config.io_gradient_floor_mm / spacing,
            smoothness_weight=float(config.io_smoothness_weight),
            jacobian_weight=float(config.io_jacobian_weight),
            transform=config.io_transform,
            similarity=config.io_similarity,
            working_spacing_mm=spacing,
            control_spacing_mm=float(config.io_control_spacing_mm),
            bending_weight=float(config.io_bending_weight),
            mind_radius=max(0, math.floor(config.io_mind_radius_mm / spacing + 0.5)),
            mind_dilation=max(1, math.floor(config.io_mind_dilation_mm / spacing + 0.5)),
            rigidity_weight=float(config.io_rigidity_weight),
            symmetric=bool(config.io_symmetric),
        )

    def strengthened(self, factor: float) -> InstanceOptimisationSettings:
        """The folding retry's settings (``RegistrationConfig.folding_retry_factor``): both regularisation weights
        times ``factor``, the Jacobian weight from at least 0.1 so that the retry penalises folding even when the
        first run did not."""
        return dataclasses.replace(self, smoothness_weight=self.smoothness_weight * factor,
                                   bending_weight=self.bending_weight * factor,
                                   jacobian_weight=max(self.jacobian_weight, 0.1) * factor)


class Plateau:
    """Early stopping: True once the loss has not improved by ``tolerance`` for ``patience`` iterations."""

    def __init__(self, patience: int, tolerance: float) -> None:
        self.patience, self.tolerance = patience, tolerance
        self.best = float("inf")
        self.since = 0

    def reached(self, loss: float) -> bool:
        if loss < self.best - self.tolerance:
            self.best, self.since = loss, 0
        else:
            self.since += 1
        return self.since >= self.patience


def level_shape(shape: tuple[int, ...], factor: int) -> tuple[int, int, int]:
    """Grid size of a pyramid level whose corner voxels coincide with the full grid's (align_corners)."""
    return tuple(max(2, round((s - 1) / factor) + 1) for s in shape)


def _downsample_image(image: torch.Tensor, factor: int) -> torch.Tensor:
    if factor <= 1:
        return image
    window = 2 * (factor // 2) + 1
    smoothed = spatial.box_filter(image, window)
    return F.interpolate(smoothed, size=level_shape(image.shape[2:], factor), mode="trilinear", align_corners=True)


def _linear_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1-D linear interpolation with ``align_corners=True`` (PyTorch's convention)."""
    position = torch.arange(n_out, device=device, dtype=torch.float64) * ((n_in - 1) / max(n_out - 1, 1))
    lower = position.floor().clamp(max=max(n_in - 2, 0)).long()
    fraction = position - lower
    matrix = torch.zeros(n_out, n_in, device=device, dtype=torch.float64)
    rows = torch.arange(n_out, device=device)
    matrix[rows, lower] = 1.0 - fraction
    matrix[rows, (lower + 1).clamp(max=n_in - 1)] += fraction
    return matrix.to(dtype)


class _ControlUpsampler:
    """``F.interpolate(x, size, mode="trilinear", align_corners=True)`` of a ``(B, C, d, h, w)`` control grid, as
    three small matrix products (one per axis).  Same values to float rounding; cheaper forward and backward on a
    CPU than ``F.interpolate``, and it runs every instance-optimisation iteration.  With ``box`` (one slice per axis
    of ``shape``) it returns only that part of the upsampled grid, at that part's cost.  ``matrices`` (one
    ``(shape[a], control_shape[a])`` matrix per axis) replaces the linear weights by another separable basis (the
    cubic B-spline's: :func:`deepabdominalreg.spatial.bspline_basis_matrix`)."""

    def __init__(self, control_shape: tuple[int, ...], shape: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype, box: tuple[slice, slice, slice] | None = None,
                 matrices: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        box = box or tuple(slice(0, n) for n in shape)
        if matrices is None:
            matrices = tuple(_linear_matrix(n_in, n_out, device, dtype) for n_in, n_out in zip(control_shape, shape))
        self.mz, self.my, self.mx = (m.to(device=device, dtype=dtype)[rows].contiguous()
                                     for m, rows in zip(matrices, box))
        self.shape = (self.mz.shape[0], self.my.shape[0], self.mx.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        y = x.reshape(-1, w) @ self.mx.T  # (b c d h, W)
        y = torch.matmul(self.my, y.reshape(b * c * d, h, -1))  # (b c d, H, W)
        y = torch.matmul(self.mz, y.reshape(b * c, d, -1))  # (b c, D, H W)
        return y.reshape(b, c, *self.shape)


def _box_coordinates(box: tuple[slice, slice, slice], shape: tuple[int, ...], device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid_sample``'s normalised coordinates ``(1, d, h, w, 3)`` (order ``x, y, z``) of the box's voxels on a
    grid of ``shape``, and the per-axis scale (same order) that turns voxel displacements into them."""
    axes = [torch.arange(sl.start, sl.stop, device=device, dtype=dtype) for sl in box]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flip(-1)  # (d, h, w, 3): x, y, z
    scale = spatial.normalising_scale(reversed(shape), device, dtype)
    return (coords * scale - 1.0).unsqueeze(0), scale


class _BoxSampler:
    """``moving`` (the whole level) sampled trilinearly at the box's voxels moved by a displacement (voxels of the
    level, channels ``(w, h, d)``, on the box), exact at zero displacement.

    ``grid_sample`` at the voxels' own normalised coordinates returns the voxels up to float rounding (~1e-6 of the
    intensity), and Adam turns the resulting gradients of ~1e-9 into steps of a sizeable part of its learning rate:
    an image registered to itself would drift by voxels.  That rounding (the sample at zero minus the voxels) is
    computed once and subtracted, so a zero displacement samples the voxels exactly (and a similarity minimised at
    ``w = f`` has a zero gradient there); the gradient with respect to the displacement is unchanged."""

    def __init__(self, moving: torch.Tensor, box: tuple[slice, slice, slice], padding_mode: str) -> None:
        self.moving, self.padding_mode = moving, padding_mode
        self.base, self.scale = _box_coordinates(box, tuple(moving.shape[2:]), moving.device, moving.dtype)
        with torch.no_grad():
            self.rounding = self._sample(self.base) - moving[(slice(None), slice(None), *box)]

    def _sample(self, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(self.moving, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=True)

    def __call__(self, disp_box_whd: torch.Tensor) -> torch.Tensor:
        return self._sample(torch.addcmul(self.base, disp_box_whd.permute(0, 2, 3, 4, 1), self.scale)) - self.rounding


class _CroppedNcc:
    """Local NCC of ``moving`` warped by a level displacement, evaluated on the mask's bounding box only.

    Equal to ``local_ncc_loss(fixed, warp(moving, disp), window, mask)``: the window's support outside the box only
    reaches voxels that the mask excludes, except that the box is grown by the window's half-width.  The fixed
    image's local means and variance do not change between iterations and are computed once.  The displacement is
    passed on the box only and with its channels in ``(w, h, d)`` order, the order of ``grid_sample``'s coordinates,
    so that an iteration neither crops nor reorders a full-size field.

    The NCC is the ``"distance"`` form (exactly stationary at ``w = f``) with the variance regulariser ``eps``
    (squared intensity units), evaluated in float64: near a match its window sums cancel to ~1e-7 of their size, the
    float32 rounding of that difference would be a gradient of its own.
    """

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None, window: int,
                 eps: float) -> None:
        shape = tuple(fixed.shape[2:])
        self.window, self.eps, self.dtype = window, eps, moving.dtype
        # the box filter pads with zeros at the box's border: grow the box by a window so that every masked voxel's
        # window sees the same voxels as on the whole grid (zeros beyond the grid in both cases)
        if mask is None:
            self.box = tuple(slice(0, s) for s in shape)
        else:
            self.box = mask_bounding_box(mask[0, 0].cpu().numpy(), window, whole_if_empty=True)
        box = (slice(None), slice(None), *self.box)
        f = fixed[box].contiguous()
        self.fixed = f.double()
        self.mu_f, self.var_f = local_statistics(self.fixed, window)
        if mask is None:
            weight = torch.ones_like(self.fixed)
        else:
            weight = mask[box].to(self.fixed.dtype)
        # voxels of the grown margin are outside the mask when a mask is given; without one, count every voxel.
        # The mean's weights are computed once: the loss is their weighted sum
        self.weight = weight / weight.sum().clamp_min(1.0)
        self.sample = _BoxSampler(moving, self.box, "zeros")

    def __call__(self, disp_box_whd: torch.Tensor) -> torch.Tensor:
        """Negative mean local NCC inside the mask for a displacement ``(1, 3, *box)`` (voxels of the level, channels
        ``(w, h, d)``) given on the box."""
        w = self.sample(disp_box_whd).double()
        return local_ncc_loss(self.fixed, w, self.window, mask=self.weight, eps=self.eps, reduction="sum",
                              fixed_statistics=(self.mu_f, self.var_f), form="distance").to(self.dtype)


class _CroppedMind:
    """Mean squared difference of MIND-SSC descriptors (:func:`~deepabdominalreg.nn.losses.mind_ssc`) between the
    fixed image and ``moving`` warped by a level displacement, inside the mask, on the mask's bounding box.

    Both descriptors are computed once per level; each iteration warps the moving image's 12 descriptor channels
    (trilinear), as ConvexAdam does, instead of recomputing the descriptor of the warped image.  The call has
    :class:`_CroppedNcc`'s interface."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None, radius: int,
                 dilation: int) -> None:
        shape = tuple(fixed.shape[2:])
        with torch.no_grad():
            mind_f, mind_m = mind_ssc(fixed, radius, dilation), mind_ssc(moving, radius, dilation)
        if mask is None:
            self.box = tuple(slice(0, s) for s in shape)
        else:
            self.box = mask_bounding_box(mask[0, 0].cpu().numpy(), 0, whole_if_empty=True)
        box = (slice(None), slice(None), *self.box)
        self.fixed = mind_f[box].contiguous()
        weight = torch.ones_like(self.fixed[:, :1]) if mask is None else mask[box].to(fixed.dtype)
        self.weight = weight / (weight.sum().clamp_min(1.0) * self.fixed.shape[1])
        self.sample = _BoxSampler(mind_m, self.box, "border")

    def __call__(self, disp_box_whd: torch.Tensor) -> torch.Tensor:
        w = self.sample(disp_box_whd)
        return ((w - self.fixed).square() * self.weight).sum()


class _Adam:
    """Adam (Kingma & Ba 2015, PyTorch's defaults) on one tensor, without ``torch.optim``: its first ``step`` imports
    ``torch._dynamo``, a slow import that every fresh process would pay."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        g = self.param.grad
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.t))


_FIT_RIDGE = 1e-2
"""Tikhonov weight of the B-spline fit, relative to the basis matrix's largest squared singular value."""


def _ridge_inverse(matrix: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(MᵀM + λI)⁻¹Mᵀ`` with ``λ = ridge · ‖M‖₂²``: least squares that keeps weakly determined unknowns small."""
    gram = matrix.T @ matrix
    lam = ridge * float(torch.linalg.matrix_norm(matrix, ord=2)) ** 2
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), matrix.T)


class _BSplineBasis:
    """The cubic B-spline of one level: knots ``knot_mm`` apart on a grid of ``shape`` voxels ``spacing_mm`` apart
    (per axis), knot 1 on voxel 0 (:func:`deepabdominalreg.spatial.bspline_basis_matrix`).  The knots are placed in
    mm, so the same physical field results whatever the working spacing."""

    def __init__(self, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], knot_mm: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.spacing_mm = shape, spacing_mm
        self.knots = tuple(knot_mm / h for h in spacing_mm)  # voxels of the level
        self.matrices = tuple(spatial.bspline_basis_matrix(n, k, device=device) for n, k in zip(shape, self.knots))
        self.cshape = tuple(m.shape[1] for m in self.matrices)
        # control values of a dense field (a level's start), axis by axis: ridge-regularised least squares, because
        # the control points past the grid's last voxel barely touch it (singular values down to 1e-9 at 1.2 voxels
        # per knot) and the plain pseudo-inverse gives them values of thousands of voxels.  The fit need not be
        # exact: the level field adds back what the control grid misses (its residual)
        self.fit = _ControlUpsampler(shape, self.cshape, device, dtype,
                                     matrices=tuple(_ridge_inverse(m, _FIT_RIDGE) for m in self.matrices))
        self.knots_t = torch.tensor(self.knots, device=device, dtype=dtype).view(1, 3, 1, 1, 1)
        self.bending = BSplineBendingEnergy(shape, self.knots, spacing_mm, device=device, dtype=dtype)

    def upsampler(self, box: tuple[slice, slice, slice] | None = None) -> _ControlUpsampler:
        return _ControlUpsampler(self.cshape, self.shape, self.knots_t.device, self.knots_t.dtype, box=box,
                                 matrices=self.matrices)


class _LevelField:
    """A level's displacement (voxels of the level) from its control grid: the upsampled control grid plus a fixed
    residual (the part of the start that the control grid cannot represent), or for ``svf`` the integrated
    upsampled velocity, composed before ``outer`` when given."""

    def __init__(self, upsample: _ControlUpsampler, upsample_box: _ControlUpsampler, box: tuple[slice, ...],
                 residual: torch.Tensor | None = None, svf_steps: int | None = None,
                 outer: torch.Tensor | None = None) -> None:
        self.upsample, self.upsample_box, self.box = upsample, upsample_box, box
        self.residual, self.svf_steps, self.outer = residual, svf_steps, outer
        # the iterations see the field on the similarity's box only, channels in (w, h, d) order (grid_sample's):
        # the control grid is flipped instead of the level's field (8x fewer values)
        self.residual_box_whd = None if residual is None else residual[box].flip(1)

    def __call__(self, control: torch.Tensor) -> torch.Tensor:
        if self.svf_steps is None:
            return self.upsample(control) + self.residual
        disp = spatial.integrate_velocity(self.upsample(control), self.svf_steps)
        return disp if self.outer is None else spatial.compose(self.outer, disp)

    def on_box_whd(self, control: torch.Tensor) -> torch.Tensor:
        """The field on the similarity's box, channels ``(w, h, d)``."""
        if self.svf_steps is None:
            return self.upsample_box(control.flip(1)) + self.residual_box_whd
        # the integration needs the whole level (points move between voxels)
        return self(control)[self.box].flip(1)

    def inverse_on_box_whd(self, control: torch.Tensor) -> torch.Tensor:
        """``svf`` without ``outer``: the inverse transform's field ``exp(-v)`` on the similarity's box, channels
        ``(w, h, d)``."""
        return spatial.integrate_velocity(-self.upsample(control), self.svf_steps)[self.box].flip(1)


class _LevelObjective:
    """The loss of one level as a function of its control values: the similarity of the level field plus the
    regularisers of the parameterisation."""

    def __init__(self, similarity, level_field: _LevelField, settings: InstanceOptimisationSettings,
                 basis: _BSplineBasis | None, rigid_control: torch.Tensor | None = None,
                 backward_similarity=None) -> None:
        self.similarity, self.level_field, self.settings, self.basis = similarity, level_field, settings, basis
        self.rigid_control, self.backward_similarity = rigid_control, backward_similarity

    def __call__(self, control: torch.Tensor) -> torch.Tensor:
        settings, basis = self.settings, self.basis
        loss = self.similarity(self.level_field.on_box_whd(control))
        if self.backward_similarity is not None:
            loss = 0.5 * (loss + self.backward_similarity(self.level_field.inverse_on_box_whd(control)))
        if basis is None:
            # regularisers on the control grid (in control-grid voxels): the level field is its trilinear
            # interpolation, so it inherits smoothness and positive Jacobians, at 1/cs^3 of the cost
            control_vox = control / settings.control_spacing
            if settings.smoothness_weight:
                loss = loss + settings.smoothness_weight * diffusion_regulariser(control_vox)
        else:
            # the B-spline's exact bending energy (mm^-2) and the control grid's Jacobian (control-grid voxels)
            control_vox = control / basis.knots_t
            if settings.bending_weight:
                loss = loss + settings.bending_weight * basis.bending(control)
        if settings.jacobian_weight:
            loss = loss + settings.jacobian_weight * negative_jacobian_penalty(control_vox)
        if settings.rigidity_weight and self.rigid_control is not None:
            loss = loss + settings.rigidity_weight * strain_energy(control_vox, self.rigid_control)
        return loss


def _control_mask(mask: torch.Tensor, positions: tuple[torch.Tensor, ...], radius: tuple[int, ...]) -> torch.Tensor:
    """The control points ``(1, 1, *cshape)`` (bool) whose position (level voxels per axis, ``positions``) lies
    within ``radius`` level voxels (per axis) of a voxel of ``mask`` (``(1, 1, D, H, W)``, bool)."""
    dilated = F.max_pool3d(mask.float(), kernel_size=tuple(2 * r + 1 for r in radius), stride=1,
                           padding=tuple(radius)) > 0
    index = [p.round().clamp(0, n - 1).long() for p, n in zip(positions, mask.shape[2:])]
    return dilated[:, :, index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]


def _gradient_floor(objective: Callable[[torch.Tensor], torch.Tensor], control: torch.Tensor, misalignment: float,
                    seed: int = 0) -> float:
    """Adam's ``eps`` for a level: the RMS change of the objective's gradient (similarity and regularisers) with
    respect to the control values between the start and the start moved by a random displacement of
    ``misalignment`` voxels RMS; 0 gives PyTorch's 1e-8."""
    if misalignment <= 0:
        return 1e-8
    generator = torch.Generator(device=control.device).manual_seed(seed)
    grads = []
    for delta in (0.0, misalignment):
        probe = (control.detach() + delta * torch.randn(control.shape, generator=generator, device=control.device,
                                                        dtype=control.dtype)).requires_grad_(True)
        objective(probe).backward()
        grads.append(probe.grad)
    return max(float((grads[1] - grads[0]).square().mean().sqrt()), 1e-12)


def _level_spacing_mm(shape: tuple[int, ...], lshape: tuple[int, ...], spacing_mm: float) -> tuple[float, ...]:
    """Voxel spacing (mm, per axis) of a pyramid level of ``lshape`` voxels spanning the working grid of ``shape``
    voxels ``spacing_mm`` apart (corner voxels aligned)."""
    return tuple(spacing_mm * max(n - 1, 1) / max(m - 1, 1) for n, m in zip(shape, lshape))


def _similarity(settings: InstanceOptimisationSettings, target: torch.Tensor, source: torch.Tensor,
                mask: torch.Tensor | None):
    """The level's similarity of ``source`` warped to ``target`` (local NCC or MIND-SSC)."""
    if settings.similarity == "ncc":
        return _CroppedNcc(target, source, mask, settings.ncc_window, settings.ncc_eps)
    return _CroppedMind(target, source, mask, settings.mind_radius, settings.mind_dilation)


def instance_optimise(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial_disp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    settings: InstanceOptimisationSettings,
    callback: Callable[[int, int, float], None] | None = None,
    rigid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Displacement ``(1, 3, D, H, W)`` (voxels) aligning ``moving`` to ``fixed`` (both ``(1, 1, D, H, W)``).

    ``initial_disp`` (e.g. the network's prediction) is the starting point (for ``svf``: the field composed after
    the integrated velocity); ``mask`` restricts the similarity term (which is then computed on the mask's bounding
    box only).  ``rigid_mask`` (``(1, 1, D, H, W)``, fixed grid) is a region kept rigid: the strain energy of the
    control points within half a control spacing of it is penalised (``settings.rigidity_weight``).
    ``callback(iteration, total, loss)`` runs after every iteration; it may raise to cancel.
    """
    if settings.transform not in IO_TRANSFORMS:
        raise ValueError(f"io_transform must be one of {IO_TRANSFORMS}, got {settings.transform!r}")
    if settings.similarity not in IO_SIMILARITIES:
        raise ValueError(f"io_similarity must be one of {IO_SIMILARITIES}, got {settings.similarity!r}")
    if settings.symmetric and settings.transform != "svf":
        raise ValueError(f"the symmetric objective needs the svf transform, got {settings.transform!r}")
    shape = tuple(fixed.shape[2:])
    device, dtype = fixed.device, fixed.dtype
    disp = (
        torch.zeros(1, 3, *shape, dtype=dtype, device=device)
        if initial_disp is None
        else initial_disp.detach().to(dtype)
    )
    # svf: the start is composed after the integrated velocity; symmetric: it is the initial velocity instead
    # (exp(u) ~ id + u for a smooth start), so that exp(-v) stays the whole transform's inverse
    outer = None if initial_disp is None or settings.symmetric else disp
    velocity = (disp.clone() if settings.symmetric and initial_disp is not None
                else torch.zeros(1, 3, *shape, dtype=dtype, device=device))  # svf: dense velocity (working voxels)
    per_level = [settings.fine_iterations if f <= 1 else settings.iterations for f in settings.levels]
    total = sum(per_level)
    step = 0
    for factor, iterations in zip(settings.levels, per_level):
        if iterations <= 0:
            continue
        lshape = level_shape(shape, factor)
        fixed_l = _downsample_image(fixed, factor)
        moving_l = _downsample_image(moving, factor)
        mask_l = None
        if mask is not None:
            mask_l = _downsample_image(mask.to(dtype), factor) > 0.5
        similarity = _similarity(settings, fixed_l, moving_l, mask_l)
        # symmetric: the moving scan as the target of the fixed one warped by exp(-v), on the same voxels (mask)
        backward = _similarity(settings, moving_l, fixed_l, mask_l) if settings.symmetric else None
        box = (slice(None), slice(None), *similarity.box)
        start = spatial.resize_displacement(disp, lshape)
        if settings.transform == "trilinear":
            cshape = level_shape(lshape, settings.control_spacing)
            control = F.interpolate(start, size=cshape, mode="trilinear", align_corners=True)
            upsample = _ControlUpsampler(cshape, lshape, device, dtype)
            upsample_box = _ControlUpsampler(cshape, lshape, device, dtype, box=similarity.box)
            basis = None
        else:
            basis = _BSplineBasis(lshape, _level_spacing_mm(shape, lshape, settings.working_spacing_mm),
                                  settings.control_spacing_mm * factor, device, dtype)
            upsample, upsample_box = basis.upsampler(), basis.upsampler(similarity.box)
            control = basis.fit(start if settings.transform == "bspline" else
                                spatial.resize_displacement(velocity, lshape))
        if settings.transform == "svf":
            outer_l = None if outer is None else spatial.resize_displacement(outer, lshape)
            level_field = _LevelField(upsample, upsample_box, box, svf_steps=settings.svf_steps, outer=outer_l)
        else:
            level_field = _LevelField(upsample, upsample_box, box, residual=start - upsample(control))
        rigid_control = None
        if rigid_mask is not None and settings.rigidity_weight:
            rigid_l = _downsample_image(rigid_mask.to(dtype), factor) > 0.5
            if basis is None:  # trilinear: control points at the corners of the level, evenly spread
                positions = tuple(torch.linspace(0, n - 1, c, device=device) for n, c in zip(lshape, control.shape[2:]))
                spacing = tuple((n - 1) / max(c - 1, 1) for n, c in zip(lshape, control.shape[2:]))
            else:  # B-spline: knot j at voxel (j - 1) * knot spacing
                positions = tuple((torch.arange(c, device=device) - 1.0) * k for c, k in zip(basis.cshape, basis.knots))
                spacing = basis.knots
            rigid_control = _control_mask(rigid_l, positions, tuple(math.ceil(h / 2) for h in spacing))
        control = control.clone().requires_grad_(True)
        objective = _LevelObjective(similarity, level_field, settings, basis, rigid_control, backward)
        optimiser = _Adam(control, lr=settings.learning_rate,
                          eps=_gradient_floor(objective, control, settings.gradient_floor))
        # Adam's steps are ~lr whatever the gradient's size: decay lr to 10% over the level so that the field
        # settles instead of jittering by ~lr voxels where the similarity gives little signal
        gamma = 0.1 ** (1.0 / max(iterations, 1))
        plateau = Plateau(patience=15, tolerance=1e-4)
        for i in range(iterations):
            control.grad = None
            loss = objective(control)
            if not torch.isfinite(loss):
                raise FloatingPointError("instance optimisation diverged (non-finite loss); lower the learning rate")
            loss.backward()
            optimiser.step()
            optimiser.lr *= gamma
            step += 1
            if callback is not None:
                callback(step, total, float(loss.detach()))
            if plateau.reached(float(loss.detach())):
                step += iterations - i - 1
                break
        with torch.no_grad():
            disp = spatial.resize_displacement(level_field(control), shape)
            if settings.transform == "svf":
                velocity = spatial.resize_displacement(upsample(control), shape)
    return disp.detach()
