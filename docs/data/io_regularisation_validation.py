"""Instance-optimisation settings of the `balanced` preset on the validation cases only (never the benchmark or
held-out pairs): phantoms 900-902 at 10 and 20 mm and the aorta-crop CT with deformation seeds 100/101 (10 mm),
written by earlier `evaluate-model --cases-dir runs/val_cases` runs.

    python docs/data/io_regularisation_validation.py runs/val_cases docs/data/io_regularisation_validation.csv \\
        '{}' '{"io_smoothness_weight": 2.0}' ...

Each argument after the output is a JSON object of RegistrationConfig overrides of `balanced` (or of the preset it
names with a "preset" key); one row per case.
"""
import csv, json, sys
from pathlib import Path

from deepabdominalreg.evaluation import MethodSpec, _existing_case, run_method

cases_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
variants = [json.loads(a) for a in sys.argv[3:]] or [{}]
cases = []
for folder in sorted(cases_dir.iterdir()):
    parts = folder.name.split("_")
    amplitude = float(parts[-1][1:])
    seed = int(next(p[1:] for p in parts if p.startswith("s") and p[1:].isdigit()))
    cases.append(_existing_case(folder, folder.name, parts[0], amplitude, seed))
keys = ["dice_organs", "dice_mean", "field_error_mean_mm", "tre_mean_mm", "sdlogj_l2r", "folding_percent",
        "runtime_s"]
new = not out.exists()
with out.open("a", newline="") as handle:
    writer = csv.writer(handle)
    if new:
        writer.writerow(["variant", "case", *keys])
    for overrides in variants:
        options = {"preset": "balanced", **overrides}  # "preset" in a variant picks another preset
        method = MethodSpec(options["preset"], "deepabdominalreg.evaluation:run_ours", options)
        for case in cases:
            row, _ = run_method(case, method, threads=2)
            if row["status"] != "ok":
                raise RuntimeError(row["error"])
            values = [row.get(k, float("nan")) for k in keys]
            writer.writerow([json.dumps(overrides, sort_keys=True), case.name, *values])
            handle.flush()
            print(json.dumps(overrides), case.name, *[f"{v:.4f}" if isinstance(v, float) else v for v in values],
                  flush=True)
