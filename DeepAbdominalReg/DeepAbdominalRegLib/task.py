"""Running a registration from Slicer: MRML inputs -> core -> MRML outputs, blocking or in the background.

Two ways to run, one way to turn results into nodes:

* :func:`registerBlocking` runs :func:`deepabdominalreg.registration.register_pair` in this process (Python
  console, scripts, tests), with ``progress``/``shouldStop`` callables.
* :class:`RegistrationJob` runs ``PythonSlicer -m deepabdominalreg register ... --progress-json`` in a subprocess
  (the GUI): a reader thread queues the JSON-lines progress events, :meth:`RegistrationJob.poll` (driven by a
  ``qt.QTimer`` in the GUI, or by :meth:`RegistrationJob.wait`) forwards them; :meth:`RegistrationJob.cancel`
  kills the whole process tree; the temporary folder is removed in ``finally``.  A CUDA out-of-memory error or a
  crash ends the subprocess, not Slicer.

Both end in :func:`applyCoreOutputs`, which creates output nodes only from a complete result and removes every
node it added if anything fails, so the scene is left as it was.  Inputs are never modified.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from deepabdominalreg.config import PRESETS, RegistrationConfig, config_from_preset

from DeepAbdominalRegLib import display, nodes

logger = logging.getLogger(__name__)

__all__ = [
    "CoreInputs",
    "CoreOutputs",
    "InputNodes",
    "OutputNodes",
    "RegistrationCancelledByUser",
    "RegistrationFailed",
    "RegistrationJob",
    "RegistrationProcess",
    "applyCoreOutputs",
    "checkOutputsAreNotInputs",
    "cliArguments",
    "prepareCoreInputs",
    "registerBlocking",
]

MODULE_DIRECTORY = Path(__file__).resolve().parent.parent
"""The scripted module's folder; the core package ``deepabdominalreg`` lives in it."""


class RegistrationFailed(RuntimeError):
    """The registration did not produce a result; the message is meant for the user."""


class RegistrationCancelledByUser(RegistrationFailed):
    """The user cancelled; nothing was added to the scene."""


# ----------------------------------------------------------------------------------------------------------------
# what goes in and out
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class InputNodes:
    fixedVolume: object
    movingVolume: object
    movingSegmentation: object | None = None
    fixedSegmentation: object | None = None
    fixedLandmarks: object | None = None
    movingLandmarks: object | None = None


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


@dataclass
class CoreInputs:
    """The MRML inputs converted for the core (SimpleITK images in LPS, landmark arrays in LPS mm)."""

    fixed: sitk.Image
    moving: sitk.Image
    movingLabels: sitk.Image | None = None
    fixedLabels: sitk.Image | None = None
    fixedLandmarksLps: np.ndarray | None = None
    movingLandmarksLps: np.ndarray | None = None
    labelNames: dict[int, str] = field(default_factory=dict)
    movingSegments: list[nodes.SegmentInfo] = field(default_factory=list)

    def registerPairArguments(self) -> dict:
        return {
            "moving_labels": self.movingLabels,
            "fixed_labels": self.fixedLabels,
            "fixed_landmarks_lps": self.fixedLandmarksLps,
            "moving_landmarks_lps": self.movingLandmarksLps,
            "label_names": dict(self.labelNames) or None,
        }


