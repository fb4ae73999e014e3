"""Evaluation: run registration methods on a list of image pairs and score them all with the same metrics.

A *method* is any function ``f(fixed_path, moving_path, *, threads, **options) -> MethodOutput`` that reads the two
images itself (so reading and preprocessing are timed) and returns a displacement field in this project's
convention: on the **fixed** grid, LPS mm, mapping a fixed point ``x`` to the moving point ``x + u(x)``.  Our
pipeline (:func:`run_ours`), the identity baseline (:func:`run_identity`) and the peers of ``benchmarks/peers.py``
(elastix, ANTs, SimpleITK demons) all have that form, so :func:`evaluate_displacement` scores them identically:

* labels (warped with nearest neighbour): Dice per label, mean Dice, Dice30 (mean of the lowest 30 %), mean Dice of
  the abdominal organs present (:data:`ORGAN_NAMES`), Hausdorff distance (HD), HD95, average symmetric surface
  distance (ASD) and centroid distance ("centroid TRE") per label, in mm;
* landmarks: TRE of the fixed landmarks mapped through the field against the moving landmarks, in mm;
* intensities inside the fixed image's body mask: NCC (on HU) and SSIM (on the soft-tissue window, -160..240 HU);
* field regularity inside the body mask: folding (% of voxels with ``det J <= 0``), std of ``det J``, SDlogJ (this
  project's convention) and SDlogJ as Learn2Reg computes it (``std(log(det J + 3))``);
* inverse consistency when the method returns an inverse: ``|u(x) + v(x + u(x))|`` in mm;
* against a known (synthetic) displacement: endpoint error mean and 95th percentile in mm;
* runtime per stage (reading included) and peak memory (CPU RSS; CUDA max allocated).

Cases come from a pairs CSV (:func:`read_pairs_csv`) or are generated (:func:`generate_phantom_cases`,
:func:`generate_ct_cases`).  :func:`run_evaluation` runs every method on every case, each in a fresh process by
default (so peak memory belongs to one method on one pair), and writes ``per_pair.csv``, ``per_label.csv``,
``summary.csv``, ``summary.md`` and PNG plots.
"""


from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.device import PeakMemory, peak_memory_mb
from deepabdominalreg.evaluation.cases import EvaluationCase, load_label_names
from deepabdominalreg.evaluation.environment import code_version, environment_info, load_average, niceness
from deepabdominalreg.evaluation.scoring import evaluate_displacement
from deepabdominalreg.evaluation.tables import (
    jsonable,
    plot_results,
    read_rows,
    summarise,
    write_rows,
    write_summary_markdown,
)
from deepabdominalreg.geometry import Grid
from deepabdominalreg.io import read_image, read_labels

# --------------------------------------------------------------------------------------------------------------
# data types
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MethodOutput:
    """What a registration method returns to the evaluation.

    ``displacement_lps``: vector image on the fixed grid (LPS mm, fixed -> moving).  ``inverse_displacement_lps``:
    moving -> fixed on the moving grid, or ``None``.  ``stages``: seconds per stage (``read`` included).
    ``settings``: the method's parameters, for the record.  ``extra``: method-specific numbers (e.g. our own
    metrics) copied into the per-pair row with the prefix ``x_``.
    """

    displacement_lps: sitk.Image
    inverse_displacement_lps: sitk.Image | None = None
    stages: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


MethodFunction = Callable[..., MethodOutput]


@dataclass(frozen=True)
class MethodSpec:
    """A named method: ``function`` is ``"module:function"`` (importable in a fresh process) plus its options.

    ``warmup`` (``"module:function"``, called without arguments) imports the method's libraries before the clock
    starts, so that runtimes compare registrations, not Python imports (the import time is reported apart).
    """

    name: str
    function: str
    options: dict = field(default_factory=dict)
    warmup: str | None = None

    def resolve(self) -> MethodFunction:
        return _resolve(self.function)


def _resolve(spec: str) -> Callable:
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"method function {spec!r} must look like 'module:function'")
    return getattr(importlib.import_module(module_name), attribute)


# --------------------------------------------------------------------------------------------------------------
# methods: ours and the identity baseline
# --------------------------------------------------------------------------------------------------------------


