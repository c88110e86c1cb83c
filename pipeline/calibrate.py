"""Per-class logit offsets fitted on annotated scans: a post-hoc calibration of a trained model.

A network trained with a Dice loss tends to draw small structures too large or too small by a
constant margin (the bundled model, before calibration: lesser trochanter volume 1.28 x the
truth's on held-out phantoms, quadratus femoris 1.09 x). Adding one constant per class to the
logits before the softmax moves that class's boundary everywhere at once. The offsets of the
structures the measurements use (``CALIBRATED``) are fitted, for each input combination (T1 +
fluid, T1 only, fluid only), by coordinate search maximising the mean Dice of those structures
over annotated scans the network did not train on; they are written into the model metadata
(``inference.class_offsets``) and ``pipeline.segment`` applies them.

    python -m pipeline.calibrate --model RUN/best.safetensors --data CALIBRATION_COHORT \\
        [--modes t1+fluid,t1,fluid] [--limit N] [--out NEW_BUNDLE]

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


def _images(rec: dict, mode: str) -> dict:
    from pipeline.image import load_nifti

    out = {}
    for ch in mode.split("+"):
        if not rec.get(ch):
            return {}
        out[ch] = load_nifti(rec[ch], "t1" if ch == "t1" else None)
    return out


def collect_case(rec: dict, model, mode: str, margin_mm: float = MARGIN_MM,
                 open_margin: float | None = None) -> CalibrationCase | None:
    """Run the network (without offsets) on one subject in one input combination and keep what
    the fit needs; None when the subject lacks an image of that combination or the calibrated
    structures."""
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
    p = probs_t[(slice(None), *box)].numpy().reshape(probs_t.shape[0], -1)
    t = truth[box].ravel().astype(np.int64)
    logp = np.log(np.maximum(p, 1e-8))
    k = logp.shape[0]
    top2 = np.partition(logp, k - 2, axis=0)[k - 2:]
    span = float(SEARCH_VALUES.max() - SEARCH_VALUES.min()) if open_margin is None else open_margin
    open_ = (top2[1] - top2[0]) <= span
    pred = logp.argmax(0)
    fixed = ~open_
    return CalibrationCase(
        subject=rec["subject"], mode=mode, logp=logp[:, open_].astype(np.float32), truth=t[open_],
        fixed_tp=np.bincount(pred[fixed][pred[fixed] == t[fixed]], minlength=k),
        fixed_pred=np.bincount(pred[fixed], minlength=k),
        truth_count=np.bincount(t, minlength=k))


def case_dice(case: CalibrationCase, offsets: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Dice of each class in ``classes`` for this case with these (K,) logit offsets (NaN where
    the class is in neither the truth nor the prediction)."""
    k = case.logp.shape[0]
    pred = (case.logp + offsets[:, None]).argmax(0)
    tp = case.fixed_tp + np.bincount(pred[pred == case.truth], minlength=k)
    npred = case.fixed_pred + np.bincount(pred, minlength=k)
    denom = (npred + case.truth_count)[classes].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * tp[classes] / denom, np.nan)


def mean_dice(cases: list[CalibrationCase], offsets: np.ndarray, classes: np.ndarray) -> float:
    """Mean over cases of the mean Dice of ``classes``."""
    return float(np.nanmean([np.nanmean(case_dice(c, offsets, classes)) for c in cases]))


def fit_offsets(cases: list[CalibrationCase], classes=CALIBRATED, values=SEARCH_VALUES,
                sweeps: int = SWEEPS) -> tuple[dict[str, float], float, float]:
    """Coordinate search of one logit offset per class (others 0) maximising ``mean_dice``; ties
    go to the offset nearest 0. Returns ({class: offset}, Dice before, Dice after)."""
    k = cases[0].logp.shape[0]
    idx = np.array([LABELS[n] for n in classes])
    off = np.zeros(k, np.float32)
    before = best = mean_dice(cases, off, idx)
    order = np.argsort(np.abs(values), kind="stable")
    for _ in range(sweeps):
        changed = False
        for c in idx:
            current = off[c]
            for v in values[order]:
                off[c] = v
                d = mean_dice(cases, off, idx)
                if d > best + 1e-9:
                    best, current, changed = d, v, True
            off[c] = current
        if not changed:
            break
    names = {v: n for n, v in LABELS.items()}
    return {names[int(c)]: round(float(off[c]), 2) for c in idx}, before, best


def calibrate(model_path: str | Path, data: str | Path, modes=MODES, limit: int | None = None,
              out: str | Path | None = None, description: str | None = None, log=print) -> dict:
    """Fit the class offsets of a bundle for each input combination on annotated scans and write
    them into its metadata (at ``out``, weights copied, or in place). Returns the calibration
    record stored under ``meta["calibration"]``."""
    from models.bundle import load_metadata, save_bundle, save_metadata
    from pipeline.segment import load_model
    from pipeline.training import read_dataset

    model = load_model(model_path, device="auto")
    records = read_dataset(data)[:limit]
    meta = load_metadata(model_path)
    record = {"data": str(data), "description": description, "n_subjects": len(records),
              "search": [float(SEARCH_VALUES[0]),
              float(SEARCH_VALUES[-1]), 0.1], "modes": {}}
    offsets = {}
    for mode in modes:
        t0 = time.perf_counter()
        cases = [c for r in records if (c := collect_case(r, model, mode)) is not None]
        if not cases:
            log(f"{mode}: no subject has these inputs, skipped")
            continue
        fitted, before, after = fit_offsets(cases)
        offsets[mode] = fitted
        record["modes"][mode] = {"n_cases": len(cases), "mean_dice_before": round(before, 4),
                                 "mean_dice_after": round(after, 4)}
        log(f"{mode}: {len(cases)} scans, mean Dice of {', '.join(CALIBRATED)} "
            f"{before:.4f} -> {after:.4f} with offsets {fitted} ({time.perf_counter() - t0:.0f} s)")
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
    a = ap.parse_args(argv)
    try:
        calibrate(a.model, a.data, [m.strip() for m in a.modes.split(",") if m.strip()], a.limit,
                  a.out, a.description)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
