"""End-to-end inference speed: seconds per scan, peak memory, cohort throughput with 1 vs 2 workers.

    python benchmarks/infer_speed.py [--model PATH | --random-model] [--repeats 3] [--cohort 4]

Input: one phantom from the generator (or ``--subject DIR`` holding t1.nii.gz + t2fs/stir.nii.gz),
resampled onto a 320 x 320 x 40 axial grid covering the T1's field of view (a typical pelvis
T1 + T2 fat-sat pair). Prints:
  * CLI cold start: ``python infer.py --t1 --t2fs --out`` in a fresh process (imports + model
    load + segmentation + measurement + outputs), median wall seconds and peak RSS (ru_maxrss
    via ``os.wait4``: the largest of the process and its children);
  * API warm: ``pipeline.api.run_subject`` with the model loaded once, median seconds per scan;
  * cohort throughput with ``--workers 1`` and ``--workers 2`` on ``--cohort`` copies of the scan
    (subjects per minute, whole command wall time).
``--random-model`` times the default architecture with random weights (the speed of the network
does not depend on its weights; post-processing of a random output can take longer).
The host's speed varies: compare figures from the same run only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _prepare_scan(folder: Path, subject_dir: Path | None) -> dict:
    """Write t1.nii.gz + t2fs.nii.gz (320 x 320 x 40) into ``folder``; return their paths."""
    from pipeline.image import load_nifti, resample_to_grid, save_nifti

    if subject_dir is None:
        from data_scripts.make_phantoms import generate_subject

        generate_subject(folder / "gen", 0, 0, fov="bilateral", fluid_kind="t2fs", dixon=False, subject="src")
        subject_dir = folder / "gen" / "src"
    t1 = load_nifti(subject_dir / "t1.nii.gz", "t1")
    fluid_path = next(p for p in (subject_dir / "t2fs.nii.gz", subject_dir / "stir.nii.gz") if p.exists())
    fluid = load_nifti(fluid_path, "t2fs")
    # the T1's field of view (world bounding box) on a 320 x 320 x 40 RAS grid
    from pipeline.image import grid_corners

    corners = grid_corners(t1.shape, t1.affine)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    shape = np.array([320, 320, 40])
    spacing = (hi - lo) / shape
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = lo + spacing / 2
    paths = {}
    for name, img in (("t1", t1), ("t2fs", fluid)):
        out = resample_to_grid(img, tuple(shape), affine, order=1)
        paths[name] = folder / f"{name}.nii.gz"
        save_nifti(out, paths[name], dtype=np.float32)
    print(f"scan: 320 x 320 x 40, spacing {np.round(spacing, 2).tolist()} mm (from {subject_dir})")
    return paths


def _run_child(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """Run a command; return (wall seconds, peak RSS MiB, exit code). The peak is ru_maxrss from
    ``os.wait4``: the largest of the process and its reaped children (pool workers)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        print(f"  command failed ({proc.returncode}): {err.strip().splitlines()[-1:] }")
    return wall, usage.ru_maxrss / 1024.0, proc.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model bundle (default: the bundled model)")
    ap.add_argument("--random-model", action="store_true", help="default architecture, random weights")
    ap.add_argument("--subject", type=Path, help="folder with t1.nii.gz + t2fs.nii.gz/stir.nii.gz")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cohort", type=int, default=4, help="subjects in the throughput test (0: skip)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)   # let each run use the machine's cores (2 here)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="ifi_speed_") as tmp:
        tmp = Path(tmp)
        model = args.model
        if args.random_model:
            import torch

            from models.bundle import default_metadata, model_from_metadata, save_bundle

            torch.manual_seed(0)
            meta = default_metadata()
            save_bundle(tmp / "random", model_from_metadata(meta), meta)
            model = str(tmp / "random")
        from models.bundle import DEFAULT_BUNDLE, bundle_paths

        if not bundle_paths(model or DEFAULT_BUNDLE)[0].exists():
            print(f"no model weights at {bundle_paths(model or DEFAULT_BUNDLE)[0]}; pass --model or --random-model")
            return 1
        scan = _prepare_scan(tmp, args.subject)
        print(f"cores: {os.cpu_count()}, device: {args.device}, model: {model or DEFAULT_BUNDLE}")

        cli = [sys.executable, str(REPO / "infer.py"), "--t1", str(scan["t1"]), "--t2fs", str(scan["t2fs"]),
               "--device", args.device, "--quiet"] + (["--model", model] if model else [])
        walls, rss = [], []
        for r in range(args.repeats):
            wall, peak, code = _run_child(cli + ["--out", str(tmp / f"cli{r}")], env)
            if code == 0:
                walls.append(wall)
                rss.append(peak)
        if walls:
            print(f"CLI cold start, one scan: median {statistics.median(walls):.2f} s "
                  f"(runs {', '.join(f'{w:.2f}' for w in walls)}), peak RSS {max(rss):.0f} MiB")

        from pipeline.api import run_subject
        from pipeline.segment import load_model

        from pipeline.api import SubjectError

        m = load_model(model, device=args.device)
        times = []
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            try:
                rec = run_subject({"t1": scan["t1"], "t2fs": scan["t2fs"]}, tmp / f"api{r}", model=m)
            except SubjectError as exc:
                print(f"API run failed: {exc}")
                return 1
            if r:   # the first call warms up oneDNN
                times.append(time.perf_counter() - t0)
        stages = rec["provenance"]["timings"]
        print(f"API warm, one scan: median {statistics.median(times):.2f} s per scan "
              f"(load {stages['load_s']:.2f}, segment {stages['segment_s']:.2f}, measure {stages['measure_s']:.2f}, "
              f"total before writing {stages['total_s']:.2f} s)")

        if args.cohort > 0:
            lines = ["subject,t1,fluid,fluid_kind"]
            lines += [f"b{i:02d},{scan['t1']},{scan['t2fs']},t2fs" for i in range(args.cohort)]
            manifest = tmp / "cohort.csv"
            manifest.write_text("\n".join(lines) + "\n")
            for workers in (1, 2):
                cmd = [sys.executable, str(REPO / "infer.py"), "--manifest", str(manifest), "--workers", str(workers),
                       "--out", str(tmp / f"cohort_w{workers}"), "--device", args.device, "--quiet"]
                cmd += ["--model", model] if model else []
                wall, peak, code = _run_child(cmd, env)
                print(f"cohort of {args.cohort}, --workers {workers}: {wall:.1f} s, "
                      f"{60 * args.cohort / wall:.1f} subjects/min (largest process peak RSS {peak:.0f} MiB, exit {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
