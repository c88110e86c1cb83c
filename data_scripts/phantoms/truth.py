"""Exact geometric ground truth on continuous triangle surfaces (world RAS mm).

* ``surface_distance``: shortest 3D distance between two triangle meshes (exact triangle-triangle:
  vertex-to-triangle both ways plus edge-to-edge), with a KD-tree prefilter.
* ``axial_truth``: the radiologist's measurement on acquired slices: for each slice centre plane,
  intersect the two meshes with the plane and take the in-plane shortest distance between the two
  cross-section contours (segment-to-segment), minimised over slices.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .model import Surface

_EPS = 1e-12


def closest_point_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest points on triangles (a, b, c) to points p; all arrays (N, 3). Ericson's method."""
    ab, ac, ap = b - a, c - a, p - a
    d1 = np.einsum("ij,ij->i", ab, ap)
    d2 = np.einsum("ij,ij->i", ac, ap)
    bp = p - b
    d3 = np.einsum("ij,ij->i", ab, bp)
    d4 = np.einsum("ij,ij->i", ac, bp)
    cp = p - c
    d5 = np.einsum("ij,ij->i", ab, cp)
    d6 = np.einsum("ij,ij->i", ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    denom = va + vb + vc
    denom = np.where(np.abs(denom) < _EPS, _EPS, denom)
    v = vb / denom
    w = vc / denom
    out = a + ab * v[:, None] + ac * w[:, None]  # interior case
    # edge BC
    m = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)
    t = (d4 - d3) / np.where(np.abs((d4 - d3) + (d5 - d6)) < _EPS, _EPS, (d4 - d3) + (d5 - d6))
    out[m] = (b + (c - b) * t[:, None])[m]
    # edge AC
    m = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    t = d2 / np.where(np.abs(d2 - d6) < _EPS, _EPS, d2 - d6)
    out[m] = (a + ac * t[:, None])[m]
    # edge AB
    m = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    t = d1 / np.where(np.abs(d1 - d3) < _EPS, _EPS, d1 - d3)
    out[m] = (a + ab * t[:, None])[m]
    # vertices
    m = (d6 >= 0) & (d5 <= d6)
    out[m] = c[m]
    m = (d3 >= 0) & (d4 <= d3)
    out[m] = b[m]
    m = (d1 <= 0) & (d2 <= 0)
    out[m] = a[m]
    return out


def closest_points_segments(p1, q1, p2, q2):
    """Closest points between segment pairs [p1,q1] and [p2,q2] (arrays (N, d)). Returns (c1, c2)."""
    d1, d2, r = q1 - p1, q2 - p2, p1 - p2
    a = np.einsum("ij,ij->i", d1, d1)
    e = np.einsum("ij,ij->i", d2, d2)
    f = np.einsum("ij,ij->i", d2, r)
    c = np.einsum("ij,ij->i", d1, r)
    b = np.einsum("ij,ij->i", d1, d2)
    denom = a * e - b * b
    s = np.where(denom > _EPS * np.maximum(a * e, 1.0), (b * f - c * e) / np.where(denom > 0, denom, 1.0), 0.0)
    s = np.clip(s, 0.0, 1.0)
    e_safe = np.where(e > _EPS, e, 1.0)
    a_safe = np.where(a > _EPS, a, 1.0)
    t = np.where(e > _EPS, (b * s + f) / e_safe, 0.0)
    lo, hi = t < 0, t > 1
    t = np.clip(t, 0.0, 1.0)
    s = np.where(lo, np.clip(-c / a_safe, 0, 1), s)
    s = np.where(hi, np.clip((b - c) / a_safe, 0, 1), s)
    s = np.where(a > _EPS, s, 0.0)
    return p1 + d1 * s[:, None], p2 + d2 * t[:, None]


