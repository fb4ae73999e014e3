"""Evaluation: run registration methods on a list of image pairs and score them all with the same metrics.

A *method* is any function ``f(fixed_path, moving_path, *, threads, **options) -> MethodOutput`` that reads the two
images itself (so reading and preprocessing are timed) and returns a displacement field in this project's
convention: on the **fixed** grid, LPS mm, mapping a fixed point ``x`` to the moving point ``x + u(x)``.  Our
pipeline (:func:`run_ours`), the identity baseline (:func:`run_identity`) and the peers of ``benchmarks/peers.py``
(elastix, ANTs, SimpleITK demons) all have that form, so :func:`evaluate_displacement` scores them identically:

* labels (warped with nearest neighbour): Dice per label, mean Dice, Dice30 (mean of the lowest 30 %), mean Dice of
  the abdominal organs present (:data:`ORGAN_NAMES`), Hausdorff distance (HD), HD95, average symmetric surface
  distance (ASD) and centroid distance ("centroid TRE") per label, in mm;
* landmarks: TRE of the fixed landmarks mapped through the field against the moving landmarks, in mm;
* intensities inside the fixed image's body mask: NCC (on HU) and SSIM (on the soft-tissue window, -160..240 HU);
* field regularity inside the body mask: folding (% of voxels with ``det J <= 0``), std of ``det J``, SDlogJ (this
  project's convention) and SDlogJ as Learn2Reg computes it (``std(log(det J + 3))``);
* inverse consistency when the method returns an inverse: ``|u(x) + v(x + u(x))|`` in mm;
* against a known (synthetic) displacement: endpoint error mean and 95th percentile in mm;
* runtime per stage (reading included) and peak memory (CPU RSS; CUDA max allocated).

Cases come from a pairs CSV (:func:`read_pairs_csv`) or are generated (:func:`generate_phantom_cases`,
:func:`generate_ct_cases`).  :func:`run_evaluation` runs every method on every case, each in a fresh process by
default (so peak memory belongs to one method on one pair), and writes ``per_pair.csv``, ``per_label.csv``,
``summary.csv``, ``summary.md`` and PNG plots.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from deepabdominalreg import metrics as metrics_lib
from deepabdominalreg.image import Grid, read_image, read_labels, resample_image

__all__ = [
    "KEY_METRICS",
    "ORGAN_NAMES",
    "EvaluationCase",
    "MethodOutput",
    "MethodSpec",
    "code_version",
    "displacement_error",
    "environment_info",
    "evaluate_displacement",
    "generate_ct_cases",
    "generate_phantom_cases",
    "inverse_consistency_error",
    "load_label_names",
    "map_points",
    "plot_results",
    "read_pairs_csv",
    "run_evaluation",
    "run_identity",
    "run_method",
    "run_ours",
    "summarise",
    "warm_up_ours",
    "warp_with_displacement",
    "write_pairs_csv",
    "write_summary_markdown",
]

#: Abdominal soft-tissue organs (TotalSegmentator ``total`` names) averaged into ``dice_organs``.
ORGAN_NAMES: frozenset[str] = frozenset({
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "esophagus", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
})

#: Columns summarised (mean +- std, median) and shown in the Markdown summary, in this order.
KEY_METRICS: tuple[str, ...] = (
    "dice_mean", "dice_organs", "dice30", "hd95_mean_mm", "hd_mean_mm", "asd_mean_mm", "centroid_tre_mean_mm",
    "tre_mean_mm", "field_error_mean_mm", "field_error_p95_mm", "ncc_body", "ssim_body", "folding_percent",
    "jacobian_std", "sdlogj", "sdlogj_l2r", "ic_mean_mm", "runtime_s", "peak_rss_mb", "cuda_max_allocated_mb",
)

_SSIM_WINDOW_HU = (-160.0, 240.0)


# --------------------------------------------------------------------------------------------------------------
# data types
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MethodOutput:
    """What a registration method returns to the evaluation.

    ``displacement_lps``: vector image on the fixed grid (LPS mm, fixed -> moving).  ``inverse_displacement_lps``:
    moving -> fixed on the moving grid, or ``None``.  ``stages``: seconds per stage (``read`` included).
    ``settings``: the method's parameters, for the record.  ``extra``: method-specific numbers (e.g. our own
    metrics) copied into the per-pair row with the prefix ``x_``.
    """

    displacement_lps: sitk.Image
    inverse_displacement_lps: sitk.Image | None = None
    stages: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


MethodFunction = Callable[..., MethodOutput]


@dataclass(frozen=True)
class MethodSpec:
    """A named method: ``function`` is ``"module:function"`` (importable in a fresh process) plus its options.

    ``warmup`` (``"module:function"``, called without arguments) imports the method's libraries before the clock
    starts, so that runtimes compare registrations, not Python imports (the import time is reported apart).
    """

    name: str
    function: str
    options: dict = field(default_factory=dict)
    warmup: str | None = None

    def resolve(self) -> MethodFunction:
        return _resolve(self.function)


def _resolve(spec: str) -> Callable:
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"method function {spec!r} must look like 'module:function'")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class EvaluationCase:
    """One image pair and its evaluation data (paths; all optional except the two images).

    ``true_displacement``: the known fixed -> moving field (synthetic pairs).  ``label_names``: JSON ``{id: name}``.
    ``source``/``amplitude_mm``/``seed`` describe generated cases (for the plots against amplitude).
    """

    name: str
    fixed: str
    moving: str
    fixed_seg: str | None = None
    moving_seg: str | None = None
    fixed_landmarks: str | None = None
    moving_landmarks: str | None = None
    label_names: str | None = None
    true_displacement: str | None = None
    source: str = "pairs"
    amplitude_mm: float | None = None
    seed: int | None = None


_CASE_COLUMNS = [f.name for f in dataclasses.fields(EvaluationCase)]


# --------------------------------------------------------------------------------------------------------------
# cases: pairs CSV and generated pairs
# --------------------------------------------------------------------------------------------------------------


def load_label_names(path: str | os.PathLike | None, key: str | None = None) -> dict[int, str]:
    """``{id: name}`` from a JSON file holding ``{id: name}``, or ``{key: {id: name}}`` (e.g. TotalSegmentator's
    ``label_map_total_and_total_mr.json`` with ``key="total"``).  ``None`` gives ``{}``."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    if key is not None:
        if key not in data:
            raise ValueError(f"label names file '{path}' has no key {key!r}; keys: {', '.join(map(str, data))}")
        data = data[key]
    if data and all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"label names file '{path}' holds several maps ({', '.join(data)}); choose one with a key")
    return {int(k): str(v) for k, v in data.items() if int(k) != 0}


