"""RegistrationConfig is the one source of every stage's settings: presets, overrides, checks, its serialisation,
and the mm settings as the voxels each stage gets."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.config import PRESETS, RegistrationConfig, config_from_preset
from deepabdominalreg.registration import pipeline
from deepabdominalreg.registration.affine import NCC_WINDOW_VOXELS, AffineSettings
from deepabdominalreg.registration.instance_optimisation import InstanceOptimisationSettings

# --------------------------------------------------------------------------------------------------------------
# presets and overrides
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_sets_what_it_lists(preset):
    config = config_from_preset(preset)
    for name, value in PRESETS[preset].items():
        assert getattr(config, name) == value, name
    untouched = {f.name for f in dataclasses.fields(RegistrationConfig)} - set(PRESETS[preset])
    for name in untouched:
        assert getattr(config, name) == getattr(RegistrationConfig(), name), name


def test_balanced_is_the_default_and_unknown_presets_are_refused():
    assert config_from_preset("balanced") == config_from_preset() == RegistrationConfig()
    with pytest.raises(ValueError, match="unknown preset 'turbo'; choose one of fast, balanced"):
        config_from_preset("turbo")


def test_overrides_apply_on_top_of_the_preset():
    config = config_from_preset("fast", io_iterations=7, working_spacing_mm=4.0)
    assert config.io_iterations == 7 and config.working_spacing_mm == 4.0
    assert config.io_levels == (4, 2)  # the rest of the fast preset stays
    assert config.replace(seed=5).seed == 5 and config.replace(seed=5).io_iterations == 7


@pytest.mark.parametrize("make", [
    lambda: config_from_preset("fast", io_learning_rate=0.5),
    lambda: RegistrationConfig.from_dict({"io_learning_rate": 0.5}),
    lambda: RegistrationConfig().replace(io_learning_rate=0.5),
])
def test_unknown_settings_are_a_clear_error(make):
    """The old voxel name among them: a config written before the mm settings is refused, not misread."""
    with pytest.raises(ValueError, match=r"unknown registration settings \['io_learning_rate'\]") as info:
        make()
    assert "io_learning_rate_mm" in str(info.value)  # the message lists the known settings


@pytest.mark.parametrize(("changes", "message"), [
    ({"working_spacing_mm": 0.0}, "working_spacing_mm must be > 0"),
    ({"working_spacing_mm": "3"}, "working_spacing_mm must be a number"),
    ({"io_ncc_window_mm": -15.0}, "io_ncc_window_mm must be > 0"),
    ({"io_control_spacing_mm": float("nan")}, "io_control_spacing_mm must be a number"),
    ({"io_learning_rate_mm": True}, "io_learning_rate_mm must be a number"),
    ({"io_smoothness_weight": -1.0}, "io_smoothness_weight must be >= 0"),
    ({"io_ncc_noise_hu": 0.0}, "io_ncc_noise_hu must be > 0"),
    ({"io_gradient_floor_mm": -0.1}, "io_gradient_floor_mm must be >= 0"),
    ({"discrete_search_radius_mm": 0.0}, "discrete_search_radius_mm must be > 0"),
    ({"discrete_search": 1}, "discrete_search must be true or false"),
    ({"folding_retry_factor": 0.5}, "folding_retry_factor must be >= 1"),
    ({"io_iterations": 2.5}, "io_iterations must be a whole number"),
    ({"affine_iterations": -1}, "affine_iterations must be >= 0"),
    ({"max_working_voxels": 1}, "max_working_voxels must be >= 2"),
    ({"io_levels": (4, 0)}, "io_levels must be downsampling factors >= 1"),
    ({"io_levels": "4,2,1"}, "io_levels must be a list of numbers"),
    ({"affine_levels_mm": ()}, "affine_levels_mm must be one or more positive spacings"),
    ({"hu_window": (240.0, -160.0)}, "hu_window must be two numbers"),
    ({"hu_window": (0.0, 1.0, 2.0)}, "hu_window must be two numbers"),
    ({"body_mask": "yes"}, "body_mask must be true or false"),
    ({"model": 3}, "model must be a model name"),
    ({"network_precision": "fp16"}, "network_precision must be 'auto', 'fp32' or 'bf16'"),
    ({"device": "tpu"}, "device must be 'auto', 'cpu' or 'cuda'"),
    ({"threads": -2}, "threads must be >= 0"),
])
def test_bad_values_are_a_clear_error_naming_the_setting(changes, message):
    with pytest.raises(ValueError, match=message):
        RegistrationConfig(**changes)
    with pytest.raises(ValueError, match=message):
        RegistrationConfig.from_dict(json.loads(json.dumps(changes)))  # as read from a --config file


def test_lists_become_tuples_and_numbers_of_either_kind_are_accepted():
    config = RegistrationConfig(io_levels=[2, 1], affine_levels_mm=[8, 4], hu_window=[-100, 200],
                                working_spacing_mm=np.float64(2.5), io_iterations=np.int64(3))
    assert config.io_levels == (2, 1) and config.affine_levels_mm == (8, 4) and config.hu_window == (-100, 200)
    assert hash(config)  # frozen and hashable: every field is immutable


# --------------------------------------------------------------------------------------------------------------
# the one serialisation
# --------------------------------------------------------------------------------------------------------------


def _unusual() -> RegistrationConfig:
    """Every field away from its default."""
    return config_from_preset(
        "accurate", hu_window=(-200.0, 300.0), max_working_voxels=128, body_mask=False, affine=False,
        model="/models/x.pt", network_precision="bf16", io_levels=(8, 4, 2), io_learning_rate_mm=2.0,
        io_control_spacing_mm=7.5, io_ncc_window_mm=20.0, io_smoothness_weight=2.0, io_jacobian_weight=0.3,
        compute_inverse=False, folding_limit_percent=1.5, folding_retry_factor=2.0, device="cpu", seed=9, threads=3,
        affine_iterations=11, io_fine_iterations=3, io_iterations=5, working_spacing_mm=3.5,
        affine_levels_mm=(10.0, 5.0), io_transform="svf", io_bending_weight=30.0, io_similarity="mind",
        io_mind_radius_mm=6.0, io_mind_dilation_mm=9.0, affine_max_scale=1.3, affine_max_shear=0.2,
        initial_search=False, initial_search_spacing_mm=10.0, initial_search_range_mm=200.0,
        initial_search_min_overlap=0.4, check_affine_scale_range=(0.6, 1.8), check_max_folding_percent=2.0,
        check_hu_window=(-900.0, 900.0), check_min_ncc_gain=-0.05, check_min_ncc=0.4, check_min_body_dice=0.6,
        check_max_displacement_fraction=0.25, check_mirror_margin=0.1, check_max_dice_loss=0.05,
        io_ncc_noise_hu=40.0, io_gradient_floor_mm=0.5, io_rigidity_weight=7.0, io_symmetric=True,
        discrete_search=True, discrete_grid_spacing_mm=8.0, discrete_search_radius_mm=16.0,
    )


def test_every_field_is_away_from_its_default_in_the_round_trip_case():
    default, unusual = RegistrationConfig().to_dict(), _unusual().to_dict()
    assert [k for k in default if default[k] == unusual[k]] == []


@pytest.mark.parametrize("config", [_unusual(), *(config_from_preset(p) for p in PRESETS)])
def test_json_round_trip_is_lossless(config):
    data = config.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(RegistrationConfig)}
    text = json.dumps(data)  # plain JSON values only
    assert RegistrationConfig.from_dict(json.loads(text)) == config
    # on top of another base, every written field wins
    assert RegistrationConfig.from_dict(json.loads(text), base=config_from_preset("fast")) == config


# --------------------------------------------------------------------------------------------------------------
# each stage's settings come from the config
# --------------------------------------------------------------------------------------------------------------


def test_the_default_lengths_are_the_voxels_the_instance_optimisation_always_had():
    """0.5-voxel steps, control points every 2 voxels and a 5-voxel NCC window on the 3 mm default grid, and on the
    accurate preset's 2.5 mm grid."""
    for preset, spacing in (("balanced", 3.0), ("fast", 3.0), ("accurate", 2.5)):
        config = config_from_preset(preset)
        assert config.working_spacing_mm == spacing
        settings = InstanceOptimisationSettings.from_config(config, spacing)
        assert (settings.learning_rate, settings.control_spacing, settings.ncc_window) == (0.5, 2, 5), preset
        assert isinstance(settings.control_spacing, int) and isinstance(settings.ncc_window, int)


