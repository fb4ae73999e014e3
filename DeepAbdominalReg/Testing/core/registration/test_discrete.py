"""Discrete displacement search: it recovers known translations (also on an anisotropic grid) and reduces the error
of a smooth deformation, returns exactly zero for identical images, and rejects bad settings by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from deepabdominalreg import spatial
from deepabdominalreg.registration.discrete import discrete_search


def _smooth_volume(shape: tuple[int, int, int], cells: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """``(1, 1, *shape)`` in [0, 1]: uniform noise on a ``cells`` grid, interpolated trilinearly (structure about
    ``shape / cells`` voxels across)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *cells, generator=generator)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)


def _constant(vector_vox: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    return vector_vox.view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()


def _mm(disp_vox: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    return disp_vox * torch.tensor(spacing).view(1, 3, 1, 1, 1)


def _inner(t: torch.Tensor, margin: tuple[int, int, int]) -> torch.Tensor:
    """Away from the border by ``margin`` voxels: points whose displaced position is inside the image."""
    return t[:, :, margin[0]:-margin[0], margin[1]:-margin[1], margin[2]:-margin[2]]


@pytest.mark.parametrize("inverse_consistent", [True, False])
def test_recovers_a_translation_within_a_millimetre(inverse_consistent):
    """(6, -9, 12) mm on a 3 mm grid: 9 mm is 1.5 coarse cells of 6 mm, so the sub-cell refinement is needed."""
    shape, spacing = (64, 64, 64), (3.0, 3.0, 3.0)
    moving = _smooth_volume(shape, (16, 16, 16))
    truth_mm = torch.tensor([6.0, -9.0, 12.0])
    truth = _constant(truth_mm / 3.0, shape)
    fixed = spatial.warp(moving, truth, padding_mode="border")  # fixed(x) = moving(x + t)
    disp = discrete_search(fixed, moving, spacing_mm=spacing, inverse_consistent=inverse_consistent)
    assert disp.shape == (1, 3, *shape) and disp.dtype == fixed.dtype
    error = _inner(_mm(disp - truth, spacing), (12, 12, 12)).norm(dim=1)
    mean_mm = _inner(_mm(disp, spacing), (12, 12, 12)).mean(dim=(0, 2, 3, 4))
    assert float(error.mean()) < 1.0, float(error.mean())
    assert torch.allclose(mean_mm, truth_mm, atol=0.5), mean_mm


def test_anisotropic_spacing_maps_the_mm_settings_per_axis():
    """Spacing (4.5, 3, 2) mm: the same translation in mm is (1.33, -3, 6) voxels; found in mm on every axis."""
    spacing = (4.5, 3.0, 2.0)
    shape = (44, 64, 96)  # the same ~195 mm box on every axis
    moving = _smooth_volume(shape, (16, 16, 16), seed=1)
    truth_mm = torch.tensor([6.0, -9.0, 12.0])
    truth = _constant(truth_mm / torch.tensor(spacing), shape)
    fixed = spatial.warp(moving, truth, padding_mode="border")
    disp = discrete_search(fixed, moving, spacing_mm=spacing, inverse_consistent=False)
    margin = (8, 12, 18)
    mean_mm = _inner(_mm(disp, spacing), margin).mean(dim=(0, 2, 3, 4))
    error = _inner(_mm(disp - truth, spacing), margin).norm(dim=1)
    assert torch.allclose(mean_mm, truth_mm, atol=0.75), mean_mm
    assert float(error.mean()) < 1.5, float(error.mean())


def test_reduces_the_error_of_a_smooth_deformation():
    """A smooth field of up to 21 mm per component: the search's field error inside the image is under a fifth of
    the zero field's."""
    shape, spacing = (56, 56, 56), (3.0, 3.0, 3.0)
    moving = _smooth_volume(shape, (14, 14, 14), seed=2)
    generator = torch.Generator().manual_seed(3)
    coarse = torch.randn(1, 3, 3, 3, 3, generator=generator)
    truth = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    truth = truth * (7.0 / truth.abs().max())  # voxels: at most 21 mm per component
    fixed = spatial.warp(moving, truth, padding_mode="border")
    disp = discrete_search(fixed, moving, spacing_mm=spacing)
    margin = (10, 10, 10)
    before = float(_inner(_mm(truth, spacing), margin).norm(dim=1).mean())
    after = float(_inner(_mm(disp - truth, spacing), margin).norm(dim=1).mean())
    assert before > 5.0
    assert after < before / 5.0, (before, after)  # measured: 5.4 mm -> 0.55 mm


def test_identical_images_give_exactly_zero():
    image = _smooth_volume((40, 36, 32), (8, 8, 8), seed=4)
    image[:, :, :8] = 0.0  # a flat region (air): ties between offsets go to zero
    disp = discrete_search(image, image.clone(), spacing_mm=(3.0, 3.0, 3.0))
    assert torch.count_nonzero(disp) == 0
    mask = torch.zeros(1, 1, 40, 36, 32, dtype=torch.bool)  # a mask's edge: the neighbours' costs differ there
    mask[:, :, 5:33, 6:30, 4:27] = True
    disp = discrete_search(image, image.clone(), mask, moving_mask=mask, spacing_mm=(3.0, 3.0, 3.0))
    assert torch.count_nonzero(disp) == 0


def test_recomputing_the_cost_volume_in_chunks_gives_the_kept_volume_s_result():
    """``max_cost_bytes=0`` recomputes the cost for every pass instead of keeping it: the same field, with a mask."""
    shape, spacing = (40, 40, 40), (3.0, 3.0, 3.0)
    moving = _smooth_volume(shape, (10, 10, 10), seed=5)
    fixed = spatial.warp(moving, _constant(torch.tensor([2.0, 1.0, -3.0]), shape), padding_mode="border")
    mask = torch.zeros(1, 1, *shape, dtype=torch.bool)
    mask[:, :, 5:35, 5:35, 5:35] = True
    kept = discrete_search(fixed, moving, mask, spacing_mm=spacing)
    recomputed = discrete_search(fixed, moving, mask, spacing_mm=spacing, max_cost_bytes=0)
    assert torch.equal(kept, recomputed)
    assert float(_inner(kept, (10, 10, 10))[:, 2].mean()) == pytest.approx(-3.0, abs=0.3)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"grid_spacing_mm": 0.0}, "grid_spacing_mm"),
        ({"grid_spacing_mm": float("nan")}, "grid_spacing_mm"),
        ({"search_radius_mm": -6.0}, "search_radius_mm"),
        ({"spacing_mm": (3.0, 3.0)}, "spacing_mm"),
        ({"spacing_mm": (3.0, 0.0, 3.0)}, "spacing_mm"),
        ({"patch": 2}, "patch"),
        ({"smoothing": 0}, "smoothing"),
        ({"coupling": (0.1, -1.0)}, "coupling"),
        ({"mind_dilation_mm": 0.0}, "mind_dilation_mm"),
        ({"ic_iterations": -1}, "ic_iterations"),
    ],
)
def test_bad_settings_raise_naming_the_setting(options, name):
    image = _smooth_volume((12, 12, 12), (4, 4, 4))
    kwargs = {"spacing_mm": (3.0, 3.0, 3.0), **options}
    with pytest.raises(ValueError, match=name):
        discrete_search(image, image, **kwargs)


def test_images_on_different_grids_are_rejected():
    with pytest.raises(ValueError, match="moving"):
        discrete_search(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9), spacing_mm=3.0)
