"""Global search of the translation between two scans before the affine: exhaustive, on a coarse grid, by FFT.

Scans of one patient from different scanners or table positions have origins hundreds of mm apart, and two scans
may cover different parts of the body (abdomen-pelvis against chest-upper abdomen).  The centre-of-mass start of the
affine then lands far from the answer whenever the two fields of view differ.  Here every translation on a coarse
lattice (``initial_search_spacing_mm``) is scored at once by the normalised cross-correlation of the two coarse
images **over the overlap of their fields of view** at that translation (masked NCC by FFT: Padfield, "Masked
object registration in the Fourier domain", IEEE TIP 2012), so that a scan covering only the chest finds its place
in one covering chest and abdomen.  Translations whose overlap is smaller than ``min_overlap`` of the smaller field
of view are not considered (a few voxels of overlap can correlate by chance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import fft, ndimage

from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.geometry import Grid, make_working_grid, resample_image
from deepabdominalreg.registration.affine import centre_of_mass_lps

__all__ = ["OffsetSearchResult", "OffsetSearchSettings", "masked_ncc_map", "search_offset"]


@dataclass(frozen=True)
class OffsetSearchSettings:
    """The search's settings, from :meth:`from_config` (``RegistrationConfig.initial_search_*``)."""

    spacing_mm: float
    """Spacing (mm) of the coarse lattice of translations (and of the images they are scored on)."""
    range_mm: float
    """Largest distance (mm, along each of the fixed image's axes) of a searched translation from the
    centre-of-mass translation."""
    min_overlap: float
    """Smallest overlap of the two fields of view, as a fraction (0..1] of the smaller one's volume."""

    def __post_init__(self) -> None:
        if not self.spacing_mm > 0 or not self.range_mm >= 0 or not 0 < self.min_overlap <= 1:
            raise ValueError(f"offset search needs spacing_mm > 0, range_mm >= 0 and 0 < min_overlap <= 1, got {self}")

    @classmethod
    def from_config(cls, config: RegistrationConfig) -> OffsetSearchSettings:
        return cls(spacing_mm=float(config.initial_search_spacing_mm), range_mm=float(config.initial_search_range_mm),
                   min_overlap=float(config.initial_search_min_overlap))


@dataclass(frozen=True)
class OffsetSearchResult:
    """The best translation: ``translation_mm`` (fixed -> moving, LPS mm: the fixed point ``x`` lies at ``x + t``
    in the moving scan), its masked NCC ``correlation`` (-1..1), the overlap of the two fields of view there as a
    fraction of the smaller one (``overlap_fraction``), and the centre-of-mass translation it replaces."""

    translation_mm: np.ndarray
    correlation: float
    overlap_fraction: float
    centre_of_mass_translation_mm: np.ndarray
    at_overlap_limit: bool = False
    """True when a lattice neighbour of the best translation was left out for too small an overlap: the
    correlation still rises towards smaller overlaps, so its maximum is the constraint's, not the anatomy's.
    Scans that share anatomy peak inside the allowed overlaps; scans that share none (disjoint coverage, another
    body part) correlate best on the smallest overlap allowed."""


