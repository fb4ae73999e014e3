"""The command-line tool on a small phantom pair: outputs, file conventions, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.cli import main
from deepabdominalreg.io import read_displacement_field, read_landmarks

EXPECTED = ["warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "displacement_magnitude.nii.gz",
            "warped_seg.nii.gz", "metrics.json", "report.png", "inverse_displacement.nii.gz", "transform.h5",
            "inverse_transform.h5", "body_mask.nii.gz", "warped_moving_landmarks.csv"]


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    assert main(["phantom", "--output-dir", str(out), "--seed", "7", "--spacing", "5"]) == 0
    return out


@pytest.fixture(scope="module")
def registered(pair_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("registered")
    code = main([
        "register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
        "--fixed-seg", str(pair_dir / "fixed_seg.nii.gz"), "--moving-seg", str(pair_dir / "moving_seg.nii.gz"),
        "--fixed-landmarks", str(pair_dir / "fixed_landmarks.csv"),
        "--moving-landmarks", str(pair_dir / "moving_landmarks.csv"),
        "--output-dir", str(out), "--preset", "fast", "--working-spacing", "5", "--device", "cpu",
        "--outputs", "all",  # every output, the full-resolution ones included
    ])
    assert code == 0
    return out


def test_register_writes_every_output_on_the_fixed_grid(pair_dir, registered):
    fixed = sitk.ReadImage(str(pair_dir / "fixed.nii.gz"))
    for name in EXPECTED:
        assert (registered / name).exists(), name
    for name in ["warped.nii.gz", "jacobian.nii.gz", "displacement_magnitude.nii.gz", "warped_seg.nii.gz"]:
        image = sitk.ReadImage(str(registered / name))
        assert image.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), fixed.GetDirection(), atol=1e-6)
    assert not [p for p in registered.iterdir() if p.name.startswith(".")], "staging files left behind"


def test_metrics_json_contract(registered):
    metrics = json.loads((registered / "metrics.json").read_text(encoding="utf-8"))
    for key in ("dice_mean_before", "dice_mean_after", "folding_percent", "sdlogj", "runtime_s", "device"):
        assert key in metrics, key
    assert 0.0 <= metrics["dice_mean_before"] <= 1.0 and 0.0 <= metrics["dice_mean_after"] <= 1.0
    assert metrics["dice_mean_after"] > metrics["dice_mean_before"]
    assert set(metrics["stages"]) >= {"preprocessing", "affine", "instance_optimisation", "warping", "writing"}
    assert "hd95_mm" in next(iter(metrics["labels"]["after"]["per_label"].values()))
    assert metrics["landmarks"]["after"]["mean"] < metrics["landmarks"]["before"]["mean"]


def test_displacement_file_maps_fixed_landmarks_onto_moving(pair_dir, registered):
    transform = sitk.DisplacementFieldTransform(read_displacement_field(registered / "displacement.nii.gz"))
    fixed_points = read_landmarks(pair_dir / "fixed_landmarks.csv")
    moving_points = read_landmarks(pair_dir / "moving_landmarks.csv")
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in fixed_points])
    before = np.linalg.norm(fixed_points - moving_points, axis=1).mean()
    after = np.linalg.norm(mapped - moving_points, axis=1).mean()
    assert after < 0.5 * before, (before, after)
    # the same file resamples the moving image onto the fixed grid like warped.nii.gz
    moving = sitk.ReadImage(str(pair_dir / "moving.nii.gz"), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(pair_dir / "fixed.nii.gz"))
    again = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1024.0)
    warped = sitk.ReadImage(str(registered / "warped.nii.gz"), sitk.sitkFloat32)
    diff = np.abs(sitk.GetArrayFromImage(again) - sitk.GetArrayFromImage(warped))
    assert np.median(diff) < 1.0


def test_inverse_field_maps_moving_landmarks_back(pair_dir, registered):
    inverse = sitk.DisplacementFieldTransform(read_displacement_field(registered / "inverse_displacement.nii.gz"))
    fixed_points = read_landmarks(pair_dir / "fixed_landmarks.csv")
    moving_points = read_landmarks(pair_dir / "moving_landmarks.csv")
    back = np.array([inverse.TransformPoint(tuple(p)) for p in moving_points])
    assert np.linalg.norm(back - fixed_points, axis=1).mean() < 0.5 * np.linalg.norm(
        fixed_points - moving_points, axis=1).mean()


def test_missing_input_is_exit_code_2_with_a_message(tmp_path, capsys):
    code = main(["register", "--fixed", str(tmp_path / "nope.nii.gz"), "--moving", str(tmp_path / "x.nii.gz"),
                 "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "fixed image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, setting", [("--io-iterations", "-1", "io_iterations"),
                                                 ("--working-spacing", "0", "working_spacing_mm")])
def test_a_bad_option_value_is_exit_code_2_naming_the_setting(pair_dir, tmp_path, capsys, flag, value, setting):
    code = main(["register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
                 "--output-dir", str(tmp_path / "out"), flag, value])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid option") and setting in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("image_format", ["nii", "nrrd"])
def test_uncompressed_output_formats_hold_the_same_field(pair_dir, registered, tmp_path, image_format):
    code = main([
        "register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
        "--output-dir", str(tmp_path), "--preset", "fast", "--working-spacing", "5", "--device", "cpu",
        "--no-report", "--no-inverse", "--output-format", image_format, "--outputs", "all",
    ])
    assert code == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {f"{n}.{image_format}" for n in ("warped", "displacement", "jacobian", "displacement_magnitude",
                                                      "body_mask")} | {"metrics.json", "transform.h5"}
    # same seed and settings as the fixture: the field read back in LPS equals the compressed NIfTI's
    # (different output flags, so compare with the tolerance of float32 storage)
    field = sitk.GetArrayFromImage(read_displacement_field(tmp_path / f"displacement.{image_format}"))
    reference = sitk.GetArrayFromImage(read_displacement_field(registered / "displacement.nii.gz"))
    np.testing.assert_allclose(field, reference, atol=1e-4)
    for name in ("warped", "displacement", "jacobian"):  # written uncompressed, the field included
        head = (tmp_path / f"{name}.{image_format}").read_bytes()[:2000]
        assert not head.startswith(b"\x1f\x8b"), name
        assert image_format != "nrrd" or b"encoding: raw" in head, name
    assert sitk.ReadImage(str(tmp_path / f"warped.{image_format}")).GetSize() == \
        sitk.ReadImage(str(pair_dir / "fixed.nii.gz")).GetSize()


def test_unknown_output_format_is_refused(pair_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
              "--output-dir", str(tmp_path), "--output-format", "png"])
    assert "invalid choice" in capsys.readouterr().err


def test_progress_json_lines(pair_dir, tmp_path, capsys):
    code = main([
        "register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
        "--output-dir", str(tmp_path), "--preset", "fast", "--working-spacing", "6", "--io-iterations", "5",
        "--no-report", "--no-inverse", "--progress-json",
    ])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert events[-1]["stage"] == "finished" and "transform" in events[-1]["outputs"]
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions)


def test_demo_generates_registers_and_writes_every_output(tmp_path, capsys):
    """The README's first command, on a coarse phantom: it must run through ``register`` with that command's own
    defaults (it once failed at writing because its hand-built options lacked ``--output-format``)."""
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--spacing", "8", "--preset", "fast", "--seed", "3"]) == 0
    for name in EXPECTED:
        assert (out / name).is_file(), name
    assert (out / "input" / "fixed.nii.gz").is_file()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["dice_mean_after"] > metrics["dice_mean_before"]
    assert metrics["config"]["seed"] == 3 and metrics["config"]["io_levels"] == [4, 2]  # the fast preset
    assert "report:" in capsys.readouterr().out


def test_config_file_takes_every_field_that_to_dict_writes(tmp_path, capsys):
    """``register --config FILE`` (how the Slicer module passes its settings) reads a ``RegistrationConfig.to_dict``
    file back to the same config, on top of ``--preset``; explicit flags win over the file; bad files are exit 2."""
    from deepabdominalreg.cli import _build_config, build_parser
    from deepabdominalreg.config import config_from_preset

    config = config_from_preset("accurate", hu_window=(-200.0, 300.0), max_working_voxels=128, body_mask=False,
                                model="/models/x.pt", network_precision="bf16", io_learning_rate_mm=2.0,
                                io_control_spacing_mm=7.5, io_ncc_window_mm=20.0, folding_retry_factor=2.0,
                                device="cpu", seed=9, threads=3)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    base = ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--output-dir", str(tmp_path / "out")]
    assert _build_config(build_parser().parse_args([*base, "--preset", "fast", "--config", str(path)])) == config
    flags = build_parser().parse_args([*base, "--config", str(path), "--seed", "4", "--io-iterations", "6"])
    assert _build_config(flags) == config.replace(seed=4, io_iterations=6)
    path.write_text(json.dumps({**config.to_dict(), "io_ncc_window": 5}))  # the old voxel setting
    assert main([*base, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "unknown registration settings ['io_ncc_window']" in err


def test_write_result_leaves_the_result_unchanged(pair_dir, tmp_path):
    """The writing time goes into metrics.json only, not into the result's metrics."""
    import copy

    from deepabdominalreg.config import config_from_preset
    from deepabdominalreg.io import write_result
    from deepabdominalreg.registration.pipeline import register_pair

    fixed = sitk.ReadImage(str(pair_dir / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(pair_dir / "moving.nii.gz"))
    config = config_from_preset("fast", working_spacing_mm=8.0, io_iterations=2, compute_inverse=False, device="cpu")
    result = register_pair(fixed, moving, config=config)
    before = copy.deepcopy(result.metrics)
    write_result(result, tmp_path, fixed=fixed, moving=moving, report=True, image_format="nii")
    assert result.metrics == before
    written = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert set(written["stages"]) == set(before["stages"]) | {"writing", "report"}
    assert written["config"] == config.to_dict()


def test_default_outputs_are_the_transform_warped_images_metrics_and_report(pair_dir, registered, tmp_path):
    code = main([
        "register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
        "--moving-seg", str(pair_dir / "moving_seg.nii.gz"), "--output-dir", str(tmp_path), "--preset", "fast",
        "--working-spacing", "5", "--device", "cpu",
    ])
    assert code == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"transform.h5", "inverse_transform.h5", "warped.nii.gz", "warped_seg.nii.gz", "metrics.json",
                     "report.png"}
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["outputs"].values()) == names
    # the same registration as the fixture's: its transform file reproduces the fixture's dense field and warp
    transform = sitk.ReadTransform(str(tmp_path / "transform.h5"))
    dense = read_displacement_field(registered / "displacement.nii.gz")
    fixed = sitk.ReadImage(str(pair_dir / "fixed.nii.gz"))
    rng = np.random.default_rng(1)
    index = rng.integers(0, np.asarray(fixed.GetSize()), (20, 3))
    points = [fixed.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in index]
    field = sitk.DisplacementFieldTransform(dense)
    for p in points:
        np.testing.assert_allclose(transform.TransformPoint(p), field.TransformPoint(p), atol=0.01)
    moving = sitk.ReadImage(str(pair_dir / "moving.nii.gz"), sitk.sitkFloat32)
    again = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1024.0)
    warped = sitk.ReadImage(str(tmp_path / "warped.nii.gz"), sitk.sitkFloat32)
    assert np.median(np.abs(sitk.GetArrayFromImage(again) - sitk.GetArrayFromImage(warped))) < 1.0


