"""DICOM reading: round trip through data_scripts/nifti_to_dicom.py (same world coordinates as the
NIfTI), awkward series rejected with one clear line, pydicom's own sample files, classification of
a written study, labels of a DICOM input overlay it, privacy of patient fields."""
import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from data_scripts.nifti_to_dicom import FAKE_INSTITUTION, FAKE_PATIENT_ID, FAKE_PATIENT_NAME, write_dicom_series
from pipeline.image import Image, ImageError, load_nifti, save_nifti
from pipeline.io import LPS_TO_RAS, choose_series, find_series, hash_input, load_series


def _volume(shape=(20, 24, 6), oblique=True, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.uniform(0, 1000, shape).astype(np.float32)
    rot = Rotation.from_euler("xyz", [8, -15, 25], degrees=True).as_matrix() if oblique else np.eye(3)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 0.9, 4.0])
    aff[:3, 3] = [10.0, -50.0, 20.0]
    return Image(arr, aff, "t1")


@pytest.mark.parametrize("flip", [False, True])
def test_round_trip_same_world_coordinates(tmp_path, flip):
    img = _volume()
    if flip:  # a LPS-stored / reversed-slice NIfTI: the DICOM must still land on the same world points
        img = Image(img.array[::-1, :, ::-1].copy(), img.affine @ np.array(
            [[-1, 0, 0, 19], [0, 1, 0, 0], [0, 0, -1, 5], [0, 0, 0, 1]], float), "t1")
    save_nifti(img, tmp_path / "t1.nii.gz")
    nii = load_nifti(tmp_path / "t1.nii.gz", "t1")
    files = write_dicom_series(nii, tmp_path / "dcm", kind="t1", shuffle=True, reverse_instance_numbers=True)
    back = load_series(tmp_path / "dcm", "t1")
    # the reader sorts by position, so its slice order may be reversed w.r.t. the NIfTI: compare
    # world coordinates of all voxel centres and the intensity found there
    corners = np.array([[0, 0, 0], [19, 0, 0], [0, 23, 0], [0, 0, 5], [19, 23, 5]], float)
    world = nii.voxel_to_world(corners)
    ijk = np.rint(back.world_to_voxel(world)).astype(int)
    np.testing.assert_allclose(back.voxel_to_world(ijk), world, atol=1e-3)
    for (i, j, k), (a, b, c) in zip(ijk, corners.astype(int)):
        assert abs(back.array[i, j, k] - nii.array[a, b, c]) < 0.05   # rescale slope quantisation
    # stored as LPS: the first file's ImagePositionPatient is the RAS corner with x, y negated
    import pydicom

    ds = pydicom.dcmread(str(files[0]))
    np.testing.assert_allclose((LPS_TO_RAS @ nii.affine)[:3, 3], np.asarray(ds.ImagePositionPatient, float), atol=1e-4)
    assert back.meta["format"] == "dicom"
    assert back.meta["sequence"]["SeriesDescription"] == "T1 TSE AX"


@pytest.mark.parametrize("perm", [(2, 0, 1), (1, 2, 0)])
def test_slices_stored_first_or_in_the_middle_become_the_dicom_slices(tmp_path, perm):
    """A NIfTI stored slices-first (S, R, A, as some phantoms are) is written as an axial series
    of its 6 slices with the in-plane pixel spacing, not as 20 thin 'coronal' files."""
    img = _volume(oblique=False)
    stored = Image(np.transpose(img.array, perm).copy(), img.affine.copy(), "t1")
    stored.affine[:3, :3] = img.affine[:3, list(perm)]
    files = write_dicom_series(stored, tmp_path / "s", shuffle=True)
    assert len(files) == 6
    (info,) = find_series(tmp_path / "s")
    assert info.orientation == "axial"
    import pydicom

    ds = pydicom.dcmread(str(files[0]))
    assert float(ds.SliceThickness) == pytest.approx(4.0)
    assert sorted(float(v) for v in ds.PixelSpacing) == pytest.approx([0.8, 0.9])
    back = load_series(tmp_path / "s", "t1")
    # every voxel read back lies on a voxel centre of the original with the same intensity
    ijk = np.argwhere(np.ones(back.shape, bool)).astype(float)
    src = img.world_to_voxel(back.voxel_to_world(ijk))
    np.testing.assert_allclose(src, np.rint(src), atol=1e-3)
    i, j, k = np.rint(src).astype(int).T
    np.testing.assert_allclose(back.array.ravel(), img.array[i, j, k], atol=0.05)


