"""Body mask on scans whose field of view cuts the body: the lungs and the trachea stay inside, table and air out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.geometry import make_working_grid
from deepabdominalreg.registration.preprocessing import body_mask, prepare_working_image

DATA = Path(__file__).resolve().parents[5] / "shared" / "data" / "totalsegmentator"
LUNG_IDS = (10, 11, 12, 13, 14)  # label_map_total_and_total_mr.json, key "total": the five lung lobes


def _chest(spacing_mm: float = 3.0) -> dict[str, np.ndarray]:
    """A chest in a field of view that cuts it: body ellipse (40 HU) wider than the slice, so that both lungs
    (-850 HU) reach its left and right edges inside a 15 mm chest wall; a trachea
    (-1000 HU) through the top slice; a table (300 HU) below the body; air (-1000 HU) around."""
    nz, ny, nx = 30, int(300 / spacing_mm), int(260 / spacing_mm)
    z, y, x = np.meshgrid(*(np.arange(n) * spacing_mm for n in (nz, ny, nx)), indexing="ij")
    hu = np.full((nz, ny, nx), -1000.0, np.float32)
    body = ((x - 130) / 160) ** 2 + ((y - 140) / 110) ** 2 <= 1.0
    hu[body] = 40.0
    lungs = body & (np.abs(x - 130) > 25) & (((np.abs(x - 130) - 95) / 80) ** 2 + ((y - 130) / 45) ** 2 <= 1.0)
    hu[lungs] = -850.0
    trachea = ((x - 130) ** 2 + (y - 100) ** 2 <= 10 ** 2) & (z < 40)
    hu[trachea] = -1000.0
    table = (y > 262) & (y < 280)
    hu[table & ~body] = 300.0
    outside = ~body & ~table
    return {"hu": hu, "lungs": lungs, "trachea": trachea, "table": table & ~body, "outside": outside}


@pytest.mark.parametrize("spacing_mm", [3.0, 4.0])
def test_body_mask_keeps_lungs_and_trachea_where_the_field_of_view_cuts_the_chest(spacing_mm):
    chest = _chest(spacing_mm)
    hu = chest["hu"]
    assert chest["lungs"][:, :, 0].any() and chest["lungs"][:, :, -1].any()
    mask = body_mask(hu, (spacing_mm,) * 3)
    assert mask[chest["lungs"]].mean() > 0.99
    assert mask[chest["trachea"]].mean() > 0.99
    assert not mask[chest["table"]].any()
    assert mask[chest["outside"]].mean() < 0.01


def test_body_mask_is_computed_inside_the_field_of_view():
    """Voxels outside the scan (resampled as air) around a cut chest do not open the lungs to the outside."""
    chest = _chest(3.0)
    hu = np.pad(chest["hu"], ((0, 0), (2, 2), (2, 2)), constant_values=-1024.0)
    fov = np.pad(np.ones(chest["hu"].shape, bool), ((0, 0), (2, 2), (2, 2)))
    mask = body_mask(hu, (3.0,) * 3, field_of_view=fov)
    assert not mask[~fov].any()
    assert mask[:, 2:-2, 2:-2][chest["lungs"]].mean() > 0.99
    assert mask[:, 2:-2, 2:-2][chest["table"] | chest["outside"]].mean() < 0.01


@pytest.mark.skipif(not (DATA / "example_ct.nii.gz").exists(), reason="real CT not available")
def test_real_ct_cropped_through_the_lungs_keeps_them():
    """The real CT cropped left-right through its lung bases (the field of view cuts both lungs): every lung
    voxel (labelled and below -400 HU) stays in the working image's body mask."""
    image = sitk.ReadImage(str(DATA / "example_ct.nii.gz"))
    labels = sitk.ReadImage(str(DATA / "example_seg_fast_force_split.nii.gz"))
    xs = np.nonzero(np.isin(sitk.GetArrayViewFromImage(labels), LUNG_IDS))[2]
    crop = slice(int(xs.min()) + 6, int(xs.max()) - 6)
    image, labels = image[crop], labels[crop]
    working = prepare_working_image(image, make_working_grid(image, 3.0, 160), (-160.0, 240.0))
    hu = sitk.GetArrayFromImage(image)
    lungs = np.isin(sitk.GetArrayFromImage(labels), LUNG_IDS) & (hu < -400)
    assert lungs.sum() > 1000 and working.grid.spacing[0] == 3.0 and working.mask.shape == hu.shape
    assert working.mask[lungs].mean() > 0.99
