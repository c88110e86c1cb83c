"""Tests of the phantom generator's MR simulation, acquisition, files and truth (data_scripts/)."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from data_scripts import make_phantoms as mk
from data_scripts.phantoms import acquisition as acq
from data_scripts.phantoms import mr_physics as mrp
from data_scripts.phantoms.model import TISSUES
from phantom_toy import toy_anatomy, toy_axial_truth, toy_builder
from pipeline.image import load_nifti
from pipeline.labels import LABELS, read_label_table

TOY = dict(axial_truth_fn=toy_axial_truth, pixel=1.6)  # coarse pixels keep the toy tests fast


@pytest.fixture(scope="module")
def toy():
    return toy_anatomy(np.random.default_rng(0), spacing=2.0)


def _arrays(sub_dir):
    out = {}
    for f in sorted(sub_dir.glob("*.nii.gz")):
        img = nib.load(str(f))
        out[f.name] = (np.asarray(img.dataobj), img.affine)
    return out


# ------------------------------------------------------------------------------ MR physics
@pytest.mark.parametrize("field_t", [1.5, 3.0])
def test_tissue_contrast_order(field_t):
    ts = mrp.tissue_set(field_t)
    rng = np.random.default_rng(1)
    names = ["muscle", "fat", "fluid", "cortical_bone", "marrow", "muscle", "muscle"]
    tissue = np.array([TISSUES[n] for n in names], np.uint8).reshape(-1, 1, 1)
    ff = np.array([0.02, 0.95, 0.0, 0.0, 0.85, 0.02, 0.3], np.float32).reshape(-1, 1, 1)
    ed = np.array([0, 0, 0, 0, 0, 0.2, 0], np.float32).reshape(-1, 1, 1)
    sig = {}
    for kind in ("t1", "t2fs", "stir"):
        seq = mrp.draw_sequence(kind, field_t, rng)
        res = 0.1 if kind == "t2fs" else 1.0
        sig[kind] = mrp.simulate(seq, ts, tissue, ff, ed, fat_residual=res).ravel()
    m, fat, fluid, cort, marrow, edema, fatty = sig["t1"]
    assert fat > 2 * m and marrow > 2 * m and fluid < m and cort < 0.2 * m  # T1: fat bright, fluid dark
    assert fatty > m and edema < 1.05 * m                                   # fatty streaks bright, edema iso/dark
    for kind in ("t2fs", "stir"):
        m, fat, fluid, cort, marrow, edema, fatty = sig[kind]
        assert fluid > 3 * m and fat < m and marrow < m                     # fat suppressed, fluid bright
        assert edema > 1.4 * m and fatty < m                                # edema bright, fat suppressed


def test_dixon_fat_fraction_recoverable():
    ts = mrp.perturb_tissues(mrp.tissue_set(3.0), np.random.default_rng(2))
    seq = mrp.draw_sequence("dixon", 3.0, np.random.default_rng(3))
    ff = np.linspace(0, 1, 11, dtype=np.float32).reshape(-1, 1, 1)
    tissue = np.full(ff.shape, TISSUES["muscle"], np.uint8)
    water, fat = mrp.dixon_images(ts, seq, tissue, ff, np.zeros_like(ff))
    np.testing.assert_allclose(fat / (fat + water), ff, atol=1e-6)


def test_rician_noise_and_bias_field():
    rng = np.random.default_rng(4)
    noise = mrp.add_rician_noise(np.zeros((200, 200, 10), np.float32), 2.0, rng)
    assert abs(noise.mean() - 2.0 * np.sqrt(np.pi / 2)) < 0.05  # Rayleigh mean in air
    f_ij, f_k = mrp.bias_field((64, 48, 20), rng, variation=(0.1, 0.4))
    field = f_ij[:, :, None] * f_k[None, None, :]
    assert 1.09 < field.max() / field.min() < 1.41


# ------------------------------------------------------------------------------ files and layout
def test_determinism_same_seed(tmp_path, toy):
    r1 = mk.generate_subject(tmp_path / "a", 7, 3, anatomy=toy, **TOY)
    r2 = mk.generate_subject(tmp_path / "b", 7, 3, anatomy=toy, **TOY)
    assert r1 == r2
    a1, a2 = _arrays(tmp_path / "a" / r1["subject"]), _arrays(tmp_path / "b" / r2["subject"])
    assert a1.keys() == a2.keys() and len(a1) >= 3
    for k in a1:
        np.testing.assert_array_equal(a1[k][0], a2[k][0])
        np.testing.assert_array_equal(a1[k][1], a2[k][1])
    t1 = json.loads((tmp_path / "a" / r1["truth"]).read_text())
    t2 = json.loads((tmp_path / "b" / r2["truth"]).read_text())
    assert t1 == t2


def test_cohort_independent_of_workers_and_layout(tmp_path):
    kw = dict(anatomy_builder=toy_builder, log=lambda *a: None, **TOY)
    mk.generate_cohort(tmp_path / "w1", 2, 5, workers=1, **kw)
    mk.generate_cohort(tmp_path / "w2", 2, 5, workers=2, **kw)
    c1 = (tmp_path / "w1" / "cohort.csv").read_text()
    assert c1 == (tmp_path / "w2" / "cohort.csv").read_text()
    rows = list(csv.DictReader(c1.splitlines()))
    assert tuple(rows[0].keys()) == mk.COLUMNS
    assert [r["subject"] for r in rows] == ["sub-0000", "sub-0001"]
    for r in rows:
        a1, a2 = _arrays(tmp_path / "w1" / r["subject"]), _arrays(tmp_path / "w2" / r["subject"])
        for k in a1:
            np.testing.assert_array_equal(a1[k][0], a2[k][0])
        root = tmp_path / "w1"
        for col in ("t1", "fluid", "labels", "truth"):
            assert r[col] and (root / r[col]).is_file()
        assert r["fluid"].endswith(f"{r['fluid_kind']}.nii.gz") and r["fluid_kind"] in ("t2fs", "stir")
        assert bool(r["dixon_fat"]) == bool(r["dixon_water"])
        assert read_label_table(root / r["subject"] / "labels.json") == LABELS
        t1, lab = nib.load(str(root / r["t1"])), nib.load(str(root / r["labels"]))
        assert lab.shape == t1.shape and np.allclose(lab.affine, t1.affine)
        assert lab.get_data_dtype() == np.uint8
    assert not [p for p in (tmp_path / "w1").iterdir() if p.name.startswith(".")]
    # a second run over the same range keeps the complete subjects (resume) and rewrites the csv
    logs = []
    mk.generate_cohort(tmp_path / "w1", 2, 5, workers=1, **{**kw, "log": logs.append})
    assert "2 subject(s) already complete" in logs[0]
    assert (tmp_path / "w1" / "cohort.csv").read_text() == c1


def test_fov_mix_parsing():
    assert mk.parse_fov_mix("bilateral=0.5,left=0.25,right=0.25") == {"bilateral": 0.5, "left": 0.25, "right": 0.25}
    assert mk.parse_fov_mix(None) is None
    with pytest.raises(ValueError):
        mk.parse_fov_mix("both=1")
    rng = np.random.default_rng(0)
    assert {acq.draw_fov_kind(rng, {"left": 1.0}) for _ in range(5)} == {"left"}


def test_failed_subject_leaves_nothing(tmp_path, toy):
    def boom(*a, **k):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        mk.generate_subject(tmp_path, 1, 0, anatomy=toy, axial_truth_fn=boom, pixel=1.6)
    assert list(tmp_path.iterdir()) == []


def test_int16_scaling_round_trips(tmp_path):
    rng = np.random.default_rng(5)
    arr = (rng.random((20, 30, 5)) * 1234.5).astype(np.float32)
    aff = np.diag([0.7, 0.7, 4.0, 1.0])
    acq.write_nifti(tmp_path / "s.nii.gz", arr, aff, "int16_scaled")
    img = nib.load(str(tmp_path / "s.nii.gz"))
    assert img.get_data_dtype() == np.int16
    slope = float(img.dataobj.slope)  # nibabel moves scl_slope from the header to the proxy
    assert np.isfinite(slope) and 0 < slope != 1.0
    np.testing.assert_allclose(img.get_fdata(), arr, atol=slope * 0.51 + 1e-3)
    acq.write_nifti(tmp_path / "p.nii.gz", arr, aff, "int16")
    np.testing.assert_array_equal(nib.load(str(tmp_path / "p.nii.gz")).get_fdata(), np.rint(arr))


# ------------------------------------------------------------------------------ sides and truth
def _label_points(lab_img, value):
    ijk = np.argwhere(lab_img.array == value)
    return lab_img.voxel_to_world(ijk)


def check_sides_and_truth(sub_dir):
    """Re-measure sides from the label map in world coordinates and check the truth points lie on
    their labelled structures (within one voxel diagonal)."""
    truth = json.loads((sub_dir / "truth.json").read_text())
    lab = load_nifti(sub_dir / "labels.nii.gz", "labels")
    tol = float(np.linalg.norm(lab.spacing))
    hips = truth["hips"]
    for key, value, which in (("ifs_3d_points", LABELS["ischial_tuberosity"], 0),
                              ("ifs_3d_points", LABELS["lesser_trochanter"], 1)):
        mask = lab.array == value
        comp, n = ndimage.label(mask)
        assert n >= len(hips)
        cents = np.array(ndimage.center_of_mass(mask, comp, range(1, n + 1)))
        sizes = ndimage.sum(mask, comp, range(1, n + 1))
        cents_w = lab.voxel_to_world(cents)
        tree = cKDTree(_label_points(lab, value))
        nearest = {}
        for side, h in hips.items():
            p = np.asarray(h[key][which])
            assert tree.query(p)[0] <= tol, (side, key, which)
            big = sizes >= 0.05 * sizes.max()
            d = np.linalg.norm(cents_w - p, axis=1) + np.where(big, 0, 1e9)
            nearest[side] = cents_w[int(np.argmin(d))]
        if {"left", "right"} <= set(hips):
            assert nearest["left"][0] < nearest["right"][0]  # patient's left = smaller RAS x
    # QFS: first point on the hamstring tendon, second on the lesser trochanter or iliopsoas tendon
    ham = cKDTree(_label_points(lab, LABELS["hamstring_tendon"]))
    lt_ip = cKDTree(np.concatenate([_label_points(lab, LABELS["lesser_trochanter"]),
                                    _label_points(lab, LABELS["iliopsoas_tendon"])]))
    for side, h in hips.items():
        if h.get("qfs_3d_points"):
            assert ham.query(h["qfs_3d_points"][0])[0] <= tol, side
            assert lt_ip.query(h["qfs_3d_points"][1])[0] <= tol, side
    return truth


def test_single_hip_field_of_view(tmp_path):
    toy_r = toy_anatomy(np.random.default_rng(3), fov="right", spacing=2.0)
    row = mk.generate_subject(tmp_path, 4, 2, anatomy=toy_r, fov="right", orientation="LPS", **TOY)
    truth = check_sides_and_truth(tmp_path / row["subject"])
    assert set(truth["hips"]) == {"right"} and truth["acquisition"]["fov_kind"] == "right"
    assert truth["hips"]["right"]["ifs_3d_points"][0][0] > 0
    fov = truth["acquisition"]["grids"]["t1"]["fov_mm"]
    assert 100 <= fov[0] <= 230


@pytest.mark.parametrize("orientation, oblique", [("RAS", 0), ("LPS", 0), ("SRA", 0), ("PIL", 6.0)])
def test_sides_under_every_storage(tmp_path, toy, orientation, oblique):
    row = mk.generate_subject(tmp_path, 9, 1, anatomy=toy, orientation=orientation, oblique=oblique,
                              fov="bilateral", **TOY)
    sub = tmp_path / row["subject"]
    truth = check_sides_and_truth(sub)
    assert truth["acquisition"]["series"]["t1"]["axcodes"] == orientation
    assert set(truth["hips"]) == {"left", "right"}
    assert truth["hips"]["left"]["ifs_3d_points"][0][0] < 0 < truth["hips"]["right"]["ifs_3d_points"][0][0]
    # the T1 slice index of the axial truth refers to the file's slice axis
    ax = truth["acquisition"]["t1_slice_axis"]
    img = nib.load(str(sub / "t1.nii.gz"))
    assert orientation.index("S") == ax if "S" in orientation else orientation.index("I") == ax
    k = truth["hips"]["left"]["ifs_axial_slice"]
    assert 0 <= k < img.shape[ax]
    p = np.asarray(truth["hips"]["left"]["ifs_axial_points"][0])
    vox = np.linalg.inv(img.affine)[:3, :3] @ p + np.linalg.inv(img.affine)[:3, 3]
    assert abs(vox[ax] - k) < 0.51


# ------------------------------------------------------------------------------ real anatomy
@pytest.fixture(scope="module")
def real_subject(tmp_path_factory):
    pytest.importorskip("data_scripts.phantoms.anatomy")
    out = tmp_path_factory.mktemp("real")
    row = mk.generate_subject(out, 2026, 4, fov="bilateral", orientation="SLP", oblique=5.0, dixon=True,
                              dtype="int16_scaled", fluid_same_grid=False)
    return out, row


def test_real_subject_sides_truth_and_ranges(real_subject):
    out, row = real_subject
    truth = check_sides_and_truth(out / row["subject"])
    assert set(truth["hips"]) == {"left", "right"}
    for h in truth["hips"].values():
        assert 0 < h["ifs_3d_mm"] < 70 and 0 < h["qf_volume_ml"] < 200
        assert 0 <= h["qf_fat_fraction"] <= 1 and h["qf_goutallier_grade"] in range(5)
        if h["ifs_axial_mm"] is not None:  # an in-plane distance can only be longer than the 3D one
            assert h["ifs_axial_mm"] >= h["ifs_3d_mm"] - 1e-6
    acqd = truth["acquisition"]
    assert acqd["series"]["t1"]["axcodes"] == "SLP" and acqd["dtype"] == "int16_scaled"
    t1 = nib.load(str(out / row["t1"]))
    assert t1.shape[0] <= 50 and max(t1.shape) <= 512
    assert row["dixon_fat"] and row["dixon_water"]


def test_real_subject_contrast(real_subject):
    """On the written images, fat is brighter than muscle on T1 and darker on the fluid series."""
    out, row = real_subject
    lab = load_nifti(out / row["labels"], "labels")
    t1 = load_nifti(out / row["t1"])
    fat = np.median(t1.array[lab.array == LABELS["subcutaneous_fat"]])
    muscle = np.median(t1.array[lab.array == LABELS["gluteus_maximus"]])
    assert fat > 1.8 * muscle
    from pipeline.image import resample_like

    fl = resample_like(load_nifti(out / row["fluid"]), lab, order=1)
    inside = fl.array > 0
    fat_f = np.median(fl.array[(lab.array == LABELS["subcutaneous_fat"]) & inside])
    mus_f = np.median(fl.array[(lab.array == LABELS["gluteus_maximus"]) & inside])
    assert fat_f < mus_f


def test_protocol_overrides_from_the_command_line():
    from data_scripts.make_phantoms import parse_protocol

    assert parse_protocol(["thickness=7", "snr=6.5", "oblique=false", "fluid_kind=stir"]) == {
        "thickness": 7, "snr": 6.5, "oblique": False, "fluid_kind": "stir"}
    for bad in (["thickness"], ["slice=3"]):
        with pytest.raises(ValueError):
            parse_protocol(bad)


@pytest.mark.parametrize("plane, normal_axis", [("coronal", 1), ("sagittal", 0)])
def test_fluid_series_in_another_plane(tmp_path, toy, plane, normal_axis):
    """A coronal / sagittal fluid series: slices stacked along world A-P / L-R, stored in
    acquisition order, the truth labels written on its own grid, and nothing else changed."""
    axial = mk.generate_subject(tmp_path / "axial", 5, 2, anatomy=toy, orientation="LPS", **TOY)
    row = mk.generate_subject(tmp_path / plane, 5, 2, anatomy=toy, orientation="LPS", fluid_plane=plane,
                              **TOY)
    a, b = _arrays(tmp_path / "axial" / axial["subject"]), _arrays(tmp_path / plane / row["subject"])
    for name in ("t1.nii.gz", "labels.nii.gz"):     # the T1 and its truth are those of the axial run
        assert np.array_equal(a[name][0], b[name][0]) and np.allclose(a[name][1], b[name][1])
    fl = nib.load(str(tmp_path / plane / row["fluid"]))
    lin = fl.affine[:3, :3] / np.linalg.norm(fl.affine[:3, :3], axis=0)
    slice_axis = int(np.argmax(np.linalg.norm(fl.affine[:3, :3], axis=0)))
    assert slice_axis == 2                                  # acquisition order: slices last
    assert abs(lin[normal_axis, 2]) > np.cos(np.deg2rad(6))  # the slice normal, within the tilt
    truth = json.loads((tmp_path / plane / row["truth"]).read_text())
    assert truth["acquisition"]["fluid_same_grid_as_t1"] is False
    # the fluid grid's own truth: same grid, and the same anatomy as the T1 labels where both look
    lab_f = load_nifti(tmp_path / plane / row["labels_fluid"], "labels")
    assert lab_f.shape == fl.shape and np.allclose(lab_f.affine, fl.affine)
    from pipeline.image import resample_like

    lab_t1 = load_nifti(tmp_path / plane / row["labels"], "labels")
    on_f = resample_like(lab_t1, lab_f, order=0).array
    body = (on_f > 0) & (lab_f.array > 0)
    assert body.sum() > 1000 and (on_f[body] == lab_f.array[body]).mean() > 0.6
    # left stays left: the left lesser trochanter lies at world x < 0 on the fluid grid too
    ijk = np.argwhere(lab_f.array == LABELS["lesser_trochanter"])
    xyz = ijk @ lab_f.affine[:3, :3].T + lab_f.affine[:3, 3]
    assert xyz[:, 0].min() < -20 and xyz[:, 0].max() > 20     # both hips, on both sides of the midline
    lt_l = np.asarray(truth["hips"]["left"]["ifs_3d_points"][1])
    near = xyz[np.argmin(np.linalg.norm(xyz - lt_l, axis=1))]
    assert near[0] < 0 and np.linalg.norm(near - lt_l) < 10


def test_whole_pelvis_coverage(tmp_path, toy):
    """--protocol coverage=pelvis: the axial slabs reach from the anatomy's top (the iliac crests
    of a pelvis-extent anatomy) to well below the lesser trochanters; the truth is the same."""
    hips = mk.generate_subject(tmp_path / "hips", 5, 3, anatomy=toy, orientation="RAS", oblique=0, **TOY)
    pel = mk.generate_subject(tmp_path / "pelvis", 5, 3, anatomy=toy, orientation="RAS", oblique=0,
                              coverage="pelvis", **TOY)

    def z_range(root, row):
        img = nib.load(str(root / row["t1"]))
        z = img.affine[2, 3] + img.affine[2, 2] * np.array([0, img.shape[2] - 1])
        return z.min(), z.max(), json.loads((root / row["truth"]).read_text())

    lo_h, hi_h, t_h = z_range(tmp_path / "hips", hips)
    lo_p, hi_p, t_p = z_range(tmp_path / "pelvis", pel)
    top = acq.landmarks(toy)["grid_box"][2][1]
    lt_bottom = min(s["lt_z"][0] for s in acq.landmarks(toy)["sides"].values())
    assert hi_p > hi_h and hi_p >= top - 25 and lo_p <= lt_bottom - 35
    assert t_p["acquisition"]["coverage"] == "pelvis" and "coverage" not in t_h["acquisition"]
    for side in t_h["hips"]:
        assert t_p["hips"][side]["ifs_3d_mm"] == t_h["hips"][side]["ifs_3d_mm"]
    with pytest.raises(ValueError):
        acq.draw_geometry(np.random.default_rng(0), acq.landmarks(toy), "bilateral", coverage="abdomen")
