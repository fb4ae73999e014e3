"""End-to-end wall time of ``deepabdominalreg register`` (default outputs) against its registration stages, against
another code version on the same pair, and the time of ``deepabdominalreg apply`` — on a real CT at clinical size.

The pair: ``example_ct`` (real abdomen-pelvis CT, its organ labels) deformed by the synthetic abdominal motion
(``make_synthetic_pair``, 10 mm, CT noise 15 HU) on its own 3 mm grid, then fixed, moving and both label maps
resampled onto 512 x 512 x Z voxels over the same extent (linear for the CT, cast to int16; nearest for the labels)
for each ``--slices`` Z.  Each command runs in a fresh process (``python -m deepabdominalreg``, imports and reading
included), the versions interleaved (A B A B ...) so that load on the machine hits both alike; its peak resident
memory is its own ``ru_maxrss``.

``--baseline-src DIR``: a folder holding another version's ``deepabdominalreg`` package (e.g. an export of an older
commit: ``git archive REV DeepAbdominalReg | tar -x -C /tmp/base``; DIR = ``/tmp/base/DeepAbdominalReg``), run with
``PYTHONPATH=DIR`` and its own default outputs.

    python benchmarks/output_speed.py --work /tmp/output_speed --slices 300 80 --repeats 2 \\
        --baseline-src /tmp/base/DeepAbdominalReg --out benchmarks/results/output_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
REGISTRATION_STAGES = ("affine", "network", "instance_optimisation")
"""What the issue calls "the registration itself"; the rest is reading, preprocessing, outputs, metrics."""

_CHILD = """
import resource, sys, time
start = time.perf_counter()
from deepabdominalreg.cli import main
code = main(sys.argv[1:])
print("BENCH", time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      file=sys.stderr)
sys.exit(code)
"""


def make_pairs(work: Path, slices: list[int], seed: int = 0) -> dict[int, dict[str, Path]]:
    """The clinical-size pairs (written once; reused when present)."""
    from deepabdominalreg.geometry import Grid, resample_image
    from deepabdominalreg.io import read_image, read_labels, write_image, write_json
    from deepabdominalreg.synthetic.pairs import make_synthetic_pair

    pairs: dict[int, dict[str, Path]] = {}
    pair = None
    for z in slices:
        folder = work / f"pair_512x512x{z}"
        paths = {role: folder / f"{role}.nii" for role in ("fixed", "moving", "fixed_seg", "moving_seg")}
        pairs[z] = paths
        if all(p.exists() for p in paths.values()):
            continue
        if pair is None:
            ct = read_image(DATA / "example_ct.nii.gz", "CT")
            seg = read_labels(DATA / "example_seg_fast_force_split.nii.gz", "labels")
            pair = make_synthetic_pair(ct, seg, seed=seed, amplitude_mm=10.0, noise_hu=15.0)
        target = Grid.from_image(pair.fixed_image).with_size((512, 512, int(z)))
        folder.mkdir(parents=True, exist_ok=True)
        sources = {"fixed": pair.fixed_image, "moving": pair.moving_image, "fixed_seg": pair.fixed_labels,
                   "moving_seg": pair.moving_labels}
        for role, image in sources.items():
            labels = role.endswith("_seg")
            resampled = resample_image(image, target, None, "nearest" if labels else "linear", 0 if labels else -1024,
                                       output_pixel_type=sitk.sitkUInt8 if labels else sitk.sitkInt16)
            write_image(resampled, paths[role], compress=False)
        write_json({str(k): v for k, v in pair.label_names.items()}, folder / "labels.json")
    return pairs


def _run(argv: list[str], pythonpath: str | None, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, *argv], env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    line = next((ln for ln in done.stderr.splitlines() if ln.startswith("BENCH ")), None)
    if done.returncode not in (0, 3) or line is None:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr[-2000:]}")
    _, inner, rss = line.split()
    return {"wall_s": round(wall, 2), "in_process_s": round(float(inner), 2), "peak_rss_mb": round(float(rss))}


def _supports(flag: str, pythonpath: str | None) -> bool:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    shown = subprocess.run([sys.executable, "-m", "deepabdominalreg", "register", "--help"], env=env,
                           capture_output=True, text=True, check=False).stdout
    return flag in shown


def register_once(paths: dict[str, Path], out: Path, pythonpath: str | None, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
            "--fixed-seg", str(paths["fixed_seg"]), "--moving-seg", str(paths["moving_seg"]),
            "--output-dir", str(out), "--threads", str(threads), "--device", "cpu"]
    if _supports("--accept-suspect", pythonpath):
        argv.append("--accept-suspect")
    row = _run(argv, pythonpath, threads)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    stages = metrics.get("stages", {})
    row["registration_s"] = round(sum(stages.get(s, 0.0) for s in REGISTRATION_STAGES), 2)
    row["pipeline_total_s"] = round(float(metrics.get("runtime_s", 0.0)), 2)
    row["wall_over_registration"] = round(row["wall_s"] / max(row["registration_s"], 1e-6), 2)
    row["output_mb"] = round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20, 1)
    row["outputs"] = sorted(f.name for f in out.iterdir() if f.is_file())
    row["dice_mean_after"] = metrics.get("dice_mean_after")
    row["stages"] = stages
    return row


def apply_once(paths: dict[str, Path], out: Path, threads: int) -> dict:
    target = out.parent / f"{out.name}_applied.nii.gz"
    target.unlink(missing_ok=True)
    row = _run(["apply", "--transform", str(out / "transform.h5"), "--image", str(paths["moving"]),
                "--reference", str(paths["fixed"]), "--output", str(target)], None, threads)
    from deepabdominalreg.apply import apply_to_image
    from deepabdominalreg.geometry import Grid
    from deepabdominalreg.io import read_image
    from deepabdominalreg.transforms import read_transform

    moving, reference = read_image(paths["moving"], "moving"), Grid.from_image(read_image(paths["fixed"], "fixed"))
    transform = read_transform(out / "transform.h5")
    start = time.perf_counter()
    apply_to_image(moving, transform, reference)
    row["apply_function_s"] = round(time.perf_counter() - start, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/output_speed", help="folder for the pairs and the outputs")
    parser.add_argument("--slices", type=int, nargs="+", default=[300, 80])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-src", default=None, help="another version's package folder (see above)")
    parser.add_argument("--out", default=None, help="JSON of every run")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is missing: this benchmark needs the shared real CT")

    work = Path(args.work)
    pairs = make_pairs(work, args.slices)
    versions = {"current": None} | ({"baseline": str(Path(args.baseline_src).resolve())} if args.baseline_src else {})
    rows = []
    for z, paths in pairs.items():
        for repeat in range(args.repeats):
            for version, pythonpath in versions.items():
                out = work / f"out_{z}_{version}"
                row = {"slices": z, "version": version, "repeat": repeat,
                       **register_once(paths, out, pythonpath, args.threads)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("stages", "outputs")}), flush=True)
        applied = {"slices": z, "version": "current", "command": "apply",
                   **apply_once(paths, work / f"out_{z}_current", args.threads)}
        rows.append(applied)
        print(json.dumps(applied), flush=True)

    print("\nslices  version   wall s  registration s  wall/registration  peak MB  outputs MB")
    for z in pairs:
        for version in versions:
            mine = [r for r in rows if r["slices"] == z and r["version"] == version and "registration_s" in r]
            print(f"{z:6d}  {version:8s}  {np.median([r['wall_s'] for r in mine]):6.1f}  "
                  f"{np.median([r['registration_s'] for r in mine]):14.1f}  "
                  f"{np.median([r['wall_over_registration'] for r in mine]):17.2f}  "
                  f"{max(r['peak_rss_mb'] for r in mine):7.0f}  {mine[0]['output_mb']:10.1f}")
        if "baseline" in versions:
            ratios = [b["wall_s"] / c["wall_s"] for c, b in zip(
                [r for r in rows if r["slices"] == z and r["version"] == "current" and "registration_s" in r],
                [r for r in rows if r["slices"] == z and r["version"] == "baseline"])]
            print(f"{z:6d}  baseline/current end to end: {', '.join(f'{x:.2f}' for x in ratios)}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