def _tri_pairs(ta: np.ndarray, tb: np.ndarray, upper: float) -> tuple[np.ndarray, np.ndarray]:
    """Triangle pairs whose bounding spheres come within ``upper`` of each other."""
    ca, cb = ta.mean(1), tb.mean(1)
    ra = np.linalg.norm(ta - ca[:, None], axis=2).max(1)
    rb = np.linalg.norm(tb - cb[:, None], axis=2).max(1)
    # query from the smaller set with per-triangle radii (large cap triangles stay local)
    swap = len(cb) > len(ca)
    small_c, small_r, big_c, big_r = (ca, ra, cb, rb) if swap else (cb, rb, ca, ra)
    hits = cKDTree(big_c).query_ball_point(small_c, upper + small_r + big_r.max() + 1e-6)
    lens = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
    s_idx = np.repeat(np.arange(len(small_c)), lens)
    b_idx = np.fromiter((k for h in hits for k in h), dtype=np.int64, count=int(lens.sum()))
    i, j = (s_idx, b_idx) if swap else (b_idx, s_idx)
    d = np.linalg.norm(ca[i] - cb[j], axis=1)
    keep = d <= upper + ra[i] + rb[j] + 1e-6
    return i[keep].astype(np.int64), j[keep].astype(np.int64)


def surface_distance(a: Surface, b: Surface, chunk: int = 100_000):
    """Shortest distance between two triangle meshes and its end points.

    Exact for disjoint meshes (the minimum over vertex-triangle pairs both ways and edge-edge
    pairs of every candidate triangle pair); 0 when they touch. A vertex KD-tree gives an upper
    bound (nearest vertex pair) and a triangle-centroid KD-tree the candidate pairs within it.
    Returns ``(dist_mm, point_on_a, point_on_b)``.
    """
    va, vb = np.asarray(a.vertices, float), np.asarray(b.vertices, float)
    d0, j0 = cKDTree(vb).query(va)
    i0 = int(np.argmin(d0))
    best = (float(d0[i0]), va[i0], vb[int(j0[i0])])
    ta, tb = va[np.asarray(a.faces)], vb[np.asarray(b.faces)]
    ii, jj = _tri_pairs(ta, tb, best[0])
    for s in range(0, len(ii), chunk):
        A, B = ta[ii[s:s + chunk]], tb[jj[s:s + chunk]]
        n = len(A)
        # vertices of A against triangle B, and vertices of B against triangle A
        pa = A.reshape(-1, 3)
        qa = closest_point_on_triangles(pa, *(np.repeat(B[:, k], 3, axis=0) for k in range(3)))
        pb = B.reshape(-1, 3)
        qb = closest_point_on_triangles(pb, *(np.repeat(A[:, k], 3, axis=0) for k in range(3)))
        # edges: 3 x 3 combinations per pair
        ea = np.stack([A[:, [0, 1]], A[:, [1, 2]], A[:, [2, 0]]], axis=1)  # (n, 3, 2, 3)
        eb = np.stack([B[:, [0, 1]], B[:, [1, 2]], B[:, [2, 0]]], axis=1)
        ea = np.repeat(ea, 3, axis=1).reshape(-1, 2, 3)
        eb = np.tile(eb, (1, 3, 1, 1)).reshape(-1, 2, 3)
        c1, c2 = closest_points_segments(ea[:, 0], ea[:, 1], eb[:, 0], eb[:, 1])
        cand_a = np.concatenate([pa, qb, c1])
        cand_b = np.concatenate([qa, pb, c2])
        dd = np.linalg.norm(cand_a - cand_b, axis=1)
        k = int(np.argmin(dd))
        if dd[k] < best[0]:
            best = (float(dd[k]), cand_a[k], cand_b[k])
        del n
    return best[0], np.asarray(best[1], float), np.asarray(best[2], float)


def plane_section(surf: Surface, normal: np.ndarray, offset: float) -> np.ndarray:
    """Segments (S, 2, 3) where the mesh crosses the plane n.x = offset."""
    v = np.asarray(surf.vertices, float)
    sd = v @ normal - offset
    sd = np.where(sd == 0.0, 1e-9, sd)  # no vertex exactly on the plane
    fs = sd[surf.faces]
    pos = fs > 0
    cross = pos.any(1) & ~pos.all(1)
    if not cross.any():
        return np.zeros((0, 2, 3))
    f = surf.faces[cross]
    fs = fs[cross]
    pos = pos[cross]
    # the odd vertex (alone on its side) and the other two
    odd_is_pos = pos.sum(1) == 1
    odd = np.where(odd_is_pos, np.argmax(pos, 1), np.argmin(pos, 1))
    rows = np.arange(len(f))
    o = f[rows, odd]
    a = f[rows, (odd + 1) % 3]
    b = f[rows, (odd + 2) % 3]
    so, sa, sb = fs[rows, odd], fs[rows, (odd + 1) % 3], fs[rows, (odd + 2) % 3]
    pa = v[o] + (v[a] - v[o]) * (so / (so - sa))[:, None]
    pb = v[o] + (v[b] - v[o]) * (so / (so - sb))[:, None]
    return np.stack([pa, pb], axis=1)


