"""Rebuild the bundled example subject ``data_scripts/example/`` (used by ``infer.py --demo``).

One phantom from the generator (bilateral field of view, T1 + STIR), reduced to stay small in
the repository (< 3 MB): every series is block-averaged 2 x 2 in-plane (about 1.6 mm pixels,
still a realistic pelvis protocol), the label map is reduced on the same blocks by majority vote,
so it lies exactly on the example T1's grid. World coordinates are unchanged, so ``truth.json``
(world mm) still applies.

    python data_scripts/make_example.py [--out data_scripts/example] [--seed 4]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FACTOR = 2   # in-plane block size


def _block_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of a grid whose voxel (i, j, k) is the block [f*i, f*i+f) x [f*j, f*j+f) x {k}."""
    scale = np.array([[factor, 0, 0, (factor - 1) / 2], [0, factor, 0, (factor - 1) / 2],
                      [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return np.asarray(affine, float) @ scale


def _crop(shape, factor):
    return tuple(slice(0, (s // factor) * factor) if ax < 2 else slice(None) for ax, s in enumerate(shape))


def reduce_intensity(data: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """Block mean over factor x factor in-plane blocks."""
    d = np.asarray(data, np.float32)[_crop(data.shape, factor)]
    i, j, k = d.shape
    return d.reshape(i // factor, factor, j // factor, factor, k).mean(axis=(1, 3))


def reduce_labels(labels: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """Block majority vote (ties: the smaller label value) over factor x factor in-plane blocks."""
    d = np.asarray(labels)[_crop(labels.shape, factor)]
    i, j, k = d.shape
    blocks = d.reshape(i // factor, factor, j // factor, factor, k).transpose(0, 2, 4, 1, 3).reshape(
        i // factor, j // factor, k, factor * factor)
    n = int(d.max()) + 1
    counts = np.stack([(blocks == v).sum(axis=-1) for v in range(n)], axis=-1)
    return counts.argmax(axis=-1).astype(np.uint8)


def make_example(out_dir, seed: int = 4, index: int = 0) -> Path:
    """Generate the phantom and write the reduced example into ``out_dir``; return it."""
    import nibabel as nib

    from data_scripts.make_phantoms import generate_subject

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        row = generate_subject(tmp, seed, index, fov="bilateral", dixon=False, fluid_kind="stir",
                               subject="example")
        src = Path(tmp) / "example"
        staging = Path(tmp) / "reduced"
        staging.mkdir()
        for name in ("t1", row["fluid_kind"]):
            nii = nib.load(str(src / f"{name}.nii.gz"))
            data = reduce_intensity(nii.get_fdata(dtype=np.float32))
            img = nib.Nifti1Image(np.rint(data).astype(np.int16), _block_affine(nii.affine, FACTOR))
            nib.save(img, str(staging / f"{name}.nii.gz"))
        lab = nib.load(str(src / "labels.nii.gz"))
        nib.save(nib.Nifti1Image(reduce_labels(np.asarray(lab.dataobj)), _block_affine(lab.affine, FACTOR)),
                 str(staging / "labels.nii.gz"))
        shutil.copy(src / "labels.json", staging / "labels.json")
        truth = json.loads((src / "truth.json").read_text())
        truth["note"] = (f"example reduced {FACTOR}x{FACTOR} in-plane by data_scripts/make_example.py; "
                         "world coordinates unchanged")
        (staging / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
        fluid = f"{row['fluid_kind']}.nii.gz"
        (staging / "cohort.csv").write_text(
            "subject,t1,fluid,fluid_kind,dixon_fat,dixon_water,labels,truth\n"
            f"example,t1.nii.gz,{fluid},{row['fluid_kind']},,,labels.nii.gz,truth.json\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out_dir)
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "example"))
    ap.add_argument("--seed", type=int, default=4)
    args = ap.parse_args(argv)
    out = make_example(args.out, args.seed)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"example written to {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
