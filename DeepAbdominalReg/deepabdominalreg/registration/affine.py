"""Affine pre-alignment: centre-of-mass initialisation, then a multi-level affine optimisation in torch (local NCC).

The result is an ITK affine transform in LPS mm that maps **fixed** points to **moving** points:
``y = L (x - c) + c + t`` (``sitk.AffineTransform`` with matrix ``L``, translation ``t`` and centre ``c``).  The
linear part is parameterised as ``L = R exp(S)`` (rotation ``R = exp([w]x)``, symmetric log-stretch ``S``: its
diagonal the log-scales, its off-diagonal entries the shears) with box bounds on the scales and shears, so that
``det L = exp(trace S)`` stays positive and bounded: the affine can neither reflect nor collapse, whatever the
images (a mirrored scan, an empty overlap, another body part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.optimize import minimize

from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.geometry import Grid, make_working_grid, mask_bounding_box, resample_image
from deepabdominalreg.nn.losses import local_ncc_loss, local_statistics
from deepabdominalreg.spatial import normalising_scale

__all__ = ["NCC_WINDOW_VOXELS", "AffineSettings", "centre_of_mass_lps", "downsample_working", "linear_part",
           "optimise_affine"]


def centre_of_mass_lps(grid: Grid, weights_zyx: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre of mass of a ``zyx`` array on ``grid``, in LPS mm."""
    total = float(weights_zyx.sum())
    if total <= 0:
        centre_index = (np.asarray(grid.size, dtype=np.float64) - 1) / 2
        return grid.index_to_physical(centre_index)[0]
    com_zyx = np.asarray(ndimage.center_of_mass(weights_zyx), dtype=np.float64)
    return grid.index_to_physical(com_zyx[::-1])[0]


def downsample_working(
    grid: Grid, intensity_zyx: np.ndarray, spacing_mm: float, field_of_view_zyx: np.ndarray | None = None
) -> tuple[Grid, np.ndarray, np.ndarray]:
    """Gaussian-smooth and resample an intensity array onto a coarser isotropic grid of ``spacing_mm``.

    Returns the coarse grid, its intensities and its field-of-view mask (voxels that hold image data; the coarse
    grid covers the fine one, so its border voxels may lie outside it).  Nothing is resampled when ``spacing_mm``
    is not coarser than the grid's own spacing.
    """
    fov = np.ones(intensity_zyx.shape, bool) if field_of_view_zyx is None else field_of_view_zyx.astype(bool)
    factor = float(spacing_mm) / grid.spacing[0]
    if factor <= 1.0 + 1e-6:
        return grid, intensity_zyx, fov
    coarse = make_working_grid(grid, float(spacing_mm))
    smoothed = ndimage.gaussian_filter(intensity_zyx.astype(np.float32), sigma=factor / 2.0)
    resampled = resample_image(grid.image_from_array(smoothed), coarse, interpolator="linear")
    coarse_fov = resample_image(grid.image_from_array(fov.astype(np.uint8)), coarse, interpolator="nearest")
    return coarse, sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(coarse_fov).astype(bool)


