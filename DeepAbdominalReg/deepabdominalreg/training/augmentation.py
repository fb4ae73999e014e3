"""On-the-fly training augmentation in torch (after DDMR's augmentation layer and van Eijnatten et al. 2021).

Conventions (as :mod:`deepabdominalreg.spatial`):

* images are ``(B, C, D, H, W)`` tensors on one grid; intensities are the windowed, body-masked values in [0, 1]
  of :func:`deepabdominalreg.registration.preprocessing.prepare_working_image`;
* every displacement is ``(B, 3, D, H, W)`` in **voxels of that grid**, channels ``(d, h, w)``; a point at voxel
  ``p`` maps to ``p + disp(p)``;
* ``spacing_mm`` is the grid spacing along ``(d, h, w)`` (one number when isotropic): amplitudes are given in mm
  and converted to voxels with it;
* randomness comes only from the ``generator`` argument (a ``torch.Generator``), so a seed reproduces a pair.

The motion models (thin-plate splines, rigid motion, van Eijnatten fields) are synthetic motion:
:mod:`deepabdominalreg.synthetic.motion`.  Intensity: :func:`gamma_augment` (gamma 0.5-2, log-uniform),
:func:`brightness_augment` (x (1 +- 20 %)).  :class:`PairAugmentation` combines them into a synthetic training pair
whose true displacement is kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from deepabdominalreg import spatial
from deepabdominalreg.spatial import mm_lps_to_disp_vox
from deepabdominalreg.synthetic.motion import (
    Spacing,
    random_rigid_displacement,
    random_tps_displacement,
    random_uniform,
    tensor_grid,
    van_eijnatten_displacement,
)

__all__ = [
    "AugmentationConfig",
    "PairAugmentation",
    "brightness_augment",
    "gamma_augment",
]


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
        gamma = math.exp(float(random_uniform(generator, lo, hi)))
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
        factor = 1.0 + float(random_uniform(generator, -max_change, max_change))
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
            disp = disp + prior_field * float(random_uniform(generator, *c.prior_field_scale))
        if self._coin(c.tps_probability, generator):
            disp = disp + random_tps_displacement(shape, spacing_mm, grid_points=c.tps_grid_points,
                                                  max_displacement_mm=c.tps_max_displacement_mm,
                                                  generator=generator).to(mask.device)
        if self._coin(c.van_eijnatten_probability, generator):
            grid = tensor_grid(shape, spacing_mm)
            field_mm = van_eijnatten_displacement(
                mask, grid, amplitude_mm=float(random_uniform(generator, *c.van_eijnatten_amplitude_mm)),
                n_points=c.van_eijnatten_points, min_distance_mm=c.van_eijnatten_min_distance_mm,
                sigma_mm=c.van_eijnatten_sigma_mm, generator=generator)
            disp = disp + mm_lps_to_disp_vox(field_mm, grid, mask.device)
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
        sigma = float(random_uniform(generator, *c.noise_std))
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
