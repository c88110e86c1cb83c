"""Tests of the working grid, the model bundle and segmentation inference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import bundle_paths, default_metadata, load_bundle, model_from_metadata, save_bundle
from pipeline.grid import make_working_grid, normalise, prepare_inputs
from pipeline.image import Image, ImageError, reorient_to_ras
from pipeline.labels import LABELS
from pipeline.segment import SegModel, load_model, postprocess, segment


def _rotation(ax, deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    m = np.eye(3)
    i, j = [a for a in range(3) if a != ax]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


AFFINES = {
    "ras": np.diag([0.9, 0.9, 4.0, 1.0]),
    "lps": np.diag([-0.8, -0.8, 3.0, 1.0]),
    "oblique": np.vstack([np.hstack([_rotation(2, 12) @ _rotation(0, 7) @ np.diag([1.1, 1.1, 5.0]),
                                     [[10], [-20], [30]]]), [0, 0, 0, 1]]),
    "slice_first": np.array([[0, 0, 0.7, -20], [0, -0.7, 0, 15], [3.5, 0, 0, -40], [0, 0, 0, 1.0]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_grid_round_trip_is_exact(name):
    shape = (37, 41, 9) if name != "slice_first" else (9, 37, 41)
    ref = Image(np.random.default_rng(0).random(shape).astype(np.float32), AFFINES[name], "t1")
    grid = make_working_grid(ref, (1.0, 1.0, 4.0))
    ras, _ = reorient_to_ras(ref)
    assert grid.ras_shape == ras.shape
    np.testing.assert_allclose(grid.ras_affine, ras.affine)
    # working spacing close to the request, same field of view (outer faces coincide)
    np.testing.assert_allclose(grid.spacing, [1.0, 1.0, 4.0], rtol=0.25)
    from pipeline.image import grid_corners

    np.testing.assert_allclose(np.sort(grid_corners(grid.shape, grid.affine), 0),
                               np.sort(grid_corners(ref.shape, ref.affine), 0), atol=1e-6)
    # a world-defined label (half space x > 0) sampled on the working grid comes back on the
    # reference grid with the reference's exact shape, and agrees away from the boundary
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    centre = ref.voxel_to_world(np.array([(np.asarray(shape) - 1) / 2.0]))[0]
    lab_w = (world[:, 1] > centre[1]).reshape(grid.shape).astype(np.float32)
    back = grid.to_reference(np.stack([1 - lab_w, lab_w]))
    assert back.shape == (2, *ref.shape)
    ref_ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    ref_y = ref.voxel_to_world(ref_ijk)[:, 1].reshape(shape)
    far = np.abs(ref_y - centre[1]) > 3.0
    assert np.array_equal(back.argmax(0)[far], (ref_y > centre[1])[far])


def test_second_channel_resampled_in_world_coordinates():
    rng = np.random.default_rng(1)
    t1 = Image(rng.random((30, 30, 8)).astype(np.float32) * 100, AFFINES["ras"], "t1")
    # the same data stored LPS-flipped: after world resampling both channels must agree
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [29, 29, 0]  # voxel units: i -> 29 - i
    fluid = Image(t1.array[::-1, ::-1].copy() * 3.0, AFFINES["ras"] @ flip, "stir")
    inp = prepare_inputs({"t1": t1, "fluid": fluid})
    assert inp.present == {"t1": True, "fluid": True}
    np.testing.assert_allclose(inp.array[0], inp.array[1], atol=1e-4)   # scale-invariant normalisation


def test_missing_channel_is_zero_and_flagged():
    t1 = Image(np.random.default_rng(2).random((30, 30, 8)).astype(np.float32), AFFINES["lps"], "t1")
    inp = prepare_inputs({"fluid": t1})
    assert inp.present == {"t1": False, "fluid": True} and inp.grid.reference == "fluid"
    assert not inp.array[0].any() and inp.array[1].any()
    assert any("t1 missing" in w for w in inp.warnings)
    with pytest.raises(ImageError):
        prepare_inputs({"dixon_fat": t1})


def test_normalise_is_robust_to_scaling():
    a = np.random.default_rng(3).gamma(2.0, 50.0, (20, 20, 20)).astype(np.float32)
    np.testing.assert_allclose(normalise(a), normalise(a * 37.0 + 0.0), atol=1e-5)
    assert not normalise(np.zeros((4, 4, 4))).any()


def test_bundle_round_trip_without_pickle(tmp_path):
    meta = default_metadata()
    net = model_from_metadata(meta)
    w, j = save_bundle(tmp_path / "m", net, meta)
    assert w.name == "m.safetensors" and j.name == "m.json"
    assert w.read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # not a torch pickle
    net2, meta2 = load_bundle(tmp_path / "m.safetensors")
    assert meta2["labels"] == LABELS and meta2["input_channels"] == ["t1", "fluid"]
    for (k, v), (k2, v2) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert json.loads(j.read_text())["working_spacing_mm"] == meta["working_spacing_mm"]
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(tmp_path / "absent")
    assert bundle_paths(tmp_path / "x.json")[0].name == "x.safetensors"


def test_shipped_bundles_by_short_name(tmp_path, monkeypatch):
    from models.bundle import BUNDLED, DEFAULT_BUNDLE

    monkeypatch.chdir(tmp_path)
    default = json.loads(bundle_paths(DEFAULT_BUNDLE)[1].read_text())
    for name, prefix in BUNDLED.items():
        weights, meta_path = bundle_paths(name)
        assert weights == prefix.with_name(prefix.name + ".safetensors") and weights.exists(), name
        meta = json.loads(meta_path.read_text())
        # same network and interface as the default, so either can be swapped in
        for key in ("labels", "input_channels", "working_spacing_mm", "normalisation", "architecture"):
            assert meta[key] == default[key], (name, key)
        assert "phantom" in meta["training"]["description"], name
    save_bundle(tmp_path / "extended", model_from_metadata(default_metadata()), default_metadata())
    assert bundle_paths("extended")[0] == Path("extended.safetensors")   # a file there wins


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    meta = default_metadata()
    meta["architecture"] = dict(meta["architecture"], channels=[4, 8, 8, 8], num_res_units=1)
    return SegModel(model_from_metadata(meta).eval(), meta, torch.device("cpu"))


@pytest.mark.parametrize("inputs", [("t1", "fluid"), ("t1",), ("fluid",)])
def test_segment_returns_labels_on_reference_grid(small_model, inputs):
    rng = np.random.default_rng(4)
    t1 = Image(rng.random((40, 36, 7)).astype(np.float32) * 500, AFFINES["oblique"], "t1")
    fl = Image(rng.random((30, 30, 9)).astype(np.float32), AFFINES["lps"], "stir")
    imgs = {k: v for k, v in {"t1": t1, "fluid": fl}.items() if k in inputs}
    seg = segment(imgs, small_model, return_probabilities=True)
    ref = imgs.get("t1", imgs.get("fluid"))
    assert seg.labels.shape == ref.shape and seg.labels.array.dtype == np.uint8
    np.testing.assert_array_equal(seg.labels.affine, ref.affine)
    assert seg.labels.array.max() < len(LABELS)
    assert set(seg.confidence) == {n for n in LABELS if n != "background"}
    assert all(0.0 <= c <= 1.0 for c in seg.confidence.values())
    assert {"resample", "network", "postprocess"} <= set(seg.timings)
    np.testing.assert_allclose(seg.probabilities.sum(0), 1.0, atol=1e-4)
    assert seg.reference == ("t1" if "t1" in inputs else "fluid")


def test_mirror_tta_is_left_right_equivariant(small_model):
    """Mirror test-time augmentation over the whole grid: mirroring the input mirrors the output
    exactly, also for a grid that needs padding (odd sizes); the plain pass is not equivariant,
    so this can fail."""
    from pipeline.segment import predict_logits

    x = np.random.default_rng(5).random((2, 37, 30, 7)).astype(np.float32)
    xm = np.ascontiguousarray(x[:, ::-1])
    m = small_model
    tta = predict_logits(m.net, x, m.meta, m.device, bf16=False, mirror="full")
    tta_m = predict_logits(m.net, xm, m.meta, m.device, bf16=False, mirror="full")
    assert tta.shape == (len(LABELS), 37, 30, 7)
    torch.testing.assert_close(tta_m, tta.flip(1), atol=1e-5, rtol=1e-5)
    plain = predict_logits(m.net, x, m.meta, m.device, bf16=False)
    plain_m = predict_logits(m.net, xm, m.meta, m.device, bf16=False)
    assert not torch.allclose(plain_m, plain.flip(1), atol=1e-3)
    torch.testing.assert_close(tta, 0.5 * (plain + plain_m.flip(1)))



def test_mirror_pass_around_the_measured_structures_matches_the_whole_grid_pass(small_model):
    """The default mirror pass covers a box around each hip's measured structures (two hips: two
    boxes, on the network's stride lattice). With a network that sees one voxel around each
    voxel, the crop's zero padding cannot reach inside the margin: there the result equals the
    mirror pass over the whole grid, and outside the boxes it is the plain pass."""
    from models.net import divisor
    from pipeline.segment import MIRROR_CLASSES, MIRROR_MARGIN_VOXELS, mirror_boxes, predict_logits

    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, len(LABELS), 3, padding=1).eval()
    with torch.no_grad():      # QF where channel 0 is bright; the rest random, not mirror-symmetric
        for name in MIRROR_CLASSES:
            net.bias[LABELS[name]] = -10.0
        net.weight[LABELS["quadratus_femoris"]] = 0.0
        net.weight[LABELS["quadratus_femoris"], 0, 1, 1, 1] = 20.0
        net.bias[LABELS["quadratus_femoris"]] = -10.0
    rng = np.random.default_rng(3)
    x = (0.3 * rng.random((2, 150, 70, 20))).astype(np.float32)
    x[0, 30:40, 30:42, 8:12] = x[0, 105:118, 28:40, 9:13] = 1.0       # a "hip" on each side
    meta = small_model.meta
    plain = predict_logits(net, x, meta, torch.device("cpu"), bf16=False)
    full = predict_logits(net, x, meta, torch.device("cpu"), bf16=False, mirror="full")
    region = predict_logits(net, x, meta, torch.device("cpu"), bf16=False, mirror=True)
    boxes = mirror_boxes(plain.argmax(0).numpy(), meta)
    assert len(boxes) == 2
    div, margin = np.asarray(divisor(meta["architecture"])), np.asarray(MIRROR_MARGIN_VOXELS)
    inside = np.zeros(x.shape[1:], bool)
    for (bi, bj, bk), weight in boxes:
        assert bj.start % div[1] == 0 and bk.start % div[2] == 0 and (150 - bi.stop) % div[0] == 0
        assert weight.shape == (bi.stop - bi.start, bj.stop - bj.start, bk.stop - bk.start)
        assert weight.min() < 0.1 and weight.max() == 1.0
        core = np.zeros_like(inside)
        core[bi, bj, bk] = weight == 1.0
        inside[bi, bj, bk] = True
        torch.testing.assert_close(region[:, core], full[:, core], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain[:, core], full[:, core], atol=1e-3)
    hips = x[0] == 1.0
    lo = np.argwhere(hips).min(0)
    assert inside[tuple(np.maximum(lo - margin, 0))]
    torch.testing.assert_close(region[:, ~inside], plain[:, ~inside])


def test_channels_last_layout_gives_the_plain_layouts_logits(small_model):
    """predict_logits runs a float32 CPU network in the channels-last layout (for speed); its
    logits must be those of the same network applied in the plain layout, padding removed."""
    from pipeline.segment import predict_logits

    x = np.random.default_rng(6).random((2, 37, 30, 7)).astype(np.float32)
    m = small_model
    fast = predict_logits(m.net, x, m.meta, m.device, bf16=False)
    assert m.net.model[0].conv.unit0.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    m.net.to(memory_format=torch.contiguous_format)
    padded = torch.zeros((1, 2, 40, 32, 8))       # the size divisor of the architecture: (8, 8, 4)
    padded[0, :, :37, :30, :7] = torch.from_numpy(x)
    with torch.inference_mode():
        plain = m.net(padded)[0, :, :37, :30, :7]
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)

def test_postprocess_keeps_one_component_per_side_and_fragments():
    lab = np.zeros((120, 20, 10), np.uint8)
    qf = LABELS["quadratus_femoris"]
    lab[10:20, 5:15, 2:8] = qf          # right-hand blob (large)
    lab[90:99, 5:15, 2:8] = qf          # contralateral blob (kept)
    lab[22:24, 5:8, 2:4] = qf           # fragment next to the first blob (kept)
    lab[55:57, 5:7, 5:7] = qf           # island in the middle (removed)
    lab[0:40, 0:2, 0:10] = LABELS["other_muscle"]
    lab[70, 19, 9] = LABELS["other_muscle"]   # 1-voxel island (removed)
    remove, removed = postprocess(lab, np.diag([1.0, 1.0, 1.0, 1.0]))
    assert removed == {"quadratus_femoris": 8, "other_muscle": 1}
    assert remove[55:57, 5:7, 5:7].all() and remove[70, 19, 9]
    assert not remove[10:24].any() and not remove[90:99].any()


def test_postprocess_keeps_the_left_right_pair_over_a_larger_stray_blob():
    lab = np.zeros((200, 200, 10), np.uint8)
    fem = LABELS["femur"]
    lab[10:30, 20:40, 2:8] = fem        # left femur
    lab[170:190, 20:40, 2:8] = fem      # right femur
    lab[85:115, 140:180, 2:8] = fem     # larger stray blob in front of the pelvis
    remove, removed = postprocess(lab, np.diag([1.0, 1.0, 1.0, 1.0]))
    assert remove[85:115, 140:180, 2:8].all()
    assert not remove[10:30].any() and not remove[170:190].any()
    assert removed == {"femur": 30 * 40 * 6}


def test_postprocess_keeps_the_lesser_trochanters_that_touch_a_femur():
    """A larger left-right pair of 'lesser trochanter' blobs far behind the femora (a stress-cohort
    failure: IFS 68 mm against 4 mm) loses to the smaller pair attached to the femora; with no
    femur labelled at all, the plain left-right rule still applies."""
    lab = np.zeros((200, 200, 10), np.uint8)
    fem, lt = LABELS["femur"], LABELS["lesser_trochanter"]
    lab[10:30, 20:40, 2:8] = fem
    lab[170:190, 20:40, 2:8] = fem
    lab[30:34, 30:34, 3:6] = lt          # attached to the left femur
    lab[166:170, 30:34, 3:6] = lt        # attached to the right femur
    lab[20:30, 150:160, 2:8] = lt        # detached, larger, posterior
    lab[170:180, 150:160, 2:8] = lt
    aff = np.diag([0.8, 0.8, 4.0, 1.0])
    remove, removed = postprocess(lab, aff)
    assert removed == {"lesser_trochanter": 2 * 10 * 10 * 6}
    assert remove[20:30, 150:160, 2:8].all() and not remove[30:34, 30:34].any() and not remove[166:170].any()
    no_femur = np.where(lab == fem, 0, lab).astype(np.uint8)
    remove, _ = postprocess(no_femur, aff)
    assert not remove[20:30, 150:160].any() and remove[30:34, 30:34, 3:6].all()


def test_postprocess_keeps_the_hamstring_origin_top_on_the_ischial_tuberosity():
    """The top of the hamstring origin, a piece on the ischial tuberosity 30 mm above the rest of
    the tendon (the network labels the slices between as bone or muscle), is kept: QFS is
    measured there, and dropping it measured QFS 10-15 mm too large on held-out phantoms. A
    piece as far away that touches no tuberosity is still an island."""
    lab = np.zeros((200, 60, 20), np.uint8)
    pel, it, hs = LABELS["pelvis"], LABELS["ischial_tuberosity"], LABELS["hamstring_tendon"]
    aff = np.diag([0.8, 0.8, 4.0, 1.0])
    for x0, sign in ((10, 1), (170, -1)):               # left and right hips
        lab[x0:x0 + 20, 10:30, 12:20] = pel
        lab[x0:x0 + 20, 30:40, 12:18] = it               # tuberosity below the pelvis
        top = (slice(x0 + 20, x0 + 23) if sign > 0 else slice(x0 - 3, x0), slice(32, 36), slice(14, 17))
        lab[top] = hs                                    # origin's top, against the tuberosity
        lab[x0:x0 + 20, 40:48, 0:5] = hs                 # the tendon, 9 slices (36 mm) lower
    lab[90:93, 5:8, 14:17] = hs                          # as far away, touching nothing
    remove, removed = postprocess(lab, aff)
    assert not remove[30:33, 32:36, 14:17].any() and not remove[167:170, 32:36, 14:17].any()
    assert remove[90:93, 5:8, 14:17].all()
    assert removed == {"hamstring_tendon": 27}


def test_segment_relabels_islands_created_by_relabelling(monkeypatch, small_model):
    """An island's runner-up class may itself form an island (a stray 'femur' blob whose second
    choice is 'lesser trochanter'): the second post-processing pass removes that too."""
    import pipeline.segment as seg_mod

    k = len(LABELS)
    fem, lt, om = LABELS["femur"], LABELS["lesser_trochanter"], LABELS["other_muscle"]
    shape = (60, 24, 6)
    logits = torch.zeros((k, *shape))
    logits[om] = 1.0
    for x0 in (4, 44):                   # femora, each with its lesser trochanter
        logits[fem, x0:x0 + 10, 2:10, 1:5] = 5.0
        logits[lt, x0 + 10:x0 + 12, 4:7, 2:4] = 6.0
    logits[fem, 25:35, 16:22, 1:5] = 5.0  # stray femur blob behind, runner-up: lesser trochanter
    logits[lt, 25:35, 16:22, 1:5] = 4.0
    monkeypatch.setattr(seg_mod, "predict_logits", lambda *a, **kw: logits.clone())
    img = Image(np.random.default_rng(0).random(shape).astype(np.float32), np.diag([1.0, 1.0, 4.0, 1.0]), "t1")
    out = seg_mod.segment({"t1": img}, small_model).labels.array
    assert not np.isin(out[25:35, 16:22, 1:5], (fem, lt)).any()
    assert (out[14:16, 4:7, 2:4] == lt).all() and (out[54:56, 4:7, 2:4] == lt).all()


def test_segment_removes_a_chain_of_island_classes(monkeypatch, small_model):
    """Where the network hesitates among several structures (anatomy it never saw: the iliac
    wings of a whole-pelvis scan), a stray blob's runner-up classes may all be islands; removal
    goes on until none is left (two passes left a hamstring-and-iliopsoas blob that faked a
    0.5 mm QFS 80 mm above the hip)."""
    import pipeline.segment as seg_mod

    k = len(LABELS)
    fem, lt, it, hs, om = (LABELS[n] for n in ("femur", "lesser_trochanter", "ischial_tuberosity",
                                               "hamstring_tendon", "other_muscle"))
    shape = (60, 24, 6)
    logits = torch.zeros((k, *shape))
    logits[om] = 1.0
    for x0 in (4, 44):                   # femora with their lesser trochanters, tuberosities, tendons
        logits[fem, x0:x0 + 10, 2:10, 1:5] = 5.0
        logits[lt, x0 + 10:x0 + 12, 4:7, 2:4] = 6.0
        logits[it, x0:x0 + 6, 12:15, 1:5] = 6.0
        logits[hs, x0:x0 + 6, 15:17, 1:5] = 6.0
    stray = (slice(25, 35), slice(16, 22), slice(1, 5))
    for cls, v in ((fem, 5.0), (lt, 4.5), (it, 4.0), (hs, 3.5)):   # runner-ups, all islands there
        logits[(cls, *stray)] = v
    monkeypatch.setattr(seg_mod, "predict_logits", lambda *a, **kw: logits.clone())
    img = Image(np.random.default_rng(0).random(shape).astype(np.float32), np.diag([1.0, 1.0, 4.0, 1.0]), "t1")
    out = seg_mod.segment({"t1": img}, small_model).labels.array
    assert (out[stray] == om).all()
    assert (out[14:16, 4:7, 2:4] == lt).all() and (out[54:56, 4:7, 2:4] == lt).all()


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_to_reference_matches_undo_reorient(name):
    from pipeline.image import undo_reorient

    shape = (12, 10, 6)
    ref = Image(np.zeros(shape, np.float32) + 1, AFFINES[name], "t1")
    grid = make_working_grid(ref, tuple(reorient_to_ras(ref)[0].spacing))  # identity rescale
    assert grid.shape == grid.ras_shape
    vol = np.random.default_rng(5).random((2, *grid.shape)).astype(np.float32)
    back = grid.to_reference(vol)
    for c in range(2):
        np.testing.assert_allclose(back[c], undo_reorient(vol[c], grid.ornt), atol=1e-6)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_resample_linear_matches_scipy(name):
    from pipeline.grid import resample_linear
    from pipeline.image import resample_to_grid

    rng = np.random.default_rng(6)
    src = Image(rng.random((20, 18, 7)).astype(np.float32), AFFINES[name], "t1")
    vox = np.eye(4)
    vox[:3, :3] = _rotation(2, 9) @ np.diag([0.8, 0.9, 0.7])
    vox[:3, 3] = [1.5, -0.7, 0.4]
    tgt_aff = src.affine @ vox          # overlapping, rotated, rescaled grid
    ref = resample_to_grid(src, (25, 22, 9), tgt_aff, order=1).array
    ours = resample_linear(src, (25, 22, 9), tgt_aff)
    interior = (ref != 0) & (ours != 0)
    assert interior.sum() > 1000
    np.testing.assert_allclose(ours[interior], ref[interior], atol=1e-4)


def test_class_offsets_move_a_class_boundary_for_their_input_combination(monkeypatch, small_model):
    """A negative logit offset for the lesser trochanter shrinks it, only for the input
    combination the offset was fitted for; an unknown class name is an error."""
    import copy

    import pipeline.segment as seg_mod

    k = len(LABELS)
    lt, om = LABELS["lesser_trochanter"], LABELS["other_muscle"]
    shape = (30, 12, 4)
    logits = torch.zeros((k, *shape))
    logits[om] = 0.0
    logits[lt] = torch.linspace(3.0, -3.0, shape[0])[:, None, None]   # LT where x < 15
    for c in range(k):
        if c not in (lt, om):
            logits[c] = -20.0
    monkeypatch.setattr(seg_mod, "predict_logits", lambda *a, **kw: logits.clone())
    img = Image(np.random.default_rng(0).random(shape).astype(np.float32), np.diag([1.0, 1.0, 4.0, 1.0]), "t1")
    model = copy.copy(small_model)
    model.meta = copy.deepcopy(small_model.meta)
    base = (seg_mod.segment({"t1": img}, model).labels.array == lt).sum()
    model.meta["inference"]["class_offsets"] = {"t1": {"lesser_trochanter": -1.0}}
    shrunk = (seg_mod.segment({"t1": img}, model).labels.array == lt).sum()
    assert 0 < shrunk < base
    assert shrunk == pytest.approx(base - 5 * shape[1] * shape[2], abs=shape[1] * shape[2])
    model.meta["inference"]["class_offsets"] = {"t1+fluid": {"lesser_trochanter": -1.0}}
    assert (seg_mod.segment({"t1": img}, model).labels.array == lt).sum() == base
    model.meta["inference"]["class_offsets"] = {"t1": {"lesser_trochanters": -1.0}}
    with pytest.raises(ValueError, match="unknown class"):
        seg_mod.segment({"t1": img}, model)
    # the real network's output (an inference tensor, in float32 and in bfloat16) takes them too
    monkeypatch.undo()
    model.meta["inference"]["class_offsets"] = {"t1": {"lesser_trochanter": -1.0}}
    for bf16 in (False, True):
        assert seg_mod.segment({"t1": img}, model, bf16=bf16).labels.shape == shape


def test_strong_shading_is_divided_out_and_the_scan_segmented_again(monkeypatch, small_model):
    """Surface-coil shading the network was not trained for (a dark centre): segment() fits it on
    the first pass's muscle and fat, divides it out and runs the network again on flat images;
    a scan without such shading is segmented once, untouched."""
    import pipeline.segment as seg_mod

    k, shape = len(LABELS), (80, 80, 8)
    x, y = np.meshgrid(np.arange(shape[0]) - 39.5, np.arange(shape[1]) - 39.5, indexing="ij")
    r = np.hypot(x, y)[..., None] * np.ones(shape)
    tissue = np.where(r < 30, LABELS["other_muscle"], np.where(r < 38, LABELS["subcutaneous_fat"], 0))
    tissue[(r < 30) & (y[..., None] < -15)] = LABELS["gluteus_maximus"]
    logits = torch.zeros((k, *shape))
    for v in np.unique(tissue):
        logits[int(v)][torch.from_numpy(tissue == v)] = 6.0
    seen = []

    def fake_logits(net, array, *a, **kw):
        seen.append(np.array(array[0]))
        return logits.clone()

    monkeypatch.setattr(seg_mod, "predict_logits", fake_logits)
    signal = np.where(tissue == LABELS["subcutaneous_fat"], 900.0, np.where(tissue > 0, 300.0, 5.0))
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    noise = np.random.default_rng(1).normal(1, 0.02, shape)

    flat = seg_mod.segment({"t1": Image((signal * noise).astype(np.float32), aff, "t1")}, small_model)
    assert len(seen) == 1 and not any("shading" in w for w in flat.warnings)

    seen.clear()
    coil = 0.35 + 0.65 * (r / 38.0) ** 2
    shaded = seg_mod.segment({"t1": Image((signal * coil * noise).astype(np.float32), aff, "t1")},
                             small_model)
    assert len(seen) == 2 and any("strong intensity shading" in w for w in shaded.warnings)
    muscle = tissue == LABELS["other_muscle"]
    cv = [a[muscle].std() / a[muscle].mean() for a in seen]
    assert cv[0] > 0.2 and cv[1] < 0.06            # the second pass sees flat muscle


def _coronal_slab(t1: Image, y_from: float) -> Image:
    """A 'coronal' series stored L-S-P (slices along world y, last) covering the T1's x and z
    but only world y >= ``y_from``."""
    aff = np.array([[-1.0, 0, 0, 40.0], [0, 0, -3.0, 60.0], [0, 1.0, 0, -25.0], [0, 0, 0, 1]])
    n_slices = int((60.0 - y_from) / 3.0) + 1
    return Image(np.random.default_rng(7).uniform(40, 60, (81, 60, n_slices)).astype(np.float32), aff,
                 "stir")


def test_coverage_weight_ramps_in_from_the_series_edge():
    from pipeline.grid import COVERAGE_RAMP_MM, coverage_weight, make_working_grid

    t1 = Image(np.ones((80, 80, 10), np.float32), np.diag([1.0, 1.0, 4.0, 1.0]) @ _translate(-40, -40, -5), "t1")
    grid = make_working_grid(t1)
    body = np.ones(grid.shape, bool)
    w = coverage_weight(_coronal_slab(t1, 0.0), grid, body)
    y = grid.affine[1, 1] * np.arange(grid.shape[1]) + grid.affine[1, 3]    # RAS working grid
    prof = w[40, :, 5]
    assert (prof[y < -2.0] == 0).all() and (prof[y > COVERAGE_RAMP_MM + 1.0] == 1).all()
    mid = (y > 2.0) & (y < COVERAGE_RAMP_MM - 2.0)
    assert ((prof[mid] > 0) & (prof[mid] < 1)).all() and np.all(np.diff(prof[mid]) > 0)
    # a series covering the whole body needs no weight
    assert coverage_weight(_coronal_slab(t1, -45.0), grid, body) is None


def _translate(x, y, z):
    m = np.eye(4)
    m[:3, 3] = [x, y, z]
    return m


def test_labels_beyond_a_partial_series_come_from_the_pass_without_it(monkeypatch, small_model):
    """A coronal STIR slab behind an axial T1: where it does not reach, the labels are those of
    the network without the fluid channel (here: 'pelvis'), deep inside it those with it ('femur');
    partial_coverage=False keeps the single pass; full coverage needs no second pass."""
    import pipeline.segment as seg_mod

    k = len(LABELS)
    calls = []

    def fake_logits(net, array, meta, device, bf16=None, mirror=False):
        calls.append(bool(array[1].any()))
        out = torch.full((k, *array.shape[1:]), -10.0)
        out[LABELS["femur"] if array[1].any() else LABELS["pelvis"]] = 10.0
        return out

    monkeypatch.setattr(seg_mod, "predict_logits", fake_logits)
    t1 = Image(np.random.default_rng(8).uniform(100, 120, (80, 80, 10)).astype(np.float32),
               np.diag([-1.0, -1.0, 4.0, 1.0]) @ _translate(-40, -40, -5), "t1")   # stored LPS
    seg = seg_mod.segment({"t1": t1, "stir": _coronal_slab(t1, 0.0)}, small_model, shading=False)
    assert calls == [True, False] and seg.partial_channels == ["fluid"]
    assert any("fluid covers only part" in w for w in seg.warnings)
    ijk = np.indices(t1.shape).reshape(3, -1).T
    y = (ijk @ t1.affine[:3, :3].T + t1.affine[:3, 3])[:, 1].reshape(t1.shape)
    lab = seg.labels.array
    assert (lab[y < -1.0] == LABELS["pelvis"]).all()
    assert (lab[y > 12.0] == LABELS["femur"]).all()
    calls.clear()
    one = seg_mod.segment({"t1": t1, "stir": _coronal_slab(t1, 0.0)}, small_model, shading=False,
                          partial_coverage=False)
    assert calls == [True] and one.partial_channels == [] and (one.labels.array == LABELS["femur"]).all()
    calls.clear()
    seg_mod.segment({"t1": t1, "stir": _coronal_slab(t1, -45.0)}, small_model, shading=False)
    assert calls == [True]


def test_a_label_grid_acquired_coronal_or_sagittal_is_named_in_a_warning():
    """The networks were trained on axial series: a coronal or sagittal reference (stored in any
    axis order) is said to be so; axial and near-isotropic ones are not."""
    from pipeline.grid import acquisition_plane

    rng = np.random.default_rng(3)
    coronal = _coronal_slab(Image(np.ones((80, 80, 10), np.float32), np.eye(4)), 0.0)  # L-S-P, y last
    sagittal_aff = np.array([[0, 0, 4.0, -60.0], [0, -0.8, 0, 40.0], [0.8, 0, 0, -30.0], [0, 0, 0, 1]])
    sagittal = Image(rng.uniform(40, 60, (70, 90, 30)).astype(np.float32), sagittal_aff, "stir")
    axial = Image(rng.uniform(40, 60, (60, 60, 12)).astype(np.float32),
                  np.diag([-0.9, -0.9, 5.0, 1.0]), "t1")
    iso = Image(axial.array, np.diag([1.0, 1.0, 1.1, 1.0]) @ np.eye(4)[[1, 0, 2, 3]], "t1")
    assert [acquisition_plane(i.affine) for i in (coronal, sagittal, axial, iso)] == \
        ["coronal", "sagittal", "axial", "axial"]
    for img, plane in ((coronal, "coronal"), (sagittal, "sagittal")):
        w = prepare_inputs({"stir": img}).warnings
        assert any(f"fluid series defining the label grid was acquired {plane}" in x for x in w)
    for img in (axial, iso):
        assert not any("acquired" in x for x in prepare_inputs({"t1": img}).warnings)


def _fat_left_muscle_right_network(monkeypatch) -> list:
    """Replace the network by one that calls the left half of the working grid subcutaneous fat
    and the right half gluteus maximus; returns the list of its calls (which channels held
    signal)."""
    import pipeline.segment as seg_mod

    k = len(LABELS)
    calls = []

    def fake_logits(net, array, meta, device, bf16=None, mirror=False):
        calls.append(tuple(bool(a.any()) for a in array))
        out = torch.full((k, *array.shape[1:]), -10.0)
        half = array.shape[1] // 2
        out[LABELS["subcutaneous_fat"], :half] = 10.0
        out[LABELS["gluteus_maximus"], half:] = 10.0
        return out

    monkeypatch.setattr(seg_mod, "predict_logits", fake_logits)
    return calls


@pytest.mark.parametrize("case", ["t1_and_stir", "swapped", "t1_fat_sat", "fat_sat_t1_alone"])
def test_a_t1_on_which_fat_is_dark_is_left_out_or_read_as_swapped(monkeypatch, small_model, case):
    """The (fake) network calls the left half subcutaneous fat and the right half gluteus
    maximus. Fat dark on the T1 (0.2 times muscle) and bright on the fluid series: the two were
    given the wrong way round, flagged after one pass; dark on both: segmented again from the
    fluid series alone; a dark-fat 'T1' alone: one pass and a warning; a real T1 (fat 3 times
    muscle) beside a STIR changes nothing."""
    import pipeline.segment as seg_mod

    calls = _fat_left_muscle_right_network(monkeypatch)
    aff = np.diag([1.0, 1.0, 4.0, 1.0]) @ _translate(-30, -30, -5)
    x = np.arange(60)[:, None, None] * np.ones((60, 60, 10))
    noise = np.random.default_rng(3).normal(0, 2, x.shape)

    def image(fat, kind):
        return Image((np.where(x < 30, fat, 100.0) + noise).astype(np.float32), aff, kind)

    t1_like, fat_dark = image(300.0, "t1"), image(20.0, "stir")
    images = {"t1_and_stir": {"t1": t1_like, "stir": fat_dark},
              "swapped": {"t1": Image(fat_dark.array, aff, "t1"), "stir": Image(t1_like.array, aff, "stir")},
              "t1_fat_sat": {"t1": Image(fat_dark.array, aff, "t1"), "stir": fat_dark},
              "fat_sat_t1_alone": {"t1": Image(fat_dark.array, aff, "t1")}}[case]
    seg = seg_mod.segment(images, small_model, shading=False)
    dark = [w for w in seg.warnings if w.startswith("fat is no brighter than the muscles on the T1")]
    assert seg.t1_fat_ratio == pytest.approx(3.0 if case == "t1_and_stir" else 0.2, rel=0.05)
    assert seg.t1_fluid_swapped == (case == "swapped")
    if case == "t1_and_stir":
        assert calls == [(True, True)] and not dark
    elif case == "swapped":
        assert calls == [(True, True)] and not dark
        assert any("given the wrong way round" in w for w in seg.warnings)
    elif case == "t1_fat_sat":
        assert calls == [(True, True), (False, True)]
        assert len(dark) == 1 and dark[0].endswith("segmented from the fluid series alone")
    else:
        assert calls == [(True, False)] and len(dark) == 1 and "less certain" in dark[0]


@pytest.mark.parametrize("fat_on_fluid, with_t1", [(20.0, True), (400.0, True), (400.0, False)])
def test_a_fluid_series_without_fat_suppression_is_left_out_when_there_is_a_t1(
        monkeypatch, small_model, fat_on_fluid, with_t1):
    """The (fake) network calls the left half of the scan subcutaneous fat and the right half
    gluteus maximus. Fat 4 times as bright as muscle on the fluid series: with a T1 the scan is
    segmented again without the fluid channel; fluid alone keeps its one pass with a warning;
    suppressed fat (0.2 times the muscle) changes nothing."""
    import pipeline.segment as seg_mod

    calls = _fat_left_muscle_right_network(monkeypatch)
    aff = np.diag([1.0, 1.0, 4.0, 1.0]) @ _translate(-30, -30, -5)
    x = np.arange(60)[:, None, None] * np.ones((60, 60, 10))
    fluid = np.where(x < 30, fat_on_fluid, 100.0).astype(np.float32)
    fluid += np.random.default_rng(2).normal(0, 2, fluid.shape).astype(np.float32)
    images = {"stir": Image(fluid, aff, "stir")}
    if with_t1:
        images["t1"] = Image(np.where(x < 30, 300.0, 100.0).astype(np.float32), aff, "t1")
    seg = seg_mod.segment(images, small_model, shading=False)
    assert seg.fluid_fat_ratio == pytest.approx(fat_on_fluid / 100.0, rel=0.05)
    bright = [w for w in seg.warnings if w.startswith("fat is bright on the fluid series")]
    if fat_on_fluid < 100:
        assert calls == [(True, True)] and not bright
    elif with_t1:
        assert calls == [(True, True), (True, False)]
        assert len(bright) == 1 and bright[0].endswith("segmented from the T1 alone")
    else:
        assert calls == [(False, True)] and len(bright) == 1 and "less certain" in bright[0]


def test_thin_slices_are_smoothed_to_the_working_slices_and_training_ranges_are_not():
    """A series of 1 mm slices is sampled by the 4 mm working grid only after smoothing along its
    slices (no aliasing of alternating slices); the geometries the networks were trained on
    (3-6 mm slices, 0.5-1 mm pixels, oblique up to 12 degrees) are sampled as they were."""
    from pipeline.grid import ANTIALIAS_MIN_FACTOR, antialias_widths, box_kernel

    for name, aff in AFFINES.items():
        ref = Image(np.zeros((9, 37, 41) if name == "slice_first" else (37, 41, 9), np.float32), aff, "t1")
        assert not antialias_widths(ref, make_working_grid(ref).affine).any(), name
    fine = np.vstack([np.hstack([_rotation(0, 12) @ np.diag([0.5, 0.5, 3.0]), [[0], [0], [0]]]), [0, 0, 0, 1]])
    ref = Image(np.zeros((400, 400, 30), np.float32), fine, "t1")
    assert not antialias_widths(ref, make_working_grid(ref).affine).any()

    thin = Image(np.zeros((30, 30, 48), np.float32), np.diag([0.8, 0.8, 1.0, 1.0]), "t1")
    grid = make_working_grid(thin)
    width = antialias_widths(thin, grid.affine)
    assert width[0] == width[1] == 0 and width[2] == pytest.approx(4.0)   # 4 slices per working slice
    np.testing.assert_allclose(box_kernel(4.0), [0.125, 0.25, 0.25, 0.25, 0.125])
    np.testing.assert_allclose(box_kernel(2.5), [0.0, 0.3, 0.4, 0.3, 0.0], atol=1e-12)
    from pipeline.grid import resample_linear

    def seen(k, antialias):
        """The working grid's view of a 1 mm bright plate on slice k: its largest value."""
        a = np.zeros(thin.shape, np.float32)
        a[..., k] = 1.0
        return float(resample_linear(thin.with_array(a), grid.shape, grid.affine, antialias)[15, 15].max())

    plain = [seen(k, None) for k in range(20, 24)]
    smooth = [seen(k, ANTIALIAS_MIN_FACTOR) for k in range(20, 24)]
    assert min(plain) == 0.0 and max(plain) > 0.4          # aliased: missed on 2 of 4 phases
    assert min(smooth) >= 0.18 and max(smooth) <= 0.25       # every phase seen alike, as a 4 mm slice
    inp = prepare_inputs({"t1": thin.with_array(np.random.default_rng(0).random(thin.shape).astype(np.float32))},
                         ("t1", "fluid"), (1.0, 1.0, 4.0))
    assert inp.array.shape[1:] == grid.shape


