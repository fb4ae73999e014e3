"""MRML nodes <-> core objects (SimpleITK images, numpy point arrays): the Slicer side's one owner of coordinates.

Slicer's world space is **RAS**; ITK, SimpleITK and the core library use **LPS**.  The two differ by a sign on the
first two axes: ``p_lps = diag(-1, -1, 1) @ p_ras``.  A volume node stores ``IJKToRAS`` (4x4) and its voxels as a
``vtkImageData`` whose numpy view is ``(k, j, i)``, the same order as ``sitk.GetArrayFromImage``.

Displacement fields follow ITK: the field on the fixed grid maps a fixed point ``x`` to the moving point
``x + u(x)``.  That is a *resampling* transform, which Slicer stores as a transform's **FromParent** part
(``vtkMRMLTransformStorageNode`` reads ITK displacement-field files the same way).  Hence a moving volume placed
under the transform node is displayed, and hardened, aligned with the fixed volume: for every world (fixed) point
``x`` Slicer samples the moving volume at ``FromParent(x) = x + u(x)``; ``ToParent`` (moving -> fixed) is the
inverse, which Slicer computes when it is needed (e.g. for models, markups or segmentations under the transform).

Only MRML/VTK is imported here (no Qt), so this module runs with PyPI's ``slicer-core``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

__all__ = [
    "LPS_TO_RAS",
    "InputNodeError",
    "SegmentInfo",
    "effectiveParentTransform",
    "gridTransformFromDisplacement",
    "ijkToRasFromImage",
    "isOwnOutputTransform",
    "labelNamesFromSegments",
    "markupsNodeToPointsLps",
    "pairOf",
    "segmentationNodeToLabelImage",
    "setPairReferences",
    "unambiguousInputVolumes",
    "updateSegmentationNodeFromLabelImage",
    "updateTransformNodeFromItk",
    "updateVolumeNodeFromImage",
    "volumeNodeToImage",
    "vtkTransformFromItk",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
"""Maps LPS coordinates (or vectors) to RAS and back (it is its own inverse)."""

FIXED_VOLUME_REFERENCE_ROLE = "fixedVolume"
MOVING_VOLUME_REFERENCE_ROLE = "movingVolume"
USAGE_ATTRIBUTE = "DeepAbdominalReg.Usage"
"""Set on this module's output transforms (how to use them); also how :func:`isOwnOutputTransform` knows them."""


class InputNodeError(ValueError):
    """An input node cannot be used as it is; the message says which node and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# matrices
# ----------------------------------------------------------------------------------------------------------------


def arrayFromVtkMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    array = np.asarray(array, dtype=np.float64)
    matrix = vtk.vtkMatrix4x4()
    size = array.shape[0]
    for r in range(size):
        for c in range(size):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijkToRasFromImage(image: sitk.Image) -> np.ndarray:
    """4x4 ``IJKToRAS`` of a SimpleITK image: ``ras = LPS_TO_RAS @ (origin + direction @ (spacing * ijk))``."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return matrix


def _setGeometryFromIjkToRas(image: sitk.Image, ijkToRas: np.ndarray) -> sitk.Image:
    """Set spacing, origin (LPS) and direction (LPS) of ``image`` from an ``IJKToRAS`` matrix (in place)."""
    ijkToLps = np.eye(4)
    ijkToLps[:3, :] = LPS_TO_RAS @ np.asarray(ijkToRas, dtype=np.float64)[:3, :]
    columns = ijkToLps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise InputNodeError(f"the volume's IJK-to-RAS matrix has a zero or invalid spacing {spacing.tolist()}.")
    image.SetSpacing(spacing.tolist())
    image.SetDirection((columns / spacing).ravel().tolist())
    image.SetOrigin(ijkToLps[:3, 3].tolist())
    return image


def isOwnOutputTransform(transformNode) -> bool:
    """Whether ``transformNode`` is an output transform of this module (:func:`updateTransformNodeFromItk`)."""
    return transformNode is not None and transformNode.GetAttribute(USAGE_ATTRIBUTE) is not None