@pytest.mark.parametrize(("spacing", "learning_rate", "control_spacing", "ncc_window"), [
    (3.0, 0.5, 2, 5),
    (1.5, 1.0, 4, 11),  # 15 / 1.5 = 10: an even quotient rounds up to 11
    (4.0, 0.375, 2, 3),  # 6 / 4 = 1.5: halves round up; 15 / 4 = 3.75: nearest odd 3
    (6.0, 0.25, 1, 3),  # 2.5 -> 3 (odd, not the even 2)
    (20.0, 0.075, 1, 3),  # at least 1 control voxel and a 3-voxel window
])
def test_lengths_in_mm_become_voxels_of_the_working_grid(spacing, learning_rate, control_spacing, ncc_window):
    settings = InstanceOptimisationSettings.from_config(RegistrationConfig(), spacing)
    assert settings.learning_rate == pytest.approx(learning_rate, rel=1e-12)
    assert settings.control_spacing == control_spacing
    assert settings.ncc_window == ncc_window


def test_instance_optimisation_settings_follow_every_io_field():
    config = RegistrationConfig(io_levels=(8, 2), io_iterations=13, io_fine_iterations=7, io_learning_rate_mm=2.25,
                                io_control_spacing_mm=9.0, io_ncc_window_mm=21.0, io_smoothness_weight=1.5,
                                io_jacobian_weight=0.0, io_transform="svf", io_bending_weight=30.0,
                                io_similarity="mind", io_mind_radius_mm=6.0, io_mind_dilation_mm=9.0,
                                io_ncc_noise_hu=64.0, hu_window=(-112.0, 400.0), io_gradient_floor_mm=1.5,
                                io_rigidity_weight=4.0, io_symmetric=True)
    assert InstanceOptimisationSettings.from_config(config, 3.0) == InstanceOptimisationSettings(
        levels=(8, 2), iterations=13, fine_iterations=7, learning_rate=0.75, control_spacing=3, ncc_window=7,
        ncc_eps=0.015625, gradient_floor=0.5,  # (64 HU / 512 HU)^2, exact in binary
        smoothness_weight=1.5, jacobian_weight=0.0, transform="svf", similarity="mind", working_spacing_mm=3.0,
        control_spacing_mm=9.0, bending_weight=30.0, mind_radius=2, mind_dilation=3, rigidity_weight=4.0,
        symmetric=True)
    retry = InstanceOptimisationSettings.from_config(config, 3.0).strengthened(2.5)
    assert (retry.smoothness_weight, retry.jacobian_weight) == (3.75, 0.25)  # the Jacobian weight from 0.1 up
    assert retry.bending_weight == 75.0
    assert dataclasses.replace(retry, smoothness_weight=1.5, jacobian_weight=0.0, bending_weight=30.0) == \
        InstanceOptimisationSettings.from_config(config, 3.0)  # nothing else changes


