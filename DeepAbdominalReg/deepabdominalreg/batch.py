"""``deepabdominalreg batch``: a cohort of pairs registered one ``register`` subprocess per pair (docs/batch.md).

Each pair runs as ``python -m deepabdominalreg register ...`` in its own process: a crash, an out-of-memory kill or a
hung CUDA context takes down one pair, never the batch, and every ``register`` option means exactly what it means
there.  The outputs of pair ``ID`` are what ``register`` writes into ``OUT/ID/``; a failure adds ``OUT/ID/error.txt``.
``OUT/summary.csv`` (``summary.shard-I-of-N.csv`` for a shard) is rewritten atomically after every pair.

Exit codes: 0 every pair has a result (ok, suspect or skipped), 1 at least one pair failed, 2 unusable batch input
(pairs CSV, folder, options), 130 interrupted (Ctrl-C / SIGINT), 143 terminated (SIGTERM, e.g. a Slurm time limit);
the running pairs are stopped and the summary lists what finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from deepabdominalreg.io import ImageValidationError, output_file_names, parse_outputs, write_atomically

__all__ = ["Pair", "add_commands", "longitudinal_pairs", "merge_summaries", "pair_is_complete", "parse_shard",
           "read_batch_csv", "run_batch", "select_shard", "shard_from_environment", "threads_per_job"]

EXIT_FAILED = 1
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

REQUIRED_COLUMNS = ("fixed", "moving")
OPTIONAL_COLUMNS = ("id", "fixed_seg", "moving_seg", "fixed_landmarks", "moving_landmarks", "label_names")
_PATH_COLUMNS = ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_landmarks", "moving_landmarks", "label_names")

#: ``register`` options that ``batch`` passes through to every pair unchanged (the per-pair inputs come from the
#: pairs CSV or the folder, ``--threads`` from the batch's thread budget, ``--output-dir`` is ``OUT/ID``).
PASS_THROUGH = ("device", "model", "preset", "seed", "config", "no_affine", "no_body_mask", "io_iterations",
                "working_spacing", "no_inverse", "network_precision", "no_report", "output_format", "outputs")

SUMMARY_COLUMNS = ("index", "id", "status", "checks", "exit_code", "wall_s", "runtime_s", "dice_mean_before",
                   "dice_mean_after", "tre_mean_before_mm", "tre_mean_after_mm", "folding_percent", "sdlogj",
                   "suspect_reasons", "error", "fixed", "moving", "output_dir")
_METRIC_COLUMNS = ("runtime_s", "dice_mean_before", "dice_mean_after", "tre_mean_before_mm", "tre_mean_after_mm",
                   "folding_percent", "sdlogj")

#: Files ``longitudinal_pairs`` takes as images (a DICOM series: list it in a pairs CSV instead).
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_STDERR_TAIL_LINES = 60
_INTERRUPTED_CODES = (EXIT_INTERRUPTED, EXIT_TERMINATED, -signal.SIGINT, -signal.SIGTERM)


@dataclass(frozen=True)
class Pair:
    """One registration of the batch: ``moving`` onto ``fixed`` (absolute paths), its outputs in ``OUT/id``."""

    id: str
    fixed: str
    moving: str
    fixed_seg: str | None = None
    moving_seg: str | None = None
    fixed_landmarks: str | None = None
    moving_landmarks: str | None = None
    label_names: str | None = None


# --------------------------------------------------------------------------------------------------------------
# the pairs: a CSV or a longitudinal folder
# --------------------------------------------------------------------------------------------------------------


def _check_id(pair_id: str, where: str) -> None:
    if pair_id.startswith((".", "summary.")) or re.search(r"[/\\\x00]", pair_id):
        raise ImageValidationError(
            f"{where}: id '{pair_id}' cannot be a folder name under the output folder (no '/', '\\', no leading "
            "'.', not 'summary.*'); give another id."
        )


def read_batch_csv(path: str | os.PathLike) -> list[Pair]:
    """Pairs from a CSV with a header: ``fixed, moving`` required; ``id, fixed_seg, moving_seg, fixed_landmarks,
    moving_landmarks, label_names`` optional.  Relative paths are relative to the CSV's folder; an empty cell means
    "none"; a row without an id gets ``pairNNN`` (its 1-based row number).  Raises :class:`ImageValidationError`
    naming the row (line) and column.

    Not ``evaluation.cases.read_pairs_csv``: that one reads evaluation cases (``name``, ``true_displacement``,
    ``source``, ... columns; ``ValueError``), this one the inputs of ``register`` keyed by an output-folder id."""
    path = Path(path)
    if not path.is_file():
        raise ImageValidationError(f"pairs CSV '{path}' does not exist or is not a file; check --pairs.")
    base = path.resolve().parent
    pairs: list[Pair] = []
    where: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ImageValidationError(
                f"pairs CSV '{path}' has no column {', '.join(missing)} in its header (line 1: "
                f"{', '.join(columns) or 'empty'}); the header needs fixed,moving and may add "
                f"{', '.join(OPTIONAL_COLUMNS)}."
            )
        unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
        if unknown:
            raise ImageValidationError(
                f"pairs CSV '{path}' has unknown column(s) {', '.join(repr(c) for c in unknown)}; known: "
                f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)} (check the spelling)."
            )
        for number, row in enumerate(reader, start=1):
            at = f"pairs CSV '{path}', row {number} (line {reader.line_num})"
            if None in row:
                raise ImageValidationError(f"{at} has more cells than the header has columns; quote paths with "
                                           "commas.")
            values = {k: (v or "").strip() or None for k, v in row.items()}
            if not any(values.values()):
                continue  # a blank line
            for column in REQUIRED_COLUMNS:
                if not values.get(column):
                    raise ImageValidationError(f"{at}: column '{column}' is empty; every row needs a fixed and a "
                                               "moving image.")
            for column in _PATH_COLUMNS:
                if values.get(column):
                    p = Path(values[column].split("::", 1)[0]).expanduser()
                    uid = values[column][len(values[column].split("::", 1)[0]):]
                    values[column] = str(p if p.is_absolute() else base / p) + uid
            pair_id = values.get("id") or f"pair{number:03d}"
            _check_id(pair_id, at)
            if pair_id in where:
                raise ImageValidationError(f"pairs CSV '{path}': id '{pair_id}' is used twice ({where[pair_id]} and "
                                           f"row {number}); every pair needs its own id (its output folder).")
            where[pair_id] = f"row {number}"
            pairs.append(Pair(**{**values, "id": pair_id}))
    if not pairs:
        raise ImageValidationError(f"pairs CSV '{path}' lists no pairs (a header and at least one row are needed).")
    return pairs


def _image_stem(name: str) -> str | None:
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return None


def _natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def longitudinal_pairs(folder: str | os.PathLike, baseline: str | None = None) -> list[Pair]:
    """Every later time point onto the baseline: the images of ``folder`` (:data:`IMAGE_EXTENSIONS`) sorted by name
    (numbers as numbers: ``t2`` before ``t10``); the first is the baseline (fixed) unless ``baseline`` names one (file
    name or name without extension).  ``NAME_seg.<ext>`` is the segmentation of ``NAME.<ext>``, not a time point.
    Pair ids: the moving image's name without extension."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageValidationError(f"longitudinal folder '{folder}' does not exist or is not a folder; check "
                                   "--longitudinal.")
    images: dict[str, Path] = {}
    segs: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name)):
        stem = _image_stem(path.name) if path.is_file() else None
        if stem is None:
            continue
        target = segs if stem.endswith("_seg") else images
        key = stem[: -len("_seg")] if target is segs else stem
        if key in target:
            raise ImageValidationError(f"longitudinal folder '{folder}': '{target[key].name}' and '{path.name}' are "
                                       "the same time point; keep one of them.")
        target[key] = path.resolve()
    if len(images) < 2:
        raise ImageValidationError(f"longitudinal folder '{folder}' holds {len(images)} image(s) "
                                   f"({', '.join(IMAGE_EXTENSIONS)}); at least a baseline and one time point are "
                                   "needed.")
    names = list(images)
    if baseline is None:
        base = names[0]
    else:
        base = _image_stem(baseline) or baseline
        if base not in images:
            raise ImageValidationError(f"--baseline '{baseline}' is not an image of '{folder}'; its images: "
                                       f"{', '.join(p.name for p in images.values())}.")

    def seg(name: str) -> str | None:
        return str(segs[name]) if name in segs else None

    pairs = [Pair(id=name, fixed=str(images[base]), moving=str(images[name]), fixed_seg=seg(base),
                  moving_seg=seg(name)) for name in names if name != base]
    for pair in pairs:
        _check_id(pair.id, f"longitudinal folder '{folder}'")
    return pairs


