"""Reading scans: NIfTI files and DICOM series, into world-aware ``Image`` objects.

DICOM geometry is rebuilt from the headers, never from file names or InstanceNumber:
slices are sorted by their position along the slice normal (cross product of the two
ImageOrientationPatient direction cosines), and the voxel -> patient affine built from
ImagePositionPatient / ImageOrientationPatient / PixelSpacing is converted from DICOM's LPS to
the project's RAS. The array axes are (column, row, slice), the same convention as dcm2niix.
Multi-frame (enhanced, or legacy-converted enhanced) MR files are read the same way, frame by
frame: each frame's position, orientation, pixel spacing and rescale come from its functional
groups (per-frame, else shared), and the sequence parameters ``classify_series`` needs from the
MR timing, echo and modifier groups.

Series that cannot be represented by one affine (varying slice spacing, gantry tilt, several
volumes at the same positions, mixed orientations) are rejected with a one-line ``ImageError``.
Only non-identifying sequence parameters are kept in ``Image.meta["sequence"]``; identifying
header fields are collected separately in ``meta["identifiers"]`` and written out only on request.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.image import Image, ImageError, load_nifti, overlap_fraction, validate_intensity_image

#: Non-identifying DICOM attributes kept as sequence provenance.
SEQUENCE_TAGS = (
    "Modality", "SeriesDescription", "ScanningSequence", "SequenceVariant", "ScanOptions",
    "RepetitionTime", "EchoTime", "InversionTime", "MagneticFieldStrength", "FlipAngle",
    "SliceThickness", "SpacingBetweenSlices", "ImageType", "Manufacturer", "SeriesNumber",
)
#: Identifying attributes: never written to outputs unless the user asks (include_identifiers).
IDENTIFYING_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime",
    "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StationName",
    "DeviceSerialNumber", "OtherPatientIDs",
)
#: DICOM LPS <-> NIfTI RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

INTENSITY_KINDS = ("t1", "t2fs", "stir", "dixon_fat", "dixon_water")
# Tolerances for "one regular grid"
_SPACING_RTOL = 0.02      # slice spacing may vary by 2 % (+0.05 mm) before a series is rejected
_SPACING_ATOL = 0.05
_TILT_TOL_DEG = 0.5       # slice stack direction vs slice normal
_ORIENT_TOL = 1e-3


@dataclass
class SeriesInfo:
    """One DICOM series found in a study folder (headers only; pixels are read by load_series).

    ``params`` holds the non-identifying sequence parameters (``SEQUENCE_TAGS``).
    """

    uid: str
    files: list[Path]
    params: dict = field(default_factory=dict)
    n_slices: int = 0        # 2D images: files, or the frames of multi-frame (enhanced) files
    orientation: str = "?"   # "axial", "coronal", "sagittal", "oblique" from the slice normal
    number: int | None = None

    @property
    def description(self) -> str:
        return str(self.params.get("SeriesDescription", "") or "")

    def summary(self) -> str:
        """A one-line human description, without identifiers except the series UID."""
        p = self.params
        bits = [f"#{self.number}" if self.number is not None else "#?", repr(self.description),
                f"{self.n_slices} slices", self.orientation]
        for key, short in (("RepetitionTime", "TR"), ("EchoTime", "TE"), ("InversionTime", "TI")):
            if p.get(key) is not None:
                bits.append(f"{short}={p[key]:g}")
        if p.get("ScanOptions"):
            bits.append(f"opts={p['ScanOptions']}")
        return " ".join(bits) + f" uid={self.uid}"


# ----------------------------------------------------------------------------------------------
# generic entry points
# ----------------------------------------------------------------------------------------------
def is_nifti(path: str | Path) -> bool:
    """True when ``path`` names a NIfTI file by extension."""
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def load_series(path, kind: str | None = None, *, series_uid: str | None = None,
                validate: bool = True, max_voxels: int | None = None) -> Image:
    """Load one scan as an ``Image`` (world RAS mm).

    Args:
        path: a NIfTI file, a folder holding exactly one DICOM series (or ``series_uid`` to pick
            one), or a ``SeriesInfo`` from ``find_series``. A single DICOM file is read on its
            own, so it must be a multi-frame (enhanced) volume.
        kind: "t1", "t2fs", "stir", "dixon_fat", "dixon_water" or "labels".
        series_uid: choose one series when the folder holds several.
        validate: run ``validate_intensity_image`` on intensity kinds.
        max_voxels: memory guard (defaults to ``pipeline.image.MAX_VOXELS``); checked from the
            header before the pixels are read where possible.

    Raises:
        ImageError: with a one-line reason.
    """
    if isinstance(path, SeriesInfo):
        img = _load_dicom_files(path.files, kind, max_voxels)
    else:
        path = Path(path)
        if not path.exists():
            raise ImageError(f"{path}: file not found")
        if path.is_dir():
            img = load_dicom_series(path, kind, series_uid=series_uid, max_voxels=max_voxels)
        elif is_nifti(path):
            _nifti_size_guard(path, max_voxels)
            img = load_nifti(path, kind)
            if kind != "labels":
                sidecar = read_sidecar(path)
                if sidecar:
                    img.meta["sequence"], img.meta["sequence_source"] = sidecar, f"sidecar {sidecar_path(path).name}"
        elif _looks_like_dicom(path):
            img = _load_dicom_files([path], kind, max_voxels)
        else:
            raise ImageError(f"{path}: neither NIfTI (.nii/.nii.gz) nor DICOM")
    if kind is not None:
        img.kind = kind
    if validate and kind in INTENSITY_KINDS:
        src = path.files[0].parent if isinstance(path, SeriesInfo) else path
        _validate(img, f"{kind} ({src})", max_voxels)
    return img


#: BIDS sidecar fields (dcm2niix) in seconds; the DICOM attributes of the same names are in ms.
_SIDECAR_SECONDS = {"RepetitionTime": 50.0, "EchoTime": 1.0, "InversionTime": 10.0}


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar a converter (dcm2niix, BIDS) writes beside a NIfTI: same stem, ``.json``."""
    path = Path(path)
    stem = path.name[:-7] if path.name.lower().endswith(".nii.gz") else path.with_suffix("").name
    return path.with_name(stem + ".json")


