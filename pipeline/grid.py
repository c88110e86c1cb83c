"""Put the available sequences on ONE working grid in world coordinates, and back again.

Working grid
    Reference = the T1 image if present, else the fluid-sensitive one. Its affine is reoriented
    to the closest RAS axes (``reorient_to_ras``: a permutation/flip, no interpolation), then
    its voxel size is changed to the model's working spacing (default 1.0 x 1.0 x 4.0 mm along
    R, A, S) while keeping the reference's field of view *exactly*: the number of voxels per axis
    is ``round(extent / spacing)`` and the spacing is adjusted so the outer voxel faces of both
    grids coincide. Orientation (even oblique) is that of the reoriented reference.

    Why 1 x 1 x 4 mm: axial hip MRI is 0.5-1 mm in-plane with 3-6 mm slices. 1 mm in-plane keeps
    the lesser trochanter (15-20 mm) at 15-20 voxels; a fixed 4 mm through-plane spacing is the
    middle of clinical slice thicknesses, gives the network one geometry to learn, and keeps a
    320 x 320 x 40 bilateral scan at ~0.4 x 0.4 x 0.04 = 6 M voxels (a one-second CPU pass).

Every channel is resampled (trilinear, in world coordinates) onto the working grid, so the
second sequence may have any orientation, resolution or field of view. A missing channel is
zeros and flagged absent (the network was trained with channel dropout for that case). A second
series that covers only part of the reference's body (a coronal STIR slab behind an axial T1, a
smaller field of view) is zero outside its coverage, which the network never saw in training:
``GridInputs.coverage`` gives, for such a channel, a weight on the working grid (1 more than
``COVERAGE_RAMP_MM`` inside the series' field of view, falling to 0 at its edge), and
``pipeline.segment`` takes the labels outside it from the other channel(s) alone.

Back to the reference grid
    Because the working grid shares the reoriented reference's field of view, the map back is a
    pure per-axis rescaling: ``torch.nn.functional.interpolate(..., align_corners=False)`` on the
    class probabilities, then ``undo_reorient``. The resulting label map has the reference
    image's exact shape and affine.

Normalisation (robust to scanner scaling): per channel, ``lo`` = 1st percentile of all voxels
(the air level), ``hi`` = 99.5th percentile of the voxels brighter than ``lo + 5 %`` of the
range (the body); ``(x - lo) / (hi - lo)`` clipped to [0, 1.5]. Invariant to any positive
linear rescaling of the input.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.image import Image, ImageError, resample_to_grid, validate_intensity_image

#: Working voxel size (mm) along the reoriented R, A, S axes.
DEFAULT_SPACING = (1.0, 1.0, 4.0)

#: The normalisation recipe; copied into model metadata so training and inference agree.
NORMALISATION = {"method": "percentile", "lower_pct": 1.0, "upper_pct": 99.5,
                 "body_fraction": 0.05, "clip": [0.0, 1.5]}

#: A channel is "partial" when more than this share of the reference's body lies outside it; the
#: network's output then ramps from both channels to the others alone over this many mm inside
#: the channel's edge (the network's view of a voxel spans centimetres, so a zero edge nearby
#: still disturbs it).
PARTIAL_COVERAGE_SHARE = 0.03
COVERAGE_RAMP_MM = 10.0

#: A series sampled by the working grid more than this many of its own voxels apart along one of
#: its axes (slices under ~1.8 mm, pixels under ~0.45 mm) is first averaged over the working
#: voxel's extent along that axis, so the network sees what it was trained on (3-6 mm slices, 0.5-1 mm pixels: at most 2, plus the
#: working grid's rounding) and not a sparse, aliased sample of thin slices. Below it the inputs
#: are sampled exactly as in training.
ANTIALIAS_MIN_FACTOR = 2.2

#: The body on the working grid: normalised signal above this (``prepare_inputs``' coverage check,
#: voxel by voxel). Phantom T1: air's 99th percentile 0.02-0.07 voxel by voxel, subcutaneous fat's
#: 1st percentile 0.15-0.3, muscle ~0.3.
BODY_THRESHOLD = 0.1
#: ``body_region`` (T1 only): the mean of blocks of ``BODY_BLOCK`` voxels above this, grown by
#: ``BODY_MARGIN_MM``. Far below the muscle on purpose: with another scanner's contrast (the tissue
#: probe at factors up to 2.5) muscle fell to 0.07 and at 0.1 a single-hip scan's dark interior,
#: open to the field's edge, was taken for air (labels lost 38 mm from any brighter tissue); at
#: 0.04 with 15 mm no labelled voxel of 272 phantoms (every probe) lies outside, and the air the
#: extended model labels (97 % of it over 20 mm from the body) is still cleared.
BODY_T1_THRESHOLD = 0.04
BODY_BLOCK = (4, 4, 1)
BODY_MARGIN_MM = 15.0

#: Image dict keys that feed the "fluid" channel (the fluid-sensitive fat-suppressed series).
FLUID_KEYS = ("fluid", "t2fs", "stir")


@dataclass
class WorkingGrid:
    """Geometry of the working grid and how to map arrays on it back to the reference grid."""

    reference: str                 # which input was the reference ("t1" or "fluid")
    ref_shape: tuple               # original reference image shape
    ref_affine: np.ndarray         # original reference affine
    ornt: np.ndarray               # nibabel orientation used by reorient_to_ras
    ras_shape: tuple               # reference shape after reorientation
    ras_affine: np.ndarray         # reference affine after reorientation
    shape: tuple                   # working grid shape
    affine: np.ndarray             # working grid affine

    @property
    def spacing(self) -> np.ndarray:
        """Actual working voxel size in mm."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def to_reference(self, volume, mode: str = "trilinear", as_tensor: bool = False):
        """Map a (C, *shape) array (torch or numpy) on the working grid to (C, *ref_shape).

        ``mode`` "trilinear" for probabilities/logits, "nearest" for labels (then
        ``nearest-exact`` is used so sampling follows voxel centres). Returns numpy, or a torch
        tensor with ``as_tensor``.
        """
        import torch
        import torch.nn.functional as F

        t = torch.as_tensor(volume)
        if t.ndim != 4 or tuple(t.shape[1:]) != tuple(self.shape):
            raise ValueError(f"expected (C, {self.shape}), got {tuple(t.shape)}")
        if mode == "nearest":
            out = F.interpolate(t[None].float(), size=self.ras_shape, mode="nearest-exact")[0]
            out = out.to(t.dtype)
        else:
            out = F.interpolate(t[None].float(), size=self.ras_shape, mode="trilinear",
                                align_corners=False)[0]
        # undo the reorientation on the whole (C, ...) tensor at once (inverse of
        # nibabel.apply_orientation: original axis i is reoriented axis ornt[i, 0], flipped
        # where ornt[i, 1] == -1), avoiding per-channel copies
        perm = [0] + [1 + int(a) for a in self.ornt[:, 0]]
        out = out.permute(*perm)
        flips = [1 + i for i in range(3) if self.ornt[i, 1] < 0]
        if flips:
            out = torch.flip(out, dims=flips)
        out = out.contiguous()
        return out if as_tensor else out.numpy()


