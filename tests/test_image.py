"""The world-aware image model: affines, reorientation round trips, resampling, I/O, validation."""
import numpy as np
import nibabel as nib
import pytest

from pipeline.image import (
    Image, ImageError, load_nifti, overlap_fraction, reorient_to_ras, resample_like,
    resample_to_grid, save_nifti, undo_reorient, validate_intensity_image,
)


def _oblique_affine(angle_deg=7.0):
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 0.8, 4.0])
    aff[:3, 3] = [-50, -40, -30]
    return aff


STORAGE = {
    "ras": np.diag([0.7, 0.7, 3.0, 1.0]),
    "lps": np.diag([-0.7, -0.7, 3.0, 1.0]),
    "slice_first": np.array([[0, 0.9, 0, 1], [0, 0, -0.9, 2], [5.0, 0, 0, 3], [0, 0, 0, 1]]),
    "oblique": _oblique_affine(),
}


@pytest.mark.parametrize("name", list(STORAGE))
def test_reorient_round_trip_is_exact(name):
    rng = np.random.default_rng(1)
    img = Image(rng.random((6, 7, 8)).astype(np.float32), STORAGE[name])
    ras, ornt = reorient_to_ras(img)
    # every voxel keeps its world position
    ijk = np.array([[1, 2, 3], [5, 6, 7]])
    for p in ijk:
        w = img.voxel_to_world(p[None])
        q = np.rint(ras.world_to_voxel(w)[0]).astype(int)
        assert ras.array[tuple(q)] == img.array[tuple(p)]
    assert np.array_equal(undo_reorient(ras.array, ornt), img.array)
    # axes now point (closest to) R, A, S
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")


def test_slice_axis_follows_world_superior():
    img = Image(np.zeros((4, 5, 6), np.float32), STORAGE["slice_first"])
    assert img.slice_axis() == 0
    assert Image(np.zeros((4, 5, 6), np.float32), STORAGE["lps"]).slice_axis() == 2


def test_resample_identity_and_world_shift():
    img = Image(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), np.eye(4))
    same = resample_like(img, img, order=1)
    np.testing.assert_allclose(same.array, img.array)
    shifted_aff = np.eye(4)
    shifted_aff[0, 3] = 1.0  # target voxel i sits at world x = i + 1 -> source voxel i + 1
    out = resample_to_grid(img, (3, 5, 6), shifted_aff, order=0)
    np.testing.assert_array_equal(out.array, img.array[1:4])


def test_lps_and_ras_copies_resample_onto_each_other():
    rng = np.random.default_rng(2)
    data = rng.random((8, 9, 5)).astype(np.float32)
    ras = Image(data, STORAGE["ras"])
    # the same physical image stored LPS: flip i and j, adjust the affine accordingly
    flip = np.array([[-1, 0, 0, 7], [0, -1, 0, 8], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    lps = Image(data[::-1, ::-1, :].copy(), STORAGE["ras"] @ flip)
    back = resample_like(lps, ras, order=0)
    np.testing.assert_array_equal(back.array, data)


def test_nifti_round_trip_keeps_affine_and_scaling(tmp_path):
    img = Image(np.random.default_rng(3).random((5, 6, 7)).astype(np.float32) * 1000, STORAGE["oblique"])
    save_nifti(img, tmp_path / "a.nii.gz")
    back = load_nifti(tmp_path / "a.nii.gz")
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)
    np.testing.assert_allclose(back.array, img.array, rtol=1e-6)
    # int16 with slope/intercept is applied on load
    nii = nib.Nifti1Image(np.full((4, 4, 4), 100, np.int16), np.eye(4))
    nii.header.set_slope_inter(0.5, 10.0)
    nib.save(nii, tmp_path / "s.nii.gz")
    assert np.allclose(load_nifti(tmp_path / "s.nii.gz").array, 60.0)
    assert not list(tmp_path.glob("*.tmp*"))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_nifti(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageError, match="cannot read"):
        load_nifti(tmp_path / "junk.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(ImageError, match="3D"):
        load_nifti(tmp_path / "4d.nii.gz")
    with pytest.raises(ImageError, match="empty"):
        validate_intensity_image(Image(np.zeros((4, 4, 4), np.float32), np.eye(4)))
    nan = np.ones((4, 4, 4), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        validate_intensity_image(Image(nan, np.eye(4)))


def test_overlap_fraction():
    a = Image(np.zeros((10, 10, 10), np.float32), np.eye(4))
    far = np.eye(4)
    far[:3, 3] = 100
    assert overlap_fraction(a, a) == 1.0
    assert overlap_fraction(a, Image(np.zeros((10, 10, 10), np.float32), far)) == 0.0
