"""pipeline.cohort / pipeline.api / pipeline.report: manifest parsing, fault isolation (every bad
input is one errors.csv line and the cohort goes on), resume, atomic 'done', inputs untouched,
worker crashes, Ray == local, a network bundle end to end. Mechanics use given label maps
(``use_labels``) so they do not depend on trained weights."""
import csv
import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from synthetic_subject import comparable, make_images, make_labels, write_manifest, write_subject

from pipeline.api import SubjectError, run_subject, sanitize_subject_id
from pipeline.cohort import ManifestError, _run_local, read_manifest, run_cohort
from pipeline.image import Image, save_nifti
from pipeline.io import hash_input

GOOD = ("good0", "good1")


def _bad_subjects(root: Path) -> list[dict]:
    """Good subjects plus one subject per kind of bad input (name -> expected stage)."""
    rows = []
    for i, name in enumerate(GOOD):
        write_subject(root / name, seed=i, gaps={"right": 10.0 + 2 * i, "left": 22.0})
        rows.append({"subject": name, "t1": f"{name}/t1.nii.gz", "fluid": f"{name}/stir.nii.gz",
                     "fluid_kind": "stir", "labels": f"{name}/labels.nii.gz"})
    lab = "good0/labels.nii.gz"
    t1 = (root / "good0" / "t1.nii.gz").read_bytes()
    (root / "bad").mkdir()
    (root / "bad" / "trunc.nii.gz").write_bytes(t1[: len(t1) // 2])
    with gzip.open(root / "bad" / "corrupt.nii.gz", "wb") as fh:
        fh.write(b"garbage header" * 40)
    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((20, 20), np.float32), aff), str(root / "bad" / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 4, 3)).astype(np.float32), aff),
             str(root / "bad" / "4d.nii.gz"))
    nan = np.random.default_rng(1).random((20, 20, 6)).astype(np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, aff), str(root / "bad" / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 6), np.float32), aff), str(root / "bad" / "empty.nii.gz"))
    far = make_images(make_labels())["fluid"]
    far.affine[:3, 3] += [0, 0, 900.0]
    save_nifti(far, root / "bad" / "far_stir.nii.gz")
    big = np.ones((128, 128, 64), np.float32)   # 1.05 M voxels > the test's guard (checked from the header)
    nib.save(nib.Nifti1Image(big, aff), str(root / "bad" / "big.nii.gz"))
    # non-hip anatomy: a label map without any hip structure
    knee = make_labels()
    knee.array[knee.array > 0] = 10   # all 'other_muscle'
    save_nifti(knee, root / "bad" / "knee_labels.nii.gz", dtype=np.uint8)
    cases = {
        "missing_file": ("load", {"t1": "bad/does_not_exist.nii.gz", "labels": lab}),
        "truncated": ("load", {"t1": "bad/trunc.nii.gz", "labels": lab}),
        "corrupt": ("load", {"t1": "bad/corrupt.nii.gz", "labels": lab}),
        "flat2d": ("load", {"t1": "bad/flat.nii.gz", "labels": lab}),
        "multi4d": ("load", {"t1": "bad/4d.nii.gz", "labels": lab}),
        "nan": ("load", {"t1": "bad/nan.nii.gz", "labels": lab}),
        "empty": ("load", {"t1": "bad/empty.nii.gz", "labels": lab}),
        "no_overlap": ("validate", {"t1": "good0/t1.nii.gz", "fluid": "bad/far_stir.nii.gz",
                                    "fluid_kind": "stir", "labels": lab}),
        "too_large": ("load", {"t1": "bad/big.nii.gz", "labels": lab}),
        "not_a_hip": ("labels", {"t1": "good0/t1.nii.gz", "labels": "bad/knee_labels.nii.gz"}),
    }
    for name, (stage, row) in cases.items():
        rows.append({"subject": name, **row, "_stage": stage})
    return rows