def test_slice_order_comes_from_positions_not_instance_numbers(tmp_path):
    img = _volume(oblique=False)
    write_dicom_series(img, tmp_path / "a", shuffle=True, reverse_instance_numbers=True, seed=3)
    back = load_series(tmp_path / "a", "t1")
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-4)
    np.testing.assert_allclose(back.array, img.array, atol=0.05)


def test_several_series_need_a_choice(tmp_path):
    img = _volume(oblique=False)
    write_dicom_series(img, tmp_path / "study" / "s1", kind="t1", series_number=1)
    write_dicom_series(img, tmp_path / "study" / "s2", kind="stir", series_number=2)
    with pytest.raises(ImageError, match="holds 2 series, choose one"):
        load_series(tmp_path / "study", "t1")
    infos = find_series(tmp_path / "study")
    assert [s.params["SeriesDescription"] for s in infos] == ["T1 TSE AX", "AX TIRM"]
    img_t1 = load_series(infos[0], "t1")
    assert img_t1.shape == img.shape


def test_study_classification(tmp_path):
    img = _volume((12, 12, 4), oblique=False)
    for n, kind in enumerate(["t1", "t2fs", "dixon_fat", "dixon_water"], start=1):
        write_dicom_series(img, tmp_path / "study" / kind, kind=kind, series_number=n)
    chosen, lines = choose_series(find_series(tmp_path / "study"))
    assert {r: s.params["SeriesDescription"] for r, s in chosen.items()} == {
        "t1": "T1 TSE AX", "fluid": "T2 TSE FS AX", "dixon_fat": "DIXON AX F", "dixon_water": "DIXON AX W"}
    assert chosen["fluid"].params["_kind"] == "t2fs"


def _rewrite(files, **changes):
    import pydicom

    for f in files:
        ds = pydicom.dcmread(str(f))
        for k, fn in changes.items():
            setattr(ds, k, fn(ds))
        ds.save_as(str(f))


def test_missing_slice_gives_inconsistent_spacing(tmp_path):
    files = write_dicom_series(_volume(oblique=False), tmp_path / "gap", shuffle=False)
    files[2].unlink()
    with pytest.raises(ImageError, match="inconsistent slice spacing"):
        load_series(tmp_path / "gap", "t1")


def test_gantry_tilt_rejected(tmp_path):
    img = _volume(oblique=False)
    lps = LPS_TO_RAS @ img.affine
    tilted = np.array([lps[:3, 3] + k * (lps[:3, 2] + [0, 0.7, 0]) for k in range(img.shape[2])])
    write_dicom_series(img, tmp_path / "tilt", slice_positions=tilted)
    with pytest.raises(ImageError, match="gantry tilt"):
        load_series(tmp_path / "tilt", "t1")


def test_two_volumes_at_same_positions_rejected(tmp_path):
    img = _volume(oblique=False)
    uid = "1.2.3.4.5.6.7.8.9"
    write_dicom_series(img, tmp_path / "echo", series_uid=uid, seed=1)
    write_dicom_series(img, tmp_path / "echo" / "e2", series_uid=uid, seed=2)
    with pytest.raises(ImageError, match="distinct positions"):
        load_series(tmp_path / "echo", "t1")


def test_mixed_orientations_rejected(tmp_path):
    files = write_dicom_series(_volume(oblique=False), tmp_path / "mix", shuffle=False)
    _rewrite(files[:1], ImageOrientationPatient=lambda ds: [1, 0, 0, 0, 0, -1])
    with pytest.raises(ImageError, match="different orientations"):
        load_series(tmp_path / "mix", "t1")


def test_missing_position_tag_rejected(tmp_path):
    files = write_dicom_series(_volume(oblique=False), tmp_path / "nopos", shuffle=False)
    import pydicom

    ds = pydicom.dcmread(str(files[1]))
    del ds.PixelSpacing
    ds.save_as(str(files[1]))
    with pytest.raises(ImageError, match="lack PixelSpacing"):
        load_series(tmp_path / "nopos", "t1")


