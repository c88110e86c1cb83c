"""Tests of the post-hoc class-offset calibration (pipeline.calibrate)."""
from __future__ import annotations

import csv
import json

import numpy as np
import torch

from models.bundle import default_metadata, model_from_metadata, save_bundle
from pipeline.calibrate import CALIBRATED, CalibrationCase, case_dice, fit_offsets, main
from pipeline.labels import LABELS


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
