"""Registration parameters, defined once (the Slicer parameter node mirrors these fields)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["PRESETS", "RegistrationConfig", "config_from_preset"]


@dataclass(frozen=True)
class RegistrationConfig:
    """Every knob of :func:`deepabdominalreg.registration.register_pair`.

    Units: HU for intensities, mm for distances, iterations are counts per level.
    """

    # preprocessing
    hu_window: tuple[float, float] = (-160.0, 240.0)
    """HU clipping window before scaling to [0, 1] (soft-tissue window: level 40, width 400)."""
    working_spacing_mm: float = 3.0
    """Isotropic spacing of the working grid on which the registration runs (mm)."""
    max_working_voxels: int = 160
    """Cap on the working grid's size along any axis (the spacing grows to respect it)."""
    body_mask: bool = True
    """Remove the CT table and air outside the patient (van Eijnatten et al. 2021)."""

    # affine pre-alignment
    affine: bool = True
    affine_iterations: int = 20
    """L-BFGS iterations per affine pyramid level (it usually converges earlier; 40 changed the CT benchmark pair's
    affine by < 0.01 mm for 1.6x the time)."""
    affine_levels_mm: tuple[float, ...] = (12.0, 6.0)
    """Isotropic spacing (mm) of the affine pyramid levels, coarse to fine.  Precision is about a tenth of the
    finest level: ~1 mm at 6 mm (the deformable stages absorb the rest), ~0.3 mm at 4 mm (2-3x slower)."""

    # deformable stage 1: network
    model: str | None = None
    """Name of a shipped model or path to a ``.pt`` checkpoint; ``None`` skips the network stage."""
    network_precision: str = "auto"
    """``auto``, ``fp32`` or ``bf16``: the network's forward pass in bfloat16 autocast (the output field stays
    float32).  ``bf16``: wherever the device computes bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX); ``auto``:
    only where that was measured faster for the shipped network, such CPUs (``registration.network_uses_bfloat16``;
    ``benchmarks/network_speed.py`` and ``benchmarks/gpu_speed.py`` measure it); ``fp32``: never."""

    # deformable stage 2: instance optimisation
    io_iterations: int = 60
    """Adam iterations at each coarse instance-optimisation level (0 disables the stage; early stopping usually ends
    a coarse level before 60)."""
    io_fine_iterations: int = 25
    """Adam iterations at the full working resolution (level factor 1), the most expensive level (~80 % of the
    stage's time in the balanced preset)."""
    io_levels: tuple[int, ...] = (4, 2, 1)
    """Pyramid levels as downsampling factors of the working grid, coarse to fine."""
    io_learning_rate: float = 0.5
    """Adam learning rate, in working-grid voxels per step, for the control-point displacements."""
    io_control_spacing: int = 2
    """Spacing of the displacement control grid, in voxels of the level's grid (smoothness by construction)."""
    io_ncc_window: int = 5
    """Local NCC window (voxels)."""
    io_smoothness_weight: float = 4.0
    """Weight of the diffusion regulariser (squared spatial gradient of the displacement, in voxels).  Chosen on the
    validation cases only (``docs/data/io_regularisation_validation.csv``): 1 -> 4 raised the balanced preset's
    phantom organ Dice 0.935 -> 0.952 at 10 mm and 0.934 -> 0.943 at 20 mm, and lowered the real-CT crop's field error
    1.02 -> 0.78 mm; 8 was better at 10 mm but worse at 20 mm."""
    io_jacobian_weight: float = 0.1
    """Weight of the negative-Jacobian penalty (folding)."""

    # outputs
    compute_inverse: bool = True
    """Compute the inverse field (moving -> fixed) and report inverse consistency."""
    folding_limit_percent: float = 0.5
    """If folding inside the body exceeds this, instance optimisation reruns with 4x regularisation once."""

    # execution
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    seed: int = 0
    threads: int | None = None
    """CPU threads for torch (``None``: leave torch's default)."""

    def __post_init__(self) -> None:
        if self.network_precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"network_precision must be 'auto', 'fp32' or 'bf16', got {self.network_precision!r}")

    def replace(self, **changes) -> RegistrationConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict, base: RegistrationConfig | None = None) -> RegistrationConfig:
        """A config from ``data`` (e.g. a JSON file), on top of ``base``; unknown keys are a clear error."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown registration settings {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return dataclasses.replace(base or cls(), **values)


PRESETS: dict[str, dict] = {
    # fast: no full-resolution IO level and an 8 mm finest affine level (the IO absorbs its ~1 mm residual)
    "fast": {"io_iterations": 40, "io_levels": (4, 2), "affine_levels_mm": (12.0, 8.0)},
    "balanced": {},
    # network: affine + the shipped network, no instance optimisation (smoothest fields; docs/training.md)
    "network": {"model": "abdomen-ct-4mm-v3", "io_iterations": 0},
    "accurate": {"io_iterations": 200, "io_fine_iterations": 80, "io_levels": (4, 2, 1), "working_spacing_mm": 2.5,
                 "affine_levels_mm": (8.0, 4.0), "affine_iterations": 40},
}


def config_from_preset(preset: str = "balanced", **overrides) -> RegistrationConfig:
    """A :class:`RegistrationConfig` from a named preset (``fast``, ``balanced``, ``network``, ``accurate``) plus
    overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return RegistrationConfig(**{**PRESETS[preset], **overrides})

