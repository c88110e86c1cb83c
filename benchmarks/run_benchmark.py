"""End-to-end benchmark: fresh test cohort -> pipeline -> accuracy vs truth, timings, memory, speed.

    python benchmarks/run_benchmark.py [--n 20] [--seed 90000] [--out DIR] [--json results.json]

Steps (each heavy step runs in its own child process, so ``ru_maxrss`` is that step's peak memory):

1. generate a test cohort with ``data_scripts/make_phantoms.py`` from a seed >= 90000 (seeds of that
   range are never used for training);
2. run the pipeline on it (``pipeline.api.run_cohort``); per-stage timings come from each
   subject's ``measurements.json``;
3. validate the results against the phantoms' truth (``pipeline.validate``) and print the accuracy
   table;
4. speed comparison on one synthetic 320 x 320 x 40 two-channel volume, same machine, same
   threads: our ``pipeline.segment.segment`` (resample + network + post-processing) against an
   nnU-Net-class network: MONAI DynUNet with nnU-Net's 3d_fullres default filters
   (32, 64, 128, 256, 320, 320), anisotropic kernels/strides, sliding-window inference with
   Gaussian blending and overlap 0.5 (no test-time mirroring, which nnU-Net adds by default and
   which would multiply its time by up to 8). The DynUNet has untrained weights: timing does not
   depend on them. Medians over repeats after a warm-up.

Everything is printed and written to ``OUT/benchmark.json`` (and ``--json`` if given) so runs can be
compared. The default size is meant to finish in <= 15 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.runtime import TCMALLOC  # noqa: E402
MIN_TEST_SEED = 90000
VOLUME_SHAPE = (320, 320, 40)
VOLUME_SPACING = (1.2, 1.2, 4.0)

#: nnU-Net 3d_fullres-style plan for thick-slice data, axes (x, y, z) with z the slice axis:
#: in-plane-only kernels and strides until the voxels are roughly isotropic, 6 stages.
NNUNET_FILTERS = (32, 64, 128, 256, 320, 320)
NNUNET_KERNELS = ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
NNUNET_STRIDES = ((1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1))
NNUNET_ROI = (160, 160, 24)


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------
def child_env(threads: int, tcmalloc: bool) -> dict:
    """Environment of a child: thread count and (optionally) the tcmalloc allocator."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if tcmalloc and Path(TCMALLOC).exists():
        env["LD_PRELOAD"] = TCMALLOC
    else:
        env.pop("LD_PRELOAD", None)
    return env


def run_child(cmd: list[str], env: dict, log_path: Path) -> dict:
    """Run ``cmd``, log its output, and return exit code, wall time and peak RSS (MB).

    ``os.wait4`` gives the child's own resource usage, its reaped descendants included, so the
    peak is that step's alone.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {"rc": proc.returncode, "wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "log": str(log_path)}


def _tail(path: str, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _last_json(path: str) -> dict | None:
    for line in reversed(Path(path).read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


# --------------------------------------------------------------------------------------------
# Speed comparison (runs inside a child process)
# --------------------------------------------------------------------------------------------
def nnunet_like_dynunet(in_channels: int, out_channels: int, filters=NNUNET_FILTERS, kernels=NNUNET_KERNELS,
                        strides=NNUNET_STRIDES):
    """MONAI DynUNet shaped like nnU-Net's default 3d_fullres U-Net (instance norm, leaky ReLU)."""
    from monai.networks.nets import DynUNet

    return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                   kernel_size=[list(k) for k in kernels], strides=[list(s) for s in strides],
                   upsample_kernel_size=[list(s) for s in strides[1:]], filters=list(filters),
                   norm_name=("INSTANCE", {"affine": True}), deep_supervision=False, res_block=False)


def synthetic_volume(shape=VOLUME_SHAPE, spacing=VOLUME_SPACING, seed: int = 0):
    """Two-channel test volume (T1-like and STIR-like body ellipse with noise) as pipeline Images."""
    import numpy as np

    from pipeline.image import Image

    rng = np.random.default_rng(seed)
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    y = np.linspace(-1, 1, shape[1])[None, :, None]
    body = ((x / 0.9) ** 2 + (y / 0.6) ** 2 < 1).astype(np.float32) * np.ones(shape, np.float32)
    t1 = Image(body * 800 + rng.normal(0, 30, shape).astype(np.float32), aff, "t1")
    fl = Image(body * 300 + rng.normal(0, 30, shape).astype(np.float32), aff, "stir")
    return {"t1": t1, "fluid": fl}


