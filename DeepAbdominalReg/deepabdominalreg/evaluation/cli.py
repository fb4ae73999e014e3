"""``deepabdominalreg evaluate`` and ``deepabdominalreg benchmark``: the command-line side of :mod:`evaluation`.

``evaluate`` runs variants of our pipeline (:data:`~deepabdominalreg.evaluation.methods.VARIANTS`) on a pairs CSV
and/or generated pairs (phantom patients, real CT + labels deformed by the synthetic generators at several
amplitudes) and writes per-pair CSV, summary (CSV and Markdown: mean ± std, median) and PNG plots.  ``benchmark``
(:mod:`deepabdominalreg.evaluation.benchmark`) runs them side by side with elastix, ANTs and SimpleITK demons.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepabdominalreg.evaluation.cases import CaseSet, write_pairs_csv
from deepabdominalreg.evaluation.methods import VARIANTS, method_specs
from deepabdominalreg.evaluation.runners import run_evaluation

__all__ = ["add_commands"]


def _floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _config_overrides(path: str | None) -> dict:
    """``RegistrationConfig`` fields from a JSON file (``--config``), checked, to apply on top of every variant."""
    from deepabdominalreg.config import RegistrationConfig
    from deepabdominalreg.io import ImageValidationError

    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
        RegistrationConfig.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:
        raise ImageValidationError(f"configuration file '{path}' cannot be used: {exc}") from exc
    return dict(data)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from deepabdominalreg.io import ImageValidationError

    out = Path(args.output_dir)
    phantom_seeds = _ints(args.phantom_seeds) if args.phantom_seeds is not None else ([] if (args.pairs or args.ct)
                                                                                        else [0])
    amplitudes = tuple(_floats(args.amplitudes))
    case_set = CaseSet(
        pairs=args.pairs, phantom_seeds=tuple(phantom_seeds), phantom_amplitudes_mm=amplitudes,
        phantom_spacing_mm=args.phantom_spacing, ct=args.ct, ct_seg=args.ct_seg, ct_label_names=args.ct_label_names,
        ct_label_key=args.ct_label_key, ct_seeds=tuple(_ints(args.ct_seeds)), ct_amplitudes_mm=amplitudes,
        generators=tuple(_names(args.generator)), noise_hu=args.noise_hu,
    )
    overrides = _config_overrides(args.config)
    if args.io_iterations is not None:
        overrides["io_iterations"] = args.io_iterations
    if args.working_spacing is not None:
        overrides["working_spacing_mm"] = args.working_spacing
    model = args.model if args.model and args.model.lower() != "none" else None
    try:  # names and settings are checked before any pair is generated
        methods = method_specs((["none"] if args.baseline else []) + _names(args.ours), devices=[args.device],
                               model=model, log=_log, **overrides)
    except ValueError as exc:
        raise ImageValidationError(str(exc)) from exc
    try:
        cases = case_set.make(Path(args.cases_dir) if args.cases_dir else out / "cases", log=_log)
    except (OSError, ValueError) as exc:
        raise ImageValidationError(f"could not make the cases: {exc}") from exc
    if not cases:
        raise ImageValidationError("nothing to evaluate: give --pairs, --phantom-seeds and/or --ct.")
    rows = run_evaluation(cases, methods, out, threads=args.threads, isolate=args.isolate, log=_log)
    write_pairs_csv(cases, out / "pairs.csv")
    print((out / "summary.md").read_text())
    print(f"results: {out / 'per_pair.csv'}, {out / 'summary.md'}, {out / 'boxplots.png'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from deepabdominalreg.evaluation.benchmark import main

    passed = list(args.benchmark_args)
    if passed and passed[0] == "--":
        passed = passed[1:]
    return int(main(passed) or 0)


def add_commands(subparsers) -> None:
    """Add ``evaluate`` and ``benchmark`` to the ``deepabdominalreg`` parser's subcommands."""
    ev_parser = subparsers.add_parser(
        "evaluate", help="run our pipeline on many pairs (CSV or generated) and write metrics, summary and plots",
        description="Evaluate the pipeline: per-pair CSV, summary (mean ± std, median) and PNG plots. Pairs CSV "
                    "columns: fixed, moving[, fixed_seg, moving_seg, fixed_landmarks, moving_landmarks, label_names, "
                    "true_displacement, name].",
    )
    ev_parser.add_argument("--output-dir", required=True)
    ev_parser.add_argument("--pairs", help="CSV of pairs (paths relative to the CSV)")
    ev_parser.add_argument("--phantom-seeds", default=None, help="phantom patients, comma list (default 0 when "
                           "neither --pairs nor --ct is given)")
    ev_parser.add_argument("--phantom-spacing", type=float, default=CaseSet.phantom_spacing_mm,
                           help="phantom voxel spacing (mm)")
    ev_parser.add_argument("--ct", help="a CT to deform synthetically (NIfTI/NRRD/DICOM folder)")
    ev_parser.add_argument("--ct-seg", help="its label map (same grid)")
    ev_parser.add_argument("--ct-label-names", help="JSON {id: name} (or {key: {id: name}} with --ct-label-key)")
    ev_parser.add_argument("--ct-label-key", default=None, help="e.g. 'total' for TotalSegmentator's label map JSON")
    ev_parser.add_argument("--ct-seeds", default="0")
    ev_parser.add_argument("--generator", default="abdominal", help="abdominal, van_eijnatten or both (comma list)")
    ev_parser.add_argument("--noise-hu", type=float, default=CaseSet.noise_hu,
                           help="CT noise (HU) added to generated CT pairs")
    ev_parser.add_argument("--amplitudes", default="10", help="synthetic displacement amplitudes in mm, comma list "
                           "(e.g. 0,5,10,15,20,25)")
    ev_parser.add_argument("--cases-dir", help="where generated pairs are written (default OUTPUT/cases; reused)")
    ev_parser.add_argument("--ours", default="balanced", help="variants of our pipeline to run, comma list: "
                           + ", ".join(VARIANTS) + " (each is run as 'ours-<variant>')")
    ev_parser.add_argument("--model", default=None, help="model of the network variants: shipped name or .pt path "
                           "(default: the network preset's)")
    ev_parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev_parser.add_argument("--threads", type=int, default=2, help="CPU threads per method")
    ev_parser.add_argument("--config", help="JSON file of RegistrationConfig fields applied on top of every variant "
                           "(e.g. {\"io_smoothness_weight\": 1.0})")
    ev_parser.add_argument("--io-iterations", type=int, default=None)
    ev_parser.add_argument("--working-spacing", type=float, default=None)
    ev_parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                           help="leave out the 'none' row (no registration)")
    ev_parser.add_argument("--isolate", action="store_true",
                           help="run each pair in a fresh process (peak memory per pair; slower start)")
    ev_parser.set_defaults(func=_cmd_evaluate)

    bench = subparsers.add_parser(
        "benchmark", help="side-by-side benchmark vs elastix, ANTs, SimpleITK demons",
        description="Runs deepabdominalreg.evaluation.benchmark; every option is passed on, e.g. "
                    "`deepabdominalreg benchmark --smoke --out /tmp/b`; `deepabdominalreg benchmark --help` shows "
                    "them.",
        add_help=False, prefix_chars="+",  # no options of its own: '--x' is handed to the benchmark's parser
    )
    bench.add_argument("benchmark_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_benchmark)
