"""On-the-fly training augmentation in torch (after DDMR's augmentation layer and van Eijnatten et al. 2021).

Conventions (as :mod:`deepabdominalreg.spatial`):

* images are ``(B, C, D, H, W)`` tensors on one grid; intensities are the windowed, body-masked values in [0, 1]
  of :func:`deepabdominalreg.preprocessing.prepare_working_image`;
* every displacement is ``(B, 3, D, H, W)`` in **voxels of that grid**, channels ``(d, h, w)``; a point at voxel
  ``p`` maps to ``p + disp(p)``;
* ``spacing_mm`` is the grid spacing along ``(d, h, w)`` (one number when isotropic): amplitudes are given in mm
  and converted to voxels with it;
* randomness comes only from the ``generator`` argument (a ``torch.Generator``), so a seed reproduces a pair.

Deformations: :func:`tps_displacement` (thin-plate spline, radial basis ``U(r) = r``, the 3D biharmonic kernel,
solved exactly on the control points), :func:`random_tps_displacement` (DDMR: an 8 x 8 x 8 control grid with
random displacements up to 6 mm), :func:`affine_displacement` / :func:`random_rigid_displacement` (rotation up to
10 degrees about each axis, translation up to 30 mm, about the grid centre), :func:`van_eijnatten_displacement`
(random vectors at about 100 points >= 40 mm apart inside the body, Gaussian-smoothed, peak amplitude delta).
Intensity: :func:`gamma_augment` (gamma 0.5-2, log-uniform), :func:`brightness_augment` (x (1 +- 20 %)).
:class:`PairAugmentation` combines them into a synthetic training pair whose true displacement is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepabdominalreg import spatial

__all__ = [
    "AugmentationConfig",
    "PairAugmentation",
    "affine_displacement",
    "brightness_augment",
    "gamma_augment",
    "gaussian_smooth",
    "random_rigid_displacement",
    "random_tps_displacement",
    "rotation_matrix",
    "tps_displacement",
    "van_eijnatten_displacement",
]

Spacing = float | Sequence[float]


def _spacing(spacing_mm: Spacing, device=None, dtype=torch.float32) -> torch.Tensor:
    values = [float(spacing_mm)] * 3 if isinstance(spacing_mm, (int, float)) else [float(s) for s in spacing_mm]
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"spacing_mm must be one positive value or three (d, h, w), got {spacing_mm}")
    return torch.tensor(values, device=device, dtype=dtype)


def _uniform(generator: torch.Generator | None, low: float, high: float, shape=()) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be (D, H, W) with every size >= 2, got {shape}")
    return shape


# ----------------------------------------------------------------------------------------------------------------
# thin-plate splines
# ----------------------------------------------------------------------------------------------------------------


def _tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``U(|a_i - b_j|) = |a_i - b_j|`` (3D biharmonic radial basis), ``(N, M)``."""
    return torch.cdist(a, b)


def tps_displacement(
    shape: Sequence[int],
    control_points: torch.Tensor,
    control_displacements: torch.Tensor,
    stride: int = 1,
    regularisation: float = 0.0,
) -> torch.Tensor:
    """Dense thin-plate-spline displacement ``(1, 3, D, H, W)`` (voxels) interpolating control displacements.

    ``control_points`` ``(N, 3)`` and ``control_displacements`` ``(N, 3)`` are voxel coordinates/vectors ``(d, h, w)``
    (``N >= 4``, not all coplanar).  The spline is ``f(x) = a0 + A x + sum_i w_i U(|x - c_i|)`` with ``U(r) = r``,
    solved exactly (``regularisation = 0``) so that ``f(c_i) = v_i``; affine fields are reproduced exactly.
    With ``stride > 1`` the spline is evaluated on every ``stride``-th voxel (plus the last) and trilinearly
    interpolated in between (the spline is smooth; this saves memory and time on large grids).
    """
    shape = _check_shape(shape)
    c = control_points.to(torch.float64)
    v = control_displacements.to(torch.float64)
    if c.ndim != 2 or c.shape[1] != 3 or v.shape != c.shape or c.shape[0] < 4:
        raise ValueError("control_points and control_displacements must both be (N, 3) with N >= 4")
    n = c.shape[0]
    k = _tps_kernel(c, c) + regularisation * torch.eye(n, dtype=torch.float64, device=c.device)
    p = torch.cat([torch.ones(n, 1, dtype=torch.float64, device=c.device), c], dim=1)
    system = torch.zeros(n + 4, n + 4, dtype=torch.float64, device=c.device)
    system[:n, :n] = k
    system[:n, n:] = p
    system[n:, :n] = p.T
    rhs = torch.zeros(n + 4, 3, dtype=torch.float64, device=c.device)
    rhs[:n] = v
    coefficients = torch.linalg.solve(system, rhs)
    weights, affine = coefficients[:n], coefficients[n:]

    stride = max(int(stride), 1)
    axes = []
    for s in shape:
        ax = torch.arange(0, s, stride, dtype=torch.float64, device=c.device)
        if ax[-1] != s - 1:
            ax = torch.cat([ax, torch.tensor([s - 1.0], dtype=torch.float64, device=c.device)])
        axes.append(ax)
    coarse_shape = tuple(len(a) for a in axes)
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    out = torch.empty(points.shape[0], 3, dtype=torch.float64, device=c.device)
    chunk = 65536
    for start in range(0, points.shape[0], chunk):
        q = points[start: start + chunk]
        out[start: start + chunk] = (
            _tps_kernel(q, c) @ weights + torch.cat([torch.ones(len(q), 1, dtype=q.dtype, device=q.device), q], 1)
            @ affine
        )
    field = out.reshape(*coarse_shape, 3).permute(3, 0, 1, 2).unsqueeze(0).to(torch.float32)
    if coarse_shape == shape:
        return field
    # the coarse samples are not uniformly spaced at the end (the last voxel is added): interpolate per axis
    return _interpolate_irregular(field, axes, shape)


