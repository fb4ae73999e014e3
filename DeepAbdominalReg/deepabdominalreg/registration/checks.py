"""Plausibility checks after a registration: a failed or doubtful result is flagged, never silent.

Every run of :func:`deepabdominalreg.registration.register_pair` ends with :func:`measure` (cheap: on the working
grid, where the registration ran) and :func:`judge` (thresholds from :class:`RegistrationConfig`'s ``check_*``
fields).  The result goes into ``metrics.json``: ``status`` (``"ok"`` or ``"suspect"``), ``suspect_reasons`` (one
sentence per failed check, with the measured value and the threshold) and ``checks`` (every measured value).

The checks, and what each one catches:

* **affine**: determinant ``<= 0`` (a reflection: e.g. a mirrored scan) or a scale (singular value of its linear
  part) outside ``check_affine_scale_range`` (a collapse onto a small part, or a blow-up);
* **folding**: % of the fixed body's voxels with ``det J <= 0`` (full resolution) above
  ``check_max_folding_percent`` (a field that is no longer a one-to-one mapping; a reflection makes it ~100 %);
* **similarity**: Pearson NCC of the HU (clipped to ``check_hu_window``) inside the fixed body where the moving
  image has data, before registration (the scans as they lie), after the affine and after the registration: worse
  after than before by more than ``-check_min_ncc_gain``, or below ``check_min_ncc`` after (unrelated images:
  another body part, noise, a constant image);
* **body overlap**: Dice of the fixed body mask and the registered moving body mask below ``check_min_body_dice``
  (disjoint or barely overlapping fields of view);
* **displacement size**: the 95th percentile of the deformable displacement's length inside the fixed body above
  ``check_max_displacement_fraction`` of the fixed body's largest extent (the deformable stage tearing anatomy
  across the body instead of correcting local motion; the affine's translation is not counted: origins hundreds
  of mm apart are normal);
* **offset search** (when ``initial_search`` ran): its best translation lies on the smallest overlap it allows
  (``initial_search_min_overlap``): the correlation still rose towards less overlap, as for two scans that share no
  anatomy (disjoint coverage, another body part), whereas scans sharing anatomy peak inside the allowed overlaps;
* **mirror**: the affinely aligned moving image, mirrored left-right about the fixed body's midline, matches the
  fixed image better (NCC higher by more than ``check_mirror_margin``) than itself: the moving scan (or its
  header) is probably flipped left-right;
* **labels** (when both label maps are given): the mean Dice after registration below the one before by more than
  ``check_max_dice_loss``.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch

from deepabdominalreg import spatial
from deepabdominalreg.config import OUTSIDE_FOV_HU, RegistrationConfig
from deepabdominalreg.geometry import affine_matrix, mask_bounding_box, resample_image
from deepabdominalreg.metrics.images import normalized_cross_correlation
from deepabdominalreg.registration.preprocessing import WorkingImage

__all__ = ["STATUS_OK", "STATUS_SUSPECT", "judge", "measure", "mirror_lr"]

STATUS_OK = "ok"
STATUS_SUSPECT = "suspect"

_MIN_VOXELS = 64
"""Fewer working voxels than this in a mask: the NCC/Dice there is not measured (NaN)."""

_MIRROR_SHIFTS_VOX = (-2, -1, 0, 1, 2)
"""Shifts (working voxels) of the mirror plane around the fixed body's centroid tried by the mirror check: the
centroid is only near the body's plane of symmetry."""


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if int(mask.sum()) < _MIN_VOXELS:
        return float("nan")
    return float(normalized_cross_correlation(a, b, mask))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else float("nan")


def _left_right_axis(direction: np.ndarray) -> int:
    """The ``zyx`` array axis of a grid whose index axis is closest to LPS x (left-right)."""
    ijk = int(np.argmax(np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3)[0, :])))
    return 2 - ijk


