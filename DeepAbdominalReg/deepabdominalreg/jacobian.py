"""``deepabdominalreg jacobian``: the Jacobian determinant, the log-Jacobian and a folding report of any displacement
field or ITK transform file.

What is measured is the mapping ``x -> T(x)`` (fixed -> moving, LPS mm): for a displacement field image
``T(x) = x + u(x)`` (ITK's convention), for a transform file the whole transform.  ``det J`` is
:func:`deepabdominalreg.metrics.fields.jacobian_determinant` of ``T(x) - x`` sampled at the voxels of a grid
(physical derivatives by central differences, one-sided at the border): 1 = volume preserved, < 1 compression,
> 1 expansion, <= 0 folding (the mapping is not invertible there).  A transform's affine part multiplies ``det J``
by its determinant everywhere (``transform.h5`` of ``register`` holds the affine: a patient scaled by 2 % has
``det J ~ 1.06`` with no deformation at all); ``--deformable-only`` measures only the displacement field inside it.

The grid: a displacement field's own; for a transform with a displacement field inside (``transform.h5``, ANTs'
composites) that field's grid; ``--reference`` overrides both and is required for a transform without one (an
affine, a B-spline).  Folding finer than the grid's spacing is not seen.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.geometry import Grid, displacement_transform, resample_image
from deepabdominalreg.io import (
    ImageValidationError,
    check_outputs_safe,
    read_displacement_field,
    read_image,
    read_labels,
    validate_image,
    write_image,
    write_json,
)
from deepabdominalreg.metrics.fields import (
    LOG_CLIP,  # the clip of metrics.json's sdlogj: the log-Jacobian image follows the same convention
    displacement_statistics,
    jacobian_determinant,
    jacobian_statistics,
    same_grid,
)
from deepabdominalreg.transforms import dense_displacement, is_transform_file, read_transform, split_affine_field

__all__ = ["PERCENTILES", "add_commands", "jacobian_report", "load_displacement", "log_jacobian", "mask_on_grid",
           "verdict"]

#: Percentiles of ``det J`` in the report (``percentiles`` in ``--json``).
PERCENTILES = (1, 5, 50, 95, 99)


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------


def _read_field(path: str) -> sitk.Image:
    if is_transform_file(path):
        raise ImageValidationError(f"--field '{path}' is a transform file; give it with --transform.")
    try:
        field = read_displacement_field(path)
    except ImageValidationError as exc:
        if not Path(path).exists():
            raise
        raise ImageValidationError(
            f"{str(exc).rstrip('.')}; --field takes a displacement field image (3 components per voxel, LPS mm, e.g. "
            "displacement.nii.gz of 'register --outputs dense'), --transform a transform file."
        ) from exc
    validate_image(field, f"displacement field '{path}'", allow_vector=True)
    return field


def _linear_determinant(parts) -> float | None:
    """The determinant of the linear parts around the displacement field (``None``: no linear part, or unknown)."""
    if parts is None:
        return None
    after, _, before = parts
    matrices = [np.asarray(t.GetMatrix(), dtype=np.float64).reshape(3, 3) for t in (after, before) if t is not None]
    return float(np.prod([np.linalg.det(m) for m in matrices])) if matrices else None


def load_displacement(*, field: str | None = None, transform: str | None = None, reference: str | None = None,
                      deformable_only: bool = False) -> tuple[sitk.Image, dict]:
    """The displacement ``T(x) - x`` (LPS mm) whose Jacobian is measured, and a description of where it came from.

    ``field``: a displacement field image, used on its own grid (sampled linearly on ``reference``'s when given).
    ``transform``: an ITK transform file, sampled at the voxels of ``reference``'s grid, or of the grid of the
    displacement field inside it when ``reference`` is ``None`` (required for a transform without one).
    ``deformable_only``: only the displacement field of a transform made of linear transforms around one field
    (ours, ANTs'), its affine parts left out.  Raises :class:`ImageValidationError` for unusable inputs.
    """
    if (field is None) == (transform is None):
        raise ImageValidationError("give exactly one of --field (a displacement field image) or --transform "
                                   "(an ITK transform file).")
    grid = Grid.from_image(read_image(reference, "reference image")) if reference else None
    source: dict = {"field": field, "transform": transform, "reference": reference}
    if field is not None:
        if deformable_only:
            raise ImageValidationError("--deformable-only applies to --transform; a displacement field has no "
                                       "affine part.")
        displacement = _read_field(field)
        source["kind"] = "displacement field"
        if grid is None:
            source["grid"] = "the field's own"
            return displacement, source
        source["grid"] = "the reference image's (field interpolated linearly, zero outside it)"
        return dense_displacement(displacement_transform(displacement), grid), source

    parsed = read_transform(transform, "transform")
    parts = split_affine_field(parsed)
    source["kind"] = "transform"
    source["transform_type"] = parsed.GetName()
    if deformable_only:
        if parts is None:
            raise ImageValidationError(
                f"--deformable-only: transform '{transform}' is not linear transforms around one displacement "
                "field (as transform.h5 of 'register' is), so its deformable part cannot be separated; measure the "
                "whole transform (leave out --deformable-only)."
            )
        if parts[1] is None:
            raise ImageValidationError(f"--deformable-only: transform '{transform}' is linear: it has no deformable "
                                       "part (its det J is the determinant of its matrix everywhere).")
        source["deformable_only"] = True
        field_image = parts[1]
        if grid is None:
            source["grid"] = "the transform's displacement field's"
            return field_image, source
        source["grid"] = "the reference image's"
        return dense_displacement(displacement_transform(field_image), grid), source
    source["deformable_only"] = False
    source["linear_determinant"] = _linear_determinant(parts)
    if grid is None:
        if parts is None or parts[1] is None:
            raise ImageValidationError(
                f"transform '{transform}' ({parsed.GetName()}) holds no displacement field whose grid det J could "
                "be sampled on; give --reference IMAGE (the fixed image, or any image on the grid to measure on)."
            )
        grid = Grid.from_image(parts[1])
        source["grid"] = "the transform's displacement field's"
    else:
        source["grid"] = "the reference image's"
    return dense_displacement(parsed, grid), source


def mask_on_grid(path: str, grid: Grid) -> np.ndarray:
    """The ``zyx`` boolean mask (non-zero voxels of the label map at ``path``) on ``grid``: nearest neighbour when
    the mask is on another grid.  Raises :class:`ImageValidationError` when it is empty or misses ``grid``."""
    labels = read_labels(path, "mask")
    if not np.any(sitk.GetArrayViewFromImage(labels)):
        raise ImageValidationError(f"mask '{path}' is empty (no non-zero voxel); give a mask with the region to "
                                   "measure in (non-zero inside).")
    if not same_grid(labels, grid.reference_image()):
        labels = resample_image(labels, grid, None, "nearest", 0)
    mask = sitk.GetArrayFromImage(labels) != 0
    if not mask.any():
        raise ImageValidationError(
            f"mask '{path}' does not overlap the grid det J is measured on (size {grid.size}, origin "
            f"{tuple(round(o, 1) for o in grid.origin)} mm LPS); give a mask in the same space (the fixed image's)."
        )
    return mask


# --------------------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------------------


def log_jacobian(jacobian: sitk.Image) -> sitk.Image:
    """``log(clip(det J, 1e-9, 1e9))`` (``sitkFloat32``, same grid): ``log det J`` where ``det J > 0``, and
    ``log(1e-9) = -20.72`` where folded (``det J <= 0``: no log), the ``metrics.json`` ``sdlogj`` convention (its std
    over the mask is ``sdlogj_clipped``).  Not NaN: ITK's NIfTI reader (SimpleITK, Slicer) reads NaN back as 0, the
    value of no volume change."""
    det = sitk.GetArrayViewFromImage(jacobian)
    out = np.log(np.clip(det, *LOG_CLIP, dtype=np.float32))
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(jacobian)
    return image


def jacobian_report(jacobian: sitk.Image, mask_zyx: np.ndarray | None = None,
                    displacement: sitk.Image | None = None) -> dict:
    """Statistics of a ``det J`` map inside ``mask_zyx`` (every voxel when ``None``).

    Keys as in ``metrics.json`` (:func:`~deepabdominalreg.metrics.fields.jacobian_statistics`): ``voxels``,
    ``folding_voxels`` and ``folding_percent`` (``det J <= 0``), ``jacobian_min``/``max``/``mean``/``std``,
    ``sdlogj_l2r``; here ``sdlogj`` is the std of ``log det J`` over the voxels with ``det J > 0`` and
    ``sdlogj_clipped`` the ``metrics.json`` convention (folded voxels enter as ``log 1e-9``; equal without folding).
    ``percentiles``: :data:`PERCENTILES` of ``det J``.  With ``displacement``: ``displacement`` (``|u|`` max, p95,
    mean, median, mm).
    """
    det = sitk.GetArrayViewFromImage(jacobian)
    stats = jacobian_statistics(det, mask_zyx)
    report = {key: stats[key] for key in ("voxels", "folding_voxels", "folding_percent", "jacobian_min",
                                          "jacobian_max", "jacobian_mean", "jacobian_std")}
    inside = det > 0 if mask_zyx is None else (det > 0) & mask_zyx
    report["sdlogj"] = jacobian_statistics(det, inside)["sdlogj"]
    report["sdlogj_clipped"] = stats["sdlogj"]
    report["sdlogj_l2r"] = stats["sdlogj_l2r"]
    values = det[mask_zyx] if mask_zyx is not None else np.array(det, dtype=np.float32).ravel()
    levels = np.percentile(values, PERCENTILES, overwrite_input=True) if values.size else [math.nan] * 5
    report["percentiles"] = {str(p): float(v) for p, v in zip(PERCENTILES, levels)}
    if displacement is not None:
        report["displacement"] = displacement_statistics(displacement, mask_zyx)
    return report


def verdict(report: dict) -> str:
    """One line: ``no folding`` or ``X % folding — the transform is not invertible there``."""
    if report["folding_voxels"] == 0:
        return "no folding (det J > 0 at every voxel measured)"
    return (f"{report['folding_percent']:.3g} % folding — the transform is not invertible there "
            f"({report['folding_voxels']} voxels with det J <= 0)")


def _format(report: dict, source: dict, grid: Grid, mask: str | None) -> str:
    name = source["field"] or source["transform"]
    size = " x ".join(str(s) for s in grid.size)
    spacing = " x ".join(f"{s:.4g}" for s in grid.spacing)
    lines = [f"det J of {source['kind']} '{name}' on {source['grid']} grid ({size} voxels, {spacing} mm)"
             + (f", inside mask '{mask}'" if mask else "")]
    linear = source.get("linear_determinant")
    if linear is not None and abs(linear - 1.0) > 1e-6:
        lines.append(f"  the transform's linear (affine) part has determinant {linear:.4f}: it is included in det J "
                     "(--deformable-only leaves it out)")
    lines.append(f"  voxels: {report['voxels']}")
    lines.append(f"  det J: min {report['jacobian_min']:.4f}  max {report['jacobian_max']:.4f}  "
                 f"mean {report['jacobian_mean']:.4f}  std {report['jacobian_std']:.4f}")
    lines.append("  percentiles: " + "  ".join(f"p{p} {v:.4f}" for p, v in report["percentiles"].items()))
    lines.append(f"  folding (det J <= 0): {report['folding_voxels']} voxels, {report['folding_percent']:.4g} %")
    lines.append(f"  SDlogJ: {report['sdlogj']:.4f} (std of log det J over the voxels with det J > 0)")
    if "displacement" in report:
        d = report["displacement"]
        lines.append(f"  |u|: max {d['max_mm']:.3f} mm  p95 {d['p95_mm']:.3f} mm  mean {d['mean_mm']:.3f} mm")
    lines.append(f"verdict: {verdict(report)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------------


def _check_outputs(args: argparse.Namespace) -> None:
    outputs = [Path(p) for p in (args.output_jacobian, args.output_log_jacobian, args.json) if p]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise ImageValidationError("--output-jacobian, --output-log-jacobian and --json must be different files.")
    inputs = {"displacement field": args.field, "transform": args.transform, "reference image": args.reference,
              "mask": args.mask}
    for path in outputs:
        check_outputs_safe(path.parent if str(path.parent) else ".", [path.name], inputs)


def _cmd_jacobian(args: argparse.Namespace) -> int:
    _check_outputs(args)
    displacement, source = load_displacement(field=args.field, transform=args.transform, reference=args.reference,
                                             deformable_only=args.deformable_only)
    grid = Grid.from_image(displacement)
    mask = mask_on_grid(args.mask, grid) if args.mask else None
    jacobian = jacobian_determinant(displacement)
    not_finite = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(jacobian))))
    if not_finite:
        raise ImageValidationError(f"{source['kind']} '{args.field or args.transform}' holds NaN/inf displacements: "
                                   f"det J is undefined at {not_finite} voxels; fix the field.")
    report = jacobian_report(jacobian, mask, displacement)
    print(_format(report, source, grid, args.mask))
    if args.output_jacobian:
        write_image(jacobian, args.output_jacobian)
        print(f"written: {args.output_jacobian}")
    if args.output_log_jacobian:
        write_image(log_jacobian(jacobian), args.output_log_jacobian)
        print(f"written: {args.output_log_jacobian}")
    if args.json:
        grid_info = {"size": list(grid.size), "spacing_mm": list(grid.spacing), "origin_mm_lps": list(grid.origin),
                     "direction": list(grid.direction)}
        write_json({**report, "verdict": verdict(report), "source": source, "grid": grid_info, "mask": args.mask},
                   args.json)
        print(f"written: {args.json}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Mount ``jacobian`` on the ``deepabdominalreg`` command."""
    jp = sub.add_parser("jacobian", help="Jacobian determinant, log-Jacobian and folding report of a displacement "
                                         "field or an ITK transform file")
    given = jp.add_mutually_exclusive_group(required=True)
    given.add_argument("--field", "--displacement", dest="field",
                       help="displacement field image (3 components, LPS mm, x -> x + u(x)); measured on its grid")
    given.add_argument("--transform", help="ITK transform file (transform.h5 of 'register', ANTs', any ITK "
                       "transform); det J of the whole mapping, the affine included")
    jp.add_argument("--reference", help="image whose grid det J is sampled on (required for a transform without a "
                    "displacement field; default: the field's grid)")
    jp.add_argument("--mask", help="label map: statistics over its non-zero voxels (resampled nearest onto the grid)")
    jp.add_argument("--deformable-only", action="store_true",
                    help="measure only the displacement field inside the transform, without its affine part")
    jp.add_argument("--output-jacobian", help="write det J (float32 image on the grid)")
    jp.add_argument("--output-log-jacobian", help="write log(det J) (float32; log(1e-9) = -20.72 where det J <= 0)")
    jp.add_argument("--json", help="write the report as JSON")
    jp.set_defaults(func=_cmd_jacobian)
