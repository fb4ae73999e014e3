"""Training framework of the registration networks: data, on-the-fly pairs, losses, the loop, fine-tuning.

Data (all brought onto one isotropic grid of ``spacing_mm``, the model's input spacing, with the model's HU window
and body mask, exactly as :func:`deepabdominalreg.registration.register_pair` prepares the network's input):

* the procedural phantom (:mod:`deepabdominalreg.phantom`) as a built-in source: a pool of ``phantom_seeds``
  rendered once and cached under ``cache_dir`` (``.npz``), each with a few precomputed realistic abdominal motion
  fields (:func:`deepabdominalreg.synthetic.synthetic_abdominal_motion`);
* CT volumes with optional label maps (NIfTI/NRRD/MHA), listed in the config (``volumes``), in a CSV
  (``volumes_csv``: columns ``image, labels, patient, time``) or found in a folder (``volumes_folder``:
  ``NAME.nii.gz`` + optional ``NAME_seg.nii.gz``);
* pairs made on the fly (:class:`PairSampler`): ``intra`` (one volume and a synthetic deformation of it, with the
  true field; :class:`deepabdominalreg.augmentation.PairAugmentation`), ``inter`` (two patients) and
  ``longitudinal`` (two time points of one patient).

Displacements are ``(B, 3, D, H, W)`` in voxels of the training grid, channels ``(d, h, w)``; the network maps a
fixed voxel ``p`` to the moving voxel ``p + disp(p)``, as at inference.

Training (:func:`train`): Adam, gradient accumulation, ReduceLROnPlateau on the validation Dice, best-validation
checkpointing (and saving the model with its card through :func:`deepabdominalreg.models.save_model`), resumable
from ``out_dir/last.pt``, deterministic for a seed, a progress line with the losses and the uncertainty weights,
``metrics.csv`` + ``metrics.png`` per epoch.  Transfer learning (``init_model``, ``freeze_encoder_epochs``) and
incremental training (:func:`train_incremental`).  Multi-GPU / multi-node: launch with ``torchrun``; the
``WORLD_SIZE`` environment variable switches on ``DistributedDataParallel`` (one code path; a single process
otherwise).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from deepabdominalreg import losses, spatial
from deepabdominalreg.augmentation import AugmentationConfig, PairAugmentation
from deepabdominalreg.image import Grid, make_working_grid, read_image, read_labels, resample_image
from deepabdominalreg.models import load_model, save_model
from deepabdominalreg.networks import build_network
from deepabdominalreg.preprocessing import prepare_working_image

__all__ = [
    "METHODS",
    "LossComputer",
    "PairSampler",
    "TrainingConfig",
    "Volume",
    "displacement_mm_to_vox",
    "evaluate_methods",
    "load_config",
    "load_volumes",
    "make_validation_pairs",
    "methods_table",
    "prepare_phantom_pool",
    "train",
    "train_incremental",
]

REGULARISERS = ("diffusion", "bending", "jacobian")
SIMILARITIES = ("ncc", "ssim", "mse", "dice", "hausdorff", "supervised", "inverse_consistency")


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
    hu_window: tuple[float, float] = (-160.0, 240.0)
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
    """:class:`deepabdominalreg.augmentation.AugmentationConfig` fields."""

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
    inverse_consistency, diffusion, bending, jacobian."""
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
            if name not in SIMILARITIES + REGULARISERS:
                raise ValueError(f"unknown loss term {name!r}; known: {SIMILARITIES + REGULARISERS}")
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


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """One volume on the training grid: ``intensity`` (zyx float32 in [0, 1], body-masked), ``mask`` (zyx bool),
    ``labels`` (zyx int16, 0 = none), ``fields`` (``(K, 3, D, H, W)`` float32 prior displacements in voxels)."""

    key: str
    patient: str
    time: float
    intensity: np.ndarray
    mask: np.ndarray
    labels: np.ndarray | None
    fields: np.ndarray | None = None


def displacement_mm_to_vox(field_mm_zyx3: np.ndarray, grid: Grid) -> np.ndarray:
    """``(D, H, W, 3)`` LPS-mm displacement on ``grid`` -> ``(3, D, H, W)`` voxels, channels ``(d, h, w)``."""
    matrix_inv = np.linalg.inv(grid.direction_matrix @ np.diag(grid.spacing))
    vox_xyz = np.asarray(field_mm_zyx3, dtype=np.float64) @ matrix_inv.T  # (i, j, k) = (w, h, d)
    return np.ascontiguousarray(np.moveaxis(vox_xyz[..., ::-1], -1, 0).astype(np.float32))


def _working_volume(image: sitk.Image, labels: sitk.Image | None, grid: Grid, hu_window) -> tuple:
    w = prepare_working_image(image, grid, hu_window, True)
    lab = None
    if labels is not None:
        lab = sitk.GetArrayFromImage(resample_image(labels, grid, interpolator="nearest", default_value=0))
        lab = lab.astype(np.int16)
    return w, lab


def _motion_fields(hu_image: sitk.Image, labels_image: sitk.Image | None, grid: Grid, seeds: Sequence[int],
                   amplitude_mm: float) -> np.ndarray:
    from deepabdominalreg.synthetic import synthetic_abdominal_motion

    fields = []
    for seed in seeds:
        u = synthetic_abdominal_motion(hu_image, labels_image, seed=int(seed), amplitude_mm=amplitude_mm,
                                       rigid_shift_mm=0.0, rotation_deg=0.0)
        fields.append(displacement_mm_to_vox(sitk.GetArrayFromImage(u), grid))
    return np.stack(fields) if fields else np.zeros((0, 3, *grid.shape_zyx), np.float32)


