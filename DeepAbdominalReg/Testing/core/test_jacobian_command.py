"""``deepabdominalreg jacobian`` through ``cli.main`` on an oblique, anisotropic grid: analytic fields (linear: det J =
det(I + A) everywhere; a fold along one axis with a known voxel count), SimpleITK's
DisplacementFieldJacobianDeterminantFilter as an independent oracle, transform files written by SimpleITK, masks and
bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.cli import main
from deepabdominalreg.geometry import Grid
from deepabdominalreg.io import write_displacement_field
from geometry_helpers import oblique_direction

GRID = Grid(size=(20, 14, 10), spacing=(0.7, 0.9, 2.5), origin=(-12.0, 30.0, 7.5), direction=oblique_direction())
A = np.array([[0.10, 0.05, -0.02], [0.03, -0.08, 0.04], [0.02, 0.06, 0.12]])


def _points_zyx3(grid: Grid) -> np.ndarray:
    nz, ny, nx = grid.shape_zyx
    k, j, i = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float64)
    return grid.index_to_physical(np.stack([i, j, k], axis=-1).reshape(-1, 3)).reshape(nz, ny, nx, 3)


def _field(u_zyx3: np.ndarray, grid: Grid = GRID) -> sitk.Image:
    return grid.image_from_array(np.ascontiguousarray(u_zyx3, dtype=np.float64), is_vector=True)


def _linear_field() -> sitk.Image:
    points = _points_zyx3(GRID)
    return _field((points - points.reshape(-1, 3).mean(0)) @ A.T)


def _sinusoid_field(grid: Grid = GRID) -> sitk.Image:
    p = _points_zyx3(grid) - np.asarray(grid.origin)
    u = np.stack([1.2 * np.sin(p[..., 1] / 3.0 + p[..., 2] / 9.0), 0.8 * np.cos(p[..., 0] / 2.5),
                  1.5 * np.sin(p[..., 0] / 4.0 + p[..., 1] / 5.0)], axis=-1)
    return _field(u, grid)


#: det J of :func:`_folded_field` along the grid's i axis: 1 + (central difference of w) / spacing
FOLD_W = np.array([0.0] * 10 + [-1.5, -3.0] + [-4.5] * 8)  # in units of the i spacing; 20 values
FOLD_DET_I = np.array([1.0] * 9 + [0.25, -0.5, -0.5, 0.25] + [1.0] * 7)


def _folded_field() -> sitk.Image:
    """``u(x) = w(i) d_i`` (``d_i`` the unit LPS vector of the grid's i axis):
    ``I + du/dx = I + (w'(i)/s_i) d_i d_i^T``, so ``det J = 1 + w'(i) / s_i``;
    two slabs of voxels (i = 10, 11) have det J = -0.5."""
    d_i = GRID.direction_matrix[:, 0]
    w_mm = FOLD_W * GRID.spacing[0]
    nz, ny, nx = GRID.shape_zyx
    return _field(np.broadcast_to(w_mm[None, None, :, None] * d_i, (nz, ny, nx, 3)))


def _run(args, capsys) -> tuple[int, str, str]:
    code = main(["jacobian", *[str(a) for a in args]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _report(path) -> dict:
    return json.loads(path.read_text())


def test_linear_field_gives_det_of_i_plus_a_everywhere(tmp_path, capsys):
    # .nii.gz stores the vectors in RAS (intent 1006): a reader that kept them in RAS would get det(I + F A) instead
    field = write_displacement_field(_linear_field(), tmp_path / "field.nii.gz")
    expected = np.linalg.det(np.eye(3) + A)
    assert abs(np.linalg.det(np.eye(3) + np.diag([-1.0, -1.0, 1.0]) @ A) - expected) > 0.02
    code, out, _ = _run(["--field", field, "--json", tmp_path / "r.json", "--output-jacobian", tmp_path / "j.nii.gz",
                         "--output-log-jacobian", tmp_path / "l.nii.gz"], capsys)
    assert code == 0
    report = _report(tmp_path / "r.json")
    assert report["voxels"] == int(np.prod(GRID.size))
    assert report["folding_voxels"] == 0 and report["folding_percent"] == 0.0
    for key in ("jacobian_min", "jacobian_max", "jacobian_mean"):
        assert report[key] == pytest.approx(expected, abs=1e-5)
    assert all(v == pytest.approx(expected, abs=1e-5) for v in report["percentiles"].values())
    assert list(report["percentiles"]) == ["1", "5", "50", "95", "99"]
    assert report["sdlogj"] < 1e-5
    jac = sitk.ReadImage(str(tmp_path / "j.nii.gz"))
    assert Grid.from_image(jac).size == GRID.size
    np.testing.assert_allclose(jac.GetDirection(), GRID.direction, atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(jac), expected, atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz"))), np.log(expected),
                               atol=1e-5)
    assert "verdict: no folding" in out and f"{expected:.4f}" in out


def test_sinusoid_matches_simpleitk_filter_away_from_the_border(tmp_path, capsys):
    field = _sinusoid_field()
    write_displacement_field(field, tmp_path / "field.mha")
    code, _, _ = _run(["--field", tmp_path / "field.mha", "--output-jacobian", tmp_path / "j.mha"], capsys)
    assert code == 0
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "j.mha")))
    # ITK's filter differentiates along the image's axes with its spacing but ignores the direction: give it the
    # field in the grid's own frame (vectors D^T u, identity direction); det(I + du/dx) does not change with the frame
    local = sitk.GetImageFromArray(sitk.GetArrayFromImage(field) @ GRID.direction_matrix, isVector=True)
    local.SetSpacing(GRID.spacing)
    oracle = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(local))
    inner = (slice(1, -1),) * 3
    assert np.ptp(oracle[inner]) > 0.2  # a field whose det J varies: the comparison means something
    np.testing.assert_allclose(ours[inner], oracle[inner], atol=2e-5)


def test_folded_field_reports_the_folded_voxels(tmp_path, capsys):
    write_displacement_field(_folded_field(), tmp_path / "field.nii.gz")
    code, out, _ = _run(["--field", tmp_path / "field.nii.gz", "--json", tmp_path / "r.json",
                         "--output-log-jacobian", tmp_path / "l.nii.gz"], capsys)
    assert code == 0
    report = _report(tmp_path / "r.json")
    nz, ny, nx = GRID.shape_zyx
    assert report["folding_voxels"] == 2 * ny * nz
    assert report["folding_percent"] == pytest.approx(100.0 * 2 / nx)
    assert report["jacobian_min"] == pytest.approx(-0.5, abs=1e-5)
    assert report["jacobian_max"] == pytest.approx(1.0, abs=1e-5)
    # SDlogJ over det J > 0: 2 slabs of log(0.25) among 18 slabs of the positive voxels
    logs = np.log(FOLD_DET_I[FOLD_DET_I > 0])
    assert report["sdlogj"] == pytest.approx(float(np.std(logs)), abs=1e-5)
    assert report["sdlogj_clipped"] > report["sdlogj"] + 1.0  # the metrics.json convention counts log(1e-9)
    assert "10 % folding — the transform is not invertible there" in out
    # log det J where det J > 0, log(1e-9) where folded (NaN would read back as 0 from NIfTI: no volume change)
    log_j = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")))
    expected = np.broadcast_to(np.log(np.where(FOLD_DET_I > 0, FOLD_DET_I, 1e-9)), log_j.shape)
    np.testing.assert_allclose(log_j, expected, atol=1e-5)
    assert float(np.std(log_j, dtype=np.float64)) == pytest.approx(report["sdlogj_clipped"], rel=1e-4)


def test_mask_restricts_the_statistics(tmp_path, capsys):
    write_displacement_field(_folded_field(), tmp_path / "field.nii.gz")
    nz, ny, _ = GRID.shape_zyx
    labels = np.zeros(GRID.shape_zyx, dtype=np.uint8)
    labels[:, :, 8:13] = 3  # i = 8..12: the two folded slabs and three unfolded ones
    sitk.WriteImage(GRID.image_from_array(labels), str(tmp_path / "mask.nii.gz"))
    code, _, _ = _run(["--field", tmp_path / "field.nii.gz", "--mask", tmp_path / "mask.nii.gz",
                       "--json", tmp_path / "r.json"], capsys)
    assert code == 0
    report = _report(tmp_path / "r.json")
    assert report["voxels"] == 5 * ny * nz and report["folding_voxels"] == 2 * ny * nz
    assert report["folding_percent"] == pytest.approx(40.0)
    assert report["jacobian_max"] == pytest.approx(1.0, abs=1e-5)

    labels[:] = 0
    labels[:, :, :8] = 1  # unfolded part only
    sitk.WriteImage(GRID.image_from_array(labels), str(tmp_path / "flat.nii.gz"))
    code, out, _ = _run(["--field", tmp_path / "field.nii.gz", "--mask", tmp_path / "flat.nii.gz"], capsys)
    assert code == 0 and "verdict: no folding" in out

    # a mask on another grid (axis-aligned, coarse, covering the field) is resampled nearest onto the field's grid
    corners = GRID.corners()
    big = Grid(size=(12, 12, 12), spacing=(6.0, 6.0, 6.0), origin=tuple(corners.min(0) - 10.0),
               direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    sitk.WriteImage(big.image_from_array(np.ones((12, 12, 12), dtype=np.uint8)), str(tmp_path / "big.nii.gz"))
    code, _, _ = _run(["--field", tmp_path / "field.nii.gz", "--mask", tmp_path / "big.nii.gz",
                       "--json", tmp_path / "r2.json"], capsys)
    assert code == 0 and _report(tmp_path / "r2.json")["voxels"] == int(np.prod(GRID.size))

    far = Grid(size=(4, 4, 4), spacing=(2.0, 2.0, 2.0), origin=(500.0, 500.0, 500.0), direction=big.direction)
    sitk.WriteImage(far.image_from_array(np.ones((4, 4, 4), dtype=np.uint8)), str(tmp_path / "far.nii.gz"))
    code, _, err = _run(["--field", tmp_path / "field.nii.gz", "--mask", tmp_path / "far.nii.gz"], capsys)
    assert code == 2 and "does not overlap" in err


def _affine() -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.05, 0.03, 0.0, -0.02, 0.97, 0.04, 0.01, 0.02, 1.08))
    affine.SetTranslation((2.0, -1.0, 3.0))
    affine.SetCenter((5.0, 40.0, 30.0))
    return affine


def test_transform_files_include_the_affine(tmp_path, capsys):
    affine = _affine()
    det_m = float(np.linalg.det(np.asarray(affine.GetMatrix()).reshape(3, 3)))
    assert abs(det_m - 1.0) > 0.05
    # affine + zero field (written by SimpleITK): det J = det(matrix) on the field's grid
    zero = sitk.DisplacementFieldTransform(_field(np.zeros((*GRID.shape_zyx, 3))))
    sitk.WriteTransform(sitk.CompositeTransform([affine, zero]), str(tmp_path / "zero.h5"))
    code, out, _ = _run(["--transform", tmp_path / "zero.h5", "--json", tmp_path / "zero.json"], capsys)
    assert code == 0 and "--deformable-only leaves it out" in out
    report = _report(tmp_path / "zero.json")
    assert report["voxels"] == int(np.prod(GRID.size))
    assert report["jacobian_min"] == pytest.approx(det_m, abs=1e-4)
    assert report["jacobian_max"] == pytest.approx(det_m, abs=1e-4)
    assert report["source"]["linear_determinant"] == pytest.approx(det_m, abs=1e-12)

    # affine only (.tfm): needs --reference; det(matrix) on its grid
    sitk.WriteTransform(affine, str(tmp_path / "affine.tfm"))
    code, _, err = _run(["--transform", tmp_path / "affine.tfm"], capsys)
    assert code == 2 and "--reference" in err and len(err.strip().splitlines()) == 1
    reference = GRID.image_from_array(np.random.default_rng(0).normal(size=GRID.shape_zyx).astype(np.float32))
    sitk.WriteImage(reference, str(tmp_path / "ref.nii.gz"))
    code, _, _ = _run(["--transform", tmp_path / "affine.tfm", "--reference", tmp_path / "ref.nii.gz",
                       "--json", tmp_path / "affine.json"], capsys)
    assert code == 0
    report = _report(tmp_path / "affine.json")
    assert report["jacobian_min"] == pytest.approx(det_m, abs=1e-4)
    assert report["jacobian_max"] == pytest.approx(det_m, abs=1e-4)
    code, _, err = _run(["--transform", tmp_path / "affine.tfm", "--reference", tmp_path / "ref.nii.gz",
                         "--deformable-only"], capsys)
    assert code == 2 and "no deformable part" in err


def test_composite_is_affine_times_deformable(tmp_path, capsys):
    """x -> affine(x + u(x)): det J = det(matrix) det(I + du/dx) voxel by voxel; --deformable-only gives the second."""
    affine = _affine()
    det_m = float(np.linalg.det(np.asarray(affine.GetMatrix()).reshape(3, 3)))
    field = _sinusoid_field()
    composite = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Image(field))])
    sitk.WriteTransform(composite, str(tmp_path / "t.h5"))
    write_displacement_field(field, tmp_path / "u.mha")
    for name, extra in (("full", []), ("deformable", ["--deformable-only"])):
        code, _, _ = _run(["--transform", tmp_path / "t.h5", *extra, "--output-jacobian", tmp_path / f"{name}.mha"],
                          capsys)
        assert code == 0
    code, _, _ = _run(["--field", tmp_path / "u.mha", "--output-jacobian", tmp_path / "field.mha"], capsys)
    assert code == 0
    full, deformable, direct = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{n}.mha")))
                                for n in ("full", "deformable", "field"))
    assert np.ptp(deformable) > 0.2
    np.testing.assert_allclose(deformable, direct, atol=1e-6)
    np.testing.assert_allclose(full, det_m * deformable, atol=1e-4)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    field = write_displacement_field(_linear_field(), tmp_path / "field.nii.gz")
    scalar = tmp_path / "scalar.nii.gz"
    sitk.WriteImage(GRID.image_from_array(np.random.default_rng(0).normal(size=GRID.shape_zyx)), str(scalar))
    sitk.WriteTransform(_affine(), str(tmp_path / "affine.tfm"))
    empty = tmp_path / "empty_mask.nii.gz"
    sitk.WriteImage(GRID.image_from_array(np.zeros(GRID.shape_zyx, dtype=np.uint8)), str(empty))
    cases = [
        (["--field", scalar], "3-component"),
        (["--field", tmp_path / "missing.nii.gz"], "does not exist"),
        (["--transform", tmp_path / "missing.h5"], "does not exist"),
        (["--field", tmp_path / "affine.tfm"], "give it with --transform"),
        (["--transform", field], "not an ITK transform"),
        (["--transform", tmp_path / "affine.tfm"], "--reference"),
        (["--field", field, "--deformable-only"], "--deformable-only"),
        (["--field", field, "--mask", empty], "is empty"),
        (["--field", field, "--output-jacobian", field], "would overwrite"),
        (["--field", field, "--json", tmp_path / "same", "--output-jacobian", tmp_path / "same"], "different files"),
    ]
    for args, message in cases:
        code, _, err = _run(args, capsys)
        assert code == 2, args
        assert message in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "same").exists()
    nan_field = sitk.GetArrayFromImage(_linear_field())
    nan_field[3, 4, 5, 1] = np.nan
    write_displacement_field(_field(nan_field), tmp_path / "nan.mha")
    code, _, err = _run(["--field", tmp_path / "nan.mha"], capsys)
    assert code == 2 and "NaN" in err
