"""Synthetic deformations and pairs: convention, smoothness, no folding, amplitudes, landmarks, real CT, files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.config import OUTSIDE_FOV_HU
from deepabdominalreg.geometry import Grid, warp_with_displacement
from deepabdominalreg.io import read_displacement_field, read_labels
from deepabdominalreg.synthetic.anatomy import PHANTOM_LABELS, render_phantom
from deepabdominalreg.synthetic.motion import (
    DEFAULT_LABEL_GROUPS,
    synthetic_abdominal_motion,
    van_eijnatten_deformation,
)
from deepabdominalreg.synthetic.pairs import (
    SyntheticPair,
    anatomical_landmarks,
    make_phantom_pair,
    make_synthetic_pair,
    write_pair,
)
from geometry_helpers import oblique_direction
from scipy import ndimage

ID = {name: key for key, name in PHANTOM_LABELS.items()}


@pytest.fixture(scope="module")
def phantom_5mm():
    return render_phantom(seed=1, spacing_mm=5.0)


@pytest.fixture(scope="module")
def pair_5mm() -> SyntheticPair:
    return make_phantom_pair(seed=4, spacing_mm=5.0, amplitude_mm=10.0)


def jacobian_determinant(field: sitk.Image) -> np.ndarray:
    """det(I + grad u) by numpy central differences in physical units (mm/mm), any spacing and direction."""
    u = sitk.GetArrayFromImage(field)  # (z, y, x, 3), LPS mm
    grid = Grid.from_image(field)
    d_index = np.stack([np.gradient(u, axis=axis) for axis in (2, 1, 0)], axis=-1)  # d u_c / d index_(i, j, k)
    jac = d_index @ np.diag(1.0 / np.asarray(grid.spacing)) @ grid.direction_matrix.T + np.eye(3)
    return np.linalg.det(jac)


def magnitude(field: sitk.Image) -> np.ndarray:
    return np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1)


def sample_field(field: sitk.Image, points_lps: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``field`` at LPS points, independent of SimpleITK's transforms."""
    grid = Grid.from_image(field)
    index = grid.physical_to_index(points_lps)
    u = sitk.GetArrayFromImage(field)
    coords = index[:, ::-1].T  # (k, j, i)
    return np.stack([ndimage.map_coordinates(u[..., c], coords, order=1) for c in range(3)], axis=1)


def physical_points(image: sitk.Image) -> np.ndarray:
    grid = Grid.from_image(image)
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape_zyx], indexing="ij")
    return grid.index_to_physical(np.stack([i, j, k], -1).reshape(-1, 3).astype(np.float64))


def test_abdominal_motion_is_smooth_non_folding_with_the_requested_amplitude(phantom_5mm):
    image, labels = phantom_5mm
    for amplitude in (6.0, 15.0):
        u = synthetic_abdominal_motion(image, labels, seed=2, amplitude_mm=amplitude, rigid_shift_mm=0.0,
                                       rotation_deg=0.0)
        assert u.GetPixelID() == sitk.sitkVectorFloat64 and u.GetSize() == image.GetSize()
        np.testing.assert_allclose(u.GetOrigin(), image.GetOrigin())
        mag = magnitude(u)
        assert 0.93 * amplitude <= mag.max() <= amplitude * (1.0 + 1e-6), (amplitude, mag.max())
        det = jacobian_determinant(u)
        assert det.min() > 0.3, det.min()
        # smooth: neighbouring voxels (5 mm apart) differ by less than 40 % of the spacing
        step = np.abs(np.diff(sitk.GetArrayFromImage(u), axis=0)).max()
        assert step < 0.4 * 5.0, step


