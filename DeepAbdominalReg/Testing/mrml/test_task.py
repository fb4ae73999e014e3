"""Running registrations: command line built from the config, background process, all-or-nothing outputs."""

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
from DeepAbdominalRegLib import display, nodes, task
from DeepAbdominalRegLib.testing import addSegmentationNode, addVolumeNode
from test_display import METRICS

# ----------------------------------------------------------------------------------------------------------------
# the command line reproduces the config exactly (checked with the CLI's own parser)
# ----------------------------------------------------------------------------------------------------------------


def _cliConfig(arguments):
    args = build_parser().parse_args(["register", "--fixed", "f", "--moving", "m", "--output-dir", "o", *arguments])
    return _build_config(args)


@pytest.mark.parametrize("config", [
    RegistrationConfig(),
    *[config_from_preset(p) for p in PRESETS],
    config_from_preset("fast", working_spacing_mm=5.0, device="cpu", seed=7, threads=2),
    config_from_preset("accurate", affine=False, body_mask=False, compute_inverse=False, model="/m/x.pt",
                       io_iterations=0),
    config_from_preset("network", device="cuda", network_precision="bf16"),
    config_from_preset("network", network_precision="fp32"),
])
def test_cli_arguments_reproduce_the_config(config):
    arguments = task.cliArguments(config)
    assert "--config" not in arguments
    assert _cliConfig(arguments) == config


def test_settings_no_flag_can_express_need_a_config_file():
    config = RegistrationConfig(io_smoothness_weight=2.0, hu_window=(-100.0, 200.0))
    with pytest.raises(ValueError, match="--config"):
        task.cliArguments(config)
    arguments = task.cliArguments(config, "/tmp/config.json")
    assert arguments[-2:] == ["--config", "/tmp/config.json"]
    assert json.loads(json.dumps(task.configToJson(config)))["hu_window"] == [-100.0, 200.0]


def test_cli_accepts_a_config_file(tmp_path):
    """Needs the core CLI's --config option (requested from the core); skipped until it exists."""
    parser = build_parser()
    register = parser._subparsers._group_actions[0].choices["register"]
    if "--config" not in register._option_string_actions:
        pytest.skip("deepabdominalreg register has no --config option yet")
    config = RegistrationConfig(io_smoothness_weight=2.0, hu_window=(-100.0, 200.0), io_levels=(8, 4, 2))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(task.configToJson(config)))
    assert _cliConfig(task.cliArguments(config, path)) == config


# ----------------------------------------------------------------------------------------------------------------
# background process: progress events, errors, cancel kills the tree
# ----------------------------------------------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _wait(process, timeout=30.0):
    deadline = time.monotonic() + timeout
    events = []
    while not process.finished():
        events += process.poll()
        assert time.monotonic() < deadline, "process did not finish"
        time.sleep(0.05)
    return events + process.poll()


def test_process_forwards_json_progress_and_ignores_other_output():
    process = task.RegistrationProcess(_python("""
        import json, sys
        print("loading torch...")
        for i in range(3):
            print(json.dumps({"stage": "affine", "fraction": i / 4, "message": f"step {i}"}), flush=True)
        print("a warning", file=sys.stderr)
    """))
    process.start()
    events = _wait(process)
    assert [e["message"] for e in events] == ["step 0", "step 1", "step 2"]
    assert process.returncode == 0 and not process.cancelled


def test_process_error_message_is_the_cli_error_line():
    process = task.RegistrationProcess(_python("""
        import sys
        print("Traceback noise", file=sys.stderr)
        print("error: fixed image is constant (every voxel = 0); it holds no image to register", file=sys.stderr)
        sys.exit(2)
    """))
    process.start()
    _wait(process)
    assert process.returncode == 2
    assert process.errorMessage().startswith("fixed image is constant")


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
    process = task.RegistrationProcess(_python(f"""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidFile)!r}, "w").write(str(child.pid))
        print(json.dumps({{"stage": "started", "fraction": 0.0, "message": ""}}), flush=True)
        time.sleep(120)
    """))
    process.start()
    deadline = time.monotonic() + 30
    while not (pidFile.exists() and pidFile.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidFile.read_text())
    assert _alive(child)
    started = time.monotonic()
    process.cancel()
    assert time.monotonic() - started < 10
    assert not process.isRunning() and process.cancelled
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the grandchild survived the cancel"


# ----------------------------------------------------------------------------------------------------------------
# core results -> MRML nodes, all or nothing (no registration run needed)
# ----------------------------------------------------------------------------------------------------------------


def _image(size, spacing, origin, pixel=sitk.sitkFloat32, value=0.0):
    image = sitk.Image(list(size), pixel)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image + value if value else image


def _labels(reference):
    array = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint16)
    array[2:5, 3:8, 3:9] = 1
    array[5:8, 6:10, 8:12] = 2
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(reference)
    return labels


