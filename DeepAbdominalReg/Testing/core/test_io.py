"""Geometry and I/O: oblique directions, anisotropic spacing, atomic writes, validation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.geometry import Grid, make_working_grid, resample_image
from deepabdominalreg.io import (
    ImageValidationError,
    read_displacement_field,
    read_image,
    validate_image,
    write_displacement_field,
    write_image,
)


def test_grid_index_physical_round_trip_matches_sitk(oblique_image):
    grid = Grid.from_image(oblique_image)
    index = np.array([[0, 0, 0], [3, 7, 2], [23, 19, 15], [1.5, 2.25, 0.5]])
    ours = grid.index_to_physical(index)
    theirs = np.array([oblique_image.TransformContinuousIndexToPhysicalPoint(list(map(float, i))) for i in index])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    np.testing.assert_allclose(grid.physical_to_index(ours), index, atol=1e-9)


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "mha"])
def test_write_read_keeps_geometry(tmp_path, oblique_image, fmt):
    path = write_image(oblique_image, tmp_path / f"image.{fmt}")
    back = read_image(path)
    assert back.GetSize() == oblique_image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), oblique_image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), oblique_image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), oblique_image.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(oblique_image), atol=1e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_resample_identity_on_same_grid_is_exact(oblique_image):
    out = resample_image(oblique_image, oblique_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(oblique_image))


def test_resample_to_other_grid_and_back_preserves_physical_content(oblique_image):
    working = make_working_grid(oblique_image, 1.0)
    there = resample_image(oblique_image, working, default_value=-500)
    # the working grid keeps the direction and covers every voxel centre of the reference
    assert working.direction == Grid.from_image(oblique_image).direction
    back = resample_image(there, oblique_image, default_value=-500)
    a, b = sitk.GetArrayFromImage(oblique_image), sitk.GetArrayFromImage(back)
    assert np.abs(a - b).max() < 60.0  # smooth blob of amplitude 1000, two linear interpolations
    assert np.abs(a - b).mean() < 5.0


def test_working_grid_covers_reference_voxel_centres(oblique_image):
    grid = make_working_grid(oblique_image, 4.0)
    ref = Grid.from_image(oblique_image)
    idx = grid.physical_to_index(ref.corners())
    assert np.all(idx >= -1e-6) and np.all(idx <= np.asarray(grid.size) - 1 + 1e-6)
    assert grid.spacing == (4.0, 4.0, 4.0)
    capped = make_working_grid(oblique_image, 0.1, max_voxels_per_axis=32)
    assert max(capped.size) <= 32


def test_translation_resampling_matches_known_shift():
    array = np.zeros((20, 20, 20), np.float32)
    array[8:12, 8:12, 8:12] = 100
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    # output point x samples input at x + t: content moves by -t
    shifted = resample_image(image, image, sitk.TranslationTransform(3, (4.0, 0.0, 0.0)))
    out = sitk.GetArrayFromImage(shifted)
    np.testing.assert_array_equal(out[8:12, 8:12, 6:10], 100)
    assert out[8:12, 8:12, 10:12].max() == 0


def test_displacement_field_nifti_round_trip_is_lps_and_intent_1006(tmp_path, oblique_image):
    vectors = np.zeros((*sitk.GetArrayViewFromImage(oblique_image).shape, 3), np.float32)
    vectors[..., 0], vectors[..., 1], vectors[..., 2] = 1.5, -2.0, 3.25
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(oblique_image)
    path = write_displacement_field(field, tmp_path / "disp.nii.gz")
    with gzip.open(path) as handle:
        header = handle.read(348)
    assert int.from_bytes(header[68:70], "little", signed=True) == 1006
    back = read_displacement_field(path)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back)[0, 0, 0], [1.5, -2.0, 3.25], atol=1e-6)
    transform = sitk.DisplacementFieldTransform(back)
    p = oblique_image.TransformIndexToPhysicalPoint((5, 5, 5))
    np.testing.assert_allclose(np.subtract(transform.TransformPoint(p), p), [1.5, -2.0, 3.25], atol=1e-5)


def test_truncated_gzip_is_a_clear_error(tmp_path, oblique_image):
    path = write_image(oblique_image, tmp_path / "image.nii.gz")
    data = path.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageValidationError, match="truncated"):
        read_image(bad, "moving image")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a * 0 + 5, "constant"),
        (lambda a: np.where(a > 0, np.nan, a), "NaN"),
    ],
)
def test_invalid_voxels_are_refused(oblique_image, mutate, message):
    array = mutate(sitk.GetArrayFromImage(oblique_image))
    image = sitk.GetImageFromArray(array.astype(np.float32))
    with pytest.raises(ImageValidationError, match=message):
        validate_image(image, "fixed image")


def test_2d_and_vector_images_are_refused():
    with pytest.raises(ImageValidationError, match="3D"):
        validate_image(sitk.Image(10, 10, sitk.sitkFloat32), "fixed image")
    with pytest.raises(ImageValidationError, match="components"):
        validate_image(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), "fixed image")


def test_missing_file_message_names_the_role(tmp_path):
    with pytest.raises(ImageValidationError, match="moving image .* does not exist"):
        read_image(tmp_path / "nope.nii.gz", "moving image")
