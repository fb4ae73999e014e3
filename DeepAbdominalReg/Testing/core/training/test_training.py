"""The training framework end to end on a tiny network and a coarse phantom (CPU, well under a minute)."""

from __future__ import annotations

import csv
import importlib.resources
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from deepabdominalreg import spatial
from deepabdominalreg.cli import main as cli_main
from deepabdominalreg.geometry import Grid
from deepabdominalreg.nn import losses
from deepabdominalreg.nn.models import load_model
from deepabdominalreg.nn.networks import build_network
from deepabdominalreg.spatial import mm_lps_to_disp_vox
from deepabdominalreg.training.config import REGULARISERS, SIMILARITIES, TrainingConfig, load_config
from deepabdominalreg.training.data import (
    PairSampler,
    _phantom_cache_path,
    load_volumes,
    prepare_phantom_pool,
)
from deepabdominalreg.training.loop import _distributed, train, train_incremental
from deepabdominalreg.training.objective import LossComputer

TINY_NETWORK = {"encoder_channels": [4, 8], "decoder_channels": [8, 4], "final_channels": [], "integration_steps": 0}


def _config(tmp, cache, **changes) -> TrainingConfig:
    base = {
        "name": "tiny-test", "out_dir": str(tmp / "run"), "cache_dir": str(cache), "spacing_mm": 12.0,
        "crop_size": [16, 24, 24], "phantom_seeds": [1000, 1001], "phantom_motion_fields": 1,
        "validation_seeds": [900], "epochs": 2, "iterations_per_epoch": 2, "accumulation_steps": 2,
        "network": TINY_NETWORK, "threads": 2, "progress": False,
        "loss_weights": {"ncc": 1.0, "dice": 1.0, "supervised": 0.1, "diffusion": 0.01, "jacobian": 0.1},
    }
    base.update(changes)
    return TrainingConfig.from_dict(base)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("training_cache")


@pytest.fixture(scope="module")
def pool(cache, tmp_path_factory):
    config = _config(tmp_path_factory.mktemp("pool"), cache)
    return config, prepare_phantom_pool(config, log=lambda _m: None)


def test_config_round_trip_unknown_keys_and_toml(tmp_path):
    config = TrainingConfig(name="x", crop_size=(16, 16, 16))
    assert TrainingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainingConfig.from_dict({"learning_rate_typo": 1})
    with pytest.raises(ValueError, match="unknown loss term"):
        TrainingConfig.from_dict({"loss_weights": {"ncc": 1, "foo": 1}})
    with pytest.raises(ValueError, match="unknown augmentation"):
        TrainingConfig.from_dict({"augmentation": {"rotation": 1}})
    (tmp_path / "c.toml").write_text('name = "t"\nspacing_mm = 5.0\ncrop_size = [16, 32, 32]\n')
    loaded = load_config(tmp_path / "c.toml", epochs=3, seed=None)
    assert (loaded.name, loaded.spacing_mm, loaded.crop_size, loaded.epochs) == ("t", 5.0, (16, 32, 32), 3)


def test_the_packaged_configs_load_and_the_shipped_ones_write_beside_the_weights():
    """The configs kept (the shipped models' and the documented experiments') are valid; a config that saves into
    the repository's model folder names a model that is there (run from the repository root)."""
    folder = Path(importlib.resources.files("deepabdominalreg.training") / "configs")
    weights = Path(importlib.resources.files("deepabdominalreg.nn") / "weights")
    root = Path(__file__).resolve().parents[4]
    shipped = []
    for path in sorted(folder.glob("*.json")):
        config = load_config(path)
        if not config.model_dir.startswith("runs/"):
            assert (root / config.model_dir).resolve() == weights.resolve(), path.name
            assert (weights / f"{config.name}.json").exists(), path.name
            shipped.append(config.name)
    assert sorted(shipped) == ["abdomen-ct-4mm-v2", "abdomen-ct-4mm-v3"]