def prepare_phantom_pool(config: TrainingConfig, seeds: Sequence[int] | None = None, log=print) -> list[Volume]:
    """Render (or read from ``cache_dir``) the phantom patients at the training spacing, with prior fields
    (``config.data_workers`` processes render the missing ones in parallel)."""
    cache = Path(config.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in (config.phantom_seeds if seeds is None else seeds)]
    paths = {seed: _phantom_cache_path(config, seed) for seed in seeds}
    missing = [seed for seed in seeds if not paths[seed].exists()]
    workers = max(1, min(int(config.data_workers), len(missing)))
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        # spawned (not forked) workers, one torch thread each: safe after torch (and CUDA) are initialised here
        t0 = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=torch.set_num_threads, initargs=(1,)) as ex:
            list(ex.map(_render_phantom_to_cache, [config] * len(missing), missing))
        log(f"{len(missing)} phantoms rendered by {workers} processes in {time.perf_counter() - t0:.1f} s")
    else:
        for seed in missing:
            t0 = time.perf_counter()
            shape = _render_phantom_to_cache(config, seed)
            log(f"phantom {seed}: {shape} rendered in {time.perf_counter() - t0:.1f} s")
    pool = []
    for seed in seeds:
        data = np.load(paths[seed])
        pool.append(Volume(f"phantom{seed}", f"phantom{seed}", 0.0, data["intensity"], data["mask"],
                           data["labels"], data["fields"]))
    return pool


def _phantom_cache_path(config: TrainingConfig, seed: int) -> Path:
    return Path(config.cache_dir) / (f"phantom_s{int(seed)}_{config.spacing_mm:g}mm_w{config.hu_window[0]:g}_"
                                     f"{config.hu_window[1]:g}_f{config.phantom_motion_fields}.npz")


def _render_phantom_to_cache(config: TrainingConfig, seed: int) -> tuple[int, int, int]:
    """Render phantom ``seed`` at the training spacing with its prior motion fields into the cache (atomic write);
    returns the grid shape ``(D, H, W)``."""
    from deepabdominalreg.phantom import add_ct_noise, render_phantom

    path = _phantom_cache_path(config, seed)
    clean, labels = render_phantom(int(seed), config.spacing_mm)
    noisy = add_ct_noise(clean, seed=int(seed) + 555, sigma_hu=15.0)
    grid = Grid.from_image(clean)
    w, lab = _working_volume(noisy, labels, grid, config.hu_window)
    fields = _motion_fields(clean, labels, grid, [int(seed) * 10 + k for k in range(config.phantom_motion_fields)],
                            config.phantom_motion_amplitude_mm)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, intensity=w.intensity, mask=w.mask, labels=lab, fields=fields)
    os.replace(tmp, path)
    return tuple(grid.shape_zyx)


def _volume_entries(config: TrainingConfig) -> list[dict]:
    entries = [dict(e) for e in config.volumes]
    if config.volumes_csv:
        base = Path(config.volumes_csv).parent
        with open(config.volumes_csv, newline="") as handle:
            for row in csv.DictReader(handle):
                entry = {k: (v if v not in ("", None) else None) for k, v in row.items()}
                for key in ("image", "labels"):
                    if entry.get(key) and not Path(entry[key]).is_absolute():
                        entry[key] = str(base / entry[key])
                entries.append(entry)
    if config.volumes_folder:
        folder = Path(config.volumes_folder)
        suffixes = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
        for path in sorted(folder.iterdir()):
            name = path.name
            suffix = next((s for s in suffixes if name.endswith(s)), None)
            stem = name[: -len(suffix)] if suffix else None
            if suffix is None or stem.endswith(("_seg", "_labels")):
                continue
            seg = next((folder / f"{stem}{tag}{s}" for tag in ("_seg", "_labels") for s in suffixes
                        if (folder / f"{stem}{tag}{s}").exists()), None)
            entries.append({"image": str(path), "labels": str(seg) if seg else None, "patient": stem})
    return entries


