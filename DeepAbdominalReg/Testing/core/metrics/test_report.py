"""Tests for deepabdominalreg.metrics.report: a readable PNG, anatomically oriented whatever the direction matrix."""

from __future__ import annotations

import itertools

import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.geometry import Grid, resample_image
from deepabdominalreg.metrics import report
from deepabdominalreg.metrics.fields import displacement_magnitude, jacobian_determinant
from deepabdominalreg.metrics.labels import label_overlap_report
from deepabdominalreg.registration.pipeline import RegistrationResult
from geometry_helpers import oblique_direction

# --------------------------------------------------------------------------------------------------------------
# orientation helpers (known answers)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # NIfTI RAS read by ITK
    (0, 0, 1, 1, 0, 0, 0, -1, 0),  # permuted and flipped (sagittal-like acquisition)
    oblique_direction(20.0, flip=True),
    oblique_direction(15.0, flip=False),
])
def test_lps_grid_matches_dicomorient(direction):
    image = sitk.Image([5, 6, 7], sitk.sitkUInt8)
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection([float(v) for v in direction])
    expected = Grid.from_image(sitk.DICOMOrient(image, "LPS"))
    got = report._lps_grid(Grid.from_image(image))
    assert got.size == expected.size
    np.testing.assert_allclose(got.spacing, expected.spacing)
    np.testing.assert_allclose(got.origin, expected.origin, atol=1e-9)
    np.testing.assert_allclose(got.direction, expected.direction, atol=1e-12)


def _marker_image(direction) -> sitk.Image:
    """Air with a bright cube at the patient's right-anterior-superior corner (LPS: small x, small y, large z)."""
    image = sitk.Image([20, 24, 18], sitk.sitkFloat32)
    image.SetSpacing((1.2, 0.8, 2.0))
    image.SetDirection([float(v) for v in direction])
    image.SetOrigin((0.0, 0.0, 0.0))
    array = np.full((18, 24, 20), -1000.0, np.float32)
    image = Grid.from_image(image).image_from_array(array)
    grid = Grid.from_image(image)
    corners = grid.corners()
    target = np.array([corners[:, 0].min(), corners[:, 1].min(), corners[:, 2].max()])  # right, anterior, superior
    centre = corners.mean(axis=0)
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape_zyx), indexing="ij")
    points = grid.index_to_physical(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*grid.shape_zyx, 3)
    # voxels in the octant of the grid nearest the right-anterior-superior corner
    toward = (points - centre) * np.sign(target - centre)
    array[np.all(toward > 0.25 * np.abs(target - centre), axis=-1)] = 500.0
    return grid.image_from_array(array)


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    (0, 1, 0, 0, 0, -1, -1, 0, 0),
    oblique_direction(10.0, flip=True),
])
def test_planes_are_radiological(direction):
    """Patient right on the screen's left; anterior at the top (axial), superior at the top (coronal)."""
    image = _marker_image(direction)
    lps = report._lps_grid(Grid.from_image(image))
    k, j = lps.size[2] - 2, 2  # a superior axial slice, an anterior coronal slice
    planes = report._planes(image, report._plane_grid(lps, 2, k), report._plane_grid(lps, 1, j), "linear",
                            -1000.0, sitk.sitkFloat32)
    for plane in (planes.axial, planes.coronal):
        bright = np.argwhere(plane > 0)
        assert bright.size, "the marker must cross both planes"
        rows, cols = plane.shape
        assert bright[:, 0].max() < rows / 2, "marker (anterior / superior) must be in the top half"
        assert bright[:, 1].max() < cols / 2, "marker (patient right) must be in the left half"


# --------------------------------------------------------------------------------------------------------------
# whole reports
# --------------------------------------------------------------------------------------------------------------


