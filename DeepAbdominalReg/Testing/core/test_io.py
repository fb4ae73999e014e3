"""I/O: reading, writing (atomic, geometry kept), displacement-field files, validation of what is read."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.io import (
    ImageValidationError,
    read_displacement_field,
    read_image,
    validate_image,
    write_displacement_field,
    write_image,
)


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
