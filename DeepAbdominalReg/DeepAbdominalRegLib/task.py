"""Registration runs from Slicer, the MRML side: input nodes -> core -> output nodes, leaving the scene as it was.

Two ways to run, one way to turn results into nodes:

* :func:`registerBlocking` runs :func:`deepabdominalreg.registration.register_pair` in this process (Python
  console, scripts, tests), with ``progress``/``shouldStop`` callables.
* :class:`RegistrationJob` runs it in a ``PythonSlicer`` subprocess (the GUI) through
  :class:`DeepAbdominalRegLib.process.BackgroundRegistration`, which owns the files, the process, its progress,
  cancel and clean-up.

Both start from :func:`prepareCoreInputs` (nodes -> SimpleITK images and arrays in LPS, checked) and end in
:func:`applyCoreOutputs`, which creates output nodes only from a complete result and removes every node it added
if anything fails, so the scene is left as it was.  Inputs are never modified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import SimpleITK as sitk
from deepabdominalreg.config import RegistrationConfig

from DeepAbdominalRegLib import display, nodes
from DeepAbdominalRegLib.process import (
    BackgroundRegistration,
    CoreInputs,
    CoreOutputs,
    RegistrationCancelledByUser,
)

__all__ = [
    "InputNodes",
    "OutputNodes",
    "RegistrationJob",
    "applyCoreOutputs",
    "checkOutputsAreNotInputs",
    "outputsForPair",
    "ownTransformNotes",
    "prepareCoreInputs",
    "registerBlocking",
]


# ----------------------------------------------------------------------------------------------------------------
# what goes in and out
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class InputNodes:
    """The nodes a registration reads (never modified).  The user masks are segmentation nodes whose segments
    together form the mask: ``excludeSegmentation`` (fixed) and ``movingExcludeSegmentation`` (moving) are left out
    of the similarity, ``rigidSegmentation`` (fixed) is kept rigid (``io_rigidity_weight``)."""

    fixedVolume: object
    movingVolume: object
    movingSegmentation: object | None = None
    fixedSegmentation: object | None = None
    fixedLandmarks: object | None = None
    movingLandmarks: object | None = None
    excludeSegmentation: object | None = None
    movingExcludeSegmentation: object | None = None
    rigidSegmentation: object | None = None


@dataclass
class OutputNodes:
    """Output nodes: as requested (``None``: create one), then as filled.  ``metrics`` is the core's dict."""

    warpedVolume: object | None = None
    outputTransform: object | None = None
    inverseTransform: object | None = None
    warpedSegmentation: object | None = None
    jacobianVolume: object | None = None
    displacementMagnitudeVolume: object | None = None
    metricsTable: object | None = None
    metrics: dict = field(default_factory=dict)


def prepareCoreInputs(inputs: InputNodes) -> CoreInputs:
    """Convert the input nodes (never modified) for the core; raise ``nodes.InputNodeError`` for unusable ones."""
    if inputs.fixedVolume is None or inputs.movingVolume is None:
        raise nodes.InputNodeError("select both a fixed and a moving volume.")
    if inputs.fixedVolume is inputs.movingVolume:
        raise nodes.InputNodeError("the fixed and moving volumes are the same node; select two different volumes.")
    if (inputs.fixedLandmarks is None) != (inputs.movingLandmarks is None):
        raise nodes.InputNodeError("landmarks need both a fixed and a moving point list (same points, same order).")
    core = CoreInputs(
        fixed=nodes.volumeNodeToImage(inputs.fixedVolume, "fixed volume"),
        moving=nodes.volumeNodeToImage(inputs.movingVolume, "moving volume"),
    )
    fixedSegments: list[nodes.SegmentInfo] = []
    if inputs.movingSegmentation is not None:
        core.movingLabels, core.movingSegments = nodes.segmentationNodeToLabelImage(
            inputs.movingSegmentation, inputs.movingVolume, "moving segmentation"
        )
    if inputs.fixedSegmentation is not None:
        core.fixedLabels, fixedSegments = nodes.segmentationNodeToLabelImage(
            inputs.fixedSegmentation, inputs.fixedVolume, "fixed segmentation", matchSegments=core.movingSegments
        )
    names = nodes.labelNamesFromSegments(core.movingSegments)
    for value, name in nodes.labelNamesFromSegments(fixedSegments).items():
        names.setdefault(value, name)
    core.labelNames = names
    if inputs.fixedLandmarks is not None:
        core.fixedLandmarksLps = nodes.markupsNodeToPointsLps(inputs.fixedLandmarks, "fixed landmarks")
        core.movingLandmarksLps = nodes.markupsNodeToPointsLps(inputs.movingLandmarks, "moving landmarks")
        if len(core.fixedLandmarksLps) != len(core.movingLandmarksLps):
            raise nodes.InputNodeError(
                f"the fixed and moving landmark lists have {len(core.fixedLandmarksLps)} and "
                f"{len(core.movingLandmarksLps)} points; they must list the same points in the same order."
            )
    core.excludeMask = _maskImage(inputs.excludeSegmentation, inputs.fixedVolume, "exclusion mask")
    core.movingExcludeMask = _maskImage(inputs.movingExcludeSegmentation, inputs.movingVolume,
                                        "moving exclusion mask")
    core.rigidMask = _maskImage(inputs.rigidSegmentation, inputs.fixedVolume, "rigid mask")
    return core


