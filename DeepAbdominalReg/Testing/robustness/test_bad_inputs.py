"""Every bad input gets a clear error (what, which input, what to do) before heavy work; inputs stay untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.cli import main
from deepabdominalreg.config import config_from_preset
from deepabdominalreg.io import ImageValidationError, read_image, read_labels, write_image
from deepabdominalreg.registration.pipeline import register_pair

TINY = config_from_preset("fast", working_spacing_mm=6.0, io_iterations=10, affine_iterations=10,
                          io_levels=(2,), compute_inverse=False)


def _body(shape=(24, 28, 32), spacing=(4.0, 4.0, 4.0), seed=0) -> sitk.Image:
    """A small CT-like volume: air, an ellipsoidal body with structure, in HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(np.float32)
    c = np.array(shape) / 2
    body = ((z - c[0]) / (0.45 * shape[0])) ** 2 + ((y - c[1]) / (0.4 * shape[1])) ** 2 + (
        (x - c[2]) / (0.42 * shape[2])) ** 2 < 1
    organ = ((z - c[0]) / 5) ** 2 + ((y - c[1] + 2) / 4) ** 2 + ((x - c[2] - 4) / 6) ** 2 < 1
    bone = ((y - c[1] - 6) / 2.5) ** 2 + ((x - c[2]) / 2.5) ** 2 < 1
    array = np.full(shape, -1000.0, np.float32)
    array[body] = -80
    array[body & organ] = 60
    array[body & bone] = 700
    array += rng.normal(0, 10, shape).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def ct_file(tmp_path) -> Path:
    return write_image(sitk.Cast(_body(), sitk.sitkInt16), tmp_path / "ct.nii.gz")


def _register_cli(fixed, moving, out, *extra) -> int:
    return main(["register", "--fixed", str(fixed), "--moving", str(moving), "--output-dir", str(out),
                 "--preset", "fast", "--working-spacing", "6", "--io-iterations", "5", "--no-report", *extra])


CASES = {
    "2d image": (lambda p: sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(p)), "3D volume is required"),
    "4d series": (lambda p: sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(p)), "4D"),
    "vector volume": (lambda p: sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(p)),
                      "components"),
    "empty file": (lambda p: p.write_bytes(b""), "empty"),
    "constant image": (lambda p: sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkInt16) + 40, str(p)), "constant"),
    "not an image": (lambda p: p.write_bytes(b"this is a text file, not a NIfTI image" * 20), "is corrupt"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_fixed_image_is_a_clear_cli_error(tmp_path, ct_file, capsys, case):
    make, message = CASES[case]
    bad = tmp_path / "bad.nii.gz"
    make(bad)
    out = tmp_path / "out"
    assert _register_cli(bad, ct_file, out) == 2
    err = capsys.readouterr().err
    assert "fixed image" in err and message in err, err
    assert not out.exists() or not any(out.iterdir())


def test_nan_and_inf_voxels_are_refused_with_a_fix(tmp_path):
    array = sitk.GetArrayFromImage(_body())
    array[3, 4, 5] = np.nan
    array[4, 4, 5] = np.inf
    image = sitk.GetImageFromArray(array)
    path = tmp_path / "nan.mha"  # .mha keeps NaN (NIfTI readers turn it into 0)
    sitk.WriteImage(image, str(path))
    with pytest.raises(ImageValidationError, match="2 NaN/inf voxels; replace them"):
        read_image(path, "moving image")


def _mhd(tmp_path, header_line: str) -> Path:
    np.arange(216, dtype=np.int16).reshape(6, 6, 6).tofile(tmp_path / "img.raw")
    path = tmp_path / "img.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 6 6 6\nElementType = MET_SHORT\n"
                    f"{header_line}\nElementDataFile = img.raw\n")
    return path


def test_zero_spacing_is_refused(tmp_path):
    with pytest.raises(ImageValidationError, match="spacing"):
        read_image(_mhd(tmp_path, "ElementSpacing = 1 0 1"), "fixed image")


def test_negative_spacing_is_read_as_a_flipped_axis(tmp_path):
    # ITK folds a negative spacing into the direction matrix: a valid, flipped geometry, not an error
    image = read_image(_mhd(tmp_path, "ElementSpacing = 1 -1.5 1"), "fixed image")
    assert image.GetSpacing() == (1.0, 1.5, 1.0)
    assert image.GetDirection()[4] == -1.0


