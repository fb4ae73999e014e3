"""Reading, validating and writing what the tool exchanges with users: images (NIfTI, NRRD, MHA, DICOM
series), label maps, displacement fields, landmarks (CSV, Slicer markups) and the registration's output file set.

Every reader validates what it read and raises :class:`ImageValidationError` (a ``ValueError`` whose message names
the input, the problem and the fix); every writer writes to a temporary file and renames it, so a failed write never
leaves a partial file under the final name.
"""

from __future__ import annotations

import csv
import ctypes
import gzip
import json
import os
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.geometry import check_displacement

if TYPE_CHECKING:  # the pipeline's result type, for annotations only (io sits below the pipeline)
    from deepabdominalreg.registration.pipeline import RegistrationResult


class ImageValidationError(ValueError):
    """An input image cannot be used; the message says which input, what is wrong and what to do."""


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


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary path)`` on a fresh file beside ``path`` (same folder and suffixes), then rename it onto
    ``path``: readers never see a partial file, and a failed write leaves neither a partial nor a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


#: The gzip level of ``.nii.gz`` outputs: level 1 writes several times faster than ITK's default for float maps, for
#: files a little larger (``benchmarks/README.md``, "Transforms and outputs").
GZIP_LEVEL = 1


def _write_nifti_gz(image: sitk.Image, path: Path, level: int,
                    patch: Callable[[bytearray], None] | None = None) -> None:
    """``image`` as uncompressed NIfTI (SimpleITK), header patched by ``patch``, gzip'd at ``level`` into ``path``
    (ITK's NIfTI writer ignores a compression level)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".nii-") as tmpdir:
        raw = Path(tmpdir) / "image.nii"
        sitk.WriteImage(image, str(raw), False)
        if patch is not None:
            data = bytearray(raw.read_bytes())
            patch(data)
            raw.write_bytes(data)
        with open(raw, "rb") as source, gzip.open(path, "wb", compresslevel=level) as target:
            shutil.copyfileobj(source, target, 1 << 24)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True, level: int = GZIP_LEVEL) -> Path:
    """Write ``image`` atomically (:func:`write_atomically`); ``.nii.gz`` gzip'd at ``level``, other formats
    compressed (at ``level``) when ``compress``."""
    path = Path(path)
    if path.name.endswith(".nii.gz"):
        return write_atomically(path, lambda tmp: _write_nifti_gz(image, tmp, level))
    return write_atomically(path, lambda tmp: sitk.WriteImage(image, str(tmp), compress, level if compress else -1))


def _displacement_intent(data: bytearray) -> None:
    if struct.unpack("<i", data[0:4])[0] != 348:
        raise RuntimeError("unexpected NIfTI header written by SimpleITK")
    data[68:70] = struct.pack("<h", 1006)  # NIFTI_INTENT_DISPVECT


def write_displacement_field(field_lps: sitk.Image, path: str | os.PathLike, compress: bool = True,
                             level: int = GZIP_LEVEL) -> Path:
    """Write a displacement field (3-component vectors in LPS mm) that ITK, SimpleITK and Slicer read as such.

    For NIfTI the file follows the NIfTI displacement convention (intent code 1006, vectors stored in RAS); ITK
    readers, SimpleITK and Slicer convert them back to LPS on reading; the extension decides the compression
    (``.nii.gz``, at gzip ``level``, or ``.nii``).  Other formats (``.mha``, ``.nrrd``) store LPS vectors as they
    are, compressed when ``compress``.  Written atomically.
    """
    path = Path(path)
    check_displacement(field_lps)
    field32 = sitk.Cast(field_lps, sitk.sitkVectorFloat32)
    if not path.name.endswith((".nii", ".nii.gz")):
        return write_image(field32, path, compress, level)
    array = sitk.GetArrayFromImage(field32)
    array[..., :2] *= -1.0  # LPS -> RAS
    ras = sitk.GetImageFromArray(array, isVector=True)
    ras.CopyInformation(field32)
    del array
    if path.name.endswith(".gz"):
        return write_atomically(path, lambda tmp: _write_nifti_gz(ras, tmp, level, _displacement_intent))

    def write_raw(tmp: Path) -> None:
        sitk.WriteImage(ras, str(tmp), False)
        data = bytearray(tmp.read_bytes())
        _displacement_intent(data)
        tmp.write_bytes(data)

    return write_atomically(path, write_raw)


def read_displacement_field(path: str | os.PathLike) -> sitk.Image:
    """Read a displacement field as ``sitkVectorFloat64`` in LPS mm (ready for ``sitk.DisplacementFieldTransform``)."""
    image = _read_any(path, "displacement field")
    if image.GetNumberOfComponentsPerPixel() != 3:
        raise ImageValidationError(f"'{path}' is not a 3-component displacement field")
    return sitk.Cast(image, sitk.sitkVectorFloat64)


def read_landmarks(path: str | os.PathLike, role: str = "landmarks") -> np.ndarray:
    """Points ``(N, 3)`` in LPS mm from a CSV (``x,y,z`` header optional, extra columns ignored) or ``.mrk.json``.

    Markups in RAS (Slicer's default) are converted to LPS (x and y negated).
    """
    path = Path(path)
    if not path.exists():
        raise ImageValidationError(f"{role} file '{path}' does not exist; check the path.")
    try:
        if path.name.endswith(".json"):
            return _read_markups(path, role)
        return _read_csv(path, role)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageValidationError(f"{role} file '{path}' cannot be read ({exc}).") from exc


def _read_csv(path: Path, role: str) -> np.ndarray:
    rows = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            cells = [c.strip() for c in row if c.strip() != ""]
            if not cells or cells[0].startswith("#"):
                continue
            try:
                rows.append([float(c) for c in cells[:3]])
            except ValueError:
                if number == 1 and not rows:
                    continue  # header
                raise ImageValidationError(f"{role} file '{path}', line {number}: expected numbers x,y,z, got {row}")
            if len(rows[-1]) != 3:
                raise ImageValidationError(f"{role} file '{path}', line {number}: expected 3 coordinates, got {row}")
    if not rows:
        raise ImageValidationError(f"{role} file '{path}' holds no points (CSV x,y,z in mm, LPS, one per row).")
    return np.asarray(rows, dtype=np.float64)


def _read_markups(path: Path, role: str) -> np.ndarray:
    data = json.loads(path.read_text())
    markups = data.get("markups") or []
    if not markups:
        raise ImageValidationError(f"{role} file '{path}' is not a Slicer markups file (no 'markups').")
    markup = markups[0]
    system = str(markup.get("coordinateSystem", "LPS")).upper()
    points = [p["position"] for p in markup.get("controlPoints", []) if "position" in p]
    if not points:
        raise ImageValidationError(f"{role} file '{path}' holds no control points.")
    array = np.asarray(points, dtype=np.float64)
    if system == "RAS":
        array[:, :2] *= -1.0
    elif system != "LPS":
        raise ImageValidationError(f"{role} file '{path}': unknown coordinate system '{system}'.")
    return array


def write_landmarks(points_lps: np.ndarray, path: str | os.PathLike) -> Path:
    """Write points (LPS mm) as CSV with an ``x,y,z`` header, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["x", "y", "z"])
            for p in np.asarray(points_lps, dtype=np.float64):
                writer.writerow([f"{v:.4f}" for v in p])

    return write_atomically(path, write)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(data: dict, path: str | os.PathLike, indent: int = 2) -> Path:
    """Write JSON atomically (NaN written as null; NumPy values and paths as plain values)."""
    text = json.dumps(_nan_to_none(data), indent=indent, default=_json_default)
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def _nan_to_none(value):
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


