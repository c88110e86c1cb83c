"""Tests of the post-hoc class-offset calibration (pipeline.calibrate)."""
from __future__ import annotations

import csv
import json

import numpy as np
import torch

from models.bundle import default_metadata, model_from_metadata, save_bundle
from pipeline.calibrate import (CALIBRATED, CalibrationCase, case_dice, case_labels, fit_offsets,
                                main, measurement_case, measurement_error, refine_on_measurements,
                                truth_measurements)
from pipeline.labels import LABELS
from tests.analytic_hips import labels_image


def _biased_case(bias: float, n: int = 4000, seed: int = 0) -> CalibrationCase:
    """Voxels along x in [0, 1): truth QF for x < 0.5, other muscle beyond; the network's QF
    logit is 6 (0.5 - x) + bias, so it draws the QF too large by bias / 6."""
    k = len(LABELS)
    x = np.random.default_rng(seed).random(n)
    truth = np.where(x < 0.5, LABELS["quadratus_femoris"], LABELS["other_muscle"])
    logits = np.full((k, n), -20.0)
    logits[LABELS["other_muscle"]] = 0.0
    logits[LABELS["quadratus_femoris"]] = 6.0 * (0.5 - x) + bias
    logp = torch.log_softmax(torch.from_numpy(logits), 0).numpy().astype(np.float32)
    zero = np.zeros(k, np.int64)
    return CalibrationCase("s", "t1", logp, truth, zero, zero, np.bincount(truth, minlength=k))


def test_fit_offsets_undoes_a_known_bias():
    cases = [_biased_case(0.8, seed=s) for s in range(3)]
    qf = np.array([LABELS["quadratus_femoris"]])
    offsets, before, after = fit_offsets(cases, classes=("quadratus_femoris",))
    assert abs(offsets["quadratus_femoris"] + 0.8) <= 0.1 + 1e-6
    assert before < 0.9 and after > 0.98
    vec = np.zeros(len(LABELS), np.float32)
    vec[qf] = offsets["quadratus_femoris"]
    assert np.nanmean([case_dice(c, vec, qf)[0] for c in cases]) == after
    unbiased, b0, a0 = fit_offsets([_biased_case(0.0)], classes=("quadratus_femoris",))
    assert unbiased["quadratus_femoris"] == 0.0 and a0 == b0


def test_structures_a_scan_is_not_annotated_for_are_not_scored():
    """A scan whose label table omits the iliopsoas tendon: the network's iliopsoas voxels there
    (truth background) must not score Dice 0 and drag that class's offset down."""
    k = len(LABELS)
    case = _biased_case(0.0)
    ilio = LABELS["iliopsoas_tendon"]
    case.logp[ilio, :100] = 0.0                  # some voxels the network calls iliopsoas
    classes = np.array([LABELS["quadratus_femoris"], ilio])
    assert case_dice(case, np.zeros(k, np.float32), classes)[1] == 0.0
    case.annotated = np.array([n != "iliopsoas_tendon" for n in LABELS])
    d = case_dice(case, np.zeros(k, np.float32), classes)
    assert np.isnan(d[1]) and d[0] > 0.9


