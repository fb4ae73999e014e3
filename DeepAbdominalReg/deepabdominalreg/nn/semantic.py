"""Semantically guided pyramid registration: a segmentation U-Net whose decoder features guide two registration
U-Nets in series, trained end to end with a segmentation loss (the seed paper's design, for liver CT with large
deformations).

* One segmentation U-Net (shared weights) runs on the fixed and the moving image, as one batch of ``2 B``.  Its
  last decoder level gives :attr:`SemanticPyramidConfig.feature_channels` semantic features per voxel (input grid)
  and, through a 1^3 convolution, the logits of :attr:`SemanticPyramidConfig.segmentation_classes` classes.
* Registration U-Net 1 sees ``cat[f, m, feat_f, feat_m]`` and predicts ``u1``; the moving image and its features are
  warped by ``u1`` and registration U-Net 2 sees ``cat[f, warped m, feat_f, warped feat_m]`` and predicts the
  refinement ``u2``.  The output is ``u1 o u2`` (:func:`deepabdominalreg.spatial.compose`): the moving voxel of
  fixed voxel ``p`` is ``q + u1(q)`` with ``q = p + u2(p)``, so ``warp(moving, total)`` is ``warp(warp(moving, u1),
  u2)`` with a single interpolation.
* The segmentation is supervised in training only (:meth:`SemanticPyramidNet.segmentation_loss`: soft Dice +
  cross-entropy of the last forward pass's logits against both label maps, the training objective's
  ``segmentation`` term); at inference the network needs the images alone.

Both flow heads are initialised to zero: an untrained network gives exactly the identity.  Input and output as the
other networks of :mod:`deepabdominalreg.nn.networks`: ``forward(fixed, moving)`` on ``(B, 1, D, H, W)`` images on
one isotropic grid of :attr:`SemanticPyramidConfig.input_spacing_mm` (sizes multiples of
:attr:`SemanticPyramidNet.divisor`; :meth:`SemanticPyramidNet.predict` pads), returning ``(B, 3, D, H, W)`` voxels,
channels ``(d, h, w)``, with ``warp(moving, u) ~ fixed`` (:mod:`deepabdominalreg.spatial`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepabdominalreg import spatial
from deepabdominalreg.nn import losses
from deepabdominalreg.nn import networks as _networks
from deepabdominalreg.nn.dlir import _float32_geometry

__all__ = ["SemanticPyramidConfig", "SemanticPyramidNet"]


@dataclass(frozen=True)
class SemanticPyramidConfig(_networks._SettingsMixin):
    """Architecture of :class:`SemanticPyramidNet` (CPU-sized: 485,546 parameters, for 4 mm input)."""

    input_spacing_mm: float = 4.0
    """Voxel spacing (mm, isotropic) of the grid the network sees; no setting depends on it, the training loop
    checks it against its ``spacing_mm`` (the receptive fields below are in voxels of that grid)."""
    segmentation_encoder_channels: tuple[int, ...] = (8, 16, 32, 32)
    """Segmentation U-Net's contracting path, one convolution per level: level 0 at the input grid, each next one
    strided by 2 (4 levels: 1/8 resolution, 32 mm voxels at 4 mm input)."""
    segmentation_decoder_channels: tuple[int, ...] = (32, 16, 16)
    """Segmentation U-Net's expanding path from the second coarsest level to the input grid (one entry fewer than
    ``segmentation_encoder_channels``)."""
    feature_channels: int = 8
    """Semantic feature channels per image passed on to the registration U-Nets (a convolution of the last decoder
    level); the segmentation logits are a 1^3 convolution of these features, so they carry the organ identity."""
    segmentation_classes: int = 12
    """Classes of the segmentation head: background (class 0) and one per entry of ``segmentation_label_ids``."""
    segmentation_label_ids: tuple[int, ...] = (1, 2, 3, 5, 6, 7, 32, 52, 63, 65, 66)
    """Label values (TotalSegmentator ``total`` ids, as the phantom's and the training volumes' label maps) mapped
    to classes ``1 .. n`` in this order; every other value is background.  Default: spleen, kidneys, liver,
    stomach, pancreas, T12, aorta, inferior vena cava, iliac arteries."""
    registration_encoder_channels: tuple[int, ...] = (16, 32, 32, 32)
    """Contracting path of each registration U-Net (same layout as the segmentation U-Net's)."""
    registration_decoder_channels: tuple[int, ...] = (32, 16, 16)
    """Expanding path of each registration U-Net (one entry fewer than ``registration_encoder_channels``)."""


class _UNet(nn.Module):
    """A U-Net trunk: ``(B, in_channels, D, H, W)`` -> its last decoder level ``(B, decoder[-1], D, H, W)``.

    One :func:`~deepabdominalreg.nn.networks._conv` per level: level 0 at the input grid, each next one strided by
    2; each decoder level upsamples (trilinear) and convolves with the encoder level of its size as a skip."""

    def __init__(self, in_channels: int, encoder: tuple[int, ...], decoder: tuple[int, ...]) -> None:
        super().__init__()
        if len(encoder) < 1 or len(decoder) != len(encoder) - 1:
            raise ValueError(f"a U-Net needs one decoder level fewer than encoder levels, got encoder {encoder} "
                             f"and decoder {decoder}")
        self.encoders = nn.ModuleList()
        cin = in_channels
        for level, cout in enumerate(encoder):
            self.encoders.append(_networks._conv(cin, cout, stride=1 if level == 0 else 2))
            cin = cout
        self.decoders = nn.ModuleList()
        for level, cout in zip(reversed(range(len(decoder))), decoder):
            self.decoders.append(_networks._conv(cin + encoder[level], cout))
            cin = cout
        self.out_channels = cin

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.encoders) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = []
        for encoder in self.encoders:
            x = encoder(x)
            levels.append(x)
        for decoder, skip in zip(self.decoders, reversed(levels[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = decoder(torch.cat([x, skip], dim=1))
        return x


class _RegistrationBranch(nn.Module):
    """A registration U-Net with a zero-initialised flow head: displacement ``(B, 3, D, H, W)`` (voxels)."""

    def __init__(self, in_channels: int, encoder: tuple[int, ...], decoder: tuple[int, ...]) -> None:
        super().__init__()
        self.unet = _UNet(in_channels, encoder, decoder)
        self.flow = nn.Conv3d(self.unet.out_channels, 3, 3, padding=1)
        # exactly zero, not small: the untrained network is the identity whatever the inputs
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow(self.unet(x))


class SemanticPyramidNet(nn.Module):
    """Segmentation-guided two-stage registration network (module docstring)."""

    def __init__(self, config: SemanticPyramidConfig = SemanticPyramidConfig()) -> None:
        super().__init__()
        if config.segmentation_classes != len(config.segmentation_label_ids) + 1:
            raise ValueError(f"segmentation_classes ({config.segmentation_classes}) must be the number of "
                             f"segmentation_label_ids ({len(config.segmentation_label_ids)}) + 1 (background)")
        if len(set(config.segmentation_label_ids)) != len(config.segmentation_label_ids) or \
                0 in config.segmentation_label_ids:
            raise ValueError(f"segmentation_label_ids must be distinct and non-zero (0 is background), got "
                             f"{config.segmentation_label_ids}")
        if config.feature_channels < 1:
            raise ValueError(f"feature_channels must be >= 1, got {config.feature_channels!r}")
        if not config.input_spacing_mm > 0:
            raise ValueError(f"input_spacing_mm must be > 0, got {config.input_spacing_mm!r}")
        self.config = config
        self.segmentation = _UNet(1, tuple(config.segmentation_encoder_channels),
                                  tuple(config.segmentation_decoder_channels))
        self.features = _networks._conv(self.segmentation.out_channels, config.feature_channels)
        self.segmentation_head = nn.Conv3d(config.feature_channels, config.segmentation_classes, 1)
        branch_inputs = 2 + 2 * config.feature_channels
        self.registration = nn.ModuleList([
            _RegistrationBranch(branch_inputs, tuple(config.registration_encoder_channels),
                                tuple(config.registration_decoder_channels)) for _ in range(2)])
        # the contracting paths of the three U-Nets: what training's freeze_encoder_epochs freezes
        self.encoders = nn.ModuleList([self.segmentation.encoders,
                                       *(branch.unet.encoders for branch in self.registration)])
        self.segmentation_logits: torch.Tensor | None = None
        """``(2 B, classes, D, H, W)`` logits of the last forward pass: the fixed images first, then the moving."""

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (:meth:`predict` pads); both are powers of two."""
        return max(self.segmentation.divisor, self.registration[0].unet.divisor)

    def semantic_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)`` of ``(N, 1, D, H, W)`` images: ``(N, feature_channels, D, H, W)`` and
        ``(N, segmentation_classes, D, H, W)``."""
        features = self.features(self.segmentation(images))
        return features, self.segmentation_head(features)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        b = fixed.shape[0]
        features, logits = self.semantic_features(torch.cat([fixed, moving], dim=0))  # one pass, shared weights
        self.segmentation_logits = logits
        feat_f, feat_m = features[:b], features[b:]
        u1 = self.registration[0](torch.cat([fixed, moving, feat_f, feat_m], dim=1))
        # the sampling in at least float32: under bf16 autocast the identity grid itself would be rounded (half a
        # voxel at 128)
        geometry = torch.promote_types(fixed.dtype, torch.float32)
        with _float32_geometry(fixed):
            u1 = u1.to(geometry)
            warped = spatial.warp(torch.cat([moving, feat_m], dim=1).to(geometry), u1, padding_mode="border")
        warped = warped.to(feat_m.dtype)
        u2 = self.registration[1](torch.cat([fixed, warped[:, :1], feat_f, warped[:, 1:]], dim=1))
        with _float32_geometry(fixed):
            return spatial.compose(u1, u2.to(geometry))

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Forward pass on any grid size: pads (zeros) at the far ends to a multiple of :attr:`divisor`, crops the
        field back."""
        return _networks._predict_padded(self, fixed, moving, "constant")

    def auxiliary_losses(self, fixed: torch.Tensor | None = None, moving: torch.Tensor | None = None,
                         pred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """No label-free terms of its own: ``{}`` (the segmentation term needs labels,
        :meth:`segmentation_loss`)."""
        return {}

    def segmentation_targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, D, H, W)`` label values (any dtype; rounded) -> ``(classes, foreground)``: ``(B, D, H, W)``
        int64 classes (value ``segmentation_label_ids[k]`` is class ``k + 1``, every other value class 0, background)
        and their float one-hot ``(B, classes - 1, D, H, W)`` without the background channel."""
        foreground = losses.one_hot(labels.round().long(), self.config.segmentation_label_ids)
        index = torch.arange(1, foreground.shape[1] + 1, device=foreground.device, dtype=foreground.dtype)
        classes = torch.einsum("bkdhw,k->bdhw", foreground, index).long()
        return classes, foreground

    def segmentation_loss(self, fixed_labels: torch.Tensor, moving_labels: torch.Tensor) -> torch.Tensor:
        """Soft Dice (foreground classes: :func:`~deepabdominalreg.nn.losses.dice_loss` of the softmax) plus
        cross-entropy (nats per voxel, all classes) of the last forward pass's segmentation logits against the
        fixed and the moving label maps ``(B, 1, D, H, W)`` (label values, mapped by :meth:`segmentation_targets`);
        0 would be a perfect, confident segmentation."""
        if self.segmentation_logits is None:
            raise RuntimeError("segmentation_loss() refers to the last forward pass; run the network first")
        logits = self.segmentation_logits.float()
        labels = torch.cat([fixed_labels, moving_labels], dim=0)
        if labels.shape[0] != logits.shape[0] or labels.shape[2:] != logits.shape[2:]:
            raise ValueError(f"label maps {tuple(fixed_labels.shape)} and {tuple(moving_labels.shape)} do not "
                             f"match the last forward pass (logits {tuple(logits.shape)}: B fixed then B moving)")
        classes, foreground = self.segmentation_targets(labels)
        dice = losses.dice_loss(foreground, torch.softmax(logits, dim=1)[:, 1:])
        return dice + F.cross_entropy(logits, classes)
