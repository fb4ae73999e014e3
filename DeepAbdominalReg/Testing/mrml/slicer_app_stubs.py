"""Minimal stand-ins for the parts of the Slicer *application* that slicer-core lacks, to import DeepAbdominalReg.py.

Only the scripted-module base classes, ``slicer.parameterNodeWrapper`` and ``qt`` are stubbed; MRML, the logic and
the Lib run for real.  The widget (Qt) is not exercised.  What this cannot show (the real parameterNodeWrapper,
connectGui, the .ui loading) is covered by the static tests and by the self-test in Slicer.
"""

from __future__ import annotations

import contextlib
import sys
import types
import typing
import unittest

import slicer


class _ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class _ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent

    def getParameterNode(self):
        return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "DeepAbdominalReg")


class _ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent


class _ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        print(message)


def _parameterNodeWrapper(cls):
    """Plain attributes with the class defaults (None for nodes); ``.parameterNode`` is the MRML node."""
    annotations = typing.get_type_hints(cls, include_extras=False)
    defaults = {name: cls.__dict__.get(name) for name in annotations}

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for name, value in defaults.items():
            setattr(self, name, value)

    return type(cls.__name__, (), {"__init__": __init__, "__doc__": cls.__doc__, "__annotations__": annotations})


class _Validator:
    def __init__(self, *args, **kwargs):
        self.args = args


@contextlib.contextmanager
def slicerApplicationStubs():
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = _ScriptedLoadableModule
    scripted.ScriptedLoadableModuleLogic = _ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleWidget = _ScriptedLoadableModuleWidget
    scripted.ScriptedLoadableModuleTest = _ScriptedLoadableModuleTest
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = _parameterNodeWrapper
    wrapper.Choice = wrapper.WithinRange = _Validator
    qt = types.ModuleType("qt")
    qt.QTimer = type("QTimer", (), {"singleShot": staticmethod(lambda msec, callback: None)})
    stubs = {"slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper, "qt": qt}
    saved = {name: sys.modules.get(name) for name in [*stubs, "DeepAbdominalReg"]}
    sys.modules.update(stubs)
    sys.modules.pop("DeepAbdominalReg", None)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