def masked_ncc_map(fixed: np.ndarray, fixed_mask: np.ndarray, moving: np.ndarray, moving_mask: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Normalised cross-correlation of two arrays at every integer shift, over the overlap of their masks.

    For a shift ``k`` (one per axis, ``-(n_fixed - 1) .. n_moving - 1``), the NCC (Pearson correlation) of
    ``fixed[i]`` and ``moving[i + k]`` over the voxels ``i`` where ``fixed_mask[i]`` and ``moving_mask[i + k]`` are
    both set.  Returns ``(ncc, overlap)``, both of shape ``n_fixed + n_moving - 1`` per axis: entry ``n`` is the
    shift ``k = n - (n_fixed - 1)``; ``overlap`` counts the voxels (rounded), and ``ncc`` is 0 where either image
    is constant over the overlap.  Six correlations by FFT (Padfield 2012), float64.
    """
    if fixed.shape != fixed_mask.shape or moving.shape != moving_mask.shape or fixed.ndim != moving.ndim:
        raise ValueError(f"each image needs a mask of its shape: {fixed.shape}/{fixed_mask.shape}, "
                         f"{moving.shape}/{moving_mask.shape}")
    full = tuple(a + b - 1 for a, b in zip(fixed.shape, moving.shape))
    shape = tuple(fft.next_fast_len(n, real=True) for n in full)
    axes = tuple(range(fixed.ndim))
    mf, mm = fixed_mask.astype(np.float64), moving_mask.astype(np.float64)
    f, m = fixed * mf, moving * mm
    flip = (slice(None, None, -1),) * fixed.ndim  # correlation = convolution with the fixed arrays reversed
    spectra_f = [fft.rfftn(a[flip], shape, axes=axes) for a in (mf, f, f * f)]
    spectra_m = [fft.rfftn(a, shape, axes=axes) for a in (mm, m, m * m)]
    crop = tuple(slice(0, n) for n in full)

    def correlate(i: int, j: int) -> np.ndarray:
        return fft.irfftn(spectra_f[i] * spectra_m[j], shape, axes=axes)[crop]

    count = correlate(0, 0)
    overlap = np.rint(count)
    n = np.maximum(overlap, 1.0)
    sum_f, sum_m = correlate(1, 0), correlate(0, 1)
    covariance = correlate(1, 1) - sum_f * sum_m / n
    variance_f = correlate(2, 0) - sum_f * sum_f / n
    variance_m = correlate(0, 2) - sum_m * sum_m / n
    # FFT round-off is ~1e-12 of the largest sums: a variance below that is a constant image over the overlap
    tolerance = 1e-9 * max(float(np.abs(f).max(initial=0.0)) ** 2, float(np.abs(m).max(initial=0.0)) ** 2, 1e-30) * n
    valid = (overlap >= 1) & (variance_f > tolerance) & (variance_m > tolerance)
    ncc = np.zeros(full)
    ncc[valid] = covariance[valid] / np.sqrt(variance_f[valid] * variance_m[valid])
    return np.clip(ncc, -1.0, 1.0), overlap


def _lattice_on_axes(grid: Grid, anchor: Grid) -> Grid:
    """The nodes of ``anchor``'s isotropic lattice (its axes, spacing and node positions, extended beyond its
    extent) that cover ``grid``'s voxel centres.

    The two scans are sampled at the same physical points, so every searched translation is a whole number of
    lattice steps apart from the geometric one: identical scans correlate exactly at translation 0 and the start
    is the identity, not a sub-lattice offset of the two coarse images' sampling.
    """
    d = np.asarray(anchor.direction, dtype=np.float64).reshape(3, 3)
    spacing_mm = float(anchor.spacing[0])
    along = grid.corners() @ d  # the corners' coordinates along the lattice's axes
    node = d.T @ np.asarray(anchor.origin, dtype=np.float64)
    low = node + spacing_mm * np.floor((along.min(axis=0) - node) / spacing_mm + 1e-6)
    high = along.max(axis=0)
    size = np.maximum(np.ceil((high - low) / spacing_mm - 1e-6).astype(int) + 1, 2)
    return Grid(size=tuple(int(s) for s in size), spacing=(float(spacing_mm),) * 3,
                origin=tuple(float(v) for v in d @ low), direction=tuple(float(v) for v in d.ravel()))


def _coarse(grid: Grid, intensity_zyx: np.ndarray, fov_zyx: np.ndarray, lattice: Grid
            ) -> tuple[np.ndarray, np.ndarray]:
    """``intensity_zyx`` (on ``grid``) Gaussian-smoothed to ``lattice``'s spacing and resampled onto it, with its
    field of view there (the voxels that lie inside ``fov_zyx``)."""
    sigma = np.maximum(lattice.spacing[0] / np.asarray(grid.spacing[::-1]) / 2.0, 0.0)  # zyx voxels
    smoothed = ndimage.gaussian_filter(np.where(fov_zyx, intensity_zyx, 0.0).astype(np.float32), sigma=sigma)
    image = sitk.GetArrayFromImage(resample_image(grid.image_from_array(smoothed), lattice, interpolator="linear"))
    inside = resample_image(grid.image_from_array(fov_zyx.astype(np.uint8)), lattice, interpolator="nearest")
    return image.astype(np.float64), sitk.GetArrayFromImage(inside).astype(bool)


def _parabolic_offset(values: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    """Sub-voxel position of a peak at ``index`` (array axis order), per axis from the parabola through it and
    its two neighbours (0 at the array's border or where the neighbours are not lower)."""
    offset = np.zeros(values.ndim)
    for axis in range(values.ndim):
        if not 0 < index[axis] < values.shape[axis] - 1:
            continue
        before, after = list(index), list(index)
        before[axis] -= 1
        after[axis] += 1
        a, b, c = values[tuple(before)], values[index], values[tuple(after)]
        curvature = a - 2.0 * b + c
        if np.isfinite(curvature) and curvature < 0:
            offset[axis] = float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5))
    return offset


