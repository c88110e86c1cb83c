"""Generate a synthetic hip-MRI cohort with exact ground truth (the phantom generator's CLI and API).

    python data_scripts/make_phantoms.py --out DIR --n N --seed S [--workers W] [--start K]
        [--fov-mix bilateral=0.7,left=0.15,right=0.15]

writes ``DIR/<subject>/`` (t1.nii.gz, t2fs.nii.gz or stir.nii.gz, for ~30 % dixon_fat/dixon_water,
labels.nii.gz + labels.json on the T1 grid, and where the fluid or Dixon series has a grid of its
own the labels on it too, labels_fluid.nii.gz / labels_dixon.nii.gz; truth.json) and
``DIR/cohort.csv``. Subject i's
randomness comes only from ``SeedSequence([seed, i])``, so the output does not depend on
``--workers``. Each subject is written to a hidden temporary folder and renamed when complete;
subjects already complete in DIR are kept (a killed run resumes). cohort.csv lists every complete
subject in DIR and is written last.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_scripts.phantoms import acquisition as acq  # noqa: E402
from data_scripts.phantoms import mr_physics as mrp  # noqa: E402
from pipeline.image import atomic_write  # noqa: E402
from pipeline.labels import write_label_table  # noqa: E402

COLUMNS = ("subject", "t1", "fluid", "fluid_kind", "dixon_fat", "dixon_water", "labels", "truth",
           "labels_fluid", "labels_dixon")
FRAME = "world RAS+ mm (NIfTI scanner coordinates of the written files)"
PROTOCOL_OVERRIDES = ("field_t", "fluid_kind", "dixon", "orientation", "oblique", "dtype",
                      "fluid_same_grid", "snr", "thickness", "gap", "pixel", "fluid_plane", "coverage")


def subject_id(index: int) -> str:
    """Subject identifier for cohort index ``index`` (``sub-0007``)."""
    return f"sub-{index:04d}"


def parse_fov_mix(text: str | None) -> dict | None:
    """Parse ``bilateral=0.7,left=0.15,right=0.15`` into a probability table."""
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        name = name.strip()
        if name not in acq.FOV_KINDS:
            raise ValueError(f"--fov-mix: unknown field of view {name!r} (use {', '.join(acq.FOV_KINDS)})")
        mix[name] = float(val)
    if sum(mix.values()) <= 0 or min(mix.values()) < 0:
        raise ValueError("--fov-mix: weights must be non-negative and not all zero")
    return mix


def _default_builder():
    from data_scripts.phantoms.anatomy import build_anatomy

    return build_anatomy


def _default_axial_truth():
    from data_scripts.phantoms.truth import axial_truth

    return axial_truth


def _inside(points: np.ndarray, shape, affine: np.ndarray) -> bool:
    vox = points @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]
    return bool(np.all((vox >= -0.5) & (vox <= np.asarray(shape) - 0.5)))


def slice_planes(shape, affine: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Slice axis (the array axis closest to superior-inferior), its unit world normal and the
    offsets ``normal . x`` of every slice centre, in the stored file's slice order."""
    lin = np.asarray(affine)[:3, :3]
    dirs = lin / np.linalg.norm(lin, axis=0)
    axis = int(np.argmax(np.abs(dirs[2, :])))
    normal = dirs[:, axis]
    idx = np.zeros((shape[axis], 3))
    idx[:, axis] = np.arange(shape[axis])
    centres = idx @ lin.T + affine[:3, 3]
    return axis, normal, centres @ normal


