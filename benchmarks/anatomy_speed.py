"""Time the phantom anatomy stage and print the 3D IFS / QFS distribution it produces.

    OMP_NUM_THREADS=1 python benchmarks/anatomy_speed.py --n 20 [--fov bilateral] [--axial]

Prints per subject the CPU and wall time of ``build_anatomy`` (and optionally of ``axial_truth``
on 4 mm axial slices), the peak resident memory and the per-hip truth, then summary figures.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_scripts.phantoms.anatomy import build_anatomy  # noqa: E402
from data_scripts.phantoms.truth import axial_truth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fov", default="bilateral", choices=["bilateral", "left", "right"])
    ap.add_argument("--axial", action="store_true", help="also time axial_truth on 4 mm slices")
    args = ap.parse_args()
    cpu, wall, ifs, qfs, narrow_sides = [], [], [], [], []
    for k in range(args.n):
        c0, t0 = time.process_time(), time.perf_counter()
        a = build_anatomy(np.random.default_rng(args.seed + k), fov=args.fov)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
        line = f"subject {k:3d} grid {a.shape} cpu {cpu[-1]:.2f} s wall {wall[-1]:.2f} s"
        if args.axial:
            z = a.affine[2, 3] + a.affine[2, 2] * np.arange(0, a.shape[2], 4)
            t1 = time.perf_counter()
            ax = axial_truth(a, np.array([0.0, 0.0, 1.0]), z)
            line += f" axial {time.perf_counter() - t1:.2f} s"
        print(line)
        n = 0
        for side, h in a.hips.items():
            ifs.append(h["ifs_3d_mm"])
            qfs.append(h["qfs_3d_mm"] if h["qfs_3d_mm"] is not None else np.nan)
            n += h["ifs_3d_mm"] <= 15.0
            extra = f" axial IFS {ax[side]['ifs_axial_mm']:.1f}" if args.axial and ax[side]["ifs_axial_mm"] else ""
            print(f"    {side:5s} IFS {h['ifs_3d_mm']:5.1f} QFS {qfs[-1]:5.1f}{extra} edema {h['qf_edema']:6s} "
                  f"FF {h['qf_fat_fraction']:.2f} (G{h['qf_goutallier_grade']}) QF {h['qf_volume_ml']:.1f} ml "
                  f"pose rot {h['pose']['rotation']:+.0f} add {h['pose']['adduction']:+.0f} "
                  f"flex {h['pose']['flexion']:+.0f}")
        narrow_sides.append(n)
    ifs, qfs = np.asarray(ifs), np.asarray(qfs)
    print(f"\nbuild_anatomy cpu mean {np.mean(cpu):.2f} s (max {np.max(cpu):.2f}), wall mean {np.mean(wall):.2f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print("IFS 3D mm: min {:.1f} p25 {:.1f} median {:.1f} p75 {:.1f} max {:.1f}; <= 15 mm: {:.0%}".format(
        ifs.min(), *np.percentile(ifs, [25, 50, 75]), ifs.max(), (ifs <= 15).mean()))
    print("QFS 3D mm: min {:.1f} p25 {:.1f} median {:.1f} p75 {:.1f} max {:.1f}; <= 10 mm: {:.0%}".format(
        np.nanmin(qfs), *np.nanpercentile(qfs, [25, 50, 75]), np.nanmax(qfs), np.nanmean(qfs <= 10)))
    if args.fov == "bilateral":
        ns = np.asarray(narrow_sides)
        print(f"subjects with 0 / 1 / 2 narrow hips: {(ns == 0).sum()} / {(ns == 1).sum()} / {(ns == 2).sum()}")


if __name__ == "__main__":
    main()
