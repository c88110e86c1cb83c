"""Anatomy stage: bone atlas, determinism, sides, labels vs truth, IFS distribution."""
import json

import numpy as np
import pytest
from scipy.spatial import cKDTree

from data_scripts.phantoms.anatomy import _quick_gap, build_anatomy, draw_params, goutallier_grade, posed_bones
from data_scripts.phantoms.atlas import fit_sphere, load_atlas, sample_bones
from data_scripts.phantoms.model import TISSUES
from data_scripts.phantoms.truth import axial_distance, region_surface, surface_distance
from pipeline.config import MeasureConfig
from pipeline.labels import LABELS

COARSE = (1.0, 1.0, 2.0)  # test-speed grid; the default is 0.5 x 0.5 x 1.0 mm


@pytest.fixture(scope="module")
def anatomy():
    return build_anatomy(np.random.default_rng(7), fine_spacing=COARSE)


def _closed(faces):
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return bool((counts == 2).all())


def test_atlas_meshes_closed_seated_and_mirrored():
    atlas = load_atlas()
    assert _closed(atlas["pelvis_faces"]) and _closed(atlas["femur_faces"])
    b = sample_bones(np.random.default_rng(3), 1.0)
    head = load_atlas()["femur_head_vertices"]
    for side in ("left", "right"):
        c, r = fit_sphere(b.femur[side].vertices[head])
        assert np.linalg.norm(c - b.hip_centre[side]) < 0.5  # head seated in the acetabulum
        assert 18 < r < 30
    # RAS: the patient's right is +x
    assert b.femur["right"].vertices[:, 0].mean() > 40 > -40 > b.femur["left"].vertices[:, 0].mean()
    assert b.landmarks["LT_right"][0] > b.landmarks["LT_left"][0]
    assert b.landmarks["ASIS_left"][1] > b.landmarks["IT_left"][1]  # ASIS anterior (+y) of the IT
    assert b.landmarks["ASIS_left"][2] > b.landmarks["IT_left"][2]  # and superior (+z)


def test_pose_moves_ifs_in_the_published_directions():
    w = np.zeros(10)

    def ifs(pose):
        from data_scripts.phantoms.anatomy import _regions
        b = sample_bones(np.random.default_rng(0), weights=w, pose={"left": pose}, tilt_deg=0.0)
        reg = _regions(b)["left"]
        return surface_distance(region_surface(b.pelvis, reg["it"], max_edge=1.0),
                                region_surface(b.femur["left"], reg["lt"], max_edge=1.0))[0]

    neutral = ifs({})
    assert 12 < neutral < 30
    assert ifs({"rotation": 15}) < neutral < ifs({"rotation": -15})    # external narrows
    assert ifs({"adduction": 10}) < neutral < ifs({"adduction": -10})  # adduction narrows
    assert ifs({"flexion": -10}) < neutral < ifs({"flexion": 20})      # extension narrows


def test_deterministic_for_a_seed():
    a = build_anatomy(np.random.default_rng(11), fov="left", fine_spacing=COARSE)
    b = build_anatomy(np.random.default_rng(11), fov="left", fine_spacing=COARSE)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.tissue, b.tissue)
    assert np.array_equal(a.fat_fraction, b.fat_fraction) and np.array_equal(a.edema, b.edema)
    assert a.hips == b.hips and np.allclose(a.affine, b.affine)
    assert set(a.hips) == {"left"} and all(k[0] == "left" for k in a.surfaces)
    # single-hip field of view ~ 200 mm around the left hip (patient's left = -x)
    extent = np.array(a.shape) * a.spacing
    assert 180 <= extent[0] <= 220 and 180 <= extent[1] <= 220
    centre_x = a.affine[0, 3] + extent[0] / 2
    assert centre_x < -40


