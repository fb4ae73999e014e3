"""DLIR (de Vos et al. 2019): B-spline upsampling by transposed convolution against the basis matrices, the bounded
affine ConvNet, the composition of the stages, a tiny overfit through the training objective, the registry round
trip and the size of the CPU configuration."""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path

import pytest
import torch
from deepabdominalreg import spatial
from deepabdominalreg.nn import losses
from deepabdominalreg.nn.dlir import DLIR, DLIRConfig, bspline_upsample
from deepabdominalreg.nn.models import load_model, save_model
from deepabdominalreg.nn.networks import RegistrationUNet, UNetConfig, build_network
from deepabdominalreg.training.config import TrainingConfig, load_config
from deepabdominalreg.training.loop import _build
from deepabdominalreg.training.objective import LossComputer

TINY = DLIRConfig(input_spacing_mm=4.0, affine_channels=(4, 8), affine_hidden=8, control_spacing_mm=(32.0, 16.0),
                  deformable_channels=(4, 8, 8, 8))


def _reference_bspline(control: torch.Tensor, spacing: tuple[int, int, int],
                       shape: tuple[int, int, int]) -> torch.Tensor:
    """``sum_ijk c_ijk Mz[:, i] My[:, j] Mx[:, k]`` with the project's basis matrices, in float64."""
    mz, my, mx = (spatial.bspline_basis_matrix(n, s, c) for n, s, c in zip(shape, spacing, control.shape[2:]))
    return torch.einsum("bcijk,zi,yj,xk->bczyx", control.double(), mz, my, mx)


@pytest.mark.parametrize("shape, spacing", [((13, 17, 9), (4, 3, 5)), ((24, 24, 24), (16, 16, 16)),
                                            ((7, 5, 11), (1, 2, 3)), ((33, 20, 15), (8, 8, 8))])
def test_transposed_convolution_upsampling_equals_the_basis_matrix_interpolation(shape, spacing):
    torch.manual_seed(0)
    sizes = [spatial.bspline_control_size(n, s) for n, s in zip(shape, spacing)]
    control = torch.randn(2, 3, *sizes)
    dense = bspline_upsample(control, spacing, shape)
    assert dense.shape == (2, 3, *shape)
    torch.testing.assert_close(dense.double(), _reference_bspline(control, spacing, shape), atol=1e-5, rtol=0)


def test_upsampling_refuses_a_control_grid_of_the_wrong_size():
    with pytest.raises(ValueError, match="control points"):
        bspline_upsample(torch.zeros(1, 3, 5, 6, 6), 4, (12, 12, 12))


def _random_images(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 1, *shape, generator=g) * scale, torch.rand(2, 1, *shape, generator=g) * scale)


def _assert_bounded(net: DLIR, components: dict, matrix: torch.Tensor) -> None:
    c = net.config
    for value in components.values():
        assert torch.isfinite(value).all()
    assert (components["translation_mm"].abs() <= c.max_translation_mm).all()
    assert (components["rotation_deg"].abs() <= c.max_rotation_deg).all()
    assert (components["scale"] <= c.max_scale_ratio * (1 + 1e-6)).all()
    assert (components["scale"] >= (1 - 1e-6) / c.max_scale_ratio).all()
    assert (components["shear"].abs() <= c.max_shear).all()
    det = torch.linalg.det(matrix.double())
    assert (det > 0).all()
    torch.testing.assert_close(det, components["scale"].double().prod(dim=1), rtol=1e-5, atol=0)


def test_affine_is_the_identity_at_initialisation():
    net = DLIR(TINY)
    fixed, moving = _random_images(12, 14, 10)
    components = net.affine_components(fixed, moving)
    assert torch.equal(components["translation_mm"], torch.zeros(2, 3))
    assert torch.equal(components["scale"], torch.ones(2, 3))
    assert torch.equal(net.affine_matrix(components), torch.eye(3).expand(2, 3, 3))
    affine_only = DLIR(DLIRConfig(input_spacing_mm=4.0, affine_channels=(4, 8), affine_hidden=8, control_spacing_mm=()))
    assert torch.equal(affine_only(fixed, moving), torch.zeros(2, 3, 12, 14, 10))