def test_outputs_never_overwrite_inputs(pair_dir, tmp_path, capsys):
    import shutil

    shutil.copy(pair_dir / "moving.nii.gz", tmp_path / "warped.nii.gz")
    before = (tmp_path / "warped.nii.gz").read_bytes()
    code = main(["register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(tmp_path / "warped.nii.gz"),
                 "--output-dir", str(tmp_path)])
    assert code == 2 and "would overwrite the moving image" in capsys.readouterr().err
    assert (tmp_path / "warped.nii.gz").read_bytes() == before
    (tmp_path / "file").write_text("x")
    code = main(["register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
                 "--output-dir", str(tmp_path / "file")])
    assert code == 2 and "is an existing file" in capsys.readouterr().err
    code = main(["register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
                 "--output-dir", str(tmp_path / "o"), "--outputs", "warped,bogus"])
    assert code == 2 and "unknown output 'bogus'" in capsys.readouterr().err


def test_apply_reproduces_warped_outputs_and_maps_landmarks(pair_dir, registered, tmp_path):
    transform = str(registered / "transform.h5")
    assert main(["apply", "--transform", transform, "--image", str(pair_dir / "moving.nii.gz"),
                 "--reference", str(pair_dir / "fixed.nii.gz"), "--output", str(tmp_path / "w.nii.gz")]) == 0
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nii.gz"))).astype(np.int64)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(registered / "warped.nii.gz"))).astype(np.int64)
    # Integer output truncates the interpolated value: where it lies within float32 rounding of an integer
    # (|v - round(v)| ~ 1e-5 HU) ITK's and the pipeline's warps may land on either side; nothing else may differ.
    differ = ours != written
    assert np.abs(ours - written).max() <= 1 and differ.sum() <= 1e-4 * differ.size, differ.sum()
    assert main(["apply", "--transform", transform, "--labels", str(pair_dir / "moving_seg.nii.gz"),
                 "--reference", str(pair_dir / "fixed.nii.gz"), "--output", str(tmp_path / "s.nii.gz")]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "s.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(registered / "warped_seg.nii.gz"))))
    for name in ("p.csv", "p.mrk.json"):  # moving landmarks into fixed space, through inverse_transform.h5
        assert main(["apply", "--transform", transform, "--landmarks", str(pair_dir / "moving_landmarks.csv"),
                     "--output", str(tmp_path / name)]) == 0
        np.testing.assert_allclose(read_landmarks(tmp_path / name),
                                   read_landmarks(registered / "warped_moving_landmarks.csv"), atol=1e-3)


def test_apply_errors_are_clear(pair_dir, registered, tmp_path, capsys):
    code = main(["apply", "--transform", str(tmp_path / "none.h5"), "--image", str(pair_dir / "moving.nii.gz"),
                 "--reference", str(pair_dir / "fixed.nii.gz"), "--output", str(tmp_path / "w.nii.gz")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["apply", "--transform", str(registered / "transform.h5"), "--image", str(pair_dir / "moving.nii.gz"),
                 "--output", str(tmp_path / "w.nii.gz")])
    assert code == 2 and "--reference" in capsys.readouterr().err
    code = main(["apply", "--transform", str(registered / "transform.h5"), "--image", str(pair_dir / "moving.nii.gz"),
                 "--reference", str(pair_dir / "fixed.nii.gz"), "--output", str(pair_dir / "moving.nii.gz")])
    assert code == 2 and "would overwrite" in capsys.readouterr().err


def test_register_checks_the_user_masks_before_running(pair_dir, tmp_path, capsys):
    fixed = sitk.ReadImage(str(pair_dir / "fixed.nii.gz"))
    empty = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(fixed)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    for option, role in (("--rigid-mask", "rigid mask"), ("--exclude-mask", "exclusion mask")):
        code = main(["register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
                     option, str(tmp_path / "empty.nii.gz"), "--output-dir", str(tmp_path / "out")])
        assert code == 2 and f"{role} is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    code = main(["register", "--fixed", str(pair_dir / "fixed.nii.gz"), "--moving", str(pair_dir / "moving.nii.gz"),
                 "--rigid-mask", str(tmp_path / "missing.nii.gz"), "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "rigid mask" in capsys.readouterr().err
