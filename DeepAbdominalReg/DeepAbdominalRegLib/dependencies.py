"""Python packages the module's run needs: checked by installed version, installed on first use after one confirmation.

Nothing here runs at module import, and nothing imports torch: versions come from the installed distributions'
metadata (``importlib.metadata``), compared with ``packaging`` (in Slicer's Python; pip's vendored copy or a plain
``>=`` comparison where it is absent), so an old torch or scipy that imports still counts as outdated.

Installing (:func:`ensureDependencies`) asks once, for everything, then:

* torch through SlicerPyTorch's ``PyTorchUtils.installTorch`` when that extension is installed (light-the-torch picks
  the CUDA build that matches the driver), asked not to confirm again;
* the rest (and torch without SlicerPyTorch) through ``slicer.packaging.pip_ensure(..., prompt_install=False)``
  where ``slicer.packaging`` exists (Slicer >= 5.11: a modal progress dialog with pip's log, and its restart prompt
  when an upgraded package was already imported), else ``python -m pip install`` with every output line handed
  to ``onStatus`` (the panel's status label) and the Python console.

In testing mode (CTest, ``--testing``) nothing is installed: :func:`ensureDependencies` raises and the self-test
skips.  While an install runs, :func:`isInstalling` is true and a second call raises instead of starting another
(pip's output pumps Qt events, so a second click on Register could otherwise arrive mid-install).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import NamedTuple

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_NEEDED_BY_RUN",
    "REQUIREMENTS",
    "DependencyError",
    "Unsatisfied",
    "describeDevices",
    "ensureDependencies",
    "isInstalling",
    "missingRequirements",
    "unsatisfiedRequirements",
    "unsatisfiedText",
]

REQUIREMENTS: dict[str, str] = {
    # import name: pip requirement. pyproject.toml's [project] dependencies minus NOT_NEEDED_BY_RUN
    # (Testing/mrml/test_dependencies.py compares them; pyproject.toml is not installed with the module).
    "torch": "torch>=2.1",
    "SimpleITK": "SimpleITK>=2.3",
    "numpy": "numpy>=1.24",
    "scipy": "scipy>=1.10",
    "skimage": "scikit-image>=0.21",  # registration/preprocessing.py (body mask: convex hull)
}
NOT_NEEDED_BY_RUN: dict[str, str] = {
    "matplotlib": "draws report.png only; the module's run passes --no-report",
    "tqdm": "the batch command's progress bar only; the module's run is one register",
}
TORCH_VERSION_REQUIREMENT = ">=2.1"
REQUESTER = "DeepAbdominalReg"
INSTALLING_TEXT = "Installing PyTorch and dependencies…"

_installing = False


class DependencyError(RuntimeError):
    """Required packages are missing or outdated and were not installed (declined, testing mode or failed)."""


class Unsatisfied(NamedTuple):
    """A requirement this Python does not meet: ``installed`` is None when the package is absent."""

    importName: str
    requirement: str
    installed: str | None

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.requirement} (not installed)"
        return f"{self.requirement} ({self.installed} installed)"


# ----------------------------------------------------------------------------------------------------------------
# checking: metadata and version specifiers, no import of the packages themselves
# ----------------------------------------------------------------------------------------------------------------


def _splitRequirement(requirement: str) -> tuple[str, str]:
    """``"scikit-image>=0.21"`` -> ``("scikit-image", ">=0.21")``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1), match.group(2).strip()


def _packagingRequirementClass():
    """``packaging.requirements.Requirement``, or pip's vendored copy, or None."""
    for moduleName in ("packaging.requirements", "pip._vendor.packaging.requirements"):
        try:
            return importlib.import_module(moduleName).Requirement
        except ImportError:
            continue
    return None


def _releaseTuple(version: str) -> tuple[int, ...]:
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def _plainSatisfies(installed: str, specifier: str) -> bool:
    """Fallback without ``packaging``: ``>=`` (and ``==``) on release numbers, enough for :data:`REQUIREMENTS`."""
    for clause in filter(None, (part.strip() for part in specifier.split(","))):
        match = re.match(r"(>=|==|>|<=|<|!=|~=)\s*(.+)$", clause)
        if match is None:
            return False
        operator, wanted = match.groups()
        have, want = _releaseTuple(installed), _releaseTuple(wanted)
        width = max(len(have), len(want))
        have, want = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {">=": have >= want, "~=": have >= want, ">": have > want, "<=": have <= want, "<": have < want,
              "==": have == want, "!=": have != want}[operator]
        if not ok:
            return False
    return True


def _satisfies(requirement: str, installed: str) -> bool:
    """Whether version ``installed`` meets ``requirement``'s specifier (pre-releases and local builds count)."""
    requirementClass = _packagingRequirementClass()
    if requirementClass is None:
        return _plainSatisfies(installed, _splitRequirement(requirement)[1])
    try:
        return requirementClass(requirement).specifier.contains(installed, prereleases=True)
    except Exception:  # noqa: BLE001  (an unparsable installed version: treat as outdated, reinstall)
        return False


