"""Segment hip MRI with the ifi-seg network: load the model, run it, post-process.

``segment(images, model)`` takes T1 and/or a fluid-sensitive series (any orientation, grid or
field of view; see ``pipeline.grid``), runs the network on the working grid and returns the
label map on the reference image's ORIGINAL grid (same shape and affine as the input T1, or the
fluid image when there is no T1), in project label values (``pipeline.labels.LABELS``).

Post-processing (conservative; sides are never relabelled, classes are side-agnostic):
  * paired structures (QF, LT, IT, hamstring and iliopsoas tendons, femur, gluteus maximus):
    keep the pair of connected components most like a left and a right instance (>= 40 mm
    apart along the world left-right axis, offset within 45 degrees of that axis, each at least
    10 % of the largest component, similar sizes: ``pipeline.sides.left_right_pair``), else the
    largest component alone (single hip), plus fragments whose centroid lies within 10 mm of a
    kept component's bounding box (a structure broken by a slice gap), plus, for the hamstring
    and iliopsoas tendons, components touching (within 3 mm of) the kept landmark they attach to
    (ischial tuberosity, lesser trochanter): the top of the hamstring origin, where QFS is
    measured, is often a separate piece. Everything else of that class is an island: a large
    stray blob in front of the pelvis does not displace a femur.
    The bony landmarks are chosen among the components touching their bone when there are any
    (lesser trochanter: within 3 mm of the kept femur; ischial tuberosity: of the kept pelvis),
    so a detached blob behind the hips is not taken for a lesser trochanter.
  * other classes (pelvis, subcutaneous fat, other muscle): drop components smaller than 1 % of
    the class volume and smaller than 500 mm^3.
  * island voxels take their next most probable class; further passes remove islands that this
    relabelling creates, until there are none.
  * before all this, with a T1, the air more than 15 mm from the body is background
    (``pipeline.grid.body_region``): a network may draw structures there, at the corners of a
    large field of view, and a left-right pair of such blobs can outdo the real femora.

Intensity shading (``scan_shading``): after the first pass, each input's smooth shading is fitted
on the network's confident muscle (and, on T1, fat) voxels. Surface coils without intensity
normalisation make the centre of the body darker than the training data's mild bias fields ever
did; above ``RESEGMENT_SHADING_RATIO`` the shading is divided out and the network runs again
(a warning says so). The labels then come from the corrected images; the measurement still reads
the original ones (it corrects its signal statistics itself, ``pipeline.signal.fit_shading``).

Confidence per structure (``Segmentation.confidence``): the mean, over the voxels finally
labelled as that structure, of the network's softmax probability for that structure (0..1;
0.0 when the structure is absent). It is low when the network hesitated at most voxels of the
structure; a report can call a structure uncertain below ``CONFIDENCE_WARN``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import MeasureConfig
from pipeline.image import Image
from pipeline.labels import KEY_STRUCTURES, LABELS, label_names
from pipeline.sides import left_right_pair

#: Structures with one instance per hip.
PAIRED = ("quadratus_femoris", "lesser_trochanter", "ischial_tuberosity", "hamstring_tendon",
          "iliopsoas_tendon", "femur", "gluteus_maximus")
#: Below this confidence a structure is reported as uncertain.
CONFIDENCE_WARN = 0.7
#: Bony landmarks and the bone they belong to: post-processing keeps the landmark's components
#: that touch (within ``ATTACHED_MM`` of) the kept bone when there are any.
PARENT_BONE = {"lesser_trochanter": "femur", "ischial_tuberosity": "pelvis"}
#: Tendons and the landmark they attach to: post-processing also keeps a tendon's components that
#: touch (within ``ATTACHED_MM`` of) the kept landmark, however far from the tendon's main part.
#: The top of the hamstring origin is often a separate piece on the ischial tuberosity (the
#: network labels the slices below it as bone or muscle), and it is where QFS is measured.
ATTACHMENT = {"hamstring_tendon": "ischial_tuberosity", "iliopsoas_tendon": "lesser_trochanter"}
#: Post-processing constants (mm, mm^3).
ATTACHED_MM = 3.0
#: Island removal repeats until nothing is removed: a voxel whose class was an island takes its
#: next best one, which may be an island too (where the network hesitates among several
#: structures, e.g. on anatomy it never saw, such as the iliac wings of a whole-pelvis scan; two
#: passes left stray hamstring and iliopsoas tendon blobs there, 80 mm above the hip, that faked a
#: 0.5 mm QFS). A voxel can leave each class once, so this many passes always suffice.
POSTPROCESS_PASSES = len(LABELS)
CONTRALATERAL_MIN_MM = 40.0
FRAGMENT_MARGIN_MM = 10.0
ISLAND_MAX_MM3 = 500.0
#: A scan whose fitted intensity shading (largest / smallest value over its muscles, see
#: ``scan_shading``) exceeds this is corrected for it and segmented again. Held-out phantoms, first
#: pass: 1.04-1.24 as generated (one STIR-only scan of 20: 2.15), 1.5-2.7 with strong surface-coil
#: shading added (data_scripts/shift_cohort.py --shift coil).
RESEGMENT_SHADING_RATIO = 1.4
#: At most this many corrections and further passes (each refits the shading on better outlines).
RESEGMENT_PASSES = 2
#: Voxels the network gives more than this probability of a tissue are used to fit the shading.
SHADING_MIN_PROB = 0.9
#: A fluid series on which fat is more than this many times as bright as muscle is not
#: fat-suppressed (or its fat suppression failed): held-out phantoms' T2 fat-sat and STIR
#: 0.1-1.2, an unsuppressed fast spin-echo T2 about 3-5. The measurement's bound for the edema
#: grade (``MeasureConfig.fat_suppression_max_ratio``). Such a series is left out of the
#: network's input when a T1 is there (``segment``).
UNSUPPRESSED_FAT_RATIO = MeasureConfig.fat_suppression_max_ratio
#: A T1 on which subcutaneous fat is below this many times muscle is not a T1 without fat
#: suppression (held-out phantoms' T1 2.7-4.8, 0.9 at the least under the tissue-contrast probe
#: at factors up to 2.5; their fat-suppressed fluid series 0.1-1.2, the example's STIR 0.4). With a
#: fluid series beside it, the T1 is left out of the network's input; with a fluid series on which
#: fat is bright, the two were given the wrong way round (``Segmentation.t1_fluid_swapped``;
#: ``pipeline.api.run_subject`` exchanges them).
T1_MIN_FAT_RATIO = 0.8
#: The mirror test-time pass covers the measured structures (``MIRROR_CLASSES``, as the first pass
#: labels them) plus this margin (working-grid voxels along each axis): the network was trained on
#: 128 x 128 x 16 patches, and the margin keeps the crop's edges, where it sees zero padding instead
#: of the body, away from them; the mirrored logits fade in across it.
MIRROR_CLASSES = KEY_STRUCTURES + ("iliopsoas_tendon",)
MIRROR_MARGIN_VOXELS = (24, 24, 4)
#: Command-line choices for the mirror pass -> ``segment(mirror=...)`` (None: the model's setting).
MIRROR_CHOICES = {"model": None, "on": True, "off": False, "full": "full"}


@dataclass
class SegModel:
    """A loaded network with its metadata."""

    net: "object"
    meta: dict
    device: "object"
    path: str | None = None

    @property
    def channels(self) -> list[str]:
        return list(self.meta["input_channels"])


@dataclass
class Segmentation:
    """Result of ``segment``."""

    labels: Image                       # uint8, on the reference image's original grid
    confidence: dict[str, float]        # structure name -> mean softmax prob inside it
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None   # (C, *working shape) float32, if requested
    working_affine: np.ndarray | None = None  # affine of ``probabilities``
    reference: str = "t1"
    shading_corrected: bool = False     # labels from images corrected for strong shading
    # channels covering only part of the body, beyond which the labels come from a pass without
    # them (``reference_probabilities``)
    partial_channels: list[str] = field(default_factory=list)
    # median of confident subcutaneous fat over that of confident muscle (``fat_muscle_ratio``)
    # on the fluid series and on the T1; None without the series
    fluid_fat_ratio: float | None = None
    t1_fat_ratio: float | None = None
    # the T1 reads fluid-sensitive and the fluid series T1-weighted: given the wrong way round
    # (only the first pass was made)
    t1_fluid_swapped: bool = False


def _default_threads() -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))


def load_model(path: str | Path | None = None, device: str = "auto") -> SegModel:
    """Load a model bundle (the bundled default when ``path`` is None).

    ``device``: "auto" (CUDA if available else CPU), "cpu" or "cuda". Raises FileNotFoundError
    naming the missing file when the weights or metadata are absent.
    """
    import torch

    from models.bundle import DEFAULT_BUNDLE, load_bundle

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        _default_threads()
    net, meta = load_bundle(DEFAULT_BUNDLE if path is None else path, device=dev)
    return SegModel(net, meta, dev, str(path) if path is not None else str(DEFAULT_BUNDLE))


def predict_logits(net, array: np.ndarray, meta: dict, device, bf16: bool | None = None,
                   mirror: bool | str = False):
    """Run the network on a (C, X, Y, Z) working-grid array; returns (K, X, Y, Z) float32 logits (torch).

    Input padded to the network's size divisor. ``meta["inference"]["mode"]``: "whole" (one pass),
    "sliding_window" (MONAI, ``roi_size``/``overlap``) or "auto" (whole up to ``max_whole_voxels``).
    ``mirror``: test-time augmentation, the mean of the logits of the array and of its left-right
    mirror image (axis 0 of the working grid is the reoriented left-right axis; the classes are
    side-agnostic and training mirrored along it). With True the mirrored pass covers only the
    boxes around the measured structures that the plain pass finds (``mirror_boxes``), so it adds
    a fraction of the network time, and elsewhere the plain logits stand; with "full" it covers
    the whole array (twice the network time).
    """
    import torch

    if mirror:
        plain = predict_logits(net, array, meta, device, bf16)
        boxes = ([((slice(None),) * 3, np.ones(array.shape[1:], np.float32))] if mirror == "full"
                 else mirror_boxes(plain.argmax(0).numpy(), meta))
        for box, weight in boxes:
            crop = np.ascontiguousarray(array[(slice(None), *box)][:, ::-1])
            flipped = predict_logits(net, crop, meta, device, bf16).flip(1)
            w = torch.from_numpy(0.5 * weight)
            with torch.inference_mode():      # the logits are inference tensors
                region = plain[(slice(None), *box)]
                plain[(slice(None), *box)] = region * (1.0 - w) + flipped * w
        return plain
    from monai.inferers import sliding_window_inference

    from models.net import bf16_native, divisor, memory_layout

    inf = meta.get("inference", {})
    if bf16 is None:
        bf16 = bool(inf.get("bf16", False))
    bf16 = bf16 and bf16_native(device)
    div = np.asarray(divisor(meta["architecture"]))
    shape = np.asarray(array.shape[1:])
    padded = (np.ceil(shape / div) * div).astype(int)
    x = torch.zeros((1, array.shape[0], *padded), dtype=torch.float32)
    x[0, :, : shape[0], : shape[1], : shape[2]] = torch.from_numpy(array)
    x = x.to(device)
    layout = memory_layout(device, bf16)
    net.to(memory_format=layout)
    x = x.contiguous(memory_format=layout)
    roi = np.minimum(np.asarray(inf.get("roi_size", padded)), padded)
    roi = (np.ceil(roi / div) * div).astype(int)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        mode = inf.get("mode", "auto")
        whole = mode == "whole" or np.all(roi >= padded) or (
            mode == "auto" and int(np.prod(padded)) <= int(
                inf.get("max_whole_voxels", 8_000_000) if bf16 else inf.get("max_whole_voxels_fp32", 4_500_000)))
        if whole:
            out = net(x)
        else:
            out = sliding_window_inference(x, tuple(int(r) for r in roi), 1, net,
                                           overlap=float(inf.get("overlap", 0.25)), mode="gaussian")
    out = out.float()[0, :, : shape[0], : shape[1], : shape[2]].cpu()
    return out


def mirror_boxes(labels: np.ndarray, meta: dict, margin=MIRROR_MARGIN_VOXELS) -> list:
    """Working-grid boxes for the mirror test-time pass: one per run of left-right columns that
    holds ``MIRROR_CLASSES`` (one per hip in view, or one over both where they run together),
    each spanning those structures plus ``margin`` voxels, with a weight (box shape, 0..1) that
    ramps from 0 at the box's cut edges to 1 at the margin's inner edge (a box edge at the
    array's border is no cut: full weight there). Returns [(slices, weight float32)]."""
    from models.net import divisor

    div = np.asarray(divisor(meta["architecture"]), int)
    ids = [int(meta["labels"][n]) for n in MIRROR_CLASSES if n in meta["labels"]]
    mask = np.isin(labels, ids)
    if not mask.any():
        return []
    from scipy import ndimage

    shape, margin = np.asarray(labels.shape), np.asarray(margin, int)
    cols = np.flatnonzero(mask.any(axis=(1, 2)))
    run_of_column = np.zeros(shape[0], np.int32)
    for r, run in enumerate(np.split(cols, np.flatnonzero(np.diff(cols) > 2 * margin[0]) + 1), 1):
        run_of_column[run[0]: run[-1] + 1] = r
    out = []
    for sl in ndimage.find_objects(np.where(mask, run_of_column[:, None, None], 0)):
        lo, hi = np.array([a.start for a in sl]), np.array([a.stop for a in sl])
        start, stop = np.maximum(lo - margin, 0), np.minimum(hi + margin, shape)
        # on the network's stride lattice of the whole array (its mirror image along axis 0), so
        # that the crop sees the voxels the same way a pass over the whole array would
        start[1:] -= start[1:] % div[1:]
        stop[0] += (shape[0] - stop[0]) % div[0]
        ramps = []
        for a in range(3):
            n, m = int(stop[a] - start[a]), max(int(margin[a]), 1)
            pos = np.arange(n, dtype=np.float32)
            up = np.ones(n, np.float32) if start[a] == 0 else np.minimum((pos + 1) / m, 1.0)
            down = np.ones(n, np.float32) if stop[a] == shape[a] else np.minimum((n - pos) / m, 1.0)
            ramps.append(np.minimum(up, down))
        weight = ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]
        out.append((tuple(slice(int(a), int(b)) for a, b in zip(start, stop)), weight.astype(np.float32)))
    return out


