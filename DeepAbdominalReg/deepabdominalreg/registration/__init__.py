"""The registration pipeline and its stages: preprocessing, affine, network, instance optimisation, full-resolution
fields.  :func:`register_pair` runs them in order."""

from deepabdominalreg.registration.pipeline import (
    ProgressEvent,
    RegistrationCancelled,
    RegistrationResult,
    register_pair,
)

__all__ = ["ProgressEvent", "RegistrationCancelled", "RegistrationResult", "register_pair"]
