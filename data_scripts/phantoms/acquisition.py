"""Acquisition simulation: protocols, acquisition grids, partial-volume sampling and NIfTI storage.

The patient (``Anatomy``) stays put in world RAS space; an acquisition only places a grid in it
(field of view, voxel size, slice thickness and gap, oblique tilt) and a file only chooses how that
grid is stored (axis order, flips, data type). Signals are computed on the fine anatomy grid,
blurred with the acquisition's point-spread function (in-plane Gaussian of one pixel FWHM,
through-plane the slice profile: a box of the slice thickness) and sampled at the acquisition's
voxel centres in world coordinates. Left/right is never used except through world coordinates.

Protocol distribution (``draw_protocol``): 1.5 T / 3 T 50/50; fluid series T2 fat-sat 60 % / STIR
40 %; Dixon pair 30 %; field of view bilateral 340-420 mm (matrix <= 512, pixel 0.66-1.0 mm) or
single hip 160-220 mm (pixel 0.5-1.0 mm), 70/15/15 by default; slices 3-6 mm, gap 0 (40 %) or
10-30 %, <= 50 slices; oblique tilt 0 (30 %) or 1-8 deg; fluid series on the T1 grid 50 %, else
its own thickness / pixel / slice positions / FOV; Dixon ~2 mm in-plane, 3 mm slices; storage
RAS 30 %, LPS 30 %, LAS 10 %, slice axis first 10 %, random permutation/flips 20 %; float32 40 %,
int16 with scl_slope/inter 30 %, plain int16 30 %; SNR in muscle T1 12-40, fluid 8-30, Dixon 15-40.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.image import atomic_write, grid_corners
from pipeline.labels import LABELS

from . import mr_physics as mrp
from .model import EXTENTS, TISSUES, Anatomy

FOV_KINDS = ("bilateral", "left", "right")
#: storage orientations (nibabel axis codes) and how often each is drawn
ORIENTATIONS = {"RAS": 0.3, "LPS": 0.3, "LAS": 0.1, "slice_first": 0.1, "random": 0.2}
DTYPES = {"float32": 0.4, "int16_scaled": 0.3, "int16": 0.3}
MAX_SLICES = 50
#: slice count cap of a whole-pelvis acquisition (``coverage="pelvis"``: 3 mm slices reach 240 mm)
PELVIS_MAX_SLICES = 80
MAX_INPLANE = 512


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
@dataclass
class Geometry:
    """An acquisition grid in world RAS mm, before any storage reordering.

    Array axis 0 runs along ``rotation[:, 0]`` (~ patient right), axis 1 along ``rotation[:, 1]``
    (~ anterior), axis 2 along ``rotation[:, 2]`` (~ superior, the slice axis). ``centre`` is the
    world position of the grid centre. ``slice_spacing`` = thickness * (1 + gap).
    """

    shape: tuple[int, int, int]
    pixel: tuple[float, float]
    thickness: float
    gap: float
    centre: tuple[float, float, float]
    angles_deg: tuple[float, float, float]

    @property
    def slice_spacing(self) -> float:
        return self.thickness * (1.0 + self.gap)

    @property
    def rotation(self) -> np.ndarray:
        return rotation_xyz(self.angles_deg)

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> world RAS mm of the canonical (unreordered) grid."""
        spac = np.array([self.pixel[0], self.pixel[1], self.slice_spacing])
        lin = self.rotation * spac[None, :]
        half = (np.asarray(self.shape, float) - 1.0) / 2.0
        aff = np.eye(4)
        aff[:3, :3] = lin
        aff[:3, 3] = np.asarray(self.centre, float) - lin @ half
        return aff

    def as_dict(self) -> dict:
        """JSON-serialisable description."""
        d = asdict(self)
        d["slice_spacing"] = self.slice_spacing
        d["fov_mm"] = [round(self.shape[0] * self.pixel[0], 1), round(self.shape[1] * self.pixel[1], 1)]
        return _round(d)


