"""Quadratus femoris signal and size: edema, fatty infiltration, atrophy.

Each intensity image stays on its own grid: a voxel of the image belongs to a structure when its
centre, mapped through both affines into the label grid, falls in the structure's mask (nearest
lookup, no interpolation of intensities). Masks are first eroded by one in-plane voxel so that
partial volume with the surrounding fat or fluid does not enter the statistics ("in-plane": within
the acquired slices, whatever their orientation); for the fluid image, by at least half its
voxel's extent along those directions (``image_depth_mm``), so the 3-5 mm slices of a coronal
STIR behind axial labels do not straddle the QF's outline.

* Edema (fluid-sensitive fat-suppressed image, T2 fat-sat or STIR): the upper reference limit
  (URL) is a high percentile of the reference muscle's (gluteus maximus) voxels; the share of QF
  voxels above it and the ratio of median QF to median reference signal grade it (the
  quantitative-STIR method of the muscle literature; ``MeasureConfig`` holds the thresholds).
* Fat: with Dixon, fat / (fat + water) per voxel averaged over the QF; without, the QF's mean
  T1 signal mapped between reference muscle and subcutaneous fat. Both average over the QF's
  core (``MeasureConfig.fat_core_depth_mm`` deep in-plane; for the larger Dixon voxels their whole
  extent that deep), so that an outline straying into the surrounding fat does not read as fatty
  infiltration. Goutallier grade from ``MeasureConfig.goutallier_grade``. A Dixon pair that
  reads swapped around the hip (subcutaneous fat below 0.5, reference muscle above:
  ``dixon_swap_check``) gives no fat fraction.
* Atrophy: QF volume (ml) and largest cross-sectional area in the label map's slices (mm^2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import MeasureConfig
from .geometry import acquisition_slice_axis, slice_axis
from .image import Image
from .sides import Mask


def erode_inplane(mask: Mask, affine: np.ndarray, min_voxels: int, depth_mm: float | None = None
                  ) -> Mask:
    """Drop the in-plane boundary layer of a mask; with ``depth_mm`` (half the voxel size of an
    image on another grid) keep only voxels whose centres lie that far inside plus half a label
    voxel (the nearest-voxel lookup's slack), so that image voxels there do not straddle the
    boundary. Less deep if that would leave fewer than ``min_voxels`` (or a quarter)."""
    affine = np.asarray(affine, float)
    ax = acquisition_slice_axis(affine)
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    inplane = [i for i in range(3) if i != ax]
    h = float(max(sp[inplane]))
    depth_mm = h if depth_mm is None else max(depth_mm + 0.5 * h, h)
    st = np.zeros((3, 3, 3), bool)
    idx = [slice(None)] * 3
    idx[ax] = 1
    st[tuple(idx)] = ndimage.generate_binary_structure(2, 1)
    need = max(min_voxels, 0.25 * mask.count)
    # n erosions keep centres at least (n + 0.5) voxels from the boundary
    for n in range(int(np.ceil(depth_mm / h - 0.5 - 1e-6)), 0, -1):
        er = ndimage.binary_erosion(np.pad(mask.array, 1), st, iterations=n)[1:-1, 1:-1, 1:-1]
        if er.sum() >= need:
            return Mask(mask.offset, er)
    return mask


def _box(label_affine: np.ndarray, centre: np.ndarray, radius_mm: float):
    """Label-grid voxel bounds (float, unclipped) of the box of half-size ``radius_mm`` around a
    world point."""
    aff = np.asarray(label_affine, float)
    c = np.linalg.solve(aff[:3, :3], centre - aff[:3, 3])
    r = radius_mm / np.linalg.norm(aff[:3, :3], axis=0)
    return c - r, c + r


def local_part(mask: Mask | None, label_affine: np.ndarray, centre: np.ndarray,
               radius_mm: float) -> Mask | None:
    """The part of a (large) mask inside the box of half-size ``radius_mm`` around a world point:
    a reference tissue near the QF sees nearly the same coil sensitivity (bias field)."""
    if mask is None:
        return None
    lo, hi = _box(label_affine, centre, radius_mm)
    lo = np.maximum(np.floor(lo - mask.offset).astype(int), 0)
    hi = np.minimum(np.ceil(hi - mask.offset).astype(int) + 1, mask.array.shape)
    if np.any(hi <= lo):
        return None
    sub = mask.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return Mask(mask.offset + lo, sub) if sub.any() else None


def local_tissue(labels: np.ndarray, label_affine: np.ndarray, centre: np.ndarray,
                 radius_mm: float, value: int) -> Mask | None:
    """Voxels of label ``value`` (both sides) within the box of half-size ``radius_mm`` around a
    world point, or None if there are none."""
    lo, hi = _box(label_affine, centre, radius_mm)
    lo = np.maximum(np.floor(lo).astype(int), 0)
    hi = np.minimum(np.ceil(hi).astype(int) + 1, labels.shape)
    if np.any(hi <= lo):
        return None
    sub = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == value
    return Mask(lo, sub) if sub.any() else None


def image_depth_mm(img: Image, label_affine: np.ndarray | None = None) -> float:
    """Depth inside a structure at which an image voxel centred there lies fully inside it
    (in-plane): half the image's largest in-plane voxel size. With ``label_affine``: half the
    image voxel's extent along the label grid's in-plane axes (the directions its masks are
    eroded in), so that the thick slices of a coronal or sagittal series behind axial labels
    count with their thickness."""
    if label_affine is None:
        sp = img.spacing
        ax = img.acquisition_slice_axis()
        return 0.5 * float(max(sp[i] for i in range(3) if i != ax))
    lab = np.asarray(label_affine, float)[:3, :3]
    dirs = lab / np.linalg.norm(lab, axis=0)
    edges = np.asarray(img.affine, float)[:3, :3]          # the image voxel's edge vectors
    ax = acquisition_slice_axis(np.asarray(label_affine, float))
    return 0.5 * float(max(np.abs(edges.T @ dirs[:, i]).sum() for i in range(3) if i != ax))


def noise_sigma(img: Image, mask: Mask, label_affine: np.ndarray) -> float | None:
    """Noise standard deviation of ``img`` from differences of in-plane neighbour voxels inside
    a homogeneous, bright structure (robust MAD; smooth bias fields and texture cancel)."""
    m = np.linalg.inv(img.affine) @ np.asarray(label_affine, float)
    v = np.rint(mask.indices() @ m[:3, :3].T + m[:3, 3]).astype(np.int64)
    v = v[np.all((v >= 0) & (v < np.array(img.shape)), axis=1)]
    if len(v) < 20:
        return None
    flat = np.unique(np.ravel_multi_index(v.T, img.shape))
    diffs = []
    ax = img.acquisition_slice_axis()
    for a in (i for i in range(3) if i != ax):
        step = int(np.prod(img.shape[a + 1:]))
        nb = flat + step
        inside = np.isin(nb, flat)
        idx = np.unravel_index(flat[inside], img.shape)
        nidx = np.unravel_index(nb[inside], img.shape)
        diffs.append(np.asarray(img.array[idx], float) - np.asarray(img.array[nidx], float))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if d.size < 20:
        return None
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


#: Statistics of large structures (subcutaneous fat, gluteus maximus) use at most this many
#: voxels, drawn with a fixed seed (percentiles are then precise to well under 1 %).
MAX_SAMPLES = 40000


def sample_in_mask(img: Image, mask: Mask, label_affine: np.ndarray,
                   max_samples: int = MAX_SAMPLES, positions: bool = False):
    """Intensities of the voxels of ``img`` nearest to the voxel centres of ``mask``.

    Each label voxel centre is mapped through both affines to its nearest image voxel; each image
    voxel counts once (no interpolation of intensities). Label voxels outside the image are
    ignored. Large masks are subsampled to ``max_samples`` voxels (fixed seed). With
    ``positions`` returns ``(values, xyz)``, xyz the world RAS mm of those image voxels (N, 3).
    """
    ijk = mask.indices()
    if len(ijk) > max_samples:
        ijk = ijk[np.random.default_rng(0).choice(len(ijk), max_samples, replace=False)]
    m = np.linalg.inv(img.affine) @ np.asarray(label_affine, float)
    v = np.rint(ijk @ m[:3, :3].T + m[:3, 3]).astype(np.int64)
    ok = np.all((v >= 0) & (v < np.array(img.shape)), axis=1)
    v = v[ok]
    if len(v) == 0:
        return (np.zeros(0), np.zeros((0, 3))) if positions else np.zeros(0)
    u = np.unravel_index(np.unique(np.ravel_multi_index(v.T, img.shape)), img.shape)
    values = np.asarray(img.array[u], dtype=np.float64)
    return (values, img.voxel_to_world(np.stack(u, axis=1))) if positions else values


#: The tissues each image's shading is fitted on (measurement and segment() alike): the muscles
#: other than the QF, and on T1 also subcutaneous fat (fat-suppressed fat has no signal to fit).
SHADING_TISSUES = {"t1": ("gluteus_maximus", "other_muscle", "subcutaneous_fat"),
                   "fluid": ("gluteus_maximus", "other_muscle")}
#: Voxels per tissue that the shading fit samples (a dozen coefficients need far fewer).
SHADING_SAMPLES = 10000
#: The shading fit ignores voxels below this fraction of their tissue's 95th percentile.
SHADING_FLOOR = 0.25
#: A fit whose log-signal residuals scatter more than this (robust SD) is refused: the outlined
#: tissues are not uniform (background taken for muscle), so the field would be noise.
SHADING_MAX_SCATTER = 0.3


@dataclass
class Shading:
    """A smooth multiplicative intensity field (receive-coil sensitivity) fitted on one image:
    ``exp`` of a polynomial in world coordinates centred on ``centre`` and scaled by ``scale``."""

    centre: np.ndarray
    scale: float
    degree: int
    coef: np.ndarray
    #: ratio of the field's largest to smallest value over the samples it was fitted to (99th
    #: to 1st percentile: a few stray samples do not count)
    range_ratio: float
    #: robust standard deviation of the log-signal residuals (texture and noise left over)
    scatter: float = 0.0

    def __call__(self, xyz: np.ndarray) -> np.ndarray:
        return np.exp(_poly_basis(xyz, self.centre, self.scale, self.degree) @ self.coef)


def _poly_basis(xyz: np.ndarray, centre: np.ndarray, scale: float, degree: int) -> np.ndarray:
    """Monomials of degree 1..``degree`` (at most 3) of (xyz - centre) / scale, one column each."""
    p = (np.asarray(xyz, float).reshape(-1, 3) - centre) / scale
    cols = [p[:, i] for i in range(3)]
    if degree >= 2:
        cols += [p[:, i] * p[:, j] for i in range(3) for j in range(i, 3)]
    if degree >= 3:
        cols += [p[:, i] * p[:, j] * p[:, k] for i in range(3) for j in range(i, 3) for k in range(j, 3)]
    return np.stack(cols, axis=1)


def fit_shading(img: Image, tissues: list, label_affine: np.ndarray, centre: np.ndarray,
                scale_mm: float | None = 90.0, degree: int = 2) -> Shading | None:
    """Fit the image's smooth intensity shading on tissues that should each be uniform.

    Surface receive coils make superficial tissue brighter than deep tissue: over the 90 mm
    around the QF the same muscle can differ by tens of per cent, which would read as a deep QF
    darker than its reference muscle (less edema, less fat). The model, as in tissue-class bias
    correction: log signal = a level per tissue + a polynomial of degree ``degree`` in world
    coordinates (centred on ``centre``, scaled by ``scale_mm``, or when None by the samples'
    95th-percentile distance from it) shared by all. Fitted by least squares on up to
    ``SHADING_SAMPLES`` voxels of each tissue (``tissues``: masks, None skipped, best eroded
    in-plane by the caller, see ``erode_inplane``), twice, the second time without voxels whose residual exceeds 3 robust
    standard deviations (an edematous or fatty stretch of a reference muscle). Voxels below
    ``SHADING_FLOOR`` of their tissue's bright end are left out. A small ridge
    (small for coordinates of order 1, hence the scale) keeps directions the samples hardly span
    (a few slices) from running away. None when too
    few voxels (fewer than 20 per coefficient) carry signal, or when the residuals scatter more
    than ``SHADING_MAX_SCATTER`` (tissues that are not uniform cannot carry the fit).
    """
    deg = int(degree)
    rows, groups, vals = [], [], []
    for g, m in enumerate(t for t in tissues if t is not None and t.count):
        v, xyz = sample_in_mask(img, m, label_affine, SHADING_SAMPLES, positions=True)
        rows.append(xyz)
        vals.append(v)
        groups.append(np.full(len(v), g))
    if not rows:
        return None
    xyz, v, grp = np.concatenate(rows), np.concatenate(vals), np.concatenate(groups)
    # voxels darker than a quarter of their tissue's bright end are background or air that an
    # outline took in, not shaded tissue (strong coil shading leaves the centre ~40 % of the edge)
    ok = np.zeros(len(v), bool)
    for g in np.unique(grp):
        sel = grp == g
        ok[sel] = v[sel] > SHADING_FLOOR * float(np.percentile(v[sel], 95))
    xyz, y, grp = xyz[ok], np.log(v[ok]), grp[ok]
    if not y.size:
        return None
    grp = np.unique(grp, return_inverse=True)[1]
    scale = float(scale_mm) if scale_mm else \
        max(float(np.percentile(np.linalg.norm(xyz - centre, axis=1), 95)), 1.0)
    basis = _poly_basis(xyz, centre, scale, deg)
    n_groups = int(grp.max()) + 1
    if len(y) < 20 * (n_groups + basis.shape[1]):
        return None
    design = np.concatenate([np.eye(n_groups)[grp], basis], axis=1)
    ridge = np.zeros(design.shape[1])
    ridge[n_groups:] = 1e-4
    keep = np.ones(len(y), bool)
    for _ in range(2):
        a, b = design[keep], y[keep]
        coef = np.linalg.solve(a.T @ a + np.diag(ridge * len(b)), a.T @ b)
        r = y - design @ coef
        mad = 1.4826 * float(np.median(np.abs(r[keep] - np.median(r[keep]))))
        keep = np.abs(r - np.median(r[keep])) <= 3.0 * max(mad, 1e-6)
    if mad > SHADING_MAX_SCATTER:
        return None
    poly = coef[n_groups:]
    field = basis[keep] @ poly
    lo, hi = np.percentile(field, [1, 99]) if field.size else (0.0, 0.0)
    return Shading(np.asarray(centre, float), scale, deg, poly, float(np.exp(hi - lo)), mad)


def _corrected(img: Image, mask: Mask, label_affine: np.ndarray, shading: Shading | None,
               max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """``sample_in_mask`` values divided by the shading at their positions (as is without one)."""
    if shading is None:
        return sample_in_mask(img, mask, label_affine, max_samples)
    v, xyz = sample_in_mask(img, mask, label_affine, max_samples, positions=True)
    return v / shading(xyz) if len(v) else v


def atrophy(qf: Mask | None, affine: np.ndarray) -> dict:
    """QF volume (ml) and largest axial cross-sectional area (mm^2): over the label map's planes
    across its axis closest to superior-inferior (its slices when they are axial)."""
    if qf is None or qf.count == 0:
        return {"qf_volume_ml": None, "qf_max_csa_mm2": None, "qf_max_csa_slice": None}
    affine = np.asarray(affine, float)
    ax = slice_axis(affine)
    inpl = [i for i in range(3) if i != ax]
    pixel_area = float(np.linalg.norm(np.cross(affine[:3, inpl[0]], affine[:3, inpl[1]])))
    counts = qf.array.sum(axis=tuple(inpl))
    k = int(np.argmax(counts))
    return {"qf_volume_ml": qf.count * abs(np.linalg.det(affine[:3, :3])) / 1000.0,
            "qf_max_csa_mm2": float(counts[k]) * pixel_area,
            "qf_max_csa_slice": k + int(qf.offset[ax])}


def edema(fluid: Image, qf: Mask, reference: Mask, label_affine: np.ndarray,
          cfg: MeasureConfig, contralateral_qf: Mask | None = None,
          shading: Shading | None = None, fat: Mask | None = None) -> dict:
    """Edema statistics and grade of the QF on a fluid-sensitive fat-suppressed image; with
    ``shading`` (``fit_shading`` on this image) the QF and reference signals are corrected for
    it first (the contralateral ratio is not: the field is fitted around this QF only). With
    ``fat`` (subcutaneous fat near the QF) the fat's median signal over the reference muscle's
    (``fat_signal_ratio``) checks that fat is suppressed."""
    # image voxels straddling the outline would mix in the fat planes or fluid around the muscle
    depth = image_depth_mm(fluid, label_affine)
    q = _corrected(fluid, erode_inplane(qf, label_affine, cfg.min_signal_voxels, depth),
                   label_affine, shading)
    r = _corrected(fluid, erode_inplane(reference, label_affine, cfg.min_signal_voxels, depth),
                   label_affine, shading)
    out = {"grade": None, "signal_ratio": None, "fraction_above_reference": None,
           "reference_upper_limit": None, "qf_median": None, "qf_p90": None,
           "reference_median": None, "contralateral_ratio": None, "fat_signal_ratio": None,
           "sequence": fluid.meta.get("fluid_kind") or fluid.kind, "n_voxels": int(q.size),
           "shading_range": None if shading is None else shading.range_ratio, "reason": None}
    if q.size < cfg.min_signal_voxels or r.size < cfg.min_signal_voxels:
        out["reason"] = (f"too few voxels on the fluid image (QF {q.size}, reference {r.size}, "
                         f"need {cfg.min_signal_voxels})")
        return out
    ref_med = float(np.median(r))
    if ref_med <= 0:
        out["reason"] = "reference muscle has no signal on the fluid image"
        return out
    url = float(np.percentile(r, cfg.edema_reference_percentile))
    ratio = float(np.median(q)) / ref_med
    frac = float(np.mean(q > url))
    out.update(signal_ratio=ratio, fraction_above_reference=frac, reference_upper_limit=url,
               qf_median=float(np.median(q)), qf_p90=float(np.percentile(q, 90)),
               reference_median=ref_med)
    if contralateral_qf is not None and contralateral_qf.count:
        c = sample_in_mask(fluid, erode_inplane(contralateral_qf, label_affine,
                                                cfg.min_signal_voxels, depth), label_affine)
        if c.size >= cfg.min_signal_voxels and np.median(c) > 0:
            out["contralateral_ratio"] = float(np.median(q) / np.median(c))
    if fat is not None:
        f = _corrected(fluid, erode_inplane(fat, label_affine, cfg.min_signal_voxels, depth),
                       label_affine, shading)
        if f.size >= cfg.min_signal_voxels:
            out["fat_signal_ratio"] = float(np.median(f)) / ref_med
    if out["fat_signal_ratio"] is not None and out["fat_signal_ratio"] > cfg.fat_suppression_max_ratio:
        out["reason"] = (f"fat is not suppressed on the fluid image (subcutaneous fat "
                         f"{out['fat_signal_ratio']:.1f} times the reference muscle; fat-suppressed "
                         f"series stay below {cfg.fat_suppression_max_ratio:g}): a bright QF could be "
                         "fat as well as edema, so no grade (a T2 without fat saturation, or failed "
                         "fat suppression?)")
        return out
    out["grade"] = edema_grade(frac, ratio, cfg)
    return out


def edema_grade(fraction_above: float, ratio: float, cfg: MeasureConfig) -> str:
    """none / mild / marked from the share of QF voxels above the reference limit and the
    median signal ratio (marked: a large share or a high ratio; mild: a clear excess of voxels
    above the limit or a raised ratio)."""
    if fraction_above >= cfg.edema_fraction_marked or ratio >= cfg.edema_ratio_marked:
        return "marked"
    if fraction_above >= cfg.edema_fraction_mild or ratio >= cfg.edema_ratio_mild:
        return "mild"
    return "none"


def fat_dixon(fat: Image, water: Image, qf: Mask, label_affine: np.ndarray,
              cfg: MeasureConfig, reference: Mask | None = None,
              subcut: Mask | None = None) -> dict:
    """Mean fat fraction fat / (fat + water) over the QF from magnitude Dixon images.

    With ``subcut`` (subcutaneous fat near the QF) and ``reference`` (the reference muscle near
    it) the pair is first checked for a fat-water swap (``dixon_swap_check``): when
    ``cfg.dixon_subcut_max_swapped_share`` or more of that fat reads a fat fraction below 0.5,
    or ``cfg.dixon_reference_max_swapped_share`` of that muscle above 0.5, no fat fraction,
    ``swap_suspected`` True and a reason.

    Dixon voxels lying wholly inside the QF's core in-plane count: the mask is eroded in-plane by
    half a Dixon voxel plus ``fat_core_depth_mm``. Dixon voxels are often 2-3 mm, so a voxel
    merely centred that deep would still reach to within a millimetre of the outline and read
    the fat beyond an outline that strays outward. The magnitude noise floor, which lifts the
    small fat signal of lean muscle, is removed per voxel as power: a magnitude voxel M of
    signal A with Gaussian noise sigma in each of its real and imaginary parts has E[M^2] = A^2
    + 2 sigma^2, so sqrt(max(M^2 - 2 sigma^2, 0)). sigma comes from neighbour differences of the
    water image inside the reference muscle, where the signal is high and the magnitude's noise
    is that per-channel sigma (water and fat share one acquisition's noise).
    """
    from .image import resample_like

    if not fat.same_grid(water, atol=1e-3):
        water = resample_like(water, fat, order=1)
    check = dixon_swap_check(fat, water, subcut, reference, label_affine, cfg)
    evidence = _swap_evidence(check, cfg)
    if evidence:
        return {"fat_fraction": None, "method": "dixon", "swap_suspected": True,
                "swap_check": check, "swap_evidence": evidence,
                "reason": f"Dixon fat and water look swapped around this hip: {evidence} (fat reads "
                          "about 0.9, muscle below 0.1). A failed water-fat separation, the two "
                          "series given the wrong way round, or (muscle only) a reference muscle "
                          "largely replaced by fat; check the Dixon images"}
    # In-plane erosion only: also dropping the QF's first / last label slices (partial volume
    # at its ends) samples a heterogeneous muscle (fat streaks vary along it) so unevenly that
    # it costs more than it saves (phantom cohort: fat-fraction MAE 0.066 with, 0.02 without).
    # The voxel's whole extent, not just its centre, lies that deep (held-out phantoms, 40 Dixon
    # hips of two cohorts, the bundled models' outlines: fat-fraction bias 40-50 % lower, MAE
    # lower); for T1's sub-millimetre voxels the deeper core costs more than it saves (README).
    m = erode_inplane(qf, label_affine, cfg.min_signal_voxels,
                      image_depth_mm(fat) + cfg.fat_core_depth_mm)
    f = sample_in_mask(fat, m, label_affine)
    w = sample_in_mask(water, m, label_affine)
    sigma = None
    if reference is not None:
        sigma = noise_sigma(water, erode_inplane(reference, label_affine, cfg.min_signal_voxels,
                                                 image_depth_mm(water)), label_affine)
    if sigma:
        floor = 2.0 * sigma * sigma
        f = np.sqrt(np.maximum(f * f - floor, 0.0))
        w = np.sqrt(np.maximum(w * w - floor, 0.0))
    ff = _voxel_fat_fractions(f, w)
    if ff.size < cfg.min_signal_voxels:
        return {"fat_fraction": None, "method": "dixon", "swap_check": check,
                "reason": "too few QF voxels with signal"}
    return {"fat_fraction": float(ff.mean()), "fat_fraction_median": float(np.median(ff)),
            "method": "dixon", "noise_sigma": sigma, "n_voxels": int(ff.size),
            "swap_check": check, "swap_suspected": False, "reason": None}


def _voxel_fat_fractions(f: np.ndarray, w: np.ndarray) -> np.ndarray:
    """fat / (fat + water) of each Dixon voxel that carries signal, clipped to 0..1."""
    s = f + w
    ok = s > 1e-6 * max(float(s.max(initial=0)), 1e-12)
    return np.clip(f[ok] / s[ok], 0.0, 1.0)


def swap_shares_reached(check: dict, subcut_limit: float, reference_limit: float) -> list[bool]:
    """Whether each share of a ``dixon_swap_check`` (subcutaneous fat, reference muscle) was
    measured and reached its limit."""
    limits = {"subcutaneous_swapped_share": subcut_limit, "reference_swapped_share": reference_limit}
    return [check.get(k) is not None and check[k] >= limit for k, limit in limits.items()]


def _swap_evidence(check: dict, cfg: MeasureConfig) -> str | None:
    """What a ``dixon_swap_check`` read, in words, when a share reaches its limit; else None."""
    if not any(swap_shares_reached(check, cfg.dixon_subcut_max_swapped_share,
                                   cfg.dixon_reference_max_swapped_share)):
        return None
    read = []
    if check["subcutaneous_swapped_share"] is not None:
        read.append(f"{check['subcutaneous_swapped_share']:.0%} of the subcutaneous fat near the QF "
                    "reads a fat fraction below 0.5")
    if check["reference_swapped_share"] is not None:
        read.append(f"{check['reference_swapped_share']:.0%} of the reference muscle above 0.5")
    return ", ".join(read)


def dixon_swap_check(fat: Image, water: Image, subcut: Mask | None, reference: Mask | None,
                     label_affine: np.ndarray, cfg: MeasureConfig) -> dict:
    """Signs of a fat-water swap around a hip (water already on the fat image's grid): the
    Dixon fat fraction of the subcutaneous fat (``subcutaneous_fat_fraction``, its median, and
    ``subcutaneous_swapped_share``, the share below 0.5) and the share of the reference muscle
    above 0.5 (``reference_swapped_share``), each mask eroded in-plane past the Dixon voxels'
    extent, as the QF is. Fat reads about 0.9 in every body and muscle below 0.1, so a large
    share means the pair is swapped there. A value is None where its mask is missing or fewer
    than ``cfg.min_signal_voxels`` voxels carry signal."""
    def fractions(mask):
        if mask is None:
            return None
        m = erode_inplane(mask, label_affine, cfg.min_signal_voxels, image_depth_mm(fat))
        ff = _voxel_fat_fractions(sample_in_mask(fat, m, label_affine),
                                  sample_in_mask(water, m, label_affine))
        return ff if ff.size >= cfg.min_signal_voxels else None

    out = {"subcutaneous_fat_fraction": None, "subcutaneous_swapped_share": None,
           "reference_swapped_share": None}
    ff = fractions(subcut)
    if ff is not None:
        out.update(subcutaneous_fat_fraction=float(np.median(ff)),
                   subcutaneous_swapped_share=float(np.mean(ff < 0.5)))
    ff = fractions(reference)
    if ff is not None:
        out["reference_swapped_share"] = float(np.mean(ff > 0.5))
    return out


def fat_t1(t1: Image, qf: Mask, reference: Mask | None, subcut: Mask | None,
           label_affine: np.ndarray, cfg: MeasureConfig, shading: Shading | None = None) -> dict:
    """Mean fat fraction of the QF from T1, calibrated between reference muscle and fat; with
    ``shading`` (``fit_shading`` on this image) all three signals are corrected for it first."""
    if reference is None or subcut is None:
        missing = "reference muscle" if reference is None else "subcutaneous fat"
        return {"fat_fraction": None, "method": "t1_calibrated",
                "reason": f"no {missing} in the label map to calibrate T1"}
    q = _corrected(t1, erode_inplane(qf, label_affine, cfg.min_signal_voxels,
                                     max(image_depth_mm(t1), cfg.fat_core_depth_mm)),
                   label_affine, shading)
    r = _corrected(t1, erode_inplane(reference, label_affine, cfg.min_signal_voxels),
                   label_affine, shading)
    f = _corrected(t1, erode_inplane(subcut, label_affine, cfg.min_signal_voxels),
                   label_affine, shading)
    if min(q.size, r.size, f.size) < cfg.min_signal_voxels:
        return {"fat_fraction": None, "method": "t1_calibrated",
                "reason": "too few voxels on the T1 image to calibrate"}
    s_m, s_f = float(np.median(r)), float(np.median(f))
    if s_f - s_m <= 0.05 * max(abs(s_f), 1e-12):
        return {"fat_fraction": None, "method": "t1_calibrated",
                "reason": "fat is not brighter than muscle on this T1 image (not a T1?)"}
    ff = t1_fat_fraction(q, s_m, s_f, cfg.t1_reference_muscle_ff, cfg.t1_subcutaneous_fat_ff,
                         cfg.t1_adipose_muscle_pd_ratio)
    return {"fat_fraction": float(np.clip(np.mean(ff), 0.0, 1.0)), "method": "t1_calibrated",
            "n_voxels": int(q.size),
            "shading_range": None if shading is None else shading.range_ratio, "reason": None}


def t1_fat_fraction(signal_values, s_muscle: float, s_fat: float, ff_muscle: float,
                    ff_fat: float, pd_ratio: float = 1.0) -> np.ndarray:
    """Fat fraction of each T1 signal value, calibrated on reference muscle and fat.

    Model: a voxel of fat fraction ff holds water and fat protons in the ratio (1 - ff) : ff, so
    its signal is P(ff) (1 + k ff) times a constant, k the fat-over-water weighting contrast;
    its proton density P rises linearly from muscle's to adipose tissue's (``pd_ratio`` times
    muscle's, at ``ff_fat``) as fat replaces muscle. The two references fix the constant and k;
    each value is then inverted (a quadratic). ``pd_ratio`` = 1 gives the linear mapping.
    Values are not clipped (noise averages out in the mean).
    """
    s = np.asarray(signal_values, dtype=np.float64)
    c = (pd_ratio - 1.0) / ff_fat
    p_m = 1.0 + c * ff_muscle
    rho = s_fat / s_muscle * p_m / pd_ratio
    k = (rho - 1.0) / (ff_fat - rho * ff_muscle)
    a = s_muscle / (p_m * (1.0 + k * ff_muscle))
    y = s / a
    if abs(c * k) < 1e-9:   # linear
        return (y - 1.0) / (c + k)
    # c k ff^2 + (c + k) ff + 1 - y = 0, the root continuous with the linear case
    disc = np.maximum((c + k) ** 2 - 4.0 * c * k * (1.0 - y), 0.0)
    return (-(c + k) + np.sqrt(disc)) / (2.0 * c * k)
