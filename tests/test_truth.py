"""Exact-geometry truth: analytic shapes at known distances."""
from types import SimpleNamespace

import numpy as np
import pytest

from data_scripts.phantoms.model import Surface
from scipy.spatial import cKDTree

from data_scripts.phantoms.anatomy import draw_params, posed_bones
from data_scripts.phantoms.raster import rasterize
from data_scripts.phantoms.truth import (axial_distance, axial_truth, closest_points_segments,
                                         plane_section, points_inside_mesh, region_surface,
                                         surface_distance)


def box(lo, hi, rot=None) -> Surface:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    v = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float) * (hi - lo) + lo
    if rot is not None:
        c = (lo + hi) / 2
        v = (v - c) @ rot.T + c
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return Surface(v, f)


def icosphere(centre, radius, subdiv=4) -> Surface:
    t = (1 + 5 ** 0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t],
                  [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], float)
    f = [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
         [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
         [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]]
    v = list(v / np.linalg.norm(v, axis=1, keepdims=True))
    for _ in range(subdiv):
        cache, nf = {}, []
        for a, b, c in f:
            m = []
            for i, j in ((a, b), (b, c), (c, a)):
                key = (min(i, j), max(i, j))
                if key not in cache:
                    p = v[i] + v[j]
                    v.append(p / np.linalg.norm(p))
                    cache[key] = len(v) - 1
                m.append(cache[key])
            nf += [[a, m[0], m[2]], [b, m[1], m[0]], [c, m[2], m[1]], m]
        f = nf
    return Surface(np.asarray(v) * radius + np.asarray(centre, float), np.asarray(f))


def rot_z(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def test_box_face_face_distance_and_points():
    d, pa, pb = surface_distance(box([0, 0, 0], [10, 10, 10]), box([17, 3, 2], [30, 20, 8]))
    assert d == pytest.approx(7.0, abs=1e-9)
    assert pa[0] == pytest.approx(10.0) and pb[0] == pytest.approx(17.0)
    assert np.linalg.norm(pa - pb) == pytest.approx(d)


def test_box_vertex_vertex_and_edge_edge():
    d, pa, pb = surface_distance(box([0, 0, 0], [10, 10, 10]), box([13, 13, 13], [20, 20, 20]))
    assert d == pytest.approx(np.sqrt(27), abs=1e-9)
    np.testing.assert_allclose(pa, [10, 10, 10], atol=1e-9)
    # a box rotated 45 deg about z presents a vertical edge to the other box's face (x = 10)
    b = box([20, 0, 0], [30, 10, 10], rot=rot_z(45))
    d, pa, pb = surface_distance(box([0, 0, 0], [10, 10, 10]), b)
    expected = 25 - 5 * np.sqrt(2) - 10
    assert d == pytest.approx(expected, abs=1e-9)
    # skew segments: x axis and a line along y at z = 5
    c1, c2 = closest_points_segments(np.array([[-5.0, 0, 0]]), np.array([[5.0, 0, 0]]),
                                     np.array([[1.0, -5, 5]]), np.array([[1.0, 5, 5]]))
    assert np.linalg.norm(c1 - c2) == pytest.approx(5.0)
    np.testing.assert_allclose(c1[0], [1, 0, 0], atol=1e-12)


def test_spheres_distance_is_analytic_within_mesh_sagitta():
    r1, r2, c = 10.0, 6.0, 31.0
    a = icosphere([0, 0, 0], r1)
    b = icosphere([c / np.sqrt(3)] * 3, r2)
    d, pa, pb = surface_distance(a, b)
    # the polyhedra lie inside the spheres by at most the sagitta (~0.15 % of r at 4 subdivisions)
    assert c - r1 - r2 <= d <= c - r1 - r2 + 0.03 * (r1 + r2)
    direction = (pb - pa) / np.linalg.norm(pb - pa)
    np.testing.assert_allclose(direction, np.ones(3) / np.sqrt(3), atol=0.02)


def test_plane_section_of_box_is_its_perimeter():
    seg = plane_section(box([0, 0, 0], [10, 20, 30]), np.array([0, 0, 1.0]), 12.3)
    assert len(seg) == 8  # two triangles per side face
    length = np.linalg.norm(seg[:, 1] - seg[:, 0], axis=1).sum()
    assert length == pytest.approx(60.0)
    assert np.allclose(seg[..., 2], 12.3)


def test_axial_distance_oblique_planes_and_no_overlap():
    a, b = box([0, 0, 0], [10, 10, 10]), box([16, -5, -5], [26, 15, 15])
    # planes tilted about x keep the x separation: in-plane distance == 6 exactly
    t = np.deg2rad(20)
    n = np.array([0.0, np.sin(t), np.cos(t)])
    d, pts, k = axial_distance(a, [b], n, [2.0, 5.0, 8.0])
    assert d == pytest.approx(6.0, abs=1e-9) and k in (0, 1, 2)
    assert abs(np.dot(n, pts[0]) - [2.0, 5.0, 8.0][k]) < 1e-9
    # no plane cuts both structures
    d, pts, k = axial_distance(box([0, 0, 0], [10, 10, 10]), [box([0, 0, 13], [10, 10, 20])],
                               [0, 0, 1], [5.0, 15.0])
    assert not np.isfinite(d) and pts is None


def test_axial_distance_never_below_3d_and_picks_narrowest_slice():
    a = icosphere([0, 0, 0], 10.0, subdiv=3)
    b = icosphere([25, 0, 6], 10.0, subdiv=3)
    d3, _, _ = surface_distance(a, b)
    offsets = np.arange(-8.0, 9.0, 2.0)
    d_ax, pts, k = axial_distance(a, [b], [0, 0, 1], offsets)
    assert d_ax >= d3 - 1e-9
    # the narrowest axial slice lies between the centres (z = 3 is midway)
    assert 0.0 <= offsets[k] <= 6.0
    anatomy = SimpleNamespace(surfaces={("left", "ischial_tuberosity"): a, ("left", "lesser_trochanter"): b,
                                        ("left", "hamstring_tendon"): b, ("left", "iliopsoas_tendon"): a})
    out = axial_truth(anatomy, [0, 0, 1], offsets)["left"]
    assert out["ifs_axial_mm"] == pytest.approx(d_ax)
    assert out["ifs_axial_slice"] == k
    assert out["qfs_axial_mm"] == pytest.approx(0.0, abs=1e-9)  # hamstring == LT surface here


def _region_voxels(bone, region, sp):
    """Centres of the voxels labelled by the generator's rule (centre inside bone and region) on
    the lattice k * sp (world mm)."""
    lo = region.centre - region.radius
    hi = np.minimum(region.centre + region.radius, [np.inf, region.y_max, region.z_max])
    origin = np.floor(lo / sp) * sp
    shape = np.floor((hi - origin) / sp).astype(int) + 1
    inside = rasterize(bone.vertices, bone.faces, origin, [sp] * 3, shape)
    pts = np.argwhere(inside) * sp + origin
    return pts[region.contains_points(pts)]


def test_points_inside_mesh_matches_rasterisation():
    s = icosphere([1.13, 2.07, 3.31], 10.0, subdiv=3)  # no vertex exactly on a voxel centre
    pts = np.random.default_rng(0).uniform(-12, 14, (4000, 3))
    origin, sp = np.array([-12.0, -12.0, -12.0]), 0.5
    grid = rasterize(s.vertices, s.faces, origin, [sp] * 3, (53, 53, 53))
    ijk = np.argwhere(grid | ~grid)[::7]
    centres = ijk * sp + origin
    assert np.array_equal(points_inside_mesh(s.vertices, s.faces, centres), grid[tuple(ijk.T)])
    assert np.array_equal(points_inside_mesh(s.vertices, s.faces, centres, up=True), grid[tuple(ijk.T)])
    assert points_inside_mesh(s.vertices, s.faces, pts).mean() > 0.1


@pytest.mark.parametrize("seed", [3, 8])
def test_region_surfaces_agree_with_labelled_voxels(seed):
    """IT / LT truth surfaces bound exactly the voxels the generator labels: voxel centres lie in
    the solids, so their distances are never below the truth, and at most a voxel diagonal above."""
    b, reg = posed_bones(draw_params(np.random.default_rng(seed)))
    sp = 0.5
    side = "left" if seed % 2 else "right"
    it_s = region_surface(b.pelvis, reg[side]["it"])
    lt_s = region_surface(b.femur[side], reg[side]["lt"])
    it_v = _region_voxels(b.pelvis, reg[side]["it"], sp)
    lt_v = _region_voxels(b.femur[side], reg[side]["lt"], sp)
    truth = surface_distance(it_s, lt_s)[0]
    d_vox = cKDTree(lt_v).query(it_v)[0].min()
    assert truth - 0.05 <= d_vox <= truth + np.sqrt(3) * sp
    # axial: contour distance on the slice planes through the voxel centres vs in-slice voxel pairs
    zs = np.intersect1d(np.round(it_v[:, 2] / sp), np.round(lt_v[:, 2] / sp)) * sp
    ax = axial_distance(it_s, [lt_s], [0, 0, 1], zs)[0]
    per_slice = min(cKDTree(lt_v[np.isclose(lt_v[:, 2], z)]).query(it_v[np.isclose(it_v[:, 2], z)])[0].min()
                    for z in zs)
    assert ax - 0.05 <= per_slice <= ax + np.sqrt(2) * sp