def mirror_lr(volume: np.ndarray, axis: int, twice_centre: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` mirrored along array ``axis`` about the plane at index ``twice_centre / 2``: ``out[i] =
    volume[twice_centre - i]``; also the ``valid`` mask (False where ``twice_centre - i`` falls outside, which gets
    ``fill``)."""
    n = volume.shape[axis]
    source = twice_centre - np.arange(n)
    valid_1d = (source >= 0) & (source < n)
    out = np.take(volume, np.clip(source, 0, n - 1), axis=axis)
    shape = [1] * volume.ndim
    shape[axis] = n
    valid = np.broadcast_to(valid_1d.reshape(shape), volume.shape)
    return np.where(valid, out, fill).astype(volume.dtype, copy=False), valid


def measure(
    fixed: WorkingImage,
    moving: WorkingImage,
    moved: WorkingImage,
    disp_vox: torch.Tensor,
    deformable_mm: np.ndarray,
    affine: sitk.AffineTransform,
    hu_window: tuple[float, float],
) -> dict:
    """What the checks judge, measured on the fixed working grid (a few hundredths of a second at 3 mm).

    ``fixed``: the fixed working image; ``moving``: the moving one on its own working grid; ``moved``: the moving
    image through ``affine`` (fixed -> moving) on the fixed working grid; ``disp_vox``: the deformable displacement
    on that grid ``(1, 3, D, H, W)`` in working voxels, ``deformable_mm`` the same as ``(D, H, W, 3)`` LPS mm.
    ``hu_window``: HU clip of the similarity (low, high).

    Returns plain floats: ``affine_determinant``, ``affine_scale_min``/``max`` (singular values), ``ncc_before``
    (the scans as they lie), ``ncc_affine``, ``ncc_after``, ``ncc_mirrored`` (the affinely aligned moving image
    mirrored left-right), ``body_dice``, ``body_coverage`` (fraction of the fixed body inside the registered
    moving field of view), ``displacement_p95_mm`` (deformable part, fixed body), ``body_extent_mm`` (largest side
    of the fixed body's bounding box).  NaN where there is too little overlap to measure.
    """
    low, high = float(hu_window[0]), float(hu_window[1])
    body = fixed.mask
    fixed_hu = np.clip(fixed.hu, low, high)
    linear = affine_matrix(affine)[:3, :3]
    scales = np.linalg.svd(linear, compute_uv=False)
    values: dict = {
        "affine_determinant": float(np.linalg.det(linear)),
        "affine_scale_min": float(scales.min()),
        "affine_scale_max": float(scales.max()),
    }

    # before: the moving working image where it lies (identity transform), on the fixed working grid
    source = moving.grid.image_from_array(moving.hu)
    before_hu = sitk.GetArrayFromImage(resample_image(source, fixed.grid, None, "linear", OUTSIDE_FOV_HU,
                                                      sitk.sitkFloat32))
    before_fov = sitk.GetArrayFromImage(resample_image(moving.grid.image_from_array(moving.field_of_view.astype(
        np.uint8)), fixed.grid, None, "nearest", 0)).astype(bool)
    values["ncc_before"] = _ncc(fixed_hu, np.clip(before_hu, low, high), body & before_fov)
    moved_hu = np.clip(moved.hu, low, high)
    values["ncc_affine"] = _ncc(fixed_hu, moved_hu, body & moved.field_of_view)

    # after: the affinely moved image warped by the deformable field (on the working grid, as optimised)
    device = disp_vox.device
    with torch.no_grad():
        stack = torch.as_tensor(np.stack([moved_hu, moved.mask.astype(np.float32),
                                          moved.field_of_view.astype(np.float32)]), device=device)[None]
        warped = spatial.warp(stack, disp_vox.to(torch.float32)).cpu().numpy()[0]
    warped_hu, warped_body, warped_fov = warped[0], warped[1] > 0.5, warped[2] > 0.5
    values["ncc_after"] = _ncc(fixed_hu, warped_hu, body & warped_fov)
    values["body_dice"] = _dice(body, warped_body)
    values["body_coverage"] = float((body & warped_fov).sum() / body.sum()) if body.any() else float("nan")

    # mirror: the affinely aligned moving image flipped left-right about the fixed body's midline
    axis = _left_right_axis(fixed.grid.direction)
    coordinates = np.nonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))[0]
    best = float("nan")
    if coordinates.size:
        counts = body.sum(axis=tuple(a for a in range(3) if a != axis))
        twice_centre = round(2.0 * float(np.sum(np.arange(body.shape[axis]) * counts) / counts.sum()))
        for shift in _MIRROR_SHIFTS_VOX:
            mirrored, valid = mirror_lr(moved_hu, axis, twice_centre + shift, low)
            fov, _ = mirror_lr(moved.field_of_view, axis, twice_centre + shift, False)
            ncc = _ncc(fixed_hu, mirrored, body & fov & valid)
            if not math.isnan(ncc) and (math.isnan(best) or ncc > best):
                best = ncc
    values["ncc_mirrored"] = best

    # deformable displacement against the body's size
    box = mask_bounding_box(body)
    spacing_zyx = np.asarray(fixed.grid.spacing[::-1], dtype=np.float64)
    values["body_extent_mm"] = (float(max((s.stop - s.start) * sp for s, sp in zip(box, spacing_zyx)))
                                if box is not None else float("nan"))
    lengths = np.linalg.norm(np.asarray(deformable_mm)[body], axis=-1) if body.any() else np.zeros(0)
    values["displacement_p95_mm"] = float(np.percentile(lengths, 95)) if lengths.size else float("nan")
    return values


def judge(
    values: dict,
    config: RegistrationConfig,
    *,
    folding_percent: float | None = None,
    dice_before: float | None = None,
    dice_after: float | None = None,
) -> tuple[str, list[str]]:
    """``(status, reasons)`` for the measurements of :func:`measure` (plus the full-resolution
    ``folding_percent`` and the labels' mean Dice when known) against ``config``'s ``check_*`` thresholds.

    ``status`` is :data:`STATUS_SUSPECT` when any check fails, else :data:`STATUS_OK`; each reason is a sentence
    giving the measured value and the threshold.  A value that could not be measured (NaN) fails no check.
    """
    reasons: list[str] = []

    def known(value) -> bool:
        return value is not None and not (isinstance(value, float) and math.isnan(value))

    det = values.get("affine_determinant")
    low, high = config.check_affine_scale_range
    if known(det) and det <= 0:
        reasons.append(f"the affine's determinant is {det:.3g} (<= 0): it mirrors the image (a left-right or other "
                       "flip), which no real patient motion does.")
    smin, smax = values.get("affine_scale_min"), values.get("affine_scale_max")
    if known(smin) and known(smax) and (smin < low or smax > high):
        reasons.append(f"the affine scales the image by {smin:.2f}-{smax:.2f}, outside the plausible range "
                       f"{low:g}-{high:g} (check_affine_scale_range).")
    if known(folding_percent) and folding_percent > config.check_max_folding_percent:
        reasons.append(f"{folding_percent:.2f} % of the body's voxels fold (det J <= 0), more than "
                       f"{config.check_max_folding_percent:g} % (check_max_folding_percent): the mapping is not "
                       "one-to-one there.")
    before, after = values.get("ncc_before"), values.get("ncc_after")
    if known(before) and known(after) and after - before < config.check_min_ncc_gain:
        reasons.append(f"the similarity inside the body got worse: NCC {before:.3f} before, {after:.3f} after "
                       f"(a change below {config.check_min_ncc_gain:+g} is flagged: check_min_ncc_gain).")
    if known(after) and after < config.check_min_ncc:
        reasons.append(f"the registered images hardly correlate inside the body: NCC {after:.3f} < "
                       f"{config.check_min_ncc:g} (check_min_ncc); are they the same body part, both CT?")
    dice = values.get("body_dice")
    if known(dice) and dice < config.check_min_body_dice:
        reasons.append(f"the two bodies overlap little after registration: body Dice {dice:.3f} < "
                       f"{config.check_min_body_dice:g} (check_min_body_dice); only "
                       f"{100 * values.get('body_coverage', float('nan')):.0f} % of the fixed body lies inside the "
                       "moving scan; do the fields of view cover the same anatomy?")
    p95, extent = values.get("displacement_p95_mm"), values.get("body_extent_mm")
    if known(p95) and known(extent) and p95 > config.check_max_displacement_fraction * extent:
        reasons.append(f"the deformable displacement is very large: 95th percentile {p95:.0f} mm, more than "
                       f"{100 * config.check_max_displacement_fraction:.0f} % of the body's extent ({extent:.0f} mm; "
                       "check_max_displacement_fraction).")
    if values.get("search_at_overlap_limit"):
        reasons.append(f"the offset search matched the scans best where their fields of view overlap least "
                       f"({100 * values.get('search_overlap_fraction', float('nan')):.0f} % of the smaller one, the "
                       f"least allowed is {100 * config.initial_search_min_overlap:.0f} %: "
                       "initial_search_min_overlap): the scans probably share no anatomy (disjoint fields of view, "
                       "another body part); if they truly overlap that little, lower initial_search_min_overlap.")
    mirrored, affine_ncc = values.get("ncc_mirrored"), values.get("ncc_affine")
    if known(mirrored) and known(affine_ncc) and mirrored > affine_ncc + config.check_mirror_margin:
        reasons.append(f"the moving image matches the fixed one better mirrored left-right (NCC {mirrored:.3f} vs "
                       f"{affine_ncc:.3f}, margin {config.check_mirror_margin:g}: check_mirror_margin): is one scan "
                       "(or its header) flipped?")
    if known(dice_before) and known(dice_after) and dice_after < dice_before - config.check_max_dice_loss:
        reasons.append(f"the labels overlap less after registration: mean Dice {dice_before:.3f} before, "
                       f"{dice_after:.3f} after (a loss above {config.check_max_dice_loss:g} is flagged: "
                       "check_max_dice_loss).")
    return (STATUS_SUSPECT if reasons else STATUS_OK), reasons