def effectiveParentTransform(node):
    """The parent transform an input's geometry is read through: ``None`` when there is none or when it is this
    module's own output transform.

    A moving volume (or its segmentation / markups) placed under the output transform to view the result is
    registered again from its own, local geometry: the transform describes this registration's result, not where
    the data are (``task.ownTransformNotes`` says so in the panel)."""
    transformNode = node.GetParentTransformNode() if node is not None else None
    return None if isOwnOutputTransform(transformNode) else transformNode


def _linearParentToWorld(node, role: str) -> np.ndarray | None:
    """The parent transform of ``node`` as a 4x4 matrix (``None`` if there is none, or it is this module's own output
    transform: :func:`effectiveParentTransform`); raise if it is non-linear."""
    transformNode = effectiveParentTransform(node)
    if transformNode is None:
        return None
    if not transformNode.IsTransformToWorldLinear():
        raise InputNodeError(
            f"{role} '{node.GetName()}' is under the non-linear transform '{transformNode.GetName()}'; harden the "
            "transform on it first (Data module: right-click > Harden transform) or remove it."
        )
    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(matrix)
    return arrayFromVtkMatrix(matrix)


# ----------------------------------------------------------------------------------------------------------------
# volumes
# ----------------------------------------------------------------------------------------------------------------


def _worldIjkToRas(volumeNode, role: str) -> np.ndarray:
    """``IJKToRAS`` of the volume's voxels in world coordinates (a linear parent transform is folded in)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRas = arrayFromVtkMatrix(matrix)
    extent = volumeNode.GetImageData().GetExtent()
    if extent[0] or extent[2] or extent[4]:  # image data not starting at index 0: move the origin there
        shift = np.eye(4)
        shift[:3, 3] = (extent[0], extent[2], extent[4])
        ijkToRas = ijkToRas @ shift
    parentToWorld = _linearParentToWorld(volumeNode, role)
    return ijkToRas if parentToWorld is None else parentToWorld @ ijkToRas


def _arrayFromImageData(imageData) -> np.ndarray:
    """Copy of the voxels of a ``vtkImageData`` as a ``(k, j, i)`` or ``(k, j, i, c)`` numpy array."""
    dims = imageData.GetDimensions()
    scalars = imageData.GetPointData().GetScalars()
    components = scalars.GetNumberOfComponents()
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    return np.array(numpy_support.vtk_to_numpy(scalars).reshape(shape), copy=True)


def volumeNodeToImage(volumeNode, role: str = "volume") -> sitk.Image:
    """A SimpleITK image (LPS geometry, voxels copied) of a scalar volume node.

    A linear parent transform is folded into the geometry (the image is where the volume is shown); a non-linear
    one raises :class:`InputNodeError`.
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise InputNodeError(f"{role} has no image data; load or select a volume.")
    imageData = volumeNode.GetImageData()
    if imageData.GetPointData().GetScalars() is None:
        raise InputNodeError(f"{role} '{volumeNode.GetName()}' has no voxels; load or select another volume.")
    array = _arrayFromImageData(imageData)
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    return _setGeometryFromIjkToRas(image, _worldIjkToRas(volumeNode, role))


def _emptyImageData(size_ijk, dtype, components: int = 1) -> tuple[vtk.vtkImageData, np.ndarray]:
    """A ``vtkImageData`` of ``size_ijk`` voxels with its own scalar buffer (``dtype``), and a writable numpy view
    ``(k, j, i)`` / ``(k, j, i, c)`` of that buffer: voxels are written straight into VTK's memory, so no second
    full-size copy exists while a volume is handed over."""
    size = [int(s) for s in size_ijk]
    vtkArray = vtk.vtkDataArray.CreateDataArray(numpy_support.get_vtk_array_type(np.dtype(dtype)))
    vtkArray.SetNumberOfComponents(components)
    vtkArray.SetNumberOfTuples(size[0] * size[1] * size[2])
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*size)
    imageData.GetPointData().SetScalars(vtkArray)
    shape = (size[2], size[1], size[0]) + ((components,) if components > 1 else ())
    return imageData, numpy_support.vtk_to_numpy(vtkArray).reshape(shape)


