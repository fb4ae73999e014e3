"""Model registry: weights are data, described by a model card and checked before use.

A model is a pair ``NAME.pt`` (a ``torch.save`` of plain tensors and values, loaded with ``weights_only=True``) and
``NAME.json`` (its card).  The card gives the architecture and its settings, the input spacing (mm) and HU window
the model was trained with, the SHA-256 of the weights file, and provenance (training data, command, metrics).
The checkpoint repeats architecture, settings, spacing and window; a mismatch with the card refuses the model.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the registry (cards, hashes) works without it
    import torch

__all__ = [
    "ModelCard",
    "ModelError",
    "available_models",
    "load_model",
    "models_directory",
    "resolve_model",
    "save_model",
    "sha256_of",
]


class ModelError(ValueError):
    """A model file or card is missing, corrupt, or inconsistent; the message says what to do."""


def models_directory() -> Path:
    """Shipped models: ``$DEEPABDOMINALREG_MODELS`` when set, else the package data folder
    ``deepabdominalreg/nn/weights`` (weights, JSON cards and ``MODEL_CARD.md``; installed with the wheel and with
    the Slicer extension)."""
    env = os.environ.get("DEEPABDOMINALREG_MODELS")
    if env:
        return Path(env)
    return Path(str(importlib.resources.files("deepabdominalreg.nn") / "weights"))


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    """What the registry knows of a model (the JSON card)."""

    name: str
    weights_path: Path
    sha256: str
    architecture: str
    settings: dict
    input_spacing_mm: float
    hu_window: tuple[float, float]
    extra: dict

    @classmethod
    def read(cls, card_path: Path) -> ModelCard:
        try:
            data = json.loads(Path(card_path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"model card '{card_path}' cannot be read ({exc}); restore it from the release.") from exc
        required = ["name", "weights", "sha256", "architecture", "settings", "input_spacing_mm", "hu_window"]
        missing = [k for k in required if k not in data]
        if missing:
            raise ModelError(f"model card '{card_path}' lacks {', '.join(missing)}; it is not a DeepAbdominalReg card.")
        return cls(
            name=str(data["name"]),
            weights_path=(Path(card_path).parent / data["weights"]).resolve(),
            sha256=str(data["sha256"]).lower(),
            architecture=str(data["architecture"]),
            settings=dict(data["settings"]),
            input_spacing_mm=float(data["input_spacing_mm"]),
            hu_window=(float(data["hu_window"][0]), float(data["hu_window"][1])),
            extra={k: v for k, v in data.items() if k not in required},
        )


def available_models(directory: Path | None = None) -> dict[str, ModelCard]:
    """Cards of the shipped models, by name (cards that fail to parse are skipped)."""
    directory = directory or models_directory()
    cards = {}
    if directory.is_dir():
        for card_path in sorted(directory.glob("*.json")):
            try:
                card = ModelCard.read(card_path)
            except ModelError:
                continue
            cards[card.name] = card
    return cards


def resolve_model(name_or_path: str) -> ModelCard:
    """A shipped model's card by name, or the card beside a ``.pt`` file (``x.pt`` -> ``x.json``), or a card path."""
    path = Path(name_or_path)
    if path.suffix in (".pt", ".pth", ".json") or path.exists():
        card_path = path if path.suffix == ".json" else path.with_suffix(".json")
        if not card_path.exists():
            raise ModelError(
                f"model '{name_or_path}' has no model card '{card_path.name}' beside it; a model needs its card "
                "(architecture, spacing, window, SHA-256) — save it with `deepabdominalreg train` or `save_model`."
            )
        return ModelCard.read(card_path)
    cards = available_models()
    if name_or_path not in cards:
        known = ", ".join(sorted(cards)) or "none shipped"
        raise ModelError(f"unknown model '{name_or_path}'; available: {known}; or give a path to a .pt file.")
    return cards[name_or_path]


def _normalised(value):
    """Plain JSON form (tuples -> lists, ints -> floats) so card and checkpoint values compare equal."""
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalised(v) for k, v in value.items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return round(float(value), 9)
    return value


def load_model(name_or_path: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Verify (SHA-256, card vs checkpoint) and load a model in eval mode on ``device``.

    Raises :class:`ModelError` with a clear message for a missing, corrupt, tampered or inconsistent model.
    """
    import torch

    from deepabdominalreg.nn.networks import build_network

    card = resolve_model(name_or_path)
    if not card.weights_path.exists():
        raise ModelError(f"weights file '{card.weights_path}' of model '{card.name}' is missing; reinstall the model.")
    actual = sha256_of(card.weights_path)
    if actual != card.sha256:
        raise ModelError(
            f"weights file '{card.weights_path}' does not match its model card (SHA-256 {actual[:12]}… expected "
            f"{card.sha256[:12]}…): the file is corrupt or was changed; reinstall it or retrain."
        )
    try:
        checkpoint = torch.load(card.weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure is a bad model file
        raise ModelError(
            f"weights file '{card.weights_path}' cannot be loaded safely ({type(exc).__name__}: {exc}); only plain "
            "tensors are accepted (weights_only=True)."
        ) from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelError(f"'{card.weights_path}' is not a DeepAbdominalReg checkpoint (no state_dict).")
    for key, card_value in (
        ("architecture", card.architecture),
        ("settings", card.settings),
        ("input_spacing_mm", card.input_spacing_mm),
        ("hu_window", list(card.hu_window)),
    ):
        if _normalised(checkpoint.get(key)) != _normalised(card_value):
            raise ModelError(
                f"model '{card.name}': the checkpoint's {key} ({checkpoint.get(key)}) differs from its card "
                f"({card_value}); the card does not describe these weights — refusing to use them."
            )
    try:
        network = build_network(card.architecture, card.settings)
        network.load_state_dict(checkpoint["state_dict"])
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ModelError(f"model '{card.name}' does not fit its architecture: {exc}") from exc
    network.eval()
    return network.to(device), card


def save_model(
    network: torch.nn.Module,
    architecture: str,
    settings: dict,
    weights_path: str | os.PathLike,
    *,
    name: str,
    input_spacing_mm: float,
    hu_window: tuple[float, float],
    extra: dict | None = None,
) -> ModelCard:
    """Save weights (plain tensors only) and write the card beside them with the file's SHA-256."""
    import torch

    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "architecture": architecture,
        "settings": settings,
        "input_spacing_mm": float(input_spacing_mm),
        "hu_window": [float(hu_window[0]), float(hu_window[1])],
    }
    tmp = weights_path.with_suffix(".pt.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, weights_path)
    card = {
        "name": name,
        "weights": weights_path.name,
        "sha256": sha256_of(weights_path),
        "size_bytes": weights_path.stat().st_size,
        "architecture": architecture,
        "settings": settings,
        "input_spacing_mm": float(input_spacing_mm),
        "hu_window": [float(hu_window[0]), float(hu_window[1])],
        **(extra or {}),
    }
    card_path = weights_path.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2))
    return ModelCard.read(card_path)
