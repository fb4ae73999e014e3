"""MRML <-> core conversions: volumes (IJK-to-RAS vs LPS), segmentations, markups, displacement transforms."""

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from DeepAbdominalRegLib import nodes


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = _rotation(0.2, -0.35, 0.5) @ np.diag([1.0, -1.0, 1.0])  # rotated and flipped (a left-handed frame)
SPACING = (0.7, 1.1, 2.5)
ORIGIN_LPS = (-120.5, 87.25, -300.0)


def _obliqueImage(size=(9, 7, 5), pixel=np.int16, components=1):
    rng = np.random.default_rng(0)
    shape = (size[2], size[1], size[0]) + ((components,) if components > 1 else ())
    array = rng.integers(-1000, 1000, size=shape).astype(pixel)
    image = sitk.GetImageFromArray(array, isVector=components > 1)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN_LPS)
    image.SetDirection(OBLIQUE.ravel().tolist())
    return image


def _ras(pointLps):
    return np.asarray(pointLps, dtype=float) * [-1.0, -1.0, 1.0]


def _nodeIjkToRas(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return nodes.arrayFromVtkMatrix(matrix)


def test_volume_node_round_trip_oblique_anisotropic(scene):
    image = _obliqueImage()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    nodes.updateVolumeNodeFromImage(node, image)

    # every voxel is where ITK says it is, once LPS is turned into RAS
    ijkToRas = _nodeIjkToRas(node)
    for index in [(0, 0, 0), (8, 0, 0), (0, 6, 0), (0, 0, 4), (3, 5, 2), (8, 6, 4)]:
        expected = _ras(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose((ijkToRas @ [*index, 1.0])[:3], expected, atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(node.GetSpacing(), SPACING, atol=1e-12)

    back = nodes.volumeNodeToImage(node)
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetPixelID() == image.GetPixelID()


def test_volume_under_linear_transform_is_read_where_it_is_shown(scene):
    image = _obliqueImage()
    node = nodes.updateVolumeNodeFromImage(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"), image)
    transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    toParent = np.eye(4)
    toParent[:3, :3] = _rotation(0.0, 0.0, 0.1)
    toParent[:3, 3] = (10.0, -4.0, 2.0)  # RAS mm
    transformNode.SetMatrixTransformToParent(nodes.vtkMatrixFromArray(toParent))
    node.SetAndObserveTransformNodeID(transformNode.GetID())

    back = nodes.volumeNodeToImage(node)
    for index in [(0, 0, 0), (8, 6, 4), (2, 3, 1)]:
        shown_ras = (toParent @ _nodeIjkToRas(node) @ [*index, 1.0])[:3]
        np.testing.assert_allclose(_ras(back.TransformIndexToPhysicalPoint(index)), shown_ras, atol=1e-9)


def test_volume_under_nonlinear_transform_is_refused(scene):
    node = nodes.updateVolumeNodeFromImage(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"), _obliqueImage())
    transformNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "bend")
    transformNode.SetAndObserveTransformFromParent(nodes.gridTransformFromDisplacement(_constantField((1, 2, 3))))
    node.SetAndObserveTransformNodeID(transformNode.GetID())
    with pytest.raises(nodes.InputNodeError, match="harden"):
        nodes.volumeNodeToImage(node, "moving volume")


# ----------------------------------------------------------------------------------------------------------------
# displacement fields -> grid transform nodes
# ----------------------------------------------------------------------------------------------------------------


def _fieldGrid(size=(12, 10, 8)):
    grid = sitk.Image(list(size), sitk.sitkVectorFloat32, 3)
    grid.SetSpacing((4.0, 5.0, 6.0))
    grid.SetOrigin((-20.0, 30.0, -15.0))
    grid.SetDirection(OBLIQUE.ravel().tolist())
    return grid


def _constantField(u_lps, size=(12, 10, 8)):
    grid = _fieldGrid(size)
    array = np.broadcast_to(np.asarray(u_lps, np.float32), (size[2], size[1], size[0], 3)).copy()
    field = sitk.GetImageFromArray(array, isVector=True)
    field.CopyInformation(grid)
    return field


AFFINE_A = np.array([[0.02, -0.01, 0.005], [0.01, 0.03, 0.0], [-0.005, 0.01, -0.02]])
AFFINE_B = np.array([3.0, -2.0, 4.0])


def _affineField():
    """u(x) = A x + b (LPS): linear in x, so the transform's linear interpolation reproduces it exactly."""
    grid = _fieldGrid()
    size = grid.GetSize()
    idx = np.stack(np.meshgrid(np.arange(size[0]), np.arange(size[1]), np.arange(size[2]), indexing="ij"), -1)
    idx = idx.transpose(2, 1, 0, 3).reshape(-1, 3).astype(float)  # (k, j, i) order, xyz indices
    points = np.asarray(grid.GetOrigin()) + idx * grid.GetSpacing() @ OBLIQUE.T
    u = points @ AFFINE_A.T + AFFINE_B
    field = sitk.GetImageFromArray(u.reshape(size[2], size[1], size[0], 3).astype(np.float32), isVector=True)
    field.CopyInformation(grid)
    return field


def _interiorPointsLps(field, count=20, seed=1):
    rng = np.random.default_rng(seed)
    size = np.asarray(field.GetSize(), dtype=float)
    continuous = rng.uniform(1.0, size - 2.0, size=(count, 3))
    return np.array([field.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in continuous])


def test_grid_transform_from_parent_is_the_itk_resampling_map(scene):
    field = _affineField()
    transformNode = nodes.updateTransformNodeFromItk(
        scene.AddNewNodeByClass("vtkMRMLGridTransformNode"), field)
    fromParent = transformNode.GetTransformFromParent()
    for x_lps in _interiorPointsLps(field):
        u_lps = AFFINE_A @ x_lps + AFFINE_B
        np.testing.assert_allclose(fromParent.TransformPoint(_ras(x_lps)), _ras(x_lps + u_lps), atol=1e-3)


def test_grid_transform_to_world_maps_moving_points_onto_fixed(scene):
    """A point of the moving image at y = x + u(x) is shown (ToParent/ToWorld) at the fixed point x."""
    field = _affineField()
    transformNode = nodes.updateTransformNodeFromItk(
        scene.AddNewNodeByClass("vtkMRMLGridTransformNode"), field)
    toWorld = vtk.vtkGeneralTransform()
    transformNode.GetTransformToWorld(toWorld)
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    markups.SetAndObserveTransformNodeID(transformNode.GetID())
    for x_lps in _interiorPointsLps(field, count=8):
        y_lps = x_lps + AFFINE_A @ x_lps + AFFINE_B
        np.testing.assert_allclose(toWorld.TransformPoint(_ras(y_lps)), _ras(x_lps), atol=0.05)
        markups.RemoveAllControlPoints()
        markups.AddControlPoint(vtk.vtkVector3d(*_ras(y_lps)))
        world = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPositionWorld(0, world)
        np.testing.assert_allclose(world, _ras(x_lps), atol=0.05)
        # as an input, a markups node under this module's own output transform is read where it is, not moved
        np.testing.assert_allclose(nodes.markupsNodeToPointsLps(markups)[0], y_lps, atol=1e-9)


def test_grid_transform_matches_slicer_reading_the_core_nifti_file(scene, tmp_path):
    """Slicer's own reader (vtkMRMLTransformStorageNode) of the core's displacement.nii.gz is the oracle."""
    from deepabdominalreg.io import write_displacement_field

    field = _affineField()
    path = write_displacement_field(field, tmp_path / "displacement.nii.gz")
    readNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(readNode)
    ourNode = nodes.updateTransformNodeFromItk(scene.AddNewNodeByClass("vtkMRMLGridTransformNode"), field)
    for x_lps in _interiorPointsLps(field, seed=3):
        np.testing.assert_allclose(ourNode.GetTransformFromParent().TransformPoint(_ras(x_lps)),
                                   readNode.GetTransformFromParent().TransformPoint(_ras(x_lps)), atol=1e-3)
        np.testing.assert_allclose(ourNode.GetTransformToParent().TransformPoint(_ras(x_lps)),
                                   readNode.GetTransformToParent().TransformPoint(_ras(x_lps)), atol=1e-3)


def test_hardening_the_transform_on_the_moving_volume_aligns_it_with_fixed(scene):
    """The user-facing check: moving under the transform, hardened, has its content where the fixed one is."""
    size, spacing = (40, 40, 30), 2.0
    t_lps = np.array([6.0, -8.0, 4.0])  # the moving content sits at x + t for a fixed point x

    def cube(offset_lps):
        image = sitk.Image(list(size), sitk.sitkFloat32)
        image.SetSpacing((spacing,) * 3)
        image.SetOrigin((-40.0, -40.0, -30.0))
        array = np.zeros((size[2], size[1], size[0]), np.float32)
        centre = np.array([0.0, 0.0, 0.0]) + offset_lps
        lo = np.round((centre - 8.0 - image.GetOrigin()) / spacing).astype(int)
        hi = np.round((centre + 8.0 - image.GetOrigin()) / spacing).astype(int)
        array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = 100.0
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        return out

    fixed, moving = cube(np.zeros(3)), cube(t_lps)
    movingNode = nodes.updateVolumeNodeFromImage(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"), moving)
    transformNode = nodes.updateTransformNodeFromItk(
        scene.AddNewNodeByClass("vtkMRMLGridTransformNode"), _constantField(t_lps, size=(30, 30, 24)))
    movingNode.SetAndObserveTransformNodeID(transformNode.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(movingNode)
    assert movingNode.GetParentTransformNode() is None

    def centroidLps(image):
        array = sitk.GetArrayFromImage(image)
        kji = np.argwhere(array > 50.0).mean(axis=0)
        return np.asarray(image.TransformContinuousIndexToPhysicalPoint(kji[::-1].tolist()))

    hardened = nodes.volumeNodeToImage(movingNode)
    np.testing.assert_allclose(centroidLps(hardened), centroidLps(fixed), atol=0.5)
    np.testing.assert_allclose(centroidLps(moving) - centroidLps(fixed), t_lps, atol=0.5)


# ----------------------------------------------------------------------------------------------------------------
# segmentations
# ----------------------------------------------------------------------------------------------------------------


def _labelImage():
    image = _obliqueImage(size=(20, 16, 12), pixel=np.uint16)
    array = np.zeros((12, 16, 20), np.uint16)
    array[2:6, 3:9, 4:12] = 1
    array[6:10, 8:14, 10:18] = 2
    array[1:4, 10:15, 1:5] = 3
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    return labels


SEGMENTS = [
    nodes.SegmentInfo(1, "liver_id", "liver", (0.8, 0.3, 0.2)),
    nodes.SegmentInfo(2, "kidney_id", "left kidney", (0.2, 0.7, 0.3)),
    nodes.SegmentInfo(3, "spleen_id", "spleen", (0.3, 0.3, 0.9)),
]


def test_segmentation_label_image_round_trip_keeps_ids_names_colours(scene):
    labels = _labelImage()
    volume = nodes.updateVolumeNodeFromImage(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"),
                                             sitk.Cast(labels, sitk.sitkInt16))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    nodes.updateSegmentationNodeFromLabelImage(segmentation, labels, SEGMENTS, referenceVolumeNode=volume)
    assert list(segmentation.GetSegmentation().GetSegmentIDs()) == ["liver_id", "kidney_id", "spleen_id"]

    back, infos = nodes.segmentationNodeToLabelImage(segmentation, volume)
    assert infos == SEGMENTS
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    np.testing.assert_allclose(back.GetOrigin(), labels.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), labels.GetDirection(), atol=1e-12)

    # each segment's own voxels, through Slicer's helper that needs no slicer.modules
    for info in SEGMENTS:
        internal = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation, info.segmentId)
        segment = segmentation.GetSegmentation().GetSegment(info.segmentId)
        assert (internal == segment.GetLabelValue()).sum() == (sitk.GetArrayFromImage(labels) == info.labelValue).sum()
        assert segment.GetName() == info.name
        np.testing.assert_allclose(segment.GetColor(), info.color)


def test_fixed_segments_take_the_moving_label_values_by_name(scene):
    labels = _labelImage()
    volume = nodes.updateVolumeNodeFromImage(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"),
                                             sitk.Cast(labels, sitk.sitkInt16))
    fixedSegments = [
        nodes.SegmentInfo(1, "a", "Spleen ", (1, 0, 0)),
        nodes.SegmentInfo(2, "b", "aorta", (0, 1, 0)),
        nodes.SegmentInfo(3, "c", "LIVER", (0, 0, 1)),
    ]
    segmentation = nodes.updateSegmentationNodeFromLabelImage(
        scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), labels, fixedSegments)
    out, infos = nodes.segmentationNodeToLabelImage(segmentation, volume, matchSegments=SEGMENTS)
    assert [(i.name, i.labelValue) for i in infos] == [("Spleen ", 3), ("aorta", 4), ("LIVER", 1)]
    original, relabelled = sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(out)
    np.testing.assert_array_equal(relabelled[original == 1], 3)
    np.testing.assert_array_equal(relabelled[original == 2], 4)
    np.testing.assert_array_equal(relabelled[original == 3], 1)


def test_label_names_are_unique():
    infos = [nodes.SegmentInfo(1, "a", "lesion", (1, 0, 0)), nodes.SegmentInfo(2, "b", "lesion", (1, 0, 0))]
    assert nodes.labelNamesFromSegments(infos) == {1: "lesion", 2: "lesion (2)"}


def test_markups_are_read_in_lps_world_coordinates(scene):
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    nodes.updateMarkupsNodeFromPointsLps(markups, np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]]))
    position = [0.0, 0.0, 0.0]
    markups.GetNthControlPointPosition(0, position)
    np.testing.assert_allclose(position, [-1.0, -2.0, 3.0])  # stored in RAS
    transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, 0.0, 0.0)  # 10 mm to the Right
    transformNode.SetMatrixTransformToParent(nodes.vtkMatrixFromArray(shift))
    markups.SetAndObserveTransformNodeID(transformNode.GetID())
    np.testing.assert_allclose(nodes.markupsNodeToPointsLps(markups), [[-9.0, 2.0, 3.0], [-14.0, 5.0, -6.0]])


