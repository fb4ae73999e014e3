"""The ``deepabdominalreg`` command-line tool: register, demo, phantom (see ``deepabdominalreg --help``)."""


from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepabdominalreg import __version__
from deepabdominalreg.config import PRESETS, RegistrationConfig, config_from_preset
from deepabdominalreg.io import (
    IMAGE_FORMATS,
    OUTPUT_CHOICES,
    ImageValidationError,
    check_outputs_safe,
    output_file_names,
    parse_outputs,
    read_image,
    read_labels,
    read_landmarks,
    write_result,
)
from deepabdominalreg.nn.models import ModelError
from deepabdominalreg.registration.pipeline import (
    ProgressEvent,
    RegistrationCancelled,
    register_pair,
)

EXIT_INPUT_ERROR = 2
EXIT_SUSPECT = 3
"""``register``: the outputs were written but the plausibility checks found the result suspect
(``metrics.json``: ``status``, ``suspect_reasons``; the reasons are printed on stderr); ``--accept-suspect`` exits 0."""
EXIT_CANCELLED = 130


def _read_label_names(path: str | None, seg_path: str | None) -> dict[int, str]:
    candidates = [Path(path)] if path else []
    if seg_path and not path:
        candidates.append(Path(seg_path).resolve().parent / "labels.json")
    for candidate in candidates:
        if candidate.exists():
            data = json.loads(candidate.read_text())
            return {int(k): str(v) for k, v in data.items()}
        if path:
            raise ImageValidationError(f"label names file '{candidate}' does not exist.")
    return {}


def _progress_printer(as_json: bool):
    last = {"stage": None}

    def show(event: ProgressEvent) -> None:
        if as_json:
            print(json.dumps(event.as_dict()), flush=True)
        elif event.stage != last["stage"] or event.message.endswith(tuple("0123456789s")):
            print(f"[{event.fraction * 100:5.1f}%] {event.stage}: {event.message}", file=sys.stderr, flush=True)
            last["stage"] = event.stage

    return show


def _build_config(args: argparse.Namespace) -> RegistrationConfig:
    """Preset (default balanced), then ``--config FILE`` (JSON of RegistrationConfig fields), then explicit flags."""
    config = config_from_preset(args.preset or "balanced")
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            data = json.loads(path.read_text())
            config = RegistrationConfig.from_dict(data, base=config)
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise ImageValidationError(f"configuration file '{path}' cannot be used: {exc}") from exc
    overrides = {}
    if args.device is not None:
        overrides["device"] = args.device
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.model is not None:
        overrides["model"] = None if args.model.lower() in ("none", "") else args.model
    if args.no_affine:
        overrides["affine"] = False
    if args.no_body_mask:
        overrides["body_mask"] = False
    if args.io_iterations is not None:
        overrides["io_iterations"] = args.io_iterations
    if args.working_spacing is not None:
        overrides["working_spacing_mm"] = args.working_spacing
    if args.no_inverse:
        overrides["compute_inverse"] = False
    if args.threads:
        overrides["threads"] = args.threads
    if getattr(args, "network_precision", None):
        overrides["network_precision"] = args.network_precision
    try:
        return config.replace(**overrides)
    except ValueError as exc:  # a bad value of a flag, e.g. --io-iterations -1
        raise ImageValidationError(f"invalid option: {exc}") from exc


def _cmd_register(args: argparse.Namespace) -> int:
    config = _build_config(args)
    fixed = read_image(args.fixed, "fixed image")
    moving = read_image(args.moving, "moving image")
    moving_labels = read_labels(args.moving_seg, "moving segmentation") if args.moving_seg else None
    fixed_labels = read_labels(args.fixed_seg, "fixed segmentation") if args.fixed_seg else None
    if bool(args.fixed_landmarks) != bool(args.moving_landmarks):
        raise ImageValidationError("give both --fixed-landmarks and --moving-landmarks (same points, same order).")
    fixed_points = read_landmarks(args.fixed_landmarks, "fixed landmarks") if args.fixed_landmarks else None
    moving_points = read_landmarks(args.moving_landmarks, "moving landmarks") if args.moving_landmarks else None
    names = _read_label_names(args.label_names, args.fixed_seg or args.moving_seg)
    masks = {key: read_labels(path, role) if path else None
             for key, path, role in (("exclude_mask", args.exclude_mask, "exclusion mask"),
                                     ("moving_exclude_mask", args.moving_exclude_mask, "moving exclusion mask"),
                                     ("rigid_mask", args.rigid_mask, "rigid mask"))}
    outputs = parse_outputs(getattr(args, "outputs", None))
    inputs = {"fixed image": args.fixed, "moving image": args.moving, "moving segmentation": args.moving_seg,
              "fixed segmentation": args.fixed_seg, "fixed landmarks": args.fixed_landmarks,
              "moving landmarks": args.moving_landmarks, "label names": args.label_names, "config": args.config,
              "exclusion mask": args.exclude_mask, "moving exclusion mask": args.moving_exclude_mask,
              "rigid mask": args.rigid_mask}
    # refused before the registration, so that nothing runs (or is written) for an unusable output folder
    planned = output_file_names(outputs, args.output_format, labels=moving_labels is not None,
                                inverse=config.compute_inverse, landmarks=moving_points is not None,
                                report=not args.no_report)
    check_outputs_safe(args.output_dir, list(planned.values()), inputs)
    result = register_pair(
        fixed,
        moving,
        config=config,
        moving_labels=moving_labels,
        fixed_labels=fixed_labels,
        fixed_landmarks_lps=fixed_points,
        moving_landmarks_lps=moving_points,
        label_names=names,
        **masks,
        progress=_progress_printer(args.progress_json),
    )
    result.metrics["inputs"] = {"fixed": str(args.fixed), "moving": str(args.moving)}
    paths = write_result(
        result, args.output_dir, fixed=fixed, moving=moving, fixed_labels=fixed_labels,
        moving_labels=moving_labels, report=not args.no_report, image_format=args.output_format,
        outputs=outputs, inputs=inputs, threads=config.threads or 2,
    )
    _print_summary(result.metrics, paths, as_json=args.progress_json)
    return _report_status(result.metrics, accept_suspect=getattr(args, "accept_suspect", False))


