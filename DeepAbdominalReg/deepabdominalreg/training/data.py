"""Training data: phantom and real-CT volumes on the training grid, their synthetic motion, and the pair sampler.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from deepabdominalreg.geometry import Grid, make_working_grid, resample_image
from deepabdominalreg.io import read_image, read_labels
from deepabdominalreg.registration.preprocessing import prepare_working_image
from deepabdominalreg.spatial import mm_lps_to_disp_vox
from deepabdominalreg.training.augmentation import AugmentationConfig, PairAugmentation
from deepabdominalreg.training.config import TrainingConfig

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


def _working_volume(image: sitk.Image, labels: sitk.Image | None, grid: Grid, hu_window) -> tuple:
    w = prepare_working_image(image, grid, hu_window, True)
    lab = None
    if labels is not None:
        lab = sitk.GetArrayFromImage(resample_image(labels, grid, interpolator="nearest", default_value=0))
        lab = lab.astype(np.int16)
    return w, lab


def _motion_fields(hu_image: sitk.Image, labels_image: sitk.Image | None, grid: Grid, seeds: Sequence[int],
                   amplitude_mm: float) -> np.ndarray:
    from deepabdominalreg.synthetic.motion import synthetic_abdominal_motion

    fields = []
    for seed in seeds:
        u = synthetic_abdominal_motion(hu_image, labels_image, seed=int(seed), amplitude_mm=amplitude_mm,
                                       rigid_shift_mm=0.0, rotation_deg=0.0)
        fields.append(mm_lps_to_disp_vox(sitk.GetArrayFromImage(u), grid, torch.device("cpu"))[0].numpy())
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
    from deepabdominalreg.synthetic.anatomy import add_ct_noise, render_phantom

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


def volume_entries(config: TrainingConfig) -> list[dict]:
    """The CT volumes of ``config``, one dict each (``image``, ``labels``, ``masks``, ``patient``, ``time``): its
    ``volumes`` list, then the rows of ``volumes_csv`` (paths relative to the CSV's folder), then the images of
    ``volumes_folder`` (``NAME.nii.gz`` with ``NAME_seg`` or ``NAME_labels`` beside it)."""
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
    for index, entry in enumerate(volume_entries(config)):
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
    """Held-out phantom pairs (:func:`deepabdominalreg.synthetic.pairs.make_phantom_pair` at the training spacing, with
    noise and the default rigid motion) as tensors: fixed, moving, labels, body mask, true ``disp`` (voxels)."""
    from deepabdominalreg.synthetic.pairs import make_phantom_pair

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
            disp = mm_lps_to_disp_vox(sitk.GetArrayFromImage(pair.displacement_fixed_to_moving), grid,
                                      torch.device("cpu"))[0].numpy()
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
