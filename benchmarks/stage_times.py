"""Per-stage timings, Dice, SDlogJ, |u| and plausibility status of one registration of a benchmark case, in this
process (for tuning presets).

    python benchmarks/stage_times.py --case-dir CASES/ct_abdominal_s0_a10 --preset balanced --threads 1 \\
        --set '{"io_fine_iterations": 20}'

The case folder is one written by ``deepabdominalreg benchmark`` (``fixed.nii.gz``, ``moving.nii.gz``,
``*_seg.nii.gz``).
Reading the images is included in ``total_s``; imports are not.  Timings are noisy on a shared machine: compare
settings within one session, several runs each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case-dir", required=True)
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", default="{}", help="JSON object of RegistrationConfig overrides")
    args = parser.parse_args()

    import SimpleITK as sitk
    import torch
    from deepabdominalreg.config import config_from_preset
    from deepabdominalreg.io import read_image
    from deepabdominalreg.registration.pipeline import register_pair

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.set).items()}
    case = Path(args.case_dir)
    start = time.perf_counter()
    fixed, moving = read_image(str(case / "fixed.nii.gz"), "fixed"), read_image(str(case / "moving.nii.gz"), "moving")
    labels = {}
    if (case / "fixed_seg.nii.gz").is_file():
        labels = {"fixed_labels": sitk.ReadImage(str(case / "fixed_seg.nii.gz")),
                  "moving_labels": sitk.ReadImage(str(case / "moving_seg.nii.gz"))}
    config = config_from_preset(args.preset, device="cpu", threads=args.threads, **overrides)
    result = register_pair(fixed, moving, config=config, **labels)
    m = result.metrics
    print(json.dumps({
        "case": case.name, "preset": args.preset, "overrides": overrides,
        "total_s": round(time.perf_counter() - start, 2), "stages_s": m["stages"],
        "dice_mean_affine": m.get("dice_mean_affine"), "dice_mean_after": m.get("dice_mean_after"),
        "folding_percent": m["folding_percent"], "sdlogj": m["sdlogj"],
        "displacement_max_mm": m["displacement"].get("max_mm"), "displacement_p95_mm": m["displacement"].get("p95_mm"),
        "status": m.get("status"), "suspect_reasons": m.get("suspect_reasons"),
    }))


if __name__ == "__main__":
    main()
