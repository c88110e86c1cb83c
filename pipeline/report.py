"""Outputs: per subject ``measurements.json``, ``labels.nii.gz`` + ``labels.json``, ``qc.png``;
per cohort ``cohort.csv`` (one row per hip), ``errors.csv`` and a self-contained ``report.html``.

Every file is written atomically (``pipeline.image.atomic_write``) and ``measurements.json`` is
always the LAST file of a subject: its presence (with matching input hashes) is what marks a
subject as done, so an interrupted run never leaves a folder that looks finished.

The QC figure uses radiological convention: the patient's right is on the viewer's left, as seen
from the feet, anterior at the top.
"""
from __future__ import annotations

import base64
import csv
import html
import io as _io
import json
import textwrap
import time
from pathlib import Path

import numpy as np

from pipeline.image import Image, atomic_write, reorient_to_ras, save_nifti
from pipeline.jsonable import to_jsonable
from pipeline.labels import LABELS, write_label_table

SIDES = ("right", "left")
#: Scalar per-hip fields, in the column order of cohort.csv (others follow in first-seen order).
HIP_COLUMNS = (
    "ifs_mm", "ifs_axial_mm", "qfs_mm", "qfs_axial_mm", "qfs_plausible", "ifs_slice", "qf_volume_ml",
    "qf_edema_grade", "qf_edema_signal_ratio", "qf_edema_fraction_above_reference",
    "qf_fat_fraction", "qf_goutallier_grade",
)
STRUCTURE_COLOURS = {  # distinct hues; yellow and cyan are kept for the IFS and QFS lines
    "quadratus_femoris": "#ff3030", "lesser_trochanter": "#ff00ff", "ischial_tuberosity": "#00ff00",
    "hamstring_tendon": "#3080ff", "iliopsoas_tendon": "#ff9900", "femur": "#b07040",
    "pelvis": "#90a020", "gluteus_maximus": "#b0b0ff",
}


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------
def write_json(path, data) -> None:
    """Write strict JSON atomically."""
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_measurements(path) -> dict | None:
    """Read a ``measurements.json``; None if missing or unreadable (then the subject is not done)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# per-subject outputs
# ----------------------------------------------------------------------------------------------
def write_subject_outputs(out_dir, record: dict, labels: Image, display: Image | None,
                          dicom_seg_source: Image | None = None) -> dict:
    """Write a subject's files; ``measurements.json`` last. Returns {name: path} of what was written.

    ``labels`` must be on the reference image's grid; it is saved with exactly that affine and
    shape. ``display`` (T1, else fluid) is the QC background. With ``dicom_seg_source`` (a DICOM
    reference image) a DICOM SEG is written too.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "measurements.json"
    if done.exists():           # being redone: not finished until the new one is written
        done.unlink()
    written = {}
    save_nifti(labels, out_dir / "labels.nii.gz", dtype=np.uint8)
    written["labels"] = out_dir / "labels.nii.gz"
    atomic_write(out_dir / "labels.json", lambda tmp: write_label_table(tmp, LABELS))
    written["label_table"] = out_dir / "labels.json"
    if display is not None:
        atomic_write(out_dir / "qc.png", lambda tmp: save_qc_png(tmp, display, labels, record))
        written["qc"] = out_dir / "qc.png"
    if dicom_seg_source is not None:
        atomic_write(out_dir / "labels.seg.dcm",
                     lambda tmp: write_dicom_seg(tmp, labels, dicom_seg_source))
        written["dicom_seg"] = out_dir / "labels.seg.dcm"
    record.setdefault("outputs", {}).update({k: p.name for k, p in written.items()})
    record["outputs"]["measurements"] = done.name
    timings = record.get("provenance", {}).get("timings")
    if isinstance(timings, dict):   # the files above; measurements.json itself is tiny
        timings["report_s"] = time.perf_counter() - t0
        if "total_s" in timings:
            timings["total_s"] += timings["report_s"]
    write_json(done, record)
    written["measurements"] = done
    return written


