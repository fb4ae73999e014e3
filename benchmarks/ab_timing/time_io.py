"""Time ``instance_optimise`` on inputs saved by ``dump_io_inputs.py`` (heap reuse on, as in ``register_pair``).

    python benchmarks/ab_timing/time_io.py /tmp/io_ct.pt [repeats]
"""

from __future__ import annotations

import os
import sys
import time

import torch
from deepabdominalreg.allocator import reuse_freed_memory
from deepabdominalreg.instance_optimisation import InstanceOptimisationSettings, instance_optimise


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "1")))
    data = torch.load(sys.argv[1], weights_only=False)  # our own file of tensors and a settings dict
    settings = InstanceOptimisationSettings(**data["settings"])
    with reuse_freed_memory():
        for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1):
            count = [0]
            start = time.perf_counter()
            result = instance_optimise(data["fixed"], data["moving"], data["initial"], data["mask"], settings,
                                       callback=lambda *_, c=count: c.__setitem__(0, c[0] + 1))
            seconds = time.perf_counter() - start
            change = float((result - data["result"]).abs().max())
            print(f"{os.environ.get('AB_LABEL', '?'):5s} IO {seconds:.2f} s, {count[0]} iterations, "
                  f"{1e3 * seconds / max(count[0], 1):.1f} ms/iteration, max |field - saved| {change:.3f} voxel")


if __name__ == "__main__":
    main()
