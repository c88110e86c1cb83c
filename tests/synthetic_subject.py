"""Tiny synthetic 'hip' subjects for the IO / cohort / CLI tests (no generator, no network needed).

A box-shaped anatomy on a small anisotropic grid: per hip a femur with a lesser trochanter on its
medial side, an ischial tuberosity further medial (the IFS gap is known by construction),
quadratus femoris in between, a hamstring tendon behind the tuberosity, an iliopsoas tendon in
front of the trochanter, and gluteus maximus behind. World RAS mm; the right hip is at +x.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.image import Image, save_nifti
from pipeline.labels import LABELS, write_label_table

SPACING = (2.0, 2.0, 4.0)
SHAPE = (90, 64, 10)
#: IFS gaps by construction (mm): right, left
GAPS = {"right": 12.0, "left": 22.0}


def _box(lab, affine, lo, hi, value):
    """Set ``value`` where voxel centres lie inside the world box [lo, hi]."""
    idx = np.indices(lab.shape).reshape(3, -1).T
    xyz = idx @ affine[:3, :3].T + affine[:3, 3]
    inside = np.all((xyz >= np.asarray(lo)) & (xyz <= np.asarray(hi)), axis=1)
    lab.reshape(-1)[inside] = value


def make_labels(affine=None, shape=SHAPE, gaps=GAPS) -> Image:
    """The synthetic label map (project values) on the given grid (default: RAS, 2x2x4 mm)."""
    if affine is None:
        affine = np.diag([*SPACING, 1.0])
        affine[:3, 3] = [-(shape[0] - 1) * SPACING[0] / 2, -(shape[1] - 1) * SPACING[1] / 2, -18.0]
    lab = np.zeros(shape, np.uint8)
    z = (-30.0, 30.0)
    _box(lab, affine, (-88, -62, z[0]), (88, 62, z[1]), LABELS["subcutaneous_fat"])
    _box(lab, affine, (-80, -55, z[0]), (80, 55, z[1]), LABELS["other_muscle"])
    for side, sign in (("right", 1.0), ("left", -1.0)):
        gap = gaps[side]
        lt_med = 50.0                      # |x| of the lesser trochanter's medial cortex
        it_lat = lt_med - gap              # |x| of the ischial tuberosity's lateral cortex

        def bx(x0, x1, y0, y1, name):
            xs = sorted((sign * x0, sign * x1))
            _box(lab, affine, (xs[0], y0, z[0]), (xs[1], y1, z[1]), LABELS[name])

        bx(it_lat, lt_med, -20, 0, "quadratus_femoris")
        bx(62, 78, -12, 8, "femur")
        bx(lt_med, 62, -10, 2, "lesser_trochanter")
        bx(it_lat - 12, it_lat, -20, -2, "ischial_tuberosity")
        bx(it_lat - 10, it_lat - 2, -30, -22, "hamstring_tendon")
        bx(lt_med, 60, 4, 10, "iliopsoas_tendon")
        bx(30, 78, -50, -34, "gluteus_maximus")
    return Image(lab, affine, "labels", {})


#: tissue signal per label value on (T1, fluid)
_SIGNAL = {0: (5, 5), 1: (400, 180), 2: (250, 60), 3: (250, 60), 4: (60, 40), 5: (250, 60),
           6: (250, 60), 7: (400, 180), 8: (900, 80), 9: (60, 40), 10: (400, 180)}


def make_images(labels: Image, seed: int = 0, edema_side: str | None = "right") -> dict[str, Image]:
    """T1 and STIR-like intensities for a label map (edema in one quadratus femoris)."""
    rng = np.random.default_rng(seed)
    t1 = np.zeros(labels.shape, np.float32)
    fl = np.zeros(labels.shape, np.float32)
    for v, (a, b) in _SIGNAL.items():
        m = labels.array == v
        t1[m], fl[m] = a, b
    if edema_side:
        xyz = labels.voxel_to_world(np.indices(labels.shape).reshape(3, -1).T)[:, 0].reshape(labels.shape)
        qf = (labels.array == LABELS["quadratus_femoris"]) & ((xyz > 0) == (edema_side == "right"))
        fl[qf] = 450
    t1 += rng.normal(0, 10, t1.shape).astype(np.float32)
    fl += rng.normal(0, 10, fl.shape).astype(np.float32)
    return {"t1": Image(t1, labels.affine.copy(), "t1"), "fluid": Image(fl, labels.affine.copy(), "stir")}


def write_subject(folder, seed: int = 0, gaps=GAPS, affine=None) -> dict:
    """Write t1.nii.gz, stir.nii.gz, labels.nii.gz + labels.json into ``folder``; return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lab = make_labels(affine=affine, gaps=gaps)
    imgs = make_images(lab, seed)
    save_nifti(imgs["t1"], folder / "t1.nii.gz")
    save_nifti(imgs["fluid"], folder / "stir.nii.gz")
    save_nifti(lab, folder / "labels.nii.gz", dtype=np.uint8)
    write_label_table(folder / "labels.json")
    return {"t1": folder / "t1.nii.gz", "stir": folder / "stir.nii.gz", "labels": folder / "labels.nii.gz"}


def write_manifest(path, rows: list[dict]) -> Path:
    """A manifest CSV with the generator's columns; ``rows`` hold paths relative to its folder."""
    cols = ("subject", "t1", "fluid", "fluid_kind", "dixon_fat", "dixon_water", "labels", "truth")
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def comparable(record: dict) -> dict:
    """A measurements.json record without run-dependent fields (timings)."""
    rec = json.loads(json.dumps(record))
    prov = rec.get("provenance", {})
    prov.pop("timings", None)
    (prov.get("segmentation") or {}).pop("timings", None)
    return rec
