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


def test_after_a_run_the_views_show_fixed_with_the_warped_moving_and_no_map(scene, synthetic):
    inputs, core, outputs = synthetic
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    result = task.applyCoreOutputs(outputs, core, inputs, show=True)
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == inputs.fixedVolume.GetID()
        assert composite.GetForegroundVolumeID() == result.warpedVolume.GetID()
        assert composite.GetForegroundOpacity() == display.DEFAULT_OVERLAY_OPACITY
    legends = scene.GetNodesByClass("vtkMRMLColorLegendDisplayNode")
    assert legends.GetNumberOfItems() == 2
    assert not any(legends.GetItemAsObject(i).GetVisibility() for i in range(2))  # no map legend over the fade
    # one choice away: the Jacobian as the overlay, with its legend (and only its legend)
    shown = display.showRegistrationResult(scene, inputs.fixedVolume, result.warpedVolume, result.jacobianVolume,
                                           result.displacementMagnitudeVolume, overlay="jacobian", opacity=0.7)
    assert shown is result.jacobianVolume
    assert all(c.GetForegroundVolumeID() == result.jacobianVolume.GetID() for c in composites)
    visible = [legends.GetItemAsObject(i) for i in range(2) if legends.GetItemAsObject(i).GetVisibility()]
    assert [legend.GetTitleText() for legend in visible] == [
        "Jacobian determinant (yellow: folding, det <= 0)"]
    display.setOverlayOpacity(scene, 0.25)
    assert all(c.GetForegroundOpacity() == 0.25 for c in composites)
    assert display.showRegistrationResult(scene, inputs.fixedVolume, overlay="none") is None
    assert all(c.GetForegroundVolumeID() is None and c.GetBackgroundVolumeID() == inputs.fixedVolume.GetID()
               for c in composites)
    with pytest.raises(ValueError, match="choose one of"):
        display.showRegistrationResult(scene, inputs.fixedVolume, overlay="jacobians")


def test_outputs_are_reused_only_for_the_same_pair(scene, synthetic):
    inputs, core, outputs = synthetic
    first = task.applyCoreOutputs(outputs, core, inputs)
    for node in (first.warpedVolume, first.outputTransform, first.jacobianVolume, first.metricsTable):
        assert nodes.pairOf(node) == (inputs.fixedVolume.GetID(), inputs.movingVolume.GetID())
    remembered = task.OutputNodes(first.warpedVolume, first.outputTransform, first.inverseTransform,
                                  first.warpedSegmentation, first.jacobianVolume, first.displacementMagnitudeVolume,
                                  first.metricsTable)
    same = task.outputsForPair(remembered, inputs.fixedVolume, inputs.movingVolume)
    assert same.outputTransform is first.outputTransform and same.metricsTable is first.metricsTable
    # another moving volume: nothing of the first pair is overwritten; the new nodes carry the new pair's name
    other = addVolumeNode(scene, _image((15, 13, 11), (2.2, 2.1, 2.9), (-12.0, 4.0, 1.0), value=20.0), "CT later")
    fresh = task.outputsForPair(remembered, inputs.fixedVolume, other)
    assert all(getattr(fresh, name) is None for name in ("warpedVolume", "outputTransform", "inverseTransform",
                                                          "warpedSegmentation", "jacobianVolume",
                                                          "displacementMagnitudeVolume", "metricsTable"))
    swapped = task.outputsForPair(remembered, inputs.movingVolume, inputs.fixedVolume)
    assert swapped.warpedVolume is None  # fixed and moving exchanged is another registration
    second = task.applyCoreOutputs(outputs, core, task.InputNodes(inputs.fixedVolume, other), fresh)
    assert second.warpedVolume is not first.warpedVolume and second.warpedVolume.GetName() == "CT later warped"
    assert "CT later to CT fixed" in second.outputTransform.GetName()
    # a node the user picked that this module did not make is filled as asked
    mine = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped")
    assert task.outputsForPair(task.OutputNodes(warpedVolume=mine), inputs.fixedVolume, other).warpedVolume is mine


def test_inputs_under_the_modules_own_output_transform_use_their_local_geometry(scene, synthetic):
    inputs, core, outputs = synthetic
    result = task.applyCoreOutputs(outputs, core, inputs)
    before = nodes.volumeNodeToImage(inputs.movingVolume, "moving volume")
    landmarks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "moving points")
    landmarks.AddControlPoint([3.0, -4.0, 5.0])  # RAS
    expectedLps = np.array([[-3.0, 4.0, 5.0]])
    for node in (inputs.movingVolume, inputs.movingSegmentation, landmarks):
        node.SetAndObserveTransformNodeID(result.outputTransform.GetID())  # how a user views the result
    assert task.ownTransformNotes(inputs) == [
        f"'{n}' is shown under this module's output transform '{result.outputTransform.GetName()}'; it is registered "
        "from its own geometry (the transform is ignored, not hardened)." for n in ("CT moving", "moving organs")]
    again = task.prepareCoreInputs(inputs)  # not refused as "non-linear, harden first"
    np.testing.assert_allclose(again.moving.GetOrigin(), before.GetOrigin())
    np.testing.assert_allclose(again.moving.GetDirection(), before.GetDirection())
    assert sitk.GetArrayViewFromImage(again.movingLabels).max() == 2
    np.testing.assert_allclose(nodes.markupsNodeToPointsLps(landmarks), expectedLps)
    # any other non-linear transform is still refused with the fix named
    foreign = scene.AddNewNodeByClass("vtkMRMLTransformNode", "someone's grid")
    foreign.SetAndObserveTransformFromParent(result.outputTransform.GetTransformFromParent())
    inputs.movingVolume.SetAndObserveTransformNodeID(foreign.GetID())
    with pytest.raises(nodes.InputNodeError, match="harden the transform"):
        task.prepareCoreInputs(inputs)
