"""Sub-voxel shortest distances between labelled structures, in world millimetres.

Two measurements between structure masks A and B on one label grid (any orientation, any
voxel size, oblique slices included; everything goes through the affine):

* ``axial_distance``: the radiologist's value, the minimum over acquired slices of the in-plane
  shortest distance between the two cross-sections. Each slice's boundary is the zero level of
  a per-slice 2D signed distance map (anisotropic in-plane spacing, lightly smoothed to remove
  the voxel staircase), traced with marching squares; the distance is exact between the traced
  polylines (point-to-segment, both ways).
* ``surface_distance``: the 3D shortest distance between the two surfaces. Thick slices are
  bridged by shape-based interpolation (per-slice signed distance maps interpolated through-plane,
  Catmull-Rom where four slices hold the structure, else linear, onto a spacing close to the
  in-plane one; a structure's end between slices is a rounded cap whose sections shrink as the
  last slices' areas trend, ``_end_cap``), meshed with marching cubes at 0, and measured
  point-to-triangle both ways.

Measured on analytic spheres (tests/test_geometry.py, 0.5-1.0 mm in-plane, 3-6 mm slices,
tilted, any storage order): 3D error <= 0.12 mm and axial error <= 0.23 mm for spheres of
radius 9-12 mm; small structures (radius ~5-7 mm spanning 2-3 slices) reach ~0.5-1 mm in 3D,
because their ends between slices are not determined by the data.

The stack of slices is built along the acquisition's slice axis (``acquisition_slice_axis``: the
clearly thickest axis, so coronal and sagittal acquisitions are interpolated across their own
thick slices); the axial value is measured only when those slices are axial (``axial_slices``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

#: Gaussian smoothing (in in-plane voxels) of the per-slice signed distance map: removes the
#: voxel staircase of a binary label boundary while moving smooth boundaries by << 0.1 mm.
SDF_SMOOTH_VOXELS = 0.7
#: Finest through-plane spacing of the interpolated stack, as a fraction of the in-plane spacing.
MAX_UPSAMPLE = 12
_FAR = 1.0e4  # mm; stand-in for "no structure in this slice"


@dataclass
class Distance:
    """A shortest distance with its end points (world RAS mm) and the label-map slice index."""

    mm: float
    point_a: np.ndarray
    point_b: np.ndarray
    slice_index: int

    def to_dict(self) -> dict:
        return {"mm": float(self.mm), "point_a": [float(v) for v in self.point_a],
                "point_b": [float(v) for v in self.point_b], "slice": int(self.slice_index)}


def slice_axis(affine: np.ndarray) -> int:
    """Array axis whose world direction is closest to superior-inferior."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    return int(np.argmax(np.abs(m[2, :]) / np.linalg.norm(m, axis=0)))


#: An axis whose spacing is at least this many times each other axis's holds the acquired
#: (thick) slices; below that the voxels count as near-isotropic (a 3D acquisition).
THICK_SLICE_RATIO = 1.5


def acquisition_slice_axis(affine: np.ndarray) -> int:
    """Array axis along which the slices were acquired: the one with clearly the largest spacing
    (a 2D acquisition, axial, coronal or sagittal, in any storage order); for near-isotropic
    voxels the one closest to superior-inferior."""
    sp = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    order = np.argsort(sp)[::-1]
    if sp[order[0]] >= THICK_SLICE_RATIO * sp[order[1]]:
        return int(order[0])
    return slice_axis(affine)


def axial_slices(affine: np.ndarray) -> bool:
    """Whether the acquired slices are axial (their axis is the one closest to superior-inferior),
    so that a distance within a slice is the radiologist's axial measurement."""
    return acquisition_slice_axis(affine) == slice_axis(affine)


# --------------------------------------------------------------------------- stacks of slices


@dataclass
class _Stack:
    """Masks cropped and transposed so the slice axis is last, with the matching affine."""

    masks: list            # bool arrays (I, J, K), slices last, padded
    affine: np.ndarray     # voxel (i, j, k) of the padded crop -> world
    k_offset: int          # label-map slice index of k = 0
    axis: int              # slice axis of the original array
    spacing: np.ndarray    # (si, sj, sk) mm

    def to_world(self, ijk: np.ndarray) -> np.ndarray:
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def label_slice(self, k: float) -> int:
        return int(np.rint(k)) + self.k_offset


