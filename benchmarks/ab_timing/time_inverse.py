"""The pipeline's inverse of a saved instance-optimisation field: time and error against 80 plain iterations.

    python benchmarks/ab_timing/time_inverse.py /tmp/io_ct.pt
"""

from __future__ import annotations

import os
import sys
import time

import torch
from deepabdominalreg import spatial
from deepabdominalreg.allocator import reuse_freed_memory


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "1")))
    disp = torch.load(sys.argv[1], weights_only=False)["result"]
    converged = spatial.invert_displacement(disp, 80, 0.0)
    fine_iterations = int(os.environ.get("FINE_ITERATIONS", "10"))
    seconds = []
    with reuse_freed_memory():
        for _ in range(3):
            start = time.perf_counter()
            inverse = spatial.invert_displacement(disp, tolerance=1e-2, coarse_factor=2,
                                                  fine_iterations=fine_iterations)
            seconds.append(time.perf_counter() - start)
    error = (inverse - converged).norm(dim=1)
    consistency = spatial.compose(inverse, disp).norm(dim=1)
    print(f"{os.environ.get('AB_LABEL', '?'):5s} inverse {min(seconds):.3f} s; error vs 80 iterations max "
          f"{float(error.max()):.4f} mean {float(error.mean()):.6f} voxel; inverse consistency mean "
          f"{float(consistency.mean()):.5f} max {float(consistency.max()):.3f} voxel")


if __name__ == "__main__":
    main()
