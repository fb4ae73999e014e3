"""Scoring a displacement field: the same metrics for every method (:func:`evaluate_displacement`).

The field is in this project's convention: on the **fixed** grid, LPS mm, mapping a fixed point ``x`` to the moving
point ``x + u(x)``.  The metrics:

* labels (warped with nearest neighbour): Dice per label, mean Dice, Dice30 (mean of the lowest 30 %), mean Dice of
  the abdominal organs present (:data:`ORGAN_NAMES`), Hausdorff distance (HD), HD95, average symmetric surface
  distance (ASD) and centroid distance ("centroid TRE") per label, in mm;
* landmarks: TRE of the fixed landmarks mapped through the field against the moving landmarks, in mm;
* intensities inside the fixed image's body mask: NCC (on HU) and SSIM (on the pipeline's soft-tissue window,
  :data:`SSIM_WINDOW_HU`);
* field regularity inside the body mask: folding (% of voxels with ``det J <= 0``), std of ``det J``, SDlogJ (this
  project's convention) and SDlogJ as Learn2Reg computes it (``std(log(det J + 3))``);
* inverse consistency when the method returns an inverse: ``|u(x) + v(x + u(x))|`` in mm;
* against a known (synthetic) displacement: endpoint error mean and 95th percentile in mm.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.config import OUTSIDE_FOV_HU, RegistrationConfig
from deepabdominalreg.geometry import (
    Grid,
    check_displacement,
    displacement_transform,
    map_points,
    resample_image,
    warp_with_displacement,
)
from deepabdominalreg.metrics.fields import (
    displacement_statistics,
    jacobian_determinant,
    jacobian_statistics,
    same_grid,
)
from deepabdominalreg.metrics.images import normalized_cross_correlation, structural_similarity
from deepabdominalreg.metrics.labels import label_overlap_report
from deepabdominalreg.metrics.landmarks import landmark_errors

#: Abdominal soft-tissue organs (TotalSegmentator ``total`` names) averaged into ``dice_organs``.
ORGAN_NAMES: frozenset[str] = frozenset({
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "esophagus", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
})

#: HU window of the SSIM: the pipeline's soft-tissue window (``RegistrationConfig.hu_window``'s default).
SSIM_WINDOW_HU: tuple[float, float] = RegistrationConfig().hu_window


# --------------------------------------------------------------------------------------------------------------
# metrics on a displacement field (method-agnostic)
# --------------------------------------------------------------------------------------------------------------




def inverse_consistency_error(
    forward_lps: sitk.Image,
    inverse_lps: sitk.Image,
    mask_zyx: np.ndarray | None = None,
) -> dict:
    """``|u(x) + v(x + u(x))|`` (mm) for every voxel ``x`` of the forward field's grid inside ``mask_zyx``.

    ``forward_lps``: fixed -> moving on the fixed grid; ``inverse_lps``: moving -> fixed on the moving grid (both
    LPS mm).  Zero for an exact inverse.  Voxels whose ``x + u(x)`` falls outside the inverse's grid are left out.
    Returns ``ic_mean_mm``, ``ic_p95_mm``, ``ic_max_mm`` and ``ic_voxels`` (NaN/0 when nothing is left).
    """
    check_displacement(inverse_lps)
    transform = displacement_transform(forward_lps)
    v_at_y = sitk.GetArrayFromImage(
        resample_image(sitk.Cast(inverse_lps, sitk.sitkVectorFloat32), forward_lps, transform, "linear", 0.0)
    )
    inside = _maps_inside(forward_lps, Grid.from_image(inverse_lps))
    u = sitk.GetArrayViewFromImage(forward_lps)
    valid = inside if mask_zyx is None else inside & np.asarray(mask_zyx, dtype=bool)
    errors = np.linalg.norm(np.asarray(u[valid], dtype=np.float64) + v_at_y[valid], axis=-1)
    if errors.size == 0:
        nan = float("nan")
        return {"ic_mean_mm": nan, "ic_p95_mm": nan, "ic_max_mm": nan, "ic_voxels": 0}
    return {
        "ic_mean_mm": float(errors.mean()),
        "ic_p95_mm": float(np.percentile(errors, 95)),
        "ic_max_mm": float(errors.max()),
        "ic_voxels": int(errors.size),
    }


def _maps_inside(forward_lps: sitk.Image, target: Grid, margin_vox: float = 1e-3) -> np.ndarray:
    """``zyx`` mask of the voxels ``x`` of ``forward_lps``'s grid whose ``x + u(x)`` lies inside ``target``'s
    voxel-centre box (shrunk by ``margin_vox``, so interpolation there never reads past the buffer)."""
    grid = Grid.from_image(forward_lps)
    u = sitk.GetArrayViewFromImage(forward_lps)
    to_index = target.physical_to_index_matrix()
    upper = np.asarray(target.size, dtype=np.float64) - 1.0 - margin_vox
    out = np.empty(grid.shape_zyx, dtype=bool)
    ny, nx = grid.shape_zyx[1:]
    j, i = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    for z in range(grid.shape_zyx[0]):
        index = np.stack([i, j, np.full_like(i, z)], axis=-1).reshape(-1, 3).astype(np.float64)
        points = grid.index_to_physical(index) + np.asarray(u[z], dtype=np.float64).reshape(-1, 3)
        mapped = points @ to_index[:3, :3].T + to_index[:3, 3]
        out[z] = np.all((mapped >= margin_vox) & (mapped <= upper), axis=1).reshape(ny, nx)
    return out


def displacement_error(
    estimated_lps: sitk.Image,
    true_lps: sitk.Image,
    mask_zyx: np.ndarray | None = None,
) -> dict:
    """Endpoint error ``|u_est(x) - u_true(x)|`` (mm) inside ``mask_zyx``: ``field_error_mean_mm``,
    ``field_error_p95_mm``, ``field_error_max_mm``.  ``true_lps`` is resampled onto ``estimated_lps``'s grid if
    needed."""
    check_displacement(true_lps)
    if not same_grid(estimated_lps, true_lps):
        true_lps = resample_image(sitk.Cast(true_lps, sitk.sitkVectorFloat32), estimated_lps, None, "linear", 0.0)
    est = sitk.GetArrayViewFromImage(estimated_lps)
    true = sitk.GetArrayViewFromImage(true_lps)
    mask = None if mask_zyx is None else np.asarray(mask_zyx, dtype=bool)
    if mask is not None and mask.shape != est.shape[:3]:
        raise ValueError(f"mask has shape {mask.shape} but the field's grid is {est.shape[:3]} (zyx)")
    errors = np.linalg.norm(
        (np.asarray(est[mask] if mask is not None else est.reshape(-1, 3), dtype=np.float64)
         - np.asarray(true[mask] if mask is not None else true.reshape(-1, 3), dtype=np.float64)), axis=-1
    )
    if errors.size == 0:
        nan = float("nan")
        return {"field_error_mean_mm": nan, "field_error_p95_mm": nan, "field_error_max_mm": nan}
    return {
        "field_error_mean_mm": float(errors.mean()),
        "field_error_p95_mm": float(np.percentile(errors, 95)),
        "field_error_max_mm": float(errors.max()),
    }


def fixed_body_mask(fixed: sitk.Image) -> np.ndarray:
    """The fixed image's body mask (``zyx`` bool) with the pipeline's own rule (threshold, no table)."""
    from deepabdominalreg.registration.preprocessing import body_mask

    hu = sitk.GetArrayViewFromImage(fixed)
    return body_mask(np.asarray(hu), tuple(reversed(fixed.GetSpacing())))


def evaluate_displacement(
    displacement_lps: sitk.Image,
    *,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    fixed_landmarks_lps: np.ndarray | None = None,
    moving_landmarks_lps: np.ndarray | None = None,
    label_names: dict[int, str] | None = None,
    true_displacement_lps: sitk.Image | None = None,
    inverse_displacement_lps: sitk.Image | None = None,
    body_mask_zyx: np.ndarray | None = None,
) -> tuple[dict, dict]:
    """Score one displacement field (fixed -> moving, LPS mm, on the fixed grid); see the module docstring.

    Returns ``(summary, per_label)``: ``summary`` is a flat dict of numbers (NaN where a metric does not apply),
    ``per_label`` maps label name -> ``{label, dice, hd95_mm, hd_mm, asd_mm, centroid_error_mm}``.
    ``body_mask_zyx`` defaults to :func:`fixed_body_mask`.
    """
    check_displacement(displacement_lps)
    if not same_grid(displacement_lps, fixed):
        raise ValueError("the displacement must be on the fixed image's grid (size, spacing, origin, direction)")
    nan = float("nan")
    body = fixed_body_mask(fixed) if body_mask_zyx is None else np.asarray(body_mask_zyx, dtype=bool)
    if not body.any():
        body = np.ones(body.shape, dtype=bool)
    summary: dict = {}
    per_label: dict = {}

    # regularity
    jacobian = sitk.GetArrayFromImage(jacobian_determinant(displacement_lps))
    jac = jacobian_statistics(jacobian, body)
    del jacobian
    summary.update({
        "folding_percent": jac["folding_percent"], "jacobian_std": jac["jacobian_std"],
        "jacobian_min": jac["jacobian_min"], "sdlogj": jac["sdlogj"], "sdlogj_l2r": jac["sdlogj_l2r"],
    })
    summary.update({f"displacement_{k}": v for k, v in
                    displacement_statistics(displacement_lps, body).items()})

    # intensities inside the body
    air = float(min(OUTSIDE_FOV_HU, float(sitk.GetArrayViewFromImage(moving).min())))
    warped = warp_with_displacement(moving, displacement_lps, "linear", air)
    fixed_hu = sitk.GetArrayViewFromImage(fixed)
    warped_hu = sitk.GetArrayViewFromImage(warped)
    summary["ncc_body"] = normalized_cross_correlation(fixed_hu, warped_hu, body)
    low, high = SSIM_WINDOW_HU
    summary["ssim_body"] = structural_similarity(
        np.clip(fixed_hu, low, high), np.clip(warped_hu, low, high), body, data_range=high - low
    ) if min(fixed_hu.shape) >= 3 else nan
    del warped, warped_hu

    # labels
    for key in ("dice_mean", "dice_organs", "dice30", "hd95_mean_mm", "hd_mean_mm", "asd_mean_mm",
                "centroid_tre_mean_mm"):
        summary[key] = nan
    summary["num_labels"] = 0
    if fixed_labels is not None and moving_labels is not None:
        fixed_labels = sitk.Cast(fixed_labels, sitk.sitkUInt16)
        if not same_grid(fixed_labels, fixed):
            fixed_labels = resample_image(fixed_labels, fixed, None, "nearest", 0)
        warped_labels = warp_with_displacement(sitk.Cast(moving_labels, sitk.sitkUInt16), displacement_lps,
                                               "nearest", 0)
        report = label_overlap_report(fixed_labels, warped_labels, label_names)
        per_label = report["per_label"]
        organs = [v["dice"] for k, v in per_label.items() if k in ORGAN_NAMES]
        hd = [v["hd_mm"] for v in per_label.values() if v["hd_mm"] is not None and np.isfinite(v["hd_mm"])]
        summary.update({
            "num_labels": report["num_labels"], "dice_mean": report["dice_mean"], "dice30": report["dice30"],
            "dice_organs": float(np.mean(organs)) if organs else nan,
            "hd95_mean_mm": report["hd95_mean_mm"], "asd_mean_mm": report["asd_mean_mm"],
            "hd_mean_mm": float(np.mean(hd)) if hd else nan,
            "centroid_tre_mean_mm": report["centroid_error_mean_mm"],
        })

    # landmarks
    summary.update({"tre_mean_mm": nan, "tre_p95_mm": nan, "tre_max_mm": nan, "num_landmarks": 0})
    if fixed_landmarks_lps is not None and moving_landmarks_lps is not None and len(fixed_landmarks_lps):
        mapped = map_points(fixed_landmarks_lps, displacement_lps)
        errors = landmark_errors(mapped, moving_landmarks_lps)
        summary.update({"tre_mean_mm": errors["mean"], "tre_p95_mm": errors["p95"], "tre_max_mm": errors["max"],
                        "num_landmarks": errors["count"]})

    # known field, inverse consistency
    summary.update({"field_error_mean_mm": nan, "field_error_p95_mm": nan, "field_error_max_mm": nan})
    if true_displacement_lps is not None:
        summary.update(displacement_error(displacement_lps, true_displacement_lps, body))
    summary.update({"ic_mean_mm": nan, "ic_p95_mm": nan, "ic_max_mm": nan})
    if inverse_displacement_lps is not None:
        ic = inverse_consistency_error(displacement_lps, inverse_displacement_lps, body)
        summary.update({k: v for k, v in ic.items() if k != "ic_voxels"})
    return summary, per_label
