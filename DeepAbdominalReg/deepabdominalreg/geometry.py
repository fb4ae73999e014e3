"""Geometry: :class:`Grid` (size, spacing, origin, direction of an image) owns the voxel <-> physical (mm, LPS)
conversions of points and displacement vectors; resampling between grids (``grid_sample`` coordinates of the torch
code: :func:`deepabdominalreg.spatial.normalising_scale`).

Conventions used throughout the core library:

* Physical space is ITK's **LPS** (x grows to the patient's Left, y to Posterior, z to Superior), in **mm**.
* A SimpleITK image's index order is ``(i, j, k)`` = ``(x, y, z)``; ``sitk.GetArrayFromImage`` returns the
  transposed ``(k, j, i)`` = ``(z, y, x)`` array.  Arrays in this library are ``zyx`` unless named otherwise.
* Physical point of a voxel: ``p = origin + direction @ (spacing * index_xyz)``.

Every ITK resampling goes through :func:`resample_image`; the full-resolution outputs of a registration are
resampled in torch by :mod:`deepabdominalreg.registration.fields`, tested to give what :func:`resample_image` gives.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
    "label_gaussian": sitk.sitkLabelGaussian,
}


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image: size (voxels, ``xyz``), spacing (mm), origin (mm, LPS), direction (3x3, row-major).

    The grid is the geometry without the pixels; resampling targets a grid.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image) -> Grid:
        """The grid of a SimpleITK image."""
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction as a 3x3 float64 matrix; its columns are the index axes ``i, j, k`` in LPS."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def voxel_to_mm_matrix(self) -> np.ndarray:
        """``direction @ diag(spacing)``, 3x3 float64: a displacement in voxels (index order ``i, j, k``) -> LPS mm."""
        return self.direction_matrix @ np.diag(self.spacing)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """The array shape ``(z, y, x)`` of the grid's images (``sitk.GetArrayFromImage`` order)."""
        return (self.size[2], self.size[1], self.size[0])

    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping a continuous index ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.voxel_to_mm_matrix
        m[:3, 3] = self.origin
        return m

    def physical_to_index_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping LPS mm to a continuous index ``(i, j, k)``."""
        return np.linalg.inv(self.index_to_physical_matrix())

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """Continuous indices ``(N, 3)`` in ``xyz`` order -> LPS points ``(N, 3)`` in mm."""
        index_xyz = np.atleast_2d(np.asarray(index_xyz, dtype=np.float64))
        m = self.index_to_physical_matrix()
        return index_xyz @ m[:3, :3].T + m[:3, 3]

    def physical_to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS points ``(N, 3)`` in mm -> continuous indices ``(N, 3)`` in ``xyz`` order."""
        points_lps = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
        m = self.physical_to_index_matrix()
        return points_lps @ m[:3, :3].T + m[:3, 3]

    def displacement_to_mm(self, displacement_vox: np.ndarray) -> np.ndarray:
        """Displacement vectors in voxels of this grid, ``(..., 3)`` in index order ``(i, j, k)`` = ``xyz`` ->
        LPS mm ``(..., 3)``, float64: ``direction @ diag(spacing) @ v`` (no origin: vectors, not points)."""
        matrix = self.voxel_to_mm_matrix
        return np.asarray(displacement_vox, dtype=np.float64) @ matrix.T

    def displacement_to_voxels(self, displacement_mm: np.ndarray) -> np.ndarray:
        """Displacement vectors in LPS mm ``(..., 3)`` -> voxels of this grid, ``(..., 3)`` in index order
        ``(i, j, k)`` = ``xyz``, float64: the inverse of :meth:`displacement_to_mm`."""
        matrix_inv = np.linalg.inv(self.voxel_to_mm_matrix)
        return np.asarray(displacement_mm, dtype=np.float64) @ matrix_inv.T

    def corners(self) -> np.ndarray:
        """The 8 corner voxel centres of the grid in LPS mm, ``(8, 3)``."""
        ext = [(0, s - 1) for s in self.size]
        idx = np.array([[a, b, c] for a in ext[0] for b in ext[1] for c in ext[2]], dtype=np.float64)
        return self.index_to_physical(idx)

    def physical_extent_mm(self) -> np.ndarray:
        """Edge lengths of the grid along its own axes (mm), from first to last voxel border."""
        return np.asarray(self.size, dtype=np.float64) * np.asarray(self.spacing)

    def with_size(self, size: tuple[int, int, int]) -> Grid:
        """The same box (first and last voxel borders, direction) divided into ``size`` voxels ``(x, y, z)``: a scan
        of the same field of view at another resolution (anisotropic if the ratios differ)."""
        size = tuple(int(n) for n in size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"size must be three positive voxel counts, got {size}")
        spacing = self.physical_extent_mm() / np.asarray(size, dtype=np.float64)
        first_border = self.index_to_physical(np.array([[-0.5, -0.5, -0.5]]))[0]
        origin = first_border + self.direction_matrix @ (0.5 * spacing)
        return Grid(size=size, spacing=tuple(float(v) for v in spacing), origin=tuple(float(o) for o in origin),
                    direction=self.direction)

    def reference_image(self, pixel_id: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image with this geometry (used as a resampling reference)."""
        image = sitk.Image([int(s) for s in self.size], pixel_id)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Copy this geometry onto ``image`` (in place; the size must match) and return it."""
        if tuple(image.GetSize()) != tuple(self.size):
            raise ValueError(f"image size {image.GetSize()} does not match grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def image_from_array(self, array_zyx: np.ndarray, is_vector: bool = False) -> sitk.Image:
        """Wrap a ``zyx`` (or ``zyx3`` when ``is_vector``) array in an image with this geometry."""
        image = sitk.GetImageFromArray(array_zyx, isVector=is_vector)
        return self.apply_to(image)


def affine_matrix(transform: sitk.AffineTransform | None) -> np.ndarray:
    """4x4 homogeneous matrix of an ITK affine (``y = L (x - c) + c + t``), identity for ``None``."""
    m = np.eye(4)
    if transform is not None:
        linear = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
        centre = np.asarray(transform.GetCenter(), dtype=np.float64)
        m[:3, :3] = linear
        m[:3, 3] = centre + np.asarray(transform.GetTranslation(), dtype=np.float64) - linear @ centre
    return m


def mask_bounding_box(mask: np.ndarray, margin: int = 0, *, whole_if_empty: bool = False
                      ) -> tuple[slice, ...] | None:
    """Array slices (voxel indices, array axis order, e.g. ``z, y, x``) of the bounding box of ``mask``'s ``True``
    voxels, grown by ``margin`` voxels and cut to the array; for an empty mask ``None``, or the whole array with
    ``whole_if_empty``."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape) if whole_if_empty else None
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


# --------------------------------------------------------------------------------------------------------------
# resampling: the one function
# --------------------------------------------------------------------------------------------------------------


def resample_image(
    image: sitk.Image,
    reference: Grid | sitk.Image,
    transform: sitk.Transform | None = None,
    interpolator: str = "linear",
    default_value: float = 0.0,
    output_pixel_type: int | None = None,
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid.

    ``transform`` maps points of the *reference* (output) space to points of ``image`` (input) space, in LPS mm,
    as in ITK (identity when ``None``).  ``interpolator`` is ``"linear"``, ``"nearest"``, ``"bspline"`` or
    ``"label_gaussian"``.  Voxels that map outside ``image`` get ``default_value``.  The output keeps the
    input pixel type unless ``output_pixel_type`` is given.  Works for scalar and vector images.
    """
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {interpolator!r}")
    grid = reference if isinstance(reference, Grid) else Grid.from_image(reference)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in grid.size])
    resampler.SetOutputSpacing(grid.spacing)
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction)
    resampler.SetInterpolator(_INTERPOLATORS[interpolator])
    resampler.SetDefaultPixelValue(float(default_value))
    resampler.SetOutputPixelType(image.GetPixelID() if output_pixel_type is None else output_pixel_type)
    resampler.SetTransform(transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity))
    return resampler.Execute(image)