@dataclass
class CoreOutputs:
    """What the MRML side needs from a registration result (see ``RegistrationResult`` for conventions)."""

    warpedImage: sitk.Image
    displacementLps: sitk.Image
    jacobian: sitk.Image
    displacementMagnitude: sitk.Image
    metrics: dict
    inverseDisplacementLps: sitk.Image | None = None
    warpedLabels: sitk.Image | None = None

    @classmethod
    def fromResult(cls, result) -> CoreOutputs:
        return cls(
            warpedImage=result.warped_image,
            displacementLps=result.displacement_lps,
            jacobian=result.jacobian,
            displacementMagnitude=result.displacement_magnitude,
            metrics=dict(result.metrics),
            inverseDisplacementLps=result.inverse_displacement_lps,
            warpedLabels=result.warped_labels,
        )

    @classmethod
    def fromDirectory(cls, folder: str | os.PathLike) -> CoreOutputs:
        """Read what ``deepabdominalreg register --output-dir folder`` wrote."""
        from deepabdominalreg.io import IMAGE_FORMATS, read_displacement_field

        folder = Path(folder)

        def optional(stem):
            """The file ``stem.EXT`` the command wrote, whatever its ``--output-format``."""
            return next((folder / f"{stem}.{ext}" for ext in IMAGE_FORMATS if (folder / f"{stem}.{ext}").exists()),
                        None)

        found = {stem: optional(stem) for stem in ("warped", "displacement", "jacobian", "displacement_magnitude")}
        missing = [f"{stem}.*" for stem, path in found.items() if path is None]
        missing += [] if (folder / "metrics.json").exists() else ["metrics.json"]
        if missing:
            raise RegistrationFailed(f"the registration process ended without writing {', '.join(missing)}.")
        inverse = optional("inverse_displacement")
        labels = optional("warped_seg")
        return cls(
            warpedImage=sitk.ReadImage(str(found["warped"])),
            displacementLps=read_displacement_field(found["displacement"]),
            jacobian=sitk.ReadImage(str(found["jacobian"])),
            displacementMagnitude=sitk.ReadImage(str(found["displacement_magnitude"])),
            metrics=json.loads((folder / "metrics.json").read_text()),
            inverseDisplacementLps=read_displacement_field(inverse) if inverse else None,
            warpedLabels=sitk.ReadImage(str(labels)) if labels else None,
        )


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
    return core


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

    If anything fails, every node added to the scene since the call is removed again and the error re-raised.
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
        nodes.updateVolumeNodeFromImage(result.warpedVolume, outputs.warpedImage)
        _copyWindowLevel(inputs.movingVolume, result.warpedVolume)

        result.outputTransform = outputNode(
            requested.outputTransform, "vtkMRMLGridTransformNode", f"{movingName} to {fixedName} (deformable)"
        )
        nodes.updateTransformNodeFromDisplacement(
            result.outputTransform, outputs.displacementLps, inputs.fixedVolume, inputs.movingVolume
        )
        if outputs.inverseDisplacementLps is not None:
            result.inverseTransform = outputNode(
                requested.inverseTransform, "vtkMRMLGridTransformNode", f"{fixedName} to {movingName} (inverse)"
            )
            nodes.updateTransformNodeFromDisplacement(
                result.inverseTransform, outputs.inverseDisplacementLps, inputs.fixedVolume, inputs.movingVolume,
                usage="Apply to the fixed volume (or its segmentation/markups) to align it with the moving volume.",
            )

        if outputs.warpedLabels is not None and core.movingSegments:
            sourceName = inputs.movingSegmentation.GetName() if inputs.movingSegmentation else movingName
            result.warpedSegmentation = outputNode(
                requested.warpedSegmentation, "vtkMRMLSegmentationNode", f"{sourceName} warped"
            )
            nodes.updateSegmentationNodeFromLabelImage(
                result.warpedSegmentation, outputs.warpedLabels, core.movingSegments,
                sourceSegmentationNode=inputs.movingSegmentation, referenceVolumeNode=inputs.fixedVolume,
            )

        result.jacobianVolume = outputNode(
            requested.jacobianVolume, "vtkMRMLScalarVolumeNode", f"{movingName} Jacobian determinant"
        )
        nodes.updateVolumeNodeFromImage(result.jacobianVolume, outputs.jacobian)
        display.showJacobian(result.jacobianVolume)

        result.displacementMagnitudeVolume = outputNode(
            requested.displacementMagnitudeVolume, "vtkMRMLScalarVolumeNode", f"{movingName} displacement (mm)"
        )
        nodes.updateVolumeNodeFromImage(result.displacementMagnitudeVolume, outputs.displacementMagnitude)
        display.showDisplacementMagnitude(result.displacementMagnitudeVolume)

        result.metricsTable = outputNode(
            requested.metricsTable, "vtkMRMLTableNode", f"{movingName} to {fixedName} metrics"
        )
        display.updateMetricsTable(result.metricsTable, outputs.metrics)

        if show:
            display.showOverlay(scene, inputs.fixedVolume, result.jacobianVolume, opacity=0.4)
            display.showTableInLayout(result.metricsTable)
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
# background subprocess
# ----------------------------------------------------------------------------------------------------------------