def read_sidecar(path: str | Path) -> dict:
    """The sequence parameters (``SEQUENCE_TAGS``, times in ms as in DICOM) of a NIfTI's JSON
    sidecar (dcm2niix / BIDS), or {} when there is none or it is not such a file. Identifying
    fields a sidecar may hold are not read."""
    import json

    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {}
    for tag in SEQUENCE_TAGS:
        val = data.get(tag)
        if tag == "SeriesDescription" and not val:
            val = data.get("ProtocolName")
        if val is None or val == "" or isinstance(val, dict):
            continue
        if tag in _SIDECAR_SECONDS and isinstance(val, (int, float)):
            # BIDS gives seconds; a value no sequence has in seconds was written in ms already
            val = float(val) if val > _SIDECAR_SECONDS[tag] else round(float(val) * 1000.0, 6)
        out[tag] = val
    return out


def _validate(img: Image, name: str, max_voxels: int | None) -> None:
    import pipeline.image as pim

    if max_voxels is not None and img.array.size > max_voxels:
        raise ImageError(f"{name}: {img.array.size} voxels exceeds the memory guard of {max_voxels}")
    pim.validate_intensity_image(img, name)


def _nifti_size_guard(path: Path, max_voxels: int | None) -> None:
    """Refuse an oversized NIfTI from its header alone (before allocating its data)."""
    import nibabel as nib
    import pipeline.image as pim

    limit = max_voxels if max_voxels is not None else pim.MAX_VOXELS
    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:
        raise ImageError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    n = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if n > limit:
        raise ImageError(f"{path}: {n} voxels (shape {tuple(shape)}) exceeds the memory guard of {limit}")