def search_offset(
    fixed_grid: Grid,
    fixed_intensity: np.ndarray,
    moving_grid: Grid,
    moving_intensity: np.ndarray,
    settings: OffsetSearchSettings,
    *,
    fixed_field_of_view: np.ndarray | None = None,
    moving_field_of_view: np.ndarray | None = None,
) -> OffsetSearchResult:
    """The translation (fixed -> moving, LPS mm) that best aligns two working images (``zyx``, intensities in
    [0, 1], body-masked), searched exhaustively on a lattice of ``settings.spacing_mm`` along the fixed image's axes
    (any direction and spacing of either image; the moving image is resampled onto the fixed image's axes).

    Each translation within ``settings.range_mm`` of the centre-of-mass translation (along each axis) whose fields
    of view overlap by at least ``settings.min_overlap`` of the smaller one is scored by :func:`masked_ncc_map`;
    the best is refined to sub-lattice precision by a parabola per axis.  When no translation qualifies (scans that
    cannot overlap that much), the centre-of-mass translation is returned with ``correlation`` 0 and
    ``overlap_fraction`` 0.  ``*_field_of_view``: ``zyx`` bool masks of the voxels holding image data (default
    all).
    """
    fixed_fov = np.ones(fixed_intensity.shape, bool) if fixed_field_of_view is None else fixed_field_of_view
    moving_fov = np.ones(moving_intensity.shape, bool) if moving_field_of_view is None else moving_field_of_view
    spacing = float(settings.spacing_mm)
    anchor = make_working_grid(fixed_grid, spacing)
    # both lattices built alike from one set of nodes: identical scans give identical coarse images and masks
    fixed_lattice, moving_lattice = _lattice_on_axes(fixed_grid, anchor), _lattice_on_axes(moving_grid, anchor)
    f, f_fov = _coarse(fixed_grid, fixed_intensity, fixed_fov.astype(bool), fixed_lattice)
    m, m_fov = _coarse(moving_grid, moving_intensity, moving_fov.astype(bool), moving_lattice)
    com = (centre_of_mass_lps(moving_grid, np.where(moving_fov, moving_intensity, 0.0))
           - centre_of_mass_lps(fixed_grid, np.where(fixed_fov, fixed_intensity, 0.0)))
    ncc, overlap = masked_ncc_map(f, f_fov, m, m_fov)
    # the translation of map entry n (zyx): t = o_m - o_f + D s (n - (n_f - 1)), reversed to xyz
    direction = fixed_lattice.direction_matrix
    origin_offset = np.asarray(moving_lattice.origin) - np.asarray(fixed_lattice.origin)
    first_shift = -(np.asarray(f.shape) - 1)  # zyx

    def translation(entry_zyx: np.ndarray) -> np.ndarray:
        return origin_offset + direction @ (spacing * (np.asarray(entry_zyx, dtype=np.float64) + first_shift)[::-1])

    # the search range, as lattice steps along each axis around the centre-of-mass translation
    centre_steps = direction.T @ (com - origin_offset) / spacing  # xyz
    axes = [np.arange(n, dtype=np.float64) + first_shift[a] for a, n in enumerate(ncc.shape)]  # zyx
    reach = settings.range_mm / spacing
    in_range = np.ones(ncc.shape, bool)
    for a, steps in enumerate(axes):
        shape = [1, 1, 1]
        shape[a] = -1
        in_range &= (np.abs(steps - centre_steps[2 - a]) <= reach + 1e-9).reshape(shape)
    smaller = float(min(f_fov.sum(), m_fov.sum()))
    candidates = in_range & (overlap >= settings.min_overlap * smaller) & (overlap > 0)
    if not candidates.any():
        return OffsetSearchResult(translation_mm=com, correlation=0.0, overlap_fraction=0.0,
                                  centre_of_mass_translation_mm=com)
    score = np.where(candidates, ncc, -np.inf)
    best = np.unravel_index(int(np.argmax(score)), score.shape)
    refined = np.asarray(best, dtype=np.float64) + _parabolic_offset(score, best)
    too_small = in_range & ~candidates
    at_limit = False
    for axis in range(3):
        for step in (-1, 1):
            neighbour = list(best)
            neighbour[axis] += step
            if 0 <= neighbour[axis] < ncc.shape[axis] and too_small[tuple(neighbour)]:
                at_limit = True
    return OffsetSearchResult(translation_mm=translation(refined), correlation=float(ncc[best]),
                              overlap_fraction=float(overlap[best] / max(smaller, 1.0)),
                              centre_of_mass_translation_mm=com, at_overlap_limit=at_limit)
