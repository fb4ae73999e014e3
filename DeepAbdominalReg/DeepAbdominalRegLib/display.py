"""How the outputs look: colour maps, slice-view overlays, colour legends and the metrics table.

MRML only at import; ``showTableInLayout`` imports the Slicer application lazily (GUI-only).
"""

from __future__ import annotations

import json
import math

import numpy as np
import slicer
import vtk

__all__ = [
    "DEFAULT_OVERLAY_OPACITY",
    "DISPLACEMENT_COLOR_NODE_NAME",
    "JACOBIAN_COLOR_NODE_NAME",
    "OVERLAYS",
    "OVERLAY_KEYS",
    "addColorLegend",
    "fitSliceViews",
    "getOrCreateDisplacementColorNode",
    "getOrCreateJacobianColorNode",
    "metricsRows",
    "setOverlayOpacity",
    "showDisplacementMagnitude",
    "showJacobian",
    "showOverlay",
    "showRegistrationResult",
    "showTableInLayout",
    "updateMetricsTable",
]

JACOBIAN_COLOR_NODE_NAME = "DeepAbdominalReg Jacobian (centred on 1)"
DISPLACEMENT_COLOR_NODE_NAME = "DeepAbdominalReg displacement (mm)"
COLOR_NODE_ATTRIBUTE = "DeepAbdominalReg.ColorMap"

JACOBIAN_RANGE = (0.0, 2.0)
"""Jacobian determinants from 0 to 2 are spread over the colour map: blue < 1 (compression), white = 1,
red > 1 (expansion).  Values <= 0 (folding) get :data:`FOLDING_COLOR`; values above 2 clamp to red."""
JACOBIAN_COLORS = 1024
FOLDING_COLOR = (1.0, 1.0, 0.0)
"""Bright yellow: det(J) <= 0 (strictly, below 2/1024 ~ 0.002) stands out against the blue-white-red scale."""

_DIVERGING = [  # (position 0..1, r, g, b): blue -> white -> red (ColorBrewer RdBu, reversed)
    (0.0, 0.019, 0.188, 0.380),
    (0.25, 0.263, 0.576, 0.765),
    (0.5, 0.969, 0.969, 0.969),
    (0.75, 0.839, 0.376, 0.302),
    (1.0, 0.404, 0.0, 0.122),
]
_SEQUENTIAL = [  # viridis control points
    (0.0, 0.267, 0.005, 0.329),
    (0.25, 0.229, 0.322, 0.546),
    (0.5, 0.128, 0.567, 0.551),
    (0.75, 0.369, 0.789, 0.383),
    (1.0, 0.993, 0.906, 0.144),
]


def _interpolate(controlPoints, positions: np.ndarray) -> np.ndarray:
    table = np.asarray(controlPoints, dtype=np.float64)
    return np.stack([np.interp(positions, table[:, 0], table[:, c]) for c in (1, 2, 3)], axis=1)


def _getOrCreateColorTable(scene, name: str, key: str, colors: np.ndarray):
    for node in _nodesByClass(scene, "vtkMRMLColorTableNode"):
        if node.GetAttribute(COLOR_NODE_ATTRIBUTE) == key:
            return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetAttribute(COLOR_NODE_ATTRIBUTE, key)
    node.SetTypeToUser()
    node.SetNumberOfColors(len(colors))
    for index, (r, g, b) in enumerate(colors):
        node.SetColor(index, "", float(r), float(g), float(b), 1.0)
    node.SetHideFromEditors(False)
    return node


def jacobianColors() -> np.ndarray:
    """``(JACOBIAN_COLORS, 3)`` RGB: entry ``i`` covers det(J) in ``[2 i / N, 2 (i + 1) / N)``; entry 0 is folding."""
    positions = (np.arange(JACOBIAN_COLORS) + 0.5) / JACOBIAN_COLORS
    colors = _interpolate(_DIVERGING, positions)
    colors[0] = FOLDING_COLOR
    return colors