def installedVersion(distribution: str) -> str | None:
    """The installed version of a distribution (pip name), from its metadata; None if absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def unsatisfiedRequirements() -> list[Unsatisfied]:
    """The :data:`REQUIREMENTS` this Python does not meet: absent, not importable, or an older version."""
    importlib.invalidate_caches()
    result = []
    for importName, requirement in REQUIREMENTS.items():
        installed = installedVersion(_splitRequirement(requirement)[0])
        if installed is None or importlib.util.find_spec(importName) is None:
            result.append(Unsatisfied(importName, requirement, None))
        elif not _satisfies(requirement, installed):
            result.append(Unsatisfied(importName, requirement, installed))
    return result


def missingRequirements() -> list[str]:
    """Import names of :func:`unsatisfiedRequirements` (absent or outdated)."""
    return [item.importName for item in unsatisfiedRequirements()]


def unsatisfiedText() -> str | None:
    """One sentence naming the unsatisfied requirements (for a skipped self-test), or None if all are met."""
    unsatisfied = unsatisfiedRequirements()
    if not unsatisfied:
        return None
    return ("DeepAbdominalReg's Python packages are missing or outdated, and tests do not install them: "
            + ", ".join(item.describe() for item in unsatisfied) + ". Press Register once to install them.")


def isInstalling() -> bool:
    """True while :func:`ensureDependencies` installs packages (the Register button stays disabled)."""
    return _installing


# ----------------------------------------------------------------------------------------------------------------
# the Slicer application: testing mode, the one confirmation
# ----------------------------------------------------------------------------------------------------------------


def _slicerApp():
    import slicer

    return getattr(slicer, "app", None)


def _isTesting() -> bool:
    app = _slicerApp()
    if app is None:
        return False
    try:
        return bool(app.testingEnabled())
    except AttributeError:
        try:
            return bool(app.commandOptions().testingEnabled)
        except AttributeError:
            return False


def _confirm(text: str) -> bool:
    import slicer

    return bool(slicer.util.confirmOkCancelDisplay(text, f"{REQUESTER}: install Python packages"))


def _confirmationText(unsatisfied: list[Unsatisfied]) -> str:
    torch = any(item.importName == "torch" for item in unsatisfied)
    return (
        "DeepAbdominalReg needs these Python packages, which are missing or too old:\n\n  "
        + "\n  ".join(item.describe() for item in unsatisfied)
        + "\n\nInstall them now into Slicer's Python? They are downloaded from the Python Package Index"
        + (" (PyTorch is large: 1-3 GB; this may take several minutes)." if torch else ".")
    )


# ----------------------------------------------------------------------------------------------------------------
# installing
# ----------------------------------------------------------------------------------------------------------------


def _slicerPackaging():
    """``slicer.packaging`` (Slicer >= 5.11; a submodule, so it must be imported) or None."""
    try:
        import slicer.packaging
    except ImportError:
        return None
    return slicer.packaging if hasattr(slicer.packaging, "pip_ensure") else None


def _pyTorchUtils():
    try:
        import PyTorchUtils  # SlicerPyTorch extension
    except ImportError:
        return None
    return PyTorchUtils


def _installTorchWithPyTorchUtils(pyTorchUtils, onStatus: Callable[[str], None]) -> None:
    onStatus("Installing PyTorch through SlicerPyTorch (light-the-torch); its output is in the Python console…")
    # askConfirmation=False: the user has confirmed the whole list already (one dialog, not two)
    torch = pyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=TORCH_VERSION_REQUIREMENT
    )
    if torch is None:
        raise DependencyError("PyTorch was not installed by SlicerPyTorch; DeepAbdominalReg needs it to register.")


def _pythonSlicer() -> str:
    """Slicer's ``PythonSlicer`` (as ``slicer.util._executePythonModule`` finds it), else this interpreter."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return candidate if os.path.isfile(candidate) else sys.executable


def _pipInstallStreaming(requirements: list[str], onStatus: Callable[[str], None]) -> None:
    """``python -m pip install`` with each output line handed to ``onStatus``, for Slicer < 5.11.

    ``slicer.util.pip_install`` there prints pip's lines to the console only; this is the same loop
    (``launchConsoleProcess`` + ``processEvents`` per line) with the lines also shown in the panel.
    """
    import slicer

    command = [_pythonSlicer(), "-m", "pip", "install", *requirements]
    launch = getattr(slicer.util, "launchConsoleProcess", None)
    if launch is not None and _slicerApp() is not None:
        process = launch(command, useStartupEnvironment=False)
    else:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   universal_newlines=True, errors="replace")
    app = _slicerApp()
    lastLines: list[str] = []
    for rawLine in process.stdout:
        line = rawLine.rstrip()
        if not line:
            continue
        print(line)
        lastLines = (lastLines + [line])[-5:]
        onStatus(line)
        if app is not None:
            app.processEvents()  # keep the panel painting while pip downloads
    process.wait()
    if process.returncode != 0:
        raise DependencyError(f"pip install {' '.join(requirements)} failed (exit code {process.returncode}):\n"
                              + "\n".join(lastLines))


