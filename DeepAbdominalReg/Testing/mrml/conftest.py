"""Headless MRML tests on PyPI's slicer-core (real MRML, no Slicer application, no Qt)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer_core")  # PyPI also has an unrelated package called "slicer"

MODULE_DIR = Path(__file__).resolve().parents[2]  # DeepAbdominalReg/ (module file, DeepAbdominalRegLib, core)
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer


@pytest.fixture
def scene():
    """A fresh scene, also set as ``slicer.mrmlScene`` for the ``slicer.util`` helpers that use it."""
    previous = getattr(slicer, "mrmlScene", None)
    mrmlScene = slicer.vtkMRMLScene()
    slicer.mrmlScene = mrmlScene
    yield mrmlScene
    mrmlScene.Clear(1)
    slicer.mrmlScene = previous


def nodeCount(scene) -> int:
    return scene.GetNumberOfNodes()