def test_breathing_moves_the_upper_organs_not_the_spine(phantom_5mm):
    image, labels = phantom_5mm
    u = synthetic_abdominal_motion(image, labels, seed=5, amplitude_mm=12.0, rigid_shift_mm=0.0, rotation_deg=0.0)
    field = sitk.GetArrayFromImage(u)
    lab = sitk.GetArrayFromImage(labels)

    def mean_abs(name: str, component: int | None = None) -> float:
        values = field[lab == ID[name]]
        return float(np.abs(values[:, component]).mean() if component is not None else
                     np.linalg.norm(values, axis=1).mean())

    spine = np.isin(lab, [ID[f"vertebrae_L{n}"] for n in range(1, 6)])
    spine_motion = float(np.linalg.norm(field[spine], axis=1).mean())
    assert mean_abs("liver", 2) > 4.0  # cranio-caudal
    assert mean_abs("liver", 2) > 2.0 * mean_abs("liver", 0)  # mostly along z
    assert mean_abs("spleen") > 4.0 and mean_abs("kidney_left") > 2.0
    assert spine_motion < 0.35 * mean_abs("liver")
    assert mean_abs("liver") > 2.0 * mean_abs("sacrum")  # decays towards the pelvis


def test_zero_amplitude_and_zero_rigid_give_a_zero_field(phantom_5mm):
    image, labels = phantom_5mm
    u = synthetic_abdominal_motion(image, labels, seed=1, amplitude_mm=0.0, rigid_shift_mm=0.0, rotation_deg=0.0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(u), 0.0)


def test_rigid_part_is_an_exact_shift_and_rotation(phantom_5mm):
    image, _ = phantom_5mm
    u = synthetic_abdominal_motion(image, None, seed=3, amplitude_mm=0.0, rigid_shift_mm=3.0, rotation_deg=0.0)
    field = sitk.GetArrayFromImage(u).reshape(-1, 3)
    np.testing.assert_allclose(field, np.broadcast_to(field[0], field.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(field[0]), 3.0, atol=1e-9)
    u = synthetic_abdominal_motion(image, None, seed=3, amplitude_mm=0.0, rigid_shift_mm=0.0, rotation_deg=2.0)
    points = physical_points(image)
    moved = points + sitk.GetArrayFromImage(u).reshape(-1, 3)
    # an affine fit of x -> x + u(x) is exact and its matrix is a rotation of 2 degrees
    homogeneous = np.c_[points, np.ones(len(points))]
    solution, *_ = np.linalg.lstsq(homogeneous, moved, rcond=None)
    rot = solution[:3].T
    np.testing.assert_allclose(homogeneous @ solution, moved, atol=1e-6)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-9)
    angle = np.degrees(np.arccos((np.trace(rot) - 1.0) / 2.0))
    np.testing.assert_allclose(angle, 2.0, atol=1e-6)


def test_geometric_fallback_without_labels_moves_the_upper_body_most(phantom_5mm):
    image, _ = phantom_5mm
    u = synthetic_abdominal_motion(image, None, seed=4, amplitude_mm=10.0, rigid_shift_mm=0.0, rotation_deg=0.0)
    mag = magnitude(u)
    body = sitk.GetArrayViewFromImage(image) > -500
    third = mag.shape[0] // 3
    upper = mag[-third:][body[-third:]].mean()
    lower = mag[:third][body[:third]].mean()
    assert upper > 3.0 * lower, (upper, lower)
    assert jacobian_determinant(u).min() > 0.3


def test_explicit_label_groups_change_the_motion(phantom_5mm):
    image, labels = phantom_5mm
    assert ID["liver"] in DEFAULT_LABEL_GROUPS["breathing"] and ID["vertebrae_L3"] in DEFAULT_LABEL_GROUPS["rigid"]
    kwargs = {"seed": 6, "amplitude_mm": 10.0, "rigid_shift_mm": 0.0, "rotation_deg": 0.0}
    default = sitk.GetArrayFromImage(synthetic_abdominal_motion(image, labels, **kwargs))
    only_kidneys = sitk.GetArrayFromImage(synthetic_abdominal_motion(
        image, labels, label_groups={"breathing": [ID["kidney_left"], ID["kidney_right"]], "bowel": [], "rigid": []},
        **kwargs))
    lab = sitk.GetArrayFromImage(labels)
    liver = lab == ID["liver"]
    assert np.linalg.norm(only_kidneys[liver], axis=1).mean() < np.linalg.norm(default[liver], axis=1).mean()


