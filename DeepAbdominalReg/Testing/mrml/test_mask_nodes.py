"""User masks from the panel: segmentation nodes -> binary images on their volume's grid -> the core, in-process
(``register_pair``) and in the background (``--exclude-mask``, ``--moving-exclude-mask``, ``--rigid-mask``)."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.cli import build_parser
from DeepAbdominalRegLib import display, nodes, process, task
from DeepAbdominalRegLib.testing import addSegmentationNode, addVolumeNode
from slicer_app_stubs import slicerApplicationStubs
from test_end_to_end import FAST, _blob
from test_nodes import _labelImage, _obliqueImage
from test_process import NON_CONFIG_OPTIONS

MASK_FLAGS = {"--exclude-mask": "exclude_mask.nrrd", "--moving-exclude-mask": "moving_exclude_mask.nrrd",
              "--rigid-mask": "rigid_mask.nrrd"}


def _axisAligned(size, spacing, origin, pixel=sitk.sitkInt16):
    image = sitk.Image(list(size), pixel)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _ballAround(centreLps, radiusMm, spacing=1.0, halfWidthMm=20.0):
    """A 0/1 ball on its own axis-aligned 1 mm grid (not the grid of any volume)."""
    origin = [c - halfWidthMm for c in centreLps]
    size = [int(2 * halfWidthMm / spacing) + 1] * 3
    image = _axisAligned(size, (spacing,) * 3, origin, sitk.sitkUInt16)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * spacing - halfWidthMm for n in size[::-1]], indexing="ij")
    array = (xx ** 2 + yy ** 2 + zz ** 2 <= radiusMm ** 2).astype(np.uint16)
    ball = sitk.GetImageFromArray(array)
    ball.CopyInformation(image)
    return ball


def _boxOn(reference, box, value=1, pixel=np.uint16):
    """A label image on ``reference``'s grid: ``value`` in ``box`` (numpy ``(k, j, i)`` slices), 0 elsewhere."""
    array = np.zeros(sitk.GetArrayViewFromImage(reference).shape, pixel)
    array[box] = value
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _centreLps(image):
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def _voxelCentresLps(image):
    """``(k, j, i, 3)`` LPS positions of the voxel centres."""
    size = image.GetSize()
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    ijk = np.stack([ii, jj, kk], axis=-1).astype(float)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (ijk * image.GetSpacing()) @ direction.T


def _assertSameGrid(image, reference):
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-12)


@pytest.fixture
def maskScene(scene):
    """An oblique, anisotropic fixed volume and an axis-aligned moving one of another size and spacing."""
    fixed = _obliqueImage(size=(20, 16, 12))
    moving = _axisAligned((15, 13, 11), (2.2, 2.1, 2.9), (-12.0, 4.0, 1.0)) + 30
    return addVolumeNode(scene, fixed, "CT fixed"), addVolumeNode(scene, moving, "CT moving"), fixed, moving


