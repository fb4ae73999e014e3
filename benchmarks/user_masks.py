"""User masks (``register --exclude-mask / --moving-exclude-mask / --rigid-mask``) on phantom pairs with a known
answer: the moving scan is the fixed one translated by (3, -4, 5) mm (LPS), so the true displacement is that
translation everywhere.

* **exclusion**: a 16 mm lesion (+400 HU) only the moving scan has.  Without a mask the field bends to shrink the
  lesion away; with the lesion excluded (given on the moving grid, or on the fixed grid) it should stay the
  translation.  Columns: mean field error ``|u - t|`` (mm) inside the lesion grown by 8 mm, and over the body
  (fixed > -500 HU).
* **rigid**: a tumour (+400 HU) of radius 12 mm in the fixed scan and 16 mm in the moving one (it grew).  Without a
  mask the optimiser resizes the tumour to match; with ``--rigid-mask`` (the fixed tumour grown by 4 mm) it should
  move as a whole.  Columns: the RMS infinitesimal strain ``|sym grad u|_F`` and the mean ``det J`` inside the fixed
  tumour (1 = not resized; (16/12)^3 = 2.37 would match the growth), and the field error outside the grown tumour.

    flock /tmp/heavy.lock python benchmarks/user_masks.py --threads 1

Fast preset at 4 mm (``register_pair``'s defaults otherwise).  Times are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk

OFFSET_MM = np.array([3.0, -4.0, 5.0])


def _ball(shape, centre, radius_voxels) -> np.ndarray:
    zyx = np.indices(shape)
    return ((zyx - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= radius_voxels ** 2


def _image_like(array: np.ndarray, reference: sitk.Image, dtype) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(dtype))
    image.CopyInformation(reference)
    return image


def _pair(seed: int, fixed_radius_voxels: float | None, moving_radius_voxels: float):
    """(fixed, moving, moving lesion mask, fixed lesion mask): the moving scan a noisy phantom with a lesion of
    ``moving_radius_voxels``; the fixed scan the same phantom (with its own lesion of ``fixed_radius_voxels``, or
    none) seen through the translation, on a field of view 3 voxels smaller on every side."""
    from deepabdominalreg.geometry import Grid, resample_image
    from deepabdominalreg.synthetic.anatomy import add_ct_noise, render_phantom

    clean, _ = render_phantom(seed=seed, spacing_mm=4.0)
    grid = Grid.from_image(clean)
    base = sitk.GetArrayFromImage(clean)
    centre = np.array(base.shape) // 2 + np.array([0, -6, 4])
    inner = Grid(size=tuple(s - 6 for s in grid.size), spacing=grid.spacing,
                 origin=tuple(grid.index_to_physical([[3, 3, 3]])[0]), direction=grid.direction)
    translation = sitk.TranslationTransform(3, tuple(OFFSET_MM))
    moving_lesion = _ball(base.shape, centre, moving_radius_voxels)
    moving = add_ct_noise(_image_like(np.where(moving_lesion, base + 400.0, base), clean, np.float32), seed=1)
    fixed_source = base if fixed_radius_voxels is None else np.where(
        _ball(base.shape, centre, fixed_radius_voxels), base + 400.0, base)
    fixed_clean = resample_image(_image_like(fixed_source, clean, np.float32), inner, translation, "linear", -1024.0)
    fixed = add_ct_noise(fixed_clean, seed=2)
    moving_mask = _image_like(moving_lesion, clean, np.uint8)
    fixed_mask = resample_image(_image_like(_ball(base.shape, centre, fixed_radius_voxels or moving_radius_voxels),
                                            clean, np.uint8), inner, translation, "nearest")
    return fixed, moving, moving_mask, fixed_mask


def _errors(result) -> np.ndarray:
    field = sitk.GetArrayFromImage(result.displacement_lps)
    return np.linalg.norm(field - OFFSET_MM, axis=-1)


def _strain_and_det(result, region: np.ndarray) -> tuple[float, float]:
    """RMS Frobenius norm of the symmetric displacement gradient and mean det J over ``region`` (axis-aligned grid:
    the phantom's direction is the identity)."""
    from deepabdominalreg.metrics.fields import jacobian_determinant

    field = sitk.GetArrayFromImage(result.displacement_lps)  # (z, y, x, 3) LPS mm, components x, y, z
    spacing_zyx = result.displacement_lps.GetSpacing()[::-1]
    gradient = np.stack([np.stack(np.gradient(field[..., 2 - a], *spacing_zyx), -1) for a in range(3)], -2)
    strain = 0.5 * (gradient + np.swapaxes(gradient, -1, -2))
    rms = float(np.sqrt((strain[region] ** 2).sum(axis=(-1, -2)).mean()))
    det = sitk.GetArrayFromImage(jacobian_determinant(result.displacement_lps))
    return rms, float(det[region].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    import torch
    from deepabdominalreg.config import config_from_preset
    from deepabdominalreg.registration.pipeline import register_pair

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    config = config_from_preset("fast", working_spacing_mm=4.0, affine_levels_mm=(8.0, 4.0), io_levels=(2, 1),
                                seed=0, threads=args.threads)

    def run(label, fixed, moving, **masks):
        start = time.perf_counter()
        result = register_pair(fixed, moving, config=config, **masks)
        return label, result, time.perf_counter() - start

    fixed, moving, moving_mask, fixed_mask = _pair(args.seed, None, 4.0)
    near = sitk.GetArrayFromImage(sitk.BinaryDilate(fixed_mask, (2, 2, 2))) > 0
    _, clean_moving, _, _ = _pair(args.seed, None, 0.0)
    print("exclusion: a 16 mm lesion in the moving scan only; mean |u - t| (mm)")
    print(f"{'run':34s} {'near lesion':>11s} {'body':>6s} {'time s':>7s}")
    for label, result, seconds in (
            run("no lesion in either scan", fixed, clean_moving),
            run("lesion, no mask", fixed, moving),
            run("lesion, --moving-exclude-mask", fixed, moving, moving_exclude_mask=moving_mask),
            run("lesion, --exclude-mask (fixed)", fixed, moving, exclude_mask=fixed_mask)):
        errors = _errors(result)
        body = sitk.GetArrayFromImage(fixed) > -500  # tissue, not air
        print(f"{label:34s} {errors[near].mean():11.2f} {errors[body].mean():6.2f} {seconds:7.1f}")

    fixed, moving, _, fixed_tumour = _pair(args.seed, 3.0, 4.0)
    tumour = sitk.GetArrayFromImage(fixed_tumour) > 0
    rigid = sitk.BinaryDilate(fixed_tumour, (1, 1, 1))
    outside = ~(sitk.GetArrayFromImage(sitk.BinaryDilate(fixed_tumour, (3, 3, 3))) > 0)
    print("\nrigid: a tumour of 12 mm (fixed) grown to 16 mm (moving)")
    print(f"{'run':34s} {'RMS strain':>10s} {'mean detJ':>9s} {'|u-t| outside':>13s} {'time s':>7s}")
    for label, result, seconds in (
            run("no mask", fixed, moving),
            run("--rigid-mask (weight 100)", fixed, moving, rigid_mask=rigid)):
        rms, det = _strain_and_det(result, tumour)
        print(f"{label:34s} {rms:10.3f} {det:9.3f} {_errors(result)[outside].mean():13.2f} {seconds:7.1f}")


if __name__ == "__main__":
    main()
