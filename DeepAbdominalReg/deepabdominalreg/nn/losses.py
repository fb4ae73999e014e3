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

from deepabdominalreg.spatial import compose, jacobian_determinant

__all__ = [
    "UncertaintyWeighting",
    "bending_energy",
    "dice_loss",
    "diffusion_regulariser",
    "global_ncc_loss",
    "hausdorff_dt_loss",
    "inverse_consistency_loss",
    "local_ncc_against_fixed",
    "local_ncc_loss",
    "local_statistics",
    "mse_loss",
    "negative_jacobian_penalty",
    "one_hot",
    "ssim_loss",
    "supervised_displacement_loss",
]


_BOX_SLAB_ELEMENTS = 500_000
"""Elements (all channels) per slab along D of :func:`_box_sum` on a CPU: a slab stays in the caches through the
three passes (one thread, 3 x 112 x 101 x 122, window 5: 20 -> 11 ms against whole-volume passes)."""


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """The window's mean with zero padding over the last three axes (no autograd: in-place sums of shifted slices).

    Per axis, a copy of the input gets each shifted neighbour added where it exists (no padded copy: the zero
    padding would add nothing).  On a CPU, volumes larger than a few slabs are filtered slab by slab along D, with the
    same operations in the same order per voxel (bit-identical).  The input is not modified."""
    pad = window // 2
    b, c, d, h, w = x.shape
    slab = max(1, _BOX_SLAB_ELEMENTS // max(b * c * h * w, 1))
    if x.device.type != "cpu" or d <= 2 * slab:
        return _window_sums(x, 0, d, pad).mul_(1.0 / window**3)
    out = torch.empty_like(x)
    for z0 in range(0, d, slab):
        z1 = min(d, z0 + slab)
        out[:, :, z0:z1] = _window_sums(x, z0, z1, pad)
    return out.mul_(1.0 / window**3)


def _window_sums(x: torch.Tensor, z0: int, z1: int, pad: int) -> torch.Tensor:
    """Sums over the ``(2 pad + 1)^3`` window, neighbours outside the grid left out, of ``x``'s slices ``z0:z1``
    (``(B, C, z1 - z0, H, W)``; D neighbours read from ``x``).  Per axis D, H, W: ``x[i]``, then ``+ x[i - o]`` and
    ``+ x[i + o]`` for ``o = 1 ... pad``, in that order (the slab-wise and whole-volume filters agree bit for bit).
    Differentiable (out-of-place copies, in-place sums)."""
    d = x.shape[2]
    total = x[:, :, z0:z1].clone()
    for offset in range(1, min(pad, d - 1) + 1):
        lo = max(z0, offset)  # + x[z - offset] where z - offset >= 0
        if lo < z1:
            total[:, :, lo - z0:].add_(x[:, :, lo - offset: z1 - offset])
        hi = min(z1, d - offset)  # + x[z + offset] where z + offset < d
        if hi > z0:
            total[:, :, : hi - z0].add_(x[:, :, z0 + offset: hi + offset])
    for dim in (3, 4):
        n = total.shape[dim]
        source = total
        total = source.clone()
        for offset in range(1, min(pad, n - 1) + 1):
            total.narrow(dim, offset, n - offset).add_(source.narrow(dim, 0, n - offset))
            total.narrow(dim, 0, n - offset).add_(source.narrow(dim, offset, n - offset))
    return total


class _BoxFilter(torch.autograd.Function):
    """Zero-padded box filter; being a symmetric linear operator, its backward pass is the same filter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: int) -> torch.Tensor:
        ctx.window = window
        with torch.no_grad():
            return _box_sum(x, window)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _box_sum(grad.contiguous(), ctx.window), None


def _box_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    """Separable mean filter with zero padding over the last three axes of ``(B, C, D, H, W)`` (every output is the
    window's sum divided by ``window``³, also at the borders: ``avg_pool3d`` with ``count_include_pad=True``).

    Per axis: zero-pad, then add the window's shifted slices; the backward pass is the same filter (the operator is
    symmetric).  On a CPU several times faster, forward and backward, than the equivalent grouped ``conv3d``, which
    the affine and instance-optimisation NCC called on every iteration (``benchmarks/README.md``, "Performance").
    """
    if window == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _BoxFilter.apply(x, window)
    return _box_sum(x, window)


def local_ncc_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = 9,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Negative local normalised cross-correlation (squared, VoxelMorph form) in a ``window``³ neighbourhood.

    Range ``[-1, 0]``: ``-1`` is a perfect (locally linear) match.  ``mask`` ``(B, 1, D, H, W)`` restricts the mean.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"shapes differ: {tuple(fixed.shape)} vs {tuple(warped.shape)}")
    if window % 2 == 0 or window < 1:
        raise ValueError("window must be a positive odd number of voxels")
    stacked = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    means = _box_filter(stacked, window)
    mu_f, mu_w, mu_ff, mu_ww, mu_fw = torch.split(means, fixed.shape[1], dim=1)
    cov = mu_fw - mu_f * mu_w
    var_f = (mu_ff - mu_f * mu_f).clamp_min(0)
    var_w = (mu_ww - mu_w * mu_w).clamp_min(0)
    cc = cov * cov / (var_f * var_w + eps)
    if mask is None:
        return -cc.mean()
    weight = mask.to(cc.dtype).expand_as(cc)
    return -(cc * weight).sum() / weight.sum().clamp_min(1.0)


class _LocalNccAgainstFixed(torch.autograd.Function):
    """``-sum(weight * cc)``, the weighted local NCC of a warped image ``w`` against a fixed image whose local mean
    ``mu_f`` and variance ``var_f`` are precomputed, with an analytic backward pass.

    ``cc = cov^2 / (var_f var_w + eps)`` from the window means of ``w``, ``w^2`` and ``f w``.  The gradient with
    respect to those means is elementwise, and the box filter is its own adjoint, so ``dL/dw`` is one 3-channel box
    filter and a few products: the same values as autograd through :func:`local_ncc_loss`'s operations (float
    rounding aside), with a fraction of its temporaries.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, f: torch.Tensor, mu_f: torch.Tensor, var_f: torch.Tensor,
                weight: torch.Tensor, window: int, eps: float) -> torch.Tensor:
        means = _box_sum(torch.cat([w, w * w, f * w], dim=1), window)
        mu_w, mu_ww, cov = means[:, :1], means[:, 1:2], means[:, 2:]
        cov.addcmul_(mu_f, mu_w, value=-1.0)  # cov = mu_fw - mu_f mu_w
        var_w = mu_ww.addcmul_(mu_w, mu_w, value=-1.0)  # mu_ww - mu_w^2
        positive = var_w >= 0  # clamp_min(0) passes the gradient here
        ratio = cov / var_w.clamp_min_(0).mul_(var_f).add_(eps)  # cov / (var_f var_w + eps)
        loss = -(cov.mul_(ratio).mul_(weight)).sum()
        ctx.save_for_backward(w, f, mu_f, var_f, weight, mu_w, ratio, positive)
        ctx.window = window
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, f, mu_f, var_f, weight, mu_w, ratio, positive = ctx.saved_tensors
        # d cc / d mu_fw = 2 r, d cc / d mu_ww = -r^2 var_f [var_w >= 0], d cc / d mu_w = -2 r mu_f + 2 r^2 var_f mu_w
        # with r = cov / (var_f var_w + eps); the loss is -sum(weight cc)
        t = weight * (-grad)
        g_fw = t.mul(ratio).mul_(2.0)
        g_ww = ratio.square().mul_(var_f).mul_(positive).mul_(t).neg_()
        g_w = g_fw * mu_f
        g_w.addcmul_(g_ww, mu_w, value=2.0).neg_()
        back = _box_sum(torch.cat([g_w, g_ww, g_fw], dim=1), ctx.window)
        grad_w = back[:, :1] + back[:, 1:2] * w * 2.0 + back[:, 2:] * f
        return grad_w, None, None, None, None, None, None


