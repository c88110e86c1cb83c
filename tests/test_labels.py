"""The label table: one numbering, JSON round trip, remapping hand-drawn maps."""
import json

import numpy as np
import pytest

from pipeline.labels import LABELS, label_names, read_label_table, remap_to_project, write_label_table


def test_table_is_side_agnostic_and_complete():
    for name in ("quadratus_femoris", "lesser_trochanter", "ischial_tuberosity", "hamstring_tendon",
                 "femur", "pelvis", "gluteus_maximus", "subcutaneous_fat", "iliopsoas_tendon"):
        assert name in LABELS
    assert not any("left" in n or "right" in n for n in LABELS)
    assert len(set(LABELS.values())) == len(LABELS)
    assert label_names()[LABELS["lesser_trochanter"]] == "lesser_trochanter"


def test_round_trip_and_remap(tmp_path):
    write_label_table(tmp_path / "t.json")
    assert read_label_table(tmp_path / "t.json") == LABELS
    own = {"ischial_tuberosity": 40, "lesser_trochanter": 41, "something_else": 7}
    (tmp_path / "own.json").write_text(json.dumps(own))
    table = read_label_table(tmp_path / "own.json")
    arr = np.array([0, 40, 41, 7])
    assert remap_to_project(arr, table).tolist() == [0, LABELS["ischial_tuberosity"], LABELS["lesser_trochanter"], 0]


def test_invalid_tables_are_rejected(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1, "b": 1}))
    with pytest.raises(ValueError, match="distinct"):
        read_label_table(tmp_path / "bad.json")
    (tmp_path / "neg.json").write_text(json.dumps({"a": -1}))
    with pytest.raises(ValueError, match="invalid"):
        read_label_table(tmp_path / "neg.json")