# --------------------------------------------------------------------------------------------------------------
# shards and threads
# --------------------------------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``: shard ``I`` (0-based, as Slurm's ``--array=0-(N-1)``) of ``N``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ImageValidationError(f"--shard '{text}' must be I/N (two integers, e.g. 0/10: the first of 10 shards).")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ImageValidationError(f"--shard '{text}': I is 0-based and must be 0..N-1 with N >= 1 (--shard "
                                   f"0/{max(count, 1)} is the first shard; Slurm: --array=0-(N-1)).")
    return index, count


def shard_from_environment(environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of a Slurm job-array task: ``((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / STEP,
    SLURM_ARRAY_TASK_COUNT)``; ``None`` outside a job array."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        lowest, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
    except ValueError as exc:
        raise ImageValidationError(f"the Slurm array variables are not integers ({exc}); give --shard I/N.") from exc
    index = (task - lowest) // max(step, 1)
    if not 0 <= index < count or (task - lowest) % max(step, 1):
        raise ImageValidationError(
            f"Slurm array task {task} (min {lowest}, step {step}, count {count}) does not map onto a shard "
            f"0..{count - 1} (an array given as a list?); use a range such as --array=0-9, or give --shard I/N."
        )
    return index, count


def select_shard(pairs: Sequence[Pair], index: int, count: int) -> list[tuple[int, Pair]]:
    """``(position, pair)`` of every ``count``-th pair from ``index`` on: every pair lies in exactly one shard."""
    return [(i, pair) for i, pair in enumerate(pairs) if i % count == index]


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask (Slurm's and taskset's allocation), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_job(budget: int, jobs: int) -> int:
    """Threads of each of ``jobs`` parallel pairs sharing ``budget`` threads: ``max(1, budget // jobs)``."""
    return max(1, int(budget) // max(1, int(jobs)))


# --------------------------------------------------------------------------------------------------------------
# one pair: planned outputs, completeness, the register subprocess
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What every pair's ``register`` is given and writes: the pass-through arguments and the output options."""

    arguments: tuple[str, ...]
    outputs: frozenset[str]
    output_format: str
    inverse: bool
    report: bool

    def file_names(self, pair: Pair) -> list[str]:
        return list(output_file_names(self.outputs, self.output_format, labels=pair.moving_seg is not None,
                                      inverse=self.inverse, landmarks=pair.moving_landmarks is not None,
                                      report=self.report).values())


def _plan(args: argparse.Namespace, actions: dict[str, argparse.Action]) -> _Plan:
    """The pass-through options as ``register`` arguments, checked once by ``register``'s own parser and config
    builder (a bad option is an error before any pair runs, not a failure of every pair)."""
    from deepabdominalreg.cli import _build_config, build_parser

    arguments: list[str] = []
    for dest in PASS_THROUGH:
        action, value = actions[dest], getattr(args, dest)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1]
        arguments += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    reg = build_parser().parse_args(["register", "--fixed", "-", "--moving", "-", "--output-dir", "-", *arguments])
    config = _build_config(reg)
    return _Plan(tuple(arguments), parse_outputs(reg.outputs), reg.output_format, config.compute_inverse,
                 not reg.no_report)


def pair_is_complete(folder: str | os.PathLike, file_names: Sequence[str], pair: Pair | None = None) -> str | None:
    """``None`` if ``folder`` holds a finished result: ``metrics.json`` parses (for ``pair``: it names the same
    fixed and moving images), every one of ``file_names`` exists and ``transform.h5`` (when planned) reads as an ITK
    transform; otherwise why not (the pair is then registered again)."""
    from deepabdominalreg.transforms import read_transform

    folder = Path(folder)
    if not (folder / "metrics.json").is_file():
        return "no metrics.json"
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        return f"metrics.json does not parse ({exc})"
    if not isinstance(metrics, dict):
        return "metrics.json is not an object"
    if pair is not None:
        inputs = metrics.get("inputs") or {}
        if (inputs.get("fixed"), inputs.get("moving")) != (pair.fixed, pair.moving):
            return "metrics.json is of other input images"
    missing = [name for name in file_names if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    if "transform.h5" in file_names:
        try:
            read_transform(folder / "transform.h5", "transform")
        except ImageValidationError as exc:
            return str(exc)
    return None


def _metrics_row(folder: Path) -> dict:
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    row = {key: metrics.get(key) for key in _METRIC_COLUMNS}
    row["checks"] = metrics.get("status")
    row["suspect_reasons"] = " | ".join(metrics.get("suspect_reasons") or [])
    return row


def _register_command(pair: Pair, out: Path, plan: _Plan, threads: int) -> list[str]:
    command = [sys.executable, "-m", "deepabdominalreg", "register", "--fixed", pair.fixed, "--moving", pair.moving]
    for flag, value in (("--fixed-seg", pair.fixed_seg), ("--moving-seg", pair.moving_seg),
                        ("--fixed-landmarks", pair.fixed_landmarks), ("--moving-landmarks", pair.moving_landmarks),
                        ("--label-names", pair.label_names)):
        if value:
            command += [flag, value]
    return command + ["--output-dir", str(out), "--threads", str(threads), *plan.arguments]


def _child_environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # the thread pools a child does not size through --threads (ITK's, OpenMP's, BLAS's) would each take every core
    for name in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                 "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    # the child imports this very package, also when it is on sys.path without being installed (Slicer, a checkout)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else ""


class _Runner:
    """Runs pairs as subprocesses and stops them all on request (thread-safe)."""

    def __init__(self, plan: _Plan, threads: int):
        self.plan, self.threads = plan, threads
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen] = set()

    def run(self, pair: Pair, out: Path) -> dict | None:
        """The summary row of ``pair`` registered into ``out``; ``None`` if the batch was stopped meanwhile."""
        error_file = out / "error.txt"
        if error_file.exists():
            error_file.unlink()
        command = _register_command(pair, out, self.plan, self.threads)
        t0 = time.perf_counter()
        with self._lock:
            if self.stopping.is_set():
                return None
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace",
                                     env=_child_environment(self.threads))
            self._children.add(child)
        try:
            stdout, stderr = child.communicate()
        finally:
            with self._lock:
                self._children.discard(child)
        wall = round(time.perf_counter() - t0, 2)
        code = child.returncode
        if code in _INTERRUPTED_CODES:
            # a terminal's Ctrl-C reaches the children and the batch together: give the batch a moment to notice
            self.stopping.wait(2.0)
        if self.stopping.is_set() and code not in (0, 3):
            return None
        row = {"exit_code": code, "wall_s": wall}
        if code in (0, 3):
            why = pair_is_complete(out, self.plan.file_names(pair), pair)
            if why is None:
                row.update(_metrics_row(out))
                row["status"] = "suspect" if code == 3 or row.get("checks") == "suspect" else "ok"
                return row
            message = f"register exited with {code} but its outputs are incomplete: {why}"
        elif code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            message = f"killed by signal {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        elif code == 2:
            message = f"input error: {_last_error_line(stderr)}"
        else:
            message = f"register exited with {code}: {_last_error_line(stderr)}"
        out.mkdir(parents=True, exist_ok=True)
        tail = "\n".join(stderr.splitlines()[-_STDERR_TAIL_LINES:])
        text = (f"pair {pair.id}: FAILED\n{message}\n\ncommand:\n  {subprocess.list2cmdline(command)}\n\n"
                f"exit code: {code}\n\nstderr (last {_STDERR_TAIL_LINES} lines):\n{tail}\n\nstdout (end):\n"
                f"{stdout[-2000:]}\n")
        write_atomically(error_file, lambda tmp: tmp.write_text(text))
        return {**row, "status": "failed", "error": message}

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop every running pair: SIGINT (``register`` writes nothing and exits 130), SIGKILL after ``grace_s``."""
        with self._lock:
            self.stopping.set()
            children = list(self._children)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


# --------------------------------------------------------------------------------------------------------------
# the batch and its summary
# --------------------------------------------------------------------------------------------------------------


def summary_path(out_dir: str | os.PathLike, shard: tuple[int, int] = (0, 1)) -> Path:
    """``OUT/summary.csv``, or ``OUT/summary.shard-I-of-N.csv`` for shard ``I`` of ``N > 1``."""
    index, count = shard
    return Path(out_dir) / ("summary.csv" if count == 1 else f"summary.shard-{index}-of-{count}.csv")


def _write_summary(path: Path, rows: dict[int, dict]) -> None:
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for index in sorted(rows):
                writer.writerow({k: cell(rows[index].get(k)) for k in SUMMARY_COLUMNS})

    write_atomically(path, write)


def run_batch(pairs: Sequence[Pair], out_dir: str | os.PathLike, plan: _Plan, *, shard: tuple[int, int] = (0, 1),
              jobs: int = 1, threads: int | None = None, quiet: bool = False) -> int:
    """Register the pairs of ``shard`` into ``out_dir/ID`` (``jobs`` at a time, ``threads`` in all), skipping those
    already complete (:func:`pair_is_complete`); returns the batch's exit code (module docstring)."""
    from tqdm import tqdm

    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ImageValidationError(f"--output-dir '{out}' is an existing file; give a folder.")
    out.mkdir(parents=True, exist_ok=True)
    chosen = select_shard(pairs, *shard)
    per_job = threads_per_job(threads or cpu_budget(), jobs)
    summary = summary_path(out, shard)
    rows: dict[int, dict] = {}
    todo: list[tuple[int, Pair]] = []
    redo: list[str] = []
    for index, pair in chosen:
        base = {"index": index, "id": pair.id, "fixed": pair.fixed, "moving": pair.moving,
                "output_dir": str(out / pair.id)}
        why = pair_is_complete(out / pair.id, plan.file_names(pair), pair)
        if why is None:
            rows[index] = {**base, **_metrics_row(out / pair.id), "status": "skipped"}
        else:
            rows[index] = base
            todo.append((index, pair))
            if (out / pair.id).is_dir() and why != "no metrics.json":
                redo.append(f"{pair.id}: incomplete result ({why}); registering it again")
    done = {i for i in rows if rows[i].get("status")}
    _write_summary(summary, {i: r for i, r in rows.items() if i in done})

    def say(text: str) -> None:
        if not quiet:
            tqdm.write(text, file=sys.stderr)

    say(f"batch: {len(chosen)} pair(s) in shard {shard[0]}/{shard[1]} of {len(pairs)}; {len(done)} complete "
        f"(skipped), {len(todo)} to register, {jobs} at a time x {per_job} thread(s); summary: {summary}")
    for line in redo:
        say(line)
    runner = _Runner(plan, per_job)
    bar = tqdm(total=len(chosen), initial=len(done), unit="pair", file=sys.stderr, disable=quiet, dynamic_ncols=True)
    counts = {"failed": 0}
    running: dict = {}
    interrupted = {"code": 0}

    def on_term(signum, frame):
        interrupted["code"] = EXIT_TERMINATED
        raise KeyboardInterrupt

    def record(index: int, pair: Pair, future) -> None:
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001  (a bug in the runner must not lose the rest of the batch)
            result = {"status": "failed", "error": f"batch could not run the pair: {exc!r}"}
        if result is None:  # stopped with the batch: not a result, not a failure
            return
        rows[index].update(result)
        done.add(index)
        _write_summary(summary, {i: r for i, r in rows.items() if i in done})
        if result["status"] == "failed":
            counts["failed"] += 1
            tqdm.write(f"{pair.id}: FAILED: {result.get('error')} (see {out / pair.id / 'error.txt'})",
                       file=sys.stderr)
        else:
            say(f"{pair.id}: {result['status']} in {result.get('wall_s')} s")
        bar.update(1)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        pending = list(todo)
        while pending or running:
            while pending and len(running) < max(1, jobs):
                index, pair = pending.pop(0)
                running[pool.submit(runner.run, pair, out / pair.id)] = (index, pair)
            bar.set_postfix_str(", ".join(p.id for _, p in running.values()), refresh=True)
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                index, pair = running.pop(future)
                record(index, pair, future)
                bar.set_postfix_str(", ".join(p.id for _, p in running.values()), refresh=True)
    except KeyboardInterrupt:
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        for future, (index, pair) in running.items():  # pairs that finished while the batch was being stopped
            if future.done() and not future.cancelled():
                record(index, pair, future)
        bar.close()
        left = len(chosen) - len(done)
        print(f"batch interrupted: {left} pair(s) not finished; run the same command again to continue "
              f"(summary: {summary}).", file=sys.stderr)
        return interrupted["code"] or EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        pool.shutdown(wait=True)
        bar.close()
    statuses = [rows[i].get("status") for i in sorted(done)]
    tally = ", ".join(f"{statuses.count(s)} {s}" for s in ("ok", "suspect", "skipped", "failed") if s in statuses)
    print(f"batch finished: {tally or 'no pairs'}; summary: {summary}", file=sys.stderr)
    return EXIT_FAILED if counts["failed"] or "failed" in statuses else 0


def merge_summaries(out_dir: str | os.PathLike) -> tuple[Path, list[dict]]:
    """Join ``OUT/summary.shard-I-of-N.csv`` of all ``N`` shards into ``OUT/summary.csv`` (rows in pair order);
    refuses (:class:`ImageValidationError`) when a shard's summary is missing or shards of several ``N`` are there."""
    out = Path(out_dir)
    found: dict[int, dict[int, Path]] = {}
    for path in out.glob("summary.shard-*-of-*.csv"):
        match = re.fullmatch(r"summary\.shard-(\d+)-of-(\d+)\.csv", path.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not found:
        raise ImageValidationError(f"'{out}' holds no summary.shard-I-of-N.csv; run the shards first.")
    if len(found) > 1:
        raise ImageValidationError(f"'{out}' holds summaries of {', '.join(map(str, sorted(found)))} shards; delete "
                                   "those of the old sharding.")
    (count, shards), = found.items()
    missing = [i for i in range(count) if i not in shards]
    if missing:
        raise ImageValidationError(f"'{out}': the summaries of shard(s) {', '.join(map(str, missing))} of {count} "
                                   "are missing (still running, or not started?).")
    rows: dict[int, dict] = {}
    for index in range(count):
        with open(shards[index], newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                rows[int(row["index"])] = row
    target = out / "summary.csv"
    _write_summary(target, rows)
    return target, [rows[i] for i in sorted(rows)]


# --------------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------------


def _cmd_batch(args: argparse.Namespace) -> int:
    if args.merge_summaries:
        target, rows = merge_summaries(args.output_dir)
        failed = sum(row.get("status") == "failed" for row in rows)
        print(f"{len(rows)} pair(s) merged into {target}; {failed} failed.", file=sys.stderr)
        return EXIT_FAILED if failed else 0
    if bool(args.pairs) == bool(args.longitudinal):
        raise ImageValidationError("give either --pairs pairs.csv or --longitudinal FOLDER (or --merge-summaries).")
    if args.baseline and not args.longitudinal:
        raise ImageValidationError("--baseline goes with --longitudinal.")
    if args.jobs < 1:
        raise ImageValidationError(f"--jobs {args.jobs}: give 1 or more pairs at a time.")
    if args.threads is not None and args.threads < 1:
        raise ImageValidationError(f"--threads {args.threads}: give 1 or more.")
    pairs = read_batch_csv(args.pairs) if args.pairs else longitudinal_pairs(args.longitudinal, args.baseline)
    shard = parse_shard(args.shard) if args.shard else (shard_from_environment() or (0, 1))
    plan = _plan(args, args._register_actions)
    return run_batch(pairs, args.output_dir, plan, shard=shard, jobs=args.jobs, threads=args.threads,
                     quiet=args.quiet)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Mount ``batch`` on the ``deepabdominalreg`` command (after ``register``, whose options it passes through)."""
    register = sub.choices["register"]
    bp = sub.add_parser("batch", help="register a cohort: a pairs CSV or a longitudinal folder, resumable, "
                                      "sharded for job arrays (docs/batch.md)")
    source = bp.add_argument_group("pairs")
    source.add_argument("--pairs", help="CSV: fixed,moving[,id,fixed_seg,moving_seg,fixed_landmarks,"
                        "moving_landmarks,label_names]; relative paths from the CSV's folder")
    source.add_argument("--longitudinal", metavar="FOLDER", help="every image of FOLDER onto the first by name "
                        "(the baseline); NAME_seg.<ext> is NAME's segmentation")
    source.add_argument("--baseline", metavar="NAME", help="the baseline image of --longitudinal (default: the first)")
    bp.add_argument("--output-dir", required=True, help="OUT: one folder OUT/ID per pair, OUT/summary.csv")
    bp.add_argument("--shard", metavar="I/N", help="run shard I (0-based) of N: pairs I, I+N, I+2N, ... (default: "
                    "from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else all); writes summary.shard-I-of-N.csv")
    bp.add_argument("--merge-summaries", action="store_true", help="join the shards' summaries of --output-dir into "
                    "summary.csv, and nothing else")
    bp.add_argument("--jobs", type=int, default=1, help="pairs registered at the same time (1)")
    bp.add_argument("--threads", type=int, default=None, help="CPU threads for the whole batch; each pair gets "
                    "max(1, threads // jobs) (default: the CPUs this process may use)")
    bp.add_argument("--quiet", action="store_true", help="no progress bar, no line per pair (failures still shown)")
    passed = bp.add_argument_group("register options (passed to every pair; see 'deepabdominalreg register -h')")
    actions = {}
    for action in register._actions:
        if action.dest in PASS_THROUGH:
            passed._add_action(action)
            actions[action.dest] = action
    bp.set_defaults(func=_cmd_batch, _register_actions=actions)
