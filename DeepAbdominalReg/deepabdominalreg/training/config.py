"""Training settings (:class:`TrainingConfig`), read from the JSON files in ``training/configs/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.training.augmentation import AugmentationConfig

REGULARISERS = ("diffusion", "bending", "jacobian")
SIMILARITIES = ("ncc", "ssim", "mse", "dice", "hausdorff", "supervised", "inverse_consistency")
NETWORK_TERMS = ("auxiliary", "segmentation")
"""Terms the network itself gives from its last forward pass, weighted as the regularisers (fixed weight):
``auxiliary``, its ``auxiliary_losses(fixed, moving, pred)`` summed (e.g. the bending energy of DLIR's B-spline
control points), and
``segmentation``, its ``segmentation_loss(fixed_labels, moving_labels)`` on the pair's label maps (pairs without
labels leave it out; e.g. SemanticPyramidNet's soft Dice + cross-entropy of its segmentation head)."""


@dataclass
class TrainingConfig:
    """Everything a training run needs (JSON/TOML keys are these field names; unknown keys are an error)."""

    name: str = "model"
    """Model name (card ``name``)."""
    out_dir: str = "runs/model"
    """Checkpoints, ``metrics.csv``, ``metrics.png``, ``config.json`` (resumable from ``last.pt``)."""
    model_dir: str | None = None
    """Where the best model and its card are saved (``NAME.pt`` + ``NAME.json``); default ``out_dir``."""
    cache_dir: str = "runs/cache"
    seed: int = 0

    # data
    spacing_mm: float = 6.0
    hu_window: tuple[float, float] = RegistrationConfig.hu_window
    crop_size: tuple[int, int, int] = (48, 64, 64)
    """Training crop ``(D, H, W)`` in voxels (multiples of the network's divisor); volumes are padded to it."""
    phantom_seeds: list[int] = field(default_factory=lambda: list(range(1000, 1030)))
    phantom_motion_fields: int = 2
    """Realistic abdominal motion fields precomputed per phantom (prior fields of the augmentation)."""
    phantom_motion_amplitude_mm: float = 10.0
    volumes: list[dict] = field(default_factory=list)
    """``{"image": path, "labels": path | None, "masks": {id: path}, "patient": str, "time": number}``."""
    volumes_csv: str | None = None
    volumes_folder: str | None = None
    source_weights: dict = field(default_factory=lambda: {"phantom": 0.8, "volumes": 0.2})
    pair_weights: dict = field(default_factory=lambda: {"intra": 1.0, "inter": 0.0, "longitudinal": 0.0})
    label_ids: list[int] | None = None
    """Labels used for segmentation guidance (one-hot channels); ``None``: every label found in the data."""
    augmentation: dict = field(default_factory=dict)
    """:class:`deepabdominalreg.training.augmentation.AugmentationConfig` fields."""

    # network
    architecture: str = "RegistrationUNet"
    network: dict = field(default_factory=lambda: {"encoder_channels": [16, 32, 32, 32],
                                                   "decoder_channels": [32, 32, 32, 16],
                                                   "final_channels": [16], "integration_steps": 0})
    flow_init_std: float | None = None
    """Re-initialise the last (flow) convolution with this standard deviation when training from scratch
    (``None``: the network's own ~1e-5, VoxelMorph's choice, which makes the first hundreds of steps very slow)."""
    init_model: str | None = None
    """Start from this model (name or ``.pt``): transfer learning; its architecture and settings are used."""
    freeze_encoder_epochs: int = 0
    """Two-step fine-tuning: the encoder is frozen for this many epochs, then everything trains."""

    # losses
    loss_weights: dict = field(default_factory=lambda: {"ncc": 1.0, "dice": 1.0, "supervised": 0.1,
                                                        "diffusion": 0.005, "jacobian": 0.1})
    """Initial weight of each term (0 or absent: off).  Terms: ncc, ssim, mse, dice, hausdorff, supervised,
    inverse_consistency, diffusion, bending, jacobian, auxiliary and segmentation (the network's own terms, the
    second on the pair's labels: :data:`NETWORK_TERMS`)."""
    uncertainty_weighting: bool = True
    """Learn the similarity terms' weights (Kendall et al. 2018; DDMR); regularisers keep their weight."""
    learn_regulariser_weights: bool = False
    ncc_window: int = 9
    label_loss_downsample: int = 2
    """Dice/boundary terms on one-hot labels average-pooled by this factor (and the field averaged likewise):
    the guidance keeps its meaning at a fraction of the cost of warping every label channel at full size."""

    # optimisation
    learning_rate: float = 1e-3
    epochs: int = 100
    iterations_per_epoch: int = 50
    accumulation_steps: int = 8
    """Gradient accumulation (DDMR: batch 1 x 8)."""
    gradient_clip_norm: float | None = 5.0
    """Clip the global gradient norm before each optimiser step (``None``: off).  Added after an unclipped run
    (lr 1e-3, batch 1) diverged at iteration ~1,350 (``abdomen-ct-4mm-v2``, epoch 14)."""
    monitor: str = "val_epe_mm"
    """Validation metric for ReduceLROnPlateau and the best checkpoint: ``val_epe_mm`` (minimised; continuous,
    so it moves from the first steps) or ``val_dice`` (maximised; nearest-neighbour Dice is stepwise at first)."""
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    min_learning_rate: float = 1e-6
    max_minutes: float | None = None
    """Stop after this wall time (the run ends at an epoch boundary, with its checkpoints)."""
    linear_lr_decay_to: float | None = None
    """Incremental training: decay the learning rate linearly to this value over the run."""

    # validation
    validation_seeds: list[int] = field(default_factory=lambda: [900, 901, 902])
    validation_amplitude_mm: float = 10.0

    # execution
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``.  The pairs are cropped on the CPU and augmented on this device."""
    threads: int | None = None
    data_workers: int = 1
    """Processes that render the phantom pool in parallel before training (each phantom once, then cached)."""
    resume: bool = True
    progress: bool = True

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        values = dict(data)
        for key in ("hu_window", "crop_size"):
            if key in values:
                values[key] = tuple(values[key])
        config = cls(**values)
        AugmentationConfig.from_dict(config.augmentation)  # validate early
        for name in config.loss_weights:
            if name not in SIMILARITIES + REGULARISERS + NETWORK_TERMS:
                raise ValueError(f"unknown loss term {name!r}; known: {SIMILARITIES + REGULARISERS + NETWORK_TERMS}")
        return config

    def replace(self, **changes) -> TrainingConfig:
        return dataclasses.replace(self, **changes)


def load_config(path: str | os.PathLike, **overrides) -> TrainingConfig:
    """A :class:`TrainingConfig` from a JSON or TOML file, plus keyword overrides (``None`` values ignored)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainingConfig.from_dict(data)
