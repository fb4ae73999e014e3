"""DLIR: the deep learning image registration framework of de Vos et al. (Medical Image Analysis 52, 2019).

An affine ConvNet followed by deformable ConvNets that predict cubic B-spline control points, coarse to fine:

* affine: two convolutional pipelines with shared weights (fixed, moving), global average pooling, concatenation
  and a dense head giving 12 parameters: translation, rotation, log-scale and shear, each bounded by ``tanh``
  (the bounds in :class:`DLIRConfig`), so the matrix has ``det = product of the scales > 0`` for any input;
* deformable stages, one per control spacing (mm), each seeing the fixed image and the moving image warped by
  the stages before it: strided convolutions down to the control grid, whose displacement (voxels) a transposed
  convolution with the fixed, sampled cubic B-spline kernel (:func:`bspline_upsample`) brings to the input grid.

The transform maps a fixed voxel ``p`` to ``A(D_1(D_2(... D_n(p))))`` in the moving image (``A`` affine, ``D_k``
the ``k``-th deformable stage, ``x -> x + u_k(x)``): every stage refines the alignment the earlier ones left.
Output as the other networks of :mod:`deepabdominalreg.nn.networks`: input ``(B, 1, D, H, W)`` fixed and moving
on one isotropic grid of :attr:`DLIRConfig.input_spacing_mm`, output ``(B, 3, D, H, W)`` displacement in voxels
of that grid, channels ``(d, h, w)`` (:mod:`deepabdominalreg.spatial`); any grid size (:attr:`DLIR.divisor` 1).

Every head is initialised to zero: an untrained network is the identity.  The B-spline bending energy of the
last forward pass's control points (:meth:`DLIR.auxiliary_losses`, mm⁻²) is the regulariser of the paper; the
training objective adds it as its ``auxiliary`` term.  The stages are trained together (the paper also trains them
one after the other, each with the earlier ones fixed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepabdominalreg import spatial
from deepabdominalreg.nn import networks as _networks
from deepabdominalreg.nn.losses import BSplineBendingEnergy
from deepabdominalreg.nn.networks import _conv, _SettingsMixin

__all__ = ["DLIR", "DLIRConfig", "bspline_kernel", "bspline_upsample"]


@dataclass(frozen=True)
class DLIRConfig(_SettingsMixin):
    """Architecture of :class:`DLIR`."""

    input_spacing_mm: float = 4.0
    """Voxel spacing (mm, isotropic) of the grid the network sees: it turns the mm settings below into voxels."""
    affine: bool = True
    """The affine ConvNet first (``False``: the deformable stages only)."""
    affine_channels: tuple[int, ...] = (16, 32, 32, 32)
    """Channels of the affine pipelines' levels (each a stride-2 convolution and a convolution)."""
    affine_hidden: int = 32
    """Width of the dense layer between the pooled features and the 12 parameters."""
    max_translation_mm: float = 40.0
    """Bound of each translation component (mm)."""
    max_rotation_deg: float = 15.0
    """Bound of each of the three rotation angles (degrees), about the centre of the input grid."""
    max_scale_ratio: float = 1.25
    """Each axis' scale lies in ``[1 / ratio, ratio]`` (ratio >= 1)."""
    max_shear: float = 0.15
    """Bound of each of the three shear factors (the upper off-diagonal entries of a unit triangular matrix)."""
    control_spacing_mm: tuple[float, ...] = (64.0, 32.0, 16.0)
    """Knot spacing (mm) of the deformable stages' cubic B-splines, one stage each, in the order they run; each a
    power-of-two multiple of ``input_spacing_mm``."""
    deformable_channels: tuple[int, ...] = (16, 32, 32, 32, 32)
    """Channels of a deformable stage at the input grid (entry 0) and after each stride-2 convolution (entry ``l``:
    1 / 2^l); a stage with knot spacing 2^L voxels uses entries 0 .. L."""
    search_radius_mm: float = 16.0
    """Reach of each deformable stage's matching cost (mm): the largest shift it compares at its matching level
    (half the input resolution), rounded to whole voxels of that level (at least 1)."""

    def search_radius_voxels(self, knot_spacing: int) -> int:
        """The matching cost's radius in voxels of the matching level of a stage with this knot spacing."""
        level_mm = self.input_spacing_mm * (2 if knot_spacing >= 2 else 1)
        return max(1, round(self.search_radius_mm / level_mm))

    def knot_spacings_voxels(self) -> tuple[int, ...]:
        """The stages' knot spacings in voxels of the input grid (powers of two); ``ValueError`` if one is not."""
        out = []
        for mm in self.control_spacing_mm:
            ratio = float(mm) / float(self.input_spacing_mm)
            voxels = round(ratio)
            if voxels < 1 or abs(ratio - voxels) > 1e-6 or voxels & (voxels - 1):
                raise ValueError(f"control spacing {mm} mm is not a power-of-two multiple of the input spacing "
                                 f"{self.input_spacing_mm} mm")
            out.append(voxels)
        return tuple(out)


