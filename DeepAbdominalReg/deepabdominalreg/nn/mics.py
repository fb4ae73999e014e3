"""MICS: symmetric registration on the difference of shared encodings, with the field predicted as bounded spatial
gradients (Estienne et al., Front. Comput. Neurosci. 2020; the symmetric formulation of Estienne et al. 2021;
the gradient parameterisation of Christodoulidis et al., MICCAI 2018).

One encoder (shared weights) turns each image into a feature pyramid.  The decoder sees only the differences of
the two pyramids, ``enc(moving) - enc(fixed)`` at every level, and is antisymmetrised: for the plain CNN ``h``
(biases included) with two heads, its step logits are ``x = (h(delta) - h(-delta)) / 2`` ``(B, 3, D, H, W)`` and
its translation logits ``y`` ``(B, 3)`` the same difference of the second head's means over the grid.  Hence,
whatever the weights:

* identical inputs give ``delta = 0``, ``x = y = 0`` and exactly the identity (zero displacement);
* swapping the inputs negates ``delta``, hence ``x`` and ``y``, hence the displacement (exactly, to float
  rounding): the backward field is ``-u``, the inverse of ``u`` to first order (``p - u(p) + u(p - u(p))`` is ``p``
  up to ``|grad u| |u|``, exactly ``p`` for a translation); :func:`~deepabdominalreg.nn.losses.inverse_consistency_loss`
  penalises the rest.

Per axis ``a`` (tensor axis ``2 + a``, channels ``(d, h, w)``) the step logit gives the step between the sampling
positions of neighbouring voxels, ``s = 1 + (1 - m) tanh(x / 2)`` (``= 2 sigmoid(x)`` squeezed into
``(m, 2 - m)``; ``m`` = :attr:`MICSConfig.min_step_voxels`; identity at ``x = 0``, ``s = 1``).  The steps'
cumulative sum along the axis, ``c_a(p) = sum_{k <= p_a} (s_a(k) - 1)``, fixes the displacement of a line only up to a
constant, which the field gets from two places: ``c_a`` is centred on each line (its mean along the axis
subtracted) and one global translation per sample and pass is added, ``t_a = T tanh(y_a / 2)`` (``|t_a| < T`` =
:attr:`MICSConfig.max_translation_voxels`):
``u_a(p) = c_a(p) - mean_a(c_a) + t_a`` voxels.  So a translation is a field with all steps 1 (``x = 0``) and
``u = t`` everywhere, of any size below ``T``; a cumulative sum anchored at a line's first voxel would pin the field
there to ``(-1, 1)`` voxel and could only reach a larger shift through large steps near the line starts, a field
far from constant whose negation is no inverse.  Centring keeps the lines' offsets independent of where they
start, and both offsets are constant along the axis, so neither changes a step.

What this guarantees (one network pass, any weights and inputs): along every axis the sampling positions
``p + u(p)`` of neighbouring voxels are in order, at least ``m`` voxels apart (less float32 rounding of the
cumulative sum, ~1e-5 voxel for |u| < 256) and at most ``2 - m``; so the diagonal of the project's Jacobian
(:func:`deepabdominalreg.spatial.jacobian_determinant`, central differences) is at least ``m``.  It does **not**
bound the shears (``d u_a / d p_b``, ``b != a``: differences of centred cumulative sums between neighbouring
lines), so ``det J > 0`` is not guaranteed in 3D: :meth:`MICS.jacobian_loss` penalises ``det J < 0.01``.
Multi-step inference composes passes: the composite keeps ``det J > 0`` where each pass does, but not the per-axis
order.

Input and output as :class:`~deepabdominalreg.nn.networks.RegistrationUNet`: ``forward(fixed, moving)`` on
``(B, 1, D, H, W)`` images (sizes multiples of :attr:`MICS.divisor`; :meth:`MICS.predict` pads), returning
``(B, 3, D, H, W)`` voxels, channels ``(d, h, w)``, with ``warp(moving, u) ~ fixed``
(:mod:`deepabdominalreg.spatial`'s convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepabdominalreg import spatial
from deepabdominalreg.nn import losses
from deepabdominalreg.nn import networks as _networks

__all__ = ["MICS", "MICSConfig"]


@dataclass(frozen=True)
class MICSConfig(_networks._SettingsMixin):
    """Architecture and auxiliary-loss weights of :class:`MICS` (CPU-sized: ~0.2 M parameters, for 4 mm input)."""

    encoder_channels: tuple[int, ...] = (8, 16, 32, 32)
    """Shared encoder, one entry per level: level 0 at the input grid, each next one strided by 2."""
    decoder_channels: tuple[int, ...] = (32, 16, 16)
    """Decoder levels from the second coarsest to the input grid (one fewer than ``encoder_channels``)."""
    min_step_voxels: float = 0.01
    """``m``: steps between neighbouring sampling positions lie in ``(m, 2 - m)`` voxels along every axis."""
    max_translation_voxels: float = 16.0
    """``T``: bound of the global translation of each pass, ``|t_a| < T`` voxels per axis (64 mm at 4 mm input)."""
    inference_steps: int = 2
    """Passes in evaluation mode (:meth:`MICS.forward` with ``network.eval()``, hence :meth:`MICS.predict`): the
    moving image is warped by the current field, the network predicts again, the fields are composed.  Training
    mode always runs one pass."""
    symmetry_weight: float = 0.1
    """Weight of the inverse-consistency term of :meth:`MICS.auxiliary_losses` (the loss is in voxels²)."""
    jacobian_weight: float = 1.0
    """Weight of the folding term of :meth:`MICS.auxiliary_losses`; 0 leaves a term out."""


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv3d(cout, cout, 3, padding=1), nn.LeakyReLU(0.2, inplace=True))


class MICS(nn.Module):
    """Symmetric difference-of-encodings registration network with a bounded-gradient field (module docstring)."""

    def __init__(self, config: MICSConfig = MICSConfig()) -> None:
        super().__init__()
        enc, dec = config.encoder_channels, config.decoder_channels
        if len(enc) < 1 or len(dec) != len(enc) - 1:
            raise ValueError("decoder_channels must have one entry fewer than encoder_channels")
        if not 0.0 < config.min_step_voxels < 1.0:
            raise ValueError(f"min_step_voxels must be in (0, 1), got {config.min_step_voxels!r}")
        if config.inference_steps < 1:
            raise ValueError(f"inference_steps must be >= 1, got {config.inference_steps!r}")
        self.config = config
        self.encoders = nn.ModuleList()  # the name the training loop freezes (freeze_encoder_epochs)
        cin = 1
        for level, cout in enumerate(enc):
            self.encoders.append(_block(cin, cout, stride=1 if level == 0 else 2))
            cin = cout
        self.decoders = nn.ModuleList()
        for level, cout in zip(reversed(range(len(dec))), dec):
            self.decoders.append(_block(cin + enc[level], cout))
            cin = cout
        if not config.max_translation_voxels > 0.0:
            raise ValueError(f"max_translation_voxels must be > 0, got {config.max_translation_voxels!r}")
        self.head = nn.Conv3d(cin, 3, 3, padding=1)  # step logits
        self.translation_head = nn.Conv3d(cin, 3, 3, padding=1)  # translation logits, pooled over the grid
        # near-identity start (steps ~ 1, translation ~ 0): small logits, as RegistrationUNet's flow layer
        for layer in (self.head, self.translation_head):
            nn.init.normal_(layer.weight, 0.0, 1e-5)
            nn.init.zeros_(layer.bias)

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (:meth:`predict` pads)."""
        return 2 ** (len(self.config.encoder_channels) - 1)

    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        levels, x = [], images
        for encoder in self.encoders:
            x = encoder(x)
            levels.append(x)
        return levels

    def _decode(self, differences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = differences[-1]
        for decoder, skip in zip(self.decoders, reversed(differences[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = decoder(torch.cat([x, skip], dim=1))
        return self.head(x), self.translation_head(x).mean(dim=(2, 3, 4))

    def logits(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: step logits ``x = (h(delta) - h(-delta)) / 2`` ``(B, 3, D, H, W)`` and translation logits
        ``y`` ``(B, 3)`` (the translation head's mean over the grid, antisymmetrised the same way), ``delta =
        enc(moving) - enc(fixed)`` per level: both zero for identical inputs and negated by swapping them, for any
        weights and biases."""
        b = fixed.shape[0]
        levels = self._encode(torch.cat([fixed, moving], dim=0))  # one pass, shared weights
        deltas = [f[b:] - f[:b] for f in levels]
        steps, translation = self._decode([torch.cat([d, -d], dim=0) for d in deltas])
        return 0.5 * (steps[:b] - steps[b:]), 0.5 * (translation[:b] - translation[b:])

    def gradients_to_displacement(self, logits: torch.Tensor, translation: torch.Tensor | None = None
                                  ) -> torch.Tensor:
        """Step logits ``(B, 3, D, H, W)`` and translation logits ``(B, 3)`` (zero when ``None``) -> displacement
        (voxels, channels ``(d, h, w)``): per axis ``a`` the steps ``s = 1 + (1 - m) tanh(x / 2)`` in ``(m, 2 - m)``
        voxels, ``c = cumsum_a(s - 1)``, ``u_a = c - mean_a(c) + T tanh(y_a / 2)``."""
        if logits.ndim != 5 or logits.shape[1] != 3:
            raise ValueError(f"logits must be (B, 3, D, H, W), got {tuple(logits.shape)}")
        excess = (1.0 - self.config.min_step_voxels) * torch.tanh(0.5 * logits)  # s - 1: no identity to cancel
        lines = [excess[:, a: a + 1].cumsum(dim=2 + a) for a in range(3)]
        disp = torch.cat([c - c.mean(dim=2 + a, keepdim=True) for a, c in enumerate(lines)], dim=1)
        if translation is None:
            return disp
        if translation.shape != (logits.shape[0], 3):
            raise ValueError(f"translation must be (B, 3), got {tuple(translation.shape)}")
        shift = self.config.max_translation_voxels * torch.tanh(0.5 * translation)
        return disp + shift.view(-1, 3, 1, 1, 1)

    def single_pass(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """One network pass: the displacement (voxels) with every guarantee of the module docstring."""
        return self.gradients_to_displacement(*self.logits(fixed, moving))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Displacement ``(B, 3, D, H, W)`` (voxels) with ``warp(moving, u) ~ fixed``: ``steps`` passes (default
        1 in training mode, :attr:`MICSConfig.inference_steps` in evaluation mode), each on the moving image warped
        by the fields so far, composed ``u <- u o v`` (:func:`deepabdominalreg.spatial.compose`)."""
        if steps is None:
            steps = 1 if self.training else self.config.inference_steps
        disp = self.single_pass(fixed, moving)
        for _ in range(steps - 1):
            # a pair whose field is exactly zero stays as it is: the sampler's coordinate normalisation would
            # otherwise perturb an identical pair by float rounding, and the next pass would see that difference
            moved = disp.flatten(1).any(dim=1).view(-1, 1, 1, 1, 1)
            warped = torch.where(moved, spatial.warp(moving, disp, padding_mode="border"), moving)
            disp = spatial.compose(disp, self.single_pass(fixed, warped))
        return disp

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Forward pass on any grid size: pads (zeros) at the far ends to a multiple of :attr:`divisor`, crops the
        field back.  The padding reaches the field through the convolutions' receptive field and through the
        per-line centring and the pooled translation, which see the padded grid (identical inputs still give exactly
        zero: their padded copies are identical too)."""
        return _networks._predict_padded(self, fixed, moving, "constant")

    # -- losses ----------------------------------------------------------------------------------------------------

    @staticmethod
    def jacobian_loss(disp: torch.Tensor) -> torch.Tensor:
        """Folding penalty: :func:`~deepabdominalreg.nn.losses.negative_jacobian_penalty` (mean of
        ``relu(0.01 - det J)``) of a displacement in voxels."""
        return losses.negative_jacobian_penalty(disp)

    @staticmethod
    def symmetry_loss(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
        """Inverse consistency of the two directions (voxels²):
        :func:`~deepabdominalreg.nn.losses.inverse_consistency_loss`, both round trips composed with
        :func:`deepabdominalreg.spatial.compose`."""
        return losses.inverse_consistency_loss(forward, backward)

    def auxiliary_losses(self, fixed: torch.Tensor, moving: torch.Tensor,
                         pred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Weighted MICS terms to add to the training loss: ``mics_symmetry`` (:attr:`MICSConfig.symmetry_weight`
        times :meth:`symmetry_loss`) and ``mics_jacobian`` (:attr:`MICSConfig.jacobian_weight` times
        :meth:`jacobian_loss`); a term of weight 0 is left out.

        ``fixed``, ``moving``: the ``(B, 1, D, H, W)`` training pair; ``pred``: this network's one-pass field on
        it, ``network(fixed, moving)`` in training mode (computed when ``None``).  The backward field is ``-pred``:
        by construction the swapped pass gives exactly that, so it costs no second pass.
        """
        if pred is None:
            pred = self.single_pass(fixed, moving)
        out = {}
        if self.config.symmetry_weight:
            out["mics_symmetry"] = self.config.symmetry_weight * self.symmetry_loss(pred, -pred)
        if self.config.jacobian_weight:
            out["mics_jacobian"] = self.config.jacobian_weight * self.jacobian_loss(pred)
        return out
