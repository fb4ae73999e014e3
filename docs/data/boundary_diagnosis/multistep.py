"""Multi-step (MICS-style) test-time application of the shipped network: apply it again to the warped moving."""
import json, sys, time
from pathlib import Path
import torch
from deepabdominalreg import registration, spatial
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair

STEPS = 1
orig_load = registration.load_model
def load_model(name, device):
    net, card = orig_load(name, device)
    base = net.predict
    def predict(f, m):
        d = base(f, m)
        for _ in range(STEPS - 1):
            mw = spatial.warp(m, d, padding_mode="border")
            d = spatial.compose(d, base(f, mw))
        return d
    net.predict = predict
    return net, card
registration.load_model = load_model

for case in sys.argv[1].split(","):
    pair = _read_cached_pair(Path("runs/eval_cases") / case)
    for steps in [int(s) for s in sys.argv[2].split(",")]:
        STEPS = steps
        cfg = RegistrationConfig(device="cpu", threads=1, compute_inverse=False, model="abdomen-ct-4mm-v3", io_iterations=0)
        t = time.perf_counter()
        r = register_pair(pair.fixed_image, pair.moving_image, config=cfg, moving_labels=pair.moving_labels,
                          fixed_labels=pair.fixed_labels, label_names=pair.label_names)
        print(json.dumps({"case": case, "steps": steps, "wall_s": round(time.perf_counter() - t, 2),
               "dice": round(r.metrics["dice_mean_after"], 4), "fold": r.metrics["folding_percent"], "sdlogj": round(r.metrics["sdlogj"],4),
               "network_s": round(r.metrics["stages"]["network"], 2)}), flush=True)
