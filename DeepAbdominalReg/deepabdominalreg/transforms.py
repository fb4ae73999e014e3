"""ITK transform files: the registration's transform as an ITK composite (``transform.h5``: the affine + the
deformable displacement on the working grid; ``inverse_transform.h5``), read back, validated and sampled.

Conventions (ITK's, as everywhere in the core): points are LPS mm; a transform maps a point of the fixed (output)
space to the point of the moving (input) space, so resampling moving through it gives the warped image, and points
go the other way through the inverse; ``sitk.CompositeTransform([A, B])`` is ``x -> A(B(x))`` (ITK applies the last
transform added first).  The forward transform is ``x -> affine(x + u(x))`` with ``u`` on the fixed working grid;
its inverse ``y -> q + v(q)``, ``q = affine^-1(y)`` (``v`` on the fixed working grid), or ``y -> affine^-1(y + w(y))``
(``w`` on a working grid with the moving image's axes, for a moving image much finer than the working grid).

Any ITK transform file can be read (``.h5``/``.hdf5``, ``.tfm``/``.txt``, ``.mat``): ANTs' and elastix' too.  A
composite of linear transforms and at most one displacement field is sampled densely in torch
(:func:`deepabdominalreg.registration.fields.affine_field_displacement`, tested against ITK); any other transform
through ITK's ``TransformToDisplacementField``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from deepabdominalreg.geometry import Grid, affine_matrix
from deepabdominalreg.io import ImageValidationError, write_atomically

__all__ = [
    "TRANSFORM_SUFFIXES",
    "dense_displacement",
    "field_transform",
    "forward_transform",
    "inverse_transform",
    "is_transform_file",
    "map_points",
    "read_transform",
    "split_affine_field",
    "write_transform",
]

#: File names ITK's transform IO reads and writes (HDF5, text, MATLAB).
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")


def is_transform_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ITK transform file (by its suffix)."""
    return str(path).lower().endswith(TRANSFORM_SUFFIXES)


def field_transform(field_mm_zyx3: np.ndarray | torch.Tensor, grid: Grid) -> sitk.DisplacementFieldTransform:
    """The transform ``x -> x + u(x)`` of a ``(D, H, W, 3)`` LPS mm field on ``grid`` (linear interpolation, zero
    outside the field's voxels' extent).  The field is copied (ITK's transform takes over its image's buffer)."""
    array = np.asarray(torch.as_tensor(field_mm_zyx3).detach().cpu(), dtype=np.float64)
    if array.shape != (*grid.shape_zyx, 3):
        raise ValueError(f"field shape {array.shape} does not match its grid {grid.shape_zyx} x 3")
    return sitk.DisplacementFieldTransform(grid.image_from_array(np.ascontiguousarray(array), is_vector=True))


def forward_transform(affine: sitk.AffineTransform, deformable_mm_zyx3, working_grid: Grid) -> sitk.CompositeTransform:
    """Fixed -> moving: ``x -> affine(x + u(x))``, ``u`` the deformable field ``(D, H, W, 3)`` LPS mm on the fixed
    working grid."""
    return sitk.CompositeTransform([sitk.AffineTransform(affine), field_transform(deformable_mm_zyx3, working_grid)])


def inverse_transform(affine: sitk.AffineTransform, inverse_mm_zyx3, inverse_grid: Grid, *,
                      affine_first: bool) -> sitk.CompositeTransform:
    """Moving -> fixed: ``y -> q + v(q)``, ``q = affine^-1(y)`` when ``affine_first`` (``v`` on the fixed working
    grid), else ``y -> affine^-1(y + w(y))`` (``w`` on a grid with the moving image's axes); fields LPS mm."""
    inverse_affine = sitk.AffineTransform(affine.GetInverse())
    field = field_transform(inverse_mm_zyx3, inverse_grid)
    return sitk.CompositeTransform([field, inverse_affine] if affine_first else [inverse_affine, field])


