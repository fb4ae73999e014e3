"""``deepabdominalreg evaluate`` and ``deepabdominalreg benchmark``: the command-line side of :mod:`evaluation`.

``evaluate`` runs our pipeline (one or more presets) on a pairs CSV and/or generated pairs (phantom patients, real
CT + labels deformed by the synthetic generators at several amplitudes) and writes per-pair CSV, summary (CSV and
Markdown: mean ± std, median) and PNG plots.  ``benchmark`` runs ``benchmarks/run_benchmark.py`` of a source
checkout (our configurations side by side with elastix, ANTs and SimpleITK demons); its options are passed on.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from deepabdominalreg.evaluation.cases import (
    EvaluationCase,
    generate_ct_cases,
    generate_phantom_cases,
    load_label_names,
    read_pairs_csv,
    write_pairs_csv,
)
from deepabdominalreg.evaluation.runners import MethodSpec, run_evaluation

__all__ = ["add_commands"]


def _floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from deepabdominalreg.config import PRESETS
    from deepabdominalreg.io import ImageValidationError

    out = Path(args.output_dir)
    cases_dir = Path(args.cases_dir) if args.cases_dir else out / "cases"
    cases: list[EvaluationCase] = []
    if args.pairs:
        try:
            cases += read_pairs_csv(args.pairs)
        except (OSError, ValueError) as exc:
            raise ImageValidationError(f"pairs CSV: {exc}") from exc
    phantom_seeds = _ints(args.phantom_seeds) if args.phantom_seeds is not None else ([] if (args.pairs or args.ct)
                                                                                        else [0])
    amplitudes = _floats(args.amplitudes)
    if phantom_seeds:
        print(f"generating phantom pairs: seeds {phantom_seeds}, amplitudes {amplitudes} mm ...", file=sys.stderr)
        cases += generate_phantom_cases(cases_dir, seeds=phantom_seeds, amplitudes_mm=amplitudes,
                                           spacing_mm=args.phantom_spacing)
    if args.ct:
        names = load_label_names(args.ct_label_names, args.ct_label_key) if args.ct_label_names else {}
        for generator in [g for g in args.generator.split(",") if g]:
            print(f"generating CT pairs ({generator}): seeds {args.ct_seeds}, amplitudes {amplitudes} mm ...",
                  file=sys.stderr)
            cases += generate_ct_cases(cases_dir, args.ct, args.ct_seg, names, seeds=_ints(args.ct_seeds),
                                          amplitudes_mm=amplitudes, generator=generator, noise_hu=args.noise_hu)
    if not cases:
        raise ImageValidationError("nothing to evaluate: give --pairs, --phantom-seeds and/or --ct.")

    overrides: dict = {"device": args.device}
    if args.model and args.model.lower() not in ("none", ""):
        overrides["model"] = args.model
    if args.io_iterations is not None:
        overrides["io_iterations"] = args.io_iterations
    if args.working_spacing is not None:
        overrides["working_spacing_mm"] = args.working_spacing
    methods = []
    if args.baseline:
        methods.append(MethodSpec("none", "deepabdominalreg.evaluation.runners:run_identity"))
    for preset in [p for p in args.presets.split(",") if p]:
        if preset not in PRESETS:
            raise ImageValidationError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        methods.append(MethodSpec(f"ours-{preset}", "deepabdominalreg.evaluation.runners:run_ours",
                                     {"preset": preset, **overrides}, "deepabdominalreg.evaluation.runners:warm_up_ours"))
    rows = run_evaluation(cases, methods, out, threads=args.threads, isolate=args.isolate,
                             log=lambda text: print(text, file=sys.stderr, flush=True))
    write_pairs_csv(cases, out / "pairs.csv")
    print((out / "summary.md").read_text())
    print(f"results: {out / 'per_pair.csv'}, {out / 'summary.md'}, {out / 'boxplots.png'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _benchmarks_dir() -> Path:
    explicit = os.environ.get("DEEPABDOMINALREG_BENCHMARKS")
    candidates = [Path(explicit)] if explicit else []
    candidates.append(Path(__file__).resolve().parents[2] / "benchmarks")
    candidates.append(Path.cwd() / "benchmarks")
    for candidate in candidates:
        if (candidate / "run_benchmark.py").is_file():
            return candidate
    from deepabdominalreg.io import ImageValidationError

    raise ImageValidationError(
        "benchmark needs a source checkout of DeepAbdominalReg (benchmarks/run_benchmark.py was not found); "
        "clone the repository, or set DEEPABDOMINALREG_BENCHMARKS to the folder holding it."
    )


def _cmd_benchmark(args: argparse.Namespace) -> int:
    folder = _benchmarks_dir()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("run_benchmark", folder / "run_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    passed = list(args.benchmark_args)
    if passed and passed[0] == "--":
        passed = passed[1:]
    return int(module.main(passed) or 0)


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
    ev_parser.add_argument("--phantom-spacing", type=float, default=3.0, help="phantom voxel spacing (mm)")
    ev_parser.add_argument("--ct", help="a CT to deform synthetically (NIfTI/NRRD/DICOM folder)")
    ev_parser.add_argument("--ct-seg", help="its label map (same grid)")
    ev_parser.add_argument("--ct-label-names", help="JSON {id: name} (or {key: {id: name}} with --ct-label-key)")
    ev_parser.add_argument("--ct-label-key", default=None, help="e.g. 'total' for TotalSegmentator's label map JSON")
    ev_parser.add_argument("--ct-seeds", default="0")
    ev_parser.add_argument("--generator", default="abdominal", help="abdominal, van_eijnatten or both (comma list)")
    ev_parser.add_argument("--noise-hu", type=float, default=15.0, help="CT noise added to generated CT pairs")
    ev_parser.add_argument("--amplitudes", default="10", help="synthetic displacement amplitudes in mm, comma list "
                           "(e.g. 0,5,10,15,20,25)")
    ev_parser.add_argument("--cases-dir", help="where generated pairs are written (default OUTPUT/cases; reused)")
    ev_parser.add_argument("--presets", default="balanced", help="our presets to run, comma list (fast,balanced,accurate)")
    ev_parser.add_argument("--model", default=None, help="shipped model name or .pt path (default: none)")
    ev_parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev_parser.add_argument("--threads", type=int, default=2, help="CPU threads per method")
    ev_parser.add_argument("--io-iterations", type=int, default=None)
    ev_parser.add_argument("--working-spacing", type=float, default=None)
    ev_parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                           help="leave out the 'none' row (no registration)")
    ev_parser.add_argument("--isolate", action="store_true",
                           help="run each pair in a fresh process (peak memory per pair; slower start)")
    ev_parser.set_defaults(func=_cmd_evaluate)

    bench = subparsers.add_parser(
        "benchmark", help="side-by-side benchmark vs elastix, ANTs, SimpleITK (needs a source checkout)",
        description="Runs benchmarks/run_benchmark.py of the source checkout (or of $DEEPABDOMINALREG_BENCHMARKS); "
                    "every option is passed on, e.g. `deepabdominalreg benchmark --smoke --out /tmp/b`; "
                    "`deepabdominalreg benchmark --help` shows them.",
        add_help=False, prefix_chars="+",  # no options of its own: '--x' is handed to run_benchmark.py
    )
    bench.add_argument("benchmark_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_benchmark)