@pytest.fixture(scope="module")
def bad_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    rows = _bad_subjects(root)
    manifest = write_manifest(root / "cohort.csv", rows)
    before = {p: hash_input(p) for p in root.rglob("*") if p.is_file()}
    out = root / "out"
    summary = run_cohort(manifest, out, workers=2, use_labels=True, quiet=True, max_voxels=1_000_000)
    after = {p: hash_input(p) for p in root.rglob("*") if p.is_file() and out not in p.parents}
    return {"root": root, "rows": rows, "manifest": manifest, "out": out, "summary": summary,
            "before": before, "after": after}


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_each_bad_input_is_one_error_line_and_the_rest_goes_on(bad_cohort):
    out, rows = bad_cohort["out"], bad_cohort["rows"]
    errors = {r["subject"]: r for r in _read_csv(out / "errors.csv")}
    expected = {r["subject"]: r["_stage"] for r in rows if "_stage" in r}
    assert set(errors) == set(expected)
    for name, stage in expected.items():
        assert errors[name]["stage"] == stage, (name, errors[name])
        assert errors[name]["message"] and "\n" not in errors[name]["message"]
        assert not (out / name / "measurements.json").exists()
    assert "memory guard" in errors["too_large"]["message"]
    assert "no hip structures" in errors["not_a_hip"]["message"]
    assert "does not overlap" in errors["no_overlap"]["message"]
    hips = _read_csv(out / "cohort.csv")
    assert sorted({(h["subject"], h["side"]) for h in hips}) == sorted(
        (s, side) for s in GOOD for side in ("left", "right"))
    summary = bad_cohort["summary"]
    assert summary["done"] == len(GOOD) and summary["failed"] == len(expected)


def test_cohort_outputs_and_contents(bad_cohort):
    out = bad_cohort["out"]
    rec = json.loads((out / "good0" / "measurements.json").read_text())
    assert rec["subject"] == "good0" and set(rec["hips"]) == {"left", "right"}
    assert rec["disclaimer"] and rec["frame"]
    prov = rec["provenance"]
    assert set(prov["input_sha256"]) == {"t1", "fluid", "labels", "label_table"}
    assert prov["model"]["source"] == "labels" and prov["inputs"]["fluid"]["kind"] == "stir"
    assert {"load_s", "segment_s", "measure_s", "total_s"} <= set(prov["timings"])
    # right hip built with a narrower IFS than the left one; the narrow one is flagged
    assert rec["hips"]["right"]["ifs_mm"] < rec["hips"]["left"]["ifs_mm"]
    hips = {(h["subject"], h["side"]): h for h in _read_csv(out / "cohort.csv")}
    assert "ifs_narrow" in hips[("good0", "right")]["flags"]
    assert float(hips[("good0", "right")]["ifs_mm"]) == pytest.approx(rec["hips"]["right"]["ifs_mm"], abs=1e-3)
    lab = nib.load(str(out / "good0" / "labels.nii.gz"))
    t1 = nib.load(str(bad_cohort["root"] / "good0" / "t1.nii.gz"))
    np.testing.assert_allclose(lab.affine, t1.affine, atol=1e-6)
    assert lab.shape == t1.shape
    assert json.loads((out / "good0" / "labels.json").read_text())["quadratus_femoris"] == 1
    assert (out / "good0" / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "good0" in html and "Singer" in html and "synthetic phantoms" not in html  # labels given
    assert "data:image/png;base64," in html and "src='http" not in html               # self-contained
    assert "not_a_hip" in html   # failed subjects listed


def test_inputs_never_modified(bad_cohort):
    assert bad_cohort["after"] == bad_cohort["before"]


def test_resume_skips_done_redoes_changed_and_force(bad_cohort, tmp_path):
    root, out = bad_cohort["root"], bad_cohort["out"]
    stamp = {s: (out / s / "measurements.json").stat().st_mtime_ns for s in GOOD}
    summary = run_cohort(bad_cohort["manifest"], out, use_labels=True, quiet=True, max_voxels=1_000_000)
    assert summary["skipped"] == len(GOOD) and summary["done"] == 0
    assert {s: (out / s / "measurements.json").stat().st_mtime_ns for s in GOOD} == stamp
    # a folder with outputs but no measurements.json is not finished: it is redone
    (out / "good1" / "measurements.json").unlink()
    summary = run_cohort(bad_cohort["manifest"], out, use_labels=True, quiet=True, max_voxels=1_000_000)
    assert summary["done"] == 1 and (out / "good1" / "measurements.json").exists()
    # force redoes everything; results identical apart from timings
    before = comparable(json.loads((out / "good0" / "measurements.json").read_text()))
    summary = run_cohort(bad_cohort["manifest"], out, use_labels=True, quiet=True, force=True,
                         max_voxels=1_000_000)
    assert summary["done"] == len(GOOD)
    assert comparable(json.loads((out / "good0" / "measurements.json").read_text())) == before
    # a changed input file makes its subject out of date
    t1 = root / "good1" / "t1.nii.gz"
    img = nib.load(str(t1))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 2, img.affine), str(t1))
    summary = run_cohort(bad_cohort["manifest"], out, use_labels=True, quiet=True, max_voxels=1_000_000)
    assert (summary["done"], summary["skipped"]) == (1, 1)
    # changed cut-offs change the flags: everything is redone
    from pipeline.config import MeasureConfig

    summary = run_cohort(bad_cohort["manifest"], out, use_labels=True, quiet=True, max_voxels=1_000_000,
                         config=MeasureConfig(ifs_cutoff_mm=25.0))
    assert summary["done"] == len(GOOD)
    assert json.loads((out / "good0" / "measurements.json").read_text())["config"]["ifs_cutoff_mm"] == 25.0


