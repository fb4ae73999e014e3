"""Synthetic image pairs with a known deformation, and their files.

Convention (ITK's ``DisplacementFieldTransform``): a displacement field ``u`` lives on the **fixed** grid, as
``sitkVectorFloat64`` vectors in LPS mm, and maps a fixed point ``x`` to the moving point ``x + u(x)``.  From a
"moving" base image and ``u``, the fixed image is the moving image resampled through ``u``
(:func:`deepabdominalreg.geometry.warp_with_displacement`), so ``u`` is the exact ground truth of the pair
(fixed -> moving).  The motion models that make ``u`` are in :mod:`deepabdominalreg.synthetic.motion`.

* :func:`make_phantom_pair` (procedural phantom) and :func:`make_synthetic_pair` (any CT with labels, e.g. a real
  scan segmented by TotalSegmentator) return a :class:`SyntheticPair`; :func:`write_pair` writes it to disk;
* :func:`anatomical_landmarks`: corresponding points from the labels (organ centres and extremes).
"""


from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from deepabdominalreg.config import BODY_THRESHOLD_HU, OUTSIDE_FOV_HU
from deepabdominalreg.geometry import Grid, map_points, warp_with_displacement
from deepabdominalreg.io import write_displacement_field, write_image, write_json, write_landmarks
from deepabdominalreg.synthetic.anatomy import PHANTOM_LABELS, add_ct_noise, render_phantom
from deepabdominalreg.synthetic.motion import (
    coarse_body_mask,
    coarse_grid,
    labels_present,
    synthetic_abdominal_motion,
    van_eijnatten_deformation,
)

# landmark choice: (structure name, which points); "c" = deepest interior point, "s"/"i" = superior/inferior pole
_LANDMARK_PLAN: tuple[tuple[str, str], ...] = (
    ("liver", "csi"),
    ("spleen", "ci"),
    ("kidney_right", "csi"),
    ("kidney_left", "csi"),
    ("gallbladder", "c"),
    ("pancreas", "c"),
    ("stomach", "c"),
    ("aorta", "i"),
    ("vertebrae_T12", "c"),
    ("vertebrae_L2", "c"),
    ("vertebrae_L4", "c"),
    ("sacrum", "c"),
    ("iliopsoas_left", "c"),
    ("iliopsoas_right", "c"),
    ("urinary_bladder", "c"),
    ("duodenum", "c"),
)

_POINT_KINDS = {"c": "centre", "s": "superior", "i": "inferior"}


@dataclass
class SyntheticPair:
    """A fixed/moving pair with its true displacement and landmarks (LPS mm).

    ``displacement_fixed_to_moving`` is ``u`` on the fixed grid (``sitkVectorFloat64``): the fixed point ``x``
    corresponds to the moving point ``x + u(x)``; ``moving_landmarks_lps = fixed_landmarks_lps + u(fixed)``.
    """

    fixed_image: sitk.Image
    moving_image: sitk.Image
    fixed_labels: sitk.Image | None
    moving_labels: sitk.Image | None
    displacement_fixed_to_moving: sitk.Image
    fixed_landmarks_lps: np.ndarray
    moving_landmarks_lps: np.ndarray
    label_names: dict[int, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# landmarks and pairs
# ----------------------------------------------------------------------------------------------------------------


def anatomical_landmarks(
    labels: sitk.Image,
    label_names: dict[int, str] | None = None,
    max_points: int = 20,
    min_volume_mm3: float = 2000.0,
) -> tuple[np.ndarray, list[str]]:
    """Up to ``max_points`` anatomical landmarks (LPS mm, ``(N, 3)``) inside the labelled organs, and their names.

    For each structure of a fixed plan (liver, spleen, kidneys, gallbladder, pancreas, stomach, aortic
    bifurcation, vertebrae T12/L2/L4, sacrum, psoas, bladder, duodenum) present with at least ``min_volume_mm3``:
    its deepest interior point (maximum of the distance to its surface) and, for some, its superior and inferior
    poles (highest/lowest LPS z among voxels at least 3 mm inside).  Points are voxel centres.
    """
    names = label_names or PHANTOM_LABELS
    ids_by_name = {name: int(i) for i, name in names.items()}
    grid = Grid.from_image(labels)
    array = sitk.GetArrayViewFromImage(labels)
    spacing_zyx = grid.spacing[::-1]
    voxel_mm3 = float(np.prod(grid.spacing))
    m = grid.index_to_physical_matrix()
    objects = ndimage.find_objects(np.asarray(array))
    points: list[np.ndarray] = []
    point_names: list[str] = []
    for name, which in _LANDMARK_PLAN:
        label = ids_by_name.get(name)
        if label is None or label < 1 or label > len(objects) or objects[label - 1] is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in objects[label - 1])
        mask = array[box] == label
        if mask.sum() * voxel_mm3 < min_volume_mm3:
            continue
        depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
        offset = np.array([s.start for s in box])
        for kind in which:
            if kind == "c":
                zyx = np.array(np.unravel_index(int(np.argmax(depth)), mask.shape))
            else:
                inner = np.argwhere(depth >= min(3.0, depth.max() * 0.5))
                ijk = inner[:, ::-1] + offset[::-1]
                z_mm = ijk @ m[2, :3] + m[2, 3]
                zyx = inner[int(np.argmax(z_mm) if kind == "s" else np.argmin(z_mm))]
            index_xyz = (zyx + offset)[::-1].astype(np.float64)
            points.append(grid.index_to_physical(index_xyz)[0])
            point_names.append(f"{name}_{_POINT_KINDS[kind]}")
            if len(points) >= max_points:
                return np.asarray(points), point_names
    return np.asarray(points).reshape(-1, 3), point_names




