"""The methods an evaluation runs, and the one naming scheme of our pipeline's variants.

A *method* is any function ``f(fixed_path, moving_path, *, threads, **options) -> MethodOutput`` that reads the two
images itself (so reading and preprocessing are timed) and returns a displacement field in this project's
convention: on the **fixed** grid, LPS mm, mapping a fixed point ``x`` to the moving point ``x + u(x)``.  Our
pipeline (:func:`run_ours`), the baseline without registration (:func:`run_identity`, method ``none``) and the peers
of :mod:`deepabdominalreg.evaluation.peers` (elastix, ANTs, SimpleITK demons) all have that form.

Our pipeline's variants (:data:`VARIANTS`) are the presets of :data:`deepabdominalreg.config.PRESETS` under their own
names plus a few variants defined here on top of a preset; the method running variant ``v`` is named ``ours-v``
(``ours-v-cuda`` on the GPU).  ``deepabdominalreg evaluate``, ``evaluate-model`` and ``benchmark`` all take their
methods from :func:`method_specs`.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.config import PRESETS, config_from_preset
from deepabdominalreg.geometry import Grid
from deepabdominalreg.io import read_image

# --------------------------------------------------------------------------------------------------------------
# data types
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MethodOutput:
    """What a registration method returns to the evaluation.

    ``displacement_lps``: vector image on the fixed grid (LPS mm, fixed -> moving).  ``inverse_displacement_lps``:
    moving -> fixed on the moving grid, or ``None``.  ``stages``: seconds per stage (``read`` included).
    ``settings``: the method's parameters, for the record.  ``extra``: method-specific numbers (e.g. our own
    metrics) copied into the per-pair row with the prefix ``x_``; ``extra["status"]`` is a method's own verdict on
    its result (ours: ``metrics.json``'s ``"ok"``/``"suspect"``, row column ``x_status``; peers give none).
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
        """The method's function (imported)."""
        return _import(self.function)

    def warm_up(self) -> None:
        """Call the warm-up function, if any."""
        if self.warmup:
            _import(self.warmup)()


def _import(spec: str) -> Callable:
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"method function {spec!r} must look like 'module:function'")
    return getattr(importlib.import_module(module_name), attribute)


# --------------------------------------------------------------------------------------------------------------
# methods: ours and the baseline without registration
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

    from deepabdominalreg.registration.pipeline import register_pair

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
        # the plausibility checks' verdict ("ok" / "suspect"): the benchmark's "flagged" column
        "status": result.metrics.get("status", ""),
        "suspect_reasons": " | ".join(result.metrics.get("suspect_reasons") or []),
    }
    settings = {"preset": preset, "config": result.metrics["config"], "model": result.metrics["model"]}
    return MethodOutput(
        displacement_lps=result.displacement_lps, inverse_displacement_lps=result.inverse_displacement_lps,
        stages=stages, settings=settings, extra=extra,
    )


