"""Coarse discrete displacement search with a smoothness coupling: the convex step of ConvexAdam (Siebert, Hansen &
Heinrich, MICCAI 2021; Heinrich et al.'s coupled convex optimisation), a start for the continuous instance
optimisation when the motion is larger than its basin (inter-patient pairs, 20 mm breathing motion).

:func:`discrete_search`, on the working grid (voxels of spacing ``spacing_mm`` per axis):

1. MIND-SSC descriptors (:func:`~deepabdominalreg.nn.losses.mind_ssc`) of both images, averaged over cells of
   ``grid_spacing_mm`` (``g_a = round(grid_spacing_mm / spacing_mm[a])`` voxels per axis, at least 1): the coarse
   grid, one point per cell;
2. a dense SSD cost volume over every whole coarse-cell offset within ``search_radius_mm``
   (``r_a = round(search_radius_mm / (g_a * spacing_mm[a]))`` cells per axis, at least 1; the search box is
   ``(2 r_d + 1)(2 r_h + 1)(2 r_w + 1)`` offsets): the squared descriptor difference summed over the 12 channels,
   weighted by the fixed mask's share of the cell, averaged over ``patch`` cells;
3. the coupled convex optimisation: the per-point argmin of the cost, smoothed by a ``smoothing``-cell box filter,
   then for each weight ``c`` of ``coupling`` the per-point argmin of ``cost + c |offset - smooth|²`` (offsets in
   cells), smoothed again;
4. sub-cell refinement: at the last argmin, per axis the vertex of the parabola through the data cost there and at
   the two neighbouring offsets (within half a cell; a whole-cell estimate becomes a continuous one, as a
   soft-argmin would, but unbiased for a quadratic cost; zero shift where the cost is zero, an exact match, so
   identical images give exactly zero), then the box filter;
5. optionally (``inverse_consistent``) the same search from the moving image to the fixed one, and ConvexAdam's
   symmetrisation of the two fields (``u <- (u - v(x + u)) / 2`` and vice versa, ``ic_iterations`` times);
6. the coarse field, trilinearly interpolated between the cell centres, in voxels of the working grid.

The cost volume is ``offsets x coarse points`` floats (729 x 80³ x 4 bytes = 1.5 GB for a 160³ grid at 3 mm with
the defaults): it is computed in chunks of offsets (about 64 MB each), kept when it fits in ``max_cost_bytes`` and
otherwise computed again for each of the ``len(coupling) + 2`` passes (more time, bounded memory).  On the shared
122 x 101 x 112 CT at 3 mm (61 x 51 x 56 cells, 729 offsets, both directions) it takes ~17 s on 2 CPU threads.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepabdominalreg import spatial
from deepabdominalreg.nn.losses import mind_ssc

__all__ = ["COUPLING_SCHEDULE", "discrete_search"]

COUPLING_SCHEDULE = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
"""ConvexAdam's coupling weights (cost per cell² of distance to the smoothed field), one argmin pass each."""

_CHUNK_ELEMENTS = 2**24  # floats of one cost chunk (64 MB): offsets per chunk = this // coarse points