def test_motion_on_an_oblique_anisotropic_grid():
    image, labels = render_phantom(seed=2, spacing_mm=(4.0, 4.5, 6.0), direction=oblique_direction(15.0))
    u = synthetic_abdominal_motion(image, labels, seed=2, amplitude_mm=10.0, rigid_shift_mm=0.0, rotation_deg=0.0)
    np.testing.assert_allclose(u.GetDirection(), image.GetDirection())
    np.testing.assert_allclose(u.GetSpacing(), image.GetSpacing())
    assert 9.3 <= magnitude(u).max() <= 10.0 + 1e-6
    assert jacobian_determinant(u).min() > 0.3
    # breathing is cranio-caudal in physical (LPS) space, whatever the grid axes
    field = sitk.GetArrayFromImage(u)[sitk.GetArrayViewFromImage(labels) == ID["liver"]]
    assert np.abs(field[:, 2]).mean() > 2.0 * np.abs(field[:, 0]).mean()


def test_van_eijnatten_field(phantom_5mm):
    image, _ = phantom_5mm
    u = van_eijnatten_deformation(image, seed=1, amplitude_mm=8.0)
    mag = magnitude(u)
    assert u.GetPixelID() == sitk.sitkVectorFloat64
    assert 0.9 * 8.0 <= mag.max() <= 8.0 * (1.0 + 1e-6)
    assert jacobian_determinant(u).min() > 0.3
    body = sitk.GetArrayViewFromImage(image) > -500
    assert mag[body].mean() > 2.0 * mag[~body].mean()  # the vectors sit inside the body
    other = van_eijnatten_deformation(image, seed=2, amplitude_mm=8.0)
    difference = sitk.GetArrayFromImage(other) - sitk.GetArrayFromImage(u)
    assert mag[body].mean() > 0.1 * 8.0
    assert np.linalg.norm(difference, axis=-1)[body].mean() > 0.5 * mag[body].mean()
    with pytest.raises(RuntimeError):
        van_eijnatten_deformation(image, seed=1, amplitude_mm=60.0, sigma_mm=10.0)


def test_phantom_pair(pair_5mm):
    pair = pair_5mm
    for image in (pair.fixed_image, pair.moving_image):
        assert image.GetPixelID() == sitk.sitkInt16
    u = pair.displacement_fixed_to_moving
    assert u.GetPixelID() == sitk.sitkVectorFloat64 and u.GetSize() == pair.fixed_image.GetSize()
    assert jacobian_determinant(u).min() > 0.3
    # labels: fixed = moving labels warped by u, nothing lost
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(pair.fixed_labels),
                                  sitk.GetArrayFromImage(warp_with_displacement(pair.moving_labels, u, "nearest")))
    assert set(np.unique(sitk.GetArrayViewFromImage(pair.fixed_labels))) == set(
        np.unique(sitk.GetArrayViewFromImage(pair.moving_labels)))
    assert set(pair.label_names) <= set(PHANTOM_LABELS) and 0 not in pair.label_names
    # images: the fixed is the warped clean phantom plus independent noise
    clean, _ = render_phantom(seed=4, spacing_mm=5.0)
    residual_fixed = sitk.GetArrayFromImage(pair.fixed_image) - sitk.GetArrayFromImage(
        warp_with_displacement(clean, u, "linear", OUTSIDE_FOV_HU))
    residual_moving = sitk.GetArrayFromImage(pair.moving_image) - sitk.GetArrayFromImage(clean)
    body = sitk.GetArrayViewFromImage(clean) > -900
    for residual in (residual_fixed[body], residual_moving[body]):
        assert abs(residual.mean()) < 1.0 and 12.0 < residual.std() < 18.0
    assert abs(np.corrcoef(residual_fixed[body], residual_moving[body])[0, 1]) < 0.05


