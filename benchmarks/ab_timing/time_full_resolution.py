"""The pipeline's full-resolution output functions at clinical size, one thread, heap reuse on (as in
``register_pair``): the composite displacement (separable path), the CT warped by it, its Jacobian determinant and
magnitude, and the inverse on the moving grid as the pipeline computes it.  Each function runs twice per process
(the first call also pays for new memory: this VM's page faults are slow); the second call is reported.  Outputs
are saved so that two code versions can be compared voxel by voxel (``/tmp/ab_full_<label>_<name>.mha``).

    python benchmarks/memory_test.py --fixed F --moving M --work-dir /tmp/clin --keep --prepare-only
    python benchmarks/ab_timing/time_full_resolution.py /tmp/clin/moving_512x512x400.nii
    bash benchmarks/ab_timing/run_ab.sh /tmp/base 2 benchmarks/ab_timing/time_full_resolution.py MOVING

The field is synthetic but pipeline-like: a smooth random displacement (up to 8 mm) on a 3 mm working grid of the
image, after a small rotation + translation.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import SimpleITK as sitk
import torch
from deepabdominalreg import metrics, spatial
from deepabdominalreg.allocator import reuse_freed_memory
from deepabdominalreg.fields import affine_field_displacement, warp_image
from deepabdominalreg.image import Grid, make_working_grid
from scipy import ndimage


def _timed(label: str, name: str, function) -> object:
    function()  # first call: new memory
    start = time.perf_counter()
    result = function()
    print(f"{label:5s} {name:12s} {time.perf_counter() - start:6.2f} s", flush=True)
    if isinstance(result, sitk.Image):
        sitk.WriteImage(result, f"/tmp/ab_full_{label}_{name}.mha")
    return result


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "1")))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(os.environ.get("NT", "1")))
    label = os.environ.get("AB_LABEL", "this")
    image = sitk.ReadImage(sys.argv[1])
    grid = Grid.from_image(image)
    working = make_working_grid(grid, 3.0, 256)
    rng = np.random.default_rng(0)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=working.shape_zyx), 4) for _ in range(3)], -1)
    field = (8.0 * field / np.abs(field).max()).astype(np.float32)
    affine = sitk.AffineTransform(3)
    angle = np.deg2rad(2.0)
    affine.SetMatrix((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0))
    affine.SetCenter(tuple(grid.index_to_physical((np.asarray(grid.size) - 1) / 2)[0]))
    affine.SetTranslation((2.0, -3.0, 1.5))
    # the working field in voxels (channels d, h, w), as the pipeline holds it
    to_voxels = np.linalg.inv(working.direction_matrix @ np.diag(working.spacing))
    disp = torch.as_tensor((field.astype(np.float64) @ to_voxels.T)[..., ::-1].copy(), dtype=torch.float32)
    disp = disp.permute(3, 0, 1, 2).unsqueeze(0).contiguous()
    with reuse_freed_memory():
        displacement = _timed(label, "composite", lambda: affine_field_displacement(grid, field, working,
                                                                                    after=affine))
        _timed(label, "warp", lambda: warp_image(image, displacement, default_value=-1024.0))
        _timed(label, "jacobian", lambda: metrics.jacobian_determinant(displacement))
        _timed(label, "magnitude", lambda: metrics.displacement_magnitude(displacement))
        inverse = spatial.invert_displacement(disp, tolerance=1e-2, coarse_factor=2, fine_iterations=10)

        def full_inverse() -> sitk.Image:
            from deepabdominalreg import registration  # the pipeline's own choice of path and grid
            moving_working = make_working_grid(grid, working.spacing[0])
            ratio = getattr(registration, "_SEPARABLE_INVERSE_RATIO", None)  # None: code before that path
            if ratio is not None and np.prod(grid.size) > ratio * np.prod(moving_working.size):
                u = registration.inverse_field_on_grid(disp, inverse, working, affine, moving_working)
                return affine_field_displacement(grid, u, moving_working, after=affine.GetInverse())
            v = registration._disp_vox_to_mm_lps(inverse, working)
            return affine_field_displacement(grid, v, working, before=affine.GetInverse())

        _timed(label, "inverse", full_inverse)


if __name__ == "__main__":
    main()
