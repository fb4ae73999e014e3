"""DeepAbdominalReg.py imports (with the Slicer application classes stubbed) and its Logic drives real MRML."""

import importlib

import numpy as np
import pytest
from DeepAbdominalRegLib import task
from slicer_app_stubs import slicerApplicationStubs


@pytest.fixture
def module(scene):
    with slicerApplicationStubs():
        yield importlib.import_module("DeepAbdominalReg")


def test_module_metadata(module):
    parent = type("Parent", (), {})()
    module.DeepAbdominalReg(parent)
    assert parent.categories == ["Registration"]
    for citation in ("DDMR", "Hernandez", "van Eijnatten", "MICS", "DLIR", "de Vos", "VoxelMorph", "Balakrishnan"):
        assert citation in parent.acknowledgementText
    assert "register(" in parent.helpText


def test_parameter_node_defaults_and_config(module, scene):
    logic = module.DeepAbdominalRegLogic()
    p = logic.getParameterNode()
    config = module.configFromParameters(p)
    assert config == module.RegistrationConfig()
    assert p.preset == "balanced" and p.fixedVolume is None


def test_logic_config_from_preset_and_overrides(module):
    logic = module.DeepAbdominalRegLogic
    config = logic._config(None, "fast", {"working_spacing_mm": 5.0})
    assert config.io_levels == (4, 2) and config.working_spacing_mm == 5.0
    assert logic._config(config, None, {"seed": 4}).seed == 4


def test_store_outputs_and_summary(module, scene):
    logic = module.DeepAbdominalRegLogic()
    p = logic.getParameterNode()
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    logic.storeOutputsInParameterNode(p, task.OutputNodes(metricsTable=table))
    assert p.metricsTable is table and p.warpedVolume is None
    text = logic.summary({"runtime_s": 3.25, "device": "cpu", "dice_mean_before": 0.5, "dice_mean_after": 0.8,
                          "folding_percent": 0.0})
    assert "3.2 s on cpu" in text and "0.500 -> 0.800" in text


def test_register_using_parameter_node_runs_in_background(module, scene):
    from DeepAbdominalRegLib.testing import addVolumeNode
    from test_end_to_end import _blob

    logic = module.DeepAbdominalRegLogic()
    p = logic.getParameterNode()
    p.fixedVolume = addVolumeNode(scene, _blob(), "fixed")
    p.movingVolume = addVolumeNode(scene, _blob((5.0, 5.0, 0.0)), "moving")
    for name, value in module.presetParameters("fast").items():
        setattr(p, name, value)
    p.workingSpacingMm, p.device, p.computeInverse = 5.0, "cpu", False
    outputs = logic.registerUsingParameterNode(p, waitForCompletion=True, show=False)
    assert outputs.inverseTransform is None and outputs.outputTransform is not None
    assert np.isfinite(outputs.metrics["runtime_s"])
