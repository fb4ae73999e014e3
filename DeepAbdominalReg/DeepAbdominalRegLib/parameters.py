"""RegistrationConfig <-> the module's parameter node.

The parameters are defined once, in :class:`deepabdominalreg.config.RegistrationConfig`.  The parameter node wrapper
in ``DeepAbdominalReg.py`` mirrors each field under its camelCase name (``io_iterations`` -> ``ioIterations``), with
a type that a Qt widget can bind to (see :data:`PARAMETER_TYPE_NOTES`), plus GUI-only parameters (nodes, preset).
A test checks that the two lists match.  Pure Python: no Slicer import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from deepabdominalreg.config import PRESETS, RegistrationConfig

__all__ = [
    "CONFIG_ONLY_PARAMETERS",
    "CONFIG_TO_PARAMETER",
    "GUI_ONLY_PARAMETERS",
    "LOAD_MODEL_LABEL",
    "NO_MODEL_LABEL",
    "applyPreset",
    "camelCase",
    "configFromParameters",
    "formatLevels",
    "modelComboIndex",
    "parametersFromConfig",
    "parseLevels",
    "presetMatching",
    "presetParameters",
]


def camelCase(snake: str) -> str:
    """``io_ncc_window_mm`` -> ``ioNccWindowMm``."""
    head, *rest = snake.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


CONFIG_TO_PARAMETER: dict[str, str] = {f.name: camelCase(f.name) for f in dataclasses.fields(RegistrationConfig)}
"""Config field name -> parameter node name."""

INPUT_NODE_PARAMETERS = (
    "fixedVolume",
    "movingVolume",
    "movingSegmentation",
    "fixedSegmentation",
    "fixedLandmarks",
    "movingLandmarks",
    "excludeSegmentation",
    "movingExcludeSegmentation",
    "rigidSegmentation",
)
OUTPUT_NODE_PARAMETERS = (
    "warpedVolume",
    "outputTransform",
    "inverseTransform",
    "warpedSegmentation",
    "jacobianVolume",
    "displacementMagnitudeVolume",
    "metricsTable",
)
CONFIG_ONLY_PARAMETERS = frozenset(("checkAffineScaleRange", "checkHuWindow"))
"""Config fields with no panel widget: the two-number ranges of the plausibility checks.  The parameter node keeps
the config's values; set them from the Python console (``parameterNode.checkHuWindow = (-1000.0, 1000.0)``)."""

GUI_ONLY_PARAMETERS = frozenset(INPUT_NODE_PARAMETERS + OUTPUT_NODE_PARAMETERS + ("preset",))
"""Parameter node members that are not RegistrationConfig fields."""

PARAMETER_TYPE_NOTES = {
    "model": "str; '' = no network (affine + instance optimisation), else a shipped model name or a .pt path",
    "ioLevels": "str of comma-separated factors ('4,2,1'), bound to a QLineEdit",
    "affineLevelsMm": "str of comma-separated spacings in mm ('12,6'), bound to a QLineEdit",
    "threads": "int; 0 = torch's default (None in the config)",
    "huWindow": "tuple[float, float], bound by hand to two spin boxes",
}

NO_MODEL_LABEL = "none (affine + instance optimisation)"
LOAD_MODEL_LABEL = "load from file..."
PRESET_NAMES = tuple(PRESETS) + ("custom",)


def parseLevels(text: str) -> tuple[int, ...]:
    """``"4, 2,1"`` -> ``(4, 2, 1)``; raise ``ValueError`` with a user-facing message if it is not that."""
    parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        levels = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"pyramid levels '{text}' must be whole numbers separated by commas, e.g. '4,2,1'.") from None
    if not levels or any(level < 1 for level in levels):
        raise ValueError(f"pyramid levels '{text}' must be one or more factors >= 1, coarse to fine, e.g. '4,2,1'.")
    return levels


def parseSpacings(text: str) -> tuple[float, ...]:
    """``"12, 6"`` -> ``(12.0, 6.0)`` (mm); raise ``ValueError`` with a user-facing message if it is not that."""
    parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        spacings = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"affine levels '{text}' must be spacings in mm separated by commas, e.g. '12,6'.") from None
    if not spacings or any(not s > 0 for s in spacings):
        raise ValueError(f"affine levels '{text}' must be one or more positive spacings in mm, e.g. '12,6'.")
    return spacings


def formatSpacings(spacings) -> str:
    return ",".join(f"{float(s):g}" for s in spacings)


def formatLevels(levels) -> str:
    return ",".join(str(int(level)) for level in levels)


def _toParameterValue(field: str, value: Any) -> Any:
    if field == "model":
        return "" if value is None else str(value)
    if field == "threads":
        return 0 if value is None else int(value)
    if field == "io_levels":
        return formatLevels(value)
    if field == "affine_levels_mm":
        return formatSpacings(value)
    if isinstance(value, tuple):  # hu_window and the plausibility checks' (low, high) ranges
        return (float(value[0]), float(value[1]))
    return value


