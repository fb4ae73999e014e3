"""The phantom pair offered in Slicer's Sample Data module, generated locally (nothing downloaded)."""

import importlib
import sys
import types

import pytest
from DeepAbdominalRegLib import sampledata
from slicer_app_stubs import slicerApplicationStubs


@pytest.fixture
def sampleDataModule(monkeypatch):
    """A stand-in for Slicer's ``SampleData`` module recording ``registerCustomSampleDataSource``'s arguments."""
    calls = []
    logic = type("SampleDataLogic", (), {"registerCustomSampleDataSource": staticmethod(
        lambda **kwargs: calls.append(kwargs))})
    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=logic))
    return calls


def _checkLikeSampleDataSource(kwargs):
    """What ``SampleData.SampleDataSource.__init__`` (v5.8.1 - v5.12.3) requires: list fields of equal length
    (``uris=None`` fails there with ``len(None)``), and a callable ``customDownloader`` for the button."""
    lengths = {len(kwargs[name]) for name in ("uris", "fileNames", "nodeNames")}
    assert lengths == {0}
    assert callable(kwargs["customDownloader"])


def test_the_phantom_is_registered_and_generated_on_click(scene, sampleDataModule, monkeypatch):
    with slicerApplicationStubs():
        module = importlib.import_module("DeepAbdominalReg")
        p = module.DeepAbdominalRegLogic().getParameterNode()  # the stubs' wrapper keeps values per object
        monkeypatch.setattr(module.DeepAbdominalRegLogic, "getParameterNode", lambda self: p)
        module.registerSampleData()
        assert len(sampleDataModule) == 1
        kwargs = sampleDataModule[0]
        assert kwargs["category"] == sampledata.SAMPLE_CATEGORY and kwargs["sampleName"] == sampledata.SAMPLE_NAME
        assert kwargs["thumbnailFileName"].endswith("DeepAbdominalReg.png")
        assert sampledata.ICON.is_file()
        _checkLikeSampleDataSource(kwargs)
        loaded = kwargs["customDownloader"](types.SimpleNamespace(sampleName=sampledata.SAMPLE_NAME))
        assert [node.GetName() for node in loaded] == ["phantom fixed", "phantom moving"]
        assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 2
        assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 2
        spacing = loaded[0].GetSpacing()
        assert spacing == pytest.approx((sampledata.SAMPLE_SPACING_MM,) * 3)
        # the module's inputs are set: Register can be pressed at once
        assert p.fixedVolume is loaded[0] and p.movingVolume is loaded[1]
        assert p.movingSegmentation.GetName() == "phantom moving segmentation"
        assert p.fixedLandmarks.GetNumberOfControlPoints() == p.movingLandmarks.GetNumberOfControlPoints() > 0
