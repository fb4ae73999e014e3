"""Fuzz-style tests: random geometries and corrupted files give a clear error or a valid result, never a crash."""

from __future__ import annotations

import hashlib

import numpy as np
import SimpleITK as sitk
from deepabdominalreg.config import config_from_preset
from deepabdominalreg.io import ImageValidationError, read_image, write_image
from deepabdominalreg.registration.pipeline import register_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TINY = config_from_preset("fast", working_spacing_mm=8.0, io_iterations=4, affine_iterations=4, io_levels=(1,),
                          io_fine_iterations=4, compute_inverse=True)


def _rotation(angles) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _volume(size, spacing, direction, origin, seed) -> sitk.Image:
    rng = np.random.default_rng(seed)
    shape = size[::-1]
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    array = np.where(x**2 + y**2 + z**2 < 0.7, 40.0, -1000.0) + rng.normal(0, 20, shape)
    array += np.where((x - 0.2) ** 2 + y**2 + (z + 0.1) ** 2 < 0.1, 600.0, 0.0)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.ravel()))
    image.SetOrigin(origin)
    return image


geometry = st.fixed_dictionaries({
    "size": st.tuples(*[st.integers(6, 20)] * 3),
    "spacing": st.tuples(*[st.floats(1.0, 9.0)] * 3),
    "angles": st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    "flip": st.sampled_from([1.0, -1.0]),
    "origin": st.tuples(*[st.floats(-300, 300)] * 3),
    "shift": st.tuples(*[st.floats(-20, 20)] * 3),
})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry, st.integers(0, 1000))
def test_random_geometry_gives_clear_error_or_valid_result(g, seed):
    direction = _rotation(g["angles"]) @ np.diag([g["flip"], 1.0, 1.0])
    fixed = _volume(g["size"], g["spacing"], direction, g["origin"], seed)
    moving = _volume(g["size"][::-1], g["spacing"][::-1], direction.T, tuple(np.add(g["origin"], g["shift"])),
                     seed + 1)
    snapshot = [hashlib.sha256(sitk.GetArrayViewFromImage(i).tobytes()).hexdigest() for i in (fixed, moving)]
    try:
        result = register_pair(fixed, moving, config=TINY)
    except ImageValidationError as exc:
        assert str(exc)  # a message for the user
    else:
        for output in (result.warped_image, result.displacement_lps, result.jacobian_full_size()):
            assert output.GetSize() == fixed.GetSize()
            assert output.GetDirection() == fixed.GetDirection()
        assert np.isfinite(sitk.GetArrayViewFromImage(result.displacement_lps)).all()
        assert result.inverse_displacement_lps.GetSize() == moving.GetSize()
    after = [hashlib.sha256(sitk.GetArrayViewFromImage(i).tobytes()).hexdigest() for i in (fixed, moving)]
    assert after == snapshot


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([".nii.gz", ".nii", ".mha", ".nrrd"]), st.floats(0.0, 0.999), st.integers(0, 255),
       st.booleans())
def test_corrupted_files_give_clear_error_or_valid_image(tmp_path_factory, suffix, cut, byte, truncate):
    folder = tmp_path_factory.mktemp("corrupt")
    good = write_image(_volume((10, 9, 8), (2.0, 2.0, 3.0), np.eye(3), (0.0, 0.0, 0.0), 0), folder / f"ct{suffix}")
    data = bytearray(good.read_bytes())
    position = int(cut * len(data))
    if truncate:
        data = data[:position]
    else:
        data[position] = byte
    bad = folder / f"bad{suffix}"
    bad.write_bytes(bytes(data))
    try:
        image = read_image(bad, "moving image")
    except ImageValidationError as exc:
        assert "moving image" in str(exc)
    else:
        assert image.GetDimension() == 3
        assert np.isfinite(sitk.GetArrayViewFromImage(image)).all()