def time_dynunet(shape=VOLUME_SHAPE, roi=NNUNET_ROI, overlap: float = 0.5, repeats: int = 2,
                 threads: int | None = None, filters=NNUNET_FILTERS, out_channels: int | None = None) -> dict:
    """Median seconds of DynUNet sliding-window inference on a 2-channel volume of ``shape``.

    Warm-up: one forward pass on a single ROI (oneDNN set-up), then ``repeats`` full
    sliding-window runs. Untrained weights (timing does not depend on them).
    """
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from pipeline.labels import NUM_CLASSES

    if threads:
        torch.set_num_threads(threads)
    net = nnunet_like_dynunet(2, out_channels or NUM_CLASSES, filters=filters).eval()
    vols = synthetic_volume(shape)
    x = torch.from_numpy(np.stack([vols["t1"].array, vols["fluid"].array])[None])
    x = (x - x.mean()) / x.std()
    roi = tuple(min(r, s) for r, s in zip(roi, shape))
    times = []
    with torch.inference_mode():
        net(torch.zeros((1, 2, *roi)))
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            y = sliding_window_inference(x, roi, 1, net, overlap=overlap, mode="gaussian")
            times.append(time.perf_counter() - t0)
    # same count as MONAI's scan intervals: int(roi * (1 - overlap)) voxels apart
    n_windows = int(np.prod([1 if s <= r else int(np.ceil((s - r) / max(1, int(r * (1 - overlap))))) + 1
                             for s, r in zip(shape, roi)]))
    return {"network": "MONAI DynUNet, nnU-Net 3d_fullres default filters (untrained weights)",
            "filters": list(filters), "kernels": [list(k) for k in NNUNET_KERNELS],
            "strides": [list(s) for s in NNUNET_STRIDES],
            "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
            "volume_shape": list(shape), "roi": list(roi), "overlap": overlap, "blend": "gaussian",
            "windows": n_windows, "test_time_mirroring": False, "output_shape": list(y.shape),
            "threads": torch.get_num_threads(), "repeats_s": [round(t, 3) for t in times],
            "median_s": round(statistics.median(times), 3)}


def time_ours(shape=VOLUME_SHAPE, repeats: int = 3, threads: int | None = None, model_path: str | None = None) -> dict:
    """Median seconds of ``pipeline.segment.segment`` (resample + network + post-processing).

    Uses the given or bundled model; without one, an untrained network of the default
    architecture (same speed), and says so.
    """
    import torch

    from pipeline.segment import SegModel, load_model, segment

    if threads:
        torch.set_num_threads(threads)
    try:
        model = load_model(model_path, device="cpu")
        weights = f"trained bundle {model.path}"
    except FileNotFoundError as exc:
        from models.bundle import default_metadata, model_from_metadata

        meta = default_metadata()
        model = SegModel(model_from_metadata(meta).eval(), meta, torch.device("cpu"))
        weights = f"untrained default architecture (no bundle: {str(exc).splitlines()[0][:120]})"
    torch.set_num_threads(threads or torch.get_num_threads())
    imgs = synthetic_volume(shape)
    segment(imgs, model)  # warm-up
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        seg = segment(imgs, model)
        runs.append((time.perf_counter() - t0, seg.timings))
    stages = {k: round(statistics.median(r[1][k] for r in runs), 3) for k in runs[0][1]}
    return {"network": f"{model.meta.get('architecture', {}).get('name', '?')} ({weights})",
            "architecture": model.meta.get("architecture"), "inference": model.meta.get("inference"),
            "parameters_m": round(sum(p.numel() for p in model.net.parameters()) / 1e6, 2),
            "volume_shape": list(shape), "threads": torch.get_num_threads(),
            "repeats_s": [round(r[0], 3) for r in runs], "median_s": round(statistics.median(r[0] for r in runs), 3),
            "stages_median_s": stages}


def speed_child(spec: dict) -> None:
    """Entry point of the speed child process: print one JSON line with the result."""
    shape = tuple(spec["shape"])
    if spec["which"] == "ours":
        res = time_ours(shape, spec["repeats"], spec["threads"], spec.get("model"))
    else:
        res = time_dynunet(shape, tuple(spec["roi"]), spec["overlap"], spec["repeats"], spec["threads"])
    print(json.dumps(res))