def generate_subject(out_dir, seed: int, index: int, **overrides) -> dict:
    """Generate one subject into ``out_dir/<subject>/`` and return its cohort.csv row.

    Overrides: ``fov`` ("bilateral"/"left"/"right"), ``fov_mix`` (probability table), any of
    ``PROTOCOL_OVERRIDES`` (see ``acquisition.draw_protocol``), ``subject`` (folder name), and for
    tests ``anatomy`` (a prebuilt Anatomy), ``anatomy_builder`` and ``axial_truth_fn``.
    Randomness comes only from (seed, index); overrides change nothing else about the subject.
    """
    out_dir = Path(out_dir)
    sub = overrides.get("subject") or subject_id(index)
    ss = np.random.SeedSequence([int(seed), int(index)])
    s_anat, s_proto, s_phys, s_noise = ss.spawn(4)
    rng_proto = np.random.default_rng(s_proto)
    fov_kind = acq.draw_fov_kind(rng_proto, overrides.get("fov_mix"))
    fov_kind = overrides.get("fov") or fov_kind
    if fov_kind not in acq.FOV_KINDS:
        raise ValueError(f"fov must be one of {acq.FOV_KINDS}")
    anatomy = overrides.get("anatomy")
    if anatomy is None:
        builder = overrides.get("anatomy_builder") or _default_builder()
        # a whole-pelvis slab needs the anatomy up to the iliac crests (the same subject below)
        extent = {"extent": "pelvis"} if overrides.get("coverage") == "pelvis" else {}
        anatomy = builder(np.random.default_rng(s_anat), fov=fov_kind, **extent)
    axial_truth = overrides.get("axial_truth_fn") or _default_axial_truth()
    lm = acq.landmarks(anatomy)
    proto = acq.draw_protocol(rng_proto, lm, fov_kind,
                              **{k: overrides[k] for k in PROTOCOL_OVERRIDES if k in overrides})
    rng_phys = np.random.default_rng(s_phys)
    ts = mrp.perturb_tissues(mrp.tissue_set(proto.field_t), rng_phys)
    noise_rngs = [np.random.default_rng(s) for s in s_noise.spawn(3)]
    ebox = mrp.nonzero_box(anatomy.edema)

    tmp = out_dir / f".{sub}.tmp-{os.getpid()}"
    final = out_dir / sub
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        storage = {}
        code = proto.orientation

        def store(name, arr, geometry, dtype):
            # a coronal / sagittal series is stored in its acquisition order (slices last), as
            # DICOM converters write it; the axial ones in the protocol's storage orientation
            axial = abs(geometry.rotation[2, 2]) > 0.7
            data, aff = acq.reorient(arr, geometry.affine,
                                     code if axial else "".join(nib.aff2axcodes(geometry.affine)))
            storage[name] = acq.write_nifti(tmp / f"{name}.nii.gz", data, aff, dtype)
            return data, aff

        t1_geo = proto.geometries["t1"]
        (t1,) = acq.acquire_series(anatomy, proto.sequences["t1"], ts, t1_geo, proto.snr["t1"],
                                   proto.gains["t1"], noise_rngs[0], ebox)
        t1_data, t1_aff = store("t1", t1, t1_geo, proto.dtype)
        del t1
        fk = proto.fluid_kind
        (fl,) = acq.acquire_series(anatomy, proto.sequences[fk], ts, proto.geometries["fluid"],
                                   proto.snr["fluid"], proto.gains["fluid"], noise_rngs[1], ebox)
        store(fk, fl, proto.geometries["fluid"], proto.dtype)
        del fl
        if "dixon" in proto.sequences:
            water, fat = acq.acquire_series(anatomy, proto.sequences["dixon"], ts, proto.geometries["dixon"],
                                            proto.snr["dixon"], proto.gains["dixon"], noise_rngs[2], ebox)
            store("dixon_water", water, proto.geometries["dixon"], proto.dtype)
            store("dixon_fat", fat, proto.geometries["dixon"], proto.dtype)
            del water, fat
        lab = acq.sample_labels(anatomy, t1_geo)
        store("labels", lab, t1_geo, "uint8")
        # the truth on each series' own grid, so that a scan segmented without the T1 is scored
        # against labels sampled where its voxels are (not the T1's resampled)
        for series in ("fluid", "dixon"):
            geo = proto.geometries.get(series)
            if geo is not None and geo != t1_geo:
                store(f"labels_{series}", acq.sample_labels(anatomy, geo), geo, "uint8")
        write_label_table(tmp / "labels.json")

        truth = build_truth(sub, anatomy, axial_truth, t1_data.shape, t1_aff, proto, ts, storage)
        (tmp / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return row_for(out_dir, sub)


def build_truth(sub: str, anatomy, axial_truth, t1_shape, t1_affine, proto, ts, storage) -> dict:
    """truth.json content: per hip present in the T1 volume the 3D truth of the anatomy plus the
    axial truth on the T1's slice planes, and the acquisition description."""
    axis, normal, offsets = slice_planes(t1_shape, t1_affine)
    present = []
    for side in anatomy.hips:
        it = anatomy.surfaces.get((side, "ischial_tuberosity"))
        lt = anatomy.surfaces.get((side, "lesser_trochanter"))
        if it is not None and lt is not None and _inside(it.vertices, t1_shape, t1_affine) \
                and _inside(lt.vertices, t1_shape, t1_affine):
            present.append(side)
    axial = axial_truth(anatomy, normal, offsets) if present else {}
    hips = {}
    for side in present:
        h = dict(anatomy.hips[side])
        for key, val in axial.get(side, {}).items():
            h[key] = val
        hips[side] = acq.to_jsonable(h)
    acquisition = proto.as_dict()
    acquisition["series"] = storage
    acquisition["t1_slice_axis"] = axis
    acquisition["oblique_angles_deg"] = acq.to_jsonable(proto.geometries["t1"].angles_deg)
    acquisition["tissue_parameters"] = ts.as_dict()
    return {
        "subject": sub,
        "frame": FRAME,
        "slice_index_note": "*_axial_slice = index along axis acquisition.t1_slice_axis of t1.nii.gz",
        "hips": hips,
        "acquisition": acquisition,
        "anatomy": acq.to_jsonable(anatomy.params),
    }


def row_for(out_dir, sub: str) -> dict:
    """cohort.csv row of a complete subject folder (relative paths; empty where absent)."""
    d = Path(out_dir) / sub
    rel = lambda name: f"{sub}/{name}" if (d / name).exists() else ""  # noqa: E731
    fluid_kind = "t2fs" if (d / "t2fs.nii.gz").exists() else ("stir" if (d / "stir.nii.gz").exists() else "")
    return {"subject": sub, "t1": rel("t1.nii.gz"), "fluid": rel(f"{fluid_kind}.nii.gz") if fluid_kind else "",
            "fluid_kind": fluid_kind, "dixon_fat": rel("dixon_fat.nii.gz"),
            "dixon_water": rel("dixon_water.nii.gz"), "labels": rel("labels.nii.gz"), "truth": rel("truth.json"),
            "labels_fluid": rel("labels_fluid.nii.gz"), "labels_dixon": rel("labels_dixon.nii.gz")}


def write_cohort_csv(out_dir) -> Path:
    """Write ``out_dir/cohort.csv`` listing every complete subject folder (atomically)."""
    out_dir = Path(out_dir)
    subs = sorted(p.name for p in out_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "truth.json").exists())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for s in subs:
        w.writerow(row_for(out_dir, s))
    path = out_dir / "cohort.csv"
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))
    return path


