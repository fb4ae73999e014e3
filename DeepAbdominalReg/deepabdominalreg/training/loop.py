"""Training framework of the registration networks: data, on-the-fly pairs, losses, the loop, fine-tuning.

Data (all brought onto one isotropic grid of ``spacing_mm``, the model's input spacing, with the model's HU window
and body mask, exactly as :func:`deepabdominalreg.registration.register_pair` prepares the network's input):

* the procedural phantom (:mod:`deepabdominalreg.synthetic.anatomy`) as a built-in source: a pool of ``phantom_seeds``
  rendered once and cached under ``cache_dir`` (``.npz``), each with a few precomputed realistic abdominal motion
  fields (:func:`deepabdominalreg.synthetic.motion.synthetic_abdominal_motion`);
* CT volumes with optional label maps (NIfTI/NRRD/MHA), listed in the config (``volumes``), in a CSV
  (``volumes_csv``: columns ``image, labels, patient, time``) or found in a folder (``volumes_folder``:
  ``NAME.nii.gz`` + optional ``NAME_seg.nii.gz``);
* pairs made on the fly (:class:`PairSampler`): ``intra`` (one volume and a synthetic deformation of it, with the
  true field; :class:`deepabdominalreg.training.augmentation.PairAugmentation`), ``inter`` (two patients) and
  ``longitudinal`` (two time points of one patient).

Displacements are ``(B, 3, D, H, W)`` in voxels of the training grid, channels ``(d, h, w)``; the network maps a
fixed voxel ``p`` to the moving voxel ``p + disp(p)``, as at inference.

Training (:func:`train`): Adam, gradient accumulation, ReduceLROnPlateau on the validation Dice, best-validation
checkpointing (and saving the model with its card through :func:`deepabdominalreg.nn.models.save_model`), resumable
from ``out_dir/last.pt``, deterministic for a seed, a progress line with the losses and the uncertainty weights,
``metrics.csv`` + ``metrics.png`` per epoch.  Transfer learning (``init_model``, ``freeze_encoder_epochs``) and
incremental training (:func:`train_incremental`).  Multi-GPU / multi-node: launch with ``torchrun``; the
``WORLD_SIZE`` environment variable switches on ``DistributedDataParallel`` (one code path; a single process
otherwise).
"""


from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepabdominalreg import spatial
from deepabdominalreg.nn.models import load_model, save_model
from deepabdominalreg.nn.networks import build_network
from deepabdominalreg.training.config import TrainingConfig
from deepabdominalreg.training.data import (
    PairSampler,
    Volume,
    load_volumes,
    make_validation_pairs,
    prepare_phantom_pool,
    volume_entries,
)
from deepabdominalreg.training.objective import LossComputer

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
                "volumes": [e.get("image") for e in volume_entries(config)],
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
    host = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, "
            f"torch {torch.__version__}")
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
    # a network whose settings are in mm (DLIR's control spacings) names the input spacing they refer to
    network_spacing = getattr(network.config, "input_spacing_mm", None)
    if network_spacing is not None and abs(float(network_spacing) - config.spacing_mm) > 1e-6:
        raise ValueError(f"the network's input_spacing_mm ({network_spacing}) differs from the training "
                         f"spacing_mm ({config.spacing_mm})")
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
