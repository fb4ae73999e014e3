"""Similarity and regularisation terms (pure functions on ``(B, C, D, H, W)`` tensors, all minimised).

Displacements are ``(B, 3, D, H, W)`` in voxels, channels ``(d, h, w)`` (see :mod:`deepabdominalreg.spatial`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from deepabdominalreg.spatial import box_filter, bspline_gram_matrix, compose, jacobian_determinant

__all__ = [
    "NCC_FORMS",
    "BSplineBendingEnergy",
    "UncertaintyWeighting",
    "bending_energy",
    "dice_loss",
    "diffusion_regulariser",
    "global_ncc_loss",
    "hausdorff_dt_loss",
    "inverse_consistency_loss",
    "local_ncc_loss",
    "local_statistics",
    "mind_loss",
    "mind_ssc",
    "mse_loss",
    "negative_jacobian_penalty",
    "one_hot",
    "ssim_loss",
    "strain_energy",
    "supervised_displacement_loss",
]


_REDUCTIONS = ("mean", "sum", "none")
NCC_FORMS = ("squared", "distance")
"""The forms of :func:`local_ncc_loss`."""


def local_statistics(image: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and variance ``mean(x²) - mean(x)²`` (clamped at 0) of ``(B, C, D, H, W)`` over the ``window``³
    neighbourhood (voxels; zero padding, divided by ``window``³: :func:`~deepabdominalreg.spatial.box_filter`),
    without autograd: what :func:`local_ncc_loss` needs of the fixed image, given once when it stays the same over
    many calls (``fixed_statistics``)."""
    with torch.no_grad():
        channels = image.shape[1]
        means = box_filter(torch.cat([image, image * image], dim=1), window)
        mean = means[:, :channels].contiguous()
        return mean, (means[:, channels:] - mean * mean).clamp_min(0)


