"""Write a NIfTI volume (e.g. a phantom's T1) as a DICOM MR series, with real-world header variety.

Used by the tests to exercise the DICOM reader the way PACS exports do: LPS patient coordinates,
slice files in shuffled order and InstanceNumber running against the slice position,
RescaleSlope/Intercept (varying per slice), optional tags missing, and an obviously fake patient
name/ID (``FAKE^SYNTHETIC`` / ``FAKE-ID-0000``) so privacy tests can check identifiers never reach
the outputs. Sequence parameters for each kind (TR/TE/TI, ScanOptions, description) follow
typical hip protocols so series classification can be tested.

    python data_scripts/nifti_to_dicom.py phantoms/sub-000/t1.nii.gz out_dicom/t1 --kind t1
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lps = LPS_TO_RAS @ image.affine
    spacing = image.spacing
    row_dir = lps[:3, 0] / spacing[0]
    col_dir = lps[:3, 1] / spacing[1]
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
            lo, hi = float(plane.min()), float(plane.max())
            slope = max((hi - lo) / 60000.0, 1e-6) * (1.0 + 0.1 * k / max(n, 1))
            stored = np.clip(np.rint((plane - lo) / slope), 0, 65535).astype(np.uint16)
            intercept = lo
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("nifti", help="input NIfTI (3D)")
    ap.add_argument("out_dir", help="folder for the DICOM files")
    ap.add_argument("--kind", default="t1", choices=sorted(SEQUENCE_PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ordered", action="store_true", help="no shuffling / reversed numbering")
    args = ap.parse_args(argv)
    files = write_dicom_series(args.nifti, args.out_dir, kind=args.kind, seed=args.seed,
                               shuffle=not args.ordered, reverse_instance_numbers=not args.ordered)
    print(f"wrote {len(files)} DICOM files to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
