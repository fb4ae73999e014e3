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

import numpy as np
import SimpleITK as sitk

from deepabdominalreg.geometry import Grid
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


# --------------------------------------------------------------------------------------------------------------
# pair classes of the trust benchmark: cut fields of view, far origins, other patients, broken pairs
# --------------------------------------------------------------------------------------------------------------

#: The pair classes :class:`CaseSet` can make (``classes``): ``ct`` (the real CT deformed, :func:`generate_ct_cases`),
#: ``lungcut`` (:func:`generate_lungcut_cases`), ``phantom`` (:func:`generate_phantom_cases`), ``interpatient``
#: (:func:`generate_phantom_interpatient_cases`), ``real_interpatient`` (:func:`generate_real_interpatient_cases`)
#: and ``broken`` (:func:`generate_broken_cases`).
PAIR_CLASSES: tuple[str, ...] = ("ct", "lungcut", "phantom", "interpatient", "real_interpatient", "broken")
#: The classes of issue 17's trust benchmark (``--classes trust``).
TRUST_CLASSES: tuple[str, ...] = ("lungcut", "phantom", "interpatient", "real_interpatient", "broken")
#: Sources of deliberately broken pairs start with this: for them only whether a method flagged the result counts.
BROKEN_PREFIX = "broken_"
#: The broken-pair kinds of :func:`generate_broken_cases`.
BROKEN_KINDS: tuple[str, ...] = ("disjoint", "mirrored", "other_part")


def _index_axis(image: sitk.Image, lps_axis: int) -> int:
    """The index axis (0 = i, 1 = j, 2 = k) of ``image`` closest to LPS axis ``lps_axis`` (0 = x left-right,
    2 = z inferior-superior)."""
    return int(np.argmax(np.abs(Grid.from_image(image).direction_matrix[lps_axis, :])))


def _increases_along(image: sitk.Image, axis: int, lps_axis: int) -> bool:
    """Whether LPS coordinate ``lps_axis`` grows with the index along ``axis`` (e.g. z: superior = high index)."""
    return bool(Grid.from_image(image).direction_matrix[lps_axis, axis] > 0)


def _fraction_slice(image: sitk.Image, axis: int, keep: tuple[float, float]) -> slice:
    """The index range along ``axis`` kept by fractions ``keep = (low, high)`` of its length (0..1)."""
    n = image.GetSize()[axis]
    low, high = (round(float(f) * n) for f in keep)
    if not 0 <= low < high <= n:
        raise ValueError(f"crop fractions {keep} leave nothing of an axis of {n} voxels")
    return slice(low, high)


def _crop(image: sitk.Image, region: dict[int, slice]) -> sitk.Image:
    """The voxels of ``image`` in ``region`` (index axis -> slice, other axes whole); physical positions are kept
    (the origin moves to the first kept voxel), so labels, fields and points stay valid.  Works on vector images."""
    start, size = [], []
    for axis, n in enumerate(image.GetSize()):
        low, high, _ = region.get(axis, slice(None)).indices(n)
        start.append(low)
        size.append(high - low)
    return sitk.RegionOfInterest(image, size, start)


def _superior_slab(image: sitk.Image, low: float, high: float) -> dict[int, slice]:
    """A region keeping fractions ``low..high`` of the cranio-caudal extent, 0 = the inferior end, 1 = the
    superior one (whichever way the index runs)."""
    axis = _index_axis(image, 2)
    if not _increases_along(image, axis, 2):
        low, high = 1.0 - high, 1.0 - low
    return {axis: _fraction_slice(image, axis, (low, high))}


def _with_origin_offset(image: sitk.Image, offset_lps_mm: Sequence[float]) -> sitk.Image:
    """A copy of ``image`` whose origin is moved by ``offset_lps_mm`` (LPS mm): header only, same voxels; every
    physical point of the copy is the original's plus the offset."""
    out = sitk.Image(image)
    out.SetOrigin(tuple(float(o) + float(d) for o, d in zip(image.GetOrigin(), offset_lps_mm)))
    return out


def _keep_labels(labels: sitk.Image, ids: set[int]) -> sitk.Image:
    """``labels`` with every id outside ``ids`` set to 0 (same grid and pixel type)."""
    array = sitk.GetArrayFromImage(labels)
    array[~np.isin(array, sorted(ids))] = 0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return out


