"""Rebuild the bundled example subject ``data_scripts/example/`` (used by ``infer.py --demo``).

One phantom from the generator (bilateral field of view, T1 + STIR), reduced to stay small in
the repository (< 3 MB): every series is block-averaged 2 x 2 in-plane, across its slices
whatever its storage axis order (about 1.5 mm pixels, slices unchanged: still a realistic pelvis
protocol), the label map is reduced on the same blocks by majority vote, so it lies exactly on
the example T1's grid. World coordinates are unchanged, so ``truth.json``
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


def _block_affine(affine: np.ndarray, factor: int, slice_ax: int) -> np.ndarray:
    """Affine of a grid whose voxels are factor x factor blocks across the two in-plane axes (all
    but ``slice_ax``) of the grid of ``affine``; block (i, j, k) starts at voxel factor * index."""
    scale = np.eye(4)
    for ax in range(3):
        if ax != slice_ax:
            scale[ax, ax] = factor
            scale[ax, 3] = (factor - 1) / 2
    return np.asarray(affine, float) @ scale


def _blocks(data: np.ndarray, factor: int, slice_ax: int) -> np.ndarray:
    """(I', J', K, factor * factor): the in-plane blocks of ``data`` with its slice axis moved last
    (trailing rows and columns that do not fill a block are dropped)."""
    d = np.moveaxis(np.asarray(data), slice_ax, -1)
    i, j, k = d.shape[0] // factor, d.shape[1] // factor, d.shape[2]
    d = d[:i * factor, :j * factor]
    return d.reshape(i, factor, j, factor, k).transpose(0, 2, 4, 1, 3).reshape(i, j, k, factor * factor)


def reduce_intensity(data: np.ndarray, slice_ax: int, factor: int = FACTOR) -> np.ndarray:
    """Block mean over factor x factor in-plane blocks (``slice_ax``: the acquisition's slice axis,
    which is kept)."""
    mean = _blocks(np.asarray(data, np.float32), factor, slice_ax).mean(axis=-1)
    return np.moveaxis(mean, -1, slice_ax)


def reduce_labels(labels: np.ndarray, slice_ax: int, factor: int = FACTOR) -> np.ndarray:
    """Block majority vote (ties: the smaller label value) over factor x factor in-plane blocks."""
    blocks = _blocks(labels, factor, slice_ax)
    n = int(np.max(labels)) + 1
    counts = np.stack([(blocks == v).sum(axis=-1) for v in range(n)], axis=-1)
    return np.moveaxis(counts.argmax(axis=-1).astype(np.uint8), -1, slice_ax)


def make_example(out_dir, seed: int = 4, index: int = 0) -> Path:
    """Generate the phantom and write the reduced example into ``out_dir``; return it."""
    import nibabel as nib

    from data_scripts.make_phantoms import generate_subject
    from pipeline.geometry import acquisition_slice_axis

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        row = generate_subject(tmp, seed, index, fov="bilateral", dixon=False, fluid_kind="stir",
                               subject="example")
        src = Path(tmp) / "example"
        staging = Path(tmp) / "reduced"
        staging.mkdir()
        # The series may be stored with any axis order (the generator varies it): reduce across
        # the acquisition's slices, never along them.
        for name in ("t1", row["fluid_kind"]):
            nii = nib.load(str(src / f"{name}.nii.gz"))
            slice_ax = acquisition_slice_axis(nii.affine)
            data = reduce_intensity(nii.get_fdata(dtype=np.float32), slice_ax)
            img = nib.Nifti1Image(np.rint(data).astype(np.int16), _block_affine(nii.affine, FACTOR, slice_ax))
            nib.save(img, str(staging / f"{name}.nii.gz"))
        lab = nib.load(str(src / "labels.nii.gz"))
        slice_ax = acquisition_slice_axis(lab.affine)
        nib.save(nib.Nifti1Image(reduce_labels(np.asarray(lab.dataobj), slice_ax),
                                 _block_affine(lab.affine, FACTOR, slice_ax)),
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