@pytest.fixture
def synthetic(scene):
    fixed = _image((16, 14, 10), (2.0, 2.0, 3.0), (-10.0, 5.0, 0.0), value=40.0)
    moving = _image((15, 13, 11), (2.2, 2.1, 2.9), (-12.0, 4.0, 1.0), value=30.0)
    fixedNode, movingNode = addVolumeNode(scene, fixed, "CT fixed"), addVolumeNode(scene, moving, "CT moving")
    names = {1: "liver", 2: "spleen"}
    movingSeg = addSegmentationNode(scene, _labels(moving), names, "moving organs", movingNode)
    movingSeg.GetSegmentation().GetSegment("segment_2").SetColor(0.1, 0.2, 0.9)
    inputs = task.InputNodes(fixedNode, movingNode, movingSegmentation=movingSeg)
    core = task.prepareCoreInputs(inputs)
    displacement = sitk.Compose([_image(fixed.GetSize(), fixed.GetSpacing(), fixed.GetOrigin(), value=v)
                                 for v in (1.0, -2.0, 0.5)])
    inverse = sitk.Compose([_image(moving.GetSize(), moving.GetSpacing(), moving.GetOrigin(), value=v)
                            for v in (-1.0, 2.0, -0.5)])
    outputs = task.CoreOutputs(
        warpedImage=_image(fixed.GetSize(), fixed.GetSpacing(), fixed.GetOrigin(), value=30.0),
        displacementLps=displacement, inverseDisplacementLps=inverse,
        jacobian=_image(fixed.GetSize(), fixed.GetSpacing(), fixed.GetOrigin(), value=1.0),
        displacementMagnitude=_image(fixed.GetSize(), fixed.GetSpacing(), fixed.GetOrigin(), value=2.29),
        warpedLabels=_labels(fixed), metrics=METRICS,
    )
    return inputs, core, outputs


def test_core_outputs_become_nodes(scene, synthetic):
    inputs, core, outputs = synthetic
    assert core.labelNames == {1: "liver", 2: "spleen"}
    result = task.applyCoreOutputs(outputs, core, inputs)
    assert result.warpedVolume.GetName() == "CT moving warped"
    np.testing.assert_allclose(nodes.volumeNodeToImage(result.warpedVolume).GetOrigin(), (-10.0, 5.0, 0.0))
    transform = result.outputTransform
    assert transform.IsA("vtkMRMLGridTransformNode")
    assert transform.GetNodeReferenceID("fixedVolume") == inputs.fixedVolume.GetID()
    assert transform.GetNodeReferenceID("movingVolume") == inputs.movingVolume.GetID()
    x_ras = np.array([10.0, -20.0, 12.0])  # RAS point inside the fixed grid
    np.testing.assert_allclose(transform.GetTransformFromParent().TransformPoint(x_ras), x_ras + [-1.0, 2.0, 0.5],
                               atol=1e-4)
    assert "fixed volume" in result.inverseTransform.GetAttribute("DeepAbdominalReg.Usage")
    segmentation = result.warpedSegmentation.GetSegmentation()
    assert list(segmentation.GetSegmentIDs()) == ["segment_1", "segment_2"]
    assert segmentation.GetSegment("segment_2").GetName() == "spleen"
    np.testing.assert_allclose(segmentation.GetSegment("segment_2").GetColor(), (0.1, 0.2, 0.9))
    assert result.jacobianVolume.GetDisplayNode().GetColorNode().GetName() == display.JACOBIAN_COLOR_NODE_NAME
    assert result.metricsTable.GetNumberOfRows() == len(display.metricsRows(METRICS))
    assert result.metrics is METRICS


def test_requested_output_nodes_are_filled_not_duplicated(scene, synthetic):
    inputs, core, outputs = synthetic
    first = task.applyCoreOutputs(outputs, core, inputs)
    count = scene.GetNumberOfNodes()
    requested = task.OutputNodes(first.warpedVolume, first.outputTransform, first.inverseTransform,
                                 first.warpedSegmentation, first.jacobianVolume, first.displacementMagnitudeVolume,
                                 first.metricsTable)
    second = task.applyCoreOutputs(outputs, core, inputs, requested)
    assert second.warpedVolume is first.warpedVolume and second.metricsTable is first.metricsTable
    assert scene.GetNumberOfNodes() == count


def test_a_failure_while_creating_outputs_leaves_the_scene_as_it_was(scene, synthetic):
    inputs, core, outputs = synthetic
    count = scene.GetNumberOfNodes()
    ids = {scene.GetNthNode(i).GetID() for i in range(count)}
    outputs.warpedLabels = "not an image"  # fails after volumes and transforms were created
    with pytest.raises((TypeError, AttributeError, RuntimeError)):
        task.applyCoreOutputs(outputs, core, inputs)
    assert scene.GetNumberOfNodes() == count
    assert {scene.GetNthNode(i).GetID() for i in range(count)} == ids


def test_prepare_inputs_rejects_bad_selections(scene, synthetic):
    inputs, _, _ = synthetic
    with pytest.raises(nodes.InputNodeError, match="same node"):
        task.prepareCoreInputs(task.InputNodes(inputs.fixedVolume, inputs.fixedVolume))
    with pytest.raises(nodes.InputNodeError, match="never overwritten"):
        task.checkOutputsAreNotInputs(inputs, task.OutputNodes(warpedVolume=inputs.movingVolume))
    task.checkOutputsAreNotInputs(inputs, task.OutputNodes())
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    with pytest.raises(nodes.InputNodeError, match="both a fixed and a moving"):
        task.prepareCoreInputs(task.InputNodes(inputs.fixedVolume, inputs.movingVolume, fixedLandmarks=markups))


def test_core_inputs_are_written_for_the_command_line(scene, synthetic, tmp_path):
    from deepabdominalreg.io import read_labels

    _, core, _ = synthetic
    paths = task.writeCoreInputs(core, tmp_path)
    assert json.loads(paths["label_names"].read_text()) == {"1": "liver", "2": "spleen"}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_labels(paths["moving_seg"])),
                                  sitk.GetArrayFromImage(core.movingLabels))
    command = task.registerCommand(paths, tmp_path / "out", RegistrationConfig(), python="python")
    assert command[:4] == ["python", "-m", "deepabdominalreg", "register"]
    assert command[-4:] == ["--no-report", "--progress-json", "--output-format", "nrrd"]
    assert "--moving-seg" in command and "--label-names" in command
