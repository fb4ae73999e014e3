"""Instance optimisation: refine a displacement on one image pair with Adam (multi-level, smooth by construction).

The displacement of each level is parameterised on a control grid ``control_spacing`` voxels apart and
interpolated trilinearly to the level's grid; the loss is local NCC on the level's grid + diffusion regularisation
and a negative-Jacobian penalty on the control grid.  Everything is in voxels of the working grid
(see :mod:`deepabdominalreg.spatial`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from deepabdominalreg import spatial
from deepabdominalreg.losses import (
    _box_filter,
    diffusion_regulariser,
    local_ncc_loss,
    negative_jacobian_penalty,
)

__all__ = ["InstanceOptimisationSettings", "instance_optimise", "level_shape"]


@dataclass(frozen=True)
class InstanceOptimisationSettings:
    levels: tuple[int, ...] = (4, 2, 1)
    iterations: int = 100
    """Adam iterations at each coarse level (factor > 1)."""
    fine_iterations: int = 30
    """Adam iterations at the full working resolution (factor 1), the most expensive level."""
    learning_rate: float = 0.5
    control_spacing: int = 2
    ncc_window: int = 5
    smoothness_weight: float = 1.0
    jacobian_weight: float = 0.1


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
    return tuple(max(2, int(round((s - 1) / factor)) + 1) for s in shape)


def _downsample_image(image: torch.Tensor, factor: int) -> torch.Tensor:
    if factor <= 1:
        return image
    window = 2 * (factor // 2) + 1
    smoothed = _box_filter(image, window)
    return F.interpolate(smoothed, size=level_shape(image.shape[2:], factor), mode="trilinear", align_corners=True)


def instance_optimise(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial_disp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    settings: InstanceOptimisationSettings = InstanceOptimisationSettings(),
    callback: Callable[[int, int, float], None] | None = None,
) -> torch.Tensor:
    """Displacement ``(1, 3, D, H, W)`` (voxels) aligning ``moving`` to ``fixed`` (both ``(1, 1, D, H, W)``).

    ``initial_disp`` (e.g. the network's prediction) is the starting point; ``mask`` restricts the similarity term.
    ``callback(iteration, total, loss)`` runs after every iteration; it may raise to cancel.
    """
    shape = tuple(fixed.shape[2:])
    disp = (
        torch.zeros(1, 3, *shape, dtype=fixed.dtype, device=fixed.device)
        if initial_disp is None
        else initial_disp.detach().to(fixed.dtype)
    )
    per_level = [settings.fine_iterations if f <= 1 else settings.iterations for f in settings.levels]
    total = sum(per_level)
    step = 0
    for factor, iterations in zip(settings.levels, per_level):
        lshape = level_shape(shape, factor)
        fixed_l = _downsample_image(fixed, factor)
        moving_l = _downsample_image(moving, factor)
        mask_l = None
        if mask is not None:
            mask_l = _downsample_image(mask.to(fixed.dtype), factor) > 0.5
        cshape = level_shape(lshape, settings.control_spacing)
        start = spatial.resize_displacement(disp, lshape)
        control = F.interpolate(start, size=cshape, mode="trilinear", align_corners=True)
        residual_start = start - F.interpolate(control, size=lshape, mode="trilinear", align_corners=True)
        control = control.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([control], lr=settings.learning_rate)
        # Adam's steps are ~lr whatever the gradient's size: decay lr to 10% over the level so that the field
        # settles instead of jittering by ~lr voxels where the similarity gives little signal
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=0.1 ** (1.0 / max(iterations, 1)))
        plateau = Plateau(patience=15, tolerance=1e-4)
        for i in range(iterations):
            optimiser.zero_grad(set_to_none=True)
            disp_l = F.interpolate(control, size=lshape, mode="trilinear", align_corners=True) + residual_start
            warped = spatial.warp(moving_l, disp_l)
            loss = local_ncc_loss(fixed_l, warped, window=settings.ncc_window, mask=mask_l)
            # regularisers on the control grid (in control-grid voxels): the level field is its trilinear
            # interpolation, so it inherits smoothness and positive Jacobians, at 1/cs^3 of the cost
            control_vox = control / settings.control_spacing
            if settings.smoothness_weight:
                loss = loss + settings.smoothness_weight * diffusion_regulariser(control_vox)
            if settings.jacobian_weight:
                loss = loss + settings.jacobian_weight * negative_jacobian_penalty(control_vox)
            if not torch.isfinite(loss):
                raise FloatingPointError("instance optimisation diverged (non-finite loss); lower the learning rate")
            loss.backward()
            optimiser.step()
            scheduler.step()
            step += 1
            if callback is not None:
                callback(step, total, float(loss.detach()))
            if plateau.reached(float(loss.detach())):
                step += iterations - i - 1
                break
        with torch.no_grad():
            disp_l = F.interpolate(control, size=lshape, mode="trilinear", align_corners=True) + residual_start
            disp = spatial.resize_displacement(disp_l, shape)
    return disp.detach()