def test_manifest_parsing(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("subject,t1,stir,extra\n../evil/x,s/t1.nii.gz,s/stir.nii.gz,ignored\n")
    (spec,) = read_manifest(m)
    assert spec.subject == "evil_x" and spec.inputs["stir"] == str(tmp_path / "s" / "stir.nii.gz")
    assert spec.labels is None
    m.write_text("subject,t1\na,x.nii.gz\na,y.nii.gz\n")
    with pytest.raises(ManifestError, match="duplicates"):
        read_manifest(m)
    m.write_text("id,t1\na,x.nii.gz\n")
    with pytest.raises(ManifestError, match="no 'subject' column"):
        read_manifest(m)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.csv")


@pytest.mark.parametrize("raw, safe", [("sub-01", "sub-01"), ("../../etc", "etc"), ("a/b\\c", "a_b_c"),
                                       ("  x y ", "x_y"), (".hidden", "hidden")])
def test_sanitize_subject_id(raw, safe):
    assert sanitize_subject_id(raw) == safe


def test_sanitize_rejects_empty():
    with pytest.raises(ValueError):
        sanitize_subject_id("../..")


def crash_on_boom(task):
    """Worker function for the crash test: the 'boom' subject kills its worker process."""
    if task["subject"] == "boom":
        os._exit(3)
    return {"subject": task["subject"], "ok": True, "stage": None, "message": None}


def test_worker_crash_is_isolated():
    tasks = [{"subject": s} for s in ("a", "boom", "b", "c", "d")]
    results = []
    _run_local(tasks, {}, 2, results.append, fn=crash_on_boom)
    by = {r["subject"]: r for r in results}
    assert set(by) == {"a", "boom", "b", "c", "d"} and len(results) == 5
    assert by["boom"]["stage"] == "crash" and not by["boom"]["ok"]
    assert all(by[s]["ok"] for s in "abcd")


def test_run_subject_errors_name_their_stage(tmp_path):
    write_subject(tmp_path / "s", seed=0)
    with pytest.raises(SubjectError) as info:
        run_subject({"t1": tmp_path / "s" / "t1.nii.gz", "dixon_fat": tmp_path / "s" / "t1.nii.gz"},
                    tmp_path / "o", labels_override=tmp_path / "s" / "labels.nii.gz")
    assert info.value.stage == "input"
    with pytest.raises(SubjectError) as info:
        run_subject({"t1": tmp_path / "nope.nii.gz"}, tmp_path / "o")
    assert info.value.stage == "load"


def test_labels_on_another_grid_are_resampled_to_t1(tmp_path):
    paths = write_subject(tmp_path / "s", seed=0)
    lab = make_labels()
    # the same label map stored flipped (LPS-like storage): same world positions
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = lab.shape[0] - 1, lab.shape[1] - 1
    stored = Image(lab.array[::-1, ::-1, :].copy(), lab.affine @ flip, "labels")
    save_nifti(stored, tmp_path / "flipped.nii.gz", dtype=np.uint8)
    rec = run_subject({"t1": paths["t1"]}, tmp_path / "o", labels_override=tmp_path / "flipped.nii.gz")
    out = nib.load(str(tmp_path / "o" / "labels.nii.gz"))
    np.testing.assert_array_equal(np.asarray(out.dataobj), lab.array)
    assert any("resampled" in w for w in rec["provenance"]["warnings"])


def test_ray_engine_matches_local(tmp_path):
    pytest.importorskip("ray", reason="ray not installed (pip install 'ifi-seg[cluster]')")
    rows = []
    for i in range(2):
        write_subject(tmp_path / f"s{i}", seed=i, gaps={"right": 11.0 + i, "left": 21.0})
        rows.append({"subject": f"s{i}", "t1": f"s{i}/t1.nii.gz", "fluid": f"s{i}/stir.nii.gz",
                     "fluid_kind": "stir", "labels": f"s{i}/labels.nii.gz"})
    rows.append({"subject": "broken", "t1": "s0/missing.nii.gz", "labels": "s0/labels.nii.gz"})
    m = write_manifest(tmp_path / "cohort.csv", rows)
    local = run_cohort(m, tmp_path / "local", workers=1, use_labels=True, quiet=True)
    ray_ = run_cohort(m, tmp_path / "ray", workers=2, engine="ray", use_labels=True, quiet=True)
    assert (local["done"], local["failed"]) == (ray_["done"], ray_["failed"]) == (2, 1)
    for s in ("s0", "s1"):
        a = comparable(json.loads((tmp_path / "local" / s / "measurements.json").read_text()))
        b = comparable(json.loads((tmp_path / "ray" / s / "measurements.json").read_text()))
        assert a == b
    assert (tmp_path / "local" / "cohort.csv").read_text() == (tmp_path / "ray" / "cohort.csv").read_text()
    assert (tmp_path / "local" / "errors.csv").read_text() == (tmp_path / "ray" / "errors.csv").read_text()


def test_network_bundle_end_to_end(tmp_path):
    """A tiny untrained bundle: the model path reaches the workers, runs, and either measures or
    reports 'no hip structures' cleanly (an untrained net may find nothing)."""
    torch = pytest.importorskip("torch")
    from models.bundle import default_metadata, model_from_metadata, save_bundle

    torch.manual_seed(0)
    meta = default_metadata(architecture={"name": "UNet", "spatial_dims": 3, "channels": [4, 8],
                                          "strides": [[2, 2, 1]], "num_res_units": 0, "norm": "instance"},
                            inference={"mode": "whole", "bf16": False})
    bundle = tmp_path / "tiny"
    weights, _ = save_bundle(bundle, model_from_metadata(meta), meta)
    write_subject(tmp_path / "s", seed=0)
    m = write_manifest(tmp_path / "m.csv", [{"subject": "s", "t1": "s/t1.nii.gz", "fluid": "s/stir.nii.gz",
                                              "fluid_kind": "stir", "labels": "s/labels.nii.gz"}])
    summary = run_cohort(m, tmp_path / "out", model_path=bundle, device="cpu", quiet=True)
    done = tmp_path / "out" / "s" / "measurements.json"
    if summary["done"]:
        prov = json.loads(done.read_text())["provenance"]
        assert prov["model"]["sha256"] == hash_input(weights) and "labels" not in prov["input_sha256"]
        assert prov["segmentation"]["confidence"]
    else:
        (err,) = summary["errors"]
        assert err["stage"] == "segment" and "no hip structures" in err["message"], err
        assert not done.exists()
    # without a model and without labels the run stops with one clear message
    with pytest.raises(SubjectError, match="model weights not found"):
        run_cohort(m, tmp_path / "out2", model_path=tmp_path / "absent", quiet=True)


def test_report_summaries_leave_out_implausible_qfs():
    from pipeline.report import HIP_COLUMNS, _side_summary

    rows = [{"subject": f"s{i}", "side": "right", "ifs_axial_mm": 20.0, "qfs_axial_mm": q,
             "qfs_plausible": ok, "flags": ""}
            for i, (q, ok) in enumerate(((8.0, True), (10.0, True), (30.0, False)))]
    html = _side_summary(rows)
    right = html.split("<tr><td>right</td>")[1].split("</tr>")[0]
    # median QFS of the two plausible values (9.0, not 10.0 with the implausible 30 mm), 1 left out
    assert right == "<td>3</td><td>20.0</td><td>9.0</td><td>1</td><td>0</td>"
    assert "qfs_plausible" in HIP_COLUMNS


def test_a_changed_sidecar_makes_a_result_out_of_date(tmp_path):
    """A NIfTI's JSON sidecar is part of its input: editing it (e.g. to say STIR rather than T2
    fat-sat) makes the subject's hash change, so a resumed cohort run redoes it."""
    from pipeline.api import input_hashes

    paths = write_subject(tmp_path / "s")
    before = input_hashes({"t1": paths["t1"], "fluid": paths["stir"], "fluid_kind": "stir"})
    assert set(before) == {"t1", "fluid"}
    side = tmp_path / "s" / "stir.json"
    side.write_text('{"SeriesDescription": "AX STIR"}')
    with_sidecar = input_hashes({"t1": paths["t1"], "fluid": paths["stir"], "fluid_kind": "stir"})
    assert set(with_sidecar) == {"t1", "fluid", "fluid_sidecar"} and with_sidecar["fluid"] == before["fluid"]
    side.write_text('{"SeriesDescription": "AX T2 FS"}')
    assert input_hashes({"t1": paths["t1"], "fluid": paths["stir"]})["fluid_sidecar"] != with_sidecar["fluid_sidecar"]
