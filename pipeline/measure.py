"""Per-hip measurements from a label map: IFS, QFS, QF edema, fat, atrophy, pose, flags.

``measure_hips`` is the API; ``python -m pipeline.measure --labels L.nii.gz ...`` prints its
record as JSON for a label map from anywhere (a ``--label-table`` maps the project's structure
names to the values used in that file). All geometry is in world RAS millimetres from the
affines; every image may lie on its own grid.

Record (JSON-serialisable)::

    {"frame": "world RAS+ mm", "config": {...}, "disclaimer": "...", "sides": {...},
     "hips": {"left": {...}, "right": {...}}}

Each hip: side, present, ifs_mm (3D), ifs_axial_mm, ifs_points / ifs_axial_points ([IT point,
LT point]), ifs_slice / ifs_axial_slice (index along the label map's acquired-slice axis; no
axial value when those slices are not axial), the same for
qfs (hamstring tendon -> lesser trochanter or iliopsoas tendon), qfs_plausible (false when the
QFS exceeds the IFS: a missed hamstring origin), qf_volume_ml, qf_max_csa_mm2,
qf_volume_ratio_contralateral, qf_edema {grade, signal_ratio, fraction_above_reference,
fat_signal_ratio (nearby subcutaneous fat over the reference muscle on the fluid image; above
``fat_suppression_max_ratio`` the series is not fat-suppressed and no grade is given), ...},
qf_fat_fraction, qf_fat_method, qf_goutallier_grade, dixon_swap_check (with Dixon: the
median fat fraction of the subcutaneous fat near the QF, about 0.9, the share of it reading
below 0.5 and the share of the reference muscle reading above 0.5; from
``dixon_subcut_max_swapped_share`` or ``dixon_reference_max_swapped_share`` up the pair is taken
as swapped there and the T1, if any, grades the fat), signal_shading ({t1, fluid}: the
surface-coil shading divided out before the signals were compared, as the ratio of the fitted
field's largest to smallest value around the QF; None when not fitted), pose, flags, warnings,
reasons.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import geometry, pose, signal
from .config import DISCLAIMER, MeasureConfig, load_config
from .image import Image, ImageError, load_nifti
from .jsonable import to_jsonable
from .labels import LABELS, remap_to_project
from .sides import Mask, assign_sides, largest_component, union_crop

FRAME = "world RAS+ mm"
#: Structures the record uses (others in the label map are not split into sides).
USED = ("quadratus_femoris", "lesser_trochanter", "ischial_tuberosity", "hamstring_tendon",
        "iliopsoas_tendon", "femur", "gluteus_maximus", "subcutaneous_fat")
SIDES = ("left", "right")
TENDONS = ("hamstring_tendon", "iliopsoas_tendon")
#: A second component holding more than this share of a bone/tendon's voxels is worth a warning.
FRAGMENT_WARN_SHARE = 0.1


def _shift(affine: np.ndarray, offset) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset
    return np.asarray(affine, float) @ t


def _main_part(hip: dict, name: str, warnings: list) -> Mask | None:
    """A bone's largest connected part (stray blobs would fake a short distance); tendons are
    kept whole, since a thin oblique tendon falls apart into per-slice pieces on thick slices."""
    m = hip.get(name)
    if m is None or name in TENDONS:
        return m
    big, dropped = largest_component(m)
    if dropped > FRAGMENT_WARN_SHARE:
        warnings.append(f"{name}: {dropped:.0%} of its voxels lie in separate fragments; "
                        "measured on the largest part")
    return big


def _pair(a: Mask | None, b_list: list, affine, shape, ax: int):
    """(3D Distance, axial Distance) between mask a and the union of b_list, in label indices."""
    b_list = [b for b in b_list if b is not None]
    if a is None or not b_list:
        return None, None
    off, arrs = union_crop([a] + b_list, shape)
    b = np.zeros_like(arrs[0])
    for x in arrs[1:]:
        b |= x
    d3, dax = geometry.distances(arrs[0], b, _shift(affine, off))
    for d in (d3, dax):
        if d is not None:
            d.slice_index += int(off[ax])
    return d3, dax


def _put_distance(rec: dict, key: str, d3, dax, missing: str, axial: bool = True) -> None:
    rec[f"{key}_mm"] = None if d3 is None else round(float(d3.mm), 3)
    rec[f"{key}_points"] = None if d3 is None else [d3.point_a.round(3).tolist(),
                                                   d3.point_b.round(3).tolist()]
    rec[f"{key}_slice"] = None if d3 is None else int(d3.slice_index)
    rec[f"{key}_axial_mm"] = None if dax is None else round(float(dax.mm), 3)
    rec[f"{key}_axial_points"] = None if dax is None else [dax.point_a.round(3).tolist(),
                                                          dax.point_b.round(3).tolist()]
    rec[f"{key}_axial_slice"] = None if dax is None else int(dax.slice_index)
    if d3 is None:
        rec["reasons"][key] = missing
    elif dax is None:
        rec["reasons"][f"{key}_axial"] = "no slice holds both structures" if axial else (
            "the acquired slices are not axial, so there is no axial-slice value (the 3D value is "
            "measured)")


def _distance_to(point, mask: Mask | None, affine: np.ndarray) -> float | None:
    """World distance (mm) from a point to the nearest voxel centre of ``mask`` (None without one)."""
    if mask is None or not mask.count:
        return None
    world = mask.indices() @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
    return float(np.min(np.linalg.norm(world - np.asarray(point, float), axis=1)))


def _qfs_plausible(rec: dict, cfg: MeasureConfig, it: Mask | None = None, lt: Mask | None = None,
                   affine=None) -> bool | None:
    """False (with a warning) when the QFS cannot be right: it exceeds the IFS (the hamstring
    origin lies on the ischial tuberosity, so part of it was missed), or its end points lie far
    from the ischial tuberosity / lesser trochanter (a stray piece of tendon was measured)."""
    qfs, ifs = rec["qfs_mm"], rec["ifs_mm"]
    if qfs is None:
        return None
    if rec["qfs_points"] is not None and affine is not None:
        far = []
        for end, point, name, mask in (("hamstring", rec["qfs_points"][0], "ischial tuberosity", it),
                                       ("other", rec["qfs_points"][1], "lesser trochanter", lt)):
            d = _distance_to(point, mask, affine)
            if d is not None and d > cfg.qfs_landmark_max_mm:
                far.append(f"its {end} end point lies {d:.0f} mm from the {name}")
        if far:
            rec["warnings"].append(
                f"QFS {qfs:.1f} mm was measured away from the quadratus femoris ({'; '.join(far)}): "
                "probably on a stray piece of tendon; not used for a narrowing flag; check its points")
            return False
    if ifs is None:
        return None
    if qfs <= ifs + cfg.qfs_above_ifs_tolerance_mm:
        return True
    rec["warnings"].append(
        f"QFS {qfs:.1f} mm exceeds IFS {ifs:.1f} mm, which is anatomically implausible (the "
        "hamstring origin lies on the ischial tuberosity): part of the hamstring origin was "
        "probably not segmented and the QFS is likely overestimated; check its points")
    return False


def _empty_hip(side: str, reason: str) -> dict:
    rec = {"side": side, "present": False, "reasons": {"hip": reason}, "flags": [],
           "warnings": [reason], "pose": {"reason": reason}, "qf_edema": {
               "grade": None, "signal_ratio": None, "fraction_above_reference": None,
               "reason": reason}}
    for key in ("ifs", "qfs"):
        for suffix in ("mm", "points", "slice", "axial_mm", "axial_points", "axial_slice"):
            rec[f"{key}_{suffix}"] = None
    rec.update(qfs_plausible=None, qf_volume_ml=None, qf_max_csa_mm2=None, qf_max_csa_slice=None,
               qf_volume_ratio_contralateral=None, qf_fat_fraction=None, qf_fat_method=None,
               qf_goutallier_grade=None, dixon_swap_check=None,
               signal_shading={"t1": None, "fluid": None})
    return rec


def dixon_swapped_throughout(result: dict, cfg: MeasureConfig) -> bool:
    """True when every hip of a ``measure_hips`` result that has a Dixon swap check (at least
    one) reads swapped by both signs: its reference muscle at ``cfg.dixon_exchange_share`` or
    more and its subcutaneous fat at ``cfg.dixon_subcut_max_swapped_share`` or more. The whole
    pair is then swapped (or was given the wrong way round), not just part of it."""
    checks = [h["dixon_swap_check"] for h in result["hips"].values()
              if h.get("present") and h.get("dixon_swap_check")]
    return bool(checks) and all(all(signal.swap_shares_reached(c, cfg.dixon_subcut_max_swapped_share,
                                                               cfg.dixon_exchange_share))
                                for c in checks)


def _flags(rec: dict, cfg: MeasureConfig) -> list:
    """Findings against the configured cut-offs (worded as findings, not diagnoses)."""
    flags = []
    for key, label, cutoff, src in (
            ("ifs", "ischiofemoral space", cfg.ifs_cutoff_mm, cfg.ifs_cutoff_source),
            ("qfs", "quadratus femoris space", cfg.qfs_cutoff_mm, cfg.qfs_cutoff_source)):
        # published cut-offs are axial measurements; the 3D value is the fallback
        if key == "qfs" and rec.get("qfs_plausible") is False:
            continue                    # a QFS that cannot be right raises no finding
        value, how = rec[f"{key}_axial_mm"], "axial"
        if value is None:
            value, how = rec[f"{key}_mm"], "3D"
        if value is not None and value <= cutoff:
            flags.append({"name": f"{key}_narrow", "value": value, "cutoff": cutoff,
                          "source": cfg.source_text(src),
                          "text": f"Narrowed {label}: {value:.1f} mm ({how}) at or below the "
                                  f"{cutoff:g} mm cut-off."})
    ed = rec["qf_edema"]
    if ed.get("grade") in ("mild", "marked"):
        flags.append({"name": "qf_edema", "value": ed["grade"],
                      "cutoff": {"fraction_above_reference": cfg.edema_fraction_mild,
                                 "signal_ratio": cfg.edema_ratio_mild},
                      "source": cfg.source_text(cfg.edema_source),
                      "text": f"Quadratus femoris edema ({ed['grade']}): "
                              f"{ed['fraction_above_reference']:.0%} of voxels above the reference "
                              f"muscle's upper limit, median signal ratio "
                              f"{ed['signal_ratio']:.2f}."})
    ff = rec["qf_fat_fraction"]
    if ff is not None and ff >= cfg.fat_fraction_flag:
        flags.append({"name": "qf_fatty_infiltration", "value": ff, "cutoff": cfg.fat_fraction_flag,
                      "source": cfg.source_text(cfg.goutallier_source),
                      "text": f"Quadratus femoris fatty infiltration: fat fraction {ff:.0%} "
                              f"(Goutallier grade {rec['qf_goutallier_grade']})."})
    return flags


def _measure_hip(side: str, hip: dict, other: dict | None, labels: Image, images: dict,
                 cfg: MeasureConfig, midplane) -> dict:
    aff, shape = labels.affine, labels.shape
    ax = geometry.acquisition_slice_axis(aff)
    axial = geometry.axial_slices(aff)
    rec = _empty_hip(side, "")
    rec.update(present=True, reasons={}, warnings=[])
    warn = rec["warnings"]
    it = _main_part(hip, "ischial_tuberosity", warn)
    lt = _main_part(hip, "lesser_trochanter", warn)
    ht = _main_part(hip, "hamstring_tendon", warn)
    ip = _main_part(hip, "iliopsoas_tendon", warn)
    d3, dax = _pair(it, [lt], aff, shape, ax)
    missing = [n for n, m in (("ischial_tuberosity", it), ("lesser_trochanter", lt)) if m is None]
    _put_distance(rec, "ifs", d3, dax, "needs ischial_tuberosity and lesser_trochanter, missing: "
                  + ", ".join(missing) if missing else
                  f"no surface could be drawn around the ischial_tuberosity ({it.count} voxels) and "
                  f"the lesser_trochanter ({lt.count} voxels): too small to measure", axial)
    d3, dax = _pair(ht, [lt, ip], aff, shape, ax)
    _put_distance(rec, "qfs", d3, dax, "needs hamstring_tendon and lesser_trochanter or "
                  "iliopsoas_tendon", axial)
    rec["qfs_plausible"] = _qfs_plausible(rec, cfg, it, lt, aff)
    if lt is None and rec["qfs_mm"] is not None:
        warn.append("QFS measured to the iliopsoas tendon alone: no lesser trochanter in the label "
                    "map, so it cannot be checked against the IFS; check the QC picture")

    qf = hip.get("quadratus_femoris")
    rec.update(signal.atrophy(qf, aff))
    other_qf = (other or {}).get("quadratus_femoris")
    if qf is not None and other_qf is not None and other_qf.count:
        rec["qf_volume_ratio_contralateral"] = qf.count / other_qf.count
    if qf is None:
        rec["reasons"]["qf"] = "no quadratus_femoris in the label map"

    ref = hip.get("gluteus_maximus")
    if ref is None and other and other.get("gluteus_maximus") is not None:
        ref = other["gluteus_maximus"]
        warn.append("reference muscle (gluteus maximus) from the other side")
    subcut = hip.get("subcutaneous_fat") or (other or {}).get("subcutaneous_fat")
    if qf is not None:
        centre = aff[:3, :3] @ qf.indices().mean(0) + aff[:3, 3]
        ref = signal.local_part(ref, aff, centre, cfg.reference_radius_mm) or ref
        subcut = signal.local_part(subcut, aff, centre, cfg.reference_radius_mm) or subcut
    shading = {"fluid": None, "t1": None}
    if qf is not None and cfg.shading_correction:
        uniform = {}
        for n in signal.SHADING_TISSUES["t1"]:
            m = signal.local_tissue(labels.array, aff, centre, cfg.reference_radius_mm, LABELS[n])
            uniform[n] = None if m is None else signal.erode_inplane(m, aff, cfg.min_signal_voxels)
        for key, names in signal.SHADING_TISSUES.items():
            if images.get(key) is not None:
                shading[key] = signal.fit_shading(images[key], [uniform[n] for n in names], aff,
                                                  centre, cfg.reference_radius_mm, cfg.shading_degree)
    fluid = images.get("fluid")
    if fluid is None:
        rec["qf_edema"]["reason"] = "no fluid-sensitive image (T2 fat-sat or STIR) given"
    elif qf is None or ref is None:
        rec["qf_edema"]["reason"] = "quadratus femoris or reference muscle missing"
    else:
        rec["qf_edema"] = signal.edema(fluid, qf, ref, aff, cfg, other_qf, shading["fluid"],
                                       subcut)
        fat_ratio = rec["qf_edema"]["fat_signal_ratio"]
        if fat_ratio is not None and fat_ratio > cfg.fat_suppression_max_ratio:
            warn.append(f"fat is bright on the fluid image ({fat_ratio:.1f} times the reference "
                        "muscle): not fat-suppressed, or fat suppression failed; edema not graded")

    fat = None
    if qf is None:
        fat = {"fat_fraction": None, "method": None, "reason": "no quadratus_femoris"}
    elif images.get("dixon_fat") is not None and images.get("dixon_water") is not None:
        fat = signal.fat_dixon(images["dixon_fat"], images["dixon_water"], qf, aff, cfg,
                               ref, subcut)
        rec["dixon_swap_check"] = fat["swap_check"]
        if fat.get("swap_suspected"):
            if images.get("t1") is not None:
                evidence = fat["swap_evidence"]
                fat = signal.fat_t1(images["t1"], qf, ref, subcut, aff, cfg, shading["t1"])
                warn.append(f"Dixon fat and water look swapped around this hip ({evidence}): fat "
                            "graded from the T1 instead")
            else:
                warn.append(f"fat not graded: {fat['reason']}")
    elif images.get("t1") is not None:
        fat = signal.fat_t1(images["t1"], qf, ref, subcut, aff, cfg, shading["t1"])
    else:
        fat = {"fat_fraction": None, "method": None, "reason": "no Dixon or T1 image given"}
    rec["qf_fat_fraction"] = fat["fat_fraction"]
    rec["qf_fat_method"] = fat["method"]
    rec["qf_goutallier_grade"] = cfg.goutallier_grade(fat["fat_fraction"])
    rec["signal_shading"] = {k: None if v is None else v.range_ratio for k, v in shading.items()}
    for key, ratio in rec["signal_shading"].items():
        if ratio is not None and ratio > cfg.shading_warn_ratio:
            warn.append(f"strong intensity shading on the {key} image around the QF ({ratio:.1f}-fold, "
                        "surface coil without intensity normalisation?): corrected before grading, "
                        "but the signal grades are less certain")
    if fat.get("reason"):
        rec["reasons"]["fat"] = fat["reason"]

    rec["pose"] = pose.estimate_pose(side, hip.get("femur"), lt, aff, midplane,
                                     cfg.pose_min_shaft_mm)
    rec["flags"] = _flags(rec, cfg)
    return rec


def measure_hips(labels: Image, images: dict | None = None, label_table: dict | None = None,
                 config: MeasureConfig | None = None) -> dict:
    """Measure both hips of a label map.

    Args:
        labels: label map with its affine. Values follow ``label_table`` (name -> value; the
            project's ``LABELS`` when None).
        images: any subset of {"t1", "fluid", "dixon_fat", "dixon_water"}, each ``Image`` on its
            own grid; the fluid image says its kind in ``meta["fluid_kind"]`` (t2fs / stir).
        config: thresholds (``MeasureConfig()`` when None).
    Returns the JSON-serialisable record described in the module docstring. Missing hips,
    structures or images give None values with a reason; nothing here raises for them.
    """
    cfg = config or MeasureConfig()
    images = {k: v for k, v in (images or {}).items() if v is not None}
    arr = labels.array
    if label_table is not None and dict(label_table) != LABELS:
        arr = remap_to_project(arr, label_table)
    elif not np.issubdtype(arr.dtype, np.integer):
        arr = np.rint(arr).astype(np.int32)
    lab = Image(arr, labels.affine, "labels", dict(labels.meta))
    sa = assign_sides(arr, lab.affine, structures=USED)
    hips = {}
    for side in SIDES:
        other = sa.hips.get("left" if side == "right" else "right")
        if side in sa.hips:
            hips[side] = _measure_hip(side, sa.hips[side], other, lab, images, cfg, sa.midplane)
        else:
            why = ("not in the field of view" if sa.mode == "single" else
                   "no structures could be assigned to this side")
            hips[side] = _empty_hip(side, f"{side} hip {why}")
        hips[side]["warnings"] = list(sa.warnings) + hips[side]["warnings"]
    for side in SIDES:
        d = hips[side]["pose"].get("lt_direction_deg") if hips[side]["present"] else None
        o = hips["left" if side == "right" else "right"]
        od = o["pose"].get("lt_direction_deg") if o["present"] else None
        if d is not None and od is not None:
            hips[side]["pose"]["lt_direction_minus_contralateral_deg"] = d - od
    return to_jsonable({"frame": FRAME, "config": cfg.to_dict(), "disclaimer": DISCLAIMER,
                        "sides": {"mode": sa.mode, "method": sa.method, "midplane": sa.midplane},
                        "hips": hips})


def _fluid_kind(path: str, given: str | None) -> str:
    if given:
        return given
    name = Path(path).name.lower()
    return "stir" if "stir" in name else "t2fs"


def main(argv=None) -> int:
    """Command line: print the per-hip record of a label map as JSON."""
    p = argparse.ArgumentParser(prog="python -m pipeline.measure", description=__doc__.split("\n")[0])
    p.add_argument("--labels", required=True, help="label map (NIfTI)")
    p.add_argument("--label-table", help="JSON name -> value for that map (default: project's)")
    p.add_argument("--t1")
    p.add_argument("--fluid", help="T2 fat-sat or STIR image")
    p.add_argument("--fluid-kind", choices=("t2fs", "stir"), help="default: from the file name")
    p.add_argument("--dixon-fat")
    p.add_argument("--dixon-water")
    p.add_argument("--config", help="JSON file overriding MeasureConfig thresholds")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    try:
        from .labels import read_label_table

        labels = load_nifti(a.labels, kind="labels")
        table = read_label_table(a.label_table) if a.label_table else None
        images = {}
        for key, path, kind in (("t1", a.t1, "t1"), ("fluid", a.fluid, None),
                                ("dixon_fat", a.dixon_fat, "dixon_fat"),
                                ("dixon_water", a.dixon_water, "dixon_water")):
            if path:
                img = load_nifti(path, kind=kind or _fluid_kind(path, a.fluid_kind))
                if key == "fluid":
                    img.meta["fluid_kind"] = img.kind
                images[key] = img
        if bool(a.dixon_fat) != bool(a.dixon_water):
            print("warning: Dixon needs both --dixon-fat and --dixon-water; ignoring it",
                  file=sys.stderr)
            images.pop("dixon_fat", None)
            images.pop("dixon_water", None)
        rec = measure_hips(labels, images, table, load_config(a.config))
    except (ImageError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(rec, indent=2)
    if a.out:
        from .image import atomic_write

        atomic_write(a.out, lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
