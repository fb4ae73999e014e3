"""Colour maps, overlays, legends and the metrics table on real MRML nodes."""

import json
import math

import numpy as np
import SimpleITK as sitk
from DeepAbdominalRegLib import display, nodes

METRICS = {
    "dice_mean_before": 0.61, "dice_mean_after": 0.87, "folding_percent": 0.012, "sdlogj": 0.08,
    "runtime_s": 12.5, "device": "cpu",
    "labels": {
        "before": {"per_label": {"liver": {"dice": 0.7, "hd95_mm": 9.0, "asd_mm": 2.0, "centroid_error_mm": 4.0},
                                 "spleen": {"dice": 0.52, "hd95_mm": 12.0, "asd_mm": 3.1,
                                            "centroid_error_mm": 6.0}},
                   "dice_mean": 0.61},
        "after": {"per_label": {"liver": {"dice": 0.9, "hd95_mm": 3.0, "asd_mm": 0.8, "centroid_error_mm": 1.0},
                                "spleen": {"dice": 0.84, "hd95_mm": float("nan"), "asd_mm": 1.0,
                                           "centroid_error_mm": 1.5}},
                  "dice_mean": 0.87},
    },
    "landmarks": {"before": {"mean": 8.0, "std": 2.0, "p95": 11.0}, "after": {"mean": 2.0, "std": 0.5, "p95": 3.0}},
    "stages": {"affine": 1.5, "instance_optimisation": 9.0},
    "jacobian": {"min": 0.4, "max": 1.9},
    "displacement": {"max_mm": 14.0},
}


def _column(tableNode, name):
    table = tableNode.GetTable()
    array = table.GetColumnByName(name)
    return [array.GetValue(i) for i in range(table.GetNumberOfRows())]


def test_metrics_table_rows(scene):
    tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode")
    display.updateMetricsTable(tableNode, METRICS)
    assert [tableNode.GetColumnName(i) for i in range(tableNode.GetNumberOfColumns())] == list(display.TABLE_COLUMNS)
    rows = list(zip(*(_column(tableNode, c) for c in display.TABLE_COLUMNS)))
    lookup = {(r[0], r[1]): r for r in rows}
    assert lookup[("Dice", "liver")][2:4] == (0.7, 0.9)
    assert lookup[("Dice", "spleen")][2:4] == (0.52, 0.84)
    assert lookup[("HD95", "liver")][2:5] == (9.0, 3.0, "mm")
    assert math.isnan(lookup[("HD95", "spleen")][3])
    assert lookup[("Dice (mean)", "all")][2:4] == (0.61, 0.87)
    assert lookup[("TRE mean", "landmarks")][2:5] == (8.0, 2.0, "mm")
    assert lookup[("Folding (det J <= 0)", "body")][3] == 0.012
    assert lookup[("SDlogJ", "body")][3] == 0.08
    assert lookup[("Runtime", "cpu")][3:5] == (12.5, "s")
    assert lookup[("Stage time", "instance_optimisation")][3] == 9.0
    assert lookup[("Jacobian min", "")][3] == 0.4
    assert json.loads(tableNode.GetAttribute("DeepAbdominalReg.metrics"))["device"] == "cpu"


def test_statistics_rows_are_named_plainly():
    rows = display.metricsRows({"jacobian": {"jacobian_min": 0.2, "sdlogj": 0.1, "voxels": 10},
                                "displacement": {"max_mm": 3.0}})
    measures = {r[0]: r for r in rows}
    assert measures["Jacobian min"][3] == 0.2 and "Jacobian sdlogj" not in measures
    assert measures["Displacement max_mm"][4] == "mm" and measures["Jacobian voxels"][4] == ""


def test_metrics_table_without_labels_or_landmarks(scene):
    tableNode = display.updateMetricsTable(scene.AddNewNodeByClass("vtkMRMLTableNode"),
                                           {"folding_percent": 0.0, "sdlogj": 0.05, "runtime_s": 3.0, "device": "cuda"})
    measures = _column(tableNode, "Measure")
    assert "Dice" not in measures and "TRE mean" not in measures and "Folding (det J <= 0)" in measures


def test_jacobian_colour_map_is_centred_on_one_and_flags_folding(scene):
    colors = display.jacobianColors()
    n = len(colors)

    def colourOf(det):  # how Slicer maps a value through window 2 / level 1 onto the table
        index = int(np.clip(np.floor((det - 0.0) / 2.0 * n), 0, n - 1))
        return colors[index]

    np.testing.assert_allclose(colourOf(-0.5), display.FOLDING_COLOR)
    np.testing.assert_allclose(colourOf(0.0), display.FOLDING_COLOR)
    assert min(colourOf(1.0)) > 0.93  # near white at 1
    below, above = colourOf(0.5), colourOf(1.5)
    assert below[2] > below[0]  # compression: blue
    assert above[0] > above[2]  # expansion: red
    assert not np.allclose(colourOf(0.05), display.FOLDING_COLOR)


def _volume(scene, array, name):
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((2.0, 2.0, 3.0))
    return nodes.updateVolumeNodeFromImage(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name), image)


def test_jacobian_and_displacement_display(scene):
    jacobian = _volume(scene, np.linspace(-0.2, 2.2, 6 * 5 * 4).reshape(4, 5, 6), "jac")
    magnitude = _volume(scene, np.linspace(0, 12.0, 6 * 5 * 4).reshape(4, 5, 6), "mag")
    displayNode = display.showJacobian(jacobian)
    assert displayNode.GetColorNode().GetName() == display.JACOBIAN_COLOR_NODE_NAME
    assert not displayNode.GetAutoWindowLevel()
    assert (displayNode.GetWindowLevelMin(), displayNode.GetWindowLevelMax()) == (0.0, 2.0)
    assert (displayNode.GetLevel(), displayNode.GetWindow()) == (1.0, 2.0)
    magDisplay = display.showDisplacementMagnitude(magnitude)
    assert magDisplay.GetColorNode().GetName() == display.DISPLACEMENT_COLOR_NODE_NAME
    assert 11.0 < magDisplay.GetWindowLevelMax() <= 12.0
    # the colour tables are made once per scene
    display.showJacobian(_volume(scene, np.ones((4, 5, 6)), "jac2"))
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 2
    # colour legends (vtkMRMLColorLegendDisplayNode) where this MRML has them
    legends = scene.GetNodesByClass("vtkMRMLColorLegendDisplayNode")
    assert legends.GetNumberOfItems() == 3
    titles = {legends.GetItemAsObject(i).GetTitleText() for i in range(3)}
    assert any("Jacobian" in t for t in titles) and "Displacement (mm)" in titles


def test_overlay_on_every_slice_view(scene):
    fixed = _volume(scene, np.zeros((4, 5, 6)), "fixed")
    jacobian = _volume(scene, np.ones((4, 5, 6)), "jac")
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    display.showOverlay(scene, fixed, jacobian, opacity=0.4)
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == fixed.GetID()
        assert composite.GetForegroundVolumeID() == jacobian.GetID()
        assert composite.GetForegroundOpacity() == 0.4


def test_show_table_in_layout_is_a_no_op_without_the_application(scene):
    display.showTableInLayout(scene.AddNewNodeByClass("vtkMRMLTableNode"))
