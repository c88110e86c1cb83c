"""Per-class logit offsets fitted on annotated scans: a post-hoc calibration of a trained model.

A network trained with a Dice loss tends to draw small structures too large or too small by a
constant margin (the bundled model, before calibration: lesser trochanter volume 1.28 x the
truth's on held-out phantoms, quadratus femoris 1.09 x). Adding one constant per class to the
network's log-probabilities moves that class's boundary everywhere at once. The offsets of the
structures the measurements use (``CALIBRATED``) are fitted, for each input combination (T1 +
fluid, T1 only, fluid only), by coordinate search maximising the mean Dice of those structures
over annotated scans the network did not train on; they are written into the model metadata
(``inference.class_offsets``) and ``pipeline.segment`` applies them where they are scored here:
to the log-probabilities on the label grid, after the mapping from the network's working grid.

Dice is not quite what the measurements need: it weighs a structure's whole outline, while the
IFS and QFS are read where two structures face each other, and it is scored before the
post-processing that ``segment`` applies. So a second stage (on by default; ``--no-measurements``
skips it) refines the offsets on the measurements themselves: the structures bounding the IFS
(lesser trochanter, ischial tuberosity) and the QFS (hamstring origin, iliopsoas tendon) are
shifted, a group at a time, by ``REFINE_VALUES`` on top of their Dice offsets; each candidate's
label maps go through ``segment``'s post-processing and ``pipeline.measure``, and the shift that
minimises the mean absolute IFS and QFS error against the same measurement on the annotations
is kept (ties go to no shift). It needs at least ``MIN_REFINE_HIPS`` hips measurable on the
annotations. The record in ``meta["calibration"]`` gives the error and the Dice before and after.

    python -m pipeline.calibrate --model RUN/best.safetensors --data CALIBRATION_COHORT \\
        [--modes t1+fluid,t1,fluid] [--limit N] [--out NEW_BUNDLE] [--no-measurements] \\
        [--workers N]

``--data`` takes the layout ``train.py`` reads (a cohort folder with ``cohort.csv``, or a CSV of
image and label paths). Without ``--out`` the bundle's JSON is rewritten in place (the weights
are not touched). Use scans kept out of training: the validation split of your own data, or
phantoms of a seed never used in training.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.labels import LABELS

#: Structures whose logit offsets are fitted (the ones the measurements are taken from).
CALIBRATED = ("quadratus_femoris", "lesser_trochanter", "ischial_tuberosity", "hamstring_tendon",
              "iliopsoas_tendon")
#: Offsets tried for each class (natural-log units: 0.5 multiplies the class's odds by 1.65).
SEARCH_VALUES = np.round(np.arange(-2.0, 2.0001, 0.1), 2)
#: Voxels within this distance (mm) of a calibrated structure of the truth take part.
MARGIN_MM = 15.0
SWEEPS = 3
MODES = ("t1+fluid", "t1", "fluid")
#: Structures shifted together by the measurement stage: those bounding the IFS, then the QFS.
MEASUREMENT_GROUPS = (("lesser_trochanter", "ischial_tuberosity"),
                      ("hamstring_tendon", "iliopsoas_tendon"))
#: Shifts tried for a group, added to its Dice offsets.
REFINE_VALUES = np.round(np.arange(-0.8, 0.4001, 0.2), 2)
REFINE_SWEEPS = 2
#: A distance measured on the annotation but not on a candidate's labels counts as this error.
MISSING_ERROR_MM = 10.0
#: The measurement stage runs only with at least this many hips measurable on the annotations.
MIN_REFINE_HIPS = 10
#: The distances the measurement stage scores (keys of ``pipeline.measure`` hip records).
MEASURED = ("ifs_mm", "qfs_mm")


@dataclass
class CalibrationCase:
    """The voxels of one scan (one input combination) whose label an offset could change.

    ``logp``: (K, n) log-probabilities of the open voxels, ``truth``: (n,) their true labels;
    ``fixed_tp`` / ``fixed_pred`` / ``truth_count``: per-class counts of the other voxels of the
    crop (their predicted label cannot change) and of the true voxels in the crop."""

    subject: str
    mode: str
    logp: np.ndarray
    truth: np.ndarray
    fixed_tp: np.ndarray
    fixed_pred: np.ndarray
    truth_count: np.ndarray
    #: (K,) bool: the classes the scan is annotated for (``training.annotated_mask``); None: all
    annotated: np.ndarray | None = None


@dataclass
class MeasurementCase:
    """What the measurement stage needs of one scan (one input combination): the network's
    log-probabilities (K, *box shape, float16) inside ``box`` on the label grid, the two most
    probable classes elsewhere (``top2``: (2, *shape) uint8; offsets are not applied there), the
    grid's affine, and ``truth``: ``{side: {"ifs_mm": v, "qfs_mm": v}}`` measured on the
    annotation."""

    subject: str
    mode: str
    affine: np.ndarray
    box: tuple
    logp: np.ndarray
    top2: np.ndarray
    truth: dict


def _images(rec: dict, mode: str) -> dict:
    from pipeline.image import load_nifti

    out = {}
    for ch in mode.split("+"):
        if not rec.get(ch):
            return {}
        out[ch] = load_nifti(rec[ch], "t1" if ch == "t1" else None)
    return out


def _network_crop(rec: dict, model, mode: str, margin_mm: float):
    """The network's softmax without offsets on the label grid (numpy (K, *shape)), the
    annotation on that grid, the box (slices) around its calibrated structures plus
    ``margin_mm``, and the grid's affine; None when the subject lacks an image of this input
    combination or the calibrated structures."""
    from pipeline.image import Image, resample_to_grid
    from pipeline.segment import reference_probabilities
    from pipeline.training import load_subject_labels

    images = _images(rec, mode)
    if not images:
        return None
    inputs, _, probs_t = reference_probabilities(images, model, offsets=False)
    grid = inputs.grid
    lab = load_subject_labels(rec)
    truth = resample_to_grid(Image(np.rint(lab.array).astype(np.int16), lab.affine, "labels"),
                             grid.ref_shape, grid.ref_affine, order=0).array
    key = np.isin(truth, [LABELS[n] for n in CALIBRATED])
    if not key.any():
        return None
    spacing = np.sqrt((np.asarray(grid.ref_affine)[:3, :3] ** 2).sum(axis=0))
    idx = np.nonzero(key)
    pad = np.ceil(margin_mm / spacing).astype(int)
    box = tuple(slice(max(int(i.min()) - p, 0), min(int(i.max()) + p + 1, n))
                for i, p, n in zip(idx, pad, truth.shape))
    return probs_t.numpy(), truth, box, np.asarray(grid.ref_affine, float)


def _dice_case(subject: str, mode: str, probs: np.ndarray, truth: np.ndarray,
               box: tuple, annotated: np.ndarray | None = None) -> CalibrationCase:
    """The ``CalibrationCase`` of one scan from the network's softmax over its box."""
    p = probs[(slice(None), *box)].reshape(probs.shape[0], -1)
    t = truth[box].ravel().astype(np.int64)
    logp = np.log(np.maximum(p, 1e-8))
    k = logp.shape[0]
    top2 = np.partition(logp, k - 2, axis=0)[k - 2:]
    span = float(SEARCH_VALUES.max() - SEARCH_VALUES.min())
    open_ = (top2[1] - top2[0]) <= span
    pred = logp.argmax(0)
    fixed = ~open_
    return CalibrationCase(
        subject=subject, mode=mode, logp=logp[:, open_].astype(np.float32), truth=t[open_],
        fixed_tp=np.bincount(pred[fixed][pred[fixed] == t[fixed]], minlength=k),
        fixed_pred=np.bincount(pred[fixed], minlength=k),
        truth_count=np.bincount(t, minlength=k), annotated=annotated)