def shared_label_maps(fixed_labels: sitk.Image, moving_labels: sitk.Image) -> tuple[sitk.Image, sitk.Image, set[int]]:
    """Both label maps restricted to the ids present in both, and those ids.

    The scorer (:func:`deepabdominalreg.metrics.labels.label_overlap_report`) scores every label present in
    either map, so a structure only one scan covers would count as Dice 0 for every method: pairs of different
    coverage or patients are scored on their shared labels."""
    from deepabdominalreg.synthetic.motion import labels_present

    shared = labels_present(fixed_labels) & labels_present(moving_labels)
    return _keep_labels(fixed_labels, shared), _keep_labels(moving_labels, shared), shared


def label_map_from_masks(
    folder: str | os.PathLike,
    label_names: dict[int, str],
    reference: sitk.Image,
) -> tuple[sitk.Image, dict[str, int], list[str]]:
    """One label map on ``reference``'s grid from a folder of binary masks named after structures
    (``<name>.nii.gz``, e.g. ``aorta.nii.gz``), with the ids that ``label_names`` (``{id: name}``, e.g.
    TotalSegmentator's ``total`` map) gives those names, so it compares like with like with a map of those ids.

    Masks are taken in name order; where two overlap the first keeps the voxel.  Returns the map (``sitkUInt16``),
    ``{file name: id}`` of the masks used and the file names left out (no id of that name, a multi-label map, or
    an empty mask).  Masks on another grid are resampled (nearest neighbour)."""
    from deepabdominalreg.geometry import resample_image

    ids = {name: int(i) for i, name in label_names.items()}
    out = np.zeros(Grid.from_image(reference).shape_zyx, dtype=np.uint16)
    used: dict[str, int] = {}
    skipped: list[str] = []
    for path in sorted(Path(folder).glob("*.nii*")):
        name = path.name.split(".nii")[0]
        if name not in ids:
            skipped.append(path.name)
            continue
        mask = read_labels(path, f"mask '{path.name}'")
        if Grid.from_image(mask) != Grid.from_image(reference):
            mask = resample_image(mask, reference, None, "nearest", 0)
        array = sitk.GetArrayViewFromImage(mask)
        if int(array.max()) != 1:
            skipped.append(path.name)
            continue
        out[(array > 0) & (out == 0)] = ids[name]
        used[path.name] = ids[name]
    return Grid.from_image(reference).image_from_array(out), used, skipped


