"""SemanticPyramidNet (segmentation-guided two-stage registration): identity at initialisation, the semantic
features reaching both registration U-Nets, the order of the composition, the label mapping of the segmentation
loss, a tiny overfit through the training objective, the registry and model round trips and the size of the CPU
configuration."""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path

import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.nn import losses
from deepabdominalreg.nn.models import load_model, save_model
from deepabdominalreg.nn.networks import RegistrationUNet, UNetConfig, build_network
from deepabdominalreg.nn.semantic import SemanticPyramidConfig, SemanticPyramidNet
from deepabdominalreg.training.config import TrainingConfig, load_config
from deepabdominalreg.training.loop import _build, _set_encoder_frozen
from deepabdominalreg.training.objective import LossComputer

TINY = SemanticPyramidConfig(segmentation_encoder_channels=(4, 8, 8), segmentation_decoder_channels=(8, 8),
                             feature_channels=4, segmentation_classes=3, segmentation_label_ids=(5, 52),
                             registration_encoder_channels=(8, 16, 16), registration_decoder_channels=(16, 8))
"""Divisor 4; label values 5 (liver) and 52 (aorta) are classes 1 and 2."""


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_images(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 1, *shape, generator=g).to(dtype), torch.rand(2, 1, *shape, generator=g).to(dtype))


