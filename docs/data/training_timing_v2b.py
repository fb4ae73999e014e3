"""Network + short instance optimisation variants vs IO-only presets (1 thread), stage timings."""
import json, sys, time
from deepabdominalreg.config import RegistrationConfig, config_from_preset
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair
from pathlib import Path
M = "abdomen-ct-4mm-v2"
methods = {
    "io-fast": config_from_preset("fast", device="cpu", threads=1, compute_inverse=False),
    "network+io-2x": RegistrationConfig(device="cpu", threads=1, compute_inverse=False, model=M, io_levels=(2,)),
    "network+io-2x-40": RegistrationConfig(device="cpu", threads=1, compute_inverse=False, model=M, io_levels=(2,), io_iterations=40),
}
for case in sys.argv[1:]:
    pair = _read_cached_pair(Path("runs/eval_cases") / case)
    for name, cfg in methods.items():
        t = time.perf_counter()
        r = register_pair(pair.fixed_image, pair.moving_image, config=cfg, moving_labels=pair.moving_labels,
                          fixed_labels=pair.fixed_labels, label_names=pair.label_names)
        row = {"case": case, "method": name, "wall_s": round(time.perf_counter() - t, 2),
               "dice": round(r.metrics["dice_mean_after"], 4), "folding": r.metrics["folding_percent"],
               "stages": {k: round(v, 2) for k, v in r.metrics["stages"].items()}}
        print(json.dumps(row), flush=True)
