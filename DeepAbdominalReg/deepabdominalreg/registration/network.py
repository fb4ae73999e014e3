"""The network stage: the shipped network's inputs on its own grid (the model card's spacing and HU window), its
forward pass (bf16 autocast where the device computes it natively), and its field on the working grid.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from deepabdominalreg.config import RegistrationConfig
from deepabdominalreg.geometry import (
    Grid,
    make_working_grid,
    mask_bounding_box,
    resample_image,
)
from deepabdominalreg.registration.preprocessing import prepare_working_image
from deepabdominalreg.spatial import disp_vox_to_mm_lps, mm_lps_to_disp_vox


def network_displacement(
    network: torch.nn.Module,
    card,
    fixed: sitk.Image,
    moving: sitk.Image,
    affine: sitk.Transform,
    working_grid: Grid,
    config: RegistrationConfig,
    device: torch.device,
    *,
    bf16: bool = False,
) -> torch.Tensor:
    """Run the network on its own grid (the card's spacing and HU window) and return the displacement on the
    working grid, in working-grid voxels ``(1, 3, D, H, W)``."""
    fixed_input, moving_input, net_grid, box = network_inputs(fixed, moving, card, config, device, affine=affine)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = network.predict(fixed_input, moving_input).float()
        pad = []  # outside the bodies' box the field continues its edge values
        for sl, size in reversed(list(zip(box, net_grid.shape_zyx))):
            pad += [sl.start, size - sl.stop]
        if any(pad):
            pred = torch.nn.functional.pad(pred, pad, mode="replicate")
    if net_grid == working_grid:
        return pred.clone()
    # ITK's linear resampling (in float64) onto the working grid: an equivalent torch resampling in float32 would
    # give the same field to float rounding but not bit for bit, and change the network preset's results
    field_mm = net_grid.image_from_array(disp_vox_to_mm_lps(pred, net_grid).astype(np.float32), is_vector=True)
    on_working = sitk.GetArrayFromImage(resample_image(field_mm, working_grid, interpolator="linear"))
    return mm_lps_to_disp_vox(on_working, working_grid, device)


_NETWORK_BOX_MARGIN_VOXELS = 4


def network_inputs(
    fixed: sitk.Image,
    moving: sitk.Image,
    card,
    config: RegistrationConfig,
    device: torch.device | str,
    *,
    affine: sitk.Transform | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Grid, tuple[slice, slice, slice]]:
    """The network's input pair as the network stage prepares it (``benchmarks/`` time exactly this).

    Both images go onto the model's grid (``card.input_spacing_mm``, coarser for a scan longer than
    ``config.max_working_voxels`` voxels; the fixed image's direction and extent; the moving image through
    ``affine``, fixed -> moving, when given), with the card's HU window and the body mask (``config.body_mask``),
    and are cropped to the bounding box of both bodies plus a margin: the air around them carries no matching
    information and is often half of the grid.  Returns ``(fixed, moving)`` as ``(1, 1, d, h, w)`` float32 tensors
    on ``device``, the model's grid and the box (array axes z, y, x) on it.
    """
    net_grid = make_working_grid(fixed, card.input_spacing_mm, config.max_working_voxels)
    f = prepare_working_image(fixed, net_grid, card.hu_window, config.body_mask)
    m = prepare_working_image(moving, net_grid, card.hu_window, config.body_mask, transform=affine)
    box = _body_box(f.mask | m.mask, margin=_NETWORK_BOX_MARGIN_VOXELS)
    return (torch.as_tensor(np.ascontiguousarray(f.intensity[box]), device=device)[None, None],
            torch.as_tensor(np.ascontiguousarray(m.intensity[box]), device=device)[None, None], net_grid, box)


def _body_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Bounding box (array axes z, y, x) of ``mask`` grown by ``margin`` voxels; the whole grid if it is empty."""
    return mask_bounding_box(mask, margin, whole_if_empty=True)
