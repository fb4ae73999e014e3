"""The discrete displacement search (``registration.discrete``) as a start for the instance optimisation, on pairs
with a known displacement: the shared real CT deformed by the realistic abdominal motion generator (10 and 20 mm),
and the phantom.

    flock /tmp/heavy.lock python benchmarks/discrete_search.py --threads 2 --amplitudes 10 20

Per pair, on the pipeline's working grid (``make_working_grid`` + ``prepare_working_image`` as in
``pipeline._preprocess``; no affine stage: the moving image is resampled onto the fixed working grid as it is), it
compares (0) the zero field, (1) ``instance_optimise`` from zero, (2) ``discrete_search`` alone, (3)
``discrete_search`` as ``initial_disp`` of ``instance_optimise``, with the instance-optimisation settings of
``InstanceOptimisationSettings.from_config(RegistrationConfig(), spacing)`` and the pipeline's similarity mask
(fixed body inside the moving field of view).  Columns: the mean and 95th percentile of the field error
``|u - u_true|`` (mm) over the fixed body, the mean Dice of the abdominal organs (labels warped with nearest
neighbour on the working grid) and the stage's time (s; (3) includes the search).  Timings are noisy on a shared
machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

CT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
ORGANS = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas")


def _pairs(cases_dir: Path, amplitudes: list[float], seeds: list[int], phantom: bool):
    from deepabdominalreg.evaluation.cases import generate_ct_cases, generate_phantom_cases, load_label_names

    names = load_label_names(str(CT_DIR / "label_map_total_and_total_mr.json"), "total")
    cases = generate_ct_cases(cases_dir, CT_DIR / "example_ct.nii.gz", CT_DIR / "example_seg_fast_force_split.nii.gz",
                              names, seeds=seeds, amplitudes_mm=amplitudes, generator="abdominal")
    if phantom:
        cases += generate_phantom_cases(cases_dir, seeds=seeds, amplitudes_mm=amplitudes, spacing_mm=3.0)
    return cases


def _evaluate(case, args, config) -> list[dict]:
    import json

    import numpy as np
    import SimpleITK as sitk
    import torch
    from deepabdominalreg import spatial
    from deepabdominalreg.geometry import make_working_grid, resample_image
    from deepabdominalreg.io import read_displacement_field, read_image
    from deepabdominalreg.metrics.labels import dice_per_label
    from deepabdominalreg.registration.discrete import discrete_search
    from deepabdominalreg.registration.instance_optimisation import InstanceOptimisationSettings, instance_optimise
    from deepabdominalreg.registration.preprocessing import prepare_working_image

    fixed, moving = read_image(case.fixed, "fixed"), read_image(case.moving, "moving")
    grid = make_working_grid(fixed, config.working_spacing_mm, config.max_working_voxels)
    w_fixed = prepare_working_image(fixed, grid, config.hu_window, config.body_mask)
    w_moving = prepare_working_image(moving, make_working_grid(moving, grid.spacing[0]), config.hu_window,
                                     config.body_mask)
    moved = prepare_working_image(moving, grid, config.hu_window, config.body_mask, body_mask_of=w_moving)
    fixed_t = torch.as_tensor(w_fixed.intensity)[None, None]
    moving_t = torch.as_tensor(moved.intensity)[None, None]
    mask_t = torch.as_tensor(w_fixed.mask & moved.field_of_view)[None, None]
    body = w_fixed.mask

    truth = sitk.GetArrayFromImage(resample_image(read_displacement_field(case.true_displacement), grid))
    fixed_labels = sitk.GetArrayFromImage(resample_image(sitk.ReadImage(case.fixed_seg), grid, interpolator="nearest"))
    moving_labels = torch.as_tensor(sitk.GetArrayFromImage(
        resample_image(sitk.ReadImage(case.moving_seg), grid, interpolator="nearest")).astype(np.float32))[None, None]
    names = {int(k): v for k, v in json.loads(Path(case.label_names).read_text()).items()}
    organs = [k for k, v in names.items() if v in ORGANS and (fixed_labels == k).any()]
    if not organs:  # the phantom's labels
        organs = sorted(int(k) for k in np.unique(fixed_labels) if k != 0)

    settings = InstanceOptimisationSettings.from_config(config, grid.spacing[0])
    spacing_zyx = tuple(reversed(grid.spacing))

    def score(name: str, disp: torch.Tensor, seconds: float) -> dict:
        error = np.linalg.norm(spatial.disp_vox_to_mm_lps(disp, grid) - truth, axis=-1)[body]
        warped = spatial.warp(moving_labels, disp, mode="nearest")[0, 0].numpy().astype(np.int32)
        dice = dice_per_label(fixed_labels.astype(np.int32), warped, organs)
        return {"case": case.name, "method": name, "error_mean_mm": float(error.mean()),
                "error_p95_mm": float(np.percentile(error, 95)), "dice": float(np.mean(list(dice.values()))),
                "seconds": seconds}

    options = {"grid_spacing_mm": args.grid_spacing_mm, "search_radius_mm": args.search_radius_mm}
    rows = [score("zero", torch.zeros(1, 3, *fixed_t.shape[2:]), 0.0)]
    start = time.perf_counter()
    io_only = instance_optimise(fixed_t, moving_t, None, mask_t, settings=settings)
    rows.append(score("io", io_only, time.perf_counter() - start))
    start = time.perf_counter()
    coarse = discrete_search(fixed_t, moving_t, mask_t, spacing_mm=spacing_zyx, **options)
    searched = time.perf_counter() - start
    rows.append(score("discrete", coarse, searched))
    start = time.perf_counter()
    both = instance_optimise(fixed_t, moving_t, coarse, mask_t, settings=settings)
    rows.append(score("discrete+io", both, searched + time.perf_counter() - start))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amplitudes", type=float, nargs="+", default=[10.0, 20.0], help="motion peaks, mm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-phantom", action="store_true", help="the real CT's pairs only")
    parser.add_argument("--grid-spacing-mm", type=float, default=6.0)
    parser.add_argument("--search-radius-mm", type=float, default=24.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases-dir", default=None, help="where the pairs are written (default: a temporary folder)")
    args = parser.parse_args()

    import torch
    from deepabdominalreg.config import RegistrationConfig

    torch.set_num_threads(args.threads)
    config = RegistrationConfig()
    with tempfile.TemporaryDirectory() as tmp:
        cases = _pairs(Path(args.cases_dir or tmp), args.amplitudes, args.seeds, not args.no_phantom)
        rows = []
        for case in cases:
            rows += _evaluate(case, args, config)
    print(f"grid_spacing_mm={args.grid_spacing_mm:g} search_radius_mm={args.search_radius_mm:g} "
          f"threads={args.threads}; io: RegistrationConfig() defaults ({config.io_transform}, {config.io_similarity}, "
          f"levels {config.io_levels})")
    print(f"{'case':<28} {'method':<12} {'err mean mm':>11} {'err p95 mm':>10} {'Dice':>6} {'time s':>7}")
    for r in rows:
        print(f"{r['case']:<28} {r['method']:<12} {r['error_mean_mm']:>11.2f} {r['error_p95_mm']:>10.2f} "
              f"{r['dice']:>6.3f} {r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