def _box_index_axes(grid: Grid, box: tuple[slice, slice, slice], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LPS mm of the voxel centres of ``grid``'s ``zyx`` sub-box ``box`` as an affine map of voxel indices:
    ``(P, p, i, j, k)`` with ``P`` (3 x 3, columns for the axes i, j, k), ``p`` the box's first voxel and ``i``, ``j``,
    ``k`` the index offsets within the box, shaped to broadcast over ``(D, H, W, 1)``: voxel ``(k, j, i)`` of the box
    is at ``P[:, 0] i + P[:, 1] j + P[:, 2] k + p``."""
    m = grid.index_to_physical_matrix()
    start = np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)  # x, y, z
    matrix = torch.as_tensor(m[:3, :3], dtype=torch.float32, device=device)
    first = torch.as_tensor(m[:3, :3] @ start + m[:3, 3], dtype=torch.float32, device=device)
    axes = [torch.arange(b.stop - b.start, dtype=torch.float32, device=device) for b in box]  # z, y, x
    return (matrix, first, axes[2].view(1, 1, -1, 1), axes[1].view(1, -1, 1, 1), axes[0].view(-1, 1, 1, 1))


def _box_of(mask_zyx: np.ndarray) -> np.ndarray | None:
    """``[[lo, hi], ...]`` voxel-index bounds (order x, y, z) when the ``True`` voxels of ``mask_zyx`` fill their
    bounding box exactly (a scan's field of view on a grid with the scan's axes), else ``None``."""
    box = mask_bounding_box(mask_zyx)
    if box is None or not mask_zyx[box].all():
        return None
    return np.array([[b.start, b.stop - 1] for b in reversed(box)], dtype=np.float64)


def _inside_box(coordinates: torch.Tensor, bounds_normalised: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What ``grid_sample`` (trilinear, zero padding, ``align_corners=True``) of a 0/1 mask that is 1 exactly on
    a box gives at ``coordinates`` ``(1, D, H, W, 3)``: the product over the axes of one minus the distance outside
    the box in voxels (clamped to [0, 1]).  ``bounds_normalised`` ``(2, 3)``: the box's first and last voxel in
    ``grid_sample`` coordinates; ``scale`` ``(3,)``: normalised units per voxel.  Returns ``(1, 1, D, H, W)``."""
    below = (bounds_normalised[0] - coordinates).div_(scale).clamp_(0.0, 1.0)
    above = (coordinates - bounds_normalised[1]).div_(scale).clamp_(0.0, 1.0)
    return (1.0 - below - above).prod(dim=-1).unsqueeze(1)


def _informative_box(intensity_zyx: np.ndarray, fov_zyx: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """``zyx`` slices of the bounding box of the voxels inside ``fov_zyx`` with intensity > 0 (the body after
    windowing and masking), grown by ``margin`` voxels; the whole grid when there are none."""
    return mask_bounding_box(fov_zyx & (intensity_zyx > 0), margin, whole_if_empty=True)


def _index_normalisation(moving_grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, r)``: LPS mm -> ``grid_sample`` coordinates (normalised voxel index, ``align_corners=True``, order
    ``x, y, z``) on ``moving_grid`` is ``p -> R p + r``."""
    m = np.asarray(moving_grid.physical_to_index_matrix(), dtype=np.float64)
    scale = normalising_scale(moving_grid.size, dtype=torch.float64).numpy()
    rotation = scale[:, None] * m[:3, :3]
    offset = scale * m[:3, 3] - 1.0
    return (torch.as_tensor(rotation, dtype=torch.float32, device=device),
            torch.as_tensor(offset, dtype=torch.float32, device=device))


_LINE_SEARCH_STEPS = 5
"""L-BFGS-B line-search steps per iteration (scipy's default: 20).  The NCC of trilinearly sampled images has kinks
where samples cross voxel faces (for a pure translation all of them at once), where the gradient does not predict
the function: long line searches there spend many evaluations per iteration for nothing.  A short cap saves those
evaluations and reaches the same final loss and the same accuracy after the deformable stages (validated on the
validation and benchmark pairs: ``benchmarks/README.md``, "Performance history")."""


NCC_WINDOW_VOXELS = 5
"""Local NCC window of the affine objective, in voxels of each pyramid level (60 mm at 12 mm, 30 mm at 6 mm): it
scales with the level by design, so it is a constant of the method rather than a setting."""


@dataclass(frozen=True)
class AffineSettings:
    """The affine stage's settings, from :meth:`from_config` (``RegistrationConfig.affine_*``)."""

    levels_mm: tuple[float, ...]
    """Isotropic spacing (mm) of the pyramid levels, coarse to fine."""
    iterations: tuple[int, ...]
    """L-BFGS iterations, one count per level (0 at every level: the centre-of-mass translation alone)."""
    ncc_window: int
    """Local NCC window (odd), in voxels of each level's grid."""
    max_scale: float = 1.5
    """Each scale factor ``exp(S_ii)`` of the linear part lies in ``[1 / max_scale, max_scale]``."""
    max_shear: float = 0.3
    """Each shear ``S_ij`` (i != j) of the linear part lies in ``[-max_shear, max_shear]``."""

    def __post_init__(self) -> None:
        if len(self.iterations) != len(self.levels_mm):
            raise ValueError(f"one iteration count per affine level: {self.iterations} for {self.levels_mm}")
        if not self.max_scale >= 1.0 or not self.max_shear >= 0.0:
            raise ValueError(f"affine bounds need max_scale >= 1 and max_shear >= 0, got {self.max_scale}, "
                             f"{self.max_shear}")

    @classmethod
    def from_config(cls, config: RegistrationConfig) -> AffineSettings:
        levels = tuple(float(level) for level in config.affine_levels_mm)
        return cls(levels_mm=levels, iterations=(int(config.affine_iterations),) * len(levels),
                   ncc_window=NCC_WINDOW_VOXELS, max_scale=float(config.affine_max_scale),
                   max_shear=float(config.affine_max_shear))

    def bounds(self) -> list[tuple[float | None, float | None]]:
        """L-BFGS-B bounds of the 12 parameters (shift, rotation vector, log-scales, shears: :func:`linear_part`)."""
        log_scale, shear = float(np.log(self.max_scale)), float(self.max_shear) * _SQRT2
        return [(None, None)] * 6 + [(-log_scale, log_scale)] * 3 + [(-shear, shear)] * 3


_SQRT2 = float(np.sqrt(2.0))


def linear_part(parameters: torch.Tensor) -> torch.Tensor:
    """The affine's linear part ``R exp(S)`` from its 9 parameters ``(a, sigma, b)`` (each 3; differentiable):
    ``R = exp([w]x)`` with rotation vector ``w = a / sqrt(2)`` (radians) and the symmetric ``S`` with diagonal
    ``sigma`` (log-scales) and off-diagonal ``(S01, S02, S12) = b / sqrt(2)`` (shears).  ``det = exp(sum(sigma))
    > 0``; all zeros give the identity.  The ``1 / sqrt(2)`` makes the map from the parameters to the matrix
    orthonormal to first order (``I + [w]x + S``: skew and symmetric parts are orthogonal), as the plain entries
    of ``L - I`` are: L-BFGS sees the same problem near the identity as with a free matrix."""
    w, sigma, h = parameters[0:3] / _SQRT2, parameters[3:6], parameters[6:9] / _SQRT2
    zero = torch.zeros((), dtype=parameters.dtype, device=parameters.device)
    skew = torch.stack([torch.stack([zero, -w[2], w[1]]), torch.stack([w[2], zero, -w[0]]),
                        torch.stack([-w[1], w[0], zero])])
    stretch = torch.stack([torch.stack([sigma[0], h[0], h[1]]), torch.stack([h[0], sigma[1], h[2]]),
                           torch.stack([h[1], h[2], sigma[2]])])
    return torch.linalg.matrix_exp(skew) @ torch.linalg.matrix_exp(stretch)


def optimise_affine(
    fixed_grid: Grid,
    fixed_intensity: np.ndarray,
    moving_grid: Grid,
    moving_intensity: np.ndarray,
    settings: AffineSettings,
    *,
    device: torch.device | str = "cpu",
    fixed_field_of_view: np.ndarray | None = None,
    moving_field_of_view: np.ndarray | None = None,
    initial_translation_mm: np.ndarray | None = None,
    callback: Callable[[int, int, float], None] | None = None,
) -> sitk.AffineTransform:
    """Affine transform (fixed -> moving, LPS mm) aligning two working images (``zyx`` intensities in [0, 1]).

    Starts from ``initial_translation_mm`` (fixed -> moving, LPS mm; e.g. :func:`initialisation.search_offset`'s)
    or else the centre-of-mass translation, then refines a translation (coarsest level) and a full affine
    (12 parameters: :func:`linear_part`, scales and shears within ``settings``' bounds, finer levels) with
    L-BFGS-B on local NCC at each pyramid level, of isotropic spacing
    ``settings.levels_mm`` (mm; a level finer than the
    working grids runs at the working spacing).  The level spacing, not the working spacing, sets the precision:
    about a tenth of a level voxel.  The similarity counts only voxels inside both fields of view
    (``*_field_of_view``: ``zyx`` bool masks of voxels holding image data; default all), so that padding at the
    border of either scan, or a different scan extent, does not bias the result.
    ``callback(iteration, total, loss)`` is called every iteration (it may raise to cancel).
    """
    levels_mm, ncc_window = settings.levels_mm, settings.ncc_window
    device = torch.device(device)
    centre = centre_of_mass_lps(fixed_grid, fixed_intensity)
    if initial_translation_mm is None:
        translation0 = centre_of_mass_lps(moving_grid, moving_intensity) - centre
    else:
        translation0 = np.asarray(initial_translation_mm, dtype=np.float64).reshape(3)
    # parameters: shift (3, in units of translation_scale mm) then the linear part's (9: linear_part), bounded
    x = np.zeros(12, dtype=np.float64)
    bounds = settings.bounds()
    c = torch.as_tensor(centre, dtype=torch.float32, device=device)
    t0 = torch.as_tensor(translation0, dtype=torch.float32, device=device)
    translation_scale = 10.0  # mm per unit of the shift parameter: comparable scales for shift and linear part
    per_level = list(settings.iterations)
    total = sum(per_level)
    step = 0
    if total > 0:
        for level_index, level_mm in enumerate(levels_mm):
            if per_level[level_index] <= 0:
                continue
            f_grid, f_img, f_fov = downsample_working(fixed_grid, fixed_intensity, level_mm, fixed_field_of_view)
            m_grid, m_img, m_fov = downsample_working(moving_grid, moving_intensity, level_mm, moving_field_of_view)
            # the similarity is computed on the bounding box of the fixed field of view's informative part (body
            # and its surroundings, grown by the NCC window) only: the rest of the grid is air outside the body
            box = _informative_box(f_img, f_fov, margin=ncc_window)
            fixed_t = torch.as_tensor(np.ascontiguousarray(f_img[box]), device=device)[None, None]
            fixed_fov_t = torch.as_tensor(np.ascontiguousarray(f_fov[box]), device=device)[None, None]
            # the fixed image's local mean and variance do not change between evaluations
            fixed_mean, fixed_variance = local_statistics(fixed_t, ncc_window)
            moving_t = torch.as_tensor(m_img, device=device)[None, None]
            moving_fov_t = torch.as_tensor(m_fov.astype(np.float32), device=device)[None, None]  # 1 inside the scan
            index_map = _box_index_axes(f_grid, box, device)
            to_moving_index, moving_index_offset = _index_normalisation(m_grid, device)
            # a moving field of view that fills a box of its grid (the usual case: the working grid has the scan's
            # axes) is tested from the sampling coordinates themselves instead of by sampling the mask
            fov_box, fov_test = _box_of(m_fov), None
            if fov_box is not None:  # (the box's first and last voxel, normalised units per voxel)
                scale = normalising_scale(m_grid.size, dtype=torch.float64).numpy()
                fov_test = (torch.as_tensor(fov_box.T * scale - 1.0, dtype=torch.float32, device=device),
                            torch.as_tensor(scale, dtype=torch.float32, device=device))
            # the coarsest level is translation only (as elastix starts with a translation): with few voxels a
            # free linear part drifts into scaling/shear that the finer levels must undo
            n_free = 3 if (level_index == 0 and len(levels_mm) > 1) else 12

            def objective(free: np.ndarray, n_free: int = n_free, index_map: tuple = index_map,
                          fov_test: tuple | None = fov_test,
                          moving_t: torch.Tensor = moving_t, moving_fov_t: torch.Tensor = moving_fov_t,
                          to_moving_index: torch.Tensor = to_moving_index,
                          moving_index_offset: torch.Tensor = moving_index_offset,
                          fixed_t: torch.Tensor = fixed_t, fixed_fov_t: torch.Tensor = fixed_fov_t,
                          fixed_mean: torch.Tensor = fixed_mean, fixed_variance: torch.Tensor = fixed_variance,
                          ) -> tuple[float, np.ndarray]:
                """Loss and gradient of the free parameters at ``free`` (float64, as scipy wants them)."""
                nonlocal step
                params = torch.zeros(12, dtype=torch.float32, device=device)
                params[:n_free] = torch.as_tensor(free, dtype=torch.float32, device=device)
                params.requires_grad_(True)
                shift, matrix = params[:3], linear_part(params[3:])
                # fixed voxel (i, j, k) -> LPS x = P (i, j, k) + p -> moving LPS y = matrix (x - c) + c + t0 + scale
                # shift -> sampling coordinates R y + r: one affine map of the voxel index, evaluated as a sum of
                # per-axis terms broadcast over the box (no per-voxel matrix product)
                weight = to_moving_index @ matrix
                bias = to_moving_index @ (c + t0 + translation_scale * shift - matrix @ c) + moving_index_offset
                index_matrix, first, i, j, k = index_map
                per_axis = weight @ index_matrix  # (3, 3): coordinate change per voxel along i, j, k
                offset = weight @ first + bias
                coordinates = ((k * per_axis[:, 2] + j * per_axis[:, 1]) + (i * per_axis[:, 0] + offset)).unsqueeze(0)
                sampled = F.grid_sample(moving_t, coordinates, mode="bilinear", padding_mode="zeros",
                                        align_corners=True)
                # similarity over the overlap of the two fields of view only (scans of different extent); the
                # field of view is sampled apart, without autograd, so that the backward pass handles one channel
                with torch.no_grad():
                    if fov_test is not None:
                        inside = _inside_box(coordinates.detach(), *fov_test)
                    else:
                        inside = F.grid_sample(moving_fov_t, coordinates, mode="bilinear", padding_mode="zeros",
                                               align_corners=True)
                overlap = (fixed_fov_t & (inside > 0.999)).to(sampled.dtype)
                loss = local_ncc_loss(fixed_t, sampled, ncc_window, mask=overlap,
                                      fixed_statistics=(fixed_mean, fixed_variance))
                if not torch.isfinite(loss):
                    raise FloatingPointError("affine optimisation diverged (non-finite loss)")
                loss.backward()
                step = min(step + 1, total)
                if callback is not None:
                    callback(step, total, float(loss.detach()))
                return float(loss.detach()), params.grad[:n_free].double().cpu().numpy()

            # L-BFGS with a line search converges to the optimum and stays there; Adam's normalised steps keep
            # jittering by ~lr around it, which for a 12-parameter problem costs millimetres at the image corners.
            # scipy's L-BFGS-B rather than torch.optim.LBFGS: the latter's first step imports torch._dynamo, a slow
            # import paid by every fresh process
            result = minimize(objective, x[:n_free], jac=True, method="L-BFGS-B", bounds=bounds[:n_free],
                              options={"maxiter": per_level[level_index],
                                       "maxfun": int(per_level[level_index] * 1.5),
                                       "maxcor": 10, "ftol": 1e-6, "gtol": 1e-5,
                                       "maxls": _LINE_SEARCH_STEPS})
            x[:n_free] = result.x
            step = sum(per_level[: level_index + 1])
    matrix = linear_part(torch.as_tensor(x[3:], dtype=torch.float64)).numpy()
    translation = translation0 + translation_scale * x[:3]
    transform = sitk.AffineTransform(3)
    transform.SetCenter([float(v) for v in centre])
    transform.SetMatrix([float(v) for v in matrix.ravel()])
    transform.SetTranslation([float(v) for v in translation])
    return transform
