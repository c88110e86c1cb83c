"""THE label table of ifi-seg: structure names <-> integer values, in one place.

Classes are side-agnostic: the network and the phantom generator never encode left/right in a
label value. Sides are assigned afterwards from world coordinates (see ``pipeline.sides``).
A label map written by the project is always accompanied by a JSON file holding this table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

#: name -> value. Order and values are part of the on-disk contract; append, never renumber.
LABELS: dict[str, int] = {
    "background": 0,
    "quadratus_femoris": 1,
    "lesser_trochanter": 2,
    "ischial_tuberosity": 3,
    "hamstring_tendon": 4,
    "femur": 5,              # femur except the lesser trochanter
    "pelvis": 6,             # hip bone / sacrum except the ischial tuberosity
    "gluteus_maximus": 7,    # reference muscle for signal ratios
    "subcutaneous_fat": 8,
    "iliopsoas_tendon": 9,
    "other_muscle": 10,
}

#: The four structures the measurements rest on (validation Dice, confidence checks).
KEY_STRUCTURES = ("quadratus_femoris", "lesser_trochanter", "ischial_tuberosity", "hamstring_tendon")
#: Structures the measurements cannot do without.
REQUIRED_FOR_IFS = ("ischial_tuberosity", "lesser_trochanter")
REQUIRED_FOR_QFS = ("hamstring_tendon", "lesser_trochanter")

NUM_CLASSES = max(LABELS.values()) + 1

#: Tissue classes whose MR contrast differs between scanners and sequences (all muscles alike, so
#: the QF keeps its signal relative to the reference muscle): the per-tissue contrast of the
#: ``tissue`` robustness probe (data_scripts/shift_cohort.py) and of training's augmentation.
TISSUE_CLASSES: dict[str, tuple[str, ...]] = {
    "muscle": ("quadratus_femoris", "gluteus_maximus", "other_muscle"),
    "fat": ("subcutaneous_fat",),
    "bone": ("femur", "pelvis", "lesser_trochanter", "ischial_tuberosity"),
    "tendon": ("hamstring_tendon", "iliopsoas_tendon"),
}


def tissue_lookup():
    """Label value -> tissue index (1.. in ``TISSUE_CLASSES`` order; 0: no tissue class), as an
    array to index with a label map (``tissue_lookup()[labels]``)."""
    import numpy as np

    table = np.zeros(NUM_CLASSES, np.uint8)
    for k, names in enumerate(TISSUE_CLASSES.values(), start=1):
        table[[LABELS[n] for n in names]] = k
    return table


def label_names() -> list[str]:
    """Return structure names ordered by label value (index i holds the name of value i)."""
    names = [""] * NUM_CLASSES
    for name, value in LABELS.items():
        names[value] = name
    return names


def write_label_table(path: str | Path, table: Mapping[str, int] = LABELS) -> None:
    """Write a label table (name -> value) as JSON next to a label map."""
    Path(path).write_text(json.dumps(dict(table), indent=2) + "\n")


def read_label_table(path: str | Path) -> dict[str, int]:
    """Read a label table JSON (name -> value) and validate it.

    Accepts either a flat mapping or ``{"labels": {...}}``. Unknown names are kept (they are
    simply not used by the measurements); values must be distinct non-negative integers.
    """
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "labels" in data and isinstance(data["labels"], dict):
        data = data["labels"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: label table must be a JSON object name -> value")
    table: dict[str, int] = {}
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{path}: label {name!r} has invalid value {value!r}")
        table[str(name)] = int(value)
    values = [v for k, v in table.items() if k != "background"]
    if len(set(values)) != len(values):
        raise ValueError(f"{path}: label values must be distinct")
    return table


def annotated_structures(label_table: str | Path | None) -> list[str]:
    """The project structures a label map drawn with ``label_table`` was annotated for: those the
    table names (plus background); every structure when there is no table. A group that outlined
    only some structures lists only those; the rest of its map is then background or unannotated
    (training's marginal loss and the Dice of calibration and validation skip them)."""
    names = label_names()
    if not label_table:
        return list(names)
    listed = set(read_label_table(label_table))
    return [n for n in names if n == "background" or n in listed]


def remap_to_project(array, table: Mapping[str, int]):
    """Map a label array numbered by ``table`` onto the project's own numbering.

    Values of names the project does not know become background.
    """
    import numpy as np

    out = np.zeros(array.shape, dtype=np.uint8)
    for name, value in table.items():
        if name in LABELS and name != "background":
            out[array == value] = LABELS[name]
    return out