def run_ours(
    fixed_path: str,
    moving_path: str,
    *,
    threads: int | None = 2,
    preset: str = "balanced",
    device: str = "cpu",
    model: str | None = None,
    seed: int = 0,
    **overrides,
) -> MethodOutput:
    """Our pipeline (:func:`deepabdominalreg.registration.register_pair`) from files: read, register, return the
    field.  ``preset`` + ``overrides`` make the :class:`RegistrationConfig`; ``model=None`` keeps the preset's model
    (none for ``fast``/``balanced``/``accurate``; the shipped one for ``network``)."""
    import torch

    from deepabdominalreg.config import config_from_preset
    from deepabdominalreg.registration.pipeline import register_pair

    if threads:
        torch.set_num_threads(int(threads))
    t = time.perf_counter()
    fixed = read_image(fixed_path, "fixed image")
    moving = read_image(moving_path, "moving image")
    read_s = time.perf_counter() - t
    if model is not None:
        overrides["model"] = model
    config = config_from_preset(preset, device=device, seed=seed, threads=threads, **overrides)
    result = register_pair(fixed, moving, config=config)
    stages = {"read": read_s}
    stages.update({k: float(v) for k, v in result.metrics["stages"].items() if k != "total"})
    extra = {
        "device": result.metrics["device"],
        "working_spacing_mm": result.metrics["working_grid"]["spacing_mm"],
        "working_size": "x".join(str(s) for s in result.metrics["working_grid"]["size"]),
        "own_ic_mean_mm": result.metrics.get("inverse", {}).get("inverse_consistency_mean_mm", float("nan")),
        "model_sha256": (result.metrics.get("model") or {}).get("sha256") or "",
        "warnings": " | ".join(result.metrics.get("warnings", [])),
    }
    settings = {"preset": preset, "config": result.metrics["config"], "model": result.metrics["model"]}
    return MethodOutput(
        displacement_lps=result.displacement_lps, inverse_displacement_lps=result.inverse_displacement_lps,
        stages=stages, settings=settings, extra=extra,
    )


def warm_up_ours() -> None:
    """Import what :func:`run_ours` needs (torch, the pipeline) before the clock starts.

    ``torch._dynamo`` is imported by the first ``torch.optim`` optimiser a process creates (~2-5 s on this CPU);
    it is an import like ``itk`` for elastix, so it is done here too (and reported in ``import_s``).
    """
    import torch
    import torch._dynamo

    import deepabdominalreg.registration  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # whatever else the first optimiser loads


def run_identity(fixed_path: str, moving_path: str, *, threads: int | None = None) -> MethodOutput:
    """No registration (zero displacement): the "before" row of every table."""
    t = time.perf_counter()
    fixed = read_image(fixed_path, "fixed image")
    read_s = time.perf_counter() - t
    grid = Grid.from_image(fixed)
    zeros = grid.image_from_array(np.zeros((*grid.shape_zyx, 3), dtype=np.float32), is_vector=True)
    return MethodOutput(displacement_lps=zeros, inverse_displacement_lps=zeros, stages={"read": read_s},
                        settings={"method": "identity"})


# --------------------------------------------------------------------------------------------------------------
# running methods on cases
# --------------------------------------------------------------------------------------------------------------


def _load_case(case: EvaluationCase) -> dict:
    from deepabdominalreg.io import read_displacement_field, read_landmarks

    data = {
        "fixed": read_image(case.fixed, "fixed image"),
        "moving": read_image(case.moving, "moving image"),
        "fixed_labels": read_labels(case.fixed_seg, "fixed segmentation") if case.fixed_seg else None,
        "moving_labels": read_labels(case.moving_seg, "moving segmentation") if case.moving_seg else None,
        "fixed_landmarks_lps": read_landmarks(case.fixed_landmarks, "fixed landmarks") if case.fixed_landmarks
        else None,
        "moving_landmarks_lps": read_landmarks(case.moving_landmarks, "moving landmarks") if case.moving_landmarks
        else None,
        "label_names": load_label_names(case.label_names),
        "true_displacement_lps": read_displacement_field(case.true_displacement) if case.true_displacement else None,
    }
    return data


def run_method(case: EvaluationCase, method: MethodSpec, threads: int = 2) -> tuple[dict, list[dict]]:
    """Run one method on one case in this process and score it: ``(row, per_label_rows)``.

    Timing covers the method call (reading and preprocessing included); peak memory is the process's peak RSS
    right after it (meaningful per method only in a fresh process: see :func:`run_evaluation`).  A failing method
    gives ``status = "failed"`` and the error, never an exception.
    """
    row: dict = {"case": case.name, "source": case.source, "amplitude_mm": case.amplitude_mm, "seed": case.seed,
                 "method": method.name, "threads": threads, "status": "ok", "error": "",
                 "load_1min": load_average(), "nice": niceness(), "code_version": code_version()}
    label_rows: list[dict] = []
    try:
        t = time.perf_counter()
        function = method.resolve()
        if method.warmup:
            _resolve(method.warmup)()
        row["import_s"] = time.perf_counter() - t
        rss_before = peak_memory_mb()["rss_mb"]
        with PeakMemory() as peak:
            t = time.perf_counter()
            output = function(case.fixed, case.moving, threads=threads, **method.options)
            runtime = time.perf_counter() - t
        row["runtime_s"] = runtime
        row["peak_rss_mb"] = peak.rss_mb
        row["rss_before_mb"] = rss_before
        row["cuda_max_allocated_mb"] = peak.cuda_max_allocated_mb
        for stage, seconds in output.stages.items():
            row[f"time_{stage}_s"] = float(seconds)
        for key, value in output.extra.items():
            row[f"x_{key}"] = value
        data = _load_case(case)
        summary, per_label = evaluate_displacement(
            output.displacement_lps, inverse_displacement_lps=output.inverse_displacement_lps, **data
        )
        row.update(summary)
        for name, values in per_label.items():
            label_rows.append({"case": case.name, "method": method.name, "label_name": name, **values})
        row["_settings"] = output.settings
    except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash of the benchmark
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["_traceback"] = traceback.format_exc()
    return row, label_rows