def _report_status(metrics: dict, accept_suspect: bool) -> int:
    """A suspect result: one line per reason on stderr, and :data:`EXIT_SUSPECT` unless ``accept_suspect``."""
    if metrics.get("status", "ok") == "ok":
        return 0
    reasons = metrics.get("suspect_reasons") or ["(no reason recorded)"]
    print(f"SUSPECT RESULT: the registration may have failed ({len(reasons)} check(s) failed; outputs were "
          "written, inspect report.png before use):", file=sys.stderr)
    for reason in reasons:
        print(f"  - {reason}", file=sys.stderr)
    if accept_suspect:
        print("--accept-suspect given: exit code 0.", file=sys.stderr)
        return 0
    print(f"exit code {EXIT_SUSPECT} (give --accept-suspect to exit 0 anyway).", file=sys.stderr)
    return EXIT_SUSPECT


def _print_summary(metrics: dict, paths: dict[str, Path], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"stage": "finished", "fraction": 1.0, "outputs": {k: str(v) for k, v in paths.items()},
                          "status": metrics.get("status"), "suspect_reasons": metrics.get("suspect_reasons", [])}))
        return
    lines = [f"runtime {metrics['runtime_s']:.1f} s on {metrics['device']}"]
    if "dice_mean_after" in metrics:
        lines.append(
            f"mean Dice {metrics['dice_mean_before']:.3f} (before) -> {metrics['dice_mean_affine']:.3f} (affine) "
            f"-> {metrics['dice_mean_after']:.3f} (after)"
        )
    if "tre_mean_after_mm" in metrics:
        lines.append(f"landmark TRE {metrics['tre_mean_before_mm']:.2f} mm -> {metrics['tre_mean_after_mm']:.2f} mm")
    lines.append(f"folding {metrics['folding_percent']:.3f} % of body voxels, SDlogJ {metrics['sdlogj']:.3f}")
    for warning in metrics.get("warnings", []):
        lines.append(f"warning: {warning}")
    if "status" in metrics:
        lines.append(f"plausibility checks: {metrics['status']}")
    lines.append("outputs: " + ", ".join(str(p) for p in paths.values()))
    print("\n".join(lines))


