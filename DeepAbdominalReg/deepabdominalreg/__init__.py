"""DeepAbdominalReg core library: deep-learning deformable registration of abdominal CT.

Slicer-independent (torch, SimpleITK, numpy, scipy, scikit-image, matplotlib).  Physical space is LPS, in mm.

The public API is importable from here; it is loaded on first use, so ``import deepabdominalreg.config`` (as the
Slicer module does before its dependencies are installed) does not import torch::

    from deepabdominalreg import config_from_preset, read_image, register_pair
"""

__version__ = "0.1.0"

_PUBLIC = {
    "RegistrationConfig": "deepabdominalreg.config",
    "PRESETS": "deepabdominalreg.config",
    "config_from_preset": "deepabdominalreg.config",
    "Grid": "deepabdominalreg.geometry",
    "ImageValidationError": "deepabdominalreg.io",
    "read_image": "deepabdominalreg.io",
    "read_labels": "deepabdominalreg.io",
    "read_landmarks": "deepabdominalreg.io",
    "read_displacement_field": "deepabdominalreg.io",
    "write_image": "deepabdominalreg.io",
    "write_displacement_field": "deepabdominalreg.io",
    "write_landmarks": "deepabdominalreg.io",
    "register_pair": "deepabdominalreg.registration",
    "RegistrationResult": "deepabdominalreg.registration",
    "RegistrationCancelled": "deepabdominalreg.registration",
    "ProgressEvent": "deepabdominalreg.registration",
}

__all__ = [
    "PRESETS",
    "Grid",
    "ImageValidationError",
    "ProgressEvent",
    "RegistrationCancelled",
    "RegistrationConfig",
    "RegistrationResult",
    "__version__",
    "config_from_preset",
    "read_displacement_field",
    "read_image",
    "read_labels",
    "read_landmarks",
    "register_pair",
    "write_displacement_field",
    "write_image",
    "write_landmarks",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'deepabdominalreg' has no attribute {name!r}")
