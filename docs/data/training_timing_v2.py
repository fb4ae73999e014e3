"""Back-to-back stage timings of register_pair: network vs io vs network+io-fine (1 thread)."""
import json, sys, time
import torch
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair
from pathlib import Path
methods = {"network": dict(model="abdomen-ct-4mm-v2", io_iterations=0), "io": dict(model=None),
           "network+io-fine": dict(model="abdomen-ct-4mm-v2", io_levels=(2, 1))}
out = []
for case in sys.argv[1:]:
    pair = _read_cached_pair(Path("runs/eval_cases") / case)
    for rep in range(2):
        for name, kw in methods.items():
            cfg = RegistrationConfig(device="cpu", threads=1, compute_inverse=False, **kw)
            t = time.perf_counter()
            r = register_pair(pair.fixed_image, pair.moving_image, config=cfg, moving_labels=pair.moving_labels,
                              fixed_labels=pair.fixed_labels, label_names=pair.label_names)
            row = {"case": case, "rep": rep, "method": name, "wall_s": round(time.perf_counter() - t, 2),
                   "dice": round(r.metrics["dice_mean_after"], 4),
                   "stages": {k: round(v, 2) for k, v in r.metrics["stages"].items()}}
            print(json.dumps(row), flush=True); out.append(row)
json.dump(out, open("runs/timing_v2.json", "w"), indent=1)
