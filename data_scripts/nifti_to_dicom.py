"""Write a NIfTI volume (e.g. a phantom's T1) as a DICOM MR series, with real-world header variety.

Used by the tests to exercise the DICOM reader the way PACS exports do: LPS patient coordinates,
slice files in shuffled order and InstanceNumber running against the slice position,
RescaleSlope/Intercept (varying per slice), optional tags missing, and an obviously fake patient
name/ID (``FAKE^SYNTHETIC`` / ``FAKE-ID-0000``) so privacy tests can check identifiers never reach
the outputs. Sequence parameters for each kind (TR/TE/TI, ScanOptions, description) follow
typical hip protocols so series classification can be tested.

    python data_scripts/nifti_to_dicom.py phantoms/sub-000/t1.nii.gz out_dicom/t1 --kind t1
    python data_scripts/nifti_to_dicom.py phantoms/sub-000/t1.nii.gz out_dicom/t1 --kind t1 --enhanced
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAKE_PATIENT_NAME = "FAKE^SYNTHETIC"
FAKE_PATIENT_ID = "FAKE-ID-0000"
FAKE_INSTITUTION = "FAKE INSTITUTION OF PHANTOMS"

#: Typical header values per kind (non-identifying sequence parameters).
SEQUENCE_PRESETS = {
    "t1": {"SeriesDescription": "T1 TSE AX", "ScanningSequence": "SE", "SequenceVariant": "SK\\SP",
           "ScanOptions": "", "RepetitionTime": 550.0, "EchoTime": 12.0},
    "t2fs": {"SeriesDescription": "T2 TSE FS AX", "ScanningSequence": "SE", "SequenceVariant": "SK\\SP",
             "ScanOptions": "FS", "RepetitionTime": 4200.0, "EchoTime": 75.0},
    "stir": {"SeriesDescription": "AX TIRM", "ScanningSequence": "SE\\IR", "SequenceVariant": "SK\\SP\\MP",
             "ScanOptions": "IR", "RepetitionTime": 5000.0, "EchoTime": 40.0, "InversionTime": 160.0},
    "dixon_fat": {"SeriesDescription": "DIXON AX F", "ScanningSequence": "GR", "SequenceVariant": "SP",
                  "ScanOptions": "", "RepetitionTime": 6.8, "EchoTime": 2.4,
                  "ImageType": ["DERIVED", "PRIMARY", "DIXON", "FAT"]},
    "dixon_water": {"SeriesDescription": "DIXON AX W", "ScanningSequence": "GR", "SequenceVariant": "SP",
                    "ScanOptions": "", "RepetitionTime": 6.8, "EchoTime": 2.4,
                    "ImageType": ["DERIVED", "PRIMARY", "DIXON", "WATER"]},
}

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _slices_last(image, kind: str):
    """``image`` (an ``Image`` or NIfTI path) with the acquisition's slice axis
    (``pipeline.geometry.acquisition_slice_axis``: the thickest, in any storage order) last, and its
    LPS affine and the unit row and column directions a DICOM writer needs."""
    from pipeline.geometry import acquisition_slice_axis
    from pipeline.image import Image, load_nifti
    from pipeline.io import LPS_TO_RAS

    if not isinstance(image, Image):
        image = load_nifti(image, kind)
    slice_ax = acquisition_slice_axis(image.affine)
    if slice_ax != 2:
        perm = [a for a in range(3) if a != slice_ax] + [slice_ax]
        affine = image.affine.copy()
        affine[:3, :3] = image.affine[:3, perm]
        image = Image(np.transpose(image.array, perm), affine, image.kind, dict(image.meta))
    lps = LPS_TO_RAS @ image.affine
    return image, lps, lps[:3, 0] / image.spacing[0], lps[:3, 1] / image.spacing[1]


def _rescaled_uint16(plane: np.ndarray, k: int, n: int) -> tuple[np.ndarray, float, float]:
    """``plane`` stored as uint16 with its own RescaleSlope / RescaleIntercept (stored, slope,
    intercept); the slope varies with the slice index ``k`` of ``n``, as exports' do."""
    lo, hi = float(plane.min()), float(plane.max())
    slope = max((hi - lo) / 60000.0, 1e-6) * (1.0 + 0.1 * k / max(n, 1))
    return np.clip(np.rint((plane - lo) / slope), 0, 65535).astype(np.uint16), slope, lo


