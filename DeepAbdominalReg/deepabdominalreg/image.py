"""Image I/O, validation and geometry: the one owner of voxel <-> physical conversions.

Conventions used throughout the core library:

* Physical space is ITK's **LPS** (x grows to the patient's Left, y to Posterior, z to Superior), in **mm**.
* A SimpleITK image's index order is ``(i, j, k)`` = ``(x, y, z)``; ``sitk.GetArrayFromImage`` returns the
  transposed ``(k, j, i)`` = ``(z, y, x)`` array.  Arrays in this library are ``zyx`` unless named otherwise.
* Physical point of a voxel: ``p = origin + direction @ (spacing * index_xyz)``.

All resampling between grids goes through :func:`resample_image`.
"""

from __future__ import annotations

import ctypes
import gzip
import os
import struct
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = [
    "Grid",
    "ImageValidationError",
    "affine_matrix",
    "make_working_grid",
    "mask_bounding_box",
    "physical_overlap_fraction",
    "read_displacement_field",
    "read_image",
    "read_labels",
    "resample_image",
    "validate_image",
    "validate_labels",
    "writable_array_view",
    "write_displacement_field",
    "write_image",
]

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
    "label_gaussian": sitk.sitkLabelGaussian,
}


class ImageValidationError(ValueError):
    """An input image cannot be used; the message says which input, what is wrong and what to do."""


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
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (self.size[2], self.size[1], self.size[0])

    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping a continuous index ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
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

    def corners(self) -> np.ndarray:
        """The 8 corner voxel centres of the grid in LPS mm, ``(8, 3)``."""
        ext = [(0, s - 1) for s in self.size]
        idx = np.array([[a, b, c] for a in ext[0] for b in ext[1] for c in ext[2]], dtype=np.float64)
        return self.index_to_physical(idx)

    def physical_extent_mm(self) -> np.ndarray:
        """Edge lengths of the grid along its own axes (mm), from first to last voxel border."""
        return np.asarray(self.size, dtype=np.float64) * np.asarray(self.spacing)

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


def writable_array_view(image: sitk.Image) -> np.ndarray:
    """A writable ``zyx`` (``zyxc`` for vector images) NumPy view of ``image``'s own pixel buffer, without a copy.

    For filling a freshly created image slab by slab (a full-resolution field is >1 GB: building it in NumPy and
    then copying it into an image needs twice that).  Only use it on an image whose buffer no other image shares
    (SimpleITK copies share buffers until written through SimpleITK); keep ``image`` alive while using the view.
    """
    view = sitk.GetArrayViewFromImage(image)
    address = view.__array_interface__["data"][0]
    buffer = (ctypes.c_byte * view.nbytes).from_address(address)
    return np.frombuffer(buffer, dtype=view.dtype).reshape(view.shape)


# --------------------------------------------------------------------------------------------------------------
# reading and validation
# --------------------------------------------------------------------------------------------------------------


def _check_gzip_complete(path: Path, role: str) -> None:
    """SimpleITK reads a truncated ``.gz`` without error; decompress it fully once to detect that."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                decompressor.decompress(chunk, 0)
                while decompressor.unconsumed_tail:
                    decompressor.decompress(decompressor.unconsumed_tail, 0)
    except zlib.error as exc:
        raise ImageValidationError(
            f"{role} file '{path}' is corrupt ({exc}); copy it again from its source."
        ) from exc
    if not decompressor.eof:
        raise ImageValidationError(
            f"{role} file '{path}' is truncated (the compressed stream ends early, e.g. an interrupted copy); "
            "copy it again from its source."
        )


def _read_dicom_folder(folder: Path, role: str, series_uid: str | None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not series:
        raise ImageValidationError(
            f"{role} folder '{folder}' contains no DICOM series; give a DICOM folder or an image file "
            "(NIfTI, NRRD, MHA)."
        )
    if series_uid is None and len(series) > 1:
        listing = "\n".join(
            f"  {uid}  ({len(reader.GetGDCMSeriesFileNames(str(folder), uid))} files)" for uid in series
        )
        raise ImageValidationError(
            f"{role} folder '{folder}' holds {len(series)} DICOM series; choose one with "
            f"'<folder>::<SeriesInstanceUID>' or move it into its own folder:\n{listing}"
        )
    uid = series_uid or series[0]
    if uid not in series:
        raise ImageValidationError(f"{role}: series '{uid}' is not in '{folder}'; found: {', '.join(series)}")
    files = reader.GetGDCMSeriesFileNames(str(folder), uid)
    reader.SetFileNames(files)
    return reader.Execute()


def _read_any(path: str | os.PathLike, role: str) -> sitk.Image:
    text = str(path)
    series_uid = None
    if "::" in text:
        text, series_uid = text.split("::", 1)
    p = Path(text)
    if not p.exists():
        raise ImageValidationError(f"{role} '{p}' does not exist; check the path.")
    if p.is_dir():
        return _read_dicom_folder(p, role, series_uid)
    if p.stat().st_size == 0:
        raise ImageValidationError(f"{role} file '{p}' is empty (0 bytes); copy it again from its source.")
    if p.name.endswith(".gz"):
        _check_gzip_complete(p, role)
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[-1] if first else ""
        raise ImageValidationError(
            f"{role} file '{p}' cannot be read as an image ({detail}); use NIfTI, NRRD, MHA or a DICOM folder, "
            "and check that the file is complete."
        ) from exc


def validate_image(image: sitk.Image, role: str, *, allow_vector: bool = False) -> None:
    """Raise :class:`ImageValidationError` if ``image`` is not a usable 3D scalar image.

    Checks: 3 dimensions, scalar pixels, spacing > 0, non-singular direction, finite voxels, not constant.
    """
    if image.GetDimension() != 3:
        raise ImageValidationError(
            f"{role} has {image.GetDimension()} dimensions; a 3D volume is required "
            "(for a 4D series, extract one time point first)."
        )
    if image.GetNumberOfComponentsPerPixel() != 1 and not allow_vector:
        raise ImageValidationError(
            f"{role} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector/RGB image); "
            "a scalar CT volume is required."
        )
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ImageValidationError(
            f"{role} has invalid voxel spacing {tuple(spacing)} mm; all spacings must be positive — fix the header."
        )
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise ImageValidationError(
            f"{role} has a singular direction (orientation) matrix {direction.round(3).tolist()}; fix the header."
        )
    if min(image.GetSize()) < 2:
        raise ImageValidationError(f"{role} has size {image.GetSize()}; every axis needs at least 2 voxels.")
    if allow_vector:
        return
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise ImageValidationError(
                f"{role} contains {bad} NaN/inf voxels; replace them (e.g. by -1000 HU) before registering."
            )
    if array.size and array.min() == array.max():
        raise ImageValidationError(
            f"{role} is constant (every voxel = {array.flat[0]}); it holds no image to register — check the file."
        )


def read_image(path: str | os.PathLike, role: str = "image") -> sitk.Image:
    """Read and validate a 3D scalar image (file or DICOM folder; ``folder::SeriesUID`` picks a series)."""
    image = _read_any(path, role)
    validate_image(image, f"{role} '{path}'")
    return image


def validate_labels(labels: sitk.Image, role: str) -> None:
    """Raise if ``labels`` is not a label map (3D, scalar, integer values >= 0)."""
    validate_image_geometry_only(labels, role)
    array = sitk.GetArrayViewFromImage(labels)
    if np.issubdtype(array.dtype, np.floating) and (
        not np.all(np.isfinite(array)) or not np.all(array == np.round(array))
    ):
        raise ImageValidationError(
            f"{role} has non-integer values; a label map (one integer per structure) is required — "
            "export the segmentation as a labelmap."
        )
    if array.size and array.min() < 0:
        raise ImageValidationError(f"{role} has negative values; labels must be >= 0 (0 = background).")


def validate_image_geometry_only(image: sitk.Image, role: str) -> None:
    """Dimension, components, spacing and direction checks without looking at voxel values."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageValidationError(f"{role} must be a 3D scalar image (got {image.GetDimension()}D, "
                                   f"{image.GetNumberOfComponentsPerPixel()} components).")
    spacing = np.asarray(image.GetSpacing())
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise ImageValidationError(f"{role} has invalid spacing {tuple(spacing)}; fix the header.")
    if abs(np.linalg.det(np.asarray(image.GetDirection()).reshape(3, 3))) < 1e-6:
        raise ImageValidationError(f"{role} has a singular direction matrix; fix the header.")