# --------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write ``transform`` as an ITK transform file (``.h5``: HDF5, what ANTs writes; ``.tfm``/``.txt``: text),
    atomically (:func:`deepabdominalreg.io.write_atomically`)."""
    path = Path(path)
    if not is_transform_file(path):
        raise ValueError(f"'{path}': a transform file name ends with one of {', '.join(TRANSFORM_SUFFIXES)}")
    return write_atomically(path, lambda tmp: sitk.WriteTransform(transform, str(tmp)))


def read_transform(path: str | os.PathLike, role: str = "transform") -> sitk.Transform:
    """Read a 3D ITK transform file (ours, ANTs', elastix' ITK export, Slicer's); a composite comes back as a
    :class:`sitk.CompositeTransform`.  Raises :class:`ImageValidationError` naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise ImageValidationError(f"{role} file '{path}' does not exist; check the path.")
    if path.is_dir() or not is_transform_file(path):
        raise ImageValidationError(
            f"{role} '{path}' is not an ITK transform file (expected {', '.join(TRANSFORM_SUFFIXES)}); give "
            "transform.h5 from 'deepabdominalreg register', or a displacement field image with --displacement."
        )
    if path.stat().st_size == 0:
        raise ImageValidationError(f"{role} file '{path}' is empty (0 bytes); copy it again from its source.")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise ImageValidationError(
            f"{role} file '{path}' cannot be read as an ITK transform ({lines[-1] if lines else exc}); check that "
            "the file is complete."
        ) from exc
    if transform.GetDimension() != 3:
        raise ImageValidationError(f"{role} '{path}' is {transform.GetDimension()}D; a 3D transform is required.")
    if transform.GetName() == "CompositeTransform":
        transform = sitk.CompositeTransform(transform)
    return transform


# --------------------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------------------


def _flatten(transform: sitk.Transform) -> list[sitk.Transform]:
    """The transforms of a (nested) composite in ITK's list order (the last is applied first)."""
    if transform.GetName() != "CompositeTransform":
        return [transform]
    composite = sitk.CompositeTransform(transform)
    parts: list[sitk.Transform] = []
    for n in range(composite.GetNumberOfTransforms()):
        parts += _flatten(composite.GetNthTransform(n))
    return parts


def _linear_matrix(transform: sitk.Transform) -> np.ndarray | None:
    """The 4x4 homogeneous matrix of a linear ITK transform (affine, rigid, similarity, translation, scale,
    identity), ``None`` for any other kind."""
    name = transform.GetName()
    if name == "IdentityTransform":
        return np.eye(4)
    if name == "TranslationTransform":
        m = np.eye(4)
        m[:3, 3] = sitk.TranslationTransform(transform).GetOffset()
        return m
    typed = {"AffineTransform": sitk.AffineTransform, "Euler3DTransform": sitk.Euler3DTransform,
             "Similarity3DTransform": sitk.Similarity3DTransform, "VersorRigid3DTransform": sitk.VersorRigid3DTransform,
             "ScaleTransform": sitk.ScaleTransform, "ScaleVersor3DTransform": sitk.ScaleVersor3DTransform,
             "ScaleSkewVersor3DTransform": sitk.ScaleSkewVersor3DTransform,
             "VersorTransform": sitk.VersorTransform}.get(name)
    if typed is None:
        return None
    t = typed(transform)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(t.GetMatrix())
    affine.SetCenter(t.GetCenter())
    affine.SetTranslation(t.GetTranslation())
    return affine_matrix(affine)


def _as_affine(matrix: np.ndarray | None) -> sitk.AffineTransform | None:
    if matrix is None or np.allclose(matrix, np.eye(4), rtol=0, atol=0):
        return None
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(matrix[:3, :3].ravel().tolist())
    affine.SetTranslation(matrix[:3, 3].tolist())
    return affine


def split_affine_field(transform: sitk.Transform
                       ) -> tuple[sitk.AffineTransform | None, sitk.Image | None, sitk.AffineTransform | None] | None:
    """``transform`` as ``x -> after(q + u(q))``, ``q = before(x)``: ``(after, u, before)`` with ``u`` the
    displacement field image (LPS mm; ``None`` for a linear transform) and ``None`` for an identity affine; ``None``
    when ``transform`` is not linear transforms around at most one displacement field."""
    after, before, field = np.eye(4), np.eye(4), None
    for part in _flatten(transform):  # ITK's order: x -> parts[0](parts[1](...(parts[-1](x))))
        matrix = _linear_matrix(part)
        if matrix is not None:
            if field is None:
                after = after @ matrix
            else:
                before = before @ matrix
        elif part.GetName() == "DisplacementFieldTransform" and field is None:
            field = sitk.DisplacementFieldTransform(part).GetDisplacementField()
        else:
            return None
    if field is None:  # one affine: put it "after" a zero field
        return _as_affine(after), None, None
    return _as_affine(after), field, _as_affine(before)


def dense_displacement(transform: sitk.Transform, grid: Grid | sitk.Image,
                       device: torch.device | str = "cpu") -> sitk.Image:
    """``T(x) - x`` at every voxel ``x`` of ``grid`` (``sitkVectorFloat32``, LPS mm): the displacement field image
    that ITK, SimpleITK and Slicer resample with as they would with ``transform``.

    Linear transforms around one displacement field (ours, ANTs' composites) are sampled in torch on ``device``
    (:func:`~deepabdominalreg.registration.fields.affine_field_displacement`); any other transform by ITK.
    """
    from deepabdominalreg.registration.fields import affine_field_displacement

    grid = grid if isinstance(grid, Grid) else Grid.from_image(grid)
    parts = split_affine_field(transform)
    if parts is None:
        return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat32, [int(s) for s in grid.size],
                                                 grid.origin, grid.spacing, grid.direction)
    after, field, before = parts
    if field is None:
        field_grid = Grid(size=(2, 2, 2), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                          direction=grid.direction)
        field_array = np.zeros((2, 2, 2, 3), dtype=np.float32)
    else:
        field_grid = Grid.from_image(field)
        field_array = sitk.GetArrayViewFromImage(field).astype(np.float32)
    return affine_field_displacement(grid, field_array, field_grid, before=before, after=after, device=device)


def map_points(transform: sitk.Transform, points_lps: np.ndarray) -> np.ndarray:
    """Points ``(N, 3)`` (LPS mm) through ``transform`` (``T(p)`` for each ``p``), float64."""
    points = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    return np.array([transform.TransformPoint([float(c) for c in p]) for p in points]).reshape(-1, 3)