def hash_input(path) -> str:
    """sha256 of an input: the file's bytes, or for a DICOM folder / SeriesInfo the sorted
    (file name, file sha256) list of its files. Used to decide whether a result is up to date."""
    if isinstance(path, SeriesInfo):
        files = sorted(path.files)
        base = files[0].parent if files else Path(".")
    else:
        path = Path(path)
        if not path.exists():
            raise ImageError(f"{path}: file not found")
        if path.is_file():
            return _sha256_file(path)
        base = path
        files = sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.relpath(f, base)}\0{_sha256_file(f)}\n".encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_overlap(reference: Image, other: Image, name: str, *, reject_below: float = 0.2,
                  warn_below: float = 0.8) -> str | None:
    """Check two sequences cover the same anatomy (world-coordinate grid overlap).

    The larger of the two directional overlap fractions is used, so a small-FOV hip series inside
    a pelvis T1 passes. Raises ``ImageError`` when they (almost) do not overlap; returns a warning
    string when they overlap only partly, else None.
    """
    frac = max(overlap_fraction(reference, other), overlap_fraction(other, reference))
    if frac < reject_below:
        raise ImageError(f"{name}: grid does not overlap the reference image "
                         f"({frac:.0%} of voxels shared; different scans or a broken affine?)")
    if frac < warn_below:
        return f"{name}: only {frac:.0%} of its grid overlaps the reference image"
    return None


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------
def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".ima")


@dataclass
class _Frame:
    """One 2D image of a series: a classic single-frame file, or one frame of a multi-frame
    (enhanced) file, with the geometry and rescale its functional groups give it."""

    file: Path
    index: int | None          # 0-based frame of a multi-frame file; None for a single-frame file
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: np.ndarray | None
    rows: int
    cols: int
    slope: float
    intercept: float
    what: str = ""             # frame type / echo, to name what repeats in an error message

    @property
    def name(self) -> str:
        return self.file.name if self.index is None else f"{self.file.name} frame {self.index + 1}"