def getOrCreateJacobianColorNode(scene):
    """The diverging colour table for Jacobian determinants (created once per scene)."""
    return _getOrCreateColorTable(scene, JACOBIAN_COLOR_NODE_NAME, "jacobian", jacobianColors())


def getOrCreateDisplacementColorNode(scene):
    """A sequential (viridis-like) colour table for displacement magnitudes (created once per scene)."""
    positions = np.linspace(0.0, 1.0, 256)
    colors = _interpolate(_SEQUENTIAL, positions)
    return _getOrCreateColorTable(scene, DISPLACEMENT_COLOR_NODE_NAME, "displacement", colors)


def _nodesByClass(scene, className: str):
    collection = scene.GetNodesByClass(className)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def _displayNode(volumeNode):
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    return volumeNode.GetDisplayNode()


def showJacobian(volumeNode, legend: bool = True):
    """Display a Jacobian-determinant volume with the diverging map centred on 1 (window 2, level 1).

    ``legend``: add its colour legend, hidden until the map is the overlay (:func:`showRegistrationResult`)."""
    colorNode = getOrCreateJacobianColorNode(volumeNode.GetScene())
    displayNode = _displayNode(volumeNode)
    displayNode.SetAndObserveColorNodeID(colorNode.GetID())
    displayNode.AutoWindowLevelOff()
    low, high = JACOBIAN_RANGE
    displayNode.SetWindowLevelMinMax(low, high)
    displayNode.SetInterpolate(False)
    if legend:
        addColorLegend(volumeNode, "Jacobian determinant (yellow: folding, det <= 0)", visible=False)
    return displayNode


def showDisplacementMagnitude(volumeNode, maximumMm: float | None = None, legend: bool = True):
    """Display a displacement-magnitude volume (mm) with a sequential map from 0 to ``maximumMm`` (default: its
    99.5th percentile); ``legend`` as in :func:`showJacobian`."""
    colorNode = getOrCreateDisplacementColorNode(volumeNode.GetScene())
    displayNode = _displayNode(volumeNode)
    displayNode.SetAndObserveColorNodeID(colorNode.GetID())
    if maximumMm is None:
        array = slicer.util.arrayFromVolume(volumeNode)
        maximumMm = float(np.percentile(array, 99.5)) if array.size else 1.0
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevelMinMax(0.0, max(float(maximumMm), 1e-3))
    if legend:
        addColorLegend(volumeNode, "Displacement (mm)", visible=False)
    return displayNode


def addColorLegend(displayableNode, title: str, visible: bool = True):
    """Add a colour legend to ``displayableNode`` where this Slicer has colour legends (5.0+); else ``None``."""
    legendNode = None
    try:  # the application's colours module, when running in Slicer
        legendNode = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(displayableNode)
    except AttributeError:  # no application (e.g. slicer-core): the same static logic function
        colorLogic = getattr(slicer, "vtkSlicerColorLogic", None)
        legendClass = getattr(slicer, "vtkMRMLColorLegendDisplayNode", None)
        if colorLogic is None or legendClass is None or not hasattr(colorLogic, "AddDefaultColorLegendDisplayNode"):
            return None  # Slicer < 5.0: no colour legends
        scene = displayableNode.GetScene()
        if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
            scene.RegisterNodeClass(legendClass())  # the Colors module does this in the application
        legendNode = colorLogic.AddDefaultColorLegendDisplayNode(displayableNode)
    if legendNode is None:
        return None
    legendNode.SetTitleText(title)
    if hasattr(legendNode, "SetUseColorNamesForLabels"):
        legendNode.SetUseColorNamesForLabels(False)
    legendNode.SetLabelFormat("%.2f")
    legendNode.SetVisibility(bool(visible))
    return legendNode


OVERLAYS = (
    ("warped", "Warped moving volume"),
    ("jacobian", "Jacobian determinant (yellow: folding)"),
    ("displacement", "Displacement magnitude (mm)"),
    ("none", "None (fixed volume only)"),
)
"""What the slice views can show over the fixed volume after a run: ``(key, label)``; the panel lists the labels."""
OVERLAY_KEYS = tuple(key for key, _ in OVERLAYS)
DEFAULT_OVERLAY_OPACITY = 0.5
"""Half-way fade between the fixed (background) and the overlay (foreground)."""