#: Output image formats of ``register`` (``--output-format``); ``nii.gz`` is gzip-compressed, the others are not.
IMAGE_FORMATS = ("nii.gz", "nii", "nrrd", "mha")

#: What ``register --outputs`` can ask for.  ``transform``: ``transform.h5`` + ``inverse_transform.h5`` (ITK
#: composites on the working grid); ``warped``: the warped moving image; ``labels``: the warped moving labels (when
#: given); ``jacobian``, ``magnitude``: ``det J`` and ``|u|`` on the working grid (``full-size``: on the fixed grid);
#: ``dense``: ``displacement`` and ``inverse_displacement`` at full resolution; ``body_mask``: the fixed body mask.
#: ``metrics.json`` is always written, ``report.png`` unless ``report=False``, the warped landmarks when given.
OUTPUT_CHOICES = ("transform", "warped", "labels", "jacobian", "magnitude", "dense", "body_mask", "full-size")
DEFAULT_OUTPUTS = frozenset({"transform", "warped", "labels"})
ALL_OUTPUTS = frozenset(OUTPUT_CHOICES)


def parse_outputs(text: str | None) -> frozenset[str]:
    """``register --outputs``: a comma-separated list of :data:`OUTPUT_CHOICES`, ``default`` (``transform,warped,
    labels``) or ``all``; ``+`` before the list adds to the default (``+jacobian``)."""
    if text is None or not str(text).strip():
        return DEFAULT_OUTPUTS
    text = str(text).strip()
    chosen = set(DEFAULT_OUTPUTS) if text.startswith("+") else set()
    for word in (w.strip().lower() for w in text.lstrip("+").split(",")):
        if not word:
            continue
        if word == "all":
            chosen |= ALL_OUTPUTS
        elif word == "default":
            chosen |= DEFAULT_OUTPUTS
        elif word in OUTPUT_CHOICES:
            chosen.add(word)
        else:
            raise ImageValidationError(
                f"unknown output '{word}' in --outputs '{text}'; choose from {', '.join(OUTPUT_CHOICES)}, "
                "'default' or 'all' (comma-separated)."
            )
    return frozenset(chosen)


