"""Anatomy stage of the phantom generator: one synthetic hip region with exact geometric truth.

Bones come from the LLP26 shape model (``atlas.sample_bones``: real shape variation + per-side hip
pose), rasterised on a fine axis-aligned RAS grid with a cortical shell (inward offset mesh) and
fatty marrow. Soft tissue is built from analytic shapes placed relative to bone landmarks:
z-dependent ellipses (muscle bellies, vessels, nerve, tendons), swept 2D capsules (quadratus
femoris between the ischial tuberosity and the femur), a posterior band (gluteus maximus), a body
outline with subcutaneous fat and skin; the remaining deep compartments are filled by the nearest
muscle (2D nearest-neighbour per slice) with fat planes between a random share of muscles, and
hip-joint cartilage fills the space between femoral head and acetabulum.

Region definitions (``Region``; one definition for labels and truth):
* ``lesser_trochanter`` = femur solid within ``LT_RADIUS`` (11) mm of the LT landmark (the
  posteromedial bump and the cortex right around it); the rest of the femur is ``femur``.
* ``ischial_tuberosity`` = pelvis solid within ``IT_RADIUS`` mm of a point 12 mm above the IT
  landmark (the inferior apex), no higher than ``IT_HEIGHT`` (35) mm above the apex and no more
  than ``IT_ANTERIOR`` mm anterior to it (excludes the ischiopubic ramus); rest ``pelvis``.
* Truth surfaces of IT / LT: the boundary of (bone solid ∩ region) (``truth.region_surface``):
  the bone-mesh surface inside the region, clipped at the region boundary to 0.2 mm, plus the
  region's sphere / plane caps inside the bone. The voxel labels are exactly "voxel centre inside
  the bone mesh and inside the region", so labels and truth agree to the rasterisation accuracy. Soft-tissue truth surfaces (hamstring and
  iliopsoas tendons, quadratus femoris) are marching-cubes surfaces (level 0.5) of their final
  fine-grid label masks, i.e. exactly the labels.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from pipeline.config import goutallier_grade
from pipeline.labels import LABELS

from .atlas import SIDES, Bones, sample_bones
from .model import EXTENTS, TISSUES, Anatomy, Surface
from .raster import rasterize, vertex_normals
from .truth import region_surface, surface_distance

LT_RADIUS = 11.0
IT_RADIUS = 35.0
IT_HEIGHT = 35.0
IT_ANTERIOR = 8.0
DEFAULT_SPACING = (0.5, 0.5, 1.0)
# Hip pose distribution (degrees; atlas.py conventions): a subject-wide part plus a per-side part
# so that narrowing is sometimes bilateral, sometimes unilateral. Calibrated (with the shape
# modes) to give a 3D IFS of ~4-35 mm with ~1/3 of hips <= 15 mm.
ROT_MEAN, ROT_SD = 10.0, 8.0
ADD_MEAN, ADD_SD = 3.0, 4.0
FLEX_MEAN, FLEX_SD = 0.0, 5.0
SIDE_SD = {"rotation": 5.0, "adduction": 2.5, "flexion": 3.0}

# structure table: id -> (tissue, label, fat_fraction)
_T, _L = TISSUES, LABELS
STRUCTS: dict[str, tuple[int, int, float]] = {
    "air": (_T["air"], _L["background"], 0.0),
    "subcut_fat": (_T["fat"], _L["subcutaneous_fat"], 0.95),
    "skin": (_T["skin"], _L["subcutaneous_fat"], 0.1),
    "deep_fat": (_T["fat"], _L["background"], 0.95),
    "fat_rim": (_T["fat"], _L["background"], 0.95),     # fat sheath that muscle fill must not take
    "muscle": (_T["muscle"], _L["other_muscle"], 0.03),
    "gluteus_maximus": (_T["muscle"], _L["gluteus_maximus"], 0.04),
    "quadratus_femoris": (_T["muscle"], _L["quadratus_femoris"], 0.03),
    "hamstring_tendon": (_T["tendon"], _L["hamstring_tendon"], 0.02),
    "iliopsoas_tendon": (_T["tendon"], _L["iliopsoas_tendon"], 0.02),
    "nerve": (_T["nerve"], _L["background"], 0.3),
    "vessel": (_T["vessel"], _L["background"], 0.0),
    "bowel": (_T["bowel"], _L["background"], 0.05),
    "fluid": (_T["fluid"], _L["background"], 0.0),
    "femur_cortex": (_T["cortical_bone"], _L["femur"], 0.0),
    "femur_marrow": (_T["marrow"], _L["femur"], 0.85),
    "lt_cortex": (_T["cortical_bone"], _L["lesser_trochanter"], 0.0),
    "lt_marrow": (_T["marrow"], _L["lesser_trochanter"], 0.85),
    "pelvis_cortex": (_T["cortical_bone"], _L["pelvis"], 0.0),
    "pelvis_marrow": (_T["marrow"], _L["pelvis"], 0.8),
    "it_cortex": (_T["cortical_bone"], _L["ischial_tuberosity"], 0.0),
    "it_marrow": (_T["marrow"], _L["ischial_tuberosity"], 0.8),
    "cartilage": (_T["cartilage"], _L["background"], 0.0),  # hip joint cartilage (not bone)
}
SID = {name: i for i, name in enumerate(STRUCTS)}
# muscles get individual ids from MUSCLE_ID0 upward so that fat planes can separate them
MUSCLE_ID0 = 64

PELVIS_EXTRA_BELOW_MM = 40.0


# --------------------------------------------------------------------------- parameters

def draw_params(rng: np.random.Generator, **overrides) -> dict:
    """Draw every random choice of a subject (JSON-serialisable). Keys can be overridden."""
    p: dict = {}
    p["shape_weights"] = [float(w) for w in np.clip(rng.normal(0, 1, 10), -2.5, 2.5)]
    p["tilt_deg"] = float(rng.normal(0, 4))
    common = {"rotation": rng.normal(ROT_MEAN, ROT_SD), "adduction": rng.normal(ADD_MEAN, ADD_SD),
              "flexion": rng.normal(FLEX_MEAN, FLEX_SD)}
    pose = {}
    for s in SIDES:
        pose[s] = {"rotation": float(common["rotation"] + rng.normal(0, SIDE_SD["rotation"])),
                   "adduction": float(common["adduction"] + rng.normal(0, SIDE_SD["adduction"])),
                   "flexion": float(common["flexion"] + rng.normal(0, SIDE_SD["flexion"]))}
    p["pose"] = pose
    habitus = float(np.clip(rng.gamma(3.0, 1.0 / 3.0), 0.25, 3.0))  # 1 = average
    p["subcut_fat_mm"] = {s: float(np.clip(14.0 * habitus * rng.uniform(0.9, 1.1), 3, 60)) for s in SIDES}
    p["muscle_scale"] = float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.2))
    p["hamstring_tendon_mm"] = float(rng.uniform(8.0, 12.0))
    p["hamstring_protrusion"] = float(rng.uniform(0.25, 0.45))  # share of the IFS (QFS ~ 0.5-0.7 IFS)
    p["fat_plane_prob"] = float(rng.uniform(0.5, 0.95))
    p["bladder_fill"] = float(rng.uniform(0.2, 1.0))
    p["seed_texture"] = int(rng.integers(0, 2**31 - 1))
    unknown = set(overrides) - set(p)
    if unknown:
        raise ValueError(f"unknown anatomy parameters {sorted(unknown)}; known: {sorted(p)}")
    p.update(copy.deepcopy(overrides))
    return p


MIN_GAP_MM = 4.0


def posed_bones(p: dict) -> tuple[Bones, dict]:
    """Bones for drawn parameters; poses that bring the IT and LT closer than MIN_GAP_MM
    (bone contact) are relaxed toward neutral (p["pose"] is updated in place)."""
    rng = np.random.default_rng(0)  # unused: weights and tilt are given
    bones = sample_bones(rng, weights=p["shape_weights"], pose=p["pose"], tilt_deg=p["tilt_deg"])
    regions = _regions(bones)
    for _ in range(8):
        gaps = {s: _quick_gap(bones, regions, s) for s in SIDES}
        if min(gaps.values()) >= MIN_GAP_MM:
            break
        for s in SIDES:
            if gaps[s] < MIN_GAP_MM:
                p["pose"][s] = {k: 0.75 * v for k, v in p["pose"][s].items()}
        bones = sample_bones(rng, weights=p["shape_weights"], pose=p["pose"], tilt_deg=p["tilt_deg"])
        regions = _regions(bones)
    return bones, regions


def draw_qf_pathology(rng: np.random.Generator, ifs_mm: float) -> dict:
    """QF edema / fat / atrophy for one hip, conditioned on its 3D IFS."""
    narrow = ifs_mm <= 15.0
    p_edema = 0.55 if narrow else (0.2 if ifs_mm <= 18 else 0.09)
    u = rng.uniform()
    if u < p_edema:
        edema = "marked" if rng.uniform() < (0.45 if narrow else 0.25) else "mild"
    else:
        edema = "none"
    chronic = narrow and rng.uniform() < 0.5
    mean_ff = float(np.clip(rng.gamma(1.5, 0.04) + (rng.uniform(0.1, 0.35) if chronic else 0.0), 0.01, 0.6))
    if rng.uniform() < 0.08:  # some fatty QF irrespective of the IFS
        mean_ff = float(rng.uniform(0.2, 0.6))
    atrophy = float(rng.uniform(0.55, 0.85)) if (chronic or mean_ff > 0.35) else float(rng.uniform(0.9, 1.1))
    return {"edema": edema, "fat_fraction": mean_ff, "atrophy": atrophy}


# --------------------------------------------------------------------------- geometry helpers

class Grid:
    """Axis-aligned fine grid: world = origin + index * spacing."""

    def __init__(self, origin, spacing, shape):
        self.origin = np.asarray(origin, float)
        self.spacing = np.asarray(spacing, float)
        self.shape = tuple(int(s) for s in shape)
        self.x = self.origin[0] + self.spacing[0] * np.arange(self.shape[0])
        self.y = self.origin[1] + self.spacing[1] * np.arange(self.shape[1])
        self.z = self.origin[2] + self.spacing[2] * np.arange(self.shape[2])

    @property
    def affine(self) -> np.ndarray:
        a = np.diag(list(self.spacing) + [1.0])
        a[:3, 3] = self.origin
        return a

    def crop(self, lo, hi):
        """Index slices covering the world box [lo, hi] (clipped); None when empty."""
        lo = np.floor((np.asarray(lo, float) - self.origin) / self.spacing).astype(int)
        hi = np.ceil((np.asarray(hi, float) - self.origin) / self.spacing).astype(int) + 1
        lo = np.clip(lo, 0, self.shape)
        hi = np.clip(hi, 0, self.shape)
        if (hi <= lo).any():
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


@dataclass
class Region:
    """Bone sub-region: ball(centre, radius) optionally cut by z <= z_max and y <= y_max (world mm).

    The one definition used both for labelling voxels and for cutting the truth surface.
    """

    centre: np.ndarray
    radius: float
    z_max: float = np.inf
    y_max: float = np.inf

    def contains(self, x, y, z):
        """Broadcasting inside test on world coordinates."""
        c = self.centre
        m = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= self.radius ** 2
        return m & (z <= self.z_max) & (y <= self.y_max)

    def contains_points(self, pts: np.ndarray) -> np.ndarray:
        return self.contains(pts[:, 0], pts[:, 1], pts[:, 2])

    def to_dict(self) -> dict:
        return {"centre": [float(v) for v in self.centre], "radius": float(self.radius),
                "z_max": float(self.z_max), "y_max": float(self.y_max)}


def _interp(z, knots_z, values):
    """Piecewise-linear interpolation of values (K, P) at z (N,) -> (N, P); knots_z increasing."""
    knots_z = np.asarray(knots_z, float)
    values = np.asarray(values, float)
    return np.stack([np.interp(z, knots_z, values[:, j]) for j in range(values.shape[1])], axis=1)


class Painter:
    """Paints structure ids onto the fine grid (later paints win unless protected).

    ``core_z``: the first and last slice z of the "hips" extent; ``top`` / ``bottom`` are just
    beyond them, where shapes that span the whole extent end. On a taller grid such a tube
    carries on unchanged to the grid's own top or bottom, so the anatomy inside the core is the
    same whatever the extent.
    """

    def __init__(self, grid: Grid, core_z=None):
        self.g = grid
        core_z = (float(grid.z[0]), float(grid.z[-1])) if core_z is None else core_z
        self.bottom, self.top = core_z[0] - 1.0, core_z[1] + 1.0
        self.ids = np.zeros(grid.shape, dtype=np.uint8)
        self.next_muscle = MUSCLE_ID0
        self.muscle_label: dict[int, int] = {}
        # soft-tissue shapes never paint outside the deep fascia
        self.protected = np.zeros(256, bool)
        for name in ("air", "skin", "subcut_fat"):
            self.protected[SID[name]] = True

    def new_muscle(self, label: str = "other_muscle") -> int:
        mid = self.next_muscle
        self.next_muscle += 1
        self.muscle_label[mid] = LABELS[label]
        return mid

    def tube(self, sid: int, knots, side_sign: float, only=None, z_range=None):
        """Ellipse tube: knots rows (z, u, y, a, b, angle_deg) in side-local coords (u lateral).

        x = side_sign * u. The ellipse is evaluated on each slice between the first and last knot.
        only: optional array of ids that may be overwritten.
        """
        k = np.asarray(sorted(knots, key=lambda r: r[0]), float)
        if k[0, 0] <= self.bottom and self.g.z[0] - 1.0 < k[0, 0]:
            k = np.vstack([[self.g.z[0] - 1.0, *k[0, 1:]], k])
        if k[-1, 0] >= self.top and self.g.z[-1] + 1.0 > k[-1, 0]:
            k = np.vstack([k, [self.g.z[-1] + 1.0, *k[-1, 1:]]])
        z0, z1 = k[0, 0], k[-1, 0]
        if z_range is not None:
            z0, z1 = max(z0, z_range[0]), min(z1, z_range[1])
        r = np.max(k[:, 3:5])
        lo = [min(side_sign * k[:, 1].min(), side_sign * k[:, 1].max()) - r, k[:, 2].min() - r, z0]
        hi = [max(side_sign * k[:, 1].min(), side_sign * k[:, 1].max()) + r, k[:, 2].max() + r, z1]
        sl = self.g.crop(lo, hi)
        if sl is None:
            return
        x, y, z = self.g.x[sl[0]], self.g.y[sl[1]], self.g.z[sl[2]]
        prm = _interp(z, k[:, 0], k[:, 1:])
        cx, cy, a, b, ang = side_sign * prm[:, 0], prm[:, 1], prm[:, 2], prm[:, 3], np.deg2rad(side_sign * prm[:, 4])
        dx = x[:, None, None] - cx[None, None, :]
        dy = y[None, :, None] - cy[None, None, :]
        c, s = np.cos(ang), np.sin(ang)
        du = dx * c + dy * s
        dv = -dx * s + dy * c
        m = (du / a) ** 2 + (dv / b) ** 2 <= 1.0
        self._paint(sl, m, sid, only)

    def capsule2d(self, sid: int, zs, ax, ay, bx, by, r, only=None):
        """Per-slice 2D capsule (segment A->B, radius r) on the slices zs (arrays per slice)."""
        lo = [min(ax.min(), bx.min()) - r.max(), min(ay.min(), by.min()) - r.max(), zs.min()]
        hi = [max(ax.max(), bx.max()) + r.max(), max(ay.max(), by.max()) + r.max(), zs.max()]
        sl = self.g.crop(lo, hi)
        if sl is None:
            return None
        x, y, z = self.g.x[sl[0]], self.g.y[sl[1]], self.g.z[sl[2]]
        f = lambda v: np.interp(z, zs, v)[None, None, :]  # noqa: E731
        Ax, Ay, Bx, By, R = f(ax), f(ay), f(bx), f(by), f(r)
        dx, dy = Bx - Ax, By - Ay
        L2 = np.maximum(dx * dx + dy * dy, 1e-9)
        px = x[:, None, None] - Ax
        py = y[None, :, None] - Ay
        t = np.clip((px * dx + py * dy) / L2, 0, 1)
        m = (px - t * dx) ** 2 + (py - t * dy) ** 2 <= R * R
        inz = (z >= zs.min()) & (z <= zs.max())
        m &= inz[None, None, :]
        self._paint(sl, m, sid, only)
        return sl, m

    def mask(self, sl, m, sid, only=None):
        self._paint(sl, m, sid, only)

    def _paint(self, sl, m, sid, only):
        view = self.ids[sl]
        m = m & ~self.protected[view]
        if only is not None:
            allowed = np.zeros(256, bool)
            allowed[np.asarray(only, dtype=np.int64)] = True
            m = m & allowed[view]
        view[m] = sid


# --------------------------------------------------------------------------- regions / surfaces

def _mask_surface(mask: np.ndarray, sl, grid: Grid) -> Surface | None:
    """Marching-cubes surface (level 0.5) of a crop mask in world coordinates."""
    if mask.sum() < 8:
        return None
    m = np.pad(mask.astype(np.float32), 1)
    v, f, _, _ = marching_cubes(m, 0.5, spacing=tuple(grid.spacing))
    start = np.array([s.start - 1 for s in sl], float) * grid.spacing + grid.origin
    return Surface(v.astype(np.float64) + start, f.astype(np.int64))


# --------------------------------------------------------------------------- main builder

def _side_lm(b: Bones, side: str) -> dict:
    s = 1.0 if side == "right" else -1.0
    L = b.landmarks
    loc = lambda p: np.array([s * p[0], p[1], p[2]])  # noqa: E731  (u lateral, y, z)
    return {"s": s, "H": loc(L[f"hip_centre_{side}"]), "LT": loc(L[f"LT_{side}"]),
            "GT": loc(L[f"GT_{side}"]), "IT": loc(L[f"IT_{side}"]), "PT": loc(L[f"PT_{side}"]),
            "ASIS": loc(L[f"ASIS_{side}"])}


def _femur_centre(f: Surface, z: float, s: float) -> np.ndarray:
    v = f.vertices
    sel = np.abs(v[:, 2] - z) < 2.0
    c = v[sel].mean(0) if sel.any() else v.mean(0)
    return np.array([s * c[0], c[1], z])


def build_anatomy(rng: np.random.Generator, *, fov: str = "bilateral", fine_spacing=None,
                  extent: str = "hips", **overrides) -> Anatomy:
    """Build one synthetic subject's hip-region anatomy with exact truth.

    Args:
        rng: the only source of randomness (same seed -> same anatomy).
        fov: "bilateral" (whole body cross-section) or "left"/"right" (~200 mm box around that
            hip; only that side's truth is produced).
        fine_spacing: (dx, dy, dz) mm of the fine grid (default 0.5, 0.5, 1.0).
        extent: "hips" (from 15 mm above the femoral heads to 40 mm below the lesser
            trochanters) or "pelvis" (also up to the iliac crests and ``PELVIS_EXTRA_BELOW_MM``
            further down, for a whole-pelvis acquisition). The anatomy of the "hips" extent is
            the same in both; muscles, bowel and bladder that reach its top or bottom carry on
            unchanged beyond it (crude above the hips: the bones there are real, the soft
            tissue is not).
        overrides: replace drawn parameters (keys of ``draw_params``, e.g. ``pose``,
            ``shape_weights``, ``subcut_fat_mm``) or pathology via ``qf_pathology={side: {...}}``.
    Returns: ``Anatomy`` (see ``model.Anatomy``); ``hips[side]`` holds ifs_3d_mm, ifs_3d_points
    (IT point first), qfs_3d_mm, qfs_3d_points (hamstring point first), qf_edema,
    qf_edema_fraction, qf_fat_fraction, qf_goutallier_grade, qf_volume_ml, qf_atrophy, pose.
    """
    if fov not in ("bilateral", "left", "right"):
        raise ValueError(f"fov must be bilateral/left/right, not {fov!r}")
    if extent not in EXTENTS:
        raise ValueError(f"extent must be one of {EXTENTS}, not {extent!r}")
    spacing = np.asarray(fine_spacing if fine_spacing is not None else DEFAULT_SPACING, float)
    p = draw_params(rng, **{k: v for k, v in overrides.items() if k != "qf_pathology"})
    bones, regions = posed_bones(p)
    gaps = {s: _quick_gap(bones, regions, s) for s in SIDES}
    given = overrides.get("qf_pathology", {}) or {}
    patho = {s: {**draw_qf_pathology(rng, gaps[s]), **given.get(s, {})} for s in SIDES}
    sides = SIDES if fov == "bilateral" else (fov,)
    L = {s: _side_lm(bones, s) for s in SIDES}

    # ---- grid
    z_top = max(L[s]["H"][2] for s in SIDES) + 15.0
    z_bot = min(L[s]["LT"][2] for s in SIDES) - 40.0
    body = _body_shape(bones, L, p)
    if fov == "bilateral":
        lo = np.array([-body["a"] - 5, body["y_post"] - 5, z_bot])
        hi = np.array([body["a"] + 5, body["y_ant"] + 5, z_top])
    else:
        s = L[fov]["s"]
        cu = (L[fov]["IT"][0] + L[fov]["GT"][0]) / 2
        cy = L[fov]["H"][1] - 15
        half = 100.0
        lo = np.array([s * cu - half, cy - half, z_bot])
        hi = np.array([s * cu + half, cy + half, z_top])
    core = Grid(lo, spacing, np.round((hi - lo) / spacing).astype(int) + 1)
    if extent == "pelvis":
        lo[2] -= PELVIS_EXTRA_BELOW_MM
        hi[2] = max(hi[2], float(bones.pelvis.vertices[:, 2].max()) + 10.0)
        lo[2] = core.z[0] - spacing[2] * np.ceil((core.z[0] - lo[2]) / spacing[2])   # on the core's z lattice
    shape = np.round((hi - lo) / spacing).astype(int) + 1
    grid = Grid(lo, spacing, shape)
    P = Painter(grid, core_z=(float(core.z[0]), float(core.z[-1])))

    # ---- body outline, fat, skin
    _paint_body(P, body, p)

    # ---- muscles and soft tissue per side
    qf_info = {}
    for s in SIDES:
        qf_info[s] = _paint_side(P, bones, L[s], s, p, regions[s], patho[s]["atrophy"], gaps[s])
    _paint_midline(P, bones, L, p, body)
    # fill the compartments with muscle; fat planes between a random share of muscles
    plane_lut = np.zeros(256, bool)
    for mid in sorted(P.muscle_label):
        plane_lut[mid] = rng.uniform() < p["fat_plane_prob"]
    _fill_muscles(P, L, plane_lut)
    _qf_fat_sheath(P, np.random.default_rng(p["seed_texture"] + 7))

    # ---- bones last
    _paint_bones(P, bones, regions)
    ids = P.ids

    # ---- lookup tables
    lut_t = np.zeros(256, np.uint8)
    lut_l = np.zeros(256, np.uint8)
    lut_f = np.zeros(256, np.float32)
    for name, (t, lab, ff) in STRUCTS.items():
        lut_t[SID[name]], lut_l[SID[name]], lut_f[SID[name]] = t, lab, ff
    mus_rng = np.random.default_rng(p["seed_texture"] + 1)
    for mid, lab in sorted(P.muscle_label.items()):
        # healthy muscle fat fraction varies a little between muscles and with habitus
        ff = 0.02 + 0.03 * mus_rng.uniform() + 0.01 * np.mean(list(p["subcut_fat_mm"].values())) / 14.0
        lut_t[mid], lut_l[mid], lut_f[mid] = TISSUES["muscle"], lab, min(ff, 0.12)
    tissue = lut_t[ids]
    labels = lut_l[ids]
    fat_fraction = lut_f[ids]
    edema = np.zeros(grid.shape, np.float32)

    # ---- surfaces, truth, QF pathology
    surfaces, hips = {}, {}
    tex = np.random.default_rng(p["seed_texture"])
    vox_ml = float(np.prod(spacing)) / 1000.0
    for s in SIDES:
        surfaces[(s, "ischial_tuberosity")] = region_surface(bones.pelvis, regions[s]["it"])
        surfaces[(s, "lesser_trochanter")] = region_surface(bones.femur[s], regions[s]["lt"])
    boxes = _label_boxes(labels, grid)
    for s in sides:
        for name in ("hamstring_tendon", "iliopsoas_tendon", "quadratus_femoris"):
            sl = boxes.get((s, LABELS[name]))
            if sl is not None:
                srf = _mask_surface(labels[sl] == LABELS[name], sl, grid)
                if srf is not None:
                    surfaces[(s, name)] = srf
    for s in sides:
        d_ifs, pa, pb = surface_distance(surfaces[(s, "ischial_tuberosity")], surfaces[(s, "lesser_trochanter")])
        hip = {"ifs_3d_mm": d_ifs, "ifs_3d_points": [pa.tolist(), pb.tolist()]}
        ham = surfaces.get((s, "hamstring_tendon"))
        if ham is not None:
            best = min((surface_distance(ham, surfaces[(s, n)]) for n in ("lesser_trochanter", "iliopsoas_tendon")
                        if (s, n) in surfaces), key=lambda r: r[0])
            hip["qfs_3d_mm"], hip["qfs_3d_points"] = best[0], [best[1].tolist(), best[2].tolist()]
        else:
            hip["qfs_3d_mm"], hip["qfs_3d_points"] = None, None
        qsl = boxes.get((s, LABELS["quadratus_femoris"]))
        qf = np.zeros(grid.shape, bool)
        if qsl is not None:
            qf[qsl] = labels[qsl] == LABELS["quadratus_femoris"]
        ef, mff = _qf_pathology(qf, qsl, grid, fat_fraction, edema, patho[s], qf_info[s], tex)
        vol = float(qf.sum()) * vox_ml
        hip.update({"qf_edema": patho[s]["edema"], "qf_edema_fraction": ef, "qf_fat_fraction": mff,
                    "qf_goutallier_grade": goutallier_grade(mff), "qf_volume_ml": vol,
                    "qf_atrophy": float(patho[s]["atrophy"]), "pose": dict(bones.pose[s])})
        hips[s] = hip
    p["qf_pathology"] = {s: {k: (v if isinstance(v, str) else float(v)) for k, v in patho[s].items()}
                         for s in SIDES}
    p["fov"] = fov
    p["pose"] = bones.pose
    p["fine_spacing"] = [float(v) for v in spacing]
    return Anatomy(affine=grid.affine, tissue=tissue, labels=labels, fat_fraction=fat_fraction,
                   edema=edema, surfaces={k: v for k, v in surfaces.items() if k[0] in sides},
                   hips=hips, params=p)


def _regions(b: Bones) -> dict:
    """IT / LT regions per side (see the module docstring)."""
    out = {}
    for s in SIDES:
        it = b.landmarks[f"IT_{s}"]
        lt = b.landmarks[f"LT_{s}"]
        # the IT landmark is the inferior apex of the tuberosity: keep the ischium within
        # IT_RADIUS of a point above it, up to IT_HEIGHT above the apex, and posterior to the
        # ischiopubic ramus (y <= apex + IT_ANTERIOR)
        out[s] = {"it": Region(it + np.array([0.0, 0.0, 12.0]), IT_RADIUS, z_max=it[2] + IT_HEIGHT,
                               y_max=it[1] + IT_ANTERIOR),
                  "lt": Region(lt.copy(), LT_RADIUS)}
    return out


def _quick_gap(b: Bones, regions: dict, s: str) -> float:
    """Nearest-vertex IT-LT gap (a fast upper bound of the IFS)."""
    pv = b.pelvis.vertices[regions[s]["it"].contains_points(b.pelvis.vertices)]
    fv = b.femur[s].vertices[regions[s]["lt"].contains_points(b.femur[s].vertices)]
    return float(cKDTree(pv).query(fv)[0].min())


def _label_boxes(labels, grid: Grid) -> dict:
    """{(side, label value): crop slices} of each label in each half (x <= 0 left, x > 0 right)."""
    xmid = int(np.clip(np.searchsorted(grid.x, 0.0, side="right"), 0, grid.shape[0]))
    out = {}
    for side, xs in (("left", slice(0, xmid)), ("right", slice(xmid, grid.shape[0]))):
        if xs.stop <= xs.start:
            continue
        for value, box in enumerate(ndimage.find_objects(labels[xs]), start=1):
            if box is not None:
                out[(side, value)] = (slice(box[0].start + xs.start, box[0].stop + xs.start), box[1], box[2])
    return out


def _body_shape(b: Bones, L: dict, p: dict) -> dict:
    gt_u = max(L[s]["GT"][0] for s in SIDES)
    it_y = min(L[s]["IT"][1] for s in SIDES)
    pt_y = max(L[s]["PT"][1] for s in SIDES)
    fat = max(p["subcut_fat_mm"].values())
    ms = p["muscle_scale"]
    a_in = gt_u + 22 * ms
    y_ant_in = pt_y + 35 * ms
    y_post_in = it_y - 60 * ms
    return {"a_in": a_in, "y_ant_in": y_ant_in, "y_post_in": y_post_in, "fat": p["subcut_fat_mm"],
            "a": a_in + fat + 2, "y_ant": y_ant_in + fat + 2, "y_post": y_post_in - 1.4 * fat - 2,
            "buttock_u": 0.45 * a_in, "it_y": it_y,
            "pt_z": float(np.mean([L[s]["PT"][2] for s in SIDES]))}


def _outline(X, Y, body, grow: dict, side_of_x):
    """Inside test of the body outline grown by grow[side] mm (0 = deep fascia)."""
    g = np.where(side_of_x, grow["right"], grow["left"])
    cy = (body["y_ant_in"] + body["it_y"]) / 2
    a = body["a_in"] + g
    b = (body["y_ant_in"] - body["it_y"]) / 2 + g
    main = np.abs(X / a) ** 2.4 + np.abs((Y - cy) / b) ** 2.4 <= 1.0
    bu = body["buttock_u"]
    by = body["it_y"] - 5
    rb_u, rb_y = 0.55 * body["a_in"] + g, (body["it_y"] - body["y_post_in"]) + 5 + 1.4 * g
    butt = ((np.abs(X) - bu) / rb_u) ** 2 + ((Y - by) / rb_y) ** 2 <= 1.0
    return main | (butt & (Y < cy))


def _paint_body(P: Painter, body: dict, p: dict) -> None:
    g = P.g
    X, Y = g.x[:, None], g.y[None, :]
    right = X > 0
    fat = body["fat"]
    skin = _outline(X, Y, body, {s: fat[s] + 1.8 for s in SIDES}, right)
    sub = _outline(X, Y, body, {s: fat[s] for s in SIDES}, right)
    deep = _outline(X, Y, body, {s: 0.0 for s in SIDES}, right)
    sl2 = np.where(deep, SID["deep_fat"], np.where(sub, SID["subcut_fat"], np.where(skin, SID["skin"], SID["air"])))
    P.ids[:] = sl2.astype(np.uint8)[:, :, None]
    P.deep = deep
    # the thighs part anteriorly below the pubic symphysis (perineal notch)
    z0 = body["pt_z"] - 22.0
    zs = g.z[g.z < z0]
    if len(zs):
        w = np.clip((z0 - zs) * 1.1, 0, 32) * p["muscle_scale"]
        dep = np.clip((z0 - zs) * 1.6, 0, 70)
        fat = 0.6 * min(fat.values())
        sl = g.crop([-w.max() - fat - 4, body["y_ant"] - dep.max() - fat - 4, zs.min()],
                    [w.max() + fat + 4, body["y_ant"] + 5, zs.max()])
        if sl is not None:
            x = g.x[sl[0]][:, None, None]
            y = g.y[sl[1]][None, :, None]
            kz = np.nonzero(g.z[sl[2]] < z0)[0]
            ww = np.interp(g.z[sl[2]], zs, w)[None, None, :]
            dd = np.interp(g.z[sl[2]], zs, dep)[None, None, :]
            r = np.sqrt((x / np.maximum(ww, 1e-3)) ** 2 + ((y - body["y_ant"]) / np.maximum(dd, 1e-3)) ** 2)
            scale = np.minimum(ww, dd)  # approximate distance from the notch edge
            dist = (r - 1.0) * scale
            valid = (ww > 0.5) & np.isin(np.arange(sl[2].stop - sl[2].start), kz)[None, None, :]
            view = P.ids[sl]
            view[valid & (dist < fat + 1.8) & (view != SID["air"])] = SID["subcut_fat"]
            view[valid & (dist < 1.8) & (view != SID["air"])] = SID["skin"]
            view[valid & (dist < 0)] = SID["air"]


def _paint_side(P: Painter, b: Bones, lm: dict, side: str, p: dict, region: dict, atrophy: float,
                gap_mm: float) -> dict:
    """Muscles, tendons, nerve and vessels of one side. Returns QF geometry info."""
    s = lm["s"]
    H, LT, GT, IT, PT = lm["H"], lm["LT"], lm["GT"], lm["IT"], lm["PT"]
    g = P.g
    zT, zB = P.top, P.bottom
    ms = p["muscle_scale"]
    soft = [SID["deep_fat"]]
    fem = b.femur[side]

    def fc(z):
        return _femur_centre(fem, z, s)

    def tube(knots, label="other_muscle", only=None):
        mid = P.new_muscle(label)
        P.tube(mid, [(z, u, y, a * ms, bb * ms, ang) for z, u, y, a, bb, ang in knots], s, only=only)
        return mid

    # deep-to-superficial order; later muscles overwrite earlier where they overlap
    tube([(zT, H[0] - 45, H[1] - 8, 9, 24, 10), (IT[2] + 30, H[0] - 45, H[1] - 12, 7, 18, 10)])  # obturator int.
    tube([(H[2] - 45, 38, H[1] + 15, 18, 9, -20), (H[2] - 15, H[0] + 5, H[1] - 12, 16, 8, -30)])  # obturator ext.
    fz = [fc(z) for z in (GT[2] - 15, zB)]
    tube([(GT[2] - 15, fz[0][0] + 12, fz[0][1] + 4, 16, 20, 0),
          (zB, fz[1][0] + 14, fz[1][1] + 4, 26, 30, 0)])  # vastus lateralis/intermedius
    tube([(zT, GT[0] - 10, GT[1] + 12, 20, 32, 20), (GT[2] - 6, GT[0] - 4, GT[1] + 2, 10, 18, 10)])  # glut med/min
    tube([(zT, GT[0] + 2, GT[1] + 55, 9, 16, -20), (zB, GT[0] + 4, GT[1] + 45, 9, 18, -30)])  # TFL
    tube([(zT, H[0] + 5, H[1] + 38, 14, 11, 0), (zB, H[0] + 12, H[1] + 45, 15, 12, 0)])  # rectus femoris
    tube([(zT, H[0] + 25, H[1] + 50, 10, 7, 30), (zB, H[0] + 5, H[1] + 58, 11, 8, 20)])  # sartorius
    tube([(zT, H[0] - 12, H[1] + 28, 20, 15, 0), (LT[2] + 30, LT[0] - 10, H[1] + 12, 14, 12, 0),
          (LT[2] + 5, LT[0] - 5, LT[1] + 12, 8, 7, 0)])  # iliopsoas belly
    tube([(PT[2] + 5, 30, PT[1] - 8, 14, 9, -20), (zB, LT[0] - 12, LT[1] + 30, 14, 10, -35)])  # pectineus
    tube([(PT[2] - 10, 22, PT[1] - 6, 12, 9, -20), (zB, 50, PT[1] - 12, 22, 14, -40)])  # adductor longus
    tube([(PT[2] - 15, 30, PT[1] - 26, 12, 9, -30), (zB, 58, PT[1] - 32, 20, 12, -40)])  # adductor brevis
    tube([(IT[2] + 8, IT[0] + 2, IT[1] + 12, 12, 9, -30), (zB, 62, IT[1] + 8, 30, 22, -30)])  # adductor magnus
    tube([(IT[2] - 22, IT[0] + 12, IT[1] - 8, 10, 8, 0), (zB, IT[0] + 22, IT[1] - 2, 24, 18, 20)])  # hamstrings
    # gemelli + obturator internus tendon: band above the QF from the ischium to the trochanteric fossa
    zg = np.array([LT[2] + 32, LT[2] + 45])
    P.capsule2d(P.new_muscle(), zg, s * np.full(2, IT[0] + 8), np.full(2, IT[1] + 12),
                s * np.full(2, GT[0] - 22), np.full(2, GT[1] - 4), np.full(2, 6.0 * ms))

    # quadratus femoris: IT lateral border -> posterior intertrochanteric crest (quadrate tubercle)
    zq = np.linspace(LT[2] - 6, LT[2] + 28, 8)
    pv = b.pelvis.vertices
    near_it = region["it"].contains_points(pv)
    fv = fem.vertices
    A, B = [], []
    for z in zq:
        sel = near_it & (np.abs(pv[:, 2] - z) < 3)
        if sel.any():
            q = pv[sel][np.argmax(s * pv[sel, 0])]
            A.append([s * q[0], q[1]])
        else:
            A.append([IT[0] + 8, IT[1] + 5])
        near_f = np.abs(fv[:, 2] - z) < 2.5
        if near_f.any():
            # insertion: posterior femur just lateral and posterior to the LT (quadrate tubercle)
            cand = fv[near_f]
            tgt = np.array([s * (LT[0] + 12.0), LT[1] - 6.0])
            q = cand[np.argmin(((cand[:, :2] - tgt) ** 2).sum(1))]
            B.append([s * q[0], q[1]])
        else:
            B.append([LT[0] + 10, LT[1]])
    A, B = np.asarray(A), np.asarray(B)
    # a QF squeezed in a narrow space bulges (thicker front-to-back, pushed posteriorly)
    bulge = 1.0 + 0.35 * float(np.clip((15.0 - gap_mm) / 10.0, 0.0, 1.0))
    r = np.full(len(zq), 8.0 * ms * atrophy * bulge)
    r *= np.clip(1.0 - ((zq - zq.mean()) / (np.ptp(zq) / 2 + 1e-6)) ** 4 * 0.3, 0.5, 1)
    qf_id = SID["quadratus_femoris"]
    # centre line slightly posterior to the bone-to-bone line: QF lies behind the LT/IT gap
    back = 2.0 + (bulge - 1.0) * 10.0
    P.capsule2d(qf_id, zq, s * A[:, 0], A[:, 1] - back, s * B[:, 0], B[:, 1] - back, r)
    fibre = np.array([s * (B[:, 0] - A[:, 0]).mean(), (B[:, 1] - A[:, 1]).mean(), 0.0])

    # gluteus maximus: posterior band, inside the deep fascia, posterior to an oblique line
    _paint_gmax(P, lm, side, soft)

    # hamstring common tendon: on the posterolateral IT facet, protruding lateral to the IT
    # cortex by a share of the ischiofemoral gap (so that QFS < IFS as in the literature), then
    # running inferiorly
    ht = p["hamstring_tendon_mm"]
    a_t, b_t = ht / 2, ht / 2 + 2.0  # half-thickness along the IT->LT direction, half-width across
    protrude = float(np.clip(p["hamstring_protrusion"] * gap_mm, 1.0, 0.9 * ht))
    it_v = pv[near_it]
    lt_v = fv[region["lt"].contains_points(fv)]
    _, j = cKDTree(lt_v).query(it_v)
    k = int(np.argmin(np.linalg.norm(lt_v[j] - it_v, axis=1)))
    gap_dir = np.array([s * (lt_v[j[k], 0] - it_v[k, 0]), lt_v[j[k], 1] - it_v[k, 1]])
    gap_dir /= max(np.linalg.norm(gap_dir), 1e-6)
    angle = float(np.degrees(np.arctan2(gap_dir[1], gap_dir[0])))
    knots, last = [], None
    for z in (IT[2] + 24, IT[2] + 14, IT[2] + 6, IT[2], IT[2] - 12, IT[2] - 30):
        sel = np.abs(it_v[:, 2] - z) < 3
        if sel.any():
            uv = np.c_[s * it_v[sel, 0], it_v[sel, 1]]
            last = uv[np.argmax(uv @ gap_dir)]  # IT cortex facing the LT at this level
        if last is None:
            continue
        drop = max(0.0, IT[2] - z) * 0.15  # drifts slightly laterally and posteriorly lower down
        c = last + gap_dir * (protrude - a_t) + np.array([drop, -2.0 - drop])
        knots.append((z, c[0], c[1], a_t, b_t, angle))
    if not knots:
        knots = [(IT[2] + 20, IT[0] + 4, IT[1] - 6, a_t, b_t, 0.0), (IT[2] - 30, IT[0] + 8, IT[1] - 8, a_t, b_t, 0.0)]
    P.tube(SID["hamstring_tendon"], knots, s)
    hu, hy = knots[len(knots) // 2][1], knots[len(knots) // 2][2]
    # iliopsoas tendon: anterior to the hip, curving posteromedially to the LT tip
    P.tube(SID["iliopsoas_tendon"], [(H[2] + 5, H[0] - 8, H[1] + 33, 5, 3.5, 0),
                                      (LT[2] + 25, LT[0] + 1, H[1] + 6, 4.5, 3.5, 0),
                                      (LT[2] + 4, LT[0] + 1, LT[1] + 5, 3.5, 3, 0),
                                      (LT[2] - 2, LT[0] + 1, LT[1] + 2, 2.5, 2.5, 0)], s)
    # sciatic nerve: posterior to QF, lateral to the hamstring origin (in a thin fat sheath)
    P.tube(SID["fat_rim"], [(zT, H[0] - 30, H[1] - 38, 11, 8, 20), (IT[2] + 20, hu + 16, IT[1] - 22, 11, 8, 20),
                            (zB, hu + 18, IT[1] - 18, 10, 8, 10)], s, only=[SID["deep_fat"]])
    P.tube(SID["nerve"], [(zT, H[0] - 30, H[1] - 38, 8, 5, 20), (IT[2] + 20, hu + 16, IT[1] - 22, 8, 5, 20),
                          (zB, hu + 18, IT[1] - 18, 7, 5, 10)], s)
    # femoral vessels (artery lateral, vein medial) in the fat of the femoral triangle
    P.tube(SID["fat_rim"], [(zT, H[0] - 26, H[1] + 35, 16, 10, 0), (zB, H[0] - 24, H[1] + 40, 15, 10, 0)], s,
           only=[SID["deep_fat"]])
    P.tube(SID["vessel"], [(zT, H[0] - 20, H[1] + 36, 4.5, 4.5, 0), (zB, H[0] - 18, H[1] + 42, 4, 4, 0)], s)
    P.tube(SID["vessel"], [(zT, H[0] - 32, H[1] + 34, 6, 5, 0), (zB, H[0] - 29, H[1] + 38, 5.5, 5, 0)], s)
    return {"fibre": fibre / max(np.linalg.norm(fibre), 1e-6), "A": A, "B": B, "z": zq}


def _paint_gmax(P: Painter, lm: dict, side: str, soft) -> None:
    g = P.g
    s = lm["s"]
    IT, GT = lm["IT"], lm["GT"]
    xs = slice(0, int(np.searchsorted(g.x, 0.0))) if side == "left" else slice(int(np.searchsorted(g.x, 0.0)), g.shape[0])
    X = g.x[xs][:, None, None]
    Y = g.y[None, :, None]
    Z = g.z[None, None, :]
    u = s * X
    # oblique deep boundary from near the coccyx/IT to the back of the greater trochanter
    p1 = np.array([10.0, IT[1] - 22.0])
    p2 = np.array([GT[0] + 15.0, GT[1] - 8.0])
    slope = (p2[1] - p1[1]) / (p2[0] - p1[0])
    yline = p1[1] + slope * (u - p1[0])
    umin = 14.0 + np.clip(IT[2] - Z, 0, None) * 0.9  # inserts laterally lower down
    m = (Y < yline) & (u > umin) & P.deep[xs][:, :, None]
    view = P.ids[xs]
    allowed = np.zeros(256, bool)
    allowed[np.asarray(soft, dtype=np.int64)] = True
    m &= allowed[view]
    view[m] = P.new_muscle("gluteus_maximus")


def _paint_midline(P: Painter, b: Bones, L: dict, p: dict, body: dict) -> None:
    zT, zB = P.top, P.bottom
    it_y = body["it_y"]
    zi = min(L[s]["IT"][2] for s in SIDES)
    # rectum -> anal canal (midline, posterior)
    P.tube(SID["bowel"], [(zT, 0, it_y - 5, 16, 13, 0), (zi, 0, it_y + 2, 9, 8, 0), (zB, 0, it_y - 2, 7, 6, 0)], 1.0,
           only=[SID["deep_fat"]])
    # bladder above the pubic symphysis
    pt = (L["left"]["PT"] + L["right"]["PT"]) / 2
    f = p["bladder_fill"]
    P.tube(SID["fluid"], [(pt[2] + 2, 0, pt[1] - 25, 10 * f + 5, 8 * f + 4, 0),
                          (zT, 0, pt[1] - 28, 40 * f + 10, 28 * f + 8, 0)], 1.0, only=[SID["deep_fat"]])


def _medial_fat_limit(lm: dict, y: np.ndarray, z: float) -> np.ndarray:
    """Distance from the midline (per y) below which deep tissue stays fat at height z.

    Posteriorly: the pelvic cavity (medial to obturator internus) above the ischial tuberosity,
    the ischioanal fossa beside it, the perineum below it. Anteriorly (in front of the pubis) the
    adductors and pectineus may reach close to the midline.
    """
    it_top = lm["IT"][2] + 35.0
    upper = lm["H"][0] - 38.0
    middle = lm["IT"][0] - 8.0
    lower = 18.0
    w = np.clip((z - (it_top - 10.0)) / 20.0, 0.0, 1.0)
    post = w * upper + (1 - w) * middle
    v = np.clip((lm["IT"][2] - z) / 25.0, 0.0, 1.0)
    post = (1 - v) * post + v * lower
    t = np.clip((y - (lm["PT"][1] - 25.0)) / 15.0, 0.0, 1.0)  # 0 posterior -> 1 anterior
    return (1 - t) * post + t * 10.0


def _fill_muscles(P: Painter, L: dict, plane_lut: np.ndarray, max_mm: float = 30.0) -> None:
    """Give deep-fascia fat lateral of the medial fat zones to the nearest muscle, then draw fat
    planes between adjacent muscles (2D, slice by slice).

    Muscle bellies then tile the compartments like real ones. The nearest-muscle search runs on a
    ~1 mm in-plane copy. plane_lut[id] says whether muscle id gets a fat plane on its borders.
    """
    g = P.g
    f = max(1, int(round(1.0 / g.spacing[0])))
    zmaj = np.ascontiguousarray(P.ids.transpose(2, 0, 1))  # slices contiguous in memory
    u = np.abs(g.x)[:, None]
    right = (g.x > 0)[:, None]
    step = g.spacing[0] * f
    deep = SID["deep_fat"]
    for k in range(g.shape[2]):
        sl = zmaj[k]
        coarse = sl[::f, ::f]
        seeds = coarse >= MUSCLE_ID0
        if seeds.any():
            lim = np.where(right, _medial_fat_limit(L["right"], g.y, g.z[k])[None, :],
                           _medial_fat_limit(L["left"], g.y, g.z[k])[None, :])
            fill = (sl == deep) & (u >= lim)
            if fill.any():
                d, ind = ndimage.distance_transform_edt(~seeds, return_indices=True)
                near = coarse[ind[0], ind[1]]
                near[d * step > max_mm] = deep
                fi, fj = np.nonzero(fill)
                sl[fi, fj] = near[fi // f, fj // f]
        for a, b in ((sl[1:], sl[:-1]), (sl[:, 1:], sl[:, :-1])):
            edge = (a != b) & (a >= MUSCLE_ID0) & (b >= MUSCLE_ID0)
            edge &= plane_lut[a]
            a[edge] = deep
    P.ids[...] = zmaj.transpose(1, 2, 0)


def _qf_fat_sheath(P: Painter, rng: np.random.Generator) -> None:
    """Fat around the quadratus femoris, taken from the neighbouring muscles (QF itself is kept).

    In real MRI the QF is outlined by fat: posteriorly the fat of the sciatic nerve bed against
    the gluteus maximus, anteriorly thin planes against the obturator externus and adductors.
    Per side: a posterior sheath (against the gluteus maximus) in ~90 % of hips and an anterior
    one (against other muscles) in ~75 %, each 0.6-2.5 mm thick, with a slowly varying gap so the
    plane is sometimes incomplete, as on real scans.
    """
    g = P.g
    qf = P.ids == SID["quadratus_femoris"]
    if not qf.any():
        return
    is_muscle = np.zeros(256, bool)
    is_muscle[MUSCLE_ID0:] = True
    gmax = np.zeros(256, bool)
    for mid, lab in P.muscle_label.items():
        gmax[mid] = lab == LABELS["gluteus_maximus"]
    mid_x = int(np.searchsorted(g.x, 0.0))
    for xs in (slice(0, mid_x), slice(mid_x, g.shape[0])):
        m = qf[xs]
        if not m.any():
            continue
        idx = np.nonzero(m)
        pad = int(np.ceil(3.0 / g.spacing[0])) + 1
        lo = [max(0, int(i.min()) - pad) for i in idx[:2]]
        hi = [min(n, int(i.max()) + pad + 1) for i, n in zip(idx[:2], m.shape[:2])]
        z0, z1 = int(idx[2].min()), int(idx[2].max()) + 1
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(z0, z1))
        sub = m[box]
        # in-plane distance to the QF (slices are independent: a huge z sampling keeps it 2D)
        dist = ndimage.distance_transform_edt(~sub, sampling=(g.spacing[0], g.spacing[1], 1e4))
        view = P.ids[xs][box]
        # a smooth random modulation of the thickness along the muscle: planes with gaps
        noise = ndimage.gaussian_filter(rng.standard_normal(sub.shape).astype(np.float32),
                                        (6.0 / g.spacing[0], 6.0 / g.spacing[1], 4.0 / g.spacing[2]))
        noise /= max(float(noise.std()), 1e-6)
        for neighbour, prob in ((gmax, 0.9), (is_muscle & ~gmax, 0.75)):
            if rng.uniform() >= prob:
                continue
            thick = rng.uniform(0.6, 2.5) * np.clip(1.0 + 0.5 * noise, 0.0, 2.0)
            ring = (dist > 0) & (dist <= thick) & neighbour[view]
            view[ring] = SID["deep_fat"]


def _paint_bones(P: Painter, b: Bones, regions: dict) -> None:
    """Cortex (inward offset shell) and marrow of pelvis and femora; IT / LT by their balls."""
    g = P.g

    def inner_mesh(surf: Surface, thick: np.ndarray) -> np.ndarray:
        return surf.vertices - vertex_normals(surf.vertices, surf.faces) * thick[:, None]

    def paint(surf: Surface, thick: np.ndarray, balls, names):
        sl = g.crop(surf.vertices.min(0), surf.vertices.max(0))
        if sl is None:
            return
        org = g.origin + g.spacing * np.array([q.start for q in sl])
        shp = tuple(q.stop - q.start for q in sl)
        outer = rasterize(surf.vertices, surf.faces, org, g.spacing, shp)
        if not outer.any():
            return
        inner = rasterize(inner_mesh(surf, thick), surf.faces, org, g.spacing, shp) & outer
        reg = np.zeros(shp, bool)
        for region in balls:
            lo = region.centre - region.radius
            hi = np.minimum(region.centre + region.radius, [np.inf, region.y_max, region.z_max])
            rs = g.crop(lo, hi)
            if rs is None:
                continue
            # the region's box relative to the bone crop
            rel = tuple(slice(max(a.start, c.start) - c.start, min(a.stop, c.stop) - c.start)
                        for a, c in zip(rs, sl))
            if any(r.stop <= r.start for r in rel):
                continue
            X = g.x[sl[0]][rel[0]][:, None, None]
            Y = g.y[sl[1]][rel[1]][None, :, None]
            Z = g.z[sl[2]][rel[2]][None, None, :]
            reg[rel] |= region.contains(X, Y, Z)
        ids = P.ids[sl]
        shell = outer & ~inner
        ids[shell & ~reg] = SID[names[0]]
        ids[inner & ~reg] = SID[names[1]]
        ids[shell & reg] = SID[names[2]]
        ids[inner & reg] = SID[names[3]]

    # hip joint: cartilage between the femoral head and the acetabulum, on the head side of the
    # neck (painted first: the bones overwrite whatever of the shell they occupy)
    for s in SIDES:
        c, r_head = b.hip_centre[s], b.head_radius[s]
        r_out = max(b.extra["acetabulum_radius"][s], r_head + 2.0) + 0.5
        sl = g.crop(c - r_out, c + r_out)
        if sl is None:
            continue
        X = g.x[sl[0]][:, None, None] - c[0]
        Y = g.y[sl[1]][None, :, None] - c[1]
        Z = g.z[sl[2]][None, None, :] - c[2]
        rr = np.sqrt(X * X + Y * Y + Z * Z)
        n = b.neck_axis[s]
        # on the head (not the neck), and not below the head's lower third (acetabular notch)
        head_side = ((X * n[0] + Y * n[1] + Z * n[2]) > -0.35 * r_head) & (Z > -0.45 * r_head)
        P.mask(sl, (rr >= r_head - 0.5) & (rr <= r_out) & head_side, SID["cartilage"])
    pel = b.pelvis
    t = np.full(len(pel.vertices), 1.6)
    for s in SIDES:
        t = np.where(regions[s]["it"].contains_points(pel.vertices), 2.6, t)
    paint(pel, t, [regions[s]["it"] for s in SIDES],
          ("pelvis_cortex", "pelvis_marrow", "it_cortex", "it_marrow"))
    for s in SIDES:
        f = b.femur[s]
        lt_z = b.landmarks[f"LT_{s}"][2]
        t = 1.6 + 3.2 * np.clip((lt_z + 5 - f.vertices[:, 2]) / 35.0, 0, 1)  # thicker down the shaft
        paint(f, t, [regions[s]["lt"]], ("femur_cortex", "femur_marrow", "lt_cortex", "lt_marrow"))


def _qf_pathology(qf, sl, grid: Grid, fat_fraction, edema, patho: dict, info: dict, rng) -> tuple[float, float]:
    """Write QF fat streaks and edema into the maps; returns (edema share, mean fat fraction)."""
    if sl is None or not qf[sl].any():
        return 0.0, 0.0
    m = qf[sl]
    x, y, z = grid.x[sl[0]], grid.y[sl[1]], grid.z[sl[2]]
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    X, Y, Z = X[m], Y[m], Z[m]
    d = info["fibre"]
    perp = np.array([-d[1], d[0], 0.0])
    v = X * perp[0] + Y * perp[1]  # across fibres in-plane
    # streaks: smooth noise that is constant along the fibre direction
    noise = np.zeros(len(v))
    for _ in range(6):
        kv, kz = rng.uniform(0.15, 0.6), rng.uniform(0.05, 0.3)
        noise += np.cos(kv * v + kz * Z + rng.uniform(0, 2 * np.pi))
    noise = (noise - noise.mean()) / (noise.std() + 1e-9)
    target = float(patho["fat_fraction"])
    base = 0.03
    if target > base + 1e-3:
        # streak share grows with the target; streak fat ~0.9 -> solve for the share
        share = np.clip((target - base) / (0.9 - base), 0.0, 1.0)
        thr = np.quantile(noise, 1 - share) if share < 1 else -np.inf
        ffv = np.where(noise >= thr, 0.9, base)
        ffv = ffv + (target - ffv.mean())
    else:
        ffv = np.full(len(v), base)
    ffv = np.clip(ffv, 0.0, 1.0).astype(np.float32)
    sub = fat_fraction[sl]
    sub[m] = ffv
    ed = np.zeros(len(v), np.float32)
    if patho["edema"] != "none":
        n2 = np.zeros(len(v))
        for _ in range(4):
            k = rng.normal(0, 0.12, 3)
            n2 += np.cos(k[0] * X + k[1] * Y + k[2] * Z + rng.uniform(0, 2 * np.pi))
        n2 = (n2 - n2.mean()) / (n2.std() + 1e-9)
        if patho["edema"] == "mild":
            share = rng.uniform(0.15, 0.4)
            level = rng.uniform(0.25, 0.5)
        else:
            share = rng.uniform(0.7, 1.0)
            level = rng.uniform(0.5, 0.9)
        thr = np.quantile(n2, 1 - share) if share < 1 else -np.inf
        ed = np.where(n2 >= thr, level * (0.8 + 0.2 * np.tanh(n2 - thr)), 0.0).astype(np.float32)
    esub = edema[sl]
    esub[m] = ed
    return float((ed > 0.05).mean()), float(ffv.mean())
