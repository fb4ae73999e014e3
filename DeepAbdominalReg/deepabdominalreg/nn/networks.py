"""VoxelMorph-family networks (Balakrishnan et al., IEEE TMI 2019) as small ``nn.Module`` wrappers.

A :class:`RegistrationUNet` takes ``(fixed, moving)`` ``(B, 2, D, H, W)`` on one grid and predicts a displacement
``(B, 3, D, H, W)`` in voxels, channels ``(d, h, w)``, optionally as a stationary velocity field integrated by
scaling and squaring (diffeomorphic).  Constructor arguments are plain values, stored in checkpoints.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepabdominalreg import spatial

__all__ = [
    "CostVolumePyramidNet",
    "PyramidConfig",
    "RegistrationUNet",
    "SpatialTransformer",
    "UNetConfig",
    "build_network",
    "content_face_margins",
]


class _SettingsMixin:
    """Plain-value (JSON) round trip of a frozen settings dataclass, as stored in checkpoints and model cards."""

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict):
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown network settings {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class UNetConfig(_SettingsMixin):
    """Architecture of :class:`RegistrationUNet` (VoxelMorph defaults, halved)."""

    encoder_channels: tuple[int, ...] = (16, 32, 32, 32)
    decoder_channels: tuple[int, ...] = (32, 32, 32, 32)
    final_channels: tuple[int, ...] = (16, 16)
    integration_steps: int = 0
    """0: the output is a displacement; > 0: a velocity field integrated with this many squaring steps."""


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2, inplace=True))


class RegistrationUNet(nn.Module):
    """U-Net predicting a dense displacement (voxels) from a fixed/moving pair."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder_channels
        dec = config.decoder_channels
        if len(dec) != len(enc):
            raise ValueError("decoder_channels must have as many entries as encoder_channels")
        self.encoders = nn.ModuleList()
        cin = 2
        for cout in enc:
            self.encoders.append(_conv(cin, cout, stride=2))
            cin = cout
        self.decoders = nn.ModuleList()
        skips = [2, *enc[:-1]][::-1]
        for cout, skip in zip(dec, skips):
            self.decoders.append(_conv(cin + skip, cout))
            cin = cout
        self.finals = nn.ModuleList()
        for cout in config.final_channels:
            self.finals.append(_conv(cin, cout))
            cin = cout
        self.flow = nn.Conv3d(cin, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (pad otherwise; :meth:`predict` does)."""
        return 2 ** len(self.encoders)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fixed, moving], dim=1)
        skips = [x]
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        skips.pop()
        for decoder in self.decoders:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = decoder(torch.cat([x, skips.pop()], dim=1))
        for final in self.finals:
            x = final(x)
        flow = self.flow(x)
        if self.config.integration_steps > 0:
            flow = spatial.integrate_velocity(flow, self.config.integration_steps)
        return flow

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Forward pass on any grid size: pads (zeros) to a multiple of :attr:`divisor`, crops the field back."""
        return _predict_padded(self, fixed, moving, "constant")


@dataclass(frozen=True)
class PyramidConfig(_SettingsMixin):
    """Architecture of :class:`CostVolumePyramidNet` (coarse-to-fine, one entry per pyramid level, finest first)."""

    feature_channels: tuple[int, ...] = (16, 16, 16)
    """Learned feature channels at level 0 (input grid), 1 (1/2), 2 (1/4) ...; the image itself is one more."""
    search_radius: tuple[int, ...] = (1, 2, 2)
    """Displacements searched per level, in voxels of that level: ``(2 r + 1)^3`` candidates."""
    refine_channels: int = 16
    cost_smoothing: int = 2
    """Box filters (3^3) applied to the cost volume before the soft-argmin (block-matching aggregation)."""
    output_smoothing: int = 0
    """3^3 box filters applied to the final displacement (n passes ~ Gaussian sigma sqrt(2 n / 3) voxels)."""
    initial_inverse_temperature: float = 10.0
    """Softmax sharpness on the contrast-normalised cost (cost / its mean over the shifts)."""
    boundary_padding: int = 0
    """Inference only (:meth:`CostVolumePyramidNet.predict`): voxels of mirrored image added beyond each face of
    the input where the image content reaches that face (a scan cut through the body), cropped from the field.
    Without it the zero-padded convolutions give fixed and moving the same border features, which match best at
    zero shift and pull the field towards zero in the last slices (``docs/training.md``, "Boundary padding")."""


def _shift_offsets(radius: int) -> list[tuple[int, int, int]]:
    r = range(-radius, radius + 1)
    return [(a, b, c) for a in r for b in r for c in r]


_SLAB_VOXELS = 48_000
"""Voxels per slab of :func:`ssd_cost_volume`'s inference path on a CPU: small enough that a slab's features and
costs stay in the CPU caches, large enough that the per-operation overhead does not dominate."""


def ssd_cost_volume(fixed_features: torch.Tensor, moving_features: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean squared feature difference for every integer shift ``k`` in ``[-r, r]^3`` voxels.

    Returns ``(B, (2r+1)^3, D, H, W)``: channel ``k`` holds ``mean_c (F(x) - M(x + k))^2`` (moving padded by
    replication at the borders), shifts ordered as :func:`_shift_offsets` (d slowest, w fastest).  Computed as
    ``mean F^2 + mean M_k^2 - 2 mean F M_k`` (one product per shift instead of a difference and a square).
    Without autograd (inference) each shift's cross term is accumulated channel by channel straight into the
    output (``addcmul_``: no per-shift product tensor, no stack, so no large temporaries; same values to float
    rounding); with autograd, out-of-place products.
    """
    r = radius
    channels = fixed_features.shape[1]
    padded = F.pad(moving_features, (r, r, r, r, r, r), mode="replicate")
    padded_sq = padded.pow(2).mean(dim=1)
    fixed_sq = fixed_features.pow(2).mean(dim=1)
    d, h, w = fixed_features.shape[2:]
    offsets = _shift_offsets(r)

    def window(a: int, b: int, c: int) -> tuple[slice, ...]:
        return (slice(None), slice(None), slice(r + a, r + a + d), slice(r + b, r + b + h), slice(r + c, r + c + w))

    if torch.is_grad_enabled() and (fixed_features.requires_grad or moving_features.requires_grad):
        costs = []
        for a, b, c in offsets:
            win = window(a, b, c)
            cross = torch.linalg.vecdot(fixed_features, padded[win], dim=1)
            costs.append(fixed_sq + padded_sq[(win[0], *win[2:])] - (2.0 / channels) * cross)
        return torch.stack(costs, dim=1).clamp_min_(0.0)
    with torch.no_grad():
        cost = fixed_features.new_empty((fixed_features.shape[0], len(offsets), d, h, w))
        # slabs of ~48k voxels along d: one slab's features and costs stay in the CPU caches while every shift and
        # channel visits them (the same values bit for bit); small levels in one piece (the per-operation overhead
        # would dominate)
        slab = max(1, _SLAB_VOXELS // (h * w)) if fixed_features.device.type == "cpu" else d
        for z0 in range(0, d, slab):
            z1 = min(d, z0 + slab)
            fixed_slab, fixed_sq_slab = fixed_features[:, :, z0:z1], fixed_sq[:, z0:z1]
            for k, (a, b, c) in enumerate(offsets):
                win = window(a, b, c)
                win = (win[0], win[1], slice(win[2].start + z0, win[2].start + z1), *win[3:])
                shifted = padded[win]
                out = cost[:, k, z0:z1]
                torch.mul(fixed_slab[:, 0], shifted[:, 0], out=out)
                for channel in range(1, channels):
                    out.addcmul_(fixed_slab[:, channel], shifted[:, channel])
                out.mul_(-2.0 / channels).add_(fixed_sq_slab).add_(padded_sq[(win[0], *win[2:])])
        return cost.clamp_min_(0.0)


class CostVolumePyramidNet(nn.Module):
    """Coarse-to-fine registration network on explicit matching costs (PWC-Net / PDD-Net family).

    A shared (siamese) feature pyramid is computed for fixed and moving.  From the coarsest level down: the
    moving features are warped by the current displacement, a sum-of-squared-differences cost volume over
    ``(2 r + 1)^3`` integer shifts is aggregated by box filters, a soft-argmin (learned temperature) turns it into a
    sub-voxel displacement update, and a small CNN adds a learned correction.  The displacement is upsampled
    (cell-centred, x2) to the next level.  The input intensities themselves are one feature channel, so the
    matching is meaningful from the first iteration; training mostly learns better features and regularisation.

    Input ``(B, 1, D, H, W)`` fixed and moving on one grid; output ``(B, 3, D, H, W)`` displacement in voxels of
    that grid, channels ``(d, h, w)`` (the :mod:`deepabdominalreg.spatial` convention).  Sizes must be multiples of
    :attr:`divisor` (:meth:`predict` pads).
    """

    def __init__(self, config: PyramidConfig = PyramidConfig()) -> None:
        super().__init__()
        if len(config.search_radius) != len(config.feature_channels):
            raise ValueError("search_radius must have one entry per level of feature_channels")
        self.config = config
        self.encoders = nn.ModuleList()
        cin = 1
        for level, cout in enumerate(config.feature_channels):
            stride = 1 if level == 0 else 2
            self.encoders.append(nn.Sequential(_conv(cin, cout, stride), _conv(cout, cout)))
            cin = cout
        self.log_inverse_temperature = nn.Parameter(
            torch.full((len(config.feature_channels),),
                       float(torch.log(torch.tensor(config.initial_inverse_temperature))))
        )
        self.refiners = nn.ModuleList()
        for cout in config.feature_channels:
            head = nn.Conv3d(config.refine_channels, 3, 3, padding=1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.refiners.append(nn.Sequential(_conv(3 + 2 * (cout + 1), config.refine_channels),
                                               _conv(config.refine_channels, config.refine_channels), head))
        for radius in config.search_radius:
            self.register_buffer(f"offsets_{radius}", torch.tensor(_shift_offsets(radius), dtype=torch.float32),
                                 persistent=False)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.config.feature_channels) - 1)

    def _pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        x = image
        pooled = image
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                pooled = F.avg_pool3d(pooled, 2)
            x = encoder(x)
            levels.append(torch.cat([pooled, x], dim=1))
        return levels

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        fixed_levels = self._pyramid(fixed)
        moving_levels = self._pyramid(moving)
        disp = None
        for level in reversed(range(len(fixed_levels))):
            f, m = fixed_levels[level], moving_levels[level]
            if disp is None:
                disp = f.new_zeros((f.shape[0], 3, *f.shape[2:]))
            else:
                disp = 2.0 * F.interpolate(disp, size=f.shape[2:], mode="trilinear", align_corners=False)
            warped = spatial.warp(m, disp, padding_mode="border") if level < len(fixed_levels) - 1 else m
            radius = self.config.search_radius[level]
            cost = ssd_cost_volume(f, warped, radius)
            del warped
            for _ in range(self.config.cost_smoothing):
                cost = spatial.box_filter(cost, 3, count_include_pad=False)
            # contrast-normalised cost (1 = the mean over the candidate shifts): a flat cost gives uniform weights,
            # i.e. exactly zero update, and the temperature means the same in bright and dark regions
            sharpness = -torch.exp(self.log_inverse_temperature[level])
            if torch.is_grad_enabled():
                cost = sharpness * (cost / (cost.mean(dim=1, keepdim=True) + 1e-6))
            else:  # the same values in place: two cost volumes less at the peak (first touch of new memory)
                cost = cost.div_(cost.mean(dim=1, keepdim=True).add_(1e-6)).mul_(sharpness)
            weights = torch.softmax(cost, dim=1)
            del cost
            offsets = getattr(self, f"offsets_{radius}")
            update = torch.einsum("bkdhw,kc->bcdhw", weights, offsets)
            del weights  # not held through the refinement below
            disp = disp + update
            warped = spatial.warp(m, disp, padding_mode="border")
            disp = disp + self.refiners[level](torch.cat([disp, f, warped], dim=1))
        for _ in range(self.config.output_smoothing):
            disp = spatial.box_filter(disp, 3, count_include_pad=False)
        return disp

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Forward pass on any grid size: mirrors :attr:`PyramidConfig.boundary_padding` voxels beyond the faces
        that the images' content reaches, pads to a multiple of :attr:`divisor` (edge values), crops back."""
        margins = content_face_margins(fixed, moving, self.config.boundary_padding)
        return _predict_padded(self, fixed, moving, "replicate", mirror=margins)


def content_face_margins(fixed: torch.Tensor, moving: torch.Tensor, padding: int) -> tuple[int, ...]:
    """Mirror margins ``(d_low, d_high, h_low, h_high, w_low, w_high)`` in voxels for ``(B, 1, D, H, W)`` inputs:
    ``padding`` (at most the axis length - 1, the limit of reflection) on each face where either image has a value
    above 0 (content; the network's inputs are 0 in air and outside the body mask), else 0."""
    if padding <= 0:
        return (0,) * 6
    margins = []
    for axis in range(3):
        dim = 2 + axis
        size = fixed.shape[dim]
        for index in (0, size - 1):
            face = torch.stack([fixed.select(dim, index), moving.select(dim, index)])
            margins.append(min(padding, size - 1) if bool((face > 0).any()) else 0)
    return tuple(margins)


def _pad_argument(margins: Sequence[int]) -> list[int]:
    """``F.pad``'s argument (last axis first) from ``(d_low, d_high, h_low, h_high, w_low, w_high)`` voxels."""
    return [int(margins[2 * axis + side]) for axis in reversed(range(3)) for side in (0, 1)]


def _predict_padded(network: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, mode: str,
                    mirror: Sequence[int] = (0,) * 6) -> torch.Tensor:
    """``network(fixed, moving)`` with the field cropped back to the input grid.  The inputs are first mirrored by
    ``mirror`` voxels ``(d_low, d_high, h_low, h_high, w_low, w_high)`` (reflection), then padded at the far end to
    a multiple of ``network.divisor`` (``F.pad`` ``mode``: ``"constant"`` zeros or ``"replicate"``)."""
    shape = fixed.shape[2:]
    if any(mirror):
        fixed = F.pad(fixed, _pad_argument(mirror), mode="reflect")
        moving = F.pad(moving, _pad_argument(mirror), mode="reflect")
    pads = [(-s) % network.divisor for s in fixed.shape[2:]]
    if any(pads):
        far_end = _pad_argument([v for p in pads for v in (0, p)])
        fixed = F.pad(fixed, far_end, mode=mode)
        moving = F.pad(moving, far_end, mode=mode)
    flow = network(fixed, moving)
    d0, h0, w0 = mirror[0], mirror[2], mirror[4]
    return flow[:, :, d0: d0 + shape[0], h0: h0 + shape[1], w0: w0 + shape[2]]


class SpatialTransformer(nn.Module):
    """``nn.Module`` wrapper of :func:`deepabdominalreg.spatial.warp`."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, image: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        return spatial.warp(image, disp, mode=self.mode, padding_mode=self.padding_mode)


_ARCHITECTURES = {
    "RegistrationUNet": ("deepabdominalreg.nn.networks", "RegistrationUNet", "UNetConfig"),
    "CostVolumePyramidNet": ("deepabdominalreg.nn.networks", "CostVolumePyramidNet", "PyramidConfig"),
    "DLIR": ("deepabdominalreg.nn.dlir", "DLIR", "DLIRConfig"),
    "MICS": ("deepabdominalreg.nn.mics", "MICS", "MICSConfig"),
    "SemanticPyramidNet": ("deepabdominalreg.nn.semantic", "SemanticPyramidNet", "SemanticPyramidConfig"),
}
"""Architecture name (as stored in checkpoints and model cards) -> (module, network class, config class).  Named,
not imported: the other architectures' modules build on this one's blocks."""


def build_network(architecture: str, settings: dict) -> nn.Module:
    """Construct a network from its registered class name and plain-value settings (as stored in checkpoints)."""
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(_ARCHITECTURES)}")
    module_name, class_name, config_name = _ARCHITECTURES[architecture]
    module = importlib.import_module(module_name)
    return getattr(module, class_name)(getattr(module, config_name).from_dict(settings))