def bspline_kernel(knot_spacing: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The cubic B-spline sampled at the voxels around its knot, ``(4 s - 1,)`` for a knot spacing of ``s`` voxels:
    offsets ``-2 s + 1 .. 2 s - 1``.  Taken from :func:`deepabdominalreg.spatial.bspline_basis_matrix` (the basis
    function of the knot at voxel ``-s``), so it follows the project's B-spline convention exactly."""
    s = int(knot_spacing)
    if s < 1 or s != knot_spacing:
        raise ValueError(f"knot spacing must be a whole number of voxels >= 1, got {knot_spacing!r}")
    positions = torch.arange(1 - 3 * s, s, dtype=torch.float64)
    return spatial.bspline_basis_matrix(positions, s, n_control=1, dtype=dtype, device=device)[:, 0]


def bspline_upsample(control: torch.Tensor, knot_spacing: int | tuple[int, int, int],
                     shape: tuple[int, int, int]) -> torch.Tensor:
    """The dense cubic B-spline ``(B, C, D, H, W)`` on a grid of ``shape`` from its control values ``(B, C, nz, ny,
    nx)``, knots ``knot_spacing`` voxels apart per axis (whole numbers), control point ``j`` at voxel ``(j - 1) *
    s`` (:func:`deepabdominalreg.spatial.bspline_control_size` points per axis; the sizes must be those).

    One transposed convolution per axis (stride ``s``, the fixed kernel :func:`bspline_kernel`, each channel on its
    own): the same field as ``sum_ijk c_ijk Mz[:, i] My[:, j] Mx[:, k]`` with the matrices of
    :func:`deepabdominalreg.spatial.bspline_basis_matrix`, at the cost of a few multiplications per voxel.
    Differentiable with respect to ``control``.
    """
    if control.ndim != 5:
        raise ValueError(f"control values must be (B, C, nz, ny, nx), got {tuple(control.shape)}")
    spacings = (knot_spacing,) * 3 if isinstance(knot_spacing, int) else tuple(knot_spacing)
    channels = control.shape[1]
    out = control
    for axis, (n, s) in enumerate(zip(shape, spacings)):
        expected = spatial.bspline_control_size(int(n), s)
        if control.shape[2 + axis] != expected:
            raise ValueError(f"axis {axis}: {control.shape[2 + axis]} control points for {n} voxels at knot "
                             f"spacing {s}; expected {expected}")
        view = [1, 1, 1]
        view[axis] = 4 * s - 1
        weight = bspline_kernel(s, out.dtype, out.device).view(1, 1, *view).expand(channels, 1, *view)
        stride, padding = [1, 1, 1], [0, 0, 0]
        # output o = j s + m of control j and kernel tap m is voxel o - (3 s - 1): the padding crops that many
        # from the start (and the end, where at most s - 1 voxels beyond the grid are left)
        stride[axis], padding[axis] = s, 3 * s - 1
        out = F.conv_transpose3d(out, weight, stride=tuple(stride), padding=tuple(padding), groups=channels)
        out = out.narrow(2 + axis, 0, int(n))
    return out


class _AffineNet(nn.Module):
    """The affine ConvNet: the raw 12 parameters ``(B, 12)`` of a fixed/moving pair (one pipeline, shared)."""

    def __init__(self, channels: tuple[int, ...], hidden: int) -> None:
        super().__init__()
        layers = []
        cin = 1
        for cout in channels:
            layers += [_conv(cin, cout, stride=2), _conv(cout, cout)]
            cin = cout
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * cin, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, 12))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        features = self.encoder(torch.cat([fixed, moving], dim=0)).mean(dim=(2, 3, 4))  # both through one pipeline
        fixed_features, moving_features = features.chunk(2, dim=0)
        return self.head(torch.cat([fixed_features, moving_features], dim=1))


