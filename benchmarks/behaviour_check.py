"""Same inputs, same outputs: the default preset's displacement field on the demo phantom and on the real CT pair.

Run it once with one code version (``run --out A``), once with another (``run --out B``, ``--code`` points at that
version's ``DeepAbdominalReg`` folder), then ``compare A B``.  Each run, on the CPU with seed 0:

* ``demo/``: ``deepabdominalreg demo`` (phantom seed 0, 2 mm, default preset): its generated inputs and outputs;
* ``ct/``: the real CT (``../shared/data/totalsegmentator/example_ct.nii.gz``) deformed by the synthetic abdominal
  motion (10 mm, seed 0, 15 HU noise; the benchmark's ``ct_abdominal_s0_a10``), registered with
  ``deepabdominalreg register`` at the default preset.

With ``--inputs-from A`` the second run also registers run A's generated inputs (``demo_same_inputs/``,
``ct_same_inputs/``), so the registration is compared on identical inputs even where pair generation changed.

``compare`` prints, for every generated input and every output field, whether the two runs are bit-identical and
otherwise the largest voxel difference (mm for the displacement fields); it exits with 1 when a displacement field
registered from identical inputs differs by more than ``--tolerance-mm`` (1e-3 mm) anywhere.

    python benchmarks/behaviour_check.py run --out /tmp/behaviour/after [--inputs-from /tmp/behaviour/before]
    python benchmarks/behaviour_check.py compare /tmp/behaviour/before /tmp/behaviour/after
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
CT_DIR = REPO.parent / "shared" / "data" / "totalsegmentator"

# generated inputs, then outputs; displacement fields are held to the tolerance, the rest reported
DEMO_FILES = ("input/fixed.nii.gz", "input/moving.nii.gz", "input/fixed_seg.nii.gz", "input/moving_seg.nii.gz",
              "input/true_displacement.nii.gz", "displacement.nii.gz", "inverse_displacement.nii.gz",
              "warped.nii.gz", "jacobian.nii.gz")
CT_FILES = ("input/fixed.nii.gz", "input/moving.nii.gz", "input/fixed_seg.nii.gz",
            "input/true_displacement.nii.gz", "displacement.nii.gz", "inverse_displacement.nii.gz",
            "warped.nii.gz", "jacobian.nii.gz")

# generates the CT pair with the code on PYTHONPATH (the import path of the restructured package)
_CT_PAIR = """
import json, sys
from deepabdominalreg.io import read_image, read_labels
from deepabdominalreg.synthetic.pairs import make_synthetic_pair, write_pair
ct, seg, names, out = sys.argv[1:5]
names = {int(k): v for k, v in json.load(open(names))["total"].items()}
pair = make_synthetic_pair(read_image(ct), read_labels(seg), names, seed=0, amplitude_mm=10.0, noise_hu=15.0)
write_pair(pair, out)
"""


def _run(cmd: list[str], code: Path, log: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="2")
    with open(log, "w") as handle:
        subprocess.run(cmd, env=env, check=True, stdout=handle, stderr=subprocess.STDOUT)


def _register(inputs: Path, out: Path, code: Path, log: Path, labelled: bool) -> None:
    """``deepabdominalreg register`` at the default preset on a pair folder written by ``write_pair``."""
    cmd = [sys.executable, "-m", "deepabdominalreg", "register", "--fixed", str(inputs / "fixed.nii.gz"),
           "--moving", str(inputs / "moving.nii.gz"), "--output-dir", str(out), "--device", "cpu", "--seed", "0"]
    if labelled:  # as the demo command registers its pair
        cmd += ["--fixed-seg", str(inputs / "fixed_seg.nii.gz"), "--moving-seg", str(inputs / "moving_seg.nii.gz"),
                "--fixed-landmarks", str(inputs / "fixed_landmarks.csv"),
                "--moving-landmarks", str(inputs / "moving_landmarks.csv"),
                "--label-names", str(inputs / "labels.json")]
    else:
        cmd += ["--no-report"]
    _run(cmd, code, log)


def run(out: Path, code: Path, ct_pair_script: str | None, inputs_from: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    _run([py, "-m", "deepabdominalreg", "demo", "--output-dir", str(out / "demo"), "--device", "cpu",
          "--seed", "0"], code, out / "demo.log")
    ct = out / "ct"
    script = Path(ct_pair_script).read_text() if ct_pair_script else _CT_PAIR
    _run([py, "-c", script, str(CT_DIR / "example_ct.nii.gz"), str(CT_DIR / "example_seg_fast_force_split.nii.gz"),
          str(CT_DIR / "label_map_total_and_total_mr.json"), str(ct / "input")], code, out / "ct_pair.log")
    _register(ct / "input", ct, code, out / "ct.log", labelled=False)
    if inputs_from is not None:
        _register(inputs_from / "demo/input", out / "demo_same_inputs", code, out / "demo_same_inputs.log", True)
        _register(inputs_from / "ct/input", out / "ct_same_inputs", code, out / "ct_same_inputs.log", False)
    print(f"written: {out}")


def _difference(a: Path, b: Path) -> tuple[bool, float]:
    image_a, image_b = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    array_a = sitk.GetArrayFromImage(image_a).astype(np.float64)
    array_b = sitk.GetArrayFromImage(image_b).astype(np.float64)
    same_geometry = (image_a.GetSize() == image_b.GetSize()
                     and np.allclose(image_a.GetSpacing(), image_b.GetSpacing(), atol=0, rtol=0)
                     and np.allclose(image_a.GetOrigin(), image_b.GetOrigin(), atol=0, rtol=0)
                     and np.allclose(image_a.GetDirection(), image_b.GetDirection(), atol=0, rtol=0))
    if not same_geometry or array_a.shape != array_b.shape:
        return False, float("inf")
    return bool(np.array_equal(array_a, array_b)), float(np.max(np.abs(array_a - array_b), initial=0.0))


def compare(before: Path, after: Path, tolerance_mm: float) -> int:
    """Print every row; the verdict is on the registration: the displacement fields registered from identical inputs
    (the ``*_same_inputs`` rows when the second run has them, else the ``demo``/``ct`` rows)."""
    rows = []
    cases = [("demo", "demo", DEMO_FILES), ("ct", "ct", CT_FILES)]
    outputs = tuple(f for f in CT_FILES if not f.startswith("input/"))
    cases += [("demo", "demo_same_inputs", outputs), ("ct", "ct_same_inputs", outputs)]
    for case_before, case, files in cases:
        if not (after / case).is_dir():
            continue
        for name in files:
            identical, largest = _difference(before / case_before / name, after / case / name)
            rows.append({"case": case, "file": name, "bit_identical": identical, "max_abs_difference": largest})
    same_inputs = any(r["case"].endswith("_same_inputs") for r in rows)
    judged = [r for r in rows if r["case"].endswith("_same_inputs") == same_inputs
              and "displacement" in r["file"] and not r["file"].startswith("input/")]
    worst = max((r["max_abs_difference"] for r in judged), default=0.0)
    width = max(len(r["case"] + r["file"]) for r in rows) + 3
    for r in rows:
        state = "bit-identical" if r["bit_identical"] else f"max |difference| {r['max_abs_difference']:.3g}"
        print(f"{(r['case'] + '/' + r['file']).ljust(width)}{state}")
    generated = [r for r in rows if r["file"].startswith("input/") and not r["bit_identical"]]
    if generated:
        print("pair generation changed: " + ", ".join(f"{r['case']}/{r['file']}" for r in generated)
              + " (so the demo/ct outputs differ too; the *_same_inputs rows isolate the registration)")
    ok = worst <= tolerance_mm
    scope = "same inputs" if same_inputs else "demo and ct"
    print(f"largest displacement difference ({scope}): {worst:.3g} mm ({'within' if ok else 'over'} "
          f"{tolerance_mm:g} mm)")
    (after / "comparison.json").write_text(json.dumps({"before": str(before), "rows": rows,
                                                       "largest_displacement_difference_mm": worst}, indent=1))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate both pairs and register them with the default preset")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--code", type=Path, default=REPO / "DeepAbdominalReg",
                   help="the DeepAbdominalReg folder holding the deepabdominalreg package to run")
    r.add_argument("--inputs-from", type=Path, help="an earlier run whose generated inputs are registered too")
    r.add_argument("--ct-pair-script", help="Python file generating the CT pair (argv: ct, seg, names, out), for "
                   "a code version whose import paths differ from this one's")
    c = sub.add_parser("compare", help="compare two runs")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--tolerance-mm", type=float, default=1e-3)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.code, args.ct_pair_script, args.inputs_from)
        return 0
    return compare(args.before, args.after, args.tolerance_mm)


if __name__ == "__main__":
    raise SystemExit(main())
