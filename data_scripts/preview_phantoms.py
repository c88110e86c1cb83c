"""Preview a phantom cohort: per subject a PNG of the T1 and the fluid image on one axial plane.

    python data_scripts/preview_phantoms.py --cohort DIR --out PNGDIR [--n K]

The plane is world-axial (constant z) through the lesser trochanter end point of the hip with the
narrowest ischiofemoral space. Images are resampled onto it in world coordinates (so any storage
orientation or oblique acquisition looks the same), shown in radiological convention (patient's
right on the image's left, anterior up), with labels outlined, the IFS truth drawn between its end
points, and "R"/"L" marked.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.image import Image, grid_corners, load_nifti  # noqa: E402
from pipeline.labels import label_names  # noqa: E402

PIXEL_MM = 0.8


def axial_plane(ref: Image, z: float, pixel: float = PIXEL_MM) -> tuple[np.ndarray, tuple]:
    """World points (H, W, 3) of an axial plane at height ``z`` covering ``ref``'s extent, in
    radiological display order: columns run from patient right (+x) to left, rows from anterior
    (+y) to posterior. Returns the points and the (x_max, x_min, y_min, y_max) extent."""
    c = grid_corners(ref.shape, ref.affine)
    x_lo, x_hi = c[:, 0].min(), c[:, 0].max()
    y_lo, y_hi = c[:, 1].min(), c[:, 1].max()
    xs = np.arange(x_hi, x_lo, -pixel)
    ys = np.arange(y_hi, y_lo, -pixel)
    pts = np.stack(np.meshgrid(xs, ys, indexing="xy"), -1)  # (H=len(ys), W=len(xs), 2)
    pts = np.concatenate([pts, np.full(pts.shape[:2] + (1,), z)], -1)
    return pts, (x_hi, x_lo, y_lo, y_hi)


def sample_plane(img: Image, pts: np.ndarray, order: int) -> np.ndarray:
    """Sample ``img`` at world points (H, W, 3) (NaN / 0 outside)."""
    from scipy.ndimage import map_coordinates

    vox = img.world_to_voxel(pts.reshape(-1, 3)).T
    arr = img.array if order == 0 else img.array.astype(np.float32, copy=False)
    cval = 0 if order == 0 else np.nan
    out = map_coordinates(arr, vox, order=order, mode="constant", cval=cval)
    return out.reshape(pts.shape[:2])


def _window(a: np.ndarray) -> tuple[float, float]:
    v = a[np.isfinite(a)]
    if v.size == 0:
        return 0.0, 1.0
    return float(np.percentile(v, 1)), float(np.percentile(v, 99.9))


def preview_subject(cohort_dir: Path, row: dict, out_png: Path, dpi: int = 72) -> Path:
    """Render one subject's preview PNG (see module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = json.loads((cohort_dir / row["truth"]).read_text())
    t1 = load_nifti(cohort_dir / row["t1"], "t1")
    fluid = load_nifti(cohort_dir / row["fluid"], row["fluid_kind"]) if row.get("fluid") else None
    labels = load_nifti(cohort_dir / row["labels"], "labels")
    hips = truth["hips"]
    if hips:
        side = min(hips, key=lambda s: hips[s]["ifs_3d_mm"])
        z = float(hips[side]["ifs_3d_points"][1][2])
    else:
        side, z = None, float(t1.voxel_to_world((np.asarray(t1.shape) - 1)[None] / 2.0)[0, 2])
    pts, extent = axial_plane(t1, z)
    lab = sample_plane(labels, pts, 0)
    panels = [("T1", sample_plane(t1, pts, 1))]
    if fluid is not None:
        panels.append((row["fluid_kind"].upper(), sample_plane(fluid, pts, 1)))
    names = label_names()
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), dpi=dpi)
    axes = np.atleast_1d(axes)
    for ax, (title, img) in zip(axes, panels):
        lo, hi = _window(img)
        ax.imshow(np.nan_to_num(img, nan=lo), cmap="gray", vmin=lo, vmax=hi, extent=extent, origin="upper")
        for v in np.unique(lab):
            if v == 0:
                continue
            ax.contour(np.linspace(extent[0], extent[1], lab.shape[1]), np.linspace(extent[3], extent[2], lab.shape[0]),
                       (lab == v).astype(np.float32), levels=[0.5], colors=[cmap((int(v) - 1) % 10)], linewidths=0.6)
        for s, h in hips.items():
            (a, b) = np.asarray(h["ifs_3d_points"])[:, :2]
            ax.plot([a[0], b[0]], [a[1], b[1]], "-", color="yellow", lw=1.5)
            ax.text(b[0], b[1] + 6, f"IFS {h['ifs_3d_mm']:.1f} mm ({s})", color="yellow", fontsize=7,
                    ha="center")
        ax.set_xlim(extent[0], extent[1])  # +x (patient right) on the left of the image
        ax.set_ylim(extent[2], extent[3])  # anterior up
        ax.text(0.02, 0.5, "R", color="red", fontsize=16, fontweight="bold", transform=ax.transAxes, va="center")
        ax.text(0.95, 0.5, "L", color="red", fontsize=16, fontweight="bold", transform=ax.transAxes, va="center")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    from matplotlib.lines import Line2D

    present = sorted(int(v) for v in np.unique(lab) if v != 0)
    handles = [Line2D([], [], color=cmap((v - 1) % 10), lw=2, label=names[v] if v < len(names) else str(v))
               for v in present]
    acqd = truth.get("acquisition", {})
    fig.suptitle(f"{truth['subject']}  axial z={z:.0f} mm (LT level of the narrowest-IFS hip: {side or '-'})  "
                 f"{acqd.get('field_strength_t', '?')} T, stored "
                 f"{acqd.get('series', {}).get('t1', {}).get('axcodes', '?')}\n"
                 "radiological convention: patient's RIGHT on the image's LEFT, anterior up", fontsize=8)
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description="Preview PNGs of a phantom cohort")
    ap.add_argument("--cohort", required=True, help="cohort folder with cohort.csv")
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    ap.add_argument("--n", type=int, default=None, help="only the first K subjects")
    a = ap.parse_args(argv)
    cohort = Path(a.cohort)
    with open(cohort / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows[: a.n]:
        png = preview_subject(cohort, row, Path(a.out) / f"{row['subject']}.png")
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