def _cmd_phantom(args: argparse.Namespace) -> int:
    from deepabdominalreg.synthetic.pairs import make_phantom_pair, write_pair

    spacing = _parse_spacing(args.spacing)
    pair = make_phantom_pair(seed=args.seed, spacing_mm=spacing, amplitude_mm=args.amplitude)
    paths = write_pair(pair, args.output_dir)
    print("phantom pair written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _parse_spacing(text: str) -> float | tuple[float, float, float]:
    parts = [float(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return (parts[0], parts[1], parts[2])
    raise ImageValidationError(f"spacing '{text}' must be one number (isotropic) or three (x,y,z), in mm.")


def _cmd_demo(args: argparse.Namespace) -> int:
    from deepabdominalreg.synthetic.pairs import make_phantom_pair, write_pair

    out = Path(args.output_dir)
    seed = args.seed or 0
    print(f"generating a phantom patient pair (seed {seed}, {args.spacing} mm) ...", file=sys.stderr)
    pair = make_phantom_pair(seed=seed, spacing_mm=_parse_spacing(args.spacing))
    paths = write_pair(pair, out / "input")
    # the register command's own parser fills every other option with its default (a hand-built namespace had
    # fallen behind when register gained --output-format)
    argv = ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
            "--fixed-seg", str(paths["fixed_seg"]), "--moving-seg", str(paths["moving_seg"]),
            "--fixed-landmarks", str(paths["fixed_landmarks"]), "--moving-landmarks", str(paths["moving_landmarks"]),
            "--label-names", str(paths["labels"]), "--output-dir", str(out), "--outputs", "all"]
    for flag, value in (("--device", args.device), ("--model", args.model), ("--preset", args.preset),
                        ("--seed", args.seed)):
        if value is not None:
            argv += [flag, str(value)]
    code = _cmd_register(build_parser().parse_args(argv))
    print(f"report: {out / 'report.png'}")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepabdominalreg",
        description="Deep-learning deformable registration of abdominal CT (DeepAbdominalReg core).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="compute device (auto)")
        p.add_argument("--model", default=None, help="shipped model name, path to a .pt, or 'none' "
                       "(default: the configured default model)")
        p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="speed/accuracy preset (balanced)")
        p.add_argument("--seed", type=int, default=None, help="random seed (0)")

    reg = sub.add_parser("register", help="register a moving CT onto a fixed CT")
    reg.add_argument("--fixed", required=True, help="fixed image: NIfTI/NRRD/MHA file or DICOM folder")
    reg.add_argument("--moving", required=True, help="moving image")
    reg.add_argument("--moving-seg", help="moving label map (warped to the fixed grid)")
    reg.add_argument("--fixed-seg", help="fixed label map (for Dice/HD95)")
    reg.add_argument("--label-names", help="JSON {label id: name} (default: labels.json beside the segmentation)")
    reg.add_argument("--fixed-landmarks", help="CSV x,y,z (mm, LPS) or Slicer .mrk.json")
    reg.add_argument("--moving-landmarks", help="corresponding moving landmarks, same order")
    reg.add_argument("--exclude-mask", help="fixed-image mask (non-zero voxels) left out of the deformable "
                     "registration's similarity: a lesion seen in one scan only, an artefact")
    reg.add_argument("--moving-exclude-mask", help="the same for the moving image (mapped by the affine)")
    reg.add_argument("--rigid-mask", help="fixed-image mask of a region kept rigid (a tumour, a bone): it moves as a "
                     "whole while the tissue around it deforms (weight: io_rigidity_weight in --config)")
    reg.add_argument("--output-dir", required=True)
    add_run_options(reg)
    reg.add_argument("--config", help="JSON file of RegistrationConfig fields (applied after --preset, before flags)")
    reg.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment")
    reg.add_argument("--no-body-mask", action="store_true", help="keep the CT table and outside air")
    reg.add_argument("--io-iterations", type=int, default=None, help="instance-optimisation iterations per level "
                     "(0 = off)")
    reg.add_argument("--working-spacing", type=float, default=None, help="working grid spacing (mm)")
    reg.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    reg.add_argument("--no-inverse", action="store_true", help="skip the inverse field")
    reg.add_argument("--network-precision", choices=("auto", "fp32", "bf16"), default=None,
                     help="network forward pass precision: bf16 autocast where the device computes it natively "
                          "(bf16), only where that is faster for the shipped model (auto: CPUs with AVX512-BF16/AMX), "
                          "or never (fp32)")
    reg.add_argument("--no-report", action="store_true", help="skip report.png")
    reg.add_argument("--output-format", choices=IMAGE_FORMATS, default="nii.gz",
                     help="image files: nii.gz (compressed, default) or uncompressed nii/nrrd/mha (faster to write)")
    reg.add_argument("--outputs", default=None,
                     help="comma-separated files to write: " + ", ".join(OUTPUT_CHOICES) + "; 'all' (every one), "
                          "'default' (transform,warped,labels) or '+NAME' (the default and NAME); metrics.json is "
                          "always written, report.png unless --no-report")
    reg.add_argument("--progress-json", action="store_true", help="print progress as JSON lines on stdout")
    reg.add_argument("--accept-suspect", action="store_true",
                     help=f"exit 0 even when the plausibility checks flag the result as suspect (default: exit "
                          f"{EXIT_SUSPECT}; the reasons are printed and in metrics.json either way)")
    reg.set_defaults(func=_cmd_register)

    demo = sub.add_parser("demo", help="generate a phantom pair, register it, write outputs and report.png")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--spacing", default="2.0", help="phantom spacing in mm (one value or x,y,z)")
    add_run_options(demo)
    demo.set_defaults(func=_cmd_demo)

    ph = sub.add_parser("phantom", help="write a synthetic phantom pair with ground-truth displacement")
    ph.add_argument("--output-dir", required=True)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--spacing", default="2.0", help="mm: one value or x,y,z (e.g. 0.8,0.8,2.5)")
    ph.add_argument("--amplitude", type=float, default=10.0, help="deformation amplitude (mm)")
    ph.set_defaults(func=_cmd_phantom)
    from deepabdominalreg.apply import add_commands as add_apply_commands
    add_apply_commands(sub)
    from deepabdominalreg.batch import add_commands as add_batch_commands
    add_batch_commands(sub)
    from deepabdominalreg.jacobian import add_commands as add_jacobian_commands
    add_jacobian_commands(sub)
    from deepabdominalreg.evaluation.cli import add_commands as add_evaluation_commands
    add_evaluation_commands(sub)
    from deepabdominalreg.training.cli import add_commands
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ImageValidationError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (RegistrationCancelled, KeyboardInterrupt):
        print("cancelled: no output was written.", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    raise SystemExit(main())
