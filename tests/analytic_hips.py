"""Hand-built analytic hips for the measurement tests: spheres, boxes and cylinders at known
distances, rendered (nearest sampling at voxel centres) onto grids of any orientation.

World RAS mm: the right hip at +x. Per hip (s = +1 right, -1 left): ischial tuberosity (IT) and
lesser trochanter (LT) are spheres whose surfaces are ``ifs`` mm apart along a slightly oblique
lateral direction; the hamstring tendon (HT) is a vertical cylinder ``qfs`` mm from the LT; the femur is a
vertical cylinder lateral to the LT; QF, gluteus maximus, subcutaneous fat and pelvis are boxes.
"""
from __future__ import annotations

import numpy as np

from pipeline.image import Image
from pipeline.labels import LABELS

R_IT, R_LT, R_HT, R_IP = 11.0, 7.0, 5.0, 5.0
HT_HALF_LENGTH = 30.0


def hip_geometry(side: str, ifs: float, qfs: float) -> dict:
    """Centres and radii of one hip's spheres; truth distances are surface gaps."""
    s = 1.0 if side == "right" else -1.0
    it = np.array([s * 40.0, -25.0, 0.0])
    u = np.array([s * 0.95, 0.25, -0.18])
    u /= np.linalg.norm(u)
    lt = it + u * (R_IT + R_LT + ifs)
    v = np.array([-s * 0.3, -0.9, 0.0])       # from the LT toward the hamstring: posteromedial
    v /= np.linalg.norm(v)
    ht = lt + v * (R_LT + R_HT + qfs)         # a point on the hamstring cylinder's (vertical) axis
    ip = lt + np.array([s * 4.0, 22.0, 8.0])   # iliopsoas tendon: anterior, farther than the LT
    femur_x = lt[0] + s * 14.0
    return {"it": it, "lt": lt, "ht": ht, "ip": ip, "femur_x": femur_x, "femur_y": lt[1] + 6.0,
            "s": s}


def world_grid(shape, affine) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1).T
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(tuple(shape) + (3,))


def render_labels(w: np.ndarray, hips: dict) -> np.ndarray:
    """Label map (project numbering) at world points ``w`` (..., 3) for ``{side: geometry}``."""
    L = LABELS
    out = np.zeros(w.shape[:-1], np.uint8)
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    out[(y < -58) & (y > -66) & (np.abs(z) < 60)] = L["subcutaneous_fat"]
    for side, g in hips.items():
        s = g["s"]
        lat = s * x
        out[(lat > 25) & (lat < 85) & (y > -55) & (y < -40) & (np.abs(z) < 45)] = L["gluteus_maximus"]
        qf = (lat > s * g["it"][0] - 2) & (lat < s * g["femur_x"]) & (y > -38) & (y < -18) \
            & (z > -25) & (z < -6)
        out[qf] = L["quadratus_femoris"]
        out[(lat > 15) & (lat < 35) & (y > -20) & (y < 10) & (z > 20) & (z < 45)] = L["pelvis"]
        fem = ((x - g["femur_x"]) ** 2 + (y - g["femur_y"]) ** 2 < 12.0 ** 2) & (z > -75) & (z < 30)
        out[fem] = L["femur"]
        ht = ((x - g["ht"][0]) ** 2 + (y - g["ht"][1]) ** 2 <= R_HT ** 2) \
            & (np.abs(z - g["ht"][2]) < HT_HALF_LENGTH)
        out[ht] = L["hamstring_tendon"]
        for key, r, name in (("it", R_IT, "ischial_tuberosity"), ("lt", R_LT, "lesser_trochanter"),
                             ("ip", R_IP, "iliopsoas_tendon")):
            out[np.linalg.norm(w - g[key], axis=-1) <= r] = L[name]
    return out