def read_pairs_csv(path: str | os.PathLike) -> list[EvaluationCase]:
    """Cases from a CSV with a header: ``fixed, moving`` required; ``fixed_seg, moving_seg, fixed_landmarks,
    moving_landmarks, label_names, true_displacement, name, source, amplitude_mm, seed`` optional.
    Relative paths are relative to the CSV's folder; empty cells mean "none"."""
    path = Path(path)
    base = path.resolve().parent
    cases = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"fixed", "moving"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"pairs CSV '{path}' lacks the column(s) {', '.join(sorted(missing))}")
        unknown = set(reader.fieldnames or []) - set(_CASE_COLUMNS)
        if unknown:
            raise ValueError(f"pairs CSV '{path}' has unknown column(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(_CASE_COLUMNS)}")
        for index, row in enumerate(reader):
            values = {k: (v.strip() if isinstance(v, str) else v) or None for k, v in row.items()}
            for key in ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_landmarks", "moving_landmarks",
                        "label_names", "true_displacement"):
                if values.get(key):
                    p = Path(values[key])
                    values[key] = str(p if p.is_absolute() else base / p)
            if not values.get("fixed") or not values.get("moving"):
                raise ValueError(f"pairs CSV '{path}', row {index + 1}: fixed and moving are required")
            values["name"] = values.get("name") or f"pair{index:03d}"
            values["source"] = values.get("source") or "pairs"
            values["amplitude_mm"] = float(values["amplitude_mm"]) if values.get("amplitude_mm") else None
            values["seed"] = int(values["seed"]) if values.get("seed") else None
            cases.append(EvaluationCase(**values))
    if len({c.name for c in cases}) != len(cases):
        raise ValueError(f"pairs CSV '{path}': case names must be unique")
    return cases