def test_unambiguous_input_volumes_skip_label_maps(scene):
    from DeepAbdominalRegLib.nodes import unambiguousInputVolumes

    assert unambiguousInputVolumes(scene) is None
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert unambiguousInputVolumes(scene) is None  # one CT and a label map: nothing to pair
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
    assert unambiguousInputVolumes(scene) == (fixed, moving)
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "third")
    assert unambiguousInputVolumes(scene) is None  # three CTs: the user chooses


def _coreComposite():
    """The core's transform.h5 shape on an oblique, anisotropic working grid: x -> affine(x + u(x))."""
    from deepabdominalreg.geometry import Grid
    from deepabdominalreg.transforms import forward_transform

    working = Grid(size=(14, 12, 10), spacing=(3.0, 3.5, 4.0), origin=ORIGIN_LPS, direction=OBLIQUE.ravel())
    z, y, x = np.mgrid[0:10, 0:12, 0:14].astype(np.float64)
    u = np.stack([2.0 * np.sin(x / 3.0), 1.5 * np.cos(y / 4.0), np.sin((x + z) / 5.0)], axis=-1)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.03, 0.0, -0.02, 0.98, 0.01, 0.0, 0.02, 1.01))
    affine.SetTranslation((2.0, -1.0, 3.0))
    affine.SetCenter((-100.0, 100.0, -280.0))
    transform = forward_transform(affine, u, working)
    rng = np.random.default_rng(4)
    points = working.index_to_physical(rng.uniform(1.0, np.asarray(working.size) - 2.0, (20, 3)))
    return transform, points