def _worker(connection, case: EvaluationCase, method: MethodSpec, threads: int, env: dict) -> None:
    os.environ.update(env)
    try:
        connection.send(run_method(case, method, threads))
    finally:
        connection.close()


def run_isolated(case: EvaluationCase, method: MethodSpec, threads: int = 2,
                 timeout_s: float | None = None) -> tuple[dict, list[dict]]:
    """:func:`run_method` in a fresh (spawned) process, so peak RSS belongs to this method and pair alone.

    Thread-count variables (``OMP_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, MKL/OpenBLAS) are set
    to ``threads`` in the child.  Past ``timeout_s`` the child is killed and the row says ``timeout``.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    process = context.Process(target=_worker, args=(sender, case, method, threads, env), daemon=True)
    started = time.perf_counter()
    process.start()
    sender.close()
    result = None
    try:
        if receiver.poll(timeout_s):
            result = receiver.recv()
    except EOFError:
        result = None
    finally:
        if process.is_alive():
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    if result is not None:
        return result
    elapsed = time.perf_counter() - started
    timed_out = timeout_s is not None and elapsed >= timeout_s
    row = {"case": case.name, "source": case.source, "amplitude_mm": case.amplitude_mm, "seed": case.seed,
           "method": method.name, "threads": threads, "status": "timeout" if timed_out else "failed",
           "error": f"killed after {elapsed:.0f} s" if timed_out else f"worker died (exit code {process.exitcode})"}
    return row, []


def run_evaluation(
    cases: Sequence[EvaluationCase],
    methods: Sequence[MethodSpec],
    out_dir: str | os.PathLike,
    *,
    threads: int = 2,
    isolate: bool = True,
    timeout_s: float | None = None,
    log: Callable[[str], None] | None = print,
    extra_info: dict | None = None,
    before_each: Callable[[], None] | None = None,
    resume: bool = False,
) -> list[dict]:
    """Every method on every case (case by case), scored alike; writes results into ``out_dir``:

    ``per_pair.csv`` (one row per case and method, rewritten after each run so partial results survive),
    ``per_label.csv``, ``summary.csv``, ``summary.md``, ``settings.json`` (each method's parameters),
    ``environment.json`` and ``boxplots.png``, ``dice_vs_amplitude.png``, ``runtime.png``.
    ``before_each()`` is called before every run (e.g. to wait while another heavy job uses the CPU).
    With ``resume``, the successful rows already in ``out_dir``'s CSVs are kept and those runs are not redone.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    label_rows: list[dict] = []
    settings: dict = {}
    if resume:
        rows = [r for r in read_rows(out / "per_pair.csv") if r.get("status") == "ok"]
        kept = {(r["case"], r["method"]) for r in rows}
        label_rows = [r for r in read_rows(out / "per_label.csv") if (r["case"], r["method"]) in kept]
        if (out / "settings.json").is_file():
            settings = json.loads((out / "settings.json").read_text())
    done_before = {(r["case"], r["method"]) for r in rows}
    total = len(cases) * len(methods)
    done = 0
    for case in cases:
        for method in methods:
            done += 1
            if (case.name, method.name) in done_before:
                continue
            if before_each is not None:
                before_each()
            if log:
                log(f"[{done}/{total}] {case.name}: {method.name} ...")
            if isolate:
                row, labels = run_isolated(case, method, threads, timeout_s)
            else:
                row, labels = run_method(case, method, threads)
            settings.setdefault(method.name, row.pop("_settings", None))
            row.pop("_settings", None)
            trace = row.pop("_traceback", None)
            if log:
                if row["status"] == "ok":
                    log(f"    {row.get('runtime_s', float('nan')):.1f} s, Dice {row.get('dice_mean', float('nan')):.3f}, "
                        f"TRE {row.get('tre_mean_mm', float('nan')):.2f} mm, folding "
                        f"{row.get('folding_percent', float('nan')):.3f} %")
                else:
                    log(f"    {row['status']}: {row['error']}" + (f"\n{trace}" if trace else ""))
            rows.append(row)
            label_rows.extend(labels)
            write_rows(rows, out / "per_pair.csv")
            write_rows(label_rows, out / "per_label.csv")
            (out / "settings.json").write_text(json.dumps(jsonable(settings), indent=1))
    order = {(c.name, m.name): i for i, (c, m) in enumerate((c, m) for c in cases for m in methods)}
    rows.sort(key=lambda r: order.get((r["case"], r["method"]), len(order)))
    write_rows(rows, out / "per_pair.csv")
    write_rows(label_rows, out / "per_label.csv")
    (out / "settings.json").write_text(json.dumps(jsonable(settings), indent=1))
    env = environment_info(threads)
    if extra_info:
        env.update(extra_info)
    (out / "environment.json").write_text(json.dumps(jsonable(env), indent=1))
    summary = summarise(rows)
    write_rows(summary, out / "summary.csv")
    write_summary_markdown(rows, out / "summary.md", env)
    plot_results(rows, out)
    return rows
