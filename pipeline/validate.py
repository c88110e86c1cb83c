"""Validate ifi-seg results against a reference: agreement statistics, flags, label overlap, report.

Usage::

    python -m pipeline.validate --results DIR --reference REF --out REPORT_DIR

``DIR`` is a folder written by the pipeline (``DIR/<subject>/measurements.json`` [+ ``labels.nii.gz``,
``labels.json``]) or a per-hip ``DIR/cohort.csv``. ``REF`` is one of

(a) a CSV of manual measurements, one row per hip: ``subject,side`` plus any of ``ifs_mm``,
    ``ifs_axial_mm``, ``qfs_mm``, ``qfs_axial_mm``, ``qf_edema`` (none/mild/marked or 0/1/2),
    ``qf_goutallier_grade`` (0-4), ``qf_fat_fraction`` (common aliases such as ``IFS`` accepted);
(b) a folder of manual label maps, ``REF/<subject>/labels.nii.gz`` or ``REF/<subject>.nii.gz``
    (optional label table JSON next to it, else the project's numbering is assumed);
(c) a generated phantom cohort (``REF/cohort.csv`` + ``REF/<subject>/truth.json``; label maps
    compared as well when ``REF/<subject>/labels.nii.gz`` exists).

Differences are always *tool - reference*. Outputs (in REPORT_DIR): ``report.html`` (images
embedded), ``report.md``, ``agreement.csv``, ``flags.csv``, ``grades.csv``, ``labels.csv`` +
``labels_summary.csv`` (when label maps were compared), ``pairs.csv`` (the matched hips),
Bland-Altman and scatter PNGs, ``summary.json``. Hips present on one side only are listed, not fatal.
"""
from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import html
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline import stats as S
from pipeline.config import DISCLAIMER, MeasureConfig, load_config
from pipeline.labels import LABELS, annotated_structures, read_label_table, remap_to_project

SIDES = ("left", "right")
EDEMA_GRADES = ("none", "mild", "marked")
GOUTALLIER_GRADES = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Measure:
    """A continuous measure: where it is found in tool output, truth.json and a manual CSV."""

    name: str
    label: str
    tool_key: str
    truth_key: str
    csv_key: str
    unit: str
    cutoff_attr: str | None = None   # MeasureConfig attribute holding the 'narrow' cut-off


MEASURES = (
    Measure("ifs_3d", "IFS (3D shortest)", "ifs_mm", "ifs_3d_mm", "ifs_mm", "mm", "ifs_cutoff_mm"),
    Measure("ifs_axial", "IFS (axial slice)", "ifs_axial_mm", "ifs_axial_mm", "ifs_axial_mm", "mm", "ifs_cutoff_mm"),
    Measure("qfs_3d", "QFS (3D shortest)", "qfs_mm", "qfs_3d_mm", "qfs_mm", "mm", "qfs_cutoff_mm"),
    Measure("qfs_axial", "QFS (axial slice)", "qfs_axial_mm", "qfs_axial_mm", "qfs_axial_mm", "mm", "qfs_cutoff_mm"),
    Measure("qf_fat_fraction", "QF fat fraction", "qf_fat_fraction", "qf_fat_fraction", "qf_fat_fraction", ""),
)

#: normalised CSV header -> canonical column
COLUMN_ALIASES = {
    "subject": "subject", "subject_id": "subject", "id": "subject", "case": "subject", "case_id": "subject",
    "patient": "subject", "patient_id": "subject",
    "side": "side", "hip": "side", "laterality": "side",
    "ifs": "ifs_mm", "ifs_mm": "ifs_mm", "ifs_3d": "ifs_mm", "ifs_3d_mm": "ifs_mm",
    "ischiofemoral_space": "ifs_mm", "ischiofemoral_space_mm": "ifs_mm",
    "ifs_axial": "ifs_axial_mm", "ifs_axial_mm": "ifs_axial_mm",
    "qfs": "qfs_mm", "qfs_mm": "qfs_mm", "qfs_3d": "qfs_mm", "qfs_3d_mm": "qfs_mm",
    "quadratus_femoris_space": "qfs_mm", "quadratus_femoris_space_mm": "qfs_mm",
    "qfs_axial": "qfs_axial_mm", "qfs_axial_mm": "qfs_axial_mm",
    "edema": "qf_edema", "qf_edema": "qf_edema", "edema_grade": "qf_edema", "qf_edema_grade": "qf_edema",
    "goutallier": "qf_goutallier_grade", "goutallier_grade": "qf_goutallier_grade",
    "qf_goutallier": "qf_goutallier_grade", "qf_goutallier_grade": "qf_goutallier_grade",
    "fat_fraction": "qf_fat_fraction", "ff": "qf_fat_fraction", "qf_ff": "qf_fat_fraction",
    "qf_fat_fraction": "qf_fat_fraction",
}

_SIDE_WORDS = {"l": "left", "left": "left", "lt": "left", "links": "left", "sin": "left",
               "r": "right", "right": "right", "rt": "right", "rechts": "right", "dex": "right"}


# --------------------------------------------------------------------------------------------
# Value parsing
# --------------------------------------------------------------------------------------------
def _num(v: Any) -> float:
    """A float from a number, numeric string or a dict holding one (``value``/``mm``); else NaN."""
    if isinstance(v, dict):
        for key in ("value", "mm", "distance_mm", "fraction", "grade"):
            if key in v:
                return _num(v[key])
        return float("nan")
    if v is None or isinstance(v, bool):
        return float("nan")
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def norm_bool(v: Any) -> bool | None:
    """True/False from a bool or its CSV spelling (true/false, 1/0, yes/no); else None."""
    if isinstance(v, bool) or v is None:
        return v
    word = str(v).strip().lower()
    return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(word)


def norm_edema(v: Any) -> str | None:
    """Edema grade as 'none'/'mild'/'marked' from words, 0/1/2 or a dict with ``grade``; else None."""
    if isinstance(v, dict):
        v = v.get("grade", v.get("value"))
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        if not math.isfinite(float(v)):
            return None
        i = int(round(float(v)))
        return EDEMA_GRADES[i] if 0 <= i < len(EDEMA_GRADES) else None
    s = str(v).strip().lower()
    words = {"none": "none", "no": "none", "absent": "none", "0": "none", "negative": "none",
             "mild": "mild", "1": "mild", "slight": "mild",
             "marked": "marked", "2": "marked", "moderate": "marked", "severe": "marked"}
    if s in words:
        return words[s]
    f = _num(s)
    return norm_edema(f) if math.isfinite(f) else None