@dataclass
class GridInputs:
    """The network input on the working grid."""

    array: np.ndarray              # (C, *grid.shape) float32, normalised; absent channels zero
    grid: WorkingGrid
    channels: list[str]            # channel names in order
    present: dict[str, bool]       # which channels came from a real image
    warnings: list[str] = field(default_factory=list)
    # channel -> (*grid.shape) float32 weight 0..1 where that series covers only part of the
    # reference's body (``coverage_weight``); absent when it covers it all
    coverage: dict[str, np.ndarray] = field(default_factory=dict)


def make_working_grid(ref: Image, spacing=DEFAULT_SPACING, reference: str = "t1") -> WorkingGrid:
    """Working grid over ``ref``'s field of view with (approximately) ``spacing`` mm voxels."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(ref.affine)
    ras_affine = ref.affine @ nib.orientations.inv_ornt_aff(ornt, ref.shape)
    perm = ornt[:, 0].astype(int)
    ras_shape = [0, 0, 0]
    for src_axis, dst_axis in enumerate(perm):
        ras_shape[dst_axis] = ref.shape[src_axis]
    ras_shape = tuple(ras_shape)
    ras_spacing = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    extent = np.asarray(ras_shape) * ras_spacing
    shape = tuple(max(2, int(round(e / s))) for e, s in zip(extent, spacing))
    # continuous ras voxel coordinate of working voxel j: i = (j + 0.5) * n/m - 0.5
    scale = np.asarray(ras_shape, dtype=float) / np.asarray(shape, dtype=float)
    vox = np.eye(4)
    vox[:3, :3] = np.diag(scale)
    vox[:3, 3] = 0.5 * scale - 0.5
    return WorkingGrid(reference, ref.shape, ref.affine.copy(), ornt, ras_shape, ras_affine,
                       shape, ras_affine @ vox)


def antialias_widths(img: Image, affine, min_factor: float = ANTIALIAS_MIN_FACTOR) -> np.ndarray:
    """Per array axis of ``img``: how many of its voxels one voxel of ``affine`` spans along that
    axis where that exceeds ``min_factor``, else 0 (the axes ``resample_linear`` averages over)."""
    m = np.linalg.inv(img.affine)[:3, :3] @ np.asarray(affine, dtype=np.float64)[:3, :3]
    f = np.abs(m).max(axis=1)                        # source voxels per target step, per source axis
    return np.where(f > min_factor, f, 0.0)


def box_kernel(width: float) -> np.ndarray:
    """Normalised box of (fractional) ``width`` voxels centred on a voxel: the overlap of each
    voxel with the box [-width/2, width/2] (a slice of that thickness averages its voxels so)."""
    half = width / 2.0
    o = np.arange(-int(np.ceil(half)), int(np.ceil(half)) + 1, dtype=np.float64)
    w = np.clip(np.minimum(o + 0.5, half) - np.maximum(o - 0.5, -half), 0.0, 1.0)
    return w / w.sum()


def resample_linear(img: Image, shape, affine, antialias: float | None = None) -> np.ndarray:
    """Trilinear world-coordinate resampling of ``img`` onto (shape, affine) with torch.

    Same result as ``pipeline.image.resample_to_grid(img, shape, affine, order=1)`` (zeros
    outside the source grid) but multi-threaded (``grid_sample``): ~3x faster on 2 cores. With
    ``antialias`` (a factor, e.g. ``ANTIALIAS_MIN_FACTOR``) the source is first averaged over a
    target voxel's extent along the axes it is sampled more coarsely than that
    (``antialias_widths``), as if acquired in slices that thick.
    """
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    shape = tuple(int(s) for s in shape)
    src = np.asarray(img.array, dtype=np.float32)
    if antialias is not None:
        for axis, width in enumerate(antialias_widths(img, affine, antialias)):
            if width > 0:
                src = ndimage.convolve1d(src, box_kernel(width).astype(np.float32), axis=axis, mode="nearest")
    m = np.linalg.inv(img.affine) @ np.asarray(affine, dtype=np.float64)   # target ijk -> source ijk
    perm = np.eye(4)[[2, 1, 0, 3]]                                          # (i, j, k) <-> (x, y, z) of torch

    def to_norm(size):                                                      # index -> [-1, 1] (align_corners)
        n = np.eye(4)
        sz = np.asarray(size, dtype=np.float64)[::-1]
        n[:3, :3] = np.diag(2.0 / np.maximum(sz - 1, 1))
        n[:3, 3] = -1.0
        return n

    theta = to_norm(src.shape) @ perm @ m @ perm @ np.linalg.inv(to_norm(shape))
    th = torch.as_tensor(theta[:3], dtype=torch.float32)[None]
    grid = F.affine_grid(th, (1, 1, *shape), align_corners=True)
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(src))[None, None], grid, mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()


def coverage_weight(img: Image, grid: WorkingGrid, body: np.ndarray,
                    ramp_mm: float = COVERAGE_RAMP_MM,
                    min_share: float = PARTIAL_COVERAGE_SHARE) -> np.ndarray | None:
    """Where ``img`` has data on the working grid, as a weight: 0 outside its field of view,
    rising linearly to 1 at ``ramp_mm`` (world mm) inside its edge. None when it covers all but
    ``min_share`` of the ``body`` voxels (the reference's body on the working grid)."""
    from scipy import ndimage

    inside = resample_linear(img.with_array(np.ones(img.shape, np.float32)), grid.shape,
                             grid.affine) >= 0.5
    if not body.any() or (body & ~inside).sum() <= min_share * body.sum():
        return None
    depth = ndimage.distance_transform_edt(inside, sampling=grid.spacing)   # the grid's own edge is no edge
    return np.clip(depth / ramp_mm, 0.0, 1.0).astype(np.float32)


def body_region(inputs: "GridInputs", threshold: float = BODY_T1_THRESHOLD,
                margin_mm: float = BODY_MARGIN_MM, block=BODY_BLOCK) -> np.ndarray | None:
    """Where the body is, on the working grid, from the normalised T1 channel: blocks of
    ``block`` voxels whose mean exceeds ``threshold`` (averaging a block keeps the air's noise far
    below it), holes filled slice by slice, grown by ``margin_mm``. Anything that bright counts,
    a ghost in the air too: only clearly empty air is claimed. None without a T1 (on a
    fat-suppressed series fat can be as dark as air).
    Used to keep the network's labels out of the air around the body, where a longer-trained
    model drew 'femur' and 'gluteus maximus' blobs at the corners of large fields of view."""
    from scipy import ndimage

    if not inputs.present.get("t1") or "t1" not in inputs.channels:
        return None
    t1 = inputs.array[inputs.channels.index("t1")]
    bl = np.asarray(block, int)
    shape = np.asarray(t1.shape)
    coarse_shape = np.ceil(shape / bl).astype(int)
    padded = np.zeros(coarse_shape * bl, np.float32)
    padded[: shape[0], : shape[1], : shape[2]] = t1
    coarse = padded.reshape(coarse_shape[0], bl[0], coarse_shape[1], bl[1], coarse_shape[2], bl[2]).mean((1, 3, 5))
    body = coarse > threshold
    if not body.any():
        return None
    for k in range(body.shape[2]):
        body[..., k] = ndimage.binary_fill_holes(body[..., k])
    near = ndimage.distance_transform_edt(~body, sampling=inputs.grid.spacing * bl) <= margin_mm
    full = np.repeat(np.repeat(np.repeat(near, bl[0], 0), bl[1], 1), bl[2], 2)
    return full[: shape[0], : shape[1], : shape[2]]


def normalise(array: np.ndarray, recipe: dict = NORMALISATION) -> np.ndarray:
    """Robust per-channel intensity normalisation (see module docstring); float32 output."""
    a = np.asarray(array, dtype=np.float32)
    sample = a.ravel()[:: max(1, a.size // 2_000_000)]
    lo = float(np.percentile(sample, recipe["lower_pct"]))
    top = float(np.percentile(sample, 99.9))
    body = sample[sample > lo + recipe["body_fraction"] * (top - lo)]
    hi = float(np.percentile(body, recipe["upper_pct"])) if body.size else top
    if hi <= lo:
        return np.zeros_like(a)
    out = (a - lo) / (hi - lo)
    np.clip(out, recipe["clip"][0], recipe["clip"][1], out=out)
    return out


def pick_image(images: dict, names) -> tuple[str, Image] | tuple[None, None]:
    """The first of ``names`` (e.g. ``FLUID_KEYS``) present in ``images``: (key, image)."""
    for n in names:
        if images.get(n) is not None:
            return n, images[n]
    return None, None


def acquisition_plane(affine: np.ndarray) -> str:
    """"axial", "coronal" or "sagittal": the world axis (S-I, A-P, L-R) nearest to the axis the
    slices were acquired along (``geometry.acquisition_slice_axis``)."""
    from pipeline.geometry import acquisition_slice_axis

    d = np.abs(np.asarray(affine, float)[:3, acquisition_slice_axis(affine)])
    return ("sagittal", "coronal", "axial")[int(np.argmax(d))]


def prepare_inputs(images: dict, channels=("t1", "fluid"), spacing=DEFAULT_SPACING,
                   reference: str | None = None, recipe: dict = NORMALISATION) -> GridInputs:
    """Resample and normalise the available sequences onto one working grid.

    Args:
        images: name -> Image; "t1" and/or "fluid" (also accepted: "t2fs", "stir").
            Other keys (e.g. Dixon) are ignored with a warning if they are not channels.
        channels: the model's input channel names, in order.
        spacing: working voxel size in mm.
        reference: which image defines the grid (default: "t1" if present else "fluid").
    """
    warnings: list[str] = []
    chan_imgs: dict[str, Image | None] = {}
    for c in channels:
        key, img = pick_image(images, FLUID_KEYS if c == "fluid" else (c,))
        chan_imgs[c] = img
        if img is not None:
            validate_intensity_image(img, key)
    if not any(v is not None for v in chan_imgs.values()):
        raise ImageError(f"no usable input: need at least one of {list(channels)}; got {sorted(images)}")
    unused = sorted(k for k, v in images.items()
                    if v is not None and k not in channels and not (k in FLUID_KEYS and "fluid" in channels))
    if unused:
        warnings.append(f"inputs not used by the network: {', '.join(unused)}")
    if reference is None:
        reference = next(c for c in ("t1", "fluid", *channels) if chan_imgs.get(c) is not None)
    key, ref = pick_image(images, FLUID_KEYS if reference == "fluid" else (reference,))
    if ref is None:
        raise ImageError(f"reference image {reference!r} not among the inputs {sorted(images)}")
    if ref.kind == "labels":
        raise ImageError("the reference must be an intensity image")
    grid = make_working_grid(ref, spacing, reference)
    plane = acquisition_plane(ref.affine)
    if plane != "axial":
        warnings.append(f"the {reference} series defining the label grid was acquired {plane} "
                        f"({max(ref.spacing):.1f} mm slices); the bundled networks were trained on "
                        "axial series only (measured on phantoms in docs/performance.md); check the "
                        "QC picture")
    arr = np.zeros((len(channels), *grid.shape), dtype=np.float32)
    present = {}
    for ci, c in enumerate(channels):
        img = chan_imgs[c]
        present[c] = img is not None
        if img is None:
            warnings.append(f"{c} missing: network runs on the other channel(s) only")
            continue
        arr[ci] = normalise(resample_linear(img, grid.shape, grid.affine, ANTIALIAS_MIN_FACTOR), recipe)
    coverage = {}
    body = arr[list(channels).index(reference)] > BODY_THRESHOLD if reference in channels else None
    for c in channels:
        img = chan_imgs[c]
        if img is None or body is None or img.same_grid(ref):
            continue                                   # on the reference's own grid: covers it all
        w = coverage_weight(img, grid, body)
        if w is not None:
            coverage[c] = w
            share = float((body & (w == 0)).sum() / max(body.sum(), 1))
            warnings.append(f"{c} covers only part of the {reference} image's body ({100 * share:.0f} % "
                            "of it lies outside)")
    return GridInputs(arr, grid, list(channels), present, warnings, coverage)


def labels_to_grid(labels: Image, grid: WorkingGrid) -> np.ndarray:
    """Nearest-neighbour resample of a label map (any grid) onto the working grid (uint8)."""
    return resample_to_grid(labels, grid.shape, grid.affine, order=0).array.astype(np.uint8)
