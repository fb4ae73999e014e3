"""The real core on real MRML: failures leave the scene unchanged; the phantom registers in both run modes."""

import importlib

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from deepabdominalreg.config import config_from_preset
from DeepAbdominalRegLib import process, task
from DeepAbdominalRegLib.testing import addVolumeNode
from slicer_app_stubs import slicerApplicationStubs

FAST = config_from_preset("fast", working_spacing_mm=5.0, device="cpu", seed=0)


def _blob(offset_mm=(0.0, 0.0, 0.0), constant=False):
    size, spacing = (24, 24, 16), 5.0
    image = sitk.Image(list(size), sitk.sitkInt16) - 1000
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin((-60.0, -60.0, -40.0))
    if constant:
        return image
    array = sitk.GetArrayFromImage(image)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij")
    centre = (np.array([12.0, 12.0, 8.0]) + np.asarray(offset_mm) / spacing)
    inside = ((xx - centre[0]) / 7) ** 2 + ((yy - centre[1]) / 6) ** 2 + ((zz - centre[2]) / 4) ** 2 < 1
    array[inside] = 50
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def test_invalid_input_raises_and_adds_no_node(scene):
    from deepabdominalreg.io import ImageValidationError

    fixed = addVolumeNode(scene, _blob(constant=True), "constant")
    moving = addVolumeNode(scene, _blob(), "moving")
    count = scene.GetNumberOfNodes()
    with pytest.raises(ImageValidationError, match="constant"):
        task.registerBlocking(task.InputNodes(fixed, moving), FAST)
    assert scene.GetNumberOfNodes() == count


def test_cancel_raises_and_adds_no_node(scene):
    fixed, moving = addVolumeNode(scene, _blob(), "fixed"), addVolumeNode(scene, _blob((5.0, 0.0, 0.0)), "moving")
    count = scene.GetNumberOfNodes()
    calls = []

    def shouldStop():
        calls.append(1)
        return len(calls) > 3  # stop a little way in

    with pytest.raises(process.RegistrationCancelledByUser):
        task.registerBlocking(task.InputNodes(fixed, moving), FAST, shouldStop=shouldStop)
    assert scene.GetNumberOfNodes() == count


def test_background_failure_reports_the_core_message_and_cleans_up(scene):
    fixed = addVolumeNode(scene, _blob(constant=True), "constant")
    moving = addVolumeNode(scene, _blob(), "moving")
    count = scene.GetNumberOfNodes()
    job = task.RegistrationJob(task.InputNodes(fixed, moving), FAST, show=False)
    job.start()
    tempDir = job.tempDir
    assert tempDir.exists()
    with pytest.raises(process.RegistrationFailed, match="constant"):
        job.wait(timeoutSeconds=300)
    assert not tempDir.exists()
    assert scene.GetNumberOfNodes() == count


def test_background_cancel_kills_the_run_and_cleans_up(scene):
    fixed, moving = addVolumeNode(scene, _blob(), "fixed"), addVolumeNode(scene, _blob((5.0, 0.0, 0.0)), "moving")
    count = scene.GetNumberOfNodes()
    finished = []
    job = task.RegistrationJob(task.InputNodes(fixed, moving), FAST, show=False,
                               onFinished=lambda outputs, error: finished.append((outputs, error)))
    job.start()
    tempDir = job.tempDir
    job.cancel()
    assert job.done and not tempDir.exists()
    assert finished and finished[0][0] is None and isinstance(finished[0][1], process.RegistrationCancelledByUser)
    assert scene.GetNumberOfNodes() == count


# ----------------------------------------------------------------------------------------------------------------
# the phantom (deepabdominalreg.synthetic)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def phantom(scene):
    pytest.importorskip("deepabdominalreg.synthetic")
    from DeepAbdominalRegLib.testing import phantomNodes

    return phantomNodes(scene, seed=0, spacingMm=5.0)


def _checkOutputs(scene, outputs, phantom):
    metrics = outputs.metrics
    assert metrics["dice_mean_after"] > metrics["dice_mean_before"]
    for name in ("warpedVolume", "outputTransform", "inverseTransform", "warpedSegmentation", "jacobianVolume",
                 "displacementMagnitudeVolume", "metricsTable"):
        node = getattr(outputs, name)
        assert node is not None and scene.GetNodeByID(node.GetID()) is node, name
    assert outputs.outputTransform.GetNodeReferenceID("fixedVolume") == phantom.fixedVolume.GetID()
    source = phantom.movingSegmentation.GetSegmentation()
    warped = outputs.warpedSegmentation.GetSegmentation()
    assert list(warped.GetSegmentIDs()) == list(source.GetSegmentIDs())
    for segmentId in source.GetSegmentIDs():
        assert warped.GetSegment(segmentId).GetName() == source.GetSegment(segmentId).GetName()
        assert warped.GetSegment(segmentId).GetColor() == source.GetSegment(segmentId).GetColor()
    assert outputs.metricsTable.GetNumberOfRows() > 0
    assert slicer.util.arrayFromVolume(outputs.warpedVolume).shape == \
        slicer.util.arrayFromVolume(phantom.fixedVolume).shape


@pytest.mark.slow
def test_phantom_in_process(scene, phantom):
    events = []
    inputs = task.InputNodes(phantom.fixedVolume, phantom.movingVolume, phantom.movingSegmentation,
                             phantom.fixedSegmentation, phantom.fixedLandmarks, phantom.movingLandmarks)
    outputs = task.registerBlocking(inputs, FAST, progress=events.append)
    _checkOutputs(scene, outputs, phantom)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] >= 0.9
    landmarks = outputs.metrics["landmarks"]
    assert landmarks["after"]["mean"] < landmarks["before"]["mean"]


@pytest.mark.slow
def test_phantom_in_background_subprocess(scene, phantom):
    events = []
    inputs = task.InputNodes(phantom.fixedVolume, phantom.movingVolume, phantom.movingSegmentation,
                             phantom.fixedSegmentation)
    job = task.RegistrationJob(inputs, FAST, onProgress=events.append)
    job.start()
    tempDir = job.tempDir
    outputs = job.wait(timeoutSeconds=600)
    _checkOutputs(scene, outputs, phantom)
    assert events and {"stage", "fraction", "message"} <= set(events[0])
    assert not tempDir.exists()


@pytest.mark.slow
def test_module_self_test_runs_headless(scene):
    """DeepAbdominalReg.py's own Logic and Test classes, with only the Slicer application classes stubbed."""
    pytest.importorskip("deepabdominalreg.synthetic")
    with slicerApplicationStubs():
        module = importlib.import_module("DeepAbdominalReg")
        parent = type("Parent", (), {})()
        module.DeepAbdominalReg(parent)
        assert parent.categories == ["Registration"] and "VoxelMorph" in parent.acknowledgementText
        result = module.DeepAbdominalRegTest("runTest").run()
        assert result.wasSuccessful(), result.errors + result.failures
