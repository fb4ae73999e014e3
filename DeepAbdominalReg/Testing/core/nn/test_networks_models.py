"""Network shapes, the model registry's safety checks and the network stage on a tiny random checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.nn.models import ModelError, load_model, save_model
from deepabdominalreg.nn.networks import (
    CostVolumePyramidNet,
    PyramidConfig,
    RegistrationUNet,
    UNetConfig,
    _shift_offsets,
    ssd_cost_volume,
)
from geometry_helpers import smooth_texture

TINY = UNetConfig(encoder_channels=(4, 8), decoder_channels=(8, 4), final_channels=(4,), integration_steps=0)


def _save_tiny(tmp_path, **overrides):
    torch.manual_seed(0)
    net = RegistrationUNet(TINY)
    kwargs = {"name": "tiny", "input_spacing_mm": 4.0, "hu_window": (-160.0, 240.0)}
    kwargs.update(overrides)
    card = save_model(net, "RegistrationUNet", TINY.as_dict(), tmp_path / "tiny.pt", **kwargs)
    return net, card


def test_unet_predicts_displacement_on_odd_sizes():
    net = RegistrationUNet(TINY)
    f = torch.rand(1, 1, 13, 10, 11)
    out = net.predict(f, f)
    assert out.shape == (1, 3, 13, 10, 11)


def test_diffeomorphic_variant_integrates():
    net = RegistrationUNet(UNetConfig(encoder_channels=(4, 8), decoder_channels=(8, 4), final_channels=(4,),
                                      integration_steps=5))
    out = net.predict(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    assert out.shape == (1, 3, 8, 8, 8)


def test_saved_model_loads_with_same_weights(tmp_path):
    net, card = _save_tiny(tmp_path)
    loaded, card2 = load_model(str(tmp_path / "tiny.pt"))
    assert card2.sha256 == card.sha256 and len(card.sha256) == 64
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert not loaded.training


def test_tampered_weights_are_refused(tmp_path):
    _save_tiny(tmp_path)
    path = tmp_path / "tiny.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_model(str(path))


def test_card_that_does_not_describe_the_weights_is_refused(tmp_path):
    _save_tiny(tmp_path)
    card_path = tmp_path / "tiny.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["input_spacing_mm"] = 2.0
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelError, match="input_spacing_mm"):
        load_model(str(tmp_path / "tiny.pt"))


def test_pickled_object_is_refused_even_with_matching_hash(tmp_path):
    import hashlib

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "evil.json").write_text(json.dumps({
        "name": "evil", "weights": "evil.pt", "sha256": digest, "architecture": "RegistrationUNet",
        "settings": TINY.as_dict(), "input_spacing_mm": 4.0, "hu_window": [-160, 240]}))
    with pytest.raises(ModelError, match="weights_only"):
        load_model(str(path))


def test_missing_card_and_unknown_name_are_clear(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "orphan.pt")
    with pytest.raises(ModelError, match="model card"):
        load_model(str(tmp_path / "orphan.pt"))
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model")


# ---------------------------------------------------------------------------------------------------------------
# CostVolumePyramidNet
# ---------------------------------------------------------------------------------------------------------------

PYRAMID = PyramidConfig(feature_channels=(4, 4), search_radius=(1, 2), refine_channels=4, cost_smoothing=1)


def test_ssd_cost_volume_is_zero_at_the_true_integer_shift():
    moving = torch.rand(1, 3, 12, 12, 12, generator=torch.Generator().manual_seed(0))  # 3 feature channels
    shift = (1, -2, 0)  # fixed(x) = moving(x + shift)
    fixed = torch.roll(moving, shifts=tuple(-s for s in shift), dims=(2, 3, 4))
    cost = ssd_cost_volume(fixed, moving, radius=2)
    assert cost.shape == (1, 125, 12, 12, 12)
    k = _shift_offsets(2).index(shift)
    interior = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert float(cost[:, k][interior[:1] + interior[2:]].abs().max()) < 1e-6
    others = torch.cat([cost[:, :k], cost[:, k + 1:]], dim=1)[interior]
    assert float(others.min()) > 1e-4  # every other shift costs clearly more inside
    direct = ((fixed - torch.roll(moving, shifts=(-1, -1, -1), dims=(2, 3, 4))) ** 2).mean(dim=1)
    torch.testing.assert_close(cost[:, _shift_offsets(2).index((1, 1, 1))][interior[:1] + interior[2:]],
                               direct[interior[:1] + interior[2:]], atol=1e-6, rtol=0)


def _block_matching_only(net):
    """Zero the learned features and corrections: the network is then soft-argmin block matching on intensities."""
    with torch.no_grad():
        for p in net.encoders.parameters():
            p.zero_()
        for p in net.refiners.parameters():
            p.zero_()
    return net


def test_pyramid_net_recovers_a_translation_by_matching_intensities():
    torch.manual_seed(0)
    net = _block_matching_only(CostVolumePyramidNet(PyramidConfig(feature_channels=(4, 4, 4), search_radius=(1, 2, 2),
                                                                  refine_channels=4, initial_inverse_temperature=20.0)))
    moving = smooth_texture((24, 24, 24), seed=1)
    true = torch.tensor([3.0, -2.0, 1.0])
    fixed = spatial.warp(moving, true.view(1, 3, 1, 1, 1).expand(1, 3, 24, 24, 24).contiguous(), padding_mode="border")
    with torch.no_grad():
        disp = net.predict(fixed, moving)
    inner = disp[0, :, 6:-6, 6:-6, 6:-6].reshape(3, -1).mean(dim=1)
    torch.testing.assert_close(inner, true, atol=0.35, rtol=0)
    with torch.no_grad():
        same = net.predict(moving, moving)
    assert float(same[0, :, 4:-4, 4:-4, 4:-4].norm(dim=0).mean()) < 0.15  # identical inputs: (almost) no motion


def test_pyramid_net_odd_sizes_and_gradients_reach_every_parameter():
    net = CostVolumePyramidNet(PYRAMID)
    fixed, moving = smooth_texture((9, 11, 10), 2), smooth_texture((9, 11, 10), 3)
    assert net.predict(fixed, moving).shape == (1, 3, 9, 11, 10)
    out = net(smooth_texture((8, 8, 8), 2), smooth_texture((8, 8, 8), 3))
    (out.pow(2).mean() + spatial.warp(moving[..., :8, :8, :8], out).mean()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # the zero-initialised correction heads still pass gradient to their own weights
    assert float(net.refiners[0][-1].weight.grad.abs().sum()) > 0


def test_pyramid_model_saves_and_loads_through_the_registry(tmp_path):
    torch.manual_seed(0)
    net = CostVolumePyramidNet(PYRAMID)
    save_model(net, "CostVolumePyramidNet", PYRAMID.as_dict(), tmp_path / "pyr.pt", name="pyr",
               input_spacing_mm=4.0, hu_window=(-160.0, 240.0))
    loaded, card = load_model(str(tmp_path / "pyr.pt"))
    assert card.architecture == "CostVolumePyramidNet"
    x, y = smooth_texture((8, 8, 8), 4), smooth_texture((8, 8, 8), 5)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x, y), loaded(x, y))


def test_output_smoothing_smooths_the_field_and_keeps_a_translation():
    torch.manual_seed(0)
    rough = CostVolumePyramidNet(PYRAMID)
    smooth = CostVolumePyramidNet(PyramidConfig(**{**PYRAMID.as_dict(), "output_smoothing": 6}))
    smooth.load_state_dict(rough.state_dict())
    with torch.no_grad():  # a non-zero correction head so that the raw field is rough
        for net in (rough, smooth):
            torch.nn.init.normal_(net.refiners[0][-1].weight, 0.0, 0.5)
    x, y = smooth_texture((16, 16, 16), 6), smooth_texture((16, 16, 16), 7)
    with torch.no_grad():
        a, b = rough(x, y), smooth(x, y)
    roughness = [float(spatial.jacobian_determinant(d).std()) for d in (a, b)]
    assert roughness[1] < 0.5 * roughness[0]
    constant = torch.ones(1, 3, 8, 8, 8) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(spatial.box_filter(constant, 3, count_include_pad=False), constant)


def _brute_force_box3(x: torch.Tensor) -> torch.Tensor:
    """Mean over the in-bounds 3x3x3 neighbourhood of every voxel, by loops (reference)."""
    out = torch.empty_like(x)
    d, h, w = x.shape[2:]
    for i in range(d):
        for j in range(h):
            for k in range(w):
                block = x[:, :, max(i - 1, 0): i + 2, max(j - 1, 0): j + 2, max(k - 1, 0): k + 2]
                out[:, :, i, j, k] = block.mean(dim=(2, 3, 4))
    return out


def test_cost_smoothing_box_filter_equals_average_pooling_without_padding_counts_forward_and_backward():
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 27, 9, 5, 7), (2, 4, 3, 4, 3), (1, 2, 6, 1, 2)]:  # size 1 and 2 axes: avg_pool3d cannot
        x = torch.rand(shape, generator=g, dtype=torch.float64)
        ours_in = x.clone().requires_grad_(True)
        ours = spatial.box_filter(ours_in, 3, count_include_pad=False)
        torch.testing.assert_close(ours.detach(), _brute_force_box3(x), rtol=0, atol=1e-12)
        assert torch.equal(ours_in.detach(), x)  # the input is not modified
        if min(shape[2:]) >= 3:
            weight = torch.rand(shape, generator=g, dtype=torch.float64)
            ref_in = x.clone().requires_grad_(True)
            ref = torch.nn.functional.avg_pool3d(ref_in, 3, stride=1, padding=1, count_include_pad=False)
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
            (ours * weight).sum().backward()
            (ref * weight).sum().backward()
            torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-12)


def test_pyramid_net_inference_path_equals_the_autograd_path():
    """At inference the cost volume is normalised and sharpened in place (less memory at the peak): the field equals
    the autograd path's, whose graph still reaches the temperature."""
    torch.manual_seed(3)
    net = CostVolumePyramidNet(PYRAMID)
    with torch.no_grad():
        for refiner in net.refiners:  # non-zero correction heads, so that every branch contributes
            refiner[-1].weight.normal_(0.0, 0.05)
    fixed, moving = smooth_texture((12, 16, 8), 5), smooth_texture((12, 16, 8), 6)
    with_grad = net(fixed, moving)
    with torch.inference_mode():
        inference = net(fixed, moving)
    # the cost volume's two paths differ by float rounding (~1e-6, test below), which the levels carry on
    torch.testing.assert_close(inference, with_grad.detach(), rtol=0, atol=1e-4)
    with_grad.pow(2).mean().backward()
    assert float(net.log_inverse_temperature.grad.abs().sum()) > 0