def test_truncated_dicom_file(tmp_path):
    files = write_dicom_series(_volume(oblique=False), tmp_path / "trunc", shuffle=False)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) - 300])
    with pytest.raises(ImageError) as info:
        load_series(tmp_path / "trunc", "t1")
    assert "\n" not in str(info.value)


def test_pydicom_sample_single_slice(tmp_path):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small.dcm")
    with pytest.raises(ImageError, match="single slice"):
        load_series(path, "t1")
    folder = tmp_path / "two"
    folder.mkdir()
    import shutil

    shutil.copy(path, folder / "a.dcm")
    shutil.copy(get_testdata_file("MR_small_RLE.dcm"), folder / "b.dcm")   # the same slice, RLE coded
    with pytest.raises(ImageError, match="distinct positions"):
        load_series(folder, "t1")
    assert find_series(folder)[0].n_slices == 2


def test_no_dicom_in_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ImageError, match="no DICOM image files"):
        load_series(tmp_path, "t1")


def test_hash_of_series_follows_its_files(tmp_path):
    write_dicom_series(_volume(oblique=False), tmp_path / "h")
    infos = find_series(tmp_path / "h")
    assert hash_input(infos[0]) == hash_input(infos[0])
    assert len(hash_input(tmp_path / "h")) == 64


def test_dicom_input_labels_overlay_and_privacy(tmp_path):
    """Label output of a DICOM input is on the DICOM grid and matches the NIfTI truth point for
    point; no fake patient identifier reaches any output file unless asked for."""
    from synthetic_subject import make_images, make_labels

    from pipeline.api import run_subject

    lab = make_labels()
    img = make_images(lab)["t1"]
    save_nifti(lab, tmp_path / "truth_labels.nii.gz", dtype=np.uint8)
    write_dicom_series(img, tmp_path / "study" / "t1", kind="t1", series_number=1)
    write_dicom_series(make_images(lab)["fluid"], tmp_path / "study" / "stir", kind="stir", series_number=2)
    chosen, _ = choose_series(find_series(tmp_path / "study"))
    out = tmp_path / "out"
    rec = run_subject({**chosen, "fluid_kind": "stir"}, out, labels_override=tmp_path / "truth_labels.nii.gz")
    t1_dicom = load_series(chosen["t1"], "t1")
    written = load_nifti(out / "labels.nii.gz", "labels")
    np.testing.assert_allclose(written.affine, t1_dicom.affine, atol=1e-5)
    assert written.shape == t1_dicom.shape
    np.testing.assert_array_equal(written.array, lab.array)   # same world grid, voxel for voxel
    assert rec["provenance"]["inputs"]["t1"]["format"] == "dicom"
    assert rec["provenance"]["inputs"]["fluid"]["sequence"]["InversionTime"] == 160.0
    secrets = [FAKE_PATIENT_NAME, FAKE_PATIENT_ID, FAKE_INSTITUTION, "FAKE^", "19000101", "FAKEACC"]
    for f in out.rglob("*"):
        blob = f.read_bytes()
        for s in secrets:
            assert s.encode() not in blob, f"{s} leaked into {f.name}"
    # the check can fail: with include_identifiers the fields are there
    rec2 = run_subject({**chosen, "fluid_kind": "stir"}, tmp_path / "out2", write_dicom_seg=True,
                       labels_override=tmp_path / "truth_labels.nii.gz", include_identifiers=True)
    text = (tmp_path / "out2" / "measurements.json").read_text()
    assert FAKE_PATIENT_NAME in text and FAKE_PATIENT_ID in json.dumps(rec2)
    # DICOM SEG: references the T1 slices and gives back the label map exactly
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(str(tmp_path / "out2" / "labels.seg.dcm"))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in t1_dicom.meta["dicom_files"]]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True)
    np.testing.assert_array_equal(np.transpose(frames, (2, 1, 0)), lab.array)