def write_pairs_csv(cases: Sequence[EvaluationCase], path: str | os.PathLike) -> Path:
    """Write cases as a pairs CSV (absolute paths) that :func:`read_pairs_csv` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CASE_COLUMNS)
        writer.writeheader()
        for case in cases:
            writer.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(case).items()})
    return path


def _write_case(pair, folder: Path, name: str, source: str, amplitude_mm: float, seed: int) -> EvaluationCase:
    """Write a :class:`deepabdominalreg.synthetic.SyntheticPair` into ``folder`` (``synthetic.write_pair``)."""
    from deepabdominalreg.synthetic import write_pair

    write_pair(pair, folder)
    case = _existing_case(folder, name, source, amplitude_mm, seed)
    assert case is not None
    return case


def generate_phantom_cases(
    out_dir: str | os.PathLike,
    *,
    seeds: Iterable[int] = (0,),
    amplitudes_mm: Iterable[float] = (10.0,),
    spacing_mm: float | tuple[float, float, float] = 3.0,
    reuse: bool = True,
) -> list[EvaluationCase]:
    """Phantom patient pairs (``synthetic.make_phantom_pair``) for every seed and amplitude, written under
    ``out_dir/phantom_s{seed}_a{amplitude}``.  With ``reuse`` a folder that already holds a case is not redone."""
    from deepabdominalreg.synthetic import make_phantom_pair

    cases = []
    for seed in seeds:
        for amplitude in amplitudes_mm:
            name = f"phantom_s{int(seed)}_a{float(amplitude):g}"
            folder = Path(out_dir) / name
            existing = _existing_case(folder, name, "phantom", amplitude, seed) if reuse else None
            if existing is not None:
                cases.append(existing)
                continue
            pair = make_phantom_pair(seed=int(seed), spacing_mm=spacing_mm, amplitude_mm=float(amplitude))
            cases.append(_write_case(pair, folder, name, "phantom", amplitude, seed))
    return cases


def generate_ct_cases(
    out_dir: str | os.PathLike,
    image: str | os.PathLike,
    labels: str | os.PathLike | None,
    label_names: dict[int, str],
    *,
    seeds: Iterable[int] = (0,),
    amplitudes_mm: Iterable[float] = (10.0,),
    generator: str = "abdominal",
    noise_hu: float = 15.0,
    prefix: str = "ct",
    reuse: bool = True,
) -> list[EvaluationCase]:
    """Pairs made from one real CT (+ labels) deformed by a synthetic generator (``synthetic.make_synthetic_pair``)
    for every seed and amplitude, written under ``out_dir/{prefix}_{generator}_s{seed}_a{amplitude}``.

    ``noise_hu``: independent CT noise added to both images (as for the phantom), so the fixed image is not just an
    interpolated copy of the moving one."""
    from deepabdominalreg.synthetic import make_synthetic_pair

    ct = read_image(image, "CT")
    seg = read_labels(labels, "CT labels") if labels else None
    cases = []
    for seed in seeds:
        for amplitude in amplitudes_mm:
            name = f"{prefix}_{generator}_s{int(seed)}_a{float(amplitude):g}"
            folder = Path(out_dir) / name
            existing = _existing_case(folder, name, f"{prefix}_{generator}", amplitude, seed) if reuse else None
            if existing is not None:
                cases.append(existing)
                continue
            pair = make_synthetic_pair(ct, seg, label_names, seed=int(seed), amplitude_mm=float(amplitude),
                                       generator=generator, noise_hu=float(noise_hu))
            cases.append(_write_case(pair, folder, name, f"{prefix}_{generator}", amplitude, seed))
    return cases


def _existing_case(folder: Path, name: str, source: str, amplitude: float, seed: int) -> EvaluationCase | None:
    if not ((folder / "fixed.nii.gz").exists() and (folder / "moving.nii.gz").exists()):
        return None

    def maybe(file: str) -> str | None:
        return str(folder / file) if (folder / file).exists() else None

    return EvaluationCase(
        name=name, fixed=str(folder / "fixed.nii.gz"), moving=str(folder / "moving.nii.gz"),
        fixed_seg=maybe("fixed_seg.nii.gz"), moving_seg=maybe("moving_seg.nii.gz"),
        fixed_landmarks=maybe("fixed_landmarks.csv"), moving_landmarks=maybe("moving_landmarks.csv"),
        label_names=maybe("labels.json"), true_displacement=maybe("true_displacement.nii.gz"),
        source=source, amplitude_mm=float(amplitude), seed=int(seed),
    )


# --------------------------------------------------------------------------------------------------------------
# metrics on a displacement field (method-agnostic)
# --------------------------------------------------------------------------------------------------------------


def _field_transform(displacement_lps: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A transform ``x -> x + u(x)`` (linear interpolation); the field is copied (the transform takes its buffer)."""
    metrics_lib._check_displacement(displacement_lps)
    return sitk.DisplacementFieldTransform(sitk.Cast(displacement_lps, sitk.sitkVectorFloat64))


def warp_with_displacement(
    image: sitk.Image,
    displacement_lps: sitk.Image,
    interpolator: str = "linear",
    default_value: float = 0.0,
) -> sitk.Image:
    """``image`` (moving) resampled onto the displacement's grid (fixed) at ``x + u(x)``: ``out(x) = image(x + u(x))``."""
    return resample_image(image, displacement_lps, _field_transform(displacement_lps), interpolator, default_value)


