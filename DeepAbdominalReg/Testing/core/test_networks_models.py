"""Network shapes, the model registry's safety checks and the network stage on a tiny random checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from deepabdominalreg.models import ModelError, load_model, save_model
from deepabdominalreg.networks import RegistrationUNet, UNetConfig

TINY = UNetConfig(encoder_channels=(4, 8), decoder_channels=(8, 4), final_channels=(4,), integration_steps=0)


def _save_tiny(tmp_path, **overrides):
    torch.manual_seed(0)
    net = RegistrationUNet(TINY)
    kwargs = dict(name="tiny", input_spacing_mm=4.0, hu_window=(-160.0, 240.0))
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
    card = json.loads(card_path.read_text())
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
