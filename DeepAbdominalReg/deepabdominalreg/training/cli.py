"""``deepabdominalreg train | finetune | evaluate-model``: command-line front ends of
:mod:`deepabdominalreg.training`."""

from __future__ import annotations

import argparse
import json
import shlex

__all__ = ["add_commands"]


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (rebuilt from the parsed options, so it is right when called through ``main(argv)``)."""
    words = ["deepabdominalreg", args.command]
    for key, value in sorted(vars(args).items()):
        if key in ("command", "func") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def _overrides(args: argparse.Namespace) -> dict:
    return {
        "name": args.name, "out_dir": args.out_dir, "model_dir": args.model_dir, "seed": args.seed,
        "epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch, "max_minutes": args.max_minutes,
        "threads": args.threads, "device": args.device, "cache_dir": args.cache_dir,
        "resume": False if args.no_resume else None,
    }


def _threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(int(args.threads))


def _print_summary(summary: dict) -> None:
    best = summary.get("best", {})
    print(json.dumps({"model": summary.get("model"), "epochs": summary.get("epochs"),
                      "seconds": round(float(summary.get("seconds", 0.0)), 1),
                      "best": {k: v for k, v in best.items()}}, indent=1))


def _cmd_train(args: argparse.Namespace) -> int:
    from deepabdominalreg.training.config import load_config
    from deepabdominalreg.training.loop import train, train_incremental

    _threads(args)
    config = load_config(args.config, **_overrides(args))
    if args.incremental_chunks:
        summary = train_incremental(config, args.incremental_chunks, command=_command_line(args))
        print(json.dumps({"model": summary["model"]}, indent=1))
        return 0
    _print_summary(train(config, command=_command_line(args)))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from deepabdominalreg.training.config import load_config
    from deepabdominalreg.training.loop import train

    _threads(args)
    overrides = _overrides(args)
    overrides.update(init_model=args.model, learning_rate=args.learning_rate,
                     freeze_encoder_epochs=args.frozen_epochs if args.two_step else 0)
    config = load_config(args.config, **overrides)
    _print_summary(train(config, command=_command_line(args)))
    return 0


def _cmd_evaluate_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deepabdominalreg.evaluation.cases import CaseSet
    from deepabdominalreg.evaluation.methods import method_specs
    from deepabdominalreg.evaluation.runners import run_evaluation
    from deepabdominalreg.io import ImageValidationError

    _threads(args)
    out = Path(args.output_dir)
    try:  # names and the model are checked before any pair is generated; no inverse field: the runtime is the
        # registration itself
        methods = method_specs([m for m in args.methods.split(",") if m], model=args.model, compute_inverse=False)
        cases = CaseSet(
            phantom_seeds=tuple(int(s) for s in args.phantom_seeds.split(",") if s),
            phantom_amplitudes_mm=(args.amplitude,), phantom_spacing_mm=args.phantom_spacing,
            ct=args.ct, ct_seg=args.ct_labels, ct_label_names=args.ct_label_names, ct_label_key=args.ct_label_key,
            ct_seeds=tuple(int(s) for s in args.ct_seeds.split(",") if s), ct_amplitudes_mm=(args.amplitude,),
        ).make(Path(args.cases_dir) if args.cases_dir else out / "cases", log=print)
    except ValueError as exc:
        raise ImageValidationError(str(exc)) from exc
    rows = run_evaluation(cases, methods, out, threads=args.threads, isolate=False)
    print((out / "summary.md").read_text())
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def add_commands(subparsers) -> None:
    """Add ``train``, ``finetune`` and ``evaluate-model`` to the ``deepabdominalreg`` command line."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True,
                       help="training config (JSON or TOML; see deepabdominalreg/training/configs/)")
        p.add_argument("--name", default=None, help="model name (card name and file stem)")
        p.add_argument("--out-dir", default=None, help="run folder: checkpoints, metrics.csv, metrics.png")
        p.add_argument("--model-dir", default=None, help="where the best model + card are written")
        p.add_argument("--cache-dir", default=None, help="cache of the prepared volumes (phantom pool)")
        p.add_argument("--epochs", type=int, default=None)
        p.add_argument("--iterations-per-epoch", type=int, default=None)
        p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget (stops at an epoch end)")
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
        p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
        p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT_DIR/last.pt exists")

    tr = subparsers.add_parser("train", help="train a registration network (resumes from OUT_DIR/last.pt); "
                               "multi-GPU: torchrun --nproc_per_node=N -m deepabdominalreg train ...")
    common(tr)
    tr.add_argument("--incremental-chunks", type=int, default=None,
                    help="incremental training: present the patients in this many chronological mini-batches")
    tr.set_defaults(func=_cmd_train)

    ft = subparsers.add_parser("finetune", help="transfer learning from a trained model (full or two-step)")
    common(ft)
    ft.add_argument("--model", required=True, help="model to start from (shipped name or .pt with its card)")
    ft.add_argument("--learning-rate", type=float, default=1e-4)
    ft.add_argument("--two-step", action="store_true", help="first train with the encoder frozen, then everything")
    ft.add_argument("--frozen-epochs", type=int, default=5, help="epochs with the frozen encoder (--two-step)")
    ft.set_defaults(func=_cmd_finetune)

    ev = subparsers.add_parser("evaluate-model", help="compare a model's network variants with no registration, "
                               "the affine and instance optimisation on held-out phantom pairs and synthetic "
                               "deformations of a real CT")
    ev.add_argument("--model", default=None, help="model of the network variants (name or .pt; default: the "
                    "network preset's)")
    ev.add_argument("--output-dir", required=True)
    ev.add_argument("--methods", default="none,affine,network,network+io,balanced",
                    help="'none' and variants of our pipeline (deepabdominalreg.evaluation.methods.VARIANTS)")
    ev.add_argument("--phantom-seeds", default="0,1,2", help="held-out phantom seeds (never used in training)")
    ev.add_argument("--phantom-spacing", type=float, default=3.0)
    ev.add_argument("--amplitude", type=float, default=10.0, help="synthetic deformation amplitude (mm)")
    ev.add_argument("--ct", default=None, help="real CT deformed synthetically (e.g. example_ct.nii.gz)")
    ev.add_argument("--ct-labels", default=None)
    ev.add_argument("--ct-label-names", default=None, help="JSON {id: name} (or {key: {id: name}} with "
                    "--ct-label-key)")
    ev.add_argument("--ct-label-key", default=None, help="e.g. 'total' for TotalSegmentator's label map JSON")
    ev.add_argument("--ct-seeds", default="0,1")
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--cases-dir", default=None, help="where the pairs are written once and reused "
                    "(default OUTPUT_DIR/cases)")
    ev.set_defaults(func=_cmd_evaluate_model)