def map_points(points_lps: np.ndarray, displacement_lps: sitk.Image) -> np.ndarray:
    """Fixed points ``(N, 3)`` (LPS mm) mapped to ``x + u(x)`` (``u`` interpolated linearly; zero outside the grid)."""
    transform = _field_transform(displacement_lps)
    points = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    return np.array([transform.TransformPoint([float(c) for c in p]) for p in points]).reshape(-1, 3)


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
    metrics_lib._check_displacement(inverse_lps)
    transform = _field_transform(forward_lps)
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
    ``field_error_p95_mm``, ``field_error_max_mm``.  ``true_lps`` is resampled onto ``estimated_lps``'s grid if needed."""
    metrics_lib._check_displacement(true_lps)
    if not metrics_lib._same_grid(estimated_lps, true_lps):
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
    from deepabdominalreg.preprocessing import body_mask

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
    metrics_lib._check_displacement(displacement_lps)
    if not metrics_lib._same_grid(displacement_lps, fixed):
        raise ValueError("the displacement must be on the fixed image's grid (size, spacing, origin, direction)")
    nan = float("nan")
    body = fixed_body_mask(fixed) if body_mask_zyx is None else np.asarray(body_mask_zyx, dtype=bool)
    if not body.any():
        body = np.ones(body.shape, dtype=bool)
    summary: dict = {}
    per_label: dict = {}

    # regularity
    jacobian = sitk.GetArrayFromImage(metrics_lib.jacobian_determinant(displacement_lps))
    jac = metrics_lib.jacobian_statistics(jacobian, body)
    del jacobian
    summary.update({
        "folding_percent": jac["folding_percent"], "jacobian_std": jac["jacobian_std"],
        "jacobian_min": jac["jacobian_min"], "sdlogj": jac["sdlogj"], "sdlogj_l2r": jac["sdlogj_l2r"],
    })
    summary.update({f"displacement_{k}": v for k, v in
                    metrics_lib.displacement_statistics(displacement_lps, body).items()})

    # intensities inside the body
    air = float(min(-1024.0, float(sitk.GetArrayViewFromImage(moving).min())))
    warped = warp_with_displacement(moving, displacement_lps, "linear", air)
    fixed_hu = sitk.GetArrayViewFromImage(fixed)
    warped_hu = sitk.GetArrayViewFromImage(warped)
    summary["ncc_body"] = metrics_lib.normalized_cross_correlation(fixed_hu, warped_hu, body)
    low, high = _SSIM_WINDOW_HU
    summary["ssim_body"] = metrics_lib.structural_similarity(
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
        if not metrics_lib._same_grid(fixed_labels, fixed):
            fixed_labels = resample_image(fixed_labels, fixed, None, "nearest", 0)
        warped_labels = warp_with_displacement(sitk.Cast(moving_labels, sitk.sitkUInt16), displacement_lps,
                                               "nearest", 0)
        report = metrics_lib.label_overlap_report(fixed_labels, warped_labels, label_names)
        per_label = report["per_label"]
        organs = [v["dice"] for k, v in per_label.items() if k in ORGAN_NAMES]
        summary.update({
            "num_labels": report["num_labels"], "dice_mean": report["dice_mean"], "dice30": report["dice30"],
            "dice_organs": float(np.mean(organs)) if organs else nan,
            "hd95_mean_mm": report["hd95_mean_mm"], "asd_mean_mm": report["asd_mean_mm"],
            "hd_mean_mm": metrics_lib._nanmean([v["hd_mm"] for v in per_label.values()]),
            "centroid_tre_mean_mm": report["centroid_error_mean_mm"],
        })

    # landmarks
    summary.update({"tre_mean_mm": nan, "tre_p95_mm": nan, "tre_max_mm": nan, "num_landmarks": 0})
    if fixed_landmarks_lps is not None and moving_landmarks_lps is not None and len(fixed_landmarks_lps):
        mapped = map_points(fixed_landmarks_lps, displacement_lps)
        errors = metrics_lib.landmark_errors(mapped, moving_landmarks_lps)
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


# --------------------------------------------------------------------------------------------------------------
# methods: ours and the identity baseline
# --------------------------------------------------------------------------------------------------------------


def run_ours(
    fixed_path: str,
    moving_path: str,
    *,
    threads: int | None = 2,
    preset: str = "balanced",
    device: str = "cpu",
    model: str | None = None,
    seed: int = 0,
    **overrides,
) -> MethodOutput:
    """Our pipeline (:func:`deepabdominalreg.registration.register_pair`) from files: read, register, return the
    field.  ``preset`` + ``overrides`` make the :class:`RegistrationConfig`; ``model=None`` keeps the preset's model
    (none for ``fast``/``balanced``/``accurate``; the shipped one for ``network``)."""
    import torch

    from deepabdominalreg.config import config_from_preset
    from deepabdominalreg.registration import register_pair

    if threads:
        torch.set_num_threads(int(threads))
    t = time.perf_counter()
    fixed = read_image(fixed_path, "fixed image")
    moving = read_image(moving_path, "moving image")
    read_s = time.perf_counter() - t
    if model is not None:
        overrides["model"] = model
    config = config_from_preset(preset, device=device, seed=seed, threads=threads, **overrides)
    result = register_pair(fixed, moving, config=config)
    stages = {"read": read_s}
    stages.update({k: float(v) for k, v in result.metrics["stages"].items() if k != "total"})
    extra = {
        "device": result.metrics["device"],
        "working_spacing_mm": result.metrics["working_grid"]["spacing_mm"],
        "working_size": "x".join(str(s) for s in result.metrics["working_grid"]["size"]),
        "own_ic_mean_mm": result.metrics.get("inverse", {}).get("inverse_consistency_mean_mm", float("nan")),
        "model_sha256": (result.metrics.get("model") or {}).get("sha256") or "",
        "warnings": " | ".join(result.metrics.get("warnings", [])),
    }
    settings = {"preset": preset, "config": result.metrics["config"], "model": result.metrics["model"]}
    return MethodOutput(
        displacement_lps=result.displacement_lps, inverse_displacement_lps=result.inverse_displacement_lps,
        stages=stages, settings=settings, extra=extra,
    )


def warm_up_ours() -> None:
    """Import what :func:`run_ours` needs (torch, the pipeline) before the clock starts.

    ``torch._dynamo`` is imported by the first ``torch.optim`` optimiser a process creates (~2-5 s on this CPU);
    it is an import like ``itk`` for elastix, so it is done here too (and reported in ``import_s``).
    """
    import torch
    import torch._dynamo

    import deepabdominalreg.registration  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # whatever else the first optimiser loads


def run_identity(fixed_path: str, moving_path: str, *, threads: int | None = None) -> MethodOutput:
    """No registration (zero displacement): the "before" row of every table."""
    t = time.perf_counter()
    fixed = read_image(fixed_path, "fixed image")
    read_s = time.perf_counter() - t
    grid = Grid.from_image(fixed)
    zeros = grid.image_from_array(np.zeros((*grid.shape_zyx, 3), dtype=np.float32), is_vector=True)
    return MethodOutput(displacement_lps=zeros, inverse_displacement_lps=zeros, stages={"read": read_s},
                        settings={"method": "identity"})


# --------------------------------------------------------------------------------------------------------------
# running methods on cases
# --------------------------------------------------------------------------------------------------------------


def _load_case(case: EvaluationCase) -> dict:
    from deepabdominalreg.image import read_displacement_field
    from deepabdominalreg.landmarks import read_landmarks

    data = {
        "fixed": read_image(case.fixed, "fixed image"),
        "moving": read_image(case.moving, "moving image"),
        "fixed_labels": read_labels(case.fixed_seg, "fixed segmentation") if case.fixed_seg else None,
        "moving_labels": read_labels(case.moving_seg, "moving segmentation") if case.moving_seg else None,
        "fixed_landmarks_lps": read_landmarks(case.fixed_landmarks, "fixed landmarks") if case.fixed_landmarks
        else None,
        "moving_landmarks_lps": read_landmarks(case.moving_landmarks, "moving landmarks") if case.moving_landmarks
        else None,
        "label_names": load_label_names(case.label_names),
        "true_displacement_lps": read_displacement_field(case.true_displacement) if case.true_displacement else None,
    }
    return data


def run_method(case: EvaluationCase, method: MethodSpec, threads: int = 2) -> tuple[dict, list[dict]]:
    """Run one method on one case in this process and score it: ``(row, per_label_rows)``.

    Timing covers the method call (reading and preprocessing included); peak memory is the process's peak RSS
    right after it (meaningful per method only in a fresh process: see :func:`run_evaluation`).  A failing method
    gives ``status = "failed"`` and the error, never an exception.
    """
    row: dict = {"case": case.name, "source": case.source, "amplitude_mm": case.amplitude_mm, "seed": case.seed,
                 "method": method.name, "threads": threads, "status": "ok", "error": "",
                 "load_1min": _load_average(), "nice": _niceness(), "code_version": code_version()}
    label_rows: list[dict] = []
    try:
        t = time.perf_counter()
        function = method.resolve()
        if method.warmup:
            _resolve(method.warmup)()
        row["import_s"] = time.perf_counter() - t
        rss_before = metrics_lib.peak_memory_mb()["rss_mb"]
        with metrics_lib.PeakMemory() as peak:
            t = time.perf_counter()
            output = function(case.fixed, case.moving, threads=threads, **method.options)
            runtime = time.perf_counter() - t
        row["runtime_s"] = runtime
        row["peak_rss_mb"] = peak.rss_mb
        row["rss_before_mb"] = rss_before
        row["cuda_max_allocated_mb"] = peak.cuda_max_allocated_mb
        for stage, seconds in output.stages.items():
            row[f"time_{stage}_s"] = float(seconds)
        for key, value in output.extra.items():
            row[f"x_{key}"] = value
        data = _load_case(case)
        summary, per_label = evaluate_displacement(
            output.displacement_lps, inverse_displacement_lps=output.inverse_displacement_lps, **data
        )
        row.update(summary)
        for name, values in per_label.items():
            label_rows.append({"case": case.name, "method": method.name, "label_name": name, **values})
        row["_settings"] = output.settings
    except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash of the benchmark
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["_traceback"] = traceback.format_exc()
    return row, label_rows


def code_version() -> str:
    """First 12 hex digits of the SHA-256 of the core package's ``*.py`` files (which pipeline code produced a row,
    even in an uncommitted working tree)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _niceness() -> int:
    """This process's scheduling niceness (> 0: it yielded the CPU to other jobs, so its runtime is not comparable)."""
    try:
        return int(os.nice(0))
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return 0


def _load_average() -> float:
    """The machine's 1-minute load average when the run starts (other processes competing for the CPU)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return float("nan")


def _worker(connection, case: EvaluationCase, method: MethodSpec, threads: int, env: dict) -> None:
    os.environ.update(env)
    try:
        connection.send(run_method(case, method, threads))
    finally:
        connection.close()


def run_isolated(case: EvaluationCase, method: MethodSpec, threads: int = 2,
                 timeout_s: float | None = None) -> tuple[dict, list[dict]]:
    """:func:`run_method` in a fresh (spawned) process, so peak RSS belongs to this method and pair alone.

    Thread-count variables (``OMP_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, MKL/OpenBLAS) are set
    to ``threads`` in the child.  Past ``timeout_s`` the child is killed and the row says ``timeout``.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    process = context.Process(target=_worker, args=(sender, case, method, threads, env), daemon=True)
    started = time.perf_counter()
    process.start()
    sender.close()
    result = None
    try:
        if receiver.poll(timeout_s):
            result = receiver.recv()
    except EOFError:
        result = None
    finally:
        if process.is_alive():
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    if result is not None:
        return result
    elapsed = time.perf_counter() - started
    timed_out = timeout_s is not None and elapsed >= timeout_s
    row = {"case": case.name, "source": case.source, "amplitude_mm": case.amplitude_mm, "seed": case.seed,
           "method": method.name, "threads": threads, "status": "timeout" if timed_out else "failed",
           "error": f"killed after {elapsed:.0f} s" if timed_out else f"worker died (exit code {process.exitcode})"}
    return row, []


def run_evaluation(
    cases: Sequence[EvaluationCase],
    methods: Sequence[MethodSpec],
    out_dir: str | os.PathLike,
    *,
    threads: int = 2,
    isolate: bool = True,
    timeout_s: float | None = None,
    log: Callable[[str], None] | None = print,
    extra_info: dict | None = None,
    before_each: Callable[[], None] | None = None,
    resume: bool = False,
) -> list[dict]:
    """Every method on every case (case by case), scored alike; writes results into ``out_dir``:

    ``per_pair.csv`` (one row per case and method, rewritten after each run so partial results survive),
    ``per_label.csv``, ``summary.csv``, ``summary.md``, ``settings.json`` (each method's parameters),
    ``environment.json`` and ``boxplots.png``, ``dice_vs_amplitude.png``, ``runtime.png``.
    ``before_each()`` is called before every run (e.g. to wait while another heavy job uses the CPU).
    With ``resume``, the successful rows already in ``out_dir``'s CSVs are kept and those runs are not redone.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    label_rows: list[dict] = []
    settings: dict = {}
    if resume:
        rows = [r for r in _read_rows(out / "per_pair.csv") if r.get("status") == "ok"]
        kept = {(r["case"], r["method"]) for r in rows}
        label_rows = [r for r in _read_rows(out / "per_label.csv") if (r["case"], r["method"]) in kept]
        if (out / "settings.json").is_file():
            settings = json.loads((out / "settings.json").read_text())
    done_before = {(r["case"], r["method"]) for r in rows}
    total = len(cases) * len(methods)
    done = 0
    for case in cases:
        for method in methods:
            done += 1
            if (case.name, method.name) in done_before:
                continue
            if before_each is not None:
                before_each()
            if log:
                log(f"[{done}/{total}] {case.name}: {method.name} ...")
            if isolate:
                row, labels = run_isolated(case, method, threads, timeout_s)
            else:
                row, labels = run_method(case, method, threads)
            settings.setdefault(method.name, row.pop("_settings", None))
            row.pop("_settings", None)
            trace = row.pop("_traceback", None)
            if log:
                if row["status"] == "ok":
                    log(f"    {row.get('runtime_s', float('nan')):.1f} s, Dice {row.get('dice_mean', float('nan')):.3f}, "
                        f"TRE {row.get('tre_mean_mm', float('nan')):.2f} mm, folding "
                        f"{row.get('folding_percent', float('nan')):.3f} %")
                else:
                    log(f"    {row['status']}: {row['error']}" + (f"\n{trace}" if trace else ""))
            rows.append(row)
            label_rows.extend(labels)
            _write_rows(rows, out / "per_pair.csv")
            _write_rows(label_rows, out / "per_label.csv")
            (out / "settings.json").write_text(json.dumps(_jsonable(settings), indent=1))
    order = {(c.name, m.name): i for i, (c, m) in enumerate((c, m) for c in cases for m in methods)}
    rows.sort(key=lambda r: order.get((r["case"], r["method"]), len(order)))
    _write_rows(rows, out / "per_pair.csv")
    _write_rows(label_rows, out / "per_label.csv")
    (out / "settings.json").write_text(json.dumps(_jsonable(settings), indent=1))
    env = environment_info(threads)
    if extra_info:
        env.update(extra_info)
    (out / "environment.json").write_text(json.dumps(_jsonable(env), indent=1))
    summary = summarise(rows)
    _write_rows(summary, out / "summary.csv")
    write_summary_markdown(rows, out / "summary.md", env)
    plot_results(rows, out)
    return rows


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _write_rows(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns and not key.startswith("_"):
                columns.append(key)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items() if not k.startswith("_")})
    os.replace(tmp, path)


def _read_rows(path: Path) -> list[dict]:
    """Rows of a CSV written by :func:`_write_rows` (numbers stay strings; :func:`_number` reads them)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(float(value)) else f"{float(value):.6g}"
    return value


# --------------------------------------------------------------------------------------------------------------
# summary, Markdown and plots
# --------------------------------------------------------------------------------------------------------------


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number


def _methods_in_order(rows: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["method"] not in seen:
            seen.append(row["method"])
    return seen


def summarise(rows: Sequence[dict], metrics: Sequence[str] = KEY_METRICS, by: str | None = None) -> list[dict]:
    """Per method (and per value of ``by``, e.g. ``"source"``): ``n``, ``mean``, ``std``, ``median``, ``min``,
    ``max`` of every metric over the successful rows (NaN values left out)."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        key = (row["method"],) + ((row.get(by),) if by else ())
        groups.setdefault(key, []).append(row)
    order = {m: i for i, m in enumerate(_methods_in_order(rows))}
    for key in sorted(groups, key=lambda k: (order.get(k[0], 0), *map(str, k[1:]))):
        members = groups[key]
        for metric in metrics:
            values = np.array([_number(r.get(metric)) for r in members], dtype=np.float64)
            values = values[np.isfinite(values)]
            entry = {"method": key[0]}
            if by:
                entry[by] = key[1]
            entry.update({"metric": metric, "n": int(values.size)})
            if values.size:
                entry.update({"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                              "median": float(np.median(values)), "min": float(values.min()),
                              "max": float(values.max())})
            else:
                entry.update({k: float("nan") for k in ("mean", "std", "median", "min", "max")})
            out.append(entry)
    return out


_MD_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dice_mean", "Dice (all labels)", "{:.3f}"),
    ("dice_organs", "Dice (organs)", "{:.3f}"),
    ("dice30", "Dice30", "{:.3f}"),
    ("hd95_mean_mm", "HD95 mm", "{:.1f}"),
    ("asd_mean_mm", "ASD mm", "{:.2f}"),
    ("tre_mean_mm", "landmark TRE mm", "{:.2f}"),
    ("field_error_mean_mm", "field error mm", "{:.2f}"),
    ("ncc_body", "NCC body", "{:.3f}"),
    ("ssim_body", "SSIM body", "{:.3f}"),
    ("folding_percent", "folding %", "{:.3f}"),
    ("jacobian_std", "std det J", "{:.3f}"),
    ("sdlogj_l2r", "SDlogJ (L2R)", "{:.4f}"),
    ("ic_mean_mm", "inverse consistency mm", "{:.2f}"),
    ("runtime_s", "runtime s", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
)


def markdown_table(rows: Sequence[dict], columns=_MD_COLUMNS, with_median: bool = False) -> str:
    """A Markdown table: one line per method, ``mean ± std`` (and the median) of each column."""
    summary = {(s["method"], s["metric"]): s for s in summarise(rows, [c[0] for c in columns])}
    methods = _methods_in_order([r for r in rows if r.get("status") == "ok"])
    present = [c for c in columns if any(summary.get((m, c[0]), {}).get("n", 0) for m in methods)]
    lines = ["| method | n | " + " | ".join(c[1] for c in present) + " |",
             "|---|---|" + "---|" * len(present)]
    for method in methods:
        cells = []
        n = max(summary.get((method, c[0]), {}).get("n", 0) for c in present) if present else 0
        for metric, _, fmt in present:
            s = summary.get((method, metric))
            if not s or not s["n"]:
                cells.append("–")
                continue
            text = fmt.format(s["mean"])
            if s["n"] > 1:
                text += " ± " + fmt.format(s["std"])
                if with_median:
                    text += " (" + fmt.format(s["median"]) + ")"
            cells.append(text)
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary_markdown(rows: Sequence[dict], path: str | os.PathLike, env: dict | None = None) -> Path:
    """``summary.md``: the main table (all cases), one table per case source, failures, and the environment."""
    path = Path(path)
    intro = ("Mean ± std over the pairs (median in brackets); NaN-free values only. Runtime includes reading the "
             "images and all preprocessing; peak RSS is the peak resident memory of a fresh process running one "
             "method on one pair (it includes the Python interpreter and imported libraries).")
    parts = ["# Evaluation summary", "", intro, ""]
    parts += ["## All pairs", "", markdown_table(rows, with_median=True), ""]
    sources = sorted({str(r.get("source")) for r in rows if r.get("status") == "ok"})
    if len(sources) > 1:
        for source in sources:
            subset = [r for r in rows if str(r.get("source")) == source]
            parts += [f"## {source}", "", markdown_table(subset), ""]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        parts += ["## Failed or skipped runs", ""]
        parts += [f"- {r['case']} / {r['method']}: {r['status']} — {r.get('error', '')}" for r in failed]
        parts.append("")
    if env:
        parts += ["## Environment", "", "```json", json.dumps(_jsonable(env), indent=1), "```", ""]
    path.write_text("\n".join(parts))
    return path


def _quiet_nanmean(values) -> float:
    """Mean of the finite values; NaN (without a warning) when there is none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_results(rows: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``boxplots.png`` (per method: Dice, HD95, TRE, folding, runtime), ``dice_vs_amplitude.png`` (mean
    Dice against the synthetic amplitude, one line per method and case source) and ``runtime.png`` (mean runtime
    per method, stacked by stage).  Returns name -> path of the figures written."""
    out = Path(out_dir)
    ok = [r for r in rows if r.get("status") == "ok"]
    methods = _methods_in_order(ok)
    paths: dict[str, Path] = {}
    if not ok:
        return paths

    panels = [(m, t) for m, t in (("dice_mean", "mean Dice"), ("hd95_mean_mm", "HD95 (mm)"),
                                  ("tre_mean_mm", "landmark TRE (mm)"), ("field_error_mean_mm", "field error (mm)"),
                                  ("folding_percent", "folding (%)"), ("runtime_s", "runtime (s)"))
              if any(np.isfinite(_number(r.get(m))) for r in ok)]
    if panels:
        columns = min(3, len(panels))
        rows_n = math.ceil(len(panels) / columns)
        figure = _figure(4.2 * columns, 3.4 * rows_n)
        for index, (metric, title) in enumerate(panels):
            axis = figure.add_subplot(rows_n, columns, index + 1)
            data = [[v for v in (_number(r.get(metric)) for r in ok if r["method"] == m) if np.isfinite(v)]
                    for m in methods]
            axis.boxplot([d if d else [np.nan] for d in data], tick_labels=methods, showmeans=True)
            axis.set_title(title)
            axis.tick_params(axis="x", labelrotation=35, labelsize=7)
            if metric == "runtime_s" and any(v > 0 for d in data for v in d):
                axis.set_yscale("log")
            axis.grid(alpha=0.3)
        paths["boxplots"] = out / "boxplots.png"
        figure.savefig(paths["boxplots"])

    with_amplitude = [r for r in ok if np.isfinite(_number(r.get("amplitude_mm"))) and np.isfinite(
        _number(r.get("dice_mean")))]
    if with_amplitude:
        sources = sorted({str(r.get("source")) for r in with_amplitude})
        figure = _figure(5.0 * len(sources), 3.8)
        for index, source in enumerate(sources):
            axis = figure.add_subplot(1, len(sources), index + 1)
            for method in methods:
                subset = [r for r in with_amplitude if r["method"] == method and str(r.get("source")) == source]
                amplitudes = sorted({_number(r["amplitude_mm"]) for r in subset})
                if not amplitudes:
                    continue
                means = [np.mean([_number(r["dice_mean"]) for r in subset if _number(r["amplitude_mm"]) == a])
                         for a in amplitudes]
                axis.plot(amplitudes, means, marker="o", label=method)
            axis.set_xlabel("synthetic displacement amplitude (mm)")
            axis.set_ylabel("mean Dice")
            axis.set_title(source)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        paths["dice_vs_amplitude"] = out / "dice_vs_amplitude.png"
        figure.savefig(paths["dice_vs_amplitude"])

    stage_names: list[str] = []
    for row in ok:
        for key in row:
            if key.startswith("time_") and key.endswith("_s") and key not in stage_names:
                stage_names.append(key)
    figure = _figure(max(5.0, 1.0 * len(methods) + 3), 4.0)
    axis = figure.add_subplot(1, 1, 1)
    bottom = np.zeros(len(methods))
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    for index, stage in enumerate(stage_names):
        heights = np.array([_quiet_nanmean([_number(r.get(stage)) for r in ok if r["method"] == m])
                            for m in methods])
        heights = np.nan_to_num(heights)
        if not heights.any():
            continue
        axis.bar(methods, heights, bottom=bottom, label=stage[5:-2], color=palette[index % len(palette)])
        bottom += heights
    totals = [_quiet_nanmean([_number(r.get("runtime_s")) for r in ok if r["method"] == m]) for m in methods]
    if not stage_names or not bottom.any():  # no stage times: plain total bars
        axis.bar(methods, np.nan_to_num(np.asarray(totals, dtype=float)), label="total")
    finite = [t for t in totals if np.isfinite(t)]
    if finite:
        axis.set_ylim(0, max(max(finite), float(bottom.max())) * 1.15 or 1.0)
    for x, total in enumerate(totals):
        if np.isfinite(total):
            axis.text(x, total, f"{total:.1f} s", ha="center", va="bottom", fontsize=7, clip_on=True)
    axis.set_ylabel("mean runtime per pair (s), by stage")
    axis.tick_params(axis="x", labelrotation=35, labelsize=7)
    axis.legend(fontsize=6, ncol=2)
    axis.grid(alpha=0.3, axis="y")
    paths["runtime"] = out / "runtime.png"
    figure.savefig(paths["runtime"])
    return paths


# --------------------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _git_state() -> str | None:
    """``<commit> (+ uncommitted changes)`` of the checkout holding this package, or None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" + uncommitted changes" if dirty else "")


def environment_info(threads: int | None = None) -> dict:
    """Machine, package versions and thread settings, for the results' record."""
    from importlib import metadata

    versions = {}
    for package in ("deepabdominalreg", "torch", "SimpleITK", "numpy", "scipy", "scikit-image", "itk-elastix",
                    "itk", "antspyx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "memory_gb": _memory_gb(),
                    "os": platform.platform(), "python": sys.version.split()[0]},
        "threads_per_method": threads,
        "packages": versions,
        "code_version": code_version(),
        "git": _git_state(),
    }
    try:
        import torch

        info["torch_threads_default"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a dependency
        info["cuda"] = None
    return info
