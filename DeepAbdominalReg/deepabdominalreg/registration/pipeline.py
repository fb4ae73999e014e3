"""The registration pipeline: validation -> preprocessing -> affine -> network -> instance optimisation -> outputs.

``register_pair`` is the one entry point used by the CLI, the Slicer module and the benchmarks.
"""


from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import SimpleITK as sitk
import torch

from deepabdominalreg import spatial
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.device import network_uses_bfloat16, resolve_device, reuse_freed_memory, seed_everything
from deepabdominalreg.geometry import (
    Grid,
    make_working_grid,
    physical_overlap_fraction,
    points_inside,
    resample_image,
)
from deepabdominalreg.io import ImageValidationError, validate_image, validate_labels
from deepabdominalreg.metrics.fields import (
    displacement_magnitude,
    displacement_statistics,
    jacobian_determinant,
    jacobian_statistics,
)
from deepabdominalreg.metrics.labels import label_overlap_report
from deepabdominalreg.metrics.landmarks import landmark_errors
from deepabdominalreg.nn.models import load_model
from deepabdominalreg.registration.affine import optimise_affine
from deepabdominalreg.registration.fields import (
    affine_field_displacement,
    disp_vox_to_mm_lps,
    inverse_field_on_grid,
    warp_image,
)
from deepabdominalreg.registration.instance_optimisation import InstanceOptimisationSettings, instance_optimise
from deepabdominalreg.registration.network import network_displacement
from deepabdominalreg.registration.preprocessing import looks_like_ct, prepare_working_image


class RegistrationCancelled(RuntimeError):
    """Raised inside :func:`register_pair` when ``should_stop()`` returned True."""


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: ``stage`` name, overall ``fraction`` done (0..1) and a human-readable ``message``."""

    stage: str
    fraction: float
    message: str = ""

    def as_dict(self) -> dict:
        return {"stage": self.stage, "fraction": round(float(self.fraction), 4), "message": self.message}


_DEFAULT_CONFIG = RegistrationConfig()  # frozen: safe as a shared default argument

ProgressCallback = Callable[[ProgressEvent], None]
StopCallback = Callable[[], bool]


@dataclass
class RegistrationResult:
    """Everything :func:`register_pair` produces; all images are on the **fixed** image's grid unless stated.

    ``displacement_lps``: ``sitkVectorFloat32``, mm, LPS; maps a fixed point ``x`` to the moving point ``x + u(x)``
    (the ITK/Slicer displacement-field convention: ``sitk.DisplacementFieldTransform`` of it resamples moving onto
    fixed).  ``inverse_displacement_lps``: same convention from moving to fixed, on the **moving** grid.
    """

    warped_image: sitk.Image
    displacement_lps: sitk.Image
    jacobian: sitk.Image
    displacement_magnitude: sitk.Image
    metrics: dict
    affine_fixed_to_moving: sitk.AffineTransform
    body_mask: sitk.Image | None = None
    warped_labels: sitk.Image | None = None
    inverse_displacement_lps: sitk.Image | None = None
    warped_moving_landmarks_lps: np.ndarray | None = None
    working_displacement_lps: sitk.Image | None = None
    """The same mapping as ``displacement_lps`` sampled on the (coarser, isotropic) working grid, which covers the
    fixed image: a light-weight grid transform (e.g. for Slicer) for large scans."""
    extras: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


class _Stages:
    """Times stages, reports progress with overall fractions, and checks for cancellation."""

    WEIGHTS: ClassVar[dict[str, float]] = {
        "validation": 0.02,
        "preprocessing": 0.06,
        "affine": 0.14,
        "network": 0.05,
        "instance_optimisation": 0.50,
        "composition": 0.06,
        "warping": 0.05,
        "jacobian": 0.04,
        "inverse": 0.04,
        "metrics": 0.04,
    }

    def __init__(self, progress: ProgressCallback | None, should_stop: StopCallback | None) -> None:
        self.progress = progress
        self.should_stop = should_stop
        self.seconds: dict[str, float] = {}
        self._done = 0.0
        self._current: str | None = None
        self._start = 0.0

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise RegistrationCancelled("registration cancelled by the user")

    def emit(self, stage: str, within: float, message: str) -> None:
        if self.progress is not None:
            fraction = self._done + self.WEIGHTS.get(stage, 0.0) * min(max(within, 0.0), 1.0)
            self.progress(ProgressEvent(stage, min(fraction, 1.0), message))

    def __call__(self, stage: str, message: str = "") -> _Stages:
        self._current = stage
        self._message = message or stage.replace("_", " ")
        return self

    def __enter__(self) -> _Stages:  # noqa: PYI034 - Self needs Python 3.11
        self.check()
        self._start = time.perf_counter()
        self.emit(self._current, 0.0, self._message)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        elapsed = time.perf_counter() - self._start
        self.seconds[self._current] = self.seconds.get(self._current, 0.0) + elapsed
        if exc_type is None:
            self._done += self.WEIGHTS.get(self._current, 0.0)
            self.emit(self._current, 0.0, f"{self._message}: done in {elapsed:.1f} s")

    def iteration_callback(self, stage: str, label: str) -> Callable[[int, int, float], None]:
        def callback(step: int, total: int, loss: float) -> None:
            self.check()
            if step == 1 or step % 10 == 0 or step == total:
                self.emit(stage, step / max(total, 1), f"{label}: iteration {step}/{total}, loss {loss:.4f}")

        return callback


def _labels_on_grid(labels: sitk.Image, reference: sitk.Image, role: str, warnings: list[str]) -> sitk.Image:
    """The label map on ``reference``'s grid: resampled (nearest) with a warning when its grid differs."""
    validate_labels(labels, role)
    labels = sitk.Cast(labels, sitk.sitkUInt16)
    same = (
        labels.GetSize() == reference.GetSize()
        and np.allclose(labels.GetSpacing(), reference.GetSpacing(), atol=1e-4)
        and np.allclose(labels.GetOrigin(), reference.GetOrigin(), atol=1e-3)
        and np.allclose(labels.GetDirection(), reference.GetDirection(), atol=1e-5)
    )
    if same:
        return labels
    warnings.append(f"{role} is on a different grid than its volume; it was resampled (nearest neighbour) onto it.")
    return resample_image(labels, reference, interpolator="nearest", default_value=0)