def _imageDataFromArray(array: np.ndarray, size_ijk, dtype=None) -> vtk.vtkImageData:
    """A ``vtkImageData`` holding a copy of ``array`` (cast to ``dtype`` while copying, if given)."""
    components = array.shape[3] if array.ndim == 4 else 1
    imageData, view = _emptyImageData(size_ijk, dtype or array.dtype, components)
    np.copyto(view, array, casting="unsafe" if dtype is not None else "no")
    return imageData


def updateVolumeNodeFromImage(volumeNode, image: sitk.Image):
    """Fill ``volumeNode`` with the voxels (copied) and geometry (LPS -> RAS) of ``image``; returns the node."""
    array = sitk.GetArrayViewFromImage(image)  # no copy: the only copy is the one VTK keeps
    # float64 is stored as float32 (Slicer's scalar overlays need no more); every other type stays as it is
    dtype = np.float32 if array.dtype == np.float64 else array.dtype
    volumeNode.SetIJKToRASMatrix(vtkMatrixFromArray(ijkToRasFromImage(image)))
    volumeNode.SetAndObserveImageData(_imageDataFromArray(array, image.GetSize(), dtype))
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


# ----------------------------------------------------------------------------------------------------------------
# segmentations
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentInfo:
    """A segment as the core sees it: its label value, and what is needed to recreate it after warping."""

    labelValue: int
    segmentId: str
    name: str
    color: tuple[float, float, float]


def _binaryLabelmapName() -> str:
    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def _orientedImageGeometry(ijkToRas: np.ndarray, size_ijk) -> slicer.vtkOrientedImageData:
    geometry = slicer.vtkOrientedImageData()
    geometry.SetDimensions(*[int(s) for s in size_ijk])
    geometry.SetImageToWorldMatrix(vtkMatrixFromArray(ijkToRas))
    return geometry


def segmentationNodeToLabelImage(
    segmentationNode, referenceVolumeNode, role: str = "segmentation", matchSegments: list[SegmentInfo] | None = None
) -> tuple[sitk.Image, list[SegmentInfo]]:
    """Rasterise every segment onto ``referenceVolumeNode``'s grid: label ``i + 1`` for the i-th segment.

    With ``matchSegments`` (the other image's segments), a segment whose name matches one of them (ignoring case
    and surrounding spaces) gets that segment's label value, so that fixed and moving labels correspond; the
    others get values after the largest one used.  Returns the label image (``sitkUInt16``, LPS geometry of the
    reference volume) and one :class:`SegmentInfo` per segment.  Where segments overlap, the later one wins.
    """
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = list(segmentation.GetSegmentIDs())
    if not segmentIds:
        raise InputNodeError(f"{role} '{segmentationNode.GetName()}' has no segments; add segments or leave it empty.")
    segmentTransform = effectiveParentTransform(segmentationNode)
    volumeTransform = effectiveParentTransform(referenceVolumeNode)
    if segmentTransform is not None and segmentTransform is not volumeTransform:
        raise InputNodeError(
            f"{role} '{segmentationNode.GetName()}' is under the transform '{segmentTransform.GetName()}' but "
            f"'{referenceVolumeNode.GetName()}' is not; harden the transform on the segmentation first."
        )
    if segmentTransform is None and volumeTransform is not None:
        raise InputNodeError(
            f"'{referenceVolumeNode.GetName()}' is under the transform '{volumeTransform.GetName()}' but {role} "
            f"'{segmentationNode.GetName()}' is not; harden the transform on the volume first."
        )
    if not segmentation.ContainsRepresentation(_binaryLabelmapName()):
        segmentationNode.CreateBinaryLabelmapRepresentation()

    localMatrix = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetIJKToRASMatrix(localMatrix)
    size = referenceVolumeNode.GetImageData().GetDimensions()
    geometry = _orientedImageGeometry(arrayFromVtkMatrix(localMatrix), size)
    ids = vtk.vtkStringArray()
    values = vtk.vtkIntArray()
    wanted = {info.name.strip().lower(): info.labelValue for info in (matchSegments or [])}
    nextValue = max(wanted.values(), default=0) + 1
    infos = []
    for segmentId in segmentIds:
        segment = segmentation.GetSegment(segmentId)
        value = wanted.pop(segment.GetName().strip().lower(), None)
        if value is None:
            value, nextValue = nextValue, nextValue + 1
        ids.InsertNextValue(segmentId)
        values.InsertNextValue(value)
        infos.append(SegmentInfo(value, segmentId, segment.GetName(), tuple(float(c) for c in segment.GetColor())))
    if max(info.labelValue for info in infos) > np.iinfo(np.uint16).max:
        raise InputNodeError(f"{role} '{segmentationNode.GetName()}' has too many segments (at most 65535).")
    merged = slicer.vtkOrientedImageData()
    if not segmentationNode.GenerateMergedLabelmapForAllSegments(
        merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, ids, values
    ):
        raise InputNodeError(f"{role} '{segmentationNode.GetName()}' could not be rasterised to a label map.")
    array = _arrayFromImageData(merged).astype(np.uint16)
    labels = sitk.GetImageFromArray(array)
    _setGeometryFromIjkToRas(labels, _worldIjkToRas(referenceVolumeNode, "reference volume"))
    return labels, infos


