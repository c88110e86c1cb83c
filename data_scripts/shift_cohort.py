"""Copy a phantom cohort with an image artefact the generator never makes (a robustness probe).

    python data_scripts/shift_cohort.py --cohort C --out D --shift coil [--strength S] [--seed N]

The label maps and ``truth.json`` are copied unchanged and every intensity series (T1, fluid,
Dixon) is rewritten as float32 on its own grid, so the copy is scored exactly like the original
(``benchmarks/segmentation_accuracy.py --cohort D``) and the difference is the artefact's cost.
Shifts, each modelled on how it arises in an MR scanner:

* ``coil``: receive-coil shading. The sensitivity of a ring of surface-coil elements around
  the pelvis (world coordinates, so every series of a subject gets the same field), bright near
  the skin and dark at the centre: with ``strength`` 0.6 the centre of the body keeps 40 % of the
  signal at its edge (training draws milder polynomial bias fields).
* ``gamma``: a monotonic intensity remapping ``I**strength`` of the T1 and fluid series (another
  sequence weighting or scanner display scaling; training draws 0.7-1.5); Dixon is left as is.
* ``ghost``: periodic motion ghosts (respiration / bowel) along the phase-encoding axis: each
  slice's k-space lines are phase-shifted by a sinusoidal displacement of ``strength`` mm.
* ``ringing``: in-plane k-space truncated to ``strength`` of its extent without filtering
  (Gibbs ringing and blur, as from a low acquisition matrix zero-filled to the stored one).
* ``tissue``: another scanner's or generator's tissue contrast. Per series, the signal of each
  tissue class (muscle, fat, bone, tendon: the labelled structures, and as fat the unlabelled
  voxels bright on T1) is multiplied by its own factor, drawn log-uniformly in
  [1 / ``strength``, ``strength``], the factor map blurred by 1 mm so that partial-volume edges
  stay partial. All muscles share one factor, so the QF keeps its
  signal relative to the gluteus maximus (edema grades stay true), but the T1 fat fraction,
  calibrated between muscle and subcutaneous fat, no longer matches the truth: fat grades are not
  scored on this shift. Dixon is left as is.
* ``fatsat``: fat suppression that failed, or a T2 without fat saturation given as the fluid
  series. In the fluid series only, every fat voxel (the ``tissue`` shift's fat class, and bone
  bright on T1: fatty marrow) gets the signal it would have unsuppressed, added to what it has:
  fat's median becomes ``strength`` times the muscles' median (an unsuppressed fast spin-echo T2
  gives about 3-5). The QF's own fat is left as it was, so the edema truth holds.
* ``fatwater``: a Dixon fat-water swap, as a failed water-fat separation makes where the field
  is inhomogeneous (far from the magnet's centre), or as two series given the wrong way round.
  Fat and water are exchanged over the share ``strength`` of the Dixon series' width in world
  coordinates from the subject's right (the largest RAS x): 0.5 the right half, so the right
  hip reads swapped and the left does not; 1 the whole pair. T1 and fluid are left as they are.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.image import Image, load_nifti, resample_like, save_nifti  # noqa: E402
from pipeline.labels import NUM_CLASSES, TISSUE_CLASSES, tissue_lookup  # noqa: E402

SHIFTS = {"coil": 0.6, "gamma": 0.5, "ghost": 1.5, "ringing": 0.5, "tissue": 1.6, "fatsat": 4.0,
          "fatwater": 0.5}
IMAGE_COLUMNS = ("t1", "fluid", "dixon_fat", "dixon_water")


def world_grid(img: Image) -> np.ndarray:
    """World RAS mm of every voxel centre, shape (3, I, J, K)."""
    ijk = np.indices(img.shape, dtype=np.float32).reshape(3, -1)
    xyz = img.affine[:3, :3].astype(np.float32) @ ijk + img.affine[:3, 3:4].astype(np.float32)
    return xyz.reshape((3,) + img.shape)


def coil_field(xyz: np.ndarray, centre: np.ndarray, radii: np.ndarray, strength: float,
               n_elements: int = 8) -> np.ndarray:
    """Relative sensitivity of ``n_elements`` surface coils on an axial ellipse around ``centre``.

    Each element is a Gaussian in the axial plane of width a third of the ellipse's smaller
    radius; the sum is mapped linearly so that over the ellipse its maximum is 1 and its minimum
    ``1 - strength`` (the centre, farthest from every element).
    """
    angles = np.linspace(0, 2 * np.pi, n_elements, endpoint=False)
    width = float(min(radii)) / 3.0
    total = np.zeros(xyz.shape[1:], np.float32)
    for a in angles:
        c = centre + np.array([radii[0] * np.cos(a), radii[1] * np.sin(a), 0.0])
        d2 = sum((xyz[i] - np.float32(c[i])) ** 2 for i in range(2))   # elements run along z
        total += np.exp(-d2 / np.float32(2 * width * width))
    inside = ((xyz[0] - centre[0]) / radii[0]) ** 2 + ((xyz[1] - centre[1]) / radii[1]) ** 2 <= 1
    ref = total[inside] if inside.any() else total
    lo, hi = float(ref.min()), float(ref.max())
    rel = np.clip((total - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return (1.0 - strength) + strength * rel


def body_ellipse(img: Image) -> tuple[np.ndarray, np.ndarray]:
    """Centre and half-axes (x, y, mm) of the body on ``img``: voxels above 10 % of the 99th
    percentile, their world centroid and the 99th percentile of its extent
    from it (x and y)."""
    a = img.array
    body = a > 0.1 * np.percentile(a, 99)
    xyz = world_grid(img)[:, body]
    centre = xyz.mean(axis=1)
    radii = np.array([np.percentile(np.abs(xyz[i] - centre[i]), 99) for i in range(2)])
    return centre.astype(np.float64), np.maximum(radii, 50.0)


def gamma_map(a: np.ndarray, g: float) -> np.ndarray:
    """``a`` mapped as (a / p99.9)**g times p99.9 (negative values clipped to 0)."""
    top = float(np.percentile(a, 99.9)) or 1.0
    return (np.clip(a, 0, None) / top) ** g * top


def inplane_axes(img: Image) -> tuple[int, int]:
    """The two array axes of the acquired slice plane (the other one is the slice axis)."""
    s = img.acquisition_slice_axis()
    return tuple(i for i in range(3) if i != s)  # type: ignore[return-value]


def ghost(img: Image, displacement_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Periodic-motion ghosts: k-space line ky (acquired in order) of every slice is shifted by
    ``displacement_mm * sin(2 pi t / period + phase)`` along the phase-encoding axis, the longer
    in-plane axis' partner (the shorter in-plane field of view, as usual for axial pelvis)."""
    ax = inplane_axes(img)
    fov = [img.shape[i] * img.spacing[i] for i in ax]
    pe = ax[int(np.argmin(fov))]
    n = img.shape[pe]
    period = rng.uniform(n / 8, n / 3)           # lines per motion cycle
    phase = rng.uniform(0, 2 * np.pi)
    d_vox = displacement_mm / img.spacing[pe] * np.sin(2 * np.pi * np.arange(n) / period + phase)
    ky = np.fft.fftfreq(n)                       # cycles per voxel, in acquisition order below
    order = np.argsort(ky)                       # lines acquired from -ky_max to +ky_max
    shift = np.empty(n)
    shift[order] = d_vox
    mod = np.exp(-2j * np.pi * ky * shift)
    k = np.fft.fft(img.array.astype(np.complex64), axis=pe)
    shape = [1, 1, 1]
    shape[pe] = n
    return np.abs(np.fft.ifft(k * mod.reshape(shape).astype(np.complex64), axis=pe)).astype(np.float32)