def _is_multiframe(ds) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _group_item(ds, frame: int | None, sequence: str):
    """The item of functional group ``sequence`` for ``frame`` of an enhanced DICOM: per-frame
    first, then shared (the standard allows either); None where neither has it."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for g in groups:
        seq = g.get(sequence)
        if seq:
            return seq[0]
    return None


def _frames_of(f: Path, ds) -> list[_Frame]:
    """The frames of one DICOM file (header only)."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    top_slope = float(ds.get("RescaleSlope", 1) or 1)
    top_intercept = float(ds.get("RescaleIntercept", 0) or 0)

    def arr(v):
        return None if v is None else np.asarray(v, dtype=float)

    if not _is_multiframe(ds):
        return [_Frame(f, None, arr(ds.get("ImagePositionPatient")), arr(ds.get("ImageOrientationPatient")),
                       arr(ds.get("PixelSpacing")), rows, cols, top_slope, top_intercept)]
    n = int(ds.get("NumberOfFrames", 0) or 0) or len(ds.get("PerFrameFunctionalGroupsSequence", []))
    frames = []
    for i in range(n):
        pos, ori, meas = (_group_item(ds, i, s) for s in
                          ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
        pvt = _group_item(ds, i, "PixelValueTransformationSequence")
        slope = float(pvt.get("RescaleSlope", 1) or 1) if pvt is not None else top_slope
        intercept = float(pvt.get("RescaleIntercept", 0) or 0) if pvt is not None else top_intercept
        what = []
        ftype = _group_item(ds, i, "MRImageFrameTypeSequence")
        if ftype is not None and ftype.get("FrameType"):
            what.append("\\".join(str(v) for v in ftype.FrameType))
        echo = _group_item(ds, i, "MREchoSequence")
        if echo is not None and echo.get("EffectiveEchoTime") is not None:
            what.append(f"TE {float(echo.EffectiveEchoTime):g}")
        content = _group_item(ds, i, "FrameContentSequence")
        if content is not None and content.get("TemporalPositionIndex") is not None:
            what.append(f"time point {int(content.TemporalPositionIndex)}")
        frames.append(_Frame(f, i, arr(pos.get("ImagePositionPatient")) if pos is not None else None,
                             arr(ori.get("ImageOrientationPatient")) if ori is not None else None,
                             arr(meas.get("PixelSpacing")) if meas is not None else None,
                             rows, cols, slope, intercept, ", ".join(what)))
    return frames


def _enhanced_params(ds) -> dict:
    """Sequence parameters an enhanced (multi-frame) MR file keeps in its functional groups, under
    the classic keywords ``classify_series`` reads: EchoTime, RepetitionTime, InversionTime,
    FlipAngle, ScanningSequence (IR), ScanOptions (FS), ImageType (from the frame type)."""
    out: dict = {}

    def floats(sequence: str, keys) -> None:
        item = _group_item(ds, 0, sequence)
        for key in keys if item is not None else ():
            if item.get(key) is not None:
                out[key] = float(item.get(key))

    floats("MRTimingAndRelatedParametersSequence", ("RepetitionTime", "FlipAngle"))
    floats("PixelMeasuresSequence", ("SliceThickness", "SpacingBetweenSlices"))
    echo = _group_item(ds, 0, "MREchoSequence")
    if echo is not None and echo.get("EffectiveEchoTime") is not None:
        out["EchoTime"] = float(echo.EffectiveEchoTime)
    modifier = _group_item(ds, 0, "MRModifierSequence")
    if modifier is not None:
        if str(modifier.get("InversionRecovery", "")).upper() == "YES":
            out["ScanningSequence"] = "IR"
            tis = _plain(modifier.get("InversionTimes"))
            if isinstance(tis, list):
                tis = tis[0] if tis else None
            if tis not in (None, ""):
                out["InversionTime"] = float(tis)
    if str(ds.get("SpectrallySelectedSuppression", "")).upper() in ("FAT", "FAT_AND_WATER"):
        out["ScanOptions"] = "FS"
    ftype = _group_item(ds, 0, "MRImageFrameTypeSequence")
    if ftype is not None and ftype.get("FrameType"):
        out["ImageType"] = [str(v) for v in ftype.FrameType]
    # a legacy-converted file keeps the classic attributes it had no functional group for here
    for seq in ("UnassignedSharedConvertedAttributesSequence", "UnassignedPerFrameConvertedAttributesSequence"):
        item = _group_item(ds, 0, seq)
        if item is not None:
            for tag in SEQUENCE_TAGS:
                if tag in item and item.get(tag) not in (None, ""):
                    out.setdefault(tag, _plain(item.get(tag)))
    return out


def _read_headers(folder: Path) -> dict[str, list[tuple[Path, object]]]:
    """Series UID -> [(file, header dataset)] for every DICOM image file under ``folder`` (or
    for ``folder`` itself when it is one file, e.g. a multi-frame series)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list] = {}
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for f in files:
        if f.name.upper() == "DICOMDIR" or f.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM: README, thumbnails, ...
        except Exception as exc:
            raise ImageError(f"{f}: unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
        if "ImagePositionPatient" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
            continue  # not an image (structured report, presentation state, ...)
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or "no-uid"), []).append((f, ds))
    return groups


def _sequence_params(ds) -> dict:
    out = {}
    for tag in SEQUENCE_TAGS:
        if tag not in ds:
            continue
        val = ds.get(tag)
        if val is None or val == "":
            continue
        out[tag] = _plain(val)
    if _is_multiframe(ds):
        for key, val in _enhanced_params(ds).items():
            if key == "ImageType" and key in out:
                # the file's image type may say MIXED where its frames say FAT or WATER
                top = out[key] if isinstance(out[key], list) else [out[key]]
                out[key] = top + [v for v in val if v not in top]
            out.setdefault(key, val)
    return out



def _plain(val):
    """A DICOM value as JSON-friendly Python (float, int, str, list)."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DSfloat, IS, PersonName

    if isinstance(val, (MultiValue, list, tuple)):
        return [_plain(v) for v in val]
    if isinstance(val, DSfloat):
        return float(val)
    if isinstance(val, IS):
        return int(val)
    if isinstance(val, PersonName):
        return str(val)
    if isinstance(val, (int, float, str)):
        return val
    return str(val)


def _identifiers(ds) -> dict:
    return {t: _plain(ds.get(t)) for t in IDENTIFYING_TAGS if t in ds and ds.get(t) not in (None, "")}


def _orientation_name(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def find_series(study_dir: str | Path) -> list[SeriesInfo]:
    """List the image series under a DICOM study folder (recursively), or in one DICOM file (a
    multi-frame series), from headers only.

    Returns them ordered by series number. Files that are not DICOM are skipped.
    """
    study_dir = Path(study_dir)
    if not study_dir.exists():
        raise ImageError(f"{study_dir}: not found")
    infos = []
    for uid, items in _read_headers(study_dir).items():
        ds = items[0][1]
        params = _sequence_params(ds)
        orientation = "?"
        frames = [fr for f, d in items for fr in _frames_of(f, d)]
        iop = frames[0].orientation if frames else None
        if iop is not None and len(iop) == 6:
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            orientation = _orientation_name(normal)
        number = ds.get("SeriesNumber")
        infos.append(SeriesInfo(uid=uid, files=[f for f, _ in items], params=params,
                                n_slices=len(frames), orientation=orientation,
                                number=int(number) if number not in (None, "") else None))
    infos.sort(key=lambda s: (s.number if s.number is not None else 10**9, s.uid))
    return infos


def load_dicom_series(folder: str | Path, kind: str | None = None, *, series_uid: str | None = None,
                      max_voxels: int | None = None) -> Image:
    """Load the DICOM series in ``folder`` (or the one with ``series_uid``) as an ``Image``."""
    folder = Path(folder)
    groups = _read_headers(folder)
    if not groups:
        raise ImageError(f"{folder}: no DICOM image files found")
    if series_uid is not None:
        if series_uid not in groups:
            raise ImageError(f"{folder}: series {series_uid} not found (found {len(groups)} series)")
        files = [f for f, _ in groups[series_uid]]
    elif len(groups) > 1:
        descs = "; ".join(f"{uid} ({len(v)} files, {v[0][1].get('SeriesDescription', '')!s})"
                          for uid, v in groups.items())
        raise ImageError(f"{folder}: holds {len(groups)} series, choose one (series UID): {descs}")
    else:
        files = [f for f, _ in next(iter(groups.values()))]
    return _load_dicom_files(files, kind, max_voxels)


def _load_dicom_files(files: list[Path], kind: str | None, max_voxels: int | None) -> Image:
    import pydicom
    import pipeline.image as pim

    where = files[0].parent if files else Path("?")
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except Exception as exc:
            raise ImageError(f"{f}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    first = datasets[0]
    frames = [fr for f, ds in zip(files, datasets) for fr in _frames_of(f, ds)]
    multiframe = any(_is_multiframe(ds) for ds in datasets)
    if len(frames) < 2:
        raise ImageError(f"{files[0]}: a single slice; a 3D series of >= 2 slices is needed "
                         "(give the series folder, not one file)")
    for key, attr in (("ImagePositionPatient", "position"), ("ImageOrientationPatient", "orientation"),
                      ("PixelSpacing", "pixel_spacing"), ("Rows", "rows"), ("Columns", "cols")):
        missing = [fr.name for fr in frames
                   if getattr(fr, attr) is None or (attr in ("rows", "cols") and not getattr(fr, attr))]
        if missing:
            what = "frame(s)" if multiframe else "file(s)"
            raise ImageError(f"{where}: {len(missing)} {what} lack {key} (e.g. {missing[0]}); cannot place slices")

    ref = frames[0]
    iop = ref.orientation
    for fr in frames:
        if fr.orientation.shape != (6,) or np.abs(fr.orientation - iop).max() > _ORIENT_TOL:
            raise ImageError(f"{where}: slices have different orientations ({fr.name}); "
                             "more than one stack in the series (localiser?)")
        if (fr.rows, fr.cols) != (ref.rows, ref.cols):
            raise ImageError(f"{where}: slices have different sizes ({fr.name}: {fr.rows}x{fr.cols} "
                             f"vs {ref.rows}x{ref.cols})")
        if np.abs(fr.pixel_spacing - ref.pixel_spacing).max() > 1e-4:
            raise ImageError(f"{where}: slices have different pixel spacings ({fr.name})")

    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1) > 0.01:
        raise ImageError(f"{where}: ImageOrientationPatient is not two orthonormal directions")
    positions = np.array([fr.position for fr in frames])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist, positions = dist[order], positions[order]
    frames = [frames[i] for i in order]

    steps = np.diff(dist)
    if np.any(steps < 1e-3):
        n_unique = len(np.unique(np.round(dist, 3)))
        kinds = sorted({fr.what for fr in frames if fr.what})
        differ = f" (frames differ in: {'; '.join(kinds[:4])})" if len(kinds) > 1 else ""
        raise ImageError(f"{where}: {len(dist)} slices at only {n_unique} distinct positions "
                         f"(several echoes/time points/volumes in one series){differ}; split them first")
    spacing = float(np.median(steps))
    if np.any(np.abs(steps - spacing) > _SPACING_RTOL * spacing + _SPACING_ATOL):
        raise ImageError(f"{where}: inconsistent slice spacing ({steps.min():.3g}-{steps.max():.3g} mm); "
                         "missing slices or a mixed series")
    stack = positions[-1] - positions[0]
    cos_tilt = abs(float(stack @ normal)) / max(np.linalg.norm(stack), 1e-9)
    tilt = np.degrees(np.arccos(np.clip(cos_tilt, -1, 1)))
    if tilt > _TILT_TOL_DEG:
        raise ImageError(f"{where}: gantry tilt / sheared stack of {tilt:.1f} degrees is not supported; "
                         "resample it (e.g. dcm2niix) first")

    rows, cols, n = ref.rows, ref.cols, len(frames)
    limit = max_voxels if max_voxels is not None else pim.MAX_VOXELS
    if rows * cols * n > limit:
        raise ImageError(f"{where}: {rows * cols * n} voxels exceeds the memory guard of {limit}")

    volume = np.empty((cols, rows, n), dtype=np.float32)
    slots: dict[Path, list[tuple[int, _Frame]]] = {}
    for k, fr in enumerate(frames):
        slots.setdefault(fr.file, []).append((k, fr))
    for f, items in slots.items():     # each file's pixels decoded once
        try:
            arr = pydicom.dcmread(str(f)).pixel_array
        except Exception as exc:
            raise ImageError(f"{f}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
        for k, fr in items:
            if fr.index is None and arr.ndim != 2:
                raise ImageError(f"{f}: pixel data has shape {arr.shape}; expected one 2D slice (colour?)")
            plane = arr if fr.index is None else (arr[fr.index] if arr.ndim == 3 else arr)
            if plane.shape != (rows, cols):
                raise ImageError(f"{fr.name}: pixel data has shape {plane.shape}; expected {rows}x{cols} "
                                 "(colour images are not supported)")
            volume[:, :, k] = (plane.astype(np.float32) * fr.slope + fr.intercept).T

    ps = ref.pixel_spacing   # (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]   # array axis 0 = column index: moves along a row
    lps[:3, 1] = col_dir * ps[0]   # array axis 1 = row index
    lps[:3, 2] = stack / (n - 1)
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    meta = {
        "source": str(where),
        "format": "dicom",
        "series_uid": str(first.get("SeriesInstanceUID", "")),
        "sequence": _sequence_params(first),
        "identifiers": _identifiers(first),
        # slice order, for DICOM SEG: the file of each slice, and its frame number (1-based) in a
        # multi-frame file
        "dicom_files": [str(fr.file) for fr in frames],
        "dicom_frames": [None if fr.index is None else fr.index + 1 for fr in frames],
    }
    if multiframe:
        meta["multiframe"] = True
    return Image(volume, affine, kind, meta)


# ----------------------------------------------------------------------------------------------
# series classification
# ----------------------------------------------------------------------------------------------
def _words(alternatives: str, whole: bool = True) -> str:
    """A pattern for any of ``alternatives`` (``a|b``) as a word of a lower-case series
    description. "_" separates words in protocol names (Siemens "t2_tse_fs_tra", Philips
    "T2W_SPAIR"), where ``\\b`` sees no word end: letters and digits bound a word here instead.
    ``whole=False`` only asks for the start of a word ("t1" in "t1w")."""
    return rf"(?<![a-z0-9])(?:{alternatives})" + (r"(?![a-z0-9])" if whole else "")


_FS_WORDS = re.compile(_words(r"fs|fat[ _-]?sat|fatsat|spair|spir|chess|fsat") + r"|fat[ _-]?supp")
_STIR_WORDS = re.compile(r"stir|tirm|" + _words(r"ir[ _-]?fse"))
_DIXON_WORDS = re.compile(r"dixon|" + _words(r"ideal|flex|dix"))
_DIXON_OTHER = re.compile(r"fraction|in[ _-]?phase|opp|" + _words(r"ff|ip|op"))
_DIXON_WATER = re.compile(r"water|" + _words(r"w"))
_DIXON_FAT = re.compile(r"fat|" + _words(r"f"))
_NOT_ANATOMICAL = re.compile(_words(r"flair|dwi|adc|gre|swi|locali[sz]er|scout") + r"|" + _words(r"diff|t2\*", False))
_SAYS_T1 = re.compile(_words(r"t1", False))
_SAYS_FLUID = re.compile(_words(r"t2|pdw", False) + "|" + _words(r"pd") + r"|proton")


def _num(params: dict, key: str) -> float | None:
    v = params.get(key)
    if isinstance(v, list):
        v = v[0] if v else None
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _tokens(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).upper() for v in value]
    return [t for t in re.split(r"[\\/ ,]+", str(value).upper()) if t]


def classify_series(info: SeriesInfo | dict) -> str | None:
    """Guess what a series is from its headers: "t1", "t2fs", "stir", "dixon_fat", "dixon_water" or None.

    Uses, in order: Dixon markers (ImageType FAT/WATER, description), inversion recovery with a
    short TI (STIR: ~100-300 ms) or STIR/TIRM in the description, fat suppression (ScanOptions
    FS/SFS, description keywords such as "fs", "fatsat", "SPAIR") with long TR (fluid-sensitive),
    and T1 weighting (short TR/TE, no fat suppression). Returns None when unsure (the caller asks
    the user to pick the series explicitly).
    """
    params = info.params if isinstance(info, SeriesInfo) else dict(info)
    desc = str(params.get("SeriesDescription", "") or "").lower()
    image_type = set(_tokens(params.get("ImageType")))
    scan_seq = set(_tokens(params.get("ScanningSequence")))
    options = set(_tokens(params.get("ScanOptions")))
    tr, te, ti = _num(params, "RepetitionTime"), _num(params, "EchoTime"), _num(params, "InversionTime")

    if "DIXON" in image_type or _DIXON_WORDS.search(desc):
        if _DIXON_OTHER.search(desc) or {"IN_PHASE", "OUT_PHASE", "FF"} & image_type:
            return None
        if "WATER" in image_type or _DIXON_WATER.search(desc):
            return "dixon_water"
        if "FAT" in image_type or _DIXON_FAT.search(desc):
            return "dixon_fat"
        return None
    if _NOT_ANATOMICAL.search(desc):
        return None
    if _STIR_WORDS.search(desc) or ("IR" in scan_seq and ti is not None and 80 <= ti <= 300):
        return "stir"
    fat_sat = bool({"FS", "SFS", "FAT_SAT", "SPAIR", "SPIR", "CHESS"} & options) or bool(_FS_WORDS.search(desc))
    says_t1 = bool(_SAYS_T1.search(desc))
    says_fluid = bool(_SAYS_FLUID.search(desc))
    if fat_sat:
        if says_t1:
            return None  # T1 fat-sat (e.g. post contrast): neither the T1 nor a fluid image
        if says_fluid or (tr is not None and tr >= 1500 and (te is None or te >= 25)):
            return "t2fs"
        return None
    if says_t1:
        return "t1"
    if says_fluid:
        return None  # T2 without fat suppression: not used
    if tr is not None and te is not None and tr < 1000 and te < 30:
        return "t1"
    return None


#: What each input role may be, as ``classify_series`` names series (the first: the default).
ROLE_KINDS = {"t1": ("t1",), "fluid": ("t2fs", "stir"), "dixon_fat": ("dixon_fat",),
              "dixon_water": ("dixon_water",)}


def choose_series(infos: list[SeriesInfo], overrides: dict[str, str] | None = None) -> tuple[dict, list[str]]:
    """Pick one series per role from a study.

    Args:
        infos: from ``find_series``.
        overrides: role -> series UID (roles "t1", "fluid", "dixon_fat", "dixon_water"); wins over
            the classification.

    Returns:
        ({role: SeriesInfo}, lines) where ``lines`` explain every choice (to print). The fluid
        series' kind is in ``SeriesInfo.params["_kind"]`` ("t2fs" or "stir").
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    by_uid = {s.uid: s for s in infos}
    lines = []
    classified = {s.uid: classify_series(s) for s in infos}
    for s in infos:
        lines.append(f"  series {s.summary()} -> {classified[s.uid] or 'not used'}")
    chosen: dict[str, SeriesInfo] = {}
    for role, kinds in ROLE_KINDS.items():
        if role in overrides:
            uid = overrides[role]
            if uid not in by_uid:
                raise ImageError(f"--{role.replace('_', '-')}-series {uid}: no such series in the study")
            s = by_uid[uid]
            kind = classified[uid] if classified[uid] in kinds else kinds[0]
            s.params["_kind"] = kind
            chosen[role] = s
            lines.append(f"{role}: series #{s.number} {s.description!r} (chosen by the user, as {kind})")
            continue
        candidates = [s for s in infos if classified[s.uid] in kinds]
        if not candidates:
            continue
        # prefer axial, then the preferred kind (t2fs over stir), then more slices, then lower number
        candidates.sort(key=lambda s: (s.orientation != "axial", kinds.index(classified[s.uid]),
                                       -s.n_slices, s.number if s.number is not None else 10**9))
        s = candidates[0]
        s.params["_kind"] = classified[s.uid]
        chosen[role] = s
        others = f" ({len(candidates) - 1} other candidate(s))" if len(candidates) > 1 else ""
        lines.append(f"{role}: series #{s.number} {s.description!r} as {classified[s.uid]}{others}; "
                     f"override with --{role.replace('_', '-')}-series UID")
    return chosen, lines


__all__ = [
    "SeriesInfo", "load_series", "load_dicom_series", "find_series", "classify_series",
    "choose_series", "hash_input", "check_overlap", "is_nifti", "validate_intensity_image",
    "read_sidecar", "sidecar_path", "ROLE_KINDS",
    "LPS_TO_RAS", "SEQUENCE_TAGS", "IDENTIFYING_TAGS",
]