def load_volumes(config: TrainingConfig, log=print) -> list[Volume]:
    """Read the CT volumes of the config onto the training grid (cached), with labels and one prior field each.

    ``masks`` (``{label_id: path to a binary mask}``) builds a label map from separate masks (e.g. the vessel
    masks of a crop); later masks overwrite earlier ones.
    """
    cache = Path(config.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    volumes = []
    for index, entry in enumerate(_volume_entries(config)):
        image_path = Path(entry["image"])
        digest = hashlib.sha1(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()[:10]
        key = f"{image_path.name.split('.')[0]}_{digest}"
        path = cache / f"volume_{key}_{config.spacing_mm:g}mm_w{config.hu_window[0]:g}_{config.hu_window[1]:g}.npz"
        patient = str(entry.get("patient") or image_path.name.split(".")[0])
        t = float(entry.get("time") or 0.0)
        if path.exists():
            data = np.load(path)
            volumes.append(Volume(key, patient, t, data["intensity"], data["mask"],
                                  data["labels"] if data["labels"].size else None, data["fields"]))
            continue
        image = read_image(image_path, "training CT")
        labels = read_labels(entry["labels"], "training labels") if entry.get("labels") else None
        if entry.get("masks"):
            merged = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.int16)
            for label_id, mask_path in entry["masks"].items():
                m = resample_image(read_labels(mask_path, "mask"), image, interpolator="nearest", default_value=0)
                merged[sitk.GetArrayViewFromImage(m) > 0] = int(label_id)
            labels = sitk.GetImageFromArray(merged)
            labels.CopyInformation(image)
        grid = make_working_grid(image, config.spacing_mm)
        w, lab = _working_volume(image, labels, grid, config.hu_window)
        hu = grid.image_from_array(w.hu)
        lab_img = grid.image_from_array(lab.astype(np.uint8)) if lab is not None else None
        fields = _motion_fields(hu, lab_img, grid, [index], config.phantom_motion_amplitude_mm)
        np.savez_compressed(path, intensity=w.intensity, mask=w.mask,
                            labels=lab if lab is not None else np.zeros(0, np.int16), fields=fields)
        volumes.append(Volume(key, patient, t, w.intensity, w.mask, lab, fields))
        log(f"volume {image_path.name}: {grid.shape_zyx} at {config.spacing_mm:g} mm")
    return volumes


def make_validation_pairs(config: TrainingConfig, seeds: Sequence[int] | None = None) -> list[dict]:
    """Held-out phantom pairs (:func:`deepabdominalreg.synthetic.make_phantom_pair` at the training spacing, with
    noise and the default rigid motion) as tensors: fixed, moving, labels, body mask, true ``disp`` (voxels)."""
    from deepabdominalreg.synthetic import make_phantom_pair

    cache = Path(config.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    pairs = []
    for seed in (config.validation_seeds if seeds is None else seeds):
        path = cache / (f"val_s{int(seed)}_{config.spacing_mm:g}mm_a{config.validation_amplitude_mm:g}_"
                        f"w{config.hu_window[0]:g}_{config.hu_window[1]:g}.npz")
        if not path.exists():
            pair = make_phantom_pair(int(seed), config.spacing_mm, config.validation_amplitude_mm)
            grid = Grid.from_image(pair.fixed_image)
            f, flab = _working_volume(pair.fixed_image, pair.fixed_labels, grid, config.hu_window)
            m, mlab = _working_volume(pair.moving_image, pair.moving_labels, grid, config.hu_window)
            disp = displacement_mm_to_vox(sitk.GetArrayFromImage(pair.displacement_fixed_to_moving), grid)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, fixed=f.intensity, moving=m.intensity, fixed_mask=f.mask,
                                fixed_labels=flab, moving_labels=mlab, disp=disp)
            os.replace(tmp, path)
        data = np.load(path)
        pairs.append({k: torch.as_tensor(data[k].astype(np.float32 if k != "fixed_mask" else bool))[None]
                      for k in data.files})
        for k in ("fixed", "moving", "fixed_mask", "fixed_labels", "moving_labels"):
            pairs[-1][k] = pairs[-1][k][None] if pairs[-1][k].ndim == 4 else pairs[-1][k]
    return pairs


def _crop_or_pad(arrays: list[torch.Tensor | None], size: tuple[int, int, int], generator) -> list:
    """Pad (zeros, centred) each ``(1, C, D, H, W)`` tensor to at least ``size``, then one random crop for all."""
    ref = next(a for a in arrays if a is not None)
    shape = ref.shape[-3:]
    pads = [max(t - s, 0) for s, t in zip(shape, size)]
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        pad = []
        for p in reversed(pads):
            pad += [p // 2, p - p // 2]
        out.append(torch.nn.functional.pad(a, pad))
    shape = out[0].shape[-3:] if out[0] is not None else ref.shape[-3:]
    starts = [int(torch.randint(0, s - t + 1, (), generator=generator)) for s, t in zip(shape, size)]
    box = tuple(slice(st, st + t) for st, t in zip(starts, size))
    return [None if a is None else a[(Ellipsis, *box)].contiguous() for a in out]


class PairSampler:
    """Draws training pairs (dicts of ``(1, C, D, H, W)`` tensors of the crop size) from the sources.

    ``phantom`` and ``volumes`` are chosen by ``source_weights``; the pair kind (``intra``, ``inter``,
    ``longitudinal``) by ``pair_weights`` among the kinds possible for the source.  ``disp`` (the true field) is
    ``None`` for inter-patient and longitudinal pairs.  Labels are integer label maps ``(1, 1, D, H, W)`` (float
    values) keeping only ``label_ids``; the loss makes them one-hot.

    The crop is taken on the CPU and moved to ``device``; the augmentation (fields, warping, intensity changes)
    runs there.  Random draws come from ``generator`` (a CPU generator) whatever the device, so a seed gives the
    same pairs on the CPU and on a GPU (up to floating-point differences).
    """

    def __init__(self, config: TrainingConfig, phantoms: list[Volume], volumes: list[Volume],
                 label_ids: list[int], generator: torch.Generator, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.sources = {"phantom": phantoms, "volumes": volumes}
        self.label_ids = list(label_ids)
        self.generator = generator
        self.augment = PairAugmentation(AugmentationConfig.from_dict(config.augmentation))
        self.spacing = float(config.spacing_mm)
        by_patient: dict[str, list[Volume]] = {}
        for v in volumes:
            by_patient.setdefault(v.patient, []).append(v)
        self.longitudinal = {p: sorted(vs, key=lambda v: v.time) for p, vs in by_patient.items() if len(vs) > 1}

    def _choice(self, weights: dict[str, float]) -> str:
        names = [k for k, w in weights.items() if w > 0]
        w = torch.tensor([float(weights[k]) for k in names], dtype=torch.float64)
        return names[int(torch.multinomial(w, 1, generator=self.generator))]

    def _tensors(self, v: Volume, field_index: int | None = None):
        image = torch.as_tensor(v.intensity)[None, None]
        mask = torch.as_tensor(v.mask.astype(np.float32))[None, None]
        labels = None
        if v.labels is not None and self.label_ids:
            keep = np.isin(v.labels, self.label_ids)
            labels = torch.as_tensor(np.where(keep, v.labels, 0).astype(np.float32))[None, None]
        prior = None
        if field_index is not None and v.fields is not None and len(v.fields):
            prior = torch.as_tensor(v.fields[field_index])[None]
        return image, labels, mask, prior

    def _to_device(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return [None if t is None else t.to(self.device, non_blocking=True) for t in tensors]

    def __call__(self) -> dict:
        weights = {k: w for k, w in self.config.source_weights.items() if self.sources.get(k)}
        if not weights:
            raise ValueError("no training data: give phantom_seeds and/or volumes")
        source = self._choice(weights)
        pool = self.sources[source]
        kinds = {"intra": self.config.pair_weights.get("intra", 1.0)}
        if len({v.patient for v in pool}) > 1:
            kinds["inter"] = self.config.pair_weights.get("inter", 0.0)
        if source == "volumes" and self.longitudinal:
            kinds["longitudinal"] = self.config.pair_weights.get("longitudinal", 0.0)
        kind = self._choice(kinds) if any(w > 0 for w in kinds.values()) else "intra"
        g = self.generator
        if kind == "intra":
            v = pool[int(torch.randint(len(pool), (), generator=g))]
            nf = 0 if v.fields is None else len(v.fields)
            fi = int(torch.randint(nf, (), generator=g)) if nf else None
            image, labels, mask, prior = self._tensors(v, fi)
            image, labels, mask, prior = self._to_device(
                _crop_or_pad([image, labels, mask, prior], self.config.crop_size, g))
            pair = self.augment(image, labels, mask, self.spacing, prior_field=prior, generator=g)
        else:
            if kind == "inter":
                i, j = torch.randperm(len(pool), generator=g)[:2].tolist()
                a, b = pool[i], pool[j]
                if a.patient == b.patient:
                    b = pool[(j + 1) % len(pool)]
            else:
                series = list(self.longitudinal.values())[int(torch.randint(len(self.longitudinal), (),
                                                                          generator=g))]
                i, j = sorted(torch.randperm(len(series), generator=g)[:2].tolist())
                a, b = series[j], series[i]  # later time point fixed, earlier moving
            fa, la, ma, _ = self._tensors(a)
            fb, lb, mb, _ = self._tensors(b)
            # two grids of different size: pad both to the crop, then crop the same box
            fa, la, ma = self._to_device(_crop_or_pad([fa, la, ma], self.config.crop_size, g))
            fb, lb, mb = self._to_device(_crop_or_pad([fb, lb, mb], self.config.crop_size, g))
            pair = {"fixed": self.augment.intensity(fa, ma, g), "moving": self.augment.intensity(fb, mb, g),
                    "fixed_mask": ma, "moving_mask": mb, "fixed_labels": la, "moving_labels": lb, "disp": None}
        pair["kind"] = kind
        pair["source"] = source
        return pair


# ----------------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------------


class LossComputer(nn.Module):
    """All loss terms of one pair, weighted (optionally by learnable uncertainty weights)."""

    def __init__(self, config: TrainingConfig, label_ids: Sequence[int] = ()) -> None:
        super().__init__()
        self.config = config
        self.label_ids = [int(i) for i in label_ids]
        self.active = {k: float(w) for k, w in config.loss_weights.items() if w and float(w) > 0}
        if not self.active:
            raise ValueError("no active loss term (every weight is 0)")
        learnable = set()
        if config.uncertainty_weighting:
            learnable = {k for k in self.active if k in SIMILARITIES or config.learn_regulariser_weights}
        self.weighting = losses.UncertaintyWeighting(self.active, learnable, offsets={"ncc": 1.0})

    def _present_ids(self, pair: dict) -> list[int]:
        """Guidance labels present in the fixed or the moving crop (one-hot channels only for those)."""
        present = set(torch.unique(pair["fixed_labels"]).long().tolist()) | \
            set(torch.unique(pair["moving_labels"]).long().tolist())
        return [i for i in self.label_ids if i in present] or self.label_ids[:1]

    def terms(self, network: nn.Module, pair: dict, pred: torch.Tensor) -> dict[str, torch.Tensor]:
        fixed, moving, mask = pair["fixed"], pair["moving"], pair["fixed_mask"]
        out: dict[str, torch.Tensor] = {}
        a = self.active
        if "ncc" in a or "ssim" in a or "mse" in a:
            warped = spatial.warp(moving, pred)
            if "ncc" in a:
                out["ncc"] = losses.local_ncc_loss(fixed, warped, self.config.ncc_window)
            if "ssim" in a:
                out["ssim"] = losses.ssim_loss(fixed, warped)
            if "mse" in a:
                out["mse"] = losses.mse_loss(fixed, warped)
        if ("dice" in a or "hausdorff" in a) and pair.get("moving_labels") is not None and self.label_ids:
            ids = self._present_ids(pair)
            fixed_onehot = losses.one_hot(pair["fixed_labels"].round().long(), ids)
            moving_onehot = losses.one_hot(pair["moving_labels"].round().long(), ids)
            f = int(self.config.label_loss_downsample)
            if f > 1:
                # cell-centred pooling: coarse voxel q is the centre of fine cell [f q, f q + f); the field is
                # averaged over the cell and expressed in coarse voxels
                fixed_onehot = F.avg_pool3d(fixed_onehot, f)
                moving_onehot = F.avg_pool3d(moving_onehot, f)
                warped_labels = spatial.warp(moving_onehot, F.avg_pool3d(pred, f) / f)
            else:
                warped_labels = spatial.warp(moving_onehot, pred)
            if "dice" in a:
                out["dice"] = losses.dice_loss(fixed_onehot, warped_labels)
            if "hausdorff" in a:
                out["hausdorff"] = losses.hausdorff_dt_loss(fixed_onehot, warped_labels)
        if "supervised" in a and pair.get("disp") is not None:
            out["supervised"] = losses.supervised_displacement_loss(pred, pair["disp"], mask,
                                                                    self.config.spacing_mm, squared=False)
        if "inverse_consistency" in a:
            backward = network(moving, fixed)
            out["inverse_consistency"] = losses.inverse_consistency_loss(pred, backward)
        if "diffusion" in a:
            out["diffusion"] = losses.diffusion_regulariser(pred)
        if "bending" in a:
            out["bending"] = losses.bending_energy(pred)
        if "jacobian" in a:
            out["jacobian"] = losses.negative_jacobian_penalty(pred)
        return out

    def forward(self, network: nn.Module, pair: dict, pred: torch.Tensor):
        terms = self.terms(network, pair, pred)
        return self.weighting(terms), terms


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


def _dice_mean(fixed_labels: torch.Tensor, warped_labels: torch.Tensor) -> float:
    ids = [int(i) for i in torch.unique(fixed_labels) if i > 0]
    values = []
    for i in ids:
        a, b = fixed_labels == i, warped_labels == i
        values.append(float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1)))
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def validate(network: nn.Module, pairs: list[dict], spacing_mm: float) -> dict:
    """Mean Dice (nearest-neighbour warped labels), endpoint error in the body (mm) and folding % over ``pairs``."""
    network.eval()
    dice, dice_before, epe, folding = [], [], [], []
    for p in pairs:
        pred = network.predict(p["fixed"], p["moving"])
        warped = spatial.warp(p["moving_labels"], pred, mode="nearest")
        dice.append(_dice_mean(p["fixed_labels"], warped))
        dice_before.append(_dice_mean(p["fixed_labels"], p["moving_labels"]))
        mask = p["fixed_mask"][:, 0]
        err = torch.linalg.norm((pred - p["disp"]) * spacing_mm, dim=1)[mask]
        epe.append(float(err.mean()))
        det = spatial.jacobian_determinant(pred)
        folding.append(100.0 * float(((det <= 0) & mask).sum()) / max(int(mask.sum()), 1))
    network.train()
    return {"val_dice": float(np.mean(dice)), "val_dice_before": float(np.mean(dice_before)),
            "val_epe_mm": float(np.mean(epe)), "val_folding_percent": float(np.mean(folding))}


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment (1, 0, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _device(config: TrainingConfig, local_rank: int) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(config.device)


def _to(pair: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in pair.items()}


class _Progress:
    """A one-line progress bar (stderr on a terminal, else a line every ``every`` iterations)."""

    def __init__(self, enabled: bool, every: int = 10) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.every = every

    def __call__(self, epoch: int, it: int, total: int, values: dict, weights: dict) -> None:
        if not self.enabled:
            return
        done = int(20 * it / max(total, 1))
        text = (f"epoch {epoch} [{'#' * done}{'.' * (20 - done)}] {it}/{total} "
                + " ".join(f"{k}={v:.4f}" for k, v in values.items())
                + " | w " + " ".join(f"{k}={v:.3g}" for k, v in weights.items()))
        if self.tty:
            sys.stderr.write("\r" + text[:200])
            sys.stderr.flush()
            if it == total:
                sys.stderr.write("\n")
        elif it % self.every == 0 or it == total:
            print(text, flush=True)


def _write_history(history: list[dict], out_dir: Path) -> None:
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    path = out_dir / "metrics.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in history]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for k in keys:
            if k.startswith("train_") and k != "train_seconds":
                axes[0].plot(epochs, [r.get(k, np.nan) for r in history], label=k[6:])
            if k.startswith("weight_"):
                axes[2].semilogy(epochs, [r.get(k, np.nan) for r in history], label=k[7:])
        axes[0].set_title("training losses")
        axes[0].legend(fontsize=7)
        axes[1].plot(epochs, [r["val_dice"] for r in history], label="val Dice")
        ax2 = axes[1].twinx()
        ax2.plot(epochs, [r["val_epe_mm"] for r in history], color="C3", label="val EPE (mm)")
        axes[1].set_title("validation: Dice (blue), EPE mm (red)")
        axes[2].set_title("loss weights")
        axes[2].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png", dpi=90)
        plt.close(fig)
    except Exception as exc:  # noqa: BLE001 - a plot must never stop training
        print(f"warning: metrics plot failed ({exc})", file=sys.stderr)


def _label_ids(config: TrainingConfig, phantoms: list[Volume], volumes: list[Volume]) -> list[int]:
    if config.label_ids is not None:
        return [int(i) for i in config.label_ids]
    found: set[int] = set()
    for v in phantoms + volumes:
        if v.labels is not None:
            found |= {int(i) for i in np.unique(v.labels)} - {0}
    return sorted(found)


def _card_extra(config: TrainingConfig, history: list[dict], best: dict, seconds: float, command: str | None,
                label_ids: list[int]) -> dict:
    return {
        "description": f"{config.architecture} (displacement output, voxels of the input grid) trained "
                       "with deepabdominalreg.training on synthetic pairs.",
        "training": {
            "command": command,
            "config": config.to_dict(),
            "data": {
                "phantom_seeds": [min(config.phantom_seeds), max(config.phantom_seeds)] if config.phantom_seeds else [],
                "volumes": [e.get("image") for e in _volume_entries(config)],
                "validation_phantom_seeds": list(config.validation_seeds),
            },
            "label_ids": label_ids,
            "epochs": len(history),
            "iterations": int(sum(r.get("iterations", 0) for r in history)),
            "seconds": round(seconds, 1),
            "hardware": _hardware_description(config),
        },
        "validation": best,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _hardware_description(config: TrainingConfig) -> str:
    """Where the run trained: the GPU (when the device is CUDA), the host's CPU threads and torch's version."""
    host = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    if config.device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA); host {host}"
    return host


def _build(config: TrainingConfig) -> tuple[nn.Module, str, dict]:
    if config.init_model:
        network, card = load_model(config.init_model)
        network.train()
        if abs(card.input_spacing_mm - config.spacing_mm) > 1e-6:
            print(f"note: {card.name} was trained at {card.input_spacing_mm} mm; fine-tuning at "
                  f"{config.spacing_mm} mm", file=sys.stderr)
        return network, card.architecture, dict(card.settings)
    network = build_network(config.architecture, config.network)
    if config.flow_init_std is not None and hasattr(network, "flow"):
        nn.init.normal_(network.flow.weight, 0.0, float(config.flow_init_std))
    return network, config.architecture, build_network(config.architecture, config.network).config.as_dict()


def _set_encoder_frozen(network: nn.Module, frozen: bool) -> None:
    for p in network.encoders.parameters():
        p.requires_grad_(not frozen)


def train(
    config: TrainingConfig,
    *,
    command: str | None = None,
    log: Callable[[str], None] = print,
    volumes: list[Volume] | None = None,
) -> dict:
    """Train (or resume, or fine-tune) a registration network; returns a summary (best validation, paths, time).

    Deterministic for ``config.seed`` on the CPU (same data, same pairs, same updates).  Checkpoints under
    ``config.out_dir``: ``last.pt`` (every epoch; resumed from when ``config.resume``), ``best.pt``; the best
    model is saved with its card as ``model_dir/NAME.pt`` + ``NAME.json``.
    """
    world, rank, local_rank = _distributed()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    device = _device(config, local_rank)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    torch.manual_seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    main = rank == 0
    out_dir = Path(config.out_dir)
    model_dir = Path(config.model_dir) if config.model_dir else out_dir
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    t_data = time.perf_counter()
    phantoms = prepare_phantom_pool(config, log=log if main else (lambda _m: None)) \
        if config.source_weights.get("phantom", 0) > 0 else []
    volumes = load_volumes(config, log=log) if volumes is None else volumes
    val_pairs = [_to(p, device) for p in make_validation_pairs(config)]
    label_ids = _label_ids(config, phantoms, volumes)
    if main:
        log(f"data: {len(phantoms)} phantoms, {len(volumes)} volumes, {len(val_pairs)} validation pairs, "
            f"{len(label_ids)} labels ({time.perf_counter() - t_data:.0f} s)")

    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    sampler = PairSampler(config, phantoms, volumes, label_ids, generator, device)
    network, architecture, settings = _build(config)
    network = network.to(device)
    loss_fn = LossComputer(config, label_ids).to(device)
    optimiser = torch.optim.Adam(list(network.parameters()) + list(loss_fn.parameters()), lr=config.learning_rate)
    if config.monitor not in ("val_epe_mm", "val_dice"):
        raise ValueError(f"monitor must be 'val_epe_mm' or 'val_dice', got {config.monitor!r}")
    maximise = config.monitor == "val_dice"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="max" if maximise else "min", factor=config.plateau_factor, patience=config.plateau_patience,
        min_lr=config.min_learning_rate)
    history: list[dict] = []
    best = {"val_dice": -1.0, "val_epe_mm": math.inf}
    start_epoch = 0
    elapsed_before = 0.0
    last_path = out_dir / "last.pt"
    if config.resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state["network"])
        loss_fn.load_state_dict(state["loss"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        # the config may change the plateau settings of a resumed run
        scheduler.factor, scheduler.patience = config.plateau_factor, config.plateau_patience
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        best = dict(state["best"])
        start_epoch = int(state["epoch"])
        elapsed_before = float(state["seconds"])
        if main:
            log(f"resumed from {last_path} at epoch {start_epoch} (best {config.monitor} {best[config.monitor]:.4f})")
    model = network
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[local_rank] if device.type == "cuda" else None)

    if main and start_epoch == 0:
        before = validate(network, val_pairs, config.spacing_mm)
        log(f"validation before training: Dice {before['val_dice']:.4f} (no registration "
            f"{before['val_dice_before']:.4f}), EPE {before['val_epe_mm']:.2f} mm")
    progress = _Progress(config.progress and main)
    t_start = time.perf_counter()
    total_iterations = config.epochs * config.iterations_per_epoch
    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if config.max_minutes is not None and (elapsed_before + time.perf_counter() - t_start) / 60 \
                >= config.max_minutes:
            if main:
                log(f"time budget of {config.max_minutes} min reached")
            break
        if config.init_model or config.freeze_encoder_epochs:
            _set_encoder_frozen(network, epoch < config.freeze_encoder_epochs)
        t_epoch = time.perf_counter()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        network.train()
        optimiser.zero_grad(set_to_none=True)
        for it in range(1, config.iterations_per_epoch + 1):
            if config.linear_lr_decay_to is not None:
                done = (epoch * config.iterations_per_epoch + it - 1) / max(total_iterations, 1)
                for group in optimiser.param_groups:
                    group["lr"] = config.learning_rate + (config.linear_lr_decay_to - config.learning_rate) * done
            pair = _to(sampler(), device)
            pred = model(pair["fixed"], pair["moving"])
            total, terms = loss_fn(network, pair, pred)
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} iteration {it}: "
                                         f"{ {k: float(v) for k, v in terms.items()} }")
            (total / config.accumulation_steps).backward()
            if it % config.accumulation_steps == 0 or it == config.iterations_per_epoch:
                if config.gradient_clip_norm:
                    torch.nn.utils.clip_grad_norm_([p for group in optimiser.param_groups for p in group["params"]],
                                                   config.gradient_clip_norm)
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
            for k, v in {"total": total, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
                counts[k] = counts.get(k, 0) + 1
            progress(epoch + 1, it, config.iterations_per_epoch, {k: sums[k] / counts[k] for k in sums},
                     loss_fn.weighting.weights())
        val = validate(network, val_pairs, config.spacing_mm)
        if config.linear_lr_decay_to is None:
            scheduler.step(val[config.monitor])
        seconds = time.perf_counter() - t_epoch
        row = {"epoch": epoch + 1, "iterations": config.iterations_per_epoch,
               "lr": optimiser.param_groups[0]["lr"], "train_seconds": round(seconds, 1),
               **{f"train_{k}": sums[k] / counts[k] for k in sums}, **val,
               **{f"weight_{k}": w for k, w in loss_fn.weighting.weights().items()}}
        history.append(row)
        elapsed = elapsed_before + time.perf_counter() - t_start
        improved = val[config.monitor] > best[config.monitor] if maximise else \
            val[config.monitor] < best[config.monitor]
        if improved:
            best = {**val, "epoch": epoch + 1}
        if main:
            log(f"epoch {epoch + 1}: loss {row['train_total']:.4f}, val Dice {val['val_dice']:.4f}, EPE "
                f"{val['val_epe_mm']:.2f} mm, folding {val['val_folding_percent']:.3f}%, lr {row['lr']:.2g}, "
                f"{seconds:.0f} s/epoch ({seconds / config.iterations_per_epoch:.2f} s/it)"
                + (" *best*" if improved else ""))
            _write_history(history, out_dir)
            if improved:
                torch.save({"network": network.state_dict()}, out_dir / "best.pt")
                save_model(network, architecture, settings, model_dir / f"{config.name}.pt", name=config.name,
                           input_spacing_mm=config.spacing_mm, hu_window=config.hu_window,
                           extra=_card_extra(config, history, best, elapsed, command, label_ids))
            state = {
                "network": network.state_dict(), "loss": loss_fn.state_dict(), "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history, "best": best, "epoch": epoch + 1,
                "seconds": elapsed,
            }
            torch.save(state, out_dir / "last.pt.tmp")
            os.replace(out_dir / "last.pt.tmp", last_path)
        if optimiser.param_groups[0]["lr"] <= config.min_learning_rate + 1e-12 and \
                config.linear_lr_decay_to is None:
            if main:
                log("learning rate reached its minimum: stopping")
            break
    seconds = elapsed_before + time.perf_counter() - t_start
    if main and history:
        # refresh the card with the whole run's time and history (weights of the best epoch)
        best_state = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=True)
        best_net, _, _ = _build(config)
        best_net.load_state_dict(best_state["network"])
        save_model(best_net, architecture, settings, model_dir / f"{config.name}.pt", name=config.name,
                   input_spacing_mm=config.spacing_mm, hu_window=config.hu_window,
                   extra=_card_extra(config, history, best, seconds, command, label_ids))
    if world > 1:
        torch.distributed.barrier()
    return {"best": best, "epochs": len(history), "seconds": seconds, "out_dir": str(out_dir),
            "model": str(model_dir / f"{config.name}.pt"), "history": history}