def _positive(name: str, value: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _odd_window(name: str, value: int) -> int:
    if int(value) != value or value < 1 or int(value) % 2 == 0:
        raise ValueError(f"{name} must be a positive odd whole number of coarse cells, got {value!r}")
    return int(value)


def _coarse(features: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """Mean of ``features`` ``(1, C, D, H, W)`` over cells of ``factors`` voxels (the last cells padded by
    replication)."""
    pad = []
    for n, g in zip(reversed(features.shape[2:]), reversed(factors)):
        pad += [0, (-n) % g]
    if any(pad):
        features = F.pad(features, pad, mode="replicate")
    return F.avg_pool3d(features, factors, stride=factors)


def _upsample(field: torch.Tensor, shape: tuple[int, ...], factors: tuple[int, int, int]) -> torch.Tensor:
    """Coarse field ``(1, 3, d, h, w)`` in cells -> ``(1, 3, *shape)`` in voxels: trilinear between the cell centres
    (voxel ``i g + (g - 1) / 2``), constant beyond the outer centres."""
    device, dtype = field.device, field.dtype
    coords = []
    for n, g in zip(shape, factors):
        coords.append((torch.arange(n, device=device, dtype=dtype) - (g - 1) / 2) / g)
    grid = torch.stack(torch.meshgrid(*coords, indexing="ij"), dim=0).unsqueeze(0)
    scale = spatial.normalising_scale(field.shape[2:], device, dtype).view(1, 3, 1, 1, 1)
    grid = (grid * scale - 1.0).permute(0, 2, 3, 4, 1).flip(-1)
    out = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out * torch.tensor(factors, device=device, dtype=dtype).view(1, 3, 1, 1, 1)


class _CostVolume:
    """SSD cost of the fixed descriptors against the moving ones shifted by every offset (cells), in chunks of
    offsets, each ``(K, N)`` over the ``N`` coarse points; kept when all of it fits in ``max_bytes``."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor | None,
                 radius: tuple[int, int, int], patch: int, max_bytes: float) -> None:
        self.fixed, self.weight, self.radius, self.patch = fixed, weight, radius, patch
        self.shape = tuple(fixed.shape[2:])
        rd, rh, rw = radius
        # out-of-grid offsets see the border's descriptors: no pull towards or away from the edge
        self.moving = F.pad(moving, (rw, rw, rh, rh, rd, rd), mode="replicate")
        grid = [o for o in itertools.product(range(-rd, rd + 1), range(-rh, rh + 1), range(-rw, rw + 1))]
        # zero first, then by length: argmin's ties (flat regions) go to the shortest offset
        grid.sort(key=lambda o: (o[0] ** 2 + o[1] ** 2 + o[2] ** 2, o))
        self.offsets = torch.tensor(grid, device=fixed.device, dtype=fixed.dtype)  # (K, 3) cells
        index = {o: k for k, o in enumerate(grid)}
        neighbours = []  # (K, 6): offset index of o -/+ 1 along d, h, w; -1 outside the search box
        for o in grid:
            row = []
            for axis in range(3):
                for step in (-1, 1):
                    q = list(o)
                    q[axis] += step
                    row.append(index.get(tuple(q), -1))
            neighbours.append(row)
        self.neighbours = torch.tensor(neighbours, device=fixed.device, dtype=torch.long)
        self.points = math.prod(self.shape)
        self.chunk = max(1, _CHUNK_ELEMENTS // self.points)
        total = len(grid) * self.points * fixed.element_size()
        self.keep = total <= max_bytes
        self.kept: list[tuple[int, torch.Tensor]] | None = None

    def _compute(self, start: int, stop: int) -> torch.Tensor:
        d, h, w = self.shape
        cost = torch.empty(1, stop - start, d, h, w, device=self.fixed.device, dtype=self.fixed.dtype)
        difference = torch.empty_like(self.fixed)
        for k, (od, oh, ow) in enumerate(self.offsets[start:stop].round().long().tolist()):
            z, y, x = od + self.radius[0], oh + self.radius[1], ow + self.radius[2]
            torch.sub(self.fixed, self.moving[:, :, z:z + d, y:y + h, x:x + w], out=difference)
            torch.sum(difference.square_(), dim=1, out=cost[:, k])
        if self.weight is not None:
            cost.mul_(self.weight)
        cost = spatial.box_filter(cost, self.patch, count_include_pad=False)
        return cost.reshape(stop - start, self.points)

    def chunks(self):
        """``(start, cost)`` for every chunk of offsets, ``cost`` ``(K, N)``: computed, or the kept ones."""
        if self.kept is not None:
            yield from self.kept
            return
        items = []
        for start in range(0, len(self.offsets), self.chunk):
            cost = self._compute(start, min(start + self.chunk, len(self.offsets)))
            if self.keep:
                items.append((start, cost))
            yield start, cost
        if self.keep:
            self.kept = items


def _coupled(cost: torch.Tensor, offsets: torch.Tensor, smooth: torch.Tensor | None, weight: float) -> torch.Tensor:
    """``cost + weight |offset - smooth|²`` for ``(K, N)`` costs, ``(K, 3)`` offsets, a ``(3, N)`` field (cells):
    ``|o|² + |u|² - 2 o.u`` as one matrix product."""
    if smooth is None or weight == 0:
        return cost
    squares = offsets.pow(2).sum(dim=1, keepdim=True) + smooth.pow(2).sum(dim=0, keepdim=True)
    return torch.addmm(cost + weight * squares, offsets, smooth, alpha=-2.0 * weight)


def _argmin(volume: _CostVolume, smooth: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Per-point offset index minimising the (coupled) cost; the first (shortest) offset on ties."""
    best = best_index = None
    for start, cost in volume.chunks():
        coupled = _coupled(cost, volume.offsets[start:start + len(cost)], smooth, weight)
        value, index = coupled.min(dim=0)
        index = index + start
        if best is None:
            best, best_index = value, index
        else:
            better = value < best
            best = torch.where(better, value, best)
            best_index = torch.where(better, index, best_index)
    return best_index


def _refined(volume: _CostVolume, index: torch.Tensor, smooth: torch.Tensor | None, weight: float) -> torch.Tensor:
    """``(3, N)`` offsets (cells): the argmin ``index`` plus, per axis, the vertex of the parabola through the coupled
    cost at the offsets one cell either side (within half a cell; none at the search box's edge or where the cost
    is not convex there)."""
    targets = torch.cat([index.unsqueeze(0), volume.neighbours[index].t()], dim=0)  # (7, N)
    values = torch.zeros(targets.shape, device=index.device, dtype=volume.fixed.dtype)
    points = torch.arange(index.numel(), device=index.device)
    for start, cost in volume.chunks():
        coupled = _coupled(cost, volume.offsets[start:start + len(cost)], smooth, weight)
        for j in range(7):
            inside = (targets[j] >= start) & (targets[j] < start + len(cost))
            if inside.any():
                values[j, inside] = coupled[targets[j, inside] - start, points[inside]]
    centre = values[0]
    shift = torch.zeros(3, index.numel(), device=index.device, dtype=centre.dtype)
    for axis in range(3):
        minus, plus = values[1 + 2 * axis], values[2 + 2 * axis]
        curvature = minus - 2 * centre + plus
        # a zero cost is an exact match, the minimum of a sum of squares: no parabola can move it (with a mask or
        # near the border the two neighbours' costs differ even between identical images)
        valid = (targets[1 + 2 * axis] >= 0) & (targets[2 + 2 * axis] >= 0) & (curvature > 0) & (centre > 0)
        step = 0.5 * (minus - plus) / torch.where(valid, curvature, torch.ones_like(curvature))
        shift[axis] = torch.where(valid, step.clamp(-0.5, 0.5), torch.zeros_like(step))
    return volume.offsets[index].t() + shift


def _field(values: torch.Tensor, shape: tuple[int, ...], smoothing: int) -> torch.Tensor:
    field = values.reshape(1, 3, *shape)
    return spatial.box_filter(field, smoothing, count_include_pad=False)


def _search(volume: _CostVolume, coupling: Sequence[float], smoothing: int) -> torch.Tensor:
    """The coupled convex optimisation on one cost volume: ``(1, 3, d, h, w)`` offsets in cells."""
    index = _argmin(volume, None, 0.0)
    smooth = _field(volume.offsets[index].t(), volume.shape, smoothing)
    for weight in coupling:
        index = _argmin(volume, smooth.reshape(3, -1), weight)
        smooth = _field(volume.offsets[index].t(), volume.shape, smoothing)
    # the parabola of the data cost alone: the last coupling's quadratic (weight 1 against costs of ~0.1 per cell)
    # would only return the smoothed whole-cell field
    return _field(_refined(volume, index, None, 0.0), volume.shape, smoothing)


def _symmetrised(forward: torch.Tensor, backward: torch.Tensor, iterations: int) -> torch.Tensor:
    """ConvexAdam's inverse consistency of two coarse fields (cells): each the half difference of itself and the
    other one at its image, ``iterations`` times; returns the forward field."""
    for _ in range(iterations):
        forward, backward = (0.5 * (forward - spatial.warp(backward, forward, padding_mode="border")),
                             0.5 * (backward - spatial.warp(forward, backward, padding_mode="border")))
    return forward


def discrete_search(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    spacing_mm: Sequence[float] | float,
    grid_spacing_mm: float = 6.0,
    search_radius_mm: float = 24.0,
    mind_radius_mm: float = 3.0,
    mind_dilation_mm: float = 6.0,
    patch: int = 3,
    smoothing: int = 3,
    coupling: Sequence[float] = COUPLING_SCHEDULE,
    inverse_consistent: bool = True,
    ic_iterations: int = 15,
    moving_mask: torch.Tensor | None = None,
    max_cost_bytes: float = 2**30,
) -> torch.Tensor:
    """Displacement ``(1, 3, D, H, W)`` in voxels of the given grid (channels ``d, h, w``; ``warp(moving, u)``
    resembles ``fixed``) from a discrete search of coarse-cell offsets with a smoothness coupling (module
    docstring).  ``fixed``, ``moving``: ``(1, 1, D, H, W)`` on one grid (intensities e.g. in [0, 1]).

    ``spacing_mm``: the grid's voxel spacing per axis ``(d, h, w)`` (or one number), mm.  ``grid_spacing_mm``
    (default 6): the coarse cells' size, rounded to whole voxels per axis.  ``search_radius_mm`` (default 24): the
    largest offset searched per axis, rounded to whole cells (at least one); the motion it recovers, before the
    continuous stage refines it.  ``mind_radius_mm`` / ``mind_dilation_mm`` (3 / 6): the descriptor's patch radius
    and neighbour distance, rounded to voxels of the finest axis.  ``patch`` (3) and ``smoothing`` (3): odd box
    windows in cells for the cost aggregation and the field smoothing.  ``coupling``: the increasing coupling
    weights (cost per cell²), ConvexAdam's by default.  ``mask`` (fixed grid) weights the cost: points without mask
    follow their neighbours; ``moving_mask`` does the same for the backward search of ``inverse_consistent``.
    ``max_cost_bytes``: above this size the cost volume is recomputed for each pass instead of kept.
    """
    if fixed.ndim != 5 or fixed.shape[:2] != (1, 1):
        raise ValueError(f"fixed must be (1, 1, D, H, W), got {tuple(fixed.shape)}")
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {tuple(moving.shape)} must be on the fixed grid {tuple(fixed.shape)}")
    for name, m in (("mask", mask), ("moving_mask", moving_mask)):
        if m is not None and tuple(m.shape[-3:]) != tuple(fixed.shape[2:]):
            raise ValueError(f"{name} {tuple(m.shape)} must be on the fixed grid {tuple(fixed.shape[2:])}")
    spacing = (spacing_mm,) * 3 if isinstance(spacing_mm, (int, float)) else tuple(spacing_mm)
    if len(spacing) != 3:
        raise ValueError(f"spacing_mm must be one number or three (d, h, w), got {spacing_mm!r}")
    spacing = tuple(_positive("spacing_mm", s) for s in spacing)
    grid_spacing = _positive("grid_spacing_mm", grid_spacing_mm)
    radius_mm = _positive("search_radius_mm", search_radius_mm)
    mind_radius = float(mind_radius_mm)
    if not (math.isfinite(mind_radius) and mind_radius >= 0):
        raise ValueError(f"mind_radius_mm must be a finite number >= 0, got {mind_radius_mm!r}")
    mind_dilation = _positive("mind_dilation_mm", mind_dilation_mm)
    patch, smoothing = _odd_window("patch", patch), _odd_window("smoothing", smoothing)
    coupling = tuple(float(c) for c in coupling)
    if any(not (math.isfinite(c) and c >= 0) for c in coupling):
        raise ValueError(f"coupling weights must be finite numbers >= 0, got {coupling!r}")
    if int(ic_iterations) != ic_iterations or ic_iterations < 0:
        raise ValueError(f"ic_iterations must be a whole number >= 0, got {ic_iterations!r}")

    factors = tuple(max(1, math.floor(grid_spacing / s + 0.5)) for s in spacing)
    radius = tuple(max(1, math.floor(radius_mm / (g * s) + 0.5)) for g, s in zip(factors, spacing))
    finest = min(spacing)
    r_vox = math.floor(mind_radius / finest + 0.5)
    d_vox = max(1, math.floor(mind_dilation / finest + 0.5))
    shape = tuple(fixed.shape[2:])

    with torch.no_grad():
        f_fix = _coarse(mind_ssc(fixed.float(), r_vox, d_vox), factors)
        f_mov = _coarse(mind_ssc(moving.float(), r_vox, d_vox), factors)

        def weight(m: torch.Tensor | None) -> torch.Tensor | None:
            return None if m is None else _coarse(m.reshape(1, 1, *shape).float(), factors)

        volume = _CostVolume(f_fix, f_mov, weight(mask), radius, patch, max_cost_bytes)
        field = _search(volume, coupling, smoothing)
        del volume
        if inverse_consistent:
            backward = _search(_CostVolume(f_mov, f_fix, weight(moving_mask), radius, patch, max_cost_bytes),
                               coupling, smoothing)
            field = _symmetrised(field, backward, int(ic_iterations))
        return _upsample(field, shape, factors).to(dtype=fixed.dtype)