def test_an_untrained_deformable_stage_is_a_block_matching_step():
    """The stage starts from its matching cost's soft-argmin: an untrained network already moves a shifted pair
    the right way (``warp(moving, u) ~ fixed`` needs ``u_w ~ +shift``) and by part of the shift."""
    torch.manual_seed(0)
    pair = _shifted_pair(size=32, shift_vox=2.0)
    net = DLIR(DLIRConfig(input_spacing_mm=4.0, affine=False, control_spacing_mm=(16.0,),
                          deformable_channels=(4, 4, 4), search_radius_mm=24.0))
    with torch.no_grad():
        disp = net(pair["fixed"], pair["moving"])
        back = net(pair["moving"], pair["fixed"])
    centre, centre_back = disp[0, :, 8:24, 8:24, 8:24], back[0, :, 8:24, 8:24, 8:24]
    # a partial step (the untrained features blur the cost's minimum), in the right direction both ways
    assert 0.25 < float(centre[2].mean()) < 3.0, float(centre[2].mean())
    assert -3.0 < float(centre_back[2].mean()) < -0.25, float(centre_back[2].mean())


@pytest.mark.parametrize("weight_std, input_scale, raw_outputs", [(0.3, 1.0, "finite"), (1e3, 1.0, "saturating"),
                                                                  (1e6, 1e30, "non-finite")])
def test_affine_stays_within_its_bounds_with_positive_determinant(weight_std, input_scale, raw_outputs):
    """Random weights, huge ones (the raw outputs far beyond tanh's range) and huge ones with huge inputs (the raw
    outputs overflow to inf and nan)."""
    torch.manual_seed(1)
    net = DLIR(TINY)
    with torch.no_grad():
        for p in net.affine_net.parameters():
            p.normal_(0.0, weight_std)
    fixed, moving = _random_images(12, 14, 10, scale=input_scale)
    with torch.no_grad():
        raw = net.affine_net(fixed, moving)
        components = net.affine_components(fixed, moving)
    if raw_outputs == "saturating":
        assert torch.isfinite(raw).all() and raw.abs().max() > 100
        # the bound is reached, not exceeded
        assert torch.isclose(components["rotation_deg"].abs().max(), torch.tensor(net.config.max_rotation_deg))
    else:
        assert bool(torch.isfinite(raw).all()) == (raw_outputs == "finite")
    _assert_bounded(net, components, net.affine_matrix(components))


