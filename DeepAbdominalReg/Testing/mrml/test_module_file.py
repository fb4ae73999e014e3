"""DeepAbdominalReg.py imports (with the Slicer application classes stubbed) and its Logic drives real MRML."""

import ast
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from deepabdominalreg.config import RegistrationConfig
from DeepAbdominalRegLib import process, task
from DeepAbdominalRegLib.testing import addVolumeNode
from slicer_app_stubs import slicerApplicationStubs
from test_end_to_end import _blob
from test_process import NON_CONFIG_OPTIONS, unusualConfig

MODULE_FILE = Path(__file__).resolve().parents[2] / "DeepAbdominalReg.py"


@pytest.fixture
def module(scene):
    with slicerApplicationStubs():
        yield importlib.import_module("DeepAbdominalReg")


def test_module_metadata(module):
    parent = type("Parent", (), {})()
    module.DeepAbdominalReg(parent)
    assert parent.categories == ["Registration"]
    for citation in ("DDMR, Pérez de Frutos et al. 2023", "PLOS ONE", "van Eijnatten", "MICS, Estienne et al.", "DLIR",
                     "de Vos", "VoxelMorph", "Balakrishnan"):
        assert citation in parent.acknowledgementText
    for wrong in ("Hernandez", "Zhang"):
        assert wrong not in parent.acknowledgementText
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
    assert "SUSPECT" not in text  # metrics.json without "status" (older core) reads as a normal result
    suspect = logic.summary({"runtime_s": 1.0, "device": "cpu", "status": "suspect",
                             "suspect_reasons": ["NCC got worse", "folding 4 %"]})
    assert suspect.startswith("SUSPECT RESULT") and "NCC got worse; folding 4 %" in suspect
    assert "SUSPECT" not in logic.summary({"runtime_s": 1.0, "status": "ok", "suspect_reasons": []})


def test_presets_apply_when_picked_and_edits_read_custom(module, scene):
    """The sequence the panel runs when a preset is picked: Qt emits currentIndexChanged, then activated (the combo
    is unbound, so only activated acts); onPresetActivated applies the values; updateGuiFromParameterNode shows
    presetMatching. Each preset must stick, and an edited setting must read "custom"."""
    p = module.DeepAbdominalRegLogic().getParameterNode()
    for preset in ("fast", "network", "accurate", "balanced", "fast"):
        assert module.applyPreset(p, preset) == preset
        assert module.presetMatching(p) == preset
        assert module.configFromParameters(p) == module.config_from_preset(preset)
    p.workingSpacingMm = p.workingSpacingMm + 0.5
    assert module.presetMatching(p) == "custom"
    before = module.configFromParameters(p)
    assert module.applyPreset(p, "custom") == "custom" and module.configFromParameters(p) == before


def test_preset_combo_is_driven_by_the_widget_not_the_connector():
    """Static: the connector must not own presetComboBox (it would write the old preset back before activated)."""
    import xml.etree.ElementTree as ET

    ui = ET.parse(MODULE_FILE.parent / "Resources" / "UI" / "DeepAbdominalReg.ui")
    combo = next(w for w in ui.iter("widget") if w.get("name") == "presetComboBox")
    assert all(prop.get("name") != "SlicerParameterName" for prop in combo.findall("property"))
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'presetComboBox.connect("activated(int)", self.onPresetActivated)' in source
    assert "presetComboBox.addItems(list(PRESET_NAMES))" in source
    assert "connectParametersToGui(" in source and ".connectGui(" not in source


def test_register_using_parameter_node_runs_in_background(module, scene):
    logic = module.DeepAbdominalRegLogic()
    p = logic.getParameterNode()
    p.fixedVolume = addVolumeNode(scene, _blob(), "fixed")
    p.movingVolume = addVolumeNode(scene, _blob((5.0, 5.0, 0.0)), "moving")
    module.applyPreset(p, "fast")
    p.workingSpacingMm, p.device, p.computeInverse = 5.0, "cpu", False
    outputs = logic.registerUsingParameterNode(p, waitForCompletion=True, show=False)
    assert outputs.inverseTransform is None and outputs.outputTransform is not None
    assert np.isfinite(outputs.metrics["runtime_s"])


def test_the_subprocess_gets_the_config_the_panel_built(module, scene, fakeInterpreter, monkeypatch):
    """Panel (parameter node) -> config -> config.json -> the subprocess's own CLI parser: the same config."""
    script, capture = fakeInterpreter
    monkeypatch.setattr(process, "pythonExecutable", lambda: str(script))
    logic = module.DeepAbdominalRegLogic()
    p = logic.getParameterNode()
    p.fixedVolume = addVolumeNode(scene, _blob(), "fixed")
    p.movingVolume = addVolumeNode(scene, _blob((5.0, 5.0, 0.0)), "moving")
    for name, value in module.parametersFromConfig(unusualConfig()).items():
        setattr(p, name, value)
    panelConfig = module.configFromParameters(p)
    assert panelConfig == unusualConfig()
    count = scene.GetNumberOfNodes()
    with pytest.raises(process.RegistrationFailed, match="recorded the command line"):
        logic.registerUsingParameterNode(p, waitForCompletion=True, show=False)
    assert scene.GetNumberOfNodes() == count
    record = json.loads(capture.read_text(encoding="utf-8"))
    assert record["configFile"] == panelConfig.to_dict()
    assert RegistrationConfig.from_dict(record["parsed"]) == panelConfig
    assert {a for a in record["argv"] if a.startswith("--")} <= NON_CONFIG_OPTIONS


def _widgetMethod(name: str) -> ast.FunctionDef:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DeepAbdominalRegWidget")
    return next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_on_reload_reloads_the_packages_then_the_module_statically():
    """In the source: inside tryWithErrorDisplay, reloadPackages() and then ScriptedLoadableModuleWidget.onReload."""
    method = _widgetMethod("onReload")
    blocks = [n for n in method.body if isinstance(n, ast.With)]
    assert len(blocks) == 1 and ast.unparse(blocks[0].items[0].context_expr).startswith(
        "slicer.util.tryWithErrorDisplay(")
    calls = [ast.unparse(statement.value) for statement in blocks[0].body if isinstance(statement, ast.Expr)]
    assert calls == ["reloadPackages()", "ScriptedLoadableModuleWidget.onReload(self)"]
    imports = [n for n in ast.walk(method) if isinstance(n, ast.ImportFrom)]
    assert [(n.module, [a.name for a in n.names]) for n in imports] == [
        ("DeepAbdominalRegLib.reloading", ["reloadPackages"])]


def test_on_reload_calls_in_order(module, monkeypatch):
    """The widget's onReload, run (Slicer's reload of the module file recorded, not done)."""
    from DeepAbdominalRegLib import reloading

    calls = []
    monkeypatch.setattr(reloading, "reloadPackages", lambda: calls.append("packages"))
    monkeypatch.setattr(module.ScriptedLoadableModuleWidget, "onReload", lambda self: calls.append("module"),
                        raising=False)
    module.DeepAbdominalRegWidget().onReload()
    assert calls == ["packages", "module"]