def rotation_xyz(angles_deg) -> np.ndarray:
    """Rotation matrix R = Rz @ Ry @ Rx for angles (degrees) about the world x, y, z axes."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _round(obj, nd: int = 4):
    """Recursively convert numpy types to Python and round floats (for JSON)."""
    if isinstance(obj, dict):
        return {str(k): _round(v, nd) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, nd) for v in obj]
    if isinstance(obj, np.ndarray):
        return _round(obj.tolist(), nd)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return round(float(obj), nd)
    return obj


to_jsonable = _round


# ----------------------------------------------------------------------------------------------
# landmarks of an anatomy that the protocol needs (coverage, centring)
# ----------------------------------------------------------------------------------------------
def landmarks(anatomy: Anatomy) -> dict:
    """World-space landmarks used to place acquisitions.

    Returns per side present (from ``anatomy.surfaces``) the IT and LT centroids and z-ranges and
    the top of the femoral head (from the femur label), plus the body's bounding box.
    """
    aff = anatomy.affine
    lab = anatomy.labels
    femur = lab == LABELS["femur"]
    femur_xz = femur.any(axis=1)  # (I, K)
    body = anatomy.tissue != TISSUES["air"]
    body_xy = body.any(axis=2)
    body_z = body.any(axis=(0, 1))
    del femur, body

    def axis_world(axis: int, idx: np.ndarray) -> np.ndarray:
        # the fine grid is axis-aligned: world coordinate of index idx along axis
        return aff[axis, axis] * idx + aff[axis, 3]

    out: dict = {"sides": {}}
    xi = np.nonzero(body_xy.any(axis=1))[0]
    yi = np.nonzero(body_xy.any(axis=0))[0]
    zi = np.nonzero(body_z)[0]
    box = []
    for axis, ids in ((0, xi), (1, yi), (2, zi)):
        w = axis_world(axis, np.array([ids.min(), ids.max()]) if ids.size else np.array([0, 0]))
        box.append(sorted(w.tolist()))
    out["body_box"] = box
    corners = grid_corners(anatomy.shape, aff)
    out["grid_box"] = [[float(corners[:, a].min()), float(corners[:, a].max())] for a in range(3)]
    for side in ("left", "right"):
        if (side, "lesser_trochanter") not in anatomy.surfaces or (side, "ischial_tuberosity") not in anatomy.surfaces:
            continue
        lt = anatomy.surfaces[(side, "lesser_trochanter")].vertices
        it = anatomy.surfaces[(side, "ischial_tuberosity")].vertices
        d = {"lt_centre": lt.mean(0), "it_centre": it.mean(0),
             "lt_z": (float(lt[:, 2].min()), float(lt[:, 2].max())),
             "it_z": (float(it[:, 2].min()), float(it[:, 2].max()))}
        # femoral head top: highest femur voxel within 70 mm (in x) of this side's LT
        xs = axis_world(0, np.arange(femur_xz.shape[0]))
        near = np.abs(xs - d["lt_centre"][0]) < 70.0
        cols = femur_xz[near].any(axis=0)
        if cols.any():
            zs = axis_world(2, np.nonzero(cols)[0])
            d["head_top_z"] = float(zs.max())
        else:
            d["head_top_z"] = float(d["lt_z"][1] + 70.0)
        out["sides"][side] = d
    if not out["sides"]:
        raise ValueError("anatomy has no (side, lesser_trochanter / ischial_tuberosity) surfaces")
    return out


# ----------------------------------------------------------------------------------------------
# protocol
# ----------------------------------------------------------------------------------------------
@dataclass
class Protocol:
    """Everything drawn for one subject's examination."""

    field_t: float
    fov_kind: str
    fluid_kind: str
    sequences: dict            # kind -> mr_physics.Sequence (t1, fluid kind, optionally dixon)
    geometries: dict           # "t1" / "fluid" / "dixon" -> Geometry
    snr: dict                  # series -> SNR in healthy muscle
    orientation: str           # storage axis codes, e.g. "RAS", "LPS", "SRA"
    dtype: str                 # "float32" | "int16_scaled" | "int16"
    gains: dict                # series -> scanner intensity scale
    fluid_same_grid: bool
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-serialisable description (goes into truth.json "acquisition")."""
        return _round({
            "field_strength_t": self.field_t,
            "fov_kind": self.fov_kind,
            "fluid_kind": self.fluid_kind,
            "sequences": {k: s.as_dict() for k, s in self.sequences.items()},
            "grids": {k: g.as_dict() for k, g in self.geometries.items()},
            "fluid_same_grid_as_t1": self.fluid_same_grid,
            "snr_muscle": self.snr,
            "storage_orientation_requested": self.orientation,
            "dtype": self.dtype,
            **self.extra,
        })


def _choice(rng: np.random.Generator, table: dict):
    keys = list(table)
    p = np.asarray([table[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def draw_fov_kind(rng: np.random.Generator, fov_mix: dict | None = None) -> str:
    """Bilateral pelvis or single hip, with probabilities ``fov_mix`` (default 70/15/15)."""
    return _choice(rng, fov_mix or {"bilateral": 0.7, "left": 0.15, "right": 0.15})


def _inplane(rng, fov_x: float, fov_y: float, pixel_range=(0.5, 1.0), n_range=(64, MAX_INPLANE)):
    """Matrix and pixel size for a FOV: pixel drawn, matrix rounded up to a multiple of 16 (so the
    pixel does not exceed the drawn one unless the matrix hits its maximum)."""
    pix = rng.uniform(*pixel_range)
    nx = int(np.clip(np.ceil(fov_x / pix / 16.0) * 16, n_range[0], n_range[1]))
    if fov_x / nx < pixel_range[0] * 0.999 and nx - 16 >= n_range[0]:
        nx -= 16
    pix = fov_x / nx
    ny = int(min(MAX_INPLANE, max(32, np.round(fov_y / pix))))
    return nx, ny, pix


def _slices(rng, z_lo: float, z_hi: float, thickness: float, gap: float, margins=(10.0, 30.0, 5.0, 20.0),
            max_slices: int = MAX_SLICES):
    """Number of slices and slab centre z covering [z_lo - m_below, z_hi + m_above] (<= max_slices)."""
    spacing = thickness * (1 + gap)
    m_below = rng.uniform(margins[0], margins[1])
    m_above = rng.uniform(margins[2], margins[3])
    lo, hi = z_lo - m_below, z_hi + m_above
    n = int(np.ceil((hi - lo) / spacing)) + 1
    if n > max_slices:  # drop the margins before cutting coverage
        lo, hi = z_lo - 5.0, z_hi + 5.0
        n = min(max_slices, int(np.ceil((hi - lo) / spacing)) + 1)
    return n, 0.5 * (lo + hi)


def _angles(rng, max_deg: float = 8.0, p_zero: float = 0.3):
    """Small oblique tilt: mostly about the left-right axis; total <= max_deg; sometimes none."""
    if rng.uniform() < p_zero:
        return (0.0, 0.0, 0.0)
    a = np.array([rng.uniform(-1, 1), 0.5 * rng.uniform(-1, 1), 0.5 * rng.uniform(-1, 1)])
    a *= rng.uniform(1.0, max_deg) / np.linalg.norm(a)
    return tuple(float(v) for v in a)


def draw_geometry(rng: np.random.Generator, lm: dict, fov_kind: str, *, thickness=None, gap=None,
                  pixel_range=(0.5, 1.0), fov_scale: float = 1.0, angles=None, force_angles=None,
                  coverage: str = "hips") -> Geometry:
    """Draw an axial acquisition grid covering the femoral head(s) down below the lesser trochanter(s)
    (``coverage="pelvis"``: from the anatomy's top, the iliac crests, down 40-60 mm below them).

    ``angles``: use these tilt angles instead of drawing them; ``force_angles``: draw as usual (same
    random stream) but use these.
    """
    if coverage not in EXTENTS:      # a "pelvis" slab needs an anatomy of that extent, else it is trimmed
        raise ValueError(f"coverage must be one of {EXTENTS}, not {coverage!r}")
    sides = lm["sides"]
    use = [fov_kind] if fov_kind in sides else list(sides)
    z_lo = min(sides[s]["lt_z"][0] for s in use)
    z_hi = max(sides[s]["head_top_z"] for s in use)
    body = lm["body_box"]
    if fov_kind == "bilateral":
        cx = float(np.mean([0.5 * (sides[s]["lt_centre"][0] + sides[s]["it_centre"][0]) for s in use]))
        if len(use) == 2:
            cx = 0.5 * (sides["left"]["it_centre"][0] + sides["right"]["it_centre"][0])
        cx += rng.uniform(-8, 8)
        cy = 0.5 * (body[1][0] + body[1][1]) + rng.uniform(-8, 8)
        fov_x = rng.uniform(340, 420) * fov_scale
        ap = body[1][1] - body[1][0]
        fov_y = float(np.clip(max(fov_x * rng.uniform(0.65, 0.9), ap + 10.0), 0.5 * fov_x, fov_x))
    else:
        s = sides[fov_kind]
        cx = 0.5 * (s["lt_centre"][0] + s["it_centre"][0]) + rng.uniform(-10, 10)
        cy = 0.5 * (s["lt_centre"][1] + s["it_centre"][1]) + rng.uniform(-10, 10)
        fov_x = rng.uniform(160, 220) * fov_scale
        fov_y = fov_x * rng.uniform(0.85, 1.0)
    nx, ny, pix = _inplane(rng, fov_x, fov_y, pixel_range)
    if thickness is None:
        thickness = float(np.round(rng.uniform(3.0, 6.0) * 2) / 2)
    if gap is None:
        gap = 0.0 if rng.uniform() < 0.4 else float(rng.uniform(0.1, 0.3))
    if coverage == "pelvis":
        nz, cz = _slices(rng, z_lo - 40.0, lm["grid_box"][2][1] - 15.0, thickness, gap,
                         margins=(0.0, 20.0, 0.0, 5.0), max_slices=PELVIS_MAX_SLICES)
    else:
        nz, cz = _slices(rng, z_lo, z_hi, thickness, gap)
    if angles is None:
        angles = _angles(rng)
    if force_angles is not None:
        angles = force_angles
    g = Geometry((nx, ny, nz), (pix, pix), float(thickness), float(gap), (float(cx), float(cy), float(cz)),
                 tuple(float(a) for a in angles))
    return fit_to_anatomy(g, lm, inplane=fov_kind != "bilateral", sides=use)


def _need_z(lm: dict, sides) -> tuple[float, float]:
    """z range the slices must cover so that the IT and LT truth surfaces are inside the volume."""
    s = [lm["sides"][k] for k in sides if k in lm["sides"]]
    return (min(min(v["lt_z"][0], v["it_z"][0]) for v in s) - 3.0,
            max(max(v["lt_z"][1], v["it_z"][1]) for v in s) + 3.0)


def fit_to_anatomy(g: Geometry, lm: dict, inplane: bool, tol_mm: float = 15.0, min_slices: int = 8,
                   sides=("left", "right")) -> Geometry:
    """Trim a grid so that it stays within the fine anatomy grid (up to ``tol_mm``, which sampling
    fills by edge extension): slices beyond the anatomy's top/bottom are dropped, and for a
    single-hip field of view (anatomy cut out of the body) the in-plane FOV is shrunk/shifted.
    The slab is then shifted, if needed, so that the IT and LT of ``sides`` stay covered."""
    box = np.asarray(lm["grid_box"])
    shape, centre = list(g.shape), np.asarray(g.centre, float)
    if inplane:
        for axis in (0, 1):
            width = box[axis, 1] - box[axis, 0] - 2.0
            # in-plane extent of the rotated FOV along this world axis
            ext = np.abs(g.rotation[axis, :2]) @ (np.asarray(shape[:2]) * np.asarray(g.pixel)) / 2.0
            if 2 * ext > width:  # fewer pixels of the same size: a smaller FOV
                shape[axis] = int(shape[axis] * width / (2 * ext))
                ext = width / 2.0
            centre[axis] = np.clip(centre[axis], box[axis, 0] + 1 + ext, box[axis, 1] - 1 - ext)
    g = Geometry(tuple(shape), g.pixel, g.thickness, g.gap, tuple(centre.tolist()), g.angles_deg)
    for _ in range(2):
        c = grid_corners(g.shape, g.affine)
        half_th = 0.5 * g.thickness * abs(g.rotation[2, 2])
        over_top = c[:, 2].max() + half_th - 0.5 * g.slice_spacing - box[2, 1] - tol_mm
        over_bot = box[2, 0] - (c[:, 2].min() - half_th + 0.5 * g.slice_spacing) - tol_mm
        n_top = int(np.ceil(max(over_top, 0.0) / g.slice_spacing))
        n_bot = int(np.ceil(max(over_bot, 0.0) / g.slice_spacing))
        if n_top + n_bot == 0:
            break
        n = max(min_slices, g.shape[2] - n_top - n_bot)
        shift = 0.5 * (n_bot - n_top) * g.slice_spacing if n > min_slices else 0.0
        cen = np.asarray(g.centre) + g.rotation[:, 2] * shift
        g = Geometry((g.shape[0], g.shape[1], n), g.pixel, g.thickness, g.gap, tuple(cen.tolist()), g.angles_deg)
    lo, hi = _need_z(lm, sides)
    half = 0.5 * (g.shape[2] - 1) * g.slice_spacing * abs(g.rotation[2, 2])
    cz = g.centre[2]
    shift = min(lo - (cz - half), 0.0) + max(hi - (cz + half), 0.0) if (hi - lo) <= 2 * half else 0.0
    if shift:
        cen = np.asarray(g.centre) + g.rotation[:, 2] * shift / abs(g.rotation[2, 2])
        g = Geometry(g.shape, g.pixel, g.thickness, g.gap, tuple(cen.tolist()), g.angles_deg)
    return g


def _vary_fluid_geometry(rng, t1: Geometry, lm: dict, fov_kind: str, pixel_range=None,
                         coverage: str = "hips") -> Geometry:
    """A fluid-series grid different from the T1's (other thickness / pixel / positions / FOV)."""
    thick = float(np.round(rng.uniform(3.0, 6.0) * 2) / 2) if rng.uniform() < 0.6 else t1.thickness
    gap = t1.gap if rng.uniform() < 0.6 else (0.0 if rng.uniform() < 0.4 else float(rng.uniform(0.1, 0.3)))
    angles = t1.angles_deg if rng.uniform() < 0.7 else _angles(rng)
    g = draw_geometry(rng, lm, fov_kind, thickness=thick, gap=gap, angles=angles,
                      fov_scale=rng.uniform(0.9, 1.1), pixel_range=pixel_range or (0.55, 1.0), coverage=coverage)
    if rng.uniform() < 0.5:  # same slab centre and FOV centre, different sampling
        g = Geometry(g.shape, g.pixel, g.thickness, g.gap,
                     (t1.centre[0], t1.centre[1], t1.centre[2] + rng.uniform(-0.5, 0.5) * g.slice_spacing),
                     g.angles_deg)
        g = fit_to_anatomy(g, lm, inplane=fov_kind != "bilateral",
                           sides=[fov_kind] if fov_kind in lm["sides"] else list(lm["sides"]))
    return g


def dixon_geometry(rng: np.random.Generator, lm: dict, t1: Geometry) -> Geometry:
    """Dixon (population-study style): ~2 mm in-plane, 3 mm contiguous slices, axial, larger FOV."""
    pix = rng.uniform(1.7, 2.2)
    fov_x = t1.shape[0] * t1.pixel[0] * rng.uniform(1.05, 1.25)
    fov_y = t1.shape[1] * t1.pixel[1] * rng.uniform(1.05, 1.25)
    nx, ny = int(np.ceil(fov_x / pix)), int(np.ceil(fov_y / pix))
    sides = lm["sides"]
    z_lo = min(s["lt_z"][0] for s in sides.values())
    z_hi = max(s["head_top_z"] for s in sides.values())
    nz, cz = _slices(rng, z_lo, z_hi, 3.0, 0.0, margins=(15.0, 30.0, 10.0, 20.0))
    centre = (t1.centre[0] + rng.uniform(-5, 5), t1.centre[1] + rng.uniform(-5, 5), cz)
    return fit_to_anatomy(Geometry((nx, ny, nz), (pix, pix), 3.0, 0.0, centre, (0.0, 0.0, 0.0)), lm,
                          inplane=t1.shape[0] * t1.pixel[0] < 300, sides=list(lm["sides"]))


#: slice planes a non-axial series can be acquired in, as base tilt angles (``rotation_xyz``):
#: coronal: array axes ~ R, S, slice normal ~ P; sagittal: ~ A, S, slice normal ~ R
PLANES = {"coronal": (90.0, 0.0, 0.0), "sagittal": (90.0, 0.0, 90.0)}


def plane_geometry(rng: np.random.Generator, lm: dict, fov_kind: str, plane: str, t1: Geometry,
                   pixel_range=None, max_slices: int = MAX_SLICES) -> Geometry:
    """A coronal or sagittal acquisition grid (e.g. the coronal STIR of a hip protocol).

    Slices of 3-5 mm (gap 0 or 10-30 %), a few degrees of tilt, in-plane pixel 0.6-1.0 mm (or
    ``pixel_range``). The slab covers the measured structures (IT, LT and the QF between them)
    of the hips in the field of view with 25-40 mm to spare; in-plane it spans the T1's
    left-right field of view (coronal) and the anatomy's full superior-inferior extent, within
    the simulated anatomy grid (beyond it there is no anatomy to image).
    """
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {sorted(PLANES)} (or axial)")
    sides = lm["sides"]
    use = [sides[fov_kind]] if fov_kind in sides else list(sides.values())
    pts = np.array([p for s in use for p in (s["lt_centre"], s["it_centre"])], float)
    box = np.asarray(lm["grid_box"], float)
    thickness = float(np.round(rng.uniform(3.0, 5.0) * 2) / 2)
    gap = 0.0 if rng.uniform() < 0.5 else float(rng.uniform(0.1, 0.3))
    pix = float(rng.uniform(*(pixel_range or (0.6, 1.0))))
    tilt = _angles(rng, max_deg=5.0)
    angles = tuple(float(b + t) for b, t in zip(PLANES[plane], tilt))
    normal = 1 if plane == "coronal" else 0          # world axis the slices are stacked along
    inplane = [a for a in (0, 1) if a != normal] + [2]
    margin = rng.uniform(25.0, 40.0, 2)
    lo = max(pts[:, normal].min() - margin[0], box[normal, 0] + 2.0)
    hi = min(pts[:, normal].max() + margin[1], box[normal, 1] - 2.0)
    spacing = thickness * (1.0 + gap)
    n_slices = min(max_slices, int(np.ceil((hi - lo) / spacing)) + 1)
    centre = np.zeros(3)
    centre[normal] = 0.5 * (lo + hi)
    shape = [0, 0, n_slices]
    for k, a in enumerate(inplane):
        if a == 0:     # left-right: the T1's field of view, within the anatomy grid
            half_t1 = 0.5 * t1.shape[0] * t1.pixel[0]
            a_lo = max(t1.centre[0] - half_t1, box[0, 0] + 2.0)
            a_hi = min(t1.centre[0] + half_t1, box[0, 1] - 2.0)
        else:          # the anatomy's extent (6 mm inside, for the tilt)
            a_lo, a_hi = box[a, 0] + 6.0, box[a, 1] - 6.0
        shape[k] = int(min(MAX_INPLANE, np.floor((a_hi - a_lo) / pix)))
        centre[a] = 0.5 * (a_lo + a_hi)
    return Geometry(tuple(shape), (pix, pix), thickness, gap, tuple(centre.tolist()), angles)


def _orientation_code(rng: np.random.Generator, choice: str) -> str:
    """Resolve an orientation choice to a 3-letter nibabel axis code (slice axis ~ S/I)."""
    if choice == "slice_first":
        return "".join(rng.choice([["S", "R", "A"], ["I", "L", "P"], ["S", "L", "P"]]))
    if choice == "random":
        perm = rng.permutation(3)
        pairs = [("R", "L"), ("A", "P"), ("S", "I")]
        return "".join(pairs[p][int(rng.integers(2))] for p in perm)
    if len(choice) == 3 and set(choice.upper()) <= set("RLAPSI"):
        return choice.upper()
    raise ValueError(f"unknown orientation {choice!r}")


def draw_protocol(rng: np.random.Generator, lm: dict, fov_kind: str, **overrides) -> Protocol:
    """Draw a subject's examination protocol.

    Overrides (all optional): ``field_t`` (1.5 / 3.0), ``fluid_kind`` ("t2fs" / "stir"),
    ``dixon`` (bool), ``orientation`` ("RAS", "LPS", "slice_first", "random" or a 3-letter code),
    ``oblique`` (False -> no tilt; a number -> tilt of that many degrees about the left-right axis),
    ``dtype`` ("float32" / "int16_scaled" / "int16"), ``fluid_same_grid`` (bool), ``snr`` (float,
    for every series), ``thickness`` and ``gap`` (T1), ``pixel`` (in-plane mm of T1 and fluid),
    ``fluid_plane`` ("axial", the default, or "coronal" / "sagittal": ``plane_geometry``),
    ``coverage`` of the axial T1 and fluid slabs (``model.EXTENTS``; Dixon keeps its own). All
    random numbers are drawn first in a fixed order, so an override changes nothing else about the
    subject.
    """
    field_t = 1.5 if rng.uniform() < 0.5 else 3.0
    fluid_kind = "t2fs" if rng.uniform() < 0.6 else "stir"
    dixon = bool(rng.uniform() < 0.3)
    orient_choice = _choice(rng, ORIENTATIONS)
    orient_rng = np.random.default_rng(rng.integers(2**32))
    dtype = _choice(rng, DTYPES)
    same = bool(rng.uniform() < 0.5)
    snr = {"t1": float(rng.uniform(12, 40)), "fluid": float(rng.uniform(8, 30)), "dixon": float(rng.uniform(15, 40))}
    gains = {k: float(rng.uniform(300, 3000)) for k in ("t1", "fluid", "dixon")}
    seq_rng = np.random.default_rng(rng.integers(2**32))
    geo_rng = np.random.default_rng(rng.integers(2**32))

    field_t = float(overrides.get("field_t", field_t))
    fluid_kind = overrides.get("fluid_kind", fluid_kind)
    dixon = bool(overrides.get("dixon", dixon))
    orientation = _orientation_code(orient_rng, overrides.get("orientation", orient_choice))
    dtype = overrides.get("dtype", dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}")
    same = bool(overrides.get("fluid_same_grid", same))
    if "snr" in overrides:
        snr = {k: float(overrides["snr"]) for k in snr}
    if fluid_kind not in ("t2fs", "stir"):
        raise ValueError("fluid_kind must be t2fs or stir")

    seqs = {"t1": mrp.draw_sequence("t1", field_t, seq_rng),
            fluid_kind: mrp.draw_sequence(fluid_kind, field_t, seq_rng)}
    dix_seq = mrp.draw_sequence("dixon", field_t, seq_rng)
    if dixon:
        seqs["dixon"] = dix_seq

    angles = None
    ob = overrides.get("oblique", None)
    if ob is False or ob == 0:
        angles = (0.0, 0.0, 0.0)
    elif ob is not None and ob is not True:
        angles = (float(ob), 0.0, 0.0)
    pix = overrides.get("pixel")
    pix_range = (0.5, 1.0) if pix is None else (float(pix), float(pix))
    coverage = overrides.get("coverage", "hips")
    t1 = draw_geometry(geo_rng, lm, fov_kind, thickness=overrides.get("thickness"), gap=overrides.get("gap"),
                       pixel_range=pix_range, force_angles=angles, coverage=coverage)
    fluid = _vary_fluid_geometry(geo_rng, t1, lm, fov_kind, None if pix is None else pix_range, coverage)
    if same:
        fluid = t1
    geos = {"t1": t1, "fluid": fluid}
    dix = dixon_geometry(geo_rng, lm, t1)
    if dixon:
        geos["dixon"] = dix
    plane = overrides.get("fluid_plane", "axial")
    if plane != "axial":    # drawn last, from its own stream: the other series stay as they were
        geos["fluid"] = plane_geometry(np.random.default_rng(geo_rng.integers(2**32)), lm, fov_kind,
                                       plane, t1, None if pix is None else pix_range)
        same = False
    return Protocol(field_t, fov_kind, fluid_kind, seqs, geos, snr, orientation, dtype, gains, same,
                    extra={} if coverage == "hips" else {"coverage": coverage})


# ----------------------------------------------------------------------------------------------
# partial-volume sampling
# ----------------------------------------------------------------------------------------------
def fine_crop(anatomy: Anatomy, geometry: Geometry, margin_mm: float = 8.0) -> tuple[slice, slice, slice]:
    """Index box of the fine grid that covers ``geometry`` (plus a PSF margin)."""
    inv = np.linalg.inv(anatomy.affine)
    corners = grid_corners(geometry.shape, geometry.affine)
    vox = corners @ inv[:3, :3].T + inv[:3, 3]
    marg = margin_mm / anatomy.spacing
    lo = np.floor(vox.min(0) - marg).astype(int)
    hi = np.ceil(vox.max(0) + marg).astype(int) + 1
    shape = np.asarray(anatomy.shape)
    lo = np.clip(lo, 0, shape)
    hi = np.clip(hi, lo + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _box_kernel(width_vox: float) -> np.ndarray:
    """Normalised box of (fractional) width ``width_vox`` sampled on unit voxels."""
    if width_vox <= 1.0:
        return np.ones(1, dtype=np.float32)
    half = width_vox / 2.0
    n = int(np.ceil(half - 0.5))
    x = np.arange(-n, n + 1, dtype=np.float64)
    w = np.clip(half + 0.5 - np.abs(x), 0.0, 1.0)
    return (w / w.sum()).astype(np.float32)


def blur_psf(volume: np.ndarray, fine_spacing: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Blur a fine-grid volume with the acquisition PSF (in place where possible).

    In-plane: Gaussian with FWHM = pixel; through-plane: box of the slice thickness along the
    fine axis closest to the slice normal (the tilt is at most a few degrees). The fine grid is
    axis-aligned, so the blur is separable. The interpolation at sampling adds ~ one fine voxel.
    """
    rot = np.abs(geometry.rotation)
    normal_axis = int(np.argmax(rot[:, 2]))
    # world PSF variances along the acquisition axes, projected onto the fine axes (in-plane only)
    sig_w = np.array([geometry.pixel[0], geometry.pixel[1], 0.0]) / 2.355
    var_fine = (rot ** 2) @ (sig_w ** 2)
    for axis in range(3):
        if axis == normal_axis:
            k = _box_kernel(geometry.thickness / fine_spacing[axis])
            if k.size > 1:
                ndimage.convolve1d(volume, k, axis=axis, output=volume, mode="nearest")
            continue
        sig = np.sqrt(max(var_fine[axis] - (0.4 * fine_spacing[axis]) ** 2, 0.0)) / fine_spacing[axis]
        if sig >= 0.5:  # below half a fine voxel the sampling interpolation blurs as much
            ndimage.gaussian_filter1d(volume, sig, axis=axis, output=volume, mode="nearest", truncate=3.0)
    return volume


def sample_on_grid(volume: np.ndarray, crop_affine: np.ndarray, geometry: Geometry, order: int = 1) -> np.ndarray:
    """Sample a fine-grid volume at the acquisition voxel centres (world coordinates)."""
    # In-plane, outside the anatomy grid is air: pad one voxel of zeros so that "nearest" sampling
    # yields air there. Through-plane, "nearest" lets a few mm of a tilted slab beyond the anatomy's
    # top/bottom repeat its edge (the slab is trimmed to stay within ``tol_mm`` of it).
    padded = np.pad(volume, ((1, 1), (1, 1), (0, 0)))
    shift = np.eye(4)
    shift[:2, 3] = -1.0
    m = np.linalg.inv(crop_affine @ shift) @ geometry.affine
    out = np.empty(geometry.shape, dtype=volume.dtype)
    ndimage.affine_transform(padded, m[:3, :3], offset=m[:3, 3], output_shape=geometry.shape, output=out,
                             order=order, mode="nearest", prefilter=False)
    return out


def _crop_affine(anatomy: Anatomy, crop) -> np.ndarray:
    aff = anatomy.affine.copy()
    aff[:3, 3] = anatomy.affine[:3, :3] @ np.array([s.start for s in crop], float) + anatomy.affine[:3, 3]
    return aff


def fat_residual_factors(crop_affine: np.ndarray, shape, centre, lo: float, hi: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spatially varying residual fat after fat saturation, as three separable 1D factors.

    ``lo`` near a (jittered) centre, rising smoothly (Gaussian in distance) towards ``hi`` far
    (~200-300 mm) off-centre, as off-resonance grows away from the magnet's sweet spot.
    """
    c = np.asarray(centre, float) + rng.uniform(-40, 40, 3)
    scales = rng.uniform(180, 300, 3)
    a = np.log(hi / lo)
    facs = []
    for axis in range(3):
        w = crop_affine[axis, axis] * np.arange(shape[axis]) + crop_affine[axis, 3]
        u = np.minimum(((w - c[axis]) / scales[axis]) ** 2, 1.5)
        facs.append(np.exp(a * u / 4.5).astype(np.float32))  # product over 3 axes reaches hi
    facs[0] = facs[0] * np.float32(lo)
    return tuple(facs)  # type: ignore[return-value]


def block_mean(volume: np.ndarray, factors, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average non-overlapping blocks of ``factors`` voxels (exact partial-volume downsampling)."""
    f = [int(v) for v in factors]
    if f == [1, 1, 1]:
        return volume, affine
    n = [(s // k) * k for s, k in zip(volume.shape, f)]
    out = np.zeros([a // k for a, k in zip(n, f)], np.float32)
    for a in range(f[0]):
        for b in range(f[1]):
            for c in range(f[2]):
                out += volume[a:n[0]:f[0], b:n[1]:f[1], c:n[2]:f[2]]
    out *= np.float32(1.0 / np.prod(f))
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] * np.asarray(f, float)[None, :]
    aff[:3, 3] = affine[:3, :3] @ ((np.asarray(f, float) - 1.0) / 2.0) + affine[:3, 3]
    return out, aff


def _downsample_factors(spacing: np.ndarray, geometry: Geometry) -> list[int]:
    """Block sizes that keep >= 2 fine voxels per acquisition pixel in-plane (1 along the slice normal)."""
    normal_axis = int(np.argmax(np.abs(geometry.rotation[:, 2])))
    pix = min(geometry.pixel)
    return [1 if a == normal_axis else max(1, int(pix / (2.0 * spacing[a]) + 1e-6)) for a in range(3)]


def _intersect(box, crop):
    """``box`` (slices in the full grid, or None) expressed inside ``crop``; None if disjoint."""
    if box is None:
        return None
    out = []
    for b, c in zip(box, crop):
        lo, hi = max(b.start, c.start), min(b.stop, c.stop)
        if hi <= lo:
            return None
        out.append(slice(lo - c.start, hi - c.start))
    return tuple(out)


def acquire_series(anatomy: Anatomy, seq: mrp.Sequence, ts: mrp.TissueSet, geometry: Geometry,
                   snr: float, gain: float, rng: np.random.Generator, edema_box="auto") -> list[np.ndarray]:
    """Simulate one series on its canonical grid: signal -> PSF -> sample -> bias and texture ->
    Rician noise.

    Returns a list of float32 arrays (one; two for Dixon: water, fat) on ``geometry``. ``snr`` is
    the mean healthy-muscle signal over the noise standard deviation; ``gain`` scales the output
    to scanner-like intensity units. ``edema_box``: ``mr_physics.nonzero_box(anatomy.edema)``
    when already known (saves a pass over the volume), "auto" to find it here.
    """
    crop = fine_crop(anatomy, geometry)
    caff = _crop_affine(anatomy, crop)
    tissue = np.ascontiguousarray(anatomy.tissue[crop])
    ff = np.ascontiguousarray(anatomy.fat_fraction[crop], dtype=np.float32)
    ed = anatomy.edema[crop]
    if isinstance(edema_box, str):
        edema_box = mrp.nonzero_box(anatomy.edema)
    box = _intersect(edema_box, crop)
    if seq.kind == "dixon":
        fine = list(mrp.dixon_images(ts, seq, tissue, ff, ed, edema_box=box))
    else:
        residual: object = 1.0
        if seq.fat_residual is not None:
            residual = fat_residual_factors(caff, tissue.shape, geometry.centre, *seq.fat_residual, rng)
        fine = [mrp.simulate(seq, ts, tissue, ff, ed, fat_residual=residual, edema_box=box)]
    del tissue, ff, ed
    ref = mrp.reference_signal(seq, ts)
    bias = mrp.bias_field(geometry.shape, rng)
    texture = mrp.texture_field(geometry.shape, min(geometry.pixel), rng)
    factors = _downsample_factors(anatomy.spacing, geometry)
    out = []
    while fine:
        vol, aff = block_mean(fine.pop(0), factors, caff)
        blur_psf(vol, np.sqrt((aff[:3, :3] ** 2).sum(0)), geometry)
        img = sample_on_grid(vol, aff, geometry)
        del vol
        mrp.apply_bias(img, bias)
        img *= texture
        mrp.add_rician_noise(img, ref / snr, rng)
        img *= np.float32(gain / max(ref, 1e-6) / 4.0)
        out.append(img)
    return out


def sample_labels(anatomy: Anatomy, geometry: Geometry) -> np.ndarray:
    """Project labels at the acquisition voxel centres (nearest fine voxel), uint8."""
    crop = fine_crop(anatomy, geometry, margin_mm=2.0)
    lab = np.ascontiguousarray(anatomy.labels[crop])
    return sample_on_grid(lab, _crop_affine(anatomy, crop), geometry, order=0)


# ----------------------------------------------------------------------------------------------
# storage
# ----------------------------------------------------------------------------------------------
def reorient(array: np.ndarray, affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip an array so its axes run along the axis code ``code`` (e.g. "LPS", "SRA").

    Only the storage changes: the returned affine maps the new indices to the same world points.
    """
    import nibabel as nib

    cur = nib.orientations.io_orientation(affine)
    tgt = nib.orientations.axcodes2ornt(tuple(code))
    tr = nib.orientations.ornt_transform(cur, tgt)
    arr = nib.orientations.apply_orientation(array, tr)
    aff = affine @ nib.orientations.inv_ornt_aff(tr, array.shape)
    return np.ascontiguousarray(arr), aff


def _gzip(data: bytes) -> bytes:
    """gzip-compress (level 1) with ISA-L when installed (~10x faster on noisy images), else zlib."""
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - optional speed-up
        import gzip as igzip
    return igzip.compress(data, compresslevel=1, mtime=0)


def write_nifti(path, array: np.ndarray, affine: np.ndarray, dtype: str) -> dict:
    """Write a NIfTI atomically with the requested storage type; returns the storage description.

    ``float32``; ``int16_scaled``: int16 with scl_slope/scl_inter chosen by nibabel to span the
    data; ``int16``: values rounded to integers (unscaled, as many converters do); ``uint8``
    for label maps.
    """
    import nibabel as nib

    if dtype == "float32":
        img = nib.Nifti1Image(array.astype(np.float32, copy=False), affine)
    elif dtype == "int16_scaled":
        img = nib.Nifti1Image(array.astype(np.float32, copy=False), affine)
        img.set_data_dtype(np.int16)
    elif dtype == "int16":
        img = nib.Nifti1Image(np.clip(np.rint(array), -32768, 32767).astype(np.int16), affine)
    elif dtype == "uint8":
        img = nib.Nifti1Image(array.astype(np.uint8, copy=False), affine)
    else:
        raise ValueError(f"unknown dtype {dtype!r}")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    if str(path).endswith(".gz"):
        data = _gzip(img.to_bytes())
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    else:
        atomic_write(path, lambda tmp: nib.save(img, tmp))
    return {"dtype": dtype, "axcodes": "".join(nib.aff2axcodes(affine)),
            "shape": list(array.shape), "spacing_mm": np.sqrt((affine[:3, :3] ** 2).sum(0)).round(4).tolist()}