#: The structures each measurement is taken between: a map not annotated for all of them gives
#: no reference value for it (a QFS on a map without the iliopsoas tendon is not the QFS).
MEASURED_FROM = {"ifs_mm": ("ischial_tuberosity", "lesser_trochanter"),
                 "qfs_mm": ("hamstring_tendon", "lesser_trochanter", "iliopsoas_tendon")}


def truth_measurements(labels, annotated=None) -> dict:
    """``{side: {"ifs_mm": v, "qfs_mm": v}}`` measured (``pipeline.measure.measure_hips``,
    geometry only) on an annotated label map; sides without either distance are left out.
    ``annotated``: the structures the map was drawn for (None: all); a measurement whose
    structures (``MEASURED_FROM``) were not all drawn is left out."""
    from pipeline.measure import measure_hips

    keys = [k for k in MEASURED
            if annotated is None or all(n in annotated for n in MEASURED_FROM[k])]
    if not keys:
        return {}
    hips = measure_hips(labels)["hips"]
    out = {}
    for side, h in hips.items():
        vals = {k: h.get(k) for k in keys} if h.get("present") else {}
        if any(v is not None for v in vals.values()):
            out[side] = vals
    return out


def measurement_case(subject: str, mode: str, probs: np.ndarray, affine: np.ndarray,
                     box: tuple | None, truth: dict) -> MeasurementCase:
    """A ``MeasurementCase`` from the network's softmax (K, *shape) on the label grid."""
    box = tuple(slice(0, n) for n in probs.shape[1:]) if box is None else box
    k = probs.shape[0]
    top2 = np.argpartition(probs, k - 2, axis=0)[k - 2:][::-1]
    first = np.take_along_axis(probs, top2, 0)
    swap = first[0] < first[1]                  # argpartition does not order the two
    top2[:, swap] = top2[::-1][:, swap]
    logp = np.log(np.maximum(probs[(slice(None), *box)], 1e-8)).astype(np.float16)
    return MeasurementCase(subject, mode, np.asarray(affine, float), box, logp,
                           top2.astype(np.uint8), truth)


