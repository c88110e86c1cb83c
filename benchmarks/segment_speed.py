"""Seconds and peak memory of ``pipeline.segment.segment`` on a 320x320x40 two-channel scan.

Each configuration runs in a fresh subprocess (so ``ru_maxrss`` is that run's peak resident
memory) with the given thread count: one warm-up call, then ``--repeats`` timed calls; the
median and the per-stage timings are printed. Uses the bundled model, or ``--model``; with
``--random-weights`` an untrained network of the default architecture (same speed).

The scan is a toy (a uniform ellipse with noise) unless ``--scan DIR`` names a phantom subject
folder (``t1.nii.gz`` and ``stir.nii.gz`` or ``t2fs.nii.gz``), whose images are then resampled
onto the same 320 x 320 x 40 grid (1.2 x 1.2 x 4 mm) around the T1's centre: real anatomy, which
the mirror test-time pass (``--mirror``, default: the model's setting) needs to find the measured
structures it covers.

    python benchmarks/segment_speed.py --threads 2 --repeats 3 [--bf16 both] [--tcmalloc both] \
        [--scan work_tmp/test/sub-0000] [--mirror model|on|off|full]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from pipeline.runtime import TCMALLOC  # noqa: E402
from pipeline.segment import MIRROR_CHOICES  # noqa: E402

CHILD = r"""
import json, resource, statistics, sys, time
sys.path.insert(0, {root!r})
import numpy as np, torch
from pipeline.image import Image
from pipeline.segment import SegModel, load_model, segment
args = json.loads({args!r})
torch.set_num_threads(args["threads"])
if args["model"]:
    model = load_model(args["model"], device="cpu")
else:
    from models.bundle import default_metadata, model_from_metadata
    meta = default_metadata()
    model = SegModel(model_from_metadata(meta).eval(), meta, torch.device("cpu"))
rng = np.random.default_rng(0)
aff = np.diag([-1.2, -1.2, 4.0, 1.0]); aff[:3, 3] = [190, 190, -80]
shape = (320, 320, 40)
x = np.linspace(-1, 1, shape[0])[:, None, None]; y = np.linspace(-1, 1, shape[1])[None, :, None]
body = ((x / 0.9) ** 2 + (y / 0.6) ** 2 < 1).astype(np.float32) * np.ones(shape, np.float32)
t1 = Image(body * 800 + rng.normal(0, 30, shape).astype(np.float32), aff, "t1")
fl = Image(body * 300 + rng.normal(0, 30, shape).astype(np.float32), aff, "stir")
if args["scan"]:
    from pathlib import Path
    from pipeline.image import load_nifti, resample_to_grid
    d = Path(args["scan"])
    src = load_nifti(d / "t1.nii.gz", "t1")
    centre = src.affine @ np.append((np.asarray(src.shape) - 1) / 2.0, 1.0)
    aff[:3, 3] = centre[:3] - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    t1 = resample_to_grid(src, shape, aff)
    fluid_path = d / "stir.nii.gz" if (d / "stir.nii.gz").exists() else d / "t2fs.nii.gz"
    fl = resample_to_grid(load_nifti(fluid_path, "stir"), shape, aff)
imgs = {{"t1": t1, "fluid": fl}}
from pipeline.segment import MIRROR_CHOICES
mirror = MIRROR_CHOICES[args["mirror"]]
# The toy volume (a uniform ellipse) is no anatomy: the network's 'muscle' on it takes in
# background, and the shading check would fit noise and trigger a second pass that no real scan
# without strong shading gets. So: segment without the pass, plus the check's own cost. For the
# same reason its fluid series reads as not fat-suppressed (fat ~27 x 'muscle'), which would
# send it through the T1-only second pass that only such a series gets: the check still runs
# (and is timed), its threshold is lifted.
import pipeline.segment as segment_module
from pipeline.segment import _segment_once, scan_shading
segment_module.UNSUPPRESSED_FAT_RATIO = float("inf")
segment(imgs, model, bf16=args["bf16"], shading=False, mirror=mirror)
runs = []
for _ in range(args["repeats"]):
    t0 = time.perf_counter(); s = segment(imgs, model, bf16=args["bf16"], shading=False, mirror=mirror)
    dt, timings = time.perf_counter() - t0, s.timings
    del s                                    # so that the check's own pass adds no peak memory
    seg, probs_w, waff = _segment_once(imgs, model, None, False, args["bf16"], mirror)
    del seg
    t1 = time.perf_counter(); scan_shading(imgs, probs_w, waff); check = time.perf_counter() - t1
    del probs_w
    runs.append((dt + check, dict(timings, shading_check=check)))
med = statistics.median(r[0] for r in runs)
stages = {{k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}}
print(json.dumps({{"median_s": med, "stages": stages,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}}))
"""


def run(threads: int, repeats: int, model: str | None, bf16: bool, tcmalloc: bool,
        scan: str | None = None, mirror: str = "model") -> dict:
    """Run one configuration in a subprocess and return its measured figures."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if tcmalloc:
        env["LD_PRELOAD"] = TCMALLOC
    else:
        env.pop("LD_PRELOAD", None)
    args = json.dumps({"threads": threads, "repeats": repeats, "model": model, "bf16": bf16,
                       "scan": None if scan is None else str(Path(scan).resolve()), "mirror": mirror})
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), args=args)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="bundle path (default: the bundled model)")
    ap.add_argument("--random-weights", action="store_true", help="untrained default network")
    ap.add_argument("--bf16", choices=["off", "on", "both"], default="both")
    ap.add_argument("--tcmalloc", choices=["off", "on", "both"], default="both" if Path(TCMALLOC).exists() else "off")
    ap.add_argument("--scan", default=None, help="phantom subject folder to resample (default: a toy)")
    ap.add_argument("--mirror", choices=list(MIRROR_CHOICES), default="model",
                    help="mirror test-time pass (default: the model's inference.mirror)")
    a = ap.parse_args()
    model = None if a.random_weights else (a.model or str(ROOT / "models" / "ifi_seg_default"))
    for tc in ([False, True] if a.tcmalloc == "both" else [a.tcmalloc == "on"]):
        for bf in ([False, True] if a.bf16 == "both" else [a.bf16 == "on"]):
            r = run(a.threads, a.repeats, model, bf, tc, a.scan, a.mirror)
            st = " ".join(f"{k}={v:.2f}s" for k, v in r["stages"].items())
            print(f"tcmalloc={'on ' if tc else 'off'} bf16={'on ' if bf else 'off'} threads={a.threads}: "
                  f"median {r['median_s']:.2f} s ({st}), peak RSS {r['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
