"""Trained networks compared with the pipeline's other variants on the validation phantoms and real-CT pairs
(the ``evaluate-model`` command).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.io import read_image, read_labels

# ----------------------------------------------------------------------------------------------------------------
# evaluation of a trained model against the pipeline's other configurations
# ----------------------------------------------------------------------------------------------------------------

#: The configurations compared by :func:`evaluate_methods` (``RegistrationConfig`` overrides; ``MODEL`` is the
#: evaluated model).  The inverse field is not computed, so the runtime is the registration itself.
METHODS: dict[str, dict] = {
    "identity": {"affine": False, "io_iterations": 0, "model": None},
    "affine": {"io_iterations": 0, "model": None},
    "network": {"io_iterations": 0, "model": "MODEL"},
    "network+io": {"model": "MODEL"},
    # the network has removed the large motion: instance optimisation only refines at 2x and 1x
    "network+io-fine": {"model": "MODEL", "io_levels": (2, 1)},
    "io": {"model": None},
}


def _read_cached_pair(folder: Path):
    from deepabdominalreg.io import read_landmarks
    from deepabdominalreg.synthetic.pairs import SyntheticPair

    if not (folder / "labels.json").exists():
        return None
    return SyntheticPair(
        fixed_image=read_image(folder / "fixed.nii.gz", "fixed"), moving_image=read_image(folder / "moving.nii.gz",
                                                                                        "moving"),
        fixed_labels=read_labels(folder / "fixed_seg.nii.gz") if (folder / "fixed_seg.nii.gz").exists() else None,
        moving_labels=read_labels(folder / "moving_seg.nii.gz") if (folder / "moving_seg.nii.gz").exists() else None,
        displacement_fixed_to_moving=sitk.Cast(sitk.ReadImage(str(folder / "true_displacement.nii.gz")),
                                               sitk.sitkVectorFloat64),
        fixed_landmarks_lps=read_landmarks(folder / "fixed_landmarks.csv"),
        moving_landmarks_lps=read_landmarks(folder / "moving_landmarks.csv"),
        label_names={int(k): v for k, v in json.loads((folder / "labels.json").read_text()).items()},
    )


def _evaluation_cases(phantom_seeds, phantom_spacing_mm, amplitude_mm, ct, ct_labels, ct_label_names, ct_seeds,
                      cases_dir: Path, log=print) -> list[tuple[str, str, object]]:
    """The evaluation pairs, written to ``cases_dir`` once (``synthetic.write_pair``) and read back afterwards."""
    from deepabdominalreg.evaluation.cases import load_label_names
    from deepabdominalreg.synthetic.pairs import make_phantom_pair, make_synthetic_pair, write_pair

    def cached(name, source, make):
        folder = cases_dir / name
        pair = _read_cached_pair(folder)
        if pair is None:
            t = time.perf_counter()
            pair = make()
            write_pair(pair, folder)
            log(f"case {name} made in {time.perf_counter() - t:.0f} s")
        return name, source, pair

    cases = [cached(f"phantom_s{seed}_{phantom_spacing_mm:g}mm_a{amplitude_mm:g}", "phantom",
                    lambda seed=seed: make_phantom_pair(int(seed), phantom_spacing_mm, amplitude_mm))
             for seed in phantom_seeds]
    if ct:
        image = read_image(ct, "evaluation CT")
        labels = read_labels(ct_labels, "evaluation labels") if ct_labels else None
        names = {}
        if ct_label_names:
            data = json.loads(Path(ct_label_names).read_text())
            names = load_label_names(ct_label_names, "total" if "total" in data else None)
        stem = Path(ct).name.split(".")[0]
        for seed in ct_seeds:
            cases.append(cached(f"{stem}_s{seed}_a{amplitude_mm:g}", "real CT", lambda seed=seed: make_synthetic_pair(
                image, labels, names, seed=int(seed), amplitude_mm=amplitude_mm, noise_hu=15.0)))
    return cases


def evaluate_methods(
    output_dir: str | os.PathLike,
    *,
    model: str | None,
    methods: Sequence[str] = tuple(METHODS),
    phantom_seeds: Sequence[int] = (0, 1, 2),
    phantom_spacing_mm: float = 3.0,
    amplitude_mm: float = 10.0,
    ct: str | None = None,
    ct_labels: str | None = None,
    ct_label_names: str | None = None,
    ct_seeds: Sequence[int] = (0, 1),
    threads: int | None = 2,
    cases_dir: str | os.PathLike | None = None,
    log=print,
) -> tuple[list[dict], str]:
    """Run :func:`deepabdominalreg.registration.register_pair` in each configuration of :data:`METHODS` on held-out
    phantom pairs and synthetic deformations of a real CT; write ``results.csv`` and ``table.md``.

    Metrics per case: mean Dice and HD95 (mm) over the labels, landmark TRE (mm), mean endpoint error against the
    true field inside the fixed body (mm), folding (% of body voxels with det J <= 0), SDlogJ and runtime (s).
    The pairs are written to ``cases_dir`` (default ``output_dir/cases``) and reused by later calls.
    Returns the rows and the markdown table (mean +- standard deviation per data source and method).
    """
    from deepabdominalreg.config import RegistrationConfig
    from deepabdominalreg.evaluation.scoring import displacement_error, fixed_body_mask
    from deepabdominalreg.registration.pipeline import register_pair

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    if model is None:
        methods = [m for m in methods if METHODS[m].get("model") != "MODEL"]
    cases = _evaluation_cases(phantom_seeds, phantom_spacing_mm, amplitude_mm, ct, ct_labels, ct_label_names,
                              ct_seeds, Path(cases_dir) if cases_dir else out / "cases", log=log)
    rows = []
    for name, source, pair in cases:
        body = fixed_body_mask(pair.fixed_image)
        for method in methods:
            overrides = {k: (model if v == "MODEL" else v) for k, v in METHODS[method].items()}
            config = RegistrationConfig(device="cpu", threads=threads, compute_inverse=False, **overrides)
            result = register_pair(
                pair.fixed_image, pair.moving_image, config=config, moving_labels=pair.moving_labels,
                fixed_labels=pair.fixed_labels, fixed_landmarks_lps=pair.fixed_landmarks_lps,
                moving_landmarks_lps=pair.moving_landmarks_lps, label_names=pair.label_names)
            m = result.metrics
            error = displacement_error(result.displacement_lps, pair.displacement_fixed_to_moving, body)
            row = {
                "case": name, "source": source, "method": method,
                "dice": m.get("dice_mean_after", float("nan")),
                "hd95_mm": m.get("labels", {}).get("after", {}).get("hd95_mean_mm", float("nan")),
                "tre_mm": m.get("tre_mean_after_mm", float("nan")),
                "field_error_mm": error["field_error_mean_mm"],
                "folding_percent": m["folding_percent"], "sdlogj": m["sdlogj"], "runtime_s": m["runtime_s"],
            }
            rows.append(row)
            log(f"{name} {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                 if isinstance(v, float)))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = methods_table(rows)
    (out / "table.md").write_text(table + "\n")
    return rows, table


def methods_table(rows: Sequence[dict]) -> str:
    """Markdown table: mean +- sd of each metric per (source, method), methods in their order of appearance."""
    metrics = [("dice", "Dice", 3), ("hd95_mm", "HD95 (mm)", 2), ("tre_mm", "TRE (mm)", 2),
               ("field_error_mm", "field error (mm)", 2), ("folding_percent", "folding %", 3),
               ("sdlogj", "SDlogJ", 3), ("runtime_s", "runtime (s)", 1)]
    lines = ["| data | method | n | " + " | ".join(label for _, label, _ in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["method"]), []).append(r)
    for (source, method), group in groups.items():
        cells = []
        for key, _, digits in metrics:
            values = np.array([float(r[key]) for r in group], dtype=np.float64)
            values = values[np.isfinite(values)]
            cells.append("n/a" if not values.size else
                         f"{values.mean():.{digits}f} ± {values.std():.{digits}f}" if values.size > 1 else
                         f"{values.mean():.{digits}f}")
        lines.append(f"| {source} | {method} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