def _legendNodes(displayableNode) -> list:
    if displayableNode is None:
        return []
    found = []
    for index in range(displayableNode.GetNumberOfDisplayNodes()):
        displayNode = displayableNode.GetNthDisplayNode(index)
        if displayNode is not None and displayNode.IsA("vtkMRMLColorLegendDisplayNode"):
            found.append(displayNode)
    return found


def showRegistrationResult(scene, fixedVolumeNode, warpedVolumeNode=None, jacobianVolumeNode=None,
                           displacementVolumeNode=None, overlay: str = "warped",
                           opacity: float = DEFAULT_OVERLAY_OPACITY):
    """Show the fixed volume in every slice view with one overlay (:data:`OVERLAYS`) as the foreground layer.

    The default, ``"warped"``, is the fixed/warped-moving fade of SlicerElastix and ANTs; the Jacobian and
    displacement maps are one choice away, each with its colour legend shown only while it is the overlay (a map
    over the whole field of view is a wash of colour that hides the anatomy, so none is on by default).  The layout
    is left as the user had it.  Returns the foreground node (``None`` for ``"none"`` or a missing output).
    """
    if overlay not in OVERLAY_KEYS:
        raise ValueError(f"overlay {overlay!r}: choose one of {', '.join(OVERLAY_KEYS)}")
    maps = {"warped": warpedVolumeNode, "jacobian": jacobianVolumeNode, "displacement": displacementVolumeNode}
    foreground = maps.get(overlay)
    showOverlay(scene, fixedVolumeNode, foreground, opacity=opacity if foreground is not None else 0.0)
    for key in ("jacobian", "displacement"):
        for legend in _legendNodes(maps[key]):
            legend.SetVisibility(key == overlay)
    return foreground


def setOverlayOpacity(scene, opacity: float) -> None:
    """The fade between the fixed volume (0) and the overlay (1) in every slice view."""
    for compositeNode in _nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
        compositeNode.SetForegroundOpacity(min(max(float(opacity), 0.0), 1.0))


def fitSliceViews() -> None:
    """Fit every slice view to its volumes (Slicer application only; nothing without it)."""
    app = getattr(slicer, "app", None)
    if app is not None and app.layoutManager() is not None:
        slicer.util.resetSliceViews()


def showOverlay(scene, backgroundVolumeNode, foregroundVolumeNode, opacity: float = 0.5, labelVolumeNode=None):
    """Show ``foregroundVolumeNode`` over ``backgroundVolumeNode`` in every slice view of ``scene``."""
    for compositeNode in _nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
        compositeNode.SetBackgroundVolumeID(backgroundVolumeNode.GetID() if backgroundVolumeNode else None)
        compositeNode.SetForegroundVolumeID(foregroundVolumeNode.GetID() if foregroundVolumeNode else None)
        compositeNode.SetForegroundOpacity(float(opacity))
        if labelVolumeNode is not None:
            compositeNode.SetLabelVolumeID(labelVolumeNode.GetID())


