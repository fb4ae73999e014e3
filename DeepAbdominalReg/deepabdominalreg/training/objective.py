"""The training objective: similarity, segmentation and regularisation terms with their weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepabdominalreg import spatial
from deepabdominalreg.nn import losses
from deepabdominalreg.training.config import SIMILARITIES, TrainingConfig

# ----------------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------------


class LossComputer(nn.Module):
    """All loss terms of one pair, weighted (optionally by learnable uncertainty weights)."""

    def __init__(self, config: TrainingConfig, label_ids: Sequence[int] = ()) -> None:
        super().__init__()
        self.config = config
        self.label_ids = [int(i) for i in label_ids]
        self.active = {k: float(w) for k, w in config.loss_weights.items() if w and float(w) > 0}
        if not self.active:
            raise ValueError("no active loss term (every weight is 0)")
        learnable = set()
        if config.uncertainty_weighting:
            learnable = {k for k in self.active if k in SIMILARITIES or config.learn_regulariser_weights}
        self.weighting = losses.UncertaintyWeighting(self.active, learnable, offsets={"ncc": 1.0})

    def _present_ids(self, pair: dict) -> list[int]:
        """Guidance labels present in the fixed or the moving crop (one-hot channels only for those)."""
        present = set(torch.unique(pair["fixed_labels"]).long().tolist()) | \
            set(torch.unique(pair["moving_labels"]).long().tolist())
        return [i for i in self.label_ids if i in present] or self.label_ids[:1]

    def terms(self, network: nn.Module, pair: dict, pred: torch.Tensor) -> dict[str, torch.Tensor]:
        fixed, moving, mask = pair["fixed"], pair["moving"], pair["fixed_mask"]
        out: dict[str, torch.Tensor] = {}
        a = self.active
        if "auxiliary" in a:
            # first: the network's own terms are those of its last forward pass, pred's (the inverse-consistency
            # term below runs it again)
            auxiliary = getattr(network, "auxiliary_losses", None)
            if auxiliary is None:
                raise ValueError(f"the loss term 'auxiliary' needs a network with auxiliary_losses(); "
                                 f"{type(network).__name__} has none")
            values = list(auxiliary(fixed, moving, pred).values())
            out["auxiliary"] = sum(values[1:], values[0]) if values else pred.new_zeros(())
        if "segmentation" in a:
            segmentation = getattr(network, "segmentation_loss", None)
            if segmentation is None:
                raise ValueError(f"the loss term 'segmentation' needs a network with segmentation_loss(); "
                                 f"{type(network).__name__} has none")
            if pair.get("fixed_labels") is not None and pair.get("moving_labels") is not None:
                # of the last forward pass too: before the inverse-consistency pass below replaces it
                out["segmentation"] = segmentation(pair["fixed_labels"], pair["moving_labels"])
        if "ncc" in a or "ssim" in a or "mse" in a:
            warped = spatial.warp(moving, pred)
            if "ncc" in a:
                out["ncc"] = losses.local_ncc_loss(fixed, warped, self.config.ncc_window)
            if "ssim" in a:
                out["ssim"] = losses.ssim_loss(fixed, warped)
            if "mse" in a:
                out["mse"] = losses.mse_loss(fixed, warped)
        if ("dice" in a or "hausdorff" in a) and pair.get("moving_labels") is not None and self.label_ids:
            ids = self._present_ids(pair)
            fixed_onehot = losses.one_hot(pair["fixed_labels"].round().long(), ids)
            moving_onehot = losses.one_hot(pair["moving_labels"].round().long(), ids)
            f = int(self.config.label_loss_downsample)
            if f > 1:
                # cell-centred pooling: coarse voxel q is the centre of fine cell [f q, f q + f); the field is
                # averaged over the cell and expressed in coarse voxels
                fixed_onehot = F.avg_pool3d(fixed_onehot, f)
                moving_onehot = F.avg_pool3d(moving_onehot, f)
                warped_labels = spatial.warp(moving_onehot, F.avg_pool3d(pred, f) / f)
            else:
                warped_labels = spatial.warp(moving_onehot, pred)
            if "dice" in a:
                out["dice"] = losses.dice_loss(fixed_onehot, warped_labels)
            if "hausdorff" in a:
                out["hausdorff"] = losses.hausdorff_dt_loss(fixed_onehot, warped_labels)
        if "supervised" in a and pair.get("disp") is not None:
            out["supervised"] = losses.supervised_displacement_loss(pred, pair["disp"], mask,
                                                                    self.config.spacing_mm, squared=False)
        if "inverse_consistency" in a:
            backward = network(moving, fixed)
            out["inverse_consistency"] = losses.inverse_consistency_loss(pred, backward)
        if "diffusion" in a:
            out["diffusion"] = losses.diffusion_regulariser(pred)
        if "bending" in a:
            out["bending"] = losses.bending_energy(pred)
        if "jacobian" in a:
            out["jacobian"] = losses.negative_jacobian_penalty(pred)
        return out

    def forward(self, network: nn.Module, pair: dict, pred: torch.Tensor):
        terms = self.terms(network, pair, pred)
        return self.weighting(terms), terms