def write_dicom_series(image, out_dir, *, kind: str = "t1", shuffle: bool = True,
                       reverse_instance_numbers: bool = True, rescale: bool = True,
                       drop_optional: bool = True, seed: int = 0, series_uid: str | None = None,
                       study_uid: str | None = None, series_number: int = 1,
                       overrides: dict | None = None, slice_positions=None) -> list[Path]:
    """Write ``image`` (a ``pipeline.image.Image`` or NIfTI path) as one DICOM file per slice.

    The acquisition's slice axis (``pipeline.geometry.acquisition_slice_axis``: the thickest, in
    any storage order) becomes the slice index; of the other two array axes, the first becomes
    the DICOM column index and the second the row index. Reading the series back gives the array
    with its axes in that order (unchanged when the slices are already last) and, after LPS ->
    RAS, the matching affine: the same world geometry.

    Args:
        kind: sequence preset (``SEQUENCE_PRESETS``); "labels"-free intensity kinds only.
        shuffle: random file names / write order, unrelated to slice position.
        reverse_instance_numbers: InstanceNumber runs opposite to the slice position.
        rescale: store uint16 with per-slice RescaleSlope/Intercept (else int16, slope 1).
        drop_optional: omit SliceLocation / SpacingBetweenSlices on some slices, as some exports do.
        overrides: extra/replacement header values (e.g. to make a series odd for a test).
        slice_positions: optional (n, 3) LPS positions replacing the regular ones (gaps, tilt tests).

    Returns:
        The written file paths in slice order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image, lps, row_dir, col_dir = _slices_last(image, kind)
    spacing = image.spacing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = image.shape[2]
    positions = (np.asarray(slice_positions, float) if slice_positions is not None
                 else np.array([lps[:3, 3] + k * lps[:3, 2] for k in range(n)]))
    normal = np.cross(row_dir, col_dir)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    preset = dict(SEQUENCE_PRESETS[kind])
    preset.update(overrides or {})
    data = np.asarray(image.array, dtype=np.float64)
    names = [f"IM{int(i):05d}" for i in (rng.permutation(n) if shuffle else np.arange(n))]
    order = rng.permutation(n) if shuffle else np.arange(n)
    written: dict[int, Path] = {}
    for k in order:
        plane = data[:, :, k].T   # (rows, columns)
        if rescale:
            stored, slope, intercept = _rescaled_uint16(plane, k, n)
        else:
            slope, intercept = 1.0, 0.0
            stored = np.clip(np.rint(plane), -32768, 32767).astype(np.int16)
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "MR"
        ds.PatientName = FAKE_PATIENT_NAME
        ds.PatientID = FAKE_PATIENT_ID
        ds.PatientBirthDate = "19000101"
        ds.PatientSex = "O"
        ds.InstitutionName = FAKE_INSTITUTION
        ds.AccessionNumber = "FAKEACC0001"
        ds.StudyDate = "20000101"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = int(n - k if reverse_instance_numbers else k + 1)
        ds.MagneticFieldStrength = 1.5
        ds.FlipAngle = 90.0 if preset.get("ScanningSequence", "").startswith("SE") else 15.0
        ds.SliceThickness = float(spacing[2])
        for key, value in preset.items():
            if value in ("", None):
                continue
            setattr(ds, key, value)
        ds.ImagePositionPatient = [float(f"{v:.6f}") for v in positions[k]]
        ds.ImageOrientationPatient = [float(f"{v:.8f}") for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]   # (between rows, between columns)
        if not (drop_optional and k % 3 == 0):
            ds.SliceLocation = float(positions[k] @ normal)
            ds.SpacingBetweenSlices = float(spacing[2])
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0 if stored.dtype == np.uint16 else 1
        ds.RescaleSlope = float(f"{slope:.10g}")
        ds.RescaleIntercept = float(f"{intercept:.10g}")
        ds.PixelData = stored.tobytes()
        path = out_dir / names[k]
        ds.save_as(str(path), enforce_file_format=True)
        written[int(k)] = path
    return [written[k] for k in range(n)]


ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def write_enhanced_mr(image, out_path, *, kind: str = "t1", shuffle: bool = True, seed: int = 0,
                      series_number: int = 1, frame_types: list[str] | None = None) -> Path:
    """Write ``image`` as one multi-frame Enhanced MR Image file, as recent scanners export.

    The slices become frames (stored in shuffled order when ``shuffle``, which the standard allows;
    ``FrameContentSequence`` gives each its in-stack position). Geometry and rescale are in the
    functional groups only: orientation and pixel measures shared, position and rescale (uint16,
    varying) per frame. The sequence parameters are where the Enhanced MR IOD keeps them (MR
    timing, echo, modifier and frame-type groups; ``SpectrallySelectedSuppression``), not in the
    classic attributes, so that reading them is tested. ``frame_types`` (e.g. ``["WATER",
    "FAT"]``) writes the volume once per type into the same file, as some Dixon exports do.
    Array axes map to DICOM as in ``write_dicom_series``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image, lps, row_dir, col_dir = _slices_last(image, kind)
    spacing = image.spacing
    rng = np.random.default_rng(seed)
    n = image.shape[2]
    preset = dict(SEQUENCE_PRESETS[kind])
    types = list(frame_types or [])
    default_type = (preset.get("ImageType") or ["ORIGINAL", "PRIMARY", "M", "NONE"])[3]

    def item(**values) -> Dataset:
        d = Dataset()
        for key, value in values.items():
            setattr(d, key, value)
        return d

    frames = [(k, t) for t in (types or [default_type]) for k in range(n)]
    if shuffle:
        frames = [frames[i] for i in rng.permutation(len(frames))]
    data = np.asarray(image.array, dtype=np.float64)
    pixels, per_frame = [], []
    for k, ftype in frames:
        plane = data[:, :, k].T
        stored, slope, lo = _rescaled_uint16(plane, k, n)
        pixels.append(stored)
        position = lps[:3, 3] + k * lps[:3, 2]
        fg = item(
            PlanePositionSequence=Sequence([item(ImagePositionPatient=[float(f"{v:.6f}") for v in position])]),
            PixelValueTransformationSequence=Sequence([item(RescaleSlope=float(f"{slope:.10g}"),
                                                            RescaleIntercept=float(f"{lo:.10g}"),
                                                            RescaleType="US")]),
            FrameContentSequence=Sequence([item(StackID="1", InStackPositionNumber=int(k + 1))]))
        if types:
            fg.MRImageFrameTypeSequence = Sequence([item(FrameType=["DERIVED", "PRIMARY", "DIXON", ftype])])
        per_frame.append(fg)
    ti = preset.get("InversionTime")
    shared = item(
        PlaneOrientationSequence=Sequence([item(
            ImageOrientationPatient=[float(f"{v:.8f}") for v in (*row_dir, *col_dir)])]),
        PixelMeasuresSequence=Sequence([item(PixelSpacing=[float(spacing[1]), float(spacing[0])],
                                             SliceThickness=float(spacing[2]),
                                             SpacingBetweenSlices=float(spacing[2]))]),
        MRTimingAndRelatedParametersSequence=Sequence([item(
            RepetitionTime=float(preset["RepetitionTime"]),
            FlipAngle=90.0 if "SE" in preset["ScanningSequence"] else 15.0)]),
        MREchoSequence=Sequence([item(EffectiveEchoTime=float(preset["EchoTime"]))]),
        MRModifierSequence=Sequence([item(InversionRecovery="YES" if ti else "NO",
                                          **({"InversionTimes": [float(ti)]} if ti else {}))]))
    if not types:
        shared.MRImageFrameTypeSequence = Sequence([item(FrameType=list(
            preset.get("ImageType") or ["ORIGINAL", "PRIMARY", "M", "NONE"]))])
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = item(SOPClassUID=ENHANCED_MR_IMAGE_STORAGE, SOPInstanceUID=sop_uid, Modality="MR",
              PatientName=FAKE_PATIENT_NAME, PatientID=FAKE_PATIENT_ID, PatientBirthDate="19000101",
              PatientSex="O", InstitutionName=FAKE_INSTITUTION, AccessionNumber="FAKEACC0001",
              StudyDate="20000101", StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
              FrameOfReferenceUID=generate_uid(), SeriesNumber=series_number, InstanceNumber=1,
              SeriesDescription=preset["SeriesDescription"], MagneticFieldStrength=3.0,
              Manufacturer="FAKE", ImageType=["ORIGINAL", "PRIMARY", "M", "MIXED" if types else default_type],
              SpectrallySelectedSuppression="FAT" if "FS" in preset.get("ScanOptions", "") else "NONE",
              NumberOfFrames=len(frames), Rows=pixels[0].shape[0], Columns=pixels[0].shape[1],
              SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16,
              BitsStored=16, HighBit=15, PixelRepresentation=0,
              SharedFunctionalGroupsSequence=Sequence([shared]),
              PerFrameFunctionalGroupsSequence=Sequence(per_frame))
    ds.file_meta = meta
    ds.PixelData = np.stack(pixels).tobytes()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(out_path), enforce_file_format=True)
    return out_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("nifti", help="input NIfTI (3D)")
    ap.add_argument("out_dir", help="folder for the DICOM files")
    ap.add_argument("--kind", default="t1", choices=sorted(SEQUENCE_PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ordered", action="store_true", help="no shuffling / reversed numbering")
    ap.add_argument("--enhanced", action="store_true",
                    help="one multi-frame Enhanced MR file (out_dir/enhanced.dcm) instead of one file per slice")
    args = ap.parse_args(argv)
    if args.enhanced:
        path = write_enhanced_mr(args.nifti, Path(args.out_dir) / "enhanced.dcm", kind=args.kind,
                                 seed=args.seed, shuffle=not args.ordered)
        print(f"wrote {path}")
        return 0
    files = write_dicom_series(args.nifti, args.out_dir, kind=args.kind, seed=args.seed,
                               shuffle=not args.ordered, reverse_instance_numbers=not args.ordered)
    print(f"wrote {len(files)} DICOM files to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