def _body_phantom(shape=(120, 100, 8), spacing=(1.0, 1.0, 4.0)):
    """A T1-like slab: an elliptic body (muscle 300, a 6 mm fat rim 900, a dark bladder 40
    inside) in noisy air (~20), RAS."""
    rng = np.random.default_rng(1)
    x, y = np.meshgrid(np.arange(shape[0]) - 60.0, np.arange(shape[1]) - 50.0, indexing="ij")
    r = (x / 45.0) ** 2 + (y / 30.0) ** 2
    sl = np.where(r < 1, 300.0, 0.0) + np.where((r < 1) & (r > 0.75), 600.0, 0.0)
    sl = np.where((x / 8.0) ** 2 + (y / 6.0) ** 2 < 1, 40.0, sl)
    arr = np.abs(sl[..., None] + rng.normal(0, 20, shape)).astype(np.float32)
    return Image(arr, np.diag([*spacing, 1.0]), "t1"), r


def test_body_region_covers_the_body_and_its_margin_and_not_the_far_air():
    from pipeline.grid import BODY_MARGIN_MM, body_region

    t1, r = _body_phantom()
    inp = prepare_inputs({"t1": t1}, ("t1", "fluid"), (1.0, 1.0, 4.0))
    body = body_region(inp)
    assert body.shape == inp.grid.shape
    assert body[r < 1].all()                           # the whole body, the dark bladder too
    ring = (r > 1.0) & (r < 1.1)                       # at most ~4.5 mm outside its edge
    assert body[ring].all()
    far = np.hypot(*np.meshgrid(np.arange(120) - 60.0, np.arange(100) - 50.0, indexing="ij")) > 45 + 2 * BODY_MARGIN_MM
    assert not body[far].any() and far.any()
    fluid_only = prepare_inputs({"fluid": t1.with_array(t1.array)}, ("t1", "fluid"), (1.0, 1.0, 4.0))
    assert body_region(fluid_only) is None             # fat may be as dark as air there


