"""Assign the side-agnostic labelled structures to the patient's left or right hip.

Uses anatomy in world RAS coordinates (+x = patient's right), never the image centre or the
storage order:

* bilateral field of view (two femora, or two ischial tuberosities, far apart along the
  left-right axis: ``left_right_pair``): the mid-sagittal
  plane is the perpendicular bisector of the two femoral (else ischial) centroids; the hip on the
  +x side of it is the right hip. Every structure's voxels are split by that plane (a hip's
  structures lie well to one side of it; midline ones such as subcutaneous fat are cut by it).
* single hip: the femur lies lateral to the ischium, so a femur with larger x than the ischial
  tuberosity (or the rest of the pelvis) is a right hip; without the pelvis, the lesser trochanter
  lies medial to the femoral shaft. Only as a last resort (with a warning): the side of the
  scanner's isocentre (x = 0) the structures lie on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .labels import LABELS

#: A bilateral scan's two femora (or ischia) lie > 60 mm apart (typical 150-200 mm between
#: femoral centroids in adults; a fragmented femur of one hip is much closer).
MIN_BILATERAL_SEPARATION_MM = 60.0
#: Structures whose connected components decide the sides.
ANCHORS = ("femur", "ischial_tuberosity", "lesser_trochanter", "pelvis")
#: Components smaller than this share of the structure's largest component are noise for anchors.
MIN_ANCHOR_SHARE = 0.1


def left_right_pair(centroids, sizes, min_separation_mm: float) -> tuple[int, int] | None:
    """The two components that can be one structure's left and right instances, or None.

    Candidates are components of at least a tenth of the largest one's size (at most six, largest
    first). A pair qualifies when its centroids lie at least ``min_separation_mm`` apart along
    world x and the offset points within 45 degrees of the left-right axis (more along x than
    in y and z together): a stray blob in front of or behind the pelvis does not pair with a
    hip. Left and right instances are near mirror images, so of the qualifying pairs the one
    with the highest combined size x size ratio (smaller / larger) x alignment with the x axis
    wins. Returned as (index with larger x, index with smaller x), i.e. (right, left).
    """
    sizes = np.asarray(sizes, float)
    cents = np.asarray(centroids, float).reshape(len(sizes), 3)
    if len(sizes) < 2:
        return None
    cand = [int(i) for i in np.argsort(-sizes, kind="stable")
            if sizes[i] >= MIN_ANCHOR_SHARE * sizes.max()][:6]
    best, best_score = None, -1.0
    for k, a in enumerate(cand):
        for b in cand[k + 1:]:
            d = cents[a] - cents[b]
            if abs(d[0]) < min_separation_mm or abs(d[0]) < np.hypot(d[1], d[2]):
                continue
            score = (sizes[a] + sizes[b]) * min(sizes[a], sizes[b]) / max(sizes[a], sizes[b]) \
                * abs(d[0]) / np.linalg.norm(d)
            if score > best_score:
                best, best_score = ((a, b) if d[0] > 0 else (b, a)), score
    return best


@dataclass
class Mask:
    """A boolean mask stored as a bounding-box crop of the label grid (offset = index of [0,0,0])."""

    offset: np.ndarray
    array: np.ndarray

    @property
    def count(self) -> int:
        return int(self.array.sum())

    def indices(self) -> np.ndarray:
        """(N, 3) voxel indices in the full label grid."""
        return np.argwhere(self.array) + self.offset


@dataclass
class SideAssignment:
    """Per-hip structure masks and how the sides were decided."""

    hips: dict = field(default_factory=dict)       # side -> {structure name -> Mask}
    mode: str = "none"                             # bilateral / single / none
    method: str = ""
    midplane: dict | None = None                   # point + normal (world RAS) if bilateral
    warnings: list = field(default_factory=list)


def _components(labels: np.ndarray, value: int, box) -> list:
    """Connected components (26-connectivity) of one label value: list of (offset, mask)."""
    sub = labels[box] == value
    lab, n = ndimage.label(sub, structure=np.ones((3, 3, 3), bool))
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        off = np.array([box[a].start + sl[a].start for a in range(3)])
        out.append((off, lab[sl] == i))
    return out


def _plane_field(affine, off, shape, point, normal) -> np.ndarray:
    """Signed distance (mm) of each voxel centre of a box to the plane (point, normal)."""
    g = affine[:3, :3].T @ normal            # change per voxel step along each axis
    base = (affine[:3, :3] @ off + affine[:3, 3] - point) @ normal
    i, j, k = (np.arange(n) * g[a] for a, n in enumerate(shape))
    return base + i[:, None, None] + j[None, :, None] + k[None, None, :]


def _centroid(affine, off, m) -> np.ndarray:
    ijk = np.argwhere(m).mean(0) + off
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _anchors(comps: list, affine, voxel_ml: float):
    """Significant components (centroid, volume ml), largest first."""
    if not comps:
        return []
    vols = np.array([m.sum() for _, m in comps], float) * voxel_ml
    keep = np.argsort(-vols)
    keep = [i for i in keep if vols[i] >= MIN_ANCHOR_SHARE * vols.max()]
    return [(_centroid(affine, *comps[i]), vols[i]) for i in keep]


def assign_sides(labels: np.ndarray, affine: np.ndarray, table: dict | None = None,
                 structures=None) -> SideAssignment:
    """Split every labelled structure into per-hip masks.

    Args:
        labels: integer label array in the project's numbering (``pipeline.labels.LABELS``)
            unless ``table`` (name -> value) says otherwise.
        affine: voxel -> world RAS mm.
        structures: names to split (default: all in the table); the femur, ischial tuberosity
            and pelvis are looked at for the side decision in any case.
    """
    table = dict(LABELS if table is None else table)
    if structures is not None:
        keep = set(structures) | set(ANCHORS)
        table = {k: v for k, v in table.items() if k in keep}
    affine = np.asarray(affine, float)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False))
    res = SideAssignment()
    comps = {}
    for name, value in table.items():
        if name == "background" or value <= 0 or value > len(boxes) or boxes[value - 1] is None:
            continue
        box = boxes[value - 1]
        if name in ANCHORS:
            comps[name] = _components(labels, value, box)
        else:   # only split by side: one piece, no labelling needed
            comps[name] = [(np.array([b.start for b in box]), labels[box] == value)]
    if not comps:
        res.warnings.append("label map holds no structures")
        return res

    femurs = _anchors(comps.get("femur", []), affine, voxel_ml)
    ischia = _anchors(comps.get("ischial_tuberosity", []), affine, voxel_ml)

    def pair(anchors):
        found = left_right_pair([c for c, _ in anchors], [v for _, v in anchors],
                                MIN_BILATERAL_SEPARATION_MM)
        return None if found is None else (anchors[found[0]][0], anchors[found[1]][0])

    bil = pair(femurs) or pair(ischia)
    if bil is not None:
        right, left = bil
        normal = (right - left) / np.linalg.norm(right - left)
        point = 0.5 * (right + left)
        res.mode, res.method = "bilateral", ("femora" if pair(femurs) else "ischial tuberosities")
        res.midplane = {"point": point.tolist(), "normal": normal.tolist()}
        for side in ("left", "right"):
            res.hips[side] = {}
        for name, cl in comps.items():
            for off, m in cl:
                s = _plane_field(affine, off, m.shape, point, normal)
                _add(res.hips["right"], name, off, m & (s > 0))
                _add(res.hips["left"], name, off, m & (s <= 0))
        return res

    side, method = _single_side(comps, femurs, ischia, affine, voxel_ml)
    res.mode, res.method = "single", method
    if side is None:
        res.warnings.append("could not tell the side of the single hip in the field of view")
        res.mode = "none"
        return res
    if method.startswith("isocentre"):
        res.warnings.append("side of the single hip guessed from the scanner isocentre "
                            "(no femur/ischium pair to tell it anatomically)")
    res.hips[side] = {}
    for name, cl in comps.items():
        for off, m in cl:
            _add(res.hips[side], name, off, m)
    return res


def _single_side(comps, femurs, ischia, affine, voxel_ml):
    """Side of a single hip from anatomy: the femur lies lateral to the ischium."""
    if femurs:
        fx = femurs[0][0][0]
        if ischia:
            return ("right" if fx > ischia[0][0][0] else "left"), "femur lateral to ischium"
        pel = _anchors(comps.get("pelvis", []), affine, voxel_ml)
        if pel:
            return ("right" if fx > pel[0][0][0] else "left"), "femur lateral to pelvis"
        lts = _anchors(comps.get("lesser_trochanter", []), affine, voxel_ml)
        if lts:
            return ("right" if fx > lts[0][0][0] else "left"), "lesser trochanter medial to femur"
    if ischia:
        lts = _anchors(comps.get("lesser_trochanter", []), affine, voxel_ml)
        if lts:
            return ("right" if lts[0][0][0] > ischia[0][0][0] else "left"), \
                "lesser trochanter lateral to ischium"
    pts = [_centroid(affine, off, m) for cl in comps.values() for off, m in cl]
    if pts:
        x = float(np.mean([p[0] for p in pts]))
        return ("right" if x > 0 else "left"), "isocentre (weak)"
    return None, ""


def _add(hip: dict, name: str, off: np.ndarray, m: np.ndarray) -> None:
    """Merge a component into the hip's mask for ``name`` (union of bounding boxes)."""
    if not m.any():
        return
    if name not in hip:
        hip[name] = Mask(off.copy(), m.copy())
        return
    old = hip[name]
    lo = np.minimum(old.offset, off)
    hi = np.maximum(old.offset + old.array.shape, off + np.array(m.shape))
    arr = np.zeros(tuple(hi - lo), bool)
    for o, a in ((old.offset, old.array), (off, m)):
        s = tuple(slice(o[i] - lo[i], o[i] - lo[i] + a.shape[i]) for i in range(3))
        arr[s] |= a
    hip[name] = Mask(lo, arr)


def largest_component(mask: Mask) -> tuple[Mask, float]:
    """The largest 26-connected component and the share of voxels left out."""
    lab, n = ndimage.label(mask.array, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask, 0.0
    sizes = np.bincount(lab.ravel())[1:]
    i = int(np.argmax(sizes)) + 1
    sl = ndimage.find_objects((lab == i).astype(np.int32))[0]
    off = mask.offset + np.array([s.start for s in sl])
    return Mask(off, (lab[sl] == i)), float(1 - sizes.max() / sizes.sum())


def union_crop(masks: list, shape) -> tuple[np.ndarray, list]:
    """Put several Masks on one common crop: (offset, [bool arrays]) (None entries stay empty)."""
    present = [m for m in masks if m is not None]
    lo = np.min([m.offset for m in present], axis=0)
    hi = np.max([m.offset + m.array.shape for m in present], axis=0)
    out = []
    for m in masks:
        a = np.zeros(tuple(hi - lo), bool)
        if m is not None:
            s = tuple(slice(m.offset[i] - lo[i], m.offset[i] - lo[i] + m.array.shape[i])
                      for i in range(3))
            a[s] = m.array
        out.append(a)
    return lo, out