def _make_stack(masks: list, affine: np.ndarray, margin_ij: int = 4) -> _Stack | None:
    """Crop all masks to their joint bounding box (+margin), put the slice axis last, pad."""
    affine = np.asarray(affine, dtype=float)
    axis = acquisition_slice_axis(affine)
    union = np.zeros(masks[0].shape, bool)
    for m in masks:
        union |= m
    if not union.any():
        return None
    lo, hi = [], []
    for ax in range(3):
        idx = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != ax)))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    perm = [a for a in range(3) if a != axis] + [axis]
    pad = [(margin_ij, margin_ij), (margin_ij, margin_ij), (1, 1)]
    out = [np.pad(np.transpose(m[sl], perm), pad) for m in masks]
    origin = np.array(lo, float)
    origin[perm[0]] -= margin_ij
    origin[perm[1]] -= margin_ij
    origin[axis] -= 1
    aff = np.eye(4)
    aff[:3, :3] = affine[:3, perm]
    aff[:3, 3] = affine[:3, :3] @ origin + affine[:3, 3]
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    return _Stack(out, aff, lo[axis] - 1, axis, spacing)


def slice_sdf(mask: np.ndarray, spacing: np.ndarray, smooth_voxels: float = SDF_SMOOTH_VOXELS
              ) -> np.ndarray:
    """Per-slice 2D signed distance (mm, negative inside) of a slices-last mask.

    The boundary sits half-way between inside and outside voxel centres. A slice without the
    structure next to one with it takes a stand-in map (``_end_cap``) so that shape-based
    interpolation closes the structure with a rounded end between the two slices.
    """
    si, sj = float(spacing[0]), float(spacing[1])
    half = 0.25 * (si + sj)
    # a huge through-plane sampling turns the 3D EDT into independent 2D EDTs per slice
    samp = (si, sj, _FAR)
    d_out = ndimage.distance_transform_edt(~mask, sampling=samp)
    d_in = ndimage.distance_transform_edt(mask, sampling=samp)
    sdf = np.where(mask, -(d_in - half), d_out - half).astype(np.float32)
    present = mask.any(axis=(0, 1))
    if smooth_voxels > 0:
        for k in np.flatnonzero(present):
            sdf[:, :, k] = ndimage.gaussian_filter(sdf[:, :, k], smooth_voxels, mode="nearest")
    K = mask.shape[2]
    t = float(spacing[2])
    area = mask.sum(axis=(0, 1)).astype(float)
    for k in np.flatnonzero(~present):
        nb = []
        for step in (-1, 1):
            n = k + step
            if 0 <= n < K and present[n]:
                nb.append(_end_cap(sdf[:, :, n], area, n, step, t))
        sdf[:, :, k] = np.maximum.reduce(nb) if nb else _FAR
    return sdf


def _end_cap(f: np.ndarray, area: np.ndarray, n: int, step: int, t: float) -> np.ndarray:
    """Stand-in map for the empty slice next to the structure's last slice ``n`` (map ``f``).

    The structure ends between the two slices with sections similar to slice n's outline,
    their area A(h) at height h above slice n following the last three slices' areas
    (quadratic in h: exact for spheres and ellipsoids), or two (linear: a paraboloid), or, when
    the sections do not shrink toward the gap, a paraboloid whose tip is half-way (an end
    anywhere in the gap is equally likely). The tip stays inside the gap (the empty slice's
    centre plane holds nothing). A pixel at depth d inside slice n's outline (D the deepest;
    s = d / D) leaves the structure where A(h) = A(0) (1 - s)^2; linear interpolation from
    ``f`` to the returned map crosses zero there.
    """
    depth = max(-float(f.min()), 1e-6)
    a0 = float(area[n])
    a1 = float(area[n + step]) if 0 <= n + step < len(area) else 0.0
    a2 = float(area[n + 2 * step]) if 0 <= n + 2 * step < len(area) else 0.0
    # A(u) = a0 + b u + c u^2, u in slices toward the gap
    b, c = -0.5 * a0, 0.0          # prior: linear, zero at u = 1 / 2
    if a1 > a0 > 0:
        b = a0 - a1
        if a2 > 0:
            c2 = 0.5 * (a2 - 2 * a1 + a0)
            b2 = a0 - a1 + c2
            if b2 * b2 - 4 * c2 * a0 >= 0 and b2 < 0:
                b, c = b2, c2

    def height(g):  # smallest u > 0 with A(u) = a0 g
        rhs = a0 * (1.0 - g)
        if abs(c) < 1e-12 * max(a0, 1.0):
            return rhs / -b
        disc = np.maximum(b * b - 4.0 * c * rhs, 0.0)
        return (-b - np.sqrt(disc)) / (2.0 * c)

    tip = float(height(0.0))
    scale = float(np.clip(tip, 0.1, 0.9)) / tip if tip > 0 else 0.5
    sd = np.clip(-f / depth, 1e-3, 1.0)
    u = np.maximum(height((1.0 - sd) ** 2) * scale, 1e-6)
    return f + sd * depth / u


