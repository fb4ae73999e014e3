"""GPU timings: the whole ``register`` command on a 512 x 512 x 300 CT pair and the model's forward pass (CUDA).

What it measures, on one machine in one run (the CPU rows are the peer for the ratio):

* **register command**: wall time of ``python -m deepabdominalreg register`` in a fresh process (Python start,
  imports, reading both images, every stage, writing every output; no inverse field, no report), for each preset /
  device / output format in ``--runs``; each run twice (the first pays CUDA context creation and the file cache).
  The stage times come from the run's ``metrics.json``.
* **model forward**: the shipped model on the network's own input for that pair (4 mm grid, bodies' bounding box),
  timed with CUDA events (median of ``--repeats`` after 3 warm-ups), fp32 and bf16 autocast, plus the CPU with all
  threads; the bf16 field's difference from fp32 (voxels) is reported beside its time.

The pair: a CT (default shared/data example_ct) and a synthetic deformation of it (10 mm), resampled onto
512 x 512 x 300 voxels over the same extent (int16, uncompressed NIfTI), as ``memory_test.py`` does.

    python benchmarks/gpu_speed.py --out benchmarks/results/gpu_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk
import torch
from deepabdominalreg.config import PRESETS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHARED_CT = HERE.parents[1] / "shared" / "data" / "totalsegmentator" / "example_ct.nii.gz"
DEFAULT_RUNS = (
    "cuda:network:nii.gz", "cuda:network:nii", "cuda:network-bf16:nii", "cuda:fast:nii", "cuda:balanced:nii",
    "cpu:network:nii",
)


def _make_pair(ct: Path, work: Path, size: tuple[int, int, int]) -> tuple[Path, Path]:
    from deepabdominalreg.io import read_image, write_image
    from deepabdominalreg.synthetic.pairs import make_synthetic_pair
    from memory_test import make_large_pair

    work.mkdir(parents=True, exist_ok=True)
    small_fixed, small_moving = work / "fixed_small.nii.gz", work / "moving_small.nii.gz"
    if not small_moving.exists():
        pair = make_synthetic_pair(read_image(ct, "CT"), None, {}, seed=0, amplitude_mm=10.0, noise_hu=15.0)
        write_image(pair.fixed_image, small_fixed)
        write_image(pair.moving_image, small_moving)
    return make_large_pair(str(small_fixed), str(small_moving), work, size)


def _register(fixed: Path, moving: Path, out: Path, device: str, preset: str, image_format: str,
              threads: int | None) -> dict:
    precision = "bf16" if preset.endswith("-bf16") else "fp32"
    command = [sys.executable, "-m", "deepabdominalreg", "register", "--fixed", str(fixed), "--moving", str(moving),
               "--output-dir", str(out), "--device", device, "--preset", preset.removesuffix("-bf16"),
               "--no-report", "--no-inverse", "--output-format", image_format, "--network-precision", precision]
    if threads:
        command += ["--threads", str(threads)]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"error": done.stderr[-2000:], "wall_s": round(wall, 2)}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 2), "pipeline_s": metrics["runtime_s"], "stages": metrics["stages"],
            "device": metrics.get("device"), "folding_percent": metrics.get("folding_percent")}


def _time_forward(network, fixed: torch.Tensor, moving: torch.Tensor, repeats: int, bf16: bool) -> tuple[float, list]:
    device = fixed.device
    times = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(3):
            out = network.predict(fixed, moving)
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = network.predict(fixed, moving)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)
            else:
                t = time.perf_counter()
                out = network.predict(fixed, moving)
                times.append(time.perf_counter() - t)
    return statistics.median(times), out.float()


def _forward_timings(fixed_path: Path, moving_path: Path, model: str, repeats: int) -> dict:
    from deepabdominalreg.config import RegistrationConfig
    from deepabdominalreg.io import read_image
    from deepabdominalreg.nn.models import load_model
    from deepabdominalreg.registration.network import network_inputs

    fixed, moving = read_image(fixed_path, "fixed"), read_image(moving_path, "moving")
    results: dict = {}
    reference = None
    for device, bf16 in (("cuda", False), ("cuda", True), ("cpu", False)):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        network, card = load_model(model, device)
        # as the pipeline's network stage
        ft, mt, _, _ = network_inputs(fixed, moving, card, RegistrationConfig(), device)
        median, out = _time_forward(network, ft, mt, repeats if device == "cuda" else max(2, repeats // 10), bf16)
        key = f"{device}_{'bf16' if bf16 else 'fp32'}"
        results[key] = {"forward_median_ms": round(1000 * median, 2), "input_zyx": list(ft.shape[2:])}
        if reference is None:
            reference = out.cpu()
        else:
            diff = (out.cpu() - reference).norm(dim=1)
            results[key]["difference_from_cuda_fp32_vox"] = {"mean": round(float(diff.mean()), 4),
                                                             "p99": round(float(diff.flatten().quantile(0.99)), 4)}
    results["cpu_threads"] = torch.get_num_threads()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", default=str(SHARED_CT))
    parser.add_argument("--model", default=PRESETS["network"]["model"])
    parser.add_argument("--size", default="512,512,300")
    parser.add_argument("--work-dir", default="/tmp/deepabdominalreg-gpu")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                        help="DEVICE:PRESET[-bf16]:FORMAT items, comma separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cpu-threads", type=int, default=None, help="--threads for the CPU register runs")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split(","))
    work = Path(args.work_dir)
    t0 = time.perf_counter()
    fixed, moving = _make_pair(Path(args.ct), work, size)
    print(f"pair ready in {time.perf_counter() - t0:.1f} s", flush=True)
    results = {
        "pair": {"ct": Path(args.ct).name, "size": list(size), "prepared_s": round(time.perf_counter() - t0, 1),
                 "spacing_mm": [round(s, 3) for s in sitk.ReadImage(str(fixed)).GetSpacing()]},
        "machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "cpu_cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "simpleitk": sitk.Version_VersionString()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "forward": _forward_timings(fixed, moving, args.model, args.repeats),
        "register": {},
    }
    print(json.dumps(results["forward"], indent=1), flush=True)
    _save(results, args.out)
    for item in args.runs.split(","):
        device, preset, image_format = item.split(":")
        if device == "cuda" and not torch.cuda.is_available():
            continue
        threads = args.cpu_threads if device == "cpu" else None
        rows = [_register(fixed, moving, work / f"out_{device}_{preset}_{image_format}_{i}", device, preset,
                          image_format, threads) for i in range(2)]
        results["register"][item] = rows
        print(item, json.dumps(rows), flush=True)
        _save(results, args.out)
    return 0


def _save(results: dict, out: str | None) -> None:
    """Write the results so far (each step adds to the file: a run stopped midway keeps what it measured)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
