"""A T1-like network input made from a Dixon fat/water pair, for scans with no T1 or fluid series.

Population studies often acquire only a Dixon series of the pelvis (e.g. 2-3 mm voxels). The
network was trained on T1 and fluid-sensitive images, so a Dixon-only scan is given to it as one
T1-like image: ``fat + DIXON_T1_WATER_WEIGHT * water``. On T1-weighted images muscle is about
0.3-0.4 times as bright as fat and tendon and cortical bone are dark. Muscle is water-dominated
with about 0.8 times the proton density of adipose tissue, so a water weight of 0.5 puts it near
0.4 times fat; tendon and cortex stay dark, as they are in both Dixon images. The fat fraction is
still measured from the Dixon images themselves; edema needs a fluid-sensitive series, which
such a scan does not have.

The water image is not given to the network as its fluid channel: it is fat-free like a T2
fat-sat image but not fluid-weighted, so it would also be graded for edema; on held-out phantoms
it added nothing to the T1-like image, and alone it measured worse (README, "Dixon-only scans").
"""
from __future__ import annotations

import numpy as np

from pipeline.image import Image, ImageError, overlap_fraction, resample_like

#: Weight of the water image in the T1-like image (see the module docstring).
DIXON_T1_WATER_WEIGHT = 0.5


def t1_like_from_dixon(fat: Image, water: Image, water_weight: float = DIXON_T1_WATER_WEIGHT) -> Image:
    """The T1-like image ``fat + water_weight * water`` on the fat image's grid.

    The water image is resampled in world coordinates (linear) when its grid differs. Raises
    ImageError when the two images do not overlap or hold no positive signal.
    """
    if not water.same_grid(fat):
        if overlap_fraction(fat, water) < 0.2:
            raise ImageError("the Dixon fat and water images do not overlap")
        water = resample_like(water, fat, order=1)
    f = np.asarray(fat.array, dtype=np.float32)
    w = np.asarray(water.array, dtype=np.float32)
    if not (np.nanmax(f) > 0 or np.nanmax(w) > 0):
        raise ImageError("the Dixon fat and water images hold no positive signal")
    arr = np.clip(f, 0, None) + np.float32(water_weight) * np.clip(w, 0, None)
    meta = {k: v for k, v in fat.meta.items() if k in ("format", "sequence", "identifiers")}
    meta["synthesised_from"] = f"dixon: fat + {water_weight:g} x water"
    return Image(arr, fat.affine.copy(), "t1", meta)


def exchanged(images: dict) -> dict:
    """The image dict with its Dixon fat and water exchanged (a pair swapped throughout, or given
    the wrong way round: ``pipeline.measure.dixon_swapped_throughout``)."""
    return {**images, "dixon_fat": images["dixon_water"], "dixon_water": images["dixon_fat"]}