def _maskImage(segmentationNode, volumeNode, role: str):
    """A user mask as uint8 0/1 on ``volumeNode``'s grid: the voxels of any of its segments (``None`` for no node)."""
    if segmentationNode is None:
        return None
    if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise nodes.InputNodeError(
            f"the {role} '{segmentationNode.GetName()}' is a {segmentationNode.GetClassName()}, not a segmentation; "
            "select a segmentation node (a label map converts to one: Data module, right-click it > Convert "
            "labelmap to segmentation node)."
        )
    labels, _segments = nodes.segmentationNodeToLabelImage(segmentationNode, volumeNode, role)
    mask = labels > 0  # SimpleITK's comparison gives uint8 0/1
    if not sitk.GetArrayViewFromImage(mask).any():
        raise nodes.InputNodeError(
            f"the {role} '{segmentationNode.GetName()}' is empty on '{volumeNode.GetName()}' (no segment has a voxel "
            "inside that volume); paint the region in Segment Editor, check that it belongs to this volume, or "
            "select None."
        )
    return mask


def checkOutputsAreNotInputs(inputs: InputNodes, requested: OutputNodes | None) -> None:
    """Inputs are never modified: refuse an output selection that is one of the input nodes."""
    if requested is None:
        return
    inputNodes = [getattr(inputs, f.name) for f in dataclasses.fields(InputNodes)]
    inputNodes = [node for node in inputNodes if node is not None]
    for field_ in dataclasses.fields(OutputNodes):
        node = getattr(requested, field_.name)
        if node is not None and any(node is i for i in inputNodes):
            raise nodes.InputNodeError(
                f"the output '{field_.name}' is the input node '{node.GetName()}'; inputs are never overwritten — "
                "select another node or 'Create new'."
            )


def outputsForPair(requested: OutputNodes | None, fixedVolumeNode, movingVolumeNode) -> OutputNodes:
    """The requested output nodes that may be filled by a registration of this fixed/moving pair.

    A node made by an earlier run of *another* pair (its :func:`nodes.pairOf` references name other volumes) is not
    overwritten: ``None`` in its place makes the run create a new node named after the new pair.  Nodes of the
    same pair are updated in place (a rerun with other settings), and a node the user picked that this module did
    not make is filled as asked.
    """
    requested = requested or OutputNodes()
    wanted = tuple(node.GetID() if node is not None else None for node in (fixedVolumeNode, movingVolumeNode))
    kept = {}
    for field_ in dataclasses.fields(OutputNodes):
        node = getattr(requested, field_.name)
        if field_.name != "metrics" and node is not None:
            pair = nodes.pairOf(node)
            node = node if pair is None or pair == wanted else None
        kept[field_.name] = node
    return OutputNodes(**kept)


def ownTransformNotes(inputs: InputNodes) -> list[str]:
    """One sentence per input node placed under this module's own output transform (registered from its local
    geometry, :func:`nodes.effectiveParentTransform`), for the panel's status."""
    notes = []
    for field_ in dataclasses.fields(InputNodes):
        node = getattr(inputs, field_.name)
        transformNode = node.GetParentTransformNode() if node is not None else None
        if nodes.isOwnOutputTransform(transformNode):
            notes.append(f"'{node.GetName()}' is shown under this module's output transform "
                         f"'{transformNode.GetName()}'; it is registered from its own geometry (the transform is "
                         "ignored, not hardened).")
    return notes


