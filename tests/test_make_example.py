"""The bundled example's reduction: 2 x 2 blocks across the slices, whatever the storage order."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_scripts.make_example import _block_affine, reduce_intensity, reduce_labels
from pipeline.geometry import acquisition_slice_axis

REPO = Path(__file__).resolve().parents[1]


def _world_centres(affine, shape):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return (ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]).reshape(*shape, 3)


@pytest.mark.parametrize("slice_ax", [0, 1, 2])
def test_reduction_keeps_the_slices_and_the_world_position(slice_ax):
    rng = np.random.default_rng(slice_ax)
    shape = [8, 8, 8]
    shape[slice_ax] = 3
    data = rng.normal(size=shape).astype(np.float32)
    labels = rng.integers(0, 4, size=shape).astype(np.uint8)
    spacing = np.full(3, 0.8)
    spacing[slice_ax] = 5.0
    affine = np.diag([*spacing, 1.0])[[2, 0, 1, 3]]          # stored S, R, A-like: axes permuted
    affine[:3, 3] = [10.0, -20.0, 30.0]

    reduced = reduce_intensity(data, slice_ax)
    lab = reduce_labels(labels, slice_ax)
    new_affine = _block_affine(affine, 2, slice_ax)
    expect = [s // 2 for s in shape]
    expect[slice_ax] = 3
    assert reduced.shape == lab.shape == tuple(expect)
    new_spacing = np.linalg.norm(new_affine[:3, :3], axis=0)
    assert np.isclose(new_spacing[slice_ax], 5.0)
    assert np.allclose(np.delete(new_spacing, slice_ax), 1.6)
    # every reduced voxel sits at the mean world position of its block and holds its mean
    world = _world_centres(affine, shape)
    moved, wmoved = np.moveaxis(data, slice_ax, -1), np.moveaxis(world, slice_ax, 2)
    red_moved = np.moveaxis(reduced, slice_ax, -1)
    new_world = np.moveaxis(_world_centres(new_affine, reduced.shape), slice_ax, 2)
    for i, j, k in [(0, 0, 0), (3, 1, 2), (2, 3, 1)]:
        block = (slice(2 * i, 2 * i + 2), slice(2 * j, 2 * j + 2), k)
        assert np.isclose(red_moved[i, j, k], moved[block].mean(), atol=1e-5)
        assert np.allclose(new_world[i, j, k], wmoved[block].reshape(-1, 3).mean(0))
    lab_moved = np.moveaxis(lab, slice_ax, -1)
    block = np.moveaxis(labels, slice_ax, -1)[0:2, 2:4, 1].ravel()
    counts = np.bincount(block, minlength=4)
    assert lab_moved[0, 1, 1] == int(np.argmax(counts))       # majority, ties to the smaller value


def test_bundled_example_keeps_its_acquisition_slices():
    """The example scan has the generator's slice thickness, not a doubled one."""
    folder = REPO / "data_scripts" / "example"
    if not (folder / "t1.nii.gz").exists():
        pytest.skip("bundled example not generated (python data_scripts/make_example.py)")
    truth = json.loads((folder / "truth.json").read_text())["acquisition"]
    for name in ("t1", "stir", "labels"):
        img = nib.load(str(folder / f"{name}.nii.gz"))
        spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
        ax = acquisition_slice_axis(img.affine)
        assert np.isclose(spacing[ax], truth["grids"]["t1"]["slice_spacing"], atol=1e-3), name
        assert np.allclose(np.delete(spacing, ax), 2 * truth["grids"]["t1"]["pixel"][0], atol=1e-3), name