def test_singular_direction_is_refused(tmp_path):
    # either ITK refuses the header (reported as unreadable) or our validation names the singular matrix
    with pytest.raises(ImageValidationError, match="singular direction|cannot be read"):
        read_image(_mhd(tmp_path, "TransformMatrix = 1 0 0 1 0 0 0 0 1"), "fixed image")


def test_truncated_copy_is_refused(tmp_path, ct_file):
    data = ct_file.read_bytes()
    truncated = tmp_path / "copy.nii.gz"
    truncated.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(ImageValidationError, match="truncated"):
        read_image(truncated, "fixed image")


def test_label_map_with_fractional_values_is_refused(tmp_path):
    labels = sitk.GetImageFromArray(np.full((6, 6, 6), 1.5, np.float32))
    path = write_image(labels, tmp_path / "seg.nii.gz")
    with pytest.raises(ImageValidationError, match="non-integer"):
        read_labels(path, "moving segmentation")


def test_mr_instead_of_ct_warns(tmp_path):
    ct = _body()
    mr = sitk.Cast(sitk.RescaleIntensity(ct, 0, 800), sitk.sitkFloat32)  # no air at -1000: not HU
    result = register_pair(mr, mr, config=TINY.replace(body_mask=False))
    assert any("do not look like CT" in w for w in result.metrics["warnings"])


def test_dicom_folder_with_two_series_lists_them(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    for series, uid in enumerate(["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"]):
        for z in range(3):
            image = sitk.Cast(_body(shape=(1, 16, 16)) , sitk.sitkInt16)[:, :, 0]
            image = sitk.JoinSeries(image)
            image.SetOrigin((0.0, 0.0, float(z)))
            for key, value in {"0020|000e": uid, "0020|000d": "1.2.3", "0008|0060": "CT",
                               "0020|0013": str(z + 1), "0020|0032": f"0\\0\\{z}",
                               "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
                image.SetMetaData(key, value)
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            writer.SetFileName(str(folder / f"s{series}_{z}.dcm"))
            writer.Execute(image)
    with pytest.raises(ImageValidationError, match="holds 2 DICOM series") as info:
        read_image(folder, "fixed image")
    assert "1.2.826.0.1.3680043.8.498.1" in str(info.value) and "::" in str(info.value)
    picked = read_image(f"{folder}::1.2.826.0.1.3680043.8.498.2", "fixed image")
    assert picked.GetSize()[2] == 3


def test_inputs_are_never_modified_by_a_run(tmp_path, ct_file):
    moving = write_image(sitk.Cast(_body(seed=1), sitk.sitkInt16), tmp_path / "moving.nii.gz")
    labels = write_image(sitk.Cast(sitk.BinaryThreshold(_body(), 0, 5000), sitk.sitkUInt8), tmp_path / "seg.nii.gz")
    before = {p: _sha(p) for p in (ct_file, moving, labels)}
    # the toy noise bodies are a pair the plausibility checks may call suspect (exit 3): this test is about the files
    assert _register_cli(ct_file, moving, tmp_path / "out", "--fixed-seg", str(labels),
                         "--moving-seg", str(labels), "--accept-suspect") == 0
    assert {p: _sha(p) for p in before} == before


def test_folding_above_the_limit_triggers_a_stronger_rerun():
    image = _body()
    events = []
    result = register_pair(image, _body(seed=3), config=TINY.replace(folding_limit_percent=-1.0),
                           progress=events.append)
    assert "folding_retry" in result.metrics
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions), "the retry's iterations must not move the progress bar back"
    assert any("rerun with 4x regularisation" in w for w in result.metrics["warnings"])


def test_same_inputs_and_seed_give_bit_identical_output_on_cpu():
    fixed, moving = _body(seed=4), _body(seed=5)
    a = register_pair(fixed, moving, config=TINY.replace(device="cpu", seed=3))
    b = register_pair(fixed, moving, config=TINY.replace(device="cpu", seed=3))
    assert np.array_equal(
        sitk.GetArrayViewFromImage(a.displacement_lps), sitk.GetArrayViewFromImage(b.displacement_lps)
    )
    assert np.array_equal(sitk.GetArrayViewFromImage(a.warped_image), sitk.GetArrayViewFromImage(b.warped_image))


def test_metrics_json_has_no_nan_tokens(tmp_path, ct_file):
    out = tmp_path / "out"
    # 5 iterations on a 6 mm grid move a noisy image registered to itself (NCC 1.00 -> 0.92): flagged suspect, and
    # metrics.json is written either way
    assert _register_cli(ct_file, ct_file, out, "--accept-suspect") == 0
    text = (out / "metrics.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)