# --------------------------------------------------------------------------------------------
# Timings from the pipeline's outputs
# --------------------------------------------------------------------------------------------
def stage_timings(results_dir: Path) -> dict:
    """Per-stage medians (s) over subjects from ``measurements.json`` provenance timings.

    Stages: load, resample, segment (network + post-processing), measure, report (when the
    pipeline records it), total. Missing stages are reported as None with a note.
    """
    per: dict[str, list[float]] = {}
    for f in sorted(results_dir.glob("*/measurements.json")):
        rec = json.loads(f.read_text())
        prov = rec.get("provenance", {})
        t = rec.get("timings") or prov.get("timings") or {}
        seg = (prov.get("segmentation") or {}).get("timings") or {}
        vals = {"load": t.get("load_s"), "resample": seg.get("resample"),
                "segment": (seg["network"] + seg.get("postprocess", 0.0)) if "network" in seg else t.get("segment_s"),
                "network": seg.get("network"), "postprocess": seg.get("postprocess"),
                "measure": t.get("measure_s"), "report": t.get("report_s", t.get("write_s")),
                "total": t.get("total_s")}
        for k, v in vals.items():
            if isinstance(v, (int, float)):
                per.setdefault(k, []).append(float(v))
    out = {k: (round(statistics.median(per[k]), 3) if k in per else None)
           for k in ("load", "resample", "segment", "network", "postprocess", "measure", "report", "total")}
    out["n_subjects"] = max((len(v) for v in per.values()), default=0)
    if out["report"] is None:
        out["note"] = "report-writing time is not recorded in measurements.json"
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def _print_speed(speed: dict) -> None:
    ours, dyn = speed.get("ours"), speed.get("dynunet")
    shape = "x".join(str(v) for v in (ours or dyn or {}).get("volume_shape", VOLUME_SHAPE))
    print(f"\n== speed on one {shape} two-channel volume (same machine, "
          f"{(ours or dyn or {}).get('threads', '?')} threads) ==")
    if ours:
        st = " ".join(f"{k}={v:.2f}s" for k, v in ours.get("stages_median_s", {}).items())
        print(f"ours     : {ours['median_s']:.2f} s median ({st}); {ours['network']}, {ours['parameters_m']} M params")
    if dyn:
        print(f"DynUNet  : {dyn['median_s']:.2f} s median, {dyn['windows']} windows of {dyn['roi']}, overlap "
              f"{dyn['overlap']}, gaussian; {dyn['parameters_m']} M params, untrained weights, no mirroring")
    if speed.get("ratio_total") is not None:
        print(f"speed ratio (DynUNet sliding window / our full segment call): {speed['ratio_total']:.1f}x"
              + (f"; network only: {speed['ratio_network']:.1f}x" if speed.get("ratio_network") else ""))
    for k in ("ours_error", "dynunet_error"):
        if speed.get(k):
            print(f"{k}: {speed[k]}")


