"""The trust benchmark's pair classes (issue 17): a real CT cut through the lungs with a far moving origin (the
truth must follow), inter-patient phantoms, the real CT against another patient on shared label ids, broken pairs
that are what they claim; and the flag column of the tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.evaluation.benchmark import _classes
from deepabdominalreg.evaluation.cases import (
    TRUST_CLASSES,
    CaseSet,
    generate_broken_cases,
    generate_lungcut_cases,
    generate_phantom_interpatient_cases,
    generate_real_interpatient_cases,
    load_label_names,
)
from deepabdominalreg.evaluation.scoring import evaluate_displacement, fixed_body_mask
from deepabdominalreg.evaluation.tables import flag_state, flag_table, markdown_table, summarise
from deepabdominalreg.geometry import Grid, map_points, warp_with_displacement
from deepabdominalreg.io import read_displacement_field, read_landmarks
from deepabdominalreg.metrics.images import normalized_cross_correlation
from geometry_helpers import shared_data_dir

OFFSET_MM = np.array([0.0, 0.0, 300.0])


@pytest.fixture(scope="module")
def ts() -> Path:
    """TotalSegmentator's example data in ../shared/data, or a skip (a user's clone has none)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not available (a user's clone); real-CT pair classes not tested")
    return path / "totalsegmentator"


@pytest.fixture(scope="module")
def names(ts) -> dict[int, str]:
    return load_label_names(ts / "label_map_total_and_total_mr.json", "total")


@pytest.fixture(scope="module")
def lungcut(ts, names, tmp_path_factory):
    (case,) = generate_lungcut_cases(tmp_path_factory.mktemp("lungcut"), ts / "example_ct.nii.gz",
                                     ts / "example_seg_fast_force_split.nii.gz", names, amplitudes_mm=[5.0],
                                     moving_origin_offset_mm=OFFSET_MM)
    return case


def _centroid_lps(labels: sitk.Image, label: int) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayViewFromImage(labels) == label)[:, ::-1].astype(np.float64)
    return Grid.from_image(labels).index_to_physical(index.mean(0))[0]


# --------------------------------------------------------------------------------------------------------------
# (a) real CT cut through the lungs, moving origin 300 mm away
# --------------------------------------------------------------------------------------------------------------


def test_lungcut_truth_carries_the_origin_offset(lungcut, ts, names):
    fixed_seg, moving_seg = sitk.ReadImage(lungcut.fixed_seg), sitk.ReadImage(lungcut.moving_seg)
    truth = read_displacement_field(lungcut.true_displacement)
    ids = {v: k for k, v in names.items()}
    # the moving scan lies 300 mm higher than the scan it was cut from (header only)
    original = sitk.ReadImage(str(ts / "example_ct.nii.gz"))
    moving = sitk.ReadImage(lungcut.moving)
    first_voxel = np.asarray(moving.GetOrigin()) - OFFSET_MM
    index = Grid.from_image(original).physical_to_index(first_voxel)[0]
    np.testing.assert_allclose(index, np.round(index), atol=1e-6)
    # an organ's centroid in the moving image = the fixed centroid mapped by the true field (within a voxel)
    for organ in ("kidney_left", "kidney_right", "gallbladder", "vertebrae_L3"):  # organs neither crop cuts
        fixed_c = _centroid_lps(fixed_seg, ids[organ])
        mapped = map_points(fixed_c[None], truth)[0]
        assert np.linalg.norm(mapped - _centroid_lps(moving_seg, ids[organ])) < 3.0, organ
    # the landmarks are the true field's images of each other
    fixed_points, moving_points = read_landmarks(lungcut.fixed_landmarks), read_landmarks(lungcut.moving_landmarks)
    assert len(fixed_points) >= 5
    np.testing.assert_allclose(map_points(fixed_points, truth), moving_points, atol=1e-3)


