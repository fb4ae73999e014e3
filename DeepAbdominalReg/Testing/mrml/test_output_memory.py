"""A background run's outputs reach the scene one at a time, from the run's files, before its folder is removed.

The command is a stand-in interpreter that copies prepared output files (what ``deepabdominalreg register``
writes) into ``--output-dir``: the real :class:`task.RegistrationJob` and :class:`process.BackgroundRegistration`
run, only the registration is skipped.  Every image and transform read is recorded with a weak reference, so a
test sees which earlier outputs are still alive when the next one is read.
"""

import json
import os
import sys
import textwrap
import weakref

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from deepabdominalreg import transforms as core_transforms
from deepabdominalreg.config import RegistrationConfig
from DeepAbdominalRegLib import nodes, process, task
from DeepAbdominalRegLib.testing import addSegmentationNode, addVolumeNode

# a rotated LPS grid, so that a geometry slip (axis order, LPS/RAS sign, direction) shows
_DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
_SIZE, _SPACING, _ORIGIN = (14, 12, 9), (1.5, 2.0, 3.0), (-20.0, 11.0, 4.0)
_readReference = sitk.ReadImage
"""The tests' own reads of the files (taken before ``recordedReads`` wraps ``sitk.ReadImage``)."""


def _grid(array: np.ndarray, spacing=_SPACING, origin=_ORIGIN) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(_DIRECTION)
    return image


def _labels() -> sitk.Image:
    array = np.zeros(_SIZE[::-1], np.uint16)
    array[2:5, 3:8, 3:9] = 1
    array[5:8, 6:10, 8:12] = 2
    return _grid(array)


