"""Synthetic motion with a known answer, as displacement fields ``u`` mapping a fixed point ``x`` to the moving point
``x + u(x)``.

On an image (SimpleITK, LPS mm, on the image's grid): :func:`synthetic_abdominal_motion` (organ-driven breathing,
bowel changes and a rigid patient shift) and :func:`van_eijnatten_deformation` (van Eijnatten et al. 2021's random
smooth field).  Their deformable parts are computed on a coarse isotropic grid and resampled onto the image's grid.

On a tensor grid (torch, ``(1, 3, D, H, W)`` in voxels of that grid, channels ``(d, h, w)``, as
:mod:`deepabdominalreg.spatial`; amplitudes in mm, converted with ``spacing_mm`` along ``(d, h, w)``): thin-plate
splines (:func:`tps_displacement`, :func:`random_tps_displacement`) and affine / rigid motion
(:func:`affine_displacement`, :func:`random_rigid_displacement`), the training augmentation's motion models.
:func:`van_eijnatten_displacement`, the one van Eijnatten generator, serves both: it returns LPS mm on a
:class:`~deepabdominalreg.geometry.Grid` (for a bare tensor, :func:`tensor_grid`), and the caller converts to voxels
through the grid.  Randomness comes only from the ``generator`` argument (a ``torch.Generator``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from deepabdominalreg import spatial
from deepabdominalreg.config import BODY_THRESHOLD_HU, OUTSIDE_FOV_HU
from deepabdominalreg.geometry import Grid, make_working_grid, resample_image

__all__ = [
    "DEFAULT_LABEL_GROUPS",
    "Spacing",
    "affine_displacement",
    "coarse_body_mask",
    "coarse_grid",
    "gaussian_smooth",
    "labels_present",
    "random_rigid_displacement",
    "random_tps_displacement",
    "random_uniform",
    "rotation_matrix",
    "synthetic_abdominal_motion",
    "tensor_grid",
    "tps_displacement",
    "van_eijnatten_deformation",
    "van_eijnatten_displacement",
]

#: Label ids (TotalSegmentator ``total``, shared by the phantom) that drive each part of the abdominal motion:
#: ``breathing`` organs move most with the diaphragm, ``bowel`` gets local random changes, ``rigid`` structures
#: (spine, pelvis, posterior muscles, aorta) keep almost still.
DEFAULT_LABEL_GROUPS: dict[str, list[int]] = {
    "breathing": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 64],
    "bowel": [18, 19, 20],
    "rigid": [25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50,
              52, 75, 76, 77, 78, 79, 86, 87],
}
_COARSE_SPACING_MM = 5.0

#: Spacing of a tensor grid in mm: one value (isotropic) or three, along ``(d, h, w)``.
Spacing = float | Sequence[float]


# ----------------------------------------------------------------------------------------------------------------
# helpers on the coarse working grid
# ----------------------------------------------------------------------------------------------------------------


def coarse_grid(reference: sitk.Image | Grid, spacing_mm: float = _COARSE_SPACING_MM) -> Grid:
    """An isotropic grid of ``spacing_mm`` with the reference's direction covering its voxel centres."""
    return make_working_grid(reference, spacing_mm, max_voxels_per_axis=160)


