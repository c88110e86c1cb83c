"""Fast watertight rasterisation of closed triangle meshes onto an axis-aligned grid.

Ray-parity scan conversion along z: every triangle is intersected with the vertical rays through the
voxel-centre columns it covers; each crossing toggles the voxel just above it, and a cumulative sum
along z gives the inside/outside parity. Triangles below the grid count (they toggle the first
voxel), so meshes that extend past the grid stay correct.
"""
from __future__ import annotations

import numpy as np

# Rays are nudged off exact vertex/edge positions by a tiny irrational offset.
_JITTER = np.array([1.234567e-6, 2.718281e-6])


def rasterize(vertices: np.ndarray, faces: np.ndarray, origin, spacing, shape) -> np.ndarray:
    """Inside mask of a closed mesh on the grid x_i = origin + i * spacing (RAS world, axis-aligned).

    Args:
        vertices: (V, 3) world mm; faces: (F, 3) int.
        origin: world position of voxel (0, 0, 0); spacing: (3,) mm; shape: (nx, ny, nz).
    Returns: bool array of ``shape``.
    """
    origin = np.asarray(origin, float)
    spacing = np.asarray(spacing, float)
    full = tuple(int(s) for s in shape)
    out = np.zeros(full, dtype=bool)
    g = (np.asarray(vertices, float) - origin) / spacing  # grid index coordinates
    # work in the crop of the grid covered by the mesh's x/y extent
    c0 = np.clip(np.floor(g[:, :2].min(0)).astype(int), 0, np.array(full[:2]))
    c1 = np.clip(np.ceil(g[:, :2].max(0)).astype(int) + 1, 0, np.array(full[:2]))
    zmax = int(np.clip(np.ceil(g[:, 2].max()) + 1, 0, full[2]))
    if (c1 <= c0).any() or zmax == 0:
        return out
    g[:, :2] -= c0
    nx, ny, nz = int(c1[0] - c0[0]), int(c1[1] - c0[1]), zmax
    g[:, :2] += _JITTER
    tri = g[np.asarray(faces)]
    # keep triangles that overlap the grid columns and start below the grid top
    lo, hi = tri.min(1), tri.max(1)
    keep = (hi[:, 0] >= 0) & (lo[:, 0] <= nx - 1) & (hi[:, 1] >= 0) & (lo[:, 1] <= ny - 1) & (lo[:, 2] <= nz - 1)
    tri, lo, hi = tri[keep], lo[keep], hi[keep]
    i0 = np.clip(np.ceil(lo[:, 0]), 0, nx - 1).astype(np.int64)
    i1 = np.clip(np.floor(hi[:, 0]), 0, nx - 1).astype(np.int64)
    j0 = np.clip(np.ceil(lo[:, 1]), 0, ny - 1).astype(np.int64)
    j1 = np.clip(np.floor(hi[:, 1]), 0, ny - 1).astype(np.int64)
    ni = np.maximum(i1 - i0 + 1, 0)
    nj = np.maximum(j1 - j0 + 1, 0)
    valid = (np.floor(hi[:, 0]) >= np.ceil(lo[:, 0])) & (np.floor(hi[:, 1]) >= np.ceil(lo[:, 1]))
    counts = np.where(valid, ni * nj, 0)
    total = int(counts.sum())
    toggles = np.zeros(nx * ny * nz, dtype=np.uint8)
    if total:
        t = np.repeat(np.arange(len(tri)), counts)
        start = np.repeat(np.cumsum(counts) - counts, counts)
        off = np.arange(total) - start
        njr = nj[t]
        ii = i0[t] + off // njr
        jj = j0[t] + off % njr
        a, b, c = tri[t, 0], tri[t, 1], tri[t, 2]
        # 2D barycentric coordinates of the ray (ii, jj) in the projected triangle
        v0x, v0y = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
        v1x, v1y = c[:, 0] - a[:, 0], c[:, 1] - a[:, 1]
        px, py = ii - a[:, 0], jj - a[:, 1]
        den = v0x * v1y - v1x * v0y
        ok = np.abs(den) > 1e-12
        den = np.where(ok, den, 1.0)
        u = (px * v1y - v1x * py) / den
        v = (v0x * py - px * v0y) / den
        ins = ok & (u >= 0) & (v >= 0) & (u + v <= 1)
        zc = a[:, 2] + u * (b[:, 2] - a[:, 2]) + v * (c[:, 2] - a[:, 2])
        k = np.ceil(zc).astype(np.int64)
        k = np.maximum(k, 0)
        ins &= k < nz
        flat = (ii[ins] * ny + jj[ins]) * nz + k[ins]
        np.add.at(toggles, flat, 1)
    # uint8 wrap-around keeps the parity
    inside = np.cumsum(toggles.reshape(nx, ny, nz), axis=2, dtype=np.uint8) & 1
    out[c0[0]:c1[0], c0[1]:c1[1], :nz] = inside.view(bool)
    return out


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (outward for an outward-oriented mesh)."""
    v = vertices[faces]
    fn = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    n = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
