"""DeepAbdominalReg: deep-learning deformable registration of abdominal CT in 3D Slicer.

Only the five template classes live here; the glue is in ``DeepAbdominalRegLib`` and the algorithm in the
Slicer-independent core package ``deepabdominalreg``.
"""

from typing import Annotated, Optional

import qt
import slicer
import vtk
from deepabdominalreg.config import RegistrationConfig, config_from_preset
from DeepAbdominalRegLib.parameters import (
    LOAD_MODEL_LABEL,
    NO_MODEL_LABEL,
    PRESET_NAMES,
    applyPreset,
    configFromParameters,
    modelComboIndex,
    parametersFromConfig,
    presetMatching,
    shippedModelNames,
)
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4

    def _(text):
        return text

    def translate(context, text):
        return text


DEFAULTS = parametersFromConfig(RegistrationConfig())
"""Parameter defaults come from the core's RegistrationConfig: defined once."""


#
# DeepAbdominalReg
#


class DeepAbdominalReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep Abdominal Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepAbdominalReg contributors"]
        self.parent.helpText = _("""
Deformable registration of abdominal CT: affine pre-alignment, an optional deep-learning network, and
instance optimisation, running in the background with progress and Cancel.<br>
Select the <b>fixed</b> and <b>moving</b> volumes (optionally segmentations and corresponding landmarks) and press
<b>Register</b>. Under <i>User masks</i>, a segmentation can mark a region left out of the matching (a lesion seen
in one scan only) or kept rigid (a tumour, a bone). Afterwards the slice views show the fixed volume with the warped
moving volume (fade slider in <i>Display</i>); the Jacobian-determinant map (yellow: folding) and the displacement
magnitude are overlays to choose there, and <i>Show metrics table</i> shows Dice/HD95 before and after, landmark
error, folding, SDlogJ and runtime. The output transform (and its inverse) can be applied to the moving volume, its
segmentations or markups to view them on the fixed volume; a moving volume under it is registered again from its own
geometry.
A new fixed/moving pair gets new output nodes; a rerun of the same pair updates them.<br>
From the Python console: <code>DeepAbdominalReg.DeepAbdominalRegLogic().register(fixedNode, movingNode,
movingSegmentationNode=seg)</code>.<br>
Research software, not for clinical use.
""")
        if getattr(slicer, "app", None) is not None:  # after startup, as the extension template does
            slicer.app.connect("startupCompleted()", registerSampleData)
        self.parent.acknowledgementText = _("""
Methods follow: DDMR, Pérez de Frutos et al. 2023, Learning deep abdominal CT registration through adaptive loss
weighting and synthetic data generation (PLOS ONE 18(2): e0282110); van Eijnatten et al. 2021, 3D deformable
registration of longitudinal abdominopelvic CT images using unsupervised deep learning; MICS, Estienne et al. 2021,
multi-steps, inverse consistency and symmetric deep learning registration network; DLIR, de Vos et al. 2019, A
deep learning framework for unsupervised affine and deformable image registration (Medical Image Analysis 52);
VoxelMorph, Balakrishnan et al. 2019, a learning framework for
deformable medical image registration (IEEE TMI 38). Built on PyTorch, SimpleITK and 3D Slicer.
""")


def registerSampleData() -> None:
    """The phantom pair (CT, organs, landmarks; generated locally) in the Sample Data module, set as this module's
    inputs once loaded."""
    from DeepAbdominalRegLib.sampledata import registerSampleData as register

    register(onLoaded=selectPhantomInputs)


def selectPhantomInputs(phantom) -> None:
    """Make a loaded phantom pair the module's inputs, so that Register can be pressed at once."""
    p = DeepAbdominalRegLogic().getParameterNode()
    with slicer.util.NodeModify(p.parameterNode):
        p.fixedVolume, p.movingVolume = phantom.fixedVolume, phantom.movingVolume
        p.fixedSegmentation, p.movingSegmentation = phantom.fixedSegmentation, phantom.movingSegmentation
        p.fixedLandmarks, p.movingLandmarks = phantom.fixedLandmarks, phantom.movingLandmarks


