"""The parameter node mirrors RegistrationConfig: same fields (camelCase), same defaults, lossless conversion."""

import ast
import dataclasses
from pathlib import Path

import pytest
from deepabdominalreg.config import PRESETS, RegistrationConfig, config_from_preset
from DeepAbdominalRegLib import parameters

MODULE_FILE = Path(__file__).resolve().parents[2] / "DeepAbdominalReg.py"


def parameterNodeMembers() -> dict[str, ast.AnnAssign]:
    """Annotated members of the @parameterNodeWrapper class in DeepAbdominalReg.py (read, not imported)."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = [
        node for node in tree.body if isinstance(node, ast.ClassDef)
        and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list)
    ]
    assert len(classes) == 1, "exactly one @parameterNodeWrapper class expected in DeepAbdominalReg.py"
    return {s.target.id: s for s in classes[0].body if isinstance(s, ast.AnnAssign)}


def test_parameter_node_fields_match_registration_config():
    members = set(parameterNodeMembers())
    configParameters = {parameters.camelCase(f.name) for f in dataclasses.fields(RegistrationConfig)}
    assert configParameters - members == set(), "RegistrationConfig fields missing from the parameter node"
    assert members - configParameters == set(parameters.GUI_ONLY_PARAMETERS), (
        "parameter node members that are neither config fields nor declared GUI-only"
    )


def test_parameter_node_defaults_come_from_the_config():
    members = parameterNodeMembers()
    for field in dataclasses.fields(RegistrationConfig):
        name = parameters.camelCase(field.name)
        value = members[name].value
        assert value is not None, f"{name} has no default"
        assert (isinstance(value, ast.Subscript) and getattr(value.value, "id", None) == "DEFAULTS"
                and getattr(value.slice, "value", None) == name), f"{name} default should be DEFAULTS[{name!r}]"


def test_five_template_classes_only():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    names = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert names == ["DeepAbdominalReg", "DeepAbdominalRegParameterNode", "DeepAbdominalRegWidget",
                     "DeepAbdominalRegLogic", "DeepAbdominalRegTest"]


def test_camel_case():
    assert parameters.camelCase("io_ncc_window_mm") == "ioNccWindowMm"
    assert parameters.camelCase("working_spacing_mm") == "workingSpacingMm"
    assert parameters.camelCase("affine") == "affine"


@pytest.mark.parametrize("config", [
    RegistrationConfig(),
    config_from_preset("fast", working_spacing_mm=5.0, device="cpu", seed=3),
    config_from_preset("accurate", model="/models/x.pt", threads=4, hu_window=(-200.0, 300.0), body_mask=False),
])
def test_config_parameters_round_trip(config):
    values = parameters.parametersFromConfig(config)
    assert set(values) == set(parameters.CONFIG_TO_PARAMETER.values())
    assert parameters.configFromParameters(values) == config

    class Node:  # attribute access, like the parameter node wrapper
        pass

    node = Node()
    for key, value in values.items():
        setattr(node, key, value)
    assert parameters.configFromParameters(node) == config


def test_parameter_types_for_widgets():
    values = parameters.parametersFromConfig(RegistrationConfig())
    assert values["model"] == "" and values["threads"] == 0 and values["ioLevels"] == "4,2,1"
    assert values["huWindow"] == (-160.0, 240.0)


def test_bad_values_raise_user_messages():
    with pytest.raises(ValueError, match="whole numbers"):
        parameters.configFromParameters({"ioLevels": "4,x"})
    with pytest.raises(ValueError, match="factors >= 1"):
        parameters.configFromParameters({"ioLevels": "4,0"})
    with pytest.raises(ValueError, match="lower bound"):
        parameters.configFromParameters({"huWindow": (300.0, 100.0)})


def test_presets_set_and_are_recognised():
    for preset in PRESETS:
        values = parameters.parametersFromConfig(RegistrationConfig())
        values.update(parameters.presetParameters(preset))
        assert parameters.configFromParameters(values) == config_from_preset(preset)
        assert parameters.presetMatching(values) == preset
    values = parameters.parametersFromConfig(RegistrationConfig())
    values["ioIterations"] = 77
    assert parameters.presetMatching(values) == "custom"
    assert parameters.PRESET_NAMES[-1] == "custom"


def test_shipped_model_names_read_cards_without_torch(tmp_path):
    (tmp_path / "a.json").write_text('{"name": "abdomen-v1", "weights": "a.pt"}')
    (tmp_path / "broken.json").write_text("{not json")
    assert parameters.shippedModelNames(str(tmp_path)) == ["abdomen-v1"]
    assert parameters.shippedModelNames(str(tmp_path / "missing")) == []


def test_model_combo_index_does_not_snap_back_from_load_from_file():
    items = [parameters.NO_MODEL_LABEL, "abdomen-a", "abdomen-b", parameters.LOAD_MODEL_LABEL]
    assert parameters.modelComboIndex("", items) == 0
    assert parameters.modelComboIndex("abdomen-b", items) == 2
    assert parameters.modelComboIndex("/data/my_model.pt", items) == 3
    # "load from file..." picked while a shipped model was selected: no file yet, the combo stays there
    assert parameters.modelComboIndex("", items, loadFromFileChosen=True) == 3
    assert parameters.modelComboIndex("abdomen-a", items, loadFromFileChosen=True) == 1