def test_core_composite_in_memory_maps_points_as_itk_does(scene):
    transform, points = _coreComposite()
    node = nodes.updateTransformNodeFromItk(scene.AddNewNodeByClass("vtkMRMLTransformNode"), transform)
    fromParent = node.GetTransformFromParent()
    for p in points:
        np.testing.assert_allclose(fromParent.TransformPoint(_ras(p)), _ras(transform.TransformPoint(p.tolist())),
                                   atol=1e-3)


def test_core_composite_matches_slicer_reading_transform_h5(scene, tmp_path):
    """Slicer's own reader of transform.h5 (vtkMRMLTransformStorageNode, ITK -> VTK) is the oracle, set to linear
    interpolation (it reads grids as cubic; the core and ITK interpolate linearly)."""
    from deepabdominalreg.transforms import write_transform

    transform, points = _coreComposite()
    path = write_transform(transform, tmp_path / "transform.h5")
    readNode = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(readNode)
    read = readNode.GetTransformFromParent()
    for i in range(read.GetNumberOfConcatenatedTransforms()):
        part = read.GetConcatenatedTransform(i)
        if part.IsA("vtkOrientedGridTransform"):
            part.SetInterpolationModeToLinear()
    ourNode = nodes.updateTransformNodeFromItk(scene.AddNewNodeByClass("vtkMRMLTransformNode"), transform)
    for p in points:
        np.testing.assert_allclose(ourNode.GetTransformFromParent().TransformPoint(_ras(p)),
                                   read.TransformPoint(_ras(p)), atol=1e-3)
        np.testing.assert_allclose(ourNode.GetTransformToParent().TransformPoint(_ras(p)),
                                   readNode.GetTransformToParent().TransformPoint(_ras(p)), atol=0.01)


def test_a_transform_slicer_cannot_take_is_refused_clearly():
    bspline = sitk.BSplineTransform(3)
    with pytest.raises(ValueError, match="BSplineTransform"):
        nodes.vtkTransformFromItk(bspline)