def test_lungcut_truth_aligns_the_images_and_the_offset_matters(lungcut):
    fixed, moving = sitk.ReadImage(lungcut.fixed), sitk.ReadImage(lungcut.moving)
    truth = read_displacement_field(lungcut.true_displacement)
    body = sitk.GetArrayViewFromImage(fixed) > -500

    def ncc(field: sitk.Image) -> float:
        covered = warp_with_displacement(sitk.Cast(moving * 0 + 1, sitk.sitkUInt8), field, "nearest", 0)
        warped = warp_with_displacement(sitk.Cast(moving, sitk.sitkFloat32), field, "linear", -1000.0)
        mask = body & (sitk.GetArrayViewFromImage(covered) > 0)
        return normalized_cross_correlation(sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(warped),
                                            mask) if mask.sum() > 1000 else float("nan")

    assert ncc(truth) > 0.9
    no_offset = Grid.from_image(truth).image_from_array(sitk.GetArrayFromImage(truth) - OFFSET_MM, is_vector=True)
    assert not ncc(no_offset) > 0.5  # without the offset the field points 300 mm off (NaN: off the scan)


def test_lungcut_cuts_the_lungs_and_the_coverage_differs(lungcut, names):
    fixed_seg = sitk.GetArrayFromImage(sitk.ReadImage(lungcut.fixed_seg))
    lungs = [i for i, n in names.items() if n.startswith("lung_") and (fixed_seg == i).any()]
    assert lungs
    lung = np.isin(fixed_seg, lungs)
    # example_ct's x index runs right -> left (direction -1): both left-right faces cut a lung
    assert lung[:, :, 0].any() and lung[:, :, -1].any()
    assert fixed_seg.shape[2] < 122
    fixed_z = Grid.from_image(sitk.ReadImage(lungcut.fixed)).corners()[:, 2]
    moving_z = Grid.from_image(sitk.ReadImage(lungcut.moving)).corners()[:, 2] - OFFSET_MM[2]
    assert moving_z.min() > fixed_z.min() + 10 and moving_z.max() < fixed_z.max() - 5


# --------------------------------------------------------------------------------------------------------------
# (c) inter-patient phantoms, (d) real CT against another patient
# --------------------------------------------------------------------------------------------------------------


def test_phantom_interpatient_differs_in_size_and_coverage_and_shares_labels(tmp_path):
    (case,) = generate_phantom_interpatient_cases(tmp_path, seed_pairs=[(1, 5)], spacing_mm=5.0)
    fixed, moving = sitk.ReadImage(case.fixed), sitk.ReadImage(case.moving)
    width = [np.ptp(np.nonzero(fixed_body_mask(im).any((0, 1)))[0]) for im in (fixed, moving)]  # table left out
    assert width[0] > 1.15 * width[1]  # body half-widths 179 vs 141 mm
    assert moving.GetSize()[2] < fixed.GetSize()[2]
    ids = [set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(p)))) - {0}
           for p in (case.fixed_seg, case.moving_seg)]
    assert ids[0] == ids[1] and len(ids[0]) > 10
    assert case.true_displacement is None and case.source == "phantom_interpatient"
    assert len(read_landmarks(case.fixed_landmarks)) == len(read_landmarks(case.moving_landmarks)) >= 3


def test_real_interpatient_labels_share_ids_and_only_shared_ones_are_scored(ts, names, tmp_path):
    (case,) = generate_real_interpatient_cases(tmp_path, ts / "example_ct.nii.gz",
                                               ts / "example_seg_fast_force_split.nii.gz", names, ts / "aorta_crop")
    ids = {v: k for k, v in names.items()}
    fixed_seg, moving_seg = sitk.ReadImage(case.fixed_seg), sitk.ReadImage(case.moving_seg)
    present = [set(np.unique(sitk.GetArrayViewFromImage(im))) - {0} for im in (fixed_seg, moving_seg)]
    assert present[0] == present[1] == {ids["aorta"], ids["vertebrae_T12"]}
    # the moving map is aorta_crop's own aorta mask under the "total" id of the aorta
    aorta = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "aorta_crop" / "aorta.nii.gz"))) > 0
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(moving_seg) == ids["aorta"], aorta)
    assert json.loads(Path(case.label_names).read_text()) == {"32": "vertebrae_T12", "52": "aorta"}
    fixed = sitk.ReadImage(case.fixed)
    zero = Grid.from_image(fixed).image_from_array(np.zeros((*fixed.GetSize()[::-1], 3)), is_vector=True)
    _, per_label = evaluate_displacement(zero, fixed=fixed, moving=sitk.ReadImage(case.moving),
                                         fixed_labels=fixed_seg, moving_labels=moving_seg,
                                         label_names=load_label_names(case.label_names))
    assert set(per_label) == {"aorta", "vertebrae_T12"}


