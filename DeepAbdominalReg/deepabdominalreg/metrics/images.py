"""Image similarity metrics on arrays (optionally masked): normalised cross-correlation and SSIM.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from deepabdominalreg.metrics.fields import as_array, check_mask
from deepabdominalreg.nn.losses import global_ncc_loss


def _paired_arrays(a, b, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    arr_a = np.asarray(as_array(a), dtype=np.float64)
    arr_b = np.asarray(as_array(b), dtype=np.float64)
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"images differ in shape: {arr_a.shape} vs {arr_b.shape} (zyx); resample first")
    return arr_a, arr_b, check_mask(None if mask is None else as_array(mask), arr_a.shape)


def normalized_cross_correlation(
    a: sitk.Image | np.ndarray,
    b: sitk.Image | np.ndarray,
    mask: sitk.Image | np.ndarray | None = None,
) -> float:
    """Global Pearson correlation of the intensities inside ``mask`` (all voxels if ``None``): 1 = identical up to
    a positive linear intensity map, 0 = uncorrelated.  NaN when the mask is empty or an image is constant there.
    The negated :func:`deepabdominalreg.nn.losses.global_ncc_loss` without ``eps``, in float64."""
    arr_a, arr_b, m = _paired_arrays(a, b, mask)
    va = arr_a[m] if m is not None else arr_a.ravel()
    vb = arr_b[m] if m is not None else arr_b.ravel()
    if va.size == 0:
        return float("nan")
    va, vb = (torch.from_numpy(np.require(v, requirements="W")) for v in (va, vb))  # float64, no copy if writable
    with torch.no_grad():
        return -float(global_ncc_loss(va, vb, eps=0.0))


def structural_similarity(
    a: sitk.Image | np.ndarray,
    b: sitk.Image | np.ndarray,
    mask: sitk.Image | np.ndarray | None = None,
    data_range: float | None = None,
) -> float:
    """Mean SSIM (scikit-image, 7-voxel window or smaller for tiny images) over ``mask`` (all voxels if ``None``).

    ``data_range`` (intensity units, e.g. the HU window width) defaults to the joint range of ``a`` and ``b``.
    NaN for an empty mask.
    """
    from skimage.metrics import structural_similarity as ssim

    arr_a, arr_b, m = _paired_arrays(a, b, mask)
    if data_range is None:
        data_range = float(max(arr_a.max(), arr_b.max()) - min(arr_a.min(), arr_b.min())) or 1.0
    win = min(7, min(arr_a.shape))
    win -= 1 - win % 2  # odd
    if win < 3:
        raise ValueError(f"images of shape {arr_a.shape} are too small for SSIM (need >= 3 voxels per axis)")
    _, ssim_map = ssim(arr_a, arr_b, data_range=float(data_range), win_size=win, full=True)
    values = ssim_map[m] if m is not None else ssim_map.ravel()
    return float(values.mean()) if values.size else float("nan")