def _allNodeIds(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _copyWindowLevel(sourceVolumeNode, targetVolumeNode) -> None:
    source, target = sourceVolumeNode.GetDisplayNode(), targetVolumeNode.GetDisplayNode()
    if source is None or target is None or not hasattr(source, "GetWindow"):
        return
    target.SetAutoWindowLevel(source.GetAutoWindowLevel())
    if not source.GetAutoWindowLevel():
        target.SetWindowLevel(source.GetWindow(), source.GetLevel())
    if source.GetColorNodeID():
        target.SetAndObserveColorNodeID(source.GetColorNodeID())


def applyCoreOutputs(outputs: CoreOutputs, core: CoreInputs, inputs: InputNodes,
                     requested: OutputNodes | None = None, *, show: bool = True) -> OutputNodes:
    """Create (or fill the requested) output nodes from a complete result; all or nothing.

    The outputs are taken one at a time (:meth:`CoreOutputs.read`: from its file, for a background run) and each is
    handed to its node before the next is read, so that only one of them exists outside VTK at any time.  If
    anything fails, every node added to the scene since the call is removed again and the error re-raised.
    """
    requested = requested or OutputNodes()
    scene = inputs.fixedVolume.GetScene()
    fixedName, movingName = inputs.fixedVolume.GetName(), inputs.movingVolume.GetName()
    before = _allNodeIds(scene)

    def outputNode(existing, className: str, name: str):
        if existing is not None:
            return existing
        return scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))

    result = OutputNodes(metrics=outputs.metrics)
    try:
        result.warpedVolume = outputNode(requested.warpedVolume, "vtkMRMLScalarVolumeNode", f"{movingName} warped")
        nodes.updateVolumeNodeFromImage(result.warpedVolume, outputs.read("warpedImage"))
        _copyWindowLevel(inputs.movingVolume, result.warpedVolume)

        result.outputTransform = outputNode(
            requested.outputTransform, "vtkMRMLTransformNode", f"{movingName} to {fixedName} (deformable)"
        )
        nodes.updateTransformNodeFromItk(
            result.outputTransform, outputs.read("transform"), inputs.fixedVolume, inputs.movingVolume
        )
        if outputs.inverseTransform is not None:
            result.inverseTransform = outputNode(
                requested.inverseTransform, "vtkMRMLTransformNode", f"{fixedName} to {movingName} (inverse)"
            )
            nodes.updateTransformNodeFromItk(
                result.inverseTransform, outputs.read("inverseTransform"), inputs.fixedVolume, inputs.movingVolume,
                usage="Apply to the fixed volume (or its segmentation/markups) to align it with the moving volume.",
            )

        if outputs.warpedLabels is not None and core.movingSegments:
            sourceName = inputs.movingSegmentation.GetName() if inputs.movingSegmentation else movingName
            result.warpedSegmentation = outputNode(
                requested.warpedSegmentation, "vtkMRMLSegmentationNode", f"{sourceName} warped"
            )
            nodes.updateSegmentationNodeFromLabelImage(
                result.warpedSegmentation, outputs.read("warpedLabels"), core.movingSegments,
                sourceSegmentationNode=inputs.movingSegmentation, referenceVolumeNode=inputs.fixedVolume,
            )

        result.jacobianVolume = outputNode(
            requested.jacobianVolume, "vtkMRMLScalarVolumeNode", f"{movingName} Jacobian determinant"
        )
        nodes.updateVolumeNodeFromImage(result.jacobianVolume, outputs.read("jacobian"))
        display.showJacobian(result.jacobianVolume)

        result.displacementMagnitudeVolume = outputNode(
            requested.displacementMagnitudeVolume, "vtkMRMLScalarVolumeNode", f"{movingName} displacement (mm)"
        )
        nodes.updateVolumeNodeFromImage(result.displacementMagnitudeVolume, outputs.read("displacementMagnitude"))
        display.showDisplacementMagnitude(result.displacementMagnitudeVolume)

        result.metricsTable = outputNode(
            requested.metricsTable, "vtkMRMLTableNode", f"{movingName} to {fixedName} metrics"
        )
        display.updateMetricsTable(result.metricsTable, outputs.metrics)

        for node in (result.warpedVolume, result.inverseTransform, result.warpedSegmentation, result.jacobianVolume,
                     result.displacementMagnitudeVolume, result.metricsTable):
            if node is not None:
                nodes.setPairReferences(node, inputs.fixedVolume, inputs.movingVolume)
        if show:
            display.showRegistrationResult(scene, inputs.fixedVolume, result.warpedVolume, result.jacobianVolume,
                                           result.displacementMagnitudeVolume)
            display.fitSliceViews()
    except Exception:
        added = [scene.GetNodeByID(i) for i in _allNodeIds(scene) - before]
        for node in added:
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
        raise
    return result


