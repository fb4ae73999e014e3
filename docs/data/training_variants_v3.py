"""Network (v3) + cheap instance-optimisation refinements vs instance optimisation only, one thread, back to back.

    python docs/data/training_variants_v3.py example_ct_s1_a10   (cases written by evaluate-model to runs/eval_cases)
"""
import json
import sys
import time
from pathlib import Path

from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair

M = "abdomen-ct-4mm-v3"  # the shipped file: the evaluated candidate (same SHA-256)
methods = {
  "network": {"model": M, "io_iterations": 0},
  "net+io2x40": {"model": M, "io_levels": (2,), "io_iterations": 40},
  "net+io1x10": {"model": M, "io_levels": (1,), "io_fine_iterations": 10},
  "net+io2x20+1x8": {"model": M, "io_levels": (2, 1), "io_iterations": 20, "io_fine_iterations": 8},
  "io": {"model": None},
}
for case in sys.argv[1:]:
    pair = _read_cached_pair(Path("runs/eval_cases") / case)
    for name, kw in methods.items():
        cfg = RegistrationConfig(device="cpu", threads=1, compute_inverse=False, **kw)
        t = time.perf_counter()
        r = register_pair(pair.fixed_image, pair.moving_image, config=cfg, moving_labels=pair.moving_labels,
                          fixed_labels=pair.fixed_labels, label_names=pair.label_names)
        print(json.dumps({"case": case, "method": name, "wall_s": round(time.perf_counter() - t, 2),
               "dice": round(r.metrics["dice_mean_after"], 4), "fold": r.metrics["folding_percent"],
               "stages": {k: round(v, 2) for k, v in r.metrics["stages"].items() if k in ("network","instance_optimisation","affine")}}), flush=True)