def test_fluid_kind_of_a_dicom_folder_comes_from_its_headers(tmp_path):
    from pipeline.api import normalise_inputs

    img = _volume((12, 12, 4), oblique=False)
    write_dicom_series(img, tmp_path / "series_a", kind="stir")
    write_dicom_series(img, tmp_path / "series_b", kind="t2fs")
    assert normalise_inputs({"fluid": tmp_path / "series_a"})["fluid_kind"] == "stir"
    assert normalise_inputs({"fluid": tmp_path / "series_b"})["fluid_kind"] == "t2fs"
    assert normalise_inputs({"fluid": tmp_path / "x_STIR.nii.gz"})["fluid_kind"] == "stir"


# ---- multi-frame (enhanced) DICOM --------------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
def test_enhanced_multiframe_file_lands_on_the_same_world_points(tmp_path, flip):
    """One Enhanced MR file (frames shuffled, geometry and rescale only in the functional groups)
    reads back to the NIfTI's voxels at the NIfTI's world coordinates, stored RAS or flipped."""
    from data_scripts.nifti_to_dicom import write_enhanced_mr

    img = _volume()
    if flip:
        img = Image(img.array[::-1, :, ::-1].copy(), img.affine @ np.array(
            [[-1, 0, 0, 19], [0, 1, 0, 0], [0, 0, -1, 5], [0, 0, 0, 1]], float), "t1")
    path = write_enhanced_mr(img, tmp_path / "mf" / "t1.dcm", kind="t1", shuffle=True, seed=4)
    back = load_series(path, "t1")
    ijk = np.argwhere(np.ones(back.shape, bool)).astype(float)
    src = img.world_to_voxel(back.voxel_to_world(ijk))
    np.testing.assert_allclose(src, np.rint(src), atol=1e-3)
    i, j, k = np.rint(src).astype(int).T
    np.testing.assert_allclose(back.array.ravel(), img.array[i, j, k], atol=0.05)
    assert back.meta["multiframe"] and sorted(back.meta["dicom_frames"]) == list(range(1, 7))
    assert back.meta["sequence"]["RepetitionTime"] == 550.0       # from the MR timing group
    (info,) = find_series(tmp_path / "mf")
    assert info.n_slices == 6 and "6 slices" in info.summary()


@pytest.mark.parametrize("kind", ["t1", "t2fs", "stir", "dixon_fat", "dixon_water"])
def test_enhanced_series_classified_from_its_functional_groups(tmp_path, kind):
    """With an uninformative description, the kind comes from what the Enhanced MR IOD keeps in
    functional groups: inversion recovery and TI, fat suppression, TR / TE, the frame type."""
    import pydicom

    from data_scripts.nifti_to_dicom import write_enhanced_mr

    path = write_enhanced_mr(_volume((12, 12, 4), oblique=False), tmp_path / "s" / "x.dcm", kind=kind)
    ds = pydicom.dcmread(str(path))
    ds.SeriesDescription = "series 3"
    if kind.startswith("dixon"):        # the kind is then only in the frame type
        ds.ImageType = ["DERIVED", "PRIMARY", "DIXON", "MIXED"]
    ds.save_as(str(path))
    (info,) = find_series(tmp_path / "s")
    from pipeline.io import classify_series

    assert classify_series(info) == kind


def test_legacy_converted_enhanced_reads_like_its_classic_series(tmp_path):
    """highdicom's legacy converter (classic slices -> one Legacy Converted Enhanced MR file; an
    independent writer) gives the same voxels and affine as the classic series it came from."""
    import highdicom as hd
    import pydicom

    files = write_dicom_series(_volume(), tmp_path / "classic", kind="stir", shuffle=True)
    classic = load_series(tmp_path / "classic", "stir")
    converted = hd.legacy.LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(str(f)) for f in files], series_instance_uid=hd.UID(), series_number=7,
        sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "mf").mkdir()
    converted.save_as(str(tmp_path / "mf" / "stir.dcm"))
    back = load_series(tmp_path / "mf", "stir")
    np.testing.assert_allclose(back.affine, classic.affine, atol=1e-4)
    np.testing.assert_allclose(back.array, classic.array, atol=1e-3)
    assert back.meta["sequence"]["InversionTime"] == 160.0      # kept among the converted attributes
    (info,) = find_series(tmp_path / "mf")
    from pipeline.io import classify_series

    assert classify_series(info) == "stir"


