"""A small toy ``Anatomy`` (boxes, spheres, cylinders) for fast tests of the MR simulation and
acquisition stages, independent of the real anatomy model. Left hip at smaller world x (RAS)."""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from data_scripts.phantoms.model import TISSUES, Anatomy, Surface
from pipeline.labels import LABELS

T, L = TISSUES, LABELS


def _surface(mask: np.ndarray, affine: np.ndarray) -> Surface:
    verts, faces, *_ = marching_cubes(np.pad(mask, 1).astype(np.float32), 0.5)
    verts = verts - 1.0
    return Surface(verts @ affine[:3, :3].T + affine[:3, 3], faces.astype(np.int64))


def _closest(a: Surface, b: Surface):
    d, j = cKDTree(b.vertices).query(a.vertices)
    i = int(np.argmin(d))
    return float(d[i]), [a.vertices[i].tolist(), b.vertices[j[i]].tolist()]


def toy_anatomy(rng: np.random.Generator, *, fov: str = "bilateral", spacing: float = 1.0) -> Anatomy:
    """Build a toy pelvis on a ``spacing`` mm axis-aligned grid (world RAS mm)."""
    x0, y0, z0 = -180.0, -125.0, -100.0
    shape = (int(360 / spacing), int(250 / spacing), int(190 / spacing))
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = (x0, y0, z0)
    x = (x0 + spacing * np.arange(shape[0], dtype=np.float32))[:, None, None]
    y = (y0 + spacing * np.arange(shape[1], dtype=np.float32))[None, :, None]
    z = (z0 + spacing * np.arange(shape[2], dtype=np.float32))[None, None, :]
    tissue = np.zeros(shape, np.uint8)
    labels = np.zeros(shape, np.uint8)
    ff = np.zeros(shape, np.float32)
    ed = np.zeros(shape, np.float32)
    full = np.ones(shape, bool)

    def put(mask, t, lab, f):
        mask = mask & full
        tissue[mask], labels[mask], ff[mask] = t, lab, f

    r_body = (x / 165.0) ** 2 + (y / 105.0) ** 2
    put(r_body < 1.0, T["skin"], L["subcutaneous_fat"], 0.1)
    put(r_body < 0.975, T["fat"], L["subcutaneous_fat"], 0.95)
    inner = (x / 140.0) ** 2 + (y / 82.0) ** 2 < 1.0
    put(inner, T["muscle"], L["other_muscle"], 0.02)
    put(inner & (y < -45), T["muscle"], L["gluteus_maximus"], 0.03)
    put(((x / 25.0) ** 2 + ((y - 25) / 30.0) ** 2 + ((z - 30) / 35.0) ** 2) < 1, T["fluid"], 0, 0.0)
    put((x / 14.0) ** 2 + ((y + 55) / 12.0) ** 2 < 1, T["bowel"], 0, 0.1)
    hips = {}
    surfaces = {}
    sides = {"left": -1.0, "right": 1.0}
    if fov in ("left", "right"):
        sides = {fov: sides[fov]}
    for side, sg in sides.items():
        p = rng.uniform(-1, 1, 4)
        lt_x = sg * (95.0 - 4 * p[0])
        it_x = sg * (62.0 + 3 * p[1])
        # femur: shaft + neck + head, marrow inside a cortical shell
        for r, t, f in ((15.0, T["cortical_bone"], 0.0), (11.0, T["marrow"], 0.85)):
            put(((x - sg * 110) ** 2 + (y + 5) ** 2 < r ** 2) & (z < 25), t, L["femur"], f)
            put(((x - sg * 88) ** 2 + (y - 5) ** 2 + (z - 35) ** 2) < (r + 10) ** 2, t, L["femur"], f)
        put(((x - sg * 100) ** 2 + (y) ** 2 + (z - 15) ** 2) < 16 ** 2, T["cortical_bone"], L["femur"], 0.0)
        # lesser trochanter (posteromedial bump on the femur)
        for r, t, f in ((9.0, T["cortical_bone"], 0.0), (6.0, T["marrow"], 0.85)):
            put(((x - lt_x) ** 2 + (y + 14) ** 2 + (z + 20) ** 2) < r ** 2, t, L["lesser_trochanter"], f)
        # pelvis (ischium column) ending in the ischial tuberosity
        put(((x - sg * 55) ** 2 / 14 ** 2 + (y + 30) ** 2 / 16 ** 2 < 1) & (z > 5) & (z < 60),
            T["cortical_bone"], L["pelvis"], 0.0)
        for r, t, f in ((13.0, T["cortical_bone"], 0.0), (9.0, T["marrow"], 0.8)):
            put(((x - it_x + sg * 8) ** 2 + (y + 32) ** 2 + (z + 8) ** 2) < r ** 2, t, L["ischial_tuberosity"], f)
        # quadratus femoris between IT and LT, with edema and fat streaks
        qf_ff, qf_ed = float(rng.uniform(0.02, 0.4)), float(rng.choice([0.0, 0.25]))
        qf = ((x - sg * 0.5 * (abs(lt_x) + abs(it_x))) ** 2 < 10 ** 2) & ((y + 22) ** 2 < 9 ** 2) & \
             ((z + 18) ** 2 < 14 ** 2) & (tissue == T["muscle"])
        put(qf, T["muscle"], L["quadratus_femoris"], qf_ff)
        ed[qf & full] = qf_ed
        # tendons, vessels, nerve
        put(((x - sg * 58) ** 2 + (y + 52) ** 2 < 6 ** 2) & (z < -12), T["tendon"], L["hamstring_tendon"], 0.0)
        put(((x - sg * 86) ** 2 + (y - 12) ** 2 < 5 ** 2) & (z > -25) & (z < 40), T["tendon"], L["iliopsoas_tendon"], 0.0)
        put((x - sg * 75) ** 2 + (y - 45) ** 2 < 5 ** 2, T["vessel"], 0, 0.0)
        put((x - sg * 70) ** 2 + (y + 45) ** 2 < 4 ** 2, T["nerve"], 0, 0.0)
        names = ("ischial_tuberosity", "lesser_trochanter", "hamstring_tendon", "iliopsoas_tendon",
                 "quadratus_femoris")
        side_mask = (x * sg > 0) & full
        for n in names:
            surfaces[(side, n)] = _surface((labels == L[n]) & side_mask, aff)
        ifs, ifs_pts = _closest(surfaces[(side, "ischial_tuberosity")], surfaces[(side, "lesser_trochanter")])
        qfs, qfs_pts = _closest(surfaces[(side, "hamstring_tendon")], surfaces[(side, "lesser_trochanter")])
        nqf = int(((labels == L["quadratus_femoris"]) & side_mask).sum())
        hips[side] = {"ifs_3d_mm": ifs, "ifs_3d_points": ifs_pts, "qfs_3d_mm": qfs, "qfs_3d_points": qfs_pts,
                      "qf_edema": int(qf_ed > 0), "qf_edema_fraction": qf_ed, "qf_fat_fraction": qf_ff,
                      "qf_goutallier_grade": int(min(4, qf_ff * 10)), "qf_volume_ml": nqf * spacing ** 3 / 1000,
                      "pose": {"rotation": 0.0, "adduction": 0.0, "flexion": 0.0}}
    return Anatomy(aff, tissue, labels, ff, ed, surfaces, hips, {"toy": True, "fov": fov})