def _interpolate_irregular(field: torch.Tensor, axes: list[torch.Tensor], shape: tuple[int, int, int]):
    """Trilinear interpolation from samples at voxel positions ``axes`` (per axis, increasing) to every voxel."""
    out = field.to(torch.float64)
    for dim, (ax, size) in enumerate(zip(axes, shape)):
        target = torch.arange(size, dtype=torch.float64, device=field.device)
        upper = torch.searchsorted(ax, target, right=False).clamp(1, len(ax) - 1)
        lower = upper - 1
        t = ((target - ax[lower]) / (ax[upper] - ax[lower])).clamp(0, 1)
        view = [1, 1, 1, 1, 1]
        view[dim + 2] = size
        a = out.index_select(dim + 2, lower)
        b = out.index_select(dim + 2, upper)
        out = a + (b - a) * t.view(view)
    return out.to(field.dtype)


def random_tps_displacement(
    shape: Sequence[int],
    spacing_mm: Spacing = 1.0,
    *,
    grid_points: int = 8,
    max_displacement_mm: float = 6.0,
    generator: torch.Generator | None = None,
    stride: int = 4,
) -> torch.Tensor:
    """DDMR's random TPS deformation: a ``grid_points``³ control grid spanning the volume (corner to corner),
    each control point displaced by a vector with components uniform in ``[-max, max]`` mm; ``(1, 3, D, H, W)`` voxels.

    The dense field interpolates the control vectors (so its largest component is about ``max_displacement_mm``).
    """
    shape = _check_shape(shape)
    if grid_points < 2 or max_displacement_mm < 0:
        raise ValueError("grid_points >= 2 and max_displacement_mm >= 0 are required")
    axes = [torch.linspace(0, s - 1, grid_points, dtype=torch.float64) for s in shape]
    control = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    vectors_mm = _uniform(generator, -max_displacement_mm, max_displacement_mm, (control.shape[0], 3))
    vectors_vox = vectors_mm / _spacing(spacing_mm, dtype=torch.float64)
    return tps_displacement(shape, control, vectors_vox, stride=stride)


# ----------------------------------------------------------------------------------------------------------------
# rigid / affine
# ----------------------------------------------------------------------------------------------------------------


def rotation_matrix(angles_deg: Sequence[float]) -> torch.Tensor:
    """Rotation ``R = R_d R_h R_w`` (``(3, 3)`` float64) by ``angles_deg`` about the ``d``, ``h``, ``w`` axes."""
    a = [math.radians(float(x)) for x in angles_deg]

    def rot(i: int, j: int, t: float) -> torch.Tensor:
        m = torch.eye(3, dtype=torch.float64)
        m[i, i] = m[j, j] = math.cos(t)
        m[i, j], m[j, i] = -math.sin(t), math.sin(t)
        return m

    return rot(1, 2, a[0]) @ rot(0, 2, a[1]) @ rot(0, 1, a[2])


