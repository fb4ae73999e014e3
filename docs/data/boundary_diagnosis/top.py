import sys
from pathlib import Path
import numpy as np, SimpleITK as sitk
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair
case = sys.argv[1]
pair = _read_cached_pair(Path("runs/eval_cases") / case)
t = sitk.GetArrayFromImage(sitk.ReadImage(f"runs/eval_cases/{case}/true_displacement.nii.gz"))
f = sitk.GetArrayFromImage(pair.fixed_image) > -400
cfg = RegistrationConfig(device="cpu", threads=2, compute_inverse=False, model="abdomen-ct-4mm-v3", io_iterations=0)
r = register_pair(pair.fixed_image, pair.moving_image, config=cfg)
d = sitk.GetArrayFromImage(r.displacement_lps)
a = r.affine_fixed_to_moving
print("affine translation", np.round(a.GetTranslation(), 2), "matrix diag", np.round(np.array(a.GetMatrix())[[0,4,8]], 3))
for z in range(90, t.shape[0]):
    m = f[z]
    print(z, "true", np.round(t[z][m].mean(0), 2), "pred", np.round(d[z][m].mean(0), 2), "err %.2f" % np.linalg.norm(d[z]-t[z], axis=-1)[m].mean())
