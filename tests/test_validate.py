"""End-to-end validation on a tiny constructed results folder, manual CSV, label folder and cohort."""
import csv
import json

import numpy as np
import pytest

from pipeline import validate as V
from pipeline.image import Image, save_nifti
from pipeline.labels import LABELS, write_label_table

SUBJECTS = [f"s{i:02d}" for i in range(6)]
# reference IFS per hip; the tool reads reference + bias 1.0 +- 0.5 (alternating)
REF_IFS = {(s, side): 10.0 + 3 * i + (4 if side == "right" else 0)
           for i, s in enumerate(SUBJECTS) for side in ("left", "right")}


def _affine(spacing=(3.0, 2.0, 4.0), flip_x=False, shape_x=40):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (-60.0, -30.0, 0.0)
    if flip_x:  # same world grid stored with x running right-to-left (LAS storage)
        aff[0, 0] = -spacing[0]
        aff[0, 3] = -60.0 + spacing[0] * (shape_x - 1)
    return aff


def _label_volume(shift_qf_right=False):
    """40 x 30 x 8 voxels of 3 x 2 x 4 mm: two femurs 87 mm apart, with LT and QF per side.

    World x = -60 + 3 i (RAS: x < 0 is the patient's left). ``shift_qf_right`` moves the right QF
    (6 voxels long in y) by one voxel along y.
    """
    a = np.zeros((40, 30, 8), dtype=np.uint8)
    for lo, hi in ((3, 8), (32, 37)):
        a[lo:hi, 10:16, 1:7] = LABELS["femur"]
    a[17:23, 10:20, 1:7] = LABELS["pelvis"]
    for lo in (8, 28):
        a[lo:lo + 3, 12:15, 2:6] = LABELS["lesser_trochanter"]
    a[9:12, 18:24, 2:6] = LABELS["quadratus_femoris"]
    y0 = 19 if shift_qf_right else 18
    a[29:32, y0:y0 + 6, 2:6] = LABELS["quadratus_femoris"]
    return a


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    results, ref_labels, cohort = root / "results", root / "ref_labels", root / "cohort"
    ref_rows = []
    for i, s in enumerate(SUBJECTS):
        hips = {}
        for j, side in enumerate(("left", "right")):
            ref = REF_IFS[(s, side)]
            noise = 0.5 if (2 * i + j) % 2 == 0 else -0.5
            hips[side] = {"ifs_mm": {"value": ref + 1.0 + noise}, "ifs_axial_mm": ref + 1.5,
                          "qfs_mm": ref / 2, "qfs_axial_mm": ref / 2 + 0.2,
                          "qf_edema": {"grade": ["none", "mild", "marked"][i % 3]},
                          "qf_fat_fraction": 0.1 + 0.01 * i, "qf_goutallier_grade": i % 5}
            ref_rows.append({"Subject": s, "Side": side[0].upper(), "IFS (mm)": ref, "QFS": ref / 2,
                             "edema": ["none", "mild", "mild"][i % 3], "goutallier": i % 5})
        if s == "s05":
            del hips["right"]          # a hip missing from the results
        if s == "s04":
            hips["left"] = {"present": False, "ifs_mm": None}   # reported as outside the field of view
        if s == "s03":
            hips["left"]["qfs_mm"] = None                      # present, but the tool could not measure it
        d = results / s
        d.mkdir(parents=True)
        (d / "measurements.json").write_text(json.dumps({"subject": s, "hips": hips}))
        if i < 2:
            lab = _label_volume(shift_qf_right=(i == 1))
            # result stored flipped along x: must be resampled onto the reference grid
            save_nifti(Image(lab[::-1].copy(), _affine(flip_x=True)), d / "labels.nii.gz")
            write_label_table(d / "labels.json")
            (ref_labels / s).mkdir(parents=True)
            save_nifti(Image(_label_volume(), _affine()), ref_labels / s / "labels.nii.gz")
    # the cohort form of the same truth
    for i, s in enumerate(SUBJECTS):
        (cohort / s).mkdir(parents=True)
        hips = {side: {"ifs_3d_mm": REF_IFS[(s, side)], "ifs_axial_mm": REF_IFS[(s, side)] + 1.0,
                       "qfs_3d_mm": REF_IFS[(s, side)] / 2, "qfs_axial_mm": REF_IFS[(s, side)] / 2,
                       "qf_edema": "none", "qf_fat_fraction": 0.1, "qf_goutallier_grade": 1}
                for side in ("left", "right")}
        (cohort / s / "truth.json").write_text(json.dumps({"hips": hips}))
    (cohort / "cohort.csv").write_text("subject,t1,fluid,fluid_kind,dixon_fat,dixon_water,labels,truth\n")
    ref_csv = root / "manual.csv"
    with open(ref_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ref_rows[0]))
        w.writeheader()
        w.writerows(ref_rows)
    return {"results": results, "ref_labels": ref_labels, "cohort": cohort, "csv": ref_csv, "root": root}


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_reference_detection(tree):
    assert V.detect_reference(tree["csv"]) == "csv"
    assert V.detect_reference(tree["cohort"]) == "cohort"
    assert V.detect_reference(tree["ref_labels"]) == "labels"