def _physical_points(grid: Grid) -> np.ndarray:
    """LPS coordinates (mm) of every voxel centre of ``grid``, shape ``(z, y, x, 3)``."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.shape_zyx], indexing="ij")
    m = grid.index_to_physical_matrix()
    idx = np.stack([i, j, k], axis=-1)
    return idx @ m[:3, :3].T + m[:3, 3]


def _mask_on_grid(labels: sitk.Image, ids: Sequence[int], grid: Grid) -> np.ndarray:
    """Fraction (0..1) of each coarse voxel inside the union of ``ids`` (``zyx`` float array)."""
    array = sitk.GetArrayViewFromImage(labels)
    mask = np.isin(array, np.asarray(list(ids), dtype=array.dtype)).astype(np.float32)
    image = sitk.GetImageFromArray(mask)
    image.CopyInformation(labels)
    # light anti-aliasing on the fine grid before sampling it on the coarse grid
    fine_spacing = min(labels.GetSpacing())
    sigma = 0.5 * max(grid.spacing[0] - fine_spacing, 0.0)
    if sigma > 0:
        image = sitk.SmoothingRecursiveGaussian(image, sigma)
    return sitk.GetArrayFromImage(resample_image(image, grid, interpolator="linear", default_value=0.0))


def coarse_body_mask(reference: sitk.Image, grid: Grid, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The patient's body on the coarse grid: largest connected region above ``threshold_hu``, holes filled."""
    image = resample_image(sitk.Cast(reference, sitk.sitkFloat32), grid, interpolator="linear",
                           default_value=OUTSIDE_FOV_HU)
    array = sitk.GetArrayFromImage(image)
    above = array > threshold_hu
    if not above.any():
        return np.ones(array.shape, dtype=bool)
    components, count = ndimage.label(above)
    if count > 1:
        sizes = ndimage.sum(above, components, index=np.arange(1, count + 1))
        above = components == (1 + int(np.argmax(sizes)))
    filled = ndimage.binary_fill_holes(above)
    for k in range(filled.shape[0]):  # air in the bowel touching the border of a slice stays body
        filled[k] = ndimage.binary_fill_holes(filled[k])
    return filled


def _gaussian(array: np.ndarray, sigma_mm: float, spacing_mm: float, mode: str = "nearest") -> np.ndarray:
    return ndimage.gaussian_filter(array, sigma=sigma_mm / spacing_mm, mode=mode)


def _exponentiate(v_zyx3: np.ndarray, grid: Grid, steps: int = 6) -> np.ndarray:
    """Displacement (LPS mm) of the exponential of a stationary velocity field (LPS mm) on ``grid``: scaling and
    squaring (:func:`deepabdominalreg.spatial.integrate_velocity`, linear interpolation, border values outside)."""
    velocity = spatial.mm_lps_to_disp_vox(v_zyx3, grid, dtype=torch.float64)
    return spatial.disp_vox_to_mm_lps(spatial.integrate_velocity(velocity, steps), grid)


def _min_jacobian_determinant(u_zyx3: np.ndarray, grid: Grid) -> float:
    """Smallest det(I + grad u) of an LPS-mm field on ``grid`` (central differences; the same in voxel units)."""
    return float(spatial.jacobian_determinant(spatial.mm_lps_to_disp_vox(u_zyx3, grid, dtype=torch.float64)).min())


def _max_norm(u_zyx3: np.ndarray, where: np.ndarray | None = None) -> float:
    """Largest vector length (mm), over the voxels in ``where`` when given."""
    norm = np.sqrt((u_zyx3**2).sum(-1))
    if where is not None:
        norm = norm[where]
    return float(norm.max()) if norm.size else 0.0


def _inside_reference(points: np.ndarray, reference: sitk.Image | Grid, reach_mm: float) -> np.ndarray:
    """Coarse points (``(z, y, x, 3)`` LPS mm) within ``reach_mm`` of the reference's voxel-centre box.

    With ``reach_mm`` = the coarse spacing these are exactly the points that linear interpolation onto the
    reference uses, so the largest vector on the reference grid is at most the largest over these points.
    """
    grid = reference if isinstance(reference, Grid) else Grid.from_image(reference)
    index = grid.physical_to_index(points.reshape(-1, 3))
    size = np.asarray(grid.size, dtype=np.float64)
    reach = reach_mm / np.asarray(grid.spacing) - 1e-6
    inside = np.all((index > -reach) & (index < size - 1 + reach), axis=1)
    return inside.reshape(points.shape[:3])


def _field_image(u_zyx3: np.ndarray, grid: Grid) -> sitk.Image:
    return grid.image_from_array(np.ascontiguousarray(u_zyx3, dtype=np.float64), is_vector=True)


