"""Peak memory of Slicer's process during a background registration from the panel, at clinical size (slicer-core).

A 512 x 512 x Z fixed / moving CT pair (int16) becomes two volume nodes in a fresh process standing for Slicer's,
which then runs the module's background path as the panel does (``task.RegistrationJob``: nodes -> temporary files
-> ``python -m deepabdominalreg register`` subprocess -> output nodes, shown in the views) and reports:

* ``peak_mb``: that process's peak RSS (``ru_maxrss`` of ``RUSAGE_SELF``);
* ``inputs_mb``: its RSS with the scene holding the two input nodes, before the run, and ``peak_increase_mb``, the
  peak above it (what the registration costs Slicer's process);
* ``child_peak_mb``: the registration subprocess's peak RSS (``RUSAGE_CHILDREN``);
* ``outputs_read_mb``: the summed size of the output files it reads back (warped CT, Jacobian, ``|u|``, both
  transforms): what holding every output at once adds, the lower bound of reading them all before filling nodes.

``--loader lazy`` is the module's path (outputs read one at a time into their nodes, the input copies released once
written).  ``--loader eager`` reproduces the order before issue 18 with the same functions: the input copies kept for
the run, every output read into memory (``CoreOutputs.load``), then the nodes filled.  Each measurement runs in its
own process (``ru_maxrss`` only grows).

The pair: ``example_ct`` deformed by the synthetic abdominal motion and resampled to 512 x 512 x Z
(``benchmarks/output_speed.make_pairs``), or, without ``shared/data``, the core's phantom pair resampled the same
way.  Files are written once under ``--work`` and reused.

    flock /tmp/heavy.lock python benchmarks/slicer_memory.py --slices 300 --loader lazy eager --threads 2 \\
        --json benchmarks/results/slicer_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parent / "DeepAbdominalReg"
DATA = HERE.parents[1] / "shared" / "data" / "totalsegmentator"
if str(MODULE_DIR) not in sys.path:  # the core package and DeepAbdominalRegLib live in the module folder
    sys.path.insert(0, str(MODULE_DIR))


def _mb_maxrss(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # KiB on Linux


def _rss_mb() -> float:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _phantom_pair(folder: Path, slices: int) -> dict[str, Path]:
    """The core's phantom pair on 512 x 512 x ``slices`` voxels over its own extent (linear, int16)."""
    from deepabdominalreg.geometry import Grid, resample_image
    from deepabdominalreg.io import write_image
    from deepabdominalreg.synthetic.pairs import make_phantom_pair

    pair = make_phantom_pair(seed=0, spacing_mm=2.0)
    target = Grid.from_image(pair.fixed_image).with_size((512, 512, int(slices)))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, image in (("fixed", pair.fixed_image), ("moving", pair.moving_image)):
        paths[role] = write_image(resample_image(image, target, None, "linear", -1024,
                                                 output_pixel_type=sitk.sitkInt16), folder / f"{role}.nii",
                                  compress=False)
    return paths


def prepare_pair(work: Path, slices: int, synthetic: bool) -> tuple[dict[str, Path], str]:
    if not synthetic and (DATA / "example_ct.nii.gz").exists():
        from output_speed import make_pairs

        return make_pairs(work, [slices])[slices], "example_ct (synthetic motion 10 mm)"
    folder = work / f"phantom_512x512x{slices}"
    paths = {role: folder / f"{role}.nii" for role in ("fixed", "moving")}
    if not all(p.exists() for p in paths.values()):
        paths = _phantom_pair(folder, slices)
    return paths, "phantom (make_phantom_pair seed 0)"


def measure(fixed_path: Path, moving_path: Path, loader: str, preset: str, threads: int) -> dict:
    """One run in this process (the stand-in for Slicer's); returns the figures."""
    import slicer
    from deepabdominalreg.config import config_from_preset
    from DeepAbdominalRegLib import process, task
    from DeepAbdominalRegLib.testing import addVolumeNode

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    for _ in range(3):  # the views the panel shows the result in
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    fixed = addVolumeNode(scene, sitk.ReadImage(str(fixed_path)), "CT fixed")
    moving = addVolumeNode(scene, sitk.ReadImage(str(moving_path)), "CT moving")
    inputs_mb = _rss_mb()
    peak_loading_mb = _mb_maxrss(resource.RUSAGE_SELF)

    read_bytes = []
    read = process.CoreOutputs.read

    def recordingRead(self, name):
        value = getattr(self, name)
        if isinstance(value, Path):
            read_bytes.append(value.stat().st_size)
        return read(self, name)

    process.CoreOutputs.read = recordingRead
    config = config_from_preset(preset, threads=threads, device="cpu", seed=0)
    inputs = task.InputNodes(fixed, moving)
    start = time.perf_counter()
    if loader == "lazy":
        job = task.RegistrationJob(inputs, config, python=sys.executable)
        job.start()
        outputs = job.wait()
    else:
        core = task.prepareCoreInputs(inputs)
        held = (core.fixed, core.moving)  # the job kept its CoreInputs, images included, for the whole run
        run = process.BackgroundRegistration(core, config, python=sys.executable)
        run.start()
        loaded = run.wait()  # every output read into memory, then the folder removed
        outputs = task.applyCoreOutputs(loaded, core, inputs)
        del held, loaded
    wall = time.perf_counter() - start
    peak_mb = _mb_maxrss(resource.RUSAGE_SELF)
    size = fixed.GetImageData().GetDimensions()
    return {
        "loader": loader, "size": list(size), "preset": preset, "threads": threads,
        "wall_s": round(wall, 1),
        "inputs_mb": round(inputs_mb), "peak_while_loading_inputs_mb": round(peak_loading_mb),
        "peak_mb": round(peak_mb), "peak_increase_mb": round(peak_mb - inputs_mb),
        "after_mb": round(_rss_mb()),
        "child_peak_mb": round(_mb_maxrss(resource.RUSAGE_CHILDREN)),
        "input_nodes_mb": round(sum(n.GetImageData().GetActualMemorySize() for n in (fixed, moving)) / 1024.0),
        "outputs_read_mb": round(sum(read_bytes) / 2**20),
        "status": outputs.metrics.get("status"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/slicer_memory"), help="where the pair is written")
    parser.add_argument("--slices", type=int, default=300, help="Z of the 512 x 512 x Z pair")
    parser.add_argument("--loader", nargs="+", choices=("lazy", "eager"), default=["lazy"],
                        help="lazy: the module's path; eager: the order before issue 18 (one process each)")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the registration subprocess")
    parser.add_argument("--synthetic", action="store_true", help="the phantom pair even when shared/data exists")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--measure", nargs=3, metavar=("FIXED", "MOVING", "LOADER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        fixed, moving, loader = args.measure
        print("RESULT " + json.dumps(measure(Path(fixed), Path(moving), loader, args.preset, args.threads)))
        return 0

    paths, source = prepare_pair(args.work, args.slices, args.synthetic)
    rows = []
    for loader in args.loader:
        done = subprocess.run(
            [sys.executable, __file__, "--measure", str(paths["fixed"]), str(paths["moving"]), loader,
             "--preset", args.preset, "--threads", str(args.threads)],
            capture_output=True, text=True, check=False, cwd=str(HERE),
        )
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"the {loader} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]) | {"pair": source})

    columns = ("loader", "wall_s", "inputs_mb", "peak_mb", "peak_increase_mb", "child_peak_mb", "outputs_read_mb")
    print(f"pair: {source}, {' x '.join(map(str, rows[0]['size']))} int16, preset {args.preset}, "
          f"{args.threads} threads")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
