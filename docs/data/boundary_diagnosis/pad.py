import sys, json, time
from pathlib import Path
import torch, numpy as np, SimpleITK as sitk
import torch.nn.functional as F
from deepabdominalreg import registration
from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.registration import register_pair
from deepabdominalreg.training import _read_cached_pair
PAD, MODE = 0, "replicate"
orig_load = registration.load_model
def load_model(name, device):
    net, card = orig_load(name, device)
    base = net.predict
    def predict(f, m):
        if PAD == 0:
            return base(f, m)
        if MODE == "reflectz":
            p = [0, 0, 0, 0, PAD, PAD]
            d = base(F.pad(f, p, mode="reflect"), F.pad(m, p, mode="reflect"))
            return d[:, :, PAD:-PAD]
        p = [PAD] * 6
        d = base(F.pad(f, p, mode=MODE), F.pad(m, p, mode=MODE))
        return d[:, :, PAD:-PAD, PAD:-PAD, PAD:-PAD]
    net.predict = predict
    return net, card
registration.load_model = load_model
for case in sys.argv[1].split(","):
    pair = _read_cached_pair(Path("runs/eval_cases") / case)
    t = sitk.GetArrayFromImage(sitk.ReadImage(f"runs/eval_cases/{case}/true_displacement.nii.gz"))
    body = sitk.GetArrayFromImage(pair.fixed_image) > -400
    for spec in sys.argv[2].split(","):
        MODE, PAD = spec.split(":")[0], int(spec.split(":")[1])
        cfg = RegistrationConfig(device="cpu", threads=2, compute_inverse=False, model="abdomen-ct-4mm-v3", io_iterations=0)
        r = register_pair(pair.fixed_image, pair.moving_image, config=cfg, moving_labels=pair.moving_labels,
                          fixed_labels=pair.fixed_labels, label_names=pair.label_names)
        e = np.linalg.norm(sitk.GetArrayFromImage(r.displacement_lps) - t, axis=-1)
        print(json.dumps({"case": case, "pad": spec, "dice": round(r.metrics["dice_mean_after"], 4),
                          "epe": round(float(e[body].mean()), 3), "epe_top8": round(float(e[-8:][body[-8:]].mean()), 2),
                          "epe_bot8": round(float(e[:8][body[:8]].mean()), 2),
                          "net_s": r.metrics["stages"]["network"], "sdlogj": round(r.metrics["sdlogj"], 4)}), flush=True)
