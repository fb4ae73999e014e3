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
:func:`brightness_augment` (x (1 +- 20 %)).  Domain randomisation (images synthesised from the label maps, a cut
field of view): :mod:`deepabdominalreg.training.synthesis`.  :class:`PairAugmentation` combines them into a
synthetic training pair whose true displacement is kept.
"""

from __future__ import annotations

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
from deepabdominalreg.training.synthesis import (
    gamma_augment,
    gaussian_noise,
    random_field_of_view,
    synthesise_from_labels,
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

    # domain randomisation (training.synthesis): at these defaults nothing is drawn, so older runs reproduce
    synth_probability: float = 0.0
    """Share of the pairs whose two images are synthesised, independently, from their label maps instead of the
    volume's intensities (crops without labels never are)."""
    synth_blur_sigma_mm: tuple[float, float] = (0.0, 4.0)
    """Gaussian blur of a synthesised image: sigma (mm) uniform in this range."""
    synth_bias_strength: tuple[float, float] = (0.0, 0.3)
    """Standard deviation of the log bias field (0.3: about +-30 % intensity), uniform in this range."""
    synth_bias_spacing_mm: float = 64.0
    """Control-point spacing (mm) of the bias field: its smoothness."""
    synth_gamma_range: tuple[float, float] = (0.5, 2.0)
    """Gamma of a synthesised image, log-uniform in this range."""
    synth_noise_std: tuple[float, float] = (0.0, 0.05)
    """Gaussian noise standard deviation of a synthesised image (intensity units of [0, 1]), uniform in this range."""
    fov_cut_probability: float = 0.0
    """Share of the intra-patient pairs in which one image loses a slab at one end along ``d`` (cranio-caudal): a
    shorter field of view, filled with 0; the correspondences into it leave ``fixed_mask``."""
    fov_cut_max_fraction: float = 0.3
    """Largest share of the crop's slices cut (the share is uniform in ``(0, max]``)."""

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

    Domain randomisation: ``synthesis_labels`` (the full label map to synthesise from, same grid; default
    ``labels``) and ``synthesise`` (``None``: with probability ``synth_probability``; ``True`` always, e.g. a
    subject without image, ``image=None``).  A synthesised pair has ``moving`` drawn from the (base-deformed) label
    map and ``fixed`` from the same map warped by ``disp``, with independent appearance draws
    (:func:`deepabdominalreg.training.synthesis.synthesise_from_labels`); ``labels`` stay the Dice term's.  With
    probability ``fov_cut_probability`` one image of the pair then loses a slab of slices
    (:func:`deepabdominalreg.training.synthesis.random_field_of_view`).
    """

    def __init__(self, config: AugmentationConfig = AugmentationConfig()) -> None:
        super().__init__()
        self.config = config

    def _coin(self, p: float, generator) -> bool:
        return p > 0 and float(torch.rand((), generator=generator)) < p

    def draw_synthesis(self, generator: torch.Generator | None) -> bool:
        """Whether a pair is synthesised (``synth_probability``; draws nothing when it is 0)."""
        return self._coin(self.config.synth_probability, generator)

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
            image = (image + gaussian_noise(image, sigma, generator) * mask).clamp(0.0, 1.0)
        return image

    def synthesise(self, labels: torch.Tensor, mask: torch.Tensor, spacing_mm: Spacing, generator) -> torch.Tensor:
        """An image in [0, 1] drawn from ``labels`` with the ``synth_*`` ranges (outside ``mask``: one more class)."""
        c = self.config
        return synthesise_from_labels(labels, generator, spacing_mm=spacing_mm, mask=mask,
                                      blur_sigma_mm=c.synth_blur_sigma_mm, bias_strength=c.synth_bias_strength,
                                      bias_spacing_mm=c.synth_bias_spacing_mm, gamma_range=c.synth_gamma_range,
                                      noise_std=c.synth_noise_std)

    def forward(self, image, labels, mask, spacing_mm, prior_field=None, generator=None, synthesis_labels=None,
                synthesise=None) -> dict:
        c = self.config
        mask = mask.to(torch.float32 if image is None else image.dtype)
        if self._coin(c.base_tps_probability, generator):
            base = random_tps_displacement(tuple(mask.shape[-3:]), spacing_mm, grid_points=c.tps_grid_points,
                                           max_displacement_mm=c.tps_max_displacement_mm,
                                           generator=generator).to(mask.device)
            if image is not None:
                image = spatial.warp(image, base)
            mask = (spatial.warp(mask, base) > 0.5).to(mask.dtype)
            if labels is not None:
                labels = spatial.warp(labels, base, mode="nearest")
            if synthesis_labels is not None:
                synthesis_labels = spatial.warp(synthesis_labels, base, mode="nearest")
        disp = self.random_field(mask, spacing_mm, prior_field, generator)
        fixed_mask = (spatial.warp(mask, disp) > 0.5).to(mask.dtype)
        source = labels if synthesis_labels is None else synthesis_labels
        if synthesise is None:
            synthesise = self.draw_synthesis(generator) and source is not None  # no labels: keep the image
        if synthesise and source is None:
            raise ValueError("synthesising a pair needs a label map")
        if image is None and not synthesise:
            raise ValueError("a subject without image needs synthesise=True")
        if synthesise:
            moving = self.synthesise(source, mask, spacing_mm, generator)
            fixed = self.synthesise(spatial.warp(source, disp, mode="nearest"), fixed_mask, spacing_mm, generator)
        else:
            fixed = spatial.warp(image, disp) * fixed_mask
            moving = self.intensity(image, mask, generator)
            fixed = self.intensity(fixed, fixed_mask, generator)
        moving_mask = mask
        if self._coin(c.fov_cut_probability, generator):
            cut = random_field_of_view(fixed, moving, fixed_mask, moving_mask, disp, generator,
                                       max_fraction=c.fov_cut_max_fraction)
            fixed, moving, fixed_mask, moving_mask = (cut[k] for k in ("fixed", "moving", "fixed_mask",
                                                                       "moving_mask"))
        return {
            "moving": moving,
            "fixed": fixed,
            "moving_mask": moving_mask,
            "fixed_mask": fixed_mask,
            "disp": disp,
            "moving_labels": labels,
            "fixed_labels": None if labels is None else spatial.warp(labels, disp, mode="nearest"),
        }