def labelNamesFromSegments(infos: list[SegmentInfo]) -> dict[int, str]:
    """``{label value: segment name}`` for the core; repeated names get `` (2)``, `` (3)``... so keys stay unique."""
    names: dict[int, str] = {}
    seen: dict[str, int] = {}
    for info in infos:
        count = seen.get(info.name, 0) + 1
        seen[info.name] = count
        names[info.labelValue] = info.name if count == 1 else f"{info.name} ({count})"
    return names


def updateSegmentationNodeFromLabelImage(segmentationNode, labels: sitk.Image, infos: list[SegmentInfo],
                                         sourceSegmentationNode=None, referenceVolumeNode=None):
    """Replace the segments of ``segmentationNode`` by one segment per :class:`SegmentInfo` from ``labels``.

    Segment IDs, names and colours come from ``infos``; when ``sourceSegmentationNode`` is given, every other
    segment property (terminology tags...) is copied from its segment with the same ID.  All segments share one
    binary-labelmap layer (label value = ``labelValue``), as Slicer stores them itself.  A segment that warped to
    nothing is kept, empty.
    """
    array = sitk.GetArrayFromImage(labels)
    maxValue = max((info.labelValue for info in infos), default=0)
    dtype = np.uint8 if maxValue < 256 else np.uint16
    sharedLabelmap = slicer.vtkOrientedImageData()
    sharedLabelmap.ShallowCopy(_imageDataFromArray(array, labels.GetSize(), dtype))
    sharedLabelmap.SetImageToWorldMatrix(vtkMatrixFromArray(ijkToRasFromImage(labels)))

    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    segmentation = segmentationNode.GetSegmentation()
    wasModifying = segmentationNode.StartModify()
    try:
        segmentation.RemoveAllSegments()
        setSource = getattr(segmentation, "SetSourceRepresentationName", None)
        setSource = setSource or segmentation.SetMasterRepresentationName  # "master" before Slicer 5.4
        setSource(_binaryLabelmapName())
        sourceSegmentation = sourceSegmentationNode.GetSegmentation() if sourceSegmentationNode else None
        for info in infos:
            segment = slicer.vtkSegment()
            sourceSegment = sourceSegmentation.GetSegment(info.segmentId) if sourceSegmentation else None
            if sourceSegment is not None:
                segment.DeepCopyMetadata(sourceSegment)
            segment.SetName(info.name)
            segment.SetColor(*info.color)
            segment.SetLabelValue(int(info.labelValue))
            segment.AddRepresentation(_binaryLabelmapName(), sharedLabelmap)
            segmentation.AddSegment(segment, info.segmentId)
        if referenceVolumeNode is not None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    finally:
        segmentationNode.EndModify(wasModifying)
    return segmentationNode


