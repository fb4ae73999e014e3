"""The background run: the config goes to the subprocess as a JSON file; progress, errors, cancel, files."""

import dataclasses
import json
import os
import sys
import textwrap
import time

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.cli import _build_config, build_parser
from deepabdominalreg.config import PRESETS, RegistrationConfig, config_from_preset
from DeepAbdominalRegLib import process

# options of 'deepabdominalreg register' that are not registration settings: the only flags the module passes
NON_CONFIG_OPTIONS = {"--fixed", "--moving", "--moving-seg", "--fixed-seg", "--label-names", "--fixed-landmarks",
                      "--moving-landmarks", "--output-dir", "--config", "--no-report", "--progress-json",
                      "--output-format", "--accept-suspect", "--outputs", "--exclude-mask", "--moving-exclude-mask",
                      "--rigid-mask"}


def unusualConfig() -> RegistrationConfig:
    """Every number and switch of the default config changed (strings and ``None`` kept, but ``io_transform``
    becomes ``svf``, which the switched-on ``io_symmetric`` needs): no preset matches it."""

    def changed(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, int):
            return value + 1
        if isinstance(value, float):
            return value * 1.5 + 0.25
        if isinstance(value, tuple):
            return tuple(changed(v) for v in value)
        return value

    defaults = RegistrationConfig()
    changes = {f.name: changed(getattr(defaults, f.name)) for f in dataclasses.fields(defaults)}
    changes["io_transform"] = "svf"
    config = defaults.replace(**changes)
    assert all(config != config_from_preset(p) for p in PRESETS)
    return config


def _parseRegisterCommand(command):
    assert command[1:4] == ["-m", "deepabdominalreg", "register"]
    args = build_parser().parse_args(command[3:])
    return args, _build_config(args)


@pytest.mark.parametrize("config", [
    RegistrationConfig(),
    *[config_from_preset(p) for p in PRESETS],
    config_from_preset("fast", working_spacing_mm=5.0, device="cpu", seed=7, threads=2),
    config_from_preset("accurate", affine=False, body_mask=False, compute_inverse=False, model="/m/x.pt"),
    config_from_preset("network", device="cuda", network_precision="bf16"),
    unusualConfig(),
], ids=["default", *PRESETS, "fast-cpu", "accurate-switches", "network-bf16", "unusual"])
def test_the_command_line_carries_the_config_as_a_file(config, tmp_path):
    paths = {"fixed": tmp_path / "fixed.nrrd", "moving": tmp_path / "moving.nrrd"}
    configPath = process.writeConfig(config, tmp_path / "config.json")
    command = process.registerCommand(paths, tmp_path / "out", configPath, python="python")
    assert {a for a in command if a.startswith("--")} <= NON_CONFIG_OPTIONS
    assert json.loads(configPath.read_text(encoding="utf-8")) == config.to_dict()
    args, parsed = _parseRegisterCommand(command)
    assert args.config == str(configPath)
    assert parsed == config


# ----------------------------------------------------------------------------------------------------------------
# the process: progress events, errors, cancel kills the tree
# ----------------------------------------------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _wait(runningProcess, timeout=30.0):
    deadline = time.monotonic() + timeout
    events = []
    while not runningProcess.finished():
        events += runningProcess.poll()
        assert time.monotonic() < deadline, "process did not finish"
        time.sleep(0.05)
    return events + runningProcess.poll()


def test_process_forwards_json_progress_and_ignores_other_output():
    runningProcess = process.RegistrationProcess(_python("""
        import json, sys
        print("loading torch...")
        for i in range(3):
            print(json.dumps({"stage": "affine", "fraction": i / 4, "message": f"step {i}"}), flush=True)
        print("a warning", file=sys.stderr)
    """))
    runningProcess.start()
    events = _wait(runningProcess)
    assert [e["message"] for e in events] == ["step 0", "step 1", "step 2"]
    assert runningProcess.returncode == 0 and not runningProcess.cancelled
    # the other lines are queued for the polling thread (the panel's log box), not logged from the reader threads
    assert sorted(runningProcess.pollLines()) == ["a warning", "loading torch..."]
    assert runningProcess.pollLines() == []


def test_background_registration_streams_the_run_lines_to_on_log_and_the_log(tmp_path, fakeInterpreter, caplog):
    script, _ = fakeInterpreter
    lines = []
    run = process.BackgroundRegistration(_core(), unusualConfig(), python=str(script), onLog=lines.append)
    run.start()
    with caplog.at_level("INFO", logger=process.logger.name), pytest.raises(process.RegistrationFailed):
        run.wait(timeoutSeconds=120)
    assert lines == ["error: recorded the command line"]
    assert "[deepabdominalreg] error: recorded the command line" in caplog.text