def _body_points(image: sitk.Image, count: int, seed: int) -> np.ndarray:
    """Fallback landmarks without labels: ``count`` random voxel centres inside the body (LPS mm)."""
    grid = Grid.from_image(image)
    coarse = coarse_grid(grid, 10.0)
    body = ndimage.binary_erosion(coarse_body_mask(image, coarse), iterations=2)
    candidates = np.argwhere(body)
    rng = np.random.default_rng([int(seed), 99])
    chosen = candidates[rng.permutation(len(candidates))[:count]]
    return coarse.index_to_physical(chosen[:, ::-1].astype(np.float64)) if len(chosen) else np.zeros((0, 3))


def _outside_value(image: sitk.Image) -> float:
    """Fill value beyond ``image`` when warping it: :data:`~deepabdominalreg.config.OUTSIDE_FOV_HU` for a CT (it
    holds air, values below the body threshold), 0 for other images and for unsigned pixel types."""
    unsigned = image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64)
    if unsigned or float(sitk.GetArrayViewFromImage(image).min()) >= BODY_THRESHOLD_HU:
        return 0.0
    return OUTSIDE_FOV_HU


def _pair(moving: sitk.Image, moving_labels: sitk.Image | None, u: sitk.Image, label_names: dict[int, str],
          seed: int) -> SyntheticPair:
    fixed = warp_with_displacement(moving, u, "linear", _outside_value(moving))
    fixed_labels = None if moving_labels is None else warp_with_displacement(moving_labels, u, "nearest", 0.0)
    if fixed_labels is not None:
        fixed_points, _ = anatomical_landmarks(fixed_labels, label_names)
    else:
        fixed_points = np.zeros((0, 3))
    if len(fixed_points) < 3:
        fixed_points = _body_points(fixed, 15, seed)
    moving_points = map_points(fixed_points, u)
    return SyntheticPair(fixed, moving, fixed_labels, moving_labels, u, fixed_points, moving_points,
                         dict(label_names))


def make_phantom_pair(
    seed: int = 0,
    spacing_mm: float | tuple[float, float, float] = 2.0,
    amplitude_mm: float = 10.0,
    direction: Sequence[float] | None = None,
    noise_hu: float = 15.0,
) -> SyntheticPair:
    """A phantom patient pair: moving = phantom ``seed``, fixed = its copy deformed by realistic abdominal motion.

    The clean phantom (:func:`render_phantom`) is the moving base; ``u`` comes from
    :func:`synthetic_abdominal_motion` (``amplitude_mm`` deformable peak, default 3 mm / 2 degree rigid motion);
    fixed = warp(clean, u); then independent CT noise (``noise_hu`` standard deviation) is added to the fixed
    and the moving images (int16 HU).  Labels: :data:`PHANTOM_LABELS`.
    """
    clean, labels = render_phantom(seed, spacing_mm, direction=direction)
    u = synthetic_abdominal_motion(clean, labels, seed=seed, amplitude_mm=amplitude_mm)
    pair = _pair(clean, labels, u, {k: v for k, v in PHANTOM_LABELS.items() if k}, seed)
    pair.fixed_image = add_ct_noise(pair.fixed_image, seed=2 * int(seed) + 1, sigma_hu=noise_hu)
    pair.moving_image = add_ct_noise(clean, seed=2 * int(seed) + 2, sigma_hu=noise_hu)
    return pair