def test_prior_fields_are_voxels_of_the_training_grid_flipped_anisotropic():
    """The conversion the training data use for its prior and true fields: LPS mm -> voxels, channels (d, h, w)."""
    grid = Grid(size=(4, 5, 6), spacing=(2.0, 3.0, 4.0), origin=(0.0, 0.0, 0.0),
                direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    field = np.zeros((6, 5, 4, 3))
    field[..., :] = (2.0, 6.0, -8.0)  # LPS mm: x -> -1 voxel along i, y -> -2 along j, z -> -2 along k
    vox = mm_lps_to_disp_vox(field, grid, torch.device("cpu"))[0].numpy()
    assert vox.shape == (3, 6, 5, 4) and vox.dtype == np.float32
    np.testing.assert_allclose(vox[:, 0, 0, 0], [-2.0, -2.0, -1.0])  # channels (d, h, w) = (k, j, i)


def test_phantom_pool_is_cached(pool, cache):
    config, volumes = pool
    assert len(volumes) == 2
    v = volumes[0]
    assert v.intensity.dtype == np.float32 and 0 <= v.intensity.min() and v.intensity.max() <= 1
    assert v.fields.shape == (1, 3, *v.intensity.shape)
    assert np.abs(v.fields).max() * config.spacing_mm == pytest.approx(10.0, rel=0.3)
    assert len(list(cache.glob("phantom_s1000_*.npz"))) == 1
    again = prepare_phantom_pool(config, seeds=[1000], log=lambda _m: pytest.fail("re-rendered"))
    np.testing.assert_array_equal(again[0].intensity, v.intensity)


def test_phantom_pool_rendered_by_worker_processes_matches_serial(pool, tmp_path):
    config, volumes = pool
    parallel = prepare_phantom_pool(config.replace(cache_dir=str(tmp_path / "parallel"), data_workers=2),
                                             log=lambda _m: None)
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == \
        sorted(_phantom_cache_path(config, s).name for s in config.phantom_seeds)  # no temporary left
    for a, b in zip(volumes, parallel):
        assert a.patient == b.patient
        np.testing.assert_array_equal(a.intensity, b.intensity)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.fields, b.fields, atol=1e-5)


def test_sampler_intra_pair_carries_the_true_field(pool, tmp_path):
    config, volumes = pool
    config = config.replace(augmentation={"gamma_probability": 0, "brightness_probability": 0,
                                          "noise_std": [0.0, 0.0], "base_tps_probability": 0})
    sampler = PairSampler(config, volumes, [], [5, 1], torch.Generator().manual_seed(0))
    pair = sampler()
    assert pair["kind"] == "intra" and pair["fixed"].shape == (1, 1, 16, 24, 24)
    expected = spatial.warp(pair["moving"], pair["disp"]) * pair["fixed_mask"]
    torch.testing.assert_close(pair["fixed"], expected)
    assert set(pair["fixed_labels"].unique().tolist()) <= {0.0, 1.0, 5.0}
    inter = PairSampler(config.replace(pair_weights={"intra": 0.0, "inter": 1.0}), volumes, [], [5],
                                 torch.Generator().manual_seed(0))()
    assert inter["kind"] == "inter" and inter["disp"] is None


def test_loss_computer_every_term_finite_with_gradients(pool):
    config, volumes = pool
    weights = {k: 1.0 for k in SIMILARITIES + REGULARISERS}
    config = config.replace(loss_weights=weights)
    sampler = PairSampler(config, volumes, [], [5, 1, 2, 3], torch.Generator().manual_seed(1))
    network = build_network("RegistrationUNet", TINY_NETWORK)
    loss_fn = LossComputer(config, [5, 1, 2, 3])
    pair = sampler()
    pred = network(pair["fixed"], pair["moving"])
    total, terms = loss_fn(network, pair, pred)
    assert set(terms) == set(weights)
    assert all(torch.isfinite(v) for v in terms.values())
    total.backward()
    assert network.flow.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss_fn.parameters())


PYRAMID_NETWORK = {"feature_channels": [16, 16], "search_radius": [1, 2], "refine_channels": 8}


def test_pyramid_network_learns_from_the_supervised_term(pool):
    """The cost-volume network reduces the endpoint error of training pairs within a few dozen steps."""
    config, volumes = pool
    config = config.replace(augmentation={"gamma_probability": 0, "brightness_probability": 0,
                                          "noise_std": [0.0, 0.0], "base_tps_probability": 0,
                                          "rigid_probability": 0})
    sampler = PairSampler(config, volumes, [], [], torch.Generator().manual_seed(3))
    pairs = [sampler() for _ in range(4)]
    torch.manual_seed(0)
    network = build_network("CostVolumePyramidNet", PYRAMID_NETWORK)
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)

    def error():
        with torch.no_grad():
            return sum(float(losses.supervised_displacement_loss(network(p["fixed"], p["moving"]), p["disp"],
                                                                 p["fixed_mask"], 12.0, squared=False))
                       for p in pairs) / len(pairs)

    before = error()
    for step in range(40):
        p = pairs[step % len(pairs)]
        loss = losses.supervised_displacement_loss(network(p["fixed"], p["moving"]), p["disp"], p["fixed_mask"],
                                                   12.0, squared=False)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert error() < 0.8 * before  # 40 steps roughly halve the error: a network that does not learn fails