def norm_grade(v: Any) -> int | None:
    """Goutallier grade 0-4 as int, else None."""
    f = _num(v)
    if not math.isfinite(f):
        return None
    i = int(round(f))
    return i if 0 <= i <= 4 else None


def norm_side(v: Any) -> str | None:
    """'left'/'right' from common spellings (patient's side), else None."""
    return _SIDE_WORDS.get(str(v).strip().lower()) if v is not None else None


def _norm_header(h: str) -> str:
    h = re.sub(r"\(.*?\)|\[.*?\]", "", str(h)).strip().lower()
    h = re.sub(r"[^a-z0-9]+", "_", h).strip("_")
    # the tool's cohort.csv flattens {"value": ..} and {"grade": ..} dicts into <key>_value/_grade
    return h[:-6] if h.endswith("_value") else h


def hip_record(hip: dict, source: str) -> dict:
    """Flatten one hip's dict (tool measurements.json or truth.json) into canonical fields.

    ``source`` is "tool" or "truth": the truth uses ``ifs_3d_mm``/``qfs_3d_mm`` for the 3D values.
    """
    rec: dict[str, Any] = {}
    for m in MEASURES:
        key = m.tool_key if source == "tool" else m.truth_key
        val = hip.get(key)
        if val is None and source == "truth" and key.endswith("_3d_mm"):
            val = hip.get(key.replace("_3d_mm", "_mm"))
        rec[m.name] = _num(val)
    edema = hip.get("qf_edema", hip.get("qf_edema_grade"))
    rec["qf_edema"] = norm_edema(edema)
    rec["qf_edema_present"] = (None if rec["qf_edema"] is None else rec["qf_edema"] != "none")
    if rec["qf_edema"] is None and isinstance(edema, bool):
        rec["qf_edema_present"] = edema
    rec["qf_goutallier_grade"] = norm_grade(hip.get("qf_goutallier_grade"))
    if source == "tool":
        rec["qfs_plausible"] = norm_bool(hip.get("qfs_plausible"))
    return rec


# --------------------------------------------------------------------------------------------
# Reading results and references
# --------------------------------------------------------------------------------------------
@dataclass
class HipTable:
    """Per-hip records keyed by (subject, side) plus per-subject label map paths."""

    kind: str
    records: dict = field(default_factory=dict)      # (subject, side) -> canonical fields
    labels: dict = field(default_factory=dict)       # subject -> (label map path, table path or None)
    notes: list = field(default_factory=list)


def _label_pair(folder: Path) -> tuple[Path, Path | None] | None:
    lab = folder / "labels.nii.gz"
    if not lab.exists():
        return None
    table = folder / "labels.json"
    return lab, (table if table.exists() else None)


def _subject_jsons(files, notes: list):
    """Yield (path, subject, parsed JSON) for ``<subject>/<name>.json`` files; unreadable ones are
    noted and skipped."""
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"{f}: unreadable ({exc}); subject skipped")
            continue
        yield f, Path(f).parent.name, data


def read_results(results: str | Path) -> HipTable:
    """Read the pipeline's output folder (per-subject measurements.json, else cohort.csv)."""
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder not found: {root}")
    out = HipTable("results")
    files = sorted(root.glob("*/measurements.json"))
    for f, subject, data in _subject_jsons(files, out.notes):
        for side, hip in (data.get("hips") or {}).items():
            side = norm_side(side)
            # a hip the tool reports as not present (outside the field of view) is a missing hip
            if side and isinstance(hip, dict) and hip.get("present", True) is not False:
                out.records[(subject, side)] = hip_record(hip, "tool")
        pair = _label_pair(f.parent)
        if pair:
            out.labels[subject] = pair
    if not files:
        csv_path = root / "cohort.csv"
        if not csv_path.exists():
            raise FileNotFoundError(f"{root}: no */measurements.json and no cohort.csv")
        out.records = read_measurement_csv(csv_path, out.notes, tool=True)
        for sub in root.iterdir():
            if sub.is_dir() and (pair := _label_pair(sub)):
                out.labels[sub.name] = pair
    return out