def _matched_landmarks(fixed_labels: sitk.Image, moving_labels: sitk.Image,
                       label_names: dict[int, str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Corresponding anatomical points of two label maps of different patients (LPS mm): the points of
    :func:`~deepabdominalreg.synthetic.pairs.anatomical_landmarks` with the same name in both, left out where the
    structure touches a face of either grid (a cut organ's centre and poles are not anatomical)."""
    from deepabdominalreg.synthetic.pairs import anatomical_landmarks

    def touching(labels: sitk.Image) -> set[str]:
        array = sitk.GetArrayViewFromImage(labels)
        faces = [array[0], array[-1], array[:, 0], array[:, -1], array[:, :, 0], array[:, :, -1]]
        ids = set().union(*(np.unique(f).tolist() for f in faces)) - {0}
        return {label_names.get(int(i), "") for i in ids}

    cut = touching(fixed_labels) | touching(moving_labels)
    fixed_points, fixed_names = anatomical_landmarks(fixed_labels, label_names)
    moving_points, moving_names = anatomical_landmarks(moving_labels, label_names)
    where = {n: k for k, n in enumerate(moving_names)}
    names = [n for n in fixed_names if n in where and n.rsplit("_", 1)[0] not in cut]
    fixed_out = np.array([fixed_points[fixed_names.index(n)] for n in names]).reshape(-1, 3)
    moving_out = np.array([moving_points[where[n]] for n in names]).reshape(-1, 3)
    return fixed_out, moving_out, names


def _reusable(folder: Path, name: str, source: str, amplitude: float | None, seed: int | None,
              parameters: dict) -> EvaluationCase | None:
    """The case in ``folder`` if it is complete and was made with these ``parameters`` (its ``case.json``)."""
    record = folder / "case.json"
    if not record.is_file() or json.loads(record.read_text()).get("parameters") != json.loads(json.dumps(parameters)):
        return None
    return _existing_case(folder, name, source, amplitude, seed)


def _write_case_files(
    folder: Path,
    name: str,
    source: str,
    *,
    fixed: sitk.Image,
    moving: sitk.Image,
    parameters: dict,
    description: str,
    fixed_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    label_names: dict[int, str] | None = None,
    true_displacement: sitk.Image | None = None,
    fixed_landmarks_lps: np.ndarray | None = None,
    moving_landmarks_lps: np.ndarray | None = None,
    amplitude_mm: float | None = None,
    seed: int | None = None,
) -> EvaluationCase:
    """Write a case in ``write_pair``'s layout plus ``case.json`` (what it is and the parameters it was made
    with); ``labels.json`` (``{id: name}`` of the labels present) last, the mark of a complete case."""
    from deepabdominalreg.io import write_displacement_field, write_image, write_json, write_landmarks
    from deepabdominalreg.synthetic.motion import labels_present

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*"):  # an older case with other parameters: no file of it may survive
        if stale.is_file():
            stale.unlink()
    write_image(fixed, folder / "fixed.nii.gz")
    write_image(moving, folder / "moving.nii.gz")
    present: set[int] = set()
    if fixed_labels is not None and moving_labels is not None:
        write_image(fixed_labels, folder / "fixed_seg.nii.gz")
        write_image(moving_labels, folder / "moving_seg.nii.gz")
        present = labels_present(fixed_labels) | labels_present(moving_labels)
    if true_displacement is not None:
        write_displacement_field(true_displacement, folder / "true_displacement.nii.gz")
    if fixed_landmarks_lps is not None and moving_landmarks_lps is not None and len(fixed_landmarks_lps):
        write_landmarks(np.asarray(fixed_landmarks_lps), folder / "fixed_landmarks.csv")
        write_landmarks(np.asarray(moving_landmarks_lps), folder / "moving_landmarks.csv")
    write_json({"name": name, "source": source, "description": description, "parameters": parameters},
               folder / "case.json", indent=1)
    names = {i: (label_names or {}).get(i, f"label_{i}") for i in sorted(present)}
    write_json({str(k): v for k, v in names.items()}, folder / "labels.json", indent=1)
    case = _existing_case(folder, name, source, amplitude_mm, seed)
    assert case is not None
    return case


def generate_lungcut_cases(
    out_dir: str | os.PathLike,
    image: str | os.PathLike,
    labels: str | os.PathLike | None,
    label_names: dict[int, str],
    *,
    seeds: Iterable[int] = (0,),
    amplitudes_mm: Iterable[float] = (5.0, 10.0, 20.0),
    keep_lr: tuple[float, float] = (0.13, 0.81),
    fixed_keep_si: tuple[float, float] = (0.0, 1.0),
    moving_keep_si: tuple[float, float] = (0.08, 0.97),
    moving_origin_offset_mm: Sequence[float] = (0.0, 0.0, 300.0),
    generator: str = "abdominal",
    noise_hu: float = 15.0,
    reuse: bool = True,
) -> list[EvaluationCase]:
    """Real-CT pairs whose fields of view cut the body (through the lungs) and whose origins lie far apart
    (source ``ct_lungcut``), under ``out_dir/ct_lungcut_s{seed}_a{amplitude}``.

    The CT is deformed as in :func:`generate_ct_cases` (``amplitude_mm`` peak, mm); then both images are cropped
    left-right to the fractions ``keep_lr`` of the axis closest to LPS x (the default cuts ``example_ct``'s lung
    bases on both sides: index x 16:99 of 122), the fixed image cranio-caudally to ``fixed_keep_si`` and the
    moving one to ``moving_keep_si`` (fractions of the axis closest to LPS z, 0 = inferior end; other coverage
    than the fixed), and the moving image's origin is moved by ``moving_origin_offset_mm`` (LPS mm, header only).

    The truth follows: labels are cropped with their images (the physical positions are kept), landmarks are
    kept where both points lie inside their cropped grids, and the true displacement (fixed point ``x`` -> moving
    point ``x + u(x)``, LPS mm, on the cropped fixed grid) and the moving landmarks get the offset added.  Label
    maps are restricted to the ids present in both (:func:`shared_label_maps`)."""
    from deepabdominalreg.geometry import points_inside
    from deepabdominalreg.synthetic.pairs import make_synthetic_pair

    ct = read_image(image, "CT")
    seg = read_labels(labels, "CT labels") if labels else None
    offset = np.asarray(moving_origin_offset_mm, dtype=np.float64)
    lr = {_index_axis(ct, 0): _fraction_slice(ct, _index_axis(ct, 0), keep_lr)}
    fixed_region = {**_superior_slab(ct, *fixed_keep_si), **lr}
    moving_region = {**_superior_slab(ct, *moving_keep_si), **lr}
    cases = []
    for seed in seeds:
        for amplitude in amplitudes_mm:
            name = f"ct_lungcut_s{int(seed)}_a{float(amplitude):g}"
            folder = Path(out_dir) / name
            parameters = {"image": str(image), "labels": str(labels), "generator": generator, "noise_hu": noise_hu,
                          "keep_lr": list(keep_lr), "fixed_keep_si": list(fixed_keep_si),
                          "moving_keep_si": list(moving_keep_si), "moving_origin_offset_mm": offset.tolist()}
            existing = _reusable(folder, name, "ct_lungcut", amplitude, seed, parameters) if reuse else None
            if existing is not None:
                cases.append(existing)
                continue
            pair = make_synthetic_pair(ct, seg, label_names, seed=int(seed), amplitude_mm=float(amplitude),
                                       generator=generator, noise_hu=float(noise_hu))
            fixed = _crop(pair.fixed_image, fixed_region)
            moving = _crop(pair.moving_image, moving_region)
            u = _crop(pair.displacement_fixed_to_moving, fixed_region)
            inside = (points_inside(Grid.from_image(fixed), pair.fixed_landmarks_lps)
                      & points_inside(Grid.from_image(moving), pair.moving_landmarks_lps))
            # the moving scan's points all move by the offset: so do the moving ends of the true field
            moving = _with_origin_offset(moving, offset)
            u_array = sitk.GetArrayFromImage(u) + offset
            true_u = Grid.from_image(u).image_from_array(u_array, is_vector=True)
            fixed_labels = moving_labels = None
            if pair.fixed_labels is not None:
                fixed_labels, moving_labels, _ = shared_label_maps(
                    _crop(pair.fixed_labels, fixed_region),
                    _with_origin_offset(_crop(pair.moving_labels, moving_region), offset))
            cases.append(_write_case_files(
                folder, name, "ct_lungcut", fixed=fixed, moving=moving, parameters=parameters,
                description=f"{Path(image).name} deformed ({generator}, {amplitude:g} mm), cut left-right through "
                            f"the lungs, other cranio-caudal coverage, moving origin moved by {offset.tolist()} mm",
                fixed_labels=fixed_labels, moving_labels=moving_labels, label_names=label_names,
                true_displacement=true_u, fixed_landmarks_lps=pair.fixed_landmarks_lps[inside],
                moving_landmarks_lps=pair.moving_landmarks_lps[inside] + offset, amplitude_mm=amplitude, seed=seed))
    return cases


def generate_phantom_interpatient_cases(
    out_dir: str | os.PathLike,
    *,
    seed_pairs: Iterable[tuple[int, int]] = ((1, 5),),
    spacing_mm: float = 3.0,
    moving_keep_si: tuple[float, float] = (0.2, 1.0),
    noise_hu: float = 15.0,
    reuse: bool = True,
) -> list[EvaluationCase]:
    """Inter-patient phantom pairs (source ``phantom_interpatient``): fixed = phantom patient ``a``, moving =
    phantom ``b`` (:func:`~deepabdominalreg.synthetic.anatomy.render_phantom`; each seed draws its own body width,
    organ scales, spine levels and diaphragm: seeds 1 and 5 have half-widths of 179 and 141 mm), the moving one
    cropped cranio-caudally to ``moving_keep_si`` (fractions, 0 = inferior end: other coverage), under
    ``out_dir/phantom_inter_{a}_{b}``.  No true field: scored on the shared labels (:func:`shared_label_maps`) and
    on the anatomical landmarks both phantoms have (:func:`_matched_landmarks`)."""
    from deepabdominalreg.synthetic.anatomy import PHANTOM_LABELS, add_ct_noise, render_phantom

    names = {k: v for k, v in PHANTOM_LABELS.items() if k}
    cases = []
    for a, b in seed_pairs:
        name = f"phantom_inter_{int(a)}_{int(b)}"
        folder = Path(out_dir) / name
        parameters = {"seeds": [int(a), int(b)], "spacing_mm": float(spacing_mm),
                      "moving_keep_si": list(moving_keep_si), "noise_hu": noise_hu}
        existing = _reusable(folder, name, "phantom_interpatient", None, a, parameters) if reuse else None
        if existing is not None:
            cases.append(existing)
            continue
        fixed, fixed_labels = render_phantom(int(a), spacing_mm)
        moving, moving_labels = render_phantom(int(b), spacing_mm)
        region = _superior_slab(moving, *moving_keep_si)
        moving, moving_labels = _crop(moving, region), _crop(moving_labels, region)
        fixed_labels, moving_labels, _ = shared_label_maps(fixed_labels, moving_labels)
        fixed_points, moving_points, _ = _matched_landmarks(fixed_labels, moving_labels, names)
        cases.append(_write_case_files(
            folder, name, "phantom_interpatient", fixed=add_ct_noise(fixed, 2 * int(a) + 1, noise_hu),
            moving=add_ct_noise(moving, 2 * int(b) + 2, noise_hu), parameters=parameters,
            description=f"phantom {a} (fixed) against phantom {b} (moving), moving cropped to {moving_keep_si} of "
                        f"its cranio-caudal extent",
            fixed_labels=fixed_labels, moving_labels=moving_labels, label_names=names,
            fixed_landmarks_lps=fixed_points, moving_landmarks_lps=moving_points, seed=a))
    return cases


def generate_real_interpatient_cases(
    out_dir: str | os.PathLike,
    image: str | os.PathLike,
    labels: str | os.PathLike,
    label_names: dict[int, str],
    other_dir: str | os.PathLike,
    *,
    other_image: str = "ct_cropped.nii.gz",
    reuse: bool = True,
) -> list[EvaluationCase]:
    """A real inter-patient pair (source ``interpatient_real``), under ``out_dir/real_inter``: fixed = ``image``
    with its ``labels``; moving = ``other_dir/other_image`` (another patient, e.g. TotalSegmentator's
    ``aorta_crop``: thorax and upper abdomen, 1.5 mm, its origin ~450 mm from ``example_ct``'s) with the label map
    :func:`label_map_from_masks` builds from the masks beside it with ``label_names``' ids.  Both at their own
    origins (no start given); scored on the shared labels (for ``example_ct`` / ``aorta_crop``: aorta and
    vertebra T12) and the landmarks both have uncut (:func:`_matched_landmarks`)."""
    name = "real_inter"
    folder = Path(out_dir) / name
    parameters = {"image": str(image), "labels": str(labels), "other": str(Path(other_dir) / other_image)}
    existing = _reusable(folder, name, "interpatient_real", None, None, parameters) if reuse else None
    if existing is not None:
        return [existing]
    fixed = read_image(image, "fixed CT")
    moving = read_image(Path(other_dir) / other_image, "other patient's CT")
    fixed_labels = read_labels(labels, "fixed CT labels")
    moving_labels, used, skipped = label_map_from_masks(other_dir, label_names, moving)
    fixed_labels, moving_labels, shared = shared_label_maps(sitk.Cast(fixed_labels, sitk.sitkUInt16), moving_labels)
    if not shared:
        raise ValueError(f"'{image}' and the masks of '{other_dir}' share no label: nothing to score the pair on")
    fixed_points, moving_points, _ = _matched_landmarks(fixed_labels, moving_labels, label_names)
    case = _write_case_files(
        folder, name, "interpatient_real", fixed=fixed, moving=moving, parameters=parameters,
        description=f"{Path(image).name} against another patient's {other_image}; masks used {used}, left out "
                    f"{skipped}; shared labels {sorted(label_names.get(i, str(i)) for i in shared)}",
        fixed_labels=fixed_labels, moving_labels=moving_labels, label_names=label_names,
        fixed_landmarks_lps=fixed_points, moving_landmarks_lps=moving_points)
    return [case]


def generate_broken_cases(
    out_dir: str | os.PathLike,
    image: str | os.PathLike,
    other_image: str | os.PathLike | None = None,
    *,
    kinds: Iterable[str] = BROKEN_KINDS,
    slab: float = 0.4,
    noise_hu: float = 15.0,
    reuse: bool = True,
) -> list[EvaluationCase]:
    """Deliberately broken pairs that a registration must flag, not solve (source ``broken_<kind>``), under
    ``out_dir/broken_<kind>``; no labels, no truth:

    * ``disjoint``: the superior ``slab`` (fraction) of ``image`` against its inferior ``slab``, at their true
      positions: the fields of view do not overlap;
    * ``mirrored``: ``image`` against itself mirrored left-right (voxels flipped along the axis closest to LPS x,
      header unchanged: what a wrong orientation in a header gives);
    * ``other_part``: the inferior ``slab`` of ``image`` (for ``example_ct``: the pelvis) against the superior half
      of ``other_image`` (for ``aorta_crop``: the chest; without it, the superior ``slab`` of ``image``) with a
      faked origin that puts its centre on the fixed image's centre (LPS mm), so the two seem to overlap.

    Independent CT noise (``noise_hu``) is added to both images."""
    from deepabdominalreg.synthetic.anatomy import add_ct_noise

    kinds = list(kinds)
    unknown = set(kinds) - set(BROKEN_KINDS)
    if unknown:
        raise ValueError(f"unknown broken-pair kind(s) {sorted(unknown)}; choose from {', '.join(BROKEN_KINDS)}")
    ct = read_image(image, "CT")
    cases = []
    for index, kind in enumerate(kinds):
        name = f"{BROKEN_PREFIX}{kind}"
        folder = Path(out_dir) / name
        parameters = {"image": str(image), "other": str(other_image), "slab": slab, "noise_hu": noise_hu}
        existing = _reusable(folder, name, name, None, None, parameters) if reuse else None
        if existing is not None:
            cases.append(existing)
            continue
        if kind == "disjoint":
            fixed = _crop(ct, _superior_slab(ct, 1.0 - slab, 1.0))
            moving = _crop(ct, _superior_slab(ct, 0.0, slab))
            description = f"superior {slab:.0%} of {Path(image).name} against its inferior {slab:.0%}"
        elif kind == "mirrored":
            fixed = ct
            moving = Grid.from_image(ct).image_from_array(
                np.ascontiguousarray(np.flip(sitk.GetArrayFromImage(ct), axis=2 - _index_axis(ct, 0))))
            description = f"{Path(image).name} against itself mirrored left-right (voxels flipped, same header)"
        else:
            fixed = _crop(ct, _superior_slab(ct, 0.0, slab))
            other = read_image(other_image, "other CT") if other_image else ct
            moving = _crop(other, _superior_slab(other, 0.5, 1.0) if other_image else
                           _superior_slab(ct, 1.0 - slab, 1.0))
            moving = _with_origin_offset(moving, Grid.from_image(fixed).corners().mean(0)
                                         - Grid.from_image(moving).corners().mean(0))
            description = (f"inferior {slab:.0%} of {Path(image).name} against the superior part of "
                           f"{Path(other_image).name if other_image else 'itself'}, its origin faked onto the fixed")
        cases.append(_write_case_files(
            folder, name, name, fixed=add_ct_noise(fixed, 101 + 2 * index, noise_hu),
            moving=add_ct_noise(moving, 102 + 2 * index, noise_hu), parameters=parameters,
            description=description))
    return cases


@dataclass(frozen=True)
class CaseSet:
    """Which cases an evaluation runs: a pairs CSV and/or generated pairs (phantoms; a real CT + labels deformed by
    the synthetic generators), each for every seed and amplitude (mm).  :meth:`make` writes and lists them.

    ``classes`` (names of :data:`PAIR_CLASSES`), when given, chooses the generated pairs instead: ``ct`` and
    ``lungcut`` use ``ct``/``ct_seg`` with the CT seeds and amplitudes (``lungcut`` moves the moving origin by
    ``moving_origin_offset_mm``, LPS mm), ``phantom`` the phantom seeds and amplitudes, ``interpatient``
    ``interpatient_seed_pairs`` at the phantom spacing, ``real_interpatient`` ``ct`` against ``other_ct_dir``
    (a CT with its structure masks, e.g. ``aorta_crop``), ``broken`` ``ct`` (and ``other_ct_dir``'s CT)."""

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
    classes: tuple[str, ...] = ()
    interpatient_seed_pairs: tuple[tuple[int, int], ...] = ((1, 5),)
    other_ct_dir: str | None = None
    other_ct_image: str = "ct_cropped.nii.gz"
    moving_origin_offset_mm: tuple[float, float, float] = (0.0, 0.0, 300.0)

    def make(self, cases_dir: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[EvaluationCase]:
        """The cases: the pairs CSV's, then the real CT's (so that a run cut short has them complete), then the
        phantoms; generated pairs are written under ``cases_dir`` once and reused."""
        cases = read_pairs_csv(self.pairs) if self.pairs else []
        if self.classes:
            return cases + self._make_classes(Path(cases_dir), log)
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

    def _make_classes(self, cases_dir: Path, log: Callable[[str], None] | None) -> list[EvaluationCase]:
        """The pairs of ``classes``, in :data:`PAIR_CLASSES`' order."""
        unknown = set(self.classes) - set(PAIR_CLASSES)
        if unknown:
            raise ValueError(f"unknown pair class(es) {', '.join(sorted(unknown))}; choose from "
                             f"{', '.join(PAIR_CLASSES)} (or 'trust': {', '.join(TRUST_CLASSES)})")
        needs_ct = {"ct", "lungcut", "real_interpatient", "broken"} & set(self.classes)
        if needs_ct and not self.ct:
            raise ValueError(f"pair class(es) {', '.join(sorted(needs_ct))} need a real CT (--ct)")
        if "real_interpatient" in self.classes and not (self.other_ct_dir and self.ct_seg):
            raise ValueError("pair class real_interpatient needs the CT's labels and another patient's CT folder "
                             "with its masks (--other-ct-dir)")
        names = load_label_names(self.ct_label_names, self.ct_label_key) if self.ct else {}
        other = Path(self.other_ct_dir) / self.other_ct_image if self.other_ct_dir else None
        cases: list[EvaluationCase] = []
        for pair_class in (c for c in PAIR_CLASSES if c in self.classes):
            if log:
                log(f"pair class {pair_class} ...")
            if pair_class == "ct":
                for generator in self.generators:
                    cases += generate_ct_cases(cases_dir, self.ct, self.ct_seg, names, seeds=self.ct_seeds,
                                               amplitudes_mm=self.ct_amplitudes_mm, generator=generator,
                                               noise_hu=self.noise_hu)
            elif pair_class == "lungcut":
                cases += generate_lungcut_cases(cases_dir, self.ct, self.ct_seg, names, seeds=self.ct_seeds,
                                                amplitudes_mm=self.ct_amplitudes_mm, generator=self.generators[0],
                                                moving_origin_offset_mm=self.moving_origin_offset_mm,
                                                noise_hu=self.noise_hu)
            elif pair_class == "phantom":
                cases += generate_phantom_cases(cases_dir, seeds=self.phantom_seeds or (0,),
                                                amplitudes_mm=self.phantom_amplitudes_mm,
                                                spacing_mm=self.phantom_spacing_mm)
            elif pair_class == "interpatient":
                cases += generate_phantom_interpatient_cases(cases_dir, seed_pairs=self.interpatient_seed_pairs,
                                                             spacing_mm=self.phantom_spacing_mm,
                                                             noise_hu=self.noise_hu)
            elif pair_class == "real_interpatient":
                cases += generate_real_interpatient_cases(cases_dir, self.ct, self.ct_seg, names,
                                                          self.other_ct_dir, other_image=self.other_ct_image)
            else:
                cases += generate_broken_cases(cases_dir, self.ct, other if other and other.is_file() else None,
                                               noise_hu=self.noise_hu)
        return cases


def _existing_case(folder: Path, name: str, source: str, amplitude: float | None,
                   seed: int | None) -> EvaluationCase | None:
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
        source=source, amplitude_mm=None if amplitude is None else float(amplitude),
        seed=None if seed is None else int(seed),
    )