def local_ncc_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = 9,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    reduction: str = "mean",
    fixed_statistics: tuple[torch.Tensor, torch.Tensor] | None = None,
    form: str = "squared",
) -> torch.Tensor:
    """Local normalised cross-correlation loss over the ``window``³ neighbourhood of every voxel (``window`` in
    voxels, odd; zero padding at the grid's border, every window mean divided by ``window``³; variances clamped at
    0).  Images ``(B, C, D, H, W)`` of one shape.  Two forms, both ``-1`` for a perfect match up to a local positive
    linear intensity map and minimised:

    * ``"squared"``: VoxelMorph's (Balakrishnan et al., IEEE TMI 2019; ``voxelmorph.torch.losses.NCC``, as MONAI's
      ``LocalNormalizedCrossCorrelationLoss`` with a rectangular kernel): ``-cc`` with
      ``cc = cov(f, w)² / (var(f) var(w) + eps)`` in ``[0, 1]`` (a negative correlation counts as a match).  In a
      window whose ``var(f) var(w)`` is not much larger than ``eps`` the term rewards covariance, not correlation,
      so its optimum is not at ``w = f``: an image registered to itself moves.
    * ``"distance"``: the squared distance between the two windows normalised by their regularised standard
      deviations, ``s = var(w)/(var(w)+eps) + var(f)/(var(f)+eps) - 2 cov/sqrt((var(w)+eps)(var(f)+eps))`` (``0``
      where the windows are equal, ``~2 (1 - rho)`` for a correlation ``rho`` when the variances exceed ``eps``),
      returned as ``cc = 1 - s`` in ``[-3, 1]``: a sum of squares, so ``w = f`` is an exact minimum with a zero
      gradient whatever ``eps``; its gradient at a good match equals the squared form's (``d cc ~ 2 d rho``), so
      the regularisation weights tuned with one suit the other.  Used by the registration's optimisers.

    ``mask`` (broadcastable to the images, e.g. ``(B, 1, D, H, W)``; bool, 0/1 or non-negative weights) selects
    (weights) the voxels whose ``cc`` counts; the windows still see every voxel.  ``reduction``: ``"mean"`` over
    the voxels in the mask (the weighted mean; every voxel without a mask; an empty mask gives 0), ``"sum"`` over
    them (weighted), or ``"none"``: the ``-cc`` map ``(B, C, D, H, W)``, times the mask.

    ``fixed`` is a constant (the registration target): the gradient is with respect to ``warped`` only, by an
    analytic backward pass (the gradient with respect to the window means is elementwise, and the box filter is its
    own adjoint: one 3-channel box filter instead of autograd through ~20 operations).  ``fixed_statistics``:
    :func:`local_statistics` of ``fixed`` with this window, when it is computed once for many calls (the affine and
    instance-optimisation loops).
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"shapes differ: {tuple(fixed.shape)} vs {tuple(warped.shape)}")
    if window % 2 == 0 or window < 1:
        raise ValueError("window must be a positive odd number of voxels")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if form not in NCC_FORMS:
        raise ValueError(f"form must be one of {NCC_FORMS}, got {form!r}")
    if fixed.requires_grad and torch.is_grad_enabled():
        raise ValueError("local_ncc_loss is differentiable with respect to warped only: pass fixed detached")
    fixed_mean, fixed_variance = local_statistics(fixed, window) if fixed_statistics is None else fixed_statistics
    cc = _LocalCorrelation.apply(warped, fixed, fixed_mean, fixed_variance, window, eps, form == "distance")
    if mask is None:
        if reduction == "mean":
            return -cc.mean()
        return -cc.sum() if reduction == "sum" else -cc
    weight = mask.to(cc.dtype).expand_as(cc)
    if reduction == "mean":
        weight = weight / weight.sum().clamp_min(1.0)
    return -(cc * weight).sum() if reduction != "none" else -(cc * weight)


class _LocalCorrelation(torch.autograd.Function):
    """The ``cc`` map of :func:`local_ncc_loss` (either form) of a warped image ``w`` against a fixed image ``f``
    whose window mean ``mu_f`` and variance ``var_f`` are given, with an analytic backward pass with respect to ``w``.

    Both forms are functions of the window means of ``w``, ``w²`` and ``f w``.  Their derivatives with respect to
    those means are elementwise, and the box filter is its own adjoint, so ``dL/dw`` is one 3-channel box filter and
    a few products (the same values as autograd through the operations, float rounding aside).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, f: torch.Tensor, mu_f: torch.Tensor, var_f: torch.Tensor,
                window: int, eps: float, distance: bool) -> torch.Tensor:
        channels = w.shape[1]
        means = box_filter(torch.cat([w, w * w, f * w], dim=1), window)
        mu_w, mu_ww, cov = torch.split(means, channels, dim=1)
        cov.addcmul_(mu_f, mu_w, value=-1.0)  # cov = mu_fw - mu_f mu_w
        var_w = mu_ww.addcmul_(mu_w, mu_w, value=-1.0)  # mu_ww - mu_w^2
        positive = var_w >= 0  # clamp_min(0) passes the gradient here
        var_w.clamp_min_(0)
        ctx.window, ctx.distance = window, distance
        if not distance:
            ratio = cov / var_w.mul_(var_f).add_(eps)  # cov / (var_f var_w + eps)
            ctx.save_for_backward(w, f, mu_f, var_f, mu_w, ratio, positive)
            return cov.mul_(ratio)
        a = var_w.add_(eps)  # var_w + eps
        b = var_f + eps
        r = (a * b).rsqrt_()  # 1 / sqrt(a b)
        # d s / d var_w = eps / a^2 + cov r / a, kept for the backward pass
        q = (cov * r).add_(eps / a).div_(a)
        ctx.save_for_backward(w, f, mu_f, mu_w, r, q, positive)
        # cc = 1 - s = 1 - (1 - eps / a) - (1 - eps / b) + 2 cov r = eps / a + eps / b - 1 + 2 cov r
        return cov.mul_(r).mul_(2.0).add_(eps / a).add_(eps / b).sub_(1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.distance:
            w, f, mu_f, mu_w, r, q, positive = ctx.saved_tensors
            # d cc / d mu_fw = 2 r, d cc / d mu_ww = -q [var_w >= 0], d cc / d mu_w = -2 r mu_f + 2 q mu_w [...]
            g_fw = grad.mul(r).mul_(2.0)
            g_ww = q.mul(positive).mul_(grad).neg_()
        else:
            w, f, mu_f, var_f, mu_w, ratio, positive = ctx.saved_tensors
            # d cc / d mu_fw = 2 r, d cc / d mu_ww = -r^2 var_f [var_w >= 0], d cc / d mu_w = -2 r mu_f + 2 r^2 var_f
            # mu_w with r = cov / (var_f var_w + eps)
            g_fw = grad.mul(ratio).mul_(2.0)
            g_ww = ratio.square().mul_(var_f).mul_(positive).mul_(grad).neg_()
        g_w = g_fw * mu_f
        g_w.addcmul_(g_ww, mu_w, value=2.0).neg_()
        back_w, back_ww, back_fw = torch.split(box_filter(torch.cat([g_w, g_ww, g_fw], dim=1), ctx.window),
                                               w.shape[1], dim=1)
        return back_w + back_ww * w * 2.0 + back_fw * f, None, None, None, None, None, None


def global_ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
                    eps: float = 1e-8) -> torch.Tensor:
    """Negative global Pearson correlation of the intensities (inside ``mask``, broadcastable to the images), in
    ``[-1, 1]`` and minimised: ``-1`` perfect up to a positive linear intensity map, ``1`` an inverted one.
    ``eps`` is added under the root to the product of the two sums of squares; with ``eps = 0`` a constant image
    gives NaN (:func:`deepabdominalreg.metrics.images.normalized_cross_correlation` is this, negated)."""
    if mask is None:
        df, dw = fixed - fixed.mean(), warped - warped.mean()
    else:
        weight = mask.to(fixed.dtype).expand_as(fixed)
        n = weight.sum().clamp_min(1.0)
        df = (fixed - (fixed * weight).sum() / n) * weight
        dw = (warped - (warped * weight).sum() / n) * weight
    df, dw = df.reshape(-1), dw.reshape(-1)
    return -torch.dot(df, dw) / torch.sqrt(torch.dot(df, df) * torch.dot(dw, dw) + eps)


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared intensity difference (``0`` perfect), optionally inside ``mask``."""
    diff = (fixed - warped) ** 2
    if mask is None:
        return diff.mean()
    weight = mask.to(diff.dtype).expand_as(diff)
    return (diff * weight).sum() / weight.sum().clamp_min(1.0)


def diffusion_regulariser(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the displacement (voxels²), ``0`` for a translation."""
    dd = disp[:, :, 1:] - disp[:, :, :-1]
    dh = disp[:, :, :, 1:] - disp[:, :, :, :-1]
    dw = disp[:, :, :, :, 1:] - disp[:, :, :, :, :-1]
    return (dd.pow(2).mean() + dh.pow(2).mean() + dw.pow(2).mean()) / 3.0


