"""Re-save a model with changed inference-only architecture settings (same weights), e.g. output smoothing.

The card keeps its provenance; the change, the new SHA-256 and the command are recorded under ``post_training``.

    python scripts/set_model_setting.py --model DeepAbdominalReg/deepabdominalreg/nn/weights/NAME.pt \
        output_smoothing=12 \
        [--output OTHER.pt] [--validation-json METRICS.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from deepabdominalreg.nn.models import load_model, save_model
from deepabdominalreg.nn.networks import build_network

INFERENCE_ONLY = {"output_smoothing", "boundary_padding"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model name or .pt path")
    parser.add_argument("settings", nargs="+", help="KEY=VALUE (JSON value)")
    parser.add_argument("--output", default=None, help="new .pt path (default: overwrite the model)")
    parser.add_argument("--validation-json", default=None, help="replace the card's validation block by this JSON")
    args = parser.parse_args(argv)
    network, card = load_model(args.model)
    settings = dict(card.settings)
    changes = {}
    for item in args.settings:
        key, _, value = item.partition("=")
        if key not in INFERENCE_ONLY:
            raise SystemExit(f"'{key}' changes what the weights mean; only {sorted(INFERENCE_ONLY)} can be set here")
        changes[key] = json.loads(value)
    settings.update(changes)
    rebuilt = build_network(card.architecture, settings)
    rebuilt.load_state_dict(network.state_dict())
    extra = {k: v for k, v in card.extra.items() if k != "size_bytes"}
    history = list(extra.get("post_training", []))
    history.append({"changed": changes, "previous_sha256": card.sha256,
                    "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])})
    extra["post_training"] = history
    if args.validation_json:
        extra["validation"] = json.loads(Path(args.validation_json).read_text())
    out = Path(args.output) if args.output else card.weights_path
    new = save_model(rebuilt, card.architecture, settings, out, name=out.stem if args.output else card.name,
                     input_spacing_mm=card.input_spacing_mm, hu_window=card.hu_window, extra=extra)
    print(f"{new.name}: settings {changes} -> {new.weights_path} (SHA-256 {new.sha256})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
