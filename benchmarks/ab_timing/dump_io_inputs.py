"""Save the instance-optimisation stage's inputs and result for one benchmark case (``register_pair``, balanced).

    python benchmarks/ab_timing/dump_io_inputs.py CASES/ct_abdominal_s0_a10 /tmp/io_ct.pt
"""

from __future__ import annotations

import sys

import SimpleITK as sitk
import torch
from deepabdominalreg import registration
from deepabdominalreg.config import config_from_preset
from deepabdominalreg.image import read_image


def main() -> None:
    case, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    fixed, moving = read_image(f"{case}/fixed.nii.gz", "fixed"), read_image(f"{case}/moving.nii.gz", "moving")
    original = registration.instance_optimise

    def saving(fixed_t, moving_t, initial, mask, settings, callback=None):
        result = original(fixed_t, moving_t, initial, mask, settings, callback=callback)
        torch.save({"fixed": fixed_t, "moving": moving_t, "initial": initial, "mask": mask,
                    "settings": dict(settings.__dict__), "result": result}, out)
        return result

    registration.instance_optimise = saving
    registration.register_pair(fixed, moving, config=config_from_preset("balanced", device="cpu", threads=1))


if __name__ == "__main__":
    main()
