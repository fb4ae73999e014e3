"""Domain randomisation for training (in the spirit of SynthMorph, Hoffmann et al., IEEE TMI 2022).

Images are synthesised from label maps with random appearance, so that a network trained on them has to match
shapes, not one data source's intensities: :func:`synthesise_from_labels` (a random intensity per label, blur,
a multiplicative bias field, gamma, noise).  :func:`random_field_of_view` cuts a cranio-caudal slab off one image
of a pair (scans of one patient rarely cover the same extent) and removes the correspondences into it from the
loss mask.

Conventions as :mod:`deepabdominalreg.training.augmentation`: ``(B, C, D, H, W)`` tensors, ``d`` the cranio-caudal
axis of the training grid (its slices are the scan's axial slices), displacements in voxels with channels
``(d, h, w)``, ``spacing_mm`` along ``(d, h, w)`` (one number when isotropic), randomness only from ``generator``
(drawn on the CPU, so a seed gives the same images on any device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepabdominalreg.synthetic.motion import Spacing, gaussian_smooth, random_uniform, tensor_grid

__all__ = [
    "bias_field",
    "blur_mm",
    "cut_field_of_view",
    "gamma_augment",
    "gaussian_noise",
    "random_field_of_view",
    "synthesise_from_labels",
]


def _spacing_dhw(shape: Sequence[int], spacing_mm: Spacing) -> tuple[float, float, float]:
    """``spacing_mm`` as three values along ``(d, h, w)`` (validated by :func:`tensor_grid`)."""
    return tuple(tensor_grid(shape, spacing_mm).spacing[::-1])


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


def gaussian_noise(like: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise of standard deviation ``std`` (intensity units) with ``like``'s shape, on its device."""
    return torch.randn(like.shape, generator=generator).to(like.device) * std


def blur_mm(image: torch.Tensor, sigma_mm: float, spacing_mm: Spacing) -> torch.Tensor:
    """Gaussian blur of ``(B, C, D, H, W)`` by ``sigma_mm`` (mm; ``sigma_mm / spacing`` voxels along each axis).

    Normalised by the blurred ones, so the borders keep their level instead of fading to the zero padding (a
    darker rim at the same place in both images would be a false correspondence cue).
    """
    if sigma_mm <= 0:
        return image
    sigma_vox = [sigma_mm / s for s in _spacing_dhw(image.shape[-3:], spacing_mm)]
    weight = gaussian_smooth(torch.ones(1, 1, *image.shape[-3:], dtype=image.dtype, device=image.device), sigma_vox)
    return gaussian_smooth(image, sigma_vox) / weight


