"""Similarity and regularisation terms (pure functions on ``(B, C, D, H, W)`` tensors, all minimised).

Displacements are ``(B, 3, D, H, W)`` in voxels, channels ``(d, h, w)`` (see :mod:`deepabdominalreg.spatial`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepabdominalreg.spatial import jacobian_determinant

__all__ = [
    "local_ncc_loss",
    "global_ncc_loss",
    "mse_loss",
    "diffusion_regulariser",
    "bending_energy",
    "negative_jacobian_penalty",
]


def _box_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    """Separable mean filter with zero padding over the last three axes of ``(B, C, D, H, W)``."""
    channels = x.shape[1]
    pad = window // 2
    kernel = torch.full((window,), 1.0 / window, dtype=x.dtype, device=x.device)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = window
        k = kernel.view(1, 1, *shape).expand(channels, 1, *shape)
        padding = [0, 0, 0]
        padding[axis] = pad
        x = F.conv3d(x, k, padding=tuple(padding), groups=channels)
    return x


def local_ncc_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = 9,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Negative local normalised cross-correlation (squared, VoxelMorph form) in a ``window``³ neighbourhood.

    Range ``[-1, 0]``: ``-1`` is a perfect (locally linear) match.  ``mask`` ``(B, 1, D, H, W)`` restricts the mean.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"shapes differ: {tuple(fixed.shape)} vs {tuple(warped.shape)}")
    if window % 2 == 0 or window < 1:
        raise ValueError("window must be a positive odd number of voxels")
    stacked = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    means = _box_filter(stacked, window)
    mu_f, mu_w, mu_ff, mu_ww, mu_fw = torch.split(means, fixed.shape[1], dim=1)
    cov = mu_fw - mu_f * mu_w
    var_f = (mu_ff - mu_f * mu_f).clamp_min(0)
    var_w = (mu_ww - mu_w * mu_w).clamp_min(0)
    cc = cov * cov / (var_f * var_w + eps)
    if mask is None:
        return -cc.mean()
    weight = mask.to(cc.dtype).expand_as(cc)
    return -(cc * weight).sum() / weight.sum().clamp_min(1.0)


def global_ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative global Pearson correlation in ``[-1, 1]`` (``-1`` perfect), optionally inside ``mask``."""
    weight = torch.ones_like(fixed) if mask is None else mask.to(fixed.dtype).expand_as(fixed)
    n = weight.sum().clamp_min(1.0)
    mf = (fixed * weight).sum() / n
    mw = (warped * weight).sum() / n
    df, dw = (fixed - mf) * weight, (warped - mw) * weight
    return -(df * dw).sum() / torch.sqrt((df * df).sum() * (dw * dw).sum() + 1e-8)


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared intensity difference (``0`` perfect), optionally inside ``mask``."""
    diff = (fixed - warped) ** 2
    if mask is None:
        return diff.mean()
    weight = mask.to(diff.dtype).expand_as(diff)
    return (diff * weight).sum() / weight.sum().clamp_min(1.0)


def diffusion_regulariser(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the displacement (voxels²), ``0`` for a translation."""
    dd = disp[:, :, 1:] - disp[:, :, :-1]
    dh = disp[:, :, :, 1:] - disp[:, :, :, :-1]
    dw = disp[:, :, :, :, 1:] - disp[:, :, :, :, :-1]
    return (dd.pow(2).mean() + dh.pow(2).mean() + dw.pow(2).mean()) / 3.0


def bending_energy(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared second derivatives (voxels², mixed terms counted twice); ``0`` for any affine field."""

    def d(x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.gradient(x, dim=axis)[0]

    total = disp.new_zeros(())
    for i, a in enumerate((2, 3, 4)):
        da = d(disp, a)
        for b in (2, 3, 4)[i:]:
            term = d(da, b).pow(2).mean()
            total = total + (term if a == b else 2 * term)
    return total


def negative_jacobian_penalty(disp: torch.Tensor, margin: float = 0.01) -> torch.Tensor:
    """Mean of ``relu(margin - det J)``: ``0`` when every voxel keeps ``det J >= margin`` (no folding)."""
    return F.relu(margin - jacobian_determinant(disp)).mean()