def write_dicom_seg(path, labels: Image, source: Image) -> None:
    """Write the label map as a DICOM Segmentation (highdicom) referencing the source series.

    ``labels`` must be on the grid of ``source``, a DICOM image loaded by ``pipeline.io`` (whose
    ``meta["dicom_files"]`` lists its files in slice order, ``meta["dicom_frames"]`` the frame
    numbers of a multi-frame source; array axes = column, row, slice).
    Segments are the project's structures, coded in a local scheme (99IFISEG) under the SNOMED
    category "Anatomical Structure". The SEG copies the patient/study module of the source, as
    the standard requires: it is a clinical object, not an anonymised output.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from pipeline import __version__
    from pipeline.labels import label_names

    files = source.meta.get("dicom_files")
    if not files or len(files) != labels.shape[2]:
        raise ValueError("DICOM SEG needs the source DICOM series on the label map's grid")
    frame_numbers = source.meta.get("dicom_frames") or [None] * len(files)
    planes = np.transpose(np.asarray(labels.array, np.uint8), (2, 1, 0))   # (slice, row, column)
    if any(k is not None for k in frame_numbers):
        # a multi-frame source: one SEG frame per source frame, in the source's frame order
        if len(set(files)) != 1:
            raise ValueError("DICOM SEG of a series spread over several multi-frame files is not supported")
        files = files[:1]
        frames = np.empty_like(planes)
        frames[np.asarray(frame_numbers, int) - 1] = planes
    else:
        frames = planes
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:   # type 2 attributes some exports omit; highdicom copies them (may be empty)
        for attr in ("StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "AccessionNumber",
                     "PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            if attr not in ds:
                setattr(ds, attr, "")
    frames = np.ascontiguousarray(frames)
    names = label_names()
    algorithm = hd.AlgorithmIdentificationSequence(name="ifi-seg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=value, segment_label=names[value].replace("_", " "),
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(value=names[value], scheme_designator="99IFISEG",
                                                        meaning=names[value].replace("_", " ")),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for value in range(1, len(names))]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=999,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ifi-seg",
        manufacturer_model_name="ifi-seg", software_versions=__version__, device_serial_number="0",
        series_description="ifi-seg hip structures")
    seg.save_as(str(path))


def _hip_slice_world(hip: dict) -> np.ndarray | None:
    """A world point on the hip's axial slice of narrowest IFS (else of the 3D IFS, else QFS)."""
    for key in ("ifs_axial_points", "ifs_points", "qfs_axial_points", "qfs_points"):
        pts = hip.get(key)
        if pts and len(pts) == 2 and all(p is not None for p in pts):
            return np.mean(np.asarray(pts, float), axis=0)
    return None


def _distance_to_draw(hip: dict, key: str):
    """(points, mm, label suffix) for IFS/QFS: the axial measurement when there is one, else 3D."""
    if hip.get(f"{key}_axial_points") and hip.get(f"{key}_axial_mm") is not None:
        extra = f" (3D {hip[f'{key}_mm']:.1f})" if hip.get(f"{key}_mm") is not None else ""
        return hip[f"{key}_axial_points"], hip[f"{key}_axial_mm"], extra
    if hip.get(f"{key}_points") and hip.get(f"{key}_mm") is not None:
        return hip[f"{key}_points"], hip[f"{key}_mm"], " (3D)"
    return None, None, ""