def _to_reference(u_zyx3: np.ndarray, coarse: Grid, reference: sitk.Image) -> sitk.Image:
    field_image = _field_image(u_zyx3, coarse)
    return resample_image(field_image, reference, interpolator="linear", default_value=0.0,
                          output_pixel_type=sitk.sitkVectorFloat64)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _rotation_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * k @ k


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _torch_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for ``seed`` in its own ``stream`` (as NumPy's ``default_rng([seed, stream])``)."""
    state = np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


# ----------------------------------------------------------------------------------------------------------------
# motion of an image (SimpleITK, LPS mm)
# ----------------------------------------------------------------------------------------------------------------


def labels_present(labels: sitk.Image | None) -> set[int]:
    """The label ids (other than 0) found in ``labels``; empty for ``None``."""
    if labels is None:
        return set()
    return {int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels))} - {0}


def synthetic_abdominal_motion(
    reference: sitk.Image,
    labels: sitk.Image | None = None,
    *,
    seed: int = 0,
    amplitude_mm: float = 10.0,
    rigid_shift_mm: float = 3.0,
    rotation_deg: float = 2.0,
    label_groups: dict[str, Sequence[int]] | None = None,
) -> sitk.Image:
    """A realistic, smooth, non-folding abdominal displacement field ``u`` on ``reference``'s grid (LPS mm).

    Parts: (1) breathing: a mostly cranio-caudal (LPS z) shift, with a smaller anterior component, of the
    ``breathing`` organs (liver, spleen, kidneys, stomach, ...) and of the upper abdomen, fading towards the pelvis
    and attenuated over the posterior wall and the ``rigid`` structures (spine nearly still); (2) bowel: a few
    smooth local random bumps (Gaussian, sigma 15-30 mm) in the ``bowel`` region; (3) a rigid patient motion: a
    translation of exactly ``rigid_shift_mm`` and a rotation of exactly ``rotation_deg`` about a random axis
    through the body centre.  Parts (1)+(2) form a stationary velocity field that is exponentiated (scaling and
    squaring), so the deformable part is diffeomorphic; it is scaled so that its largest displacement is
    ``amplitude_mm`` (mm).  The rigid motion is composed after it, so ``det(grad(x + u)) > 0`` everywhere.

    ``labels`` (same grid as ``reference``) localises the organs; ``label_groups`` maps ``"breathing"``,
    ``"bowel"`` and ``"rigid"`` to label ids (default :data:`DEFAULT_LABEL_GROUPS`, TotalSegmentator ``total`` ids,
    which the phantom uses too).  Without labels (or when no breathing organ is present) the motion follows the
    geometry: the upper part of the body moves most.  The field is computed on a coarse 5 mm grid and resampled
    (linearly, through :func:`resample_image`) onto ``reference``'s grid; returns ``sitkVectorFloat64``.
    """
    if amplitude_mm < 0 or rigid_shift_mm < 0 or rotation_deg < 0:
        raise ValueError("amplitude_mm, rigid_shift_mm and rotation_deg must be >= 0")
    if labels is not None and tuple(labels.GetSize()) != tuple(reference.GetSize()):
        raise ValueError(f"labels size {labels.GetSize()} differs from the reference size {reference.GetSize()}; "
                         "resample the labels onto the reference grid first")
    groups = {key: list(value) for key, value in (label_groups or DEFAULT_LABEL_GROUPS).items()}
    rng = np.random.default_rng([int(seed), 31337])
    coarse = coarse_grid(reference)
    h = coarse.spacing[0]
    points = _physical_points(coarse)
    y, z = points[..., 1], points[..., 2]
    body = coarse_body_mask(reference, coarse)
    body_smooth = np.clip(_gaussian(body.astype(np.float32), 10.0, h), 0.0, 1.0)
    inside = _inside_reference(points, reference, h)
    present = labels_present(labels)

    def group_mask(name: str) -> np.ndarray | None:
        ids = [i for i in groups.get(name, []) if i in present]
        if not ids:
            return None
        return _mask_on_grid(labels, ids, coarse)

    breathing = group_mask("breathing")
    bowel = group_mask("bowel")
    rigid = group_mask("rigid")

    zb, yb = z[body], y[body]
    z_lo, z_hi = (float(zb.min()), float(zb.max())) if zb.size else (float(z.min()), float(z.max()))
    extent = max(z_hi - z_lo, 1.0)

    # (1) breathing weight in 0..1
    if breathing is not None and breathing.max() > 0.05:
        organs = breathing > 0.5
        z_org = z[organs] if organs.any() else z[breathing > 0.1]
        profile = _smoothstep((z - (z_org.min() - 40.0)) / max(np.median(z_org) - z_org.min() + 40.0, 1.0))
        organ_weight = np.clip(_gaussian(breathing, 10.0, h) * 1.6, 0.0, 1.0)
        weight = np.maximum(organ_weight, 0.5 * profile * body_smooth)
    else:
        profile = _smoothstep((z - (z_lo + 0.25 * extent)) / (0.6 * extent))
        weight = profile * body_smooth
    # less motion over the posterior wall and near the spine
    y_spine = float(np.median(y[rigid > 0.5])) if rigid is not None and (rigid > 0.5).any() else (
        float(np.percentile(yb, 75)) if yb.size else 0.0)
    weight = weight * (1.0 - 0.6 / (1.0 + np.exp(-(y - (y_spine - 10.0)) / 12.0)))
    if rigid is not None:
        weight = weight * (1.0 - 0.9 * np.clip(_gaussian(rigid, 6.0, h) * 1.5, 0.0, 1.0))
    weight = _gaussian(weight, 8.0, h)
    phase = rng.choice([-1.0, 1.0])  # inspiration (organs down and forwards) or expiration
    direction = np.array([rng.uniform(-0.1, 0.1), -rng.uniform(0.15, 0.4), -1.0])
    direction = phase * direction / np.linalg.norm(direction)
    velocity = weight[..., None] * direction

    # (2) bowel bumps
    if bowel is not None and (bowel > 0.5).any():
        candidates = np.argwhere(bowel > 0.5)
    else:
        lower = body & (z < z_lo + 0.6 * extent) & (y < (np.median(yb) if yb.size else 0.0))
        candidates = np.argwhere(lower if lower.any() else body)
    if len(candidates):
        for _ in range(int(rng.integers(3, 7))):
            centre = points[tuple(candidates[rng.integers(len(candidates))])]
            sigma = rng.uniform(15.0, 30.0)
            r2 = ((points - centre) ** 2).sum(-1)
            velocity += rng.uniform(0.3, 0.7) * np.exp(-r2 / (2.0 * sigma**2))[..., None] * _random_unit(rng)

    # scale so that the deformable displacement peaks at amplitude_mm
    u_def = np.zeros_like(velocity)
    peak_v = _max_norm(velocity, inside)
    if amplitude_mm > 0 and peak_v > 0:
        scale = amplitude_mm / peak_v
        for _ in range(4):
            u_def = _exponentiate(velocity * scale, coarse)
            peak = _max_norm(u_def, inside)
            if abs(peak - amplitude_mm) <= 0.05 * amplitude_mm:
                break
            scale *= amplitude_mm / peak
        # exact peak: a rescale by a few percent keeps the (smooth) map invertible; checked just below
        u_def *= amplitude_mm / _max_norm(u_def, inside)
    min_det = _min_jacobian_determinant(u_def, coarse)
    if min_det <= 0.05:
        raise RuntimeError(f"synthetic motion folds (min det J {min_det:.3f}); lower amplitude_mm")

    # (3) rigid motion composed after the deformation: x -> R (x + u_def(x) - c) + c + t
    centre = points[body].mean(0) if body.any() else points.reshape(-1, 3).mean(0)
    rot = _rotation_matrix(_random_unit(rng), np.deg2rad(rotation_deg) * rng.choice([-1.0, 1.0]))
    shift = rigid_shift_mm * _random_unit(rng)
    # u = R (x + u_def - c) + c + t - x, written so that R = I and t = 0 give u_def exactly
    u = (points + u_def - centre) @ (rot - np.eye(3)).T + u_def + shift
    return _to_reference(u, coarse, reference)


