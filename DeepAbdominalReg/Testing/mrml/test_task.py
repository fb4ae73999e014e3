"""The MRML side of a run: input nodes -> core inputs, core outputs -> nodes, all or nothing."""

import numpy as np
import pytest
import SimpleITK as sitk
from DeepAbdominalRegLib import display, nodes, process, task
from DeepAbdominalRegLib.testing import addSegmentationNode, addVolumeNode
from test_display import METRICS


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
    # the core's composite: affine (here a pure translation) around a displacement on a coarser working grid
    working = _image((9, 8, 6), (4.0, 4.0, 5.0), (-11.0, 4.0, -1.0))
    field = sitk.Compose([working + v for v in (0.5, -1.5, 0.25)])
    shift = sitk.AffineTransform(3)
    shift.SetTranslation((0.5, -0.5, 0.25))
    transform = sitk.CompositeTransform([shift, sitk.DisplacementFieldTransform(sitk.Cast(field,
                                                                                         sitk.sitkVectorFloat64))])
    inverse = sitk.TranslationTransform(3, (-1.0, 2.0, -0.5))
    outputs = process.CoreOutputs(
        warpedImage=_image(fixed.GetSize(), fixed.GetSpacing(), fixed.GetOrigin(), value=30.0),
        transform=transform, inverseTransform=inverse,
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
    assert transform.IsA("vtkMRMLTransformNode")
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