# --------------------------------------------------------------------------------------------------------------
# (e) broken pairs
# --------------------------------------------------------------------------------------------------------------


def test_broken_pairs_are_what_they_claim(ts, tmp_path):
    cases = {c.name: c for c in generate_broken_cases(tmp_path, ts / "example_ct.nii.gz",
                                                      ts / "aorta_crop" / "ct_cropped.nii.gz")}
    assert set(cases) == {"broken_disjoint", "broken_mirrored", "broken_other_part"}
    assert all(c.source == c.name and c.fixed_seg is None for c in cases.values())

    def z_range(path):
        z = Grid.from_image(sitk.ReadImage(path)).corners()[:, 2]
        return z.min(), z.max()

    fixed_z, moving_z = z_range(cases["broken_disjoint"].fixed), z_range(cases["broken_disjoint"].moving)
    assert moving_z[1] < fixed_z[0]  # the moving scan lies wholly below the fixed one

    fixed, moving = (sitk.ReadImage(p) for p in (cases["broken_mirrored"].fixed, cases["broken_mirrored"].moving))
    assert Grid.from_image(fixed) == Grid.from_image(moving)
    a, b = sitk.GetArrayFromImage(fixed).astype(float), sitk.GetArrayFromImage(moving).astype(float)
    assert np.corrcoef(a[:, :, ::-1].ravel(), b.ravel())[0, 1] > 0.99
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.9

    fixed, moving = (sitk.ReadImage(p) for p in (cases["broken_other_part"].fixed, cases["broken_other_part"].moving))
    np.testing.assert_allclose(Grid.from_image(fixed).corners().mean(0), Grid.from_image(moving).corners().mean(0),
                               atol=1e-3)
    other = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "aorta_crop" / "ct_cropped.nii.gz"))).astype(float)
    top = other[-moving.GetSize()[2]:]  # aorta_crop's z index runs inferior -> superior
    assert np.corrcoef(top.ravel(), sitk.GetArrayFromImage(moving).astype(float).ravel())[0, 1] > 0.99


def test_case_set_makes_the_trust_classes_in_order(ts, tmp_path):
    case_set = CaseSet(ct=str(ts / "example_ct_sm.nii.gz"), classes=("broken", "phantom"), phantom_seeds=(0,),
                       phantom_spacing_mm=8.0)
    sources = [c.source for c in case_set.make(tmp_path)]
    assert sources == ["phantom", "broken_disjoint", "broken_mirrored", "broken_other_part"]
    with pytest.raises(ValueError, match="unknown pair class"):
        CaseSet(ct=str(ts / "example_ct_sm.nii.gz"), classes=("lungs",)).make(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# the flag column (no data needed)
# --------------------------------------------------------------------------------------------------------------


def test_flag_state_and_tables_keep_broken_pairs_apart():
    rows = [
        {"case": "p", "source": "phantom", "method": "ours-fast", "status": "ok", "x_status": "ok", "dice_mean": 0.8},
        {"case": "p", "source": "phantom", "method": "convexadam", "status": "ok", "dice_mean": 0.7},
        {"case": "b", "source": "broken_mirrored", "method": "ours-fast", "status": "ok", "x_status": "suspect",
         "dice_mean": 0.1},
        {"case": "b", "source": "broken_mirrored", "method": "convexadam", "status": "ok", "dice_mean": 0.1},
        {"case": "d", "source": "broken_disjoint", "method": "ours-fast", "status": "failed", "dice_mean": ""},
    ]
    assert [flag_state(r) for r in rows] == ["not flagged", "not flagged", "flagged", "not flagged", "failed"]
    table = flag_table(rows)
    assert "| b | flagged | not flagged |" in table and "| d | failed | – |" in table
    main = markdown_table(rows)
    assert "flagged" in main.splitlines()[0] and "| ours-fast | 1 | 0/1 | 0.800 |" in main
    dice = {s["method"]: s for s in summarise(rows, ["dice_mean"])}
    assert dice["ours-fast"]["n"] == 1 and dice["ours-fast"]["mean"] == pytest.approx(0.8)
    assert _classes("trust,ct") == (*TRUST_CLASSES, "ct")