def test_csv_reference_end_to_end(tree):
    out = tree["root"] / "report_csv"
    assert V.main(["--results", str(tree["results"]), "--reference", str(tree["csv"]), "--out", str(out),
                   "--bootstrap", "200"]) == 0
    for name in ("report.html", "report.md", "agreement.csv", "flags.csv", "grades.csv", "pairs.csv",
                 "summary.json", "bland_altman_ifs_3d.png", "scatter_ifs_3d.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_matched_hips"] == 10
    assert summary["missing"]["hips_in_reference_only"] == ["s04/left", "s05/right"]
    agr = {r["measure"]: r for r in _read_csv(out / "agreement.csv")}
    ifs = agr["ifs_3d"]
    # constructed differences: 1 +- 0.5 alternating over (subject index i, side j), k = 2 i + j
    d = np.array([1.5 if k % 2 == 0 else 0.5 for k in range(12) if k not in (8, 11)])
    assert float(ifs["bias"]) == pytest.approx(d.mean())
    assert float(ifs["loa_high"]) == pytest.approx(d.mean() + 1.96 * d.std(ddof=1))
    assert float(ifs["mae"]) == pytest.approx(d.mean())
    assert ifs["icc_form"] == "ICC(2,1)" and 0.9 < float(ifs["icc"]) < 1.0
    assert float(agr["qfs_3d"]["bias"]) == pytest.approx(0.0)
    assert int(agr["qfs_3d"]["n"]) == 9 and int(agr["qfs_3d"]["n_tool_missing"]) == 1
    assert "ifs_axial" not in agr          # no axial column in the manual CSV
    # IFS flags at the Singer cut-off (15 mm): reference narrow hips are those <= 15
    flags = {r["flag"]: r for r in _read_csv(out / "flags.csv")}
    f = flags["ifs_3d_narrow"]
    assert "Singer" in f["source"] and float(f["cutoff"]) == 15.0
    assert int(f["tp"]) + int(f["fn"]) == sum(v <= 15 for k, v in REF_IFS.items()
                                              if k not in (("s05", "right"), ("s04", "left")))
    assert 0.9 <= float(f["roc_auc"]) <= 1.0
    grades = {r["grade"]: r for r in _read_csv(out / "grades.csv")}
    assert float(grades["qf_goutallier_grade"]["kappa_linear"]) == pytest.approx(1.0)
    assert float(grades["qf_edema"]["exact_agreement"]) < 1.0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "ICC(2,1)" in html and "s05/right" in html and "s04/left" in html
    assert "two-way random" in (out / "report.md").read_text()


def test_label_folder_reference(tree):
    out = tree["root"] / "report_labels"
    summary = V.run_validation(tree["results"], tree["ref_labels"], out, n_boot=0)
    rows = _read_csv(out / "labels.csv")
    by = {(r["subject"], r["structure"], r["side"]): r for r in rows}
    # s00: identical maps (stored flipped) -> perfect overlap on every structure and side
    for side in ("left", "right"):
        r = by[("s00", "femur", side)]
        assert float(r["dice"]) == pytest.approx(1.0) and float(r["hd95_mm"]) == pytest.approx(0.0)
    # s01: QF on the patient's right (x > 0) shifted by one voxel (2 mm) along y, 6 voxels long
    qf = by[("s01", "quadratus_femoris", "right")]
    assert float(qf["dice"]) == pytest.approx(5 / 6)
    assert 0.0 < float(qf["msd_mm"]) <= 2.0 and float(qf["hd95_mm"]) == pytest.approx(2.0)
    assert float(by[("s01", "quadratus_femoris", "left")]["dice"]) == pytest.approx(1.0)
    assert (out / "labels_summary.csv").exists() and (out / "report.html").exists()
    assert summary["n_label_comparisons"] == len(rows)
    assert any("label sides: pipeline.sides mid-sagittal plane" in n for n in summary["notes"])


def test_partial_reference_compares_only_the_structures_it_was_drawn_for(tree):
    """A reader who outlined the QF, lesser trochanter and pelvis, table beside the map: the
    tool's femur is not scored against the empty reference (Dice 0 would be a false alarm)."""
    import json

    ref_dir = tree["root"] / "ref_partial"
    (ref_dir / "s01").mkdir(parents=True)
    lab = _label_volume()
    lab[lab == LABELS["femur"]] = 0
    save_nifti(Image(lab, _affine()), ref_dir / "s01" / "labels.nii.gz")
    table = {"background": 0, "quadratus_femoris": LABELS["quadratus_femoris"],
             "lesser_trochanter": LABELS["lesser_trochanter"], "pelvis": LABELS["pelvis"]}
    (ref_dir / "s01" / "labels.json").write_text(json.dumps(table))
    ref_img = Image(lab, _affine())
    res_img = V.load_label_image(tree["results"] / "s01" / "labels.nii.gz")
    everything, _ = V.compare_label_maps(res_img, ref_img, "s01")
    assert any(r["structure"] == "femur" and r["dice"] == 0.0 for r in everything)
    out = tree["root"] / "report_partial"
    V.run_validation(tree["results"], ref_dir, out, n_boot=0, plots=False)
    rows = _read_csv(out / "labels.csv")
    assert {r["structure"] for r in rows} == {"quadratus_femoris", "lesser_trochanter", "pelvis"}
    qf = {r["side"]: float(r["dice"]) for r in rows if r["structure"] == "quadratus_femoris"}
    assert qf["right"] == pytest.approx(5 / 6) and qf["left"] == pytest.approx(1.0)


