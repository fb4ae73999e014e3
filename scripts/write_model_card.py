"""Write DeepAbdominalReg/deepabdominalreg/nn/weights/MODEL_CARD.md from the JSON model cards beside the weights.

Usage: python scripts/write_model_card.py [EXTRA.md]   (EXTRA.md: hand-written notes appended after the tables)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "DeepAbdominalReg" / "deepabdominalreg" / "nn" / "weights"


def card_table(card: dict) -> list[str]:
    t = card.get("training", {})
    v = card.get("validation", {})
    cfg = t.get("config", {})
    data = t.get("data", {})
    volumes = ", ".join(Path(p).name for p in data.get("volumes", []) if p) or "none"
    nan = float("nan")
    return [
        f"## {card['name']}", "",
        "| field | value |", "|---|---|",
        f"| weights | `{card['weights']}` ({card['size_bytes'] / 1e6:.2f} MB) |",
        f"| SHA-256 | `{card['sha256']}` |",
        (f"| architecture | {card['architecture']} {json.dumps(card['settings'])} (displacement in voxels of the "
        "input grid, channels d, h, w) |"),
        (f"| input | isotropic {card['input_spacing_mm']:g} mm grid, HU window {card['hu_window']}, body-masked, "
        "intensities in [0, 1] (`preprocessing.prepare_working_image`); the pipeline runs it after the affine "
        "pre-alignment |"),
        (f"| training data | procedural phantom patients {data.get('phantom_seeds')} (seed range) at "
        f"{card['input_spacing_mm']:g} mm + {volumes}; synthetic pairs made on the fly |"),
        (f"| validation data | held-out phantom patients {data.get('validation_phantom_seeds')} "
        "(`make_phantom_pair`, 10 mm motion); `example_ct.nii.gz` never used in training |"),
        f"| loss | {json.dumps(cfg.get('loss_weights'))}, uncertainty weighting {cfg.get('uncertainty_weighting')} |",
        f"| command | `{t.get('command')}` |",
        (f"| training | {t.get('epochs')} epochs, {t.get('iterations')} iterations, "
        f"{t.get('seconds', 0) / 60:.1f} min on {t.get('hardware')} |"),
        (f"| best validation (epoch {v.get('epoch')}) | Dice {v.get('val_dice', nan):.4f} (before "
        f"{v.get('val_dice_before', nan):.4f}), endpoint error {v.get('val_epe_mm', nan):.2f} mm, folding "
        f"{v.get('val_folding_percent', nan):.3f} % (network alone on the {card['input_spacing_mm']:g} mm grid, "
        "no affine) |"),
        f"| created | {card.get('created')} |", "",
    ]


def main(argv: list[str]) -> int:
    out = ["# Shipped models", ""]
    for path in sorted(MODELS.glob("*.json")):
        out += card_table(json.loads(path.read_text()))
    if argv:
        out.append(Path(argv[0]).read_text())
    (MODELS / "MODEL_CARD.md").write_text("\n".join(out).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
