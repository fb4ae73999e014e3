"""Result rows as CSV, summaries (mean, std, median per method), Markdown tables and PNG plots.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepabdominalreg.evaluation.cases import BROKEN_PREFIX
from deepabdominalreg.io import write_atomically

#: Columns summarised (mean +- std, median) and shown in the Markdown summary, in this order.
KEY_METRICS: tuple[str, ...] = (
    "dice_mean", "dice_organs", "dice30", "hd95_mean_mm", "hd_mean_mm", "asd_mean_mm", "centroid_tre_mean_mm",
    "tre_mean_mm", "field_error_mean_mm", "field_error_p95_mm", "ncc_body", "ssim_body", "folding_percent",
    "jacobian_std", "sdlogj", "sdlogj_l2r", "ic_mean_mm", "runtime_s", "peak_rss_mb", "cuda_max_allocated_mb",
)


def jsonable(value):
    """``value`` with only JSON types inside (numpy numbers as Python numbers, NaN/inf as ``None``, the rest as
    strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_rows(rows: list[dict], path: Path) -> None:
    """Rows as a CSV (columns in order of first appearance; keys starting with ``_`` left out), written atomically."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns and not key.startswith("_"):
                columns.append(key)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(v) for k, v in row.items() if not k.startswith("_")})

    write_atomically(path, write)


def read_rows(path: Path) -> list[dict]:
    """Rows of a CSV written by :func:`write_rows` (numbers stay strings; :func:`as_number` reads them)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(float(value)) else f"{float(value):.6g}"
    return value


# --------------------------------------------------------------------------------------------------------------
# summary, Markdown and plots
# --------------------------------------------------------------------------------------------------------------


def as_number(value) -> float:
    """``value`` as a float (a CSV cell, a number or ``None``); NaN when it is not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number


def is_broken(row: dict) -> bool:
    """Whether ``row`` is of a deliberately broken pair (source ``broken_...``): only its flag counts, its metrics
    are left out of the summaries and plots."""
    return str(row.get("source") or "").startswith(BROKEN_PREFIX)


def flag_state(row: dict) -> str:
    """What a run said about its own result: ``"flagged"`` (the method's verdict, column ``x_status``, is
    ``"suspect"``), ``"not flagged"`` (a result without a warning: every peer's), or the run's own status when it
    gave no result (``"failed"``, ``"timeout"``: not silent either)."""
    if row.get("status") != "ok":
        return str(row.get("status") or "failed")
    return "flagged" if str(row.get("x_status") or "") == "suspect" else "not flagged"


def _methods_in_order(rows: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row["method"] not in seen:
            seen.append(row["method"])
    return seen


def summarise(rows: Sequence[dict], metrics: Sequence[str] = KEY_METRICS, by: str | None = None) -> list[dict]:
    """Per method (and per value of ``by``, e.g. ``"source"``): ``n``, ``mean``, ``std``, ``median``, ``min``,
    ``max`` of every metric over the successful rows (NaN values left out), and ``flagged`` (how many of them the
    method flagged as suspect, :func:`flag_state`).  Deliberately broken pairs (:func:`is_broken`) are left out."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status") != "ok" or is_broken(row):
            continue
        key = (row["method"],) + ((row.get(by),) if by else ())
        groups.setdefault(key, []).append(row)
    order = {m: i for i, m in enumerate(_methods_in_order(rows))}
    for key in sorted(groups, key=lambda k: (order.get(k[0], 0), *map(str, k[1:]))):
        members = groups[key]
        for metric in metrics:
            values = np.array([as_number(r.get(metric)) for r in members], dtype=np.float64)
            values = values[np.isfinite(values)]
            entry = {"method": key[0]}
            if by:
                entry[by] = key[1]
            entry.update({"metric": metric, "n": int(values.size),
                          "flagged": sum(flag_state(r) == "flagged" for r in members)})
            if values.size:
                entry.update({"mean": float(values.mean()),
                              "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                              "median": float(np.median(values)), "min": float(values.min()),
                              "max": float(values.max())})
            else:
                entry.update({k: float("nan") for k in ("mean", "std", "median", "min", "max")})
            out.append(entry)
    return out


_MD_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dice_mean", "Dice (all labels)", "{:.3f}"),
    ("dice_organs", "Dice (organs)", "{:.3f}"),
    ("dice30", "Dice30", "{:.3f}"),
    ("hd95_mean_mm", "HD95 mm", "{:.1f}"),
    ("asd_mean_mm", "ASD mm", "{:.2f}"),
    ("tre_mean_mm", "landmark TRE mm", "{:.2f}"),
    ("field_error_mean_mm", "field error mm", "{:.2f}"),
    ("ncc_body", "NCC body", "{:.3f}"),
    ("ssim_body", "SSIM body", "{:.3f}"),
    ("folding_percent", "folding %", "{:.3f}"),
    ("jacobian_std", "std det J", "{:.3f}"),
    ("sdlogj_l2r", "SDlogJ (L2R)", "{:.4f}"),
    ("ic_mean_mm", "inverse consistency mm", "{:.2f}"),
    ("runtime_s", "runtime s", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
)


def markdown_table(rows: Sequence[dict], columns=_MD_COLUMNS, with_median: bool = False) -> str:
    """A Markdown table: one line per method, ``mean ± std`` (and the median) of each column; a ``flagged``
    column (runs the method flagged as suspect / successful runs) when a method gives a verdict (``x_status``)."""
    summary = {(s["method"], s["metric"]): s for s in summarise(rows, [c[0] for c in columns])}
    scored = [r for r in rows if r.get("status") == "ok" and not is_broken(r)]
    methods = _methods_in_order(scored)
    present = [c for c in columns if any(summary.get((m, c[0]), {}).get("n", 0) for m in methods)]
    with_flags = any(r.get("x_status") for r in scored)
    lines = ["| method | n | " + ("flagged | " if with_flags else "") + " | ".join(c[1] for c in present) + " |",
             "|---|---|" + ("---|" if with_flags else "") + "---|" * len(present)]
    for method in methods:
        runs = [r for r in scored if r["method"] == method]
        flags = [f"{sum(flag_state(r) == 'flagged' for r in runs)}/{len(runs)}"] if with_flags else []
        cells = []
        n = max(summary.get((method, c[0]), {}).get("n", 0) for c in present) if present else 0
        for metric, _, fmt in present:
            s = summary.get((method, metric))
            if not s or not s["n"]:
                cells.append("–")
                continue
            text = fmt.format(s["mean"])
            if s["n"] > 1:
                text += " ± " + fmt.format(s["std"])
                if with_median:
                    text += " (" + fmt.format(s["median"]) + ")"
            cells.append(text)
        lines.append(f"| {method} | {n} | " + " | ".join(flags + cells) + " |")
    return "\n".join(lines)


def flag_table(rows: Sequence[dict]) -> str:
    """A Markdown table of the deliberately broken pairs (:func:`is_broken`): one line per pair, one column per
    method, each cell :func:`flag_state` (a method that gives no verdict, as every peer, reads "not flagged")."""
    broken = [r for r in rows if is_broken(r)]
    methods = _methods_in_order(broken)
    lines = ["| pair | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for case in dict.fromkeys(r["case"] for r in broken):
        cells = {r["method"]: flag_state(r) for r in broken if r["case"] == case}
        lines.append(f"| {case} | " + " | ".join(cells.get(m, "–") for m in methods) + " |")
    return "\n".join(lines)


def write_summary_markdown(rows: Sequence[dict], path: str | os.PathLike, env: dict | None = None) -> Path:
    """``summary.md``: the main table (all cases), one table per case source, failures, and the environment."""
    path = Path(path)
    intro = ("Mean ± std over the pairs (median in brackets); NaN-free values only. Runtime includes reading the "
             "images and all preprocessing; peak RSS is the peak resident memory of a fresh process running one "
             "method on one pair (it includes the Python interpreter and imported libraries).")
    parts = ["# Evaluation summary", "", intro, ""]
    parts += ["## All pairs", "", markdown_table(rows, with_median=True), ""]
    sources = sorted({str(r.get("source")) for r in rows if r.get("status") == "ok" and not is_broken(r)})
    if len(sources) > 1:
        for source in sources:
            subset = [r for r in rows if str(r.get("source")) == source]
            parts += [f"## {source}", "", markdown_table(subset), ""]
    if any(is_broken(r) for r in rows):
        note = ("Each must be flagged (our `metrics.json` `\"status\": \"suspect\"`); a method that gives no "
                "verdict (every peer) reads \"not flagged\". Their metrics are left out of the tables above.")
        parts += ["## Deliberately broken pairs: flagged?", "", note, "", flag_table(rows), ""]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        parts += ["## Failed or skipped runs", ""]
        parts += [f"- {r['case']} / {r['method']}: {r['status']} — {r.get('error', '')}" for r in failed]
        parts.append("")
    if env:
        parts += ["## Environment", "", "```json", json.dumps(jsonable(env), indent=1), "```", ""]
    path.write_text("\n".join(parts))
    return path


def _quiet_nanmean(values) -> float:
    """Mean of the finite values; NaN (without a warning) when there is none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_results(rows: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``boxplots.png`` (per method: Dice, HD95, TRE, folding, runtime), ``dice_vs_amplitude.png`` (mean
    Dice against the synthetic amplitude, one line per method and case source) and ``runtime.png`` (mean runtime
    per method, stacked by stage).  Returns name -> path of the figures written."""
    out = Path(out_dir)
    ok = [r for r in rows if r.get("status") == "ok" and not is_broken(r)]
    methods = _methods_in_order(ok)
    paths: dict[str, Path] = {}
    if not ok:
        return paths

    panels = [(m, t) for m, t in (("dice_mean", "mean Dice"), ("hd95_mean_mm", "HD95 (mm)"),
                                  ("tre_mean_mm", "landmark TRE (mm)"), ("field_error_mean_mm", "field error (mm)"),
                                  ("folding_percent", "folding (%)"), ("runtime_s", "runtime (s)"))
              if any(np.isfinite(as_number(r.get(m))) for r in ok)]
    if panels:
        columns = min(3, len(panels))
        rows_n = math.ceil(len(panels) / columns)
        figure = _figure(4.2 * columns, 3.4 * rows_n)
        for index, (metric, title) in enumerate(panels):
            axis = figure.add_subplot(rows_n, columns, index + 1)
            data = [[v for v in (as_number(r.get(metric)) for r in ok if r["method"] == m) if np.isfinite(v)]
                    for m in methods]
            axis.boxplot([d if d else [np.nan] for d in data], tick_labels=methods, showmeans=True)
            axis.set_title(title)
            axis.tick_params(axis="x", labelrotation=35, labelsize=7)
            if metric == "runtime_s" and any(v > 0 for d in data for v in d):
                axis.set_yscale("log")
            axis.grid(alpha=0.3)
        paths["boxplots"] = out / "boxplots.png"
        figure.savefig(paths["boxplots"])

    with_amplitude = [r for r in ok if np.isfinite(as_number(r.get("amplitude_mm"))) and np.isfinite(
        as_number(r.get("dice_mean")))]
    if with_amplitude:
        sources = sorted({str(r.get("source")) for r in with_amplitude})
        figure = _figure(5.0 * len(sources), 3.8)
        for index, source in enumerate(sources):
            axis = figure.add_subplot(1, len(sources), index + 1)
            for method in methods:
                subset = [r for r in with_amplitude if r["method"] == method and str(r.get("source")) == source]
                amplitudes = sorted({as_number(r["amplitude_mm"]) for r in subset})
                if not amplitudes:
                    continue
                means = [np.mean([as_number(r["dice_mean"]) for r in subset if as_number(r["amplitude_mm"]) == a])
                         for a in amplitudes]
                axis.plot(amplitudes, means, marker="o", label=method)
            axis.set_xlabel("synthetic displacement amplitude (mm)")
            axis.set_ylabel("mean Dice")
            axis.set_title(source)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        paths["dice_vs_amplitude"] = out / "dice_vs_amplitude.png"
        figure.savefig(paths["dice_vs_amplitude"])

    stage_names: list[str] = []
    for row in ok:
        for key in row:
            if key.startswith("time_") and key.endswith("_s") and key not in stage_names:
                stage_names.append(key)
    figure = _figure(max(5.0, 1.0 * len(methods) + 3), 4.0)
    axis = figure.add_subplot(1, 1, 1)
    bottom = np.zeros(len(methods))
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    for index, stage in enumerate(stage_names):
        heights = np.array([_quiet_nanmean([as_number(r.get(stage)) for r in ok if r["method"] == m])
                            for m in methods])
        heights = np.nan_to_num(heights)
        if not heights.any():
            continue
        axis.bar(methods, heights, bottom=bottom, label=stage[5:-2], color=palette[index % len(palette)])
        bottom += heights
    totals = [_quiet_nanmean([as_number(r.get("runtime_s")) for r in ok if r["method"] == m]) for m in methods]
    if not stage_names or not bottom.any():  # no stage times: plain total bars
        axis.bar(methods, np.nan_to_num(np.asarray(totals, dtype=float)), label="total")
    finite = [t for t in totals if np.isfinite(t)]
    if finite:
        axis.set_ylim(0, max(max(finite), float(bottom.max())) * 1.15 or 1.0)
    for x, total in enumerate(totals):
        if np.isfinite(total):
            axis.text(x, total, f"{total:.1f} s", ha="center", va="bottom", fontsize=7, clip_on=True)
    axis.set_ylabel("mean runtime per pair (s), by stage")
    axis.tick_params(axis="x", labelrotation=35, labelsize=7)
    axis.legend(fontsize=6, ncol=2)
    axis.grid(alpha=0.3, axis="y")
    paths["runtime"] = out / "runtime.png"
    figure.savefig(paths["runtime"])
    return paths