def axial_truth(a_c, a_r, b_c, b_r, affine, shape) -> float:
    """Min over the grid's slice centre planes of the in-plane gap between two spheres."""
    from pipeline.geometry import slice_axis

    ax = slice_axis(affine)
    inpl = [i for i in range(3) if i != ax]
    n = np.cross(affine[:3, inpl[0]], affine[:3, inpl[1]])
    n /= np.linalg.norm(n)
    best = np.inf
    for k in range(shape[ax]):
        p0 = affine[:3, ax] * k + affine[:3, 3]
        h1, h2 = (a_c - p0) @ n, (b_c - p0) @ n
        if abs(h1) >= a_r or abs(h2) >= b_r:
            continue
        d = np.linalg.norm((a_c - h1 * n) - (b_c - h2 * n)) - np.sqrt(a_r ** 2 - h1 ** 2) \
            - np.sqrt(b_r ** 2 - h2 ** 2)
        best = min(best, d)
    return best


def _slice_planes(affine, shape):
    from pipeline.geometry import slice_axis

    ax = slice_axis(affine)
    inpl = [i for i in range(3) if i != ax]
    n = np.cross(affine[:3, inpl[0]], affine[:3, inpl[1]])
    n /= np.linalg.norm(n)
    return [(affine[:3, ax] * k + affine[:3, 3], n) for k in range(shape[ax])]


def axial_truth_cylinder(sph_c, sph_r, axis_pt, cyl_r, affine, shape) -> float:
    """Min over slice planes of the in-plane gap between a sphere and the vertical HT cylinder."""
    th = np.linspace(0, 2 * np.pi, 7200, endpoint=False)
    ring = np.stack([cyl_r * np.cos(th), cyl_r * np.sin(th), np.zeros_like(th)], 1) + axis_pt
    best = np.inf
    for p0, n in _slice_planes(affine, shape):
        h = (sph_c - p0) @ n
        if abs(h) >= sph_r:
            continue
        q, rho = sph_c - h * n, np.sqrt(sph_r ** 2 - h ** 2)
        t = -((ring - p0) @ n) / n[2]          # move each generator line to the plane
        pts = ring + t[:, None] * np.array([0, 0, 1.0])
        pts = pts[np.abs(pts[:, 2] - axis_pt[2]) < HT_HALF_LENGTH]
        if len(pts):
            best = min(best, float(np.min(np.linalg.norm(pts - q, axis=1))) - rho)
    return best


def make_affine(spacing, rotation=np.eye(3), centre=(0.0, 0.0, 0.0), shape=(10, 10, 10),
                perm=(0, 1, 2), flips=(False, False, False)) -> np.ndarray:
    """Affine of a grid with ``spacing`` along world (R, A, S) before permuting/flipping the
    storage axes, rotated by ``rotation`` and centred at ``centre``. ``shape`` is the stored
    shape (after ``perm``)."""
    cols = rotation @ np.diag(spacing)
    m = np.zeros((3, 3))
    for store_ax, world_ax in enumerate(perm):
        m[:, store_ax] = cols[:, world_ax] * (-1 if flips[store_ax] else 1)
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = np.asarray(centre) - m @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def grid_for(spacing, fov=(200.0, 130.0, 110.0), centre=(0.0, -10.0, -10.0), rotation=np.eye(3),
             perm=(0, 1, 2), flips=(False, False, False)):
    """(shape, affine) covering ``fov`` mm (R, A, S) in the given storage convention."""
    n_world = np.ceil(np.asarray(fov) / np.asarray(spacing)).astype(int)
    shape = tuple(int(n_world[p]) for p in perm)
    return shape, make_affine(spacing, rotation, centre, shape, perm, flips)


def labels_image(spacing, sides=("left", "right"), ifs=(12.0, 20.0), qfs=(8.0, 14.0), **grid_kw):
    """Label Image plus per-side geometry (truth) on a grid of the given storage convention."""
    shape, aff = grid_for(spacing, **grid_kw)
    hips = {side: hip_geometry(side, ifs[i], qfs[i]) for i, side in enumerate(("left", "right"))
            if side in sides}
    lab = render_labels(world_grid(shape, aff), hips)
    return Image(lab, aff, "labels"), hips
