"""The background run: ``PythonSlicer -m deepabdominalreg register`` in a subprocess, after SlicerMONAIAuto3DSeg.

Nothing here touches the scene.  The MRML side (:mod:`DeepAbdominalRegLib.task`) converts the input nodes into
:class:`CoreInputs` and turns :class:`CoreOutputs` into nodes; in between, for a background run:

* :class:`BackgroundRegistration` writes the inputs to a temporary folder (uncompressed NRRD, landmarks as CSV in
  LPS mm, ``labels.json``) and the registration settings as ``config.json`` (``RegistrationConfig.to_dict()``,
  passed with ``--config``; only paths and output options are flags), launches the command, forwards its progress,
  hands the outputs over while their files exist (``onOutputs`` reads them one at a time) and removes the folder
  in ``finally``, whatever happened.
* :class:`RegistrationProcess` runs the command in its own process group: reader threads queue the JSON-lines
  progress events of stdout and every other output line (nothing is logged from those threads),
  :meth:`RegistrationProcess.poll` and :meth:`RegistrationProcess.pollLines` hand them over in the caller's thread;
  :meth:`RegistrationProcess.cancel` kills the whole process tree (the launcher and the Python it started).

Polling is driven by a ``qt.QTimer`` in the GUI (:meth:`BackgroundRegistration.startTimer`, the only place Qt is
imported) or by the blocking :meth:`BackgroundRegistration.wait` (Python console, tests).  A CUDA out-of-memory
error or a crash ends the subprocess, not Slicer.
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
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from deepabdominalreg.config import RegistrationConfig

if TYPE_CHECKING:
    from DeepAbdominalRegLib.nodes import SegmentInfo

logger = logging.getLogger(__name__)

__all__ = [
    "BackgroundRegistration",
    "CoreInputs",
    "CoreOutputs",
    "RegistrationCancelledByUser",
    "RegistrationFailed",
    "RegistrationProcess",
    "pythonExecutable",
    "registerCommand",
    "writeConfig",
    "writeCoreInputs",
]

MODULE_DIRECTORY = Path(__file__).resolve().parent.parent
"""The scripted module's folder; the core package ``deepabdominalreg`` lives in it."""


class RegistrationFailed(RuntimeError):
    """The registration did not produce a result; the message is meant for the user."""


class RegistrationCancelledByUser(RegistrationFailed):
    """The user cancelled; nothing was added to the scene."""


# ----------------------------------------------------------------------------------------------------------------
# what the core takes and gives (SimpleITK images in LPS), in memory and as files
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CoreInputs:
    """The MRML inputs converted for the core (SimpleITK images in LPS, landmark arrays in LPS mm).

    ``movingSegments`` describes the moving segmentation's segments (IDs, names, colours) for rebuilding the warped
    segmentation on the MRML side; it is not passed to the core.  The user masks (uint8 0/1 on their volume's grid)
    are ``excludeMask`` and ``rigidMask`` on the fixed volume, ``movingExcludeMask`` on the moving one.  The images
    are ``None`` after :meth:`releaseImages` (a background run, once they are written for the subprocess).
    """

    fixed: sitk.Image | None
    moving: sitk.Image | None
    movingLabels: sitk.Image | None = None
    fixedLabels: sitk.Image | None = None
    fixedLandmarksLps: np.ndarray | None = None
    movingLandmarksLps: np.ndarray | None = None
    labelNames: dict[int, str] = field(default_factory=dict)
    movingSegments: list[SegmentInfo] = field(default_factory=list)
    excludeMask: sitk.Image | None = None
    movingExcludeMask: sitk.Image | None = None
    rigidMask: sitk.Image | None = None

    def registerPairArguments(self) -> dict:
        return {
            "moving_labels": self.movingLabels,
            "fixed_labels": self.fixedLabels,
            "fixed_landmarks_lps": self.fixedLandmarksLps,
            "moving_landmarks_lps": self.movingLandmarksLps,
            "label_names": dict(self.labelNames) or None,
            "exclude_mask": self.excludeMask,
            "moving_exclude_mask": self.movingExcludeMask,
            "rigid_mask": self.rigidMask,
        }

    def releaseImages(self) -> None:
        """Drop the image copies (the subprocess reads the files; kept, they would hold a second copy of every input
        volume in Slicer's process until the run ends).  Segments, names and landmarks stay."""
        self.fixed = self.moving = self.movingLabels = self.fixedLabels = None
        self.excludeMask = self.movingExcludeMask = self.rigidMask = None


