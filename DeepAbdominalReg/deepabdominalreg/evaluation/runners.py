"""Running methods on cases: each method on each case (in a fresh process by default, so peak memory belongs to
one method on one pair), timed (per stage, reading included), its peak memory measured (CPU RSS; CUDA max
allocated), scored alike (:func:`~deepabdominalreg.evaluation.scoring.evaluate_displacement`), and written out:
``per_pair.csv``, ``per_label.csv``, ``summary.csv``, ``summary.md`` and PNG plots (:func:`run_evaluation`).
Methods are :class:`~deepabdominalreg.evaluation.methods.MethodSpec`; cases are
:class:`~deepabdominalreg.evaluation.cases.EvaluationCase`.
"""


from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from deepabdominalreg.device import PeakMemory, peak_memory_mb
from deepabdominalreg.evaluation.cases import EvaluationCase, load_label_names
from deepabdominalreg.evaluation.environment import code_version, environment_info, load_average, niceness
from deepabdominalreg.evaluation.methods import MethodSpec
from deepabdominalreg.evaluation.scoring import evaluate_displacement
from deepabdominalreg.evaluation.tables import (
    jsonable,
    plot_results,
    read_rows,
    summarise,
    write_rows,
    write_summary_markdown,
)
from deepabdominalreg.io import read_image, read_labels, write_json

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
        method.warm_up()
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
                    log(f"    {row.get('runtime_s', float('nan')):.1f} s, "
                        f"Dice {row.get('dice_mean', float('nan')):.3f}, "
                        f"TRE {row.get('tre_mean_mm', float('nan')):.2f} mm, folding "
                        f"{row.get('folding_percent', float('nan')):.3f} %")
                else:
                    log(f"    {row['status']}: {row['error']}" + (f"\n{trace}" if trace else ""))
            rows.append(row)
            label_rows.extend(labels)
            write_rows(rows, out / "per_pair.csv")
            write_rows(label_rows, out / "per_label.csv")
            write_json(jsonable(settings), out / "settings.json", indent=1)
    order = {(c.name, m.name): i for i, (c, m) in enumerate((c, m) for c in cases for m in methods)}
    rows.sort(key=lambda r: order.get((r["case"], r["method"]), len(order)))
    write_rows(rows, out / "per_pair.csv")
    write_rows(label_rows, out / "per_label.csv")
    write_json(jsonable(settings), out / "settings.json", indent=1)
    env = environment_info(threads)
    if extra_info:
        env.update(extra_info)
    write_json(jsonable(env), out / "environment.json", indent=1)
    summary = summarise(rows)
    write_rows(summary, out / "summary.csv")
    write_summary_markdown(rows, out / "summary.md", env)
    plot_results(rows, out)
    return rows