def bending_energy(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared second derivatives (voxels², mixed terms counted twice); ``0`` for any affine field."""

    def d(x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.gradient(x, dim=axis)[0]

    total = disp.new_zeros(())
    for i, a in enumerate((2, 3, 4)):
        da = d(disp, a)
        for b in (2, 3, 4)[i:]:
            term = d(da, b).pow(2).mean()
            total = total + (term if a == b else 2 * term)
    return total


class BSplineBendingEnergy:
    """Bending energy of a cubic B-spline displacement on a control grid, exactly and in physical units (mm⁻²).

    ``mean over the grid's box of sum_c sum_ab (d² u_c / dx_a dx_b)²`` with ``u`` in mm and ``x`` in mm (mixed
    derivatives counted twice; Rueckert et al., IEEE TMI 1999, as elastix's ``TransformBendingEnergyPenalty``),
    for the field ``sum_ijk c_ijk B_i(z) B_j(y) B_k(x)`` of :func:`deepabdominalreg.spatial.bspline_basis_matrix`
    on a grid of ``shape`` voxels with knots ``knot_spacing`` voxels apart and voxels ``spacing_mm`` apart (per axis
    ``(d, h, w)``).  The integral is a quadratic form in the control values, evaluated with the per-axis Gram
    matrices of the basis and its derivatives (:func:`deepabdominalreg.spatial.bspline_gram_matrix`): three small
    matrix products per term on the control grid, never the dense field.  ``0`` for any affine field; independent
    of the grid's resolution for the same physical field (a length² weight makes it comparable to a similarity).
    """

    def __init__(self, shape: tuple[int, int, int], knot_spacing: tuple[float, float, float],
                 spacing_mm: tuple[float, float, float], device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.spacing = torch.tensor([float(s) for s in spacing_mm], dtype=dtype, device=device).view(1, 3, 1, 1, 1)
        grams = []
        for n, k, h in zip(shape, knot_spacing, spacing_mm):
            # Gram matrices in mm: d/dx_mm = (1 / h) d/dx_vox and dx_mm = h dx_vox
            grams.append([bspline_gram_matrix(n, k, order, device=device) * h ** (1 - 2 * order)
                          for order in range(3)])
        volume = math.prod((n - 1) * h for n, h in zip(shape, spacing_mm))
        self.scale = 1.0 / max(volume, 1e-12)
        self.grams = [[g.to(dtype) for g in axis] for axis in grams]
        # (order along d, h, w; multiplicity): the three pure and three mixed second derivatives
        self.terms = [((2, 0, 0), 1.0), ((0, 2, 0), 1.0), ((0, 0, 2), 1.0),
                      ((1, 1, 0), 2.0), ((1, 0, 1), 2.0), ((0, 1, 1), 2.0)]

    def __call__(self, control_vox: torch.Tensor) -> torch.Tensor:
        """``control_vox`` ``(B, 3, nz, ny, nx)``: control values in voxels of the grid (channels ``(d, h, w)``)."""
        c = control_vox * self.spacing  # mm
        b, ch, nz, ny, nx = c.shape
        gz, gy, gx = self.grams
        total = c.new_zeros(())
        for (oz, oy, ox), weight in self.terms:
            y = c.reshape(-1, nx) @ gx[ox]  # Gram matrices are symmetric
            y = torch.matmul(gy[oy], y.reshape(b * ch * nz, ny, nx))
            y = torch.matmul(gz[oz], y.reshape(b * ch, nz, ny * nx))
            total = total + weight * (y.reshape(c.shape) * c).sum()
        return total * self.scale / b


_MIND_OFFSETS = ((-1, 0, 0), (0, 0, -1), (0, -1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0))


def _mind_pairs() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 pairs of the six-neighbourhood at distance sqrt(2), in the channel order of the reference (C++ and
    ConvexAdam's ``MINDSSC``)."""
    pairs = [(_MIND_OFFSETS[i], _MIND_OFFSETS[j]) for i in range(6) for j in range(6)
             if i > j and sum((a - b) ** 2 for a, b in zip(_MIND_OFFSETS[i], _MIND_OFFSETS[j])) == 2]
    return [pairs[k] for k in (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)]


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013; the self-similarity context of MIND, Heinrich et al.,
    Med. Image Anal. 2012) of ``(B, 1, D, H, W)``: ``(B, 12, D, H, W)`` in ``(0, 1]``.

    Channel ``k``: the patch distance between the two voxels ``p + dilation * o1`` and ``p + dilation * o2`` of the
    ``k``-th pair of six-neighbours at distance sqrt(2) (squared differences averaged over a ``(2 radius + 1)``³
    box), minus its minimum over the channels, divided by the channels' mean (the local variance estimate, clamped
    to [0.001, 1000] times its mean over the image), through ``exp(-x)``.  ``radius`` and ``dilation`` in voxels;
    replicated borders.  Invariant to a linear change of intensity (away from the clamp): a structural
    descriptor that survives contrast changes.  The same values, in the same channel order, as ConvexAdam's
    ``convex_adam_utils.MINDSSC`` (Siebert, Hansen & Heinrich 2021).
    """
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"image must be (B, 1, D, H, W), got {tuple(image.shape)}")
    if int(radius) != radius or radius < 0 or int(dilation) != dilation or dilation < 1:
        raise ValueError(f"MIND radius must be a whole number >= 0 and dilation >= 1 (voxels), got {radius}, "
                         f"{dilation}")
    radius, dilation = int(radius), int(dilation)
    d, h, w = image.shape[2:]
    padded = F.pad(image, (dilation,) * 6, mode="replicate")

    def shifted(offset: tuple[int, int, int]) -> torch.Tensor:
        z, y, x = (dilation + dilation * o for o in offset)
        return padded[:, :, z:z + d, y:y + h, x:x + w]

    ssd = torch.cat([(shifted(a) - shifted(b)).pow(2) for a, b in _mind_pairs()], dim=1)
    if radius:
        # the box's mean over replicated borders: the box filter of the padded map, cut back to the grid
        ssd = box_filter(F.pad(ssd, (radius,) * 6, mode="replicate"), 2 * radius + 1)
        ssd = ssd[:, :, radius:radius + d, radius:radius + h, radius:radius + w]
    mind = ssd - ssd.min(dim=1, keepdim=True)[0]
    variance = mind.mean(dim=1, keepdim=True)
    level = variance.mean().detach()
    variance = torch.maximum(torch.minimum(variance, level * 1000.0), level * 0.001)
    return torch.exp(-mind / variance)


def mind_loss(fixed: torch.Tensor, warped: torch.Tensor, radius: int = 2, dilation: int = 2,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of the MIND-SSC descriptors (:func:`mind_ssc`) of two ``(B, 1, D, H, W)`` images,
    over the 12 channels and the voxels of ``mask`` (as :func:`mse_loss`); in ``[0, 1]``, ``0`` for identical
    structure (minimised), whatever the intensities' linear scaling.  Differentiable with respect to both."""
    if fixed.shape != warped.shape:
        raise ValueError(f"shapes differ: {tuple(fixed.shape)} vs {tuple(warped.shape)}")
    return mse_loss(mind_ssc(fixed, radius, dilation), mind_ssc(warped, radius, dilation), mask)