def case_labels(case: MeasurementCase, offsets: np.ndarray) -> np.ndarray:
    """The label map ``segment`` would give this scan with these (K,) logit offsets: argmax
    inside the box, the network's first choice outside, then ``segment``'s island removal."""
    from pipeline.segment import relabel_islands

    k = case.logp.shape[0]
    scores = np.zeros((k, *case.top2.shape[1:]), np.float16)
    np.put_along_axis(scores, case.top2[:1].astype(np.intp), 2.0, axis=0)
    np.put_along_axis(scores, case.top2[1:].astype(np.intp), 1.0, axis=0)
    inside = case.logp + offsets.astype(np.float16).reshape((k,) + (1,) * (case.logp.ndim - 1))
    scores[(slice(None), *case.box)] = inside
    labels = case.top2[0].copy()
    labels[case.box] = inside.argmax(0).astype(np.uint8)
    relabel_islands(labels, scores, case.affine)
    return labels


def case_errors(case: MeasurementCase, offsets: np.ndarray) -> list[float]:
    """Absolute IFS and QFS errors (mm) of this scan's hips with these offsets against the
    annotation's; a distance not measured counts ``MISSING_ERROR_MM``."""
    from pipeline.image import Image
    from pipeline.measure import measure_hips

    hips = measure_hips(Image(case_labels(case, offsets), case.affine, "labels"))["hips"]
    errors = []
    for side, truth in case.truth.items():
        got = hips.get(side) or {}
        for key, t in truth.items():
            if t is None:
                continue
            v = got.get(key) if got.get("present") else None
            errors.append(MISSING_ERROR_MM if v is None else abs(float(v) - float(t)))
    return errors


#: The cases a forked worker pool evaluates (set before the pool forks; read-only there).
_POOL_CASES: list[MeasurementCase] = []


def _pool_case_errors(args) -> list[float]:
    i, offsets = args
    return case_errors(_POOL_CASES[i], offsets)


def measurement_error(cases: list[MeasurementCase], offsets: np.ndarray, pool=None) -> float:
    """Mean absolute IFS and QFS error (mm) over all hips of ``cases`` with these offsets
    (``pool``: a worker pool forked with ``_POOL_CASES`` = ``cases``)."""
    if pool is None:
        errors = [case_errors(c, offsets) for c in cases]
    else:
        errors = pool.map(_pool_case_errors, [(i, offsets) for i in range(len(cases))])
    return float(np.mean([e for errs in errors for e in errs]))


def _worker_pool(cases: list[MeasurementCase], workers: int):
    """A pool of ``workers`` processes forked with the cases (None for 1, or where fork is not
    available): label maps and measurements are single-threaded, the scans independent."""
    import multiprocessing as mp

    global _POOL_CASES
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        return None
    _POOL_CASES = cases
    return mp.get_context("fork").Pool(workers)


