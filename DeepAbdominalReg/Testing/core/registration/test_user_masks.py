"""User masks: a region kept rigid is not resized, an excluded lesion does not pull the field, and bad masks get
clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from deepabdominalreg import spatial
from deepabdominalreg.config import RegistrationConfig, config_from_preset
from deepabdominalreg.geometry import Grid, resample_image
from deepabdominalreg.io import ImageValidationError
from deepabdominalreg.nn.losses import strain_energy
from deepabdominalreg.registration.instance_optimisation import (
    InstanceOptimisationSettings,
    _control_mask,
    instance_optimise,
)
from deepabdominalreg.registration.pipeline import register_pair

PRECISE = config_from_preset("fast", working_spacing_mm=4.0, affine_levels_mm=(8.0, 4.0), io_levels=(2, 1), seed=0)


def _coordinates(shape):
    return torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij")


def test_strain_energy_known_values():
    shape = (9, 10, 11)
    z, y, x = _coordinates(shape)
    zero = torch.zeros_like(z)
    translation = torch.stack([zero + 1.5, zero - 2.0, zero + 0.3])[None]
    assert float(strain_energy(translation)) < 1e-20
    stretch = torch.stack([0.1 * z, zero, zero])[None]  # strain 0.1 along d only
    assert float(strain_energy(stretch)) == pytest.approx(0.01, rel=1e-9)
    shear = torch.stack([0.2 * y, zero, zero])[None]  # sym(grad u): 0.1 at (d, h) and (h, d)
    assert float(strain_energy(shear)) == pytest.approx(0.02, rel=1e-9)
    angle = 1e-3  # a small rotation about d: strain of order angle^2 only
    rotation = torch.stack([zero, -angle * x, angle * y])[None]
    assert float(strain_energy(rotation)) < 1e-20
    # the mask chooses where the mean is taken
    half = torch.stack([torch.where(z < 4, 0.1 * z, 0.4 + 0 * z), zero, zero])[None]
    inside = (z < 3)[None, None]
    assert float(strain_energy(half, inside)) == pytest.approx(0.01, rel=1e-9)
    assert float(strain_energy(half, ~(z < 6)[None, None])) < 1e-20


def test_control_mask_takes_the_points_near_the_mask():
    mask = torch.zeros(1, 1, 20, 20, 20, dtype=torch.bool)
    mask[..., 9:11, 9:11, 9:11] = True
    positions = tuple(torch.arange(5, dtype=torch.float64) * 4.75 for _ in range(3))  # 0, 4.75, ..., 19
    found = _control_mask(mask, positions, (2, 2, 2))
    assert found.shape == (1, 1, 5, 5, 5)
    assert found[0, 0, 2, 2, 2] and int(found.sum()) == 1  # only the point at voxel 9.5 (rounded 10) is near


def _growing_sphere(shape=(32, 32, 32)):
    """A textured volume with a bright sphere of radius 5 voxels in the fixed and 7.5 in the moving (a tumour that
    grew between scans)."""
    g = torch.Generator().manual_seed(1)
    texture = spatial.box_filter(spatial.box_filter(torch.rand(1, 1, *shape, generator=g), 3), 3)
    texture = 0.5 * (texture - texture.min()) / (texture.max() - texture.min())
    z, y, x = (c.float() for c in _coordinates(shape))
    distance = ((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2).sqrt()

    def sphere(radius):
        return torch.sigmoid((radius - distance) * 2)[None, None]

    return texture + 0.5 * sphere(5.0), texture + 0.5 * sphere(7.5), (distance <= 7.5)[None, None]


@pytest.mark.parametrize("transform", ["bspline", "trilinear"])
def test_a_region_kept_rigid_is_not_resized_to_match(transform):
    """Without a rigid mask the optimiser shrinks the grown tumour onto the fixed one (large strain inside it);
    with the mask the tumour moves as a whole and its growth stays visible."""
    fixed, moving, rigid = _growing_sphere()
    mask = torch.ones_like(fixed, dtype=torch.bool)
    config = RegistrationConfig(io_levels=(2, 1), io_iterations=60, io_fine_iterations=60, io_learning_rate_mm=0.5,
                                io_control_spacing_mm=2.0, io_ncc_window_mm=5.0, io_gradient_floor_mm=0.1,
                                io_transform=transform, io_bending_weight=10.0)
    settings = InstanceOptimisationSettings.from_config(config, working_spacing_mm=1.0)
    free = instance_optimise(fixed, moving, None, mask, settings=settings)
    kept = instance_optimise(fixed, moving, None, mask, settings=settings, rigid_mask=rigid)
    free_strain, kept_strain = (float(strain_energy(u, rigid).sqrt()) for u in (free, kept))
    assert free_strain > 0.15, free_strain
    assert kept_strain < 0.25 * free_strain and kept_strain < 0.06, (free_strain, kept_strain)
    # without a rigidity weight the mask changes nothing
    unweighted = InstanceOptimisationSettings.from_config(config.replace(io_rigidity_weight=0.0), 1.0)
    assert torch.equal(instance_optimise(fixed, moving, None, mask, settings=unweighted, rigid_mask=rigid), free)


@pytest.fixture(scope="module")
def lesion_pair():
    """A phantom (fixed) and the same phantom translated by a known offset with a bright lesion that only the
    moving scan has; the lesion's mask on the moving grid."""
    from deepabdominalreg.synthetic.anatomy import add_ct_noise, render_phantom

    clean, _ = render_phantom(seed=3, spacing_mm=4.0)
    moving = add_ct_noise(clean, seed=1)
    grid = Grid.from_image(moving)
    offset_mm = np.array([3.0, -4.0, 5.0])
    # the fixed image: fixed(x) = moving(x + t), on a field of view 3 voxels smaller on every side
    inner = Grid(size=tuple(s - 6 for s in grid.size), spacing=grid.spacing,
                 origin=tuple(grid.index_to_physical([[3, 3, 3]])[0]), direction=grid.direction)
    fixed = resample_image(moving, inner, sitk.TranslationTransform(3, tuple(offset_mm)), "linear", -1024.0)
    array = sitk.GetArrayFromImage(moving)
    zyx = np.indices(array.shape)
    centre = np.array(array.shape) // 2 + np.array([0, -6, 4])
    lesion = ((zyx - centre[:, None, None, None]) ** 2).sum(0) <= 4 ** 2  # 16 mm radius
    with_lesion = sitk.GetImageFromArray(np.where(lesion, array + 400.0, array).astype(np.float32))
    with_lesion.CopyInformation(moving)
    lesion_mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
    lesion_mask.CopyInformation(moving)
    return fixed, with_lesion, lesion_mask, offset_mm


