"""MICS (nn/mics.py): exact identity and swap symmetry by construction, per-axis order of the integrated gradients,
exact translations (centred lines plus a global translation), inverse consistency after a tiny overfit,
multi-step inference as composition of passes, size and the registry round trip."""

from __future__ import annotations

import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.nn import losses
from deepabdominalreg.nn.mics import MICS, MICSConfig
from deepabdominalreg.nn.models import load_model, save_model
from deepabdominalreg.nn.networks import build_network
from geometry_helpers import smooth_texture


def _random_net(seed: int, perturbation: float) -> MICS:
    """Default architecture, every layer at PyTorch's default initialisation (the head too, instead of the
    near-zero start), then every weight and bias shifted by N(0, perturbation²)."""
    torch.manual_seed(seed)
    net = MICS()
    net.head.reset_parameters()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(perturbation * torch.randn_like(p))
    return net


def _shifted_pair(shape=(16, 16, 16), shift=(0.0, 1.5, -1.0), seed=0):
    """``moving`` is ``fixed`` moved by ``shift`` voxels: ``warp(moving, shift) = fixed`` inside."""
    moving = smooth_texture(shape, seed)
    disp = torch.tensor(shift).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    fixed = spatial.warp(moving, disp, padding_mode="border")
    return fixed, moving