def read_measurement_csv(path: str | Path, notes: list, tool: bool = False) -> dict:
    """Per-hip rows of a CSV (manual measurements or the tool's per-hip cohort.csv) -> records."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        text = fh.read()
    try:  # spreadsheets export ';' or tab separated files too
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else ",", delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.DictReader(text.splitlines(), dialect=dialect))
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header = {}
    for h in rows[0].keys():
        key = _norm_header(h)
        canon = COLUMN_ALIASES.get(key, key)
        if canon in header.values() and canon != key:
            continue  # an alias of a column already present (e.g. both 'ifs' and 'ifs_mm'): keep the first
        header[h] = canon
    canon_cols = set(header.values())
    if "subject" not in canon_cols or "side" not in canon_cols:
        raise ValueError(f"{path}: needs 'subject' and 'side' columns, found {list(rows[0].keys())}")
    # the tool's cohort.csv may hold the edema grade as 'qf_edema_grade'; handled by the alias table
    records: dict = {}
    for i, row in enumerate(rows, start=2):
        r = {header[h]: v for h, v in row.items() if h in header}
        side = norm_side(r.get("side"))
        subject = str(r.get("subject", "")).strip()
        if not subject or side is None:
            notes.append(f"{path.name} line {i}: missing subject or unknown side {r.get('side')!r}; row skipped")
            continue
        hip = {k: (v if v not in ("", None) else None) for k, v in r.items()}
        rec = hip_record(hip, "tool")  # CSV columns use the tool's names (ifs_mm = 3D / as measured)
        if (subject, side) in records:
            notes.append(f"{path.name} line {i}: duplicate {subject}/{side}; later row used")
        records[(subject, side)] = rec
    return records


def detect_reference(ref: str | Path) -> str:
    """'csv', 'cohort' or 'labels' for a reference path (see the module docstring)."""
    p = Path(ref)
    if p.is_file():
        if p.suffix.lower() in (".csv", ".tsv", ".txt"):
            return "csv"
        raise ValueError(f"{p}: a reference file must be a CSV")
    if not p.is_dir():
        raise FileNotFoundError(f"reference not found: {p}")
    if any(p.glob("*/truth.json")):
        return "cohort"
    if any(p.glob("*/labels.nii.gz")) or any(p.glob("*.nii.gz")) or any(p.glob("*.nii")):
        return "labels"
    raise ValueError(f"{p}: neither a cohort (*/truth.json) nor a folder of label maps")


def read_reference(ref: str | Path, cfg: MeasureConfig, measure_labels: bool = True) -> HipTable:
    """Read a reference of any of the three kinds into per-hip records and label paths."""
    kind = detect_reference(ref)
    p = Path(ref)
    out = HipTable(kind)
    if kind == "csv":
        out.records = read_measurement_csv(p, out.notes)
    elif kind == "cohort":
        for f, subject, data in _subject_jsons(sorted(p.glob("*/truth.json")), out.notes):
            for side, hip in (data.get("hips") or {}).items():
                side = norm_side(side)
                if side and isinstance(hip, dict):
                    out.records[(subject, side)] = hip_record(hip, "truth")
            if pair := _label_pair(f.parent):
                out.labels[subject] = pair
    else:
        for sub in sorted(p.iterdir()):
            if sub.is_dir() and (pair := _label_pair(sub)):
                out.labels[sub.name] = pair
            elif sub.is_file() and sub.name.endswith((".nii.gz", ".nii")):
                stem = sub.name[:-7] if sub.name.endswith(".nii.gz") else sub.name[:-4]
                table = sub.with_name(stem + ".json")
                out.labels[stem] = (sub, table if table.exists() else None)
        if measure_labels:
            _measure_reference_labels(out, cfg)
    return out


def _measure_reference_labels(ref: HipTable, cfg: MeasureConfig) -> None:
    """Measure IFS/QFS on manual label maps with ``pipeline.measure.measure_hips`` when available."""
    try:
        from pipeline.measure import measure_hips  # another module's function; optional here
    except ImportError as exc:
        ref.notes.append(f"measurements from manual label maps not available (pipeline.measure: {exc}); "
                         "only label overlap is compared")
        return
    import inspect

    params = inspect.signature(measure_hips).parameters
    kwargs = {"config": cfg} if "config" in params else {}
    # geometry only: no intensity images come with manual label maps (signal measures stay empty)
    args = ({},) if "images" in params else ()
    for subject, (lab_path, table_path) in ref.labels.items():
        try:
            img = load_label_image(lab_path, table_path)
            res = measure_hips(img, *args, **kwargs)
            hips = res.get("hips", res) if isinstance(res, dict) else getattr(res, "hips", res)
            for side, hip in dict(hips).items():
                side = norm_side(side)
                if side and hip is not None and (not isinstance(hip, dict) or hip.get("present", True) is not False):
                    hip = hip if isinstance(hip, dict) else getattr(hip, "to_dict", lambda: vars(hip))()
                    rec = hip_record(hip, "tool")
                    ref.records[(subject, side)] = {k: rec[k] for k in ("ifs_3d", "ifs_axial", "qfs_3d", "qfs_axial")}
        except Exception as exc:  # one bad map must not stop the validation of the others
            ref.notes.append(f"{subject}: measuring the manual label map failed ({type(exc).__name__}: {exc})")


def load_label_image(path: str | Path, table_path: str | Path | None = None):
    """Load a label map and renumber it onto the project's label table when a table is given."""
    from pipeline.image import load_nifti

    img = load_nifti(path, kind="labels")
    if table_path is not None:
        img = img.with_array(remap_to_project(img.array, read_label_table(table_path)))
    return img


# --------------------------------------------------------------------------------------------
# Label overlap
# --------------------------------------------------------------------------------------------
def _world_x(img) -> np.ndarray:
    """World x (RAS mm, + = patient's right) of every voxel centre, as float32 array."""
    a = img.affine[0]
    i, j, k = (np.arange(s, dtype=np.float32) for s in img.shape)
    return (a[0] * i[:, None, None] + a[1] * j[None, :, None] + a[2] * k[None, None, :] + a[3]).astype(np.float32)


def side_split_x(label_img) -> tuple[float, str | None, str]:
    """Midline world x separating the patient's two hips, from the femur label.

    Returns ``(midline_x, single_side, method)``. With both femurs visible (two clusters of femur
    voxels along x more than 40 mm apart) the midline is halfway between their centres. With one
    femur the scan shows a single hip: ``single_side`` says which (the femur lies lateral to the
    pelvis: +x, the patient's right, when its centre is right of the pelvis centre).
    """
    arr = label_img.array
    x = _world_x(label_img)
    fem = arr == LABELS["femur"]
    if not fem.any():
        fem = arr == LABELS["lesser_trochanter"]
    if not fem.any():
        return 0.0, None, "no femur labelled: world x = 0 used as midline"
    xs = x[fem]
    lo, hi = float(xs.min()), float(xs.max())
    c = np.array([lo, hi])
    for _ in range(20):  # 1D two-means
        assign = np.abs(xs[:, None] - c[None, :]).argmin(axis=1)
        new = np.array([xs[assign == g].mean() if np.any(assign == g) else c[g] for g in (0, 1)])
        if np.allclose(new, c):
            break
        c = new
    if abs(c[1] - c[0]) > 40.0:
        return float(c.mean()), None, "midline halfway between the two femurs (world x)"
    pel = arr == LABELS["pelvis"]
    fx = float(xs.mean())
    if pel.any():
        side = "right" if fx > float(x[pel].mean()) else "left"
        return (-math.inf if side == "right" else math.inf), side, "single hip: femur relative to pelvis"
    return 0.0, None, "one femur, no pelvis: world x = 0 used as midline"