def ringing(img: Image, keep: float) -> np.ndarray:
    """In-plane k-space truncated to the central ``keep`` fraction (box window, no filter)."""
    out = img.array.astype(np.complex64)
    for ax in inplane_axes(img):
        n = img.shape[ax]
        f = np.fft.fft(out, axis=ax)
        mask = np.abs(np.fft.fftfreq(n)) <= 0.5 * keep
        shape = [1, 1, 1]
        shape[ax] = n
        out = np.fft.ifft(f * mask.reshape(shape), axis=ax)
    return np.abs(out).astype(np.float32)


def tissue_map(labels: Image, t1: Image | None) -> Image:
    """Tissue class per voxel on the label map's grid: 0 unchanged, 1.. the ``TISSUE_CLASSES``.

    Unlabelled voxels (fat planes between muscles, pelvic and ischioanal fat) that are brighter on
    T1 than halfway between muscle and subcutaneous fat count as fat, so that all fat changes
    alike; without a T1 only the labelled structures change.
    """
    lab = np.clip(labels.array.astype(np.int64), 0, NUM_CLASSES - 1)
    out = tissue_lookup()[lab]
    fat_k, muscle_k = (list(TISSUE_CLASSES).index(n) + 1 for n in ("fat", "muscle"))
    if t1 is not None:
        t = resample_like(t1, labels, order=1).array
        muscle, fat = out == muscle_k, out == fat_k
        if muscle.any() and fat.any():
            half = 0.5 * (float(np.median(t[muscle])) + float(np.median(t[fat])))
            out[(lab == 0) & (t > half)] = fat_k
    return Image(out, labels.affine)


def tissue_contrast(img: Image, tissues: Image, strength: float, rng: np.random.Generator,
                    blur_mm: float = 1.0) -> tuple[np.ndarray, dict]:
    """``img`` with each tissue class of ``tissues`` (``tissue_map``) scaled by its own random factor.

    ``tissues`` may lie on another grid: it is taken onto ``img``'s in world coordinates
    (nearest). Returns the new array and the factors drawn, by class.
    """
    from scipy.ndimage import gaussian_filter

    cls = resample_like(tissues, img, order=0).array
    table = np.ones(len(TISSUE_CLASSES) + 1, np.float32)
    drawn = {}
    for k, name in enumerate(TISSUE_CLASSES, start=1):
        drawn[name] = float(np.exp(rng.uniform(-np.log(strength), np.log(strength))))
        table[k] = drawn[name]
    sigma = [blur_mm / s for s in img.spacing]
    return img.array * gaussian_filter(table[cls], sigma, mode="nearest"), drawn