def affine_displacement(
    shape: Sequence[int],
    matrix: torch.Tensor,
    translation_mm: Sequence[float] = (0.0, 0.0, 0.0),
    spacing_mm: Spacing = 1.0,
    centre_vox: Sequence[float] | None = None,
) -> torch.Tensor:
    """Displacement ``(1, 3, D, H, W)`` (voxels) of the physical map ``x -> M (x - c) + c + t`` (mm, ``(d, h, w)``).

    ``matrix`` ``M`` ``(3, 3)`` acts on mm coordinates (e.g. :func:`rotation_matrix`), ``c`` is the grid centre
    unless ``centre_vox`` is given (voxels), ``t`` is ``translation_mm``.
    """
    shape = _check_shape(shape)
    s = _spacing(spacing_mm, dtype=torch.float64)
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.shape != (3, 3):
        raise ValueError(f"matrix must be (3, 3), got {tuple(m.shape)}")
    centre = torch.tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float64) if centre_vox is None else \
        torch.as_tensor(centre_vox, dtype=torch.float64)
    t_vox = torch.as_tensor(translation_mm, dtype=torch.float64) / s
    m_vox = torch.diag(1.0 / s) @ m @ torch.diag(s)  # voxel-space matrix of the mm map
    grid = spatial.identity_grid(shape, dtype=torch.float64)[0].reshape(3, -1)  # (3, N) voxels
    moved = m_vox @ (grid - centre[:, None]) + centre[:, None] + t_vox[:, None]
    return (moved - grid).reshape(1, 3, *shape).to(torch.float32)