def _crop_box(a: np.ndarray, b: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    u = a | b
    idx = [np.flatnonzero(u.any(axis=tuple(d for d in range(3) if d != ax))) for ax in range(3)]
    return tuple(slice(max(0, int(i[0]) - margin), min(s, int(i[-1]) + margin + 1))
                 for i, s in zip(idx, u.shape))


def overlap_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Iterable[float]) -> dict:
    """Dice, 95 % Hausdorff and mean symmetric surface distance of two boolean masks (MONAI).

    Dice from ``monai.metrics.DiceMetric``; the surface distances from one call of
    ``monai.metrics.utils.get_edge_surface_distance`` (symmetric), reduced exactly as
    ``HausdorffDistanceMetric(percentile=95)`` (larger of the two directed 95th percentiles) and
    ``SurfaceDistanceMetric(symmetric=True)`` (mean over both edge sets) do, without computing
    the distance transforms twice. Distances in mm using ``spacing``. When one mask is empty Dice
    is 0 and the distances are NaN.
    """
    import torch
    from monai.metrics import DiceMetric
    from monai.metrics.utils import get_edge_surface_distance

    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    out = {"voxels_result": int(pred.sum()), "voxels_reference": int(ref.sum())}
    if not pred.any() or not ref.any():
        out.update(dice=0.0 if (pred.any() or ref.any()) else float("nan"), hd95_mm=float("nan"),
                   msd_mm=float("nan"))
        return out
    box = _crop_box(pred, ref)
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))
    r = torch.from_numpy(np.ascontiguousarray(ref[box]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=True, reduction="none")(p[None, None].float(), r[None, None].float())
        _, dist, _ = get_edge_surface_distance(p, r, spacing=[float(v) for v in spacing], symmetric=True)
    d1, d2 = (d.double() for d in dist)
    hd95 = max(float(torch.quantile(d, 0.95)) if d.numel() else float("nan") for d in (d1, d2))
    both = torch.cat([d1, d2])
    out.update(dice=float(dice.reshape(-1)[0]), hd95_mm=hd95,
               msd_mm=float(both.mean()) if both.numel() else float("nan"))
    return out


def side_masks(reference_img, other_img=None) -> tuple[dict, str]:
    """Boolean masks of the patient's left and right half of a label map's grid, and the method.

    Uses ``pipeline.sides.assign_sides`` on the (reference) map: with both hips in view the
    mid-sagittal plane it finds splits the grid; with one hip the whole grid belongs to that
    side. A partial reference (no femur, say) may give only a weak answer or none: then
    ``other_img``, a map on the same grid (the tool's), is asked first. Without a usable answer
    from either, falls back to ``side_split_x`` (world-x midline of the reference).
    """
    shape = reference_img.shape
    ref = _sides_from_map(reference_img)
    if ref is not None and not ref[2]:
        return ref[:2]
    other = _sides_from_map(other_img) if other_img is not None else None
    if other is not None and not other[2]:
        return other[:2]
    if ref is not None:                      # the reference's weak answer, rather than none
        return ref[:2]
    midline, single, method = side_split_x(reference_img)
    if single is not None:
        return {single: np.ones(shape, dtype=bool)}, method
    right = _world_x(reference_img) > midline  # RAS: +x is the patient's right
    return {"right": right, "left": ~right}, method


def _sides_from_map(img) -> tuple[dict, str, bool] | None:
    """``side_masks`` from ``pipeline.sides.assign_sides`` on one map, and whether that answer is
    one it calls weak; None without an answer."""
    try:
        from pipeline.sides import assign_sides

        res = assign_sides(img.array, img.affine)
        weak = "weak" in str(res.method)
        if res.mode == "bilateral" and res.midplane:
            point, normal = np.asarray(res.midplane["point"]), np.asarray(res.midplane["normal"])
            # signed distance to the plane is affine in (i, j, k): evaluate it separably
            coef = normal @ img.affine[:3, :3]
            const = float(normal @ (img.affine[:3, 3] - point))
            i, j, k = (np.arange(n, dtype=np.float32) * np.float32(c) for n, c in zip(img.shape, coef))
            right = (i[:, None, None] + j[None, :, None] + k[None, None, :] + np.float32(const)) > 0
            return {"right": right, "left": ~right}, f"pipeline.sides mid-sagittal plane ({res.method})", \
                weak
        if res.mode == "single" and len(res.hips) == 1:
            side = next(iter(res.hips))
            return {side: np.ones(img.shape, dtype=bool)}, f"pipeline.sides single hip ({res.method})", \
                weak
    except ImportError:
        pass
    return None


def compare_label_maps(result_img, reference_img, subject: str = "",
                       annotated=None) -> tuple[list[dict], str]:
    """Per structure and side overlap of a result label map against a reference map.

    The result is resampled (nearest neighbour) onto the reference grid. One side split, taken
    from the reference map (``side_masks``), applies to both maps. ``annotated``: the structures
    the reference was drawn for (``labels.annotated_structures`` of its table; None: all); the
    others are not compared, since an unannotated femur is not a femur the tool invented.
    Returns rows and the side-split method used.
    """
    from pipeline.image import resample_like

    from scipy import ndimage

    res = (result_img if result_img.same_grid(reference_img)
           else resample_like(result_img, reference_img, order=0))
    masks, method = side_masks(reference_img, res)
    rows = []
    spacing = reference_img.spacing
    res_arr, ref_arr = res.array, reference_img.array
    boxes_res = ndimage.find_objects(res_arr.astype(np.int32, copy=False))
    boxes_ref = ndimage.find_objects(ref_arr.astype(np.int32, copy=False))
    for name, value in LABELS.items():
        if name == "background" or (annotated is not None and name not in annotated):
            continue
        found = [b[value - 1] for b in (boxes_res, boxes_ref) if len(b) >= value and b[value - 1] is not None]
        if not found:
            continue
        # work inside the union bounding box of the structure in both maps
        box = tuple(slice(min(f[a].start for f in found), max(f[a].stop for f in found)) for a in range(3))
        p_all, r_all = res_arr[box] == value, ref_arr[box] == value
        for side, mask in masks.items():
            p, r = p_all & mask[box], r_all & mask[box]
            if not p.any() and not r.any():
                continue
            row = {"subject": subject, "structure": name, "side": side}
            row.update(overlap_metrics(p, r, spacing))
            rows.append(row)
    return rows, method


# --------------------------------------------------------------------------------------------
# Statistics over matched hips
# --------------------------------------------------------------------------------------------
def match(results: HipTable, reference: HipTable) -> tuple[list[dict], dict]:
    """Join results and reference per (subject, side); report what is missing on each side."""
    keys_res, keys_ref = set(results.records), set(reference.records)
    pairs = []
    for key in sorted(keys_res & keys_ref):
        row = {"subject": key[0], "side": key[1]}
        for k, v in results.records[key].items():
            row[f"tool_{k}"] = v
        for k, v in reference.records[key].items():
            row[f"ref_{k}"] = v
        pairs.append(row)
    missing = {
        "hips_in_reference_only": [f"{s}/{h}" for s, h in sorted(keys_ref - keys_res)],
        "hips_in_results_only": [f"{s}/{h}" for s, h in sorted(keys_res - keys_ref)],
    }
    return pairs, missing


def _col(pairs: list[dict], key: str) -> np.ndarray:
    return np.array([_num(p.get(key)) for p in pairs], dtype=float)


def _fmt_ci(ci) -> str:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f"{lo:.3g} to {hi:.3g}"


def agreement_table(pairs: list[dict], cfg: MeasureConfig, icc_form: str = S.DEFAULT_ICC_FORM,
                    n_boot: int = S.DEFAULT_BOOTSTRAP, seed: int = S.DEFAULT_SEED) -> list[dict]:
    """One row per continuous measure with Bland-Altman, MAE (bootstrap CI), ICC and Pearson r;
    for QFS also a row without the values the tool marked implausible (``qfs_plausible`` false)."""
    rows = []
    for m in MEASURES:
        ta, rb = _col(pairs, f"tool_{m.name}"), _col(pairs, f"ref_{m.name}")
        row = _agreement_row(m.name, m.label, m.unit, ta, rb, icc_form, n_boot, seed)
        if row is not None:
            rows.append(row)
        if m.name.startswith("qfs"):
            # the same QFS without the values the tool itself marked implausible (QFS > IFS)
            keep = np.array([p.get("tool_qfs_plausible") is not False for p in pairs], bool)
            if not keep.all():
                row = _agreement_row(f"{m.name}_plausible", f"{m.label}, tool-marked implausible QFS left out",
                                     m.unit, ta[keep], rb[keep], icc_form, n_boot, seed)
                if row is not None:
                    rows.append(row)
    return rows


def _agreement_row(name: str, label: str, unit: str, ta: np.ndarray, rb: np.ndarray, icc_form: str,
                   n_boot: int, seed: int) -> dict | None:
    """Bland-Altman, MAE (bootstrap CI), ICC and Pearson r of tool values ``ta`` against ``rb``."""
    a, b = S.paired_finite(ta, rb)
    n = int(a.size)
    if n == 0:
        return None
    row: dict[str, Any] = {"measure": name, "label": label, "unit": unit, "n": n,
                           # matched hips where only one side has a value (e.g. the tool could not measure)
                           "n_tool_missing": int(np.sum(np.isfinite(rb) & ~np.isfinite(ta))),
                           "n_reference_missing": int(np.sum(np.isfinite(ta) & ~np.isfinite(rb))),
                           "mae": S.mae(a, b)}
    boot = S.bootstrap_ci(lambda x, y: float(np.mean(np.abs(x - y))), a, b, n_boot=n_boot, seed=seed)
    row.update(mae_ci_low=boot.low, mae_ci_high=boot.high, mae_ci_note=boot.skipped or
               f"percentile bootstrap, {boot.n_boot} resamples, seed {seed}")
    if n >= 2:
        ba = S.bland_altman(a, b)
        row.update(bias=ba.bias, bias_ci_low=ba.bias_ci[0], bias_ci_high=ba.bias_ci[1], sd_diff=ba.sd,
                   loa_low=ba.loa_low, loa_low_ci_low=ba.loa_low_ci[0], loa_low_ci_high=ba.loa_low_ci[1],
                   loa_high=ba.loa_high, loa_high_ci_low=ba.loa_high_ci[0], loa_high_ci_high=ba.loa_high_ci[1])
        try:
            ic = S.icc(np.column_stack([b, a]), icc_form)
            row.update(icc_form=ic.form, icc=ic.icc, icc_ci_low=ic.ci[0], icc_ci_high=ic.ci[1])
        except ValueError as exc:
            row.update(icc_form=icc_form, icc=float("nan"), icc_note=str(exc))
        pr = S.pearson(a, b)
        row.update(pearson_r=pr.r, pearson_ci_low=pr.ci[0], pearson_ci_high=pr.ci[1], pearson_p=pr.p_value)
    return row


def flag_table(pairs: list[dict], cfg: MeasureConfig) -> list[dict]:
    """'Narrow' flags (value <= configured cut-off) of the tool vs the reference, plus ROC AUC.

    The reference flag uses the same cut-off applied to the reference measurement. Also the
    binary 'QF edema present' finding (grade mild or marked) when both sides grade edema.
    """
    rows = []
    for m in MEASURES:
        if m.cutoff_attr is None:
            continue
        a, b = S.paired_finite(_col(pairs, f"tool_{m.name}"), _col(pairs, f"ref_{m.name}"))
        if a.size == 0:
            continue
        cut = float(getattr(cfg, m.cutoff_attr))
        src_key = getattr(cfg, m.cutoff_attr.replace("_mm", "_source"), "")
        ref_flag = S.flag_narrow(b, cut)
        cm = S.confusion_metrics(S.flag_narrow(a, cut), ref_flag)
        auc = S.roc_auc(a, ref_flag, low_is_positive=True)
        rows.append(_flag_row(f"{m.name}_narrow", f"{m.label} <= {cut:g} mm", cut, cfg.source_text(src_key), cm, auc))
    ed = [(p.get("tool_qf_edema_present"), p.get("ref_qf_edema_present")) for p in pairs]
    ed = [(t, r) for t, r in ed if t is not None and r is not None]
    if ed:
        t, r = zip(*ed)
        cm = S.confusion_metrics(t, r)
        rows.append(_flag_row("qf_edema_present", "QF edema (mild or marked)", float("nan"),
                              cfg.source_text(cfg.edema_source), cm, None))
    return rows


def _flag_row(name, label, cutoff, source, cm: S.BinaryAgreement, auc: S.AUCResult | None) -> dict:
    row = {"flag": name, "label": label, "cutoff": cutoff, "source": source, "n": cm.n,
           "tp": cm.tp, "fp": cm.fp, "tn": cm.tn, "fn": cm.fn,
           "sensitivity": cm.sensitivity, "sensitivity_ci_low": cm.sensitivity_ci[0],
           "sensitivity_ci_high": cm.sensitivity_ci[1],
           "specificity": cm.specificity, "specificity_ci_low": cm.specificity_ci[0],
           "specificity_ci_high": cm.specificity_ci[1],
           "accuracy": cm.accuracy, "accuracy_ci_low": cm.accuracy_ci[0], "accuracy_ci_high": cm.accuracy_ci[1],
           "ppv": cm.ppv, "npv": cm.npv}
    if auc is not None:
        row.update(roc_auc=auc.auc, roc_auc_ci_low=auc.ci[0], roc_auc_ci_high=auc.ci[1],
                   roc_auc_note="tool's continuous measure vs the reference flag; low value = positive; "
                                "Hanley-McNeil interval")
    return row


def grade_table(pairs: list[dict]) -> list[dict]:
    """Ordinal grade agreement (edema none/mild/marked, Goutallier 0-4): weighted kappa, exact agreement."""
    rows = []
    for name, cats in (("qf_edema", EDEMA_GRADES), ("qf_goutallier_grade", GOUTALLIER_GRADES)):
        pr = [(p.get(f"tool_{name}"), p.get(f"ref_{name}")) for p in pairs]
        pr = [(t, r) for t, r in pr if t is not None and r is not None]
        if not pr:
            continue
        t, r = zip(*pr)
        row: dict[str, Any] = {"grade": name, "categories": "/".join(str(c) for c in cats), "n": len(pr),
                               "exact_agreement": float(np.mean([x == y for x, y in pr]))}
        for w in ("linear", "quadratic"):
            k = S.weighted_kappa(t, r, categories=cats, weights=w)
            row.update({f"kappa_{w}": k.kappa, f"kappa_{w}_ci_low": k.ci[0], f"kappa_{w}_ci_high": k.ci[1]})
        k = S.weighted_kappa(t, r, categories=cats, weights="none")
        row["confusion_rows_reference_cols_tool"] = json.dumps(np.asarray(k.table).T.astype(int).tolist())
        rows.append(row)
    return rows


def label_summary(rows: list[dict]) -> list[dict]:
    """Mean / median / n of Dice, HD95 and MSD per structure and side."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["structure"], r["side"]), []).append(r)
    out = []
    for (structure, side), rs in sorted(groups.items(), key=lambda kv: (LABELS.get(kv[0][0], 99), kv[0][1])):
        row = {"structure": structure, "side": side, "n": len(rs)}
        for key in ("dice", "hd95_mm", "msd_mm"):
            v = np.array([r[key] for r in rs], dtype=float)
            v = v[np.isfinite(v)]
            row[f"{key}_mean"] = float(v.mean()) if v.size else float("nan")
            row[f"{key}_median"] = float(np.median(v)) if v.size else float("nan")
        row["missing_in_result"] = sum(r["voxels_result"] == 0 for r in rs)
        row["missing_in_reference"] = sum(r["voxels_reference"] == 0 for r in rs)
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# Plots and report
# --------------------------------------------------------------------------------------------
def plot_measure(pairs: list[dict], m: Measure, cfg: MeasureConfig, out_dir: Path) -> list[str]:
    """Bland-Altman and scatter PNGs of one measure; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = S.paired_finite(_col(pairs, f"tool_{m.name}"), _col(pairs, f"ref_{m.name}"))
    if a.size < 2:
        return []
    unit = f" ({m.unit})" if m.unit else ""
    ba = S.bland_altman(a, b)
    names = []
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    mean, diff = (a + b) / 2, a - b
    ax.scatter(mean, diff, s=14, alpha=0.8)
    for y, style, text in ((ba.bias, "-", "bias"), (ba.loa_low, "--", "-1.96 SD"), (ba.loa_high, "--", "+1.96 SD")):
        ax.axhline(y, color="k", linestyle=style, linewidth=1)
        ax.annotate(f"{text} {y:.2f}", (1.0, y), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=8)
    for lo, hi in (ba.bias_ci, ba.loa_low_ci, ba.loa_high_ci):
        ax.axhspan(lo, hi, color="tab:blue", alpha=0.08)
    ax.set_xlabel(f"mean of tool and reference{unit}")
    ax.set_ylabel(f"tool - reference{unit}")
    ax.set_title(f"Bland-Altman: {m.label} (n={a.size})")
    fig.tight_layout()
    fn = f"bland_altman_{m.name}.png"
    fig.savefig(out_dir / fn)
    plt.close(fig)
    names.append(fn)

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.scatter(b, a, s=14, alpha=0.8)
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k-", linewidth=1, label="identity")
    if m.cutoff_attr:
        cut = float(getattr(cfg, m.cutoff_attr))
        ax.axvline(cut, color="tab:red", linestyle=":", linewidth=1, label=f"cut-off {cut:g}")
        ax.axhline(cut, color="tab:red", linestyle=":", linewidth=1)
    ax.set_xlabel(f"reference{unit}")
    ax.set_ylabel(f"tool{unit}")
    ax.set_title(f"{m.label}: r = {S.pearson(a, b).r:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fn = f"scatter_{m.name}.png"
    fig.savefig(out_dir / fn)
    plt.close(fig)
    names.append(fn)
    return names


def _cell(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def _md_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for _, h in cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
    return head + "".join("| " + " | ".join(_cell(r.get(k)).replace("|", "/") for k, _ in cols) + " |\n" for r in rows)


def _html_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(k)))}</td>" for k, _ in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _with_ci(rows: list[dict], key: str) -> None:
    for r in rows:
        lo, hi = r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
        if lo is not None and hi is not None:
            r[f"{key}_ci"] = _fmt_ci((lo, hi))


