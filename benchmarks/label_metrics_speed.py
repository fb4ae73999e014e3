"""Time of ``label_overlap_report`` at clinical size: this checkout against another version, same inputs, same run.

The pair: the real CT's organ labels (``example_seg_fast_force_split.nii.gz``, 3 mm) as the reference, and the same
labels moved by a smooth random B-spline warp (seeded, a few mm) as the test, both resampled (nearest) onto
512 x 512 x Z voxels over the labels' extent for each ``--slices`` Z — the grid the pipeline scores on at clinical
size.  The report is computed the way the pipeline does it (three calls against the same reference: "before",
"affine", "after"; here three test maps warped with growing amplitude), the versions interleaved (A B A B ...) so
that load on the machine hits both alike.  Every number of the reports is compared: the largest absolute
difference per key is printed (Dice must be identical).

``--baseline REV``: the version to compare with (``git show REV:.../metrics/labels.py`` loaded as a module;
default ``HEAD``), or ``--baseline-file PATH`` for a copy of that file.

    flock /tmp/heavy.lock python benchmarks/label_metrics_speed.py --slices 80 300 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "totalsegmentator"
MODULE = "DeepAbdominalReg/deepabdominalreg/metrics/labels.py"


def load_baseline(rev: str | None, path: str | None):
    """The other version's ``labels`` module (imports resolve against this checkout's package)."""
    if path is None:
        source = subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
        folder = Path(tempfile.mkdtemp(prefix="labels_baseline_"))
        path = str(folder / "labels_baseline.py")
        Path(path).write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("labels_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def warped(labels: sitk.Image, amplitude_mm: float, seed: int) -> sitk.Image:
    """``labels`` moved by a smooth random B-spline warp (control points ~ N(0, amplitude_mm) per axis), nearest."""
    transform = sitk.BSplineTransformInitializer(labels, [4, 4, 4], order=3)
    rng = np.random.default_rng(seed)
    transform.SetParameters(rng.normal(0.0, amplitude_mm, len(transform.GetParameters())).tolist())
    return sitk.Resample(labels, labels, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def clinical_grid(labels: sitk.Image, z: int) -> sitk.Image:
    """An empty 512 x 512 x ``z`` image over the same extent (same first and last voxel borders) as ``labels``."""
    from deepabdominalreg.geometry import Grid

    return Grid.from_image(labels).with_size((512, 512, int(z))).reference_image()


def to_grid(labels: sitk.Image, grid: sitk.Image) -> sitk.Image:
    return sitk.Resample(labels, grid, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, 0,
                         labels.GetPixelID())


def make_maps(z: int, amplitudes_mm: tuple[float, ...] = (6.0, 3.0, 1.5), seed: int = 0):
    """The reference and the three test maps at 512 x 512 x ``z``."""
    labels = sitk.ReadImage(str(DATA / "example_seg_fast_force_split.nii.gz"))
    grid = clinical_grid(labels, z)
    reference = to_grid(labels, grid)
    tests = [to_grid(warped(labels, a, seed + i), grid) for i, a in enumerate(amplitudes_mm)]
    return reference, tests


def _numbers(report: dict) -> dict[str, float]:
    """Every number of a report, keyed ``label/key`` (per label) or ``key`` (summary)."""
    flat = {k: float(v) for k, v in report.items() if k != "per_label"}
    for name, entry in report["per_label"].items():
        flat.update({f"{name}/{k}": float(v) for k, v in entry.items()})
    return flat


def compare(old: dict, new: dict) -> dict[str, float]:
    """Largest absolute difference per key type (NaN in both counts as equal; NaN in one is +inf)."""
    a, b = _numbers(old), _numbers(new)
    if a.keys() != b.keys():
        raise AssertionError(f"different keys: {sorted(a.keys() ^ b.keys())[:10]}")
    worst: dict[str, float] = {}
    for key in a:
        kind = key.rsplit("/", 1)[-1]
        x, y = a[key], b[key]
        diff = 0.0 if (math.isnan(x) and math.isnan(y)) else (math.inf if math.isnan(x) or math.isnan(y)
                                                              else abs(x - y))
        worst[kind] = max(worst.get(kind, 0.0), diff)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[80, 300])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", default="HEAD", help="git revision of the version to compare with")
    parser.add_argument("--baseline-file", default=None, help="a copy of that version's metrics/labels.py")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"no data at {DATA}; this benchmark needs the real CT's labels", file=sys.stderr)
        return 2

    from deepabdominalreg.metrics import labels as new

    old = load_baseline(args.baseline, args.baseline_file)
    rows = []
    for z in args.slices:
        reference, tests = make_maps(z)
        spacing = ", ".join(f"{s:.3f}" for s in reference.GetSpacing())
        print(f"512x512x{z} ({spacing} mm), {len(np.unique(sitk.GetArrayViewFromImage(reference))) - 1} labels")
        for repeat in range(args.repeats):
            times, reports = {}, {}
            for version, module in (("old", old), ("new", new)):
                start = time.perf_counter()
                reports[version] = [module.label_overlap_report(reference, t) for t in tests]
                times[version] = time.perf_counter() - start
            worst: dict[str, float] = {}
            for a, b in zip(reports["old"], reports["new"]):
                for kind, diff in compare(a, b).items():
                    worst[kind] = max(worst.get(kind, 0.0), diff)
            row = {"slices": z, "repeat": repeat, "old_s": round(times["old"], 3), "new_s": round(times["new"], 3),
                   "ratio": round(times["old"] / times["new"], 2), "max_abs_diff": worst}
            rows.append(row)
            diffs = " ".join(f"{k}={v:.2g}" for k, v in sorted(worst.items()))
            print(f"  3 calls: old {row['old_s']:.2f} s  new {row['new_s']:.2f} s  ratio {row['ratio']:.1f}x  "
                  f"max |diff| {diffs}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