# ----------------------------------------------------------------------------------------------------------------
# markups
# ----------------------------------------------------------------------------------------------------------------


def markupsNodeToPointsLps(markupsNode, role: str = "landmarks") -> np.ndarray:
    """World positions of a markups node's control points, ``(N, 3)`` in LPS mm (any parent transform applied, except
    this module's own output transform: :func:`effectiveParentTransform`)."""
    count = markupsNode.GetNumberOfControlPoints()
    local = effectiveParentTransform(markupsNode) is None and markupsNode.GetParentTransformNode() is not None
    points = np.zeros((count, 3), dtype=np.float64)
    position = [0.0, 0.0, 0.0]
    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    for index in range(count):
        if markupsNode.GetNthControlPointPositionStatus(index) != defined:
            raise InputNodeError(
                f"{role} '{markupsNode.GetName()}': point {index + 1} "
                f"('{markupsNode.GetNthControlPointLabel(index)}') has no position; place or delete it."
            )
        if local:
            markupsNode.GetNthControlPointPosition(index, position)
        else:
            markupsNode.GetNthControlPointPositionWorld(index, position)
        points[index] = position
    return points @ LPS_TO_RAS.T


def updateMarkupsNodeFromPointsLps(markupsNode, pointsLps: np.ndarray, labels: list[str] | None = None):
    """Replace the control points of ``markupsNode`` by ``pointsLps`` (``(N, 3)``, LPS mm)."""
    markupsNode.RemoveAllControlPoints()
    for index, point in enumerate(np.asarray(pointsLps, dtype=np.float64) @ LPS_TO_RAS.T):
        pointIndex = markupsNode.AddControlPoint(vtk.vtkVector3d(*point.tolist()))
        if labels is not None:
            markupsNode.SetNthControlPointLabel(pointIndex, labels[index])
    return markupsNode


# ----------------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------------


def gridTransformFromDisplacement(displacementLps: sitk.Image) -> slicer.vtkOrientedGridTransform:
    """A ``vtkOrientedGridTransform`` (RAS) of a displacement field (LPS mm vectors on an LPS grid).

    The returned transform maps a point ``x`` (RAS) to ``x + u_ras(x)``, linear interpolation as in ITK; use it as
    a transform node's *FromParent* part (see the module docstring).
    """
    if displacementLps.GetNumberOfComponentsPerPixel() != 3 or displacementLps.GetDimension() != 3:
        raise ValueError("a displacement field must be a 3D image with 3 components per voxel")
    vectorsLps = sitk.GetArrayViewFromImage(displacementLps)  # (k, j, i, 3)
    # LPS -> RAS written straight into VTK's float32 buffer: no float64 or second float32 copy of the field
    grid, vectorsRas = _emptyImageData(displacementLps.GetSize(), np.float32, 3)
    np.multiply(vectorsLps, np.array([-1.0, -1.0, 1.0], dtype=np.float32), out=vectorsRas, casting="unsafe")
    grid.SetOrigin(*(LPS_TO_RAS @ np.asarray(displacementLps.GetOrigin())).tolist())
    grid.SetSpacing(*displacementLps.GetSpacing())
    directionRas = np.eye(4)
    directionRas[:3, :3] = LPS_TO_RAS @ np.asarray(displacementLps.GetDirection()).reshape(3, 3)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(vtkMatrixFromArray(directionRas))
    transform.SetInterpolationModeToLinear()
    return transform


