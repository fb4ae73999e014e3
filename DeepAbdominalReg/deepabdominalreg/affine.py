"""Affine pre-alignment: centre-of-mass initialisation, then a multi-level affine optimisation in torch (local NCC).

The result is an ITK affine transform in LPS mm that maps **fixed** points to **moving** points:
``y = L (x - c) + c + t`` (``sitk.AffineTransform`` with matrix ``L``, translation ``t`` and centre ``c``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from deepabdominalreg.image import Grid, make_working_grid, resample_image
from deepabdominalreg.losses import local_ncc_loss

__all__ = ["centre_of_mass_lps", "optimise_affine", "downsample_working", "Plateau"]


def centre_of_mass_lps(grid: Grid, weights_zyx: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre of mass of a ``zyx`` array on ``grid``, in LPS mm."""
    total = float(weights_zyx.sum())
    if total <= 0:
        centre_index = (np.asarray(grid.size, dtype=np.float64) - 1) / 2
        return grid.index_to_physical(centre_index)[0]
    com_zyx = np.asarray(ndimage.center_of_mass(weights_zyx), dtype=np.float64)
    return grid.index_to_physical(com_zyx[::-1])[0]


def downsample_working(grid: Grid, intensity_zyx: np.ndarray, spacing_mm: float) -> tuple[Grid, np.ndarray]:
    """Gaussian-smooth and resample an intensity array onto a coarser isotropic grid of ``spacing_mm``.

    Nothing happens when ``spacing_mm`` is not coarser than the grid's own spacing.
    """
    factor = float(spacing_mm) / grid.spacing[0]
    if factor <= 1.0 + 1e-6:
        return grid, intensity_zyx
    coarse = make_working_grid(grid, float(spacing_mm))
    smoothed = ndimage.gaussian_filter(intensity_zyx.astype(np.float32), sigma=factor / 2.0)
    resampled = resample_image(grid.image_from_array(smoothed), coarse, interpolator="linear")
    return coarse, sitk.GetArrayFromImage(resampled)


def _physical_points(grid: Grid, device: torch.device) -> torch.Tensor:
    """LPS mm of every voxel centre of ``grid``: ``(D, H, W, 3)``."""
    size = grid.size
    k, j, i = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(np.float64)
    points = grid.index_to_physical(index).reshape(size[2], size[1], size[0], 3)
    return torch.as_tensor(points, dtype=torch.float32, device=device)


def _sample_moving(
    moving: torch.Tensor, moving_grid: Grid, points_lps: torch.Tensor
) -> torch.Tensor:
    """Sample ``moving`` ``(1, 1, d, h, w)`` on ``moving_grid`` at LPS points ``(D, H, W, 3)``; zero outside."""
    m = torch.as_tensor(moving_grid.physical_to_index_matrix(), dtype=torch.float32, device=points_lps.device)
    index = points_lps @ m[:3, :3].T + m[:3, 3]
    size = torch.tensor(moving_grid.size, dtype=torch.float32, device=points_lps.device)
    normalised = index * (2.0 / (size - 1).clamp_min(1)) - 1.0
    return F.grid_sample(moving, normalised.unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=True)


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


def optimise_affine(
    fixed_grid: Grid,
    fixed_intensity: np.ndarray,
    moving_grid: Grid,
    moving_intensity: np.ndarray,
    *,
    levels_mm: tuple[float, ...] = (12.0, 6.0),
    iterations: int = 80,
    device: torch.device | str = "cpu",
    optimise: bool = True,
    ncc_window: int = 5,
    callback: Callable[[int, int, float], None] | None = None,
) -> sitk.AffineTransform:
    """Affine transform (fixed -> moving, LPS mm) aligning two working images (``zyx`` intensities in [0, 1]).

    Starts from the centre-of-mass translation; with ``optimise`` it then refines a full affine (12 parameters)
    with Adam on local NCC at each pyramid level, of isotropic spacing ``levels_mm`` (mm; a level finer than the
    working grids runs at the working spacing).  The level spacing, not the working spacing, sets the precision:
    about a tenth of a level voxel.
    ``callback(iteration, total, loss)`` is called every iteration (it may raise to cancel).
    """
    device = torch.device(device)
    centre = centre_of_mass_lps(fixed_grid, fixed_intensity)
    translation0 = centre_of_mass_lps(moving_grid, moving_intensity) - centre
    linear = torch.zeros(3, 3, dtype=torch.float32, device=device, requires_grad=True)
    shift = torch.zeros(3, dtype=torch.float32, device=device, requires_grad=True)
    c = torch.as_tensor(centre, dtype=torch.float32, device=device)
    t0 = torch.as_tensor(translation0, dtype=torch.float32, device=device)
    translation_scale = 10.0  # mm per unit of the shift parameter: balances Adam steps of shift vs linear
    total = len(levels_mm) * iterations if optimise else 0
    step = 0
    if optimise and iterations > 0:
        for level_mm in levels_mm:
            f_grid, f_img = downsample_working(fixed_grid, fixed_intensity, level_mm)
            m_grid, m_img = downsample_working(moving_grid, moving_intensity, level_mm)
            # Adam steps of ~0.2-0.7 mm for the translation: larger on coarse levels
            shift_lr = 0.02 + 0.05 * min(level_mm, 12.0) / 12.0
            fixed_t = torch.as_tensor(f_img, device=device)[None, None]
            moving_t = torch.as_tensor(m_img, device=device)[None, None]
            points = _physical_points(f_grid, device)
            optimiser = torch.optim.Adam(
                [{"params": [linear], "lr": 0.004}, {"params": [shift], "lr": shift_lr}]
            )
            plateau = Plateau(patience=12, tolerance=1e-4)
            for i in range(iterations):
                optimiser.zero_grad(set_to_none=True)
                matrix = torch.eye(3, device=device) + linear
                mapped = (points - c) @ matrix.T + c + t0 + translation_scale * shift
                warped = _sample_moving(moving_t, m_grid, mapped)
                loss = local_ncc_loss(fixed_t, warped, window=ncc_window)
                if not torch.isfinite(loss):
                    raise FloatingPointError("affine optimisation diverged (non-finite loss)")
                loss.backward()
                optimiser.step()
                step += 1
                if callback is not None:
                    callback(step, total, float(loss.detach()))
                if plateau.reached(float(loss.detach())):
                    step += iterations - i - 1  # skipped iterations count as done for the progress
                    break
    matrix = (np.eye(3) + linear.detach().cpu().numpy().astype(np.float64))
    translation = translation0 + translation_scale * shift.detach().cpu().numpy().astype(np.float64)
    transform = sitk.AffineTransform(3)
    transform.SetCenter([float(v) for v in centre])
    transform.SetMatrix([float(v) for v in matrix.ravel()])
    transform.SetTranslation([float(v) for v in translation])
    return transform