class _BSplineStage(nn.Module):
    """A deformable stage: control point displacements (voxels) ``(B, 3, nz, ny, nx)`` of a cubic B-spline with
    knots ``knot_spacing`` voxels apart (a power of two, ``log2`` of it stride-2 levels) from the fixed image and
    the moving image warped by the earlier stages.

    Both images pass one feature pipeline (shared weights; the intensities are one more channel) down to the matching
    level (half the input resolution,
    the input itself for a knot spacing of 1 voxel), where a sum-of-squared-differences cost volume over
    ``(2 r + 1)^3`` shifts and its soft-argmin (a displacement estimate, learnt temperature) join the features;
    strided convolutions bring them to the control grid.  The paper's stages see the two images concatenated;
    with that input the stages did not learn in an hour on the CPU (docs/models.md), while an explicit matching
    cost gives a useful gradient from the first iteration (the PWC/PDD family's lesson)."""

    def __init__(self, knot_spacing: int, channels: tuple[int, ...], search_radius: int) -> None:
        super().__init__()
        levels = int(math.log2(knot_spacing))
        if len(channels) < levels + 1:
            raise ValueError(f"a stage with knot spacing {knot_spacing} voxels needs {levels + 1} deformable_channels,"
                             f" got {len(channels)}")
        if search_radius < 1:
            raise ValueError(f"the search radius must be >= 1 voxel of the matching level, got {search_radius}")
        self.knot_spacing = knot_spacing
        self.match_level = min(1, levels)
        self.radius = int(search_radius)
        features = [_conv(1, channels[0]), _conv(channels[0], channels[0])]
        if self.match_level:
            features += [_conv(channels[0], channels[1], stride=2), _conv(channels[1], channels[1])]
        self.features = nn.Sequential(*features)
        feature_channels = channels[self.match_level] + 1
        self.log_inverse_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.register_buffer("offsets", torch.tensor(_networks._shift_offsets(self.radius), dtype=torch.float32),
                             persistent=False)
        cin = 2 * feature_channels + len(self.offsets) + 3
        layers = [_conv(cin, channels[self.match_level])]
        for level in range(self.match_level + 1, levels + 1):
            layers.append(_conv(channels[level - 1], channels[level], stride=2))
        self.encoder = nn.Sequential(*layers)
        cin = channels[levels]
        self.refine = _conv(cin, cin)
        self.head = nn.Conv3d(cin, 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        b = fixed.shape[0]
        images = torch.cat([fixed, warped], dim=0)
        # the intensities (averaged to the matching level) are one feature channel: the matching is meaningful
        # before the features have learnt anything
        pooled = F.avg_pool3d(images, 2, ceil_mode=True) if self.match_level else images
        both = torch.cat([pooled, self.features(images)], dim=1)
        f, m = both[:b], both[b:]
        cost = _networks.ssd_cost_volume(f, m, self.radius)
        # contrast-normalised (1 = the mean over the shifts), as CostVolumePyramidNet: a flat cost gives a zero
        # estimate, and the temperature means the same in bright and dark regions
        logits = -torch.exp(self.log_inverse_temperature) * (cost / (cost.mean(dim=1, keepdim=True) + 1e-6))
        estimate = torch.einsum("bkdhw,kc->bcdhw", torch.softmax(logits, dim=1), self.offsets)
        estimate = estimate * float(2 ** self.match_level)  # voxels of the input grid
        x = self.encoder(torch.cat([f, m, logits, estimate], dim=1))
        # the stride-2 convolutions (kernel 3, padding 1) centre feature i on input voxel i s, and control point j
        # sits at voxel (j - 1) s: one point more before the first feature and two after the last
        # (bspline_control_size = ceil(n / s) + 3)
        x = F.pad(x, (1, 2, 1, 2, 1, 2), mode="replicate")
        # the estimate averaged over each control cell is the stage's starting point (an untrained stage is a
        # block-matching step); the head learns the correction
        cell = 2 ** (len(self.encoder) - 1)
        start = F.avg_pool3d(estimate, cell, ceil_mode=True) if cell > 1 else estimate
        start = F.pad(start, (1, 2, 1, 2, 1, 2), mode="replicate")
        return start + self.head(self.refine(x))


def _float32_geometry(tensor: torch.Tensor):
    """A context without autocast: the affine matrix, the B-spline fields and their composition in float32 (bf16's
    8-bit mantissa would put errors of ~0.4 % of the coordinates, a voxel at a hundred, on the field)."""
    return torch.autocast(tensor.device.type, enabled=False)


class DLIR(nn.Module):
    """DLIR (de Vos et al. 2019): an affine ConvNet and coarse-to-fine B-spline ConvNets (module docstring)."""

    def __init__(self, config: DLIRConfig = DLIRConfig()) -> None:
        super().__init__()
        for name in ("max_translation_mm", "max_rotation_deg", "max_shear"):
            if not getattr(config, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(config, name)!r}")
        if not config.max_scale_ratio >= 1:
            raise ValueError(f"max_scale_ratio must be >= 1, got {config.max_scale_ratio!r}")
        if not config.input_spacing_mm > 0:
            raise ValueError(f"input_spacing_mm must be > 0, got {config.input_spacing_mm!r}")
        if not config.affine and not config.control_spacing_mm:
            raise ValueError("DLIR needs the affine ConvNet or at least one control spacing")
        self.config = config
        self.knot_spacings = config.knot_spacings_voxels()
        self.affine_net = _AffineNet(tuple(config.affine_channels), config.affine_hidden) if config.affine else None
        self.stages = nn.ModuleList([_BSplineStage(s, tuple(config.deformable_channels), config.search_radius_voxels(s))
                                     for s in self.knot_spacings])
        # the feature pipelines (not the heads): what training's freeze_encoder_epochs freezes
        self.encoders = nn.ModuleList(([self.affine_net.encoder] if self.affine_net is not None else [])
                                      + [stage.features for stage in self.stages])
        self.control_points: list[torch.Tensor] = []
        """Control point displacements (voxels, channels d, h, w) of each stage of the last forward pass."""
        self._grid_shape: tuple[int, int, int] | None = None
        self._bending: dict = {}

    @property
    def divisor(self) -> int:
        """Any input size works (the control grids follow it)."""
        return 1

    # ------------------------------------------------------------------------------------------------ affine

    def affine_components(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        """The affine ConvNet's bounded parameters, each ``(B, 3)`` float32 in ``(d, h, w)`` order:
        ``translation_mm``, ``rotation_deg`` (about the d, h, w axes), ``scale`` and ``shear`` (``dh, dw, hw``).
        A non-finite raw output (overflowing weights) counts as saturated (``inf``) or as zero (``nan``)."""
        if self.affine_net is None:
            raise ValueError("this DLIR has no affine ConvNet (affine=False)")
        raw = self.affine_net(fixed, moving)
        with _float32_geometry(raw):
            bounded = torch.tanh(torch.nan_to_num(raw.float(), nan=0.0))
            c = self.config
            return {"translation_mm": bounded[:, 0:3] * c.max_translation_mm,
                    "rotation_deg": bounded[:, 3:6] * c.max_rotation_deg,
                    "scale": torch.exp(bounded[:, 6:9] * math.log(c.max_scale_ratio)),
                    "shear": bounded[:, 9:12] * c.max_shear}

    @staticmethod
    def affine_matrix(components: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, 3, 3)`` linear part ``R S H`` of :meth:`affine_components` in ``(d, h, w)`` coordinates: ``R`` the
        product of the rotations about the d, h and w axes (in that order from the left), ``S`` the scales, ``H``
        the unit upper triangular shear; ``det = product of the scales``."""
        angles = torch.deg2rad(components["rotation_deg"])
        one, zero = torch.ones_like(angles[:, 0]), torch.zeros_like(angles[:, 0])

        def matrix_of(entries: list[list[torch.Tensor]]) -> torch.Tensor:
            return torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)

        matrix = None
        for axis in range(3):
            i, j = [a for a in range(3) if a != axis]
            cos, sin = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
            entries = [[one if r == c else zero for c in range(3)] for r in range(3)]
            entries[i][i], entries[i][j], entries[j][i], entries[j][j] = cos, -sin, sin, cos
            rotation = matrix_of(entries)
            matrix = rotation if matrix is None else matrix @ rotation
        matrix = matrix * components["scale"][:, None, :]  # R S: column k times scale k
        a, b, c = components["shear"].unbind(1)
        return matrix @ matrix_of([[one, a, b], [zero, one, c], [zero, zero, one]])

    def _affine_displacement(self, matrix: torch.Tensor, translation_mm: torch.Tensor,
                             shape: tuple[int, int, int]) -> torch.Tensor:
        """``(M - I)(p - c) + t`` (voxels, ``(B, 3, D, H, W)``) with ``c`` the centre of the grid."""
        centre = torch.tensor([(n - 1) / 2.0 for n in shape], dtype=matrix.dtype, device=matrix.device)
        offsets = spatial.identity_grid(shape, matrix.device, matrix.dtype) - centre.view(1, 3, 1, 1, 1)
        linear = matrix - torch.eye(3, dtype=matrix.dtype, device=matrix.device)
        disp = torch.einsum("bij,jdhw->bidhw", linear, offsets[0])
        return disp + (translation_mm / self.config.input_spacing_mm)[:, :, None, None, None]

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        shape = tuple(int(n) for n in fixed.shape[2:])
        matrix = affine = None
        if self.affine_net is not None:
            components = self.affine_components(fixed, moving)
            with _float32_geometry(fixed):
                matrix = self.affine_matrix(components)
                affine = self._affine_displacement(matrix, components["translation_mm"], shape)
                total = affine
        else:
            total = fixed.new_zeros((fixed.shape[0], 3, *shape), dtype=torch.float32)
        deformable = None  # displacement of D_1 o ... o D_k
        controls = []
        for index, (stage, s) in enumerate(zip(self.stages, self.knot_spacings)):
            if index == 0 and affine is None:
                warped = moving
            else:
                with _float32_geometry(fixed):
                    warped = spatial.warp(moving.float(), total)
            control = stage(fixed, warped)
            with _float32_geometry(fixed):
                control = control.float()
                controls.append(control)
                u = bspline_upsample(control, s, shape)
                deformable = u if deformable is None else spatial.compose(deformable, u)
                # A(p + w(p)) - p = a(p) + M w(p): the affine part exact everywhere, also beyond the grid
                total = deformable if affine is None else affine + torch.einsum("bij,bjdhw->bidhw", matrix,
                                                                                deformable)
        self.control_points = controls
        self._grid_shape = shape
        return total

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The forward pass (any grid size: no padding needed)."""
        return self(fixed, moving)

    def auxiliary_losses(self, fixed: torch.Tensor | None = None, moving: torch.Tensor | None = None,
                         pred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"bending": ...}``: the sum over the stages of the exact bending energy (mm⁻²,
        :class:`deepabdominalreg.nn.losses.BSplineBendingEnergy`) of each stage's B-spline, from the control points
        of the last forward pass (0 without deformable stages)."""
        if self._grid_shape is None:
            raise RuntimeError("auxiliary_losses() refers to the last forward pass; run the network first")
        total = None
        h = float(self.config.input_spacing_mm)
        for control, s in zip(self.control_points, self.knot_spacings):
            key = (self._grid_shape, s, control.device, control.dtype)
            if key not in self._bending:
                self._bending[key] = BSplineBendingEnergy(self._grid_shape, (s, s, s), (h, h, h),
                                                          device=control.device, dtype=control.dtype)
            energy = self._bending[key](control)
            total = energy if total is None else total + energy
        if total is None:
            total = next(self.parameters()).new_zeros(())
        return {"bending": total}