_FLAG_FIELDS = ("device", "seed", "model", "affine", "body_mask", "io_iterations", "working_spacing_mm", "threads",
                "compute_inverse", "network_precision")
"""Config fields the ``register`` command line sets with a flag; the other fields come from ``--preset``."""


def _flagOverrides(config: RegistrationConfig) -> dict:
    return {name: getattr(config, name) for name in _FLAG_FIELDS}


def cliArguments(config: RegistrationConfig, configPath: str | os.PathLike | None = None) -> list[str]:
    """``deepabdominalreg register`` options that reproduce ``config`` exactly.

    Uses the preset whose other fields match; if none does, the full config goes through ``--config configPath``
    (written by the caller), or ``ValueError`` is raised when no ``configPath`` is given.
    """
    overrides = _flagOverrides(config)
    preset = next((p for p in PRESETS if config_from_preset(p, **overrides) == config), None)
    args = ["--preset", preset or "balanced", "--device", config.device, "--seed", str(config.seed)]
    if config.model:
        args += ["--model", str(config.model)]
    if not config.affine:
        args.append("--no-affine")
    if not config.body_mask:
        args.append("--no-body-mask")
    args += ["--io-iterations", str(config.io_iterations), "--working-spacing", repr(float(config.working_spacing_mm))]
    if config.threads:
        args += ["--threads", str(config.threads)]
    if not config.compute_inverse:
        args.append("--no-inverse")
    args += ["--network-precision", config.network_precision]  # always: a preset may set either
    if preset is None:
        if configPath is None:
            raise ValueError("these settings differ from every preset in fields the command line cannot set; "
                             "a --config file is needed.")
        args += ["--config", str(configPath)]
    return args


