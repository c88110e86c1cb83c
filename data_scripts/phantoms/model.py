"""The data model shared by the phantom generator's stages: anatomy -> MR simulation -> acquisition.

``anatomy.build_anatomy`` produces an ``Anatomy``: a fine voxel model of one patient's hip region
in world coordinates (RAS+ mm, the patient's frame) plus the continuous surfaces from which the
exact ground truth is computed. ``mr_physics`` turns tissue + composition into signal for a given
sequence; ``acquisition`` samples that onto realistic acquisition grids and writes files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: z extents of an anatomy, and so what an axial slab can cover: "hips" (from above the femoral
#: heads to below the lesser trochanters, every cohort's default) or "pelvis" (also up to the
#: iliac crests and further down the thighs: a whole-pelvis acquisition).
EXTENTS = ("hips", "pelvis")

#: Tissue types of the fine model (what the MR simulation needs; distinct from the label table).
TISSUES: dict[str, int] = {
    "air": 0,
    "fat": 1,            # subcutaneous and intermuscular fat
    "muscle": 2,         # skeletal muscle (composition in fat_fraction / edema)
    "tendon": 3,
    "cortical_bone": 4,
    "marrow": 5,         # fatty (yellow) marrow
    "fluid": 6,          # bladder, joint fluid, bursae
    "vessel": 7,         # vessels (flowing blood)
    "nerve": 8,          # sciatic nerve
    "bowel": 9,          # rectum / bowel wall and content
    "skin": 10,
    "cartilage": 11,
}


@dataclass
class Surface:
    """A closed triangle mesh in world RAS mm (the continuous geometry ground truth uses)."""

    vertices: np.ndarray  # (V, 3) float64
    faces: np.ndarray     # (F, 3) int


@dataclass
class Anatomy:
    """One synthetic patient's hip region on a fine, axis-aligned world grid.

    Attributes:
        affine: fine grid voxel -> world RAS mm (axis-aligned, RAS-stored).
        tissue: uint8 ``TISSUES`` code per fine voxel.
        labels: uint8 project label (``pipeline.labels.LABELS``) per fine voxel.
        fat_fraction: float32 fat fraction 0..1 of each voxel's tissue (muscle ~0.02, infiltrated
            QF up to ~0.6 in streaks, marrow ~0.85, fat ~0.95).
        edema: float32 0..1 excess free water in muscle (0 elsewhere).
        surfaces: ``{(side, structure): Surface}`` for the structures truth is measured between,
            at least ischial_tuberosity, lesser_trochanter, hamstring_tendon, iliopsoas_tendon and
            quadratus_femoris for each side present ("left"/"right" = patient's anatomical side).
        hips: ``{side: dict}`` per-hip truth that does not depend on the acquisition: ifs_3d_mm,
            qfs_3d_mm, their end points (world RAS mm), qf_edema grade, qf_fat_fraction, Goutallier
            grade, qf_volume_ml, pose (degrees).
        params: everything drawn for this subject (shape weights, habitus, ...), JSON-serialisable.
    """

    affine: np.ndarray
    tissue: np.ndarray
    labels: np.ndarray
    fat_fraction: np.ndarray
    edema: np.ndarray
    surfaces: dict = field(default_factory=dict)
    hips: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.tissue.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