def _toConfigValue(field: str, value: Any, default: Any) -> Any:
    if field == "model":
        return str(value) if value else None
    if field == "threads":
        return int(value) if value else None
    if field == "io_levels":
        return parseLevels(value) if isinstance(value, str) else tuple(int(v) for v in value)
    if field == "affine_levels_mm":
        return parseSpacings(value) if isinstance(value, str) else tuple(float(v) for v in value)
    if field == "hu_window":
        low, high = (float(v) for v in value)
        if not low < high:
            raise ValueError(f"HU window ({low:g}, {high:g}): the lower bound must be below the upper bound.")
        return (low, high)
    if isinstance(default, tuple):  # the plausibility checks' (low, high) ranges
        return tuple(float(v) for v in value)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def parametersFromConfig(config: RegistrationConfig) -> dict[str, Any]:
    """``{parameter name: value}`` for every config field, in the parameter node's types."""
    return {CONFIG_TO_PARAMETER[name]: _toParameterValue(name, getattr(config, name)) for name in CONFIG_TO_PARAMETER}


def configFromParameters(parameters: Mapping[str, Any] | Any) -> RegistrationConfig:
    """A :class:`RegistrationConfig` from a mapping or an object with the parameter node's attributes.

    Missing parameters keep the config's defaults; raise ``ValueError`` for values the config cannot take.
    """
    defaults = RegistrationConfig()
    values = {}
    for name, parameter in CONFIG_TO_PARAMETER.items():
        if isinstance(parameters, Mapping):
            if parameter not in parameters:
                continue
            raw = parameters[parameter]
        else:
            if not hasattr(parameters, parameter):
                continue
            raw = getattr(parameters, parameter)
        values[name] = _toConfigValue(name, raw, getattr(defaults, name))
    return RegistrationConfig(**values)


def presetParameters(preset: str) -> dict[str, Any]:
    """Parameter values that a preset sets (the preset's overrides on top of the config defaults)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = RegistrationConfig(**PRESETS[preset])
    touched = set().union(*(p.keys() for p in PRESETS.values()))
    return {CONFIG_TO_PARAMETER[name]: _toParameterValue(name, getattr(config, name)) for name in sorted(touched)}


def applyPreset(parameters: Any, preset: str) -> str:
    """Set the values of ``preset`` on ``parameters`` (the parameter node wrapper) and return the preset to show.

    Picking "custom" changes nothing (it only names edited settings). The preset combo box is deliberately not
    bound through ``SlicerParameterName``: the connector writes ``preset`` on ``currentIndexChanged``, before
    ``activated`` could apply the values, so the panel re-derived the old preset and snapped the combo back.
    """
    if preset in PRESETS:
        for name, value in presetParameters(preset).items():
            setattr(parameters, name, value)
    return presetMatching(parameters)


def presetMatching(parameters: Mapping[str, Any] | Any) -> str:
    """The name of the preset whose values ``parameters`` hold, or ``"custom"``."""
    for preset in PRESETS:
        wanted = presetParameters(preset)
        current = {}
        for key in wanted:
            current[key] = parameters[key] if isinstance(parameters, Mapping) else getattr(parameters, key)
        if all(_same(current[key], wanted[key]) for key in wanted):
            return preset
    return "custom"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        try:
            return parseLevels(a) == parseLevels(b)
        except ValueError:
            return a == b
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) < 1e-9
        except (TypeError, ValueError):
            return False
    return a == b


def shippedModelNames(directory: str | None = None) -> list[str]:
    """Names of the model cards (``*.json``) in the models folder, read without importing torch.

    The folder is :func:`deepabdominalreg.nn.models.models_directory` (a module that does not import torch).
    Unreadable cards are skipped; the core checks them on use.
    """
    import json
    from pathlib import Path

    from deepabdominalreg.nn.models import models_directory

    folder = Path(directory) if directory else models_directory()
    names = []
    for card in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            name = json.loads(card.read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and name:
            names.append(name)
    return names


def modelComboIndex(model: str, items: list[str], loadFromFileChosen: bool = False) -> int:
    """Which entry of the model combo box shows ``model`` (the parameter: '' = no network, a shipped model's name,
    or a file path); ``items`` are the combo's texts: :data:`NO_MODEL_LABEL`, the shipped names,
    :data:`LOAD_MODEL_LABEL`.

    ``loadFromFileChosen``: the user picked "load from file..." and has not chosen a file yet; the model is then ''
    but the combo stays on "load from file..." instead of snapping back to "none".
    """
    loadIndex = items.index(LOAD_MODEL_LABEL)
    if not model:
        return loadIndex if loadFromFileChosen else 0
    if model in items[1:loadIndex]:
        return items.index(model)
    return loadIndex