# --------------------------------------------------------------------------- exact distances


def _closest_on_segments(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.einsum("ij,ij->i", p - a, ab) / np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-12)
    return a + np.clip(t, 0.0, 1.0)[:, None] * ab


def _closest_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray
                          ) -> np.ndarray:
    """Closest point on each triangle (a, b, c) to each point p (row-wise)."""
    ab, ac, ap = b - a, c - a, p - a
    d00 = np.einsum("ij,ij->i", ab, ab)
    d01 = np.einsum("ij,ij->i", ab, ac)
    d11 = np.einsum("ij,ij->i", ac, ac)
    d20 = np.einsum("ij,ij->i", ap, ab)
    d21 = np.einsum("ij,ij->i", ap, ac)
    den = np.maximum(d00 * d11 - d01 * d01, 1e-18)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    inside = (v >= 0) & (w >= 0) & (v + w <= 1)
    proj = a + v[:, None] * ab + w[:, None] * ac
    cands = [_closest_on_segments(p, a, b), _closest_on_segments(p, b, c),
             _closest_on_segments(p, c, a)]
    dist = np.stack([np.einsum("ij,ij->i", q - p, q - p) for q in cands], 1)
    best = np.take_along_axis(np.stack(cands, 1), dist.argmin(1)[:, None, None], 1)[:, 0]
    return np.where(inside[:, None], proj, best)


def _closest_on_simplices(p, verts, simplices):
    s = verts[simplices]
    if simplices.shape[1] == 2:
        return _closest_on_segments(p, s[:, 0], s[:, 1])
    return _closest_on_triangles(p, s[:, 0], s[:, 1], s[:, 2])


def _one_way(va, vb, sb, tree_b, n_points: int = 32, k_near: int = 6):
    """Min distance from the vertices ``va`` to the simplices ``sb`` of mesh B.

    The closest pair lies on a simplex incident to one of the vertices of B nearest to the
    vertices of A closest to B; the search is limited to the ``n_points`` closest vertices of A
    and the simplices around their ``k_near`` nearest vertices of B (bounded work).
    """
    d_nn, _ = tree_b.query(va)
    n = min(n_points, len(va))
    cand = np.argpartition(d_nn, n - 1)[:n]
    _, near = tree_b.query(va[cand], k=min(k_near, len(vb)))
    ids = np.zeros(len(vb), bool)
    ids[np.asarray(near).ravel()] = True
    simp = sb[ids[sb].any(axis=1)]
    P = np.repeat(va[cand], len(simp), axis=0)
    q = _closest_on_simplices(P, vb, np.tile(simp, (len(cand), 1)))
    d = np.sqrt(((q - P) ** 2).sum(1))
    i = int(d.argmin())
    return float(d[i]), P[i], q[i]