def test_an_excluded_lesion_does_not_pull_the_field(lesion_pair):
    fixed, moving, lesion_mask, offset_mm = lesion_pair
    # where the lesion is in the fixed scan's space (its pre-image under the translation), grown by 8 mm
    fixed_lesion = resample_image(lesion_mask, fixed, sitk.TranslationTransform(3, tuple(offset_mm)), "nearest")
    near = sitk.GetArrayFromImage(sitk.BinaryDilate(fixed_lesion, (2, 2, 2))) > 0

    def error_near_lesion(result):
        found = sitk.GetArrayFromImage(result.displacement_lps)
        return float(np.linalg.norm(found - offset_mm, axis=-1)[near].mean())

    plain = register_pair(fixed, moving, config=PRECISE)
    mask_before = sitk.GetArrayFromImage(lesion_mask)
    excluded = register_pair(fixed, moving, config=PRECISE, moving_exclude_mask=lesion_mask)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lesion_mask), mask_before)  # inputs are never modified
    assert error_near_lesion(excluded) < 0.3 * error_near_lesion(plain), (error_near_lesion(plain),
                                                                          error_near_lesion(excluded))
    assert 0.1 < excluded.metrics["user_masks"]["excluded_percent_of_body"] < 2.0  # a 24 mm ball (lesion + reach)
    assert "user_masks" not in plain.metrics
    # the same region given as a fixed-image mask works the same way
    on_fixed = register_pair(fixed, moving, config=PRECISE, exclude_mask=fixed_lesion)
    assert error_near_lesion(on_fixed) < 0.3 * error_near_lesion(plain)


def test_rigid_mask_is_reported_and_masks_are_checked(lesion_pair):
    fixed, moving, lesion_mask, offset_mm = lesion_pair
    fixed_lesion = resample_image(lesion_mask, fixed, sitk.TranslationTransform(3, tuple(offset_mm)), "nearest")
    result = register_pair(fixed, moving, config=PRECISE.replace(io_iterations=10, io_fine_iterations=5),
                           rigid_mask=fixed_lesion)
    report = result.metrics["user_masks"]
    assert report["rigid_voxels"] > 0 and 0 <= report["rigid_rms_strain"] < 0.2
    empty = sitk.Image(fixed_lesion)
    empty *= 0
    with pytest.raises(ImageValidationError, match="rigid mask is empty"):
        register_pair(fixed, moving, config=PRECISE, rigid_mask=empty)
    everything = sitk.Image(fixed_lesion) * 0 + 1
    with pytest.raises(ImageValidationError, match="nothing is left to register"):
        register_pair(fixed, moving, config=PRECISE, exclude_mask=everything)
    # a mask on another grid is resampled onto its volume's, with a warning
    coarse = sitk.Shrink(fixed_lesion, (2, 2, 2))
    resampled = register_pair(fixed, moving, config=PRECISE.replace(io_iterations=5, io_fine_iterations=0),
                              rigid_mask=coarse)
    assert any("rigid mask" in w and "resampled" in w for w in resampled.metrics["warnings"])
