"""The parts of benchmarks/run_benchmark.py that run without a cohort or a trained model."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("run_benchmark", ROOT / "benchmarks" / "run_benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dynunet_timing_small_volume(bench):
    res = bench.time_dynunet(shape=(64, 64, 8), roi=(32, 32, 8), overlap=0.5, repeats=1, threads=1)
    assert res["filters"] == [32, 64, 128, 256, 320, 320]
    assert res["output_shape"] == [1, 11, 64, 64, 8]
    assert res["windows"] == 9                      # 3 x 3 x 1 windows of 32 x 32 x 8
    assert res["median_s"] > 0 and res["parameters_m"] > 20   # nnU-Net-sized, ~30 M parameters


def test_stage_timings_from_measurements(bench, tmp_path):
    for i, (load, net) in enumerate([(1.0, 4.0), (3.0, 6.0), (2.0, 5.0)]):
        d = tmp_path / f"s{i}"
        d.mkdir()
        rec = {"hips": {}, "provenance": {
            "timings": {"load_s": load, "segment_s": net + 1.5, "measure_s": 0.5, "total_s": load + net + 2},
            "segmentation": {"timings": {"resample": 1.0, "network": net, "postprocess": 0.5}}}}
        (d / "measurements.json").write_text(json.dumps(rec))
    t = bench.stage_timings(tmp_path)
    assert t["load"] == 2.0 and t["resample"] == 1.0 and t["segment"] == 5.5 and t["measure"] == 0.5
    assert t["n_subjects"] == 3 and t["report"] is None and "note" in t


def test_training_seeds_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--seed", "123", "--skip-speed"])


def test_accuracy_scores_against_the_truth_on_the_predictions_grid(tmp_path):
    """A scan segmented without its T1 comes back on the fluid grid: it is scored against the
    labels the generator sampled there, not the T1's resampled (which for slices placed elsewhere
    misplace the truth by up to half a slice)."""
    import numpy as np

    from pipeline.image import Image, save_nifti

    spec = importlib.util.spec_from_file_location("segmentation_accuracy",
                                                  ROOT / "benchmarks" / "segmentation_accuracy.py")
    acc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acc)
    t1_grid = np.diag([1.0, 1.0, 4.0, 1.0])
    fluid_grid = np.diag([1.0, 1.0, 4.0, 1.0])
    fluid_grid[2, 3] = 2.0                               # slices half a slice higher
    z = np.arange(6)[None, None, :]
    truth_t1 = Image(np.broadcast_to((z % 2).astype(np.uint8), (4, 4, 6)).copy(), t1_grid)
    truth_fluid = Image(np.full((4, 4, 6), 7, np.uint8), fluid_grid)
    save_nifti(truth_fluid, tmp_path / "labels_fluid.nii.gz")
    row = {"labels_fluid": "labels_fluid.nii.gz", "labels_dixon": ""}
    pred_fluid = Image(np.zeros((4, 4, 6), np.uint8), fluid_grid)
    assert (acc.truth_on_grid(row, tmp_path, truth_t1, pred_fluid).array == 7).all()
    assert acc.truth_on_grid(row, tmp_path, truth_t1, truth_t1) is truth_t1
    # another grid, or an older cohort without the column: the T1 labels, nearest
    other_grid = np.diag([1.0, 1.0, 4.0, 1.0])
    other_grid[2, 3] = 4.0                               # exactly one T1 slice higher
    other = Image(np.zeros((4, 4, 6), np.uint8), other_grid)
    got = acc.truth_on_grid({}, tmp_path, truth_t1, other).array
    assert np.array_equal(got[..., :5], truth_t1.array[..., 1:])


def test_compare_accuracy_pairs_subjects_and_hips(tmp_path, capsys):
    """Dice is paired per subject, distances per hip, only where both runs have a value; equal
    runs give p = 1; a consistent shift over 12 hips is significant."""
    spec = importlib.util.spec_from_file_location("compare_accuracy", ROOT / "benchmarks" / "compare_accuracy.py")
    cmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp)
    import csv

    cols = ["mode", "subject", "side", "dice_lesser_trochanter", "ifs_mm", "ifs_mm_truth", "ifs_mm_abs_err",
            "goutallier", "goutallier_truth"]

    def write(path, shift):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, cols)
            w.writeheader()
            for i in range(12):
                w.writerow({"mode": "both", "subject": f"s{i}", "side": "all",
                            "dice_lesser_trochanter": 0.8 + 0.01 * i})
                for side in ("left", "right"):
                    err = 0.5 + 0.05 * i + shift
                    w.writerow({"mode": "both", "subject": f"s{i}", "side": side, "ifs_mm": 20 + err,
                                "ifs_mm_truth": 20, "ifs_mm_abs_err": err if i else "",
                                "goutallier": 1, "goutallier_truth": 1 if shift == 0 or i else 2})

    write(tmp_path / "a.csv", 0.0)
    write(tmp_path / "b.csv", 0.2)
    res = {r["metric"]: r for r in cmp.compare(cmp.read_rows(tmp_path / "a.csv"), cmp.read_rows(tmp_path / "b.csv"))}
    assert res["dice_lesser_trochanter"]["n"] == 12 and res["dice_lesser_trochanter"]["p"] == 1.0
    err = res["ifs_mm_abs_err"]
    assert err["n"] == 22 and abs(err["after"] - err["before"] - 0.2) < 1e-9 and err["p"] < 0.001
    assert abs(res["ifs_mm_signed"]["before"] - res["ifs_mm_abs_err"]["before"]) < 0.05
    assert res["goutallier agreement"]["changed"] == (2, 0)
    assert cmp.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 0
    assert "p = " in capsys.readouterr().out


def test_accuracy_summary_gives_intervals_and_reads_back_its_csv(tmp_path):
    """The summary states its uncertainty: a bootstrap interval (over subjects) around mean Dice
    and MAE, a Wilson interval around grade agreement, the Goutallier grade's weighted kappa and
    the hips two or more grades off; ``--summarise`` prints the same from the written CSV, and
    pools two CSVs as separate subjects."""
    import csv

    spec = importlib.util.spec_from_file_location("segmentation_accuracy",
                                                  ROOT / "benchmarks" / "segmentation_accuracy.py")
    acc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acc)
    rows = []
    for i in range(12):
        rows.append({"subject": f"s{i}", "mode": "both", "side": "all", "seconds": 1.0,
                     **{f"dice_{n}": 0.80 + 0.01 * (i % 3) for n in acc.label_names()[1:]}})
        for side in ("left", "right"):
            truth = i % 4
            got = truth if (i, side) != (0, "left") else truth + 2      # one hip 2 grades off
            rows.append({"subject": f"s{i}", "mode": "both", "side": side, "seconds": 1.0,
                         **{f"dice_{n}": 0.8 for n in acc.label_names()[1:]}, "ifs_mm": 20.5, "ifs_mm_truth": 20.0, "ifs_mm_abs_err": 0.5 + 0.1 * (i % 2),
                         "goutallier": got, "goutallier_truth": truth,
                         "edema_grade": "none", "edema_truth": "none" if i else "mild"})
    text = acc.summarise(rows)
    assert "Dice quadratus_femoris" in text and "mean 0.810 (95 % CI 0.80" in text
    assert "IFS MAE 0.55 mm (95 % CI 0.5" in text
    assert "goutallier agreement 0.96 (23/24, 95 % CI 0.80-0.99)" in text
    assert "two or more grades off: 1" in text
    assert "edema_grade agreement 0.92 (22/24" in text
    keys = sorted({k for r in rows for k in r})
    for name in ("a.csv", "b.csv"):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    assert acc.summarise(acc.read_results([tmp_path / "a.csv"])) == text
    pooled = acc.summarise(acc.read_results([tmp_path / "a.csv", tmp_path / "b.csv"]))
    assert "== both: 24 subjects, 48 hips" in pooled and "(46/48" in pooled
    assert acc.main(["--summarise", str(tmp_path / "a.csv")]) == 0