def _history(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_cli_train_smoke_then_resume(cache, tmp_path, capsys):
    config = _config(tmp_path, cache)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert cli_main(["train", "--config", str(path)]) == 0
    run = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.csv", "metrics.png", "tiny-test.pt", "tiny-test.json"):
        assert (run / name).exists(), name
    rows = _history(run)
    assert len(rows) == 2 and {"train_total", "val_dice", "val_epe_mm", "weight_ncc", "lr"} <= set(rows[0])
    network, card = load_model(str(run / "tiny-test.pt"))
    assert not network.training
    assert card.input_spacing_mm == 12.0 and card.extra["training"]["command"].startswith("deepabdominalreg train")
    assert card.extra["validation"]["val_dice"] > 0.3
    # resume: one more epoch continues the history
    messages = []
    summary = train(config.replace(epochs=3), log=messages.append)
    assert any("resumed" in m for m in messages)
    assert summary["epochs"] == 3 and len(_history(run)) == 3


def test_training_is_deterministic(cache, tmp_path):
    states = []
    for name in ("a", "b"):
        config = _config(tmp_path / name, cache, epochs=1, iterations_per_epoch=2, accumulation_steps=1)
        train(config, log=lambda _m: None)
        states.append(torch.load(tmp_path / name / "run" / "last.pt", weights_only=True)["network"])
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


def test_finetune_two_step_freezes_the_encoder_first(cache, tmp_path):
    base = _config(tmp_path / "base", cache, epochs=1)
    train(base, log=lambda _m: None)
    start, _ = load_model(str(tmp_path / "base" / "run" / "tiny-test.pt"))
    tuned = _config(tmp_path / "tuned", cache, epochs=1, init_model=str(tmp_path / "base" / "run" / "tiny-test.pt"),
                    freeze_encoder_epochs=1, learning_rate=1e-3, name="tuned")
    train(tuned, log=lambda _m: None)
    after = torch.load(tmp_path / "tuned" / "run" / "last.pt", weights_only=True)["network"]
    before = start.state_dict()
    for key in before:
        if key.startswith("encoders."):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert any(not torch.equal(after[k], before[k]) for k in before if not k.startswith("encoders."))


def test_incremental_training_over_chronological_patients(cache, tmp_path):
    from deepabdominalreg.synthetic.anatomy import render_phantom

    rows = []
    for patient, seed, time_point in (("A", 1000, 0), ("A", 1000, 1), ("B", 1001, 0)):
        image, labels = render_phantom(seed, 12.0)
        image = sitk.Cast(image + 10.0 * time_point, sitk.sitkInt16)
        sitk.WriteImage(image, str(tmp_path / f"{patient}{time_point}.nii.gz"))
        sitk.WriteImage(labels, str(tmp_path / f"{patient}{time_point}_seg.nii.gz"))
        rows.append({"image": f"{patient}{time_point}.nii.gz", "labels": f"{patient}{time_point}_seg.nii.gz",
                     "patient": patient, "time": time_point})
    with open(tmp_path / "volumes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = _config(tmp_path, cache, volumes_csv=str(tmp_path / "volumes.csv"), epochs=1,
                     source_weights={"phantom": 0.0, "volumes": 1.0},
                     pair_weights={"intra": 1.0, "longitudinal": 1.0})
    volumes = load_volumes(config, log=lambda _m: None)
    assert sorted((v.patient, v.time) for v in volumes) == [("A", 0.0), ("A", 1.0), ("B", 0.0)]
    messages = []
    summary = train_incremental(config, 2, log=messages.append)
    assert [m for m in messages if m.startswith("increment")] == [
        "increment 1/2: patients ['A'], lr 0.001 -> 0.0005", "increment 2/2: patients ['B'], lr 0.0005 -> 0"]
    _, card = load_model(summary["model"])
    assert card.extra["incremental"]["patients"] == [["A"], ["B"]]
    second = _history(tmp_path / "run" / "increment_2")
    assert float(second[-1]["lr"]) < 0.0005


def test_distributed_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _distributed() == (1, 0, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _distributed() == (4, 3, 1)