def output_file_names(outputs: frozenset[str], ext: str = "nii.gz", *, labels: bool = True, inverse: bool = True,
                      landmarks: bool = False, report: bool = True) -> dict[str, str]:
    """The files ``write_result`` writes for ``outputs`` (name -> file name), in the order it writes them."""
    names: dict[str, str] = {}
    if "transform" in outputs:
        names["transform"] = "transform.h5"
        if inverse:
            names["inverse_transform"] = "inverse_transform.h5"
    if "warped" in outputs:
        names["warped"] = f"warped.{ext}"
    if "labels" in outputs and labels:
        names["warped_seg"] = f"warped_seg.{ext}"
    if "dense" in outputs:
        names["displacement"] = f"displacement.{ext}"
        if inverse:
            names["inverse_displacement"] = f"inverse_displacement.{ext}"
    if "jacobian" in outputs:
        names["jacobian"] = f"jacobian.{ext}"
    if "magnitude" in outputs:
        names["displacement_magnitude"] = f"displacement_magnitude.{ext}"
    if "body_mask" in outputs:
        names["body_mask"] = f"body_mask.{ext}"
    if landmarks:
        names["warped_moving_landmarks"] = "warped_moving_landmarks.csv"
    if report:
        names["report"] = "report.png"
    names["metrics"] = "metrics.json"
    return names


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs_safe(out_dir: str | os.PathLike, file_names: list[str] | tuple[str, ...],
                       inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse (:class:`ImageValidationError`, before anything is written) an output folder that is an existing file,
    an output file that is an existing folder, and an output file that is one of the ``inputs`` (role -> path; a
    DICOM folder or ``folder::UID`` counts as its folder).  Other files in ``out_dir`` are left alone; files with the
    output names are replaced."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ImageValidationError(
            f"output folder '{out}' is an existing file; give a folder (new or existing) with --output-dir."
        )
    given = {role: Path(str(path).split("::", 1)[0]) for role, path in inputs.items() if path}
    for role, path in given.items():
        if _same_file(path, out):
            raise ImageValidationError(
                f"the output folder '{out}' is the {role}; choose another --output-dir so no input is overwritten."
            )
    for name in file_names:
        target = out / name
        if target.is_dir():
            raise ImageValidationError(f"output '{target}' is an existing folder; remove it or choose another "
                                       "--output-dir.")
        for role, path in given.items():
            if _same_file(path, target):
                raise ImageValidationError(
                    f"output '{target}' would overwrite the {role} '{path}'; choose another --output-dir "
                    "(nothing was written)."
                )