def _case(image: sitk.Image, with_labels: bool = True):
    """A small registration-like case on ``image``'s grid: moving = shifted fixed, a smooth field, labels."""
    grid = Grid.from_image(image)
    moving = resample_image(image, image, sitk.TranslationTransform(3, (2.0, -1.5, 1.0)), "linear", -1000.0)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid.shape_zyx), indexing="ij")
    u = np.stack([1.5 * np.sin(j / 4.0), 0.8 * np.cos(i / 5.0), 0.6 * np.sin(k / 3.0)], axis=-1)
    u[6:9, 8:11, 9:13, 0] = np.linspace(0, -12, 4)[None, None, :]  # a local fold
    field = grid.image_from_array(u, is_vector=True)
    fixed_labels = sitk.Cast(sitk.BinaryThreshold(image, -100.0, 1e6, 1, 0), sitk.sitkUInt16)
    array = sitk.GetArrayFromImage(fixed_labels)
    array[array > 0] += (np.indices(array.shape)[2][array > 0] > grid.size[0] // 2).astype(np.uint16)  # labels 1, 2
    fixed_labels = grid.image_from_array(array)
    moving_labels = resample_image(fixed_labels, image, sitk.TranslationTransform(3, (2.0, -1.5, 1.0)), "nearest")
    return {
        "fixed": image,
        "moving": moving,
        "warped": image,
        "displacement": field,
        "jacobian": jacobian_determinant(field),
        "displacement_magnitude": displacement_magnitude(field),
        **({"fixed_labels": fixed_labels, "moving_labels": moving_labels, "warped_labels": fixed_labels}
           if with_labels else {}),
    }


def _write(path, case: dict, metrics: dict | None = None, **kwargs):
    """``report.write_report`` of the case as a registration result (warped images, maps, metrics) and its inputs."""
    result = RegistrationResult(
        warped_image=case["warped"], displacement_lps=case["displacement"], jacobian=case["jacobian"],
        displacement_magnitude=case["displacement_magnitude"], metrics=metrics or {},
        affine_fixed_to_moving=sitk.AffineTransform(3), config=RegistrationConfig(),
        warped_labels=case.get("warped_labels"),
    )
    return report.write_report(path, result, fixed=case["fixed"], moving=case["moving"],
                               fixed_labels=case.get("fixed_labels"), moving_labels=case.get("moving_labels"), **kwargs)


def _read_png(path) -> np.ndarray:
    array = mpimg.imread(str(path))
    assert array.ndim == 3
    return array


def test_report_oblique_with_labels_and_metrics(tmp_path, oblique_image):
    case = _case(oblique_image)
    assert sitk.GetArrayViewFromImage(case["jacobian"]).min() <= 0  # folding to show
    good = label_overlap_report(case["fixed_labels"], case["fixed_labels"], {1: "liver", 2: "spleen"})
    results = {
        "dice_mean_before": 0.61, "dice_mean_after": 0.88, "folding_percent": 0.12, "sdlogj": 0.09,
        "runtime_s": 12.5, "device": "cpu", "model": {"name": "tiny", "sha256": None},
        "displacement": {"max_mm": 12.0, "p95_mm": 3.0, "mean_mm": 1.1},
        "labels": {"before": good, "after": good},
    }
    path = _write(tmp_path / "out" / "report.png", case, metrics=results, title="test")
    assert path == tmp_path / "out" / "report.png"
    array = _read_png(path)
    assert array.shape[:2] == (900, 1600)
    assert array[..., :3].std() > 0.1  # not blank
    # folding is drawn in its own colour
    fold = np.array([int(report._FOLD_COLOUR[i: i + 2], 16) / 255 for i in (1, 3, 5)])
    assert np.any(np.all(np.abs(array[..., :3] - fold) < 0.02, axis=-1))
    assert [p.name for p in path.parent.iterdir()] == ["report.png"]  # no temporary file left


def test_report_without_labels_or_metrics(tmp_path, oblique_image):
    path = _write(tmp_path / "plain.png", _case(oblique_image, with_labels=False))
    assert _read_png(path).shape[:2] == (900, 1600)
    # overwriting an existing report works and leaves one file
    _write(path, _case(oblique_image, with_labels=False), metrics={"runtime_s": None, "folding_percent": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.png"]


def test_report_is_independent_of_axis_order(tmp_path, oblique_image):
    """The same voxels stored in another axis order/sign give the same pictures (header text aside)."""
    case = _case(oblique_image)
    reordered = {key: sitk.DICOMOrient(value, "SRA") for key, value in case.items()}
    assert Grid.from_image(reordered["fixed"]).size != Grid.from_image(case["fixed"]).size
    a = _read_png(_write(tmp_path / "a.png", case))
    b = _read_png(_write(tmp_path / "b.png", reordered))
    panels = slice(150, 900)  # below the header (the header lists the image sizes)
    assert np.abs(a[panels] - b[panels]).mean() < 1e-4
    # control: a real left-right mirror of the content (same geometry) does change the pictures
    mirrored = {key: sitk.Flip(value, [True, False, False]) for key, value in case.items()}
    c = _read_png(_write(tmp_path / "c.png", mirrored))
    assert np.abs(a[panels] - c[panels]).mean() > 1e-3


def test_metric_blocks_tolerate_missing_keys():
    image = sitk.Image([4, 4, 4], sitk.sitkInt16)
    for metrics_dict in (None, {}, {"dice_mean_after": 0.9}, {"jacobian": {"folding_percent": 0.5}, "model": "x"}):
        blocks = report._metrics_blocks(metrics_dict, image, image, (-160, 240))
        text = "\n".join(itertools.chain.from_iterable([h, *lines] for h, lines in blocks))
        assert "Images" in text
        if metrics_dict:
            assert "n/a" in text  # missing values are shown as n/a, never raise