def segments_distance(sa: np.ndarray, sb: np.ndarray, chunk: int = 400_000):
    """Shortest distance between two segment sets (S, 2, 3) and its end points."""
    if len(sa) == 0 or len(sb) == 0:
        return np.inf, None, None
    ma, mb = sa.mean(1), sb.mean(1)
    la = np.linalg.norm(sa[:, 1] - sa[:, 0], axis=1).max()
    lb = np.linalg.norm(sb[:, 1] - sb[:, 0], axis=1).max()
    d0, _ = cKDTree(mb).query(ma)
    radius = d0.min() + la + lb + 1e-6
    ia = np.nonzero(np.isfinite(cKDTree(mb).query(ma, distance_upper_bound=radius)[0]))[0]
    ib = np.nonzero(np.isfinite(cKDTree(ma).query(mb, distance_upper_bound=radius)[0]))[0]
    ii, jj = np.meshgrid(ia, ib, indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    best = (np.inf, None, None)
    for s in range(0, len(ii), chunk):
        i, j = ii[s:s + chunk], jj[s:s + chunk]
        c1, c2 = closest_points_segments(sa[i, 0], sa[i, 1], sb[j, 0], sb[j, 1])
        dd = np.linalg.norm(c1 - c2, axis=1)
        k = int(np.argmin(dd))
        if dd[k] < best[0]:
            best = (float(dd[k]), c1[k], c2[k])
    return best


def axial_distance(a: Surface, b_list: list[Surface], normal, offsets):
    """Min over planes of the in-plane contour distance between a and the union of b_list.

    Returns ``(dist_mm, [point_a, point_b], slice_index)``; ``(inf, None, None)`` if no plane cuts
    both.
    """
    normal = np.asarray(normal, float)
    normal = normal / np.linalg.norm(normal)
    best = (np.inf, None, None)
    for k, off in enumerate(np.asarray(offsets, float)):
        sa = plane_section(a, normal, off)
        if len(sa) == 0:
            continue
        sb = [plane_section(b, normal, off) for b in b_list]
        sb = np.concatenate(sb) if sb else np.zeros((0, 2, 3))
        d, pa, pb = segments_distance(sa, sb)
        if d < best[0]:
            best = (d, [pa.tolist(), pb.tolist()], k)
    return best


def axial_truth(anatomy, slice_normal, slice_offsets) -> dict:
    """Per-hip IFS and QFS as measured on acquisition slices (in-plane contour distances).

    Args:
        anatomy: ``Anatomy`` with surfaces (side, name) for ischial_tuberosity,
            lesser_trochanter, hamstring_tendon, iliopsoas_tendon.
        slice_normal: unit normal (world RAS) of the acquisition slices.
        slice_offsets: n.x of each slice centre (mm).
    Returns: ``{side: {"ifs_axial_mm", "ifs_axial_points", "ifs_axial_slice", "qfs_axial_mm",
    "qfs_axial_points", "qfs_axial_slice"}}``; distances are None where no slice cuts both
    structures. Points: [[x,y,z] on IT / hamstring, [x,y,z] on LT / iliopsoas], world RAS mm.
    """
    out = {}
    sides = sorted({s for s, _ in anatomy.surfaces})
    for side in sides:
        srf = {name: anatomy.surfaces.get((side, name)) for name in
               ("ischial_tuberosity", "lesser_trochanter", "hamstring_tendon", "iliopsoas_tendon")}
        res = {}
        for key, a, bs in (("ifs", srf["ischial_tuberosity"], [srf["lesser_trochanter"]]),
                           ("qfs", srf["hamstring_tendon"], [srf["lesser_trochanter"], srf["iliopsoas_tendon"]])):
            bs = [b for b in bs if b is not None]
            if a is None or not bs:
                d, pts, k = np.inf, None, None
            else:
                d, pts, k = axial_distance(a, bs, slice_normal, slice_offsets)
            res[f"{key}_axial_mm"] = None if not np.isfinite(d) else float(d)
            res[f"{key}_axial_points"] = pts
            res[f"{key}_axial_slice"] = None if k is None else int(k)
        out[side] = res
    return out


# --------------------------------------------------------------------------- region surfaces

_RAY_JITTER = np.array([1.234567e-7, 2.718281e-7])


def points_inside_mesh(vertices: np.ndarray, faces: np.ndarray, pts: np.ndarray, up: bool = False,
                       cell: float = 2.0, chunk: int = 50_000) -> np.ndarray:
    """Inside test of points against a closed mesh by the parity of vertical ray crossings.

    The same rule as ``raster.rasterize`` (a voxel is inside iff its centre is), for arbitrary
    points. Rays go down (-z; ``up=True``: +z), which crosses few layers below the hip bones.
    Triangles are binned by their xy bounding boxes on ``cell`` mm cells.
    """
    pts = np.asarray(pts, float)
    out = np.zeros(len(pts), bool)
    if len(pts) == 0:
        return out
    sign = 1.0 if up else -1.0
    q = pts.copy()
    q[:, :2] += _RAY_JITTER
    q[:, 2] *= sign
    tri = np.asarray(vertices, float)[np.asarray(faces)]
    tri[:, :, 2] *= sign
    lo2, hi2 = tri[:, :, :2].min(1), tri[:, :, :2].max(1)
    plo, phi = q[:, :2].min(0), q[:, :2].max(0)
    keep = (hi2 >= plo).all(1) & (lo2 <= phi).all(1) & (tri[:, :, 2].max(1) >= q[:, 2].min())
    tri, lo2, hi2 = tri[keep], lo2[keep], hi2[keep]
    if len(tri) == 0:
        return out
    ncell = np.floor((phi - plo) / cell).astype(np.int64) + 1
    c0 = np.clip(np.floor((lo2 - plo) / cell).astype(np.int64), 0, ncell - 1)
    c1 = np.clip(np.floor((hi2 - plo) / cell).astype(np.int64), 0, ncell - 1)
    span = c1 - c0 + 1
    counts = span[:, 0] * span[:, 1]
    t = np.repeat(np.arange(len(tri)), counts)
    off = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    cx = c0[t, 0] + off // span[t, 1]
    cy = c0[t, 1] + off % span[t, 1]
    key = cx * ncell[1] + cy
    order = np.argsort(key, kind="stable")
    key, t = key[order], t[order]
    for s in range(0, len(q), chunk):
        qq = q[s:s + chunk]
        qc = np.clip(np.floor((qq[:, :2] - plo) / cell).astype(np.int64), 0, ncell - 1)
        qk = qc[:, 0] * ncell[1] + qc[:, 1]
        st = np.searchsorted(key, qk, "left")
        n = np.searchsorted(key, qk, "right") - st
        qi = np.repeat(np.arange(len(qq)), n)
        ti = t[np.repeat(st, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)]
        a, b, c = tri[ti, 0], tri[ti, 1], tri[ti, 2]
        p = qq[qi]
        v0x, v0y = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
        v1x, v1y = c[:, 0] - a[:, 0], c[:, 1] - a[:, 1]
        px, py = p[:, 0] - a[:, 0], p[:, 1] - a[:, 1]
        den = v0x * v1y - v1x * v0y
        ok = np.abs(den) > 1e-15
        den = np.where(ok, den, 1.0)
        u = (px * v1y - v1x * py) / den
        v = (v0x * py - px * v0y) / den
        zc = a[:, 2] + u * (b[:, 2] - a[:, 2]) + v * (c[:, 2] - a[:, 2])
        hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (zc > p[:, 2])
        out[s:s + chunk] = (np.bincount(qi[hit], minlength=len(qq)) & 1).astype(bool)
    return out


def _split4(tri: np.ndarray) -> np.ndarray:
    """1-to-4 midpoint subdivision of a triangle soup (N, 3, 3) -> (4N, 3, 3)."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    ab, bc, ca = (a + b) / 2, (b + c) / 2, (c + a) / 2
    return np.concatenate([np.stack(x, 1) for x in ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])


def _max_edge(tri: np.ndarray) -> np.ndarray:
    return np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(1)


class _Bone:
    """Inside test of a closed bone mesh, and a lower bound of the distance to its surface that is
    valid for points on the region's boundary surfaces (sphere, planes).

    The bound is the exact distance to the k triangles (split to <= ``sample_edge``) with the
    nearest centroids among the bone surface within ``band`` mm of those boundary surfaces, capped
    by the k-th centroid distance minus the triangle reach and by ``band`` (a surface point
    farther from the boundary surfaces is farther than ``band`` from any point on them).
    """

    def __init__(self, surf: Surface, region, band: float = 2.0, sample_edge: float = 1.0):
        self.v, self.f = np.asarray(surf.vertices, float), np.asarray(surf.faces)
        c, r = np.asarray(region.centre, float), float(region.radius)
        tri = self.v[self.f]
        # downward rays from points in the region's bounding box only meet these triangles
        lo, hi = c - r - 1.0, c + r + 1.0
        col = ((tri[:, :, :2].max(1) >= lo[:2]).all(1) & (tri[:, :, :2].min(1) <= hi[:2]).all(1)
               & (tri[:, :, 2].min(1) <= hi[2]))
        self.f = self.f[col]
        tri = tri[col]
        e = _max_edge(tri)
        gap = np.abs(np.linalg.norm(tri - c, axis=2) - r)
        for axis, limit in ((2, region.z_max), (1, region.y_max)):
            if np.isfinite(limit):
                gap = np.minimum(gap, np.abs(tri[:, :, axis] - limit))
        tri = tri[(gap.min(1) <= band + e) & (np.linalg.norm(tri - c, axis=2).min(1) <= r + band + e)]
        while len(tri) and _max_edge(tri).max() > sample_edge:
            big = _max_edge(tri) > sample_edge
            tri = np.concatenate([tri[~big], _split4(tri[big])])
        self.tri, self.band = tri, band
        # any point of a triangle is within 0.6 x its longest edge of its centroid
        self.reach = 0.6 * sample_edge
        self.tree = cKDTree(tri.mean(1)) if len(tri) else None

    def __call__(self, pts, k: int = 16):
        inside = points_inside_mesh(self.v, self.f, pts)
        if self.tree is None:
            return inside, np.full(len(pts), self.band)
        k = min(k, len(self.tri))
        dc, idx = self.tree.query(pts, k=k)
        dc, idx = dc.reshape(len(pts), k), idx.reshape(len(pts), k)
        t = self.tri[idx.ravel()]
        q = closest_point_on_triangles(np.repeat(pts, k, axis=0), t[:, 0], t[:, 1], t[:, 2])
        exact = np.linalg.norm(q - np.repeat(pts, k, axis=0), axis=1).reshape(len(pts), k).min(1)
        # triangles beyond the k nearest centroids are at least dc[:, -1] - reach away
        return inside, np.clip(np.minimum(exact, dc[:, -1] - self.reach), 0.0, self.band)


def _halfspace(axis: int, limit: float):
    def f(pts):
        s = pts[:, axis] - limit
        return s <= 0, np.abs(s)
    f.convex = True
    return f


def _ball(centre, radius):
    def f(pts):
        s = np.linalg.norm(pts - centre, axis=1) - radius
        return s <= 0, np.abs(s)
    f.convex = True
    return f


def _clip_soup(tri: np.ndarray, constraints, max_edge: float, project=None) -> np.ndarray:
    """Part of a triangle soup inside every constraint, refined to ``max_edge`` along the cuts.

    A constraint maps points to (inside, lower bound of the distance to its boundary). A triangle
    is decided by a vertex whose bound exceeds the farthest a triangle point can be from it
    (0.6 x the longest edge), or for convex constraints by all three vertices inside; undecided
    triangles are split 1-to-4 (``project`` maps new vertices back onto a curved surface) until
    their edges are <= max_edge, and then kept iff their centroid is inside.
    """
    done = []
    while len(tri):
        e = _max_edge(tri)
        pts, inv = np.unique(tri.reshape(-1, 3), axis=0, return_inverse=True)
        inv = inv.reshape(-1, 3)
        keep_all = np.ones(len(tri), bool)
        drop = np.zeros(len(tri), bool)
        for con in constraints:
            ins, bound = con(pts)
            ins, bound = ins[inv], bound[inv]
            sure = bound > 0.6 * e[:, None]
            inside = (sure & ins).any(1)
            if getattr(con, "convex", False):
                inside |= ins.all(1)
            keep_all &= inside
            drop |= (sure & ~ins).any(1)
        keep_all &= ~drop
        done.append(tri[keep_all])
        rest = ~keep_all & ~drop
        small = rest & (e <= max_edge)
        if small.any():
            c = tri[small].mean(1)
            ok = np.ones(len(c), bool)
            for con in constraints:
                ok &= con(c)[0]
            done.append(tri[small][ok])
        tri = tri[rest & ~small]
        if len(tri):
            tri = _split4(tri)
            if project is not None:
                tri = project(tri)
    return np.concatenate(done) if done else np.zeros((0, 3, 3))


def _icosphere(level: int) -> np.ndarray:
    """Unit icosphere triangle soup."""
    t = (1 + 5 ** 0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t],
                  [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], float)
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                  [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                  [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    tri = v[f] / np.linalg.norm(v[f], axis=2, keepdims=True)
    for _ in range(level):
        tri = _split4(tri)
        tri /= np.linalg.norm(tri, axis=2, keepdims=True)
    return tri


def region_surface(bone: Surface, region, max_edge: float = 0.2) -> Surface:
    """Boundary of (bone solid ∩ region) as a triangle soup, refined to ``max_edge`` mm at the cuts.

    ``region``: a ball (``centre``, ``radius``) cut by ``z <= z_max`` and ``y <= y_max`` (the
    anatomy ``Region``). The boundary is the bone surface inside the region plus the region's
    boundary inside the bone (sphere and plane caps), i.e. exactly the set the voxel labels fill
    (voxel centre inside the bone and inside the region) at zero voxel size.
    """
    c = np.asarray(region.centre, float)
    r = float(region.radius)
    zmax, ymax = float(region.z_max), float(region.y_max)
    ball, zc, yc = _ball(c, r), _halfspace(2, zmax), _halfspace(1, ymax)

    def whole(pts):
        ins_b, b_b = ball(pts)
        ins_z, b_z = zc(pts)
        ins_y, b_y = yc(pts)
        ins = ins_b & ins_z & ins_y
        # distance to the boundary of a convex intersection: min over faces inside, and a lower
        # bound (the largest violation) outside
        b = np.where(ins, np.minimum(np.minimum(b_b, b_z), b_y),
                     np.maximum.reduce([np.where(ins_b, 0, b_b), np.where(ins_z, 0, b_z), np.where(ins_y, 0, b_y)]))
        return ins, b
    whole.convex = True

    v, f = np.asarray(bone.vertices, float), np.asarray(bone.faces)
    tri = v[f]
    tri = tri[np.linalg.norm(tri - c, axis=2).min(1) <= r + _max_edge(tri)]
    parts = [_clip_soup(tri, [whole], max_edge)]
    solid = _Bone(bone, region)

    def on_sphere(t):
        d = t - c
        return c + d * (r / np.linalg.norm(d, axis=2, keepdims=True))

    parts.append(_clip_soup(c + r * _icosphere(2), [zc, yc, solid], max_edge, project=on_sphere))
    for axis, limit, other in ((2, zmax, yc), (1, ymax, zc)):
        h = limit - c[axis]
        if not np.isfinite(limit) or abs(h) >= r:
            continue
        rr = np.sqrt(r * r - h * h)
        u, w = [k for k in range(3) if k != axis]
        sq = np.zeros((4, 3))
        sq[:, axis] = limit
        sq[:, u] = c[u] + rr * np.array([-1, 1, 1, -1])
        sq[:, w] = c[w] + rr * np.array([-1, -1, 1, 1])
        parts.append(_clip_soup(sq[[[0, 1, 2], [0, 2, 3]]], [ball, other, solid], max_edge))
    soup = np.concatenate(parts)
    verts, inv = np.unique(soup.reshape(-1, 3), axis=0, return_inverse=True)
    return Surface(verts, inv.reshape(-1, 3).astype(np.int64))