def _job(args):
    out_dir, seed, index, overrides = args
    t0 = time.perf_counter()
    row = generate_subject(out_dir, seed, index, **overrides)
    return row, time.perf_counter() - t0


def parse_protocol(items: list[str]) -> dict:
    """Parse ``["thickness=7", "oblique=false", "fluid_kind=stir"]`` into protocol overrides.

    Values are read as JSON where they parse (numbers, true/false, lists), else kept as text.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in PROTOCOL_OVERRIDES:
            raise ValueError(f"--protocol {item!r}: expected KEY=VALUE with KEY one of {', '.join(PROTOCOL_OVERRIDES)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value.strip()
    return out


def generate_cohort(out_dir, n: int, seed: int, workers: int = 1, start: int = 0, log=print, **overrides) -> Path:
    """Generate subjects ``start .. start+n-1`` (skipping complete ones) and write cohort.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(start, start + n) if not (out_dir / subject_id(i) / "truth.json").exists()]
    for i in todo:  # temporary folders left by a killed run
        for stale in out_dir.glob(f".{subject_id(i)}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if len(todo) < n:
        log(f"{n - len(todo)} subject(s) already complete in {out_dir}, kept")
    jobs = [(str(out_dir), seed, i, overrides) for i in todo]
    t0 = time.perf_counter()
    if workers <= 1:
        results = map(_job, jobs)
        for row, sec in results:
            log(f"{row['subject']}: {sec:.1f} s")
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for row, sec in pool.map(_job, jobs):
                log(f"{row['subject']}: {sec:.1f} s")
    path = write_cohort_csv(out_dir)
    log(f"{len(todo)} subject(s) in {time.perf_counter() - t0:.1f} s; cohort: {path}")
    return path


def main(argv=None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="cohort folder")
    ap.add_argument("--n", type=int, required=True, help="number of subjects")
    ap.add_argument("--seed", type=int, required=True, help="cohort seed")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (output does not depend on it)")
    ap.add_argument("--start", type=int, default=0, help="index of the first subject (for chunked runs)")
    ap.add_argument("--fov-mix", default=None,
                    help="field-of-view probabilities, e.g. bilateral=0.7,left=0.15,right=0.15 (default)")
    ap.add_argument("--protocol", action="append", default=[], metavar="KEY=VALUE",
                    help="fix a protocol setting for every subject, repeatable, e.g. --protocol thickness=7 "
                         "--protocol snr=6 (stress cohorts beyond the default ranges), --protocol fluid_plane=coronal "
                         "(a coronal fluid series), --protocol coverage=pelvis (slabs from the iliac crests down); keys: "
                         + ", ".join(PROTOCOL_OVERRIDES))
    a = ap.parse_args(argv)
    if a.n < 0 or a.start < 0 or a.workers < 1:
        ap.error("--n and --start must be >= 0 and --workers >= 1")
    try:
        mix = parse_fov_mix(a.fov_mix)
        protocol = parse_protocol(a.protocol)
    except ValueError as exc:
        ap.error(str(exc))
    overrides = {"fov_mix": mix} if mix else {}
    overrides.update(protocol)
    generate_cohort(a.out, a.n, a.seed, workers=a.workers, start=a.start, **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
