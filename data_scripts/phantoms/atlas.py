"""Bone shapes for the phantom generator from the bundled LLP26 shape-model atlas.

``bone_atlas.npz`` (built by ``data_scripts/build_bone_atlas.py``; provenance in ``bone_atlas.json``)
holds the pelvis and left femur of the LLP26 model (Zhang J et al., Auckland Bioengineering
Institute, MPL-2.0) as triangle meshes whose vertices are linear in the shape-mode weights.
``sample_bones`` draws a shape, converts the model's LPS frame to world RAS, seats the femoral heads
in the acetabula, mirrors the left femur for the right hip and applies a per-side hip pose.

Hip pose convention (degrees, rotation about the femoral head centre, applied in the order
rotation -> adduction -> flexion, all relative to the model's neutral femur):
    rotation  > 0: EXTERNAL rotation about the femoral mechanical axis (narrows the IFS)
    adduction > 0: adduction (knee toward the midline; narrows the IFS), < 0 abduction
    flexion   > 0: flexion (knee anterior; widens the IFS), < 0 extension
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .model import Surface

ATLAS_PATH = Path(__file__).resolve().parent / "bone_atlas.npz"
SIDES = ("left", "right")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@lru_cache(maxsize=1)
def load_atlas(path: str | Path = ATLAS_PATH) -> dict:
    """Load the bone atlas npz into a dict of arrays (cached)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through points: returns (centre, radius)."""
    a = np.c_[2 * points, np.ones(len(points))]
    b = (points ** 2).sum(1)
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    centre = sol[:3]
    return centre, float(np.sqrt(sol[3] + centre @ centre))


def rotation_matrix(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Right-handed rotation by angle_deg about the unit vector axis (Rodrigues)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def hip_rotation(side: str, rotation: float, adduction: float, flexion: float,
                 shaft_axis: np.ndarray) -> np.ndarray:
    """Rotation matrix (world RAS) for a hip pose in the convention of this module's docstring.

    shaft_axis: unit vector from the knee toward the femoral head (world RAS).
    """
    # Left hip: lateral is -x; external rotation turns the anterior surface laterally, i.e. a
    # positive right-handed rotation about the upward shaft axis; mirrored for the right hip.
    s = 1.0 if side == "left" else -1.0
    r_rot = rotation_matrix(shaft_axis, s * rotation)
    r_add = rotation_matrix([0.0, 1.0, 0.0], -s * adduction)
    r_flex = rotation_matrix([1.0, 0.0, 0.0], flexion)
    return r_flex @ r_add @ r_rot


@dataclass
class Bones:
    """A posed bone set in world RAS mm.

    pelvis: pelvis + sacrum surface; femur: {side: Surface};
    landmarks: name -> (3,) world point (IT_left, ASIS_right, LT_left, GT_right, PT_left, ...);
    hip_centre / head_radius / shaft_axis / neck_axis: per side; lt_vertex / it_vertex: landmark
    vertex indices into femur[side] / pelvis; weights: shape-mode weights (SD units);
    pose: {side: {rotation, adduction, flexion}} in degrees.
    """

    pelvis: Surface
    femur: dict
    landmarks: dict
    hip_centre: dict
    head_radius: dict
    shaft_axis: dict
    neck_axis: dict
    lt_vertex: int
    it_vertex: dict
    weights: list
    pose: dict
    tilt_deg: float = 0.0
    extra: dict = field(default_factory=dict)


def _shape(atlas: dict, prefix: str, weights: np.ndarray) -> np.ndarray:
    k = len(weights)
    v = atlas[f"{prefix}_vertices"].astype(np.float64)
    if k:
        v = v + np.tensordot(weights, atlas[f"{prefix}_modes"][:k].astype(np.float64), axes=1)
    return v @ LPS_TO_RAS.T


def sample_bones(rng: np.random.Generator, shape_sd: float = 1.0, *, n_modes: int = 10,
                 clip: float = 2.5, weights=None, pose: dict | None = None,
                 tilt_deg: float | None = None) -> Bones:
    """Draw a pelvis and both proximal femora, seated and posed, in world RAS mm.

    Args:
        rng: random generator (the only source of randomness).
        shape_sd: SD of the mode weights (weights ~ N(0, shape_sd), clipped to +-clip).
        n_modes: number of shape modes used (<= the atlas's).
        weights: explicit mode weights (overrides drawing).
        pose: {side: {"rotation", "adduction", "flexion"}} degrees (see module docstring);
            missing sides/keys are neutral (0).
        tilt_deg: pelvic tilt about the left-right axis through the hip centres (positive =
            anterior tilt); drawn N(0, 4) when None.
    Returns: ``Bones`` in a pelvic world frame: origin at the midpoint of the two hip centres,
    +x along the inter-hip axis toward the patient's right, +y anterior (normal to the anterior
    pelvic plane ASIS-ASIS-pubic tubercles), +z superior, then tilted by ``tilt_deg`` about x
    (a supine patient lying straight in the scanner).
    """
    atlas = load_atlas()
    n_modes = min(n_modes, atlas["pelvis_modes"].shape[0])
    if weights is None:
        weights = np.clip(rng.normal(0.0, shape_sd, n_modes), -clip, clip)
    weights = np.asarray(weights, float)[:n_modes]
    if tilt_deg is None:
        tilt_deg = float(rng.normal(0.0, 4.0))
    pose = {s: {k: float((pose or {}).get(s, {}).get(k, 0.0)) for k in ("rotation", "adduction", "flexion")}
            for s in SIDES}

    pv = _shape(atlas, "pelvis", weights)
    fv_left = _shape(atlas, "femur", weights)
    pfaces = atlas["pelvis_faces"].astype(np.int64)
    ffaces = atlas["femur_faces"].astype(np.int64)

    acet = {s: fit_sphere(pv[atlas[f"acetabulum_{s}_vertices"]]) for s in SIDES}
    head_c, head_r = fit_sphere(fv_left[atlas["femur_head_vertices"]])
    lm = {k[len("pelvis_lm_"):]: pv[int(atlas[k])] for k in atlas if k.startswith("pelvis_lm_")}

    # mid-sagittal plane of the pelvis from its bilateral landmark pairs
    pairs = [("IT", "IT"), ("ASIS", "ASIS"), ("PSIS", "PSIS"), ("PT", "PT")]
    normal = np.mean([lm[f"{a}_right"] - lm[f"{a}_left"] for a, _ in pairs], axis=0)
    normal /= np.linalg.norm(normal)
    p0 = np.mean([(lm[f"{a}_right"] + lm[f"{a}_left"]) / 2 for a, _ in pairs], axis=0)

    femurs, faces, centres = {}, {}, {}
    femurs["left"] = fv_left + (acet["left"][0] - head_c)
    faces["left"] = ffaces
    mir = fv_left - 2.0 * ((fv_left - p0) @ normal)[:, None] * normal
    mir_head = head_c - 2.0 * ((head_c - p0) @ normal) * normal
    femurs["right"] = mir + (acet["right"][0] - mir_head)
    faces["right"] = ffaces[:, ::-1].copy()  # reflection flips orientation
    for s in SIDES:
        centres[s] = acet[s][0].copy()

    # Pelvic frame: x through the hip centres (to the right), y normal to the anterior pelvic
    # plane (ASIS-ASIS-pubic tubercles; anterior), then the drawn tilt about x.
    origin = (centres["left"] + centres["right"]) / 2
    ex = centres["right"] - centres["left"]
    ex /= np.linalg.norm(ex)
    asis = (lm["ASIS_left"] + lm["ASIS_right"]) / 2
    pt = (lm["PT_left"] + lm["PT_right"]) / 2
    ez = asis - pt
    ez -= (ez @ ex) * ex
    ez /= np.linalg.norm(ez)
    ey = np.cross(ez, ex)
    frame = np.stack([ex, ey, ez])  # rows: new axes in old coordinates
    tilt = rotation_matrix([1.0, 0.0, 0.0], -tilt_deg) @ frame  # anterior tilt: ASIS forward/down
    pv = (pv - origin) @ tilt.T
    lm = {k: (v - origin) @ tilt.T for k, v in lm.items()}
    lt_i, gt_i = int(atlas["femur_lm_LT"]), int(atlas["femur_lm_GT"])
    shaft, neck = {}, {}
    for s in SIDES:
        f = (femurs[s] - origin) @ tilt.T
        c = (centres[s] - origin) @ tilt.T
        centres[s] = c
        z = f[:, 2]
        knee = f[z <= np.quantile(z, 0.03)].mean(axis=0)
        axis = (c - knee) / np.linalg.norm(c - knee)
        r = hip_rotation(s, pose[s]["rotation"], pose[s]["adduction"], pose[s]["flexion"], axis)
        f = (f - c) @ r.T + c
        femurs[s], centres[s] = f, c
        shaft[s] = r @ axis
        lm[f"LT_{s}"] = f[lt_i]
        lm[f"GT_{s}"] = f[gt_i]
        lm[f"hip_centre_{s}"] = c
        neck_v = f[atlas["femur_head_vertices"]].mean(axis=0) - f[gt_i]
        neck[s] = neck_v / np.linalg.norm(neck_v)
    it_vertex = {s: int(atlas[f"pelvis_lm_IT_{s}"]) for s in SIDES}
    return Bones(
        pelvis=Surface(pv, pfaces),
        femur={s: Surface(femurs[s], faces[s]) for s in SIDES},
        landmarks=lm, hip_centre=centres,
        head_radius={s: float(head_r) for s in SIDES},
        shaft_axis=shaft, neck_axis=neck, lt_vertex=lt_i, it_vertex=it_vertex,
        weights=[float(w) for w in weights], pose=pose, tilt_deg=float(tilt_deg),
        extra={"acetabulum_radius": {s: float(acet[s][1]) for s in SIDES}},
    )
