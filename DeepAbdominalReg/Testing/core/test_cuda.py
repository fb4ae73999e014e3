"""The same code paths on a CUDA GPU: network, pipeline, augmentation and training (skipped without a GPU).

CI has no GPU; these run where one is lent (``benchmarks/gpu_speed.py`` records the timings).  Each test compares
the GPU's answer with the CPU's on the same input, so a device bug (a tensor left on the CPU, a dtype change,
mixed precision where fp32 is needed) shows up as a failure, not a slow run.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from deepabdominalreg.config import config_from_preset
from deepabdominalreg.nn.models import load_model
from deepabdominalreg.registration.pipeline import register_pair
from deepabdominalreg.training.config import TrainingConfig
from deepabdominalreg.training.data import PairSampler, prepare_phantom_pool
from deepabdominalreg.training.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(scope="module")
def phantom_pair():
    from deepabdominalreg.synthetic.pairs import make_phantom_pair

    return make_phantom_pair(0, 4.0, 10.0)


def test_shipped_model_forward_matches_the_cpu():
    torch.manual_seed(0)
    fixed = torch.rand(1, 1, 40, 48, 56)
    moving = torch.roll(fixed, shifts=(1, -2, 1), dims=(2, 3, 4))
    cpu_net, _ = load_model("abdomen-ct-4mm-v3", "cpu")
    gpu_net, _ = load_model("abdomen-ct-4mm-v3", "cuda")
    with torch.inference_mode():
        on_cpu = cpu_net.predict(fixed, moving)
        on_gpu = gpu_net.predict(fixed.cuda(), moving.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    np.testing.assert_allclose(on_gpu.cpu().numpy(), on_cpu.numpy(), atol=2e-3)


@pytest.mark.parametrize("preset", ["network", "fast"])
def test_pipeline_on_cuda_matches_the_cpu(phantom_pair, preset):
    config = config_from_preset(preset, seed=0, compute_inverse=False)
    kwargs = {"moving_labels": phantom_pair.moving_labels, "fixed_labels": phantom_pair.fixed_labels,
              "label_names": phantom_pair.label_names}
    on_gpu = register_pair(phantom_pair.fixed_image, phantom_pair.moving_image, config=config.replace(device="cuda"),
                           **kwargs)
    on_cpu = register_pair(phantom_pair.fixed_image, phantom_pair.moving_image, config=config.replace(device="cpu"),
                           **kwargs)
    assert on_gpu.metrics["device"] == "cuda"
    gpu_dice, cpu_dice = on_gpu.metrics["dice_mean_after"], on_cpu.metrics["dice_mean_after"]
    assert gpu_dice > on_gpu.metrics["dice_mean_affine"] + 0.02  # the deformable stage did its work on the GPU
    assert abs(gpu_dice - cpu_dice) < 0.01
    difference = np.linalg.norm(sitk.GetArrayFromImage(on_gpu.displacement_lps)
                                - sitk.GetArrayFromImage(on_cpu.displacement_lps), axis=-1)
    body = sitk.GetArrayFromImage(on_cpu.body_mask) > 0
    assert float(np.median(difference[body])) < 0.25  # mm; IO on two devices drifts a little, not more
    assert on_gpu.metrics["folding_percent"] < 0.5


def test_bf16_network_forward_stays_close_to_fp32(phantom_pair):
    config = config_from_preset("network", seed=0, compute_inverse=False, device="cuda")
    fp32 = register_pair(phantom_pair.fixed_image, phantom_pair.moving_image, config=config)
    bf16 = register_pair(phantom_pair.fixed_image, phantom_pair.moving_image,
                         config=config.replace(network_precision="bf16"))
    difference = np.linalg.norm(sitk.GetArrayFromImage(fp32.displacement_lps)
                                - sitk.GetArrayFromImage(bf16.displacement_lps), axis=-1)
    body = sitk.GetArrayFromImage(fp32.body_mask) > 0
    assert float(np.percentile(difference[body], 95)) < 0.5  # mm, at a 4 mm network grid


def test_augmentation_on_the_gpu_draws_the_same_pairs(tmp_path):
    config = TrainingConfig.from_dict({
        "cache_dir": str(tmp_path / "cache"), "spacing_mm": 12.0, "crop_size": [16, 24, 24],
        "phantom_seeds": [1000], "phantom_motion_fields": 1,
        "augmentation": {"tps_probability": 1.0, "van_eijnatten_probability": 1.0, "rigid_probability": 1.0},
    })
    pool = prepare_phantom_pool(config, log=lambda _m: None)
    label_ids = sorted(int(i) for i in np.unique(pool[0].labels) if i)
    on_cpu = PairSampler(config, pool, [], label_ids, torch.Generator().manual_seed(5))()
    on_gpu = PairSampler(config, pool, [], label_ids, torch.Generator().manual_seed(5), "cuda")()
    for key in ("fixed", "moving", "disp", "fixed_mask"):
        assert on_gpu[key].device.type == "cuda", key
        np.testing.assert_allclose(on_gpu[key].float().cpu().numpy(), on_cpu[key].float().numpy(), atol=1e-3,
                                   err_msg=key)


def test_training_steps_on_cuda(tmp_path):
    config = TrainingConfig.from_dict({
        "name": "cuda-test", "out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
        "spacing_mm": 12.0, "crop_size": [16, 24, 24], "phantom_seeds": [1000, 1001], "phantom_motion_fields": 1,
        "validation_seeds": [900], "epochs": 2, "iterations_per_epoch": 4, "accumulation_steps": 1,
        "architecture": "CostVolumePyramidNet",
        "network": {"feature_channels": [8, 8], "search_radius": [1, 1], "refine_channels": 8},
        "device": "cuda", "progress": False, "data_workers": 2,
    })
    summary = train(config, log=lambda _m: None)
    assert summary["epochs"] == 2
    assert all(np.isfinite(row["train_total"]) for row in summary["history"])
    network, _ = load_model(summary["model"], "cpu")  # saved on the CPU, loadable anywhere
    assert next(network.parameters()).device.type == "cpu"


def test_jacobian_on_the_gpu_matches_the_cpu(oblique_image):
    from deepabdominalreg.metrics.fields import jacobian_determinant

    shape = sitk.GetArrayViewFromImage(oblique_image).shape
    grid = np.meshgrid(*[np.linspace(0.0, np.pi, n) for n in shape], indexing="ij")
    field = np.stack([2.0 * np.sin(grid[2]) * np.cos(grid[1]), 1.5 * np.sin(grid[0]), np.cos(grid[2] + grid[0])], -1)
    image = sitk.GetImageFromArray(field.astype(np.float32), isVector=True)
    image.CopyInformation(oblique_image)
    on_gpu = sitk.GetArrayFromImage(jacobian_determinant(image, chunk_slices=5, device="cuda"))
    on_cpu = sitk.GetArrayFromImage(jacobian_determinant(image, device="cpu"))
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-5)