def test_each_mask_node_becomes_a_binary_image_on_its_volumes_grid(scene, maskScene):
    fixedNode, movingNode, fixed, moving = maskScene
    labels = _labelImage()  # three segments on the fixed grid
    exclude = addSegmentationNode(scene, labels, {1: "lesion", 2: "artefact", 3: "clip"}, "exclude", fixedNode)
    movingLabels = _boxOn(moving, np.s_[4:8, 2:7, 3:9], value=2)
    movingExclude = addSegmentationNode(scene, movingLabels, {2: "lesion"}, "moving exclude", movingNode)
    # a ball drawn on a grid of its own: rasterised onto the oblique fixed grid
    centre, radius = _centreLps(fixed), 5.0
    rigid = addSegmentationNode(scene, _ballAround(centre, radius), {1: "tumour"}, "rigid")

    core = task.prepareCoreInputs(task.InputNodes(fixedNode, movingNode, excludeSegmentation=exclude,
                                                  movingExcludeSegmentation=movingExclude, rigidSegmentation=rigid))
    for mask, reference in ((core.excludeMask, fixed), (core.movingExcludeMask, moving), (core.rigidMask, fixed)):
        assert mask.GetPixelID() == sitk.sitkUInt8
        _assertSameGrid(mask, reference)
        assert set(np.unique(sitk.GetArrayViewFromImage(mask))) == {0, 1}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(core.excludeMask), sitk.GetArrayFromImage(labels) > 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(core.movingExcludeMask),
                                  sitk.GetArrayFromImage(movingLabels) > 0)
    distance = np.linalg.norm(_voxelCentresLps(fixed) - centre, axis=-1)
    rigidArray = sitk.GetArrayFromImage(core.rigidMask)
    assert rigidArray[distance < radius - 1.0].all() and not rigidArray[distance > radius + 1.0].any()
    assert core.labelNames == {}  # mask segments are no labels for Dice
    arguments = core.registerPairArguments()
    assert arguments["exclude_mask"] is core.excludeMask and arguments["rigid_mask"] is core.rigidMask
    assert arguments["moving_exclude_mask"] is core.movingExcludeMask
    core.releaseImages()
    assert core.excludeMask is core.movingExcludeMask is core.rigidMask is None


@pytest.mark.parametrize("where", ["no voxel", "outside the volume"])
def test_an_empty_mask_is_refused_with_what_to_do(scene, maskScene, where):
    fixedNode, movingNode, fixed, _ = maskScene
    if where == "no voxel":
        labels = _boxOn(fixed, np.s_[0:0])
    else:
        labels = _ballAround(_centreLps(fixed) + [0.0, 0.0, 200.0], 5.0)
    mask = addSegmentationNode(scene, labels, {1: "lesion"}, "lesion mask")
    with pytest.raises(nodes.InputNodeError, match=r"rigid mask 'lesion mask' is empty on 'CT fixed'.*select None"):
        task.prepareCoreInputs(task.InputNodes(fixedNode, movingNode, rigidSegmentation=mask))


def test_a_mask_that_is_not_a_usable_segmentation_is_refused(scene, maskScene):
    fixedNode, movingNode, _, _ = maskScene
    noSegments = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(nodes.InputNodeError, match="moving exclusion mask 'nothing' has no segments"):
        task.prepareCoreInputs(task.InputNodes(fixedNode, movingNode, movingExcludeSegmentation=noSegments))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lesion label")
    with pytest.raises(nodes.InputNodeError, match="not a segmentation.*Convert labelmap to segmentation node"):
        task.prepareCoreInputs(task.InputNodes(fixedNode, movingNode, excludeSegmentation=labelmap))


def test_mask_files_are_written_for_the_command_line(tmp_path):
    from deepabdominalreg.io import read_labels

    fixed = _axisAligned((12, 10, 8), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), sitk.sitkFloat32) + 40.0
    mask = _boxOn(fixed, np.s_[1:4, 3:7, 2:6], pixel=np.uint8)
    core = process.CoreInputs(fixed=fixed, moving=fixed + 1.0, excludeMask=mask, movingExcludeMask=mask,
                              rigidMask=mask)
    paths = process.writeCoreInputs(core, tmp_path)
    command = process.registerCommand(paths, tmp_path / "out", tmp_path / "config.json", python="python")
    args = build_parser().parse_args(command[3:])
    for flag, name in MASK_FLAGS.items():
        path = Path(command[command.index(flag) + 1])
        assert path == tmp_path / name
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_labels(path)), sitk.GetArrayFromImage(mask))
        assert b"encoding: raw" in path.read_bytes()[:1000]  # uncompressed, like the other inputs
    assert (args.exclude_mask, args.moving_exclude_mask, args.rigid_mask) == tuple(
        str(tmp_path / name) for name in MASK_FLAGS.values())


def _blobMask(reference, name, scene, volumeNode):
    return addSegmentationNode(scene, _boxOn(reference, np.s_[5:11, 9:15, 9:15]), {1: name}, name, volumeNode)