def test_affine_settings_follow_the_config():
    config = RegistrationConfig(affine_iterations=7, affine_levels_mm=(16.0, 8.0, 4.0))
    settings = AffineSettings.from_config(config)
    assert settings == AffineSettings(levels_mm=(16.0, 8.0, 4.0), iterations=(7, 7, 7), ncc_window=NCC_WINDOW_VOXELS)
    assert AffineSettings.from_config(RegistrationConfig()).iterations == (20, 20)  # the config's default
    with pytest.raises(ValueError, match="one iteration count per affine level"):
        AffineSettings(levels_mm=(12.0, 6.0), iterations=(5,), ncc_window=5)


def _body(shape=(40, 48, 56), spacing=3.0) -> sitk.Image:
    """A CT-like ellipsoid with an inclusion, in HU."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(np.float32)
    c = np.array(shape) / 2
    body = ((z - c[0]) / (0.45 * shape[0])) ** 2 + ((y - c[1]) / (0.4 * shape[1])) ** 2 + (
        (x - c[2]) / (0.42 * shape[2])) ** 2 < 1
    array = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, body.shape)
    array[((z - c[0]) / 6) ** 2 + ((y - c[1]) / 6) ** 2 + ((x - c[2] - 3) / 8) ** 2 < 1] = 300.0
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((spacing,) * 3)
    return image


@pytest.fixture
def recorded(monkeypatch):
    """The settings the pipeline hands to the affine and the instance-optimisation stages, call by call."""
    calls = {"affine": [], "io": []}
    affine, io = pipeline.optimise_affine, pipeline.instance_optimise

    def record_affine(*args, **kwargs):
        calls["affine"].append(args[4])
        return affine(*args, **kwargs)

    def record_io(*args, settings, **kwargs):
        calls["io"].append(settings)
        return io(*args, settings=settings, **kwargs)

    monkeypatch.setattr(pipeline, "optimise_affine", record_affine)
    monkeypatch.setattr(pipeline, "instance_optimise", record_io)
    return calls


SMALL = RegistrationConfig(working_spacing_mm=6.0, affine_levels_mm=(12.0,), io_levels=(2,), io_iterations=2,
                           io_fine_iterations=0, compute_inverse=False, device="cpu")


def test_the_pipeline_hands_each_stage_the_configs_settings(recorded):
    image = _body()
    for affine_iterations in (3, 5):
        config = SMALL.replace(affine_iterations=affine_iterations)
        result = pipeline.register_pair(image, image, config=config)
        assert result.config == config and result.metrics["config"] == config.to_dict()
        assert recorded["affine"][-1] == AffineSettings.from_config(config)
        assert recorded["affine"][-1].iterations == (affine_iterations,)
        assert recorded["io"][-1] == InstanceOptimisationSettings.from_config(config, 6.0)
    assert recorded["io"][-1].learning_rate == 0.25  # 1.5 mm on the 6 mm working grid
    assert not any("working grid's spacing" in w for w in result.metrics["warnings"])


def test_the_folding_retry_takes_its_factor_from_the_config(recorded):
    config = SMALL.replace(folding_limit_percent=-1.0, folding_retry_factor=2.5)  # any folding (even none) retries
    result = pipeline.register_pair(_body(), _body(), config=config)
    first, retry = recorded["io"]
    assert retry == first.strengthened(2.5)
    assert any("rerun with 2.5x regularisation" in w for w in result.metrics["warnings"])


def test_a_coarser_working_grid_is_reported_and_keeps_the_lengths_in_mm(recorded):
    """max_working_voxels = 20 over a 165 mm wide scan: 165 / 19 = 8.7 mm instead of 6 mm."""
    config = SMALL.replace(max_working_voxels=20)
    result = pipeline.register_pair(_body(), _body(), config=config)
    spacing = result.metrics["working_grid"]["spacing_mm"]
    assert spacing == pytest.approx(55 * 3.0 / 19)
    warning = next(w for w in result.metrics["warnings"] if "working grid's spacing" in w)
    assert f"{spacing:.3g} mm" in warning and "max_working_voxels = 20" in warning
    assert recorded["io"][-1].learning_rate == pytest.approx(1.5 / spacing)
    assert recorded["io"][-1] == InstanceOptimisationSettings.from_config(config, spacing)