def _perturb_heads(net: SemanticPyramidNet, branches=(0, 1), std=0.05, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index in branches:
            flow = net.registration[index].flow
            flow.weight.copy_(torch.randn(flow.weight.shape, generator=g) * std)
            flow.bias.copy_(torch.randn(flow.bias.shape, generator=g) * std)


def _blobs(shift_vox: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16^3 image of two spheres (a large one labelled 5, a small one labelled 52) moved by ``shift_vox`` voxels
    along d, and its label map, both ``(1, 1, 16, 16, 16)``."""
    z, y, x = torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij")
    large = ((z - 7.5 - shift_vox) ** 2 + (y - 6.0) ** 2 + (x - 7.5) ** 2) < 16.0
    small = ((z - 7.5 - shift_vox) ** 2 + (y - 11.5) ** 2 + (x - 7.5) ** 2) < 5.0
    image = 0.8 * large.float() + 0.4 * small.float()
    labels = torch.where(large, 5.0, torch.where(small, 52.0, 0.0))
    return image[None, None], labels[None, None]


def _pair(shift_vox: float = 2.0) -> dict:
    fixed, fixed_labels = _blobs(0.0)
    moving, moving_labels = _blobs(shift_vox)
    return {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels,
            "fixed_mask": torch.ones_like(fixed, dtype=torch.bool), "disp": None}


@pytest.mark.parametrize("shape", [(16, 16, 16), (13, 16, 10)])
def test_an_untrained_network_is_exactly_the_identity_with_the_input_shape_and_dtype(shape):
    torch.manual_seed(0)
    net = SemanticPyramidNet(TINY)
    fixed, moving = _random_images(*shape)
    with torch.no_grad():
        pred = net.predict(fixed, moving)
    assert pred.shape == (2, 3, *shape) and pred.dtype == torch.float32
    assert torch.count_nonzero(pred) == 0
    with torch.no_grad():
        pred = net.double().predict(*_random_images(*shape, seed=3, dtype=torch.float64))
    assert pred.shape == (2, 3, *shape) and pred.dtype == torch.float64
    assert torch.count_nonzero(pred) == 0


@pytest.mark.parametrize("branch", [0, 1])
def test_the_segmentation_features_reach_each_registration_unet(branch):
    """With only one flow head non-zero, the field still depends on the segmentation U-Net's weights (through that
    registration U-Net's inputs), and changing the semantic features changes the field."""
    torch.manual_seed(0)
    net = SemanticPyramidNet(TINY)
    _perturb_heads(net, branches=(branch,))
    fixed, moving = _random_images(16, 16, 16)
    pred = net(fixed, moving)
    assert pred.abs().max() > 1e-4
    (pred * torch.randn_like(pred)).sum().backward()
    for name, p in [*net.segmentation.named_parameters(), *net.features.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the segmentation head is not on the registration path: only the segmentation loss trains it
    assert all(p.grad is None for p in net.segmentation_head.parameters())
    with torch.no_grad():
        net.features[0].weight.mul_(1.5)
        changed = net(fixed, moving)
    assert (changed - pred.detach()).abs().max() > 1e-5


def test_the_output_is_the_first_field_refined_by_the_second():
    """``total = u1 o u2``: warping by it is warping by ``u1``, then by ``u2`` (to interpolation); the other
    order of composition is not.  The two registration U-Nets' outputs are replaced by smooth fields that do not
    commute (forward hooks), so the difference of the orders is far above the interpolation error."""
    z, y, x = torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij")
    zero = torch.zeros_like(z)
    u1 = torch.stack([2.0 * torch.sin(y / 5.0), zero, zero])[None].expand(2, -1, -1, -1, -1)
    u2 = torch.stack([zero, 2.0 * torch.cos(z / 4.0), zero])[None].expand(2, -1, -1, -1, -1)
    net = SemanticPyramidNet(TINY)
    seen = []

    def replace(field):
        return lambda _module, inputs, _out: seen.append(inputs[0]) or field

    hooks = [branch.register_forward_hook(replace(field)) for branch, field in zip(net.registration, (u1, u2))]
    fixed, moving = _random_images(16, 16, 16)
    with torch.no_grad():
        total = net(fixed, moving)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(total, spatial.compose(u1, u2))
    # the second U-Net saw the moving image warped by the first field
    torch.testing.assert_close(seen[1][:, 1:2], spatial.warp(moving, u1, padding_mode="border"))
    smooth = (torch.sin(z / 3.0) + torch.cos(y / 4.0) * x / 16.0)[None, None].expand(2, 1, -1, -1, -1)
    two_steps = spatial.warp(spatial.warp(smooth, u1, padding_mode="border"), u2, padding_mode="border")
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    right = (spatial.warp(smooth, total, padding_mode="border") - two_steps)[inner].abs().mean()
    wrong = (spatial.warp(smooth, spatial.compose(u2, u1), padding_mode="border") - two_steps)[inner].abs().mean()
    assert right < 0.2 * wrong, (float(right), float(wrong))


def test_the_segmentation_loss_maps_label_values_to_classes_and_refers_to_the_last_pass():
    net = SemanticPyramidNet(TINY)
    labels = torch.tensor([0.0, 5.0, 52.0, 4.0, 5.2, 66.0, 51.8]).view(1, 1, 7, 1, 1)
    classes, foreground = net.segmentation_targets(labels)
    assert classes.flatten().tolist() == [0, 1, 2, 0, 1, 0, 2]
    assert foreground.shape == (1, 2, 7, 1, 1)
    torch.testing.assert_close(foreground.sum(1).flatten(), (classes > 0).float().flatten())

    with pytest.raises(RuntimeError, match="forward"):
        net.segmentation_loss(labels, labels)
    pair = _pair()
    with torch.no_grad():
        net(pair["fixed"], pair["moving"])
        # a confident, correct segmentation: logits of the true classes set by hand
        classes, _ = net.segmentation_targets(torch.cat([pair["fixed_labels"], pair["moving_labels"]]))
        net.segmentation_logits = 50.0 * torch.nn.functional.one_hot(classes, 3).permute(0, 4, 1, 2, 3).float()
        assert float(net.segmentation_loss(pair["fixed_labels"], pair["moving_labels"])) < 1e-3
        # fixed and moving swapped: the moving half of the logits no longer fits
        assert float(net.segmentation_loss(pair["moving_labels"], pair["fixed_labels"])) > 1.0
    with pytest.raises(ValueError, match="do not match"):
        net.segmentation_loss(pair["fixed_labels"][..., :8], pair["moving_labels"][..., :8])


def test_the_settings_are_checked():
    with pytest.raises(ValueError, match="segmentation_classes"):
        SemanticPyramidNet(SemanticPyramidConfig(segmentation_classes=3, segmentation_label_ids=(5,)))
    with pytest.raises(ValueError, match="non-zero"):
        SemanticPyramidNet(SemanticPyramidConfig(segmentation_classes=3, segmentation_label_ids=(0, 5)))
    with pytest.raises(ValueError, match="decoder"):
        SemanticPyramidNet(SemanticPyramidConfig(registration_decoder_channels=(8,)))


def test_a_tiny_overfit_lowers_the_registration_and_the_segmentation_losses():
    """60 Adam steps through the training objective (image, Dice and segmentation terms) on one pair of shifted
    blobs: the Dice loss of the warped labels and the segmentation loss both fall by more than 30 %."""
    torch.manual_seed(0)
    net = build_network("SemanticPyramidNet", TINY.as_dict())
    pair = _pair(2.0)
    ids = [5, 52]
    objective = LossComputer(TrainingConfig(loss_weights={"mse": 1.0, "dice": 1.0, "segmentation": 1.0},
                                            uncertainty_weighting=False, label_loss_downsample=1), ids)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)

    def measured() -> tuple[float, float]:
        with torch.no_grad():
            pred = net(pair["fixed"], pair["moving"])
            warped = spatial.warp(losses.one_hot(pair["moving_labels"].long(), ids), pred)
            dice = losses.dice_loss(losses.one_hot(pair["fixed_labels"].long(), ids), warped)
            return float(dice), float(net.segmentation_loss(pair["fixed_labels"], pair["moving_labels"]))

    dice_before, segmentation_before = measured()
    for _ in range(60):
        pred = net(pair["fixed"], pair["moving"])
        total, terms = objective(net, pair, pred)
        assert set(terms) == {"mse", "dice", "segmentation"}
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    dice_after, segmentation_after = measured()
    assert dice_after < 0.7 * dice_before, (dice_before, dice_after)
    assert segmentation_after < 0.7 * segmentation_before, (segmentation_before, segmentation_after)


def test_the_objective_segmentation_term():
    torch.manual_seed(0)
    net = SemanticPyramidNet(TINY)
    pair = _pair()
    config = TrainingConfig(loss_weights={"mse": 1.0, "segmentation": 2.0}, uncertainty_weighting=True)
    objective = LossComputer(config, [5, 52])
    pred = net(pair["fixed"], pair["moving"])
    total, terms = objective(net, pair, pred)
    assert set(terms) == {"mse", "segmentation"}
    torch.testing.assert_close(terms["segmentation"], net.segmentation_loss(pair["fixed_labels"],
                                                                            pair["moving_labels"]))
    # a fixed weight, as the regularisers and the network's auxiliary terms
    assert objective.weighting.weights()["segmentation"] == 2.0 and "segmentation" not in objective.weighting.learnable
    total.backward()
    assert net.segmentation_head.weight.grad.abs().sum() > 0

    unlabelled = {**pair, "fixed_labels": None, "moving_labels": None}
    _, terms = objective(net, unlabelled, net(pair["fixed"], pair["moving"]))
    assert set(terms) == {"mse"}

    plain = RegistrationUNet(UNetConfig(encoder_channels=(4,), decoder_channels=(4,), final_channels=()))
    with pytest.raises(ValueError, match="segmentation_loss.*RegistrationUNet"):
        objective(plain, pair, plain(pair["fixed"], pair["moving"]))
    with pytest.raises(ValueError, match="unknown loss term"):
        TrainingConfig.from_dict({"loss_weights": {"segmentations": 1.0}})


def test_the_registry_and_model_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_network("SemanticPyramidNet", TINY.as_dict())
    assert isinstance(net, SemanticPyramidNet) and net.config == TINY
    assert build_network("SemanticPyramidNet", net.config.as_dict()).config == TINY
    _perturb_heads(net)
    save_model(net, "SemanticPyramidNet", TINY.as_dict(), tmp_path / "semantic.pt", name="semantic",
               input_spacing_mm=4.0, hu_window=(-160.0, 240.0))
    loaded, card = load_model(str(tmp_path / "semantic.pt"))
    assert card.architecture == "SemanticPyramidNet" and isinstance(loaded, SemanticPyramidNet)
    fixed, moving = _random_images(12, 16, 8)
    net.eval()
    with torch.no_grad():
        expected = net.predict(fixed, moving)
        assert expected.abs().max() > 1e-4
        torch.testing.assert_close(loaded.predict(fixed, moving), expected)


def test_freezing_the_encoders_freezes_the_contracting_paths():
    net = SemanticPyramidNet(TINY)
    _set_encoder_frozen(net, True)
    frozen = {id(p) for p in net.encoders.parameters()}
    assert {id(p) for p in net.segmentation.encoders.parameters()} <= frozen
    assert all(not p.requires_grad for p in net.encoders.parameters())
    assert all(p.requires_grad for p in net.registration[1].flow.parameters())
    assert all(p.requires_grad for p in net.segmentation_head.parameters())
    _set_encoder_frozen(net, False)
    assert all(p.requires_grad for p in net.parameters())


def test_the_cpu_configuration_is_small_and_fits_its_crop():
    folder = Path(importlib.resources.files("deepabdominalreg.training") / "configs")
    config = load_config(folder / "semantic-cpu.json")
    net, architecture, settings = _build(config)
    assert architecture == "SemanticPyramidNet" and isinstance(net, SemanticPyramidNet)
    count = sum(p.numel() for p in net.parameters())
    assert count <= 500_000, count
    assert math.isclose(net.config.input_spacing_mm, config.spacing_mm)
    assert all(n % net.divisor == 0 for n in config.crop_size), (config.crop_size, net.divisor)
    assert config.loss_weights.get("segmentation", 0) > 0 and "auxiliary" not in config.loss_weights
    # the labels the training data carry: the phantom's organs and the real CT volume's masks
    ids = set(net.config.segmentation_label_ids)
    assert {1, 2, 3, 5, 6, 7, 52} <= ids
    assert {int(k) for volume in config.volumes for k in volume.get("masks", {})} <= ids
    assert SemanticPyramidConfig.from_dict(settings) == net.config