def local_statistics(image: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and variance (``window``³, zero padding, as in :func:`local_ncc_loss`) of a ``(1, 1, D, H, W)``
    image: what :func:`local_ncc_against_fixed` needs of the fixed image, computed once per pyramid level."""
    with torch.no_grad():
        means = _box_filter(torch.cat([image, image * image], dim=1), window)
        mean = means[:, :1].contiguous()
        return mean, (means[:, 1:] - mean * mean).clamp_min(0)


def local_ncc_against_fixed(
    warped: torch.Tensor,
    fixed: torch.Tensor,
    fixed_mean: torch.Tensor,
    fixed_variance: torch.Tensor,
    weight: torch.Tensor,
    window: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``-sum(weight * cc)``: :func:`local_ncc_loss` of ``warped`` against ``fixed`` with the fixed image's
    :func:`local_statistics` given and per-voxel ``weight`` (e.g. a mask divided by its count).

    Same values and gradient (to float rounding; tested) with an analytic backward pass: instance optimisation calls
    it every iteration.  Gradient only with respect to ``warped``.
    """
    return _LocalNccAgainstFixed.apply(warped, fixed, fixed_mean, fixed_variance, weight, window, eps)


def global_ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative global Pearson correlation in ``[-1, 1]`` (``-1`` perfect), optionally inside ``mask``."""
    weight = torch.ones_like(fixed) if mask is None else mask.to(fixed.dtype).expand_as(fixed)
    n = weight.sum().clamp_min(1.0)
    mf = (fixed * weight).sum() / n
    mw = (warped * weight).sum() / n
    df, dw = (fixed - mf) * weight, (warped - mw) * weight
    return -(df * dw).sum() / torch.sqrt((df * df).sum() * (dw * dw).sum() + 1e-8)


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


def negative_jacobian_penalty(disp: torch.Tensor, margin: float = 0.01) -> torch.Tensor:
    """Mean of ``relu(margin - det J)``: ``0`` when every voxel keeps ``det J >= margin`` (no folding).

    On a CPU, when no voxel is below the margin (the usual case in instance optimisation) the penalty and its
    gradient are exactly zero: the determinant is then computed once without autograd and the (zero) result is
    returned still attached to ``disp``, instead of building and back-propagating the determinant's graph (~10 % of
    a full-resolution instance-optimisation iteration).
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
    means = _box_filter(stacked, window)
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
    """``1 - mean soft Dice`` over channels of one-hot/probability maps ``(B, L, D, H, W)``; ``0`` perfect, ``1`` no overlap.

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