def configToJson(config: RegistrationConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def pythonExecutable() -> str:
    """Slicer's ``PythonSlicer`` launcher when running in Slicer, else this interpreter."""
    found = shutil.which("PythonSlicer", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return found or sys.executable


def writeCoreInputs(core: CoreInputs, folder: Path) -> dict[str, Path]:
    """Write the converted inputs for the command line (uncompressed NRRD, CSV landmarks in LPS, labels.json)."""
    from deepabdominalreg.io import write_landmarks

    paths = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nrrd"}
    sitk.WriteImage(core.fixed, str(paths["fixed"]), False)
    sitk.WriteImage(core.moving, str(paths["moving"]), False)
    if core.movingLabels is not None:
        paths["moving_seg"] = folder / "moving_seg.nrrd"
        sitk.WriteImage(core.movingLabels, str(paths["moving_seg"]), False)
    if core.fixedLabels is not None:
        paths["fixed_seg"] = folder / "fixed_seg.nrrd"
        sitk.WriteImage(core.fixedLabels, str(paths["fixed_seg"]), False)
    if core.labelNames:
        paths["label_names"] = folder / "labels.json"
        paths["label_names"].write_text(json.dumps({str(k): v for k, v in core.labelNames.items()}))
    if core.fixedLandmarksLps is not None:
        paths["fixed_landmarks"] = write_landmarks(core.fixedLandmarksLps, folder / "fixed_landmarks.csv")
        paths["moving_landmarks"] = write_landmarks(core.movingLandmarksLps, folder / "moving_landmarks.csv")
    return paths


def registerCommand(paths: dict[str, Path], outputDir: Path, config: RegistrationConfig,
                    configPath: Path | None = None, python: str | None = None) -> list[str]:
    command = [python or pythonExecutable(), "-m", "deepabdominalreg", "register",
               "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--output-dir", str(outputDir)]
    for key, flag in (("moving_seg", "--moving-seg"), ("fixed_seg", "--fixed-seg"), ("label_names", "--label-names"),
                      ("fixed_landmarks", "--fixed-landmarks"), ("moving_landmarks", "--moving-landmarks")):
        if key in paths:
            command += [flag, str(paths[key])]
    # the outputs are read back into MRML nodes at once: uncompressed NRRD (exact, no gzip time)
    return command + cliArguments(config, configPath) + ["--no-report", "--progress-json", "--output-format", "nrrd"]


class RegistrationProcess:
    """A command run in the background whose stdout carries JSON-lines progress events.

    No Qt here: :meth:`poll` returns the events received so far; call it from a ``qt.QTimer`` (GUI) or a loop.
    The process runs in its own process group (POSIX session / Windows process group) so that :meth:`cancel`
    ends the launcher and the Python it started.
    """

    def __init__(self, command: list[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.command = command
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.cancelled = False
        self._events: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=200)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        logger.debug("DeepAbdominalReg: launching %s", " ".join(self.command))
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=self.env, cwd=self.cwd, **kwargs,
        )
        for stream, handler in ((self.proc.stdout, self._onStdout), (self.proc.stderr, self._onStderr)):
            thread = threading.Thread(target=self._read, args=(stream, handler), daemon=True)
            thread.start()
            self._threads.append(thread)

    @staticmethod
    def _read(stream, handler) -> None:
        for line in iter(stream.readline, ""):
            handler(line.rstrip("\r\n"))
        stream.close()

    def _onStdout(self, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if isinstance(event, dict) and "stage" in event:
            self._events.put(event)
        elif line.strip():
            logger.info("[deepabdominalreg] %s", line)

    def _onStderr(self, line: str) -> None:
        self._stderr.append(line)
        if line.strip():
            logger.info("[deepabdominalreg] %s", line)

    def poll(self) -> list[dict]:
        """Progress events received since the last call (``{"stage", "fraction", "message"}`` dicts)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def isRunning(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def finished(self) -> bool:
        """True once the process ended and all of its output was read."""
        return self.proc is not None and self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def errorMessage(self) -> str:
        """The user-facing reason of a failure, from the command's stderr."""
        lines = [line for line in self._stderr if line.strip()]
        for line in reversed(lines):
            if line.startswith("error: "):
                return line[len("error: "):]
        tail = "\n".join(lines[-8:])
        return f"the registration process ended with code {self.returncode}" + (f":\n{tail}" if tail else ".")

    def cancel(self, graceSeconds: float = 3.0) -> None:
        """Stop the process and everything it started (idempotent)."""
        self.cancelled = True
        if not self.isRunning():
            return
        pid = self.proc.pid
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            else:
                os.killpg(pid, signal.SIGTERM)
                try:
                    self.proc.wait(graceSeconds)
                except subprocess.TimeoutExpired:
                    pass
                os.killpg(pid, signal.SIGKILL)  # whatever of the group is left (a child ignoring SIGTERM...)
        except (ProcessLookupError, PermissionError, OSError) as exc:  # the group is already gone
            logger.debug("DeepAbdominalReg: while stopping process %s: %s", pid, exc)
        try:
            self.proc.wait(graceSeconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for thread in self._threads:  # the pipes close once every process holding them is gone
            thread.join(graceSeconds)


def _subprocessEnvironment() -> dict[str, str]:
    """Environment for ``PythonSlicer``: Slicer's startup environment when available, the module folder on
    ``PYTHONPATH`` (the working directory is the module folder too, which ``-m`` puts on ``sys.path``)."""
    env = None
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            env = dict(slicer.util.startupEnvironment())
    except Exception:  # noqa: BLE001  (outside the Slicer application)
        env = None
    env = dict(os.environ) if env is None else env
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MODULE_DIRECTORY), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class RegistrationJob:
    """One background registration: inputs -> temporary files -> subprocess -> output nodes.

    ``onProgress(event: dict)`` gets each progress event; ``onFinished(outputs: OutputNodes | None,
    error: Exception | None)`` is called once.  :meth:`start` converts and writes the inputs (errors raise
    immediately) and launches the process; drive it with :meth:`startTimer` (GUI, Qt timer) or :meth:`wait`.
    The temporary folder is removed whatever happens.
    """

    POLL_INTERVAL_MS = 200

    def __init__(self, inputs: InputNodes, config: RegistrationConfig, requested: OutputNodes | None = None, *,
                 onProgress: Callable[[dict], None] | None = None,
                 onFinished: Callable[[OutputNodes | None, Exception | None], None] | None = None,
                 show: bool = True, python: str | None = None):
        self.inputs = inputs
        self.config = config
        self.requested = requested
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.show = show
        self.python = python
        self.process: RegistrationProcess | None = None
        self.tempDir: Path | None = None
        self.core: CoreInputs | None = None
        self.outputs: OutputNodes | None = None
        self.error: Exception | None = None
        self.done = False
        self._timer = None

    def start(self) -> None:
        checkOutputsAreNotInputs(self.inputs, self.requested)
        self.core = prepareCoreInputs(self.inputs)
        self.tempDir = Path(tempfile.mkdtemp(prefix="DeepAbdominalReg-", dir=_temporaryRoot()))
        try:
            inputDir = self.tempDir / "input"
            inputDir.mkdir()
            paths = writeCoreInputs(self.core, inputDir)
            configPath = None
            try:
                cliArguments(self.config)
            except ValueError:
                configPath = inputDir / "config.json"
                configPath.write_text(json.dumps(configToJson(self.config), indent=2))
            command = registerCommand(paths, self.tempDir / "output", self.config, configPath, self.python)
            self.process = RegistrationProcess(command, env=_subprocessEnvironment(), cwd=str(MODULE_DIRECTORY))
            self.process.start()
        except BaseException:
            self._cleanup()
            raise

    def startTimer(self) -> None:
        """Poll from a ``qt.QTimer`` (the GUI stays responsive)."""
        import qt

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.poll)
        self._timer.start()

    def cancel(self) -> None:
        if self.process is not None:
            self.process.cancel()
        self.poll()

    def poll(self) -> bool:
        """Forward new progress events; when the process has ended, finish the job.  Returns True when done."""
        if self.done:
            return True
        if self.process is None:
            return False
        for event in self.process.poll():
            if self.onProgress is not None and event.get("stage") != "finished":
                self.onProgress(event)
        if not self.process.finished():
            return False
        self._finish()
        return True

    def wait(self, timeoutSeconds: float | None = None, shouldStop: Callable[[], bool] | None = None) -> OutputNodes:
        """Block until the job is done (no Qt needed); raise its error, if any."""
        deadline = None if timeoutSeconds is None else time.monotonic() + timeoutSeconds
        while not self.poll():
            if (shouldStop is not None and shouldStop()) or (deadline is not None and time.monotonic() > deadline):
                self.cancel()
            time.sleep(self.POLL_INTERVAL_MS / 1000.0)
        if self.error is not None:
            raise self.error
        return self.outputs

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        try:
            if self.process.cancelled:
                raise RegistrationCancelledByUser("registration cancelled; nothing was added to the scene.")
            if self.process.returncode != 0:
                raise RegistrationFailed(self.process.errorMessage())
            outputs = CoreOutputs.fromDirectory(self.tempDir / "output")
            self.outputs = applyCoreOutputs(outputs, self.core, self.inputs, self.requested, show=self.show)
        except Exception as exc:  # noqa: BLE001  (any failure is reported to onFinished, nothing is left behind)
            self.error = exc
        finally:
            self.done = True
            self._cleanup()
        if self.onFinished is not None:
            self.onFinished(self.outputs, self.error)

    def _cleanup(self) -> None:
        if self.tempDir is not None:
            shutil.rmtree(self.tempDir, ignore_errors=True)
            self.tempDir = None


def _temporaryRoot() -> str | None:
    try:
        import slicer

        return slicer.app.temporaryPath
    except Exception:  # noqa: BLE001  (outside the Slicer application)
        return None
