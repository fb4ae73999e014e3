"""VoxelMorph-family networks (Balakrishnan et al., IEEE TMI 2019) as small ``nn.Module`` wrappers.

A :class:`RegistrationUNet` takes ``(fixed, moving)`` ``(B, 2, D, H, W)`` on one grid and predicts a displacement
``(B, 3, D, H, W)`` in voxels, channels ``(d, h, w)``, optionally as a stationary velocity field integrated by
scaling and squaring (diffeomorphic).  Constructor arguments are plain values, stored in checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepabdominalreg import spatial

__all__ = ["UNetConfig", "RegistrationUNet", "SpatialTransformer", "build_network"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`RegistrationUNet` (VoxelMorph defaults, halved)."""

    encoder_channels: tuple[int, ...] = (16, 32, 32, 32)
    decoder_channels: tuple[int, ...] = (32, 32, 32, 32)
    final_channels: tuple[int, ...] = (16, 16)
    integration_steps: int = 0
    """0: the output is a displacement; > 0: a velocity field integrated with this many squaring steps."""

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown network settings {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


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
        """Forward pass on any grid size: pads to a multiple of :attr:`divisor`, crops the field back."""
        shape = fixed.shape[2:]
        pads = [(-s) % self.divisor for s in shape]
        pad_arg = []
        for p in reversed(pads):
            pad_arg += [0, p]
        flow = self.forward(F.pad(fixed, pad_arg), F.pad(moving, pad_arg))
        return flow[:, :, : shape[0], : shape[1], : shape[2]]


class SpatialTransformer(nn.Module):
    """``nn.Module`` wrapper of :func:`deepabdominalreg.spatial.warp`."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, image: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        return spatial.warp(image, disp, mode=self.mode, padding_mode=self.padding_mode)


_ARCHITECTURES = {"RegistrationUNet": (RegistrationUNet, UNetConfig)}


def build_network(architecture: str, settings: dict) -> nn.Module:
    """Construct a network from its registered class name and plain-value settings (as stored in checkpoints)."""
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(_ARCHITECTURES)}")
    cls, config_cls = _ARCHITECTURES[architecture]
    return cls(config_cls.from_dict(settings))

