"""Time ``optimise_affine`` (per run and per objective evaluation) on a benchmark case's working images.

    python benchmarks/ab_timing/time_affine.py CASES/ct_abdominal_s0_a10 12,6
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import SimpleITK as sitk
import torch
from deepabdominalreg.affine import optimise_affine
from deepabdominalreg.allocator import reuse_freed_memory
from deepabdominalreg.image import make_working_grid, read_image
from deepabdominalreg.preprocessing import prepare_working_image


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "1")))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    case, levels = sys.argv[1], tuple(float(v) for v in sys.argv[2].split(","))
    fixed, moving = read_image(f"{case}/fixed.nii.gz", "fixed"), read_image(f"{case}/moving.nii.gz", "moving")
    fixed_grid, moving_grid = make_working_grid(fixed, 3.0, 160), make_working_grid(moving, 3.0)
    w_fixed = prepare_working_image(fixed, fixed_grid, (-160.0, 240.0))
    w_moving = prepare_working_image(moving, moving_grid, (-160.0, 240.0))
    with reuse_freed_memory():
        for _ in range(3):
            count = [0]
            start = time.perf_counter()
            affine = optimise_affine(fixed_grid, w_fixed.intensity, moving_grid, w_moving.intensity,
                                     levels_mm=levels, iterations=20, fixed_field_of_view=w_fixed.field_of_view,
                                     moving_field_of_view=w_moving.field_of_view,
                                     callback=lambda *_, c=count: c.__setitem__(0, c[0] + 1))
            seconds = time.perf_counter() - start
            print(f"{os.environ.get('AB_LABEL', '?'):5s} affine {seconds:.3f} s, {count[0]} evaluations, "
                  f"{1e3 * seconds / count[0]:.1f} ms/evaluation, translation {np.round(affine.GetTranslation(), 3)}")


if __name__ == "__main__":
    main()
