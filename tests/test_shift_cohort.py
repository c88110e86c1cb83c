"""The robustness-probe artefacts of data_scripts/shift_cohort.py do what they claim."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest

from data_scripts.shift_cohort import (TISSUE_CLASSES, coil_field, fat_unsuppressed, fat_water_swapped, gamma_map,
                                      ghost, main, ringing, tissue_contrast, tissue_map, world_grid)
from pipeline.image import Image
from pipeline.labels import LABELS


def _image(rng, slice_axis=2, spacing=(0.8, 0.8, 5.0)):
    shape = [48, 40, 40]
    shape[slice_axis] = 6
    aff = np.diag(list(np.roll(spacing, slice_axis - 2)) + [1.0])
    aff[:3, 3] = (-20, 10, 5)
    a = rng.uniform(50, 100, shape).astype(np.float32)
    return Image(a, aff)


def test_identity_strengths_leave_the_image_unchanged():
    img = _image(np.random.default_rng(0))
    np.testing.assert_allclose(ghost(img, 0.0, np.random.default_rng(1)), img.array, rtol=1e-4)
    np.testing.assert_allclose(ringing(img, 1.0), img.array, rtol=1e-4)
    np.testing.assert_allclose(gamma_map(img.array, 1.0), img.array, rtol=1e-5)


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_ghost_moves_signal_only_along_the_slice_plane(slice_axis):
    """Motion ghosts are a k-space phase error: each slice keeps its energy and slices stay apart."""
    img = _image(np.random.default_rng(2), slice_axis)
    out = ghost(img, 2.0, np.random.default_rng(3))
    assert not np.allclose(out, img.array, rtol=1e-2)
    other = tuple(i for i in range(3) if i != slice_axis)
    np.testing.assert_allclose((out.astype(np.float64) ** 2).sum(axis=other),
                               (img.array.astype(np.float64) ** 2).sum(axis=other), rtol=1e-4)


def test_ringing_blurs_in_plane_but_not_across_slices():
    img = _image(np.random.default_rng(4))
    a = np.zeros_like(img.array)
    a[20:30, 15:25, 3] = 100.0
    out = ringing(img.with_array(a), 0.4)
    assert out[..., 2].max() == 0 and out[..., 4].max() == 0        # slice 3 only
    assert out[19, 20, 3] > 1 and out[25, 20, 3] < 100 - 1            # blurred edge and ringing


def test_coil_field_is_darkest_at_the_centre_within_its_range():
    img = Image(np.zeros((60, 60, 3), np.float32), np.diag([4.0, 4.0, 5.0, 1.0]))
    xyz = world_grid(img)
    centre, radii = np.array([118.0, 118.0, 5.0]), np.array([100.0, 80.0])
    f = coil_field(xyz, centre, radii, 0.6)
    inside = ((xyz[0] - centre[0]) / radii[0]) ** 2 + ((xyz[1] - centre[1]) / radii[1]) ** 2 <= 1
    assert f[inside].min() == pytest.approx(0.4, abs=1e-3) and f[inside].max() == pytest.approx(1.0, abs=1e-3)
    assert f[30, 30, 1] < 0.45 and np.allclose(f[..., 0], f[..., 2])


def test_shifted_cohort_keeps_grid_labels_and_truth(tmp_path):
    rng = np.random.default_rng(5)
    src, dst = tmp_path / "c", tmp_path / "d"
    (src / "s0").mkdir(parents=True)
    aff = np.array([[-0.9, 0, 0, 90], [0, 0, 5.0, -40], [0, 0.9, 0, -60], [0, 0, 0, 1]])   # LPS-like, coronal storage
    for name in ("t1", "t2fs"):
        nib.save(nib.Nifti1Image(rng.uniform(0, 500, (40, 8, 36)).astype(np.int16), aff), src / "s0" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(rng.integers(0, 5, (40, 8, 36)).astype(np.uint8), aff), src / "s0" / "labels.nii.gz")
    (src / "s0" / "truth.json").write_text(json.dumps({"hips": {}}))
    row = {"subject": "s0", "t1": "s0/t1.nii.gz", "fluid": "s0/t2fs.nii.gz", "fluid_kind": "t2fs",
           "dixon_fat": "", "dixon_water": "", "labels": "s0/labels.nii.gz", "truth": "s0/truth.json"}
    with open(src / "cohort.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    before = (src / "s0" / "t1.nii.gz").read_bytes()
    assert main(["--cohort", str(src), "--out", str(dst), "--shift", "ghost"]) == 0
    assert (src / "s0" / "t1.nii.gz").read_bytes() == before
    new, old = nib.load(dst / "s0" / "t1.nii.gz"), nib.load(src / "s0" / "t1.nii.gz")
    np.testing.assert_allclose(new.affine, old.affine, atol=1e-5)
    assert new.shape == old.shape and not np.allclose(new.get_fdata(), old.get_fdata())
    assert (dst / "s0" / "labels.nii.gz").read_bytes() == (src / "s0" / "labels.nii.gz").read_bytes()
    assert (dst / "s0" / "truth.json").read_text() == (src / "s0" / "truth.json").read_text()
    with pytest.raises(SystemExit):
        main(["--cohort", str(src), "--out", str(src), "--shift", "coil"])


def test_tissue_contrast_scales_each_class_on_its_own_grid():
    """Labels on an RAS grid, the image stored LPS-flipped: each class's interior gets its own factor
    (found in world coordinates), unlabelled tissue keeps its signal."""
    shape = (40, 40, 6)
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    lab = np.zeros(shape, np.uint8)
    blocks = {"quadratus_femoris": (slice(2, 10), slice(2, 12)), "subcutaneous_fat": (slice(12, 20), slice(2, 12)),
              "femur": (slice(22, 30), slice(2, 12)), "hamstring_tendon": (slice(2, 10), slice(20, 30)),
              "gluteus_maximus": (slice(12, 20), slice(20, 30))}
    for name, (a, b) in blocks.items():
        lab[a, b, :] = LABELS[name]
    flip = np.diag([-1.0, -1.0, 4.0, 1.0])
    flip[:2, 3] = shape[0] - 1, shape[1] - 1           # the same world box, stored LPS
    t1 = np.where(np.isin(lab, [LABELS["subcutaneous_fat"]]), 300.0, 100.0).astype(np.float32)
    t1[32:38, 32:38, :] = 280.0                         # an unlabelled fat plane
    tissues = tissue_map(Image(lab, aff), Image(t1, aff))
    img = Image(np.full(shape, 100.0, np.float32), flip)
    out, drawn = tissue_contrast(img, tissues, 1.6, np.random.default_rng(3), blur_mm=0.3)
    assert set(drawn) == set(TISSUE_CLASSES) and all(1 / 1.6 <= f <= 1.6 for f in drawn.values())
    assert len({round(f, 6) for f in drawn.values()}) == len(drawn)
    world = out[::-1, ::-1, :]                          # back to the labels' (RAS) storage
    for name, (a, b) in blocks.items():
        cls = next(c for c, names in TISSUE_CLASSES.items() if name in names)
        centre = world[(a.start + a.stop) // 2, (b.start + b.stop) // 2, 3]
        assert centre == pytest.approx(100.0 * drawn[cls], rel=1e-3), name
    assert world[25, 35, 3] == pytest.approx(100.0)                  # unlabelled, not fat: unchanged
    assert world[35, 35, 3] == pytest.approx(100.0 * drawn["fat"], rel=1e-3)   # changes with the fat
    # muscles share one factor: the QF keeps its signal relative to the gluteus maximus
    assert world[6, 7, 3] == pytest.approx(world[16, 25, 3], rel=1e-3)


def test_fat_unsuppressed_brightens_fat_and_fatty_marrow_only():
    """A fat-suppressed series stored LPS, labels RAS: subcutaneous fat, an unlabelled fat plane
    and T1-bright marrow reach ``strength`` times the muscle; cortex and muscle keep their signal."""
    shape = (40, 40, 6)
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    lab = np.zeros(shape, np.uint8)
    lab[2:10, 2:12] = LABELS["gluteus_maximus"]
    lab[12:20, 2:12] = LABELS["subcutaneous_fat"]
    lab[22:32, 2:14] = LABELS["femur"]
    t1 = np.full(shape, 100.0, np.float32)
    t1[12:20, 2:12] = 300.0
    t1[24:30, 4:12] = 290.0                              # marrow; the femur's rim is dark cortex
    t1[22:32, 2:14][t1[22:32, 2:14] == 100.0] = 10.0
    t1[32:38, 32:38] = 280.0                             # an unlabelled fat plane
    fluid = np.full(shape, 100.0, np.float32)
    fluid[12:20, 2:12] = 20.0                            # suppressed fat
    fluid[24:30, 4:12] = 15.0                            # suppressed marrow
    fluid[22:32, 2:14][fluid[22:32, 2:14] == 100.0] = 5.0
    fluid[32:38, 32:38] = 20.0
    flip = np.diag([-1.0, -1.0, 4.0, 1.0])
    flip[:2, 3] = shape[0] - 1, shape[1] - 1
    img = Image(np.ascontiguousarray(fluid[::-1, ::-1]), flip)
    out = fat_unsuppressed(img, Image(lab, aff), Image(t1, aff), 4.0, blur_mm=0.3)[::-1, ::-1]
    assert np.median(out[13:19, 3:11]) == pytest.approx(400.0, rel=0.01)     # fat: 4 x muscle
    assert out[35, 35, 3] == pytest.approx(400.0, rel=0.01)
    assert out[27, 8, 3] == pytest.approx(395.0, rel=0.01)                   # marrow, +380 like fat
    assert out[22, 2, 3] == pytest.approx(5.0, abs=0.5)                      # cortex
    assert out[5, 6, 3] == pytest.approx(100.0) and out[25, 35, 3] == pytest.approx(100.0)


def test_fat_water_swap_covers_the_subjects_right_in_world_coordinates():
    """An LPS-stored Dixon pair (voxel x runs to the subject's left): strength 0.5 exchanges fat and
    water where world RAS x is largest (the subject's right), on the water image's own, shifted grid
    too; strength 1 exchanges them everywhere."""
    shape = (20, 6, 4)
    lps = np.diag([-2.0, -2.0, 5.0, 1.0])
    lps[:3, 3] = (19.0, 5.0, 0.0)                       # world x from 19 (voxel 0) down to -19
    fat = Image(np.full(shape, 90.0, np.float32), lps)
    water_aff = lps.copy()
    water_aff[2, 3] = 5.0                                # one slice higher: another grid
    water = Image(np.full(shape, 10.0, np.float32), water_aff)
    images = {"dixon_fat": fat, "dixon_water": water}
    f = fat_water_swapped(images, "dixon_fat", 0.5)
    x = world_grid(fat)[0]
    over = np.zeros(shape, bool)
    over[..., 1:] = True                                 # the fat grid's bottom slice lies below the water grid
    assert np.allclose(f[over & (x > 0.5)], 10.0) and (f[x < -0.5] == 90.0).all()
    w = fat_water_swapped(images, "dixon_water", 0.5)
    xw = world_grid(water)[0]
    inside = np.zeros(shape, bool)
    inside[..., :3] = True                               # the water grid's top slice lies above the fat grid
    assert np.allclose(w[inside & (xw > 0.5)], 90.0) and (w[xw < -0.5] == 10.0).all()
    assert (fat_water_swapped(images, "dixon_fat", 1.0)[over] < 20).all()
