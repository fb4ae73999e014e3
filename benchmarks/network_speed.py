"""Network-only inference time of a shipped model on a real CT (or the phantom), CPU and CUDA when present.

Times what the pipeline's network stage does on the model's own grid: preprocessing of both images (resampling to
the model spacing, HU window, body mask, the bodies' bounding box) and one forward pass (``torch.inference_mode``),
median of ``--repeats``, in the precision the pipeline would use (``--precision``, default ``auto``: bf16 autocast
on CPUs with native bf16, fp32 on CUDA; ``device.network_uses_bfloat16``).
The pair is the CT and a synthetic deformation of it (``synthetic.pairs.make_synthetic_pair``, 10 mm).

    python benchmarks/network_speed.py --threads 2   # the network preset's model
    python benchmarks/network_speed.py --threads 1 --precision fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from deepabdominalreg.config import PRESETS, RegistrationConfig
from deepabdominalreg.device import network_uses_bfloat16, reuse_freed_memory
from deepabdominalreg.io import read_image
from deepabdominalreg.nn.models import load_model
from deepabdominalreg.registration.network import network_inputs

SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator" / "example_ct.nii.gz"


def _pair(ct: str | None):
    from deepabdominalreg.synthetic.pairs import make_phantom_pair, make_synthetic_pair

    path = Path(ct) if ct else SHARED_CT
    if path.exists():
        image = read_image(path, "CT")
        pair = make_synthetic_pair(image, None, {}, seed=0, amplitude_mm=10.0, noise_hu=15.0)
        return path.name, pair.fixed_image, pair.moving_image
    pair = make_phantom_pair(0, 2.0, 10.0)
    return "phantom seed 0 (2 mm)", pair.fixed_image, pair.moving_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=PRESETS["network"]["model"])
    parser.add_argument("--ct", default=None, help="CT volume (default: shared/data example_ct, else the phantom)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="network_precision as in RegistrationConfig")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (register_pair keeps freed memory for reuse)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name, fixed, moving = _pair(args.ct)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {"model": args.model, "image": name, "image_size": list(fixed.GetSize()), "threads": args.threads,
               "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor()}",
               "allocator": "glibc default" if args.default_allocator else "freed memory reused (as register_pair)"}
    for device in devices:
        network, card = load_model(args.model, device)
        t0 = time.perf_counter()
        # as the pipeline's network stage
        ft, mt, grid, _ = network_inputs(fixed, moving, card, RegistrationConfig(), device)
        prep = time.perf_counter() - t0
        times = []
        allocator = nullcontext() if args.default_allocator else reuse_freed_memory()
        bf16 = network_uses_bfloat16(args.precision, device)
        with allocator, torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            network.predict(ft, mt)  # warm-up
            for _ in range(args.repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                network.predict(ft, mt)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        results[device] = {"precision": "bf16" if bf16 else "fp32", "grid_zyx": list(grid.shape_zyx),
                           "network_input_zyx": list(ft.shape[2:]), "preprocessing_s": round(prep, 3),
                           "forward_median_s": round(statistics.median(times), 3),
                           "forward_all_s": [round(t, 3) for t in times]}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
