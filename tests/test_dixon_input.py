"""Dixon-only scans: the T1-like network input made from the Dixon pair, and the run around it."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipeline.api import SubjectError, normalise_inputs, run_subject
from pipeline.dixon_input import DIXON_T1_WATER_WEIGHT, t1_like_from_dixon
from pipeline.image import Image, ImageError, save_nifti
from pipeline.labels import LABELS
from tests.synthetic_subject import GAPS, make_labels

#: (fat fraction, proton density) per label value: fat, marrow-filled bone, water-rich muscle,
#: short-T2 tendon (dark in both images); the right QF is fatty (grade 2)
_TISSUE = {0: (0.0, 0.0), 1: (0.03, 0.8), 2: (0.85, 0.9), 3: (0.85, 0.9), 4: (0.0, 0.05),
           5: (0.85, 0.9), 6: (0.85, 0.9), 7: (0.03, 0.8), 8: (0.95, 1.0), 9: (0.0, 0.05),
           10: (0.03, 0.8)}
RIGHT_QF_FF = 0.30


def dixon_pair(labels: Image) -> tuple[Image, Image]:
    """Dixon fat and water images of a label map (fat fraction x proton density per tissue)."""
    ff = np.zeros(labels.shape, np.float32)
    pd = np.zeros(labels.shape, np.float32)
    for v, (f, p) in _TISSUE.items():
        ff[labels.array == v], pd[labels.array == v] = f, p
    x = labels.voxel_to_world(np.indices(labels.shape).reshape(3, -1).T)[:, 0].reshape(labels.shape)
    ff[(labels.array == LABELS["quadratus_femoris"]) & (x > 0)] = RIGHT_QF_FF
    rng = np.random.default_rng(0)
    fat = 1000 * ff * pd + rng.normal(0, 5, ff.shape).astype(np.float32)
    water = 1000 * (1 - ff) * pd + rng.normal(0, 5, ff.shape).astype(np.float32)
    return Image(fat, labels.affine.copy(), "dixon_fat"), Image(water, labels.affine.copy(), "dixon_water")


def test_t1_like_image_is_fat_plus_weighted_water_in_world_coordinates():
    lab = make_labels()
    fat, water = dixon_pair(lab)
    # the water image stored flipped (LPS-like): same world positions, another voxel order
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = lab.shape[0] - 1, lab.shape[1] - 1
    water_lps = Image(water.array[::-1, ::-1, :].copy(), water.affine @ flip, "dixon_water")
    t1 = t1_like_from_dixon(fat, water_lps)
    assert t1.kind == "t1" and t1.shape == fat.shape
    np.testing.assert_array_equal(t1.affine, fat.affine)
    expected = np.clip(fat.array, 0, None) + DIXON_T1_WATER_WEIGHT * np.clip(water.array, 0, None)
    np.testing.assert_allclose(t1.array, expected, rtol=1e-5, atol=1e-3)
    # T1-like contrast: fat brightest, muscle darker, tendon darkest
    med = {n: float(np.median(t1.array[lab.array == LABELS[n]]))
           for n in ("subcutaneous_fat", "gluteus_maximus", "hamstring_tendon")}
    assert med["subcutaneous_fat"] > 2 * med["gluteus_maximus"] > 4 * med["hamstring_tendon"]


def test_t1_like_image_refuses_a_pair_that_does_not_overlap():
    fat, water = dixon_pair(make_labels())
    far = water.affine.copy()
    far[0, 3] += 5000.0
    with pytest.raises(ImageError, match="do not overlap"):
        t1_like_from_dixon(fat, Image(water.array, far, "dixon_water"))


def test_dixon_pair_alone_is_a_valid_input_but_half_a_pair_is_not(tmp_path):
    from pipeline.cohort import ManifestError, read_manifest

    assert set(normalise_inputs({"dixon_fat": "f.nii.gz", "dixon_water": "w.nii.gz"})) == {"dixon_fat", "dixon_water"}
    with pytest.raises(SubjectError, match="Dixon needs both"):
        normalise_inputs({"dixon_fat": "f.nii.gz"})
    m = tmp_path / "m.csv"
    m.write_text("subject,dixon_fat,dixon_water\na,a/fat.nii.gz,a/water.nii.gz\n")
    (spec,) = read_manifest(m)
    assert set(spec.inputs) == {"dixon_fat", "dixon_water"}
    m.write_text("subject,dixon_fat\na,a/fat.nii.gz\n")
    with pytest.raises(ManifestError, match="dixon_water"):
        read_manifest(m)


def test_dixon_only_scan_is_segmented_on_the_t1_like_image_and_graded_from_dixon(tmp_path, monkeypatch):
    """run_subject on a Dixon pair alone: the network gets one T1-like image on the fat image's
    grid; the labels come back on that grid; IFS is measured; fat from Dixon; edema not graded."""
    import pipeline.segment as seg_mod

    lab = make_labels()
    fat, water = dixon_pair(lab)
    save_nifti(fat, tmp_path / "fat.nii.gz")
    save_nifti(water, tmp_path / "water.nii.gz")
    seen = {}

    def oracle(images, model, reference=None, **kw):       # the network stood in for by the truth
        seen["images"], seen["reference"] = images, reference
        return seg_mod.Segmentation(Image(lab.array.copy(), images["t1"].affine.copy(), "labels"),
                                    {n: 0.9 for n in LABELS if n != "background"})

    monkeypatch.setattr(seg_mod, "segment", oracle)
    rec = run_subject({"dixon_fat": tmp_path / "fat.nii.gz", "dixon_water": tmp_path / "water.nii.gz"},
                      tmp_path / "out", model=object())
    assert set(seen["images"]) == {"t1"} and seen["reference"] == "t1"
    assert seen["images"]["t1"].meta["synthesised_from"].startswith("dixon")
    np.testing.assert_allclose(seen["images"]["t1"].affine, fat.affine)
    out = nib.load(str(tmp_path / "out" / "labels.nii.gz"))
    np.testing.assert_allclose(out.affine, fat.affine, atol=1e-4)
    assert rec["provenance"]["reference"] == "dixon_fat"
    assert any("T1-like image made from the Dixon pair" in w for w in rec["provenance"]["warnings"])
    right, left = rec["hips"]["right"], rec["hips"]["left"]
    assert right["ifs_mm"] == pytest.approx(GAPS["right"], abs=2.5)
    assert left["ifs_mm"] == pytest.approx(GAPS["left"], abs=2.5)
    assert right["qf_fat_method"] == "dixon" and right["qf_fat_fraction"] == pytest.approx(RIGHT_QF_FF, abs=0.05)
    assert left["qf_fat_fraction"] < 0.08
    assert right["qf_edema"]["grade"] is None and "fluid" in right["qf_edema"]["reason"]
    saved = json.loads((tmp_path / "out" / "measurements.json").read_text())
    assert saved["hips"]["right"]["qf_goutallier_grade"] == 2


def test_swapped_dixon_is_not_graded_and_the_t1_grades_instead():
    """A fat-water swap over half of the field (world RAS x < 0: the subject's left, as a
    failed separation far off-centre makes): subcutaneous fat there reads fat fraction
    ~0.05, so the Dixon grade of that hip is withheld with a warning, and the T1 grades it when
    there is one; the other hip keeps its Dixon grade. Exchanging the whole pair gives no
    Dixon grade on either side."""
    from pipeline.measure import measure_hips
    from tests.synthetic_subject import make_images

    lab = make_labels()
    fat, water = dixon_pair(lab)
    x = lab.voxel_to_world(np.indices(lab.shape).reshape(3, -1).T)[:, 0].reshape(lab.shape)
    half = x < 0
    sw_fat = Image(np.where(half, water.array, fat.array), fat.affine.copy(), "dixon_fat")
    sw_water = Image(np.where(half, fat.array, water.array), fat.affine.copy(), "dixon_water")
    t1 = make_images(lab)["t1"]
    hips = measure_hips(lab, {"dixon_fat": sw_fat, "dixon_water": sw_water})["hips"]
    assert hips["right"]["qf_fat_method"] == "dixon"
    check = hips["right"]["dixon_swap_check"]
    assert check["subcutaneous_fat_fraction"] > 0.9 and check["reference_swapped_share"] == 0
    assert hips["right"]["qf_fat_fraction"] == pytest.approx(RIGHT_QF_FF, abs=0.05)
    left = hips["left"]
    check = left["dixon_swap_check"]
    assert check["subcutaneous_fat_fraction"] < 0.1 and check["subcutaneous_swapped_share"] > 0.9
    assert check["reference_swapped_share"] > 0.9
    assert left["qf_fat_fraction"] is None
    assert "swapped" in left["reasons"]["fat"] and any("swapped" in w for w in left["warnings"])
    with_t1 = measure_hips(lab, {"dixon_fat": sw_fat, "dixon_water": sw_water, "t1": t1})["hips"]
    assert with_t1["left"]["qf_fat_method"] == "t1_calibrated" and with_t1["left"]["qf_goutallier_grade"] == 0
    assert any("graded from the T1" in w for w in with_t1["left"]["warnings"])
    assert with_t1["right"]["qf_fat_method"] == "dixon"
    unswapped = measure_hips(lab, {"dixon_fat": fat, "dixon_water": water})["hips"]
    assert all(h["qf_fat_method"] == "dixon" and h["qf_fat_fraction"] is not None for h in unswapped.values())
    exchanged = measure_hips(lab, {"dixon_fat": water, "dixon_water": fat})["hips"]
    assert all(h["qf_fat_fraction"] is None and "swapped" in h["reasons"]["fat"] for h in exchanged.values())


def test_swap_confined_to_the_muscles_is_caught_by_the_reference_muscle():
    """A swap whose edge leaves the subcutaneous fat near the hip as it was but covers the
    gluteus maximus (the reference muscle) is caught by that muscle reading above 0.5."""
    from pipeline.measure import measure_hips

    lab = make_labels()
    fat, water = dixon_pair(lab)
    x = lab.voxel_to_world(np.indices(lab.shape).reshape(3, -1).T)[:, 0].reshape(lab.shape)
    region = (x < 0) & (lab.array != LABELS["subcutaneous_fat"])
    sw_fat = Image(np.where(region, water.array, fat.array), fat.affine.copy(), "dixon_fat")
    sw_water = Image(np.where(region, fat.array, water.array), fat.affine.copy(), "dixon_water")
    left = measure_hips(lab, {"dixon_fat": sw_fat, "dixon_water": sw_water})["hips"]["left"]
    check = left["dixon_swap_check"]
    assert check["subcutaneous_swapped_share"] < 0.3 and check["reference_swapped_share"] > 0.9
    assert left["qf_fat_fraction"] is None and "reference muscle above 0.5" in left["reasons"]["fat"]


@pytest.mark.parametrize("with_t1", [False, True])
def test_pair_given_the_wrong_way_round_is_exchanged_and_run_again(tmp_path, monkeypatch, with_t1):
    """Fat and water given the wrong way round read swapped around every hip: run_subject
    exchanges them, says so, and grades the fat from the right images; a Dixon-only scan is
    segmented again from the T1-like image of the exchanged pair. A pair swapped over half the
    field is not exchanged (that hip is withheld, as measure does)."""
    import pipeline.segment as seg_mod
    from tests.synthetic_subject import make_images

    lab = make_labels()
    fat, water = dixon_pair(lab)
    save_nifti(fat, tmp_path / "fat.nii.gz")
    save_nifti(water, tmp_path / "water.nii.gz")
    save_nifti(make_images(lab)["t1"], tmp_path / "t1.nii.gz")
    seen = []

    def oracle(images, model, reference=None, **kw):
        seen.append(images["t1"])
        return seg_mod.Segmentation(Image(lab.array.copy(), images["t1"].affine.copy(), "labels"),
                                    {n: 0.9 for n in LABELS if n != "background"})

    monkeypatch.setattr(seg_mod, "segment", oracle)
    extra = {"t1": tmp_path / "t1.nii.gz"} if with_t1 else {}
    rec = run_subject({"dixon_fat": tmp_path / "water.nii.gz", "dixon_water": tmp_path / "fat.nii.gz", **extra},
                      tmp_path / "out", model=object())
    assert any("exchanged" in w for w in rec["provenance"]["warnings"])
    right, left = rec["hips"]["right"], rec["hips"]["left"]
    assert any("exchanged" in w for w in right["warnings"]) and any("exchanged" in w for w in left["warnings"])
    assert right["qf_fat_method"] == "dixon" and right["qf_fat_fraction"] == pytest.approx(RIGHT_QF_FF, abs=0.05)
    assert left["qf_fat_method"] == "dixon" and left["qf_fat_fraction"] < 0.08
    if with_t1:
        assert len(seen) == 1                                   # the T1 was segmented once
    else:
        assert len(seen) == 2 and "segmented and measured again" in " ".join(rec["provenance"]["warnings"])
        lean = lab.array == LABELS["gluteus_maximus"]
        assert seen[0].array[lean].mean() > seen[1].array[lean].mean()   # muscle bright, then not
    x = lab.voxel_to_world(np.indices(lab.shape).reshape(3, -1).T)[:, 0].reshape(lab.shape)
    half = x < 0
    save_nifti(Image(np.where(half, water.array, fat.array), fat.affine.copy()), tmp_path / "hf.nii.gz")
    save_nifti(Image(np.where(half, fat.array, water.array), fat.affine.copy()), tmp_path / "hw.nii.gz")
    rec = run_subject({"dixon_fat": tmp_path / "hf.nii.gz", "dixon_water": tmp_path / "hw.nii.gz", **extra},
                      tmp_path / "out2", model=object())
    assert not any("exchanged" in w for w in rec["provenance"]["warnings"])
    assert rec["hips"]["right"]["qf_fat_method"] == "dixon"
    assert rec["hips"]["left"]["qf_fat_method"] == ("t1_calibrated" if with_t1 else "dixon")
