"""transform.h5 (ITK composite: affine + working-grid displacement) against independent readers on an oblique,
anisotropic grid: SimpleITK, Slicer's vtkMRMLTransformStorageNode (slicer-core) and ANTs (antspyx)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from deepabdominalreg.apply import apply_to_image, apply_to_labels
from deepabdominalreg.geometry import Grid, displacement_transform, map_points, resample_image
from deepabdominalreg.io import ImageValidationError
from deepabdominalreg.transforms import (
    dense_displacement,
    forward_transform,
    inverse_transform,
    read_transform,
    write_transform,
)
from geometry_helpers import oblique_direction


@pytest.fixture
def case(tmp_path):
    """A fixed grid (anisotropic, oblique), a working grid on its axes, an affine and a smooth deformable field."""
    direction = oblique_direction()
    fixed = Grid(size=(40, 36, 20), spacing=(0.8, 0.9, 2.5), origin=(-12.0, 30.0, 7.5), direction=direction)
    working = Grid(size=(12, 12, 18), spacing=(3.0, 3.0, 3.0), origin=(-14.0, 28.0, 4.0), direction=direction)
    z, y, x = np.mgrid[0:18, 0:12, 0:12].astype(np.float64)
    u = np.stack([2.0 * np.sin(x / 3.0), 1.5 * np.cos(y / 4.0), np.sin((x + z) / 5.0)], axis=-1)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.03, 0.0, -0.02, 0.98, 0.01, 0.0, 0.02, 1.01))
    affine.SetTranslation((2.0, -1.0, 3.0))
    affine.SetCenter((5.0, 40.0, 30.0))
    transform = forward_transform(affine, u, working)
    path = write_transform(transform, tmp_path / "transform.h5")
    dense = dense_displacement(transform, fixed)
    rng = np.random.default_rng(0)
    # voxel centres of the fixed grid, where the dense field is the transform (between them it interpolates it)
    points = fixed.index_to_physical(rng.integers([2, 2, 2], np.asarray(fixed.size) - 3, (12, 3)).astype(float))
    return {"fixed": fixed, "working": working, "u": u, "affine": affine, "transform": transform, "path": path,
            "dense": dense, "points": points}


def test_simpleitk_reads_transform_h5_as_the_dense_field(case):
    read = read_transform(case["path"])
    assert read.GetName() == "CompositeTransform" and read.GetNumberOfTransforms() == 2
    from_file = np.array([read.TransformPoint(tuple(p)) for p in case["points"]])
    np.testing.assert_allclose(from_file, map_points(case["points"], case["dense"]), atol=0.01)


def test_resampling_through_transform_h5_reproduces_the_dense_warp(case, oblique_image):
    moving = oblique_image
    fixed = case["fixed"].reference_image(sitk.sitkFloat32)
    through_file = resample_image(moving, fixed, read_transform(case["path"]), "linear", -1000.0)
    through_dense = resample_image(moving, fixed, displacement_transform(case["dense"]), "linear", -1000.0)
    ours = apply_to_image(moving, read_transform(case["path"]), fixed, default_value=-1000.0)
    a, b, c = (sitk.GetArrayFromImage(i) for i in (through_file, through_dense, ours))
    assert np.abs(a - b).max() < 0.5  # HU over a 1500 HU range
    assert np.abs(c - b).max() < 0.5


def test_labels_keep_their_label_set(case, oblique_image):
    labels = sitk.Cast(sitk.BinaryThreshold(oblique_image, 0.0, 1e9, 7, 0), sitk.sitkUInt16)
    labels = sitk.Cast(labels + sitk.Cast(sitk.BinaryThreshold(oblique_image, 300.0, 1e9, 5, 0), sitk.sitkUInt16),
                       sitk.sitkUInt16)
    warped = apply_to_labels(labels, case["transform"], case["fixed"])
    assert set(np.unique(sitk.GetArrayViewFromImage(warped))) <= set(np.unique(sitk.GetArrayViewFromImage(labels)))
    itk = resample_image(labels, case["fixed"], case["transform"], "nearest", 0)
    agree = sitk.GetArrayViewFromImage(itk) == sitk.GetArrayViewFromImage(warped)
    assert agree.mean() > 0.999


def test_inverse_transform_maps_points_back(case, tmp_path):
    import torch
    from deepabdominalreg.spatial import invert_displacement

    working = case["working"]
    disp_vox = torch.as_tensor(working.displacement_to_voxels(case["u"])[..., ::-1].copy()).permute(3, 0, 1, 2)[None]
    inverse_vox = invert_displacement(disp_vox.float(), tolerance=1e-3, coarse_factor=1, fine_iterations=50)
    inverse_mm = working.displacement_to_mm(inverse_vox[0].permute(1, 2, 3, 0).numpy()[..., ::-1])
    inverse = inverse_transform(case["affine"], inverse_mm, working, affine_first=True)
    path = write_transform(inverse, tmp_path / "inverse_transform.h5")
    moved = np.array([case["transform"].TransformPoint(tuple(p)) for p in case["points"]])
    back = np.array([read_transform(path).TransformPoint(tuple(p)) for p in moved])
    assert np.linalg.norm(back - case["points"], axis=1).max() < 0.1


def test_slicer_reads_transform_h5(case):
    pytest.importorskip("slicer_core")
    import slicer

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(case["path"]))
    assert storage.ReadData(node)
    from_parent = node.GetTransformFromParent()  # ITK files hold the resampling (fixed -> moving) direction

    def ras(p):
        return [-p[0], -p[1], p[2]]

    expected = map_points(case["points"], case["dense"])
    # Slicer interpolates grid transforms cubically by default, ITK linearly: the same file, the same points
    # within 0.05 mm on this deliberately rough field; with linear interpolation within 0.01 mm
    for p, q in zip(case["points"], expected):
        np.testing.assert_allclose(ras(from_parent.TransformPoint(ras(p))), q, atol=0.05)
    grids = [from_parent.GetConcatenatedTransform(i) for i in range(from_parent.GetNumberOfConcatenatedTransforms())]
    grids = [g for g in grids if g.GetClassName() == "vtkOrientedGridTransform"]
    assert len(grids) == 1
    grids[0].SetInterpolationModeToLinear()
    for p, q in zip(case["points"], expected):
        np.testing.assert_allclose(ras(from_parent.TransformPoint(ras(p))), q, atol=0.01)


def test_ants_reads_transform_h5(case):
    ants = pytest.importorskip("ants")
    pd = pytest.importorskip("pandas")

    assert ants.read_transform(str(case["path"])).transform_type == "CompositeTransform"
    frame = pd.DataFrame(case["points"], columns=["x", "y", "z"])
    mapped = ants.apply_transforms_to_points(3, frame, [str(case["path"])])[["x", "y", "z"]].to_numpy()
    np.testing.assert_allclose(mapped, map_points(case["points"], case["dense"]), atol=0.01)


def test_bad_transform_files_are_clear_errors(tmp_path):
    with pytest.raises(ImageValidationError, match="does not exist"):
        read_transform(tmp_path / "missing.h5")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(ImageValidationError, match="empty"):
        read_transform(tmp_path / "empty.h5")
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(ImageValidationError, match="cannot be read"):
        read_transform(tmp_path / "broken.h5")
    with pytest.raises(ImageValidationError, match="not an ITK transform"):
        read_transform(tmp_path)