def mesh_distance(va: np.ndarray, sa: np.ndarray, vb: np.ndarray, sb: np.ndarray):
    """Shortest distance between two simplicial meshes (polylines or triangle meshes) in R^3.

    Exact for polylines; for triangle meshes the vertex-to-triangle minimum in both directions
    (edge-edge closest pairs differ by a negligible amount on fine meshes).
    Returns (distance, point on A, point on B).
    """
    d1, p1, q1 = _one_way(va, vb, sb, cKDTree(vb))
    d2, p2, q2 = _one_way(vb, va, sa, cKDTree(va))
    return (d1, p1, q1) if d1 <= d2 else (d2, q2, p2)


# --------------------------------------------------------------------------- measurements


def _contours(sdf2d: np.ndarray):
    """Zero-level polylines of a 2D map as (vertices (N, 2), segments (M, 2))."""
    from skimage import measure

    verts, segs, n = [], [], 0
    for c in measure.find_contours(sdf2d, 0.0):
        if len(c) < 2:
            continue
        verts.append(c)
        idx = np.arange(n, n + len(c))
        segs.append(np.stack([idx[:-1], idx[1:]], 1))
        n += len(c)
    if not verts:
        return None, None
    return np.concatenate(verts), np.concatenate(segs)


def _sdfs(stack: _Stack) -> list:
    return [slice_sdf(m, stack.spacing) for m in stack.masks]


def axial_distance(mask_a: np.ndarray, mask_b: np.ndarray, affine: np.ndarray,
                   _stack: _Stack | None = None, _sdf: list | None = None) -> Distance | None:
    """Minimum over slices of the in-plane shortest distance between A and B (None if no slice
    holds both)."""
    stack = _stack or _make_stack([mask_a, mask_b], affine)
    if stack is None:
        return None
    sa, sb = _sdf or _sdfs(stack)
    both = stack.masks[0].any(axis=(0, 1)) & stack.masks[1].any(axis=(0, 1))
    best = None
    for k in np.flatnonzero(both):
        ca, ea = _contours(sa[:, :, k])
        cb, eb = _contours(sb[:, :, k])
        if ca is None or cb is None:
            continue
        wa = stack.to_world(np.column_stack([ca, np.full(len(ca), k)]))
        wb = stack.to_world(np.column_stack([cb, np.full(len(cb), k)]))
        d, pa, pb = mesh_distance(wa, ea, wb, eb)
        if best is None or d < best.mm:
            best = Distance(d, pa, pb, stack.label_slice(k))
    return best


def _upsample_slices(sdf: np.ndarray, factor: int, clip: float, present: np.ndarray
                     ) -> np.ndarray:
    """Interpolate the per-slice maps through-plane onto ``factor`` x finer slices.

    Catmull-Rom (local cubic) interpolation follows the curvature of a surface between slices
    (linear interpolation flattens convex shapes by ~T^2 / 8R, T the slice spacing, R the
    radius of curvature); values are clipped to +-``clip`` first so that the stand-in for
    "structure far away" cannot ring into the interpolated field. Between the last slice with
    the structure and the end stand-in (``_end_cap``) the interpolation is linear (the stand-in
    is built for that); the stand-in may be an outer control point of the cubic.
    """
    K = sdf.shape[2]
    if factor <= 1 or K < 2:
        return sdf
    s = np.clip(sdf, -clip, clip)
    t = np.arange((K - 1) * factor + 1) / factor
    k1 = np.minimum(np.floor(t).astype(int), K - 2)
    u = (t - k1).astype(np.float32)
    k0, k3 = np.maximum(k1 - 1, 0), np.minimum(k1 + 2, K - 1)
    p0, p1, p2, p3 = s[:, :, k0], s[:, :, k1], s[:, :, k1 + 1], s[:, :, k3]
    lin = p1 * (1 - u) + p2 * u
    u2, u3 = u * u, u * u * u
    cub = 0.5 * ((2 * p1) + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u2
                 + (-p0 + 3 * p1 - 3 * p2 + p3) * u3)
    # outer control points may be an end stand-in (a modelled cap), never "far away"
    modelled = present | (sdf.reshape(-1, K).min(0) < 0.5 * _FAR)
    ok = modelled[k0] & present[k1] & present[k1 + 1] & modelled[k3]
    return np.where(ok, cub, lin)