def write_result(
    result: RegistrationResult,
    out_dir: str | os.PathLike,
    *,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    report: bool = True,
    image_format: str = "nii.gz",
    outputs: frozenset[str] | set[str] | None = None,
    inputs: dict[str, str | os.PathLike | None] | None = None,
    threads: int = 2,
) -> dict[str, Path]:
    """Write the outputs of a registration into ``out_dir``; returns name -> path.

    ``outputs``: a subset of :data:`OUTPUT_CHOICES` (default :data:`DEFAULT_OUTPUTS`: the transform files, the
    warped image and labels; :func:`output_file_names` lists the files).  ``metrics.json`` is always written: it
    holds ``result.metrics`` plus the time spent writing (the ``writing`` and ``report`` stages) and ``outputs``
    (name -> file name of every file written); ``report.png`` when ``report``.  ``fixed``, ``moving`` and their label
    maps: the inputs of the registration, for ``report.png``.  ``image_format``: one of :data:`IMAGE_FORMATS`.
    ``inputs``: role -> path of the input files, refused as outputs (:func:`check_outputs_safe`).  Images are written
    ``threads`` at a time (SimpleITK and zlib release the GIL).  ``result`` itself is not changed.
    Files are first written into a hidden staging folder inside ``out_dir`` and moved into place only when all of
    them exist (``metrics.json`` last), so an interruption (Ctrl-C, a full disk) leaves ``out_dir`` as it was.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    outputs = DEFAULT_OUTPUTS if outputs is None else frozenset(outputs)
    unknown = sorted(set(outputs) - ALL_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; choose from {', '.join(OUTPUT_CHOICES)}")
    names = output_file_names(outputs, image_format, labels=result.warped_labels is not None,
                              inverse=result.inverse_transform is not None,
                              landmarks=result.warped_moving_landmarks_lps is not None, report=report)
    check_outputs_safe(out_dir, list(names.values()), inputs or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        staged = _write_outputs(result, staging, names, outputs, fixed=fixed, moving=moving,
                                fixed_labels=fixed_labels, moving_labels=moving_labels, threads=threads,
                                compress=image_format.endswith(".gz"))
        paths = {}
        for name, path in staged.items():  # metrics.json last: its presence means the folder is complete
            target = out / path.name
            os.replace(path, target)
            paths[name] = target
        return paths
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_outputs(result, out: Path, names: dict[str, str], outputs: frozenset[str], *, fixed, moving, fixed_labels,
                   moving_labels, threads: int, compress: bool) -> dict[str, Path]:
    from concurrent.futures import ThreadPoolExecutor

    from deepabdominalreg.transforms import write_transform

    t0 = time.perf_counter()
    full_size = "full-size" in outputs
    # name -> what writes it; each makes its image when it runs (full-size maps and the dense inverse are computed on
    # first use), and the writers run in parallel
    jobs: dict[str, Callable[[], Path]] = {
        "transform": lambda: write_transform(result.transform, out / names["transform"]),
        "inverse_transform": lambda: write_transform(result.inverse_transform, out / names["inverse_transform"]),
        "warped": lambda: write_image(result.warped_image, out / names["warped"], compress),
        "warped_seg": lambda: write_image(result.warped_labels, out / names["warped_seg"], compress),
        "displacement": lambda: write_displacement_field(result.displacement_lps, out / names["displacement"],
                                                         compress),
        "inverse_displacement": lambda: write_displacement_field(result.inverse_displacement_lps,
                                                                 out / names["inverse_displacement"], compress),
        "jacobian": lambda: write_image(result.jacobian_full_size() if full_size else result.jacobian,
                                        out / names["jacobian"], compress),
        "displacement_magnitude": lambda: write_image(
            result.displacement_magnitude_full_size() if full_size else result.displacement_magnitude,
            out / names["displacement_magnitude"], compress),
        "body_mask": lambda: write_image(result.body_mask, out / names["body_mask"], compress),
        "warped_moving_landmarks": lambda: write_landmarks(result.warped_moving_landmarks_lps,
                                                           out / names["warped_moving_landmarks"]),
    }
    if "inverse_displacement" in names:  # computed once, before the writers share it
        result.inverse_displacement_lps  # noqa: B018
    if full_size:
        for name, make in (("jacobian", result.jacobian_full_size),
                           ("displacement_magnitude", result.displacement_magnitude_full_size)):
            if name in names:
                make()
    # HDF5 is not thread-safe: the transform files one after the other, the images in parallel
    serial = [name for name in names if name in ("transform", "inverse_transform")]
    parallel = [name for name in names if name in jobs and name not in serial]
    paths = {name: jobs[name]() for name in serial}
    stages = dict(result.metrics.get("stages", {}))
    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
        futures = {name: pool.submit(jobs[name]) for name in parallel}
        # the report is drawn here while the pool's writers compress (zlib and SimpleITK release the GIL;
        # matplotlib stays in this one thread)
        if "report" in names:
            from deepabdominalreg.metrics.report import write_report

            t_report = time.perf_counter()
            paths["report"] = write_report(out / names["report"], result, fixed=fixed, moving=moving,
                                           fixed_labels=fixed_labels, moving_labels=moving_labels)
            stages["report"] = round(time.perf_counter() - t_report, 3)
        paths.update({name: futures[name].result() for name in parallel})
    stages["writing"] = round(time.perf_counter() - t0, 3)
    listing = {name: names[name] for name in names}
    paths["metrics"] = write_json({**result.metrics, "stages": stages, "outputs": listing}, out / names["metrics"])
    return paths


def write_markups(points_lps: np.ndarray, path: str | os.PathLike, label: str = "F") -> Path:
    """Write points (LPS mm) as a Slicer markups file (``.mrk.json``, a fiducial list in LPS), atomically."""
    control_points = [{"id": str(n + 1), "label": f"{label}-{n + 1}", "position": [float(v) for v in p]}
                      for n, p in enumerate(np.asarray(points_lps, dtype=np.float64).reshape(-1, 3))]
    data = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                       "Schema/markups-schema-v1.0.3.json#",
            "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                         "controlPoints": control_points}]}
    return write_json(data, path)


def write_points(points_lps: np.ndarray, path: str | os.PathLike) -> Path:
    """Points (LPS mm) as CSV, or Slicer markups for a ``.json`` name (:func:`write_landmarks`,
    :func:`write_markups`)."""
    return write_markups(points_lps, path) if str(path).endswith(".json") else write_landmarks(points_lps, path)