def test_cohort_reference_maps_3d_and_axial(tree):
    out = tree["root"] / "report_cohort"
    summary = V.run_validation(tree["results"], tree["cohort"], out, n_boot=0, plots=False)
    agr = {r["measure"]: r for r in summary["agreement"]}
    assert summary["reference_kind"] == "cohort"
    assert agr["ifs_axial"]["bias"] == pytest.approx(0.5)   # tool ref+1.5 vs truth ref+1.0
    assert agr["qfs_axial"]["bias"] == pytest.approx(0.2)
    assert agr["ifs_3d"]["n"] == 10
    assert "ifs_axial_narrow" in {f["flag"] for f in summary["flags"]}


def test_side_split_single_hip():
    a = np.zeros((20, 10, 4), dtype=np.uint8)
    a[14:18, 3:7, 1:3] = LABELS["femur"]     # femur at larger x than the pelvis: patient's right
    a[2:8, 3:7, 1:3] = LABELS["pelvis"]
    midline, single, _ = V.side_split_x(Image(a, np.diag([2.0, 2.0, 4.0, 1.0])))
    assert single == "right"


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    assert V.main(["--results", str(tmp_path / "empty"), "--reference", str(tmp_path / "empty"),
                   "--out", str(tmp_path / "o")]) == 2
    semi = tmp_path / "semi.csv"
    semi.write_text("Patient ID;Hip;IFS (mm);Goutallier\np1;left;12.5;2\np1;R;20;\n")
    recs = V.read_measurement_csv(semi, [])
    assert recs[("p1", "left")]["ifs_3d"] == 12.5 and recs[("p1", "left")]["qf_goutallier_grade"] == 2
    assert recs[("p1", "right")]["qf_goutallier_grade"] is None
    bad = tmp_path / "bad.csv"
    bad.write_text("name,value\na,1\n")
    with pytest.raises(ValueError, match="subject"):
        V.read_measurement_csv(bad, [])
    assert V.norm_edema(2) == "marked" and V.norm_edema("Moderate") == "marked" and V.norm_edema(None) is None
    assert V.norm_side("Lt") == "left" and V.norm_side("R") == "right"


def test_overlap_metrics_match_monai_metric_classes():
    import torch
    from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

    rng = np.random.default_rng(5)
    from scipy import ndimage
    a = ndimage.binary_dilation(rng.random((24, 20, 10)) > 0.97, iterations=2)
    b = ndimage.binary_dilation(rng.random((24, 20, 10)) > 0.97, iterations=2)
    sp = [0.8, 0.8, 3.0]
    m = V.overlap_metrics(a, b, sp)
    p, r = torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float()
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(p, r, spacing=sp)
    msd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")(p, r, spacing=sp)
    assert m["hd95_mm"] == pytest.approx(float(hd.reshape(-1)[0]), rel=1e-5)
    assert m["msd_mm"] == pytest.approx(float(msd.reshape(-1)[0]), rel=1e-5)
    assert m["dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_qfs_agreement_also_without_tool_marked_implausible_values(tmp_path):
    # the tool's per-hip cohort.csv: one hip's QFS is 12 mm too large and marked implausible
    rows = [{"subject": f"s{i}", "side": side, "ifs_mm": 20.0 + i, "qfs_mm": 10.0 + i, "qfs_plausible": "True"}
            for i in range(4) for side in ("left", "right")]
    rows[3].update(qfs_mm=rows[3]["qfs_mm"] + 12.0, qfs_plausible="False")
    results = tmp_path / "results"
    results.mkdir()
    with open(results / "cohort.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ref = tmp_path / "manual.csv"
    ref.write_text("subject,side,ifs_mm,qfs_mm\n" + "".join(
        f"s{i},{side},{20.0 + i},{10.0 + i + 0.5}\n" for i in range(4) for side in ("left", "right")))
    summary = V.run_validation(results, ref, tmp_path / "out", n_boot=50, plots=False)
    agr = {r["measure"]: r for r in summary["agreement"]}
    assert agr["qfs_3d"]["n"] == 8 and agr["qfs_3d"]["mae"] == pytest.approx((7 * 0.5 + 11.5) / 8)
    assert agr["qfs_3d_plausible"]["n"] == 7 and agr["qfs_3d_plausible"]["mae"] == pytest.approx(0.5)
    assert "ifs_3d_plausible" not in agr
    assert V.norm_bool("false") is False and V.norm_bool("1") is True and V.norm_bool("") is None