def fat_unsuppressed(img: Image, labels: Image, t1: Image | None, strength: float,
                     blur_mm: float = 1.0) -> np.ndarray:
    """``img`` (a fat-suppressed series) with its fat given back: fat voxels (``tissue_map``'s fat
    class, and bone brighter on ``t1`` than halfway between muscle and fat; without a T1 the
    labelled fat only) get a signal added that takes fat's median to ``strength`` times the
    muscles' median on ``img``."""
    from scipy.ndimage import gaussian_filter

    cls = tissue_map(labels, t1)
    fat_k, muscle_k, bone_k = (list(TISSUE_CLASSES).index(n) + 1 for n in ("fat", "muscle", "bone"))
    c = cls.array
    fat = c == fat_k
    if t1 is not None:
        t = resample_like(t1, labels, order=1).array
        half = 0.5 * (float(np.median(t[c == muscle_k])) + float(np.median(t[fat])))
        fat |= (c == bone_k) & (t > half)
    on_img = resample_like(Image(fat.astype(np.float32), labels.affine), img, order=0).array
    muscle = resample_like(Image((c == muscle_k).astype(np.float32), labels.affine), img, order=0).array
    a = img.array
    add = strength * float(np.median(a[muscle > 0])) - float(np.median(a[on_img > 0]))
    weight = gaussian_filter(on_img, [blur_mm / s for s in img.spacing], mode="nearest")
    return a + max(add, 0.0) * weight


def fat_water_swapped(images: dict, col: str, share: float) -> np.ndarray:
    """The Dixon image ``col`` with fat and water exchanged where world x lies within the share
    ``share`` of the fat image's width from its largest x (the subject's right)."""
    img = images[col]
    partner = images["dixon_water" if col == "dixon_fat" else "dixon_fat"]
    if not partner.same_grid(img):
        partner = resample_like(partner, img, order=1)
    x = world_grid(images["dixon_fat"])[0]
    cut = float(x.max()) - share * float(x.max() - x.min()) - 1e-3
    return np.where(world_grid(img)[0] >= cut, partner.array, img.array)


def shift_subject(row: dict, src: Path, dst: Path, shift: str, strength: float, seed: int) -> None:
    """Write the shifted copy of one subject of the cohort."""
    rng = np.random.default_rng(seed)
    images = {c: load_nifti(src / row[c]) for c in IMAGE_COLUMNS if row.get(c)}
    tissues = tissue_map(load_nifti(src / row["labels"]), images.get("t1")) if shift == "tissue" else None
    ellipse = body_ellipse(images["t1"]) if shift == "coil" and "t1" in images else None
    for col, img in images.items():
        if shift == "coil":
            centre, radii = ellipse if ellipse is not None else body_ellipse(img)
            out = img.array * coil_field(world_grid(img), centre, radii, strength)
        elif shift == "gamma":
            # Dixon magnitudes are quantitative (their ratio is the fat fraction): left as they are
            out = img.array if col.startswith("dixon") else gamma_map(img.array, strength)
        elif shift == "ghost":
            out = ghost(img, strength, np.random.default_rng(rng.integers(2**32)))
        elif shift == "ringing":
            out = ringing(img, strength)
        elif shift == "tissue":
            out = img.array if col.startswith("dixon") else tissue_contrast(img, tissues, strength, rng)[0]
        elif shift == "fatsat":
            out = (fat_unsuppressed(img, load_nifti(src / row["labels"]), images.get("t1"), strength)
                   if col == "fluid" else img.array)
        elif shift == "fatwater":
            both = "dixon_fat" in images and "dixon_water" in images
            out = fat_water_swapped(images, col, strength) if col.startswith("dixon") and both else img.array
        else:
            raise ValueError(f"unknown shift {shift!r}; one of {', '.join(SHIFTS)}")
        save_nifti(img.with_array(np.asarray(out, np.float32)), dst / row[col])
    for col in ("labels", "truth", "labels_fluid", "labels_dixon"):
        if not row.get(col):
            continue
        (dst / row[col]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / row[col], dst / row[col])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", required=True, help="phantom cohort folder (cohort.csv)")
    ap.add_argument("--out", required=True, help="new cohort folder")
    ap.add_argument("--shift", required=True, choices=sorted(SHIFTS))
    ap.add_argument("--strength", type=float, default=None, help="default: " +
                    ", ".join(f"{k} {v}" for k, v in SHIFTS.items()))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="first N subjects only")
    a = ap.parse_args(argv)
    src, dst = Path(a.cohort), Path(a.out)
    if src.resolve() == dst.resolve():
        ap.error("--out must differ from --cohort (inputs are never modified)")
    strength = SHIFTS[a.shift] if a.strength is None else a.strength
    with open(src / "cohort.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[: a.limit]
    dst.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        shift_subject(row, src, dst, a.shift, strength, a.seed * 100003 + i)
    with open(dst / "cohort.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} subject(s) -> {dst} ({a.shift}, strength {strength})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