AGREEMENT_COLS = [("label", "measure"), ("n", "n"), ("n_tool_missing", "tool missing"), ("mae", "MAE"),
                  ("mae_ci", "MAE 95% CI (bootstrap)"),
                  ("bias", "bias"), ("bias_ci", "bias 95% CI"), ("loa_low", "LoA low"), ("loa_high", "LoA high"),
                  ("icc", "ICC"), ("icc_ci", "ICC 95% CI"), ("pearson_r", "Pearson r"), ("pearson_ci", "r 95% CI")]
FLAG_COLS = [("label", "flag"), ("n", "n"), ("tp", "TP"), ("fp", "FP"), ("tn", "TN"), ("fn", "FN"),
             ("sensitivity", "sens"), ("sensitivity_ci", "sens 95% CI"), ("specificity", "spec"),
             ("specificity_ci", "spec 95% CI"), ("accuracy", "acc"), ("accuracy_ci", "acc 95% CI"),
             ("roc_auc", "ROC AUC"), ("roc_auc_ci", "AUC 95% CI")]
GRADE_COLS = [("grade", "grade"), ("n", "n"), ("exact_agreement", "exact agreement"),
              ("kappa_linear", "kappa (linear)"), ("kappa_linear_ci", "95% CI"),
              ("kappa_quadratic", "kappa (quadratic)"), ("kappa_quadratic_ci", "95% CI"),
              ("confusion_rows_reference_cols_tool", "confusion (rows ref, cols tool)")]
