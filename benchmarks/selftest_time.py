"""Wall time of the module's self-test (``DeepAbdominalRegTest``) on the CPU, on slicer-core.

The self-test is what ctest and *Reload and Test* run in Slicer: the core's phantom pair (5 mm, fast preset)
registered in-process, then in a background subprocess (``python -m deepabdominalreg register``, as from the panel),
then a cancelled run that must leave the scene unchanged.  Here ``DeepAbdominalReg.py`` is imported with only the
Slicer application classes stubbed (``Testing/mrml/slicer_app_stubs.py``): MRML, the logic, the Lib and the
subprocess are real, the Qt panel is not.  Each test method is timed on its own and the whole ``runTest`` is timed
too; every repeat starts a fresh scene.  The issue-18 target is a self-test under 2 minutes on the CPU.

    python benchmarks/selftest_time.py --threads 2 --repeats 2 --json benchmarks/results/selftest_time.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parent / "DeepAbdominalReg"
STUBS_DIR = MODULE_DIR / "Testing" / "mrml"
for folder in (MODULE_DIR, STUBS_DIR):  # the module file, DeepAbdominalRegLib, the core, and the stubs
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

TESTS = ("test_RegisterPhantomInProcess", "test_RegisterPhantomInBackground", "test_FailureLeavesSceneUnchanged")


def _run(module, name: str) -> float:
    import slicer

    slicer.mrmlScene = slicer.vtkMRMLScene()
    test = module.DeepAbdominalRegTest(name)
    start = time.perf_counter()
    result = test.run()
    seconds = time.perf_counter() - start
    problems = result.errors + result.failures + [(t, f"skipped: {why}") for t, why in result.skipped]
    if problems:
        raise SystemExit(f"{name} did not pass:\n" + "\n".join(text for _, text in problems))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in the subprocess")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the registration subprocess
    import torch

    torch.set_num_threads(args.threads)
    from slicer_app_stubs import slicerApplicationStubs

    rows = []
    with slicerApplicationStubs():
        module = importlib.import_module("DeepAbdominalReg")
        for repeat in range(args.repeats):
            row = {"repeat": repeat}
            for name in TESTS:
                row[name] = round(_run(module, name), 2)
            row["runTest_s"] = round(_run(module, "runTest"), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nself-test on the CPU ({args.threads} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}):")
    print("| repeat | in-process s | background s | cancelled s | runTest s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['repeat']} | " + " | ".join(f"{row[k]:.1f}" for k in (*TESTS, "runTest_s")) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
