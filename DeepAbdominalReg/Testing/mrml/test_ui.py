"""Static checks of Resources/UI/DeepAbdominalReg.ui against the widget code and the parameter node."""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from DeepAbdominalRegLib import parameters
from test_parameters import parameterNodeMembers

MODULE_DIR = Path(__file__).resolve().parents[2]
UI_FILE = MODULE_DIR / "Resources" / "UI" / "DeepAbdominalReg.ui"
MODULE_FILE = MODULE_DIR / "DeepAbdominalReg.py"

# widget-name suffix -> classes that name may have (the convention the widget code relies on)
SUFFIX_CLASSES = {
    "Selector": {"qMRMLNodeComboBox"},
    "ComboBox": {"QComboBox", "ctkComboBox"},
    "DoubleSpinBox": {"QDoubleSpinBox", "ctkDoubleSpinBox"},
    "SpinBox": {"QSpinBox", "QDoubleSpinBox", "ctkDoubleSpinBox"},
    "CheckBox": {"QCheckBox", "ctkCheckBox"},
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "Button": {"QPushButton", "QToolButton"},
    "PathLineEdit": {"ctkPathLineEdit"},
    "LineEdit": {"QLineEdit"},
    "ProgressBar": {"QProgressBar"},
    "Label": {"QLabel"},
    "Slider": {"ctkSliderWidget", "QSlider"},
    "TextEdit": {"QPlainTextEdit", "QTextEdit"},
}

# parameter annotation (first type) -> widget classes connectGui can bind it to
BINDABLE = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider"},
    "str": {"QLineEdit", "QTextEdit", "QLabel"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
    "choice": {"QComboBox", "ctkComboBox"},
}


@pytest.fixture(scope="module")
def uiWidgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    widgets = {}
    for element in root.iter("widget"):
        name = element.get("name")
        assert name not in widgets, f"duplicate widget name {name}"
        widgets[name] = element
    return widgets


def _expectedClasses(name: str):
    for suffix, classes in SUFFIX_CLASSES.items():  # ordered: longest suffixes first where they overlap
        if name.lower().endswith(suffix.lower()):
            return classes
    return None


def test_every_widget_the_code_uses_exists_with_the_right_class(uiWidgets):
    used = sorted(set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", MODULE_FILE.read_text(encoding="utf-8"))))
    assert used, "the widget code uses no self.ui.X?"
    for name in used:
        assert name in uiWidgets, f"self.ui.{name} is used in DeepAbdominalReg.py but missing from the .ui"
        expected = _expectedClasses(name)
        assert expected is not None, f"self.ui.{name}: name has no known widget suffix"
        assert uiWidgets[name].get("class") in expected, f"{name} is a {uiWidgets[name].get('class')}"


def test_top_level_widget_and_custom_widgets_declared():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "DeepAbdominalReg"
    declared = {cw.findtext("class") for cw in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if c.startswith(("qMRML", "ctk"))} <= declared


def test_node_selectors_receive_the_scene(uiWidgets):
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    selectors = {n for n, w in uiWidgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= receivers


def _parameterKind(annotation: ast.AST) -> str:
    text = ast.unparse(annotation)
    if "Choice(" in text:
        return "choice"
    if text.startswith("vtkMRML"):
        return "node"
    for kind in ("bool", "int", "float", "str"):
        if re.search(rf"\b{kind}\b", text):
            return kind
    return text



def test_slicer_parameter_names_bind_to_compatible_widgets(uiWidgets):
    members = parameterNodeMembers()
    bound = {}
    for name, element in uiWidgets.items():
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.findtext("string")
    assert bound
    for widgetName, parameter in bound.items():
        assert parameter in members, f"{widgetName} binds to unknown parameter '{parameter}'"
        kind = _parameterKind(members[parameter].annotation)
        assert uiWidgets[widgetName].get("class") in BINDABLE[kind], (
            f"{widgetName} ({uiWidgets[widgetName].get('class')}) cannot bind '{parameter}' ({kind})"
        )
    # every parameter is reachable from the panel: bound, or synchronised by hand in the widget code
    byHand = {"huWindow", "model", "preset"}
    assert set(members) == set(bound.values()) | byHand | set(parameters.CONFIG_ONLY_PARAMETERS)