def toy_axial_truth(anatomy: Anatomy, slice_normal, slice_offsets) -> dict:
    """Per hip the narrowest in-plane IT-LT and hamstring-LT distance over the given slice planes."""
    n = np.asarray(slice_normal, float)
    out = {}
    for side in anatomy.hips:
        res = {}
        for key, a_name in (("ifs", "ischial_tuberosity"), ("qfs", "hamstring_tendon")):
            a = anatomy.surfaces[(side, a_name)].vertices
            b = anatomy.surfaces[(side, "lesser_trochanter")].vertices
            best = (np.inf, None, None)
            for k, off in enumerate(slice_offsets):
                sa, sb = a[np.abs(a @ n - off) < 1.0], b[np.abs(b @ n - off) < 1.0]
                if len(sa) and len(sb):
                    d, j = cKDTree(sb).query(sa)
                    i = int(np.argmin(d))
                    if d[i] < best[0]:
                        best = (float(d[i]), [sa[i].tolist(), sb[j[i]].tolist()], k)
            res[f"{key}_axial_mm"] = None if best[1] is None else best[0]
            res[f"{key}_axial_points"] = best[1]
            res[f"{key}_axial_slice"] = best[2]
        out[side] = res
    return out


def toy_builder(rng: np.random.Generator, *, fov: str = "bilateral") -> Anatomy:
    """``build_anatomy``-compatible coarse toy (2 mm grid) for fast multi-subject tests."""
    return toy_anatomy(rng, fov=fov, spacing=2.0)
