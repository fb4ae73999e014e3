"""Evaluation cases: pairs of image files with their labels, landmarks and (for synthetic pairs) the true
displacement; a ``pairs.csv`` lists them; phantom and real-CT cases are generated from the synthetic package.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deepabdominalreg.io import read_image, read_labels


@dataclass(frozen=True)
class EvaluationCase:
    """One image pair and its evaluation data (paths; all optional except the two images).

    ``true_displacement``: the known fixed -> moving field (synthetic pairs).  ``label_names``: JSON ``{id: name}``.
    ``source``/``amplitude_mm``/``seed`` describe generated cases (for the plots against amplitude).
    """

    name: str
    fixed: str
    moving: str
    fixed_seg: str | None = None
    moving_seg: str | None = None
    fixed_landmarks: str | None = None
    moving_landmarks: str | None = None
    label_names: str | None = None
    true_displacement: str | None = None
    source: str = "pairs"
    amplitude_mm: float | None = None
    seed: int | None = None


_CASE_COLUMNS = [f.name for f in dataclasses.fields(EvaluationCase)]


# --------------------------------------------------------------------------------------------------------------
# cases: pairs CSV and generated pairs
# --------------------------------------------------------------------------------------------------------------


def load_label_names(path: str | os.PathLike | None, key: str | None = None) -> dict[int, str]:
    """``{id: name}`` from a JSON file holding ``{id: name}``, or ``{key: {id: name}}`` (e.g. TotalSegmentator's
    ``label_map_total_and_total_mr.json`` with ``key="total"``).  ``None`` gives ``{}``."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    if key is not None:
        if key not in data:
            raise ValueError(f"label names file '{path}' has no key {key!r}; keys: {', '.join(map(str, data))}")
        data = data[key]
    if data and all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"label names file '{path}' holds several maps ({', '.join(data)}); choose one with a key")
    return {int(k): str(v) for k, v in data.items() if int(k) != 0}


def read_pairs_csv(path: str | os.PathLike) -> list[EvaluationCase]:
    """Cases from a CSV with a header: ``fixed, moving`` required; ``fixed_seg, moving_seg, fixed_landmarks,
    moving_landmarks, label_names, true_displacement, name, source, amplitude_mm, seed`` optional.
    Relative paths are relative to the CSV's folder; empty cells mean "none"."""
    path = Path(path)
    base = path.resolve().parent
    cases = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"fixed", "moving"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"pairs CSV '{path}' lacks the column(s) {', '.join(sorted(missing))}")
        unknown = set(reader.fieldnames or []) - set(_CASE_COLUMNS)
        if unknown:
            raise ValueError(f"pairs CSV '{path}' has unknown column(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(_CASE_COLUMNS)}")
        for index, row in enumerate(reader):
            values = {k: (v.strip() if isinstance(v, str) else v) or None for k, v in row.items()}
            for key in ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_landmarks", "moving_landmarks",
                        "label_names", "true_displacement"):
                if values.get(key):
                    p = Path(values[key])
                    values[key] = str(p if p.is_absolute() else base / p)
            if not values.get("fixed") or not values.get("moving"):
                raise ValueError(f"pairs CSV '{path}', row {index + 1}: fixed and moving are required")
            values["name"] = values.get("name") or f"pair{index:03d}"
            values["source"] = values.get("source") or "pairs"
            values["amplitude_mm"] = float(values["amplitude_mm"]) if values.get("amplitude_mm") else None
            values["seed"] = int(values["seed"]) if values.get("seed") else None
            cases.append(EvaluationCase(**values))
    if len({c.name for c in cases}) != len(cases):
        raise ValueError(f"pairs CSV '{path}': case names must be unique")
    return cases