def test_ssd_cost_volume_inference_path_equals_the_autograd_path():
    """Without autograd the cost volume is accumulated in place; with it, out of place: same numbers, and the
    autograd path still gives gradients."""
    g = torch.Generator().manual_seed(4)
    fixed = torch.rand(2, 5, 7, 8, 6, generator=g, requires_grad=True)
    moving = torch.rand(2, 5, 7, 8, 6, generator=g)
    with_grad = ssd_cost_volume(fixed, moving, radius=2)
    with torch.no_grad():
        without = ssd_cost_volume(fixed, moving, radius=2)
    with torch.inference_mode():
        inference = ssd_cost_volume(fixed.detach(), moving, radius=2)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(inference, with_grad.detach(), rtol=0, atol=2e-6)
    with_grad.sum().backward()
    assert fixed.grad is not None and float(fixed.grad.abs().sum()) > 0


@pytest.mark.parametrize("slab_elements", [1, 40, 10**12], ids=["one slice per slab", "a few slices", "one piece"])
def test_cost_volume_and_box_filter_give_the_same_values_in_any_slabs(monkeypatch, slab_elements):
    """The CPU inference paths work slab by slab along D (cache blocking): bit-identical to one piece, also for
    axes of size 1 and 2 and a last slab shorter than the others."""
    from deepabdominalreg.nn import networks

    g = torch.Generator().manual_seed(6)
    for shape in [(1, 27, 7, 5, 6), (2, 3, 1, 4, 3), (1, 2, 2, 1, 5)]:
        x = torch.rand(shape, generator=g)
        fixed, moving = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
        with torch.no_grad():
            monkeypatch.setattr(spatial, "_BOX_SLAB_ELEMENTS", 10**12)
            monkeypatch.setattr(networks, "_SLAB_VOXELS", 10**12)
            box_ref, cost_ref = spatial.box_filter(x, 3, False), ssd_cost_volume(fixed, moving, radius=1)
            monkeypatch.setattr(networks, "_SLAB_VOXELS", slab_elements)
            monkeypatch.setattr(spatial, "_BOX_SLAB_ELEMENTS", min(slab_elements, x.numel() // 5))  # slab path
            assert torch.equal(spatial.box_filter(x, 3, False), box_ref)
            assert torch.equal(ssd_cost_volume(fixed, moving, radius=1), cost_ref)
        torch.testing.assert_close(box_ref, _brute_force_box3(x), rtol=0, atol=1e-6)


def test_content_face_margins_mirror_only_the_faces_the_content_reaches():
    from deepabdominalreg.nn.networks import content_face_margins

    f = torch.zeros(1, 1, 10, 12, 14)
    m = torch.zeros(1, 1, 10, 12, 14)
    f[:, :, 0:6, 3:9, 3:9] = 0.5  # reaches the low-d face only
    m[:, :, 4:10, 3:9, 4:14] = 0.5  # reaches the high-d and the high-w faces
    assert content_face_margins(f, m, 4) == (4, 4, 0, 0, 0, 4)
    assert content_face_margins(f, m, 0) == (0,) * 6
    assert content_face_margins(f, m, 50) == (9, 9, 0, 0, 0, 13)  # reflection needs padding < size
    assert content_face_margins(torch.zeros_like(f), torch.zeros_like(m), 4) == (0,) * 6


def test_boundary_padding_mirrors_the_cut_faces_and_crops_the_field_back():
    import torch.nn.functional as F
    from deepabdominalreg.nn.networks import content_face_margins

    torch.manual_seed(0)
    plain = CostVolumePyramidNet(PYRAMID).eval()
    padded = CostVolumePyramidNet(PyramidConfig(**{**PYRAMID.as_dict(), "boundary_padding": 3})).eval()
    padded.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.nn.init.normal_(plain.refiners[0][-1].weight, 0.0, 0.1)
        padded.refiners[0][-1].weight.copy_(plain.refiners[0][-1].weight)
    # content reaching the d faces (a scan cut through the body), air (0) at the h and w faces
    f = torch.zeros(1, 1, 11, 12, 10)
    m = torch.zeros(1, 1, 11, 12, 10)
    f[:, :, :, 2:10, 2:8] = smooth_texture((11, 8, 6), 1)
    m[:, :, :, 2:10, 2:8] = smooth_texture((11, 8, 6), 2)
    assert content_face_margins(f, m, 3) == (3, 3, 0, 0, 0, 0)
    with torch.no_grad():
        out = padded.predict(f, m)
        expected = plain.predict(F.pad(f, (0, 0, 0, 0, 3, 3), mode="reflect"),
                                 F.pad(m, (0, 0, 0, 0, 3, 3), mode="reflect"))[:, :, 3:-3]
        assert out.shape == (1, 3, 11, 12, 10)
        torch.testing.assert_close(out, expected)
        assert not torch.allclose(out, plain.predict(f, m))  # the mirrored slices change the field
        # where no content reaches a face, the padding changes nothing
        inner_f, inner_m = f[:, :, 2:9], m[:, :, 2:9]
        inner_f[:, :, [0, -1]] = 0.0
        inner_m[:, :, [0, -1]] = 0.0
        torch.testing.assert_close(padded.predict(inner_f, inner_m), plain.predict(inner_f, inner_m))


def test_set_model_setting_script_changes_only_inference_settings(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    save_model(CostVolumePyramidNet(PYRAMID), "CostVolumePyramidNet", PYRAMID.as_dict(), tmp_path / "m.pt",
               name="m", input_spacing_mm=4.0, hu_window=(-160.0, 240.0))
    script = Path(__file__).resolve().parents[4] / "scripts" / "set_model_setting.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "m.pt"), "output_smoothing=3",
                           "--output", str(tmp_path / "s.pt")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    net, card = load_model(str(tmp_path / "s.pt"))
    assert card.settings["output_smoothing"] == 3 and net.config.output_smoothing == 3
    assert card.extra["post_training"][0]["changed"] == {"output_smoothing": 3}
    refused = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "m.pt"), "search_radius=[1,1]"],
                             capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "changes what the weights mean" in refused.stderr
    padded = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "s.pt"), "boundary_padding=8"],
                            capture_output=True, text=True, check=False)
    assert padded.returncode == 0, padded.stderr
    net, card = load_model(str(tmp_path / "s.pt"))
    assert net.config.boundary_padding == 8 and net.config.output_smoothing == 3


