"""Accuracy of the measurement module on ground-truth label maps of a phantom cohort.

    python benchmarks/measure_accuracy.py --cohort DIR [--limit N] [--csv OUT.csv]

Runs ``pipeline.measure.measure_hips`` on each subject's ``labels.nii.gz`` with its images and
compares with ``truth.json``: MAE / bias / max error of IFS and QFS (3D and axial), end-point
error, agreement of the edema and Goutallier grades, fat-fraction and volume error, side
correctness (each reported hip's IFS end points must lie next to the truth end points of the
same side), pose estimates against the generator's pose, and seconds per scan (measure only, and
with file loading). Prints one table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.image import load_nifti  # noqa: E402
from pipeline.labels import LABELS, read_label_table  # noqa: E402
from pipeline.measure import measure_hips  # noqa: E402

SIDE_TOL_MM = 15.0  # reported IT/LT end points within this distance of the truth's = right side


def load_subject(root: Path, row: dict):
    lab = load_nifti(root / row["labels"], kind="labels")
    table_path = (root / row["labels"]).with_name("labels.json")
    table = read_label_table(table_path) if table_path.exists() else None
    images = {}
    if row.get("t1"):
        images["t1"] = load_nifti(root / row["t1"], kind="t1")
    if row.get("fluid"):
        img = load_nifti(root / row["fluid"], kind=row.get("fluid_kind") or "t2fs")
        img.meta["fluid_kind"] = row.get("fluid_kind") or "t2fs"
        images["fluid"] = img
    if row.get("dixon_fat") and row.get("dixon_water"):
        images["dixon_fat"] = load_nifti(root / row["dixon_fat"], kind="dixon_fat")
        images["dixon_water"] = load_nifti(root / row["dixon_water"], kind="dixon_water")
    return lab, images, table


def scan_subject(d: Path) -> dict:
    """cohort.csv-like row of one subject folder."""
    rel = lambda n: f"{d.name}/{n}" if (d / n).exists() else ""  # noqa: E731
    kind = "stir" if (d / "stir.nii.gz").exists() else ("t2fs" if (d / "t2fs.nii.gz").exists() else "")
    return {"subject": d.name, "t1": rel("t1.nii.gz"), "fluid": rel(f"{kind}.nii.gz") if kind else "",
            "fluid_kind": kind, "dixon_fat": rel("dixon_fat.nii.gz"),
            "dixon_water": rel("dixon_water.nii.gz"), "labels": rel("labels.nii.gz"),
            "truth": rel("truth.json")}


def _label_near(lab, table, name: str, point, reach_mm: float = 1.5) -> bool:
    """Whether structure ``name`` is labelled within ``reach_mm`` (in-plane) of a world point on
    the point's nearest slice: do the truth's end points lie on the labelled structures?"""
    value = (table or LABELS)[name]
    inv = np.linalg.inv(lab.affine)
    c = inv[:3, :3] @ np.asarray(point, float) + inv[:3, 3]
    ax = lab.slice_axis()
    r = np.ceil(reach_mm / lab.spacing).astype(int)
    r[ax] = 0
    lo = np.maximum(np.rint(c).astype(int) - r, 0)
    hi = np.minimum(np.rint(c).astype(int) + r + 1, lab.shape)
    if np.any(hi <= lo):
        return False
    return bool((lab.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == value).any())


def centre_bound(lab, table, a: str, b: str, side_x_sign: float) -> float | None:
    """Smallest in-slice distance between voxel centres labelled ``a`` and ``b`` on one side
    (world x sign). Voxel centres lie inside their structures, so the true in-plane distance of
    the labelled anatomy cannot exceed this: an algorithm-free upper bound for the axial truth."""
    from scipy.spatial import cKDTree

    t = table or LABELS
    ax = lab.slice_axis()
    best = None
    pts = {}
    for name in (a, b):
        ijk = np.argwhere(lab.array == t[name])
        w = ijk @ lab.affine[:3, :3].T + lab.affine[:3, 3]
        keep = np.sign(w[:, 0]) == side_x_sign
        pts[name] = (ijk[keep, ax], w[keep])
    for k in np.intersect1d(pts[a][0], pts[b][0]):
        wa, wb = pts[a][1][pts[a][0] == k], pts[b][1][pts[b][0] == k]
        d = float(cKDTree(wb).query(wa)[0].min())
        best = d if best is None else min(best, d)
    return best


def compare(sub: str, rec: dict, truth: dict, lab=None, table=None) -> list[dict]:
    """One row per hip present in the truth or in the record."""
    rows = []
    for side in ("left", "right"):
        t = truth["hips"].get(side)
        h = rec["hips"][side]
        if t is None and not h["present"]:
            continue
        r = {"subject": sub, "side": side, "truth_present": t is not None,
             "reported_present": bool(h["present"])}
        if t is not None and h["present"]:
            for key, tkey in (("ifs_mm", "ifs_3d_mm"), ("ifs_axial_mm", "ifs_axial_mm"),
                              ("qfs_mm", "qfs_3d_mm"), ("qfs_axial_mm", "qfs_axial_mm")):
                r[f"{key}_true"], r[f"{key}_est"] = t.get(tkey), h.get(key)
                if t.get(tkey) is not None and h.get(key) is not None:
                    r[f"{key}_err"] = h[key] - t[tkey]
            ok = None
            if h.get("ifs_points") and t.get("ifs_3d_points"):
                e = [np.linalg.norm(np.subtract(a, b)) for a, b in zip(h["ifs_points"],
                                                                       t["ifs_3d_points"])]
                r["ifs_point_err_mm"] = float(np.mean(e))
                ok = bool(max(e) < SIDE_TOL_MM)
            r["side_ok"] = ok
            if lab is not None and t.get("ifs_axial_points"):
                pa, pb = t["ifs_axial_points"]
                r["truth_it_on_label"] = _label_near(lab, table, "ischial_tuberosity", pa)
                r["truth_lt_on_label"] = _label_near(lab, table, "lesser_trochanter", pb)
                cb = centre_bound(lab, table, "ischial_tuberosity", "lesser_trochanter",
                                  1.0 if side == "right" else -1.0)
                if cb is not None and t.get("ifs_axial_mm") is not None:
                    r["ifs_axial_truth_minus_centre_bound"] = t["ifs_axial_mm"] - cb
            r["edema_true"], r["edema_est"] = t.get("qf_edema"), h["qf_edema"].get("grade")
            r["edema_fraction_true"] = t.get("qf_edema_fraction")
            r["edema_fraction_above"] = h["qf_edema"].get("fraction_above_reference")
            r["edema_ratio"] = h["qf_edema"].get("signal_ratio")
            r["ff_true"], r["ff_est"] = t.get("qf_fat_fraction"), h.get("qf_fat_fraction")
            r["ff_method"] = h.get("qf_fat_method")
            r["gout_true"], r["gout_est"] = t.get("qf_goutallier_grade"), h.get("qf_goutallier_grade")
            r["vol_true"], r["vol_est"] = t.get("qf_volume_ml"), h.get("qf_volume_ml")
            pose_t = t.get("pose") or {}
            r["rotation_true"], r["adduction_true"] = pose_t.get("rotation"), pose_t.get("adduction")
            r["lt_direction_est"] = h["pose"].get("lt_direction_deg")
            r["adduction_est"] = h["pose"].get("adduction_deg")
        rows.append(r)
    return rows


def _stats(rows, key):
    e = np.array([r[f"{key}_err"] for r in rows if r.get(f"{key}_err") is not None], float)
    if e.size == 0:
        return "n/a"
    return (f"n={e.size:3d}  MAE {np.abs(e).mean():.3f}  bias {e.mean():+.3f}  "
            f"p95 {np.percentile(np.abs(e), 95):.3f}  max {np.abs(e).max():.3f}")


def _agree(rows, a, b):
    pairs = [(r[a], r[b]) for r in rows if r.get(a) is not None and r.get(b) is not None]
    if not pairs:
        return "n/a"
    ok = sum(x == y for x, y in pairs)
    return f"{ok}/{len(pairs)} = {ok / len(pairs):.1%}"


def _corr(rows, a, b):
    p = np.array([(r[a], r[b]) for r in rows if r.get(a) is not None and r.get(b) is not None],
                 float)
    if len(p) < 3:
        return "n/a"
    c = np.corrcoef(p[:, 0], p[:, 1])[0, 1]
    slope, icpt = np.polyfit(p[:, 0], p[:, 1], 1)
    return f"n={len(p)}  r={c:.2f}  est = {slope:.2f} * truth {icpt:+.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--csv", help="write per-hip rows here")
    a = ap.parse_args(argv)
    root = Path(a.cohort)
    if (root / "cohort.csv").exists():
        with open(root / "cohort.csv") as f:
            subjects = list(csv.DictReader(f))[: a.limit]
    else:   # a cohort still being written: its finished subject folders
        subjects = [scan_subject(d) for d in sorted(root.iterdir())
                    if d.is_dir() and (d / "truth.json").exists()][: a.limit]
    rows, t_measure, t_wall, t_total = [], [], [], []
    for row in subjects:
        t0 = time.perf_counter()
        lab, images, table = load_subject(root, row)
        t1, c1 = time.perf_counter(), time.process_time()
        rec = measure_hips(lab, images, table)
        t2, c2 = time.perf_counter(), time.process_time()
        t_measure.append(c2 - c1)    # CPU time of this process: one core, whatever the load
        t_wall.append(t2 - t1)
        t_total.append(t2 - t0)
        json.dumps(rec)  # must serialise
        truth = json.loads((root / row["truth"]).read_text())
        rows.extend(compare(row["subject"], rec, truth, lab, table))

    both = [r for r in rows if r["truth_present"] and r["reported_present"]]
    missed = [r for r in rows if r["truth_present"] and not r["reported_present"]]
    extra = [r for r in rows if not r["truth_present"] and r["reported_present"]]
    side_known = [r for r in both if r.get("side_ok") is not None]
    print(f"cohort {root}  subjects {len(subjects)}  hips in truth "
          f"{sum(r['truth_present'] for r in rows)}  threads OMP={os.environ.get('OMP_NUM_THREADS')}")
    print(f"{'IFS 3D':16s}{_stats(both, 'ifs_mm')}")
    print(f"{'IFS axial':16s}{_stats(both, 'ifs_axial_mm')}")
    print(f"{'QFS 3D':16s}{_stats(both, 'qfs_mm')}")
    print(f"{'QFS axial':16s}{_stats(both, 'qfs_axial_mm')}")
    pe = [r["ifs_point_err_mm"] for r in both if r.get("ifs_point_err_mm") is not None]
    if pe:
        print(f"{'IFS end points':16s}mean {np.mean(pe):.2f} mm  median {np.median(pe):.2f} mm")
    print(f"{'sides':16s}{sum(r['side_ok'] for r in side_known)}/{len(side_known)} correct; "
          f"hips missed {len(missed)}, reported without truth {len(extra)}")
    for key, what in (("truth_it_on_label", "IT"), ("truth_lt_on_label", "LT")):
        v = [r[key] for r in both if r.get(key) is not None]
        if v:
            print(f"{'truth check':16s}axial IFS truth end point on the {what} label "
                  f"(<= 1.5 mm in-plane): {sum(v)}/{len(v)}")
    ex = np.array([r["ifs_axial_truth_minus_centre_bound"] for r in both
                   if r.get("ifs_axial_truth_minus_centre_bound") is not None])
    if ex.size:
        print(f"{'truth check':16s}axial IFS truth exceeds the label voxel-centre bound by "
              f"> 0.5 mm in {(ex > 0.5).sum()}/{ex.size} hips (max {ex.max():.2f} mm)")
        ok = [r for r in both if r.get("ifs_axial_truth_minus_centre_bound", 0.0) <= 0.5]
        print(f"{'  consistent':16s}IFS 3D    {_stats(ok, 'ifs_mm')}")
        print(f"{'  hips only':16s}IFS axial {_stats(ok, 'ifs_axial_mm')}")
    print(f"{'edema grade':16s}{_agree(both, 'edema_true', 'edema_est')}")
    print(f"{'Goutallier':16s}{_agree(both, 'gout_true', 'gout_est')}")
    for method in ("dixon", "t1_calibrated"):
        sub = [r for r in both if r.get("ff_method") == method]
        if sub:
            print(f"{'  ' + method:16s}{_agree(sub, 'gout_true', 'gout_est')}")
    for method in ("dixon", "t1_calibrated"):
        e = [r["ff_est"] - r["ff_true"] for r in both
             if r.get("ff_method") == method and r.get("ff_est") is not None]
        if e:
            print(f"{'FF ' + method:16s}n={len(e)}  MAE {np.mean(np.abs(e)):.3f}  "
                  f"bias {np.mean(e):+.3f}")
    v = [(r["vol_est"] - r["vol_true"]) / r["vol_true"] for r in both
         if r.get("vol_est") and r.get("vol_true")]
    if v:
        print(f"{'QF volume':16s}n={len(v)}  mean rel. error {np.mean(v):+.1%}  "
              f"MAE {np.mean(np.abs(v)):.1%}")
    print(f"{'adduction':16s}{_corr(both, 'adduction_true', 'adduction_est')}")
    print(f"{'rotation proxy':16s}{_corr(both, 'rotation_true', 'lt_direction_est')}")
    print(f"{'sec / scan':16s}measure CPU mean {np.mean(t_measure):.2f}  max {np.max(t_measure):.2f}"
          f"  (wall mean {np.mean(t_wall):.2f}; with loading {np.mean(t_total):.2f}; "
          f"load average {os.getloadavg()[0]:.1f})")
    conf = {}
    for r in both:
        if r.get("edema_true") is not None:
            conf[(r["edema_true"], r["edema_est"])] = conf.get((r["edema_true"], r["edema_est"]), 0) + 1
    if conf:
        print("edema truth -> estimate: " + ", ".join(f"{k[0]}->{k[1]}: {v}"
                                                       for k, v in sorted(conf.items(), key=str)))
    if a.csv:
        keys = sorted({k for r in rows for k in r})
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