def _rasMatrixFromLps(matrixLps: np.ndarray) -> np.ndarray:
    """A 4x4 homogeneous point map in LPS as the same map in RAS (``C M C``, ``C = diag(-1, -1, 1, 1)``)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.asarray(matrixLps, dtype=np.float64) @ flip


def vtkTransformFromItk(transform: sitk.Transform | sitk.Image):
    """A VTK transform (RAS) of an ITK transform in memory: the core's ``transform.h5`` composite (linear parts
    around one displacement field), any linear transform, or a displacement-field image.

    The result maps a point the way the ITK transform does (fixed -> moving, the resampling direction; use it as a
    transform node's *FromParent* part).  The displacement field keeps its own grid (the working grid for the core's
    transform: no full-resolution field is built) and is interpolated linearly, as ITK does.
    """
    from deepabdominalreg.geometry import affine_matrix
    from deepabdominalreg.transforms import split_affine_field

    if isinstance(transform, sitk.Image):
        return gridTransformFromDisplacement(transform)
    parts = split_affine_field(transform)
    if parts is None:
        raise ValueError(f"a {transform.GetName()} cannot be shown in Slicer by this module: only linear transforms "
                         "around at most one displacement field (what 'deepabdominalreg register' writes)")
    after, field, before = parts
    pieces = []
    for part in (before, field, after):  # the order in which they act on a point
        if part is None:
            continue
        if isinstance(part, sitk.Image):
            pieces.append(gridTransformFromDisplacement(part))
        else:
            linear = vtk.vtkTransform()
            linear.SetMatrix(vtkMatrixFromArray(_rasMatrixFromLps(affine_matrix(part))))
            pieces.append(linear)
    if len(pieces) == 1:
        return pieces[0]
    composite = vtk.vtkGeneralTransform()
    composite.PostMultiply()  # each concatenated transform acts after the ones before it
    for piece in pieces or [vtk.vtkTransform()]:
        composite.Concatenate(piece)
    return composite


def updateTransformNodeFromItk(transformNode, transform: sitk.Transform | sitk.Image,
                               fixedVolumeNode=None, movingVolumeNode=None, usage: str | None = None):
    """Set a transform node from an ITK transform (fixed -> moving points) or displacement-field image (on the fixed
    grid): :func:`vtkTransformFromItk`.

    The transform becomes the node's FromParent transform, so that the *moving* volume placed under this node is
    shown aligned with the *fixed* volume (see the module docstring).  Node references ``fixedVolume`` and
    ``movingVolume`` record which registration produced it.
    """
    transformNode.SetAndObserveTransformFromParent(vtkTransformFromItk(transform))
    setPairReferences(transformNode, fixedVolumeNode, movingVolumeNode)
    transformNode.SetAttribute(
        USAGE_ATTRIBUTE,
        usage or "Apply to the moving volume (or its segmentation/markups) to align it with the fixed volume.",
    )
    return transformNode


def setPairReferences(outputNode, fixedVolumeNode, movingVolumeNode) -> None:
    """Record on an output node which fixed/moving pair produced it (node references, saved with the scene)."""
    if fixedVolumeNode is not None:
        outputNode.SetNodeReferenceID(FIXED_VOLUME_REFERENCE_ROLE, fixedVolumeNode.GetID())
    if movingVolumeNode is not None:
        outputNode.SetNodeReferenceID(MOVING_VOLUME_REFERENCE_ROLE, movingVolumeNode.GetID())


def pairOf(outputNode) -> tuple[str | None, str | None] | None:
    """``(fixed ID, moving ID)`` recorded by :func:`setPairReferences`, or ``None`` for a node without them."""
    fixedId = outputNode.GetNodeReferenceID(FIXED_VOLUME_REFERENCE_ROLE)
    movingId = outputNode.GetNodeReferenceID(MOVING_VOLUME_REFERENCE_ROLE)
    return None if fixedId is None and movingId is None else (fixedId, movingId)


def unambiguousInputVolumes(scene) -> tuple | None:
    """``(fixed, moving)`` to pre-select when the scene holds exactly two intensity volumes, else ``None``.

    Label maps (``vtkMRMLLabelMapVolumeNode`` derives from ``vtkMRMLScalarVolumeNode``) are never candidates; with
    three or more volumes the user chooses, since guessing which is fixed would be wrong half of the time.
    """
    volumes = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            volumes.append(node)
    return (volumes[0], volumes[1]) if len(volumes) == 2 else None