def _check_landmarks(points, role: str, grid: Grid) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ImageValidationError(f"{role} must be a list of (x, y, z) points in mm (LPS); got shape {points.shape}.")
    if not np.all(np.isfinite(points)):
        raise ImageValidationError(f"{role} contain NaN/inf coordinates.")
    inside = points_inside(grid, points)
    if not inside.all():
        bad = np.flatnonzero(~inside)[:5].tolist()
        raise ImageValidationError(
            f"{role}: point(s) {bad} (0-based) lie outside the image; check that they are in LPS mm "
            "(Slicer markups are RAS: negate x and y) and belong to this image."
        )
    return points




_SEPARABLE_INVERSE_RATIO = 8
"""The inverse field is solved on a working grid with the moving image's axes (:func:`fields.inverse_field_on_grid`)
when the moving image has more than this many times that grid's voxels (measured, one thread: 3 mm benchmark CT,
ratio ~1: 0.47 s directly vs 0.59 s through the second solve; 512 x 512 x 400 at 3 mm, ratio ~76: ~10 s vs ~4 s)."""


def _field_transform(field_mm_zyx3: np.ndarray, grid: Grid) -> sitk.DisplacementFieldTransform:
    image = grid.image_from_array(np.ascontiguousarray(field_mm_zyx3, dtype=np.float64), is_vector=True)
    return sitk.DisplacementFieldTransform(image)


# --------------------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------------------


