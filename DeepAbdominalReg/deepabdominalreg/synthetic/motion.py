"""Synthetic motion with a known answer (fixed -> moving displacement, LPS mm): organ-driven abdominal motion
(breathing, bowel, patient shift) and van Eijnatten et al.'s random smooth deformations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from deepabdominalreg.geometry import Grid, make_working_grid, resample_image

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


def coarse_body_mask(reference: sitk.Image, grid: Grid, threshold_hu: float = -500.0) -> np.ndarray:
    """The patient's body on the coarse grid: largest connected region above ``threshold_hu``, holes filled."""
    image = resample_image(sitk.Cast(reference, sitk.sitkFloat32), grid, interpolator="linear", default_value=-1024.0)
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


def _compose_self(u_zyx3: np.ndarray, grid: Grid) -> np.ndarray:
    """``u(x) + u(x + u(x))`` on ``grid`` (one squaring step), linear interpolation, vectors in LPS mm."""
    d = grid.direction_matrix
    h = np.asarray(grid.spacing)
    # displacement in index units: D^T u / h (the grid is orthonormal)
    u_index = (u_zyx3 @ d) / h
    shape = u_zyx3.shape[:3]
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    coords = np.stack([k + u_index[..., 2], j + u_index[..., 1], i + u_index[..., 0]])
    out = np.empty_like(u_zyx3)
    for c in range(3):
        out[..., c] = u_zyx3[..., c] + ndimage.map_coordinates(u_zyx3[..., c], coords, order=1, mode="nearest")
    return out


def _exponentiate(v_zyx3: np.ndarray, grid: Grid, steps: int = 6) -> np.ndarray:
    """Displacement of the exponential of a stationary velocity field (scaling and squaring), LPS mm."""
    u = v_zyx3 / float(2**steps)
    for _ in range(steps):
        u = _compose_self(u, grid)
    return u


def _jacobian_determinant(u_zyx3: np.ndarray, grid: Grid) -> np.ndarray:
    """det(I + grad u) with central differences in physical units (``zyx`` array)."""
    d = grid.direction_matrix
    h = np.asarray(grid.spacing)
    # derivatives along index axes i, j, k (array axes 2, 1, 0)
    grads = [np.gradient(u_zyx3, axis=axis) for axis in (2, 1, 0)]
    d_index = np.stack(grads, axis=-1)  # (..., component, index axis)
    j = d_index @ (np.diag(1.0 / h) @ d.T) + np.eye(3)
    return (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
            - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
            + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))


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


# ----------------------------------------------------------------------------------------------------------------
# displacement generators
# ----------------------------------------------------------------------------------------------------------------

def labels_present(labels: sitk.Image | None) -> set[int]:
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
    det = _jacobian_determinant(u_def, coarse)
    if det.min() <= 0.05:
        raise RuntimeError(f"synthetic motion folds (min det J {det.min():.3f}); lower amplitude_mm")

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
    body_threshold_hu: float = -500.0,
) -> sitk.Image:
    """A random smooth field in the style of van Eijnatten et al. 2021, on ``reference``'s grid (LPS mm).

    Up to ``n_points`` points are drawn inside the body (voxels above ``body_threshold_hu``, largest component)
    at least ``min_distance_mm`` apart; each gets a random vector with components uniform in [-1, 1]; the sparse
    field is smoothed with a Gaussian of ``sigma_mm`` and scaled so that its largest displacement is
    ``amplitude_mm``.  Same convention as :func:`synthetic_abdominal_motion`; raises ``RuntimeError`` if the
    field would fold (increase ``sigma_mm`` or lower ``amplitude_mm``).
    """
    if amplitude_mm < 0 or n_points < 1 or min_distance_mm < 0 or sigma_mm <= 0:
        raise ValueError("amplitude_mm >= 0, n_points >= 1, min_distance_mm >= 0 and sigma_mm > 0 are required")
    rng = np.random.default_rng([int(seed), 4242])
    coarse = coarse_grid(reference)
    h = coarse.spacing[0]
    points = _physical_points(coarse)
    body = coarse_body_mask(reference, coarse, body_threshold_hu)
    candidates = np.argwhere(body)
    chosen: list[np.ndarray] = []
    chosen_xyz: list[np.ndarray] = []
    for index in rng.permutation(len(candidates)):
        p = points[tuple(candidates[index])]
        if chosen_xyz and np.min(np.linalg.norm(np.asarray(chosen_xyz) - p, axis=1)) < min_distance_mm:
            continue
        chosen.append(candidates[index])
        chosen_xyz.append(p)
        if len(chosen) >= n_points:
            break
    sparse = np.zeros(body.shape + (3,), dtype=np.float64)
    for index in chosen:
        sparse[tuple(index)] += rng.uniform(-1.0, 1.0, 3)
    u = np.stack([_gaussian(sparse[..., c], sigma_mm, h, mode="constant") for c in range(3)], axis=-1)
    peak = _max_norm(u, _inside_reference(points, reference, h))
    u = u * (amplitude_mm / peak) if peak > 0 else u
    det = _jacobian_determinant(u, coarse)
    if det.min() <= 0.0:
        raise RuntimeError(f"van Eijnatten field folds (min det J {det.min():.3f}); increase sigma_mm "
                           "or lower amplitude_mm")
    return _to_reference(u, coarse, reference)


def warp_with_displacement(
    image: sitk.Image,
    displacement: sitk.Image,
    interpolator: str = "linear",
    default_value: float | None = None,
) -> sitk.Image:
    """Resample ``image`` (the moving base) through ``u`` onto the displacement's (fixed) grid.

    ``out(x) = image(x + u(x))`` — the fixed image of a synthetic pair.  ``interpolator``: ``"linear"``,
    ``"nearest"`` (labels), ``"bspline"`` or ``"label_gaussian"``.  ``default_value`` (outside ``image``)
    defaults to 0 for labels (nearest/label_gaussian interpolation or unsigned integer pixels) and to -1000 HU
    for CT-like images (minimum below -500), else 0.  The pixel type of ``image`` is kept.
    """
    if displacement.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("displacement must be a 3-component vector image (LPS mm)")
    if default_value is None:
        unsigned = image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64)
        if interpolator in ("nearest", "label_gaussian") or unsigned:
            default_value = 0.0
        else:
            minimum = float(sitk.GetArrayViewFromImage(image).min())
            default_value = -1000.0 if minimum < -500.0 else 0.0
    # the transform takes over the buffer of the image it is given: give it a copy, never the caller's field
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    return resample_image(image, displacement, transform=transform, interpolator=interpolator,
                          default_value=default_value)