def test_affine_matrix_known_answers():
    net = DLIR(TINY)
    quarter = {"rotation_deg": torch.tensor([[90.0, 0.0, 0.0]]), "scale": torch.ones(1, 3),
               "shear": torch.zeros(1, 3)}
    matrix = net.affine_matrix(quarter)[0]
    torch.testing.assert_close(matrix @ torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(matrix @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    sheared = {"rotation_deg": torch.zeros(1, 3), "scale": torch.tensor([[1.1, 0.9, 1.2]]),
               "shear": torch.tensor([[0.1, -0.05, 0.02]])}
    expected = torch.tensor([[1.1, 0.11, -0.055], [0.0, 0.9, 0.018], [0.0, 0.0, 1.2]])
    torch.testing.assert_close(net.affine_matrix(sheared)[0], expected)


def test_the_deformable_stage_acts_before_the_affine_on_any_grid_size():
    """One stage: the field is ``A(p + u(p)) - p`` with ``u`` the B-spline of the stage's control points."""
    torch.manual_seed(2)
    config = DLIRConfig(input_spacing_mm=4.0, affine_channels=(4,), affine_hidden=8, control_spacing_mm=(16.0,),
                        deformable_channels=(4, 4, 4))
    net = DLIR(config)
    with torch.no_grad():
        net.affine_net.head[-1].weight.normal_(0.0, 0.5)
        net.stages[0].head.weight.normal_(0.0, 0.5)
    shape = (13, 10, 11)
    fixed, moving = _random_images(*shape)
    with torch.no_grad():
        disp = net.predict(fixed, moving)
        components = net.affine_components(fixed, moving)
    assert disp.shape == (2, 3, *shape)
    u = _reference_bspline(net.control_points[0], (4, 4, 4), shape)
    points = spatial.identity_grid(shape, dtype=torch.float64) + u
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    matrix = net.affine_matrix(components).double()
    mapped = torch.einsum("bij,bjdhw->bidhw", matrix, points - centre) + centre \
        + (components["translation_mm"].double() / 4.0).view(2, 3, 1, 1, 1)
    assert u.abs().max() > 0.1
    torch.testing.assert_close(disp.double(), mapped - spatial.identity_grid(shape, dtype=torch.float64),
                               atol=1e-4, rtol=0)


def _shifted_pair(size: int = 24, shift_vox: float = 2.0) -> dict:
    z, y, x = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij")
    c = (size - 1) / 2

    def blobs(offset: float) -> torch.Tensor:
        a = torch.exp(-(((z - c) / 5) ** 2 + ((y - c + 3) / 4) ** 2 + ((x - c - offset) / 6) ** 2))
        b = 0.6 * torch.exp(-(((z - c - 4) / 3) ** 2 + ((y - c - 5) / 3) ** 2 + ((x - c + 4 - offset) / 3) ** 2))
        return (a + b)[None, None]

    fixed = blobs(0.0)
    return {"fixed": fixed, "moving": blobs(shift_vox), "fixed_mask": torch.ones_like(fixed, dtype=torch.bool)}


def test_tiny_overfit_through_the_training_objective_and_the_registry_round_trip(tmp_path):
    """A few dozen Adam steps on one shifted pair lower the image loss of the objective with the network's bending
    term; the network builds by name and its saved model gives the same field."""
    torch.manual_seed(0)
    net = build_network("DLIR", TINY.as_dict())
    assert isinstance(net, DLIR) and net.config == TINY
    pair = _shifted_pair()
    config = TrainingConfig(loss_weights={"mse": 1.0, "auxiliary": 50.0}, uncertainty_weighting=False)
    objective = LossComputer(config)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)

    def image_loss() -> float:
        with torch.no_grad():
            return float(losses.mse_loss(pair["fixed"], spatial.warp(pair["moving"], net(pair["fixed"],
                                                                                       pair["moving"]))))

    before = image_loss()
    for _ in range(40):
        pred = net(pair["fixed"], pair["moving"])
        total, terms = objective(net, pair, pred)
        assert set(terms) == {"mse", "auxiliary"}
        torch.testing.assert_close(terms["auxiliary"], net.auxiliary_losses()["bending"])
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    after = image_loss()
    assert after < 0.5 * before, (before, after)
    assert float(net.auxiliary_losses()["bending"]) > 0

    save_model(net, "DLIR", TINY.as_dict(), tmp_path / "dlir.pt", name="dlir", input_spacing_mm=4.0,
               hu_window=(-160.0, 240.0))
    loaded, card = load_model(str(tmp_path / "dlir.pt"))
    assert card.architecture == "DLIR" and isinstance(loaded, DLIR)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(pair["fixed"], pair["moving"]),
                                   net.predict(pair["fixed"], pair["moving"]))


def test_the_auxiliary_term_needs_a_network_that_has_one():
    pair = _shifted_pair(8)
    net = RegistrationUNet(UNetConfig(encoder_channels=(4,), decoder_channels=(4,), final_channels=()))
    objective = LossComputer(TrainingConfig(loss_weights={"mse": 1.0, "auxiliary": 1.0},
                                            uncertainty_weighting=False))
    with pytest.raises(ValueError, match="auxiliary_losses"):
        objective(net, pair, net(pair["fixed"], pair["moving"]))


def test_control_spacings_must_be_power_of_two_multiples_of_the_input_spacing():
    with pytest.raises(ValueError, match="power-of-two"):
        DLIR(DLIRConfig(input_spacing_mm=4.0, control_spacing_mm=(48.0,)))
    with pytest.raises(ValueError, match="deformable_channels"):
        DLIR(DLIRConfig(input_spacing_mm=4.0, control_spacing_mm=(64.0,), deformable_channels=(4, 4)))


def _cpu_config() -> TrainingConfig:
    folder = Path(importlib.resources.files("deepabdominalreg.training") / "configs")
    return load_config(folder / "dlir-cpu.json")


def test_the_cpu_configuration_is_small_and_registers_its_crop():
    config = _cpu_config()
    net = build_network(config.architecture, config.network)
    count = sum(p.numel() for p in net.parameters())
    assert count <= 500_000, count
    assert math.isclose(net.config.input_spacing_mm, config.spacing_mm)
    assert net.knot_spacings == (16, 8, 4)
    with torch.no_grad():
        fixed, moving = _random_images(*config.crop_size)
        assert net(fixed[:1], moving[:1]).shape == (1, 3, *config.crop_size)
    with pytest.raises(ValueError, match="input_spacing_mm"):
        _build(config.replace(spacing_mm=6.0))