# ----------------------------------------------------------------------------------------------------------------
# in-process (blocking)
# ----------------------------------------------------------------------------------------------------------------


def registerBlocking(inputs: InputNodes, config: RegistrationConfig, requested: OutputNodes | None = None, *,
                     progress: Callable | None = None, shouldStop: Callable[[], bool] | None = None,
                     show: bool = True) -> OutputNodes:
    """Run the core in this process; raise ``RegistrationCancelledByUser`` on cancel, the core's errors otherwise.

    ``progress`` receives ``deepabdominalreg.registration.ProgressEvent`` objects.  Nothing is added to the scene
    unless the registration succeeds.
    """
    from deepabdominalreg.registration.pipeline import RegistrationCancelled, register_pair

    checkOutputsAreNotInputs(inputs, requested)
    core = prepareCoreInputs(inputs)
    try:
        result = register_pair(core.fixed, core.moving, config=config, progress=progress, should_stop=shouldStop,
                               **core.registerPairArguments())
    except RegistrationCancelled as exc:
        raise RegistrationCancelledByUser("registration cancelled; nothing was added to the scene.") from exc
    return applyCoreOutputs(CoreOutputs.fromResult(result), core, inputs, requested, show=show)


# ----------------------------------------------------------------------------------------------------------------
# in a subprocess (background)
# ----------------------------------------------------------------------------------------------------------------


class RegistrationJob:
    """One background registration: input nodes -> :class:`BackgroundRegistration` -> output nodes.

    ``onProgress(event: dict)`` gets each progress event, ``onLog(line: str)`` each other output line of the run;
    ``onFinished(outputs: OutputNodes | None, error: Exception | None)`` is called once, after the output nodes were
    made from the run's files and its temporary folder was removed.  :meth:`start` checks and
    converts the inputs (errors raise immediately) and launches the process; drive it with :meth:`startTimer` (GUI,
    Qt timer) or :meth:`wait`.
    """

    def __init__(self, inputs: InputNodes, config: RegistrationConfig, requested: OutputNodes | None = None, *,
                 onProgress: Callable[[dict], None] | None = None,
                 onFinished: Callable[[OutputNodes | None, Exception | None], None] | None = None,
                 show: bool = True, python: str | None = None, onLog: Callable[[str], None] | None = None):
        self.inputs = inputs
        self.onLog = onLog
        self.config = config
        self.requested = requested
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.show = show
        self.python = python
        self.run: BackgroundRegistration | None = None
        self.core: CoreInputs | None = None
        self.outputs: OutputNodes | None = None
        self.error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.run is not None and self.run.done

    @property
    def tempDir(self):
        """The run's temporary folder (``None`` once removed)."""
        return None if self.run is None else self.run.tempDir

    def start(self) -> None:
        checkOutputsAreNotInputs(self.inputs, self.requested)
        self.core = prepareCoreInputs(self.inputs)
        # the run writes the core's images for the subprocess, then releases them (CoreInputs.releaseImages)
        self.run = BackgroundRegistration(self.core, self.config, onProgress=self.onProgress,
                                          onOutputs=self._applyOutputs, onFinished=self._onRunFinished,
                                          python=self.python, onLog=self.onLog)
        self.run.start()

    def startTimer(self) -> None:
        """Poll from a ``qt.QTimer`` (the GUI stays responsive)."""
        self.run.startTimer()

    def cancel(self) -> None:
        if self.run is not None:
            self.run.cancel()

    def poll(self) -> bool:
        """Forward new progress events; when the process has ended, finish the job.  Returns True when done."""
        return self.run is not None and self.run.poll()

    def wait(self, timeoutSeconds: float | None = None, shouldStop: Callable[[], bool] | None = None) -> OutputNodes:
        """Block until the job is done (no Qt needed); raise its error, if any."""
        self.run.wait(timeoutSeconds, shouldStop)
        if self.error is not None:
            raise self.error
        return self.outputs

    def _applyOutputs(self, outputs: CoreOutputs) -> None:
        """Output files -> nodes, while the run's temporary folder exists; an error (the scene left as it was) becomes
        the run's error, reported to :meth:`_onRunFinished`."""
        self.outputs = applyCoreOutputs(outputs, self.core, self.inputs, self.requested, show=self.show)

    def _onRunFinished(self, outputs: CoreOutputs | None, error: Exception | None) -> None:
        """After the temporary folder was removed: the nodes are made (or the error happened) by then."""
        self.error = error
        if self.onFinished is not None:
            self.onFinished(self.outputs, self.error)
