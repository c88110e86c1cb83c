"""Side assignment from anatomy in world coordinates, under any storage convention."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipeline.labels import LABELS
from pipeline.sides import assign_sides, left_right_pair
from tests.analytic_hips import labels_image, world_grid

CONVENTIONS = [
    dict(perm=(0, 1, 2), flips=(False, False, False)),                     # RAS
    dict(perm=(0, 1, 2), flips=(True, True, False)),                       # LPS
    dict(perm=(2, 0, 1), flips=(True, False, True)),                       # slices first, flipped
    dict(perm=(1, 0, 2), flips=(False, True, True),
         rotation=Rotation.from_euler("xyz", [7, -6, 15], degrees=True).as_matrix()),  # oblique
]


def _centroid(mask, affine):
    ijk = mask.indices().mean(0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


@pytest.mark.parametrize("conv", CONVENTIONS)
def test_bilateral_sides_follow_world_x(conv):
    img, truth = labels_image((1.0, 1.0, 5.0), **conv)
    res = assign_sides(img.array, img.affine)
    assert res.mode == "bilateral"
    for side in ("left", "right"):
        for name, key in (("ischial_tuberosity", "it"), ("lesser_trochanter", "lt")):
            c = _centroid(res.hips[side][name], img.affine)
            assert np.linalg.norm(c - truth[side][key]) < 2.0, (side, name)
    # patient's right = +x
    assert _centroid(res.hips["right"]["femur"], img.affine)[0] > 0


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("conv", CONVENTIONS[:3])
def test_single_hip_side_from_femur_and_ischium(side, conv):
    s = 1 if side == "right" else -1
    img, truth = labels_image((0.9, 0.9, 4.0), sides=(side,), centre=(s * 60.0, -10.0, -10.0),
                              fov=(110.0, 130.0, 110.0), **conv)
    res = assign_sides(img.array, img.affine)
    assert res.mode == "single" and list(res.hips) == [side]
    assert "ischium" in res.method


def test_single_hip_without_pelvis_uses_lesser_trochanter():
    img, _ = labels_image((0.9, 0.9, 4.0), sides=("left",), centre=(-60.0, -10.0, -10.0),
                          fov=(110.0, 130.0, 110.0))
    arr = img.array.copy()
    arr[np.isin(arr, [LABELS["ischial_tuberosity"], LABELS["pelvis"]])] = 0
    res = assign_sides(arr, img.affine)
    assert list(res.hips) == ["left"]
    assert "lesser trochanter" in res.method


def test_empty_label_map():
    res = assign_sides(np.zeros((10, 10, 10), np.uint8), np.eye(4))
    assert res.mode == "none" and res.hips == {} and res.warnings


@pytest.mark.parametrize("conv", CONVENTIONS)
def test_a_stray_blob_in_front_of_the_pelvis_does_not_tilt_the_midplane(conv):
    """A mislabelled 'femur' blob larger than either femur, in front of the pelvis, must not be
    paired with a femur (it once gave an antero-posterior 'midplane' and a 99 mm IFS)."""
    img, truth = labels_image((1.0, 1.0, 5.0), **conv)
    arr = img.array.copy()
    xyz = world_grid(arr.shape, img.affine)
    fem = arr == LABELS["femur"]
    z0 = float(xyz[fem][:, 2].mean())
    y_front = float(xyz[..., 1].max()) - 35.0
    r = 30.0
    blob = np.linalg.norm(xyz - np.array([-15.0, y_front, z0]), axis=-1) < r
    arr[blob] = LABELS["femur"]
    assert blob.sum() > 0.6 * fem.sum()     # larger than either femur
    res = assign_sides(arr, img.affine)
    assert res.mode == "bilateral"
    assert abs(res.midplane["normal"][0]) > 0.95
    for side in ("left", "right"):
        c = _centroid(res.hips[side]["ischial_tuberosity"], img.affine)
        assert np.linalg.norm(c - truth[side]["it"]) < 2.0, side


def test_left_right_pair_prefers_a_plausible_pair_over_the_largest_component():
    cents = [(0.0, 120.0, 0.0), (95.0, -10.0, 0.0), (-97.0, -10.0, 0.0)]
    assert left_right_pair(cents, [22771, 17208, 17400], 60.0) == (1, 2)
    # nothing far enough apart along x: a single hip
    assert left_right_pair([(0, 0, 0), (30, 0, 0)], [10, 9], 60.0) is None
    # offset mostly antero-posterior: not a left/right pair
    assert left_right_pair([(0, 0, 0), (70, 90, 0)], [10, 9], 60.0) is None