def test_the_child_writes_utf8_to_the_pipes_it_is_read_from():
    env = process.subprocessEnvironment()
    assert env["PYTHONIOENCODING"] == "utf-8" and env["PYTHONUNBUFFERED"] == "1"
    runningProcess = process.RegistrationProcess(_python("""
        import sys
        print("Jacobian ≤ 0 in 0.1 % — Dice 0.91 µm", file=sys.stderr)
    """), env=env)
    runningProcess.start()
    _wait(runningProcess)
    assert runningProcess.pollLines() == ["Jacobian ≤ 0 in 0.1 % — Dice 0.91 µm"]


def test_process_error_message_is_the_cli_error_line():
    runningProcess = process.RegistrationProcess(_python("""
        import sys
        print("Traceback noise", file=sys.stderr)
        print("error: fixed image is constant (every voxel = 0); it holds no image to register", file=sys.stderr)
        sys.exit(2)
    """))
    runningProcess.start()
    _wait(runningProcess)
    assert runningProcess.returncode == 2
    assert runningProcess.errorMessage().startswith("fixed image is constant")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    pidFile = tmp_path / "child.pid"
    runningProcess = process.RegistrationProcess(_python(f"""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidFile)!r}, "w").write(str(child.pid))
        print(json.dumps({{"stage": "started", "fraction": 0.0, "message": ""}}), flush=True)
        time.sleep(120)
    """))
    runningProcess.start()
    deadline = time.monotonic() + 30
    while not (pidFile.exists() and pidFile.read_text(encoding="utf-8")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidFile.read_text(encoding="utf-8"))
    assert _alive(child)
    runningProcess.cancel()
    assert not runningProcess.isRunning() and runningProcess.cancelled
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the grandchild survived the cancel"


# ----------------------------------------------------------------------------------------------------------------
# files in and out; the temporary folder goes whatever happens
# ----------------------------------------------------------------------------------------------------------------


def _core() -> process.CoreInputs:
    fixed = sitk.Image([12, 10, 8], sitk.sitkFloat32) + 40.0
    fixed.SetSpacing((2.0, 2.0, 3.0))
    array = np.zeros((8, 10, 12), np.uint16)
    array[2:5, 3:8, 3:9] = 1
    array[5:7, 6:9, 8:11] = 2
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(fixed)
    points = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    return process.CoreInputs(fixed=fixed, moving=fixed + 1.0, movingLabels=labels, fixedLandmarksLps=points,
                              movingLandmarksLps=points + 1.0, labelNames={1: "liver", 2: "spleen"})


def test_core_inputs_are_written_for_the_command_line(tmp_path):
    from deepabdominalreg.io import read_labels, read_landmarks

    core = _core()
    paths = process.writeCoreInputs(core, tmp_path)
    assert json.loads(paths["label_names"].read_text(encoding="utf-8")) == {"1": "liver", "2": "spleen"}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_labels(paths["moving_seg"])),
                                  sitk.GetArrayFromImage(core.movingLabels))
    np.testing.assert_allclose(read_landmarks(paths["moving_landmarks"]), core.movingLandmarksLps)
    command = process.registerCommand(paths, tmp_path / "out", tmp_path / "config.json", python="python")
    assert command[:4] == ["python", "-m", "deepabdominalreg", "register"]
    assert command[-5:] == ["--no-report", "--progress-json", "--output-format", "nrrd", "--accept-suspect"]
    for flag, key in (("--moving-seg", "moving_seg"), ("--label-names", "label_names"),
                      ("--fixed-landmarks", "fixed_landmarks"), ("--moving-landmarks", "moving_landmarks")):
        assert command[command.index(flag) + 1] == str(paths[key])
    assert "--fixed-seg" not in command


def test_background_registration_runs_the_command_and_cleans_up(tmp_path, fakeInterpreter):
    script, capture = fakeInterpreter
    config = unusualConfig()
    finished = []
    run = process.BackgroundRegistration(_core(), config, python=str(script),
                                         onFinished=lambda outputs, error: finished.append((outputs, error)))
    run.start()
    tempDir = run.tempDir
    assert (tempDir / "input" / "config.json").exists()
    with pytest.raises(process.RegistrationFailed, match="recorded the command line"):
        run.wait(timeoutSeconds=120)
    assert not tempDir.exists() and run.done
    assert len(finished) == 1 and finished[0][0] is None and finished[0][1] is run.error
    record = json.loads(capture.read_text(encoding="utf-8"))
    assert record["configFile"] == config.to_dict()
    assert RegistrationConfig.from_dict(record["parsed"]) == config
    assert {a for a in record["argv"] if a.startswith("--")} <= NON_CONFIG_OPTIONS
    assert record["inputs"] == ["config.json", "fixed.nrrd", "fixed_landmarks.csv", "labels.json", "moving.nrrd",
                                "moving_landmarks.csv", "moving_seg.nrrd"]


def test_missing_outputs_are_a_clear_failure(tmp_path):
    (tmp_path / "warped.nrrd").write_text("")
    with pytest.raises(process.RegistrationFailed, match="displacement"):
        process.CoreOutputs.fromDirectory(tmp_path)