def read_labels(path: str | os.PathLike, role: str = "segmentation") -> sitk.Image:
    """Read a label map and return it as ``sitkUInt16`` (values preserved exactly)."""
    image = _read_any(path, role)
    validate_labels(image, f"{role} '{path}'")
    if sitk.GetArrayViewFromImage(image).max() > np.iinfo(np.uint16).max:
        raise ImageValidationError(f"{role} '{path}' has label values above 65535; relabel it.")
    return sitk.Cast(image, sitk.sitkUInt16)


# --------------------------------------------------------------------------------------------------------------
# writing (atomic)
# --------------------------------------------------------------------------------------------------------------


def _atomic_target(path: Path) -> Path:
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(path)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_displacement_field(field_lps: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a displacement field (3-component vectors in LPS mm) that ITK, SimpleITK and Slicer read as such.

    For NIfTI the file follows the NIfTI displacement convention (intent code 1006, vectors stored in RAS); ITK
    readers, SimpleITK and Slicer convert them back to LPS on reading; the extension decides the compression
    (``.nii.gz`` or ``.nii``).  Other formats (``.mha``, ``.nrrd``) store LPS vectors as they are, compressed when
    ``compress``.
    """
    path = Path(path)
    if field_lps.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("a displacement field needs 3 components per voxel")
    field32 = sitk.Cast(field_lps, sitk.sitkVectorFloat32)
    if not path.name.endswith((".nii", ".nii.gz")):
        return write_image(field32, path, compress)
    array = sitk.GetArrayFromImage(field32)
    array[..., :2] *= -1.0  # LPS -> RAS
    ras = sitk.GetImageFromArray(array, isVector=True)
    ras.CopyInformation(field32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".disp-") as tmpdir:
        raw = Path(tmpdir) / "field.nii"
        sitk.WriteImage(ras, str(raw))
        data = bytearray(raw.read_bytes())
        sizeof_hdr = struct.unpack("<i", data[0:4])[0]
        if sizeof_hdr != 348:
            raise RuntimeError("unexpected NIfTI header written by SimpleITK")
        data[68:70] = struct.pack("<h", 1006)  # NIFTI_INTENT_DISPVECT
        tmp_out = Path(tmpdir) / "out"
        if path.name.endswith(".gz"):
            with gzip.open(tmp_out, "wb", compresslevel=4) as handle:
                handle.write(data)
        else:
            tmp_out.write_bytes(data)
        os.replace(tmp_out, path)
    return path


def read_displacement_field(path: str | os.PathLike) -> sitk.Image:
    """Read a displacement field as ``sitkVectorFloat64`` in LPS mm (ready for ``sitk.DisplacementFieldTransform``)."""
    image = _read_any(path, "displacement field")
    if image.GetNumberOfComponentsPerPixel() != 3:
        raise ImageValidationError(f"'{path}' is not a 3-component displacement field")
    return sitk.Cast(image, sitk.sitkVectorFloat64)


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
