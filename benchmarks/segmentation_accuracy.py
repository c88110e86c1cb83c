"""Accuracy of the segmentation network on a phantom cohort, with exact ground truth.

    python benchmarks/segmentation_accuracy.py --cohort DIR [--model PATH] [--modes both,t1,fluid]
                                               [--limit N] [--out results.csv] [--dixon]
    python benchmarks/segmentation_accuracy.py --summarise results.csv [more.csv ...]

For every subject of ``DIR/cohort.csv`` and every input mode (both sequences / T1 only / fluid
only; ``dixon``: the subjects with a Dixon pair, segmented on the T1-like image made from it and
graded from it, as ``infer.py`` runs a Dixon-only scan) it segments the scan and reports:

* Dice per class, overall and per side (voxels assigned to the nearer of the truth hips'
  centres along world x; ``truth.json`` gives the IT/LT points of each hip present), against
  the true labels on the grid the prediction comes back on: the T1's, or for a scan segmented
  without its T1 the fluid or Dixon grid's (``labels_fluid`` / ``labels_dixon`` of the cohort;
  in older cohorts without them, the T1 labels resampled there);
* left/right confusion: (a) voxels of a paired class predicted on a side where the truth has
  none of that class (> 100 mm^3 counts as confusion), (b) a measured hip whose IFS points lie
  nearer to the other truth hip;
* end to end: ``pipeline.measure.measure_hips`` on the predicted labels vs ``truth.json``
  (IFS ``ifs_3d_mm``, QFS ``qfs_3d_mm``, edema grade, Goutallier grade: from T1, or from Dixon
  with ``--dixon``), the QFS error also split by the module's plausibility check
  (``qfs_plausible``: false when QFS > IFS); the same on the true label map
  (``--truth-labels``) separates segmentation error from measurement error;
* a Dixon pair that reads swapped around every hip (``measure.dixon_swapped_throughout``) is
  exchanged and the scan run again, as ``infer.py`` does (column ``dixon_exchanged``).

Prints a summary (means per mode) against the targets of the issue, with 95 % intervals:
bootstrap over subjects for mean Dice and MAE, Wilson for grade agreement (plus the linearly
weighted kappa of the Goutallier grade); writes one CSV row per subject, mode and side with
``--out``. ``--summarise`` prints the summary again from such CSVs without segmenting; given
several (cohorts of the same run), it pools them.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.image import load_nifti, resample_like  # noqa: E402
from pipeline.labels import LABELS, label_names  # noqa: E402
from pipeline.segment import MIRROR_CHOICES, PAIRED  # noqa: E402
from pipeline.stats import bootstrap_ci, weighted_kappa, wilson_ci  # noqa: E402

TARGETS = {"quadratus_femoris": 0.90, "lesser_trochanter": 0.85, "ischial_tuberosity": 0.90,
           "hamstring_tendon": 0.85}
SIDES = ("left", "right")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (NaN when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def hip_centres(truth: dict) -> dict[str, np.ndarray]:
    """World centre of each hip present in the truth (mean of its IFS/QFS end points)."""
    out = {}
    for side in SIDES:
        h = truth.get("hips", {}).get(side) or {}
        pts = [p for k in ("ifs_3d_points", "qfs_3d_points") for p in (h.get(k) or [])]
        if pts:
            out[side] = np.mean(np.asarray(pts, float), axis=0)
    return out


def side_map(img, centres: dict) -> np.ndarray | None:
    """Per-voxel side index (0 left, 1 right) by nearest hip centre along world x."""
    if not centres:
        return None
    names = list(centres)
    ijk = np.indices(img.shape, dtype=np.float32).reshape(3, -1)
    x = (img.affine[0, :3].astype(np.float32) @ ijk + np.float32(img.affine[0, 3])).reshape(img.shape)
    cx = np.array([centres[n][0] for n in names])
    idx = np.abs(x[..., None] - cx).argmin(-1)
    return np.array([SIDES.index(n) for n in names])[idx]


def truth_on_grid(row: dict, cohort: Path, truth_lab, pred):
    """The true label map on the prediction's grid: the cohort's labels sampled on that grid
    where the generator wrote them (``labels_fluid`` / ``labels_dixon``: a scan segmented
    without its T1 comes back on the fluid or Dixon grid), else the T1-grid labels taken onto it
    (nearest), which on another slice plane misplaces the truth by up to half a slice."""
    if pred.same_grid(truth_lab):
        return truth_lab
    for col in ("labels_fluid", "labels_dixon"):
        if row.get(col):
            own = load_nifti(cohort / row[col], "labels")
            if pred.same_grid(own):
                return own
    return resample_like(truth_lab, pred, order=0)


def evaluate_subject(row: dict, cohort: Path, model, modes, truth_labels: bool,
                     bf16: bool | None = None, mirror: bool | None = None,
                     dixon: bool = False, config=None, shading: bool = True,
                     partial_coverage: bool = True) -> list[dict]:
    """All metrics of one subject; one dict per (mode, side) plus one per mode with side 'all'.
    With ``dixon`` the subject's Dixon images (if any) go to the measurement, not the network,
    as ``infer.py --dixon-fat/--dixon-water`` does: the fat grade then comes from Dixon."""
    from pipeline.config import MeasureConfig
    from pipeline.measure import dixon_swapped_throughout, measure_hips
    from pipeline.segment import segment

    t1 = load_nifti(cohort / row["t1"], "t1") if row.get("t1") else None
    fluid = None
    if row.get("fluid"):
        fluid = load_nifti(cohort / row["fluid"])
        fluid.meta["fluid_kind"] = row.get("fluid_kind") or ("stir" if "stir" in row["fluid"] else "t2fs")
    truth_lab = load_nifti(cohort / row["labels"], "labels")
    truth = json.loads((cohort / row["truth"]).read_text()) if row.get("truth") else {}
    centres = hip_centres(truth)
    all_imgs = {"t1": t1, "fluid": fluid}
    dixon_pair = {}
    if (dixon or "dixon" in modes) and row.get("dixon_fat") and row.get("dixon_water"):
        dixon_pair = {k: load_nifti(cohort / row[k], k) for k in ("dixon_fat", "dixon_water")}
    dixon_imgs = dixon_pair if dixon else {}
    rows = []
    runs = [(m, {k: v for k, v in all_imgs.items() if v is not None and (m == "both" or k == m)})
            for m in modes if m != "dixon"]
    if "dixon" in modes and dixon_pair:      # a Dixon-only scan, as infer.py runs it
        from pipeline.api import network_inputs

        runs.append(("dixon", network_inputs(dixon_pair, [])))
    if truth_labels:
        runs.append(("truth_labels", None))
    for mode, imgs in runs:
        if imgs is not None and not imgs:
            continue
        t0 = time.perf_counter()
        if imgs is None:
            pred, conf, seconds, resegmented, partial, fat_ratio = truth_lab, {}, 0.0, False, "", None
            t1_ratio, roles_swapped = None, False
            meas_imgs = {k: v for k, v in all_imgs.items() if v is not None}
        else:
            seg = segment(imgs, model, bf16=bf16, mirror=mirror, shading=shading,
                          partial_coverage=partial_coverage)
            pred, conf, seconds = seg.labels, seg.confidence, time.perf_counter() - t0
            resegmented, partial = seg.shading_corrected, "+".join(seg.partial_channels)
            fat_ratio, t1_ratio, roles_swapped = seg.fluid_fat_ratio, seg.t1_fat_ratio, seg.t1_fluid_swapped
            meas_imgs = dixon_pair if mode == "dixon" else imgs
        measured = measure_hips(pred, {**meas_imgs, **dixon_imgs}, config=config)
        exchanged = False
        if dixon_pair and (dixon or mode == "dixon") and \
                dixon_swapped_throughout(measured, config or MeasureConfig()):
            # swapped around every hip: exchanged and run again, as infer.py does
            from pipeline.dixon_input import exchanged as exchange_pair

            swapped = exchange_pair(dixon_pair)
            exchanged = True
            if mode == "dixon":
                from pipeline.api import network_inputs

                seg = segment(network_inputs(swapped, []), model, bf16=bf16, mirror=mirror,
                              shading=shading, partial_coverage=partial_coverage)
                pred, conf = seg.labels, seg.confidence
                meas_imgs = swapped
            measured = measure_hips(pred, {**meas_imgs, **(swapped if dixon else {})}, config=config)
        tl = truth_on_grid(row, cohort, truth_lab, pred)
        sides = side_map(pred, centres)
        voxel_mm3 = float(abs(np.linalg.det(pred.affine[:3, :3])))
        for side in ("all", *SIDES):
            rec = {"subject": row["subject"], "mode": mode, "side": side, "seconds": round(seconds, 2),
                   "dixon_exchanged": exchanged,
                   "partial_coverage_pass": partial,
                   "resegmented": resegmented,
                   "fluid_fat_ratio": None if fat_ratio is None else round(fat_ratio, 3),
                   "t1_fat_ratio": None if t1_ratio is None else round(t1_ratio, 3),
                   "t1_fluid_swapped": roles_swapped}
            if side != "all" and side not in centres:
                continue
            sel = np.ones(pred.shape, bool) if side == "all" else (sides == SIDES.index(side))
            for name, v in LABELS.items():
                if v == 0:
                    continue
                rec[f"dice_{name}"] = dice((pred.array == v) & sel, (tl.array == v) & sel)
                if side == "all" and conf:
                    rec[f"conf_{name}"] = conf.get(name)
            if side == "all" and sides is not None:
                wrong = 0.0
                for name in PAIRED:
                    v = LABELS[name]
                    for si, s in enumerate(SIDES):
                        on = sides == si
                        if not (tl.array[on] == v).any():
                            wrong += float((pred.array[on] == v).sum()) * voxel_mm3
                rec["wrong_side_mm3"] = wrong
                rec["lr_confusion"] = int(wrong > 100.0)
            if side != "all":
                m = measured["hips"].get(side) or {}
                t = truth["hips"].get(side) or {}
                for key, tkey in (("ifs_mm", "ifs_3d_mm"), ("qfs_mm", "qfs_3d_mm")):
                    mv, tv = m.get(key), t.get(tkey)
                    rec[key] = mv
                    rec[f"{key}_truth"] = tv
                    rec[f"{key}_abs_err"] = abs(mv - tv) if mv is not None and tv is not None else None
                rec["qfs_plausible"] = m.get("qfs_plausible")
                ed = (m.get("qf_edema") or {}).get("grade")
                rec["edema_grade"], rec["edema_truth"] = ed, t.get("qf_edema")
                rec["goutallier"], rec["goutallier_truth"] = m.get("qf_goutallier_grade"), t.get("qf_goutallier_grade")
                rec["fat_method"] = m.get("qf_fat_method")
                rec["fat_fraction"], rec["fat_fraction_truth"] = m.get("qf_fat_fraction"), t.get("qf_fat_fraction")
                pts = m.get("ifs_points")
                if pts and len(centres) == 2:
                    p = np.mean(np.asarray(pts, float), axis=0)
                    nearest = min(centres, key=lambda s: abs(centres[s][0] - p[0]))
                    rec["lr_confusion"] = int(nearest != side)
            rows.append(rec)
    return rows


def _ci_text(ci, digits: int) -> str:
    """' (95 % CI lo-hi)' of a ``BootstrapCI``, empty when it was not computed."""
    if ci.skipped or not np.isfinite(ci.low):
        return ""
    return f" (95 % CI {ci.low:.{digits}f}-{ci.high:.{digits}f})"


def subject_bootstrap_mae(hip_rows: list[dict], key: str):
    """Bootstrap interval of the mean of ``key`` over hips, resampling subjects (a subject's
    two hips share a scan and a segmentation, so they are not independent draws)."""
    subjects = sorted({r["subject"] for r in hip_rows})
    sums = np.array([sum(float(r[key]) for r in hip_rows if r["subject"] == s) for s in subjects])
    counts = np.array([sum(1 for r in hip_rows if r["subject"] == s) for s in subjects], float)
    return bootstrap_ci(lambda a, b: float(a.sum() / b.sum()), sums, counts)


def grade_agreement_text(graded: list[tuple], ordinal: bool) -> str:
    """Share of hips whose grade matches the truth, with its Wilson 95 % interval (hips taken
    as independent); for an ordinal grade (Goutallier 0-4) also the linearly weighted kappa and
    the hips two or more grades off."""
    hits = sum(str(a) == str(b) for a, b in graded)
    lo, hi = wilson_ci(hits, len(graded))
    text = f"{hits / len(graded):.2f} ({hits}/{len(graded)}, 95 % CI {lo:.2f}-{hi:.2f})"
    if ordinal:
        a, b = [int(x) for x, _ in graded], [int(y) for _, y in graded]
        k = weighted_kappa(a, b, categories=range(5), weights="linear")
        far = sum(abs(x - y) >= 2 for x, y in zip(a, b))
        text += f", linear weighted kappa {k.kappa:.2f}, two or more grades off: {far}"
    return text


def summarise(rows: list[dict]) -> str:
    """Text summary: mean Dice per key class per mode, MAE, confusion, agreement."""
    lines = []
    modes = sorted({r["mode"] for r in rows}, key=lambda m: ["both", "t1", "fluid", "dixon", "truth_labels"].index(m))
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode and r["side"] == "all"]
        sd = [r for r in rows if r["mode"] == mode and r["side"] != "all"]
        lines.append(f"== {mode}: {len(rs)} subjects, {len(sd)} hips")
        for name in label_names()[1:]:
            vals = np.array([r[f"dice_{name}"] for r in rs], float)
            side_vals = np.array([r[f"dice_{name}"] for r in sd], float)
            tgt = TARGETS.get(name)
            mark = "" if tgt is None else f"  (target >= {tgt:.2f}: {'OK' if np.nanmean(vals) >= tgt else 'MISS'})"
            ci = "" if tgt is None else _ci_text(bootstrap_ci(np.nanmean, vals[np.isfinite(vals)]), 3)
            lines.append(f"  Dice {name:20s} mean {np.nanmean(vals):.3f}{ci} median {np.nanmedian(vals):.3f} "
                         f"min {np.nanmin(vals):.3f} | per hip mean {np.nanmean(side_vals):.3f}{mark}")
        for key in ("ifs_mm", "qfs_mm"):
            measured = [r for r in sd if r.get(f"{key}_abs_err") is not None]
            e = np.array([r[f"{key}_abs_err"] for r in measured], float)
            n_missing = sum(1 for r in sd if r.get(f"{key}_truth") is not None and r.get(key) is None)
            if e.size:
                ci = _ci_text(subject_bootstrap_mae(measured, f"{key}_abs_err"), 2)
                lines.append(f"  {key[:3].upper()} MAE {e.mean():.2f} mm{ci} (median {np.median(e):.2f}, max {e.max():.2f}, "
                             f"n={e.size}, not measured {n_missing}) target <= 1.0: {'OK' if e.mean() <= 1.0 else 'MISS'}")
        # the measurement module's plausibility check (QFS > IFS: missed hamstring origin)
        for label, keep in (("plausible", True), ("marked implausible", False)):
            e = np.array([r["qfs_mm_abs_err"] for r in sd
                          if r.get("qfs_mm_abs_err") is not None and r.get("qfs_plausible") is keep], float)
            if e.size:
                lines.append(f"    QFS MAE on hips whose QFS is {label}: {e.mean():.2f} mm "
                             f"(median {np.median(e):.2f}, max {e.max():.2f}, n={e.size})")
        conf = sum(int(r.get("lr_confusion") or 0) for r in rs + sd)
        lines.append(f"  left/right confusions: {conf}")
        for key in ("edema_grade", "goutallier"):
            pairs = [(r[key], r[f"{key.split('_')[0]}_truth"]) for r in sd
                     if r.get(f"{key.split('_')[0]}_truth") is not None]
            graded = [(a, b) for a, b in pairs if a is not None]
            if graded:
                lines.append(f"  {key} agreement {grade_agreement_text(graded, key == 'goutallier')} "
                             f"(not gradable {len(pairs) - len(graded)})")
                methods = sorted({r["fat_method"] for r in sd if r.get("fat_method")}) \
                    if key == "goutallier" else []
                if len(methods) > 1:  # split only when Dixon and T1 both graded (--dixon)
                    for meth in methods:
                        g = [str(r[key]) == str(r["goutallier_truth"]) for r in sd
                             if r.get("fat_method") == meth and r.get("goutallier_truth") is not None]
                        lines.append(f"    from {meth}: {np.mean(g):.2f} (n={len(g)})")
            elif pairs:  # e.g. edema without a fluid series: reported as null, by design
                lines.append(f"  {key}: not gradable with these inputs (n={len(pairs)})")
        ff = np.array([r["fat_fraction"] - r["fat_fraction_truth"] for r in sd
                       if r.get("fat_fraction") is not None and r.get("fat_fraction_truth") is not None])
        if ff.size:
            lines.append(f"  fat fraction MAE {np.abs(ff).mean():.3f} (bias {ff.mean():+.3f}, n={ff.size})")
        n_ex = sum(bool(r.get("dixon_exchanged")) for r in rs)
        if n_ex:
            lines.append(f"  Dixon fat and water exchanged (read swapped around every hip): {n_ex} of "
                         f"{len(rs)} scans")
        n_re = sum(bool(r.get("resegmented")) for r in rs)
        if n_re:
            lines.append(f"  segmented again after correcting strong shading: {n_re} of {len(rs)} scans")
        n_pc = sum(bool(r.get("partial_coverage_pass")) for r in rs)
        if n_pc:
            lines.append(f"  second series covering only part of the body (labels there from a pass "
                         f"without it): {n_pc} of {len(rs)} scans")
        fr = [r["fluid_fat_ratio"] for r in rs if r.get("fluid_fat_ratio") is not None]
        if fr:
            from pipeline.segment import UNSUPPRESSED_FAT_RATIO
            n_un = sum(f > UNSUPPRESSED_FAT_RATIO for f in fr)
            lines.append(f"  fat / muscle on the fluid series: {min(fr):.2f}-{max(fr):.2f} (median "
                         f"{np.median(fr):.2f}); not fat-suppressed (> {UNSUPPRESSED_FAT_RATIO:g}): "
                         f"{n_un} of {len(fr)} scans")
        t1r = [float(r["t1_fat_ratio"]) for r in rs if r.get("t1_fat_ratio") not in (None, "")]
        if t1r:
            from pipeline.segment import T1_MIN_FAT_RATIO
            n_sw = sum(str(r.get("t1_fluid_swapped")) == "True" for r in rs)
            lines.append(f"  fat / muscle on the T1: {min(t1r):.2f}-{max(t1r):.2f} (median {np.median(t1r):.2f}); "
                         f"not a T1 (< {T1_MIN_FAT_RATIO:g}): {sum(v < T1_MIN_FAT_RATIO for v in t1r)} of "
                         f"{len(t1r)} scans; read as given the wrong way round (infer.py exchanges them, "
                         f"this benchmark does not): {n_sw}")
        secs = [r["seconds"] for r in rs if r["seconds"]]
        if secs:
            lines.append(f"  seconds per scan: median {np.median(secs):.1f}")
    return "\n".join(lines)


def _cell(text: str):
    """A CSV cell back to the value ``evaluate_subject`` wrote: None, bool, int, float or str."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_results(paths) -> list[dict]:
    """Rows of ``--out`` CSVs; with several files each subject name is prefixed by its file's
    position, so that subjects of different cohorts stay apart."""
    rows = []
    for i, path in enumerate(paths):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                row = {k: _cell(v) for k, v in r.items()}
                row["subject"] = str(r["subject"]) if len(paths) == 1 else f"{i}:{r['subject']}"
                rows.append(row)
    return rows


