"""Peer registration methods for the side-by-side benchmark: elastix, ANTs SyN, ConvexAdam and a SimpleITK
classical method.

Every peer has the signature of :data:`deepabdominalreg.evaluation.methods.MethodFunction`::

    run_x(fixed_path, moving_path, *, threads=2, **options) -> MethodOutput

It reads both images **inside** the call (so reading and preprocessing are timed like ours), registers moving onto
fixed, and returns the displacement in the project's convention: a ``sitkVectorFloat32/64`` image on the **fixed**
grid, LPS mm, mapping a fixed point ``x`` to the moving point ``x + u(x)`` (what ``sitk.DisplacementFieldTransform``
needs to resample moving onto fixed).  The evaluation code then computes the same metrics for every method.

Peers are optional (``pip install -e ".[bench]"``: ``itk-elastix``, ``antspyx``, ``convexadam``);
:func:`available_peers` tells which can run here.  Settings are the packages' published defaults, written down in
:func:`elastix_parameter_maps`, :data:`ANTS_SETTINGS`, :data:`CONVEXADAM_SETTINGS` and :data:`SITK_DEMONS_SETTINGS`
and copied into the benchmark's results.
"""


from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.config import OUTSIDE_FOV_HU, RegistrationConfig
from deepabdominalreg.evaluation.methods import MethodOutput, MethodSpec
from deepabdominalreg.geometry import Grid, displacement_transform, make_working_grid, resample_image
from deepabdominalreg.io import writable_array_view

#: The demons' intensity window (HU): the pipeline's soft-tissue window (``RegistrationConfig.hu_window``'s default).
DEMONS_WINDOW_HU: tuple[float, float] = RegistrationConfig().hu_window