def van_eijnatten_deformation(
    reference: sitk.Image,
    *,
    seed: int = 0,
    amplitude_mm: float = 10.0,
    n_points: int = 100,
    min_distance_mm: float = 40.0,
    sigma_mm: float = 25.0,
    body_threshold_hu: float = BODY_THRESHOLD_HU,
) -> sitk.Image:
    """A random smooth field in the style of van Eijnatten et al. 2021, on ``reference``'s grid (LPS mm).

    :func:`van_eijnatten_displacement` on the coarse 5 mm grid, inside the body (voxels above ``body_threshold_hu``,
    largest component, holes filled), scaled so that its largest displacement on ``reference``'s grid is
    ``amplitude_mm``, then resampled (linearly) onto that grid.  Same convention as
    :func:`synthetic_abdominal_motion`; raises ``RuntimeError`` if the field would fold (increase ``sigma_mm`` or
    lower ``amplitude_mm``).
    """
    if amplitude_mm < 0 or n_points < 1 or min_distance_mm < 0 or sigma_mm <= 0:
        raise ValueError("amplitude_mm >= 0, n_points >= 1, min_distance_mm >= 0 and sigma_mm > 0 are required")
    generator = _torch_generator(seed, 4242)
    coarse = coarse_grid(reference)
    body = coarse_body_mask(reference, coarse, body_threshold_hu)
    inside = _inside_reference(_physical_points(coarse), reference, coarse.spacing[0])
    u = van_eijnatten_displacement(torch.from_numpy(body), coarse, amplitude_mm=amplitude_mm, n_points=n_points,
                                   min_distance_mm=min_distance_mm, sigma_mm=sigma_mm, generator=generator,
                                   peak_within=torch.from_numpy(inside))
    min_det = _min_jacobian_determinant(u, coarse)
    if min_det <= 0.0:
        raise RuntimeError(f"van Eijnatten field folds (min det J {min_det:.3f}); increase sigma_mm "
                           "or lower amplitude_mm")
    return _to_reference(u, coarse, reference)