#
# DeepAbdominalRegParameterNode
#


@parameterNodeWrapper
class DeepAbdominalRegParameterNode:
    """Module state. Below ``preset``, one member per ``RegistrationConfig`` field (camelCase); a test checks that.

    ``model``: '' = no network; ``ioLevels``: '4,2,1'; ``affineLevelsMm``: '12,6'; ``threads``: 0 = torch's default.
    """

    # inputs
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingSegmentation: vtkMRMLSegmentationNode
    fixedSegmentation: vtkMRMLSegmentationNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    # user masks (all segments of the node together): left out of the similarity, or kept rigid
    excludeSegmentation: vtkMRMLSegmentationNode
    movingExcludeSegmentation: vtkMRMLSegmentationNode
    rigidSegmentation: vtkMRMLSegmentationNode
    # outputs (None: created on success)
    warpedVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode
    inverseTransform: vtkMRMLTransformNode
    warpedSegmentation: vtkMRMLSegmentationNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    displacementMagnitudeVolume: vtkMRMLScalarVolumeNode
    metricsTable: vtkMRMLTableNode
    # GUI only
    preset: Annotated[str, Choice(list(PRESET_NAMES))] = "balanced"
    # RegistrationConfig
    huWindow: tuple[float, float] = DEFAULTS["huWindow"]
    workingSpacingMm: Annotated[float, WithinRange(0.5, 10.0)] = DEFAULTS["workingSpacingMm"]
    maxWorkingVoxels: Annotated[int, WithinRange(16, 512)] = DEFAULTS["maxWorkingVoxels"]
    bodyMask: bool = DEFAULTS["bodyMask"]
    affine: bool = DEFAULTS["affine"]
    affineIterations: Annotated[int, WithinRange(0, 1000)] = DEFAULTS["affineIterations"]
    affineLevelsMm: str = DEFAULTS["affineLevelsMm"]
    model: str = DEFAULTS["model"]
    networkPrecision: Annotated[str, Choice(["auto", "fp32", "bf16"])] = DEFAULTS["networkPrecision"]
    ioIterations: Annotated[int, WithinRange(0, 2000)] = DEFAULTS["ioIterations"]
    ioFineIterations: Annotated[int, WithinRange(0, 2000)] = DEFAULTS["ioFineIterations"]
    ioLevels: str = DEFAULTS["ioLevels"]
    ioLearningRateMm: Annotated[float, WithinRange(0.01, 30.0)] = DEFAULTS["ioLearningRateMm"]
    ioControlSpacingMm: Annotated[float, WithinRange(0.5, 60.0)] = DEFAULTS["ioControlSpacingMm"]
    ioNccWindowMm: Annotated[float, WithinRange(1.0, 60.0)] = DEFAULTS["ioNccWindowMm"]
    ioNccNoiseHu: Annotated[float, WithinRange(1.0, 1000.0)] = DEFAULTS["ioNccNoiseHu"]
    ioGradientFloorMm: Annotated[float, WithinRange(0.0, 10.0)] = DEFAULTS["ioGradientFloorMm"]
    ioSmoothnessWeight: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULTS["ioSmoothnessWeight"]
    ioJacobianWeight: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULTS["ioJacobianWeight"]
    ioTransform: Annotated[str, Choice(["bspline", "trilinear", "svf"])] = DEFAULTS["ioTransform"]
    ioBendingWeight: Annotated[float, WithinRange(0.0, 100000.0)] = DEFAULTS["ioBendingWeight"]
    ioRigidityWeight: Annotated[float, WithinRange(0.0, 100000.0)] = DEFAULTS["ioRigidityWeight"]
    ioSymmetric: bool = DEFAULTS["ioSymmetric"]
    ioSimilarity: Annotated[str, Choice(["ncc", "mind"])] = DEFAULTS["ioSimilarity"]
    ioMindRadiusMm: Annotated[float, WithinRange(0.0, 30.0)] = DEFAULTS["ioMindRadiusMm"]
    ioMindDilationMm: Annotated[float, WithinRange(0.1, 30.0)] = DEFAULTS["ioMindDilationMm"]
    affineMaxScale: Annotated[float, WithinRange(1.0, 10.0)] = DEFAULTS["affineMaxScale"]
    affineMaxShear: Annotated[float, WithinRange(0.0, 2.0)] = DEFAULTS["affineMaxShear"]
    initialSearch: bool = DEFAULTS["initialSearch"]
    initialSearchSpacingMm: Annotated[float, WithinRange(1.0, 50.0)] = DEFAULTS["initialSearchSpacingMm"]
    initialSearchRangeMm: Annotated[float, WithinRange(0.0, 2000.0)] = DEFAULTS["initialSearchRangeMm"]
    initialSearchMinOverlap: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULTS["initialSearchMinOverlap"]
    discreteSearch: bool = DEFAULTS["discreteSearch"]
    discreteGridSpacingMm: Annotated[float, WithinRange(1.0, 50.0)] = DEFAULTS["discreteGridSpacingMm"]
    discreteSearchRadiusMm: Annotated[float, WithinRange(1.0, 200.0)] = DEFAULTS["discreteSearchRadiusMm"]
    checkAffineScaleRange: tuple[float, float] = DEFAULTS["checkAffineScaleRange"]
    checkMaxFoldingPercent: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULTS["checkMaxFoldingPercent"]
    checkHuWindow: tuple[float, float] = DEFAULTS["checkHuWindow"]
    checkMinNccGain: Annotated[float, WithinRange(-2.0, 2.0)] = DEFAULTS["checkMinNccGain"]
    checkMinNcc: Annotated[float, WithinRange(-1.0, 1.0)] = DEFAULTS["checkMinNcc"]
    checkMinBodyDice: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULTS["checkMinBodyDice"]
    checkMaxDisplacementFraction: Annotated[float, WithinRange(0.0, 10.0)] = DEFAULTS["checkMaxDisplacementFraction"]
    checkMirrorMargin: Annotated[float, WithinRange(0.0, 2.0)] = DEFAULTS["checkMirrorMargin"]
    checkMaxDiceLoss: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULTS["checkMaxDiceLoss"]
    computeInverse: bool = DEFAULTS["computeInverse"]
    foldingLimitPercent: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULTS["foldingLimitPercent"]
    foldingRetryFactor: Annotated[float, WithinRange(1.0, 100.0)] = DEFAULTS["foldingRetryFactor"]
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = DEFAULTS["device"]
    seed: Annotated[int, WithinRange(0, 2147483647)] = DEFAULTS["seed"]
    threads: Annotated[int, WithinRange(0, 256)] = DEFAULTS["threads"]


