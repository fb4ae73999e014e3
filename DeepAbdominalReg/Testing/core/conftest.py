"""Shared fixtures for the core tests (CPU, small images)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from geometry_helpers import oblique_direction, shared_data_dir

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not available (a user's clone); real-CT tests skipped")
    return path


@pytest.fixture
def oblique_image() -> sitk.Image:
    """A smooth blob image, 24x20x16 voxels, anisotropic spacing, oblique and flipped direction."""
    z, y, x = np.mgrid[0:16, 0:20, 0:24].astype(np.float32)
    array = np.exp(-(((x - 11) / 6) ** 2 + ((y - 9) / 5) ** 2 + ((z - 7) / 4) ** 2)) * 1000 - 500
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((1.5, 0.9, 2.5))
    image.SetOrigin((-12.0, 30.0, 7.5))
    image.SetDirection(oblique_direction())
    return image
