"""Time the whole phantom generator per subject: anatomy vs MR simulation + acquisition + writing.

    OMP_NUM_THREADS=1 python benchmarks/phantom_speed.py --n 5 [--seed 0] [--out DIR] [--dixon]

Prints per subject the CPU seconds of ``build_anatomy`` and of ``generate_subject`` on that
anatomy (T1 + fluid series [+ Dixon] + labels + truth, files written), the T1 grid, and the means.
CPU time (not wall time) is reported because the machine may be shared.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_scripts.make_phantoms import generate_subject  # noqa: E402
from data_scripts.phantoms.acquisition import draw_fov_kind  # noqa: E402
from data_scripts.phantoms.anatomy import build_anatomy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--dixon", action="store_true", help="force the Dixon pair for every subject")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="phantom_speed_"))
    ta, tg = [], []
    for i in range(args.n):
        # same streams as generate_subject: SeedSequence([seed, i]).spawn(4) -> anatomy, protocol, ...
        s_anat, s_proto, *_ = np.random.SeedSequence([args.seed, i]).spawn(4)
        fov = draw_fov_kind(np.random.default_rng(s_proto))
        c0 = time.process_time()
        anatomy = build_anatomy(np.random.default_rng(s_anat), fov=fov)
        ta.append(time.process_time() - c0)
        c0 = time.process_time()
        kw = {"dixon": True} if args.dixon else {}
        row = generate_subject(out, args.seed, i, anatomy=anatomy, fov=fov, **kw)
        tg.append(time.process_time() - c0)
        import nibabel as nib

        shape = nib.load(str(out / row["t1"])).shape
        print(f"{row['subject']} {fov:9s} anatomy {ta[-1]:.2f} s  mr+acquisition+write {tg[-1]:.2f} s  "
              f"total {ta[-1] + tg[-1]:.2f} s  t1 {shape} dixon={'yes' if row['dixon_fat'] else 'no'}")
    print(f"mean CPU s per subject: anatomy {np.mean(ta):.2f}, mr+acquisition+write {np.mean(tg):.2f}, "
          f"total {np.mean(ta) + np.mean(tg):.2f} (n={args.n}); files in {out}")


if __name__ == "__main__":
    main()