#
# DeepAbdominalRegWidget
#


class DeepAbdominalRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._updatingGui = False
        self._installingDependencies = False
        self._loadFromFileChosen = False  # "load from file..." picked, no file chosen yet (modelComboIndex)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepAbdominalReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepAbdominalRegLogic()

        from DeepAbdominalRegLib.display import DEFAULT_OVERLAY_OPACITY, OVERLAYS

        self.ui.modelComboBox.addItems([NO_MODEL_LABEL] + shippedModelNames() + [LOAD_MODEL_LABEL])
        self.ui.presetComboBox.addItems(list(PRESET_NAMES))
        self.ui.overlayComboBox.addItems([label for _key, label in OVERLAYS])
        self.ui.overlayOpacitySlider.value = DEFAULT_OVERLAY_OPACITY
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.presetComboBox.connect("activated(int)", self.onPresetActivated)
        self.ui.modelComboBox.connect("activated(int)", self.onModelSelected)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelSelected)
        self.ui.huWindowMinSpinBox.connect("valueChanged(double)", self.onHuWindowChanged)
        self.ui.huWindowMaxSpinBox.connect("valueChanged(double)", self.onHuWindowChanged)
        self.ui.overlayComboBox.connect("currentIndexChanged(int)", self.onOverlayChanged)
        self.ui.overlayOpacitySlider.connect("valueChanged(double)", self.onOverlayOpacityChanged)
        self.ui.showTableButton.connect("clicked(bool)", self.onShowTableButton)
        qt.QTimer.singleShot(0, self.updateDeviceInfo)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the core package and DeepAbdominalRegLib (each module after its imports), then this module."""
        from DeepAbdominalRegLib.reloading import reloadPackages

        with slicer.util.tryWithErrorDisplay(_("Failed to reload the module.")):
            reloadPackages()
            ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:  # its input and output nodes are going away: stop it, add nothing
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelled: the scene was closed.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume and not self._parameterNode.movingVolume:
            from DeepAbdominalRegLib.nodes import unambiguousInputVolumes

            pair = unambiguousInputVolumes(slicer.mrmlScene)
            if pair is not None:
                self._parameterNode.fixedVolume, self._parameterNode.movingVolume = pair

    # Optional[...], not X | None: Slicer 5.2-5.6 run Python 3.9, where this annotation is evaluated
    def setParameterNode(self, inputParameterNode: Optional[DeepAbdominalRegParameterNode]) -> None:  # noqa: FA100
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # connectParametersToGui, not connectGui: on Slicer 5.8.1 connectGui returns None (wrapper.py
            # _connectGui), so disconnectGui could not remove the bindings and they piled up on every enter.
            bound = {}
            for widget in vars(self.ui).values():
                name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
                if name:
                    bound[name] = widget
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(bound)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.updateGuiFromParameterNode()

    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        """The few widgets that connectGui cannot bind (model, HU window), the preset label, the buttons."""
        p = self._parameterNode
        if p is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            matching = presetMatching(p)
            if p.preset != matching:
                p.preset = matching
            wasBlocked = self.ui.presetComboBox.blockSignals(True)
            self.ui.presetComboBox.currentIndex = PRESET_NAMES.index(matching)
            self.ui.presetComboBox.blockSignals(wasBlocked)
            low, high = p.huWindow
            for spinBox, value in ((self.ui.huWindowMinSpinBox, low), (self.ui.huWindowMaxSpinBox, high)):
                wasBlocked = spinBox.blockSignals(True)
                spinBox.value = value
                spinBox.blockSignals(wasBlocked)
            names = [self.ui.modelComboBox.itemText(i) for i in range(self.ui.modelComboBox.count)]
            loadIndex = names.index(LOAD_MODEL_LABEL)
            index = modelComboIndex(p.model, names, self._loadFromFileChosen)
            if index == loadIndex and p.model and self.ui.modelPathLineEdit.currentPath != p.model:
                wasBlocked = self.ui.modelPathLineEdit.blockSignals(True)
                self.ui.modelPathLineEdit.currentPath = p.model
                self.ui.modelPathLineEdit.blockSignals(wasBlocked)
            self.ui.modelComboBox.currentIndex = index
            self.ui.modelPathLineEdit.enabled = index == loadIndex
            running = self._job is not None
            canRun = bool(p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
            self.ui.applyButton.enabled = canRun and not running and not self._installingDependencies
            self.ui.applyButton.toolTip = _("Run the registration in the background.") if canRun else _(
                "Select two different volumes: fixed and moving."
            )
            self.ui.cancelButton.enabled = running
            self.ui.showTableButton.enabled = p.metricsTable is not None
            self.ui.inverseTransformSelector.enabled = p.computeInverse
            self.ui.ioRigidityWeightSpinBox.enabled = p.rigidSegmentation is not None  # unused without the mask
        finally:
            self._updatingGui = False

    def updateDeviceInfo(self) -> None:
        """PyTorch's version from its metadata: torch is not imported here (no CUDA start-up in the GUI thread);
        the run reports its device with the result."""
        from DeepAbdominalRegLib.dependencies import describeDevices

        self.ui.deviceInfoLabel.text = describeDevices()

    def onPresetActivated(self, index: int) -> None:
        if self._parameterNode is None:
            return
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            applyPreset(self._parameterNode, self.ui.presetComboBox.itemText(index))
        self.updateGuiFromParameterNode()  # "custom" picked with nothing changed: show the matching preset again

    def onModelSelected(self, *args) -> None:
        if self._parameterNode is None or self._updatingGui:
            return
        text = self.ui.modelComboBox.currentText
        self._loadFromFileChosen = text == LOAD_MODEL_LABEL
        if text == NO_MODEL_LABEL:
            self._parameterNode.model = ""
        elif text == LOAD_MODEL_LABEL:
            self.ui.modelPathLineEdit.enabled = True
            self._parameterNode.model = self.ui.modelPathLineEdit.currentPath
        else:
            self._parameterNode.model = text

    def onHuWindowChanged(self, value=None) -> None:
        if self._parameterNode is not None and not self._updatingGui:
            self._parameterNode.huWindow = (self.ui.huWindowMinSpinBox.value, self.ui.huWindowMaxSpinBox.value)

    def onApplyButton(self) -> None:
        from DeepAbdominalRegLib.dependencies import INSTALLING_TEXT, ensureDependencies, isInstalling

        if self._job is not None or isInstalling():
            return  # a click delivered while pip's output pumps Qt events: never a second install or run

        def showStatus(text: str) -> None:
            self.ui.statusLabel.text = _("Installing PyTorch and dependencies…") if text == INSTALLING_TEXT else text

        self._installingDependencies = True  # Register stays disabled (updateGuiFromParameterNode)
        self.updateGuiFromParameterNode()
        try:
            with slicer.util.tryWithErrorDisplay(_("Registration could not start.")):
                ensureDependencies(askConfirmation=True, onStatus=showStatus)
        finally:
            self._installingDependencies = False
            self.updateGuiFromParameterNode()
            self.updateDeviceInfo()
        with slicer.util.tryWithErrorDisplay(_("Registration could not start."), waitCursor=True):
            from DeepAbdominalRegLib.task import ownTransformNotes

            self.ui.logTextEdit.clear()
            self._job = self.logic.registerUsingParameterNode(
                self._parameterNode, waitForCompletion=False, onProgress=self.onProgress, onFinished=self.onFinished,
                onLog=self.onLog,
            )
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "\n".join([_("Starting...")] + ownTransformNotes(self._job.inputs))
        self.updateGuiFromParameterNode()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self.ui.statusLabel.text = _("Cancelling...")
            self._job.cancel()

    def onLog(self, line: str) -> None:
        """A line the run printed (called from the job's QTimer, in the GUI thread)."""
        self.ui.logTextEdit.appendPlainText(line)

    def _outputNodes(self):
        p = self._parameterNode
        return (p.warpedVolume, p.jacobianVolume, p.displacementMagnitudeVolume) if p else (None, None, None)

    def onOverlayChanged(self, index: int = -1) -> None:
        """Show the chosen overlay (display.OVERLAYS) of the last run over the fixed volume."""
        from DeepAbdominalRegLib import display

        p = self._parameterNode
        if p is None or p.fixedVolume is None or self.ui.overlayComboBox.currentIndex < 0:
            return
        warped, jacobian, magnitude = self._outputNodes()
        display.showRegistrationResult(slicer.mrmlScene, p.fixedVolume, warped, jacobian, magnitude,
                                       overlay=display.OVERLAY_KEYS[self.ui.overlayComboBox.currentIndex],
                                       opacity=self.ui.overlayOpacitySlider.value)

    def onOverlayOpacityChanged(self, value: float) -> None:
        from DeepAbdominalRegLib.display import setOverlayOpacity

        setOverlayOpacity(slicer.mrmlScene, value)

    def onShowTableButton(self) -> None:
        from DeepAbdominalRegLib.display import showTableInLayout

        if self._parameterNode is not None and self._parameterNode.metricsTable is not None:
            showTableInLayout(self._parameterNode.metricsTable)

    def onProgress(self, event: dict) -> None:
        self.ui.progressBar.value = round(100 * float(event.get("fraction", 0.0)))
        self.ui.statusLabel.text = f"{event.get('stage', '')}: {event.get('message', '')}"

    def onFinished(self, outputs, error) -> None:
        from DeepAbdominalRegLib.process import RegistrationCancelledByUser

        self._job = None
        if isinstance(error, RegistrationCancelledByUser):
            self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene.")
            self.ui.progressBar.value = 0
        elif error is not None:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
            slicer.util.errorDisplay(_("Registration failed: {error}").format(error=error))
        else:
            self.logic.storeOutputsInParameterNode(self._parameterNode or self.logic.getParameterNode(), outputs)
            self.onOverlayChanged()  # the overlay and fade the user had chosen (the run shows warped at 0.5)
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = self.logic.summary(outputs.metrics)
            if outputs.metrics.get("status") == "suspect":
                slicer.util.warningDisplay(self.ui.statusLabel.text, windowTitle=_("Registration result is suspect"))
        self.updateGuiFromParameterNode()


#
# DeepAbdominalRegLogic
#


class DeepAbdominalRegLogic(ScriptedLoadableModuleLogic):
    """Registration from the GUI, the Python console or scripts; results become MRML nodes.

    ``register`` runs in this process and blocks (console, tests); ``registerInBackground`` runs
    ``PythonSlicer -m deepabdominalreg register`` in a subprocess (``DeepAbdominalRegLib.process``).  Both turn
    the result into nodes with ``DeepAbdominalRegLib.task``.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepAbdominalRegParameterNode(super().getParameterNode())

    @staticmethod
    def _inputs(fixedVolumeNode, movingVolumeNode, movingSegmentationNode, fixedSegmentationNode,
                fixedLandmarksNode, movingLandmarksNode, excludeSegmentationNode=None,
                movingExcludeSegmentationNode=None, rigidSegmentationNode=None):
        from DeepAbdominalRegLib.task import InputNodes

        return InputNodes(fixedVolumeNode, movingVolumeNode, movingSegmentationNode, fixedSegmentationNode,
                          fixedLandmarksNode, movingLandmarksNode, excludeSegmentation=excludeSegmentationNode,
                          movingExcludeSegmentation=movingExcludeSegmentationNode,
                          rigidSegmentation=rigidSegmentationNode)

    @staticmethod
    def _config(config, preset, overrides) -> RegistrationConfig:
        if config is None:
            return config_from_preset(preset or "balanced", **overrides)
        return config.replace(**overrides) if overrides else config

    def register(self, fixedVolumeNode, movingVolumeNode, *, movingSegmentationNode=None, fixedSegmentationNode=None,
                 fixedLandmarksNode=None, movingLandmarksNode=None, excludeSegmentationNode=None,
                 movingExcludeSegmentationNode=None, rigidSegmentationNode=None, config=None, preset=None,
                 outputs=None, progress=None, shouldStop=None, show=True, **overrides):
        """Register in this process (blocking); returns ``DeepAbdominalRegLib.task.OutputNodes``.

        ``config``: a ``RegistrationConfig``, or ``preset`` ('fast', 'balanced', 'network', 'accurate') plus keyword
        overrides of its fields (e.g. ``io_iterations=50``).  ``outputs``: an ``OutputNodes`` of existing nodes to
        fill (``None`` members are created).  ``progress(event)`` and ``shouldStop() -> bool`` as in the core.
        User masks (segmentation nodes, all segments together): ``excludeSegmentationNode`` (fixed) and
        ``movingExcludeSegmentationNode`` (moving) are left out of the similarity; ``rigidSegmentationNode`` (fixed)
        is kept rigid (``io_rigidity_weight``).  Raises on failure or cancel, leaving the scene unchanged.
        """
        from DeepAbdominalRegLib.dependencies import ensureDependencies
        from DeepAbdominalRegLib.task import registerBlocking

        ensureDependencies(askConfirmation=True)
        inputs = self._inputs(fixedVolumeNode, movingVolumeNode, movingSegmentationNode, fixedSegmentationNode,
                              fixedLandmarksNode, movingLandmarksNode, excludeSegmentationNode,
                              movingExcludeSegmentationNode, rigidSegmentationNode)
        return registerBlocking(inputs, self._config(config, preset, overrides), outputs,
                                progress=progress, shouldStop=shouldStop, show=show)

    def registerInBackground(self, fixedVolumeNode, movingVolumeNode, *, movingSegmentationNode=None,
                             fixedSegmentationNode=None, fixedLandmarksNode=None, movingLandmarksNode=None,
                             excludeSegmentationNode=None, movingExcludeSegmentationNode=None,
                             rigidSegmentationNode=None, config=None, preset=None, outputs=None, onProgress=None,
                             onFinished=None, onLog=None, waitForCompletion=False, show=True, **overrides):
        """Register in a ``PythonSlicer`` subprocess; returns the running ``RegistrationJob`` (call ``cancel()``
        to stop it), or its ``OutputNodes`` when ``waitForCompletion``.  ``onLog(line)`` receives each line the
        run prints (progress events go to ``onProgress``).  Inputs and user masks as in :meth:`register`."""
        from DeepAbdominalRegLib.dependencies import ensureDependencies
        from DeepAbdominalRegLib.task import RegistrationJob

        ensureDependencies(askConfirmation=True)  # the subprocess uses Slicer's Python and its packages
        inputs = self._inputs(fixedVolumeNode, movingVolumeNode, movingSegmentationNode, fixedSegmentationNode,
                              fixedLandmarksNode, movingLandmarksNode, excludeSegmentationNode,
                              movingExcludeSegmentationNode, rigidSegmentationNode)
        job = RegistrationJob(inputs, self._config(config, preset, overrides), outputs,
                              onProgress=onProgress, onFinished=onFinished, show=show, onLog=onLog)
        job.start()
        if waitForCompletion:
            return job.wait()
        job.startTimer()
        return job

    def registerUsingParameterNode(self, parameterNode, waitForCompletion=False, **kwargs):
        """Register the parameter node's inputs; its remembered outputs are updated only for the same fixed/moving
        pair (``task.outputsForPair``): a new pair gets new nodes named after it."""
        from DeepAbdominalRegLib.task import OutputNodes, outputsForPair

        p = parameterNode
        outputs = outputsForPair(
            OutputNodes(p.warpedVolume, p.outputTransform, p.inverseTransform if p.computeInverse else None,
                        p.warpedSegmentation, p.jacobianVolume, p.displacementMagnitudeVolume, p.metricsTable),
            p.fixedVolume, p.movingVolume,
        )
        return self.registerInBackground(
            p.fixedVolume, p.movingVolume, movingSegmentationNode=p.movingSegmentation,
            fixedSegmentationNode=p.fixedSegmentation, fixedLandmarksNode=p.fixedLandmarks,
            movingLandmarksNode=p.movingLandmarks, excludeSegmentationNode=p.excludeSegmentation,
            movingExcludeSegmentationNode=p.movingExcludeSegmentation, rigidSegmentationNode=p.rigidSegmentation,
            config=configFromParameters(p), outputs=outputs,
            waitForCompletion=waitForCompletion, **kwargs,
        )

    @staticmethod
    def storeOutputsInParameterNode(parameterNode, outputs) -> None:
        """Remember created output nodes so that the next run updates them."""
        with slicer.util.NodeModify(parameterNode.parameterNode):
            for name in ("warpedVolume", "outputTransform", "inverseTransform", "warpedSegmentation",
                         "jacobianVolume", "displacementMagnitudeVolume", "metricsTable"):
                node = getattr(outputs, name)
                if node is not None:
                    setattr(parameterNode, name, node)

    @staticmethod
    def summary(metrics: dict) -> str:
        text = _("Done in {seconds:.1f} s on {device}.").format(
            seconds=float(metrics.get("runtime_s", 0.0)), device=metrics.get("device", "?"))
        if metrics.get("dice_mean_after") is not None and metrics.get("dice_mean_before") is not None:
            text += " " + _("Mean Dice {before:.3f} -> {after:.3f}.").format(
                before=float(metrics["dice_mean_before"]), after=float(metrics["dice_mean_after"]))
        if metrics.get("folding_percent") is not None:
            text += " " + _("Folding {folding:.3f} %.").format(folding=float(metrics["folding_percent"]))
        for warning in metrics.get("warnings") or []:
            text += "\n" + _("Warning: {warning}").format(warning=warning)
        if metrics.get("status") == "suspect":
            reasons = "; ".join(str(reason) for reason in metrics.get("suspect_reasons") or []) or _("no reason given")
            text = _("SUSPECT RESULT, check the alignment before using it: {reasons}").format(reasons=reasons) + \
                "\n" + text
        return text


#
# DeepAbdominalRegTest
#


class DeepAbdominalRegTest(ScriptedLoadableModuleTest):
    """Registers the core's synthetic phantom pair (5 mm, fast preset) in-process and in the background."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from DeepAbdominalRegLib.dependencies import unsatisfiedText

        reason = unsatisfiedText()
        if reason:
            # "Reload and Test" and the SelfTests module call runTest outside unittest, where skipTest would show as
            # a failure: say why and return. CTest runs the test_ methods, which skip (_phantomNodes).
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_RegisterPhantomInProcess()
        self.setUp()
        self.test_RegisterPhantomInBackground()
        self.setUp()
        self.test_FailureLeavesSceneUnchanged()

    def _phantomNodes(self):
        from DeepAbdominalRegLib.dependencies import unsatisfiedText

        reason = unsatisfiedText()
        if reason:
            # never installs in a test; slicer.testing.runUnitTest's TextTestRunner reports a skip and CTest passes
            self.skipTest(reason)
        from DeepAbdominalRegLib.testing import phantomNodes

        return phantomNodes(slicer.mrmlScene, spacingMm=5.0)

    def _checkOutputs(self, outputs, phantom):
        metrics = outputs.metrics
        self.assertGreater(metrics["dice_mean_after"], metrics["dice_mean_before"])
        for node in (outputs.warpedVolume, outputs.outputTransform, outputs.warpedSegmentation,
                     outputs.jacobianVolume, outputs.displacementMagnitudeVolume, outputs.metricsTable):
            self.assertIsNotNone(node)
            self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(node.GetID()))
        self.assertEqual(outputs.outputTransform.GetNodeReferenceID("fixedVolume"), phantom.fixedVolume.GetID())
        self.assertEqual(outputs.outputTransform.GetNodeReferenceID("movingVolume"), phantom.movingVolume.GetID())
        self.assertEqual(outputs.warpedSegmentation.GetSegmentation().GetNumberOfSegments(),
                         phantom.movingSegmentation.GetSegmentation().GetNumberOfSegments())
        self.assertGreater(outputs.metricsTable.GetNumberOfRows(), 0)

    def test_RegisterPhantomInProcess(self):
        self.delayDisplay("Registering the phantom pair in-process")
        phantom = self._phantomNodes()
        logic = DeepAbdominalRegLogic()
        outputs = logic.register(
            phantom.fixedVolume, phantom.movingVolume, movingSegmentationNode=phantom.movingSegmentation,
            fixedSegmentationNode=phantom.fixedSegmentation, fixedLandmarksNode=phantom.fixedLandmarks,
            movingLandmarksNode=phantom.movingLandmarks, preset="fast", working_spacing_mm=5.0, device="cpu",
        )
        self._checkOutputs(outputs, phantom)
        self.delayDisplay(DeepAbdominalRegLogic.summary(outputs.metrics))

    def test_RegisterPhantomInBackground(self):
        self.delayDisplay("Registering the phantom pair in a PythonSlicer subprocess")
        phantom = self._phantomNodes()
        outputs = DeepAbdominalRegLogic().registerInBackground(
            phantom.fixedVolume, phantom.movingVolume, movingSegmentationNode=phantom.movingSegmentation,
            fixedSegmentationNode=phantom.fixedSegmentation, preset="fast", working_spacing_mm=5.0, device="cpu",
            waitForCompletion=True,
        )
        self._checkOutputs(outputs, phantom)

    def test_FailureLeavesSceneUnchanged(self):
        self.delayDisplay("A cancelled run adds nothing to the scene")
        from DeepAbdominalRegLib.process import RegistrationCancelledByUser

        phantom = self._phantomNodes()
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(RegistrationCancelledByUser):
            DeepAbdominalRegLogic().register(phantom.fixedVolume, phantom.movingVolume, preset="fast",
                                             working_spacing_mm=5.0, device="cpu", shouldStop=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Test passed")