def check_displacement(field_lps: sitk.Image) -> None:
    """Raise ``ValueError`` unless ``field_lps`` is a 3D image with 3 components per voxel (a displacement field)."""
    if field_lps.GetDimension() != 3 or field_lps.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(
            "expected a 3D displacement field with 3 components per voxel (LPS mm), got "
            f"{field_lps.GetDimension()}D with {field_lps.GetNumberOfComponentsPerPixel()} components"
        )


def displacement_transform(displacement_lps: sitk.Image) -> sitk.DisplacementFieldTransform:
    """The transform ``x -> x + u(x)`` of a displacement field ``u`` (3 components, LPS mm; linear interpolation,
    zero outside its grid).  The field is copied: ITK's transform takes over the buffer of the image it is given."""
    check_displacement(displacement_lps)
    return sitk.DisplacementFieldTransform(sitk.Cast(displacement_lps, sitk.sitkVectorFloat64))


def map_points(points_lps: np.ndarray, displacement_lps: sitk.Image) -> np.ndarray:
    """Fixed points ``(N, 3)`` (LPS mm) mapped to ``x + u(x)`` (``u`` interpolated linearly; zero outside the grid)."""
    transform = displacement_transform(displacement_lps)
    points = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    return np.array([transform.TransformPoint([float(c) for c in p]) for p in points]).reshape(-1, 3)