@pytest.fixture
def outputFiles(tmp_path):
    """What ``register --output-format nrrd`` writes: int16 warped CT, float64 maps (the reader makes them float32),
    labels, the composite transform (affine around a working-grid field) and its inverse, metrics.json."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "prepared"
    folder.mkdir()
    shape = _SIZE[::-1]
    images = {
        "warped.nrrd": _grid(rng.integers(-1000, 1500, shape).astype(np.int16)),
        "jacobian.nrrd": _grid(rng.uniform(0.5, 1.5, (5, 6, 7))),
        "displacement_magnitude.nrrd": _grid(rng.uniform(0.0, 9.0, (5, 6, 7))),
        "warped_seg.nrrd": _labels(),
    }
    for name in ("jacobian.nrrd", "displacement_magnitude.nrrd"):  # the working grid: coarser than the fixed one
        images[name].SetSpacing((4.0, 4.5, 6.0))
    for name, image in images.items():
        sitk.WriteImage(image, str(folder / name), False)
    working = sitk.Compose([_grid(rng.uniform(-2.0, 2.0, (5, 6, 7)), (4.0, 4.5, 6.0)) for _ in range(3)])
    affine = sitk.AffineTransform(3)
    affine.SetTranslation((1.5, -0.5, 2.0))
    composite = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(working)])
    core_transforms.write_transform(composite, folder / "transform.h5")
    core_transforms.write_transform(sitk.TranslationTransform(3, (-1.0, 2.0, -0.5)), folder / "inverse_transform.h5")
    (folder / "metrics.json").write_text(json.dumps({"status": "ok", "dice_mean_before": 0.5,
                                                     "dice_mean_after": 0.9}))
    return folder


@pytest.fixture
def copyingInterpreter(tmp_path, outputFiles):
    """A stand-in for PythonSlicer that copies ``outputFiles`` into the command's ``--output-dir``."""
    if os.name == "nt":
        pytest.skip("POSIX shebang script")
    script = tmp_path / "PythonSlicer"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import shutil, sys
        argv = sys.argv
        shutil.copytree({str(outputFiles)!r}, argv[argv.index("--output-dir") + 1])
    """))
    script.chmod(0o755)
    return script


@pytest.fixture
def recordedReads(monkeypatch):
    """Every image / transform read from a file: ``(file name, names of earlier reads still alive at this read)``."""
    reads = []
    alive: list[tuple[str, weakref.ref]] = []

    def record(name, obj):
        reads.append((name, [earlier for earlier, ref in alive if ref() is not None]))
        alive.append((name, weakref.ref(obj)))
        return obj

    class RecordingReader(sitk.ImageFileReader):
        def Execute(self):
            image = super().Execute()
            return record(os.path.basename(self.GetFileName()), image)

    realReadTransform = core_transforms.read_transform

    def readTransform(path, role="transform"):
        return record(os.path.basename(str(path)), realReadTransform(path, role))

    realReadImage = sitk.ReadImage

    def readImage(path, *args, **kwargs):  # not what process.py uses: a read through it would show here too
        return record(os.path.basename(str(path)), realReadImage(path, *args, **kwargs))

    monkeypatch.setattr(sitk, "ImageFileReader", RecordingReader)
    monkeypatch.setattr(sitk, "ReadImage", readImage)
    monkeypatch.setattr(core_transforms, "read_transform", readTransform)
    return reads


@pytest.fixture
def inputs(scene):
    fixed = addVolumeNode(scene, _grid(np.full(_SIZE[::-1], 40, np.int16)), "CT fixed")
    moving = addVolumeNode(scene, _grid(np.full(_SIZE[::-1], 30, np.int16)), "CT moving")
    segmentation = addSegmentationNode(scene, _labels(), {1: "liver", 2: "spleen"}, "moving organs", moving)
    return task.InputNodes(fixed, moving, movingSegmentation=segmentation)


def _volumeArray(node) -> np.ndarray:
    from vtk.util import numpy_support

    dims = node.GetImageData().GetDimensions()
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])


def _checkVolume(node, path, dtype):
    expected = _readReference(str(path))
    assert _volumeArray(node).dtype == dtype
    np.testing.assert_array_equal(_volumeArray(node), sitk.GetArrayViewFromImage(expected).astype(dtype))
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose(nodes.arrayFromVtkMatrix(matrix), nodes.ijkToRasFromImage(expected), atol=1e-12)


def test_a_background_run_reads_each_output_once_while_its_folder_exists(scene, inputs, outputFiles,
                                                                           copyingInterpreter, recordedReads):
    seen = {}

    def onFinished(outputs, error):
        seen.update(outputs=outputs, error=error, tempDirGone=not tempDir.exists(), reads=len(recordedReads))

    job = task.RegistrationJob(inputs, RegistrationConfig(), python=str(copyingInterpreter), show=False,
                               onFinished=onFinished)
    job.start()
    tempDir = job.tempDir
    assert job.core.fixed is None and job.core.moving is None  # written for the subprocess, then released
    assert [info.name for info in job.core.movingSegments] == ["liver", "spleen"]
    result = job.wait(timeoutSeconds=120)
    assert seen["error"] is None and seen["outputs"] is result and seen["tempDirGone"]

    names = [name for name, _ in recordedReads]
    assert sorted(names) == sorted(["warped.nrrd", "transform.h5", "inverse_transform.h5", "warped_seg.nrrd",
                                    "jacobian.nrrd", "displacement_magnitude.nrrd"])  # each once
    assert seen["reads"] == len(names)  # all of them before onFinished, i.e. before the folder went
    # one at a time: when an output is read, none read before it is still alive (each went into its node)
    assert [(name, stillAlive) for name, stillAlive in recordedReads if stillAlive] == []

    # what the nodes hold is what the files hold: values, pixel types (maps as float32), geometry
    _checkVolume(result.warpedVolume, outputFiles / "warped.nrrd", np.int16)
    _checkVolume(result.jacobianVolume, outputFiles / "jacobian.nrrd", np.float32)
    _checkVolume(result.displacementMagnitudeVolume, outputFiles / "displacement_magnitude.nrrd", np.float32)
    labels, _ = nodes.segmentationNodeToLabelImage(result.warpedSegmentation, result.warpedVolume)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels),
                                  sitk.GetArrayFromImage(_readReference(str(outputFiles / "warped_seg.nrrd"))))
    fileTransform = core_transforms.read_transform(outputFiles / "transform.h5")
    inverse = core_transforms.read_transform(outputFiles / "inverse_transform.h5")
    for point_lps in ([-22.0, 14.0, 12.0], [-25.0, 20.0, 20.0]):  # inside the working field's grid
        point_ras = nodes.LPS_TO_RAS @ np.asarray(point_lps)
        np.testing.assert_allclose(result.outputTransform.GetTransformFromParent().TransformPoint(point_ras),
                                   nodes.LPS_TO_RAS @ np.asarray(fileTransform.TransformPoint(point_lps)), atol=1e-4)
        np.testing.assert_allclose(result.inverseTransform.GetTransformFromParent().TransformPoint(point_ras),
                                   nodes.LPS_TO_RAS @ np.asarray(inverse.TransformPoint(point_lps)), atol=1e-6)
    assert result.metrics["dice_mean_after"] == 0.9


def test_outputs_from_a_folder_are_read_only_when_asked_and_not_kept(outputFiles, recordedReads):
    outputs = process.CoreOutputs.fromDirectory(outputFiles)
    assert recordedReads == [] and outputs.metrics["status"] == "ok"  # nothing read yet but the metrics
    jacobian = outputs.read("jacobian")
    assert jacobian.GetPixelID() == sitk.sitkFloat32  # the file is float64
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(jacobian),
                               sitk.GetArrayFromImage(_readReference(str(outputFiles / "jacobian.nrrd"))),
                               rtol=1e-7)
    assert outputs.read("warpedImage").GetPixelID() == sitk.sitkInt16  # the warped CT keeps its own type
    assert outputs.read("warpedLabels").GetPixelID() == sitk.sitkUInt16
    del jacobian
    outputs.read("jacobian")
    assert [name for name, _ in recordedReads] == ["jacobian.nrrd", "warped.nrrd", "warped_seg.nrrd", "jacobian.nrrd"]
    assert recordedReads[-1][1] == []  # CoreOutputs holds none of what it read
    with pytest.raises(ValueError, match="not an output"):
        outputs.read("metrics")


def test_outputs_whose_folder_is_gone_say_so(tmp_path, outputFiles):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(outputFiles, copy)
    outputs = process.CoreOutputs.fromDirectory(copy)
    loaded = outputs.load()
    shutil.rmtree(copy)
    with pytest.raises(process.RegistrationFailed, match="jacobian.nrrd is gone"):
        outputs.read("jacobian")
    assert loaded.read("jacobian").GetPixelID() == sitk.sitkFloat32  # load() read everything into memory
    assert isinstance(loaded.read("transform"), sitk.Transform)


def test_without_a_consumer_the_outputs_are_read_into_memory_before_the_folder_goes(copyingInterpreter):
    core = process.CoreInputs(fixed=_grid(np.full(_SIZE[::-1], 40, np.int16)),
                              moving=_grid(np.full(_SIZE[::-1], 30, np.int16)))
    run = process.BackgroundRegistration(core, RegistrationConfig(), python=str(copyingInterpreter))
    run.start()
    tempDir = run.tempDir
    outputs = run.wait(timeoutSeconds=120)
    assert not tempDir.exists() and core.fixed is None
    assert isinstance(outputs.warpedImage, sitk.Image) and outputs.jacobian.GetPixelID() == sitk.sitkFloat32
    assert isinstance(outputs.inverseTransform, sitk.Transform)