def _set_itk_threads(threads: int) -> None:
    """ITK-based packages (ANTs, elastix, SimpleITK) read this when they create their first filter."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    os.environ["OMP_NUM_THREADS"] = str(int(threads))


def _field_image(array_zyx3: np.ndarray, reference: Grid) -> sitk.Image:
    return reference.image_from_array(np.ascontiguousarray(array_zyx3, dtype=np.float32), is_vector=True)


# --------------------------------------------------------------------------------------------------------------
# elastix (itk-elastix): affine + B-spline
# --------------------------------------------------------------------------------------------------------------


def elastix_parameter_maps(final_grid_spacing_mm: float = 10.0, resolutions: int = 4) -> list[dict[str, list[str]]]:
    """The two elastix parameter maps used (plain dicts, for the record and for :func:`run_elastix`).

    elastix's own defaults (``GetDefaultParameterMap("affine"/"bspline", resolutions, spacing)``): advanced Mattes
    mutual information, adaptive stochastic gradient descent, 256 iterations per resolution, 2048 random samples
    per iteration, 4 smoothing-pyramid resolutions; the B-spline stage adds a bending-energy penalty (weight 1) and
    a control-point grid refined to ``final_grid_spacing_mm`` at the last resolution.  Changes to the defaults:
    centre-of-geometry initialisation of the affine (``AutomaticTransformInitialization``); ASGD's step size
    estimated with ``ASGDParameterEstimationMethod "DisplacementDistribution"`` (Qiao et al. 2016, recommended by
    the elastix manual for transforms with many parameters: with the default "Original" method, computing the
    Jacobian terms takes most of a B-spline run, so elastix would be timed slower than it needs to be); and no
    result image (the benchmark warps the moving image itself, identically for every method).
    """
    import itk

    parameters = itk.ParameterObject.New()
    affine = parameters.GetDefaultParameterMap("affine", int(resolutions))
    bspline = parameters.GetDefaultParameterMap("bspline", int(resolutions), float(final_grid_spacing_mm))
    maps = []
    for m in (affine, bspline):
        plain = {k: list(v) for k, v in m.items()}
        plain["WriteResultImage"] = ["false"]
        maps.append(plain)
    for plain in maps:
        plain["ASGDParameterEstimationMethod"] = ["DisplacementDistribution"]
    maps[0]["AutomaticTransformInitialization"] = ["true"]
    maps[0]["AutomaticTransformInitializationMethod"] = ["GeometricalCenter"]
    return maps


def run_elastix(
    fixed_path: str,
    moving_path: str,
    *,
    threads: int = 2,
    final_grid_spacing_mm: float = 10.0,
    resolutions: int = 4,
    max_iterations: int | None = None,
    seed: int = 0,
) -> MethodOutput:
    """elastix affine + B-spline (see :func:`elastix_parameter_maps`), ``threads`` CPU threads.

    ``max_iterations`` overrides elastix's 256 iterations per resolution (only for quick tests)."""
    _set_itk_threads(threads)
    import itk

    stages: dict[str, float] = {}
    t = time.perf_counter()
    fixed = itk.imread(str(fixed_path), itk.F)
    moving = itk.imread(str(moving_path), itk.F)
    stages["read"] = time.perf_counter() - t

    t = time.perf_counter()
    maps = elastix_parameter_maps(final_grid_spacing_mm, resolutions)
    parameters = itk.ParameterObject.New()
    for index, (kind, plain) in enumerate(zip(("affine", "bspline"), maps)):
        parameters.AddParameterMap(
            parameters.GetDefaultParameterMap(kind, int(resolutions), float(final_grid_spacing_mm))
        )
        for key, values in plain.items():
            parameters.SetParameter(index, key, [str(v) for v in values])
        parameters.SetParameter(index, "RandomSeed", str(int(seed) + 1))
        if max_iterations:
            parameters.SetParameter(index, "MaximumNumberOfIterations", str(int(max_iterations)))
    # threads: ITK's global default (set above and here); the wrappers' number_of_threads argument crashed
    # (segmentation fault) with itk-elastix 0.25.4 / ITK 5.4.7 in affine + B-spline runs
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    _, result_parameters = itk.elastix_registration_method(
        fixed, moving, parameter_object=parameters, log_to_console=False
    )
    stages["registration"] = time.perf_counter() - t

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transformix-") as tmp:  # transformix writes deformationField.nii
        field_itk = itk.transformix_deformation_field(moving, result_parameters, log_to_console=False,
                                                      output_directory=tmp)
        array = np.asarray(itk.array_from_image(field_itk), dtype=np.float32)  # (z, y, x, 3), LPS mm
    fixed_grid = _grid_of_itk(fixed)
    displacement = _field_image(array, fixed_grid)
    stages["field"] = time.perf_counter() - t
    return MethodOutput(displacement_lps=displacement, stages=stages, settings={"parameter_maps": maps})


def _grid_of_itk(image) -> Grid:
    import itk

    matrix = itk.array_from_matrix(image.GetDirection())
    region = image.GetLargestPossibleRegion().GetSize()
    return Grid(
        size=tuple(int(region[i]) for i in range(3)),
        spacing=tuple(float(s) for s in image.GetSpacing()),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(v) for v in np.asarray(matrix, dtype=np.float64).ravel()),
    )


# --------------------------------------------------------------------------------------------------------------
# ANTs SyN (antspyx)
# --------------------------------------------------------------------------------------------------------------

ANTS_SETTINGS: dict = {
    "type_of_transform": "SyN",
    "note": (
        "ants.registration defaults: rigid+affine initialisation (Mattes MI, 32 bins, 20 % random sampling, "
        "shrink 6x4x2x1, 2100/1200/1200/10 iterations), then SyN with Mattes MI, gradient step 0.2, flow sigma 3, "
        "total sigma 0, reg_iterations (40, 20, 0) on shrink 4x2x1 (the finest level is not iterated). "
        "'SyNRA' = rigid + affine + SyN with the same SyN settings."
    ),
}