def refine_on_measurements(cases: list[MeasurementCase], offsets: dict[str, float],
                           groups=MEASUREMENT_GROUPS, values=REFINE_VALUES,
                           sweeps: int = REFINE_SWEEPS, log=None, workers: int = 1):
    """Shift each group of ``offsets`` (the Dice fit) by one of ``values``, a group at a time,
    keeping the shift that lowers ``measurement_error`` (ties go to the shift nearest 0), with
    ``workers`` processes. Returns (refined {class: offset}, {first class of group: shift},
    error before, error after)."""
    k = max(LABELS.values()) + 1
    base = np.zeros(k, np.float32)
    for name, v in offsets.items():
        base[LABELS[name]] = v

    def vector(sh):
        vec = base.copy()
        for g, d in zip(groups, sh):
            for name in g:
                vec[LABELS[name]] += d
        return vec

    pool = _worker_pool(cases, min(workers, len(cases)))
    seen: dict[tuple, float] = {}

    def score(x):                       # minus the error; each candidate is measured once
        key = tuple(np.round(x, 3))
        if key not in seen:
            seen[key] = measurement_error(cases, vector(x), pool)
            if log:
                named = {g[0]: round(float(d), 2) + 0.0 for g, d in zip(groups, x)}
                log(f"    shifts {named}: {seen[key]:.3f} mm")
        return -seen[key]

    try:
        shifts, before, after = coordinate_search(score, len(groups), values, sweeps)
    finally:
        if pool is not None:
            pool.terminate()
    refined = {n: round(float(offsets.get(n, 0.0)) + float(d), 2) + 0.0
               for g, d in zip(groups, shifts) for n in g}
    return ({**offsets, **refined},
            {g[0]: round(float(d), 2) + 0.0 for g, d in zip(groups, shifts)}, -before, -after)