# ----------------------------------------------------------------------------------------------------------------
# motion on a tensor grid (torch, voxels)
# ----------------------------------------------------------------------------------------------------------------


def _spacing(spacing_mm: Spacing, device=None, dtype=torch.float32) -> torch.Tensor:
    values = [float(spacing_mm)] * 3 if isinstance(spacing_mm, (int, float)) else [float(s) for s in spacing_mm]
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"spacing_mm must be one positive value or three (d, h, w), got {spacing_mm}")
    return torch.tensor(values, device=device, dtype=dtype)


def random_uniform(generator: torch.Generator | None, low: float, high: float, shape=()) -> torch.Tensor:
    """Draws uniform in ``[low, high)`` (float64, CPU) from ``generator``: the one source of randomness of the
    tensor motion models and of the training augmentation, so that a seed reproduces a pair on any device."""
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be (D, H, W) with every size >= 2, got {shape}")
    return shape


def tensor_grid(shape: Sequence[int], spacing_mm: Spacing = 1.0) -> Grid:
    """The :class:`Grid` of a ``(D, H, W)`` tensor with ``spacing_mm`` along ``(d, h, w)``: origin 0, identity
    direction, so LPS ``x, y, z`` run along ``w, h, d`` (a training crop, whose fields need no patient frame)."""
    d, h, w = (int(s) for s in shape)
    spacing = _spacing(spacing_mm, dtype=torch.float64).tolist()
    return Grid(size=(w, h, d), spacing=tuple(spacing[::-1]), origin=(0.0, 0.0, 0.0),
                direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


# ----------------------------------------------------------------------------------------------------------------
# thin-plate splines
# ----------------------------------------------------------------------------------------------------------------


def _tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``U(|a_i - b_j|) = |a_i - b_j|`` (3D biharmonic radial basis), ``(N, M)``."""
    return torch.cdist(a, b)


def tps_displacement(
    shape: Sequence[int],
    control_points: torch.Tensor,
    control_displacements: torch.Tensor,
    stride: int = 1,
    regularisation: float = 0.0,
) -> torch.Tensor:
    """Dense thin-plate-spline displacement ``(1, 3, D, H, W)`` (voxels) interpolating control displacements.

    ``control_points`` ``(N, 3)`` and ``control_displacements`` ``(N, 3)`` are voxel coordinates/vectors ``(d, h, w)``
    (``N >= 4``, not all coplanar).  The spline is ``f(x) = a0 + A x + sum_i w_i U(|x - c_i|)`` with ``U(r) = r``,
    solved exactly (``regularisation = 0``) so that ``f(c_i) = v_i``; affine fields are reproduced exactly.
    With ``stride > 1`` the spline is evaluated on every ``stride``-th voxel (plus the last) and trilinearly
    interpolated in between (the spline is smooth; this saves memory and time on large grids).
    """
    shape = _check_shape(shape)
    c = control_points.to(torch.float64)
    v = control_displacements.to(torch.float64)
    if c.ndim != 2 or c.shape[1] != 3 or v.shape != c.shape or c.shape[0] < 4:
        raise ValueError("control_points and control_displacements must both be (N, 3) with N >= 4")
    n = c.shape[0]
    k = _tps_kernel(c, c) + regularisation * torch.eye(n, dtype=torch.float64, device=c.device)
    p = torch.cat([torch.ones(n, 1, dtype=torch.float64, device=c.device), c], dim=1)
    system = torch.zeros(n + 4, n + 4, dtype=torch.float64, device=c.device)
    system[:n, :n] = k
    system[:n, n:] = p
    system[n:, :n] = p.T
    rhs = torch.zeros(n + 4, 3, dtype=torch.float64, device=c.device)
    rhs[:n] = v
    coefficients = torch.linalg.solve(system, rhs)
    weights, affine = coefficients[:n], coefficients[n:]

    stride = max(int(stride), 1)
    axes = []
    for s in shape:
        ax = torch.arange(0, s, stride, dtype=torch.float64, device=c.device)
        if ax[-1] != s - 1:
            ax = torch.cat([ax, torch.tensor([s - 1.0], dtype=torch.float64, device=c.device)])
        axes.append(ax)
    coarse_shape = tuple(len(a) for a in axes)
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    out = torch.empty(points.shape[0], 3, dtype=torch.float64, device=c.device)
    chunk = 65536
    for start in range(0, points.shape[0], chunk):
        q = points[start: start + chunk]
        out[start: start + chunk] = (
            _tps_kernel(q, c) @ weights + torch.cat([torch.ones(len(q), 1, dtype=q.dtype, device=q.device), q], 1)
            @ affine
        )
    field = out.reshape(*coarse_shape, 3).permute(3, 0, 1, 2).unsqueeze(0).to(torch.float32)
    if coarse_shape == shape:
        return field
    # the coarse samples are not uniformly spaced at the end (the last voxel is added): interpolate per axis
    return _interpolate_irregular(field, axes, shape)


def _interpolate_irregular(field: torch.Tensor, axes: list[torch.Tensor], shape: tuple[int, int, int]):
    """Trilinear interpolation from samples at voxel positions ``axes`` (per axis, increasing) to every voxel."""
    out = field.to(torch.float64)
    for dim, (ax, size) in enumerate(zip(axes, shape)):
        target = torch.arange(size, dtype=torch.float64, device=field.device)
        upper = torch.searchsorted(ax, target, right=False).clamp(1, len(ax) - 1)
        lower = upper - 1
        t = ((target - ax[lower]) / (ax[upper] - ax[lower])).clamp(0, 1)
        view = [1, 1, 1, 1, 1]
        view[dim + 2] = size
        a = out.index_select(dim + 2, lower)
        b = out.index_select(dim + 2, upper)
        out = a + (b - a) * t.view(view)
    return out.to(field.dtype)


def random_tps_displacement(
    shape: Sequence[int],
    spacing_mm: Spacing = 1.0,
    *,
    grid_points: int = 8,
    max_displacement_mm: float = 6.0,
    generator: torch.Generator | None = None,
    stride: int = 4,
) -> torch.Tensor:
    """DDMR's random TPS deformation: a ``grid_points``³ control grid spanning the volume (corner to corner),
    each control point displaced by a vector with components uniform in ``[-max, max]`` mm; ``(1, 3, D, H, W)`` voxels.

    The dense field interpolates the control vectors (so its largest component is about ``max_displacement_mm``).
    """
    shape = _check_shape(shape)
    if grid_points < 2 or max_displacement_mm < 0:
        raise ValueError("grid_points >= 2 and max_displacement_mm >= 0 are required")
    axes = [torch.linspace(0, s - 1, grid_points, dtype=torch.float64) for s in shape]
    control = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    vectors_mm = random_uniform(generator, -max_displacement_mm, max_displacement_mm, (control.shape[0], 3))
    vectors_vox = vectors_mm / _spacing(spacing_mm, dtype=torch.float64)
    return tps_displacement(shape, control, vectors_vox, stride=stride)


# ----------------------------------------------------------------------------------------------------------------
# rigid / affine
# ----------------------------------------------------------------------------------------------------------------


def rotation_matrix(angles_deg: Sequence[float]) -> torch.Tensor:
    """Rotation ``R = R_d R_h R_w`` (``(3, 3)`` float64) by ``angles_deg`` about the ``d``, ``h``, ``w`` axes."""
    a = [math.radians(float(x)) for x in angles_deg]

    def rot(i: int, j: int, t: float) -> torch.Tensor:
        m = torch.eye(3, dtype=torch.float64)
        m[i, i] = m[j, j] = math.cos(t)
        m[i, j], m[j, i] = -math.sin(t), math.sin(t)
        return m

    return rot(1, 2, a[0]) @ rot(0, 2, a[1]) @ rot(0, 1, a[2])


def affine_displacement(
    shape: Sequence[int],
    matrix: torch.Tensor,
    translation_mm: Sequence[float] = (0.0, 0.0, 0.0),
    spacing_mm: Spacing = 1.0,
    centre_vox: Sequence[float] | None = None,
) -> torch.Tensor:
    """Displacement ``(1, 3, D, H, W)`` (voxels) of the physical map ``x -> M (x - c) + c + t`` (mm, ``(d, h, w)``).

    ``matrix`` ``M`` ``(3, 3)`` acts on mm coordinates (e.g. :func:`rotation_matrix`), ``c`` is the grid centre
    unless ``centre_vox`` is given (voxels), ``t`` is ``translation_mm``.
    """
    shape = _check_shape(shape)
    s = _spacing(spacing_mm, dtype=torch.float64)
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.shape != (3, 3):
        raise ValueError(f"matrix must be (3, 3), got {tuple(m.shape)}")
    centre = torch.tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float64) if centre_vox is None else \
        torch.as_tensor(centre_vox, dtype=torch.float64)
    t_vox = torch.as_tensor(translation_mm, dtype=torch.float64) / s
    m_vox = torch.diag(1.0 / s) @ m @ torch.diag(s)  # voxel-space matrix of the mm map
    grid = spatial.identity_grid(shape, dtype=torch.float64)[0].reshape(3, -1)  # (3, N) voxels
    moved = m_vox @ (grid - centre[:, None]) + centre[:, None] + t_vox[:, None]
    return (moved - grid).reshape(1, 3, *shape).to(torch.float32)


def random_rigid_displacement(
    shape: Sequence[int],
    spacing_mm: Spacing = 1.0,
    *,
    max_rotation_deg: float = 10.0,
    max_translation_mm: float = 30.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random rigid motion about the grid centre: angles uniform in ``[-max, max]`` degrees about each axis,
    translation components uniform in ``[-max, max]`` mm; ``(1, 3, D, H, W)`` voxels."""
    angles = random_uniform(generator, -max_rotation_deg, max_rotation_deg, (3,))
    translation = random_uniform(generator, -max_translation_mm, max_translation_mm, (3,))
    return affine_displacement(shape, rotation_matrix(angles.tolist()), translation.tolist(), spacing_mm)


# ----------------------------------------------------------------------------------------------------------------
# van Eijnatten random fields
# ----------------------------------------------------------------------------------------------------------------


def gaussian_smooth(x: torch.Tensor, sigma_vox: Sequence[float] | float, truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, C, D, H, W)`` with zero padding; ``sigma_vox`` per axis (voxels).

    Weights are normalised to 1 (a constant far from the borders is unchanged; the zero padding pulls the
    borders towards 0, which keeps a random field vanishing outside the volume).
    """
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, D, H, W), got {tuple(x.shape)}")
    sigmas = [float(sigma_vox)] * 3 if isinstance(sigma_vox, (int, float)) else [float(s) for s in sigma_vox]
    channels = x.shape[1]
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        radius = max(math.ceil(truncate * sigma), 1)
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = kernel / kernel.sum()
        view = [1, 1, 1]
        view[axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        x = F.conv3d(x, kernel.view(1, 1, *view).expand(channels, 1, *view), padding=tuple(padding), groups=channels)
    return x


def van_eijnatten_displacement(
    mask: torch.Tensor,
    grid: Grid,
    *,
    amplitude_mm: float = 10.0,
    n_points: int = 100,
    min_distance_mm: float = 40.0,
    sigma_mm: float = 25.0,
    generator: torch.Generator | None = None,
    peak_within: torch.Tensor | None = None,
) -> np.ndarray:
    """van Eijnatten et al. 2021's simulated deformation on ``grid``: ``(D, H, W, 3)`` LPS mm (float64).

    ``mask`` ``(D, H, W)`` or ``(1, 1, D, H, W)`` on ``grid`` (bool, e.g. the body; on any device, where the
    smoothing runs): up to ``n_points`` voxels of the mask, drawn in random order and kept when at least
    ``min_distance_mm`` from every point kept so far, get a random vector (mm along the grid's axes ``(d, h, w)``,
    components uniform in [-1, 1]); the sparse field is smoothed by a Gaussian of ``sigma_mm``
    (:func:`gaussian_smooth`) and scaled so that its largest displacement (Euclidean norm, mm) over the voxels
    ``peak_within`` (bool ``(D, H, W)``; all voxels when ``None``) is ``amplitude_mm``.  An empty mask or a zero
    amplitude gives zeros (and draws nothing).  Voxels: ``grid.displacement_to_voxels``.
    """
    m = mask.reshape(mask.shape[-3:]).bool()
    shape = tuple(m.shape)
    if shape != tuple(grid.shape_zyx):
        raise ValueError(f"mask shape {shape} differs from the grid's {tuple(grid.shape_zyx)}")
    s = _spacing(tuple(reversed(grid.spacing)), device=mask.device)
    field = torch.zeros(1, 3, *shape, device=mask.device)
    candidates = torch.nonzero(m)
    if candidates.numel() and amplitude_mm != 0:
        order = torch.randperm(len(candidates), generator=generator)
        # greedy selection in random order (a candidate is kept when no kept point is closer than the minimum
        # distance), done as: keep the first remaining candidate, drop every remaining one too close to it, repeat;
        # the same points as the one-by-one loop, in at most n_points vectorised steps (on the CPU)
        remaining = (candidates.cpu()[order].numpy() * s.cpu().numpy()).astype(np.float32)
        remaining_index = order.numpy()
        chosen: list[int] = []
        while len(remaining) and len(chosen) < n_points:
            chosen.append(int(remaining_index[0]))
            far = np.linalg.norm(remaining - remaining[0], axis=1) >= min_distance_mm
            far[0] = False  # the kept point itself (also when the minimum distance is 0)
            remaining, remaining_index = remaining[far], remaining_index[far]
        vectors = random_uniform(generator, -1.0, 1.0, (len(chosen), 3)).to(torch.float32).to(mask.device)
        idx = candidates[chosen]
        field[0, :, idx[:, 0], idx[:, 1], idx[:, 2]] = vectors.T
        field = gaussian_smooth(field, (sigma_mm / s).tolist())
        norm = torch.linalg.norm(field, dim=1)[0]
        if peak_within is not None:
            norm = norm[peak_within.to(mask.device).bool()]
        peak = norm.max() if norm.numel() else torch.zeros(())
        field = field * (float(amplitude_mm) / peak) if peak > 0 else torch.zeros_like(field)
    # mm along the grid's axes (d, h, w) -> along (i, j, k) -> LPS
    along_axes = field[0].flip(0).permute(1, 2, 3, 0).double().cpu().numpy()
    return along_axes @ grid.direction_matrix.T