_SCALAR_MAPS = ("jacobian", "displacementMagnitude")
"""The :class:`CoreOutputs` images read as ``float32`` from a float file (what the overlays are stored as)."""
_TRANSFORMS = ("transform", "inverseTransform")
_LOADABLE = ("warpedImage", "transform", "inverseTransform", "warpedLabels", "jacobian", "displacementMagnitude")


@dataclass
class CoreOutputs:
    """What the MRML side needs from a registration result (see ``RegistrationResult`` for conventions).

    Each image and transform is either in memory (:meth:`fromResult`, an in-process run) or the ``Path`` of the file
    the command wrote (:meth:`fromDirectory`, a background run).  Take them with :meth:`read`, which reads a file
    when it is called and keeps no reference: the MRML side reads one output, hands it to its node and drops it
    before reading the next, so only one output is ever held outside VTK.
    """

    warpedImage: sitk.Image | Path
    transform: sitk.Transform | Path
    """Fixed -> moving (LPS mm): the affine and the displacement on the working grid (``transform.h5``)."""
    jacobian: sitk.Image | Path
    """``det J`` on the working grid (an overlay: Slicer resamples it for display)."""
    displacementMagnitude: sitk.Image | Path
    """``|u|`` (mm) on the working grid."""
    metrics: dict
    inverseTransform: sitk.Transform | Path | None = None
    """Moving -> fixed (``inverse_transform.h5``)."""
    warpedLabels: sitk.Image | Path | None = None

    @classmethod
    def fromResult(cls, result) -> CoreOutputs:
        return cls(
            warpedImage=result.warped_image,
            transform=result.transform,
            jacobian=result.jacobian,
            displacementMagnitude=result.displacement_magnitude,
            metrics=dict(result.metrics),
            inverseTransform=result.inverse_transform,
            warpedLabels=result.warped_labels,
        )

    @classmethod
    def fromDirectory(cls, folder: str | os.PathLike) -> CoreOutputs:
        """What ``deepabdominalreg register --output-dir folder`` wrote: ``metrics.json`` read now, every image and
        transform as its path, read by :meth:`read` (the folder must still exist then; :meth:`load` reads them
        all, for a folder that goes before they are used)."""
        from deepabdominalreg.io import IMAGE_FORMATS

        folder = Path(folder)

        def optional(stem):
            """The file ``stem.EXT`` the command wrote, whatever its ``--output-format``."""
            return next((folder / f"{stem}.{ext}" for ext in IMAGE_FORMATS if (folder / f"{stem}.{ext}").exists()),
                        None)

        found = {stem: optional(stem) for stem in ("warped", "jacobian", "displacement_magnitude")}
        missing = [f"{stem}.*" for stem, path in found.items() if path is None]
        missing += [name for name in ("transform.h5", "metrics.json") if not (folder / name).exists()]
        if missing:
            raise RegistrationFailed(f"the registration process ended without writing {', '.join(missing)}.")
        inverse = folder / "inverse_transform.h5"
        return cls(
            warpedImage=found["warped"],
            transform=folder / "transform.h5",
            jacobian=found["jacobian"],
            displacementMagnitude=found["displacement_magnitude"],
            metrics=json.loads((folder / "metrics.json").read_text(encoding="utf-8")),
            inverseTransform=inverse if inverse.exists() else None,
            warpedLabels=optional("warped_seg"),
        )

    def read(self, name: str):
        """The output ``name`` (a field: ``"warpedImage"``, ``"jacobian"``...): the object in memory, or its file read
        now and not kept.  The Jacobian and ``|u|`` maps of a float file come as ``sitkFloat32``; the warped image and
        labels keep the pixel type of their file."""
        if name not in _LOADABLE:
            raise ValueError(f"{name!r} is not an output image or transform; choose one of {', '.join(_LOADABLE)}")
        value = getattr(self, name)
        if not isinstance(value, Path):
            return value
        if not value.exists():
            raise RegistrationFailed(f"the registration output {value.name} is gone (its temporary folder was removed "
                                     "before it was read).")
        if name in _TRANSFORMS:
            from deepabdominalreg.transforms import read_transform

            return read_transform(value, "registration transform" if name == "transform" else "inverse transform")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(value))
        if name in _SCALAR_MAPS:
            reader.ReadImageInformation()
            if reader.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
                reader.SetOutputPixelType(sitk.sitkFloat32)
        return reader.Execute()

    def load(self) -> CoreOutputs:
        """A copy with every output in memory (for outputs whose folder goes before they are used)."""
        return dataclasses.replace(self, **{name: self.read(name) for name in _LOADABLE})