def warp_with_displacement(
    image: sitk.Image,
    displacement_lps: sitk.Image,
    interpolator: str = "linear",
    default_value: float = 0.0,
) -> sitk.Image:
    """``image`` (moving) resampled onto the displacement's (fixed) grid at ``x + u(x)``: ``out(x) = image(x + u(x))``.

    ``displacement_lps``: the field ``u`` (3 components, LPS mm, on the fixed grid); ``interpolator`` as in
    :func:`resample_image`; points mapped outside ``image`` get ``default_value`` (e.g.
    :data:`deepabdominalreg.config.OUTSIDE_FOV_HU` for CT, 0 for labels).  The pixel type of ``image`` is kept.
    """
    return resample_image(image, displacement_lps, displacement_transform(displacement_lps), interpolator,
                          default_value)


def make_working_grid(
    reference: Grid | sitk.Image,
    spacing_mm: float,
    max_voxels_per_axis: int | None = None,
) -> Grid:
    """An isotropic grid covering ``reference``'s voxel centres, with ``reference``'s direction.

    The spacing is ``spacing_mm`` (mm) unless that would exceed ``max_voxels_per_axis``, in which case it grows.
    The grid is centred on ``reference``'s centre and its first/last voxel centres lie on or outside
    ``reference``'s, so a field on it is interpolated (never extrapolated) at every reference voxel.
    """
    ref = reference if isinstance(reference, Grid) else Grid.from_image(reference)
    # span between the first and last voxel centres: the working grid's centres must cover it, so that a field
    # computed on the working grid is defined (interpolated, not extrapolated) at every voxel of the reference
    span = (np.asarray(ref.size, dtype=np.float64) - 1.0) * np.asarray(ref.spacing)
    spacing = float(spacing_mm)
    if max_voxels_per_axis:
        spacing = max(spacing, float(span.max()) / max(max_voxels_per_axis - 1, 1))
    size = np.maximum(np.ceil(span / spacing - 1e-6).astype(int) + 1, 2)
    centre_index_ref = (np.asarray(ref.size, dtype=np.float64) - 1.0) / 2.0
    centre = ref.index_to_physical(centre_index_ref)[0]
    half = (size - 1) * spacing / 2.0
    origin = centre - ref.direction_matrix @ half
    return Grid(
        size=tuple(int(s) for s in size),
        spacing=(spacing, spacing, spacing),
        origin=tuple(float(o) for o in origin),
        direction=ref.direction,
    )


def physical_overlap_fraction(a: Grid | sitk.Image, b: Grid | sitk.Image) -> float:
    """Fraction of ``a``'s axis-aligned (LPS) bounding box that ``b``'s bounding box covers (0..1)."""
    ga = a if isinstance(a, Grid) else Grid.from_image(a)
    gb = b if isinstance(b, Grid) else Grid.from_image(b)
    ca, cb = ga.corners(), gb.corners()
    lo = np.maximum(ca.min(0), cb.min(0))
    hi = np.minimum(ca.max(0), cb.max(0))
    inter = np.prod(np.clip(hi - lo, 0, None))
    vol_a = np.prod(np.clip(ca.max(0) - ca.min(0), 1e-6, None))
    return float(inter / vol_a)


def points_inside(grid: Grid, points_lps: Sequence[Sequence[float]]) -> np.ndarray:
    """Boolean mask: which LPS points (mm) fall inside ``grid`` (within half a voxel of its border)."""
    idx = grid.physical_to_index(np.asarray(points_lps, dtype=np.float64))
    size = np.asarray(grid.size)
    return np.all((idx >= -0.5) & (idx <= size - 0.5), axis=1)