def _mesh(sdf: np.ndarray, factor: int, stack: _Stack, present: np.ndarray):
    from skimage import measure

    fine = _upsample_slices(sdf, factor, 2.0 * float(stack.spacing[2]), present)
    if fine.min() >= 0 or fine.max() <= 0:
        return None, None
    verts, faces, _, _ = measure.marching_cubes(fine, 0.0, spacing=(1.0, 1.0, 1.0 / factor),
                                                allow_degenerate=False)
    return stack.to_world(verts.astype(np.float64)), faces


def surface_distance(mask_a: np.ndarray, mask_b: np.ndarray, affine: np.ndarray,
                     _stack: _Stack | None = None, _sdf: list | None = None) -> Distance | None:
    """3D shortest distance between the surfaces of A and B (None if either is empty)."""
    stack = _stack or _make_stack([mask_a, mask_b], affine)
    if stack is None or not stack.masks[0].any() or not stack.masks[1].any():
        return None
    sa, sb = _sdf or _sdfs(stack)
    si, sj, sk = stack.spacing
    factor = int(np.clip(np.ceil(sk / min(si, sj) - 1e-6), 1, MAX_UPSAMPLE))
    va, fa = _mesh(sa, factor, stack, stack.masks[0].any(axis=(0, 1)))
    vb, fb = _mesh(sb, factor, stack, stack.masks[1].any(axis=(0, 1)))
    if va is None or vb is None:
        return None
    d, pa, pb = mesh_distance(va, fa, vb, fb)
    mid = 0.5 * (pa + pb)
    k = (np.linalg.inv(stack.affine) @ np.append(mid, 1.0))[2]
    return Distance(d, pa, pb, stack.label_slice(k))


def distances(mask_a: np.ndarray, mask_b: np.ndarray, affine: np.ndarray
              ) -> tuple[Distance | None, Distance | None]:
    """(3D surface distance, axial distance) between two masks, sharing the work. The axial
    distance is None when the acquired slices are not axial (``axial_slices``)."""
    if not mask_a.any() or not mask_b.any():
        return None, None
    stack = _restrict(mask_a, mask_b, affine)
    sdf = _sdfs(stack)
    axial = axial_distance(None, None, affine, stack, sdf) if axial_slices(affine) else None
    return surface_distance(None, None, affine, stack, sdf), axial


def _restrict(mask_a: np.ndarray, mask_b: np.ndarray, affine: np.ndarray) -> _Stack:
    """Stack limited to the parts of A and B that can hold the closest pair (for speed).

    A coarse voxel-centre distance d0 bounds the answer; surface points farther than
    d0 + 2 voxel diagonals from the other structure cannot be closest. The crop keeps those
    parts with a margin, so the sub-voxel boundaries near the closest pair are unchanged.
    """
    affine = np.asarray(affine, float)
    ba = np.argwhere(mask_a & ~ndimage.binary_erosion(mask_a))
    bb = np.argwhere(mask_b & ~ndimage.binary_erosion(mask_b))
    wa = ba @ affine[:3, :3].T + affine[:3, 3]
    wb = bb @ affine[:3, :3].T + affine[:3, 3]
    da, _ = cKDTree(wb).query(wa)
    d0 = float(da.min())
    diag = float(np.linalg.norm(np.linalg.norm(affine[:3, :3], axis=0)))
    reach = d0 + 2 * diag
    db, _ = cKDTree(wa).query(wb, distance_upper_bound=reach)
    keep = np.concatenate([ba[da <= reach], bb[np.isfinite(db)]])
    lo = keep.min(0)
    hi = keep.max(0) + 1
    # in-plane margin: the smoothing and the EDT need context; through-plane: one slice for caps
    ax = acquisition_slice_axis(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    m_ip = int(np.ceil(max(3.0, 2 * diag / spacing.min())))
    margin = np.array([m_ip] * 3)
    margin[ax] = 2
    lo = np.maximum(lo - margin, 0)
    hi = np.minimum(hi + margin, mask_a.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = np.eye(4)
    sub[:3, 3] = lo
    stack = _make_stack([mask_a[sl], mask_b[sl]], affine @ sub)
    stack.k_offset += int(lo[ax])
    return stack