def test_contents_sides_and_truth_consistency(anatomy):
    a = anatomy
    assert a.tissue.shape == a.labels.shape == a.fat_fraction.shape == a.edema.shape
    assert np.allclose(np.diag(a.affine)[:3], COARSE) and np.allclose(a.affine[:3, :3], np.diag(COARSE))
    present = set(np.unique(a.labels).tolist())
    assert set(LABELS.values()) <= present
    assert {TISSUES[t] for t in ("fat", "muscle", "tendon", "cortical_bone", "marrow", "nerve", "vessel",
                                 "skin", "air")} <= set(np.unique(a.tissue).tolist())
    assert a.edema[a.tissue != TISSUES["muscle"]].max() == 0
    for side in ("left", "right"):
        for name in ("ischial_tuberosity", "lesser_trochanter", "hamstring_tendon", "iliopsoas_tendon",
                     "quadratus_femoris"):
            assert (side, name) in a.surfaces
    h = a.hips
    # right hip at larger world x than the left, IT point medial to the LT point on both sides
    assert h["right"]["ifs_3d_points"][1][0] > 0 > h["left"]["ifs_3d_points"][1][0]
    assert abs(h["right"]["ifs_3d_points"][0][0]) < abs(h["right"]["ifs_3d_points"][1][0])
    assert abs(h["left"]["ifs_3d_points"][0][0]) < abs(h["left"]["ifs_3d_points"][1][0])
    for side, hip in h.items():
        p = np.asarray(hip["ifs_3d_points"])
        assert np.linalg.norm(p[0] - p[1]) == pytest.approx(hip["ifs_3d_mm"], abs=1e-6)
        assert 2.0 < hip["ifs_3d_mm"] < 50.0 and 0.0 < hip["qfs_3d_mm"] < 60.0
        # the labelled voxels agree with the continuous truth
        half = (np.arange(a.shape[0]) * a.spacing[0] + a.affine[0, 3] > 0) == (side == "right")
        pts = {}
        for name in ("ischial_tuberosity", "lesser_trochanter"):
            ijk = np.argwhere((a.labels == LABELS[name]) & half[:, None, None])
            pts[name] = ijk @ a.affine[:3, :3].T + a.affine[:3, 3]
        # voxel centres lie inside the truth solids: never closer than the truth, at most a voxel
        # diagonal farther (3D), an in-plane diagonal in each slice (axial)
        it_v, lt_v = pts["ischial_tuberosity"], pts["lesser_trochanter"]
        d_vox = cKDTree(it_v).query(lt_v)[0].min()
        assert hip["ifs_3d_mm"] - 0.05 <= d_vox <= hip["ifs_3d_mm"] + np.linalg.norm(a.spacing)
        zs = np.intersect1d(it_v[:, 2], lt_v[:, 2])
        ax = axial_distance(a.surfaces[(side, "ischial_tuberosity")], [a.surfaces[(side, "lesser_trochanter")]],
                            [0, 0, 1], zs)[0]
        per_slice = min(cKDTree(lt_v[lt_v[:, 2] == z]).query(it_v[it_v[:, 2] == z])[0].min() for z in zs)
        assert ax - 0.05 <= per_slice <= ax + np.linalg.norm(a.spacing[:2])
        # the truth end points sit next to voxels of the right label
        for q, name in zip(p, ("ischial_tuberosity", "lesser_trochanter")):
            assert cKDTree(pts[name]).query(q)[0] < np.linalg.norm(a.spacing)
        # QF findings
        assert hip["qf_edema"] in ("none", "mild", "marked")
        assert hip["qf_goutallier_grade"] == goutallier_grade(hip["qf_fat_fraction"])
        assert 3.0 < hip["qf_volume_ml"] < 60.0
        assert set(hip["pose"]) == {"rotation", "adduction", "flexion"}
    assert a.params["fov"] == "bilateral" and "shape_weights" in a.params
    json.dumps(a.params)
    json.dumps(a.hips)
    # the hamstring tendon protrudes lateral to the IT: QFS is smaller than IFS (Singer 2015 ratios)
    for hip in h.values():
        assert hip["qfs_3d_mm"] < hip["ifs_3d_mm"] + 1.0


