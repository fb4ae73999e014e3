"""Forward pass of the shipped network on a fixed random 93 x 76 x 92 input (heap reuse on); saves the field so
that two versions can be compared bit for bit (``/tmp/ab_network_<label>.pt``).

    python benchmarks/ab_timing/time_network.py
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from deepabdominalreg.allocator import reuse_freed_memory
from deepabdominalreg.models import load_model


def main() -> None:
    torch.set_num_threads(int(os.environ.get("NT", "1")))
    label = os.environ.get("AB_LABEL", "this")
    network, _ = load_model("abdomen-ct-4mm-v3", "cpu")
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 93, 76, 92, generator=generator)
    moving = torch.rand(1, 1, 93, 76, 92, generator=generator)
    seconds = []
    with reuse_freed_memory(), torch.inference_mode():
        field = network.predict(fixed, moving)  # warm-up
        for _ in range(5):
            start = time.perf_counter()
            field = network.predict(fixed, moving)
            seconds.append(time.perf_counter() - start)
    torch.save(field, f"/tmp/ab_network_{label}.pt")
    print(f"{label:5s} forward median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s")


if __name__ == "__main__":
    main()
