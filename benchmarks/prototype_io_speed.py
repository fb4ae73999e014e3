"""Prototype: where one instance-optimisation iteration spends its time on CPU, and two cheaper equivalents.

Times one iteration (forward + backward + Adam step) of the loss used by
``deepabdominalreg.instance_optimisation`` at a given working-grid size, three ways:

* ``current``: the library's code (separable ``conv3d`` box filter in local NCC, ``grid_sample`` with autograd);
* ``avgpool``: the same loss with the box filter done by ``avg_pool3d`` (identical values up to float rounding);
* ``avgpool+analytic-warp``: additionally, the warp's backward uses the moving image's precomputed spatial
  gradient, sampled with a forward ``grid_sample`` (``dL/du = dL/dwarped * grad(moving)(x + u)``), instead of
  autograd through ``grid_sample`` (whose CPU backward is a scatter-add and dominates the iteration).

It also checks that the variants give the same loss and (nearly) the same gradient as ``current``.

    python benchmarks/prototype_io_speed.py --shape 112 101 122 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from deepabdominalreg import spatial
from deepabdominalreg.losses import diffusion_regulariser, local_ncc_loss, negative_jacobian_penalty


def box_avgpool(x: torch.Tensor, window: int) -> torch.Tensor:
    return F.avg_pool3d(x, window, stride=1, padding=window // 2, count_include_pad=True)


def ncc_avgpool(fixed, warped, window=5, mask=None, eps=1e-5):
    stacked = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    mu_f, mu_w, mu_ff, mu_ww, mu_fw = torch.split(box_avgpool(stacked, window), 1, dim=1)
    cov = mu_fw - mu_f * mu_w
    var_f = (mu_ff - mu_f * mu_f).clamp_min(0)
    var_w = (mu_ww - mu_w * mu_w).clamp_min(0)
    cc = cov * cov / (var_f * var_w + eps)
    if mask is None:
        return -cc.mean()
    weight = mask.to(cc.dtype)
    return -(cc * weight).sum() / weight.sum().clamp_min(1.0)


class AnalyticWarp(torch.autograd.Function):
    """``warped = moving(x + u)``; backward ``dL/du = dL/dwarped * grad(moving)(x + u)`` (per channel d, h, w)."""

    @staticmethod
    def forward(ctx, disp, moving, moving_gradient):
        grid = spatial._normalised_sampling_grid(disp)
        warped = F.grid_sample(moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        ctx.save_for_backward(grid, moving_gradient)
        return warped

    @staticmethod
    def backward(ctx, grad_output):
        grid, moving_gradient = ctx.saved_tensors
        sampled = F.grid_sample(moving_gradient, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return grad_output * sampled, None, None


def image_gradient_vox(image: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient ``(1, 3, D, H, W)`` (channels d, h, w) in intensity per voxel."""
    return torch.stack(torch.gradient(image[0, 0], dim=(0, 1, 2)), dim=0).unsqueeze(0)


def one_iteration(variant, fixed, moving, moving_gradient, control, residual, lshape, mask, optimiser):
    optimiser.zero_grad(set_to_none=True)
    disp = F.interpolate(control, size=lshape, mode="trilinear", align_corners=True) + residual
    if variant == "current":
        warped = spatial.warp(moving, disp)
        loss = local_ncc_loss(fixed, warped, window=5, mask=mask)
    elif variant == "avgpool":
        warped = spatial.warp(moving, disp)
        loss = ncc_avgpool(fixed, warped, 5, mask)
    else:
        warped = AnalyticWarp.apply(disp, moving, moving_gradient)
        loss = ncc_avgpool(fixed, warped, 5, mask)
    control_vox = control / 2
    loss = loss + diffusion_regulariser(control_vox) + 0.1 * negative_jacobian_penalty(control_vox)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(112, 101, 122), help="working grid D H W (voxels)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = tuple(args.shape)
    base = F.avg_pool3d(torch.rand(1, 1, *shape), 7, stride=1, padding=3)
    fixed = base
    moving = torch.roll(base, shifts=(2, -1, 1), dims=(2, 3, 4))
    mask = torch.ones_like(fixed, dtype=torch.bool)
    moving_gradient = image_gradient_vox(moving)
    cshape = tuple(max(2, round((s - 1) / 2) + 1) for s in shape)

    # correctness: same loss and gradient at a random control field
    control0 = torch.randn(1, 3, *cshape) * 0.5
    residual = torch.zeros(1, 3, *shape)
    grads = {}
    for variant in ("current", "avgpool", "avgpool+analytic-warp"):
        control = control0.clone().requires_grad_(True)
        disp = F.interpolate(control, size=shape, mode="trilinear", align_corners=True)
        if variant == "current":
            loss = local_ncc_loss(fixed, spatial.warp(moving, disp), 5, mask)
        elif variant == "avgpool":
            loss = ncc_avgpool(fixed, spatial.warp(moving, disp), 5, mask)
        else:
            loss = ncc_avgpool(fixed, AnalyticWarp.apply(disp, moving, moving_gradient), 5, mask)
        loss.backward()
        grads[variant] = (float(loss), control.grad.clone())
    ref_loss, ref_grad = grads["current"]
    for variant, (loss, grad) in grads.items():
        cosine = float(F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0))
        print(f"{variant:24s} loss {loss:.6f} (current {ref_loss:.6f}), gradient cosine vs current {cosine:.4f}")

    print(f"\nworking grid {shape} = {fixed.numel() / 1e6:.2f} M voxels, {args.threads} threads")
    for variant in ("current", "avgpool", "avgpool+analytic-warp"):
        control = control0.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([control], lr=0.5)
        one_iteration(variant, fixed, moving, moving_gradient, control, residual, shape, mask, optimiser)  # warm
        t = time.perf_counter()
        for _ in range(args.repeats):
            one_iteration(variant, fixed, moving, moving_gradient, control, residual, shape, mask, optimiser)
        per = (time.perf_counter() - t) / args.repeats
        print(f"{variant:24s} {per * 1000:8.1f} ms / iteration")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        control = control0.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([control], lr=0.5)
        for _ in range(2):
            one_iteration("current", fixed, moving, moving_gradient, control, residual, shape, mask, optimiser)
    print("\ncurrent: top operators (2 iterations)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