def random_rigid_displacement(
    shape: Sequence[int],
    spacing_mm: Spacing = 1.0,
    *,
    max_rotation_deg: float = 10.0,
    max_translation_mm: float = 30.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random rigid motion about the grid centre: angles uniform in ``[-max, max]`` degrees about each axis,
    translation components uniform in ``[-max, max]`` mm; ``(1, 3, D, H, W)`` voxels."""
    angles = _uniform(generator, -max_rotation_deg, max_rotation_deg, (3,))
    translation = _uniform(generator, -max_translation_mm, max_translation_mm, (3,))
    return affine_displacement(shape, rotation_matrix(angles.tolist()), translation.tolist(), spacing_mm)


# ----------------------------------------------------------------------------------------------------------------
# van Eijnatten random fields
# ----------------------------------------------------------------------------------------------------------------


def gaussian_smooth(x: torch.Tensor, sigma_vox: Sequence[float] | float, truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, C, D, H, W)`` with zero padding; ``sigma_vox`` per axis (voxels).

    Weights are normalised to 1 (a constant far from the borders is unchanged; the zero padding pulls the
    borders towards 0, which keeps a random field vanishing outside the volume).
    """
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, D, H, W), got {tuple(x.shape)}")
    sigmas = [float(sigma_vox)] * 3 if isinstance(sigma_vox, (int, float)) else [float(s) for s in sigma_vox]
    channels = x.shape[1]
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        radius = max(math.ceil(truncate * sigma), 1)
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = kernel / kernel.sum()
        view = [1, 1, 1]
        view[axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        x = F.conv3d(x, kernel.view(1, 1, *view).expand(channels, 1, *view), padding=tuple(padding), groups=channels)
    return x


def van_eijnatten_displacement(
    mask: torch.Tensor,
    spacing_mm: Spacing = 1.0,
    *,
    amplitude_mm: float = 10.0,
    n_points: int = 100,
    min_distance_mm: float = 40.0,
    sigma_mm: float = 25.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """van Eijnatten et al. 2021 simulated deformation, ``(1, 3, D, H, W)`` voxels, on the grid of ``mask``.

    ``mask`` ``(D, H, W)`` or ``(1, 1, D, H, W)`` (bool, e.g. the body): up to ``n_points`` voxels of the mask,
    drawn in random order and kept when at least ``min_distance_mm`` from every point kept so far, get a random
    vector (components uniform in [-1, 1]); the sparse field is smoothed by a Gaussian of ``sigma_mm`` and scaled
    so that its largest displacement (Euclidean norm, mm) is ``amplitude_mm``.  An empty mask gives zeros.
    """
    m = mask.reshape(mask.shape[-3:]).bool()
    shape = tuple(m.shape)
    s = _spacing(spacing_mm, device=mask.device)
    field = torch.zeros(1, 3, *shape, device=mask.device)
    candidates = torch.nonzero(m)
    if candidates.numel() == 0 or amplitude_mm == 0:
        return field
    order = torch.randperm(len(candidates), generator=generator)
    # greedy selection in random order (a candidate is kept when no kept point is closer than the minimum
    # distance), done as: keep the first remaining candidate, drop every remaining one too close to it, repeat;
    # the same points as the one-by-one loop, in at most n_points vectorised steps (on the CPU)
    remaining = (candidates.cpu()[order].numpy() * s.cpu().numpy()).astype(np.float32)
    remaining_index = order.numpy()
    chosen: list[int] = []
    while len(remaining) and len(chosen) < n_points:
        chosen.append(int(remaining_index[0]))
        far = np.linalg.norm(remaining - remaining[0], axis=1) >= min_distance_mm
        far[0] = False  # the kept point itself (also when the minimum distance is 0)
        remaining, remaining_index = remaining[far], remaining_index[far]
    vectors = _uniform(generator, -1.0, 1.0, (len(chosen), 3)).to(torch.float32).to(mask.device)
    idx = candidates[chosen]
    field[0, :, idx[:, 0], idx[:, 1], idx[:, 2]] = vectors.T
    field = gaussian_smooth(field, (sigma_mm / s).tolist())
    field_mm = field * s.view(1, 3, 1, 1, 1)
    peak = torch.linalg.norm(field_mm, dim=1).max()
    if peak <= 0:
        return torch.zeros_like(field)
    return field * (float(amplitude_mm) / peak)


# ----------------------------------------------------------------------------------------------------------------
# intensity
# ----------------------------------------------------------------------------------------------------------------


def gamma_augment(
    image: torch.Tensor,
    gamma_range: tuple[float, float] = (0.5, 2.0),
    generator: torch.Generator | None = None,
    gamma: float | None = None,
) -> torch.Tensor:
    """``image ** gamma`` for intensities in [0, 1]; ``gamma`` log-uniform in ``gamma_range`` unless given.

    0 and 1 are fixed points, so the body mask (0 outside) and the window's top are kept.
    """
    if gamma is None:
        lo, hi = math.log(gamma_range[0]), math.log(gamma_range[1])
        gamma = math.exp(float(_uniform(generator, lo, hi)))
    return image.clamp(0.0, 1.0).pow(gamma)


def brightness_augment(
    image: torch.Tensor,
    max_change: float = 0.2,
    generator: torch.Generator | None = None,
    factor: float | None = None,
) -> torch.Tensor:
    """Multiply by ``1 + b`` with ``b`` uniform in ``[-max_change, max_change]`` (default +-20 %), clip to [0, 1].

    Multiplicative, so the masked background stays 0.
    """
    if factor is None:
        factor = 1.0 + float(_uniform(generator, -max_change, max_change))
    return (image * factor).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# the augmentation layer
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentationConfig:
    """Settings of :class:`PairAugmentation` (mm, degrees; probabilities in [0, 1])."""

    tps_probability: float = 1.0
    tps_grid_points: int = 8
    tps_max_displacement_mm: float = 6.0
    van_eijnatten_probability: float = 0.5
    van_eijnatten_amplitude_mm: tuple[float, float] = (2.0, 10.0)
    """Peak amplitude delta, uniform in this range."""
    van_eijnatten_points: int = 100
    van_eijnatten_min_distance_mm: float = 40.0
    van_eijnatten_sigma_mm: float = 25.0
    prior_field_scale: tuple[float, float] = (0.0, 1.5)
    """A precomputed realistic field (e.g. synthetic abdominal motion) is multiplied by a factor in this range."""
    rigid_probability: float = 0.5
    max_rotation_deg: float = 10.0
    max_translation_mm: float = 30.0
    base_tps_probability: float = 0.3
    """Deform the base volume itself first (new anatomy variant), so the moving image is not always undeformed."""
    gamma_probability: float = 0.5
    gamma_range: tuple[float, float] = (0.5, 2.0)
    brightness_probability: float = 0.5
    brightness_max_change: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.03)
    """Gaussian noise standard deviation (intensity units), uniform in this range, inside the body."""

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> AugmentationConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown augmentation settings {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class PairAugmentation(nn.Module):
    """Makes a synthetic training pair from one volume, keeping the true displacement (DDMR's augmentation layer).

    ``forward(image, labels, mask, spacing_mm, prior_field=None, generator=None)`` with ``image``
    ``(1, 1, D, H, W)`` in [0, 1], ``labels`` ``(1, L, D, H, W)`` float (a label map with integer values, or one-hot;
    warped with nearest-neighbour interpolation; or ``None``), ``mask`` ``(1, 1, D, H, W)``
    and an optional realistic ``prior_field`` ``(1, 3, D, H, W)`` (voxels) returns a dict: ``moving`` (the base,
    possibly deformed first), ``fixed`` = moving warped by ``disp`` (``fixed(p) = moving(p + disp(p))``), both with
    independent intensity augmentation and noise, ``moving_labels``/``fixed_labels``, ``moving_mask``/``fixed_mask``
    and ``disp`` — the ground-truth fixed-to-moving displacement (voxels), exactly what a network should predict.
    """

    def __init__(self, config: AugmentationConfig = AugmentationConfig()) -> None:
        super().__init__()
        self.config = config

    def _coin(self, p: float, generator) -> bool:
        return p > 0 and float(torch.rand((), generator=generator)) < p

    def random_field(self, mask: torch.Tensor, spacing_mm: Spacing, prior_field: torch.Tensor | None,
                     generator: torch.Generator | None) -> torch.Tensor:
        """The deformable + rigid displacement of one pair (voxels, ``(1, 3, D, H, W)``)."""
        c = self.config
        shape = tuple(mask.shape[-3:])
        disp = torch.zeros(1, 3, *shape, device=mask.device)
        if prior_field is not None:
            disp = disp + prior_field * float(_uniform(generator, *c.prior_field_scale))
        if self._coin(c.tps_probability, generator):
            disp = disp + random_tps_displacement(shape, spacing_mm, grid_points=c.tps_grid_points,
                                                  max_displacement_mm=c.tps_max_displacement_mm,
                                                  generator=generator).to(mask.device)
        if self._coin(c.van_eijnatten_probability, generator):
            disp = disp + van_eijnatten_displacement(
                mask, spacing_mm, amplitude_mm=float(_uniform(generator, *c.van_eijnatten_amplitude_mm)),
                n_points=c.van_eijnatten_points, min_distance_mm=c.van_eijnatten_min_distance_mm,
                sigma_mm=c.van_eijnatten_sigma_mm, generator=generator)
        if self._coin(c.rigid_probability, generator):
            rigid = random_rigid_displacement(shape, spacing_mm, max_rotation_deg=c.max_rotation_deg,
                                              max_translation_mm=c.max_translation_mm,
                                              generator=generator).to(mask.device)
            disp = spatial.compose(rigid, disp)  # deformation first, then the rigid motion
        return disp

    def intensity(self, image: torch.Tensor, mask: torch.Tensor, generator) -> torch.Tensor:
        c = self.config
        if self._coin(c.gamma_probability, generator):
            image = gamma_augment(image, c.gamma_range, generator)
        if self._coin(c.brightness_probability, generator):
            image = brightness_augment(image, c.brightness_max_change, generator)
        sigma = float(_uniform(generator, *c.noise_std))
        if sigma > 0:
            noise = torch.randn(image.shape, generator=generator).to(image.device) * sigma
            image = (image + noise * mask).clamp(0.0, 1.0)
        return image

    def forward(self, image, labels, mask, spacing_mm, prior_field=None, generator=None) -> dict:
        c = self.config
        mask = mask.to(image.dtype)
        if self._coin(c.base_tps_probability, generator):
            base = random_tps_displacement(tuple(image.shape[-3:]), spacing_mm, grid_points=c.tps_grid_points,
                                           max_displacement_mm=c.tps_max_displacement_mm,
                                           generator=generator).to(image.device)
            image = spatial.warp(image, base)
            mask = (spatial.warp(mask, base) > 0.5).to(image.dtype)
            if labels is not None:
                labels = spatial.warp(labels, base, mode="nearest")
        disp = self.random_field(mask, spacing_mm, prior_field, generator)
        fixed = spatial.warp(image, disp)
        fixed_mask = (spatial.warp(mask, disp) > 0.5).to(image.dtype)
        fixed = fixed * fixed_mask
        out = {
            "moving": self.intensity(image, mask, generator),
            "fixed": self.intensity(fixed, fixed_mask, generator),
            "moving_mask": mask,
            "fixed_mask": fixed_mask,
            "disp": disp,
            "moving_labels": labels,
            "fixed_labels": None if labels is None else spatial.warp(labels, disp, mode="nearest"),
        }
        return out
