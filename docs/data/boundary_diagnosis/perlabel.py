"""Per-label Dice of the network preset and instance optimisation on one held-out case, largest gaps first."""
import sys
from pathlib import Path
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair
pair = _read_cached_pair(Path("runs/eval_cases") / sys.argv[1])
res = {}
for name, kw in {"net": dict(model="abdomen-ct-4mm-v3", io_iterations=0), "io": dict(model=None)}.items():
    cfg = RegistrationConfig(device="cpu", threads=2, compute_inverse=False, **kw)
    r = register_pair(pair.fixed_image, pair.moving_image, config=cfg, moving_labels=pair.moving_labels,
                      fixed_labels=pair.fixed_labels, label_names=pair.label_names)
    res[name] = r.metrics["labels"]
n, i, b = (res["net"]["after"]["per_label"], res["io"]["after"]["per_label"], res["net"]["before"]["per_label"])
rows = sorted(((i[k]["dice"] - n[k]["dice"], k, n[k]["dice"], i[k]["dice"], b[k]["dice"]) for k in n), reverse=True)
for gap, label, net, io, before in rows[:15] + rows[-5:]:
    print(f"{label:32s} network {net:.3f}  io {io:.3f}  before {before:.3f}  gap {gap:+.3f}")