def _pipInstall(requirements: list[str], onStatus: Callable[[str], None]) -> None:
    packaging = _slicerPackaging()
    if packaging is None:
        _pipInstallStreaming(requirements, onStatus)
        return
    onStatus(INSTALLING_TEXT)  # pip's log is in slicer.packaging's progress dialog
    try:
        # prompt_install=False: already confirmed; skip_in_testing: ensureDependencies never gets here in testing
        packaging.pip_ensure(requirements, prompt_install=False, requester=REQUESTER)
    except subprocess.CalledProcessError as exc:
        raise DependencyError(f"pip install {' '.join(requirements)} failed (exit code {exc.returncode}).") from exc


def _install(unsatisfied: list[Unsatisfied], onStatus: Callable[[str], None]) -> None:
    pyTorchUtils = _pyTorchUtils()
    if pyTorchUtils is not None and any(item.importName == "torch" for item in unsatisfied):
        _installTorchWithPyTorchUtils(pyTorchUtils, onStatus)
        unsatisfied = [item for item in unsatisfiedRequirements() if item.importName != "torch"]
    if unsatisfied:
        _pipInstall([item.requirement for item in unsatisfied], onStatus)


def _importedBefore(unsatisfied: list[Unsatisfied]) -> list[str]:
    """Upgraded packages whose old version is already imported in this process (used by in-process runs)."""
    return [item.importName for item in unsatisfied if item.installed is not None and item.importName in sys.modules]


def ensureDependencies(askConfirmation: bool = True, onStatus: Callable[[str], None] | None = None) -> None:
    """Make sure every requirement is installed at a suitable version; install what is not after one confirmation.

    ``onStatus(text)`` receives "Installing PyTorch and dependencies…" and then pip's output lines (Slicer < 5.11;
    from 5.11 pip's log is in Slicer's progress dialog).  Raises :class:`DependencyError` if the user declines,
    in testing mode (nothing is installed there), while another install runs, or if the install fails.
    """
    global _installing

    unsatisfied = unsatisfiedRequirements()
    if not unsatisfied:
        return
    listed = ", ".join(item.describe() for item in unsatisfied)
    if _installing:
        raise DependencyError("Python packages are being installed; wait until that finishes, then try again.")
    if _isTesting():
        raise DependencyError(f"Testing mode does not install Python packages; missing or outdated: {listed}.")
    if askConfirmation:
        if _slicerApp() is None:
            raise DependencyError(f"Missing or outdated Python packages: {listed}. Install them with "
                                  f"PythonSlicer -m pip install {' '.join(item.requirement for item in unsatisfied)}")
        if not _confirm(_confirmationText(unsatisfied)):
            raise DependencyError(f"Required Python packages were not installed (declined): {listed}.")
    report = onStatus or (lambda text: None)
    logger.info("DeepAbdominalReg: installing %s", listed)
    _installing = True
    try:
        report(INSTALLING_TEXT)
        _install(unsatisfied, report)
    finally:
        _installing = False
    still = unsatisfiedRequirements()
    if still:
        raise DependencyError(
            "These Python packages could not be installed: " + ", ".join(item.describe() for item in still)
            + ". Check the network connection and the Python console log, then try again."
        )
    stale = _importedBefore(unsatisfied)
    if stale:
        logger.warning("DeepAbdominalReg: %s were upgraded while already imported; the Register button's run "
                       "uses the new versions, an in-process logic.register() needs a Slicer restart.",
                       ", ".join(stale))
    report("Python packages installed.")


# ----------------------------------------------------------------------------------------------------------------
# the panel's device line: from metadata only (no torch import, no CUDA initialisation in Slicer's process)
# ----------------------------------------------------------------------------------------------------------------


def describeDevices() -> str:
    """What the panel says about PyTorch and the compute device, without importing torch.

    The device itself is chosen by the run (a subprocess) and reported with its result ("Done in ... on cuda").
    """
    installed = installedVersion("torch")
    if installed is None or importlib.util.find_spec("torch") is None:
        return ("PyTorch not installed yet: it is installed when you first press Register "
                "(CPU or CUDA build chosen then).")
    if not _satisfies(REQUIREMENTS["torch"], installed):
        return (f"PyTorch {installed} is installed, but DeepAbdominalReg needs {REQUIREMENTS['torch']}: "
                "it is updated when you press Register.")
    _, _, local = installed.partition("+")
    build = {"cpu": " (CPU-only build)"}.get(local, f" ({local} build)" if local.startswith(("cu", "rocm")) else "")
    return (f"PyTorch {installed} installed{build}; the device (auto: a CUDA GPU if available, else the CPU) is "
            "detected when a run starts and shown with its result.")