def run_ants(
    fixed_path: str,
    moving_path: str,
    *,
    threads: int = 2,
    type_of_transform: str = "SyN",
    seed: int = 0,
    inverse: bool = True,
    **ants_options,
) -> MethodOutput:
    """``ants.registration(type_of_transform=...)`` with the package defaults; the forward (and inverse) transforms
    are composed into dense displacement fields with ``ants.apply_transforms(compose=...)``.

    ``ants_options`` go to ``ants.registration`` unchanged (e.g. ``reg_iterations`` for quick tests)."""
    _set_itk_threads(threads)
    os.environ["ANTS_RANDOM_SEED"] = str(int(seed) + 1)
    import ants

    stages: dict[str, float] = {}
    t = time.perf_counter()
    fixed = ants.image_read(str(fixed_path), pixeltype="float")
    moving = ants.image_read(str(moving_path), pixeltype="float")
    stages["read"] = time.perf_counter() - t

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ants-") as tmp:
        reg = ants.registration(
            fixed=fixed, moving=moving, type_of_transform=type_of_transform, outprefix=str(Path(tmp) / "reg_"),
            random_seed=int(seed) + 1, verbose=False, **ants_options,
        )
        stages["registration"] = time.perf_counter() - t

        t = time.perf_counter()
        forward_path = ants.apply_transforms(
            fixed=fixed, moving=moving, transformlist=reg["fwdtransforms"], compose=str(Path(tmp) / "fwd_")
        )
        displacement = _ants_field_to_sitk(ants.image_read(forward_path))
        inverse_displacement = None
        if inverse:
            inverse_path = ants.apply_transforms(
                fixed=moving, moving=fixed, transformlist=reg["invtransforms"],
                whichtoinvert=[True, False][: len(reg["invtransforms"])] if len(reg["invtransforms"]) > 1 else [True],
                compose=str(Path(tmp) / "inv_"),
            )
            inverse_displacement = _ants_field_to_sitk(ants.image_read(inverse_path))
        stages["field"] = time.perf_counter() - t
    settings = dict(ANTS_SETTINGS, type_of_transform=type_of_transform, **{k: str(v) for k, v in ants_options.items()})
    return MethodOutput(displacement_lps=displacement, inverse_displacement_lps=inverse_displacement, stages=stages,
                        settings=settings)


def _ants_field_to_sitk(field) -> sitk.Image:
    """An ANTs vector image (ITK in memory: LPS vectors) -> a SimpleITK vector image with the same geometry."""
    array_xyz3 = np.asarray(field.numpy(), dtype=np.float32)  # (x, y, z, 3)
    grid = Grid(
        size=tuple(int(s) for s in field.shape[:3]),
        spacing=tuple(float(s) for s in field.spacing),
        origin=tuple(float(o) for o in field.origin),
        direction=tuple(float(v) for v in np.asarray(field.direction, dtype=np.float64).ravel()),
    )
    return _field_image(np.transpose(array_xyz3, (2, 1, 0, 3)), grid)


# --------------------------------------------------------------------------------------------------------------
# ConvexAdam (PyPI convexadam; Siebert, Hansen & Heinrich 2021, Learn2Reg winner): MIND-SSC features, a coupled
# convex discrete search, then Adam instance optimisation
# --------------------------------------------------------------------------------------------------------------

CONVEXADAM_SETTINGS: dict = {
    "function": "convexAdam.convex_adam_MIND.convex_adam_pt",
    "parameters": {"mind_r": 1, "mind_d": 2, "lambda_weight": 1.25, "grid_sp": 6, "disp_hw": 4,
                   "selected_niter": 80, "selected_smooth": 0, "grid_sp_adam": 2, "ic": True},
    "note": (
        "the package's defaults (CPU, float32).  ConvexAdam expects pre-aligned scans on one voxel grid: the "
        "moving image is first translated so that the two body centroids coincide (body masks by the pipeline's "
        "rule on a 6 mm grid) and resampled onto the fixed grid (HU, -1024 outside its field of view), whose size is "
        "padded to a multiple of grid_sp; its field (voxels, array order z, y, x: warped(p) = moving(p + d(p))) is "
        "converted to LPS mm and composed with that translation.  spacing_mm (optional) runs it on an isotropic "
        "grid of that spacing instead of the fixed grid."
    ),
}


