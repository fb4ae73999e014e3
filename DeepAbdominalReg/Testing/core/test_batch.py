"""``deepabdominalreg batch``: pairs CSV, longitudinal folders, shards, resume, recorded failures (docs/batch.md)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from deepabdominalreg.batch import (
    Pair,
    longitudinal_pairs,
    merge_summaries,
    parse_shard,
    read_batch_csv,
    select_shard,
    shard_from_environment,
    summary_path,
    threads_per_job,
)
from deepabdominalreg.cli import main
from deepabdominalreg.io import ImageValidationError

# the fastest registration there is: affine only on a 6 mm grid, no report
FAST = ["--preset", "fast", "--io-iterations", "0", "--no-report", "--model", "none", "--working-spacing", "6",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def _outside_a_slurm_array(monkeypatch):
    """The default shard comes from the Slurm array variables: none here, also when the tests run in a job array."""
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(name, raising=False)


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _summary(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


# --------------------------------------------------------------------------------------------------------------
# pairs CSV
# --------------------------------------------------------------------------------------------------------------


def test_csv_paths_are_relative_to_its_folder_and_ids_default_to_the_row(tmp_path):
    (tmp_path / "sub").mkdir()
    path = _csv(tmp_path / "sub" / "pairs.csv",
                "fixed,moving,id,moving_seg\n"
                "f.nii.gz,m.nii.gz,case_a,seg.nii.gz\n"
                "/abs/f.nii.gz,../m2.nii.gz,,\n"
                "\n"
                "dicom_f::1.2.3,m3.nrrd,,\n")
    pairs = read_batch_csv(path)
    base = (tmp_path / "sub").resolve()
    assert [p.id for p in pairs] == ["case_a", "pair002", "pair003"]
    assert pairs[0].fixed == str(base / "f.nii.gz") and pairs[0].moving_seg == str(base / "seg.nii.gz")
    assert pairs[1].fixed == "/abs/f.nii.gz" and pairs[1].moving == str(base / ".." / "m2.nii.gz")
    assert pairs[1].moving_seg is None
    assert pairs[2].fixed == str(base / "dicom_f") + "::1.2.3"  # a DICOM series UID stays attached


@pytest.mark.parametrize("text, words", [
    ("fixed,id\nf.nii.gz,a\n", ["moving", "line 1"]),
    ("fixed,moving,moving_segmentation\nf,m,s\n", ["'moving_segmentation'", "known"]),
    ("fixed,moving\nf,m\n,m2\n", ["row 2", "line 3", "'fixed'"]),
    ("fixed,moving,id\nf,m,a\nf,m2,a\n", ["'a'", "twice", "row 1", "row 2"]),
    ("fixed,moving,id\nf,m,../up\n", ["row 1", "'../up'"]),
    ("fixed,moving\nf,m,extra\n", ["row 1", "more cells"]),
    ("fixed,moving\n", ["no pairs"]),
])
def test_csv_errors_name_the_row_and_column(tmp_path, text, words):
    with pytest.raises(ImageValidationError) as info:
        read_batch_csv(_csv(tmp_path / "pairs.csv", text))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_a_bad_csv_is_exit_code_2_before_anything_runs(tmp_path, capsys):
    path = _csv(tmp_path / "pairs.csv", "fixed,mov\nf,m\n")
    assert main(["batch", "--pairs", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "moving" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_bad_register_option_is_refused_before_any_pair(tmp_path, capsys):
    path = _csv(tmp_path / "pairs.csv", "fixed,moving\nf,m\n")
    code = main(["batch", "--pairs", str(path), "--output-dir", str(tmp_path / "out"), "--outputs", "warpd"])
    assert code == 2 and "warpd" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# longitudinal folders
# --------------------------------------------------------------------------------------------------------------


def test_longitudinal_registers_every_time_point_onto_the_first_by_name(tmp_path):
    for name in ("t10.nii.gz", "t2.nii.gz", "t1.nii.gz", "t2_seg.nii.gz", "t1_seg.nii.gz", "notes.txt", "t3.nrrd"):
        (tmp_path / name).touch()
    (tmp_path / "out").mkdir()  # folders are not time points
    pairs = longitudinal_pairs(tmp_path)
    folder = tmp_path.resolve()
    assert [p.id for p in pairs] == ["t2", "t3", "t10"]  # numbers sort as numbers
    assert all(p.fixed == str(folder / "t1.nii.gz") and p.fixed_seg == str(folder / "t1_seg.nii.gz") for p in pairs)
    assert pairs[0].moving_seg == str(folder / "t2_seg.nii.gz") and pairs[1].moving_seg is None

    chosen = longitudinal_pairs(tmp_path, baseline="t3.nrrd")
    assert [p.id for p in chosen] == ["t1", "t2", "t10"]
    assert {p.fixed for p in chosen} == {str(folder / "t3.nrrd")}
    with pytest.raises(ImageValidationError, match="t4"):
        longitudinal_pairs(tmp_path, baseline="t4")


def test_longitudinal_needs_two_images(tmp_path):
    (tmp_path / "only.nii.gz").touch()
    with pytest.raises(ImageValidationError, match="at least a baseline"):
        longitudinal_pairs(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# shards and threads
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 7, 12])
def test_every_pair_lies_in_exactly_one_shard(count):
    pairs = [Pair(id=f"p{i}", fixed="f", moving=f"m{i}") for i in range(10)]
    seen = [i for index in range(count) for i, _ in select_shard(pairs, index, count)]
    assert sorted(seen) == list(range(10))
    assert select_shard(pairs, 1, 3) == [(1, pairs[1]), (4, pairs[4]), (7, pairs[7])]


@pytest.mark.parametrize("text", ["3/3", "-1/3", "0/0", "1", "a/b", "1/2/3"])
def test_a_bad_shard_is_a_clear_error(text):
    with pytest.raises(ImageValidationError, match="--shard"):
        parse_shard(text)


def test_shard_from_slurm_array_variables():
    assert parse_shard("2/10") == (2, 10)
    assert shard_from_environment({}) is None
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "10"}) == (4, 10)
    # --array=1-10: task ids start at SLURM_ARRAY_TASK_MIN
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "10",
                                   "SLURM_ARRAY_TASK_MIN": "1"}) == (0, 10)
    # --array=0-8:2 (ids 0, 2, ..., 8)
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "5",
                                   "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2"}) == (3, 5)
    with pytest.raises(ImageValidationError, match="--shard"):  # --array=1,5,9 has no uniform step
        shard_from_environment({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3",
                                "SLURM_ARRAY_TASK_MIN": "1"})


def test_thread_budget_is_shared_between_jobs():
    assert threads_per_job(16, 4) == 4
    assert threads_per_job(7, 2) == 3
    assert threads_per_job(2, 4) == 1


def test_merge_summaries_joins_the_shards_in_pair_order(tmp_path):
    header = "index,id,status\n"
    (tmp_path / "summary.shard-0-of-2.csv").write_text(header + "0,a,ok\n2,c,failed\n")
    with pytest.raises(ImageValidationError, match="shard\\(s\\) 1 of 2"):
        merge_summaries(tmp_path)
    (tmp_path / "summary.shard-1-of-2.csv").write_text(header + "1,b,suspect\n")
    target, rows = merge_summaries(tmp_path)
    assert target == tmp_path / "summary.csv"
    assert [(r["index"], r["id"], r["status"]) for r in rows] == [("0", "a", "ok"), ("1", "b", "suspect"),
                                                                     ("2", "c", "failed")]
    assert list(_summary(target)) == ["a", "b", "c"]
    assert main(["batch", "--merge-summaries", "--output-dir", str(tmp_path)]) == 1  # c failed


# --------------------------------------------------------------------------------------------------------------
# end to end: failures recorded, resume, incomplete folders redone
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from deepabdominalreg.synthetic.pairs import make_phantom_pair, write_pair

    folder = tmp_path_factory.mktemp("phantom")
    write_pair(make_phantom_pair(seed=3, spacing_mm=6.0), folder)
    return folder


def test_batch_records_a_failure_resumes_and_redoes_incomplete_folders(phantom, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    pairs = _csv(tmp_path / "pairs.csv",
                 "id,fixed,moving,fixed_seg,moving_seg\n"
                 "a,data/fixed.nii.gz,data/moving.nii.gz,data/fixed_seg.nii.gz,data/moving_seg.nii.gz\n"
                 "broken,data/fixed.nii.gz,data/missing.nii.gz,,\n"
                 "c,data/moving.nii.gz,data/fixed.nii.gz,,\n")
    out = tmp_path / "out"
    command = ["batch", "--pairs", str(pairs), "--output-dir", str(out), "--jobs", "2", "--threads", "2", *FAST]

    assert main(command) == 1  # one pair failed
    rows = _summary(out / "summary.csv")
    assert list(rows) == ["a", "broken", "c"]
    assert rows["a"]["status"] in ("ok", "suspect") and rows["c"]["status"] in ("ok", "suspect")
    assert float(rows["a"]["dice_mean_after"]) > 0 and rows["c"]["dice_mean_after"] == ""  # c has no labels
    assert rows["broken"]["status"] == "failed" and rows["broken"]["exit_code"] == "2"
    assert "missing.nii.gz" in rows["broken"]["error"] and "does not exist" in rows["broken"]["error"]
    assert "missing.nii.gz" in (out / "broken" / "error.txt").read_text()
    for pair_id in ("a", "c"):
        assert {"metrics.json", "transform.h5", "inverse_transform.h5", "warped.nii.gz"} <= {
            p.name for p in (out / pair_id).iterdir()}
        assert rows[pair_id]["output_dir"] == str((out / pair_id).resolve())
    assert (out / "a" / "warped_seg.nii.gz").exists()
    assert "broken: FAILED" in capsys.readouterr().err

    # the rerun: the failure fixed, pair a's transform truncated (an interrupted copy), pair c complete
    shutil.copy(data / "moving.nii.gz", data / "missing.nii.gz")
    transform = out / "a" / "transform.h5"
    transform.write_bytes(transform.read_bytes()[:200])
    assert main(command) == 0
    rows = _summary(out / "summary.csv")
    assert rows["c"]["status"] == "skipped" and rows["c"]["checks"] in ("ok", "suspect")
    assert rows["c"]["runtime_s"] != "" and rows["c"]["exit_code"] == ""
    assert rows["a"]["status"] in ("ok", "suspect") and rows["a"]["exit_code"] in ("0", "3")
    assert rows["broken"]["status"] in ("ok", "suspect")
    assert not (out / "broken" / "error.txt").exists()  # a stale error does not outlive the retry
    assert len(transform.read_bytes()) > 200
    err = capsys.readouterr().err
    assert "a: incomplete result" in err and "1 skipped" in err

    # every pair complete: the shards only skip, each into its own summary, merged back in pair order
    assert main([*command, "--shard", "1/2", "--quiet"]) == 0
    assert list(_summary(summary_path(out, (1, 2)))) == ["broken"]
    assert main([*command, "--shard", "0/2", "--quiet"]) == 0
    assert list(_summary(summary_path(out, (0, 2)))) == ["a", "c"]
    assert {r["status"] for r in _summary(summary_path(out, (0, 2))).values()} == {"skipped"}
    assert main(["batch", "--merge-summaries", "--output-dir", str(out)]) == 0
    assert list(_summary(out / "summary.csv")) == ["a", "broken", "c"]