# ----------------------------------------------------------------------------------------------------------------
# metrics table
# ----------------------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("Measure", "Structure", "Before", "After", "Unit")
_LABEL_MEASURES = (("dice", "Dice", ""), ("hd95_mm", "HD95", "mm"), ("asd_mm", "ASD", "mm"),
                   ("centroid_error_mm", "Centroid error", "mm"))


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def metricsRows(metrics: dict) -> list[tuple[str, str, float, float, str]]:
    """The table's rows ``(measure, structure, before, after, unit)`` from the core's metrics dict (NaN: n/a)."""
    rows: list[tuple[str, str, float, float, str]] = []
    labels = metrics.get("labels") or {}
    before = (labels.get("before") or {}).get("per_label") or {}
    after = (labels.get("after") or {}).get("per_label") or {}
    names = list(before) + [name for name in after if name not in before]
    for key, measure, unit in _LABEL_MEASURES:
        for name in names:
            b, a = (before.get(name) or {}).get(key), (after.get(name) or {}).get(key)
            if b is None and a is None:
                continue
            rows.append((measure, str(name), _number(b), _number(a), unit))
    if names or "dice_mean_after" in metrics:
        rows.append(("Dice (mean)", "all", _number(metrics.get("dice_mean_before")),
                     _number(metrics.get("dice_mean_after")), ""))
        if "dice_mean_affine" in metrics:
            rows.append(("Dice (mean) after affine only", "all", math.nan, _number(metrics["dice_mean_affine"]), ""))
    landmarks = metrics.get("landmarks") or {}
    if landmarks:
        lb, la = landmarks.get("before") or {}, landmarks.get("after") or {}
        for key, label in (("mean", "TRE mean"), ("std", "TRE std"), ("p95", "TRE p95")):
            rows.append((label, "landmarks", _number(lb.get(key)), _number(la.get(key)), "mm"))
    rows.append(("Folding (det J <= 0)", "body", math.nan, _number(metrics.get("folding_percent")), "%"))
    rows.append(("SDlogJ", "body", math.nan, _number(metrics.get("sdlogj")), ""))
    for group, unit in (("jacobian", ""), ("displacement", "mm")):
        for key, value in (metrics.get(group) or {}).items():
            if key in ("folding_percent", "sdlogj"):  # already a row of their own
                continue
            label = key[len(group) + 1:] if key.startswith(f"{group}_") else key  # jacobian_min -> min
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rowUnit = unit if label.endswith("_mm") or group == "displacement" else ""
                rows.append((f"{group.capitalize()} {label}", "", math.nan, _number(value), rowUnit))
    masks = metrics.get("user_masks") or {}
    if masks.get("excluded_percent_of_body") is not None:
        rows.append(("Left out of the similarity", "exclusion masks", math.nan,
                     _number(masks["excluded_percent_of_body"]), "% of body"))
    if masks.get("rigid_rms_strain") is not None:
        rows.append(("RMS strain (0: rigid)", "rigid mask", math.nan, _number(masks["rigid_rms_strain"]), ""))
    rows.append(("Runtime", str(metrics.get("device", "")), math.nan, _number(metrics.get("runtime_s")), "s"))
    for stage, seconds in (metrics.get("stages") or {}).items():
        rows.append(("Stage time", str(stage), math.nan, _number(seconds), "s"))
    return rows


def updateMetricsTable(tableNode, metrics: dict):
    """Fill ``tableNode`` with :func:`metricsRows`; the whole metrics dict is kept as JSON in an attribute."""
    rows = metricsRows(metrics)
    table = vtk.vtkTable()
    arrays = []
    for index, name in enumerate(TABLE_COLUMNS):
        array = vtk.vtkDoubleArray() if index in (2, 3) else vtk.vtkStringArray()
        array.SetName(name)
        array.SetNumberOfValues(len(rows))
        arrays.append(array)
    for row, values in enumerate(rows):
        for column, value in enumerate(values):
            arrays[column].SetValue(row, value if column in (2, 3) else str(value))
    for array in arrays:
        table.AddColumn(array)
    wasModifying = tableNode.StartModify()
    tableNode.SetAndObserveTable(table)
    tableNode.SetColumnDescription("Before", "before registration (inputs as given)")
    tableNode.SetColumnDescription("After", "after registration")
    tableNode.SetAttribute("DeepAbdominalReg.metrics", json.dumps(metrics, default=_jsonDefault))
    tableNode.EndModify(wasModifying)
    return tableNode


def _jsonDefault(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def showTableInLayout(tableNode) -> None:
    """Switch to a layout with a table view and show ``tableNode`` there (Slicer application only)."""
    app = getattr(slicer, "app", None)
    if app is None or tableNode is None:
        return
    layoutManager = app.layoutManager()
    if layoutManager is None:
        return
    layoutNode = layoutManager.layoutLogic().GetLayoutNode()
    layoutNode.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    app.applicationLogic().GetSelectionNode().SetActiveTableID(tableNode.GetID())
    app.applicationLogic().PropagateTableSelection()