def strain_energy(disp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over ``mask`` (``(B, 1, D, H, W)``, all voxels when ``None``) of ``|sym(grad disp)|_F^2``, the squared
    infinitesimal strain of ``disp`` (``(B, 3, D, H, W)``, channels ``(d, h, w)``, in voxel units of its own grid:
    the strain is dimensionless).  Zero for a translation and, to first order, a rotation: the penalty of a region
    kept rigid (``io_rigidity_weight``).  Central differences, one-sided at the borders (``torch.gradient``)."""
    grads = [torch.gradient(disp, dim=axis)[0] for axis in (2, 3, 4)]  # grads[a][:, c] = d disp_c / d index_a
    total = disp.new_zeros((disp.shape[0], 1, *disp.shape[2:]))
    for a in range(3):
        for c in range(3):
            strain = 0.5 * (grads[a][:, c:c + 1] + grads[c][:, a:a + 1])
            total = total + strain.square()
    return _masked_mean(total, mask)


def negative_jacobian_penalty(disp: torch.Tensor, margin: float = 0.01) -> torch.Tensor:
    """Mean of ``relu(margin - det J)``: ``0`` when every voxel keeps ``det J >= margin`` (no folding).

    On a CPU, when no voxel is below the margin (the usual case in instance optimisation) the penalty and its
    gradient are exactly zero: the determinant is then computed once without autograd and the (zero) result is
    returned still attached to ``disp``, instead of building and back-propagating the determinant's graph (a
    noticeable part of every instance-optimisation iteration).
    """
    if disp.requires_grad and torch.is_grad_enabled() and disp.device.type == "cpu":
        with torch.no_grad():
            flat = bool((jacobian_determinant(disp) >= margin).all())  # False for NaN
        if flat:
            return (disp.flatten()[:1] * 0.0).sum()
    return F.relu(margin - jacobian_determinant(disp)).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype).expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def ssim_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = 7,
    data_range: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``1 - SSIM`` (Wang et al. 2004) with a ``window``³ box window; range ``[0, 2]``, ``0`` for identical images.

    Constants ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²`` with ``L = data_range`` (1 for the [0, 1] working intensities).
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"shapes differ: {tuple(fixed.shape)} vs {tuple(warped.shape)}")
    if window % 2 == 0 or window < 1:
        raise ValueError("window must be a positive odd number of voxels")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    stacked = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    means = box_filter(stacked, window)
    mu_f, mu_w, mu_ff, mu_ww, mu_fw = torch.split(means, fixed.shape[1], dim=1)
    var_f = mu_ff - mu_f * mu_f
    var_w = mu_ww - mu_w * mu_w
    cov = mu_fw - mu_f * mu_w
    ssim = ((2 * mu_f * mu_w + c1) * (2 * cov + c2)) / ((mu_f**2 + mu_w**2 + c1) * (var_f + var_w + c2))
    return 1.0 - _masked_mean(ssim, mask)


def one_hot(labels: torch.Tensor, label_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """``(B, 1, D, H, W)`` integer labels -> ``(B, len(label_ids), D, H, W)`` float one-hot of the listed ids
    (ids not listed, and 0, are background: no channel)."""
    if labels.ndim != 5 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, D, H, W), got {tuple(labels.shape)}")
    ids = torch.as_tensor(list(label_ids), device=labels.device, dtype=labels.dtype).view(1, -1, 1, 1, 1)
    return (labels == ids).to(torch.float32)


def dice_loss(
    fixed_labels: torch.Tensor,
    warped_labels: torch.Tensor,
    eps: float = 1e-5,
    ignore_empty: bool = True,
) -> torch.Tensor:
    """``1 - mean soft Dice`` over channels of one-hot/probability maps ``(B, L, D, H, W)``; ``0`` perfect, ``1`` no
    overlap.

    Segmentation guidance (DDMR, VoxelMorph-auxiliary): ``warped_labels`` are the moving one-hot labels warped
    with the predicted field (trilinear, so differentiable).  With ``ignore_empty`` channels absent from both maps
    do not count (a pair where no label is present gives 0).
    """
    if fixed_labels.shape != warped_labels.shape:
        raise ValueError(f"shapes differ: {tuple(fixed_labels.shape)} vs {tuple(warped_labels.shape)}")
    dims = (2, 3, 4)
    intersection = (fixed_labels * warped_labels).sum(dims)
    total = fixed_labels.sum(dims) + warped_labels.sum(dims)
    dice = (2 * intersection + eps) / (total + eps)
    if ignore_empty:
        present = total > 0.5
        if not present.any():
            return warped_labels.sum() * 0.0
        return 1.0 - dice[present].mean()
    return 1.0 - dice.mean()


def _boundary_distance(binary: np.ndarray) -> np.ndarray:
    """Distance (voxels) of every voxel to the boundary of ``binary`` (0 everywhere when empty or full)."""
    if not binary.any() or binary.all():
        return np.zeros(binary.shape, dtype=np.float32)
    inside = ndimage.distance_transform_edt(binary)
    outside = ndimage.distance_transform_edt(~binary)
    return (inside + outside).astype(np.float32)


def hausdorff_dt_loss(
    fixed_labels: torch.Tensor,
    warped_labels: torch.Tensor,
    alpha: float = 2.0,
    normalise: bool = True,
) -> torch.Tensor:
    """Distance-transform Hausdorff loss (Karimi & Salcudean, IEEE TMI 2019), ``(B, L, D, H, W)`` maps in [0, 1].

    ``mean((q - p)² (d_q^alpha + d_p^alpha))`` where ``d_q``, ``d_p`` are the distances (voxels) to the boundaries
    of the target ``q`` (fixed labels) and of the thresholded prediction ``p > 0.5`` (computed without gradient).
    ``0`` when the maps agree; large when mass lies far from the true boundary (a Hausdorff-like penalty).
    With ``normalise`` the result is divided by the mean of ``d_q^alpha`` over voxels with ``q > 0.5``.
    """
    if fixed_labels.shape != warped_labels.shape:
        raise ValueError(f"shapes differ: {tuple(fixed_labels.shape)} vs {tuple(warped_labels.shape)}")
    q_np = (fixed_labels.detach().cpu().numpy() > 0.5)
    p_np = (warped_labels.detach().cpu().numpy() > 0.5)
    d = np.zeros(q_np.shape, dtype=np.float32)
    norm = []
    for b in range(q_np.shape[0]):
        for c in range(q_np.shape[1]):
            dq = _boundary_distance(q_np[b, c]) ** alpha
            d[b, c] = dq + _boundary_distance(p_np[b, c]) ** alpha
            if q_np[b, c].any():
                norm.append(float(dq[q_np[b, c]].mean()))
    weights = torch.as_tensor(d, device=warped_labels.device, dtype=warped_labels.dtype)
    loss = ((fixed_labels - warped_labels) ** 2 * weights).mean()
    if normalise and norm:
        loss = loss / max(float(np.mean(norm)), 1e-6)
    return loss


def inverse_consistency_loss(
    disp_forward: torch.Tensor,
    disp_backward: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse-consistency error (MICS, Estienne et al. 2020): mean squared norm (voxels²) of both round trips
    ``forward ∘ backward`` and ``backward ∘ forward``; ``0`` when the fields are exact inverses."""
    if disp_forward.shape != disp_backward.shape:
        raise ValueError("forward and backward displacements must have the same shape")
    ab = compose(disp_backward, disp_forward)  # p -> p + f(p) + b(p + f(p))
    ba = compose(disp_forward, disp_backward)
    return 0.5 * (_masked_mean(ab.pow(2).sum(1, keepdim=True), mask)
                  + _masked_mean(ba.pow(2).sum(1, keepdim=True), mask))


