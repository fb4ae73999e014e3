"""Warping a label map (nearest neighbour) by an affine + smooth displacement: ITK through the composite
transform against ``fields.warp_image``, on the shared real CT's segmentation resampled to 0.9 mm (405 x 335 x 371).

    python benchmarks/ab_timing/time_label_warp.py [SEGMENTATION] [SPACING_MM]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import SimpleITK as sitk
import torch
from deepabdominalreg.allocator import reuse_freed_memory
from deepabdominalreg.fields import affine_field_displacement, warp_image
from deepabdominalreg.image import Grid, make_working_grid, resample_image
from scipy import ndimage

DEFAULT = "../shared/data/totalsegmentator/example_seg_fast_force_split.nii.gz"


def main() -> None:
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    labels = sitk.ReadImage(sys.argv[1] if len(sys.argv) > 1 else DEFAULT)
    spacing = float(sys.argv[2]) if len(sys.argv) > 2 else 0.9
    labels = resample_image(labels, make_working_grid(labels, spacing, 1000), None, "nearest")
    grid, working = Grid.from_image(labels), make_working_grid(labels, 3.0, 160)
    rng = np.random.default_rng(0)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=working.shape_zyx), 3) for _ in range(3)], -1)
    field = 8.0 * field / np.abs(field).max()
    affine = sitk.AffineTransform(3)
    affine.SetTranslation((2.0, -3.0, 1.0))
    with reuse_freed_memory():
        displacement = affine_field_displacement(grid, field, working, after=affine)
        composite = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(
            working.image_from_array(field.astype(np.float64), is_vector=True))])
        start = time.perf_counter()
        reference = resample_image(labels, labels, composite, "nearest", default_value=0)
        itk_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = warp_image(labels, displacement, default_value=0, interpolator="nearest")
        torch_s = time.perf_counter() - start
    a, b = sitk.GetArrayViewFromImage(reference), sitk.GetArrayViewFromImage(ours)
    print(f"{labels.GetSize()} voxels: ITK {itk_s:.2f} s, torch {torch_s:.2f} s, "
          f"voxels that differ {(a != b).sum()} of {a.size}")


if __name__ == "__main__":
    main()
