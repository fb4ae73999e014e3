"""Procedural abdominal CT phantom: anatomy, HU values, determinism, geometry (oblique, anisotropic), noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.geometry import Grid, resample_image
from deepabdominalreg.synthetic.anatomy import (
    PHANTOM_FOV_MM,
    PHANTOM_LABELS,
    add_ct_noise,
    phantom_grid,
    render_phantom,
)
from geometry_helpers import oblique_direction, shared_data_dir

ID = {name: key for key, name in PHANTOM_LABELS.items()}


@pytest.fixture(scope="module")
def phantom_4mm():
    return render_phantom(seed=0, spacing_mm=4.0)


def _arrays(image: sitk.Image, labels: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)


def _centroid_mm(labels: sitk.Image, label: int) -> np.ndarray:
    """Centroid of ``label`` in LPS mm (works for any direction)."""
    array = sitk.GetArrayViewFromImage(labels)
    kji = np.argwhere(array == label)
    assert len(kji), f"label {label} ({PHANTOM_LABELS[label]}) missing"
    return Grid.from_image(labels).index_to_physical(kji[:, ::-1].mean(0))[0]


def test_grid_geometry_and_types(phantom_4mm):
    image, labels = phantom_4mm
    assert image.GetPixelID() == sitk.sitkFloat32
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert image.GetSize() == labels.GetSize() == (100, 90, 75)
    for a, b in ((image.GetOrigin(), labels.GetOrigin()), (image.GetSpacing(), labels.GetSpacing())):
        np.testing.assert_allclose(a, b)
    grid = Grid.from_image(image)
    centre = grid.index_to_physical((np.asarray(grid.size) - 1) / 2.0)[0]
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)  # the field of view is centred on the LPS origin
    np.testing.assert_allclose(grid.physical_extent_mm(), PHANTOM_FOV_MM)
    with pytest.raises(ValueError):
        phantom_grid(0.0)
    with pytest.raises(ValueError):
        phantom_grid(2.0, direction=(2, 0, 0, 0, 1, 0, 0, 0, 1))


def test_labels_are_documented_and_total_compatible(phantom_4mm):
    _, labels = phantom_4mm
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    assert present <= set(PHANTOM_LABELS)
    expected = {"liver", "spleen", "kidney_right", "kidney_left", "gallbladder", "stomach", "pancreas", "aorta",
                "inferior_vena_cava", "small_bowel", "colon", "duodenum", "vertebrae_L1", "vertebrae_L3",
                "vertebrae_L5", "iliopsoas_left", "iliopsoas_right", "autochthon_left", "hip_left", "hip_right",
                "spinal_cord", "costal_cartilages"}
    assert {ID[name] for name in expected} <= present
    assert any(PHANTOM_LABELS[v].startswith("rib_") for v in present)
    data = shared_data_dir()
    if data is not None:  # the ids are TotalSegmentator's "total" ids
        label_map = data / "totalsegmentator" / "label_map_total_and_total_mr.json"
        total = json.loads(label_map.read_text(encoding="utf-8"))["total"]
        for key, name in PHANTOM_LABELS.items():
            if key:
                assert total[str(key)] == name


def test_organ_positions_are_plausible(phantom_4mm):
    _, labels = phantom_4mm
    c = {name: _centroid_mm(labels, ID[name]) for name in (
        "liver", "spleen", "kidney_right", "kidney_left", "aorta", "inferior_vena_cava", "vertebrae_L2",
        "stomach", "gallbladder", "small_bowel", "sacrum")}
    # LPS: x grows to the patient's left, y posterior, z superior
    assert c["liver"][0] < -20.0 and c["spleen"][0] > 40.0 and c["liver"][0] < c["spleen"][0]
    assert c["kidney_right"][0] < -40.0 and c["kidney_left"][0] > 40.0
    assert c["stomach"][0] > 0.0 and c["gallbladder"][0] < 0.0
    assert c["inferior_vena_cava"][0] < c["aorta"][0]
    # aorta just anterior of the spine, near the midline
    assert abs(c["aorta"][0] - c["vertebrae_L2"][0]) < 30.0
    assert 15.0 < c["vertebrae_L2"][1] - c["aorta"][1] < 60.0
    # cranio-caudal order: liver and spleen above the kidneys, small bowel below, sacrum lowest
    assert c["liver"][2] > c["kidney_right"][2] and c["spleen"][2] > c["kidney_left"][2]
    assert c["small_bowel"][2] < c["kidney_left"][2] and c["sacrum"][2] < c["small_bowel"][2]
    # kidneys beside the spine, posterior of the aorta
    assert c["kidney_left"][1] > c["aorta"][1] and c["kidney_right"][1] > c["aorta"][1]
    liver_ml = (sitk.GetArrayViewFromImage(labels) == ID["liver"]).sum() * 64.0 / 1000.0
    assert 900.0 < liver_ml < 2600.0, liver_ml


def test_hu_values_are_ct_like(phantom_4mm):
    image, labels = phantom_4mm
    hu, lab = _arrays(image, labels)
    assert hu[0, 0, 0] == -1000.0 and hu[-1, -1, -1] == -1000.0  # air outside
    means = {name: float(hu[lab == ID[name]].mean()) for name in (
        "liver", "spleen", "kidney_left", "aorta", "iliopsoas_left", "vertebrae_L3", "gallbladder")}
    assert 40.0 < means["liver"] < 80.0
    assert 30.0 < means["spleen"] < 60.0
    assert 0.0 < means["kidney_left"] < 45.0  # parenchyma ~30 HU with a darker hilum
    assert 25.0 < means["aorta"] < 55.0 and 30.0 < means["iliopsoas_left"] < 65.0
    assert means["vertebrae_L3"] > 150.0
    assert -5.0 < means["gallbladder"] < 30.0
    assert hu.max() > 500.0  # cortical bone
    # fat: a large population of body voxels between -130 and -70 HU
    body = hu > -500
    fat = (hu > -130) & (hu < -70)
    assert fat.sum() > 0.12 * body.sum()
    # gas pockets in the bowel and stomach
    hollow = np.isin(lab, [ID["stomach"], ID["colon"], ID["small_bowel"], ID["duodenum"]])
    assert (hu[hollow] < -900).sum() > 20


def test_table_is_posterior_separate_and_unlabelled(phantom_4mm):
    from scipy import ndimage

    image, labels = phantom_4mm
    hu, lab = _arrays(image, labels)
    grid = Grid.from_image(image)
    components, _ = ndimage.label(hu > -500)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == np.argmax(sizes)
    body = np.stack([ndimage.binary_fill_holes(axial) for axial in largest])  # gas and lung inside are body
    assert np.all(body[lab > 0])  # every label lies in the body
    table = (hu > 100) & ~body
    assert table.sum() > 100, "no CT table"
    assert np.all(lab[table] == 0)  # the table carries no label
    assert np.all(hu[~body & (lab == 0) & ~table] < 100)
    # posterior (larger y) of the body in every slice, with an air gap of at least 4 mm at the midline
    i = grid.size[0] // 2
    for k in range(0, grid.size[2], 7):
        back = np.flatnonzero(body[k, :, i]).max()
        front_of_table = np.flatnonzero(table[k, :, i]).min()
        assert (front_of_table - back - 1) * grid.spacing[1] >= 4.0
        assert np.all(hu[k, back + 1:front_of_table, i] < -900)
    assert len(np.unique(np.argwhere(table)[:, 0])) == grid.size[2]  # along the whole field of view


def test_same_seed_is_bit_identical_and_seeds_differ():
    a_img, a_lab = render_phantom(seed=3, spacing_mm=5.0)
    b_img, b_lab = render_phantom(seed=3, spacing_mm=5.0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a_img), sitk.GetArrayViewFromImage(b_img))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a_lab), sitk.GetArrayViewFromImage(b_lab))
    c_img, c_lab = render_phantom(seed=4, spacing_mm=5.0)
    diff = np.abs(sitk.GetArrayViewFromImage(a_img) - sitk.GetArrayViewFromImage(c_img))
    assert diff.mean() > 20.0
    volumes = [np.count_nonzero(sitk.GetArrayViewFromImage(lab) == ID["liver"]) for lab in (a_lab, c_lab)]
    assert abs(volumes[0] - volumes[1]) > 0.03 * volumes[0]
    assert np.linalg.norm(_centroid_mm(a_lab, ID["kidney_left"]) - _centroid_mm(c_lab, ID["kidney_left"])) > 3.0


def test_oblique_direction_gives_the_same_physical_anatomy():
    spacing = 4.0
    ref_img, ref_lab = render_phantom(seed=2, spacing_mm=spacing)
    direction = oblique_direction(12.0)
    obl_img, obl_lab = render_phantom(seed=2, spacing_mm=spacing, direction=direction)
    np.testing.assert_allclose(obl_img.GetDirection(), direction)
    # organs well inside both fields of view: centroids agree within a voxel
    for name in ("kidney_left", "kidney_right", "gallbladder", "vertebrae_L3", "spleen", "aorta"):
        error = np.linalg.norm(_centroid_mm(ref_lab, ID[name]) - _centroid_mm(obl_lab, ID[name]))
        assert error < spacing, (name, error)
    # voxel by voxel: the oblique rendering resampled onto the reference grid matches it
    marker = 255
    back = sitk.GetArrayFromImage(resample_image(obl_lab, ref_lab, interpolator="nearest", default_value=marker))
    lab = sitk.GetArrayFromImage(ref_lab)
    covered = back != marker
    for name in ("liver", "spleen", "kidney_left"):
        a, b = (lab == ID[name]) & covered, (back == ID[name]) & covered
        dice = 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
        assert dice > 0.85, (name, dice)
    hu_back = sitk.GetArrayFromImage(resample_image(obl_img, ref_img, interpolator="linear", default_value=-2000))
    hu = sitk.GetArrayFromImage(ref_img)
    ok = hu_back > -1500
    assert np.corrcoef(hu[ok], hu_back[ok])[0, 1] > 0.9


def test_anisotropic_spacing():
    image, labels = render_phantom(seed=1, spacing_mm=(3.0, 3.5, 5.0))
    assert image.GetSize() == (133, 103, 60)
    np.testing.assert_allclose(image.GetSpacing(), (3.0, 3.5, 5.0))
    _, iso_lab = render_phantom(seed=1, spacing_mm=4.0)
    for name in ("liver", "kidney_left", "vertebrae_L2"):
        error = np.linalg.norm(_centroid_mm(labels, ID[name]) - _centroid_mm(iso_lab, ID[name]))
        assert error < 4.0, (name, error)
    ml = [np.count_nonzero(sitk.GetArrayViewFromImage(lab) == ID["liver"]) * np.prod(lab.GetSpacing())
          for lab in (labels, iso_lab)]
    assert abs(ml[0] - ml[1]) < 0.05 * ml[1]


def test_add_ct_noise(phantom_4mm):
    image, _ = phantom_4mm
    noisy = add_ct_noise(image, seed=5, sigma_hu=15.0)
    assert noisy.GetPixelID() == sitk.sitkInt16
    assert noisy.GetSize() == image.GetSize()
    np.testing.assert_allclose(noisy.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(noisy.GetDirection(), image.GetDirection())
    clean = sitk.GetArrayViewFromImage(image)
    values = sitk.GetArrayViewFromImage(noisy)
    assert values.min() >= -1024 and values.max() <= 3071
    inside = (clean > -900) & (clean < 1000)
    residual = values[inside].astype(np.float64) - clean[inside]
    assert abs(residual.mean()) < 0.5
    assert 13.5 < residual.std() < 16.5
    np.testing.assert_array_equal(values, sitk.GetArrayFromImage(add_ct_noise(image, seed=5, sigma_hu=15.0)))
    assert np.any(values != sitk.GetArrayFromImage(add_ct_noise(image, seed=6, sigma_hu=15.0)))
    exact = sitk.GetArrayFromImage(add_ct_noise(image, seed=5, sigma_hu=0.0))
    np.testing.assert_array_equal(exact, np.clip(np.rint(clean), -1024, 3071))


@pytest.mark.parametrize("seed", [7, 19, 42, 123])
def test_every_patient_has_the_main_organs_in_place(seed):
    _, labels = render_phantom(seed=seed, spacing_mm=6.0)
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    for name in ("liver", "spleen", "kidney_right", "kidney_left", "gallbladder", "stomach", "pancreas", "aorta",
                 "inferior_vena_cava", "small_bowel", "colon", "vertebrae_L3", "iliopsoas_left", "iliopsoas_right"):
        assert ID[name] in present, (seed, name)
    liver, spleen = _centroid_mm(labels, ID["liver"]), _centroid_mm(labels, ID["spleen"])
    assert liver[0] < 0.0 < spleen[0]
    assert _centroid_mm(labels, ID["kidney_right"])[0] < 0.0 < _centroid_mm(labels, ID["kidney_left"])[0]
