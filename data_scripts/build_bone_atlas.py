"""Rebuild ``data_scripts/phantoms/bone_atlas.npz`` from the LLP26 statistical shape model.

The LLP26 principal-component model of the pelvis and left femur (Zhang J et al., Auckland
Bioengineering Institute; PyPI ``musculoskeletal-models``, MPL-2.0) is read with GIAS3
(``gias3-fieldwork``). Those packages are NOT project dependencies: run this script from a
separate virtual environment::

    python3 -m venv /tmp/gias
    /tmp/gias/bin/pip install gias3-fieldwork musculoskeletal-models numpy scipy
    /tmp/gias/bin/python data_scripts/build_bone_atlas.py

Surface evaluation of a GIAS3 mesh is linear in its node coordinates, so a triangulated shape is
exactly ``mean_vertices + sum_k w_k * mode_vertices[k]`` (w_k in SD units). The npz stores, per
bone, the triangles, the mean vertices, the per-SD vertex displacement of the first ``N_MODES``
modes, landmark vertex indices and the vertex sets of the femoral head / acetabula (for sphere
fits at run time). Everything is in the model's own frame: LPS mm (+x patient left, +y posterior,
+z superior). The run-time loader (``phantoms/atlas.py``) converts to RAS.
"""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import scipy

# GIAS3 calls numpy functions through the scipy namespace (removed in SciPy 1.12): shim them.
for _name in dir(np):
    if not _name.startswith("_") and not hasattr(scipy, _name):
        try:
            setattr(scipy, _name, getattr(np, _name))
        except (AttributeError, TypeError):
            pass

import musculoskeletal.models as msk  # noqa: E402
from gias3.fieldwork.field.geometric_field import load_geometric_field  # noqa: E402

N_MODES = 10
PELVIS_NODES = slice(0, 1946)
FEMUR_NODES = slice(1946, 2580)
# Landmark node numbers from GIAS3's landmark tables (pelvis / femur node numbering).
PELVIS_LANDMARKS = {"IT_left": 566, "IT_right": 25, "ASIS_left": 1004, "ASIS_right": 466,
                    "PSIS_left": 924, "PSIS_right": 384, "PT_left": 630, "PT_right": 92}
FEMUR_LANDMARKS = {"LT": 276, "GT": 172}
ACETABULUM_ELEMENTS = {"left": [109, 111, 112, 113, 114, 115], "right": [36, 38, 39, 40, 41, 42]}
HEAD_ELEMENTS = list(range(8))
OUT = Path(__file__).resolve().parent / "phantoms" / "bone_atlas.npz"


def _path(name: str) -> str:
    p = msk.get_model_path(f"atlas_meshes/{name}")
    if p is None:
        raise FileNotFoundError(name)
    return str(p)


def _bone(geof: str, ens: str, mesh: str, nodes: slice, pc: dict, density: int):
    """Triangulate one bone and its per-SD mode displacements."""
    gf = load_geometric_field(_path(geof), _path(ens), _path(mesh))
    mean = np.asarray(pc["mean"], float).reshape(3, -1)[:, nodes]
    modes = np.asarray(pc["modes"], float)
    sd = np.sqrt(np.asarray(pc["weights"], float)[:N_MODES])
    n_nodes = mean.shape[1]
    if gf.get_field_parameters().shape[1] != n_nodes:
        raise ValueError(f"{geof}: node count {gf.get_field_parameters().shape} != {n_nodes}")

    def evaluate(params):
        gf.set_field_parameters(params.reshape(3, n_nodes, 1))
        return gf.evaluate_geometric_field(density).T

    ev_mean = evaluate(mean)
    _, tri, uniq, vert_map = gf.triangulate([density, density], merge=True, ret_vert_map=True)
    gf.set_field_parameters(mean.reshape(3, n_nodes, 1))
    verts = ev_mean[uniq]
    disp = np.empty((N_MODES, len(uniq), 3))
    for k in range(N_MODES):
        mode = modes[:, k].reshape(3, -1)[:, nodes] * sd[k]
        disp[k] = evaluate(mean + mode)[uniq] - verts
    # element -> evaluation point indices -> merged vertex indices
    ep = gf.ensemble_field_function.evaluate_field_in_mesh(density, unpack=False)
    starts = np.cumsum([0] + [e.shape[0] for e in ep])

    def element_vertices(elements):
        pts = np.concatenate([np.arange(starts[e], starts[e + 1]) for e in elements])
        return np.unique(vert_map[pts]).astype(np.int32)

    return verts, tri.astype(np.int32), disp, sd, mean.T, element_vertices