def make_synthetic_pair(
    image: sitk.Image,
    labels: sitk.Image | None,
    label_names: dict[int, str] | None = None,
    *,
    seed: int = 0,
    amplitude_mm: float = 10.0,
    generator: str = "abdominal",
    noise_hu: float = 0.0,
    **generator_options,
) -> SyntheticPair:
    """A pair from one CT (e.g. a real scan): moving = ``image``, fixed = ``image`` deformed by a known ``u``.

    ``generator`` is ``"abdominal"`` (:func:`synthetic_abdominal_motion`, driven by ``labels``) or
    ``"van_eijnatten"`` (:func:`van_eijnatten_deformation`); extra keyword options go to it.  ``labels`` (same
    grid, e.g. TotalSegmentator ``total`` ids) are warped with nearest-neighbour interpolation and give the
    landmarks; ``label_names`` maps ids to names.  With ``noise_hu > 0`` independent noise is added to both
    images (int16 HU), so the fixed image is not a smoothed copy of the moving one.
    """
    if labels is not None and tuple(labels.GetSize()) != tuple(image.GetSize()):
        raise ValueError("labels must be on the image's grid")
    if generator == "abdominal":
        u = synthetic_abdominal_motion(image, labels, seed=seed, amplitude_mm=amplitude_mm, **generator_options)
    elif generator == "van_eijnatten":
        u = van_eijnatten_deformation(image, seed=seed, amplitude_mm=amplitude_mm, **generator_options)
    else:
        raise ValueError(f"generator must be 'abdominal' or 'van_eijnatten', got {generator!r}")
    names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) != 0}
    if labels is not None and not names:
        names = {i: PHANTOM_LABELS.get(i, f"label_{i}") for i in sorted(labels_present(labels))}
    pair = _pair(image, labels, u, names, seed)
    if noise_hu > 0:
        pair.fixed_image = add_ct_noise(pair.fixed_image, seed=2 * int(seed) + 1, sigma_hu=noise_hu)
        pair.moving_image = add_ct_noise(image, seed=2 * int(seed) + 2, sigma_hu=noise_hu)
    return pair


def write_pair(pair: SyntheticPair, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write a pair: images, labels, true displacement, landmarks (CSV ``x,y,z``, mm, LPS) and ``labels.json``.

    Files: ``fixed.nii.gz``, ``moving.nii.gz``, ``fixed_seg.nii.gz``, ``moving_seg.nii.gz`` (when labelled),
    ``true_displacement.nii.gz`` (:func:`write_displacement_field`), ``fixed_landmarks.csv``,
    ``moving_landmarks.csv`` and ``labels.json`` (``{id: name}``).  Returns the paths by role.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "fixed": write_image(pair.fixed_image, out / "fixed.nii.gz"),
        "moving": write_image(pair.moving_image, out / "moving.nii.gz"),
    }
    if pair.fixed_labels is not None:
        paths["fixed_seg"] = write_image(pair.fixed_labels, out / "fixed_seg.nii.gz")
    if pair.moving_labels is not None:
        paths["moving_seg"] = write_image(pair.moving_labels, out / "moving_seg.nii.gz")
    paths["true_displacement"] = write_displacement_field(pair.displacement_fixed_to_moving,
                                                          out / "true_displacement.nii.gz")
    paths["fixed_landmarks"] = write_landmarks(pair.fixed_landmarks_lps, out / "fixed_landmarks.csv")
    paths["moving_landmarks"] = write_landmarks(pair.moving_landmarks_lps, out / "moving_landmarks.csv")
    # written last: a folder with labels.json holds a complete pair (evaluation.cases reuses such folders)
    labels_path = write_json({str(k): v for k, v in sorted(pair.label_names.items())}, out / "labels.json", indent=1)
    paths["labels"] = labels_path
    return paths
