"""Test data as MRML nodes: the core's synthetic phantom pair (used by the module self-test and Testing/mrml)."""

from __future__ import annotations

from dataclasses import dataclass

from DeepAbdominalRegLib import nodes

__all__ = ["PhantomNodes", "addMarkupsNode", "addSegmentationNode", "addVolumeNode", "phantomNodes"]

_PALETTE = [
    (0.85, 0.35, 0.25), (0.30, 0.60, 0.85), (0.95, 0.80, 0.25), (0.45, 0.75, 0.40), (0.70, 0.45, 0.80),
    (0.95, 0.55, 0.70), (0.40, 0.80, 0.80), (0.75, 0.60, 0.40),
]


@dataclass
class PhantomNodes:
    fixedVolume: object
    movingVolume: object
    fixedSegmentation: object
    movingSegmentation: object
    fixedLandmarks: object
    movingLandmarks: object
    pair: object


def addVolumeNode(scene, image, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    return nodes.updateVolumeNodeFromImage(node, image)


def addSegmentationNode(scene, labels, labelNames: dict[int, str], name: str, referenceVolumeNode=None):
    infos = [
        nodes.SegmentInfo(int(value), f"segment_{int(value)}", str(labelName), _PALETTE[i % len(_PALETTE)])
        for i, (value, labelName) in enumerate(sorted(labelNames.items()))
    ]
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    return nodes.updateSegmentationNodeFromLabelImage(node, labels, infos, referenceVolumeNode=referenceVolumeNode)


def addMarkupsNode(scene, pointsLps, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    return nodes.updateMarkupsNodeFromPointsLps(node, pointsLps, [f"{name}-{i + 1}" for i in range(len(pointsLps))])


def phantomNodes(scene, seed: int = 0, spacingMm: float = 5.0) -> PhantomNodes:
    """The core's phantom pair (``deepabdominalreg.synthetic.pairs.make_phantom_pair``) as volume, segmentation and
    markups nodes in ``scene``."""
    from deepabdominalreg.synthetic.pairs import make_phantom_pair

    pair = make_phantom_pair(seed=seed, spacing_mm=spacingMm)
    fixed = addVolumeNode(scene, pair.fixed_image, "phantom fixed")
    moving = addVolumeNode(scene, pair.moving_image, "phantom moving")
    return PhantomNodes(
        fixedVolume=fixed,
        movingVolume=moving,
        fixedSegmentation=addSegmentationNode(scene, pair.fixed_labels, pair.label_names,
                                              "phantom fixed segmentation", fixed),
        movingSegmentation=addSegmentationNode(scene, pair.moving_labels, pair.label_names,
                                               "phantom moving segmentation", moving),
        fixedLandmarks=addMarkupsNode(scene, pair.fixed_landmarks_lps, "F"),
        movingLandmarks=addMarkupsNode(scene, pair.moving_landmarks_lps, "M"),
        pair=pair,
    )