def case_dice(case: CalibrationCase, offsets: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Dice of each class in ``classes`` for this case with these (K,) logit offsets (NaN where
    the class is in neither the truth nor the prediction)."""
    k = case.logp.shape[0]
    pred = (case.logp + offsets[:, None]).argmax(0)
    tp = case.fixed_tp + np.bincount(pred[pred == case.truth], minlength=k)
    npred = case.fixed_pred + np.bincount(pred, minlength=k)
    denom = (npred + case.truth_count)[classes].astype(float)
    if case.annotated is not None:          # a structure nobody outlined on this scan: no score
        denom[~case.annotated[classes]] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * tp[classes] / denom, np.nan)


def mean_dice(cases: list[CalibrationCase], offsets: np.ndarray, classes: np.ndarray) -> float:
    """Mean over cases of the mean Dice of ``classes``."""
    return float(np.nanmean([np.nanmean(case_dice(c, offsets, classes)) for c in cases]))


def coordinate_search(score, n: int, values, sweeps: int) -> tuple[np.ndarray, float, float]:
    """Maximise ``score(x)`` over ``x`` in ``values`` ** n, one coordinate at a time from x = 0:
    each coordinate tries the values nearest 0 first and takes one only if it scores strictly
    better (so ties go to the value nearest 0); stops after ``sweeps`` sweeps or one without a
    change. Returns (x, score at 0, best score)."""
    x = np.zeros(n)
    before = best = score(x)
    order = np.argsort(np.abs(values), kind="stable")
    for _ in range(sweeps):
        changed = False
        for i in range(n):
            current = x[i]
            for v in values[order]:
                x[i] = v
                d = score(x)
                if d > best + 1e-9:
                    best, current, changed = d, v, True
            x[i] = current
        if not changed:
            break
    return x, before, best


def fit_offsets(cases: list[CalibrationCase], classes=CALIBRATED, values=SEARCH_VALUES,
                sweeps: int = SWEEPS) -> tuple[dict[str, float], float, float]:
    """Coordinate search of one logit offset per class (others 0) maximising ``mean_dice``; ties
    go to the offset nearest 0. Returns ({class: offset}, Dice before, Dice after)."""
    k = cases[0].logp.shape[0]
    idx = np.array([LABELS[n] for n in classes])

    def score(x):
        off = np.zeros(k, np.float32)
        off[idx] = x
        return mean_dice(cases, off, idx)

    x, before, best = coordinate_search(score, len(idx), values, sweeps)
    return {n: round(float(np.float32(v)), 2) for n, v in zip(classes, x)}, before, best


def calibrate(model_path: str | Path, data: str | Path, modes=MODES, limit: int | None = None,
              out: str | Path | None = None, description: str | None = None, log=print,
              measurements: bool = True, workers: int = 1) -> dict:
    """Fit the class offsets of a bundle for each input combination on annotated scans (Dice,
    then, with ``measurements``, the IFS and QFS: see the module docstring) and write them into
    its metadata (at ``out``, weights copied, or in place); ``workers`` processes evaluate the
    measurement stage. Returns the calibration record stored under ``meta["calibration"]``."""
    from models.bundle import load_metadata, save_bundle, save_metadata
    from pipeline.segment import load_model
    from pipeline.training import annotated_mask, load_subject_labels, read_dataset

    model = load_model(model_path, device="auto")
    records = read_dataset(data)[:limit]
    meta = load_metadata(model_path)
    record = {"data": str(data), "description": description, "n_subjects": len(records),
              "search": [float(SEARCH_VALUES[0]), float(SEARCH_VALUES[-1]), 0.1],
              "objective": "mean Dice of " + ", ".join(CALIBRATED)
              + ("; then IFS and QFS mean absolute error" if measurements else ""),
              "modes": {}}
    truths: dict[str, dict] = {}
    offsets = {}
    for mode in modes:
        t0 = time.perf_counter()
        cases, mcases = [], []
        for i, r in enumerate(records, 1):
            log(f"{mode}: [{i}/{len(records)}] {r['subject']}")
            crop = _network_crop(r, model, mode, MARGIN_MM)
            if crop is None:
                continue
            probs, truth, box, affine = crop
            cases.append(_dice_case(r["subject"], mode, probs, truth, box, annotated_mask(r)))
            if measurements:
                if r["subject"] not in truths:
                    truths[r["subject"]] = truth_measurements(load_subject_labels(r), r["annotated"])
                if truths[r["subject"]]:
                    mcases.append(measurement_case(r["subject"], mode, probs, affine, box,
                                                   truths[r["subject"]]))
            del probs
        if not cases:
            log(f"{mode}: no subject has these inputs, skipped")
            continue
        fitted, before, after = fit_offsets(cases)
        rec = {"n_cases": len(cases), "mean_dice_before": round(before, 4),
               "mean_dice_after": round(after, 4)}
        log(f"{mode}: {len(cases)} scans, mean Dice of {', '.join(CALIBRATED)} "
            f"{before:.4f} -> {after:.4f} with offsets {fitted} ({time.perf_counter() - t0:.0f} s)")
        n_hips = sum(len(c.truth) for c in mcases)
        if measurements and n_hips < MIN_REFINE_HIPS:
            log(f"{mode}: {n_hips} hips measurable on the annotations (fewer than "
                f"{MIN_REFINE_HIPS}): offsets not refined on the measurements")
        elif measurements:
            t0 = time.perf_counter()
            refined, shifts, err0, err1 = refine_on_measurements(mcases, fitted, log=log,
                                                               workers=workers)
            idx = np.array([LABELS[n] for n in CALIBRATED])
            vec = np.zeros(max(LABELS.values()) + 1, np.float32)
            for name, v in refined.items():
                vec[LABELS[name]] = v
            dice_refined = mean_dice(cases, vec, idx)
            rec.update(n_hips=n_hips, measurement_mae_before=round(err0, 3),
                       measurement_mae_after=round(err1, 3), shifts=shifts,
                       mean_dice_refined=round(dice_refined, 4))
            log(f"{mode}: {n_hips} hips, IFS and QFS mean absolute error {err0:.3f} -> "
                f"{err1:.3f} mm with shifts {shifts} (mean Dice {after:.4f} -> "
                f"{dice_refined:.4f}; {time.perf_counter() - t0:.0f} s)")
            fitted = refined
        offsets[mode] = fitted
        record["modes"][mode] = rec
    meta.setdefault("inference", {})["class_offsets"] = offsets
    meta["calibration"] = record
    if out is None:
        save_metadata(model_path, meta)
    else:
        save_bundle(out, model.net, meta)
    return record


def main(argv=None) -> int:
    """Command line: fit and store a bundle's class offsets."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="bundle to calibrate (.safetensors or stem)")
    ap.add_argument("--data", required=True, help="annotated scans not used in training")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="input combinations to calibrate (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N subjects")
    ap.add_argument("--out", default=None, help="write a new bundle here instead of in place")
    ap.add_argument("--description", default=None, help="what the calibration scans are, for the "
                    "metadata")
    ap.add_argument("--no-measurements", action="store_true",
                    help="fit on Dice only: skip refining the offsets on the IFS and QFS")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes for the measurement stage (default: %(default)s)")
    a = ap.parse_args(argv)
    try:
        calibrate(a.model, a.data, [m.strip() for m in a.modes.split(",") if m.strip()], a.limit,
                  a.out, a.description, measurements=not a.no_measurements, workers=a.workers)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