def test_body_region_keeps_a_dark_interior_open_to_the_field_edge():
    """Another scanner's contrast can leave muscle at a few per cent of fat on T1; on a single-hip
    field of view the body runs off the edge, so no fat ring closes around it. Such muscle, 40 mm
    from any fat, is body, not air."""
    from pipeline.grid import body_region

    rng = np.random.default_rng(2)
    shape = (120, 100, 8)
    x = np.arange(shape[0])[:, None] + np.zeros(shape[1])[None, :]
    y = np.zeros(shape[0])[:, None] + np.arange(shape[1])[None, :]
    sl = np.where(x > 30, 60.0, 0.0)                   # body from x = 30 mm to the field's edge
    sl[(x > 30) & (x < 36)] = 1000.0                   # a thin bright fat layer on one side only
    arr = np.abs(sl[..., None] + rng.normal(0, 4, shape)).astype(np.float32)
    t1 = Image(arr, np.diag([1.0, 1.0, 4.0, 1.0]), "t1")
    inp = prepare_inputs({"t1": t1}, ("t1", "fluid"), (1.0, 1.0, 4.0))
    assert inp.array[0][80:, :, :].mean() < 0.1        # muscle darker than the old 0.1 threshold
    body = body_region(inp)
    assert body[31:].all() and not body[:10].any()


