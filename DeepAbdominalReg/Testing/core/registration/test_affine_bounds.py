"""The affine's parameterisation: rotation times a bounded symmetric stretch, never a reflection or a collapse."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.geometry import make_working_grid, resample_image
from deepabdominalreg.registration.affine import AffineSettings, linear_part, optimise_affine
from deepabdominalreg.registration.preprocessing import prepare_working_image
from deepabdominalreg.synthetic.anatomy import render_phantom
from scipy.linalg import expm, logm


def test_linear_part_is_a_rotation_times_the_exponential_of_a_symmetric_stretch():
    rng = np.random.default_rng(1)
    p = rng.normal(0.0, 0.4, 9)
    w, sigma, b = p[:3] / np.sqrt(2), p[3:6], p[6:] / np.sqrt(2)
    skew = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
    stretch = np.diag(sigma) + np.array([[0, b[0], b[1]], [b[0], 0, b[2]], [b[1], b[2], 0]])
    got = linear_part(torch.as_tensor(p, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expm(skew) @ expm(stretch), atol=1e-12)
    assert np.linalg.det(got) == pytest.approx(np.exp(sigma.sum()), rel=1e-10)
    # near zero: I + [w]x + S, with the parameters an orthonormal basis of the 3 x 3 matrices
    jacobian = torch.autograd.functional.jacobian(linear_part, torch.zeros(9, dtype=torch.float64))
    basis = jacobian.reshape(9, 9).numpy()
    np.testing.assert_allclose(basis.T @ basis, np.eye(9), atol=1e-12)


def _stretch(matrix: np.ndarray) -> np.ndarray:
    """``S`` of ``matrix = R exp(S)`` (polar decomposition)."""
    return np.real(0.5 * logm(matrix.T @ matrix))


@pytest.fixture(scope="module")
def phantom():
    image, _ = render_phantom(seed=2, spacing_mm=6.0)
    return image


def _affine(fixed: sitk.Image, moving: sitk.Image, **config) -> np.ndarray:
    settings = AffineSettings.from_config(RegistrationConfig(affine_levels_mm=(12.0, 6.0), **config))
    w_fixed = prepare_working_image(fixed, make_working_grid(fixed, 6.0, 160), (-160.0, 240.0))
    w_moving = prepare_working_image(moving, make_working_grid(moving, 6.0, 160), (-160.0, 240.0))
    result = optimise_affine(w_fixed.grid, w_fixed.intensity, w_moving.grid, w_moving.intensity, settings,
                             fixed_field_of_view=w_fixed.field_of_view, moving_field_of_view=w_moving.field_of_view)
    return np.asarray(result.GetMatrix()).reshape(3, 3)


def _scaled(image: sitk.Image, factor: float) -> sitk.Image:
    """``out(y) = image(c + (y - c) / factor)``: the body ``factor`` times its size (about the grid's centre)."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()])
    transform = sitk.AffineTransform(3)
    transform.SetCenter(centre)
    transform.SetMatrix(tuple((np.eye(3) / factor).ravel()))
    return resample_image(image, image, transform, "linear", -1024.0)


def test_a_half_size_body_stays_within_the_scale_bound(phantom):
    """The moving body is half the fixed's size: the unbounded optimum scales by ~0.5 (a wide bound reaches
    below 2/3); the default bound holds every scale at 1 / 1.5 or more, det > 0."""
    moving = _scaled(phantom, 0.5)
    wide = _affine(phantom, moving, affine_max_scale=3.0)
    assert np.linalg.det(wide) ** (1 / 3) < 0.62
    bounded = _affine(phantom, moving)
    stretch = _stretch(bounded)
    assert np.linalg.det(bounded) > 0
    assert np.all(np.diag(stretch) >= -np.log(1.5) - 1e-4), np.diag(stretch)
    assert np.all(np.abs(stretch - np.diag(np.diag(stretch))) <= 0.3 + 1e-4)


def test_a_mirrored_scan_never_gives_a_reflection(phantom):
    """Moving: the phantom mirrored left-right (a wrong header): det > 0 and the bounds hold."""
    mirrored = sitk.Flip(phantom, [True, False, False])
    mirrored.CopyInformation(phantom)
    matrix = _affine(phantom, mirrored, affine_max_shear=0.1)
    stretch = _stretch(matrix)
    assert np.linalg.det(matrix) > 0
    assert np.all(np.abs(np.diag(stretch)) <= np.log(1.5) + 1e-4)
    assert np.all(np.abs(stretch - np.diag(np.diag(stretch))) <= 0.1 + 1e-4)


def test_uniform_images_give_the_identity_linear_part(phantom):
    uniform = sitk.Image(phantom.GetSize(), sitk.sitkFloat32) + 40.0
    uniform.CopyInformation(phantom)
    np.testing.assert_allclose(_affine(uniform, uniform), np.eye(3), atol=1e-6)
