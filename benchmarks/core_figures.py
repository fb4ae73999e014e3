"""Issue-2 figures: the demo phantom pair, real CT with synthetic motion, and a clinical-size scan.

Run from the repository root (CPU; several minutes):

    python benchmarks/core_figures.py --output benchmarks/results/core_figures.json

Prints a Markdown table; each case runs ``register_pair`` with the default (balanced) settings unless told.
Peak memory is the process's peak RSS after each case (monotonic: read the clinical case's line in a separate
run with ``--cases clinical``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from deepabdominalreg.config import config_from_preset
from deepabdominalreg.registration import register_pair

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalsegmentator"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _run(name: str, pair, config) -> dict:
    t0 = time.perf_counter()
    result = register_pair(
        pair.fixed_image, pair.moving_image, config=config, moving_labels=pair.moving_labels,
        fixed_labels=pair.fixed_labels, fixed_landmarks_lps=pair.fixed_landmarks_lps,
        moving_landmarks_lps=pair.moving_landmarks_lps, label_names=pair.label_names,
    )
    wall = time.perf_counter() - t0
    m = result.metrics
    true = sitk.GetArrayFromImage(pair.displacement_fixed_to_moving)
    est = sitk.GetArrayViewFromImage(result.displacement_lps)
    body = sitk.GetArrayViewFromImage(result.body_mask) > 0
    field_error = np.linalg.norm(est - true, axis=-1)[body]
    row = {
        "case": name,
        "size": list(pair.fixed_image.GetSize()),
        "spacing_mm": [round(s, 3) for s in pair.fixed_image.GetSpacing()],
        "labels": len(m["labels"]["after"]["per_label"]),
        "dice_before": m["dice_mean_before"],
        "dice_affine": m["dice_mean_affine"],
        "dice_after": m["dice_mean_after"],
        "hd95_after_mm": m["labels"]["after"].get("hd95_mean_mm"),
        "tre_before_mm": m.get("tre_mean_before_mm"),
        "tre_after_mm": m.get("tre_mean_after_mm"),
        "field_error_mean_mm": float(field_error.mean()),
        "field_error_p95_mm": float(np.percentile(field_error, 95)),
        "folding_percent": m["folding_percent"],
        "sdlogj": m["sdlogj"],
        "runtime_s": m["runtime_s"],
        "wall_s": wall,
        "stages_s": m["stages"],
        "peak_rss_gb": _peak_rss_gb(),
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="demo,realct,spacing,clinical")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--output", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from deepabdominalreg.synthetic import make_phantom_pair, make_synthetic_pair

    config = config_from_preset(args.preset)
    rows = []
    cases = args.cases.split(",")
    if "demo" in cases:
        rows.append(_run("phantom demo pair (seed 0, 2 mm)", make_phantom_pair(seed=0, spacing_mm=2.0), config))
    for case, amplitude in (("realct", 10.0), ("realct15", 15.0)):
        if case not in cases:
            continue
        if not (SHARED / "example_ct.nii.gz").exists():
            print("shared data absent: skipping the real-CT case", file=sys.stderr)
            continue
        ct = sitk.ReadImage(str(SHARED / "example_ct.nii.gz"))
        seg = sitk.ReadImage(str(SHARED / "example_seg_fast_force_split.nii.gz"))
        names = json.loads((SHARED / "label_map_total_and_total_mr.json").read_text())["total"]
        names = {int(k): v for k, v in names.items()}
        for seed in (0, 1, 2):
            pair = make_synthetic_pair(ct, seg, names, seed=seed, amplitude_mm=amplitude)
            rows.append(_run(f"example_ct + phantom motion {amplitude:g} mm (seed {seed})", pair, config))
    if "spacing" in cases and (SHARED / "example_ct.nii.gz").exists():
        # justification of the default working spacing: accuracy vs time on one real-CT pair
        ct = sitk.ReadImage(str(SHARED / "example_ct.nii.gz"))
        seg = sitk.ReadImage(str(SHARED / "example_seg_fast_force_split.nii.gz"))
        names = json.loads((SHARED / "label_map_total_and_total_mr.json").read_text())["total"]
        pair = make_synthetic_pair(ct, seg, {int(k): v for k, v in names.items()}, seed=0, amplitude_mm=10.0)
        for spacing in (2.0, 3.0, 4.0, 5.0):
            rows.append(_run(f"example_ct seed 0, working spacing {spacing:g} mm", pair,
                             config.replace(working_spacing_mm=spacing)))
    if "clinical" in cases:
        pair = make_phantom_pair(seed=1, spacing_mm=(0.8, 0.8, 2.5))
        rows.append(_run("clinical-size phantom 0.8x0.8x2.5 mm", pair, config))

    header = ("| case | size | Dice before | Dice affine | Dice after | HD95 after (mm) | TRE before -> after (mm) | "
              "field error mean/p95 (mm) | folding % | SDlogJ | runtime (s) | peak RSS (GB) |")
    print(header)
    print("|" + "---|" * 12)
    for r in rows:
        tre = f"{r['tre_before_mm']:.2f} -> {r['tre_after_mm']:.2f}" if r["tre_before_mm"] is not None else "-"
        print(f"| {r['case']} | {'x'.join(map(str, r['size']))} | {r['dice_before']:.3f} | {r['dice_affine']:.3f} | "
              f"{r['dice_after']:.3f} | {r['hd95_after_mm']:.2f} | {tre} | {r['field_error_mean_mm']:.2f}/"
              f"{r['field_error_p95_mm']:.2f} | {r['folding_percent']:.3f} | {r['sdlogj']:.3f} | {r['runtime_s']:.1f} | "
              f"{r['peak_rss_gb']:.2f} |")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "machine": {"torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                        "torch": torch.__version__, "simpleitk": sitk.Version_VersionString()},
            "preset": args.preset, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
