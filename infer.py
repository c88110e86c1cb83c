#!/usr/bin/env python
"""ifi-seg inference: segment hip MRI and measure ischiofemoral impingement, per hip.

One scan (NIfTI):
    python infer.py --t1 t1.nii.gz --stir stir.nii.gz --out results/sub01
A Dixon-only scan (population studies): segmented on a T1-like image made from the pair,
fat fraction from Dixon, no edema grade:
    python infer.py --dixon-fat fat.nii.gz --dixon-water water.nii.gz --out results/sub01
One scan (DICOM study folder; series found and classified, the choice printed):
    python infer.py --dicom STUDY_DIR --out results/sub01 [--t1-series UID --fluid-series UID]
Measure a given label map instead of segmenting (manual segmentation):
    python infer.py --t1 t1.nii.gz --labels seg.nii.gz [--label-table seg.json] --out results/sub01
A cohort (manifest CSV: subject,t1,fluid,fluid_kind,dixon_fat,dixon_water; paths relative to it):
    python infer.py --manifest cohort.csv --out results/ [--workers 2] [--engine local|ray] [--force]
The bundled example:
    python infer.py --demo

Exit status: 0 all subjects ok, 1 some failed, 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
EXAMPLE_DIR = REPO / "data_scripts" / "example"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (no heavy imports here: --help stays fast)."""
    ap = argparse.ArgumentParser(
        prog="infer.py", description=__doc__,
        epilog="Outputs per subject: measurements.json, labels.nii.gz + labels.json, qc.png; per cohort "
               "also cohort.csv, errors.csv, report.html. Flags are findings against published "
               "cut-offs, not diagnoses.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("inputs (choose one mode)")
    src.add_argument("--t1", metavar="PATH",
                     help="T1-weighted scan (NIfTI file, DICOM series folder or multi-frame DICOM file)")
    fluid = src.add_mutually_exclusive_group()
    fluid.add_argument("--t2fs", metavar="PATH", help="T2 (or PD) fat-saturated scan")
    fluid.add_argument("--stir", metavar="PATH", help="STIR scan")
    src.add_argument("--dixon-fat", metavar="PATH", help="Dixon fat image (with --dixon-water); "
                     "alone, without T1 or fluid, the pair is also what the network segments")
    src.add_argument("--dixon-water", metavar="PATH", help="Dixon water image (with --dixon-fat)")
    src.add_argument("--dicom", metavar="STUDY_DIR", help="DICOM study folder: series found and classified")
    for role in ("t1", "fluid", "dixon-fat", "dixon-water"):
        src.add_argument(f"--{role}-series", metavar="UID", help=f"with --dicom: use this series as {role}")
    src.add_argument("--manifest", metavar="CSV", help="cohort manifest (one subject per row)")
    src.add_argument("--demo", action="store_true", help="run on the bundled example scan")
    lab = ap.add_argument_group("given segmentation (measure without the network)")
    lab.add_argument("--labels", metavar="PATH", help="label map (NIfTI) to measure instead of segmenting")
    lab.add_argument("--label-table", metavar="JSON", help="its name -> value table (default: project labels "
                                                          "or a .json beside the label map)")
    lab.add_argument("--use-labels", action="store_true",
                     help="with --manifest: measure the manifest's 'labels' column instead of segmenting")
    out = ap.add_argument_group("output and options")
    out.add_argument("--out", metavar="DIR", help="output folder (default for --demo: demo_output)")
    out.add_argument("--subject", metavar="ID", help="subject ID recorded in the outputs (default: folder name)")
    out.add_argument("--config", metavar="JSON", help="cut-offs file (keys of pipeline.config.MeasureConfig)")
    out.add_argument("--model", metavar="PATH",
                     help="model bundle: a path, or 'extended' for the bundled model trained longer on a GPU "
                          "(more accurate on the phantoms; see README) (default: the bundled default model)")
    out.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where the network runs (auto: CUDA when available)")
    out.add_argument("--dicom-seg", action="store_true",
                     help="also write labels.seg.dcm when the T1 (reference) is DICOM; as the standard "
                          "requires, it carries the source's patient/study fields")
    out.add_argument("--include-identifiers", action="store_true",
                     help="copy patient-identifying DICOM fields into measurements.json (off by default)")
    out.add_argument("--quiet", action="store_true", help="only errors")
    coh = ap.add_argument_group("cohort")
    coh.add_argument("--workers", type=int, default=1, help="parallel workers (default 1)")
    coh.add_argument("--engine", choices=("local", "ray"), default="local")
    coh.add_argument("--ray-address", metavar="ADDR", help="running Ray cluster (default: start a local one)")
    coh.add_argument("--force", action="store_true", help="redo subjects whose results are up to date")
    return ap


def _check_args(ap: argparse.ArgumentParser, args) -> str:
    """Validate the combination of arguments; return the mode (single, dicom, cohort, demo)."""
    single = any(getattr(args, k) for k in ("t1", "t2fs", "stir", "dixon_fat", "dixon_water"))
    modes = [m for m, on in (("single", single), ("dicom", bool(args.dicom)),
                             ("cohort", bool(args.manifest)), ("demo", args.demo)) if on]
    if len(modes) != 1:
        ap.error("give exactly one of: scan paths (--t1/--t2fs/--stir/...), --dicom, --manifest, --demo")
    mode = modes[0]
    if mode != "demo" and not args.out:
        ap.error("--out is required")
    if mode != "cohort" and (args.workers != 1 or args.engine != "local" or args.ray_address or args.use_labels):
        ap.error("--workers/--engine/--ray-address/--use-labels apply to --manifest only")
    if mode == "cohort" and (args.labels or args.subject):
        ap.error("--labels/--subject apply to one scan; a manifest gives them per subject")
    if mode != "dicom" and any(getattr(args, f"{r}_series") for r in ("t1", "fluid", "dixon_fat", "dixon_water")):
        ap.error("--*-series apply to --dicom only")
    if bool(args.dixon_fat) != bool(args.dixon_water):
        ap.error("--dixon-fat and --dixon-water go together")
    if args.label_table and not args.labels:
        ap.error("--label-table needs --labels")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    return mode


def _print_summary(record: dict) -> None:
    for side in ("right", "left"):
        hip = (record.get("hips") or {}).get(side)
        if not isinstance(hip, dict):
            continue

        def f(key):
            v = hip.get(key)
            return f"{v:.1f} mm" if isinstance(v, (int, float)) else "n/a"

        flags = ", ".join(str(x.get("name")) for x in hip.get("flags", []) or [] if isinstance(x, dict)
                          and x.get("raised", True))
        check = " (implausible: larger than the IFS, check the QC picture)" \
            if hip.get("qfs_plausible") is False else ""
        print(f"  {side:5s} hip: IFS {f('ifs_mm')} (axial {f('ifs_axial_mm')}), QFS {f('qfs_mm')}{check}"
              f"{'  FLAGS: ' + flags if flags else ''}")


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    mode = _check_args(ap, args)

    from pipeline.api import SubjectError, run_subject, sanitize_subject_id
    from pipeline.config import load_config
    from pipeline.image import ImageError

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a))
    try:
        config = load_config(args.config)
    except (OSError, ValueError) as exc:
        ap.error(f"--config: {exc}")

    if mode == "cohort":
        from pipeline.cohort import ManifestError, run_cohort

        try:
            summary = run_cohort(args.manifest, args.out, workers=args.workers, engine=args.engine,
                                 ray_address=args.ray_address, force=args.force, quiet=args.quiet,
                                 config=config, model_path=args.model, device=args.device,
                                 use_labels=args.use_labels, write_dicom_seg=args.dicom_seg,
                                 include_identifiers=args.include_identifiers)
        except ManifestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (SubjectError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 1 if summary["failed"] else 0

    inputs: dict = {}
    labels, label_table = args.labels, args.label_table
    if mode == "demo":
        inputs, labels = _demo_inputs(ap)
        args.out = args.out or "demo_output"
        args.subject = args.subject or "example"
    elif mode == "dicom":
        from pipeline.io import choose_series, find_series

        overrides = {"t1": args.t1_series, "fluid": args.fluid_series, "dixon_fat": args.dixon_fat_series,
                     "dixon_water": args.dixon_water_series}
        try:
            chosen, lines = choose_series(find_series(args.dicom), overrides)
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        say(f"DICOM study {args.dicom}:")
        for line in lines:
            say(line)
        inputs = dict(chosen)
        if "fluid" in chosen:
            inputs["fluid_kind"] = chosen["fluid"].params.get("_kind", "t2fs")
    else:
        inputs = {k: getattr(args, k) for k in ("t1", "t2fs", "stir", "dixon_fat", "dixon_water")
                  if getattr(args, k)}
    try:
        subject = sanitize_subject_id(args.subject or Path(args.out).resolve().name)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        record = run_subject(inputs, args.out, config=config, subject=subject, labels_override=labels,
                             label_table=label_table, write_dicom_seg=args.dicom_seg,
                             include_identifiers=args.include_identifiers, device=args.device,
                             model_path=args.model)
    except SubjectError as exc:
        print(f"error: {subject}: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"error: {subject}: out of memory", file=sys.stderr)
        return 1
    say(f"{subject}: results in {args.out}")
    if not args.quiet:
        _print_summary(record)
    return 0


def _demo_inputs(ap) -> tuple[dict, str | None]:
    """Inputs of the bundled example subject (segmented by the bundled model when it exists,
    else measured on the example's own label map)."""
    from models.bundle import DEFAULT_BUNDLE, bundle_paths

    ex = EXAMPLE_DIR
    if not (ex / "t1.nii.gz").exists():
        ap.error(f"the bundled example is missing ({ex})")
    inputs = {"t1": str(ex / "t1.nii.gz")}
    for kind in ("t2fs", "stir"):
        if (ex / f"{kind}.nii.gz").exists():
            inputs[kind] = str(ex / f"{kind}.nii.gz")
            break
    if (ex / "dixon_fat.nii.gz").exists() and (ex / "dixon_water.nii.gz").exists():
        inputs["dixon_fat"], inputs["dixon_water"] = str(ex / "dixon_fat.nii.gz"), str(ex / "dixon_water.nii.gz")
    if bundle_paths(DEFAULT_BUNDLE)[0].exists():
        return inputs, None
    print("note: bundled model not found; the demo measures the example's reference label map instead",
          file=sys.stderr)
    return inputs, str(ex / "labels.nii.gz")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline.runtime import reexec_with_tcmalloc

    reexec_with_tcmalloc(__file__, sys.argv[1:])
    sys.exit(main())
