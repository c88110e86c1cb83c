"""THE Python API of ifi-seg: one scan (``run_subject``) or a whole cohort (``run_cohort``).

``infer.py`` only parses arguments and calls these. A subject goes
load -> validate -> segment (or a given label map) -> measure -> write outputs; any failure
raises ``SubjectError`` naming the stage and giving a one-line reason.

    from pipeline.api import run_subject
    rec = run_subject({"t1": "t1.nii.gz", "fluid": "stir.nii.gz", "fluid_kind": "stir"}, "out/sub01")
    rec["hips"]["left"]["ifs_mm"]
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import re
import time
from pathlib import Path

import numpy as np

from pipeline.image import Image, ImageError

#: Input roles of a subject. "fluid" is the fluid-sensitive fat-suppressed series (t2fs or stir).
ROLES = ("t1", "fluid", "dixon_fat", "dixon_water")
FLUID_KINDS = ("t2fs", "stir")


class SubjectError(RuntimeError):
    """A subject could not be processed; ``stage`` says where, the message says why (one line)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = " ".join(str(message).split())


def sanitize_subject_id(raw) -> str:
    """A safe folder name for a subject ID: letters, digits, '.', '_' and '-' only; no path
    separators, no leading dots ('..' cannot escape the output folder)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw).strip()).strip("._")
    if not s:
        raise ValueError(f"subject ID {raw!r} is empty after removing unsafe characters")
    return s[:128]


def normalise_inputs(inputs: dict) -> dict:
    """Map user-facing keys onto roles: "t2fs"/"stir" -> "fluid" + fluid_kind; drop empty values."""
    out = {}
    fluid_kind = inputs.get("fluid_kind") or None
    for key, value in inputs.items():
        if key == "fluid_kind" or value in (None, ""):
            continue
        if key in FLUID_KINDS:
            if "fluid" in out or inputs.get("fluid"):
                raise SubjectError("input", "give one fluid-sensitive series (t2fs OR stir), not both")
            out["fluid"], fluid_kind = value, key
        elif key in ROLES:
            out[key] = value
        else:
            raise SubjectError("input", f"unknown input {key!r}; expected one of {ROLES + FLUID_KINDS}")
    if "fluid" in out:
        if fluid_kind is None:
            fluid_kind = _guess_fluid_kind(out["fluid"])
        if fluid_kind not in FLUID_KINDS:
            raise SubjectError("input", f"fluid_kind must be one of {FLUID_KINDS}, got {fluid_kind!r}")
        out["fluid_kind"] = fluid_kind
    if ("dixon_fat" in out) != ("dixon_water" in out):
        raise SubjectError("input", "Dixon needs both dixon_fat and dixon_water")
    if "t1" not in out and "fluid" not in out and "dixon_fat" not in out:
        raise SubjectError("input", "need a T1 and/or a fluid-sensitive (T2 fat-sat or STIR) image, "
                                    "or a Dixon fat + water pair")
    return out


def resolve_label_table(labels_override, label_table=None):
    """The label table of a given label map: ``label_table`` if given, else a ``.json`` with the
    same stem beside the label map (the project's convention), else None (project numbering)."""
    if labels_override in (None, "") or label_table not in (None, ""):
        return label_table or None
    path = Path(str(labels_override))
    sibling = path.with_name(path.name.replace(".nii.gz", "").replace(".nii", "") + ".json")
    return sibling if sibling.is_file() else None


def _guess_fluid_kind(value) -> str:
    """t2fs or stir for a fluid series given without its kind: from the DICOM headers (series
    classification) when it is DICOM, or a NIfTI's JSON sidecar (dcm2niix), else from the file
    name ("stir" in it), else t2fs."""
    from pipeline.io import SeriesInfo, classify_series, find_series, is_nifti, read_sidecar

    kind = None
    if isinstance(value, SeriesInfo):
        kind = value.params.get("_kind") or classify_series(value)
    elif Path(str(value)).is_dir() or (Path(str(value)).is_file() and not is_nifti(value)):
        try:                # a DICOM series folder, or one (multi-frame) DICOM file
            series = find_series(value)
        except ImageError:
            series = []
        kind = classify_series(series[0]) if len(series) == 1 else None
    else:
        sidecar = read_sidecar(value)
        kind = classify_series(sidecar) if sidecar else None
        if kind not in FLUID_KINDS and "stir" in Path(str(value)).name.lower():
            kind = "stir"
    return kind if kind in FLUID_KINDS else "t2fs"


def input_hashes(inputs: dict, labels_override=None, label_table=None) -> dict[str, str]:
    """sha256 of every input file (DICOM folders: of their files), keyed by role; a NIfTI's JSON
    sidecar (its sequence parameters are read) under "ROLE_sidecar"; with a given label map also
    of it and of its label table."""
    from pipeline.io import hash_input, is_nifti, sidecar_path

    label_table = resolve_label_table(labels_override, label_table)
    hashes = {}
    items = [(k, v) for k, v in inputs.items() if k in ROLES]
    items += [("labels", labels_override), ("label_table", label_table)]
    for role, value in items:
        if value in (None, ""):
            continue
        try:
            hashes[role] = hash_input(value)
            if role in ROLES and is_nifti(value) and sidecar_path(value).is_file():
                hashes[f"{role}_sidecar"] = hash_input(sidecar_path(value))
        except (ImageError, OSError) as exc:
            raise SubjectError("load", f"{role}: {exc}") from exc
    return hashes


def model_identity(model=None, path=None) -> dict:
    """Name, version and weights sha256 of a model (loaded ``SegModel`` or bundle path), without
    loading the network. Used in provenance and to decide whether a cohort result is current."""
    from models.bundle import DEFAULT_BUNDLE, bundle_paths
    from pipeline.io import hash_input

    meta = getattr(model, "meta", None) or {}
    path = getattr(model, "path", None) or path or DEFAULT_BUNDLE
    weights, meta_path = bundle_paths(path)
    if not meta and meta_path.exists():
        import json

        meta = json.loads(meta_path.read_text())
    return {
        "source": "network",
        "name": meta.get("name", "ifi_seg"),
        "version": meta.get("version"),
        "file": weights.name,
        "sha256": hash_input(weights) if weights.exists() else None,
        "input_channels": meta.get("input_channels"),
        "working_spacing_mm": meta.get("working_spacing_mm"),
        "training": _short_training(meta.get("training")),
        "metrics": meta.get("metrics"),
    }


def _short_training(training):
    if not isinstance(training, dict):
        return training
    return {k: v for k, v in training.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _load_inputs(inputs: dict, max_voxels: int | None, warnings: list[str]) -> dict[str, Image]:
    from pipeline.io import check_overlap, load_series

    images: dict[str, Image] = {}
    for role in ROLES:
        if role not in inputs:
            continue
        kind = inputs["fluid_kind"] if role == "fluid" else role
        try:
            img = load_series(inputs[role], kind, max_voxels=max_voxels)
        except ImageError as exc:
            raise SubjectError("load", f"{role}: {exc}") from exc
        if role == "fluid":
            img.meta["fluid_kind"] = kind
        warnings += [f"{role}: {w}" for w in img.meta.get("warnings", [])]
        mismatch = _header_role_mismatch(role, img)
        if mismatch:
            warnings.append(mismatch)
        images[role] = img
    ref_role = reference_role(images)
    for role, img in images.items():
        if role == ref_role:
            continue
        try:
            w = check_overlap(images[ref_role], img, role)
        except ImageError as exc:
            raise SubjectError("validate", str(exc)) from exc
        if w:
            warnings.append(w)
    return images


def _header_role_mismatch(role: str, img: Image) -> str | None:
    """A warning when an input's own headers (DICOM, or a NIfTI's JSON sidecar) classify it as
    another kind of series than the role it was given for (e.g. a STIR given as the T1); None
    when they agree or say nothing definite."""
    from pipeline.io import ROLE_KINDS, classify_series

    params = img.meta.get("sequence") or {}
    kind = classify_series(params) if params else None
    if kind is None or kind in ROLE_KINDS[role]:
        return None
    source = img.meta.get("sequence_source") or "DICOM headers"
    desc = params.get("SeriesDescription")
    return (f"{role}: its {source} read as a {kind} series" + (f" ({desc!r})" if desc else "")
            + f", not a {' or '.join(ROLE_KINDS[role])}; check the inputs")


def reference_role(images: dict) -> str:
    """The input whose grid the label map takes: T1, else the fluid series, else Dixon fat."""
    return next(r for r in ("t1", "fluid", "dixon_fat") if r in images)


def network_inputs(images: dict[str, Image], warnings: list[str]) -> dict[str, Image]:
    """The images the network segments: T1 and/or fluid; for a Dixon-only scan a T1-like image
    made from the Dixon pair (``pipeline.dixon_input``), with a warning saying so."""
    net = {k: images[k] for k in ("t1", "fluid") if k in images}
    if net:
        return net
    from pipeline.dixon_input import DIXON_T1_WATER_WEIGHT, t1_like_from_dixon

    try:
        net["t1"] = t1_like_from_dixon(images["dixon_fat"], images["dixon_water"])
    except ImageError as exc:
        raise SubjectError("validate", f"Dixon: {exc}") from exc
    warnings.append(f"no T1 or fluid-sensitive series: the network segmented a T1-like image made "
                    f"from the Dixon pair (fat + {DIXON_T1_WATER_WEIGHT:g} x water); the fat fraction "
                    "comes from Dixon; edema needs a T2 fat-sat or STIR series")
    return net


def _input_name(value) -> str:
    """A scan input's name for outputs: its file name, or a DICOM series' folder name."""
    return value.files[0].parent.name if hasattr(value, "files") else Path(str(value)).name


def _exchanged_t1_fluid(images: dict[str, Image], fluid_kind: str) -> dict[str, Image]:
    """The image dict with its T1 and fluid series exchanged (given the wrong way round)."""
    t1, fluid = images["fluid"], images["t1"]
    t1_meta = {k: v for k, v in t1.meta.items() if k != "fluid_kind"}
    return {**images, "t1": Image(t1.array, t1.affine, "t1", t1_meta),
            "fluid": Image(fluid.array, fluid.affine, fluid_kind, {**fluid.meta, "fluid_kind": fluid_kind})}


def _input_description(role: str, value, img: Image, sha: str | None) -> dict:
    import nibabel as nib

    return {
        "file": _input_name(value),
        "sha256": sha,
        "format": img.meta.get("format", "nifti"),
        "kind": img.kind,
        "shape": list(img.shape),
        "spacing_mm": [round(float(s), 4) for s in img.spacing],
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "sequence": dict(img.meta.get("sequence", {})),
    }


def _load_labels(labels_override, label_table, reference: Image, warnings: list[str]) -> Image:
    from pipeline.image import load_nifti, resample_like
    from pipeline.io import load_series
    from pipeline.labels import read_label_table, remap_to_project

    path = Path(str(labels_override))
    try:
        lab = load_nifti(path, "labels") if path.is_file() else load_series(path, "labels", validate=False)
    except ImageError as exc:
        raise SubjectError("labels", str(exc)) from exc
    warnings += [f"labels: {w}" for w in lab.meta.get("warnings", [])]
    table_path = resolve_label_table(labels_override, label_table)
    if table_path is not None:
        try:
            table = read_label_table(table_path)
        except (OSError, ValueError) as exc:
            raise SubjectError("labels", f"label table {table_path}: {exc}") from exc
        lab = lab.with_array(remap_to_project(lab.array, table), kind="labels")
    if not lab.same_grid(reference, atol=1e-3):
        from pipeline.image import overlap_fraction

        if max(overlap_fraction(reference, lab), overlap_fraction(lab, reference)) < 0.2:
            raise SubjectError("labels", "label map grid does not overlap the reference image")
        warnings.append("label map is not on the reference grid: resampled (nearest neighbour)")
        lab = resample_like(lab, reference, order=0)
    return Image(np.asarray(lab.array, dtype=np.uint8), reference.affine.copy(), "labels", {})


def run_subject(inputs: dict, out_dir, *, model=None, config=None, subject=None, labels_override=None,
                label_table=None, write_dicom_seg: bool = False, include_identifiers: bool = False,
                device: str = "auto", model_path=None, max_voxels: int | None = None,
                hashes: dict | None = None) -> dict:
    """Process one subject and write its outputs into ``out_dir``.

    Args:
        inputs: role -> path (NIfTI file, DICOM series folder or ``pipeline.io.SeriesInfo``):
            "t1", "fluid" (+ "fluid_kind": "t2fs"|"stir"; or give "t2fs"/"stir" directly),
            "dixon_fat" + "dixon_water".
        out_dir: folder for labels.nii.gz, labels.json, qc.png, measurements.json (written last).
        model: a loaded ``pipeline.segment.SegModel``; loaded from ``model_path`` (default: the
            bundled model) on ``device`` when needed and not given.
        config: ``pipeline.config.MeasureConfig`` (default cut-offs when None).
        subject: ID recorded in the outputs (default: the output folder name).
        labels_override: a label map (NIfTI) to measure instead of segmenting (manual
            segmentations); ``label_table`` its JSON name -> value table (default: a ``.json``
            beside it, else the project's numbering).
        write_dicom_seg: also write ``labels.seg.dcm`` when the reference input is DICOM.
        include_identifiers: copy identifying DICOM fields (patient name, ID, ...) into
            measurements.json. Off by default.
        max_voxels: memory guard for each input (default ``pipeline.image.MAX_VOXELS``).
        hashes: precomputed input hashes (the cohort runner has them already).

    Returns:
        The ``measurements.json`` record (the measure contract + "subject" + "provenance").

    Raises:
        SubjectError: with ``.stage`` in input/load/validate/model/labels/segment/measure/write.
    """
    from pipeline import __version__
    from pipeline.config import MeasureConfig

    t_start = time.perf_counter()
    timings: dict = {"started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    out_dir = Path(out_dir)
    subject = str(subject) if subject is not None else out_dir.name
    config = config or MeasureConfig()
    inputs = normalise_inputs(inputs)
    warnings: list[str] = []
    if hashes is None:
        hashes = input_hashes(inputs, labels_override, label_table)

    t0 = time.perf_counter()
    images = _load_inputs(inputs, max_voxels, warnings)
    ref_role = reference_role(images)
    reference = images[ref_role]
    timings["load_s"] = time.perf_counter() - t0

    seg_info: dict = {}
    net_images = None
    hip_notices: list[str] = []      # also said in each hip's warnings (a cohort's table rows)
    t0 = time.perf_counter()
    if labels_override is not None:
        labels = _load_labels(labels_override, label_table, reference, warnings)
        model_info = {"source": "labels", "file": Path(str(labels_override)).name,
                      "sha256": hashes.get("labels"), "label_table_sha256": hashes.get("label_table")}
        stage = "labels"
    else:
        if model is None:
            model = load_model_or_fail(model_path, device)
        inputs, hashes, images, net_images, labels, seg_info = _segment_checking_roles(
            inputs, hashes, images, model, warnings, hip_notices)
        ref_role = reference_role(images)
        reference = images[ref_role]
        model_info = model_identity(model)
        stage = "segment"
    timings["segment_s"] = time.perf_counter() - t0
    _require_hip_structures(labels, stage)

    from pipeline.measure import dixon_swapped_throughout, measure_hips

    t0 = time.perf_counter()
    with _stage_errors("measure"):
        result = measure_hips(labels, images, config=config)
    if "dixon_fat" in images and dixon_swapped_throughout(result, config):
        # the whole pair reads swapped around every hip: exchanged, and the scan run again (a
        # Dixon-only scan is segmented again too, since its network input was made from the pair,
        # when the two share a grid: the labels stay on the reference grid)
        from pipeline.dixon_input import exchanged

        images = exchanged(images)
        again = "measured"
        dixon_only = not any(k in images for k in ("t1", "fluid"))
        if net_images is not None and dixon_only and images["dixon_fat"].same_grid(reference):
            net_images = network_inputs(images, [])
            labels, seg_info = _segment_on_reference(net_images, model, ref_role, reference, [])
            again = "segmented and measured"
        notice = (f"Dixon fat and water read swapped around every hip (reference muscle "
                  f"{config.dixon_exchange_share:.0%} or more above fat fraction 0.5, "
                  f"subcutaneous fat {config.dixon_subcut_max_swapped_share:.0%} or more below "
                  f"it): the two images were exchanged and the scan {again} again; check which "
                  "series is which")
        warnings.append(notice)
        hip_notices.append(notice)
        with _stage_errors("measure"):
            result = measure_hips(labels, images, config=config)
    for hip in result["hips"].values():          # each hip's row of a cohort's table says so too
        if hip.get("present"):
            hip["warnings"].extend(hip_notices)
    timings["measure_s"] = time.perf_counter() - t0

    inputs_desc = {role: _input_description(role, inputs[role], img, hashes.get(role))
                   for role, img in images.items()}
    provenance = {
        "tool": "ifi-seg",
        "tool_version": __version__,
        "python": platform.python_version(),
        "model": model_info,
        "reference": ref_role,
        "inputs": inputs_desc,
        "input_sha256": dict(hashes),
        "segmentation": seg_info,
        "warnings": warnings,
        "timings": timings,
    }
    if include_identifiers:
        provenance["identifiers"] = {role: img.meta.get("identifiers", {}) for role, img in images.items()}
    record = {"subject": subject, **result, "provenance": provenance}

    display = images.get("t1") or images.get("fluid")
    if display is None:       # Dixon only: the T1-like image, on the label map's grid
        display = (net_images or network_inputs(images, []))["t1"]
    seg_source = reference if write_dicom_seg and reference.meta.get("format") == "dicom" else None
    if write_dicom_seg and seg_source is None:
        warnings.append("DICOM SEG not written: the reference input is not DICOM")
    timings["total_s"] = time.perf_counter() - t_start   # report_s is added when the outputs are written
    try:
        from pipeline.report import write_subject_outputs

        write_subject_outputs(out_dir, record, labels, display, dicom_seg_source=seg_source)
    except OSError as exc:
        raise SubjectError("write", f"{type(exc).__name__}: {exc}") from exc
    return record


def _segment_checking_roles(inputs: dict, hashes: dict, images: dict[str, Image], model,
                            warnings: list[str], hip_notices: list[str]):
    """Segment the scan. When fat reads dark on the T1 and bright on the fluid series (the two
    given the wrong way round, e.g. a manifest's columns mixed up: ``segment.T1_MIN_FAT_RATIO``),
    exchange them, segment again and say so. Returns (inputs, hashes, images, network inputs,
    labels on the reference grid, segmentation provenance), the first four exchanged if need be."""
    ref_role = reference_role(images)
    net_images = network_inputs(images, warnings)
    first_pass: list[str] = []
    labels, seg_info = _segment_on_reference(net_images, model, ref_role, images[ref_role], first_pass)
    if not seg_info.get("t1_fluid_swapped"):
        warnings += first_pass
        return inputs, hashes, images, net_images, labels, seg_info
    notice = (f"the series given as T1 ({_input_name(inputs['t1'])}) reads fluid-sensitive "
              f"(fat {seg_info['t1_fat_ratio']:.1f} times the muscles) and the one given as "
              f"{inputs['fluid_kind']} ({_input_name(inputs['fluid'])}) reads T1-weighted (fat "
              f"{seg_info['fluid_fat_ratio']:.1f} times): the two were exchanged; check the inputs")
    inputs = {**inputs, "t1": inputs["fluid"], "fluid": inputs["t1"]}
    swap = {"t1": "fluid", "fluid": "t1", "t1_sidecar": "fluid_sidecar", "fluid_sidecar": "t1_sidecar"}
    hashes = {swap.get(k, k): v for k, v in hashes.items()}
    images = _exchanged_t1_fluid(images, inputs["fluid_kind"])
    ref_role = reference_role(images)
    net_images = network_inputs(images, warnings)
    labels, seg_info = _segment_on_reference(net_images, model, ref_role, images[ref_role], warnings)
    warnings.append(notice)
    hip_notices.append(notice)
    return inputs, hashes, images, net_images, labels, seg_info


def _segment_on_reference(net_images: dict, model, ref_role: str, reference: Image,
                          warnings: list[str]) -> tuple[Image, dict]:
    """Segment the network inputs; the label map on the reference grid and the segmentation's
    provenance (its warnings are also added to ``warnings``)."""
    from pipeline.segment import segment

    with _stage_errors("segment"):
        seg = segment(net_images, model, reference=ref_role if ref_role in net_images else "t1")
    if not seg.labels.same_grid(reference):
        raise SubjectError("segment", "segmentation is not on the reference grid (internal error)")
    labels = Image(np.asarray(seg.labels.array, dtype=np.uint8), reference.affine.copy(), "labels", {})
    warnings += [f"segmentation: {w}" for w in seg.warnings]
    return labels, {"confidence": dict(seg.confidence), "warnings": list(seg.warnings),
                    "timings": {k: float(v) for k, v in seg.timings.items()},
                    "fluid_fat_ratio": seg.fluid_fat_ratio, "t1_fat_ratio": seg.t1_fat_ratio,
                    "t1_fluid_swapped": seg.t1_fluid_swapped}


@contextlib.contextmanager
def _stage_errors(stage: str):
    """Turn any failure inside a pipeline stage into a one-line ``SubjectError(stage, ...)``."""
    try:
        yield
    except SubjectError:
        raise
    except ImageError as exc:
        raise SubjectError(stage, str(exc)) from exc
    except Exception as exc:
        raise SubjectError(stage, f"{type(exc).__name__}: {exc}") from exc


def load_model_or_fail(model_path=None, device: str = "auto"):
    """``pipeline.segment.load_model`` with a one-line ``SubjectError('model', ...)`` on failure."""
    from pipeline.segment import load_model

    try:
        return load_model(model_path, device=device)
    except FileNotFoundError as exc:
        raise SubjectError("model", str(exc)) from exc
    except Exception as exc:
        raise SubjectError("model", f"cannot load model ({type(exc).__name__}: {exc})") from exc


def _require_hip_structures(labels: Image, stage: str) -> None:
    """Refuse to measure a label map without hip structures (wrong anatomy, empty map)."""
    from pipeline.labels import LABELS, REQUIRED_FOR_IFS, REQUIRED_FOR_QFS

    present = set(np.unique(labels.array).tolist())
    needed = set(REQUIRED_FOR_IFS) | set(REQUIRED_FOR_QFS) | {"quadratus_femoris"}
    if not any(LABELS[n] in present for n in needed):
        raise SubjectError(stage, "no hip structures found (no ischial tuberosity, lesser trochanter, "
                                  "hamstring tendon or quadratus femoris): not a hip/pelvis MRI, or the "
                                  "field of view misses the hips")


def run_cohort(manifest, out_dir, *, workers: int = 1, engine: str = "local", ray_address=None,
               force: bool = False, quiet: bool = False, **options) -> dict:
    """Process every subject of a manifest CSV; see ``pipeline.cohort.run_cohort`` for options."""
    from pipeline.cohort import run_cohort as _run

    return _run(manifest, out_dir, workers=workers, engine=engine, ray_address=ray_address,
                force=force, quiet=quiet, **options)
