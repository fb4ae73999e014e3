import sys, json
from pathlib import Path
import numpy as np, SimpleITK as sitk
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair
case = sys.argv[1]
pair = _read_cached_pair(Path("runs/eval_cases") / case)
t = sitk.GetArrayFromImage(sitk.ReadImage(f"runs/eval_cases/{case}/true_displacement.nii.gz"))
f = sitk.GetArrayFromImage(pair.fixed_image) > -400
out = {}
for name, kw in {"net": dict(model="abdomen-ct-4mm-v3", io_iterations=0), "io": dict(model=None)}.items():
    cfg = RegistrationConfig(device="cpu", threads=2, compute_inverse=False, **kw)
    r = register_pair(pair.fixed_image, pair.moving_image, config=cfg)
    d = sitk.GetArrayFromImage(r.displacement_lps)
    e = np.linalg.norm(d - t, axis=-1)
    prof = [float(e[z][f[z]].mean()) for z in range(e.shape[0])]
    out[name] = prof
    print(name, "overall %.2f" % e[f].mean())
Z = len(out["net"])
for z0 in range(0, Z, 8):
    print(z0, " ".join("%s %.2f" % (k, np.mean(v[z0:z0+8])) for k, v in out.items()))
