"""Network (v3, boundary padding) + coarse instance optimisation (4x+2x or 2x, 40 iterations) vs io (balanced), 2 threads.

    python docs/data/network_coarse_io_hybrid.py example_ct_s2_a10,example_ct_s4_a10 net+io42,net+io2,balanced
    (cases written by evaluate-model to runs/eval_cases; rows: docs/data/network_coarse_io_hybrid.jsonl; stopped after 5 rows)
"""
import json, sys, time
from pathlib import Path
import numpy as np, SimpleITK as sitk
from deepabdominalreg.config import config_from_preset
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair
methods = {
    "network": dict(preset="network"),
    "net+io42": dict(preset="network", io_iterations=40, io_levels=(4, 2)),
    "net+io2": dict(preset="network", io_iterations=40, io_levels=(2,)),
    "fast": dict(preset="fast"),
    "balanced": dict(preset="balanced"),
}
wanted = sys.argv[2].split(",")
for case in sys.argv[1].split(","):
    pair = _read_cached_pair(Path("runs/eval_cases") / case)
    for name in wanted:
        kw = dict(methods[name]); preset = kw.pop("preset")
        cfg = config_from_preset(preset, device="cpu", threads=2, compute_inverse=False, **kw)
        t = time.perf_counter()
        r = register_pair(pair.fixed_image, pair.moving_image, config=cfg, moving_labels=pair.moving_labels,
                          fixed_labels=pair.fixed_labels, label_names=pair.label_names)
        print(json.dumps({"case": case, "method": name, "wall_s": round(time.perf_counter() - t, 2),
               "dice": round(r.metrics["dice_mean_after"], 4), "fold": round(r.metrics["folding_percent"], 4),
               "sdlogj": round(r.metrics["sdlogj"], 4)}), flush=True)