def warm_up_ours() -> None:
    """Import what :func:`run_ours` needs (torch, the pipeline) before the clock starts.

    ``torch._dynamo`` is imported by the first ``torch.optim`` optimiser a process creates (a slow import); it is an
    import like ``itk`` for elastix, so it is done here too (and reported in ``import_s``).
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
                        settings={"method": "none"})


# --------------------------------------------------------------------------------------------------------------
# the registry: one name per variant of our pipeline
# --------------------------------------------------------------------------------------------------------------

#: The method ``none``: no registration (the zero field).
NONE = MethodSpec("none", f"{__name__}:run_identity")


@dataclass(frozen=True)
class Variant:
    """A configuration of our pipeline: a preset of :data:`~deepabdominalreg.config.PRESETS` plus ``overrides``
    (:class:`~deepabdominalreg.config.RegistrationConfig` fields).  ``network``: it runs a network, whose model the
    evaluation may choose (default: the ``network`` preset's)."""

    preset: str
    overrides: dict = field(default_factory=dict)
    network: bool = False
    description: str = ""


#: Our variants by name: every preset as it is, and variants defined on top of a preset.
VARIANTS: dict[str, Variant] = {
    **{name: Variant(name, network=settings.get("model") is not None, description=f"the {name!r} preset")
       for name, settings in PRESETS.items()},
    "affine": Variant("balanced", {"io_iterations": 0},
                      description="every stage but the deformable ones: the time no deformable stage can go below"),
    "network+io": Variant("balanced", network=True, description="the network, then the balanced instance "
                          "optimisation"),
    "search": Variant("balanced", {"discrete_search": True},
                      description="balanced with the global offset search before the affine and the discrete "
                      "displacement search before the instance optimisation (large motion, far origins)"),
    "no-offset-search": Variant("balanced", {"initial_search": False},
                                description="balanced without the global offset search (the centre-of-mass start)"),
    "discrete": Variant("balanced", {"discrete_search": True},
                        description="balanced with the discrete displacement search before the instance "
                        "optimisation only"),
    # candidate intensity mappings of issue 17 (the soft-tissue window flattens lung vessels and bone)
    "lung": Variant("balanced", {"hu_window": (-1000.0, 300.0)},
                    description="balanced on a lung-to-soft-tissue window (-1000..300 HU)"),
    "wide": Variant("balanced", {"hu_window": (-1000.0, 1000.0)},
                    description="balanced on a window from air to bone (-1000..1000 HU)"),
    "symmetric": Variant("balanced", {"io_transform": "svf", "io_symmetric": True},
                         description="balanced with the symmetric stationary-velocity instance optimisation"),
    "mind": Variant("balanced", {"io_similarity": "mind", "io_bending_weight": 20.0},
                    description="balanced with MIND-SSC instead of local NCC in the instance optimisation (bending "
                    "weight 20 for MIND's loss scale)"),
    # the network has removed the large motion: instance optimisation only refines at 2x and 1x
    "network+io-fine": Variant("balanced", {"io_levels": (2, 1)}, network=True,
                               description="the network, then instance optimisation at the two finest levels"),
}


def default_model() -> str | None:
    """The model of the network variants when none is chosen: the ``network`` preset's if it is shipped, else
    the first shipped model, else ``None``."""
    from deepabdominalreg.nn.models import available_models

    shipped = available_models()
    preset_model = PRESETS["network"].get("model")
    return preset_model if preset_model in shipped else next(iter(shipped), None)


def our_method(variant: str, *, device: str = "cpu", model: str | None = None, **overrides) -> MethodSpec:
    """The method ``ours-<variant>`` (``ours-<variant>-<device>`` unless ``device`` is ``cpu`` or ``auto``).

    ``model``: the model of a network variant (``None``: :func:`default_model`); variants without a network ignore
    it.  ``overrides`` (``RegistrationConfig`` fields) apply on top of the variant's own settings.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant of our pipeline {variant!r}; choose from {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    options: dict = {"preset": spec.preset, "device": device, **spec.overrides, **overrides}
    if spec.network:
        chosen = model or default_model()
        if chosen is None:
            raise ValueError(f"variant {variant!r} runs a network: give a model (none is shipped)")
        if chosen != PRESETS[spec.preset].get("model"):
            options["model"] = chosen
    suffix = "" if device in ("cpu", "auto") else f"-{device}"
    return MethodSpec(f"ours-{variant}{suffix}", f"{__name__}:run_ours", options, f"{__name__}:warm_up_ours")


def method_specs(
    names: Iterable[str],
    *,
    devices: Iterable[str] = ("cpu",),
    model: str | None = None,
    log: Callable[[str], None] | None = None,
    **overrides,
) -> list[MethodSpec]:
    """Methods by name: ``none`` (first, once) and the variants of :data:`VARIANTS`, on every device of ``devices``
    in turn.

    Network variants are left out (with a message to ``log``, default stderr) when no model is given or shipped.
    """
    log = log or (lambda text: print(text, file=sys.stderr))
    names = list(names)
    methods = [NONE] if "none" in names else []
    for device in devices:  # all CPU methods first, then all GPU ones (the order of the tables)
        for name in names:
            if name == "none":
                continue
            try:
                methods.append(our_method(name, device=device, model=model, **overrides))
            except ValueError as exc:
                if name not in VARIANTS:
                    raise
                log(f"skipping ours-{name}: {exc}")
    if model is not None and not any(VARIANTS[n].network for n in names if n in VARIANTS):
        log(f"model {model!r} is not used: none of {', '.join(names)} runs a network (network, network+io, ...)")
    return methods
