"""Plausibility checks: a good registration is "ok"; broken pairs are "suspect" with reasons; the CLI's exit code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.cli import EXIT_SUSPECT, main
from deepabdominalreg.config import RegistrationConfig, config_from_preset
from deepabdominalreg.io import write_image
from deepabdominalreg.registration.checks import STATUS_OK, STATUS_SUSPECT, judge, mirror_lr
from deepabdominalreg.registration.pipeline import register_pair
from deepabdominalreg.synthetic.pairs import make_phantom_pair

_FAST = {"device": "cpu", "working_spacing_mm": 5.0, "io_iterations": 20, "compute_inverse": False}


@pytest.fixture(scope="module")
def phantom_pair():
    return make_phantom_pair(seed=3, spacing_mm=5.0, amplitude_mm=8.0)


def _register(fixed, moving):
    return register_pair(fixed, moving, config=config_from_preset("fast", **_FAST))


def _flip_lr(image: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, :, ::-1].copy())
    out.CopyInformation(image)
    return out


def test_mirror_lr_known_answer():
    volume = np.arange(5, dtype=np.float32)[None, None, :]
    mirrored, valid = mirror_lr(volume, axis=2, twice_centre=4, fill=-1.0)
    np.testing.assert_array_equal(mirrored[0, 0], [4, 3, 2, 1, 0])
    mirrored, valid = mirror_lr(volume, axis=2, twice_centre=5, fill=-1.0)
    np.testing.assert_array_equal(mirrored[0, 0], [-1, 4, 3, 2, 1])
    np.testing.assert_array_equal(valid[0, 0], [False, True, True, True, True])


def test_judge_gives_one_reason_per_failed_check_with_value_and_threshold():
    config = RegistrationConfig()
    good = {"affine_determinant": 1.0, "affine_scale_min": 0.95, "affine_scale_max": 1.05, "ncc_before": 0.6,
            "ncc_affine": 0.9, "ncc_after": 0.95, "body_dice": 0.98, "body_coverage": 0.99, "ncc_mirrored": 0.4,
            "body_extent_mm": 350.0, "displacement_p95_mm": 5.0}
    assert judge(good, config, folding_percent=0.0) == (STATUS_OK, [])
    status, reasons = judge(good, config, folding_percent=99.9)
    assert status == STATUS_SUSPECT and len(reasons) == 1 and "99.90 %" in reasons[0] and "1 %" in reasons[0]
    bad = dict(good, affine_determinant=-1.0, affine_scale_max=2.5, ncc_after=0.3, body_dice=0.2,
               displacement_p95_mm=200.0, ncc_mirrored=0.99)
    status, reasons = judge(bad, config, folding_percent=0.0, dice_before=0.5, dice_after=0.3)
    assert status == STATUS_SUSPECT and len(reasons) == 8, reasons
    searched = dict(good, search_correlation=0.9, search_overlap_fraction=0.31, search_at_overlap_limit=True)
    status, reasons = judge(searched, config, folding_percent=0.0)
    assert status == STATUS_SUSPECT and len(reasons) == 1 and "31 %" in reasons[0] and "30 %" in reasons[0]
    assert judge(dict(searched, search_at_overlap_limit=False), config, folding_percent=0.0) == (STATUS_OK, [])
    nan = dict(good, ncc_before=float("nan"), ncc_after=float("nan"))  # nothing to measure: no failure
    assert judge(nan, config)[0] == STATUS_OK


def test_good_phantom_registration_is_ok(phantom_pair):
    result = _register(phantom_pair.fixed_image, phantom_pair.moving_image)
    assert result.metrics["status"] == STATUS_OK, result.metrics["suspect_reasons"]
    checks = result.metrics["checks"]
    assert checks["ncc_after"] > checks["ncc_before"] and checks["body_dice"] > 0.9


def test_mirrored_scan_is_suspect(phantom_pair):
    result = _register(phantom_pair.fixed_image, _flip_lr(phantom_pair.moving_image))
    assert result.metrics["status"] == STATUS_SUSPECT
    assert any("mirror" in r or "determinant" in r for r in result.metrics["suspect_reasons"])


def test_noise_against_ct_is_suspect(phantom_pair):
    fixed = phantom_pair.fixed_image
    rng = np.random.default_rng(0)
    noise = sitk.GetImageFromArray(rng.uniform(-1000, 1000, sitk.GetArrayViewFromImage(fixed).shape)
                                   .astype(np.float32))
    noise.CopyInformation(fixed)
    result = _register(fixed, noise)
    assert result.metrics["status"] == STATUS_SUSPECT
    assert any("NCC" in r for r in result.metrics["suspect_reasons"])


def test_another_body_part_is_suspect(phantom_pair):
    """Moving = the lower part of the scan, its header claiming the upper part's place (no shared anatomy)."""
    image = phantom_pair.fixed_image
    nz = image.GetSize()[2]
    upper, lower = image[:, :, nz // 2:], image[:, :, : nz // 2]
    lower = sitk.Image(lower)
    lower.SetOrigin(upper.GetOrigin())
    result = _register(upper, lower)
    assert result.metrics["status"] == STATUS_SUSPECT, result.metrics["checks"]


def test_register_command_exit_code_for_a_suspect_result(phantom_pair, tmp_path, capsys):
    write_image(phantom_pair.fixed_image, tmp_path / "fixed.nii.gz")
    write_image(_flip_lr(phantom_pair.moving_image), tmp_path / "moving.nii.gz")
    argv = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
            "--preset", "fast", "--working-spacing", "5", "--device", "cpu", "--no-report", "--no-inverse",
            "--io-iterations", "20"]
    assert main([*argv, "--output-dir", str(tmp_path / "a")]) == EXIT_SUSPECT
    err = capsys.readouterr().err
    assert "SUSPECT" in err and "--accept-suspect" in err
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["status"] == STATUS_SUSPECT and metrics["suspect_reasons"]
    assert main([*argv, "--output-dir", str(tmp_path / "b"), "--accept-suspect"]) == 0


def test_disjoint_fields_of_view_are_suspect(phantom_pair):
    """The superior 40 % against the inferior 40 % at their true places: the offset search can only make them
    overlap at its smallest allowed overlap, and says so."""
    image = phantom_pair.fixed_image
    nz = image.GetSize()[2]
    result = _register(image[:, :, int(0.6 * nz):], phantom_pair.moving_image[:, :, : int(0.4 * nz)])
    assert result.metrics["status"] == STATUS_SUSPECT, result.metrics["checks"]
    assert result.metrics["checks"]["search_at_overlap_limit"] is True
    assert any("initial_search_min_overlap" in r for r in result.metrics["suspect_reasons"])