def test_multiframe_with_several_frame_types_at_each_position_rejected_naming_them(tmp_path):
    from data_scripts.nifti_to_dicom import write_enhanced_mr

    path = write_enhanced_mr(_volume((12, 12, 4), oblique=False), tmp_path / "dix.dcm", kind="dixon_water",
                             frame_types=["WATER", "FAT"])
    with pytest.raises(ImageError, match=r"8 slices at only 4 distinct positions.*FAT.*WATER"):
        load_series(path, "dixon_water")


def test_enhanced_dicom_input_labels_overlay_and_dicom_seg(tmp_path):
    """A study of Enhanced MR files goes end to end: its label map lies on the T1's grid voxel
    for voxel, and the DICOM SEG refers each of its frames to the right source frame."""
    import highdicom as hd
    import pydicom
    from synthetic_subject import make_images, make_labels

    from data_scripts.nifti_to_dicom import write_enhanced_mr
    from pipeline.api import run_subject

    lab = make_labels()
    images = make_images(lab)
    save_nifti(lab, tmp_path / "truth_labels.nii.gz", dtype=np.uint8)
    write_enhanced_mr(images["t1"], tmp_path / "study" / "t1.dcm", kind="t1", series_number=1, seed=1)
    write_enhanced_mr(images["fluid"], tmp_path / "study" / "stir.dcm", kind="stir", series_number=2, seed=2)
    chosen, _ = choose_series(find_series(tmp_path / "study"))
    assert set(chosen) == {"t1", "fluid"} and chosen["fluid"].params["_kind"] == "stir"
    out = tmp_path / "out"
    run_subject({**chosen, "fluid_kind": "stir"}, out, write_dicom_seg=True,
                labels_override=tmp_path / "truth_labels.nii.gz")
    t1 = load_series(chosen["t1"], "t1")
    written = load_nifti(out / "labels.nii.gz", "labels")
    np.testing.assert_allclose(written.affine, t1.affine, atol=1e-5)
    np.testing.assert_array_equal(written.array, lab.array)
    assert (out / "labels.seg.dcm").exists()


@pytest.mark.parametrize("enhanced", [False, True])
def test_dicom_seg_frames_refer_to_the_source_slices_they_were_drawn_on(tmp_path, enhanced):
    """Every slice of a label map that differs from slice to slice comes back from the DICOM SEG
    through the source frame (multi-frame) or file (classic) at its position."""
    import highdicom as hd
    import pydicom

    from data_scripts.nifti_to_dicom import write_enhanced_mr
    from pipeline.report import write_dicom_seg

    img = _volume((16, 12, 6))
    if enhanced:
        source = load_series(write_enhanced_mr(img, tmp_path / "t1.dcm", kind="t1", seed=3), "t1")
        assert source.meta["dicom_frames"] != sorted(source.meta["dicom_frames"])   # frames shuffled
    else:
        write_dicom_series(img, tmp_path / "t1", kind="t1", shuffle=True, seed=3)
        source = load_series(tmp_path / "t1", "t1")
    labels = np.zeros(source.shape, np.uint8)
    for k in range(source.shape[2]):
        labels[k:k + 3, 2:5 + k, k] = 1 + k % 4     # a different shape and value on every slice
    write_dicom_seg(tmp_path / "seg.dcm", Image(labels, source.affine, "labels"), source)
    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    if enhanced:
        uid = pydicom.dcmread(source.meta["dicom_files"][0], stop_before_pixels=True).SOPInstanceUID
        planes = seg.get_pixels_by_source_frame(source_sop_instance_uid=uid,
                                                source_frame_numbers=source.meta["dicom_frames"],
                                                combine_segments=True, skip_overlap_checks=True)
    else:
        uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in source.meta["dicom_files"]]
        planes = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                                   skip_overlap_checks=True)
    np.testing.assert_array_equal(np.transpose(planes, (2, 1, 0)), labels)


def test_multiframe_without_frame_positions_rejected(tmp_path):
    import pydicom

    from data_scripts.nifti_to_dicom import write_enhanced_mr

    path = write_enhanced_mr(_volume((12, 12, 4), oblique=False), tmp_path / "mf.dcm", kind="t1")
    ds = pydicom.dcmread(str(path))
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
    ds.save_as(str(path))
    with pytest.raises(ImageError, match="4 frame\\(s\\) lack ImagePositionPatient"):
        load_series(path, "t1")