def bias_field(
    shape: Sequence[int],
    spacing_mm: Spacing,
    strength: float,
    control_spacing_mm: float = 64.0,
    generator: torch.Generator | None = None,
    batch: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A smooth multiplicative bias field ``exp(b)`` ``(batch, 1, D, H, W)``: ``b`` is Gaussian (standard deviation
    ``strength``, the log-intensity scale: 0.3 is about +-30 %) on a control grid of ``control_spacing_mm`` (mm,
    at least 2 points per axis, spanning the volume), trilinearly upsampled."""
    spacing = _spacing_dhw(shape, spacing_mm)
    points = [max(2, math.ceil((n - 1) * s / control_spacing_mm) + 1) for n, s in zip(shape, spacing)]
    coarse = torch.randn((batch, 1, *points), generator=generator).to(device) * strength
    return F.interpolate(coarse, size=tuple(int(n) for n in shape), mode="trilinear", align_corners=True).exp()


def _min_max(image: torch.Tensor) -> torch.Tensor:
    """Per-sample linear rescaling to [0, 1] (a constant image gives 0)."""
    flat = image.flatten(1)
    lo = flat.min(1).values.view(-1, *[1] * (image.ndim - 1))
    hi = flat.max(1).values.view(-1, *[1] * (image.ndim - 1))
    return ((image - lo) / (hi - lo).clamp_min(1e-8)).clamp(0.0, 1.0)


def _label_index(labels: torch.Tensor) -> torch.Tensor:
    """``(B, 1, D, H, W)`` long class indices of a label map (1 channel, integer values) or a one-hot / multi-channel
    map (the channel with the largest value plus 1; 0 where every channel is 0)."""
    if labels.shape[1] == 1:
        return labels.round().long().clamp_min(0)
    best = labels.argmax(1, keepdim=True) + 1
    return torch.where(labels.amax(1, keepdim=True) > 0, best, torch.zeros_like(best))


def synthesise_from_labels(
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    spacing_mm: Spacing = 1.0,
    mask: torch.Tensor | None = None,
    intensity_range: tuple[float, float] = (0.0, 1.0),
    blur_sigma_mm: tuple[float, float] = (0.0, 4.0),
    bias_strength: tuple[float, float] = (0.0, 0.3),
    bias_spacing_mm: float = 64.0,
    gamma_range: tuple[float, float] = (0.5, 2.0),
    noise_std: tuple[float, float] = (0.0, 0.05),
) -> torch.Tensor:
    """An image ``(B, 1, D, H, W)`` in [0, 1] with random appearance, drawn from a label map.

    ``labels`` ``(B, 1, D, H, W)`` with integer values (float or integer dtype), or multi-channel one-hot.  Every
    label value, background 0 included, gets a mean intensity uniform in ``intensity_range``; with ``mask``
    ``(B, 1, D, H, W)`` the voxels outside it (e.g. the air around the body) are one more class with its own
    intensity.  Then, one draw each per call: a Gaussian blur of sigma uniform in ``blur_sigma_mm`` (mm,
    :func:`blur_mm`), a bias field (:func:`bias_field`, log-scale ``strength`` uniform in ``bias_strength``,
    control spacing ``bias_spacing_mm``), rescaling to [0, 1], gamma log-uniform in ``gamma_range``
    (:func:`gamma_augment`), additive Gaussian noise of standard deviation uniform in ``noise_std`` (intensity
    units of the [0, 1] image) and a final min-max rescaling to [0, 1].
    """
    if labels.ndim != 5:
        raise ValueError(f"labels must be (B, C, D, H, W), got {tuple(labels.shape)}")
    index = _label_index(labels)
    classes = int(index.max()) + 1
    if mask is not None:
        index = torch.where(mask > 0.5, index, torch.full_like(index, classes))
        classes += 1
    batch, shape = index.shape[0], tuple(index.shape[-3:])
    means = random_uniform(generator, *intensity_range, (batch, classes)).to(labels.device, torch.float32)
    image = torch.gather(means, 1, index.flatten(1)).view(batch, 1, *shape)
    image = blur_mm(image, float(random_uniform(generator, *blur_sigma_mm)), spacing_mm)
    strength = float(random_uniform(generator, *bias_strength))
    image = image * bias_field(shape, spacing_mm, strength, bias_spacing_mm, generator, batch, image.device)
    image = gamma_augment(_min_max(image), gamma_range, generator)
    std = float(random_uniform(generator, *noise_std))
    return _min_max(image + gaussian_noise(image, std, generator))


# ----------------------------------------------------------------------------------------------------------------
# field of view
# ----------------------------------------------------------------------------------------------------------------


def cut_field_of_view(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_mask: torch.Tensor,
    moving_mask: torch.Tensor,
    disp: torch.Tensor | None,
    image: str,
    start: int,
    stop: int,
    fill_value: float = 0.0,
) -> dict:
    """Remove the slices ``start:stop`` (voxels along ``d``) of the ``image`` (``"fixed"`` or ``"moving"``) of a pair.

    The cut slices get ``fill_value`` (0: outside the field of view, as a prepared working image) and leave that
    image's mask.  The returned ``fixed_mask`` also excludes every fixed voxel ``p`` whose correspondence
    ``p + disp(p)`` (``disp`` fixed-to-moving, voxels) is interpolated from a cut moving slice (its ``d``
    coordinate in ``(start - 1, stop)``): the moving image holds no evidence for it.  Label maps are not cut: they
    are the anatomy's truth.  Returns ``fixed``, ``moving``, ``fixed_mask``, ``moving_mask`` (new tensors).
    """
    if image not in ("fixed", "moving"):
        raise ValueError(f"image must be 'fixed' or 'moving', got {image!r}")
    depth = fixed.shape[2]
    if not 0 <= start < stop <= depth:
        raise ValueError(f"cut slices {start}:{stop} outside 0:{depth}")
    out = {"fixed": fixed.clone(), "moving": moving.clone(), "fixed_mask": fixed_mask.clone(),
           "moving_mask": moving_mask.clone()}
    out[image][:, :, start:stop] = fill_value
    out[f"{image}_mask"][:, :, start:stop] = 0
    if image == "moving":
        if disp is None:
            raise ValueError("cutting the moving image needs the displacement to update the fixed mask")
        d = torch.arange(depth, device=disp.device, dtype=disp.dtype).view(1, 1, depth, 1, 1) + disp[:, :1]
        into_cut = (d > start - 1) & (d < stop)
        out["fixed_mask"] = out["fixed_mask"] * (~into_cut).to(fixed_mask.dtype)
    return out


def random_field_of_view(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_mask: torch.Tensor,
    moving_mask: torch.Tensor,
    disp: torch.Tensor | None,
    generator: torch.Generator | None = None,
    *,
    max_fraction: float = 0.3,
    fill_value: float = 0.0,
) -> dict:
    """A shorter cranio-caudal field of view for one image of a pair (:func:`cut_field_of_view`).

    The fixed or the moving image (probability 1/2 each; always the fixed one when ``disp`` is ``None``) loses a
    slab at one end along ``d`` (the slices from index 0, or those up to index ``D - 1``, 1/2 each) of a fraction
    uniform in ``(0, max_fraction]`` of its ``D`` slices (at least one slice, at most ``D - 1``).  The returned dict
    adds ``cut``: ``(image, start, stop)``.
    """
    if not 0 < max_fraction < 1:
        raise ValueError(f"max_fraction must be in (0, 1), got {max_fraction}")
    depth = fixed.shape[2]
    image = "moving" if float(torch.rand((), generator=generator)) < 0.5 and disp is not None else "fixed"
    at_end = float(torch.rand((), generator=generator)) < 0.5
    fraction = max_fraction * (1.0 - float(torch.rand((), generator=generator, dtype=torch.float64)))
    slices = min(max(1, round(fraction * depth)), depth - 1)
    start, stop = (depth - slices, depth) if at_end else (0, slices)
    out = cut_field_of_view(fixed, moving, fixed_mask, moving_mask, disp, image, start, stop, fill_value)
    out["cut"] = (image, start, stop)
    return out