def register_pair(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    config: RegistrationConfig = _DEFAULT_CONFIG,
    moving_labels: sitk.Image | None = None,
    fixed_labels: sitk.Image | None = None,
    fixed_landmarks_lps: np.ndarray | None = None,
    moving_landmarks_lps: np.ndarray | None = None,
    label_names: dict[int, str] | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (CT in HU); everything returned lives on the fixed grid.

    ``moving_labels``/``fixed_labels``: label maps (any grid; resampled onto their volume's grid if needed).
    ``fixed_landmarks_lps``/``moving_landmarks_lps``: ``(N, 3)`` LPS mm, same points in the same order.
    ``label_names``: ``{id: name}`` for the metrics.  ``progress`` is called with :class:`ProgressEvent`;
    ``should_stop()`` returning True cancels at the next stage or iteration.

    Stages (each timed, in ``metrics["stages"]``): validation, preprocessing (working grid, HU window, body mask),
    affine (centre of mass + optimisation), network (when ``config.model``), instance optimisation, composition
    (affine + deformable -> one displacement at full resolution), warping, Jacobian, inverse, metrics.
    Inputs are never modified.  Raises :class:`ImageValidationError` for unusable inputs (before heavy work),
    :class:`RegistrationCancelled` when ``should_stop()`` turns True, :class:`ModelError` for a bad model.
    On CUDA out-of-memory the registration is rerun on the CPU, with a warning in ``metrics["warnings"]``.
    """
    kwargs = {
        "moving_labels": moving_labels, "fixed_labels": fixed_labels, "fixed_landmarks_lps": fixed_landmarks_lps,
        "moving_landmarks_lps": moving_landmarks_lps, "label_names": label_names, "progress": progress,
        "should_stop": should_stop,
    }
    # freed tensors stay in the heap for reuse during the run (allocator.py: ~40 % less time in the network stage)
    with reuse_freed_memory():
        try:
            return _register_pair_on_device(fixed, moving, config=config, **kwargs)
        except torch.cuda.OutOfMemoryError:
            if resolve_device(config.device).type != "cuda":
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            result = _register_pair_on_device(fixed, moving, config=config.replace(device="cpu"), **kwargs)
            result.metrics["warnings"].append("CUDA ran out of memory; the registration was rerun on the CPU.")
            return result


def _register_pair_on_device(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    config: RegistrationConfig = _DEFAULT_CONFIG,
    moving_labels: sitk.Image | None = None,
    fixed_labels: sitk.Image | None = None,
    fixed_landmarks_lps: np.ndarray | None = None,
    moving_landmarks_lps: np.ndarray | None = None,
    label_names: dict[int, str] | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> RegistrationResult:
    """One run of the pipeline on ``config.device`` (see :func:`register_pair`)."""
    t_total = time.perf_counter()
    stages = _Stages(progress, should_stop)
    warnings: list[str] = []
    label_names = {int(k): str(v) for k, v in (label_names or {}).items()}

    with stages("validation", "checking inputs"):
        validate_image(fixed, "fixed image")
        validate_image(moving, "moving image")
        fixed_grid = Grid.from_image(fixed)
        moving_grid = Grid.from_image(moving)
        if fixed_labels is not None:
            fixed_labels = _labels_on_grid(fixed_labels, fixed, "fixed segmentation", warnings)
        if moving_labels is not None:
            moving_labels = _labels_on_grid(moving_labels, moving, "moving segmentation", warnings)
        if (fixed_landmarks_lps is None) != (moving_landmarks_lps is None):
            raise ImageValidationError("landmarks need both a fixed and a moving list (same points, same order).")
        if fixed_landmarks_lps is not None:
            fixed_landmarks_lps = _check_landmarks(fixed_landmarks_lps, "fixed landmarks", fixed_grid)
            moving_landmarks_lps = _check_landmarks(moving_landmarks_lps, "moving landmarks", moving_grid)
            if len(fixed_landmarks_lps) != len(moving_landmarks_lps):
                raise ImageValidationError(
                    f"fixed and moving landmark lists differ in length ({len(fixed_landmarks_lps)} vs "
                    f"{len(moving_landmarks_lps)}); they must list the same points in the same order."
                )
        overlap = physical_overlap_fraction(fixed_grid, moving_grid)
        if overlap <= 0.0 and not config.affine:
            raise ImageValidationError(
                "fixed and moving images do not overlap in physical space and affine pre-alignment is off; "
                "turn affine on, or check the images' orientation/origin (e.g. a wrong header)."
            )
        for role, image in (("fixed", fixed), ("moving", moving)):
            is_ct, why = looks_like_ct(image)
            if not is_ct:
                warnings.append(f"{role} image: {why}")
        device = resolve_device(config.device)
        seed_everything(config.seed)
        if config.threads:
            torch.set_num_threads(int(config.threads))

    network = None
    card = None
    network_bf16 = network_uses_bfloat16(config.network_precision, device)
    hu_window = config.hu_window
    if config.model:
        network, card = load_model(config.model, device)

    with stages("preprocessing", "resampling to the working grid, HU window, body mask"):
        # the instance optimisation always uses the configured HU window; the network uses its card's
        w_fixed_grid = make_working_grid(fixed, config.working_spacing_mm, config.max_working_voxels)
        w_moving_grid = make_working_grid(moving, w_fixed_grid.spacing[0])
        w_fixed = prepare_working_image(fixed, w_fixed_grid, hu_window, config.body_mask)
        w_moving = prepare_working_image(moving, w_moving_grid, hu_window, config.body_mask)
        if config.body_mask and (w_fixed.mask.sum() == 0 or w_moving.mask.sum() == 0):
            raise ImageValidationError(
                "no body found (nothing above -400 HU) in the "
                + ("fixed" if w_fixed.mask.sum() == 0 else "moving")
                + " image; is it a CT in HU? Turn body masking off for other images."
            )

    with stages("affine", "affine pre-alignment"):
        affine = optimise_affine(
            w_fixed_grid, w_fixed.intensity, w_moving_grid, w_moving.intensity,
            levels_mm=tuple(config.affine_levels_mm), iterations=config.affine_iterations, device=device,
            optimise=config.affine, fixed_field_of_view=w_fixed.field_of_view,
            moving_field_of_view=w_moving.field_of_view,
            callback=stages.iteration_callback("affine", "affine"),
        ) if (config.affine or overlap <= 0.0) else sitk.AffineTransform(3)
        # the moving body, moved: its mask is resampled, not computed a third time
        moved = prepare_working_image(moving, w_fixed_grid, hu_window, config.body_mask, transform=affine,
                                      body_mask_of=w_moving)

    fixed_t = torch.as_tensor(w_fixed.intensity, device=device)[None, None]
    moving_t = torch.as_tensor(moved.intensity, device=device)[None, None]
    # similarity where both images have data: the fixed body inside the (affinely mapped) moving field of view
    mask_t = torch.as_tensor(w_fixed.mask & moved.field_of_view, device=device)[None, None]
    body_t = torch.as_tensor(w_fixed.mask, device=device)[None, None]
    disp = torch.zeros(1, 3, *fixed_t.shape[2:], device=device)

    if network is not None:
        with stages("network", f"network {card.name}"):
            disp = network_displacement(network, card, fixed, moving, affine, w_fixed_grid, config, device,
                                         bf16=network_bf16)

    io_settings = InstanceOptimisationSettings(
        levels=tuple(config.io_levels), iterations=config.io_iterations,
        fine_iterations=config.io_fine_iterations, learning_rate=config.io_learning_rate,
        control_spacing=config.io_control_spacing, ncc_window=config.io_ncc_window,
        smoothness_weight=config.io_smoothness_weight, jacobian_weight=config.io_jacobian_weight,
    )
    folding_retry = None
    if config.io_iterations > 0 and config.io_levels:
        initial = disp
        with stages("instance_optimisation", "instance optimisation"):
            callback = stages.iteration_callback("instance_optimisation", "instance optimisation")
            disp = instance_optimise(fixed_t, moving_t, initial, mask_t, io_settings, callback=callback)
            folding = _folding_percent(disp, body_t)
            if folding > config.folding_limit_percent:
                stronger = dataclasses.replace(
                    io_settings, smoothness_weight=io_settings.smoothness_weight * 4,
                    jacobian_weight=max(io_settings.jacobian_weight, 0.1) * 4,
                )
                disp = instance_optimise(fixed_t, moving_t, initial, mask_t, stronger,
                                         callback=stages.iteration_callback("instance_optimisation", "retry"))
                folding_retry = {
                    "folding_percent_first": folding,
                    "folding_percent_retry": _folding_percent(disp, body_t),
                }
                warnings.append(
                    f"folding {folding:.2f}% exceeded {config.folding_limit_percent}%: instance optimisation was "
                    f"rerun with 4x regularisation (now {folding_retry['folding_percent_retry']:.2f}%)."
                )

    with stages("composition", "composing affine and deformable fields at full resolution"):
        deformable_mm = disp_vox_to_mm_lps(disp, w_fixed_grid)
        # x -> affine(x + u(x)); the ITK composite is kept for the landmarks
        transform = sitk.CompositeTransform([affine, _field_transform(deformable_mm, w_fixed_grid)])
        displacement = affine_field_displacement(fixed_grid, deformable_mm, w_fixed_grid, after=affine, device=device)
        working_displacement = affine_field_displacement(w_fixed_grid, deformable_mm, w_fixed_grid, after=affine,
                                                         device=device)

    with stages("warping", "warping the moving image and labels"):
        air = float(min(-1024.0, float(sitk.GetArrayViewFromImage(moving).min())))
        warped = warp_image(moving, displacement, default_value=air, device=device)
        warped_labels = None
        if moving_labels is not None:
            warped_labels = warp_image(moving_labels, displacement, default_value=0, interpolator="nearest",
                                       device=device)

    with stages("jacobian", "Jacobian determinant and displacement magnitude"):
        jacobian = jacobian_determinant(displacement, device=device)
        magnitude = displacement_magnitude(displacement)
        body_full = resample_image(
            w_fixed_grid.image_from_array(w_fixed.mask.astype(np.uint8)), fixed, interpolator="nearest"
        )
        body_zyx = sitk.GetArrayViewFromImage(body_full).astype(bool)

    inverse_displacement = None
    warped_moving_landmarks = None
    inverse_stats: dict = {}
    if config.compute_inverse:
        with stages("inverse", "inverse field (moving -> fixed)"):
            # coarse-to-fine fixed point, each voxel until it moves by < 0.01 voxel (~0.03 mm): the same consistency
            # statistics as 30 full-resolution iterations, ~6x faster (the last iterations touch only the few voxels
            # still moving, so up to 10 cost little)
            inverse_vox = spatial.invert_displacement(disp, tolerance=1e-2, coarse_factor=2, fine_iterations=10)
            ic = spatial.compose(inverse_vox, disp)  # x -> x + v(x) + v_inv(x + v(x)); zero for an exact inverse
            ic_mm = np.linalg.norm(disp_vox_to_mm_lps(ic, w_fixed_grid), axis=-1)[w_fixed.mask]
            inverse_stats = {
                "inverse_consistency_mean_mm": float(ic_mm.mean()) if ic_mm.size else 0.0,
                "inverse_consistency_p95_mm": float(np.percentile(ic_mm, 95)) if ic_mm.size else 0.0,
                "inverse_consistency_max_mm": float(ic_mm.max()) if ic_mm.size else 0.0,
            }
            # y -> q + v(q), q = affine^-1(y).  A moving image much finer than the working grid (clinical CT):
            # as affine^-1(y + u(y)) with u solved on a working grid with the moving image's axes, then separable
            # interpolation (512 x 512 x 400, one thread: 10 -> ~2 s).  Otherwise one trilinear sample of v per
            # moving voxel costs less than that second solve.
            if np.prod(moving_grid.size) > _SEPARABLE_INVERSE_RATIO * np.prod(w_moving_grid.size):
                inverse_grid, before, after = w_moving_grid, None, affine.GetInverse()
                inverse_u = inverse_field_on_grid(disp, inverse_vox, w_fixed_grid, affine, inverse_grid)
            else:
                inverse_grid, before, after = w_fixed_grid, affine.GetInverse(), None
                inverse_u = disp_vox_to_mm_lps(inverse_vox, w_fixed_grid)
            inverse_displacement = affine_field_displacement(moving_grid, inverse_u, inverse_grid, before=before,
                                                             after=after, device=device)
            if moving_landmarks_lps is not None:
                field = _field_transform(np.asarray(torch.as_tensor(inverse_u).cpu()), inverse_grid)
                parts = [affine.GetInverse(), field] if after is not None else [field, affine.GetInverse()]
                inverse_transform = sitk.CompositeTransform(parts)
                warped_moving_landmarks = np.array(
                    [inverse_transform.TransformPoint([float(c) for c in p]) for p in moving_landmarks_lps]
                )

    with stages("metrics", "metrics"):
        jac_zyx = sitk.GetArrayViewFromImage(jacobian)
        metrics: dict = {
            "device": str(device),
            "model": {"name": card.name if card else None, "sha256": card.sha256 if card else None,
                      "precision": ("bf16" if network_bf16 else "fp32") if card else None},
            "config": _config_as_dict(config),
            "working_grid": {"size": list(w_fixed_grid.size), "spacing_mm": w_fixed_grid.spacing[0]},
            "affine_fixed_to_moving": {
                "matrix": list(affine.GetMatrix()), "translation_mm": list(affine.GetTranslation()),
                "center_mm": list(affine.GetCenter()),
            },
            "jacobian": jacobian_statistics(jac_zyx, body_zyx),
            "displacement": displacement_statistics(displacement, body_zyx, magnitude=magnitude),
            "inverse": inverse_stats,
            "warnings": warnings,
        }
        if folding_retry:
            metrics["folding_retry"] = folding_retry
        metrics["folding_percent"] = metrics["jacobian"]["folding_percent"]
        metrics["sdlogj"] = metrics["jacobian"]["sdlogj"]
        if fixed_labels is not None and moving_labels is not None:
            before = resample_image(moving_labels, fixed, None, "nearest", default_value=0)
            after_affine = resample_image(moving_labels, fixed, affine, "nearest", default_value=0)
            metrics["labels"] = {
                "before": label_overlap_report(fixed_labels, before, label_names),
                "affine": label_overlap_report(fixed_labels, after_affine, label_names),
                "after": label_overlap_report(fixed_labels, warped_labels, label_names),
            }
            metrics["dice_mean_before"] = metrics["labels"]["before"]["dice_mean"]
            metrics["dice_mean_affine"] = metrics["labels"]["affine"]["dice_mean"]
            metrics["dice_mean_after"] = metrics["labels"]["after"]["dice_mean"]
        if fixed_landmarks_lps is not None:
            mapped = np.array([transform.TransformPoint([float(c) for c in p]) for p in fixed_landmarks_lps])
            metrics["landmarks"] = {
                "count": len(fixed_landmarks_lps),
                "before": landmark_errors(fixed_landmarks_lps, moving_landmarks_lps),
                "after": landmark_errors(mapped, moving_landmarks_lps),
            }
            metrics["tre_mean_before_mm"] = metrics["landmarks"]["before"]["mean"]
            metrics["tre_mean_after_mm"] = metrics["landmarks"]["after"]["mean"]

    stages.seconds["total"] = time.perf_counter() - t_total
    metrics["stages"] = {k: round(v, 3) for k, v in stages.seconds.items()}
    metrics["runtime_s"] = round(stages.seconds["total"], 3)
    if progress is not None:
        progress(ProgressEvent("finished", 1.0, f"done in {metrics['runtime_s']:.1f} s"))

    return RegistrationResult(
        warped_image=warped,
        displacement_lps=displacement,
        jacobian=jacobian,
        displacement_magnitude=magnitude,
        metrics=metrics,
        affine_fixed_to_moving=affine,
        body_mask=sitk.Cast(body_full, sitk.sitkUInt8),
        warped_labels=warped_labels,
        inverse_displacement_lps=inverse_displacement,
        warped_moving_landmarks_lps=warped_moving_landmarks,
        working_displacement_lps=working_displacement,
        extras={"transform": transform, "working_grid": w_fixed_grid},
    )




def _folding_percent(disp: torch.Tensor, mask: torch.Tensor) -> float:
    with torch.no_grad():
        det = spatial.jacobian_determinant(disp)
        inside = mask[:, 0].bool()
        count = int(inside.sum())
        return 100.0 * float(((det <= 0) & inside).sum()) / max(count, 1)


def _config_as_dict(config: RegistrationConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
