"""Femoral position relative to the pelvis, from the label map (IFS changes with it).

Pelvic frame: left-right axis through the two hips (the mid-sagittal plane's normal found by
``pipeline.sides``) when both are in view, else the scanner's x axis (a warning says so);
superior is world +z made orthogonal to it; anterior completes the right-handed frame.

* ``adduction_deg``: coronal-plane angle between the femoral shaft axis (line through the
  centroids of the femur's cross-sections below the lesser trochanter) and the pelvic inferior axis; positive when the distal
  shaft points medially. The anatomical shaft axis leans ~5-9 deg medially in neutral standing
  position, so compare sides or studies rather than reading it against zero.
* ``lt_direction_deg``: axial-plane direction from the shaft axis to the lesser trochanter's
  centroid, 0 = straight medial, positive = toward posterior. External rotation of the femur
  turns the lesser trochanter medially (smaller angle) and narrows the IFS; absolute femoral
  version needs the knee, which is outside a hip field of view, so this is a rotation proxy.
"""
from __future__ import annotations

import numpy as np

from .sides import Mask


def _world(mask: Mask, affine) -> np.ndarray:
    return mask.indices() @ affine[:3, :3].T + affine[:3, 3]


def pelvic_frame(midplane: dict | None) -> tuple[np.ndarray, str | None]:
    """Rows: unit left->right, posterior->anterior, inferior->superior axes (world RAS)."""
    if midplane is not None:
        lr = np.asarray(midplane["normal"], float)
        note = None
    else:
        lr = np.array([1.0, 0.0, 0.0])
        note = "pelvic frame from the scanner axes (one hip in view): assumes a straight patient"
    si = np.array([0.0, 0.0, 1.0]) - lr[2] * lr
    si /= np.linalg.norm(si)
    ap = np.cross(si, lr)
    return np.stack([lr, ap, si]), note


def estimate_pose(side: str, femur: Mask | None, lt: Mask | None, affine: np.ndarray,
                  midplane: dict | None, min_shaft_mm: float = 30.0) -> dict:
    """Adduction and lesser-trochanter direction of one hip (values None with a reason)."""
    affine = np.asarray(affine, float)
    out = {"adduction_deg": None, "lt_direction_deg": None, "frame": None, "reason": None}
    if femur is None or lt is None or femur.count < 50 or lt.count < 5:
        out["reason"] = "femur or lesser trochanter not in the label map"
        return out
    frame, note = pelvic_frame(midplane)
    out["frame"] = "pelvic (left-right through both hips)" if note is None else note
    lateral = frame[0] if side == "right" else -frame[0]
    c_lt = _world(lt, affine).mean(0)
    # shaft axis: line through the centroids of the femur's cross-sections below the lesser
    # trochanter (robust on thick slices, where a point cloud of a short stubby shaft is not)
    from .geometry import slice_axis

    ax = slice_axis(affine)
    ijk = femur.indices()
    f = ijk @ affine[:3, :3].T + affine[:3, 3]
    below = (f - c_lt) @ frame[2] < 0
    ks = np.unique(ijk[below, ax])
    cents = np.array([f[below & (ijk[:, ax] == k)].mean(0) for k in ks]) if len(ks) else np.zeros((0, 3))
    span = float(np.ptp(cents @ frame[2])) if len(cents) else 0.0
    if len(cents) < 3 or span < min_shaft_mm:
        out["reason"] = (f"less than {min_shaft_mm:.0f} mm (3 slices) of femoral shaft below the "
                         "lesser trochanter in the field of view")
        return out
    c = cents.mean(0)
    _, _, vt = np.linalg.svd(cents - c, full_matrices=False)
    axis = vt[0] if vt[0] @ frame[2] < 0 else -vt[0]        # pointing distally
    medial_comp = axis @ (-lateral)
    out["adduction_deg"] = float(np.degrees(np.arctan2(medial_comp, -(axis @ frame[2]))))
    # point on the shaft axis at the lesser trochanter's height
    t = ((c_lt - c) @ frame[2]) / (axis @ frame[2])
    v = c_lt - (c + t * axis)
    out["lt_direction_deg"] = float(np.degrees(np.arctan2(-(v @ frame[1]), v @ (-lateral))))
    return out