def _body_centroid_lps(image: sitk.Image, spacing_mm: float = 6.0) -> np.ndarray:
    """The centroid (LPS mm) of ``image``'s body mask (the pipeline's rule, on a ``spacing_mm`` grid); the centre of
    the image when no body is found."""
    from deepabdominalreg.registration.preprocessing import body_mask

    grid = make_working_grid(image, spacing_mm)
    hu = sitk.GetArrayFromImage(resample_image(image, grid, None, "linear", OUTSIDE_FOV_HU, sitk.sitkFloat32))
    mask = body_mask(hu, tuple(reversed(grid.spacing)))
    if not mask.any():
        return grid.index_to_physical((np.asarray(grid.size, dtype=np.float64) - 1) / 2)[0]
    return grid.index_to_physical(np.argwhere(mask)[:, ::-1].mean(0))[0]


def run_convexadam(
    fixed_path: str,
    moving_path: str,
    *,
    threads: int = 2,
    seed: int = 0,
    prealign: bool = True,
    spacing_mm: float | None = None,
    **convexadam_options,
) -> MethodOutput:
    """ConvexAdam (``convex_adam_pt``, the package defaults of :data:`CONVEXADAM_SETTINGS`) on the CPU, after a
    body-centroid translation (``prealign``); ``convexadam_options`` override its parameters (e.g.
    ``selected_niter`` for quick tests).  Returns the field on the fixed grid (LPS mm, fixed -> moving)."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    torch.set_num_threads(int(threads))
    torch.manual_seed(int(seed))
    stages: dict[str, float] = {}
    t = time.perf_counter()
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    stages["read"] = time.perf_counter() - t

    t = time.perf_counter()
    fixed_grid = Grid.from_image(fixed)
    translation = (_body_centroid_lps(moving) - _body_centroid_lps(fixed)) if prealign else np.zeros(3)
    base = make_working_grid(fixed_grid, float(spacing_mm)) if spacing_mm else fixed_grid
    grid_sp = int(convexadam_options.get("grid_sp", CONVEXADAM_SETTINGS["parameters"]["grid_sp"]))
    # a whole number of ConvexAdam's control cells along every axis (padded beyond the far end of the grid)
    size = tuple(int(-(-n // grid_sp) * grid_sp) for n in base.size)
    grid = Grid(size=size, spacing=base.spacing, origin=base.origin, direction=base.direction)
    shift = sitk.TranslationTransform(3, [float(v) for v in translation])  # fixed point x -> moving point x + t
    fixed_on_grid = resample_image(fixed, grid, None, "linear", OUTSIDE_FOV_HU, sitk.sitkFloat32)
    moving_on_grid = resample_image(moving, grid, shift, "linear", OUTSIDE_FOV_HU, sitk.sitkFloat32)
    stages["prealign"] = time.perf_counter() - t

    t = time.perf_counter()
    parameters = {**CONVEXADAM_SETTINGS["parameters"], **convexadam_options}
    disp_zyx = convex_adam_pt(fixed_on_grid, moving_on_grid, device=torch.device("cpu"), dtype=torch.float32,
                              **parameters)
    stages["registration"] = time.perf_counter() - t

    t = time.perf_counter()
    # array-order voxel components (z, y, x) -> index order (i, j, k) -> LPS mm; then the translation
    u_mm = grid.displacement_to_mm(np.asarray(disp_zyx, dtype=np.float64)[..., ::-1]) + translation
    field = _field_image(u_mm, grid)
    displacement = resample_image(field, fixed_grid, None, "linear", 0.0, sitk.sitkVectorFloat32)
    stages["field"] = time.perf_counter() - t
    settings = dict(CONVEXADAM_SETTINGS, parameters=parameters, prealign=prealign, spacing_mm=spacing_mm,
                    prealign_translation_mm=[float(v) for v in translation])
    return MethodOutput(displacement_lps=displacement, stages=stages, settings=settings)


def warm_up_convexadam() -> None:
    """Import ConvexAdam and torch (with ``torch._dynamo``, which the first ``torch.optim`` optimiser imports)
    before the clock starts."""
    import convexAdam.convex_adam_MIND  # noqa: F401
    import torch
    import torch._dynamo

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


# --------------------------------------------------------------------------------------------------------------
# SimpleITK classical: affine (Mattes MI) + multi-resolution fast symmetric-forces demons
# --------------------------------------------------------------------------------------------------------------

SITK_DEMONS_SETTINGS: dict = {
    "affine": {
        "initialiser": "CenteredTransformInitializer (geometry)",
        "metric": "Mattes MI, 50 bins, 1 % random sampling",
        "optimiser": "regular-step gradient descent (lr 1.0, 200 iterations/level), physical-shift scales",
        "shrink_factors": [4, 2, 1],
        "smoothing_sigmas_vox": [2, 1, 0],
    },
    "demons": {
        "filter": "FastSymmetricForcesDemonsRegistrationFilter",
        "intensity": "HU clipped to the soft-tissue window, as demons assume equal intensities",
        "window_hu": list(DEMONS_WINDOW_HU),
        "shrink_factors": [4, 2, 1],
        "smoothing_sigmas_mm": [6.0, 3.0, 0.0],
        "iterations_per_level": [40, 20, 10],
        "field_standard_deviation_vox": 2.0,
    },
    "reference": "SimpleITK notebooks, 66_Registration_Demons (multiscale_demons)",
}


def run_sitk_demons(fixed_path: str, moving_path: str, *, threads: int = 2, seed: int = 0) -> MethodOutput:
    """SimpleITK affine + multi-resolution symmetric-forces demons (see :data:`SITK_DEMONS_SETTINGS`)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    stages: dict[str, float] = {}
    t = time.perf_counter()
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    stages["read"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = SITK_DEMONS_SETTINGS["affine"]
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.01, int(seed) + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(cfg["shrink_factors"])
    method.SetSmoothingSigmasPerLevel(cfg["smoothing_sigmas_vox"])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    affine = method.Execute(fixed, moving)
    stages["affine"] = time.perf_counter() - t

    t = time.perf_counter()
    dcfg = SITK_DEMONS_SETTINGS["demons"]
    low, high = DEMONS_WINDOW_HU
    fixed_w = sitk.Clamp(fixed, sitk.sitkFloat32, low, high)
    moving_w = sitk.Clamp(resample_image(moving, fixed, affine, "linear", OUTSIDE_FOV_HU, sitk.sitkFloat32),
                          sitk.sitkFloat32, low, high)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(dcfg["field_standard_deviation_vox"])
    field = None
    for shrink, sigma, iterations in zip(dcfg["shrink_factors"], dcfg["smoothing_sigmas_mm"],
                                         dcfg["iterations_per_level"]):
        f_level = _shrink(fixed_w, shrink, sigma)
        m_level = _shrink(moving_w, shrink, sigma)
        if field is None:
            field = sitk.Image(f_level.GetSize(), sitk.sitkVectorFloat64)
            field.CopyInformation(f_level)
        else:
            field = resample_image(field, f_level, None, "linear", 0.0, sitk.sitkVectorFloat64)
        demons.SetNumberOfIterations(int(iterations))
        field = demons.Execute(f_level, m_level, field)
    stages["demons"] = time.perf_counter() - t

    t = time.perf_counter()
    composite = sitk.CompositeTransform([affine, displacement_transform(field)])  # x -> affine(x + d(x))
    displacement = dense_displacement_image(composite, Grid.from_image(fixed))
    stages["field"] = time.perf_counter() - t
    return MethodOutput(displacement_lps=displacement, stages=stages, settings=SITK_DEMONS_SETTINGS)


def _shrink(image: sitk.Image, factor: int, sigma_mm: float) -> sitk.Image:
    if sigma_mm > 0:
        image = sitk.SmoothingRecursiveGaussian(image, float(sigma_mm))
    if factor <= 1:
        return image
    size = [max(2, round(s / factor)) for s in image.GetSize()]
    spacing = [sp * (s - 1) / max(n - 1, 1) if n > 1 else sp
               for sp, s, n in zip(image.GetSpacing(), image.GetSize(), size)]
    reference = Grid(tuple(size), tuple(spacing), image.GetOrigin(), image.GetDirection())
    return resample_image(image, reference, None, "linear", float(sitk.GetArrayViewFromImage(image).min()))


def warm_up_elastix() -> None:
    """Load itk-elastix's lazily imported modules before the clock starts."""
    import itk

    for name in ("imread", "ParameterObject", "elastix_registration_method", "transformix_deformation_field",
                 "array_from_image", "MultiThreaderBase"):
        getattr(itk, name)
    itk.ParameterObject.New()


def warm_up_ants() -> None:
    import ants  # noqa: F401


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------

#: name -> (method spec, python package it needs or None)
PEERS: dict[str, tuple[MethodSpec, str | None]] = {
    "elastix-bspline": (MethodSpec("elastix-bspline", f"{__name__}:run_elastix",
                                   {"final_grid_spacing_mm": 10.0, "resolutions": 4}, f"{__name__}:warm_up_elastix"),
                        "itk"),
    "ants-syn": (MethodSpec("ants-syn", f"{__name__}:run_ants", {"type_of_transform": "SyN"},
                            f"{__name__}:warm_up_ants"), "ants"),
    "ants-synra": (MethodSpec("ants-synra", f"{__name__}:run_ants", {"type_of_transform": "SyNRA"},
                              f"{__name__}:warm_up_ants"), "ants"),
    "convexadam": (MethodSpec("convexadam", f"{__name__}:run_convexadam", {}, f"{__name__}:warm_up_convexadam"),
                   "convexAdam"),
    "sitk-demons": (MethodSpec("sitk-demons", f"{__name__}:run_sitk_demons", {}), None),
}


def available_peers(names: list[str] | None = None) -> list[MethodSpec]:
    """The peers (of ``names``, default all) whose package is installed, as method specs."""
    chosen = []
    for name in list(PEERS) if names is None else names:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
        spec, package = PEERS[name]
        if package is None or importlib.util.find_spec(package) is not None:
            chosen.append(spec)
    return chosen


# --------------------------------------------------------------------------------------------------------------
# a transform evaluated densely by ITK (the demons' affine + field; the reference in registration's tests)
# --------------------------------------------------------------------------------------------------------------


def dense_displacement_image(transform: sitk.Transform, grid: Grid, slab: int = 32) -> sitk.Image:
    """``transform(x) - x`` at every voxel of ``grid`` as a ``sitkVectorFloat32`` image (LPS mm).

    Computed slab by slab (``slab`` z-slices, float64 inside ITK) straight into the output image's buffer: the
    memory is the output plus one slab, not twice the output.
    """
    image = grid.apply_to(sitk.Image([int(v) for v in grid.size], sitk.sitkVectorFloat32, 3))
    out = writable_array_view(image)
    nz = grid.size[2]
    for z0 in range(0, nz, slab):
        n = min(slab, nz - z0)
        origin = grid.index_to_physical(np.array([[0.0, 0.0, float(z0)]]))[0]
        field = sitk.TransformToDisplacementField(
            transform,
            sitk.sitkVectorFloat64,
            [grid.size[0], grid.size[1], n],
            [float(v) for v in origin],
            grid.spacing,
            grid.direction,
        )
        out[z0: z0 + n] = sitk.GetArrayViewFromImage(field)
        del field
    del out
    return image

