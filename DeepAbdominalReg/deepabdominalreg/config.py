"""Registration parameters, defined once (the Slicer parameter node mirrors these fields)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AIR_HU", "BODY_THRESHOLD_HU", "OUTSIDE_FOV_HU", "PRESETS", "RegistrationConfig", "config_from_preset"]

BODY_THRESHOLD_HU: float = -400.0
"""CT voxels above this (HU) are body candidates: the registration's body mask, the synthetic motion's body and the
report's slice choice.  Between air (-1000) and fat (about -100), so lungs and bowel gas need hole filling."""

AIR_HU: float = -1000.0
"""HU of air (the definition of the scale; real CT reads air at -1000 +- noise): the phantom's air and bowel gas."""

OUTSIDE_FOV_HU: float = -1024.0
"""HU given to points outside a CT's field of view when it is resampled or warped (the lowest value a scanner
stores, below :data:`AIR_HU`), as the registration's preprocessing and the synthetic pairs do."""


@dataclass(frozen=True)
class RegistrationConfig:
    """Every knob of :func:`deepabdominalreg.registration.register_pair`.

    Units: HU for intensities, mm for distances, iterations are counts per level.  This is the one source of every
    stage's settings: each stage builds its own settings object from it (``AffineSettings.from_config``,
    ``InstanceOptimisationSettings.from_config``) and :meth:`to_dict` / :meth:`from_dict` are its one serialisation
    (``metrics.json``, ``deepabdominalreg register --config FILE``, the ``config.json`` of the Slicer module's
    background run).

    Lengths of the instance optimisation (``io_*_mm``) are given in mm at the working resolution and converted once,
    inside the stage, to voxels of the working grid, whose spacing ``s`` is ``working_spacing_mm`` or the coarser
    spacing that ``max_working_voxels`` imposes on a large scan:

    * learning rate: ``io_learning_rate_mm / s`` voxels per step (not rounded);
    * control spacing: ``io_control_spacing_mm / s`` rounded to the nearest whole number of voxels (halves up), at
      least 1;
    * NCC window: ``io_ncc_window_mm / s`` rounded to the nearest odd number of voxels (an even quotient, midway
      between two odd numbers, rounds up), at least 3.

    Every pyramid level (``io_levels``) uses these voxel counts on its own grid, whose voxels are about ``f`` times
    the working voxels at factor ``f`` (exactly ``(n - 1) / (m - 1)`` times along an axis of ``n`` working and ``m``
    level voxels): at level 1 the lengths are the mm given, at level ``f`` about ``f`` times them (the default control
    spacing of 6 mm is ~12 mm at level 2 and ~24 mm at level 4).  At 3 mm the defaults are 0.5, 2 and 5 voxels.
    """

    # preprocessing
    hu_window: tuple[float, float] = (-160.0, 240.0)
    """HU clipping window before scaling to [0, 1] (soft-tissue window: level 40, width 400)."""
    working_spacing_mm: float = 3.0
    """Isotropic spacing of the working grid on which the registration runs (mm)."""
    max_working_voxels: int = 160
    """Cap on the working grid's size along any axis: a scan longer than ``(max_working_voxels - 1) *
    working_spacing_mm`` along an axis gets a coarser working grid (its spacing grows to respect the cap; the
    registration says so in ``metrics["warnings"]``).  The ``io_*_mm`` lengths keep their meaning in mm."""
    body_mask: bool = True
    """Remove the CT table and air outside the patient (van Eijnatten et al. 2021)."""

    # affine pre-alignment
    affine: bool = True
    affine_iterations: int = 20
    """L-BFGS iterations per affine pyramid level (it usually converges earlier; more iterations hardly change the
    affine, and the deformable stages absorb what is left)."""
    affine_levels_mm: tuple[float, ...] = (12.0, 6.0)
    """Isotropic spacing (mm) of the affine pyramid levels, coarse to fine.  Precision is about a tenth of the
    finest level (the deformable stages absorb the rest); a finer level is more precise and slower."""
    affine_max_scale: float = 1.5
    """Bound on each of the affine's three scale factors: within ``[1 / affine_max_scale, affine_max_scale]``
    (the linear part is ``R exp(S)``: a rotation and a symmetric log-stretch whose diagonal holds the log-scales;
    its determinant is the product of the scales, so it never reflects or collapses).  A scale of 1.5 is 3.4 times
    the volume; a larger value lets an inter-patient pair of very different sizes scale further."""
    affine_max_shear: float = 0.3
    """Bound on each of the affine's three shears (the off-diagonal entries of ``S``, dimensionless).  With the
    scale bound, the principal stretches lie within ``exp(+-(ln affine_max_scale + 2 affine_max_shear))``.  0 allows
    none."""
    initial_search: bool = True
    """Before the affine, search the translation between the scans exhaustively on a coarse lattice (masked NCC by
    FFT over the overlap of the two fields of view: ``registration/initialisation.py``) instead of starting from the
    centres of mass: origins hundreds of mm apart and scans covering different parts of the body.  On by default:
    on the trust benchmark it raised inter-patient organ Dice from 0.34 to 0.54 at no cost within one patient
    (``benchmarks/README.md``, "Trust benchmark")."""
    initial_search_spacing_mm: float = 8.0
    """Lattice spacing (mm) of the translation search (and of the images it compares); the affine refines it."""
    initial_search_range_mm: float = 300.0
    """Largest distance (mm, along each of the fixed image's axes) of a searched translation from the
    centre-of-mass translation."""
    initial_search_min_overlap: float = 0.3
    """Smallest overlap of the two fields of view for a translation to count, as a fraction (0..1] of the smaller
    field of view's volume."""

    # deformable stage 1: network
    model: str | None = None
    """Name of a shipped model or path to a ``.pt`` checkpoint; ``None`` skips the network stage."""
    network_precision: str = "auto"
    """``auto``, ``fp32`` or ``bf16``: the network's forward pass in bfloat16 autocast (the output field stays
    float32).  ``bf16``: wherever the device computes bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX); ``auto``:
    only where bf16 is faster for the shipped network, i.e. such CPUs and not CUDA (``device.network_uses_bfloat16``;
    ``benchmarks/network_speed.py`` and ``benchmarks/gpu_speed.py`` measure it); ``fp32``: never."""

    # deformable stage 2: discrete search (optional start of the instance optimisation)
    discrete_search: bool = False
    """Before the instance optimisation, search a coarse displacement field discretely (MIND-SSC cost volume over
    whole-cell offsets with a smoothness coupling and a symmetric pass: ConvexAdam's convex step,
    ``registration/discrete.py``) and start from it: motion beyond the continuous optimiser's basin.  With a
    ``model``, the search runs on the moving image warped by the network's field and refines it."""
    discrete_grid_spacing_mm: float = 6.0
    """Cell size of the discrete search's coarse grid (mm, rounded to working voxels per axis)."""
    discrete_search_radius_mm: float = 24.0
    """Largest displacement the discrete search tries along each axis (mm, rounded to whole cells); its cost volume
    grows with the cube of this."""

    # deformable stage 3: instance optimisation
    io_iterations: int = 60
    """Adam iterations at each coarse instance-optimisation level (0 disables the stage; early stopping usually ends
    a coarse level before 60)."""
    io_fine_iterations: int = 25
    """Adam iterations at the full working resolution (level factor 1), the most expensive level: most of the
    stage's time in the balanced preset."""
    io_levels: tuple[int, ...] = (4, 2, 1)
    """Pyramid levels as downsampling factors of the working grid, coarse to fine."""
    io_learning_rate_mm: float = 1.5
    """Adam learning rate of the control-point displacements, in mm per step at the working resolution (0.5 voxel at
    3 mm; see "Lengths of the instance optimisation" above)."""
    io_control_spacing_mm: float = 6.0
    """Spacing of the displacement control grid (smoothness by construction), in mm at the working resolution
    (2 voxels at 3 mm)."""
    io_ncc_window_mm: float = 15.0
    """Width of the local NCC window, in mm at the working resolution (5 voxels at 3 mm)."""
    io_ncc_noise_hu: float = 70.0
    """Intensity noise floor of the local NCC, in HU: its variance regulariser is ``(io_ncc_noise_hu / width)²``
    in the [0, 1] units of the windowed images (``width`` the span of ``hu_window``; 0.031 at 400 HU), so a window
    whose standard deviation is well below this many HU (fat, a homogeneous organ's noise) counts little and the
    optimiser does not fit the noise.  70 HU: the best Dice and field error of 1e-5..1e-1 (about 1.3-130 HU) on the
    real CT at 10 and 20 mm and the phantom, with the lowest SDlogJ but one (``benchmarks/README.md``, "Issue 17")."""
    io_gradient_floor_mm: float = 0.3
    """Gradient floor of the optimiser, as a misalignment in mm at the working resolution (the same voxel count at
    every level): Adam's ``eps`` is the RMS change of the objective's gradient (similarity and regularisers) that a
    random displacement of this size causes, so gradients far below what such a misalignment gives (float rounding,
    noise) are not turned into full steps.  0.3 mm (0.1 voxel at 3 mm): an image registered to itself stays exactly
    in place (0.14 mm on average, 1 mm at most, with 0), and the best field error of 0-3 mm on the real CT at 10 and
    20 mm (``benchmarks/README.md``, "Issue 17").  0 gives PyTorch's ``eps`` of 1e-8."""
    io_smoothness_weight: float = 4.0
    """Weight of the diffusion regulariser (squared spatial gradient of the displacement, in voxels).  Chosen on the
    validation cases only (``docs/data/io_regularisation_validation.csv``; figures in ``docs/training.md``): the weight
    that gave the best Dice and field error at both 10 and 20 mm of motion."""
    io_jacobian_weight: float = 0.1
    """Weight of the negative-Jacobian penalty (folding)."""
    io_transform: str = "bspline"
    """Parameterisation of the instance optimisation's displacement: ``bspline`` (a cubic B-spline, C² with a
    continuous Jacobian, knots exactly ``io_control_spacing_mm`` apart in mm (not rounded), times the level factor at
    coarser levels; regularised by its bending energy, ``io_bending_weight``), ``svf`` (that B-spline as a
    stationary velocity field integrated by scaling and squaring: diffeomorphic) or ``trilinear`` (control points
    ``io_control_spacing_mm`` apart, rounded to working voxels, interpolated trilinearly: a piecewise constant
    Jacobian that shows the control cells; regularised by ``io_smoothness_weight``).  ``io_jacobian_weight`` applies
    to all three.  ``bspline`` is the default: on the real CT at 10 and 20 mm and the phantom it gave the better
    Dice and field error than ``trilinear`` at a lower SDlogJ (``benchmarks/README.md``, "Issue 17")."""
    io_bending_weight: float = 50.0
    """Weight of the B-spline's bending energy (``io_transform`` ``bspline`` or ``svf``; unused by ``trilinear``):
    the mean over the level's grid of the squared second derivatives of the displacement in mm per mm², so mm²
    (independent of the working spacing).  50 with NCC: of 10-300, the best mean field error and Dice together on
    the real CT at 10 and 20 mm and the phantom (lower weights fit 20 mm motion a little better, higher ones the
    phantom; ``benchmarks/README.md``, "Issue 17"); MIND's smaller loss scale wants about 10-30."""
    io_symmetric: bool = False
    """Symmetric instance optimisation (``io_transform="svf"`` only): the velocity ``v`` is optimised for both
    directions at once, the similarity of ``moving o exp(v)`` to ``fixed`` and of ``fixed o exp(-v)`` to ``moving``
    (averaged), so swapping the scans gives the inverse transform (``exp(-v)``) instead of a different answer, and
    neither scan is favoured.  About twice the ``svf`` time.  A start (network, discrete search) becomes the initial
    velocity."""
    io_rigidity_weight: float = 100.0
    """Weight of the strain energy (dimensionless: the mean squared infinitesimal strain) inside a region the user
    keeps rigid (``register --rigid-mask``, e.g. a tumour or a bone): 0 for translations and small rotations, so the
    region moves as a whole while the tissue around it deforms.  Unused without a rigid mask."""
    io_similarity: str = "ncc"
    """Similarity of the instance optimisation: ``ncc`` (local NCC, ``io_ncc_window_mm``) or ``mind`` (squared
    difference of MIND-SSC descriptors, Heinrich et al. 2013, ``io_mind_radius_mm`` and ``io_mind_dilation_mm``;
    robust to contrast changes).  The two have different scales: the regularisation weights depend on it."""
    io_mind_radius_mm: float = 3.0
    """MIND-SSC patch radius in mm at the working resolution, rounded to whole working voxels (>= 0; 1 voxel at
    3 mm: a 3-voxel patch), the same voxel count at every level."""
    io_mind_dilation_mm: float = 6.0
    """MIND-SSC neighbour distance in mm at the working resolution, rounded to whole working voxels (>= 1; 2 voxels
    at 3 mm), the same voxel count at every level."""

    # outputs
    compute_inverse: bool = True
    """Compute the inverse field (moving -> fixed) and report inverse consistency."""
    folding_limit_percent: float = 0.5
    """If folding (det J <= 0) exceeds this percentage of the fixed body's working voxels, the instance optimisation
    reruns once from the same start with stronger regularisation (``folding_retry_factor``)."""
    folding_retry_factor: float = 4.0
    """The folding retry's regularisation: ``io_smoothness_weight`` times this and the Jacobian penalty's weight
    ``max(io_jacobian_weight, 0.1)`` times this (the floor of 0.1 gives the retry a folding penalty even when
    ``io_jacobian_weight`` is 0)."""

    # plausibility checks after every run (registration/checks.py): a failed check makes metrics["status"]
    # "suspect" with a reason, and the register command exit with code 3 unless --accept-suspect
    check_affine_scale_range: tuple[float, float] = (0.5, 2.0)
    """Plausible scale factors (singular values of the affine's linear part; dimensionless): outside them the
    result is suspect (an affine determinant <= 0, a reflection, always is)."""
    check_max_folding_percent: float = 1.0
    """Suspect above this folding (% of the fixed body's voxels with det J <= 0, at full resolution)."""
    check_hu_window: tuple[float, float] = (-1000.0, 1000.0)
    """HU clip (low, high) of the images before the checks' similarity (NCC inside the fixed body): keeps lungs,
    soft tissue and bone while metal and air outside the field of view do not dominate."""
    check_min_ncc_gain: float = -0.02
    """Suspect when the NCC inside the fixed body after registration minus the NCC before (the scans as they lie)
    is below this (a negative value: the registration made the images match worse by more than its size)."""
    check_min_ncc: float = 0.5
    """Suspect when the NCC inside the fixed body after registration is below this (-1..1): unrelated images
    (another body part, noise, a constant image, MR against CT)."""
    check_min_body_dice: float = 0.5
    """Suspect when the Dice (0..1) of the fixed body mask and the registered moving body mask is below this:
    fields of view that hardly overlap."""
    check_max_displacement_fraction: float = 0.3
    """Suspect when the 95th percentile of the deformable displacement's length (mm, inside the fixed body; the
    affine is not counted) exceeds this fraction of the fixed body's largest extent (mm)."""
    check_mirror_margin: float = 0.05
    """Suspect when the affinely aligned moving image mirrored left-right matches the fixed image better, by more
    than this NCC, than the image itself (a scan or header flipped left-right)."""
    check_max_dice_loss: float = 0.02
    """With both label maps: suspect when the mean Dice after registration is below the one before by more than
    this (0..1)."""

    # execution
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    seed: int = 0
    threads: int | None = None
    """CPU threads for torch (``None`` or 0: leave torch's default)."""

    def __post_init__(self) -> None:
        """Check every value; sequences become tuples.  Any bad value, a wrong type included, is a ``ValueError``
        naming the setting: the one exception that the CLI and the Slicer module turn into a message."""
        for name in ("hu_window", "affine_levels_mm", "io_levels"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a list of numbers, got {value!r}")  # noqa: TRY004 (see above)
            object.__setattr__(self, name, tuple(value))
        if len(self.hu_window) != 2 or not all(_is_real(v) for v in self.hu_window) \
                or not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window must be two numbers (low, high) in HU with low < high, got {self.hu_window}")
        if not self.affine_levels_mm or not all(_is_real(v) and v > 0 for v in self.affine_levels_mm):
            raise ValueError(f"affine_levels_mm must be one or more positive spacings, got {self.affine_levels_mm}")
        if not all(_is_integer(v) and v >= 1 for v in self.io_levels):
            raise ValueError(f"io_levels must be downsampling factors >= 1 (whole numbers), got {self.io_levels}")
        for name, low in (("working_spacing_mm", 0.0), ("io_learning_rate_mm", 0.0), ("io_control_spacing_mm", 0.0),
                          ("io_ncc_window_mm", 0.0), ("io_ncc_noise_hu", 0.0), ("discrete_grid_spacing_mm", 0.0),
                          ("discrete_search_radius_mm", 0.0)):
            _check_number(name, getattr(self, name), low, inclusive=False)
        for name in ("io_smoothness_weight", "io_jacobian_weight", "io_bending_weight", "io_mind_radius_mm",
                     "io_gradient_floor_mm", "io_rigidity_weight"):
            _check_number(name, getattr(self, name), 0.0)
        _check_number("io_mind_dilation_mm", self.io_mind_dilation_mm, 0.0, inclusive=False)
        if self.io_transform not in ("trilinear", "bspline", "svf"):
            raise ValueError(f"io_transform must be 'trilinear', 'bspline' or 'svf', got {self.io_transform!r}")
        if self.io_symmetric is True and self.io_transform != "svf":
            raise ValueError(f"io_symmetric needs io_transform='svf' (the inverse of the stationary velocity's "
                             f"transform is exact), got io_transform={self.io_transform!r}; set both")
        if self.io_similarity not in ("ncc", "mind"):
            raise ValueError(f"io_similarity must be 'ncc' or 'mind', got {self.io_similarity!r}")
        _check_number("folding_limit_percent", self.folding_limit_percent)
        _check_number("folding_retry_factor", self.folding_retry_factor, 1.0)
        _check_number("affine_max_scale", self.affine_max_scale, 1.0)
        _check_number("affine_max_shear", self.affine_max_shear, 0.0)
        _check_number("initial_search_spacing_mm", self.initial_search_spacing_mm, 0.0, inclusive=False)
        _check_number("initial_search_range_mm", self.initial_search_range_mm, 0.0)
        _check_number("initial_search_min_overlap", self.initial_search_min_overlap, 0.0, inclusive=False)
        if self.initial_search_min_overlap > 1:
            raise ValueError(f"initial_search_min_overlap must be a fraction in (0, 1], got "
                             f"{self.initial_search_min_overlap!r}")
        for name, low in (("max_working_voxels", 2), ("affine_iterations", 0), ("io_iterations", 0),
                          ("io_fine_iterations", 0)):
            _check_integer(name, getattr(self, name), low)
        _check_integer("seed", self.seed)
        self._check_plausibility_thresholds()
        if self.threads is not None:
            _check_integer("threads", self.threads, 0)
        for name in ("body_mask", "affine", "initial_search", "compute_inverse", "discrete_search",
                     "io_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")  # noqa: TRY004
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"model must be a model name, a path to a .pt file, or null, got {self.model!r}")
        if self.network_precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"network_precision must be 'auto', 'fp32' or 'bf16', got {self.network_precision!r}")
        if not isinstance(self.device, str) or self.device.lower() not in ("auto", "cpu", "cuda", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def _check_plausibility_thresholds(self) -> None:
        """The ``check_*`` fields (:mod:`deepabdominalreg.registration.checks`): ranges as tuples, numbers in range."""
        for name in ("check_affine_scale_range", "check_hu_window"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2 \
                    or not all(_is_real(v) for v in value) or not value[0] < value[1]:
                raise ValueError(f"{name} must be two numbers (low, high) with low < high, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if not 0 < self.check_affine_scale_range[0] <= 1 <= self.check_affine_scale_range[1]:
            raise ValueError(f"check_affine_scale_range must contain 1 and be positive, got "
                             f"{self.check_affine_scale_range}")
        _check_number("check_max_folding_percent", self.check_max_folding_percent, 0.0)
        _check_number("check_min_ncc_gain", self.check_min_ncc_gain)
        _check_number("check_min_ncc", self.check_min_ncc, -1.0)
        _check_number("check_min_body_dice", self.check_min_body_dice, 0.0)
        _check_number("check_max_displacement_fraction", self.check_max_displacement_fraction, 0.0, inclusive=False)
        _check_number("check_mirror_margin", self.check_mirror_margin, 0.0)
        _check_number("check_max_dice_loss", self.check_max_dice_loss, 0.0)

    def replace(self, **changes) -> RegistrationConfig:
        """This config with ``changes`` (checked as :meth:`from_dict` checks them)."""
        return RegistrationConfig.from_dict(changes, base=self)

    def to_dict(self) -> dict:
        """Every field as a plain JSON-ready value (tuples as lists): the one serialisation, read by
        :meth:`from_dict`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict, base: RegistrationConfig | None = None) -> RegistrationConfig:
        """A config from ``data`` (e.g. :meth:`to_dict` read back from JSON), on top of ``base`` (default: the
        defaults); unknown keys and bad values are a ``ValueError`` naming them."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown registration settings {unknown}; known: {known}")
        return dataclasses.replace(base or cls(), **data)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_number(name: str, value, low: float | None = None, inclusive: bool = True) -> None:
    if not _is_real(value) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if low is not None and (value < low if inclusive else value <= low):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low:g}, got {value!r}")


def _check_integer(name: str, value, low: int | None = None) -> None:
    if not _is_integer(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


PRESETS: dict[str, dict] = {
    # fast: no full-resolution IO level and an 8 mm finest affine level (the IO absorbs its ~1 mm residual)
    "fast": {"io_iterations": 40, "io_levels": (4, 2), "affine_levels_mm": (12.0, 8.0)},
    "balanced": {},
    # network: affine + the shipped network, no instance optimisation (smoothest fields; docs/training.md)
    "network": {"model": "abdomen-ct-4mm-v3", "io_iterations": 0},
    # accurate: a 2.5 mm working grid, with the instance optimisation's lengths in the same working voxels as the
    # other presets (0.5, 2 and 5 voxels)
    "accurate": {"io_iterations": 200, "io_fine_iterations": 80, "io_levels": (4, 2, 1), "working_spacing_mm": 2.5,
                 "affine_levels_mm": (8.0, 4.0), "affine_iterations": 40,
                 "io_learning_rate_mm": 1.25, "io_control_spacing_mm": 5.0, "io_ncc_window_mm": 12.5},
}


def config_from_preset(preset: str = "balanced", **overrides) -> RegistrationConfig:
    """A :class:`RegistrationConfig` from a named preset (``fast``, ``balanced``, ``network``, ``accurate``) plus
    overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return RegistrationConfig.from_dict({**PRESETS[preset], **overrides})

