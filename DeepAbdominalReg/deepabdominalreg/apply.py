"""``deepabdominalreg apply``: a saved transform (ours, or any ITK transform file) applied to an image, a label map
or landmarks, later and elsewhere than the registration.

Images and label maps are resampled onto a reference grid (the fixed image's) through the fixed -> moving transform
(``transform.h5``): linear, B-spline, or nearest for labels (the label set preserved exactly).  Points go the other
way (moving -> fixed), so landmarks are mapped through the inverse (``inverse_transform.h5``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.config import OUTSIDE_FOV_HU
from deepabdominalreg.geometry import Grid, resample_image
from deepabdominalreg.io import (
    ImageValidationError,
    check_outputs_safe,
    read_image,
    read_labels,
    read_landmarks,
    write_image,
    write_points,
)
from deepabdominalreg.transforms import map_points, read_transform

__all__ = ["add_commands", "apply_to_image", "apply_to_labels", "apply_to_points"]


def apply_to_image(image: sitk.Image, transform: sitk.Transform, reference: Grid | sitk.Image, *,
                   interpolator: str = "linear", default_value: float | None = None) -> sitk.Image:
    """``image`` (moving) resampled onto ``reference`` through ``transform`` (fixed -> moving, LPS mm) by ITK
    (:func:`~deepabdominalreg.geometry.resample_image`): ``linear`` or cubic ``bspline``.  ``default_value`` outside
    ``image``: air (the lower of -1000 HU and its minimum) if ``None``.

    ITK evaluates the composite (affine + working-grid field) at each output voxel directly; that is faster on the
    CPU than sampling it into a dense field and warping by that (benchmarks/README.md, issue 19)."""
    if interpolator not in ("linear", "bspline"):
        raise ValueError(f"image interpolator must be 'linear' or 'bspline', got {interpolator!r}")
    if default_value is None:
        default_value = float(min(OUTSIDE_FOV_HU, float(sitk.GetArrayViewFromImage(image).min())))
    return resample_image(image, reference, transform, interpolator, default_value)


def apply_to_labels(labels: sitk.Image, transform: sitk.Transform, reference: Grid | sitk.Image) -> sitk.Image:
    """A label map resampled onto ``reference`` by nearest neighbour (ITK): every output value is one of the input's
    labels (0 outside)."""
    return resample_image(labels, reference, transform, "nearest", 0)


def apply_to_points(points_lps: np.ndarray, inverse: sitk.Transform) -> np.ndarray:
    """Moving points ``(N, 3)`` (LPS mm) into fixed space through the **inverse** transform (moving -> fixed)."""
    return map_points(inverse, points_lps)


def _inverse_for_points(args: argparse.Namespace, transform: sitk.Transform) -> sitk.Transform:
    if args.inverse_transform:
        return read_transform(args.inverse_transform, "inverse transform")
    beside = Path(args.transform).with_name("inverse_transform.h5")
    if Path(args.transform).name == "transform.h5" and beside.exists():
        return read_transform(beside, "inverse transform")
    try:
        return transform.GetInverse()
    except RuntimeError as exc:
        raise ImageValidationError(
            "landmarks are mapped moving -> fixed, through the inverse transform: give --inverse-transform "
            "(inverse_transform.h5 of 'deepabdominalreg register'); this transform has no closed-form inverse."
        ) from exc


def _cmd_apply(args: argparse.Namespace) -> int:
    given = [k for k in ("image", "labels", "landmarks") if getattr(args, k)]
    if len(given) != 1:
        raise ImageValidationError("give exactly one of --image, --labels or --landmarks to transform.")
    kind = given[0]
    inputs = {"input": getattr(args, kind), "transform": args.transform, "inverse transform": args.inverse_transform,
              "reference": args.reference}
    output = Path(args.output)
    check_outputs_safe(output.parent if str(output.parent) else ".", [output.name], inputs)
    if args.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(args.threads))
    transform = read_transform(args.transform, "transform")
    if kind == "landmarks":
        points = read_landmarks(args.landmarks, "landmarks")
        mapped = apply_to_points(points, _inverse_for_points(args, transform))
        write_points(mapped, output)
        print(f"{len(mapped)} points written: {output}")
        return 0
    if not args.reference:
        raise ImageValidationError("--reference (the fixed image, or any image on the output grid) is required for "
                                   "images and label maps.")
    reference = Grid.from_image(read_image(args.reference, "reference image"))
    if kind == "image":
        moving = read_image(args.image, "image")
        warped = apply_to_image(moving, transform, reference, interpolator=args.interpolator)
    else:
        moving = read_labels(args.labels, "label map")
        warped = apply_to_labels(moving, transform, reference)
    write_image(warped, output, compress=True)
    print(f"written: {output}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Mount ``apply`` on the ``deepabdominalreg`` command."""
    ap = sub.add_parser("apply", help="apply a saved transform (transform.h5 or any ITK transform) to an image, "
                                      "a label map or landmarks")
    ap.add_argument("--transform", required=True, help="fixed -> moving ITK transform file (transform.h5)")
    ap.add_argument("--inverse-transform", help="moving -> fixed transform for landmarks (default: "
                    "inverse_transform.h5 beside transform.h5, or the closed-form inverse of a linear transform)")
    ap.add_argument("--image", help="image to resample onto --reference")
    ap.add_argument("--labels", help="label map / segmentation labelmap (nearest neighbour; labels preserved)")
    ap.add_argument("--landmarks", help="moving points: CSV x,y,z (mm, LPS) or Slicer .mrk.json; mapped into fixed")
    ap.add_argument("--reference", help="image whose grid the output takes (the fixed image)")
    ap.add_argument("--output", required=True, help="output file (image format by extension; .csv or .mrk.json)")
    ap.add_argument("--interpolator", choices=("linear", "bspline"), default="linear", help="image interpolation")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ITK's resampling (default: all)")
    ap.set_defaults(func=_cmd_apply)