def write_pairs_csv(cases: Sequence[EvaluationCase], path: str | os.PathLike) -> Path:
    """Write cases as a pairs CSV (absolute paths) that :func:`read_pairs_csv` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CASE_COLUMNS)
        writer.writeheader()
        for case in cases:
            writer.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(case).items()})
    return path


def _write_case(pair, folder: Path, name: str, source: str, amplitude_mm: float, seed: int) -> EvaluationCase:
    """Write a :class:`deepabdominalreg.synthetic.pairs.SyntheticPair` into ``folder``
    (``synthetic.pairs.write_pair``)."""
    from deepabdominalreg.synthetic.pairs import write_pair

    write_pair(pair, folder)
    case = _existing_case(folder, name, source, amplitude_mm, seed)
    assert case is not None
    return case


def generate_phantom_cases(
    out_dir: str | os.PathLike,
    *,
    seeds: Iterable[int] = (0,),
    amplitudes_mm: Iterable[float] = (10.0,),
    spacing_mm: float | tuple[float, float, float] = 3.0,
    reuse: bool = True,
) -> list[EvaluationCase]:
    """Phantom patient pairs (``synthetic.pairs.make_phantom_pair``) for every seed and amplitude, written under
    ``out_dir/phantom_s{seed}_a{amplitude}``.  With ``reuse`` a folder that already holds a case is not redone."""
    from deepabdominalreg.synthetic.pairs import make_phantom_pair

    cases = []
    for seed in seeds:
        for amplitude in amplitudes_mm:
            name = f"phantom_s{int(seed)}_a{float(amplitude):g}"
            folder = Path(out_dir) / name
            existing = _existing_case(folder, name, "phantom", amplitude, seed) if reuse else None
            if existing is not None:
                cases.append(existing)
                continue
            pair = make_phantom_pair(seed=int(seed), spacing_mm=spacing_mm, amplitude_mm=float(amplitude))
            cases.append(_write_case(pair, folder, name, "phantom", amplitude, seed))
    return cases


def generate_ct_cases(
    out_dir: str | os.PathLike,
    image: str | os.PathLike,
    labels: str | os.PathLike | None,
    label_names: dict[int, str],
    *,
    seeds: Iterable[int] = (0,),
    amplitudes_mm: Iterable[float] = (10.0,),
    generator: str = "abdominal",
    noise_hu: float = 15.0,
    prefix: str = "ct",
    reuse: bool = True,
) -> list[EvaluationCase]:
    """Pairs made from one real CT (+ labels) deformed by a synthetic generator
    (``synthetic.pairs.make_synthetic_pair``) for every seed and amplitude, written under
    ``out_dir/{prefix}_{generator}_s{seed}_a{amplitude}``.

    ``noise_hu``: independent CT noise added to both images (as for the phantom), so the fixed image is not just an
    interpolated copy of the moving one."""
    from deepabdominalreg.synthetic.pairs import make_synthetic_pair

    ct = read_image(image, "CT")
    seg = read_labels(labels, "CT labels") if labels else None
    cases = []
    for seed in seeds:
        for amplitude in amplitudes_mm:
            name = f"{prefix}_{generator}_s{int(seed)}_a{float(amplitude):g}"
            folder = Path(out_dir) / name
            existing = _existing_case(folder, name, f"{prefix}_{generator}", amplitude, seed) if reuse else None
            if existing is not None:
                cases.append(existing)
                continue
            pair = make_synthetic_pair(ct, seg, label_names, seed=int(seed), amplitude_mm=float(amplitude),
                                       generator=generator, noise_hu=float(noise_hu))
            cases.append(_write_case(pair, folder, name, f"{prefix}_{generator}", amplitude, seed))
    return cases


@dataclass(frozen=True)
class CaseSet:
    """Which cases an evaluation runs: a pairs CSV and/or generated pairs (phantoms; a real CT + labels deformed by
    the synthetic generators), each for every seed and amplitude (mm).  :meth:`make` writes and lists them."""

    pairs: str | None = None
    phantom_seeds: tuple[int, ...] = ()
    phantom_amplitudes_mm: tuple[float, ...] = (10.0,)
    phantom_spacing_mm: float = 3.0
    ct: str | None = None
    ct_seg: str | None = None
    ct_label_names: str | None = None
    ct_label_key: str | None = None
    ct_seeds: tuple[int, ...] = (0,)
    ct_amplitudes_mm: tuple[float, ...] = (10.0,)
    generators: tuple[str, ...] = ("abdominal",)
    noise_hu: float = 15.0

    def make(self, cases_dir: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[EvaluationCase]:
        """The cases: the pairs CSV's, then the real CT's (so that a run cut short has them complete), then the
        phantoms; generated pairs are written under ``cases_dir`` once and reused."""
        cases = read_pairs_csv(self.pairs) if self.pairs else []
        if self.ct:
            names = load_label_names(self.ct_label_names, self.ct_label_key)
            for generator in self.generators:
                if log:
                    log(f"CT pairs ({generator}): seeds {list(self.ct_seeds)}, amplitudes "
                        f"{list(self.ct_amplitudes_mm)} mm ...")
                cases += generate_ct_cases(cases_dir, self.ct, self.ct_seg, names, seeds=self.ct_seeds,
                                           amplitudes_mm=self.ct_amplitudes_mm, generator=generator,
                                           noise_hu=self.noise_hu)
        if self.phantom_seeds:
            if log:
                log(f"phantom pairs: seeds {list(self.phantom_seeds)}, amplitudes {list(self.phantom_amplitudes_mm)} "
                    f"mm ...")
            cases += generate_phantom_cases(cases_dir, seeds=self.phantom_seeds,
                                            amplitudes_mm=self.phantom_amplitudes_mm,
                                            spacing_mm=self.phantom_spacing_mm)
        return cases


def _existing_case(folder: Path, name: str, source: str, amplitude: float, seed: int) -> EvaluationCase | None:
    """The case already written in ``folder``, or None.  ``write_pair`` writes ``labels.json`` last: without it the
    folder is an interrupted write and is made again."""
    if not all((folder / f).exists() for f in ("fixed.nii.gz", "moving.nii.gz", "labels.json")):
        return None

    def maybe(file: str) -> str | None:
        return str(folder / file) if (folder / file).exists() else None

    return EvaluationCase(
        name=name, fixed=str(folder / "fixed.nii.gz"), moving=str(folder / "moving.nii.gz"),
        fixed_seg=maybe("fixed_seg.nii.gz"), moving_seg=maybe("moving_seg.nii.gz"),
        fixed_landmarks=maybe("fixed_landmarks.csv"), moving_landmarks=maybe("moving_landmarks.csv"),
        label_names=maybe("labels.json"), true_displacement=maybe("true_displacement.nii.gz"),
        source=source, amplitude_mm=float(amplitude), seed=int(seed),
    )