def main(argv=None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", help="phantom cohort folder (with cohort.csv)")
    ap.add_argument("--summarise", nargs="+", metavar="CSV",
                    help="print the summary of earlier --out CSVs (pooled) instead of segmenting")
    ap.add_argument("--model", default=None, help="bundle (default: the bundled model)")
    ap.add_argument("--modes", default="both,t1,fluid", help="comma-separated: both, t1, fluid, dixon")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--truth-labels", action="store_true", help="also measure on the true label maps")
    ap.add_argument("--dixon", action="store_true",
                    help="give the subjects' Dixon images to the measurement (fat grade from Dixon)")
    ap.add_argument("--out", default=None, help="CSV of per-subject/side results")
    ap.add_argument("--bf16", choices=["model", "on", "off"], default="model",
                    help="bfloat16 autocast at inference (default: the model metadata's choice)")
    ap.add_argument("--mirror-tta", choices=list(MIRROR_CHOICES), default="model",
                    help="left-right mirror test-time augmentation: on around the measured "
                         "structures, full over the whole grid (default: the model metadata's choice)")
    ap.add_argument("--partial-coverage", choices=["on", "off"], default="on",
                    help="where the second series covers only part of the body, take the labels "
                         "there from a pass without it (segment(partial_coverage=...))")
    ap.add_argument("--resegment-shading", choices=["on", "off"], default="on",
                    help="segment again after dividing out strong intensity shading (segment(shading=...))")
    ap.add_argument("--body-mask", choices=["model", "on", "off"], default="model",
                    help="with a T1, label the air around the body background (the model "
                         "metadata's inference.body_mask, on by default)")
    ap.add_argument("--measure-config", default=None,
                    help="JSON overriding MeasureConfig for the measurement, as infer.py --config")
    a = ap.parse_args(argv)
    if a.summarise:
        print(summarise(read_results(a.summarise)))
        return 0
    if not a.cohort:
        ap.error("--cohort is required (or --summarise CSV ...)")
    from pipeline.config import load_config
    from pipeline.segment import load_model

    config = load_config(a.measure_config)

    cohort = Path(a.cohort)
    model = load_model(a.model, device="auto")
    if a.body_mask != "model":
        model.meta.setdefault("inference", {})["body_mask"] = a.body_mask == "on"
    with open(cohort / "cohort.csv", newline="") as f:
        subjects = list(csv.DictReader(f))[: a.limit]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    rows = []
    for i, row in enumerate(subjects):
        bf16 = None if a.bf16 == "model" else a.bf16 == "on"
        mirror = MIRROR_CHOICES[a.mirror_tta]
        rows.extend(evaluate_subject(row, cohort, model, modes, a.truth_labels, bf16, mirror, a.dixon,
                                     config, a.resegment_shading == "on", a.partial_coverage == "on"))
        print(f"[{i + 1}/{len(subjects)}] {row['subject']}", file=sys.stderr)
    print(summarise(rows))
    if a.out:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("subject", "mode", "side"), k))
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