def main(argv=None) -> int:
    """Command-line entry point (see the module docstring)."""
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--_speed-child":
        speed_child(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="subjects in the test cohort (default 20)")
    ap.add_argument("--seed", type=int, default=90000, help=f"cohort seed, >= {MIN_TEST_SEED} (default 90000)")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default runs/benchmark_seed<S>_n<N>)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    ap.add_argument("--workers", type=int, default=1, help="pipeline worker processes (default 1)")
    ap.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1, help="phantom generator processes")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the speed test")
    ap.add_argument("--model", default=None, help="model bundle (default: the bundled model)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of our segmentation (after warm-up)")
    ap.add_argument("--dynunet-repeats", type=int, default=2, help="timed repeats of DynUNet (after warm-up)")
    ap.add_argument("--roi", type=int, nargs=3, default=list(NNUNET_ROI), help="DynUNet sliding-window ROI")
    ap.add_argument("--overlap", type=float, default=0.5, help="DynUNet sliding-window overlap")
    ap.add_argument("--speed-shape", type=int, nargs=3, default=list(VOLUME_SHAPE),
                    help="volume of the speed comparison (default 320 320 40; smaller only for smoke tests)")
    ap.add_argument("--tcmalloc", choices=["on", "off"], default="off",
                    help="preload tcmalloc in every child (default off: what a user gets without set-up)")
    ap.add_argument("--use-labels", action="store_true",
                    help="measure the phantoms' truth label maps instead of segmenting (isolates the "
                         "measurement error from the segmentation error; no model needed)")
    ap.add_argument("--skip-speed", action="store_true", help="no speed comparison")
    ap.add_argument("--speed-only", action="store_true", help="only the speed comparison")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples in the validation")
    a = ap.parse_args(argv)
    if a.seed < MIN_TEST_SEED:
        ap.error(f"--seed must be >= {MIN_TEST_SEED}: lower seeds may have been used for training")
    out = a.out or ROOT / "runs" / f"benchmark_seed{a.seed}_n{a.n}"
    out.mkdir(parents=True, exist_ok=True)
    tc = a.tcmalloc == "on"
    t_start = time.perf_counter()

    import torch

    result: dict = {
        "benchmark": "ifi-seg run_benchmark v1",
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                 "torch": torch.__version__, "tcmalloc": tc},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    cohort, results, report = out / "cohort", out / "results", out / "validation"
    py = sys.executable

    if not a.speed_only:
        print(f"== generating {a.n} test subjects (seed {a.seed}) into {cohort} ==", flush=True)
        gen = run_child([py, str(ROOT / "data_scripts" / "make_phantoms.py"), "--out", str(cohort), "--n", str(a.n),
                         "--seed", str(a.seed), "--workers", str(a.gen_workers)],
                        child_env(1, tc), out / "logs" / "generate.log")
        result["generate"] = gen
        print(f"generate: rc={gen['rc']} {gen['wall_s']:.1f} s, peak RSS {gen['peak_rss_mb']:.0f} MB", flush=True)
        if gen["rc"] != 0:
            print(_tail(gen["log"]))
        else:
            print(f"== running the pipeline ({a.workers} worker(s)"
                  + (", measuring the truth label maps" if a.use_labels else "") + ") ==", flush=True)
            code = ("import json, sys; from pipeline.api import run_cohort; "
                    "r = run_cohort(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), force=True, quiet=True, "
                    "model_path=(sys.argv[4] or None), use_labels=sys.argv[5] == '1'); print(json.dumps(r))")
            pipe = run_child([py, "-c", code, str(cohort / "cohort.csv"), str(results), str(a.workers), a.model or "",
                              "1" if a.use_labels else "0"],
                             child_env(max(1, (os.cpu_count() or 1) // a.workers), tc), out / "logs" / "pipeline.log")
            summary = _last_json(pipe["log"]) if pipe["rc"] == 0 else None
            if summary:
                pipe.update(done=summary.get("done"), failed=summary.get("failed"), errors=summary.get("errors"))
                if summary.get("done"):
                    pipe["wall_per_subject_s"] = round(pipe["wall_s"] / max(1, summary["done"]), 2)
            result["pipeline"] = pipe
            print(f"pipeline: rc={pipe['rc']} {pipe['wall_s']:.1f} s, peak RSS {pipe['peak_rss_mb']:.0f} MB"
                  + (f", {pipe.get('done')} done, {pipe.get('failed')} failed" if summary else ""), flush=True)
            if pipe["rc"] != 0:
                print(_tail(pipe["log"]))
            for e in (pipe.get("errors") or [])[:10]:
                print(f"  FAILED {e.get('subject')} [{e.get('stage')}]: {e.get('message')}")
            if results.is_dir() and any(results.glob("*/measurements.json")):
                from pipeline.validate import format_summary, run_validation

                t0 = time.perf_counter()
                val = run_validation(results, cohort, report, n_boot=a.bootstrap)
                result["validation"] = {k: val[k] for k in ("n_matched_hips", "n_matched_subjects", "icc_form",
                                                            "agreement", "flags", "grades", "labels_summary",
                                                            "missing", "notes")}
                result["validation"]["wall_s"] = round(time.perf_counter() - t0, 2)
                result["validation"]["report"] = str(report / "report.html")
                print("\n== accuracy against the phantom truth ==")
                print(format_summary(val))
                result["stage_timings_median_s"] = stage_timings(results)
                print("\n== per-stage timings, median over subjects (s) ==")
                print("  ".join(f"{k}={v}" for k, v in result["stage_timings_median_s"].items()))

    if not a.skip_speed:
        speed: dict = {}
        for which in ("ours", "dynunet"):
            print(f"== speed: {which} ==", flush=True)
            spec = {"which": which, "shape": list(a.speed_shape), "threads": a.threads, "model": a.model,
                    "repeats": a.repeats if which == "ours" else a.dynunet_repeats, "roi": a.roi,
                    "overlap": a.overlap}
            r = run_child([py, str(Path(__file__).resolve()), "--_speed-child", json.dumps(spec)],
                          child_env(a.threads, tc), out / "logs" / f"speed_{which}.log")
            res = _last_json(r["log"]) if r["rc"] == 0 else None
            if res:
                res["peak_rss_mb"] = r["peak_rss_mb"]
                speed[which] = res
            else:
                speed[f"{which}_error"] = _tail(r["log"], 5)
        if "ours" in speed and "dynunet" in speed:
            speed["ratio_total"] = round(speed["dynunet"]["median_s"] / speed["ours"]["median_s"], 2)
            net = speed["ours"].get("stages_median_s", {}).get("network")
            if net:
                speed["ratio_network"] = round(speed["dynunet"]["median_s"] / net, 2)
        result["speed"] = speed
        _print_speed(speed)

    result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"\ntotal wall time {result['total_wall_s']:.0f} s")
    text = json.dumps(result, indent=2, default=str) + "\n"
    (out / "benchmark.json").write_text(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text)
    print(f"results: {out / 'benchmark.json'}" + (f" and {a.json}" if a.json else ""))
    failed = result.get("generate", {}).get("rc", 0) != 0 or result.get("pipeline", {}).get("rc", 0) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