def test_the_air_around_the_body_is_background_whatever_the_network_says(monkeypatch, small_model):
    """A network that draws 'femur' at the corners of the field of view (a longer-trained model
    did, and a left-right pair of such blobs can outdo the real femora): with a T1 that air is
    background; with the model's body_mask off, or without a T1, the network's labels stand."""
    import copy

    import pipeline.segment as seg_mod

    t1, r = _body_phantom()
    k = len(LABELS)
    fem, om = LABELS["femur"], LABELS["other_muscle"]

    def fake(net, array, meta, device, *a, **kw):
        logits = torch.zeros((k, *array.shape[1:]))
        logits[om] = 1.0
        logits[fem, :8, :8] = 5.0                     # two corners, left and right
        logits[fem, -8:, :8] = 5.0
        return logits

    monkeypatch.setattr(seg_mod, "predict_logits", fake)
    out = seg_mod.segment({"t1": t1}, small_model, shading=False).labels.array
    assert not (out == fem).any() and (out[r < 1] == om).all() and (out[:8, :8] == 0).all()
    off = copy.copy(small_model)
    off.meta = copy.deepcopy(small_model.meta)
    off.meta["inference"]["body_mask"] = False
    assert (seg_mod.segment({"t1": t1}, off, shading=False).labels.array[:8, :8] == fem).all()
    fluid = seg_mod.segment({"fluid": t1.with_array(t1.array)}, small_model, shading=False).labels.array
    assert (fluid[:8, :8] == fem).all()
