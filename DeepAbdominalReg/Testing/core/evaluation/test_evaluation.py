"""Evaluation: metrics on displacement fields with known answers, pairs CSV, summaries, plots, CLI, benchmark smoke."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.config import PRESETS, RegistrationConfig
from deepabdominalreg.evaluation import benchmark, peers
from deepabdominalreg.evaluation.cases import CaseSet, load_label_names, read_pairs_csv, write_pairs_csv
from deepabdominalreg.evaluation.environment import code_version, environment_info
from deepabdominalreg.evaluation.methods import (
    NONE,
    VARIANTS,
    MethodOutput,
    MethodSpec,
    method_specs,
    our_method,
    run_ours,
)
from deepabdominalreg.evaluation.runners import run_evaluation, run_isolated, run_method
from deepabdominalreg.evaluation.scoring import (
    SSIM_WINDOW_HU,
    displacement_error,
    evaluate_displacement,
    fixed_body_mask,
    inverse_consistency_error,
)
from deepabdominalreg.evaluation.tables import markdown_table, plot_results, summarise
from deepabdominalreg.geometry import Grid, map_points, resample_image, warp_with_displacement
from deepabdominalreg.io import write_image, write_landmarks
from geometry_helpers import oblique_direction

# itk (elastix) and ANTs import SWIG modules that raise DeprecationWarnings on Python >= 3.12-style checks
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _constant_field(reference: sitk.Image, vector_mm) -> sitk.Image:
    grid = Grid.from_image(reference)
    array = np.broadcast_to(np.asarray(vector_mm, dtype=np.float32), (*grid.shape_zyx, 3)).copy()
    return grid.image_from_array(array, is_vector=True)


def _scaling_field(reference: sitk.Image, scale: float) -> sitk.Image:
    """``u(x) = (scale - 1) (x - c)``: the mapping is a uniform scaling, ``det J = scale**3`` everywhere."""
    grid = Grid.from_image(reference)
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape_zyx], indexing="ij")
    points = grid.index_to_physical(np.stack([i, j, k], -1).reshape(-1, 3).astype(np.float64))
    centre = points.mean(0)
    u = ((scale - 1.0) * (points - centre)).reshape(*grid.shape_zyx, 3)
    return grid.image_from_array(u.astype(np.float32), is_vector=True)


@pytest.fixture(scope="module")
def blob_pair():
    """A CT-like image with two labelled boxes on an oblique, anisotropic grid; moving = fixed shifted by whole
    voxels, so the true field is a constant and warping with it is exact (labels included)."""
    nz, ny, nx = 18, 22, 26
    array = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    zz, yy, xx = np.mgrid[0:nz, 0:ny, 0:nx]
    # the body stays >= 2 voxels from every border, so shifting it keeps it inside the grid
    body = (((xx - 13) / 10.0) ** 2 + ((yy - 11) / 8.5) ** 2 <= 1.0) & (zz >= 2) & (zz <= nz - 3)
    array[body] = 20.0 + 30.0 * np.sin(xx[body] / 2.0) * np.cos(yy[body] / 3.0) + 5.0 * zz[body]
    labels = np.zeros((nz, ny, nx), dtype=np.uint16)
    labels[5:11, 7:13, 6:12] = 1
    labels[8:14, 9:15, 14:20] = 2
    array[labels == 1] += 60.0
    array[labels == 2] -= 40.0
    fixed = sitk.GetImageFromArray(array)
    fixed.SetSpacing((1.5, 1.2, 2.0))
    fixed.SetOrigin((-20.0, 10.0, 5.0))
    fixed.SetDirection(oblique_direction())
    fixed_labels = sitk.GetImageFromArray(labels)
    fixed_labels.CopyInformation(fixed)
    # moving(y) = fixed(y - t): then fixed(x) = moving(x + t), the true displacement is +t
    shift_index = np.array([2.0, -1.0, 1.0])  # voxels (i, j, k)
    direction = np.asarray(oblique_direction()).reshape(3, 3)
    t = direction @ (shift_index * np.array(fixed.GetSpacing()))
    inverse_shift = sitk.TranslationTransform(3, tuple(-t))
    moving = resample_image(fixed, fixed, inverse_shift, "nearest", -1000.0)
    moving_labels = resample_image(fixed_labels, fixed, inverse_shift, "nearest", 0)
    centres = np.array([[8.0, 10.0, 8.0], [17.0, 12.0, 11.0], [13.0, 11.0, 6.0]])  # (i, j, k)
    fixed_points = Grid.from_image(fixed).index_to_physical(centres)
    return {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels,
            "t": t, "fixed_points": fixed_points, "moving_points": fixed_points + t,
            "names": {1: "liver", 2: "spleen"}}


# --------------------------------------------------------------------------------------------------------------
# field helpers with known answers
# --------------------------------------------------------------------------------------------------------------


def test_warp_with_constant_field_equals_translation(blob_pair):
    fixed, t = blob_pair["fixed"], blob_pair["t"]
    warped = warp_with_displacement(blob_pair["moving"], _constant_field(fixed, t), "nearest", -1000.0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(warped), sitk.GetArrayViewFromImage(fixed))


def test_map_points_adds_the_displacement(blob_pair):
    fixed, t = blob_pair["fixed"], blob_pair["t"]
    mapped = map_points(blob_pair["fixed_points"], _constant_field(fixed, t))
    np.testing.assert_allclose(mapped, blob_pair["fixed_points"] + t, atol=1e-5)


def test_inverse_consistency_is_zero_for_exact_inverse_and_shift_otherwise(blob_pair):
    fixed, t = blob_pair["fixed"], blob_pair["t"]
    forward = _constant_field(fixed, t)
    exact = inverse_consistency_error(forward, _constant_field(blob_pair["moving"], -t))
    assert exact["ic_mean_mm"] < 1e-5 and exact["ic_max_mm"] < 1e-5 and exact["ic_voxels"] > 0
    wrong = inverse_consistency_error(forward, _constant_field(blob_pair["moving"], np.zeros(3)))
    assert wrong["ic_mean_mm"] == pytest.approx(np.linalg.norm(t), rel=1e-5)


def test_inverse_consistency_leaves_out_points_mapped_outside():
    image = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    forward = _constant_field(image, [100.0, 0.0, 0.0])  # everything maps outside the 10 mm grid
    result = inverse_consistency_error(forward, _constant_field(image, [-100.0, 0.0, 0.0]))
    assert result["ic_voxels"] == 0 and math.isnan(result["ic_mean_mm"])


def test_displacement_error_known_offset(blob_pair):
    fixed, t = blob_pair["fixed"], blob_pair["t"]
    truth = _constant_field(fixed, t)
    assert displacement_error(truth, truth)["field_error_max_mm"] == 0.0
    off = displacement_error(_constant_field(fixed, t + np.array([0.0, 3.0, 4.0])), truth)
    assert off["field_error_mean_mm"] == pytest.approx(5.0, rel=1e-6)
    assert off["field_error_p95_mm"] == pytest.approx(5.0, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# evaluate_displacement
# --------------------------------------------------------------------------------------------------------------


def _evaluate(pair, field, **kwargs):
    return evaluate_displacement(
        field, fixed=pair["fixed"], moving=pair["moving"], fixed_labels=pair["fixed_labels"],
        moving_labels=pair["moving_labels"], fixed_landmarks_lps=pair["fixed_points"],
        moving_landmarks_lps=pair["moving_points"], label_names=pair["names"],
        true_displacement_lps=_constant_field(pair["fixed"], pair["t"]), **kwargs,
    )


def test_true_field_scores_perfectly(blob_pair):
    summary, per_label = _evaluate(blob_pair, _constant_field(blob_pair["fixed"], blob_pair["t"]),
                                   inverse_displacement_lps=_constant_field(blob_pair["moving"], -blob_pair["t"]))
    assert set(per_label) == {"liver", "spleen"}
    assert summary["dice_mean"] == 1.0 and summary["dice30"] == 1.0 and summary["dice_organs"] == 1.0
    assert summary["hd95_mean_mm"] == 0.0 and summary["hd_mean_mm"] == 0.0 and summary["asd_mean_mm"] == 0.0
    assert summary["centroid_tre_mean_mm"] == pytest.approx(0.0, abs=1e-9)
    assert summary["tre_mean_mm"] == pytest.approx(0.0, abs=1e-5) and summary["num_landmarks"] == 3
    assert summary["field_error_mean_mm"] == pytest.approx(0.0, abs=1e-6)
    assert summary["ncc_body"] == pytest.approx(1.0, abs=1e-9)
    assert summary["ssim_body"] == pytest.approx(1.0, abs=1e-9)
    assert summary["folding_percent"] == 0.0
    assert summary["jacobian_std"] == pytest.approx(0.0, abs=1e-5)
    assert summary["sdlogj"] == pytest.approx(0.0, abs=1e-5) and summary["sdlogj_l2r"] == pytest.approx(0.0, abs=1e-6)
    assert summary["ic_mean_mm"] == pytest.approx(0.0, abs=1e-5)


def test_zero_field_scores_the_misalignment(blob_pair):
    summary, per_label = _evaluate(blob_pair, _constant_field(blob_pair["fixed"], np.zeros(3)))
    assert summary["dice_mean"] < 0.9
    assert summary["dice30"] == pytest.approx(min(v["dice"] for v in per_label.values()))
    assert summary["tre_mean_mm"] == pytest.approx(np.linalg.norm(blob_pair["t"]), rel=1e-6)
    assert summary["field_error_mean_mm"] == pytest.approx(np.linalg.norm(blob_pair["t"]), rel=1e-5)
    assert summary["centroid_tre_mean_mm"] == pytest.approx(np.linalg.norm(blob_pair["t"]), rel=1e-6)
    assert summary["ncc_body"] < 0.99
    assert math.isnan(summary["ic_mean_mm"])  # no inverse given


@pytest.mark.parametrize("scale", [0.8, 1.25])
def test_uniform_scaling_jacobian_statistics(blob_pair, scale):
    field = _scaling_field(blob_pair["fixed"], scale)
    body = np.ones(sitk.GetArrayViewFromImage(blob_pair["fixed"]).shape, dtype=bool)
    summary, _ = _evaluate(blob_pair, field, body_mask_zyx=body)
    assert summary["folding_percent"] == 0.0
    assert summary["jacobian_min"] == pytest.approx(scale**3, rel=1e-4)
    assert summary["jacobian_std"] == pytest.approx(0.0, abs=1e-4)
    assert summary["sdlogj"] == pytest.approx(0.0, abs=1e-4)


def test_folding_field_counts_every_voxel(blob_pair):
    field = _scaling_field(blob_pair["fixed"], -1.0)  # point reflection: det J = -1 everywhere
    body = np.ones(sitk.GetArrayViewFromImage(blob_pair["fixed"]).shape, dtype=bool)
    summary, _ = _evaluate(blob_pair, field, body_mask_zyx=body)
    assert summary["folding_percent"] == 100.0


def test_displacement_must_be_on_the_fixed_grid(blob_pair):
    other = sitk.Image([5, 5, 5], sitk.sitkVectorFloat32, 3)
    with pytest.raises(ValueError, match="fixed image's grid"):
        evaluate_displacement(other, fixed=blob_pair["fixed"], moving=blob_pair["moving"])


# --------------------------------------------------------------------------------------------------------------
# cases, running, summaries
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def case_on_disk(blob_pair, tmp_path):
    folder = tmp_path / "case"
    write_image(blob_pair["fixed"], folder / "fixed.nii.gz")
    write_image(blob_pair["moving"], folder / "moving.nii.gz")
    write_image(blob_pair["fixed_labels"], folder / "fixed_seg.nii.gz")
    write_image(blob_pair["moving_labels"], folder / "moving_seg.nii.gz")
    write_landmarks(blob_pair["fixed_points"], folder / "fixed_lm.csv")
    write_landmarks(blob_pair["moving_points"], folder / "moving_lm.csv")
    (folder / "names.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        "name,fixed,moving,fixed_seg,moving_seg,fixed_landmarks,moving_landmarks,label_names\n"
        "blob,case/fixed.nii.gz,case/moving.nii.gz,case/fixed_seg.nii.gz,case/moving_seg.nii.gz,"
        "case/fixed_lm.csv,case/moving_lm.csv,case/names.json\n"
    )
    return csv_path


def test_pairs_csv_relative_paths_and_round_trip(case_on_disk, tmp_path):
    cases = read_pairs_csv(case_on_disk)
    assert len(cases) == 1 and cases[0].name == "blob"
    assert Path(cases[0].fixed).is_absolute() and Path(cases[0].fixed).exists()
    again = read_pairs_csv(write_pairs_csv(cases, tmp_path / "again" / "pairs.csv"))
    assert again == cases


def test_pairs_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("fixed,moving_image\na,b\n")
    with pytest.raises(ValueError, match="lacks the column"):
        read_pairs_csv(bad)
    bad.write_text("fixed,moving,colour\na,b,red\n")
    with pytest.raises(ValueError, match="unknown column"):
        read_pairs_csv(bad)


def test_load_label_names_with_and_without_key(tmp_path):
    nested = tmp_path / "map.json"
    nested.write_text(json.dumps({"total": {"0": "background", "1": "spleen"}, "total_mr": {"1": "spleen"}}))
    assert load_label_names(nested, "total") == {1: "spleen"}
    with pytest.raises(ValueError, match="choose one with a key"):
        load_label_names(nested)
    with pytest.raises(ValueError, match="no key"):
        load_label_names(nested, "nope")
    assert load_label_names(None) == {}


def _shift_method_spec() -> MethodSpec:
    return MethodSpec("true-shift", f"{__name__}:shift_method")


def shift_method(fixed_path, moving_path, *, threads=None):
    """A 'registration method' that returns the known constant field of the blob pair (for run_method tests)."""
    fixed = sitk.ReadImage(str(fixed_path))
    moving = sitk.ReadImage(str(moving_path))
    # recover t from the two images' label centroids is overkill: the fixture's shift is fixed and known
    direction = np.asarray(fixed.GetDirection()).reshape(3, 3)
    t = direction @ (np.array([2.0, -1.0, 1.0]) * np.array(fixed.GetSpacing()))
    return MethodOutput(displacement_lps=_constant_field(fixed, t),
                           inverse_displacement_lps=_constant_field(moving, -t), stages={"read": 0.0})


def failing_method(fixed_path, moving_path, *, threads=None):
    raise RuntimeError("this method always fails")


def test_run_method_scores_and_reports_failures(case_on_disk):
    case = read_pairs_csv(case_on_disk)[0]
    row, labels = run_method(case, _shift_method_spec())
    assert row["status"] == "ok", row.get("error")
    assert row["dice_mean"] == 1.0 and row["tre_mean_mm"] == pytest.approx(0.0, abs=1e-3)  # CSV rounding
    assert row["runtime_s"] >= 0 and row["peak_rss_mb"] > 0 and "time_read_s" in row
    assert {r["label_name"] for r in labels} == {"liver", "spleen"}
    row, labels = run_method(case, MethodSpec("broken", f"{__name__}:failing_method"))
    assert row["status"] == "failed" and "always fails" in row["error"] and labels == []


def test_run_evaluation_writes_tables_and_plots(case_on_disk, tmp_path):
    cases = read_pairs_csv(case_on_disk)
    methods = [NONE, _shift_method_spec()]
    out = tmp_path / "out"
    rows = run_evaluation(cases, methods, out, isolate=False, log=None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for name in ("per_pair.csv", "per_label.csv", "summary.csv", "summary.md", "settings.json", "environment.json",
                 "boxplots.png", "runtime.png"):
        assert (out / name).is_file(), name
    with open(out / "per_pair.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["method"] for r in table] == ["none", "true-shift"]
    assert float(table[1]["dice_mean"]) == 1.0 and float(table[0]["dice_mean"]) < 0.9
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert "| true-shift |" in text and "| none |" in text
    # resume: the successful runs are kept, not redone (a method that would fail proves it)
    again = run_evaluation(cases, [MethodSpec("none", f"{__name__}:failing_method"),
                                      MethodSpec("true-shift", f"{__name__}:failing_method")],
                              out, isolate=False, log=None, resume=True)
    assert [(r["method"], r["status"]) for r in again] == [("none", "ok"), ("true-shift", "ok")]
    assert float(again[1]["dice_mean"]) == 1.0
    with open(out / "per_label.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4  # 2 labels x 2 methods, kept


def test_run_isolated_measures_a_fresh_process(case_on_disk):
    case = read_pairs_csv(case_on_disk)[0]
    row, _ = run_isolated(case, NONE, threads=1, timeout_s=120)
    assert row["status"] == "ok", row.get("error")
    assert row["peak_rss_mb"] > 0 and row["dice_mean"] < 1.0


def test_summarise_mean_std_median():
    rows = [{"method": "a", "status": "ok", "dice_mean": v} for v in (0.5, 0.7, 0.9)]
    rows.append({"method": "a", "status": "failed", "dice_mean": 0.0})
    rows.append({"method": "b", "status": "ok", "dice_mean": float("nan")})
    summary = {(s["method"], s["metric"]): s for s in summarise(rows, ["dice_mean"])}
    a = summary[("a", "dice_mean")]
    assert a["n"] == 3 and a["mean"] == pytest.approx(0.7) and a["median"] == pytest.approx(0.7)
    assert a["std"] == pytest.approx(0.2)  # sample standard deviation
    assert summary[("b", "dice_mean")]["n"] == 0
    assert "0.700 ± 0.200" in markdown_table(rows)


def test_plot_results_dice_against_amplitude(tmp_path):
    rows = [{"method": m, "status": "ok", "source": "phantom", "amplitude_mm": a, "dice_mean": d,
             "runtime_s": r, "time_read_s": 0.1}
            for m, r in (("ours", 2.0), ("peer", 20.0)) for a, d in ((5, 0.9), (10, 0.8), (20, 0.7))]
    paths = plot_results(rows, tmp_path)
    assert set(paths) == {"boxplots", "dice_vs_amplitude", "runtime"}
    assert all(p.stat().st_size > 1000 for p in paths.values())


def test_environment_info_names_machine_and_packages():
    info = environment_info(2)
    assert info["threads_per_method"] == 2 and info["machine"]["logical_cpus"] >= 1
    assert info["packages"]["SimpleITK"] and info["packages"]["torch"]


# --------------------------------------------------------------------------------------------------------------
# our pipeline through the CLI, generated phantom cases, and the benchmark smoke run
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_command_on_generated_phantom(tmp_path):
    from deepabdominalreg.cli import main

    out = tmp_path / "eval"
    code = main(["evaluate", "--output-dir", str(out), "--phantom-seeds", "0", "--phantom-spacing", "6",
                 "--amplitudes", "8", "--ours", "fast", "--device", "cpu", "--working-spacing", "6",
                 "--io-iterations", "10"])
    assert code == 0
    with open(out / "per_pair.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"none", "ours-fast"}
    assert float(rows["ours-fast"]["dice_mean"]) > float(rows["none"]["dice_mean"])
    assert float(rows["ours-fast"]["tre_mean_mm"]) < float(rows["none"]["tre_mean_mm"])
    assert float(rows["ours-fast"]["folding_percent"]) < 0.5
    assert (out / "dice_vs_amplitude.png").is_file() and (out / "cases" / "phantom_s0_a8" / "fixed.nii.gz").is_file()


def test_evaluate_command_needs_cases(tmp_path, capsys):
    from deepabdominalreg.cli import main

    code = main(["evaluate", "--output-dir", str(tmp_path), "--pairs", str(tmp_path / "missing.csv")])
    assert code == 2 and "missing.csv" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("peer, package, options", [
    ("sitk-demons", None, {}),
    ("elastix-bspline", "itk", {"resolutions": 2, "max_iterations": 40}),
    ("ants-syn", "ants", {"reg_iterations": (10, 0, 0)}),
    # the 6 mm test grid is coarse for ConvexAdam's 6-voxel cells: 2-voxel cells, 1-voxel Adam grid
    ("convexadam", "convexAdam", {"grid_sp": 2, "disp_hw": 3, "grid_sp_adam": 1, "selected_niter": 40}),
    ("convexadam", "convexAdam", {"grid_sp": 2, "disp_hw": 3, "grid_sp_adam": 1, "selected_niter": 40,
                                  "prealign": False}),
])
def test_peer_recovers_a_translation_in_our_convention(blob_pair, tmp_path, peer, package, options):
    """Each peer's field must be fixed -> moving in LPS mm on the fixed grid: a pure translation checks the sign
    and the axes (a wrong convention gives errors of 2|t|, i.e. ~6 mm here)."""
    if package:
        pytest.importorskip(package)
    from deepabdominalreg.synthetic.anatomy import render_phantom

    moving, _ = render_phantom(seed=1, spacing_mm=6.0)
    t = np.array([6.0, -4.0, 3.0])
    fixed = resample_image(moving, moving, sitk.TranslationTransform(3, tuple(t)), "linear", -1024.0)
    write_image(fixed, tmp_path / "fixed.nii.gz")
    write_image(moving, tmp_path / "moving.nii.gz")
    spec, _ = peers.PEERS[peer]
    output = spec.resolve()(str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), threads=2,
                            **{**spec.options, **options})
    assert Grid.from_image(output.displacement_lps) == Grid.from_image(fixed) or np.allclose(
        output.displacement_lps.GetOrigin(), fixed.GetOrigin(), atol=1e-3)
    body = fixed_body_mask(fixed)
    error = displacement_error(output.displacement_lps, _constant_field(fixed, t), body)
    assert error["field_error_mean_mm"] < 3.0, error  # |t| = 7.8 mm; a flipped axis or sign gives > 6 mm


def test_benchmark_affine_variant_is_the_floor_of_the_speed_ratio():
    """``--ours affine`` runs every stage but the deformable ones; the targets table turns its time into the ceiling
    of the speed ratio (the fastest peer's time over it, per pair)."""
    (spec,) = method_specs(["affine"])
    assert spec.name == "ours-affine"
    assert spec.options["io_iterations"] == 0 and "model" not in spec.options
    with pytest.raises(ValueError, match="affine"):
        method_specs(["nonsense"])
    rows = []
    for case, ants, elastix, ours, affine_only in (("a", 10.0, 30.0, 5.0, 2.0), ("b", 20.0, 16.0, 4.0, 4.0)):
        for method, seconds in (("ants-syn", ants), ("elastix-bspline", elastix), ("ours-balanced", ours),
                                ("ours-affine", affine_only)):
            rows.append({"case": case, "method": method, "status": "ok", "runtime_s": seconds, "source": "ct",
                         "dice_organs": 0.9, "folding_percent": 0.0, "nice": 0})
    table = benchmark.targets_markdown(rows, None)
    # balanced: 10 / 5 = 2x and 16 / 4 = 4x; the ceiling: 10 / 2 = 5x and 16 / 4 = 4x
    assert "median 3.00x (range 2.00–4.00x) | no |" in table
    ceiling = next(line for line in table.splitlines() if line.startswith("| (ceiling: ours-affine"))
    assert "median 4.50x (range 4.00–5.00x)" in ceiling


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    """CI's smoke benchmark: one 6 mm phantom pair, ours (fast, tiny) and the installed peers with quick settings."""
    import importlib.util

    names = ["sitk-demons"] + [name for name, package in (("elastix-bspline", "itk"), ("ants-syn", "ants"))
                               if importlib.util.find_spec(package) is not None]
    out = tmp_path / "bench"
    code = benchmark.main(["--smoke", "--no-isolate", "--out", str(out), "--peers", ",".join(names)])
    assert code == 0
    with open(out / "per_pair.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"none", "ours-fast", *names}
    for method, row in rows.items():
        assert row["status"] == "ok", (method, row["error"])
        if method != "none":  # every method moves the field towards the truth (Dice is noisy at 6 mm)
            assert float(row["field_error_mean_mm"]) < float(rows["none"]["field_error_mean_mm"]), method
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert "## Targets (this run)" in text and "## Environment" in text
    assert (out / "boxplots.png").is_file() and (out / "runtime.png").is_file()


def test_benchmark_command_hands_its_options_to_the_benchmark(capsys):
    from deepabdominalreg.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["benchmark", "--help"])
    assert stop.value.code == 0
    assert "--smoke" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# the registry of methods: one name per variant of our pipeline
# --------------------------------------------------------------------------------------------------------------


def test_every_preset_is_a_variant_under_its_own_name():
    assert set(PRESETS) <= set(VARIANTS)
    for name in PRESETS:
        spec = our_method(name, model="my-model")
        assert spec.name == f"ours-{name}" and spec.options["preset"] == name
        # the model goes to the network variants only; the presets' own settings are not restated
        assert ("model" in spec.options) == (PRESETS[name].get("model") is not None)
        assert not set(PRESETS[name]) & (set(spec.options) - {"model"})
    assert our_method("balanced", device="cuda").name == "ours-balanced-cuda"
    assert our_method("balanced", device="auto").name == "ours-balanced"


def test_defined_variants_build_on_a_preset():
    with_model = {s.name: s for s in method_specs(["none", "affine", "network+io", "network+io-fine"], model="m",
                                                  compute_inverse=False)}
    assert with_model["none"] == NONE
    assert with_model["ours-affine"].options == {"preset": "balanced", "device": "cpu", "io_iterations": 0,
                                                 "compute_inverse": False}
    assert with_model["ours-network+io"].options["model"] == "m"
    assert with_model["ours-network+io-fine"].options["io_levels"] == (2, 1)
    for spec in with_model.values():  # every option is a RegistrationConfig field (or run_ours' own)
        RegistrationConfig(**{k: v for k, v in spec.options.items() if k not in ("preset", "device")})


def test_network_variants_are_skipped_without_a_model(monkeypatch):
    from deepabdominalreg.evaluation import methods

    monkeypatch.setattr(methods, "default_model", lambda: None)
    messages = []
    specs = method_specs(["network", "network+io", "fast"], log=messages.append)
    assert [s.name for s in specs] == ["ours-fast"]
    assert len(messages) == 2 and all("model" in m for m in messages)


def test_windows_come_from_the_config():
    assert SSIM_WINDOW_HU == RegistrationConfig().hu_window == peers.DEMONS_WINDOW_HU


def test_case_set_reads_a_pairs_csv(case_on_disk, tmp_path):
    assert CaseSet(pairs=str(case_on_disk)).make(tmp_path / "cases") == read_pairs_csv(case_on_disk)
    assert CaseSet().make(tmp_path / "cases") == []


def test_code_version_covers_the_whole_package(tmp_path, monkeypatch):
    """A change anywhere in the core package (not only in evaluation/) changes the code version."""
    from deepabdominalreg.evaluation import environment

    (tmp_path / "evaluation").mkdir()
    (tmp_path / "registration").mkdir()
    (tmp_path / "evaluation" / "environment.py").write_text("# a\n")
    (tmp_path / "registration" / "pipeline.py").write_text("# b\n")
    monkeypatch.setattr(environment, "__file__", str(tmp_path / "evaluation" / "environment.py"))
    before = code_version()
    (tmp_path / "registration" / "pipeline.py").write_text("# c\n")
    assert len(before) == 12 and code_version() != before


@pytest.mark.slow
def test_evaluate_model_command_runs_registry_variants(tmp_path, capsys):
    from deepabdominalreg.cli import main

    out = tmp_path / "em"
    code = main(["evaluate-model", "--output-dir", str(out), "--methods", "none,affine", "--phantom-seeds", "0",
                 "--phantom-spacing", "6", "--amplitude", "8", "--ct-seeds", "", "--threads", "1"])
    assert code == 0
    with open(out / "per_pair.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"none", "ours-affine"}
    assert float(rows["ours-affine"]["field_error_mean_mm"]) < float(rows["none"]["field_error_mean_mm"])
    assert "| ours-affine |" in capsys.readouterr().out


def test_run_ours_keeps_the_presets_model(tmp_path):
    """``run_ours(preset="network")`` runs the shipped network (``model=None`` must not drop the preset's model)."""
    from deepabdominalreg.config import PRESETS
    from deepabdominalreg.nn.models import available_models
    from deepabdominalreg.synthetic.anatomy import render_phantom

    if PRESETS["network"]["model"] not in available_models():
        pytest.skip("no shipped model")
    image, _ = render_phantom(seed=5, spacing_mm=6.0)
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(path))
    output = run_ours(str(path), str(path), threads=1, preset="network", compute_inverse=False)
    assert "network" in output.stages
    assert output.settings["model"]["name"] == PRESETS["network"]["model"]
    assert "network" not in run_ours(str(path), str(path), threads=1, preset="fast", io_iterations=0,
                                        compute_inverse=False).stages


def test_evaluate_config_file_is_checked_before_any_pair_is_generated(tmp_path, capsys):
    from deepabdominalreg.cli import main
    from deepabdominalreg.evaluation.cli import _config_overrides

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"io_smoothness_weight": 1.0}))
    assert _config_overrides(str(good)) == {"io_smoothness_weight": 1.0}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"io_smoothnes": 1.0}))
    out = tmp_path / "out"
    assert main(["evaluate", "--output-dir", str(out), "--ours", "fast", "--config", str(bad)]) == 2
    assert "io_smoothnes" in capsys.readouterr().err
    assert not (out / "cases").exists()
    assert main(["evaluate", "--output-dir", str(out), "--ours", "fastest"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert not (out / "cases").exists()