def test_the_panels_masks_reach_the_background_command_line(scene, fakeInterpreter, monkeypatch):
    """Parameter node -> logic -> InputNodes -> files -> the subprocess's own CLI parser."""
    script, capture = fakeInterpreter
    monkeypatch.setattr(process, "pythonExecutable", lambda: str(script))
    with slicerApplicationStubs():
        module = importlib.import_module("DeepAbdominalReg")
        logic = module.DeepAbdominalRegLogic()
        p = logic.getParameterNode()
        fixed, moving = _blob(), _blob((5.0, 5.0, 0.0))
        p.fixedVolume = addVolumeNode(scene, fixed, "fixed")
        p.movingVolume = addVolumeNode(scene, moving, "moving")
        p.excludeSegmentation = _blobMask(fixed, "lesion", scene, p.fixedVolume)
        p.movingExcludeSegmentation = _blobMask(moving, "moving lesion", scene, p.movingVolume)
        p.rigidSegmentation = _blobMask(fixed, "tumour", scene, p.fixedVolume)
        p.ioRigidityWeight = 250.0
        count = scene.GetNumberOfNodes()
        with pytest.raises(process.RegistrationFailed, match="recorded the command line"):
            logic.registerUsingParameterNode(p, waitForCompletion=True, show=False)
    assert scene.GetNumberOfNodes() == count
    record = json.loads(capture.read_text(encoding="utf-8"))
    argv = record["argv"]
    inputDir = Path(argv[argv.index("--fixed") + 1]).parent
    for flag, name in MASK_FLAGS.items():
        assert Path(argv[argv.index(flag) + 1]) == inputDir / name
        assert name in record["inputs"]  # the file existed when the command ran
    assert record["parsed"]["io_rigidity_weight"] == 250.0
    assert {a for a in argv if a.startswith("--")} <= NON_CONFIG_OPTIONS


@pytest.fixture
def phantom(scene):
    pytest.importorskip("deepabdominalreg.synthetic")
    from DeepAbdominalRegLib.testing import phantomNodes

    return phantomNodes(scene, seed=0, spacingMm=5.0)


@pytest.mark.slow
def test_phantom_in_process_with_a_rigid_and_an_excluded_region(scene, phantom):
    pair = phantom.pair
    labels = sitk.GetArrayFromImage(pair.fixed_labels)
    name = {v: k for k, v in pair.label_names.items()}

    def region(labelName):
        mask = sitk.GetImageFromArray((labels == name[labelName]).astype(np.uint16))
        mask.CopyInformation(pair.fixed_labels)
        return addSegmentationNode(scene, mask, {1: labelName}, labelName, phantom.fixedVolume)

    inputs = task.InputNodes(phantom.fixedVolume, phantom.movingVolume, rigidSegmentation=region("liver"),
                             excludeSegmentation=region("gallbladder"))
    # the masks act in the instance optimisation: its coarse level alone, without affine, takes a few seconds
    config = FAST.replace(affine=False, compute_inverse=False, io_iterations=5, io_levels=(4,))
    outputs = task.registerBlocking(inputs, config, show=False)
    report = outputs.metrics["user_masks"]
    assert report["rigid_voxels"] > 0 and report["rigid_rms_strain"] is not None
    assert 0.0 < report["excluded_percent_of_body"] < 100.0
    assert outputs.warpedVolume is not None and outputs.outputTransform is not None
    rows = {(measure, structure): after for measure, structure, _, after, _ in display.metricsRows(outputs.metrics)}
    assert rows[("RMS strain (0: rigid)", "rigid mask")] == report["rigid_rms_strain"]
    assert rows[("Left out of the similarity", "exclusion masks")] == report["excluded_percent_of_body"]
    # the same run without the strain term: the liver deforms (about 0.15 RMS strain against 0.004)
    free = task.registerBlocking(inputs, config.replace(io_rigidity_weight=0.0), show=False)
    assert free.metrics["user_masks"]["rigid_rms_strain"] > 5 * report["rigid_rms_strain"]
