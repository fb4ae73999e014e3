"""The network preset with its affine at 12/6 mm (default) vs 12/8 mm: Dice and time, one thread, held-out cases.

    python docs/data/network_affine_levels.py example_ct_s0_a10 example_ct_s1_a10 phantom_s0_3mm_a10 phantom_s1_3mm_a10
"""
import json, sys, time
from pathlib import Path
from deepabdominalreg.config import config_from_preset
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair
variants = {"network (affine 12/6 mm)": {}, "network (affine 12/8 mm)": {"affine_levels_mm": (12.0, 8.0)}}
for case in sys.argv[1:]:
    pair = _read_cached_pair(Path("runs/eval_cases") / case)
    for name, kw in variants.items():
        cfg = config_from_preset("network", device="cpu", threads=1, compute_inverse=False, **kw)
        t = time.perf_counter()
        r = register_pair(pair.fixed_image, pair.moving_image, config=cfg, moving_labels=pair.moving_labels,
                          fixed_labels=pair.fixed_labels, label_names=pair.label_names)
        print(json.dumps({"case": case, "variant": name, "wall_s": round(time.perf_counter() - t, 2),
                          "dice": round(r.metrics["dice_mean_after"], 4),
                          "affine_s": round(r.metrics["stages"]["affine"], 2)}), flush=True)