LABEL_COLS = [("structure", "structure"), ("side", "side"), ("n", "n"), ("dice_mean", "Dice mean"),
              ("dice_median", "Dice median"), ("hd95_mm_median", "HD95 median (mm)"),
              ("msd_mm_median", "MSD median (mm)"), ("missing_in_result", "missing in result"),
              ("missing_in_reference", "missing in reference")]


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write dict rows as CSV (union of keys, first-seen order)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def render_report(summary: dict, images: list[str], out_dir: Path) -> None:
    """Write report.md (relative PNG links) and a self-contained report.html (PNGs embedded)."""
    icc_desc = S.ICC_FORMS.get(summary["icc_form"], summary["icc_form"])
    intro = [
        f"Results: `{summary['results']}`. Reference ({summary['reference_kind']}): `{summary['reference']}`.",
        f"Matched hips: {summary['n_matched_hips']} from {summary['n_matched_subjects']} subjects. "
        f"Hips only in the reference: {len(summary['missing']['hips_in_reference_only'])}; "
        f"only in the results: {len(summary['missing']['hips_in_results_only'])}.",
        "Differences are tool - reference. Bland-Altman limits of agreement are bias +- 1.96 SD with "
        "t-based 95 % CIs (Bland & Altman 1999).",
        f"ICC form: {summary['icc_form']}, {icc_desc}; columns = reference and tool.",
        "Flags: a space is 'narrow' (positive) when <= the cut-off; the reference flag applies the same "
        "cut-off to the reference value. Proportions carry Wilson 95 % CIs.",
    ]
    if summary["reference_kind"] == "cohort":
        intro.append("Cohort truth: tool `ifs_mm`/`qfs_mm` (3D shortest distance) are compared with truth "
                     "`ifs_3d_mm`/`qfs_3d_mm`, axial values with the truth's axial values.")
    cut_lines = [f"IFS cut-off {summary['config']['ifs_cutoff_mm']:g} mm: {summary['cutoff_sources']['ifs']}",
                 f"QFS cut-off {summary['config']['qfs_cutoff_mm']:g} mm: {summary['cutoff_sources']['qfs']}"]
    sections = [("Agreement of continuous measures", summary["agreement"], AGREEMENT_COLS),
                ("Flags at the configured cut-offs", summary["flags"], FLAG_COLS),
                ("Ordinal grades", summary["grades"], GRADE_COLS),
                ("Segmentation overlap per structure and side", summary["labels_summary"], LABEL_COLS)]
    notes = summary["notes"] + [f"in reference only: {', '.join(summary['missing']['hips_in_reference_only'])}"
                                if summary["missing"]["hips_in_reference_only"] else "",
                                f"in results only: {', '.join(summary['missing']['hips_in_results_only'])}"
                                if summary["missing"]["hips_in_results_only"] else ""]
    notes = [n for n in notes if n]

    md = [f"# ifi-seg validation report\n\nGenerated {summary['generated']}.\n"]
    md += [f"{p}\n" for p in intro]
    md.append("\n## Cut-offs\n\n" + "".join(f"- {c}\n" for c in cut_lines))
    for title, rows, cols in sections:
        if rows:
            md.append(f"\n## {title}\n\n" + _md_table(rows, cols))
    if images:
        md.append("\n## Plots\n\n" + "".join(f"![{i}]({i})\n" for i in images))
    if notes:
        md.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    md.append(f"\n---\n{DISCLAIMER}\n")
    (out_dir / "report.md").write_text("\n".join(md))

    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}"
             "img{max-width:48%;margin:4px;border:1px solid #ddd}.disc{color:#555;font-size:12px}")
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ifi-seg validation</title>"
         f"<style>{style}</style></head><body><h1>ifi-seg validation report</h1>"
         f"<p>Generated {html.escape(summary['generated'])}.</p>"]
    h += [f"<p>{html.escape(p).replace('`', '')}</p>" for p in intro]
    h.append("<h2>Cut-offs</h2><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in cut_lines) + "</ul>")
    for title, rows, cols in sections:
        if rows:
            h.append(f"<h2>{html.escape(title)}</h2>" + _html_table(rows, cols))
    if images:
        h.append("<h2>Plots</h2>")
        for i in images:
            data = base64.b64encode((out_dir / i).read_bytes()).decode("ascii")
            h.append(f"<img alt='{html.escape(i)}' src='data:image/png;base64,{data}'>")
    if notes:
        h.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    h.append(f"<p class='disc'>{html.escape(DISCLAIMER)}</p></body></html>")
    (out_dir / "report.html").write_text("".join(h))


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------
def run_validation(results: str | Path, reference: str | Path, out_dir: str | Path,
                   cfg: MeasureConfig | None = None, icc_form: str = S.DEFAULT_ICC_FORM,
                   n_boot: int = S.DEFAULT_BOOTSTRAP, seed: int = S.DEFAULT_SEED,
                   compare_labels: bool = True, plots: bool = True) -> dict:
    """Compare a results folder with a reference and write the report files; return the summary."""
    cfg = cfg or MeasureConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = read_results(results)
    ref = read_reference(reference, cfg)
    pairs, missing = match(res, ref)

    label_rows: list[dict] = []
    notes = list(res.notes) + list(ref.notes)
    if compare_labels and ref.labels:
        methods = set()
        for subject, (ref_path, ref_table) in sorted(ref.labels.items()):
            if subject not in res.labels:
                notes.append(f"{subject}: reference label map has no result label map")
                continue
            try:
                ref_img = load_label_image(ref_path, ref_table)
                res_img = load_label_image(*res.labels[subject])
                rows, method = compare_label_maps(res_img, ref_img, subject,
                                                  annotated_structures(ref_table))
                label_rows += rows
                methods.add(method)
            except Exception as exc:  # a broken file is reported, the others still compared
                notes.append(f"{subject}: label comparison failed ({type(exc).__name__}: {exc})")
        notes += [f"label sides: {m}" for m in sorted(methods)]

    agreement = agreement_table(pairs, cfg, icc_form, n_boot, seed)
    flags = flag_table(pairs, cfg)
    grades = grade_table(pairs)
    lab_summary = label_summary(label_rows) if label_rows else []
    for rows, keys in ((agreement, ("mae", "bias", "icc", "pearson")),
                       (flags, ("sensitivity", "specificity", "accuracy", "roc_auc")),
                       (grades, ("kappa_linear", "kappa_quadratic"))):
        for k in keys:
            _with_ci(rows, k)

    images: list[str] = []
    if plots:
        for m in MEASURES:
            images += plot_measure(pairs, m, cfg, out)

    write_csv(out / "pairs.csv", pairs)
    write_csv(out / "agreement.csv", agreement)
    write_csv(out / "flags.csv", flags)
    write_csv(out / "grades.csv", grades)
    if label_rows:
        write_csv(out / "labels.csv", label_rows)
        write_csv(out / "labels_summary.csv", lab_summary)

    subjects = {p["subject"] for p in pairs}
    summary = _jsonable({
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "results": str(results), "reference": str(reference), "reference_kind": ref.kind,
        "n_matched_hips": len(pairs), "n_matched_subjects": len(subjects),
        "n_label_comparisons": len(label_rows),
        "icc_form": icc_form, "icc_description": S.ICC_FORMS[icc_form],
        "config": cfg.to_dict(),
        "cutoff_sources": {"ifs": cfg.source_text(cfg.ifs_cutoff_source),
                           "qfs": cfg.source_text(cfg.qfs_cutoff_source)},
        "bootstrap": {"n": n_boot, "seed": seed, "min_n": S.MIN_BOOTSTRAP_N},
        "agreement": agreement, "flags": flags, "grades": grades, "labels_summary": lab_summary,
        "missing": missing, "notes": notes, "images": images,
    })
    render_report(summary, images, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 nothing comparable, 2 bad input)."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, help="folder written by the pipeline")
    ap.add_argument("--reference", required=True, help="manual CSV, folder of label maps, or cohort folder")
    ap.add_argument("--out", required=True, help="report folder")
    ap.add_argument("--config", help="JSON file overriding MeasureConfig cut-offs")
    ap.add_argument("--icc-form", default=S.DEFAULT_ICC_FORM, choices=sorted(S.ICC_FORMS))
    ap.add_argument("--bootstrap", type=int, default=S.DEFAULT_BOOTSTRAP, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=S.DEFAULT_SEED, help="bootstrap seed")
    ap.add_argument("--no-labels", action="store_true", help="skip label-map comparison")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        summary = run_validation(args.results, args.reference, args.out, cfg, args.icc_form, args.bootstrap,
                                 args.seed, compare_labels=not args.no_labels)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"report: {Path(args.out) / 'report.html'}")
    if summary["n_matched_hips"] == 0 and summary["n_label_comparisons"] == 0:
        print("warning: nothing could be compared (no matching subject/side)", file=sys.stderr)
        return 1
    return 0