def test_network_box_is_the_body_bounding_box_with_margin():
    import numpy as np
    from deepabdominalreg.registration.network import _body_box

    mask = np.zeros((20, 30, 40), dtype=bool)
    mask[5:9, 10:12, 0:3] = True
    assert _body_box(mask, margin=2) == (slice(3, 11), slice(8, 14), slice(0, 5))
    assert _body_box(np.zeros((4, 5, 6), dtype=bool), margin=2) == (slice(0, 4), slice(0, 5), slice(0, 6))


def test_shipped_model_registers_beyond_the_affine():
    """The 'network' preset (affine + abdomen-ct-4mm-v3, no instance optimisation) on a held-out phantom pair."""
    from deepabdominalreg.config import config_from_preset
    from deepabdominalreg.nn.models import available_models
    from deepabdominalreg.registration.pipeline import register_pair
    from deepabdominalreg.synthetic.pairs import make_phantom_pair

    assert {"abdomen-ct-4mm-v2", "abdomen-ct-4mm-v3"} <= set(available_models())
    pair = make_phantom_pair(seed=3, spacing_mm=4.0, amplitude_mm=10.0)
    dice = {}
    for name, config in {"affine": config_from_preset("network", model=None),
                         "network": config_from_preset("network")}.items():
        result = register_pair(pair.fixed_image, pair.moving_image, config=config.replace(threads=2, seed=0),
                               moving_labels=pair.moving_labels, fixed_labels=pair.fixed_labels)
        dice[name] = result.metrics["dice_mean_after"]
        assert result.metrics["folding_percent"] < 0.5
    assert dice["network"] > dice["affine"] + 0.02, dice  # both shipped models gain several times this margin
