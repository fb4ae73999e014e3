"""Every ``slicer.X`` / ``slicer.util.X`` the module and its glue use exists in the pinned slicer-core.

The application-only parts (``slicer.app``, ``slicer.modules``, ``slicer.packaging`` on Slicer >= 5.11, the
scripted-module base classes, the parameter node wrapper, i18n) are not in slicer-core; they are named here and
were read in Slicer's own source instead (docs/slicer_module.md).
"""

import ast
from pathlib import Path

import pytest
import slicer
import slicer.util

MODULE_DIR = Path(__file__).resolve().parents[2]
SOURCES = [MODULE_DIR / "DeepAbdominalReg.py", *sorted((MODULE_DIR / "DeepAbdominalRegLib").glob("*.py"))]
APPLICATION_ONLY = {"app", "modules", "packaging", "ScriptedLoadableModule", "parameterNodeWrapper", "i18n",
                    "mrmlScene", "testing", "vtkSlicerColorLogic", "vtkMRMLColorLegendDisplayNode"}
"""``vtkSlicerColorLogic`` / ``vtkMRMLColorLegendDisplayNode``: looked up with ``getattr`` (Slicer >= 5.0)."""


def _chains(tree: ast.AST):
    """``("util", "resetSliceViews")`` for every ``slicer.util.resetSliceViews`` in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = []
            current = node
            while isinstance(current, ast.Attribute):
                parts.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name) and current.id == "slicer":
                yield tuple(reversed(parts))


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_every_slicer_name_used_exists_in_slicer_core(source):
    used = {chain[:2] if chain[0] == "util" else chain[:1] for chain in _chains(ast.parse(source.read_text(
        encoding="utf-8")))}
    missing = []
    for chain in sorted(used):
        if chain[0] in APPLICATION_ONLY:
            continue
        owner = slicer.util if chain[0] == "util" and len(chain) == 2 else slicer
        name = chain[1] if owner is slicer.util else chain[0]
        if not hasattr(owner, name):
            missing.append(".".join(("slicer",) + chain))
    assert missing == [], f"{source.name} uses names slicer-core does not have: {missing}"


def test_the_check_sees_the_names_it_should():
    used = set(_chains(ast.parse((MODULE_DIR / "DeepAbdominalRegLib" / "display.py").read_text(encoding="utf-8"))))
    assert ("util", "resetSliceViews") in used and ("vtkMRMLLayoutNode", "SlicerLayoutFourUpTableView") in used