def test_quadratus_femoris_is_outlined_by_fat(anatomy):
    """Real QF borders show fat planes; the phantom's QF must not merge into same-intensity muscle."""
    from scipy import ndimage

    a = anatomy
    qf = a.labels == LABELS["quadratus_femoris"]
    ring = ndimage.binary_dilation(qf, np.ones((3, 3, 1), bool)) & ~qf    # in-plane neighbours
    muscle_labels = [LABELS[n] for n in ("gluteus_maximus", "other_muscle")]
    touching_muscle = np.isin(a.labels[ring], muscle_labels).mean()
    touching_fat = (a.tissue[ring] == TISSUES["fat"]).mean()
    assert touching_fat > 0.2 and touching_muscle < 0.45     # without the planes: ~0.01 and ~0.57


def test_unknown_override_is_an_error():
    with pytest.raises(ValueError):
        build_anatomy(np.random.default_rng(0), fine_spacing=COARSE, not_a_parameter=1)


def test_goutallier_grade_uses_project_bounds():
    bounds = MeasureConfig().goutallier_ff_bounds
    assert [goutallier_grade(f) for f in (0.0, bounds[0] + 1e-3, bounds[1] + 1e-3, bounds[2] + 1e-3,
                                          bounds[3] + 1e-3)] == [0, 1, 2, 3, 4]


def test_qf_pathology_override_is_applied():
    a = build_anatomy(np.random.default_rng(5), fov="right", fine_spacing=COARSE,
                      qf_pathology={"right": {"edema": "marked", "fat_fraction": 0.45, "atrophy": 1.0}})
    hip = a.hips["right"]
    assert hip["qf_edema"] == "marked" and hip["qf_edema_fraction"] > 0.5
    assert hip["qf_fat_fraction"] == pytest.approx(0.45, abs=0.03)
    assert hip["qf_goutallier_grade"] == 3
    qf = a.labels == LABELS["quadratus_femoris"]
    assert a.edema[qf].mean() > 0.3 and a.edema[~qf].max() == 0


def test_ifs_distribution_spans_normal_and_narrow():
    vals = []
    for seed in range(25):
        rng = np.random.default_rng(1000 + seed)
        p = draw_params(rng)
        b, reg = posed_bones(p)
        for s in ("left", "right"):
            # nearest bone-vertex gap: within ~1-2 mm of the IFS, plenty for a distribution check
            vals.append(_quick_gap(b, reg, s))
    v = np.asarray(vals)
    assert v.min() > 2.0 and v.max() < 55.0
    assert 0.15 <= (v <= 15).mean() <= 0.6
    assert np.percentile(v, 90) > 22.0


def test_pelvis_extent_reaches_the_iliac_crests_and_keeps_the_hips(anatomy):
    """extent="pelvis" adds slices up to the iliac crests and down the thighs; the anatomy and
    truth of the default extent are unchanged inside it (same subject, same lattice)."""
    pel = build_anatomy(np.random.default_rng(7), fine_spacing=COARSE, extent="pelvis")
    assert np.allclose(pel.affine[:2], anatomy.affine[:2])            # same in-plane grid
    k0 = int(round((anatomy.affine[2, 3] - pel.affine[2, 3]) / COARSE[2]))
    assert k0 * COARSE[2] >= 40 and pel.shape[2] - k0 - anatomy.shape[2] >= 40   # taller both ways
    core = (slice(None), slice(None), slice(k0, k0 + anatomy.shape[2]))
    assert np.array_equal(pel.labels[core], anatomy.labels) and np.array_equal(pel.tissue[core], anatomy.tissue)
    assert pel.hips == anatomy.hips
    # the pelvis reaches the top slices (iliac crests); the femora reach the bottom ones
    pelvis_z = np.flatnonzero((pel.labels == LABELS["pelvis"]).any(axis=(0, 1)))
    assert (pel.shape[2] - 1 - pelvis_z.max()) * COARSE[2] <= 12
    assert (pel.labels[..., 0] == LABELS["femur"]).sum() > 0
    with pytest.raises(ValueError):
        build_anatomy(np.random.default_rng(7), fine_spacing=COARSE, extent="thorax")