def supervised_displacement_loss(
    predicted: torch.Tensor,
    true: torch.Tensor,
    mask: torch.Tensor | None = None,
    spacing_mm: float | tuple[float, float, float] = 1.0,
    squared: bool = True,
) -> torch.Tensor:
    """Displacement error against a known field (synthetic pairs): mean squared endpoint error (mm², default) or
    mean endpoint error (mm, ``squared=False``), inside ``mask``; inputs ``(B, 3, D, H, W)`` voxels (d, h, w)."""
    if predicted.shape != true.shape:
        raise ValueError(f"shapes differ: {tuple(predicted.shape)} vs {tuple(true.shape)}")
    s = torch.as_tensor(spacing_mm, dtype=predicted.dtype, device=predicted.device).reshape(-1)
    s = s.expand(3).view(1, 3, 1, 1, 1)
    err2 = ((predicted - true) * s).pow(2).sum(1, keepdim=True)
    values = err2 if squared else torch.sqrt(err2 + 1e-12)
    return _masked_mean(values, mask)


class UncertaintyWeighting(nn.Module):
    """Homoscedastic uncertainty weighting of loss terms (Kendall, Gal & Cipolla, CVPR 2018; used by DDMR).

    ``total = sum_i exp(-s_i) (L_i + offset_i) + s_i`` over the learnable terms, where ``s_i = log sigma_i²`` is a
    learnable parameter initialised to ``-log(initial_weight_i)``; the other terms are added with their fixed
    weight.  ``offset`` shifts a term to be >= 0 (e.g. ``1`` for NCC in [-1, 0]), which the form needs: for a
    term stuck near 0 its weight grows as ``1 / L_i``.  Regularisers are usually fixed (DDMR's initial 5e-3).
    """

    def __init__(self, initial_weights: dict[str, float], learnable: set[str] | None = None,
                 offsets: dict[str, float] | None = None) -> None:
        super().__init__()
        learnable = set(initial_weights) if learnable is None else set(learnable)
        self.names = list(initial_weights)
        self.learnable = [n for n in self.names if n in learnable]
        self.log_variances = nn.ParameterDict(
            {n: nn.Parameter(torch.tensor(-math.log(initial_weights[n]))) for n in self.learnable})
        self.fixed_weights = {n: float(w) for n, w in initial_weights.items() if n not in learnable}
        self.offsets = {n: float(v) for n, v in (offsets or {}).items()}

    def weights(self) -> dict[str, float]:
        """Current weight of each term (``exp(-s_i)`` or the fixed value)."""
        out = {n: float(torch.exp(-self.log_variances[n]).detach()) for n in self.learnable}
        out.update(self.fixed_weights)
        return {n: out[n] for n in self.names}

    def forward(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        unknown = set(terms) - set(self.names)
        if unknown:
            raise ValueError(f"terms {sorted(unknown)} have no weight; known: {self.names}")
        total = None
        for name, value in terms.items():
            value = value + self.offsets.get(name, 0.0)
            if name in self.log_variances:
                s = self.log_variances[name]
                term = torch.exp(-s) * value + s
            else:
                term = self.fixed_weights[name] * value
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no loss terms given")
        return total