def writeCoreInputs(core: CoreInputs, folder: Path) -> dict[str, Path]:
    """Write the converted inputs for the command line (uncompressed NRRD, CSV landmarks in LPS, labels.json); the
    keys of the returned paths are those of :data:`_INPUT_FLAGS`."""
    from deepabdominalreg.io import write_landmarks

    paths = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nrrd"}
    sitk.WriteImage(core.fixed, str(paths["fixed"]), False)
    sitk.WriteImage(core.moving, str(paths["moving"]), False)
    for key, image in (("moving_seg", core.movingLabels), ("fixed_seg", core.fixedLabels),
                       ("exclude_mask", core.excludeMask), ("moving_exclude_mask", core.movingExcludeMask),
                       ("rigid_mask", core.rigidMask)):
        if image is not None:
            paths[key] = folder / f"{key}.nrrd"
            sitk.WriteImage(image, str(paths[key]), False)
    if core.labelNames:
        paths["label_names"] = folder / "labels.json"
        paths["label_names"].write_text(json.dumps({str(k): v for k, v in core.labelNames.items()}))
    if core.fixedLandmarksLps is not None:
        paths["fixed_landmarks"] = write_landmarks(core.fixedLandmarksLps, folder / "fixed_landmarks.csv")
        paths["moving_landmarks"] = write_landmarks(core.movingLandmarksLps, folder / "moving_landmarks.csv")
    return paths


def writeConfig(config: RegistrationConfig, path: Path) -> Path:
    """Every field of ``config`` as the JSON file ``deepabdominalreg register --config`` reads."""
    path.write_text(json.dumps(config.to_dict(), indent=2))
    return path


_INPUT_FLAGS = (("fixed", "--fixed"), ("moving", "--moving"), ("moving_seg", "--moving-seg"),
                ("fixed_seg", "--fixed-seg"), ("label_names", "--label-names"),
                ("fixed_landmarks", "--fixed-landmarks"), ("moving_landmarks", "--moving-landmarks"),
                ("exclude_mask", "--exclude-mask"), ("moving_exclude_mask", "--moving-exclude-mask"),
                ("rigid_mask", "--rigid-mask"))


def registerCommand(paths: dict[str, Path], outputDir: Path, configPath: Path, python: str | None = None) -> list[str]:
    """The ``deepabdominalreg register`` command: input files from :func:`writeCoreInputs`, the settings from the
    ``configPath`` of :func:`writeConfig` (every field, so no preset or flag adds to them)."""
    command = [python or pythonExecutable(), "-m", "deepabdominalreg", "register"]
    for key, flag in _INPUT_FLAGS:
        if key in paths:
            command += [flag, str(paths[key])]
    command += ["--output-dir", str(outputDir), "--config", str(configPath)]
    # the outputs are read back into MRML nodes at once: uncompressed NRRD (exact, no gzip time). --accept-suspect:
    # a suspect result still loads; the panel warns from metrics.json's "status"/"suspect_reasons".
    # --outputs: the files the Slicer side reads back: transform.h5 (the working-grid field, not a full-resolution
    # one) and the Jacobian / |u| maps on the working grid for the overlays.
    return command + ["--outputs", "transform,jacobian,magnitude,warped,labels",
                      "--no-report", "--progress-json", "--output-format", "nrrd", "--accept-suspect"]


