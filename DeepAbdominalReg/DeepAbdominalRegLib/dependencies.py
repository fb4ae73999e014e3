"""Python packages the core needs, installed on first use after the user agrees; never at module import.

torch goes through SlicerPyTorch's ``PyTorchUtils`` when that extension is installed (it picks the CUDA build that
matches the driver and asks for confirmation itself); otherwise, and for the other packages, through
``slicer.packaging.pip_ensure`` (Slicer >= 5.11) or ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["REQUIREMENTS", "DependencyError", "describeDevices", "ensureDependencies", "missingRequirements"]

REQUIREMENTS: dict[str, str] = {
    # import name: pip requirement (keep in step with pyproject.toml)
    "torch": "torch>=2.1",
    "SimpleITK": "SimpleITK>=2.3",
    "numpy": "numpy>=1.24",
    "scipy": "scipy>=1.10",
    "skimage": "scikit-image>=0.21",
    "matplotlib": "matplotlib>=3.7",
}
TORCH_VERSION_REQUIREMENT = ">=2.1"


class DependencyError(RuntimeError):
    """Required packages are missing and were not installed (declined or failed)."""


def _requirementsFile() -> Path:
    return Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


def missingRequirements() -> list[str]:
    """Import names from :data:`REQUIREMENTS` that cannot be imported in this Python."""
    importlib.invalidate_caches()
    return [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]


def _isTesting() -> bool:
    import slicer

    app = getattr(slicer, "app", None)
    try:
        return bool(app and app.commandOptions().testingEnabled)
    except AttributeError:
        return False


def _confirm(text: str) -> bool:
    import slicer

    if _isTesting():
        return True
    return bool(slicer.util.confirmOkCancelDisplay(text, "DeepAbdominalReg: install Python packages"))


def _installTorch(askConfirmation: bool) -> bool:
    """Install torch through SlicerPyTorch when present; returns False if that is not possible or declined."""
    try:
        import PyTorchUtils  # SlicerPyTorch extension
    except ImportError:
        return False
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=askConfirmation, torchVersionRequirement=TORCH_VERSION_REQUIREMENT
    )
    if torch is None:
        raise DependencyError("PyTorch was not installed (declined); DeepAbdominalReg needs it to register images.")
    return True


def _pipInstall(requirements: list[str]) -> None:
    import slicer

    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(requirements)
    else:
        slicer.util.pip_install(requirements)


def ensureDependencies(askConfirmation: bool = True) -> None:
    """Make sure every requirement imports; install what is missing after confirmation.

    Raises :class:`DependencyError` if the user declines or an install does not make the package importable.
    """
    missing = missingRequirements()
    if not missing:
        return
    if "torch" in missing and _installTorch(askConfirmation):
        missing = missingRequirements()
    if missing:
        requirements = [REQUIREMENTS[name] for name in missing]
        text = (
            "DeepAbdominalReg needs these Python packages, which are not installed yet:\n\n  "
            + "\n  ".join(requirements)
            + "\n\nInstall them now? This downloads them from the Python Package Index"
            + (" (PyTorch is large: about 1-3 GB, and may take several minutes)." if "torch" in missing else ".")
        )
        if askConfirmation and not _confirm(text):
            raise DependencyError("Required Python packages were not installed (declined): " + ", ".join(requirements))
        logger.info("DeepAbdominalReg: installing %s", ", ".join(requirements))
        _pipInstall(requirements)
    still = missingRequirements()
    if still:
        raise DependencyError(
            "These Python packages could not be installed: " + ", ".join(REQUIREMENTS[n] for n in still)
            + ". Check the network connection and the Python console log, then try again."
        )


def describeDevices() -> str:
    """A short text of the compute devices torch sees (without installing or importing torch if it is absent)."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch not installed yet: it will be installed on first Apply (CPU or CUDA build chosen then)."
    try:
        import torch
    except Exception as exc:  # noqa: BLE001  (a broken install must not break the module panel)
        return f"PyTorch cannot be imported ({exc})."
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"GPU detected: {', '.join(names)} (CUDA {torch.version.cuda}); auto uses it."
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple GPU (MPS) present, but the core runs on CPU or CUDA only; auto uses the CPU."
    return f"No CUDA GPU detected: auto uses the CPU ({torch.get_num_threads()} threads)."