def train_incremental(config: TrainingConfig, chunks: int, *, command: str | None = None, log=print) -> dict:
    """Incremental training (van Eijnatten et al. 2021): the patients, in chronological order of their first scan,
    are split into ``chunks`` mini-batches presented one after the other; each iteration starts from the best
    weights of the previous one and uses a learning rate decayed linearly from ``learning_rate`` towards 0
    (iteration ``i`` of ``k``: from ``lr (k - i) / k`` to ``lr (k - i - 1) / k``)."""
    volumes = load_volumes(config, log=log)
    if not volumes:
        raise ValueError("incremental training needs volumes (patients with time points)")
    first_time: dict[str, float] = {}
    for v in volumes:
        first_time[v.patient] = min(first_time.get(v.patient, math.inf), v.time)
    patients = sorted(first_time, key=lambda p: (first_time[p], p))
    chunks = max(1, min(int(chunks), len(patients)))
    groups = [patients[i * len(patients) // chunks:(i + 1) * len(patients) // chunks] for i in range(chunks)]
    init = config.init_model
    summaries = []
    base_dir = Path(config.out_dir)
    for i, group in enumerate(groups):
        lr_start = config.learning_rate * (chunks - i) / chunks
        lr_end = config.learning_rate * (chunks - i - 1) / chunks
        step = config.replace(out_dir=str(base_dir / f"increment_{i + 1}"), init_model=init,
                              learning_rate=lr_start, linear_lr_decay_to=lr_end,
                              model_dir=str(base_dir / f"increment_{i + 1}"))
        log(f"increment {i + 1}/{chunks}: patients {group}, lr {lr_start:.2g} -> {lr_end:.2g}")
        chosen = [v for v in volumes if v.patient in set(group)]
        summary = train(step, command=command, log=log, volumes=chosen)
        summaries.append(summary)
        init = summary["model"]  # the best weights of this increment start the next
    final = Path(summaries[-1]["model"])
    model_dir = Path(config.model_dir) if config.model_dir else base_dir
    if final.parent.resolve() != model_dir.resolve():
        network, card = load_model(str(final))
        save_model(network, card.architecture, card.settings, model_dir / f"{config.name}.pt", name=config.name,
                   input_spacing_mm=card.input_spacing_mm, hu_window=card.hu_window,
                   extra={**card.extra, "incremental": {"chunks": chunks, "patients": groups}})
    return {"increments": summaries, "model": str(model_dir / f"{config.name}.pt")}


# ----------------------------------------------------------------------------------------------------------------
# evaluation of a trained model against the pipeline's other configurations
# ----------------------------------------------------------------------------------------------------------------

#: The configurations compared by :func:`evaluate_methods` (``RegistrationConfig`` overrides; ``MODEL`` is the
#: evaluated model).  The inverse field is not computed, so the runtime is the registration itself.
METHODS: dict[str, dict] = {
    "identity": {"affine": False, "io_iterations": 0, "model": None},
    "affine": {"io_iterations": 0, "model": None},
    "network": {"io_iterations": 0, "model": "MODEL"},
    "network+io": {"model": "MODEL"},
    # the network has removed the large motion: instance optimisation only refines at 2x and 1x
    "network+io-fine": {"model": "MODEL", "io_levels": (2, 1)},
    "io": {"model": None},
}


def _read_cached_pair(folder: Path):
    from deepabdominalreg.landmarks import read_landmarks
    from deepabdominalreg.synthetic import SyntheticPair

    if not (folder / "labels.json").exists():
        return None
    return SyntheticPair(
        fixed_image=read_image(folder / "fixed.nii.gz", "fixed"), moving_image=read_image(folder / "moving.nii.gz",
                                                                                        "moving"),
        fixed_labels=read_labels(folder / "fixed_seg.nii.gz") if (folder / "fixed_seg.nii.gz").exists() else None,
        moving_labels=read_labels(folder / "moving_seg.nii.gz") if (folder / "moving_seg.nii.gz").exists() else None,
        displacement_fixed_to_moving=sitk.Cast(sitk.ReadImage(str(folder / "true_displacement.nii.gz")),
                                               sitk.sitkVectorFloat64),
        fixed_landmarks_lps=read_landmarks(folder / "fixed_landmarks.csv"),
        moving_landmarks_lps=read_landmarks(folder / "moving_landmarks.csv"),
        label_names={int(k): v for k, v in json.loads((folder / "labels.json").read_text()).items()},
    )


def _evaluation_cases(phantom_seeds, phantom_spacing_mm, amplitude_mm, ct, ct_labels, ct_label_names, ct_seeds,
                      cases_dir: Path, log=print) -> list[tuple[str, str, object]]:
    """The evaluation pairs, written to ``cases_dir`` once (``synthetic.write_pair``) and read back afterwards."""
    from deepabdominalreg.evaluation import load_label_names
    from deepabdominalreg.synthetic import make_phantom_pair, make_synthetic_pair, write_pair

    def cached(name, source, make):
        folder = cases_dir / name
        pair = _read_cached_pair(folder)
        if pair is None:
            t = time.perf_counter()
            pair = make()
            write_pair(pair, folder)
            log(f"case {name} made in {time.perf_counter() - t:.0f} s")
        return name, source, pair

    cases = [cached(f"phantom_s{seed}_{phantom_spacing_mm:g}mm_a{amplitude_mm:g}", "phantom",
                    lambda seed=seed: make_phantom_pair(int(seed), phantom_spacing_mm, amplitude_mm))
             for seed in phantom_seeds]
    if ct:
        image = read_image(ct, "evaluation CT")
        labels = read_labels(ct_labels, "evaluation labels") if ct_labels else None
        names = {}
        if ct_label_names:
            data = json.loads(Path(ct_label_names).read_text())
            names = load_label_names(ct_label_names, "total" if "total" in data else None)
        stem = Path(ct).name.split(".")[0]
        for seed in ct_seeds:
            cases.append(cached(f"{stem}_s{seed}_a{amplitude_mm:g}", "real CT", lambda seed=seed: make_synthetic_pair(
                image, labels, names, seed=int(seed), amplitude_mm=amplitude_mm, noise_hu=15.0)))
    return cases


def evaluate_methods(
    output_dir: str | os.PathLike,
    *,
    model: str | None,
    methods: Sequence[str] = tuple(METHODS),
    phantom_seeds: Sequence[int] = (0, 1, 2),
    phantom_spacing_mm: float = 3.0,
    amplitude_mm: float = 10.0,
    ct: str | None = None,
    ct_labels: str | None = None,
    ct_label_names: str | None = None,
    ct_seeds: Sequence[int] = (0, 1),
    threads: int | None = 2,
    cases_dir: str | os.PathLike | None = None,
    log=print,
) -> tuple[list[dict], str]:
    """Run :func:`deepabdominalreg.registration.register_pair` in each configuration of :data:`METHODS` on held-out
    phantom pairs and synthetic deformations of a real CT; write ``results.csv`` and ``table.md``.

    Metrics per case: mean Dice and HD95 (mm) over the labels, landmark TRE (mm), mean endpoint error against the
    true field inside the fixed body (mm), folding (% of body voxels with det J <= 0), SDlogJ and runtime (s).
    The pairs are written to ``cases_dir`` (default ``output_dir/cases``) and reused by later calls.
    Returns the rows and the markdown table (mean +- standard deviation per data source and method).
    """
    from deepabdominalreg.config import RegistrationConfig
    from deepabdominalreg.evaluation import displacement_error, fixed_body_mask
    from deepabdominalreg.registration import register_pair

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    if model is None:
        methods = [m for m in methods if METHODS[m].get("model") != "MODEL"]
    cases = _evaluation_cases(phantom_seeds, phantom_spacing_mm, amplitude_mm, ct, ct_labels, ct_label_names,
                              ct_seeds, Path(cases_dir) if cases_dir else out / "cases", log=log)
    rows = []
    for name, source, pair in cases:
        body = fixed_body_mask(pair.fixed_image)
        for method in methods:
            overrides = {k: (model if v == "MODEL" else v) for k, v in METHODS[method].items()}
            config = RegistrationConfig(device="cpu", threads=threads, compute_inverse=False, **overrides)
            result = register_pair(
                pair.fixed_image, pair.moving_image, config=config, moving_labels=pair.moving_labels,
                fixed_labels=pair.fixed_labels, fixed_landmarks_lps=pair.fixed_landmarks_lps,
                moving_landmarks_lps=pair.moving_landmarks_lps, label_names=pair.label_names)
            m = result.metrics
            error = displacement_error(result.displacement_lps, pair.displacement_fixed_to_moving, body)
            row = {
                "case": name, "source": source, "method": method,
                "dice": m.get("dice_mean_after", float("nan")),
                "hd95_mm": m.get("labels", {}).get("after", {}).get("hd95_mean_mm", float("nan")),
                "tre_mm": m.get("tre_mean_after_mm", float("nan")),
                "field_error_mm": error["field_error_mean_mm"],
                "folding_percent": m["folding_percent"], "sdlogj": m["sdlogj"], "runtime_s": m["runtime_s"],
            }
            rows.append(row)
            log(f"{name} {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                 if isinstance(v, float)))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = methods_table(rows)
    (out / "table.md").write_text(table + "\n")
    return rows, table


def methods_table(rows: Sequence[dict]) -> str:
    """Markdown table: mean +- sd of each metric per (source, method), methods in their order of appearance."""
    metrics = [("dice", "Dice", 3), ("hd95_mm", "HD95 (mm)", 2), ("tre_mm", "TRE (mm)", 2),
               ("field_error_mm", "field error (mm)", 2), ("folding_percent", "folding %", 3),
               ("sdlogj", "SDlogJ", 3), ("runtime_s", "runtime (s)", 1)]
    lines = ["| data | method | n | " + " | ".join(label for _, label, _ in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["method"]), []).append(r)
    for (source, method), group in groups.items():
        cells = []
        for key, _, digits in metrics:
            values = np.array([float(r[key]) for r in group], dtype=np.float64)
            values = values[np.isfinite(values)]
            cells.append("n/a" if not values.size else
                         f"{values.mean():.{digits}f} ± {values.std():.{digits}f}" if values.size > 1 else
                         f"{values.mean():.{digits}f}")
        lines.append(f"| {source} | {method} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