def test_pair_landmarks_follow_the_displacement(pair_5mm):
    pair = pair_5mm
    fixed, moving = pair.fixed_landmarks_lps, pair.moving_landmarks_lps
    assert fixed.shape == moving.shape and 10 <= len(fixed) <= 20
    np.testing.assert_allclose(moving, fixed + sample_field(pair.displacement_fixed_to_moving, fixed), atol=1e-6)
    # inside labelled organs of the fixed image and of the moving image
    grid = Grid.from_image(pair.fixed_image)
    for points, labels in ((fixed, pair.fixed_labels), (moving, pair.moving_labels)):
        index = np.rint(grid.physical_to_index(points)).astype(int)
        values = sitk.GetArrayViewFromImage(labels)[index[:, 2], index[:, 1], index[:, 0]]
        assert np.mean(values > 0) >= 0.9
    assert np.linalg.norm(moving - fixed, axis=1).max() > 3.0
    points, names = anatomical_landmarks(pair.fixed_labels, pair.label_names)
    np.testing.assert_allclose(points, fixed)
    assert names[0] == "liver_centre" and len(set(names)) == len(names)


def test_write_pair(pair_5mm, tmp_path):
    paths = write_pair(pair_5mm, tmp_path / "pair")
    expected = {"fixed": "fixed.nii.gz", "moving": "moving.nii.gz", "fixed_seg": "fixed_seg.nii.gz",
                "moving_seg": "moving_seg.nii.gz", "true_displacement": "true_displacement.nii.gz",
                "fixed_landmarks": "fixed_landmarks.csv", "moving_landmarks": "moving_landmarks.csv",
                "labels": "labels.json"}
    assert {key: p.name for key, p in paths.items()} == expected
    field = read_displacement_field(paths["true_displacement"])
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(field),
                               sitk.GetArrayViewFromImage(pair_5mm.displacement_fixed_to_moving), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_labels(paths["fixed_seg"])),
                                  sitk.GetArrayViewFromImage(pair_5mm.fixed_labels))
    with open(paths["moving_landmarks"], newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["x", "y", "z"]
    np.testing.assert_allclose(np.asarray(rows[1:], dtype=float), pair_5mm.moving_landmarks_lps, atol=1e-3)
    names = json.loads(paths["labels"].read_text(encoding="utf-8"))
    assert names[str(ID["liver"])] == "liver"


def test_real_ct_pairs(shared_data):
    folder = shared_data / "totalsegmentator"
    image = sitk.ReadImage(str(folder / "example_ct.nii.gz"))
    labels = sitk.ReadImage(str(folder / "example_seg_fast_force_split.nii.gz"))
    label_map = json.loads((folder / "label_map_total_and_total_mr.json").read_text(encoding="utf-8"))["total"]
    names = {int(k): v for k, v in label_map.items()}
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    for generator in ("abdominal", "van_eijnatten"):
        pair = make_synthetic_pair(image, labels, names, seed=3, amplitude_mm=8.0, generator=generator)
        u = pair.displacement_fixed_to_moving
        assert pair.moving_image is image and pair.fixed_image.GetSize() == image.GetSize()
        np.testing.assert_allclose(u.GetDirection(), image.GetDirection())
        assert jacobian_determinant(u).min() > 0.3
        assert set(np.unique(sitk.GetArrayViewFromImage(pair.fixed_labels)).tolist()) == present
        assert len(pair.fixed_landmarks_lps) >= 10
        np.testing.assert_allclose(pair.moving_landmarks_lps,
                                   pair.fixed_landmarks_lps + sample_field(u, pair.fixed_landmarks_lps), atol=1e-6)
        assert pair.label_names[5] == "liver"
    # the breathing organs of the real scan move more than its spine (TotalSegmentator ids)
    u = synthetic_abdominal_motion(image, labels, seed=3, amplitude_mm=8.0, rigid_shift_mm=0.0, rotation_deg=0.0)
    mag, lab = magnitude(u), sitk.GetArrayViewFromImage(labels)
    assert 0.93 * 8.0 <= mag.max() <= 8.0 + 1e-6
    assert mag[lab == 5].mean() > 2.0 * mag[np.isin(lab, [27, 28, 29, 30, 31])].mean()
