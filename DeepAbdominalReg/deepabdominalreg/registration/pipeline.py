"""The registration pipeline: validation -> preprocessing -> affine -> network -> instance optimisation -> outputs.

``register_pair`` is the one entry point used by the CLI, the Slicer module and the benchmarks.  It validates the
inputs once, then runs one stage function after another over a :class:`_Run` (what the stages pass along); on CUDA
out-of-memory it runs them again on the CPU.  Every stage takes its settings from the :class:`RegistrationConfig`.
"""


from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from deepabdominalreg import spatial
from deepabdominalreg.config import BODY_THRESHOLD_HU, OUTSIDE_FOV_HU, RegistrationConfig
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
from deepabdominalreg.nn.losses import strain_energy
from deepabdominalreg.nn.models import ModelCard, load_model
from deepabdominalreg.registration.affine import AffineSettings, optimise_affine
from deepabdominalreg.registration.checks import judge, measure
from deepabdominalreg.registration.discrete import discrete_search
from deepabdominalreg.registration.fields import affine_field_displacement, inverse_field_on_grid, warp_image
from deepabdominalreg.registration.initialisation import OffsetSearchResult, OffsetSearchSettings, search_offset
from deepabdominalreg.registration.instance_optimisation import InstanceOptimisationSettings, instance_optimise
from deepabdominalreg.registration.network import network_displacement
from deepabdominalreg.registration.preprocessing import WorkingImage, looks_like_ct, prepare_working_image
from deepabdominalreg.spatial import disp_vox_to_mm_lps
from deepabdominalreg.transforms import forward_transform, inverse_transform, map_points


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

    ``transform``: fixed -> moving as an ITK composite, ``x -> affine(x + u(x))`` with ``u`` on the working grid
    (what ``transform.h5`` holds; :mod:`deepabdominalreg.transforms`); ``inverse_transform``: moving -> fixed
    (``None`` with ``compute_inverse=False``).
    ``displacement_lps``: the transform sampled at every fixed voxel, ``sitkVectorFloat32``, mm, LPS; maps a fixed
    point ``x`` to the moving point ``x + d(x)`` (the ITK/Slicer displacement-field convention:
    ``sitk.DisplacementFieldTransform`` of it resamples moving onto fixed).
    ``jacobian`` and ``displacement_magnitude``: ``det J`` and ``|d|`` (mm) of the transform on the **working grid**,
    where its displacement lives and where ``metrics`` computes their statistics; on the fixed grid:
    :meth:`jacobian_full_size`, :meth:`displacement_magnitude_full_size`.
    ``body_mask`` (fixed grid) and ``inverse_displacement_lps`` (the inverse's field, same convention from moving to
    fixed, on the **moving** grid) are computed on first use, from ``body_mask_working`` and ``inverse_transform``.
    """

    warped_image: sitk.Image
    displacement_lps: sitk.Image
    jacobian: sitk.Image
    displacement_magnitude: sitk.Image
    metrics: dict
    affine_fixed_to_moving: sitk.AffineTransform
    config: RegistrationConfig
    """The settings of the run (``metrics["config"]`` is their :meth:`RegistrationConfig.to_dict`)."""
    warped_labels: sitk.Image | None = None
    warped_moving_landmarks_lps: np.ndarray | None = None
    transform: sitk.CompositeTransform | None = None
    inverse_transform: sitk.CompositeTransform | None = None
    body_mask_working: sitk.Image | None = None
    """The fixed body mask (uint8) on the working grid."""
    moving_grid: Grid | None = None
    device: str = "cpu"
    """Where the full-size fields computed on first use are computed."""
    _computed: dict = field(default_factory=dict, repr=False, compare=False)

    def _once(self, name: str, make: Callable[[], sitk.Image | None]) -> sitk.Image | None:
        if name not in self._computed:
            self._computed[name] = make()
        return self._computed[name]

    @property
    def body_mask(self) -> sitk.Image | None:
        """The fixed body mask (uint8) on the fixed grid (nearest neighbour from the working grid's)."""
        if self.body_mask_working is None:
            return None
        return self._once("body_mask", lambda: sitk.Cast(resample_image(
            self.body_mask_working, self.displacement_lps, interpolator="nearest"), sitk.sitkUInt8))

    @property
    def inverse_displacement_lps(self) -> sitk.Image | None:
        """The inverse transform sampled at every voxel of the moving grid (``sitkVectorFloat32``, LPS mm)."""
        if self.inverse_transform is None or self.moving_grid is None:
            return None
        from deepabdominalreg.transforms import dense_displacement

        return self._once("inverse_displacement",
                          lambda: dense_displacement(self.inverse_transform, self.moving_grid, self.device))

    def jacobian_full_size(self) -> sitk.Image:
        """``det J`` of ``displacement_lps`` on the fixed grid (``sitkFloat32``)."""
        return self._once("jacobian", lambda: jacobian_determinant(self.displacement_lps, device=self.device))

    def displacement_magnitude_full_size(self) -> sitk.Image:
        """``|d|`` (mm) of ``displacement_lps`` on the fixed grid (``sitkFloat32``)."""
        return self._once("magnitude", lambda: displacement_magnitude(self.displacement_lps))


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
        "discrete_search": 0.10,
        "instance_optimisation": 0.40,
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
        self.started = time.perf_counter()
        self._done = 0.0
        self._reported = 0.0
        self._current: str | None = None
        self._start = 0.0

    def restart_after(self, stage: str) -> None:
        """Forget every stage after ``stage`` (its time and progress), to run them again (the CPU fallback)."""
        names = list(self.WEIGHTS)
        kept = set(names[: names.index(stage) + 1])
        self.seconds = {k: v for k, v in self.seconds.items() if k in kept}
        self._done = sum(self.WEIGHTS[k] for k in kept if k in self.seconds)

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise RegistrationCancelled("registration cancelled by the user")

    def emit(self, stage: str, within: float, message: str) -> None:
        if self.progress is not None:
            fraction = self._done + self.WEIGHTS.get(stage, 0.0) * min(max(within, 0.0), 1.0)
            # a rerun (the folding retry, the CPU fallback) counts its iterations from 0 again: the bar never goes back
            self._reported = max(self._reported, min(fraction, 1.0))
            self.progress(ProgressEvent(stage, self._reported, message))

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


def _mask_on_grid(mask: sitk.Image, reference: sitk.Image, role: str, warnings: list[str]) -> sitk.Image:
    """A user mask (non-zero voxels) as uint8 0/1 on ``reference``'s grid; refused when empty."""
    mask = _labels_on_grid(mask, reference, role, warnings)
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise ImageValidationError(f"the {role} is empty (no non-zero voxel inside its volume's extent); check that "
                                   "it belongs to this image, or leave it out.")
    return mask


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
when the moving image has more than this many times that grid's voxels: at a ratio near 1 (the benchmark's 3 mm CT)
the direct trilinear path is cheaper than the second solve; at clinical size (ratio ~76 for 512 x 512 x 400 at
3 mm) the second solve is much cheaper (``benchmarks/README.md``, "Performance history")."""


def _field_transform(field_mm_zyx3: np.ndarray, grid: Grid) -> sitk.DisplacementFieldTransform:
    """The transform ``x -> x + u(x)`` of a ``(D, H, W, 3)`` LPS mm field on ``grid``.  The image is made here, so
    the transform may take over its buffer (``geometry.displacement_transform`` copies a caller's field)."""
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
    exclude_mask: sitk.Image | None = None,
    moving_exclude_mask: sitk.Image | None = None,
    rigid_mask: sitk.Image | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (CT in HU); everything returned lives on the fixed grid.

    ``moving_labels``/``fixed_labels``: label maps (any grid; resampled onto their volume's grid if needed).
    ``fixed_landmarks_lps``/``moving_landmarks_lps``: ``(N, 3)`` LPS mm, same points in the same order.
    ``label_names``: ``{id: name}`` for the metrics.  User masks (any grid; non-zero voxels count; resampled onto
    their volume's grid if needed): ``exclude_mask`` (fixed) and ``moving_exclude_mask`` (moving, mapped by the
    affine) are left out of the deformable stages' similarity (a lesion present in one scan only, an artefact);
    ``rigid_mask`` (fixed) is a region kept rigid (a tumour, a bone: ``config.io_rigidity_weight``).
    ``progress`` is called with :class:`ProgressEvent`;
    ``should_stop()`` returning True cancels at the next stage or iteration.

    Stages (each timed, in ``metrics["stages"]``): validation, preprocessing (working grid, HU window, body mask),
    affine (centre of mass + optimisation), network (when ``config.model``), instance optimisation, composition
    (affine + deformable -> one displacement at full resolution), warping, Jacobian, inverse, metrics.
    Inputs are never modified.  Raises :class:`ImageValidationError` for unusable inputs (before heavy work),
    :class:`RegistrationCancelled` when ``should_stop()`` turns True, :class:`ModelError` for a bad model.
    On CUDA out-of-memory the registration is rerun on the CPU, with a warning in ``metrics["warnings"]``.
    """
    stages = _Stages(progress, should_stop)
    with stages("validation", "checking inputs"):
        inputs = _validated_inputs(fixed, moving, config, moving_labels=moving_labels, fixed_labels=fixed_labels,
                                   fixed_landmarks_lps=fixed_landmarks_lps, moving_landmarks_lps=moving_landmarks_lps,
                                   label_names=label_names, exclude_mask=exclude_mask,
                                   moving_exclude_mask=moving_exclude_mask, rigid_mask=rigid_mask)
    # freed tensors stay in the heap for reuse during the run: each large temporary would otherwise be a fresh
    # mmap, page-faulted and zero-filled by the kernel (device.reuse_freed_memory)
    with reuse_freed_memory():
        try:
            return _run_stages(inputs, config, stages)
        except torch.cuda.OutOfMemoryError:
            if resolve_device(config.device).type != "cuda":
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            stages.restart_after("validation")
            result = _run_stages(inputs, config.replace(device="cpu"), stages)
            result.metrics["warnings"].append("CUDA ran out of memory; the registration was rerun on the CPU.")
            return result


@dataclass
class _Inputs:
    """The validated inputs of one registration: label maps on their volume's grid, landmarks ``(N, 3)`` LPS mm."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_grid: Grid
    moving_grid: Grid
    fixed_labels: sitk.Image | None
    moving_labels: sitk.Image | None
    fixed_landmarks_lps: np.ndarray | None
    moving_landmarks_lps: np.ndarray | None
    label_names: dict[int, str]
    warnings: list[str]
    """What validation found worth saying (labels resampled, images that do not look like CT)."""
    exclude_mask: sitk.Image | None = None
    """User masks (uint8, 0/1) on their volume's grid: ``exclude_mask`` and ``rigid_mask`` on the fixed one."""
    moving_exclude_mask: sitk.Image | None = None
    rigid_mask: sitk.Image | None = None


def _validated_inputs(
    fixed: sitk.Image,
    moving: sitk.Image,
    config: RegistrationConfig,
    *,
    moving_labels: sitk.Image | None,
    fixed_labels: sitk.Image | None,
    fixed_landmarks_lps: np.ndarray | None,
    moving_landmarks_lps: np.ndarray | None,
    label_names: dict[int, str] | None,
    exclude_mask: sitk.Image | None = None,
    moving_exclude_mask: sitk.Image | None = None,
    rigid_mask: sitk.Image | None = None,
) -> _Inputs:
    """Check every input once (clear :class:`ImageValidationError` before any heavy work)."""
    warnings: list[str] = []
    validate_image(fixed, "fixed image")
    validate_image(moving, "moving image")
    masks = {
        name: None if mask is None else _mask_on_grid(mask, reference, role, warnings)
        for name, mask, reference, role in (("exclude_mask", exclude_mask, fixed, "exclusion mask"),
                                            ("moving_exclude_mask", moving_exclude_mask, moving,
                                             "moving exclusion mask"),
                                            ("rigid_mask", rigid_mask, fixed, "rigid mask"))
    }
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
    if not config.affine and physical_overlap_fraction(fixed_grid, moving_grid) <= 0.0:
        raise ImageValidationError(
            "fixed and moving images do not overlap in physical space and affine pre-alignment is off; "
            "turn affine on, or check the images' orientation/origin (e.g. a wrong header)."
        )
    for role, image in (("fixed", fixed), ("moving", moving)):
        is_ct, why = looks_like_ct(image)
        if not is_ct:
            warnings.append(f"{role} image: {why}")
    return _Inputs(
        fixed=fixed, moving=moving, fixed_grid=fixed_grid, moving_grid=moving_grid, fixed_labels=fixed_labels,
        moving_labels=moving_labels, fixed_landmarks_lps=fixed_landmarks_lps,
        moving_landmarks_lps=moving_landmarks_lps,
        label_names={int(k): str(v) for k, v in (label_names or {}).items()}, warnings=warnings, **masks,
    )


@dataclass
class _Run:
    """What the stages of one run on one device pass along; each stage fills in its part."""

    inputs: _Inputs
    config: RegistrationConfig
    stages: _Stages
    device: torch.device
    warnings: list[str]
    network: torch.nn.Module | None = None
    card: ModelCard | None = None
    network_bf16: bool = False
    # preprocessing: both images on their working grids (the fixed one's grid is where the registration runs)
    w_fixed: WorkingImage | None = None
    w_moving: WorkingImage | None = None
    # affine: fixed -> moving, and the moving image through it on the fixed working grid
    affine: sitk.AffineTransform | None = None
    offset_search: OffsetSearchResult | None = None
    moved: WorkingImage | None = None
    # the similarity's inputs on the fixed working grid (from _io_tensors)
    io_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # deformable stages: displacement on the fixed working grid, working-grid voxels (1, 3, D, H, W)
    disp: torch.Tensor | None = None
    folding_retry: dict | None = None
    # user masks on the fixed working grid (bool, (D, H, W)): left out of the similarity / kept rigid
    exclude_working: np.ndarray | None = None
    rigid_working: np.ndarray | None = None
    deformable_mm: np.ndarray | None = None
    """The deformable field on the working grid, ``(D, H, W, 3)`` LPS mm (the landmarks are mapped through it)."""
    # the transform (fixed -> moving) and its inverse as ITK composites of the working-grid fields
    transform: sitk.CompositeTransform | None = None
    inverse_transform: sitk.CompositeTransform | None = None
    # full resolution, on the fixed image's grid
    displacement: sitk.Image | None = None
    warped: sitk.Image | None = None
    warped_labels: sitk.Image | None = None
    # on the working grid: the transform's Jacobian, |displacement| and the fixed body mask (for the metrics)
    jacobian: sitk.Image | None = None
    magnitude: sitk.Image | None = None
    body_mask: sitk.Image | None = None
    warped_moving_landmarks_lps: np.ndarray | None = None
    inverse_stats: dict = field(default_factory=dict)

    @property
    def working_grid(self) -> Grid:
        return self.w_fixed.grid


def _run_stages(inputs: _Inputs, config: RegistrationConfig, stages: _Stages) -> RegistrationResult:
    """One run of the pipeline on ``config.device``, after validation (see :func:`register_pair`)."""
    run = _start(inputs, config, stages)
    _preprocess(run)
    _align_affine(run)
    _predict_network(run)
    _search_discrete(run)
    _optimise_instance(run)
    _compose(run)
    _warp(run)
    _jacobian_and_magnitude(run)
    if config.compute_inverse:
        _invert(run)
    with stages("metrics", "metrics"):
        metrics = _metrics(run)
    stages.seconds["total"] = time.perf_counter() - stages.started
    metrics["stages"] = {k: round(v, 3) for k, v in stages.seconds.items()}
    metrics["runtime_s"] = round(stages.seconds["total"], 3)
    if stages.progress is not None:
        stages.progress(ProgressEvent("finished", 1.0, f"done in {metrics['runtime_s']:.1f} s"))
    return RegistrationResult(
        warped_image=run.warped,
        displacement_lps=run.displacement,
        jacobian=run.jacobian,
        displacement_magnitude=run.magnitude,
        metrics=metrics,
        affine_fixed_to_moving=run.affine,
        config=config,
        warped_labels=run.warped_labels,
        warped_moving_landmarks_lps=run.warped_moving_landmarks_lps,
        transform=run.transform,
        inverse_transform=run.inverse_transform,
        body_mask_working=run.body_mask,
        moving_grid=run.inputs.moving_grid,
        device=str(run.device),
    )


def _start(inputs: _Inputs, config: RegistrationConfig, stages: _Stages) -> _Run:
    """Device, seeds, threads and the network (when ``config.model``)."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    run = _Run(inputs=inputs, config=config, stages=stages, device=device, warnings=list(inputs.warnings))
    if config.model:
        run.network, run.card = load_model(config.model, device)
        run.network_bf16 = network_uses_bfloat16(config.network_precision, device)
    return run


def _preprocess(run: _Run) -> None:
    config, fixed, moving = run.config, run.inputs.fixed, run.inputs.moving
    with run.stages("preprocessing", "resampling to the working grid, HU window, body mask"):
        # the instance optimisation always uses the configured HU window; the network uses its card's
        w_fixed_grid = make_working_grid(fixed, config.working_spacing_mm, config.max_working_voxels)
        w_moving_grid = make_working_grid(moving, w_fixed_grid.spacing[0])
        run.w_fixed = prepare_working_image(fixed, w_fixed_grid, config.hu_window, config.body_mask)
        run.w_moving = prepare_working_image(moving, w_moving_grid, config.hu_window, config.body_mask)
        if config.body_mask and (run.w_fixed.mask.sum() == 0 or run.w_moving.mask.sum() == 0):
            raise ImageValidationError(
                f"no body found (nothing above {BODY_THRESHOLD_HU:g} HU) in the "
                + ("fixed" if run.w_fixed.mask.sum() == 0 else "moving")
                + " image; is it a CT in HU? Turn body masking off for other images."
            )
        spacing = w_fixed_grid.spacing[0]
        if spacing > config.working_spacing_mm * (1 + 1e-9):
            extent = (np.asarray(run.inputs.fixed_grid.size) - 1) * np.asarray(run.inputs.fixed_grid.spacing)
            run.warnings.append(
                f"the working grid's spacing is {spacing:.3g} mm, not working_spacing_mm = "
                f"{config.working_spacing_mm:g} mm: the fixed image spans {extent.max():.0f} mm, more than "
                f"max_working_voxels = {config.max_working_voxels} voxels at that spacing (raise max_working_voxels "
                "for a finer grid, at more time and memory)."
            )


def _align_affine(run: _Run) -> None:
    config, w_fixed, w_moving = run.config, run.w_fixed, run.w_moving
    with run.stages("affine", "affine pre-alignment"):
        if config.affine:
            start = None
            if config.initial_search:  # the translation searched over every overlap, not the centres of mass
                run.offset_search = search_offset(w_fixed.grid, w_fixed.intensity, w_moving.grid, w_moving.intensity,
                                                  OffsetSearchSettings.from_config(config),
                                                  fixed_field_of_view=w_fixed.field_of_view,
                                                  moving_field_of_view=w_moving.field_of_view)
                start = run.offset_search.translation_mm
            run.affine = optimise_affine(
                w_fixed.grid, w_fixed.intensity, w_moving.grid, w_moving.intensity, AffineSettings.from_config(config),
                device=run.device, fixed_field_of_view=w_fixed.field_of_view,
                moving_field_of_view=w_moving.field_of_view, initial_translation_mm=start,
                callback=run.stages.iteration_callback("affine", "affine"),
            )
        else:
            run.affine = sitk.AffineTransform(3)
        # the moving body, moved: its mask is resampled, not computed a third time
        run.moved = prepare_working_image(run.inputs.moving, w_fixed.grid, config.hu_window, config.body_mask,
                                          transform=run.affine, body_mask_of=w_moving)
        _user_masks_on_working_grid(run)


def _user_masks_on_working_grid(run: _Run) -> None:
    """The user masks on the fixed working grid (the moving exclusion mask through the affine): a working voxel
    belongs to a mask when at least half of it does (the 0/1 mask interpolated linearly).

    The exclusion is grown by the reach of the similarity's neighbourhood (half the NCC window; MIND's patch radius
    plus its neighbour distance): a voxel whose local window sees the excluded region would still be pulled by it
    (a lesion only one scan has).
    """
    inputs, grid = run.inputs, run.working_grid

    def on_working(mask: sitk.Image, transform: sitk.Transform | None = None) -> np.ndarray:
        fraction = resample_image(sitk.Cast(mask, sitk.sitkFloat32), grid, transform=transform)
        return sitk.GetArrayFromImage(fraction) >= 0.5

    exclude = None
    for mask, transform in ((inputs.exclude_mask, None), (inputs.moving_exclude_mask, run.affine)):
        if mask is not None:
            on = on_working(mask, transform)
            exclude = on if exclude is None else exclude | on
    if exclude is not None:
        settings = InstanceOptimisationSettings.from_config(run.config, grid.spacing[0])
        reach = (settings.ncc_window // 2 if settings.similarity == "ncc"
                 else settings.mind_radius + settings.mind_dilation)
        if reach > 0:
            exclude = ndimage.binary_dilation(exclude, structure=np.ones((2 * reach + 1,) * 3, dtype=bool))
    run.exclude_working = exclude
    run.rigid_working = None if inputs.rigid_mask is None else on_working(inputs.rigid_mask)


def _predict_network(run: _Run) -> None:
    """The deformable stages' starting displacement: the network's, else zero."""
    if run.network is None:
        run.disp = torch.zeros(1, 3, *run.w_fixed.intensity.shape, device=run.device)
        return
    with run.stages("network", f"network {run.card.name}"):
        run.disp = network_displacement(run.network, run.card, run.inputs.fixed, run.inputs.moving, run.affine,
                                        run.working_grid, run.config, run.device, bf16=run.network_bf16)


def _io_tensors(run: _Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed and moved working intensities ``(1, 1, D, H, W)`` and the similarity mask: the fixed body inside the
    (affinely mapped) moving field of view, where both images have data, less the user's exclusion masks.  Built
    once per run (the discrete search and the instance optimisation share them)."""
    if run.io_inputs is None:
        run.io_inputs = _build_io_tensors(run)
    return run.io_inputs


def _build_io_tensors(run: _Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = run.device
    fixed_t = torch.as_tensor(run.w_fixed.intensity, device=device)[None, None]
    moving_t = torch.as_tensor(_extended_beyond_field_of_view(run.moved), device=device)[None, None]
    mask = run.w_fixed.mask & run.moved.field_of_view
    if run.exclude_working is not None:
        mask = mask & ~run.exclude_working
    if not mask.any():
        raise ImageValidationError("nothing is left to register: the exclusion masks cover all of the body where "
                                   "both scans have data; exclude a smaller region.")
    mask_t = torch.as_tensor(mask, device=device)[None, None]
    return fixed_t, moving_t, mask_t


def _extended_beyond_field_of_view(image: WorkingImage) -> np.ndarray:
    """``image.intensity`` with every voxel outside its field of view given the value of the nearest voxel inside.

    Where a scan's field of view cuts the body, the moving intensity would drop from tissue to 0 at the cut while
    the fixed scan goes on: every similarity window across the cut would see an edge that only one image has, and
    the optimiser would stretch the tissue next to the cut to move that edge (a rough, wrong field along every cut:
    ``benchmarks/README.md``, "Fields of view that cut the body").  Replicating the edge values removes the false
    edge; the similarity mask still counts only voxels inside the field of view.
    """
    inside = image.field_of_view
    if inside.all() or not inside.any():
        return image.intensity
    nearest = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
    return image.intensity[tuple(nearest)]


def _search_discrete(run: _Run) -> None:
    """The coarse discrete displacement search (``config.discrete_search``) as the instance optimisation's start."""
    config = run.config
    if not config.discrete_search:
        return
    fixed_t, moving_t, mask_t = _io_tensors(run)
    start = run.disp  # zero, or the network's field
    with run.stages("discrete_search", "discrete displacement search"):
        if run.network is not None:  # search what the network left: the moving image under its field
            moving_t = spatial.warp(moving_t, start)
        found = discrete_search(fixed_t, moving_t, mask_t, spacing_mm=tuple(reversed(run.working_grid.spacing)),
                                grid_spacing_mm=config.discrete_grid_spacing_mm,
                                search_radius_mm=config.discrete_search_radius_mm,
                                mind_radius_mm=config.io_mind_radius_mm, mind_dilation_mm=config.io_mind_dilation_mm)
        # moving(x + u(x)) with u the search's field followed by the network's
        run.disp = found if run.network is None else spatial.compose(start, found)


def _optimise_instance(run: _Run) -> None:
    """Instance optimisation from the current displacement, rerun once with stronger regularisation when it folds
    more than ``config.folding_limit_percent``."""
    config, device = run.config, run.device
    if not (config.io_iterations > 0 and config.io_levels):
        return
    settings = InstanceOptimisationSettings.from_config(config, run.working_grid.spacing[0])
    fixed_t, moving_t, mask_t = _io_tensors(run)
    body_t = torch.as_tensor(run.w_fixed.mask, device=device)[None, None]
    rigid_t = None if run.rigid_working is None else torch.as_tensor(run.rigid_working, device=device)[None, None]
    initial = run.disp
    with run.stages("instance_optimisation", "instance optimisation"):
        callback = run.stages.iteration_callback("instance_optimisation", "instance optimisation")
        run.disp = instance_optimise(fixed_t, moving_t, initial, mask_t, settings=settings, callback=callback,
                                     rigid_mask=rigid_t)
        folding = _folding_percent(run.disp, body_t)
        if folding > config.folding_limit_percent:
            factor = config.folding_retry_factor
            run.disp = instance_optimise(fixed_t, moving_t, initial, mask_t, settings=settings.strengthened(factor),
                                         callback=run.stages.iteration_callback("instance_optimisation", "retry"),
                                         rigid_mask=rigid_t)
            run.folding_retry = {
                "folding_percent_first": folding,
                "folding_percent_retry": _folding_percent(run.disp, body_t),
            }
            run.warnings.append(
                f"folding {folding:.2f}% exceeded {config.folding_limit_percent}%: instance optimisation was "
                f"rerun with {factor:g}x regularisation (now {run.folding_retry['folding_percent_retry']:.2f}%)."
            )


def _compose(run: _Run) -> None:
    with run.stages("composition", "composing affine and deformable fields at full resolution"):
        run.deformable_mm = disp_vox_to_mm_lps(run.disp, run.working_grid)
        run.transform = forward_transform(run.affine, run.deformable_mm, run.working_grid)
        run.displacement = affine_field_displacement(run.inputs.fixed_grid, run.deformable_mm, run.working_grid,
                                                     after=run.affine, device=run.device)


def _warp(run: _Run) -> None:
    moving, moving_labels = run.inputs.moving, run.inputs.moving_labels
    with run.stages("warping", "warping the moving image and labels"):
        air = float(min(OUTSIDE_FOV_HU, float(sitk.GetArrayViewFromImage(moving).min())))
        run.warped = warp_image(moving, run.displacement, default_value=air, device=run.device)
        if moving_labels is not None:
            run.warped_labels = warp_image(moving_labels, run.displacement, default_value=0, interpolator="nearest",
                                           device=run.device)


def _jacobian_and_magnitude(run: _Run) -> None:
    with run.stages("jacobian", "Jacobian determinant and displacement magnitude"):
        # on the working grid, where the transform's displacement lives: the same field as the full-resolution one
        # at a fraction of the voxels (a clinical CT has ~20-80x more), and the grid the folding check runs on
        working = affine_field_displacement(run.working_grid, run.deformable_mm, run.working_grid, after=run.affine,
                                            device=run.device)
        run.jacobian = jacobian_determinant(working, device=run.device)
        run.magnitude = displacement_magnitude(working)
        run.body_mask = run.working_grid.image_from_array(run.w_fixed.mask.astype(np.uint8))


def _invert(run: _Run) -> None:
    disp, affine, working_grid = run.disp, run.affine, run.working_grid
    moving_grid, w_moving_grid = run.inputs.moving_grid, run.w_moving.grid
    with run.stages("inverse", "inverse field (moving -> fixed)"):
        # coarse-to-fine fixed point, each voxel until it moves by < 0.01 voxel (~0.03 mm): the same consistency
        # statistics as 30 full-resolution iterations at a fraction of the cost (the last iterations touch only
        # the few voxels still moving, so up to 10 cost little)
        inverse_vox = spatial.invert_displacement(disp, tolerance=1e-2, coarse_factor=2, fine_iterations=10)
        ic = spatial.compose(inverse_vox, disp)  # x -> x + v(x) + v_inv(x + v(x)); zero for an exact inverse
        ic_mm = np.linalg.norm(disp_vox_to_mm_lps(ic, working_grid), axis=-1)[run.w_fixed.mask]
        run.inverse_stats = {
            "inverse_consistency_mean_mm": float(ic_mm.mean()) if ic_mm.size else 0.0,
            "inverse_consistency_p95_mm": float(np.percentile(ic_mm, 95)) if ic_mm.size else 0.0,
            "inverse_consistency_max_mm": float(ic_mm.max()) if ic_mm.size else 0.0,
        }
        # y -> q + v(q), q = affine^-1(y).  A moving image much finer than the working grid (clinical CT):
        # as affine^-1(y + u(y)) with u solved on a working grid with the moving image's axes, so that the
        # full-resolution inverse (RegistrationResult.inverse_displacement_lps, on request) is a separable
        # interpolation.  Otherwise one trilinear sample of v per moving voxel costs less than that second solve.
        if np.prod(moving_grid.size) > _SEPARABLE_INVERSE_RATIO * np.prod(w_moving_grid.size):
            inverse_grid, affine_first = w_moving_grid, False
            inverse_u = inverse_field_on_grid(disp, inverse_vox, working_grid, affine, inverse_grid)
        else:
            inverse_grid, affine_first = working_grid, True
            inverse_u = disp_vox_to_mm_lps(inverse_vox, working_grid)
        run.inverse_transform = inverse_transform(affine, inverse_u, inverse_grid, affine_first=affine_first)
        if run.inputs.moving_landmarks_lps is not None:
            run.warped_moving_landmarks_lps = map_points(run.inverse_transform, run.inputs.moving_landmarks_lps)


def _metrics(run: _Run) -> dict:
    inputs, affine, card = run.inputs, run.affine, run.card
    body_zyx = sitk.GetArrayViewFromImage(run.body_mask).astype(bool)
    jac_zyx = sitk.GetArrayViewFromImage(run.jacobian)
    metrics: dict = {
        "device": str(run.device),
        "model": {"name": card.name if card else None, "sha256": card.sha256 if card else None,
                  "precision": ("bf16" if run.network_bf16 else "fp32") if card else None},
        "config": run.config.to_dict(),
        "working_grid": {"size": list(run.working_grid.size), "spacing_mm": run.working_grid.spacing[0]},
        "affine_fixed_to_moving": {
            "matrix": list(affine.GetMatrix()), "translation_mm": list(affine.GetTranslation()),
            "center_mm": list(affine.GetCenter()),
        },
        "jacobian": jacobian_statistics(jac_zyx, body_zyx),
        "displacement": displacement_statistics(run.displacement, body_zyx, magnitude=run.magnitude),
        "inverse": run.inverse_stats,
        "warnings": run.warnings,
    }
    if run.folding_retry:
        metrics["folding_retry"] = run.folding_retry
    if run.exclude_working is not None or run.rigid_working is not None:
        metrics["user_masks"] = _user_mask_metrics(run)
    metrics["folding_percent"] = metrics["jacobian"]["folding_percent"]
    metrics["sdlogj"] = metrics["jacobian"]["sdlogj"]
    if inputs.fixed_labels is not None and inputs.moving_labels is not None:
        fixed, fixed_labels, moving_labels = inputs.fixed, inputs.fixed_labels, inputs.moving_labels
        before = resample_image(moving_labels, fixed, None, "nearest", default_value=0)
        after_affine = resample_image(moving_labels, fixed, affine, "nearest", default_value=0)
        metrics["labels"] = {
            "before": label_overlap_report(fixed_labels, before, inputs.label_names),
            "affine": label_overlap_report(fixed_labels, after_affine, inputs.label_names),
            "after": label_overlap_report(fixed_labels, run.warped_labels, inputs.label_names),
        }
        metrics["dice_mean_before"] = metrics["labels"]["before"]["dice_mean"]
        metrics["dice_mean_affine"] = metrics["labels"]["affine"]["dice_mean"]
        metrics["dice_mean_after"] = metrics["labels"]["after"]["dice_mean"]
    if inputs.fixed_landmarks_lps is not None:
        fixed_points, moving_points = inputs.fixed_landmarks_lps, inputs.moving_landmarks_lps
        # x -> affine(x + u(x)) through ITK's composite of the working-grid field: the landmarks are mapped exactly,
        # not through the full-resolution field's interpolation
        transform = sitk.CompositeTransform([run.affine, _field_transform(run.deformable_mm, run.working_grid)])
        mapped = np.array([transform.TransformPoint([float(c) for c in p]) for p in fixed_points])
        metrics["landmarks"] = {
            "count": len(fixed_points),
            "before": landmark_errors(fixed_points, moving_points),
            "after": landmark_errors(mapped, moving_points),
        }
        metrics["tre_mean_before_mm"] = metrics["landmarks"]["before"]["mean"]
        metrics["tre_mean_after_mm"] = metrics["landmarks"]["after"]["mean"]
    _plausibility(run, metrics)
    return metrics


def _plausibility(run: _Run, metrics: dict) -> None:
    """``metrics["status"]`` (``"ok"`` or ``"suspect"``), ``metrics["suspect_reasons"]`` and the measured
    ``metrics["checks"]``: the plausibility checks of :mod:`deepabdominalreg.registration.checks`."""
    values = measure(run.w_fixed, run.w_moving, run.moved, run.disp, run.deformable_mm, run.affine,
                     run.config.check_hu_window)
    if run.offset_search is not None:
        values["search_correlation"] = run.offset_search.correlation
        values["search_overlap_fraction"] = run.offset_search.overlap_fraction
        values["search_at_overlap_limit"] = run.offset_search.at_overlap_limit
    status, reasons = judge(values, run.config, folding_percent=metrics["folding_percent"],
                            dice_before=metrics.get("dice_mean_before"), dice_after=metrics.get("dice_mean_after"))
    metrics["checks"] = values
    metrics["status"] = status
    metrics["suspect_reasons"] = reasons


def _user_mask_metrics(run: _Run) -> dict:
    """What the user masks did: the share of the fixed body left out of the similarity, and the rigid region's
    size and residual strain (RMS of ``|sym(grad u)|_F`` of the deformable field on the working grid; 0 = rigid)."""
    report: dict = {}
    body = run.w_fixed.mask
    if run.exclude_working is not None:
        report["excluded_percent_of_body"] = round(100.0 * float((run.exclude_working & body).sum())
                                                   / max(int(body.sum()), 1), 4)
    if run.rigid_working is not None:
        rigid = torch.as_tensor(run.rigid_working, device=run.disp.device)[None, None]
        report["rigid_voxels"] = int(run.rigid_working.sum())
        report["rigid_rms_strain"] = round(float(strain_energy(run.disp, rigid).sqrt()), 6) if rigid.any() else None
    return report


def _folding_percent(disp: torch.Tensor, mask: torch.Tensor) -> float:
    with torch.no_grad():
        det = spatial.jacobian_determinant(disp)
        inside = mask[:, 0].bool()
        count = int(inside.sum())
        return 100.0 * float(((det <= 0) & inside).sum()) / max(count, 1)
