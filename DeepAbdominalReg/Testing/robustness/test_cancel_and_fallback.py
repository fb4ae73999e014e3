"""Ctrl-C in the CLI stops promptly and leaves nothing behind; CUDA out-of-memory falls back to the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from deepabdominalreg.config import config_from_preset
from deepabdominalreg.io import write_image
from deepabdominalreg.registration import pipeline
from deepabdominalreg.registration.pipeline import register_pair

REPO_CORE = Path(__file__).resolve().parents[2]


def _ct(tmp_path: Path, seed: int, scale: int = 1) -> Path:
    """A CT-like ellipsoid with an inclusion: 40x48x56 voxels of 3 mm (``scale`` times more voxels per axis)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:40 * scale, 0:48 * scale, 0:56 * scale].astype(np.float32) / scale
    body = ((z - 20) / 18) ** 2 + ((y - 24) / 19) ** 2 + ((x - 28) / 24) ** 2 < 1
    array = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, body.shape)
    array[(((z - 20) / 6) ** 2 + ((y - 20) / 6) ** 2 + ((x - 30 - seed) / 8) ** 2) < 1] = 300
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((3.0 / scale,) * 3)
    return write_image(sitk.Cast(image, sitk.sitkInt16), tmp_path / f"ct{seed}.nii.gz")


def test_ctrl_c_stops_the_cli_and_writes_nothing(tmp_path):
    # 1.5 mm voxels on a 1.5 mm working grid: a run of tens of seconds, interrupted early in it
    fixed, moving = _ct(tmp_path, 0, scale=2), _ct(tmp_path, 3, scale=2)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_CORE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp_path / "progress.jsonl"
    with open(log, "w") as stdout:  # a file, not a pipe: the child never blocks on a full pipe
        process = subprocess.Popen(
            [sys.executable, "-m", "deepabdominalreg", "register", "--fixed", str(fixed), "--moving", str(moving),
             "--output-dir", str(out), "--working-spacing", "1.5", "--progress-json"],
            stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
            # a shell without job control starts background jobs with SIGINT ignored, and Python then installs
            # no KeyboardInterrupt handler: give the child the default disposition a terminal's Ctrl-C meets
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 (test, no threads yet)
        )
        # wait until the affine optimisation is running, then interrupt
        deadline = time.monotonic() + 300
        while '"affine"' not in log.read_text(encoding="utf-8") and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.2)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    # within one iteration when the machine is free; generous for a loaded CI machine
    assert time.monotonic() - started < 30.0
    assert process.returncode == 130, err
    assert "cancelled" in err
    assert not out.exists() or not any(out.iterdir())


def test_cuda_out_of_memory_reruns_on_cpu(monkeypatch):
    calls = []
    real, validate = pipeline._run_stages, pipeline._validated_inputs

    def fake(inputs, config, stages):
        calls.append(config.device)
        if config.device != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(inputs, config, stages)

    def counted(*args, **kwargs):
        calls.append("validation")
        return validate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_run_stages", fake)
    monkeypatch.setattr(pipeline, "_validated_inputs", counted)
    monkeypatch.setattr(pipeline, "resolve_device",
                        lambda requested: torch.device("cuda" if requested == "cuda" else "cpu"))
    image = sitk.ReadImage(str(_ct(Path(os.environ.get("TMPDIR", "/tmp")), 1)), sitk.sitkFloat32)
    config = config_from_preset("fast", working_spacing_mm=6.0, device="cuda", io_iterations=3, compute_inverse=False)
    result = register_pair(image, image, config=config)
    assert calls == ["validation", "cuda", "cpu"]  # the inputs are validated once, before both runs
    assert any("out of memory" in w for w in result.metrics["warnings"])
    assert result.config.device == "cpu" and result.metrics["config"]["device"] == "cpu"