def format_summary(summary: dict) -> str:
    """A plain-text accuracy table (measures, flags, grades, labels) for the console."""
    lines = [f"matched hips: {summary['n_matched_hips']} ({summary['n_matched_subjects']} subjects), "
             f"reference: {summary['reference_kind']}, ICC form {summary['icc_form']}"]

    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    if summary["agreement"]:
        lines.append(f"{'measure':<18}{'n':>4}{'miss':>5}{'MAE':>8}{'bias':>8}{'LoA low':>9}{'LoA high':>9}"
                     f"{'ICC':>7}{'r':>7}")
        for r in summary["agreement"]:
            lines.append(f"{r['measure']:<18}{r['n']:>4}{r.get('n_tool_missing', 0):>5}{f(r.get('mae')):>8}"
                         f"{f(r.get('bias')):>8}"
                         f"{f(r.get('loa_low')):>9}{f(r.get('loa_high')):>9}{f(r.get('icc'), '.3f'):>7}"
                         f"{f(r.get('pearson_r'), '.3f'):>7}")
    if summary["flags"]:
        lines.append(f"{'flag':<22}{'n':>4}{'sens':>7}{'spec':>7}{'acc':>7}{'AUC':>7}")
        for r in summary["flags"]:
            lines.append(f"{r['flag']:<22}{r['n']:>4}{f(r.get('sensitivity')):>7}{f(r.get('specificity')):>7}"
                         f"{f(r.get('accuracy')):>7}{f(r.get('roc_auc')):>7}")
    for r in summary["grades"]:
        lines.append(f"{r['grade']:<22}n={r['n']} exact={f(r.get('exact_agreement'))} "
                     f"kappa_lin={f(r.get('kappa_linear'))} kappa_quad={f(r.get('kappa_quadratic'))}")
    if summary["labels_summary"]:
        lines.append(f"{'structure':<20}{'side':<6}{'n':>3}{'Dice':>7}{'HD95':>7}{'MSD':>7}")
        for r in summary["labels_summary"]:
            lines.append(f"{r['structure']:<20}{r['side']:<6}{r['n']:>3}{f(r.get('dice_mean'), '.3f'):>7}"
                         f"{f(r.get('hd95_mm_median'), '.1f'):>7}{f(r.get('msd_mm_median'), '.1f'):>7}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