def _component_stats(lab: np.ndarray, n: int, affine: np.ndarray):
    """Voxel counts and world centroids of components 1..n of a component image."""
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    ijk = np.nonzero(lab)
    ids = lab[ijk]
    cents = np.stack([np.bincount(ids, weights=c, minlength=n + 1)[1:] for c in ijk], 1) / counts[:, None]
    return counts, cents @ affine[:3, :3].T + affine[:3, 3]


def _world_box(sl, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (min, max) of an index box given as a tuple of slices."""
    lo = np.array([s.start for s in sl], float) - 0.5
    hi = np.array([s.stop for s in sl], float) - 0.5
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    w = corners @ affine[:3, :3].T + affine[:3, 3]
    return w.min(0), w.max(0)


def _distance_to_parent(lab: np.ndarray, n: int, sl: tuple, labels: np.ndarray, parent_value: int,
                        removed: np.ndarray, spacing: np.ndarray, reach_mm: float) -> np.ndarray:
    """Shortest distance (mm) from each component 1..n of ``lab`` (a box ``sl`` of the full grid)
    to the kept voxels of class ``parent_value`` (``labels`` not ``removed``), looked for in the
    box grown by ``reach_mm`` (farther parents read as farther than ``reach_mm``)."""
    from scipy import ndimage

    pad = [int(np.ceil(reach_mm / max(sp, 1e-6))) + 1 for sp in spacing]
    big = tuple(slice(max(0, s.start - p), min(dim, s.stop + p)) for s, p, dim in zip(sl, pad, labels.shape))
    sub_parent = (labels[big] == parent_value) & ~removed[big]
    if not sub_parent.any():
        return np.full(n, np.inf)
    sub_lab = np.zeros(sub_parent.shape, lab.dtype)
    sub_lab[tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sl, big))] = lab
    dist = ndimage.distance_transform_edt(~sub_parent, sampling=spacing)
    return np.asarray(ndimage.minimum(dist, sub_lab, np.arange(1, n + 1)), float)


def postprocess(labels: np.ndarray, affine: np.ndarray, only=None) -> tuple[np.ndarray, dict[str, int]]:
    """Island mask per the module docstring: returns (bool mask of voxels to relabel, removed count per class).

    ``only``: label values to check (default all); the others are left as they are.
    """
    from scipy import ndimage

    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    remove = np.zeros(labels.shape, bool)
    removed: dict[str, int] = {}
    structure = np.ones((3, 3, 3), bool)
    objs = ndimage.find_objects(labels)
    # parents first: a bony landmark is chosen among the components that touch its bone
    order = sorted(LABELS.items(), key=lambda kv: kv[0] not in PARENT_BONE.values())
    for name, value in order:
        if value == 0 or value > len(objs) or objs[value - 1] is None or (only is not None and value not in only):
            continue
        sl = objs[value - 1]
        # work inside the class bounding box (cheap), offset the affine accordingly
        sub_aff = affine.copy()
        sub_aff[:3, 3] = affine[:3, :3] @ np.array([s.start for s in sl]) + affine[:3, 3]
        mask = labels[sl] == value
        lab, n = ndimage.label(mask, structure)
        if n <= 1:
            continue
        keep = np.zeros(n + 1, bool)

        def touching(parent: str) -> np.ndarray:
            """Which components lie within ``ATTACHED_MM`` of the kept voxels of ``parent``."""
            return _distance_to_parent(lab, n, sl, labels, LABELS[parent], remove, spacing,
                                       ATTACHED_MM) <= ATTACHED_MM

        if name in PAIRED:
            counts, cents = _component_stats(lab, n, sub_aff)
            pool = np.arange(n)
            if name in PARENT_BONE:
                attached = np.flatnonzero(touching(PARENT_BONE[name]))
                if attached.size:
                    pool = attached
            pair = left_right_pair(cents[pool], counts[pool], CONTRALATERAL_MIN_MM)
            anchors = [int(pool[i]) for i in pair] if pair is not None else [int(pool[np.argmax(counts[pool])])]
            keep[np.asarray(anchors) + 1] = True
            objs_c = ndimage.find_objects(lab)
            boxes = [_world_box(objs_c[a], sub_aff) for a in anchors]
            for lo, hi in boxes:
                near = np.all((cents >= lo - FRAGMENT_MARGIN_MM) & (cents <= hi + FRAGMENT_MARGIN_MM), axis=1)
                keep[1:] |= near
            if name in ATTACHMENT and not keep[1:].all():
                keep[1:] |= touching(ATTACHMENT[name])
        else:   # sizes only: centroids of the large unpaired classes would cost a full scan
            counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            total = counts.sum()
            keep[1:] = (counts >= 0.01 * total) | (counts * voxel_mm3 >= ISLAND_MAX_MM3)
        drop = ~keep[lab] & mask
        if drop.any():
            remove[sl] |= drop
            removed[name] = int(drop.sum())
    return remove, removed


def relabel_islands(labels: np.ndarray, scores: np.ndarray, affine: np.ndarray) -> dict[str, int]:
    """``postprocess`` applied to a label map in place: island voxels take their next best class
    by ``scores`` (K, *labels.shape; probabilities or log-probabilities), which is modified in
    place too (a removed class is set to -inf at those voxels). Further passes catch the islands
    that this relabelling creates (a stray blob's runner-up class may be a landmark far from its
    bone), until there are none. Returns the number of voxels removed per class."""
    removed: dict[str, int] = {}
    only = None
    for _ in range(POSTPROCESS_PASSES):
        remove, removed_now = postprocess(labels, affine, only)
        if not remove.any():
            break
        for k, v in removed_now.items():
            removed[k] = removed.get(k, 0) + v
        idx = np.nonzero(remove)
        scores[(labels[idx], *idx)] = -np.inf       # never this class again for these voxels
        labels[idx] = scores[(slice(None), *idx)].argmax(axis=0).astype(labels.dtype)
        only = set(np.unique(labels[idx]).tolist())
    return removed


def input_mode(present: dict[str, bool]) -> str:
    """Name of an input combination, e.g. "t1+fluid", "t1", "fluid" (the channels present, in
    the model's channel order): the key of ``inference.class_offsets``."""
    return "+".join(c for c, ok in present.items() if ok)


def class_offsets(meta: dict, present: dict[str, bool]) -> np.ndarray | None:
    """Per-class logit offsets (K,) for this input combination from the model metadata
    (``inference.class_offsets[mode][class name]``, fitted by ``pipeline.calibrate``); None when
    the model has none for it."""
    table = (meta.get("inference", {}).get("class_offsets") or {}).get(input_mode(present))
    if not table:
        return None
    labels = meta["labels"]
    out = np.zeros(max(int(v) for v in labels.values()) + 1, np.float32)
    for name, value in table.items():
        if name not in labels:
            raise ValueError(f"class_offsets names an unknown class {name!r}")
        out[int(labels[name])] = float(value)
    return out


def reference_probabilities(images: dict[str, Image], model: SegModel, reference: str | None = None,
                            bf16: bool | None = None, mirror: bool | str | None = None,
                            offsets: bool = True, timings: dict | None = None,
                            partial_coverage: bool = True, exclude=()):
    """The network's class probabilities for a scan, before post-processing.

    Returns ``(inputs, probs_w, probs_t)``: the ``GridInputs`` (working grid, channels present,
    warnings), the softmax on the working grid (K, *working shape) and on the reference image's
    original grid (K, *reference shape), both torch float32. Unless ``offsets`` is False, the
    model's class offsets for the input combination are then applied on each grid (each class's
    probability times exp(offset), renormalised), after the blend of partial-coverage passes and
    the mapping to the reference grid: the model ``pipeline.calibrate`` fits them under.
    ``partial_coverage``: where a series covers only part of the body (``GridInputs.coverage``),
    blend in the network's output without that channel (a second pass); False skips it.
    ``exclude``: channels the network runs without, as if they were missing (their images still
    define the grid when they are the reference). With a T1, the air beyond ``BODY_MARGIN_MM``
    of the body (``pipeline.grid.body_region``) is background whatever the network says, unless
    the model's ``inference.body_mask`` is false.
    """
    import torch

    from pipeline.grid import NORMALISATION, body_region, prepare_inputs

    meta = model.meta
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    inputs = prepare_inputs(images, meta["input_channels"], meta["working_spacing_mm"], reference,
                            meta.get("normalisation") or NORMALISATION)
    timings["resample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if mirror is None:
        mirror = meta.get("inference", {}).get("mirror", False)

    def probabilities(array):
        return torch.softmax(predict_logits(model.net, array, meta, model.device, bf16, mirror),
                             dim=0)

    present = {c: p and c not in exclude for c, p in inputs.present.items()}
    if exclude:
        inputs.array[[inputs.channels.index(c) for c in exclude if c in inputs.channels]] = 0.0
    probs_w = probabilities(inputs.array)
    # a series covering part of the body is zero beyond it, which the network never saw: there,
    # and ramping in from its edge, use the network's output without that channel
    for c, weight in (inputs.coverage.items() if partial_coverage else ()):
        if c in exclude:
            continue
        inputs.warnings.append(f"where the {c} series does not reach, the labels come from the "
                               "network without it")
        without = inputs.array.copy()
        without[inputs.channels.index(c)] = 0.0
        alone = probabilities(without)
        w = torch.from_numpy(weight)[None]
        probs_w = w * probs_w + (1.0 - w) * alone
    timings["network"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    use_body = meta.get("inference", {}).get("body_mask", True) and "t1" not in exclude
    body = body_region(inputs) if use_body else None
    if body is not None and not body.all():          # air around the body is background
        background = torch.zeros((probs_w.shape[0], 1, 1, 1), dtype=probs_w.dtype)
        background[0] = 1.0
        probs_w = torch.where(torch.from_numpy(body)[None], probs_w, background)
    timings["body"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    probs_t = inputs.grid.to_reference(probs_w, as_tensor=True)    # (K, *ref_shape)
    shift = class_offsets(meta, present) if offsets else None
    if shift is not None:
        # on each grid, after the mapping between them: the labels are then exactly those
        # ``pipeline.calibrate`` fitted the offsets on (log-probabilities on the label grid +
        # offsets); on the working grid this equals adding the offsets to the logits
        weights = torch.from_numpy(np.exp(shift).astype(np.float32))[:, None, None, None]
        probs_w = probs_w * weights                 # a new tensor: the network's may be read-only
        probs_w /= probs_w.sum(dim=0, keepdim=True)
        probs_t *= weights
        probs_t /= probs_t.sum(dim=0, keepdim=True)
    timings["postprocess"] = time.perf_counter() - t0
    return inputs, probs_w, probs_t


def scan_shading(images: dict[str, Image], probs_w, working_affine: np.ndarray,
                 stride: int = 2) -> dict:
    """Whole-scan intensity shading of each network input, fitted on the network's own outlines.

    ``signal.fit_shading`` (degree 2, world coordinates) on the working-grid voxels that the
    network gives more than ``SHADING_MIN_PROB`` of gluteus maximus or other muscle, and on T1
    also of subcutaneous fat (fat-suppressed fat has no signal to fit); confident voxels lie
    inside their structure, clear of partial volume. Returns ``{image key: Shading}`` for the
    images where a fit was possible.
    """
    from pipeline.sides import Mask
    from pipeline.signal import SHADING_TISSUES, fit_shading

    # every ``stride``-th working voxel along each axis: 2 is enough to detect shading and 8x
    # cheaper; the correction itself is fitted on all of them
    masks, aff = _confident(probs_w, working_affine, SHADING_TISSUES["t1"], stride)
    muscle = masks["gluteus_maximus"] | masks["other_muscle"]
    if not muscle.any():
        return {}
    centre = np.argwhere(muscle).mean(0) @ aff[:3, :3].T + aff[:3, 3]
    out = {}
    for key, img in images.items():
        if img is None or key not in SHADING_TISSUES:
            continue
        tissues = [Mask(np.zeros(3, int), masks[n]) for n in SHADING_TISSUES[key] if masks[n].any()]
        fit = fit_shading(img, tissues, aff, centre, None, 2)
        if fit is not None:
            out[key] = fit
    return out


def _confident(probs_w, working_affine: np.ndarray, names, stride: int) -> tuple[dict, np.ndarray]:
    """Masks of the voxels given more than ``SHADING_MIN_PROB`` of each structure in ``names``,
    on every ``stride``-th working voxel, and the affine of that subsampled grid."""
    p = probs_w.numpy() if hasattr(probs_w, "numpy") else np.asarray(probs_w)
    p = p[:, ::stride, ::stride, ::stride]
    aff = np.array(working_affine, float)
    aff[:3, :3] *= float(stride)
    return {n: p[LABELS[n]] > SHADING_MIN_PROB for n in names}, aff


def fat_muscle_ratio(images: dict[str, Image], probs_w, working_affine: np.ndarray,
                     series: str = "fluid", stride: int = 2) -> float | None:
    """Median signal of ``series`` ("fluid" or "t1") over the voxels the network is sure are
    subcutaneous fat, divided by that over those it is sure are muscle (gluteus maximus, other
    muscle); None without the series or either tissue. Fat-suppressed series stay near or below 1
    (``UNSUPPRESSED_FAT_RATIO``), a T1 well above (``T1_MIN_FAT_RATIO``)."""
    from pipeline.grid import FLUID_KEYS, pick_image
    from pipeline.sides import Mask
    from pipeline.signal import sample_in_mask

    img = pick_image(images, FLUID_KEYS if series == "fluid" else (series,))[1]
    if img is None:
        return None
    masks, aff = _confident(probs_w, working_affine,
                            ("subcutaneous_fat", "gluteus_maximus", "other_muscle"), stride)
    muscle = masks["gluteus_maximus"] | masks["other_muscle"]
    f = sample_in_mask(img, Mask(np.zeros(3, int), masks["subcutaneous_fat"]), aff)
    m = sample_in_mask(img, Mask(np.zeros(3, int), muscle), aff)
    if min(f.size, m.size) < 100 or np.median(m) <= 0:
        return None
    return float(np.median(f) / np.median(m))


def _unshaded(img: Image, shading) -> Image:
    """``img`` divided by the shading evaluated at its voxel centres (world coordinates)."""
    out = np.empty(img.shape, np.float32)
    ijk = np.indices(img.shape[1:], dtype=np.float64).reshape(2, -1).T
    for i in range(img.shape[0]):         # one plane at a time keeps the basis small
        pts = np.column_stack([np.full(len(ijk), i, np.float64), ijk])
        out[i] = (img.array[i].ravel() / shading(img.voxel_to_world(pts))).reshape(img.shape[1:])
    return img.with_array(out)


def segment(images: dict[str, Image], model: SegModel, reference: str | None = None,
            return_probabilities: bool = False, bf16: bool | None = None,
            mirror: bool | str | None = None, shading: bool = True,
            partial_coverage: bool = True) -> Segmentation:
    """Segment the hip structures; see the module docstring.

    Args:
        images: "t1" and/or "fluid" (or "t2fs"/"stir"); optional "dixon_fat"/"dixon_water"
            (accepted, not used by the current network: a warning says so).
        model: from ``load_model``.
        reference: the image whose grid the labels are returned on (default "t1" if present).
        return_probabilities: keep the softmax on the working grid in the result.
        bf16: bfloat16 autocast (default: the model metadata's choice).
        mirror: left-right mirror test-time augmentation (``predict_logits``: True around the
            measured structures, "full" over the whole grid; default: the model metadata's
            ``inference.mirror``).
        shading: after the first pass, fit each input's intensity shading on the network's muscle
            (and T1 fat) outlines (``scan_shading``); when the strongest exceeds
            ``RESEGMENT_SHADING_RATIO`` (surface coils without intensity normalisation, which the
            network was not trained for), divide it out and segment again, with a warning.
        partial_coverage: where the second series covers only part of the reference's body
            (a coronal slab, a smaller field of view), take the labels there from a pass without
            it (``reference_probabilities``), with a warning; False: one pass, as it is.
    """
    seg, probs_w, working_affine = _segment_once(images, model, reference, return_probabilities,
                                                 bf16, mirror, partial_coverage)
    exclude, note = (), None
    t0 = time.perf_counter()
    ratio = fat_muscle_ratio(images, probs_w, working_affine, "fluid")
    t1_img = images.get("t1")
    # a T1-like image made from a Dixon pair has its own swap check (``signal.dixon_swap_check``)
    t1_ratio = (fat_muscle_ratio(images, probs_w, working_affine, "t1")
                if t1_img is not None and "synthesised_from" not in t1_img.meta else None)
    check_s = time.perf_counter() - t0
    t1_dark = t1_ratio is not None and t1_ratio < T1_MIN_FAT_RATIO
    swapped = t1_dark and ratio is not None and ratio > UNSUPPRESSED_FAT_RATIO
    drop, other = None, None
    if swapped:             # no further pass: the caller exchanges the two and segments again
        seg.warnings.append(f"fat reads {t1_ratio:.1f} times the muscles on the T1 and {ratio:.1f} times "
                            "on the fluid series: the two look given the wrong way round")
    elif t1_dark:
        note = (f"fat is no brighter than the muscles on the T1 ({t1_ratio:.1f} times): not a T1 "
                "without fat suppression, unlike the series the network was trained on")
        drop, other = "t1", ("fluid series" if "fluid" in model.channels and ratio is not None else None)
    elif ratio is not None and ratio > UNSUPPRESSED_FAT_RATIO:
        note = (f"fat is bright on the fluid series ({ratio:.1f} times the muscles): not "
                "fat-suppressed, or fat suppression failed, unlike the series the network was "
                "trained on")
        drop, other = "fluid", ("T1" if "t1" in model.channels and t1_img is not None else None)
    if drop and other:      # segmented again without the series that is not what it should be
        exclude = (drop,)
        seg, probs_w, working_affine = _segment_once(images, model, reference, return_probabilities,
                                                     bf16, mirror, partial_coverage, exclude)
        note += f": segmented from the {other} alone"
    elif drop:
        note += ": the labels are less certain; check the QC picture"
    if shading and not swapped:
        seg = _shading_pass(seg, probs_w, working_affine, images, model, reference,
                            return_probabilities, bf16, mirror, partial_coverage, exclude)
    if note:
        seg.warnings.append(note)
    seg.fluid_fat_ratio, seg.t1_fat_ratio, seg.t1_fluid_swapped = ratio, t1_ratio, swapped
    seg.timings["fat_suppression_check"] = check_s
    return seg


def _shading_pass(seg: Segmentation, probs_w, working_affine: np.ndarray,
                  images: dict[str, Image], model: SegModel, reference: str | None,
                  return_probabilities: bool, bf16: bool | None, mirror: bool | None,
                  partial_coverage: bool, exclude) -> Segmentation:
    """``segment``'s shading check on a pass's output (``scan_shading``), and the corrected
    passes when the shading is strong; returns the segmentation to keep."""
    t0 = time.perf_counter()
    fits = scan_shading(images, probs_w, working_affine)
    worst = max((f.range_ratio for f in fits.values()), default=1.0)
    spent = time.perf_counter() - t0                 # fitting and dividing out, not the passes
    if worst <= RESEGMENT_SHADING_RATIO:
        seg.timings["shading"] = spent
        return seg
    first, corrected, passes = seg, dict(images), 0.0
    for _ in range(RESEGMENT_PASSES):
        t0 = time.perf_counter()
        fits = scan_shading(corrected, probs_w, working_affine, stride=1)
        corrected = {k: (_unshaded(v, fits[k]) if k in fits else v) for k, v in corrected.items()}
        spent += time.perf_counter() - t0
        seg, probs_w, working_affine = _segment_once(corrected, model, reference,
                                                     return_probabilities, bf16, mirror,
                                                     partial_coverage, exclude)
        passes += sum(seg.timings.values())
        t0 = time.perf_counter()
        left = scan_shading(corrected, probs_w, working_affine)
        spent += time.perf_counter() - t0
        if max((f.range_ratio for f in left.values()), default=1.0) <= RESEGMENT_SHADING_RATIO:
            break
    what = (f"strong intensity shading ({worst:.1f}-fold over the muscles; surface coils without "
            "intensity normalisation?)")
    # a field fitted on outlines that took in background would distort rather than correct: keep
    # the corrected pass only if the network is at least as sure of the key structures there
    if _key_confidence(seg) < _key_confidence(first):
        first.warnings.append(f"{what}: a pass on the images corrected for it was less confident "
                              "and was not kept")
        first.timings.update(shading=spent, corrected_passes=passes)
        return first
    seg.warnings.append(f"{what}: the images were corrected for it and segmented again")
    seg.timings.update(shading=spent, first_pass=sum(first.timings.values()))
    seg.shading_corrected = True
    return seg


def _key_confidence(seg: Segmentation) -> float:
    """Mean confidence of the four structures the measurements need (absent ones count 0)."""
    return float(np.mean([seg.confidence.get(n, 0.0) for n in KEY_STRUCTURES]))


def _segment_once(images: dict[str, Image], model: SegModel, reference: str | None,
                  return_probabilities: bool, bf16: bool | None, mirror: bool | None,
                  partial_coverage: bool = True, exclude=()):
    """One pass of ``segment``: network, post-processing, confidence. Returns the
    ``Segmentation``, the softmax on the working grid (torch) and the working grid's affine."""
    import torch

    timings: dict[str, float] = {}
    inputs, probs_w, probs_t = reference_probabilities(images, model, reference, bf16, mirror,
                                                       timings=timings,
                                                       partial_coverage=partial_coverage,
                                                       exclude=exclude)
    warnings = list(inputs.warnings)
    t0 = time.perf_counter()
    grid = inputs.grid
    # torch.max over the class axis: the same first-maximum index as argmax, 5-8x faster on the
    # reference grid (0.08 against 0.4-0.7 s for 11 x 320 x 320 x 40 on 2 cores)
    labels = torch.max(probs_t, dim=0).indices.to(torch.uint8).numpy()
    probs = probs_t.numpy()
    removed = relabel_islands(labels, probs, grid.ref_affine)
    names = label_names()
    confidence: dict[str, float] = {}
    flat_lab = labels.ravel()
    counts = np.bincount(flat_lab, minlength=len(names))
    for v, name in enumerate(names):
        if v == 0 or not name:
            continue
        if counts[v] == 0:
            confidence[name] = 0.0
            continue
        confidence[name] = float(probs[v].ravel()[flat_lab == v].mean())
    for name in KEY_STRUCTURES:
        if confidence.get(name, 0.0) == 0.0:
            warnings.append(f"{name} not found")
        elif confidence[name] < CONFIDENCE_WARN:
            warnings.append(f"{name} uncertain (confidence {confidence[name]:.2f})")
    if removed:
        warnings.append("post-processing removed islands: "
                        + ", ".join(f"{k} {v} voxels" for k, v in sorted(removed.items())))
    timings["postprocess"] += time.perf_counter() - t0

    ref_name = grid.reference
    lab_img = Image(labels, grid.ref_affine.copy(), "labels",
                    {"reference": ref_name, "model": model.path, "model_version": model.meta.get("version")})
    return Segmentation(lab_img, confidence, warnings, timings,
                        probs_w.numpy() if return_probabilities else None,
                        grid.affine.copy() if return_probabilities else None, ref_name,
                        partial_channels=sorted(set(inputs.coverage) - set(exclude))
                        if partial_coverage else []), \
        probs_w, grid.affine.copy()
