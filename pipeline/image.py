"""A world-aware image: a 3D array plus the affine that maps voxel indices to world millimetres.

World coordinates are always the NIfTI/nibabel convention, **RAS+** (x to the patient's Right,
y Anterior, z Superior), whatever the storage order of the array. DICOM's LPS patient coordinates
are converted on reading. Nothing here assumes axial slicing, isotropic voxels or RAS storage.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: The kinds of series the pipeline knows. "fluid" covers any fluid-sensitive fat-suppressed
#: sequence; ``meta["fluid_kind"]`` says which one (t2fs or stir).
KINDS = ("t1", "t2fs", "stir", "dixon_fat", "dixon_water", "labels")

#: Refuse volumes larger than this many voxels (memory guard: ~2 GB as float32).
MAX_VOXELS = 512 * 1024 * 1024  # 536 M voxels


class ImageError(ValueError):
    """An input image is unusable; the message says why in one line."""


@dataclass
class Image:
    """A 3D volume with its voxel-to-world (RAS mm) affine.

    Attributes:
        array: the voxel data, shape (I, J, K).
        affine: 4x4 matrix mapping (i, j, k, 1) to world RAS millimetres.
        kind: one of ``KINDS`` or None.
        meta: free-form provenance (source path, sequence parameters, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    kind: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ImageError(f"expected a 3D image, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ImageError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each array axis in mm (norms of the affine's columns)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def same_grid(self, other: "Image", atol: float = 1e-4) -> bool:
        """Whether ``other`` has this image's shape and (within ``atol``) affine: the same voxels."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel coordinates to (N, 3) world RAS mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Map (N, 3) world RAS mm to (N, 3) continuous voxel coordinates."""
        inv = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def axis_directions(self) -> np.ndarray:
        """Unit world direction of each array axis, as columns of a 3x3 matrix."""
        return self.affine[:3, :3] / self.spacing

    def slice_axis(self) -> int:
        """The array axis closest to the world superior-inferior direction (the 'axial' slice axis)."""
        return int(np.argmax(np.abs(self.axis_directions()[2, :])))

    def acquisition_slice_axis(self) -> int:
        """The array axis the slices were acquired along (``geometry.acquisition_slice_axis``:
        the clearly thickest one, else the one closest to superior-inferior)."""
        from .geometry import acquisition_slice_axis

        return acquisition_slice_axis(self.affine)

    def with_array(self, array: np.ndarray, kind: str | None = None) -> "Image":
        """A new image on the same grid holding ``array``."""
        return Image(array, self.affine.copy(), kind if kind is not None else self.kind, dict(self.meta))


def validate_intensity_image(img: Image, name: str = "image") -> None:
    """Raise ImageError (one clear line) if ``img`` cannot be used as an MR intensity image."""
    arr = img.array
    if min(arr.shape) < 2:
        raise ImageError(f"{name}: degenerate 3D shape {arr.shape} (a 2D image?)")
    if arr.size > MAX_VOXELS:
        raise ImageError(f"{name}: {arr.size} voxels exceeds the memory guard of {MAX_VOXELS}")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        raise ImageError(f"{name}: invalid (singular or non-finite) affine")
    if not np.issubdtype(arr.dtype, np.number):
        raise ImageError(f"{name}: non-numeric data type {arr.dtype}")
    finite = np.isfinite(arr) if np.issubdtype(arr.dtype, np.floating) else None
    if finite is not None and not finite.all():
        frac = 1.0 - finite.mean()
        raise ImageError(f"{name}: {frac:.1%} of voxels are NaN or Inf")
    if float(np.ptp(arr)) == 0.0:
        raise ImageError(f"{name}: image is empty (constant value {arr.flat[0]})")


def load_nifti(path: str | Path, kind: str | None = None) -> Image:
    """Read a NIfTI file into an ``Image`` (float32 data for intensities, integers for labels).

    Scaling (scl_slope/inter) is applied. A 4D image with a single volume is squeezed; other
    4D, or 2D, images raise ``ImageError``.
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    try:
        nii = nib.load(str(path))
        if kind == "labels":
            data = np.asarray(nii.dataobj)
        else:
            data = nii.get_fdata(dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise ImageError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageError(f"{path}: expected a 3D image, got shape {data.shape}")
    if kind == "labels":
        if np.issubdtype(data.dtype, np.floating):
            if not np.all(np.isfinite(data)):
                raise ImageError(f"{path}: label map has NaN/Inf")
            data = np.rint(data)
        data = data.astype(np.int32 if data.max(initial=0) > 255 else np.uint8)
    affine = nii.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise ImageError(f"{path}: missing or invalid affine")
    warnings = _check_header_orientation(nii.header, data.shape, path)
    meta = {"source": str(path)}
    if warnings:
        meta["warnings"] = warnings
    return Image(data, affine, kind, meta)


#: sform and qform axes further apart than this contradict each other (a flip or a permutation,
#: not rounding or the shear a qform cannot hold).
HEADER_AXIS_CONTRADICTION_DEG = 30.0
#: sform and qform placing a corner voxel further apart than this get a warning.
HEADER_WARN_SHIFT_MM = 1.0


def _check_header_orientation(header, shape, path) -> list[str]:
    """Refuse a NIfTI header whose orientation cannot be trusted; return warnings for a doubtful one.

    Without an sform or a qform (both codes 0, as after some conversions) nibabel falls back to
    a made-up orientation, so left and right would be guessed. When both are set, nibabel (as
    FSL and dcm2niix's readers) uses the sform, but some viewers show the qform: if their axes
    point different ways (a flip), which side is which depends on the program.
    """
    if "sform_code" not in header or "qform_code" not in header:
        return []
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code == 0 and qform_code == 0:
        raise ImageError(f"{path}: the NIfTI header holds no orientation (sform and qform codes both 0), "
                         "so left and right cannot be told apart; convert the scan again keeping its "
                         "orientation (e.g. dcm2niix) or set its sform to the scanner affine")
    if sform_code == 0 or qform_code == 0:
        return []
    sform, qform = header.get_sform(), header.get_qform()
    ds = sform[:3, :3] / np.linalg.norm(sform[:3, :3], axis=0)
    dq = qform[:3, :3] / np.linalg.norm(qform[:3, :3], axis=0)
    angles = np.degrees(np.arccos(np.clip((ds * dq).sum(axis=0), -1.0, 1.0)))
    if angles.max() > HEADER_AXIS_CONTRADICTION_DEG:
        axis = int(np.argmax(angles))
        raise ImageError(f"{path}: the NIfTI sform and qform contradict each other (voxel axis {axis} points "
                         f"{angles[axis]:.0f} degrees apart), so viewers disagree on which side is which; "
                         "fix the header (set both to the scanner affine) before measuring")
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    shift = float(np.linalg.norm((corners @ sform.T - corners @ qform.T)[:, :3], axis=1).max())
    if shift > HEADER_WARN_SHIFT_MM:
        return [f"the NIfTI sform and qform place the field of view up to {shift:.1f} mm apart; "
                "the sform was used (as nibabel and FSL do); a viewer showing the qform will not "
                "overlay the outputs exactly"]
    return []


def atomic_write(path: str | Path, write_fn) -> None:
    """Write a file atomically: ``write_fn(tmp_path)`` then rename onto ``path``.

    A run killed mid-write leaves only a ``.tmp`` file, never a half-written file at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp creates 0600 files: give the result the permissions a plain open() would
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_nifti(img: Image, path: str | Path, dtype=None) -> None:
    """Save ``img`` as NIfTI (sform and qform set to its affine), atomically."""
    import nibabel as nib

    data = img.array if dtype is None else img.array.astype(dtype)
    nii = nib.Nifti1Image(data, img.affine)
    nii.set_sform(img.affine, code=1)
    nii.set_qform(img.affine, code=1)
    atomic_write(path, lambda tmp: nib.save(nii, tmp))


def grid_corners(shape, affine) -> np.ndarray:
    """World coordinates (8, 3) of the outer corners of a grid's voxel boxes."""
    lo, hi = -0.5, np.asarray(shape, dtype=float) - 0.5
    corners = np.array([[x, y, z] for x in (lo, hi[0]) for y in (lo, hi[1]) for z in (lo, hi[2])])
    return corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def overlap_fraction(a: Image, b: Image) -> float:
    """Fraction of ``b``'s voxel centres (subsampled) that fall inside ``a``'s grid."""
    sub = [np.linspace(0, s - 1, min(s, 12)) for s in b.shape]
    ijk = np.stack(np.meshgrid(*sub, indexing="ij"), -1).reshape(-1, 3)
    inside = a.world_to_voxel(b.voxel_to_world(ijk))
    ok = np.all((inside >= -0.5) & (inside <= np.asarray(a.shape) - 0.5), axis=1)
    return float(ok.mean())


def resample_to_grid(img: Image, shape, affine, order: int = 1, cval: float = 0.0) -> Image:
    """Resample ``img`` onto another grid (shape + affine) in world coordinates.

    ``order`` 0 for label maps (nearest), 1 (trilinear) or 3 for intensities. Points outside the
    source grid get ``cval``. Works for any pair of orientations (oblique included).
    """
    shape = tuple(int(s) for s in shape)
    affine = np.asarray(affine, dtype=np.float64)
    # voxel(target) -> world -> voxel(source) is one affine map
    m = np.linalg.inv(img.affine) @ affine
    src = img.array
    if order == 0:
        src_dtype = src.dtype
        grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
        coords = m[:3, :3].astype(np.float32) @ grid + m[:3, 3:4].astype(np.float32)
        idx = np.rint(coords).astype(np.int64)
        valid = np.all((idx >= 0) & (idx < np.asarray(src.shape)[:, None]), axis=0)
        out = np.full(idx.shape[1], cval, dtype=src_dtype)
        out[valid] = src[idx[0, valid], idx[1, valid], idx[2, valid]]
        out = out.reshape(shape)
    else:
        from scipy.ndimage import affine_transform

        out = affine_transform(
            src.astype(np.float32, copy=False), m[:3, :3], offset=m[:3, 3], output_shape=shape,
            order=order, mode="constant", cval=cval, prefilter=order > 1,
        )
    return Image(out, affine, img.kind, dict(img.meta))


def resample_like(img: Image, ref: Image, order: int = 1, cval: float = 0.0) -> Image:
    """Resample ``img`` onto the grid of ``ref`` (world-coordinate aware)."""
    return resample_to_grid(img, ref.shape, ref.affine, order=order, cval=cval)


def reorient_to_ras(img: Image) -> tuple[Image, np.ndarray]:
    """Permute/flip the array so its axes run closest to R, A, S (no interpolation).

    Returns the reoriented image and the nibabel orientation transform used, so that
    ``undo_reorient`` can put an array computed on it back on the original grid exactly.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(img.affine)
    arr = nib.orientations.apply_orientation(img.array, ornt)
    aff = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    return Image(np.ascontiguousarray(arr), aff, img.kind, dict(img.meta)), ornt


def undo_reorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Inverse of ``reorient_to_ras`` for an array on the reoriented grid."""
    import nibabel as nib

    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    inv = nib.orientations.ornt_transform(identity, ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, inv))