def test_calibrate_writes_offsets_per_input_combination(tmp_path):
    """The command fits on a small annotated cohort and stores one offset per calibrated class
    for each input combination in a new bundle's metadata; the weights are unchanged."""
    import nibabel as nib

    torch.manual_seed(0)
    meta = default_metadata()
    meta["architecture"] = dict(meta["architecture"], channels=[4, 8, 8, 8], num_res_units=1)
    net = model_from_metadata(meta).eval()
    save_bundle(tmp_path / "m", net, meta)
    rng = np.random.default_rng(1)
    aff = np.diag([0.8, 0.8, 4.0, 1.0])
    rows = []
    for s in range(2):
        d = tmp_path / f"sub-{s}"
        d.mkdir()
        lab = np.zeros((48, 40, 8), np.uint8)
        for i, name in enumerate(CALIBRATED):
            lab[4 + 8 * i:10 + 8 * i, 10:30, 2:6] = LABELS[name]
        for name in ("t1", "fluid"):
            img = (rng.random(lab.shape) * 100 + 20 * lab).astype(np.float32)
            nib.save(nib.Nifti1Image(img, aff), str(d / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(d / "labels.nii.gz"))
        rows.append({"subject": f"sub-{s}", "t1": f"sub-{s}/t1.nii.gz", "fluid": f"sub-{s}/fluid.nii.gz",
                     "labels": f"sub-{s}/labels.nii.gz"})
    with open(tmp_path / "cohort.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main(["--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path),
                 "--modes", "t1+fluid,t1", "--out", str(tmp_path / "cal")]) == 0
    out = json.loads((tmp_path / "cal.json").read_text())
    offsets = out["inference"]["class_offsets"]
    assert set(offsets) == {"t1+fluid", "t1"}
    assert all(set(v) == set(CALIBRATED) for v in offsets.values())
    rec = out["calibration"]["modes"]["t1"]
    assert rec["n_cases"] == 2 and rec["mean_dice_after"] >= rec["mean_dice_before"]
    assert "measurement_mae_before" not in rec         # boxes, no hips: the Dice fit alone
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "m.safetensors")), load_file(str(tmp_path / "cal.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "class_offsets" not in json.loads((tmp_path / "m.json").read_text())["inference"]
    # without --out the bundle's JSON is rewritten in place, with the description
    assert main(["--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path), "--modes", "t1",
                 "--description", "two boxes"]) == 0
    inplace = json.loads((tmp_path / "m.json").read_text())
    assert set(inplace["inference"]["class_offsets"]) == {"t1"}
    assert inplace["calibration"]["description"] == "two boxes"
    assert main(["--model", str(tmp_path / "absent.safetensors"), "--data", str(tmp_path)]) == 2


def _thick_network(lab: np.ndarray, affine: np.ndarray, bias: float) -> np.ndarray:
    """A stand-in network's softmax for an annotated label map: each class's logit is half its
    signed distance (mm, positive inside), and the four structures that bound the IFS and QFS get
    ``bias`` more, so each is drawn ``bias`` mm too thick all round (to the voxel)."""
    from scipy import ndimage

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    logits = np.full((len(LABELS), *lab.shape), -20.0, np.float32)
    for name, v in LABELS.items():
        inside = lab == v
        if inside.any():
            logits[v] = 0.5 * (ndimage.distance_transform_edt(inside, spacing)
                               - ndimage.distance_transform_edt(~inside, spacing))
    for name in ("lesser_trochanter", "ischial_tuberosity", "hamstring_tendon", "iliopsoas_tendon"):
        logits[LABELS[name]] += bias
    return torch.softmax(torch.from_numpy(logits), 0).numpy()


def test_measurement_stage_undoes_structures_drawn_too_thick():
    """Bones and tendons drawn 1.6 mm too thick make the IFS and QFS too short; the measurement
    stage finds negative shifts for both groups that bring the errors down, on LPS-stored hips,
    and a forked pool of 2 gives the same answer as one process."""
    lab, _ = labels_image((1.0, 1.0, 3.0), flips=(True, True, False))
    truth = truth_measurements(lab)
    assert set(truth) == {"left", "right"}
    assert truth["left"]["ifs_mm"] < truth["right"]["ifs_mm"]      # 12 and 20 mm, by design
    # a map drawn without the iliopsoas tendon gives no reference QFS (it would be another
    # distance), one without the ischial tuberosity no IFS
    no_ilio = [n for n in LABELS if n != "iliopsoas_tendon"]
    assert truth_measurements(lab, no_ilio) == {s: {"ifs_mm": truth[s]["ifs_mm"]} for s in truth}
    assert truth_measurements(lab, ["background", "quadratus_femoris"]) == {}
    assert truth_measurements(lab, list(LABELS)) == truth
    probs = _thick_network(lab.array, lab.affine, bias=1.6)
    case = measurement_case("s", "t1", probs, lab.affine, None, truth)
    zero = {n: 0.0 for n in CALIBRATED}
    np.testing.assert_array_equal(case_labels(case, np.zeros(len(LABELS), np.float32)),
                                  probs.argmax(0))
    values = np.array([-1.6, -0.8, 0.0, 0.8])
    refined, shifts, before, after = refine_on_measurements([case], zero, values=values, sweeps=1)
    assert before > 1.0 and after < before - 0.5
    assert shifts["lesser_trochanter"] <= -0.8 and shifts["hamstring_tendon"] <= -0.8
    assert refined["ischial_tuberosity"] == shifts["lesser_trochanter"]
    assert refined["iliopsoas_tendon"] == shifts["hamstring_tendon"]
    assert refined["quadratus_femoris"] == 0.0
    vec = np.zeros(len(LABELS), np.float32)
    for name, v in refined.items():
        vec[LABELS[name]] = v
    assert measurement_error([case], vec) == after
    assert refine_on_measurements([case, case], zero, values=values, sweeps=1, workers=2)[1] == shifts
    # a network that is right needs no shift
    exact = measurement_case("s", "t1", _thick_network(lab.array, lab.affine, 0.0), lab.affine,
                             None, truth)
    assert refine_on_measurements([exact], zero, values=values, sweeps=1)[1] == {
        "lesser_trochanter": 0.0, "hamstring_tendon": 0.0}


def test_segment_applies_offsets_as_the_calibration_models_them(monkeypatch):
    """The labels ``segment`` draws with class offsets are the ones the calibration scores for
    them (offsets applied to the probabilities mapped to the label grid), on an oblique T1 whose
    grid is not the working grid."""
    import pipeline.segment as seg_mod
    from pipeline.image import Image
    from pipeline.segment import SegModel, reference_probabilities

    k = len(LABELS)

    def fake_logits(net, array, meta, device, bf16=None, mirror=False):
        g = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in array.shape[1:]], indexing="ij")
        out = torch.stack([3.0 * torch.sin(2.5 * (c + 1) * g[0] + 1.7 * c * g[1] + c) + 0.5 * g[2]
                           for c in range(k)])
        return out

    monkeypatch.setattr(seg_mod, "predict_logits", fake_logits)
    meta = default_metadata()
    meta["inference"] = dict(meta.get("inference", {}), mirror=False, class_offsets={
        "t1": {"lesser_trochanter": -0.7, "hamstring_tendon": 0.9, "quadratus_femoris": -0.3}})
    model = SegModel(None, meta, torch.device("cpu"))
    rot = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.7, -0.7, 4.5])
    img = Image(np.random.default_rng(0).random((60, 50, 9)).astype(np.float32) * 300, aff, "t1")
    labels = seg_mod.segment({"t1": img}, model, shading=False).labels.array
    _, _, raw = reference_probabilities({"t1": img}, model, offsets=False)
    vec = seg_mod.class_offsets(meta, {"t1": True, "fluid": False})
    case = measurement_case("s", "t1", raw.numpy(), aff, None, {})
    assert (case_labels(case, vec) == labels).mean() > 0.999
    assert (case_labels(case, np.zeros(k, np.float32)) == labels).mean() < 0.98   # offsets matter
