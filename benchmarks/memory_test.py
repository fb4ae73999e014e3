"""Peak CPU memory of our pipeline on a 512 x 512 x 400 (``--size``: any) int16 CT pair, and where it goes, stage by
stage.

The pair is a real CT with synthetic motion (``deepabdominalreg benchmark``'s ``ct_abdominal`` case, or any
fixed/moving given) resampled onto 512 x 512 x 400 voxels covering the same extent (linear, cast to int16), so the
pipeline sees clinical-size inputs.  The registration runs in a fresh process (reading the files included); this
process samples the child's resident memory (``/proc/PID/status`` VmRSS) every 0.1 s and attributes each sample to
the stage the child reported last through ``register_pair``'s progress callback.  The child also reports its own peak
(``ru_maxrss``).  Linux only (``/proc``).

    python benchmarks/memory_test.py --fixed F.nii.gz --moving M.nii.gz --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SIZE = (512, 512, 400)


def make_large_pair(fixed_path: str, moving_path: str, folder: Path, size=SIZE) -> tuple[Path, Path]:
    """Resample both images onto ``size`` voxels spanning the fixed image's extent; int16; uncompressed NIfTI."""
    from deepabdominalreg.config import OUTSIDE_FOV_HU
    from deepabdominalreg.geometry import Grid, resample_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for role, path in (("fixed", fixed_path), ("moving", moving_path)):
        existing = folder / f"{role}_{size[0]}x{size[1]}x{size[2]}.nii"
        if existing.is_file():
            paths.append(existing)
            continue
        image = sitk.ReadImage(str(path))
        target = Grid.from_image(image).with_size(tuple(size))  # the same physical extent
        large = resample_image(image, target, None, "linear", OUTSIDE_FOV_HU, output_pixel_type=sitk.sitkInt16)
        out = folder / f"{role}_{size[0]}x{size[1]}x{size[2]}.nii"
        sitk.WriteImage(large, str(out))
        paths.append(out)
    return paths[0], paths[1]


def _child(connection, fixed: str, moving: str, preset: str, threads: int, overrides: dict) -> None:
    import resource

    import torch
    from deepabdominalreg.config import config_from_preset
    from deepabdominalreg.io import read_image
    from deepabdominalreg.registration.pipeline import register_pair

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    events = []

    def progress(event):
        if not events or events[-1][1] != event.stage:
            events.append((time.time(), event.stage))
            connection.send(("stage", time.time(), event.stage))

    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    start = time.perf_counter()
    connection.send(("stage", time.time(), "read"))
    f = read_image(fixed, "fixed")
    m = read_image(moving, "moving")
    config = config_from_preset(preset, device="cpu", threads=threads, **overrides)
    result = register_pair(f, m, config=config, progress=progress)
    runtime = time.perf_counter() - start
    connection.send(("done", {
        "runtime_s": runtime,
        "stages_s": result.metrics["stages"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_after_imports_mb": baseline_mb,
        "working_grid": result.metrics["working_grid"],
    }))
    connection.close()


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def measure(fixed: str, moving: str, preset: str = "balanced", threads: int = 2, overrides: dict | None = None) -> dict:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fixed, moving, preset, threads, overrides or {}))
    process.start()
    sender.close()
    stage = "imports"
    per_stage: dict[str, float] = {}
    result = None
    while True:
        while receiver.poll(0):
            try:
                kind, *payload = receiver.recv()
            except EOFError:
                kind = "eof"
                break
            if kind == "stage":
                stage = payload[1]
            elif kind == "done":
                result = payload[0]
        rss = _rss_mb(process.pid)
        if rss is not None:
            per_stage[stage] = max(per_stage.get(stage, 0.0), rss)
        if result is not None or not process.is_alive():
            break
        time.sleep(0.1)
    process.join(30)
    if result is None:
        raise RuntimeError(f"the registration process failed (exit code {process.exitcode})")
    result["peak_rss_by_stage_mb"] = {k: round(v, 1) for k, v in per_stage.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--work-dir", default="/tmp/deepabdominalreg-memory")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default=",".join(map(str, SIZE)),
                        help="voxels x,y,z of the large pair (default %(default)s; issue 6: 512,512,700)")
    parser.add_argument("--out", default=None, help="JSON file for the result")
    parser.add_argument("--prepare-only", action="store_true", help="only write the large pair (reused later)")
    parser.add_argument("--keep", action="store_true", help="keep the large pair in --work-dir")
    args = parser.parse_args()

    t = time.perf_counter()
    size = tuple(int(v) for v in args.size.split(","))
    fixed, moving = make_large_pair(args.fixed, args.moving, Path(args.work_dir), size=size)
    print(f"wrote {fixed} and {moving} in {time.perf_counter() - t:.0f} s", flush=True)
    if args.prepare_only:
        return
    image = sitk.ReadImage(str(fixed))
    result = measure(str(fixed), str(moving), args.preset, args.threads)
    result.update({
        "description": f"real CT + synthetic motion resampled to {'x'.join(map(str, size))} int16 "
                       f"({', '.join(f'{s:.2f}' for s in image.GetSpacing())} mm), preset {args.preset}, CPU, "
                       f"{args.threads} threads, fresh process",
        "size": list(size),
        "spacing_mm": list(image.GetSpacing()),
        "input_bytes_each": int(np.prod(size)) * 2,
        "threads": args.threads,
        "preset": args.preset,
    })
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if not args.keep:
        for path in (fixed, moving):
            os.remove(path)


if __name__ == "__main__":
    main()
