"""Side-by-side benchmark: our pipeline (each variant) vs elastix, ANTs SyN and SimpleITK demons.

All methods get the same pairs, run one after the other with the same thread count, each in a fresh process, and
are timed from reading the images to the displacement field (imports excluded, reported apart); the same code
(:func:`deepabdominalreg.evaluation.scoring.evaluate_displacement`) scores every field.  Results go to ``--out``:
``per_pair.csv``, ``per_label.csv``, ``summary.csv``, ``summary.md`` (tables, targets, environment),
``settings.json`` + ``elastix_parameters.txt`` (every method's parameters) and PNG plots.

Full run (see benchmarks/README.md for the exact command used for the published table)::

    deepabdominalreg benchmark --out benchmarks/results

Smoke run (seconds; what CI's test does)::

    deepabdominalreg benchmark --smoke --out /tmp/bench-smoke

Trust benchmark (issue 17): ``--classes trust`` runs the pair classes of
:data:`deepabdominalreg.evaluation.cases.TRUST_CLASSES` (real CT cut through the lungs with a far moving origin,
phantoms, inter-patient phantoms, the real CT against another patient, deliberately broken pairs); ``summary.md``
has one table per class and a table of which broken pairs each method flagged (``per_pair.csv``: ``flagged``)::

    deepabdominalreg benchmark --classes trust --out benchmarks/results-trust

(``python -m deepabdominalreg.evaluation.benchmark`` takes the same options.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from deepabdominalreg.evaluation.cases import (
    PAIR_CLASSES,
    TRUST_CLASSES,
    CaseSet,
    generate_phantom_cases,
    write_pairs_csv,
)
from deepabdominalreg.evaluation.methods import NONE, method_specs, our_method
from deepabdominalreg.evaluation.peers import available_peers, elastix_parameter_maps
from deepabdominalreg.evaluation.runners import run_evaluation
from deepabdominalreg.evaluation.tables import as_number, flag_state, is_broken, write_rows

#: The real CT of a source checkout's shared data (beside the repository), the default ``--ct`` when present.
SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "totalsegmentator"
#: Our variant the targets are checked on: the default pipeline.
DEFAULT_VARIANT = "balanced"
DEFAULT_METHOD = f"ours-{DEFAULT_VARIANT}"


def training_running() -> list[str]:
    """Command lines of other processes that look like a network training job at normal priority (niced jobs,
    e.g. background ablations, get almost no CPU next to ours and are not waited for)."""
    try:
        output = subprocess.run(["ps", "-eo", "pid=,ni=,args="], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    me = os.getpid()
    found = []
    for line in output.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        pid, nice, args = parts
        if nice.lstrip("-").isdigit() and int(nice) > 0:
            continue
        if "train" in args.lower() and int(pid) != me and "grep" not in args and "benchmark" not in args:
            found.append(args[:120])
    return found


def wait_for_cpu(poll_s: float = 30.0) -> None:
    """Return once :func:`training_running` finds no training job (polled every ``poll_s`` seconds)."""
    announced = False
    while True:
        jobs = training_running()
        if not jobs:
            return
        if not announced:
            print(f"waiting: a training job is running ({jobs[0]}) ...", flush=True)
            announced = True
        time.sleep(poll_s)


def targets_markdown(rows: list[dict], memory: dict | None) -> str:
    """The product's targets (accuracy against the peers, folding, speed ratio, network time, memory), checked on
    this run (ratios within the run)."""
    broken = [r for r in rows if is_broken(r)]
    ok = [r for r in rows if r.get("status") == "ok" and not is_broken(r)]
    timed = [r for r in ok if as_number(r.get("nice")) <= 0 or r.get("nice") in (None, "")]  # comparable clocks
    peers = [m for m in ("elastix-bspline", "ants-syn", "ants-synra", "convexadam", "sitk-demons")
             if any(r["method"] == m for r in ok)]
    lines = ["| target | result | met? |", "|---|---|---|"]

    def mean(method, metric, source=None):
        values = [as_number(r.get(metric)) for r in ok if r["method"] == method
                  and (source is None or r.get("source") == source)]
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    sources = sorted({r.get("source") for r in ok if r["method"] == DEFAULT_METHOD})
    for source in sources:
        ours = mean(DEFAULT_METHOD, "dice_organs", source)
        if math.isnan(ours):
            ours = mean(DEFAULT_METHOD, "dice_mean", source)
        for peer in peers:
            theirs = mean(peer, "dice_organs", source)
            if math.isnan(theirs):
                theirs = mean(peer, "dice_mean", source)
            if not math.isnan(theirs):
                lines.append(f"| {source}: organ Dice ours >= {peer} | {ours:.3f} vs {theirs:.3f} | "
                             f"{'yes' if ours >= theirs else 'no'} |")
        # TRE: landmarks where the pairs have them, else the label centroids (inter-patient pairs)
        metric = "tre_mean_mm" if not math.isnan(mean(DEFAULT_METHOD, "tre_mean_mm", source)) \
            else "centroid_tre_mean_mm"
        ours = mean(DEFAULT_METHOD, metric, source)
        best = min((mean(p, metric, source) for p in peers if not math.isnan(mean(p, metric, source))),
                   default=float("nan"))
        if not math.isnan(best):
            lines.append(f"| {source}: {'TRE' if metric == 'tre_mean_mm' else 'centroid TRE'} ours <= best peer | "
                         f"{ours:.2f} vs {best:.2f} mm | {'yes' if ours <= best else 'no'} |")
    sdlogj = mean(DEFAULT_METHOD, "sdlogj")
    elastix_sdlogj = mean("elastix-bspline", "sdlogj")
    if not math.isnan(sdlogj):
        met = sdlogj <= 0.15 and (math.isnan(elastix_sdlogj) or sdlogj <= elastix_sdlogj)
        lines.append(f"| SDlogJ <= 0.15 and <= elastix's (mean, {DEFAULT_METHOD}) | {sdlogj:.3f} vs "
                     f"{elastix_sdlogj:.3f} | {'yes' if met else 'no'} |")
    worst = max((as_number(r.get("folding_percent")) for r in ok if r["method"] == DEFAULT_METHOD),
                default=float("nan"))
    if not math.isnan(worst):
        lines.append(f"| folding < 0.01 % of body voxels (worst pair, {DEFAULT_METHOD}) | {worst:.4f} % | "
                     f"{'yes' if worst < 0.01 else 'no'} |")
    for method in [m for m in dict.fromkeys(r["method"] for r in broken) if m.startswith("ours-")]:
        states = [flag_state(r) for r in broken if r["method"] == method]
        caught = sum(s != "not flagged" for s in states)
        lines.append(f"| every deliberately broken pair flagged ({method}; failed runs count as not silent) | "
                     f"{caught}/{len(states)} | {'yes' if caught == len(states) else 'no'} |")
    folding = max((as_number(r.get("folding_percent")) for r in ok if r["method"] == DEFAULT_METHOD),
                  default=float("nan"))
    lines.append(f"| folding < 0.5 % (worst pair, {DEFAULT_METHOD}) | {folding:.3f} % | "
                 f"{'yes' if folding < 0.5 else 'no'} |")
    # speed: per case, the fastest of elastix / ANTs (the registration peers the targets name) against ours
    registration_peers = ("elastix-bspline", "ants-syn", "ants-synra")

    def speed_ratios(slower: tuple[str, ...], method: str) -> list[float]:
        """Per case: the fastest of ``slower``'s runtimes over ``method``'s, sorted."""
        ratios = []
        for case in sorted({r["case"] for r in timed}):
            times = {r["method"]: as_number(r["runtime_s"]) for r in timed if r["case"] == case}
            peer_times = [times[m] for m in slower if m in times]
            if peer_times and method in times:
                ratios.append(min(peer_times) / times[method])
        return sorted(ratios)

    def ratio_cells(ratios: list[float]) -> str:
        return f"median {statistics.median(ratios):.2f}x (range {ratios[0]:.2f}–{ratios[-1]:.2f}x)"

    ratios = speed_ratios(registration_peers, DEFAULT_METHOD)
    if ratios:
        lines.append(f"| >= 10x faster than the fastest of elastix / ANTs (per pair, incl. reading) | "
                     f"{ratio_cells(ratios)} | {'yes' if ratios[0] >= 10 else 'no'} |")
        fast = speed_ratios(registration_peers, "ours-fast")
        if fast:
            lines.append(f"| (same, ours-fast) | {ratio_cells(fast)} | {'yes' if fast[0] >= 10 else 'no'} |")
        floor = speed_ratios(registration_peers, "ours-affine")
        if floor:
            lines.append(f"| (ceiling: ours-affine, every stage but the deformable ones, i.e. the ratio a deformable "
                         f"stage taking no time would give) | {ratio_cells(floor)} | – |")
    demons = speed_ratios(("sitk-demons",), DEFAULT_METHOD) if "sitk-demons" in peers else []
    if demons:
        lines.append(f"| (for reference) speed vs SimpleITK demons | {ratio_cells(demons)} | – |")
    net = [as_number(r.get("time_network_s")) for r in timed if r["method"] == "ours-network"]
    niced = [as_number(r.get("time_network_s")) for r in ok if r["method"] == "ours-network" and r not in timed]
    threads = sorted({str(r.get("threads")) for r in ok if r["method"] == "ours-network"})
    label = (f"network stage of `ours-network` (model input preparation + forward), < 3 s "
             f"(CPU, {'/'.join(threads)} thread(s); `network_speed.py` times the forward alone)")
    if net:
        lines.append(f"| {label} | mean {sum(net) / len(net):.2f} s, max {max(net):.2f} s | "
                     f"{'yes' if max(net) < 3 else 'no'} |")
    elif niced:  # measured while yielding the CPU to other jobs: an upper bound
        lines.append(f"| {label} | max {max(niced):.2f} s, measured at nice 19 "
                     f"beside other jobs (an upper bound) | {'yes' if max(niced) < 3 else 'not shown'} |")
    else:
        lines.append("| network-only inference < 3 s | not measured: no trained model shipped | – |")
    if memory:
        peak = memory.get("peak_rss_mb")
        lines.append(f"| peak memory, 512x512x400 int16 pair, CPU < 6 GB | {peak / 1024:.2f} GiB "
                     f"({memory.get('description', '')}) | {'yes' if peak / 1024 < 6 else 'no'} |")
    return "\n".join(lines)


def _list(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def _classes(text: str) -> tuple[str, ...]:
    """``--classes``: names of :data:`PAIR_CLASSES`, ``trust`` standing for :data:`TRUST_CLASSES`."""
    names: list[str] = []
    for name in _list(text):
        names += TRUST_CLASSES if name == "trust" else [name]
    return tuple(dict.fromkeys(names))


def _with_flag(row: dict) -> dict:
    """``row`` with ``flagged`` (:func:`~deepabdominalreg.evaluation.tables.flag_state`) after ``status``."""
    out: dict = {}
    for key, value in row.items():
        out[key] = value
        if key == "status":
            out["flagged"] = flag_state(row)
    return out


def main(argv: list[str] | None = None) -> int:
    """The benchmark's command line (``deepabdominalreg benchmark``); returns 0 when every run succeeded."""
    parser = argparse.ArgumentParser(prog="deepabdominalreg benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ct_default = SHARED / "example_ct.nii.gz"
    parser.add_argument("--out", required=True, help="results folder (e.g. benchmarks/results)")
    parser.add_argument("--cases-dir", default=None, help="where generated pairs are written (default OUT/cases)")
    parser.add_argument("--pairs", default=None, help="a pairs CSV (evaluate these instead of/in addition to "
                        "generated pairs)")
    parser.add_argument("--phantom-seeds", default="0", help="comma list; empty for none")
    parser.add_argument("--phantom-spacing", type=float, default=2.0)
    parser.add_argument("--phantom-amplitudes", default="10")
    parser.add_argument("--ct", default=str(ct_default) if ct_default.is_file() else "",
                        help="real CT to deform ('' for none; default: the checkout's shared example CT if present)")
    parser.add_argument("--ct-seg", default=str(SHARED / "example_seg_fast_force_split.nii.gz"))
    parser.add_argument("--ct-label-names", default=str(SHARED / "label_map_total_and_total_mr.json"))
    parser.add_argument("--ct-label-key", default="total")
    parser.add_argument("--ct-seeds", default="0")
    parser.add_argument("--ct-amplitudes", default="5,10,20")
    parser.add_argument("--generator", default="abdominal", choices=["abdominal", "van_eijnatten"])
    parser.add_argument("--classes", default="",
                        help="pair classes (comma list) instead of the default CT + phantom pairs: "
                        f"{', '.join(PAIR_CLASSES)}; 'trust' = {','.join(TRUST_CLASSES)}")
    parser.add_argument("--interpatient-seeds", default="1:5,3:0",
                        help="inter-patient phantom pairs as fixed:moving seeds (class interpatient)")
    parser.add_argument("--other-ct-dir", default=str(SHARED / "aorta_crop"),
                        help="another patient's CT with structure masks named after the label names (classes "
                        "real_interpatient, broken)")
    parser.add_argument("--moving-offset-mm", default="0,0,300",
                        help="LPS mm added to the moving origin of the lungcut pairs (header only; the truth follows)")
    parser.add_argument("--ours", default="fast,balanced,accurate,network,network+io",
                        help="variants of our pipeline (comma list; deepabdominalreg.evaluation.methods.VARIANTS), "
                        "each run as 'ours-<variant>'")
    parser.add_argument("--model", default=None, help="model of the network variants (default: the network preset's)")
    parser.add_argument("--devices", default=None, help="cpu,cuda (default: cpu, plus cuda when available)")
    parser.add_argument("--peers", default="elastix-bspline,ants-syn,convexadam,sitk-demons",
                        help="comma list from: elastix-bspline, ants-syn, ants-synra, convexadam, sitk-demons")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per method and pair")
    parser.add_argument("--no-isolate", action="store_true", help="run methods in this process (no fresh process)")
    parser.add_argument("--wait-for-jobs", action="store_true",
                        help="before each run, wait while a training job (a process with 'train' in its command "
                        "line) runs")
    parser.add_argument("--resume", action="store_true", help="keep the successful runs already in --out")
    parser.add_argument("--memory-json", default=None, help="result of memory_test.py to include in the targets")
    parser.add_argument("--smoke", action="store_true", help="tiny run: one 6 mm phantom pair, fast settings")
    args = parser.parse_args(argv)
    if len(_list(args.moving_offset_mm)) != 3:
        parser.error(f"--moving-offset-mm needs 3 values (LPS x,y,z in mm), got {args.moving_offset_mm!r}")
    unknown = set(_classes(args.classes)) - set(PAIR_CLASSES)
    if unknown:
        parser.error(f"unknown pair class(es) {', '.join(sorted(unknown))}; choose from {', '.join(PAIR_CLASSES)} "
                     f"or 'trust'")

    import torch

    out = Path(args.out)
    cases_dir = Path(args.cases_dir) if args.cases_dir else out / "cases"
    devices = _list(args.devices) if args.devices else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    peers = _list(args.peers)

    if args.smoke:
        cases = generate_phantom_cases(cases_dir, seeds=[0], amplitudes_mm=[8.0], spacing_mm=6.0)
        methods = [NONE, our_method("fast", device="cpu", working_spacing_mm=6.0, io_iterations=20,
                                    affine_iterations=20)]
        quick = {"elastix-bspline": {"resolutions": 2, "max_iterations": 30},
                 "ants-syn": {}, "sitk-demons": {},  # ANTs' defaults take seconds at 6 mm
                 "convexadam": {"grid_sp": 2, "disp_hw": 3, "grid_sp_adam": 1, "selected_niter": 20}}
        for spec in available_peers(peers):
            if spec.name in quick:
                methods.append(dataclasses.replace(spec, options={**spec.options, **quick[spec.name]}))
    else:
        cases = CaseSet(
            pairs=args.pairs, phantom_seeds=tuple(int(s) for s in _list(args.phantom_seeds)),
            phantom_amplitudes_mm=tuple(float(a) for a in _list(args.phantom_amplitudes)),
            phantom_spacing_mm=args.phantom_spacing, ct=args.ct or None, ct_seg=args.ct_seg or None,
            ct_label_names=args.ct_label_names or None, ct_label_key=args.ct_label_key,
            ct_seeds=tuple(int(s) for s in _list(args.ct_seeds)),
            ct_amplitudes_mm=tuple(float(a) for a in _list(args.ct_amplitudes)), generators=(args.generator,),
            classes=_classes(args.classes),
            interpatient_seed_pairs=tuple(tuple(int(v) for v in p.split(":")) for p in _list(args.interpatient_seeds)),
            other_ct_dir=args.other_ct_dir or None,
            moving_origin_offset_mm=tuple(float(v) for v in _list(args.moving_offset_mm)),
        ).make(cases_dir, log=print)
        methods = [NONE, *method_specs(_list(args.ours), devices=devices, model=args.model),
                   *available_peers(peers)]
    for name in sorted(set(peers) - {m.name for m in methods}):
        print(f"skipping {name}: its package is not installed (pip install -e '.[bench]')", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    write_pairs_csv(cases, out / "pairs.csv")
    command = "deepabdominalreg benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = run_evaluation(
        cases, methods, out, threads=args.threads, isolate=not args.no_isolate, timeout_s=args.timeout,
        extra_info={"command": command, "methods": [m.name for m in methods]},
        before_each=wait_for_cpu if args.wait_for_jobs else None, resume=args.resume,
    )
    rows = [_with_flag(r) for r in rows]
    write_rows(rows, out / "per_pair.csv")
    elastix = next((m for m in methods if m.name == "elastix-bspline"), None)
    if elastix is not None:
        maps = elastix_parameter_maps(elastix.options.get("final_grid_spacing_mm", 10.0),
                                      elastix.options.get("resolutions", 4))
        with open(out / "elastix_parameters.txt", "w") as handle:
            for index, m in enumerate(maps):
                handle.write(f"// parameter map {index} ({'affine' if index == 0 else 'B-spline'})\n")
                handle.writelines(f"({key} {' '.join(json.dumps(v) for v in values)})\n" for key, values in m.items())
                handle.write("\n")
    memory = json.loads(Path(args.memory_json).read_text()) if args.memory_json else None
    with open(out / "summary.md", "a") as handle:
        handle.write("\n## Targets (this run)\n\n" + targets_markdown(rows, memory) + "\n")
    print((out / "summary.md").read_text())
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