def _overfit(net: MICS, fixed, moving, iterations: int, lr: float = 3e-3, aux: bool = False) -> None:
    net.train()
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(iterations):
        pred = net(fixed, moving)
        loss = losses.mse_loss(fixed, spatial.warp(moving, pred, padding_mode="border"))
        if aux:
            loss = loss + sum(net.auxiliary_losses(fixed, moving, pred).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()


@pytest.mark.parametrize("perturbation", [0.0, 0.05, 0.3])
def test_identical_inputs_give_exactly_the_identity(perturbation):
    net = _random_net(0, perturbation)
    image = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 10.0
    with torch.no_grad():
        net.train()
        one_pass = net(image, image.clone())
        net.eval()
        two_passes = net(image, image.clone())
        padded = net.predict(image[..., :13, :11, :15], image[..., :13, :11, :15].clone())
        other = net(image, torch.rand_like(image))  # the weights do move a different pair
    for disp in (one_pass, two_passes, padded):
        assert float(disp.abs().max()) < 1e-6
    assert padded.shape == (2, 3, 13, 11, 15)
    assert float(other.abs().max()) > 1e-2


def test_swapped_inputs_negate_the_field_by_construction():
    net = _random_net(2, 0.05)
    g = torch.Generator().manual_seed(3)
    fixed, moving = torch.rand(1, 1, 16, 16, 16, generator=g), torch.rand(1, 1, 16, 16, 16, generator=g)
    with torch.no_grad():
        forward, backward = net.single_pass(fixed, moving), net.single_pass(moving, fixed)
    assert float(forward.abs().max()) > 0.05
    assert float((forward + backward).abs().max()) <= 1e-6
    # auxiliary_losses takes -pred as the backward field: the same as the swapped pass above
    terms = net.auxiliary_losses(fixed, moving, forward)
    assert set(terms) == {"mics_symmetry", "mics_jacobian"}
    torch.testing.assert_close(terms["mics_symmetry"],
                               net.config.symmetry_weight * losses.inverse_consistency_loss(forward, backward))


def test_swapped_inputs_are_inverse_after_a_short_training():
    """The two directions (each computed by its own pass) compose to the identity within 0.05 voxel (max over
    the interior, 2 voxels from the faces) after 120 steps on a 1.8-voxel shift; measured ~0.01, the learnt field
    within 0.01 voxel of the shift on average.  (With the lines anchored at their first voxel instead of centred,
    and no translation, the same training gives a field far from constant, std up to ~1 voxel, and a round trip
    of ~0.9 voxel.)"""
    fixed, moving = _shifted_pair()
    torch.manual_seed(4)
    net = MICS()
    _overfit(net, fixed, moving, iterations=120, aux=True)
    with torch.no_grad():
        forward, backward = net(fixed, moving, steps=1), net(moving, fixed, steps=1)
        round_trip = spatial.compose(backward, forward)  # p -> p + f(p) + b(p + f(p)), minus p
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    mean = forward[inner].mean(dim=(0, 2, 3, 4))
    assert float((mean - torch.tensor([0.0, 1.5, -1.0])).abs().max()) < 0.1  # it did learn the shift
    assert float(round_trip[inner].abs().max()) < 0.05


def test_a_translation_is_exact_and_lines_are_centred():
    """Zero step logits and translation logits ``y`` give the constant field ``T tanh(y / 2)``, of any size (here
    up to 12 voxels), whose negation is its exact inverse; for any step logits, ``u_a - t_a`` has zero mean along
    axis ``a`` and the translation changes no step."""
    net = MICS()
    T = net.config.max_translation_voxels
    y = torch.tensor([[0.3, -1.2, 2.5], [0.0, 0.1, -0.4]])
    zero = torch.zeros(2, 3, 8, 16, 12)
    disp = net.gradients_to_displacement(zero, y)
    expected = (T * torch.tanh(0.5 * y)).view(2, 3, 1, 1, 1).expand_as(disp)
    torch.testing.assert_close(disp, expected)
    assert float(disp.abs().max()) > 10.0
    assert float(spatial.compose(-disp, disp).abs().max()) < 1e-5
    x = 5.0 * torch.randn(2, 3, 8, 16, 12, generator=torch.Generator().manual_seed(11))
    with_t, without = net.gradients_to_displacement(x, y), net.gradients_to_displacement(x)
    torch.testing.assert_close(with_t - without, expected)
    for a in range(3):
        assert float(without[:, a].mean(dim=1 + a).abs().max()) < 1e-4
        torch.testing.assert_close(torch.diff(with_t[:, a], dim=1 + a), torch.diff(without[:, a], dim=1 + a))
    assert float(without.abs().max()) > 3.0


def test_each_pass_keeps_the_order_along_every_axis_but_not_det_j():
    """For saturating random weights and inputs of scale 100: along each axis the sampling positions of
    neighbours are in order, steps in (m, 2 - m) voxels, i.e. the project's Jacobian of the field's axis-a channel
    alone (identity with row a replaced: its determinant is J_aa) is >= m everywhere.  The full det J is not
    guaranteed: shear between lines folds such fields, and the Jacobian penalty sees it."""
    net = _random_net(5, 0.3)
    g = torch.Generator().manual_seed(6)
    fixed, moving = torch.randn(1, 1, 16, 24, 16, generator=g) * 100, torch.randn(1, 1, 16, 24, 16, generator=g) * 100
    m = net.config.min_step_voxels
    with torch.no_grad():
        disp = net.single_pass(fixed, moving)
        assert float(disp.abs().max()) > 5.0  # large deformations: saturated steps
        for a in range(3):
            steps = 1.0 + torch.diff(disp[:, a], dim=1 + a)
            assert float(steps.min()) >= m - 1e-4 and float(steps.max()) <= 2.0 - m + 1e-4
            only_a = torch.zeros_like(disp)
            only_a[:, a] = disp[:, a]
            assert float(spatial.jacobian_determinant(only_a).min()) >= m - 1e-4
        det = spatial.jacobian_determinant(disp)
    assert float((det <= 0).float().mean()) > 0.01
    assert float(MICS.jacobian_loss(disp)) > 0.0
    with torch.no_grad():
        gentle = MICS()(fixed, moving)  # the near-identity start
    assert float(spatial.jacobian_determinant(gentle).min()) > 0.9
    assert float(MICS.jacobian_loss(gentle)) == 0.0


def test_multi_step_inference_composes_passes_on_the_warped_moving_image():
    """Evaluation mode runs ``inference_steps`` passes, each on the moving image warped by the field so far, and
    composes them; training mode runs one.  Random weights (no training): the mechanics, not a learnt gain."""
    net = _random_net(12, 0.02)
    fixed, moving = _shifted_pair(shift=(1.0, 3.0, -2.0), seed=7)
    with torch.no_grad():
        first = net.single_pass(fixed, moving)
        second = net.single_pass(fixed, spatial.warp(moving, first, padding_mode="border"))
        third = net.single_pass(fixed, spatial.warp(moving, spatial.compose(first, second), padding_mode="border"))
        net.train()
        torch.testing.assert_close(net(fixed, moving), first)
        net.eval()
        two = net(fixed, moving)  # config.inference_steps == 2
        torch.testing.assert_close(two, spatial.compose(first, second))
        torch.testing.assert_close(net(fixed, moving, steps=3), spatial.compose(spatial.compose(first, second), third))
    assert float(second.abs().max()) > 1e-2 and float((two - first).abs().max()) > 1e-2  # the passes differ


def test_size_registry_and_checkpoint_round_trip(tmp_path):
    net = build_network("MICS", {})
    assert isinstance(net, MICS) and net.config == MICSConfig()
    assert sum(p.numel() for p in net.parameters()) <= 500_000
    settings = MICSConfig(encoder_channels=(4, 8), decoder_channels=(4,), inference_steps=3).as_dict()
    assert build_network("MICS", settings).config.inference_steps == 3
    with pytest.raises(ValueError, match="decoder_channels"):
        MICS(MICSConfig(encoder_channels=(4, 8), decoder_channels=(4, 4)))
    with pytest.raises(ValueError, match="max_translation_voxels"):
        MICS(MICSConfig(max_translation_voxels=0.0))
    torch.manual_seed(9)
    small = build_network("MICS", settings)
    save_model(small, "MICS", settings, tmp_path / "mics.pt", name="mics", input_spacing_mm=4.0,
               hu_window=(-160.0, 240.0))
    loaded, card = load_model(str(tmp_path / "mics.pt"))
    assert card.architecture == "MICS" and isinstance(loaded, MICS) and not loaded.training
    image = torch.rand(1, 1, 9, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(image, image.flip(-1)), small.eval().predict(image, image.flip(-1)))


def test_the_training_objective_adds_the_mics_terms_of_the_pair():
    from deepabdominalreg.training.config import TrainingConfig
    from deepabdominalreg.training.objective import LossComputer

    fixed, moving = _shifted_pair()
    net = _random_net(0, 0.01)
    net.train()
    pair = {"fixed": fixed, "moving": moving, "fixed_mask": torch.ones_like(fixed)}
    objective = LossComputer(TrainingConfig(loss_weights={"mse": 1.0, "auxiliary": 1.0},
                                            uncertainty_weighting=False))
    pred = net(fixed, moving)
    _, terms = objective(net, pair, pred)
    expected = net.auxiliary_losses(fixed, moving, pred)
    assert expected, "MICS's default configuration weighs its symmetry / Jacobian terms"
    torch.testing.assert_close(terms["auxiliary"], sum(expected.values()))