def pythonExecutable() -> str:
    """Slicer's ``PythonSlicer`` launcher when running in Slicer, else this interpreter."""
    found = shutil.which("PythonSlicer", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return found or sys.executable


def subprocessEnvironment() -> dict[str, str]:
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
    env["PYTHONIOENCODING"] = "utf-8"  # the pipes are read as UTF-8 (on Windows the default is the ANSI code page)
    return env


def temporaryRoot() -> str | None:
    """Slicer's temporary folder in the application, else the system's (``None``)."""
    try:
        import slicer

        return slicer.app.temporaryPath
    except Exception:  # noqa: BLE001  (outside the Slicer application)
        return None


# ----------------------------------------------------------------------------------------------------------------
# the subprocess
# ----------------------------------------------------------------------------------------------------------------


def _drain(items: queue.Queue) -> list:
    """Everything in the queue now, without waiting."""
    drained = []
    while True:
        try:
            drained.append(items.get_nowait())
        except queue.Empty:
            return drained


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
        self._lines: queue.Queue = queue.Queue()
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
            self._lines.put(line)

    def _onStderr(self, line: str) -> None:
        self._stderr.append(line)
        if line.strip():
            self._lines.put(line)

    def poll(self) -> list[dict]:
        """Progress events received since the last call (``{"stage", "fraction", "message"}`` dicts)."""
        return _drain(self._events)

    def pollLines(self) -> list[str]:
        """The command's output lines (stderr, and stdout lines that are not progress events) since the last call."""
        return _drain(self._lines)

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


# ----------------------------------------------------------------------------------------------------------------
# one background registration: files -> subprocess -> outputs in memory
# ----------------------------------------------------------------------------------------------------------------


class BackgroundRegistration:
    """``CoreInputs`` + ``RegistrationConfig`` -> temporary files -> subprocess -> ``CoreOutputs``.

    ``onProgress(event: dict)`` gets each progress event, ``onLog(line: str)`` each other output line of the command
    (also logged, from the polling thread).  When the command succeeded, ``onOutputs(outputs: CoreOutputs)`` is
    called while the temporary folder still exists: ``outputs`` holds the files' paths and
    :meth:`CoreOutputs.read` reads each when asked, so the consumer holds one output at a time; what it raises
    becomes the run's error.  Without ``onOutputs`` every output is read into memory (:meth:`CoreOutputs.load`).
    ``onFinished(outputs: CoreOutputs | None, error: Exception | None)`` is called once, after the temporary folder
    was removed (after ``onOutputs``, the outputs' files are gone; their metrics stay).  :meth:`start` writes the
    files (errors raise immediately), releases ``core``'s images (:meth:`CoreInputs.releaseImages`) and launches the
    process; drive it with :meth:`startTimer` (GUI, Qt timer) or :meth:`wait` (blocking).
    """

    POLL_INTERVAL_MS = 200

    def __init__(self, core: CoreInputs, config: RegistrationConfig, *,
                 onProgress: Callable[[dict], None] | None = None,
                 onFinished: Callable[[CoreOutputs | None, Exception | None], None] | None = None,
                 python: str | None = None, onLog: Callable[[str], None] | None = None,
                 onOutputs: Callable[[CoreOutputs], None] | None = None):
        self.core = core
        self.onOutputs = onOutputs
        self.config = config
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.onLog = onLog
        self.python = python
        self.process: RegistrationProcess | None = None
        self.tempDir: Path | None = None
        self.outputs: CoreOutputs | None = None
        self.error: Exception | None = None
        self.done = False
        self._timer = None

    def start(self) -> None:
        self.tempDir = Path(tempfile.mkdtemp(prefix="DeepAbdominalReg-", dir=temporaryRoot()))
        try:
            inputDir = self.tempDir / "input"
            inputDir.mkdir()
            paths = writeCoreInputs(self.core, inputDir)
            self.core.releaseImages()
            configPath = writeConfig(self.config, inputDir / "config.json")
            command = registerCommand(paths, self.tempDir / "output", configPath, self.python)
            self.process = RegistrationProcess(command, env=subprocessEnvironment(), cwd=str(MODULE_DIRECTORY))
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
        """Forward new progress events; when the process has ended, finish.  Returns True when done."""
        if self.done:
            return True
        if self.process is None:
            return False
        for event in self.process.poll():
            if self.onProgress is not None and event.get("stage") != "finished":
                self.onProgress(event)
        self._forwardLines()
        if not self.process.finished():
            return False
        self._forwardLines()  # what the reader threads queued between the two checks
        self._finish()
        return True

    def _forwardLines(self) -> None:
        for line in self.process.pollLines():
            logger.info("[deepabdominalreg] %s", line)
            if self.onLog is not None:
                self.onLog(line)

    def wait(self, timeoutSeconds: float | None = None, shouldStop: Callable[[], bool] | None = None) -> CoreOutputs:
        """Block until done (no Qt needed), cancelling on ``shouldStop()`` or the timeout; raise the error, if any."""
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
            if self.onOutputs is not None:
                self.onOutputs(outputs)  # reads the files, which go in the finally below
            else:
                outputs = outputs.load()
            self.outputs = outputs
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