def _nearest_vertex(verts: np.ndarray, point: np.ndarray) -> int:
    return int(np.argmin(((verts - point) ** 2).sum(1)))


def main() -> None:
    pc_path = msk.get_model_path("shape_models/LLP26_rigid.pc")
    with open(pc_path, "rb") as fh:
        pc = pickle.load(fh)
    pv, pt, pdisp, sd, pnodes, pelem = _bone(
        "pelvis_combined_cubic_mean_rigid_LLP26.geof", "pelvis_combined_cubic_flat.ens",
        "pelvis_combined_cubic_flat.mesh", PELVIS_NODES, pc, density=10)
    fv, ft, fdisp, _, fnodes, felem = _bone(
        "femur_left_mean_rigid_LLP26.geof", "femur_left_quartic_flat.ens",
        "femur_left_quartic_flat.mesh", FEMUR_NODES, pc, density=16)
    out = {
        "pelvis_vertices": pv.astype(np.float32), "pelvis_faces": pt,
        "pelvis_modes": pdisp.astype(np.float32),
        "femur_vertices": fv.astype(np.float32), "femur_faces": ft,
        "femur_modes": fdisp.astype(np.float32),
        "mode_sd_mm": sd.astype(np.float32),
        "femur_head_vertices": felem(HEAD_ELEMENTS),
        "acetabulum_left_vertices": pelem(ACETABULUM_ELEMENTS["left"]),
        "acetabulum_right_vertices": pelem(ACETABULUM_ELEMENTS["right"]),
    }
    for name, node in PELVIS_LANDMARKS.items():
        out[f"pelvis_lm_{name}"] = np.int32(_nearest_vertex(pv, pnodes[node]))
    for name, node in FEMUR_LANDMARKS.items():
        out[f"femur_lm_{name}"] = np.int32(_nearest_vertex(fv, fnodes[node]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    import importlib.metadata as md
    prov = {
        "file": OUT.name,
        "source": "LLP26 statistical shape model of the pelvis and left femur (shape_models/LLP26_rigid.pc, "
                  "atlas_meshes/pelvis_combined_cubic_*, femur_left_*)",
        "source_package": f"musculoskeletal-models {md.version('musculoskeletal-models')} (PyPI)",
        "reader": f"gias3-fieldwork {md.version('gias3.fieldwork')} (PyPI)",
        "licence": "MPL-2.0",
        "citation": "Zhang J et al., lower-limb shape model LLP26, Auckland Bioengineering Institute "
                    "(musculoskeletal-models / GIAS3)",
        "frame": "model frame, LPS mm (+x patient left, +y posterior, +z superior)",
        "n_modes": N_MODES, "mode_sd_mm": [float(s) for s in sd],
        "triangulation_density": {"pelvis": 10, "femur": 16},
        "counts": {"pelvis_vertices": len(pv), "pelvis_faces": len(pt),
                   "femur_vertices": len(fv), "femur_faces": len(ft)},
        "landmark_nodes": {"pelvis": PELVIS_LANDMARKS, "femur": FEMUR_LANDMARKS},
        "acetabulum_elements": ACETABULUM_ELEMENTS, "femur_head_elements": HEAD_ELEMENTS,
        "rebuild": "see module docstring of data_scripts/build_bone_atlas.py",
        "python": sys.version.split()[0],
    }
    OUT.with_suffix(".json").write_text(json.dumps(prov, indent=2) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)", prov["counts"])


if __name__ == "__main__":
    main()
