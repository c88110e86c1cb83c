"""pipeline.io: NIfTI loading, bad inputs (one clear line each), hashing, grid overlap, series
classification."""
import json
import gzip

import nibabel as nib
import numpy as np
import pytest

from pipeline.image import Image, ImageError
from pipeline.io import (SeriesInfo, check_overlap, choose_series, classify_series, hash_input,
                         load_series)


def _nii(path, data, affine=None):
    affine = np.diag([0.8, 0.8, 4.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    return _nii(tmp_path / "t1.nii.gz", rng.uniform(0, 100, (16, 16, 6)).astype(np.float32))


def _one_line_error(fn, *match):
    with pytest.raises(ImageError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


def test_loads_nifti_with_kind_and_world_affine(good):
    img = load_series(good, "t1")
    assert img.kind == "t1" and img.shape == (16, 16, 6)
    np.testing.assert_allclose(img.spacing, [0.8, 0.8, 4.0])


def test_missing_file(tmp_path):
    _one_line_error(lambda: load_series(tmp_path / "nope.nii.gz", "t1"), "file not found")


def test_truncated_gzip(tmp_path, good):
    data = good.read_bytes()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    _one_line_error(lambda: load_series(bad, "t1"), "trunc.nii.gz")


def test_corrupt_header(tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"this is not a nifti header" * 20)
    _one_line_error(lambda: load_series(bad, "t1"), "cannot read NIfTI")


def test_not_an_image_file(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    _one_line_error(lambda: load_series(bad, "t1"), "neither NIfTI")


def test_2d_image(tmp_path):
    p = _nii(tmp_path / "flat.nii.gz", np.ones((16, 16), np.float32))
    _one_line_error(lambda: load_series(p, "t1"), "3D")


def test_single_slice_volume(tmp_path):
    p = _nii(tmp_path / "one.nii.gz", np.random.default_rng(1).uniform(size=(16, 16, 1)).astype(np.float32))
    _one_line_error(lambda: load_series(p, "t1"), "2D")


def test_4d_multi_volume(tmp_path):
    p = _nii(tmp_path / "dwi.nii.gz", np.random.default_rng(2).uniform(size=(8, 8, 4, 3)).astype(np.float32))
    _one_line_error(lambda: load_series(p, "t1"), "3D", "(8, 8, 4, 3)")


def test_4d_single_volume_is_accepted(tmp_path):
    p = _nii(tmp_path / "one_vol.nii.gz", np.random.default_rng(3).uniform(size=(8, 8, 4, 1)).astype(np.float32))
    assert load_series(p, "t1").shape == (8, 8, 4)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_inf(tmp_path, bad_value):
    data = np.random.default_rng(4).uniform(size=(8, 8, 4)).astype(np.float32)
    data[2, 3, 1] = bad_value
    p = _nii(tmp_path / "nan.nii.gz", data)
    _one_line_error(lambda: load_series(p, "t1"), "NaN or Inf")


def test_empty_constant(tmp_path):
    p = _nii(tmp_path / "zeros.nii.gz", np.zeros((8, 8, 4), np.float32))
    _one_line_error(lambda: load_series(p, "t1"), "empty")


def test_memory_guard_checked_from_header(tmp_path, good):
    msg = _one_line_error(lambda: load_series(good, "t1", max_voxels=1000), "memory guard")
    assert "1536" in msg  # 16 * 16 * 6 voxels


def test_labels_are_not_intensity_validated(tmp_path):
    p = _nii(tmp_path / "lab.nii.gz", np.zeros((8, 8, 4), np.uint8))
    assert load_series(p, "labels").array.max() == 0


def _with_codes(path, data, sform, sform_code, qform, qform_code):
    img = nib.Nifti1Image(np.asarray(data), sform)
    img.set_sform(sform, code=sform_code)
    img.set_qform(qform, code=qform_code)
    nib.save(img, str(path))
    return path


def test_header_without_orientation_is_refused(tmp_path):
    """Both codes 0: nibabel would make up an orientation, so left and right would be a guess."""
    data = np.random.default_rng(5).uniform(size=(8, 8, 4)).astype(np.float32)
    aff = np.diag([-0.8, 0.8, 4.0, 1.0])
    p = _with_codes(tmp_path / "analyze_like.nii.gz", data, aff, 0, aff, 0)
    _one_line_error(lambda: load_series(p, "t1"), "no orientation", "left and right")
    _one_line_error(lambda: load_series(p, "labels"), "no orientation")


def test_qform_only_header_is_used(tmp_path):
    data = np.random.default_rng(6).uniform(size=(8, 8, 4)).astype(np.float32)
    q = np.diag([-0.8, -0.8, 4.0, 1.0])  # LPS storage
    q[:3, 3] = [10.0, 20.0, -30.0]
    p = _with_codes(tmp_path / "qonly.nii.gz", data, np.eye(4), 0, q, 1)
    img = load_series(p, "t1")
    np.testing.assert_allclose(img.affine, q, atol=1e-5)
    assert "warnings" not in img.meta


def test_sform_and_qform_flipped_against_each_other_are_refused(tmp_path):
    data = np.random.default_rng(7).uniform(size=(8, 8, 4)).astype(np.float32)
    s = np.diag([0.8, 0.8, 4.0, 1.0])
    q = np.diag([-0.8, 0.8, 4.0, 1.0])  # x flipped: the other side
    p = _with_codes(tmp_path / "flip.nii.gz", data, s, 1, q, 1)
    _one_line_error(lambda: load_series(p, "t1"), "contradict", "which side")


def test_sform_and_qform_apart_give_a_warning_and_the_sform(tmp_path):
    data = np.random.default_rng(8).uniform(size=(8, 8, 4)).astype(np.float32)
    s = np.diag([0.8, 0.8, 4.0, 1.0])
    q = s.copy()
    q[:3, 3] = [0.0, 3.0, 0.0]
    p = _with_codes(tmp_path / "apart.nii.gz", data, s, 1, q, 1)
    img = load_series(p, "t1")
    np.testing.assert_allclose(img.affine, s, atol=1e-6)
    assert len(img.meta["warnings"]) == 1 and "3.0 mm" in img.meta["warnings"][0]
    q[:3, 3] = [0.0, 0.3, 0.0]  # within rounding: silent
    p = _with_codes(tmp_path / "close.nii.gz", data, s, 1, q, 1)
    assert "warnings" not in load_series(p, "t1").meta


def test_grid_overlap():
    a = Image(np.ones((10, 10, 10), np.float32), np.eye(4))
    inside = Image(np.ones((4, 4, 4), np.float32), np.eye(4))       # small FOV inside a large one
    assert check_overlap(a, inside, "fluid") is None
    far = np.eye(4)
    far[:3, 3] = [500, 0, 0]
    with pytest.raises(ImageError, match="does not overlap"):
        check_overlap(a, Image(np.ones((10, 10, 10), np.float32), far), "fluid")
    half = np.eye(4)
    half[:3, 3] = [5, 0, 0]
    assert "overlaps" in check_overlap(a, Image(np.ones((10, 10, 10), np.float32), half), "fluid")


def test_hash_input_file_and_folder(tmp_path, good):
    h1 = hash_input(good)
    assert h1 == hash_input(good) and len(h1) == 64
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "a").write_bytes(b"1")
    (folder / "b").write_bytes(b"2")
    h_dir = hash_input(folder)
    (folder / "b").write_bytes(b"3")
    assert hash_input(folder) != h_dir
    with pytest.raises(ImageError, match="file not found"):
        hash_input(tmp_path / "missing")


@pytest.mark.parametrize("params, expected", [
    ({"SeriesDescription": "T1 TSE AX", "RepetitionTime": 550, "EchoTime": 12}, "t1"),
    ({"SeriesDescription": "ax pelvis", "ScanningSequence": "SE", "RepetitionTime": 600, "EchoTime": 10}, "t1"),
    ({"SeriesDescription": "T2 TSE FS AX", "ScanOptions": "FS", "RepetitionTime": 4000, "EchoTime": 80}, "t2fs"),
    ({"SeriesDescription": "AX PD SPAIR", "RepetitionTime": 3000, "EchoTime": 35}, "t2fs"),
    ({"SeriesDescription": "ax t2 fatsat", "RepetitionTime": 3500, "EchoTime": 70}, "t2fs"),
    ({"SeriesDescription": "AX TIRM", "ScanningSequence": ["SE", "IR"], "InversionTime": 160}, "stir"),
    ({"SeriesDescription": "cor inversion", "ScanningSequence": ["SE", "IR"], "InversionTime": 220,
      "RepetitionTime": 5000, "EchoTime": 40}, "stir"),
    ({"SeriesDescription": "T2 FLAIR", "ScanningSequence": ["SE", "IR"], "InversionTime": 2500}, None),
    ({"SeriesDescription": "DIXON AX", "ImageType": ["DERIVED", "PRIMARY", "DIXON", "FAT"]}, "dixon_fat"),
    ({"SeriesDescription": "DIXON AX", "ImageType": ["DERIVED", "PRIMARY", "DIXON", "WATER"]}, "dixon_water"),
    ({"SeriesDescription": "mDIXON W", "RepetitionTime": 6, "EchoTime": 2}, "dixon_water"),
    ({"SeriesDescription": "DIXON in-phase", "ImageType": ["ORIGINAL", "PRIMARY", "DIXON", "IN_PHASE"]}, None),
    ({"SeriesDescription": "T1 FS post gad", "ScanOptions": "FS", "RepetitionTime": 500, "EchoTime": 10}, None),
    ({"SeriesDescription": "T2 TSE AX", "RepetitionTime": 4000, "EchoTime": 90}, None),
    ({"SeriesDescription": "localizer", "RepetitionTime": 8, "EchoTime": 4}, None),
    ({"SeriesDescription": "DWI b800"}, None),
    # protocol names as scanners write them, "_" between the words
    ({"SeriesDescription": "t2_tse_fs_tra", "RepetitionTime": 4000, "EchoTime": 70}, "t2fs"),
    ({"SeriesDescription": "T2W_SPAIR", "RepetitionTime": 3000, "EchoTime": 60}, "t2fs"),
    ({"SeriesDescription": "PDW_SPAIR_COR", "RepetitionTime": 3000, "EchoTime": 30}, "t2fs"),
    ({"SeriesDescription": "ax_t1_tse", "RepetitionTime": 4000, "EchoTime": 70}, "t1"),
    ({"SeriesDescription": "t1_tse_fs_tra", "RepetitionTime": 600, "EchoTime": 10}, None),
    ({"SeriesDescription": "t1_vibe_dixon_W_tra"}, "dixon_water"),
    ({"SeriesDescription": "t1_vibe_dix_tra_F"}, "dixon_fat"),
    ({"SeriesDescription": "t1_vibe_dixon_tra_opp"}, None),
    ({"SeriesDescription": "ax_gre_fs", "RepetitionTime": 4000, "EchoTime": 70}, None),
])
def test_classify_series(params, expected):
    assert classify_series(params) == expected


def test_choose_series_prefers_axial_and_honours_overrides():
    t1_ax = SeriesInfo("1.1", [], {"SeriesDescription": "T1 AX"}, 30, "axial", 2)
    t1_cor = SeriesInfo("1.2", [], {"SeriesDescription": "T1 COR"}, 40, "coronal", 1)
    stir = SeriesInfo("1.3", [], {"SeriesDescription": "STIR AX"}, 30, "axial", 3)
    chosen, lines = choose_series([t1_cor, t1_ax, stir])
    assert chosen["t1"].uid == "1.1" and chosen["fluid"].uid == "1.3"
    assert chosen["fluid"].params["_kind"] == "stir"
    assert any(line.startswith("t1:") and "1 other candidate" in line for line in lines)
    chosen, lines = choose_series([t1_cor, t1_ax, stir], {"t1": "1.2"})
    assert chosen["t1"].uid == "1.2" and any("chosen by the user" in line for line in lines)
    with pytest.raises(ImageError, match="no such series"):
        choose_series([t1_ax], {"t1": "9.9"})


# ---- JSON sidecars of converted NIfTI (dcm2niix / BIDS) ----------------------------------------
def _sidecar_subject(tmp_path, name: str, sidecar: dict | str):
    from pipeline.image import Image, save_nifti

    arr = np.random.default_rng(0).uniform(10, 100, (8, 8, 4)).astype(np.float32)
    path = tmp_path / f"{name}.nii.gz"
    save_nifti(Image(arr, np.diag([1.0, 1.0, 4.0, 1.0]), "t1"), path)
    (tmp_path / f"{name}.json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return path


def test_sidecar_sequence_parameters_in_ms_without_identifiers(tmp_path):
    from pipeline.io import load_series, read_sidecar

    path = _sidecar_subject(tmp_path, "sub01_acq-ax_run-1", {
        "ProtocolName": "AX STIR", "ScanningSequence": "SE\\IR", "RepetitionTime": 5.0, "EchoTime": 0.04,
        "InversionTime": 0.16, "MagneticFieldStrength": 3, "ImageType": ["ORIGINAL", "PRIMARY", "M"],
        "PatientName": "FAKE^SYNTHETIC", "InstitutionName": "FAKE INSTITUTION", "AcquisitionTime": "10:00:00"})
    params = read_sidecar(path)
    assert params == {"SeriesDescription": "AX STIR", "ScanningSequence": "SE\\IR", "RepetitionTime": 5000.0,
                      "EchoTime": 40.0, "InversionTime": 160.0, "MagneticFieldStrength": 3,
                      "ImageType": ["ORIGINAL", "PRIMARY", "M"]}
    img = load_series(path, "stir")
    assert img.meta["sequence"] == params and img.meta["sequence_source"] == "sidecar sub01_acq-ax_run-1.json"
    # a sidecar that already gives ms is read as ms; one that is not a JSON object is ignored
    ms = _sidecar_subject(tmp_path, "ms", {"RepetitionTime": 550, "EchoTime": 12})
    assert read_sidecar(ms) == {"RepetitionTime": 550.0, "EchoTime": 12.0}
    assert read_sidecar(_sidecar_subject(tmp_path, "junk", "[1, 2]")) == {}
    assert read_sidecar(_sidecar_subject(tmp_path, "broken", "{not json")) == {}


def test_fluid_kind_from_a_sidecar_or_a_multiframe_dicom_file(tmp_path):
    from data_scripts.nifti_to_dicom import write_enhanced_mr
    from pipeline.api import normalise_inputs
    from pipeline.image import Image

    stir = _sidecar_subject(tmp_path, "series_7", {"SeriesDescription": "AX TIRM", "ScanningSequence": "SE\\IR",
                                                   "InversionTime": 0.16, "RepetitionTime": 5.0, "EchoTime": 0.04})
    t2fs = _sidecar_subject(tmp_path, "series_8", {"SeriesDescription": "T2 TSE FS AX", "ScanOptions": "FS",
                                                   "RepetitionTime": 4.2, "EchoTime": 0.075})
    assert normalise_inputs({"fluid": stir})["fluid_kind"] == "stir"
    assert normalise_inputs({"fluid": t2fs})["fluid_kind"] == "t2fs"
    dcm = write_enhanced_mr(Image(np.ones((6, 6, 3), np.float32), np.diag([1.0, 1.0, 4.0, 1.0]), "stir"),
                            tmp_path / "mf" / "series.dcm", kind="stir")
    assert normalise_inputs({"fluid": dcm})["fluid_kind"] == "stir"