def save_qc_png(path, display: Image, labels: Image, record: dict, dpi: int = 90) -> None:
    """QC figure: for each hip, the axial slice of its narrowest IFS with structures outlined,
    IFS/QFS drawn between their end points and labelled in mm, R/L marked (radiological view),
    and the hip's flags listed underneath."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    disp, ornt = reorient_to_ras(display)
    lab = reorient_to_ras(labels)[0]
    if lab.shape != disp.shape:
        raise ValueError("QC: labels and display image are not on the same grid")
    hips = record.get("hips", {}) or {}
    vals = disp.array[np.isfinite(disp.array)]
    lo, hi = np.percentile(vals, [1, 99.5]) if vals.size else (0, 1)
    sp = disp.spacing
    ratio = (disp.shape[1] * sp[1]) / max(disp.shape[0] * sp[0], 1e-6)   # slice height / width
    fig, axes = plt.subplots(1, 2, figsize=(12, min(12.0, 6.0 * ratio + 1.3)))
    names = {v: k for k, v in LABELS.items()}
    for ax, side in zip(axes, SIDES):
        hip = hips.get(side) or {}
        centre = _hip_slice_world(hip)
        if centre is None:
            qf = np.argwhere(lab.array == LABELS["quadratus_femoris"])
            k = int(np.median(qf[:, 2])) if len(qf) else disp.shape[2] // 2
        else:
            k = int(np.clip(np.rint(disp.world_to_voxel(centre[None])[0, 2]), 0, disp.shape[2] - 1))
        sl = disp.array[:, :, k].T
        ax.imshow(sl, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=sp[1] / sp[0],
                  interpolation="nearest")
        lsl = lab.array[:, :, k].T
        handles = []
        for value in np.unique(lsl):
            name = names.get(int(value))
            colour = STRUCTURE_COLOURS.get(name or "")
            if not colour:
                continue
            ax.contour((lsl == value).astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.9)
            handles.append(Line2D([], [], color=colour, lw=1.5, label=name.replace("_", " ")))
        for key, colour, label in (("ifs", "yellow", "IFS"), ("qfs", "cyan", "QFS")):
            pts, mm, extra = _distance_to_draw(hip, key)
            if pts is None:
                continue
            v = disp.world_to_voxel(np.asarray(pts, float))
            ax.plot(v[:, 0], v[:, 1], "-o", color=colour, lw=1.8, ms=3)
            mid = v[:, :2].mean(axis=0)
            off = "" if abs(v[:, 2].mean() - k) < 0.75 else f" [slice {int(np.rint(v[:, 2].mean()))}]"
            if key == "qfs" and hip.get("qfs_plausible") is False:
                extra += " IMPLAUSIBLE (> IFS)"
            ax.annotate(f"{label} {mm:.1f} mm{extra}{off}", mid, xytext=(0, 8 if key == "ifs" else -14),
                        textcoords="offset points", color=colour, fontsize=9, ha="center",
                        fontweight="bold")
        ax.invert_xaxis()   # radiological: the patient's right (+x, larger i) on the viewer's left
        ax.set_xticks([]), ax.set_yticks([])
        box = dict(boxstyle="round,pad=0.2", fc="black", ec="none", alpha=0.7)
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="white", fontsize=14, fontweight="bold",
                va="center", ha="left", bbox=box)
        ax.text(0.98, 0.5, "L", transform=ax.transAxes, color="white", fontsize=14, fontweight="bold",
                va="center", ha="right", bbox=box)
        z = disp.voxel_to_world(np.array([[0, 0, k]]))[0, 2]
        ax.set_title(f"{side} hip - axial slice {k} (z = {z:.0f} mm)", fontsize=10)
        flags = raised_flags(hip)
        text = "\n".join(textwrap.fill(f"FLAG: {f.get('text') or f.get('name')}", 70)
                         for f in flags) or "no flags"
        if not hip or hip.get("present") is False:
            reason = (hip.get("reasons") or {}).get("hip", "") if hip else ""
            text = f"hip not measured{': ' + reason if reason else ''}"
        ax.set_xlabel(text, fontsize=8, color="darkred" if flags else "black")
        if handles and side == "right":
            ax.legend(handles=handles, loc="lower left", fontsize=6, framealpha=0.5)
    fig.suptitle(f"{record.get('subject', '')}  (radiological view: patient's right on the left; "
                 "points projected onto the slice)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# cohort tables
# ----------------------------------------------------------------------------------------------
def raised_flags(hip: dict) -> list[dict]:
    """The flags of a hip that are raised (a flag entry may carry ``raised: False``)."""
    return [f for f in hip.get("flags", []) or [] if isinstance(f, dict) and f.get("raised", True)]


def hip_rows(record: dict) -> list[dict]:
    """One flat row per hip of a ``measurements.json`` record: all scalar measures + flags."""
    rows = []
    for side in SIDES:
        hip = (record.get("hips") or {}).get(side)
        if not isinstance(hip, dict):
            continue
        row = {"subject": record.get("subject"), "side": side}
        for key, value in hip.items():
            if key in ("flags", "warnings") or key.endswith("_points"):
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    if v is None or isinstance(v, (int, float, str, bool)):
                        row[f"{key}_{sub}"] = v
            elif value is None or isinstance(value, (int, float, str, bool)):
                row[key] = value
        row["flags"] = ";".join(str(f.get("name")) for f in raised_flags(hip))
        row["warnings"] = " | ".join(str(w) for w in hip.get("warnings", []) or [])
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    cols = ["subject", "side"] + [c for c in HIP_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        for k in r:
            if k not in cols and k not in ("flags", "warnings"):
                cols.append(k)
    return cols + ["flags", "warnings"]


def _write_csv(path, columns: list[str], rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else _fmt(r.get(k))) for k in columns})

    atomic_write(path, write)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_cohort_csv(path, records: list[dict]) -> list[dict]:
    """``cohort.csv``: one row per hip (subject, side, all scalar measures, flags). Returns the rows."""
    rows = [r for rec in records for r in hip_rows(rec)]
    _write_csv(path, _columns(rows) if rows else ["subject", "side", *HIP_COLUMNS, "flags", "warnings"], rows)
    return rows


def one_line(message) -> str:
    """Collapse a message to one line (errors.csv, console)."""
    return " ".join(str(message).split())


def write_errors_csv(path, errors: list[dict]) -> None:
    """``errors.csv``: subject, stage, one-line message (header only when nothing failed)."""
    rows = [{"subject": e.get("subject"), "stage": e.get("stage"), "message": one_line(e.get("message", ""))}
            for e in errors]
    _write_csv(path, ["subject", "stage", "message"], rows)


# ----------------------------------------------------------------------------------------------
# HTML report
# ----------------------------------------------------------------------------------------------
def _png_data_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumbnail_uri(png_path: Path, width: int = 420) -> str | None:
    try:
        from PIL import Image as PILImage

        with PILImage.open(png_path) as im:
            im.thumbnail((width, width))
            buf = _io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:
        return None


def _measure_value(row: dict, key: str):
    """The axial value of a distance (what the published cut-offs refer to), else the 3D one;
    None for a QFS marked implausible (larger than the IFS: a missed hamstring origin)."""
    if key == "qfs" and row.get("qfs_plausible") is False:
        return None
    for k in (f"{key}_axial_mm", f"{key}_mm"):
        v = row.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _distribution_plot(rows: list[dict], config) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    rng = np.random.default_rng(0)
    for ax, key, cut in ((axes[0], "ifs", config.ifs_cutoff_mm), (axes[1], "qfs", config.qfs_cutoff_mm)):
        data = []
        for i, side in enumerate(SIDES):
            vals = np.array([v for r in rows if r["side"] == side
                             for v in [_measure_value(r, key)] if v is not None], float)
            data.append(vals)
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=12, alpha=0.7)
        if any(len(d) for d in data):
            ax.boxplot([d if len(d) else [np.nan] for d in data], positions=[0, 1], widths=0.45,
                       showfliers=False)
        ax.axhline(cut, color="red", ls="--", lw=1, label=f"cut-off {cut:g} mm")
        ax.set_xticks([0, 1], [f"{s} hip (n={len(d)})" for s, d in zip(SIDES, data)])
        ax.set_ylabel(f"{key.upper()} (mm, axial)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png_data_uri(fig)


def _side_summary(rows: list[dict]) -> str:
    """HTML table: per side the number of hips, median axial IFS / QFS, hips whose QFS was left
    out as implausible, and flagged hips."""
    out = ["<table><tr><th>side</th><th>hips</th><th>median IFS mm</th><th>median QFS mm</th>"
           "<th>QFS implausible (left out)</th><th>flagged</th></tr>"]
    for side in SIDES:
        rs = [r for r in rows if r["side"] == side]
        meds = []
        for key in ("ifs", "qfs"):
            vals = [v for r in rs for v in [_measure_value(r, key)] if v is not None]
            meds.append(f"{np.median(vals):.1f}" if vals else "")
        implausible = sum(1 for r in rs if r.get("qfs_plausible") is False)
        out.append(f"<tr><td>{side}</td><td>{len(rs)}</td><td>{meds[0]}</td><td>{meds[1]}</td>"
                   f"<td>{implausible}</td><td>{sum(1 for r in rs if r.get('flags'))}</td></tr>")
    out.append("</table>")
    return "".join(out)


def write_report_html(path, out_dir, records: list[dict], rows: list[dict], errors: list[dict],
                      config, *, model_info: dict | None = None) -> None:
    """Self-contained ``report.html``: distributions by side, flagged hips with QC thumbnails,
    errors, methods (cut-offs with sources, disclaimer) and software/model versions."""
    from pipeline import __version__
    from pipeline.config import DISCLAIMER

    esc = html.escape
    out_dir = Path(out_dir)
    flagged = [r for r in rows if r.get("flags")]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ifi-seg cohort report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#eee}.warn{color:#a00}</style></head><body>",
        "<h1>ifi-seg cohort report</h1>",
        f"<p>{len(records)} subject(s) measured, {len(rows)} hip(s), {len(flagged)} flagged hip(s), "
        f"{len(errors)} subject(s) failed.</p>",
    ]
    if rows:
        parts.append("<h2>IFS and QFS by side</h2>")
        parts.append(_side_summary(rows))
        parts.append(f"<img alt='IFS/QFS distributions' src='{_distribution_plot(rows, config)}'>")
    parts.append("<h2>Flagged hips</h2>")
    if flagged:
        thumbs: dict[str, str | None] = {}
        parts.append("<table><tr><th>subject</th><th>side</th><th>IFS mm axial (3D)</th><th>QFS mm axial (3D)</th>"
                     "<th>edema</th><th>fat fraction</th><th>flags</th><th>QC</th></tr>")
        by_subject = {str(rec.get("subject")): rec for rec in records}
        for r in flagged:
            sid = str(r["subject"])
            if sid not in thumbs:
                thumbs[sid] = _thumbnail_uri(out_dir / sid / "qc.png")
            hip = (by_subject.get(sid, {}).get("hips") or {}).get(r["side"], {})
            texts = "<br>".join(esc(str(f.get("text") or f.get("name"))) for f in raised_flags(hip))
            img = f"<img src='{thumbs[sid]}' width='420'>" if thumbs[sid] else ""
            parts.append(
                f"<tr><td>{esc(sid)}</td><td>{esc(r['side'])}</td>"
                f"<td>{_cell(r.get('ifs_axial_mm'))} ({_cell(r.get('ifs_mm'))})</td>"
                f"<td>{_cell(r.get('qfs_axial_mm'))} ({_cell(r.get('qfs_mm'))})</td><td>{_cell(r.get('qf_edema_grade'))}</td>"
                f"<td>{_cell(r.get('qf_fat_fraction'))}</td><td>{texts}</td><td>{img}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No hip was flagged.</p>")
    if errors:
        parts.append("<h2 class='warn'>Failed subjects</h2><table><tr><th>subject</th><th>stage</th>"
                     "<th>message</th></tr>")
        for e in errors:
            parts.append(f"<tr><td>{esc(str(e.get('subject')))}</td><td>{esc(str(e.get('stage')))}</td>"
                         f"<td>{esc(one_line(e.get('message', '')))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Methods</h2>")
    parts.append(
        "<p>Each hip is measured on the segmentation in world coordinates. The ischiofemoral space "
        "(IFS) is the shortest distance between the lateral cortex of the ischial tuberosity and the "
        "medial cortex of the lesser trochanter (Torriani 2009); the quadratus femoris space (QFS) the "
        "shortest distance between the hamstring tendons and the lesser trochanter / iliopsoas tendon. "
        "Both are given as a 3D shortest distance and on the narrowest axial slice, with their end points; "
        "flags and the plots use the axial value (as the published cut-offs do), the 3D value when no "
        "axial slice holds both structures. A QFS larger than the IFS (by more than "
        f"{config.qfs_above_ifs_tolerance_mm:g} mm) is anatomically implausible, since the hamstring origin lies "
        "on the ischial tuberosity; it usually means part of the hamstring origin was not segmented, so such a "
        "QFS is marked <code>qfs_plausible</code> false in cohort.csv and left out of the QFS summaries, as is a "
        f"QFS whose end points lie more than {config.qfs_landmark_max_mm:g} mm from the ischial tuberosity or "
        "the lesser trochanter (measured on a stray piece of tendon; it raises no narrowing flag). "
        f"IFS is flagged at &le; {config.ifs_cutoff_mm:g} mm ({esc(config.source_text(config.ifs_cutoff_source))}); "
        f"QFS at &le; {config.qfs_cutoff_mm:g} mm ({esc(config.source_text(config.qfs_cutoff_source))}). "
        f"Quadratus femoris edema: {esc(config.source_text(config.edema_source))}; reference muscle gluteus "
        f"maximus, positive share of voxels mild {config.edema_fraction_mild:g} / marked "
        f"{config.edema_fraction_marked:g}, median signal ratio mild {config.edema_ratio_mild:g} / marked "
        f"{config.edema_ratio_marked:g}. Fatty infiltration: {esc(config.source_text(config.goutallier_source))}; "
        f"fat fraction flagged above {config.fat_fraction_flag:g}.</p>")
    parts.append(f"<p><b>{esc(DISCLAIMER)}</b></p>")
    model_info = model_info or {}
    if model_info.get("source") == "labels":
        model_txt = "Label maps were supplied by the user (no network segmentation)."
    else:
        model_txt = (f"Segmentation model {esc(str(model_info.get('name', 'ifi_seg')))} version "
                     f"{esc(str(model_info.get('version', '?')))} (weights sha256 "
                     f"{esc(str(model_info.get('sha256', '?'))[:12])}). The bundled model was trained on "
                     "synthetic phantoms only (no patient data); its accuracy on clinical scans has not "
                     "been established - check every QC image.")
    parts.append(f"<h2>Software</h2><p>ifi-seg {esc(__version__)}. {model_txt}</p>")
    parts.append("</body></html>")
    text = "\n".join(parts)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _cell(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return html.escape(str(v))
