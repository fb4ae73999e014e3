"""One-page PNG report of a registration: axial and coronal views of the inputs, the result and its quality maps.

Display follows radiological convention whatever the images' direction matrices: the fixed grid's index axes are
first reordered/flipped to LPS (as ``sitk.DICOMOrient(image, "LPS")`` does, geometry only) and every image is
resampled (no transform) onto one axial and one coronal plane of that grid.  Axial slices show the patient's right
on the image's left and anterior at the top, coronal slices the patient's right on the left and superior at the top,
with the pixel aspect ratio taken from the spacing.  Matplotlib is used through its object API with the Agg canvas
(no pyplot, no GUI backend).
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

from deepabdominalreg.config import AIR_HU, BODY_THRESHOLD_HU
from deepabdominalreg.geometry import Grid, resample_image

if TYPE_CHECKING:  # the pipeline's result type, for annotations only (metrics sit below the pipeline)
    from deepabdominalreg.registration.pipeline import RegistrationResult

__all__ = ["write_report"]

_FOLD_COLOUR = "#00e000"
# distinct colours that stay visible on grey CT (after Trubetskoy's "20 distinct colours", dark ones left out)
_LABEL_COLOURS = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                  "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#aaffc3", "#ffd8b1")


@dataclass
class _Planes:
    """An axial and a coronal slice of one image, ready for ``imshow(origin="upper")``."""

    axial: np.ndarray
    coronal: np.ndarray


def _lps_grid(grid: Grid) -> Grid:
    """The same voxels with index axes permuted/flipped so that i -> Left, j -> Posterior, k -> Superior.

    Like ``sitk.DICOMOrient(image, "LPS")`` but geometry only (no pixel copy): each physical axis takes the index
    axis most aligned with it.
    """
    d = grid.direction_matrix  # column c: LPS direction of index axis c
    perm = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[r, p[r]]) for r in range(3)))
    signs = [1.0 if d[r, perm[r]] >= 0 else -1.0 for r in range(3)]
    start = [0.0 if signs[r] > 0 else float(grid.size[perm[r]] - 1) for r in range(3)]
    start_index = np.zeros(3)
    for r in range(3):
        start_index[perm[r]] = start[r]
    direction = np.stack([signs[r] * d[:, perm[r]] for r in range(3)], axis=1)
    return Grid(
        size=tuple(int(grid.size[perm[r]]) for r in range(3)),
        spacing=tuple(float(grid.spacing[perm[r]]) for r in range(3)),
        origin=tuple(float(v) for v in grid.index_to_physical(start_index)[0]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _plane_grid(grid: Grid, axis: int, index: int) -> Grid:
    """The one-voxel-thick slab of ``grid`` at ``index`` along index axis ``axis`` (0 = i, 1 = j, 2 = k)."""
    size = list(grid.size)
    size[axis] = 1
    start = np.zeros(3)
    start[axis] = index
    origin = grid.index_to_physical(start)[0]
    return Grid(tuple(size), grid.spacing, tuple(float(v) for v in origin), grid.direction)


def _planes(image: sitk.Image, axial: Grid, coronal: Grid, interpolator: str, default: float, pixel_type: int,
            ) -> _Planes:
    """Axial and coronal planes of ``image`` resampled (no transform) onto the LPS-ordered plane grids."""
    ax = sitk.GetArrayFromImage(resample_image(image, axial, None, interpolator, default, pixel_type))[0]
    co = sitk.GetArrayFromImage(resample_image(image, coronal, None, interpolator, default, pixel_type))[:, 0, :]
    # axial: rows j (anterior first = top), columns i (patient right first = left of the screen)
    # coronal: rows k flipped so that superior is at the top, columns i as in the axial view
    return _Planes(axial=ax, coronal=co[::-1])


def _window(array: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    lo, hi = hu_window
    return np.clip((array.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _checkerboard(a: np.ndarray, b: np.ndarray, spacing_rows: float, spacing_cols: float, tile_mm: float) -> np.ndarray:
    rows = (np.arange(a.shape[0]) * spacing_rows // tile_mm).astype(int)
    cols = (np.arange(a.shape[1]) * spacing_cols // tile_mm).astype(int)
    use_a = (rows[:, None] + cols[None, :]) % 2 == 0
    return np.where(use_a, a, b)


def _mask_centroid_lps(mask_zyx: np.ndarray, grid: Grid) -> np.ndarray | None:
    """Centroid (LPS mm) of a boolean ``zyx`` mask on ``grid``, from its marginal sums (no index arrays)."""
    counts = [mask_zyx.sum(axis=axes, dtype=np.int64) for axes in ((0, 1), (0, 2), (1, 2))]  # along x, y, z
    total = counts[0].sum()
    if total == 0:
        return None
    index_xyz = [float((c * np.arange(c.size)).sum() / total) for c in counts]
    return grid.index_to_physical(np.array([index_xyz]))[0]


def _slice_indices(fixed: sitk.Image, fixed_labels: sitk.Image | None, lps: Grid) -> tuple[int, int]:
    """(k, j) on ``lps`` of the slices to show: the labels' centroid, else the body's (HU > ``BODY_THRESHOLD_HU``),
    else the centre."""
    centre = None
    if fixed_labels is not None:
        centre = _mask_centroid_lps(sitk.GetArrayViewFromImage(fixed_labels) > 0, Grid.from_image(fixed_labels))
    if centre is None:
        centre = _mask_centroid_lps(sitk.GetArrayViewFromImage(fixed) > BODY_THRESHOLD_HU, Grid.from_image(fixed))
    if centre is None:
        return lps.size[2] // 2, lps.size[1] // 2
    index = lps.physical_to_index(centre[None])[0]
    k = int(np.clip(round(float(index[2])), 0, lps.size[2] - 1))
    j = int(np.clip(round(float(index[1])), 0, lps.size[1] - 1))
    return k, j


def _magnitude_scale(magnitude: sitk.Image, fixed: sitk.Image) -> float:
    """Upper end of the |u| colour scale (mm): 99.5th percentile inside the body (every 2nd voxel), >= 1 mm."""
    values = sitk.GetArrayViewFromImage(magnitude)[::2, ::2, ::2]
    if magnitude.GetSize() == fixed.GetSize():
        body = sitk.GetArrayViewFromImage(fixed)[::2, ::2, ::2] > BODY_THRESHOLD_HU
        if body.any():
            values = values[body]
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    return max(float(np.percentile(values, 99.5)) if values.size else 1.0, 1.0)


def _format(value, fmt: str, unit: str = "") -> str:
    if value is None:
        return "n/a"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return "n/a"
    return f"{number:{fmt}}{unit}"


def _metrics_blocks(metrics: dict | None, fixed: sitk.Image, moving: sitk.Image, hu_window) -> list:
    """(heading, lines) text blocks for the header; missing metrics are skipped or shown as n/a."""
    blocks = []
    if metrics:
        m = metrics
        jac = m.get("jacobian") if isinstance(m.get("jacobian"), dict) else {}
        quality = []
        if "dice_mean_before" in m or "dice_mean_after" in m:
            before, after = _format(m.get("dice_mean_before"), ".3f"), _format(m.get("dice_mean_after"), ".3f")
            quality.append(f"Dice mean     {before} -> {after}")
        if "tre_mean_before_mm" in m or "tre_mean_after_mm" in m:
            quality.append(
                f"TRE mean      {_format(m.get('tre_mean_before_mm'), '.1f')} -> "
                f"{_format(m.get('tre_mean_after_mm'), '.1f', ' mm')}"
            )
        quality.append(f"Folding       {_format(m.get('folding_percent', jac.get('folding_percent')), '.3f', ' %')}")
        quality.append(f"SDlogJ        {_format(m.get('sdlogj', jac.get('sdlogj')), '.3f')}")
        disp = m.get("displacement") if isinstance(m.get("displacement"), dict) else {}
        if disp:
            quality.append(
                f"|u| mean/max  {_format(disp.get('mean_mm'), '.1f')} / {_format(disp.get('max_mm'), '.1f', ' mm')}"
            )
        blocks.append(("Registration quality", quality))
        run = [f"Runtime  {_format(m.get('runtime_s'), '.1f', ' s')}"]
        if m.get("device") is not None:
            run.append(f"Device   {m.get('device')}")
        model = m.get("model")
        model = model.get("name") if isinstance(model, dict) else model
        if model:
            run.append(f"Model    {model}")
        blocks.append(("Run", run))
    images = []
    for role, image in (("Fixed ", fixed), ("Moving", moving)):
        size = "x".join(str(s) for s in image.GetSize())
        spacing = "x".join(f"{s:.3g}" for s in image.GetSpacing())
        images.append(f"{role}  {size} @ {spacing} mm")
    lo, hi = hu_window
    images.append(f"Window  {lo:g}..{hi:g} HU (W {hi - lo:g} L {(hi + lo) / 2:g})")
    blocks.append(("Images", images))
    return blocks


def _label_table(metrics: dict | None) -> list[tuple[str, float, float, float]]:
    """(name, Dice before, Dice after, HD95 after in mm) per label from ``metrics["labels"]``, worst first."""
    labels = (metrics or {}).get("labels")
    if not isinstance(labels, dict) or not isinstance(labels.get("after"), dict):
        return []
    after = labels["after"].get("per_label") or {}
    before = (labels.get("before") or {}).get("per_label") or {}
    rows = []
    for name, entry in after.items():
        if not isinstance(entry, dict):
            continue
        rows.append((str(name), (before.get(name) or {}).get("dice"), entry.get("dice"), entry.get("hd95_mm")))
    rows.sort(key=lambda r: (r[2] is None or not math.isfinite(float(r[2])), float(r[2] or 0.0)))
    return rows


def _draw_label_table(fig: Figure, table: list, x: float, y_top: float, max_rows: int, width: float) -> None:
    """Per-label Dice before -> after and HD95, in as many text columns as fit, worst Dice first."""
    if max_rows < 1:
        return
    columns = 3
    shown = table[: max_rows * columns]
    heading = f"Per-label Dice before -> after, HD95 after (worst first; {len(shown)} of {len(table)} labels)"
    fig.text(x, y_top, heading, fontsize=9, fontweight="bold", ha="left", va="top")
    line_height = 0.17 / fig.get_figheight()
    for c in range(columns):
        chunk = shown[c * max_rows: (c + 1) * max_rows]
        if not chunk:
            break
        width_name = min(max(len(name) for name, *_ in shown), 20)
        lines = [f"{name[:width_name]:<{width_name}} {_format(b, '.2f')}->{_format(a, '.2f')} "
                 f"{_format(h, '5.1f', 'mm')}" for name, b, a, h in chunk]
        fig.text(x + c * width / columns, y_top - 1.3 * line_height, "\n".join(lines), fontsize=8,
                 family="monospace", ha="left", va="top", linespacing=1.25)


def _orientation_letters(ax, plane: str, colour: str = "white") -> None:
    top, bottom = ("A", "P") if plane == "axial" else ("S", "I")
    style = {"color": colour, "fontsize": 8, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, "R", ha="left", va="center", **style)
    ax.text(0.98, 0.5, "L", ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _scale_bar(ax, shape: tuple[int, int], spacing_cols: float, length_mm: float = 50.0) -> None:
    pixels = length_mm / spacing_cols
    if pixels > 0.6 * shape[1]:
        return
    x0, y0 = 0.04 * shape[1], 0.95 * shape[0]
    ax.plot([x0, x0 + pixels], [y0, y0], color="white", linewidth=2, solid_capstyle="butt")
    ax.text(x0 + pixels / 2, y0 - 0.015 * shape[0], f"{length_mm:g} mm", color="white", fontsize=7,
            ha="center", va="bottom")


def _contours(ax, labels: np.ndarray | None, style: str = "solid", width: float = 0.8) -> None:
    if labels is None:
        return
    for label in np.unique(labels):
        inside = labels == label
        if label == 0 or inside.all():
            continue
        colour = _LABEL_COLOURS[(int(label) - 1) % len(_LABEL_COLOURS)]
        ax.contour(inside.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width,
                   linestyles=style)


def write_report(
    path: str | os.PathLike,
    result: RegistrationResult,
    *,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    title: str = "DeepAbdominalReg",
) -> Path:
    """Write a one-page PNG (16 x 9 in at 100 dpi, 1600 x 900 px) summarising a registration; returns the path.

    ``result``: what :func:`~deepabdominalreg.registration.register_pair` returned (its warped image and labels,
    Jacobian, displacement magnitude, metrics and HU window); ``fixed``, ``moving`` and their label maps: the inputs
    it registered, which a result does not hold.
    Rows: an axial and a coronal slice through the centroid of ``fixed_labels`` (else of the body,
    HU > ``BODY_THRESHOLD_HU``).
    Columns: fixed, moving (on the fixed grid *without* any transform, outside = -1000 HU), warped, a
    checkerboard of fixed and warped, the Jacobian determinant (``RdBu_r`` centred on 1; det <= 0 in green) and the
    displacement magnitude (mm), each map with a colour bar.  Label contours: fixed labels on the fixed and warped
    panels, moving labels on the moving panel, warped labels dashed on the warped panel.  Header boxes list
    ``result.metrics`` (``dice_mean_before``, ``dice_mean_after``, ``tre_mean_*_mm``, ``folding_percent``,
    ``sdlogj``, ``displacement``, ``runtime_s``, ``device``, ``model``; missing keys are skipped or shown as n/a) and
    the image geometry; ``metrics["labels"]["after"]["per_label"]`` adds a per-label Dice table, worst first.  Every
    image is sampled on the fixed grid's planes, so inputs on other grids are fine.  Written atomically (temporary
    file in the same folder + ``os.replace``).
    """
    warped, jacobian, displacement_magnitude = result.warped_image, result.jacobian, result.displacement_magnitude
    warped_labels, metrics, hu_window = result.warped_labels, result.metrics, result.config.hu_window
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    # ---- the two planes of every image, on the fixed grid reordered to LPS axes ----------------------------------
    lps = _lps_grid(Grid.from_image(fixed))
    k, j = _slice_indices(fixed, fixed_labels, lps)
    axial_grid, coronal_grid = _plane_grid(lps, 2, k), _plane_grid(lps, 1, j)
    f32 = sitk.sitkFloat32

    def planes(image: sitk.Image, interpolator: str, default: float, pixel_type: int = f32) -> _Planes:
        return _planes(image, axial_grid, coronal_grid, interpolator, default, pixel_type)

    planes_of = {
        "fixed": planes(fixed, "linear", AIR_HU),
        "moving": planes(moving, "linear", AIR_HU),  # no transform: where it lies before registration
        "warped": planes(warped, "linear", AIR_HU),
        "jacobian": planes(jacobian, "linear", 1.0),
        "magnitude": planes(displacement_magnitude, "linear", 0.0),
    }
    label_planes = {
        name: None if image is None else planes(image, "nearest", 0.0, sitk.sitkInt32)
        for name, image in (("fixed", fixed_labels), ("moving", moving_labels), ("warped", warped_labels))
    }
    body = _Planes(planes_of["fixed"].axial > BODY_THRESHOLD_HU, planes_of["fixed"].coronal > BODY_THRESHOLD_HU)
    magnitude_max = _magnitude_scale(displacement_magnitude, fixed)
    sx, sy, sz = lps.spacing
    nx, ny, nz = lps.size
    tile_mm = max(sx * nx, sy * ny) / 8.0

    # ---- layout (inches): header, two image rows whose heights follow the physical aspect, colour bars -----------
    width_in, height_in = 16.0, 9.0
    left, right, gap_x, gap_y = 0.45, 0.12, 0.08, 0.12
    header, titles, bars, bottom = 1.5, 0.28, 0.75, 0.08
    panel_w = (width_in - left - right - 5 * gap_x) / 6
    heights = [panel_w * (ny * sy) / (nx * sx), panel_w * (nz * sz) / (nx * sx)]  # axial, coronal
    available = height_in - header - titles - gap_y - bars - bottom
    scale = min(1.0, available / sum(heights))
    panel_w *= scale
    heights = [h * scale for h in heights]
    x0 = left + (width_in - left - right - 6 * panel_w - 5 * gap_x) / 2
    table = _label_table(metrics)
    spare = available - sum(heights)
    top = height_in - header - titles - (0.0 if table else spare / 2)  # centre the panels when nothing goes below
    row_top = [top, top - heights[0] - gap_y]

    def rect(row: int, col: int) -> list[float]:
        x = x0 + col * (panel_w + gap_x)
        y = row_top[row] - heights[row]
        return [x / width_in, y / height_in, panel_w / width_in, heights[row] / height_in]

    fig = Figure(figsize=(width_in, height_in), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    fig.text(left / width_in, 1 - 0.42 / height_in, title, fontsize=17, fontweight="bold", ha="left", va="baseline")
    legend = ["Fixed and warped images on the fixed grid; the moving image on the fixed grid without registration."]
    if any(v is not None for v in label_planes.values()):
        legend.append(
            "Contours: fixed labels (solid) on fixed and warped; moving labels on moving; warped labels dashed."
        )
    legend.append("Jacobian: blue = local compression, red = expansion, green = folding (det J <= 0).")
    subtitle = fig.text(left / width_in, 1 - 0.68 / height_in, "\n".join(legend), fontsize=9, color="#333333",
                        ha="left", va="top", linespacing=1.5)
    renderer = fig.canvas.get_renderer()
    block_x = max(7.0, subtitle.get_window_extent(renderer).x1 / fig.dpi + 0.3)
    for heading, lines in _metrics_blocks(metrics, fixed, moving, hu_window):
        text = fig.text(block_x / width_in, 1 - 0.2 / height_in, "\n".join([heading] + lines), fontsize=9,
                        family="monospace", ha="left", va="top", linespacing=1.35,
                        bbox={"boxstyle": "round,pad=0.5", "facecolor": "#f3f3f3", "edgecolor": "#aaaaaa"})
        text.draw(renderer)  # lays out the box so that its width is known
        block_x = text.get_bbox_patch().get_window_extent(renderer).x1 / fig.dpi + 0.25

    fold_cmap = ListedColormap([_FOLD_COLOUR])
    jac_norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    columns = ["Fixed", "Moving (before registration)", "Warped moving", "Checkerboard fixed / warped",
               "Jacobian determinant", "Displacement magnitude"]
    im_jac = im_mag = None
    for row, plane in enumerate(("axial", "coronal")):
        aspect = (sy / sx) if plane == "axial" else (sz / sx)
        spacing_rows = sy if plane == "axial" else sz
        get = (lambda p: p.axial) if plane == "axial" else (lambda p: p.coronal)
        fixed_w = _window(get(planes_of["fixed"]), hu_window)
        warped_w = _window(get(planes_of["warped"]), hu_window)
        grey = [fixed_w, _window(get(planes_of["moving"]), hu_window), warped_w,
                _checkerboard(fixed_w, warped_w, spacing_rows, sx, tile_mm)]
        axes = [fig.add_axes(rect(row, col)) for col in range(6)]
        for ax, image in zip(axes, grey):
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="bilinear")
        if label_planes["fixed"] is not None:
            _contours(axes[0], get(label_planes["fixed"]))
            _contours(axes[2], get(label_planes["fixed"]))
        if label_planes["moving"] is not None:
            _contours(axes[1], get(label_planes["moving"]))
        if label_planes["warped"] is not None:
            _contours(axes[2], get(label_planes["warped"]), style="dashed")

        jac = get(planes_of["jacobian"])
        im_jac = axes[4].imshow(jac, cmap="RdBu_r", norm=jac_norm, aspect=aspect, interpolation="nearest")
        axes[4].imshow(np.ma.masked_where(jac > 0, np.ones_like(jac)), cmap=fold_cmap, vmin=0, vmax=1,
                       aspect=aspect, interpolation="nearest")
        im_mag = axes[5].imshow(get(planes_of["magnitude"]), cmap="magma", vmin=0.0, vmax=magnitude_max,
                                aspect=aspect, interpolation="bilinear")
        body_plane = get(body)
        if body_plane.any() and not body_plane.all():
            for ax, colour in ((axes[4], "#555555"), (axes[5], "#cccccc")):
                ax.contour(body_plane.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.6)

        for col, ax in enumerate(axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
            _orientation_letters(ax, plane, "black" if col == 4 else "white")
        _scale_bar(axes[0], fixed_w.shape, sx)
        position = f"slice {k + 1} of {nz}" if plane == "axial" else f"slice {j + 1} of {ny}"
        axes[0].set_ylabel(f"{plane.capitalize()}  -  {position}", fontsize=10)

    bar_y = row_top[1] - heights[1] - 0.32
    for col, image, label, ticks, extend in (
        (4, im_jac, "det J   (1 = volume preserved; <= 0 folding, green)", [0, 0.5, 1, 1.5, 2], "both"),
        (5, im_mag, "|u|  (mm)", None, "max"),
    ):
        x = x0 + col * (panel_w + gap_x)
        cax = fig.add_axes([(x + 0.05 * panel_w) / width_in, bar_y / height_in, 0.9 * panel_w / width_in,
                            0.12 / height_in])
        bar = fig.colorbar(image, cax=cax, orientation="horizontal", extend=extend, ticks=ticks)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=8)

    if table:
        table_top = row_top[1] - heights[1] - 0.25
        rows = max(int((table_top - bottom) / 0.17) - 1, 0)
        _draw_label_table(fig, table, x0 / width_in, table_top / height_in, rows, (4 * panel_w + 3 * gap_x) / width_in)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fig.savefig(tmp, format="png", dpi=100, facecolor="white")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
