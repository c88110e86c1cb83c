"""Paired comparison of two ``segmentation_accuracy.py --out`` CSVs of the same cohort.

    python benchmarks/compare_accuracy.py BEFORE.csv AFTER.csv [--modes both,t1,fluid]

Two runs on the same subjects (another model, another setting, the cohort acquired otherwise
with the same seeds) are compared where both have a value: per input mode, the mean of each
metric before and after, and the two-sided Wilcoxon signed-rank p-value of the paired
differences (scipy; p = 1 when every pair is equal). Dice is paired per subject (the rows with
side "all"), IFS / QFS errors per hip; the grades are counted as exact agreements (hips right
before and after, right only before, right only after). Prints one table; nothing is asserted.
These are the "paired Wilcoxon" p-values of docs/performance.md.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

KEY = ("quadratus_femoris", "lesser_trochanter", "ischial_tuberosity", "hamstring_tendon")


def read_rows(path: str | Path) -> dict[tuple[str, str, str], dict]:
    """CSV rows keyed by (mode, subject, side)."""
    with open(path, newline="") as f:
        return {(r["mode"], r["subject"], r["side"]): r for r in csv.DictReader(f)}


def _value(row: dict, column: str) -> float | None:
    """A finite number from a cell, or None; ``*_signed`` columns are measured minus truth."""
    if column.endswith("_signed"):
        base = column[: -len("_signed")]
        a, b = _value(row, base), _value(row, f"{base}_truth")
        return None if a is None or b is None else a - b
    try:
        v = float(row.get(column) or "nan")
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def paired(before: dict, after: dict, keys, column: str) -> tuple[np.ndarray, np.ndarray]:
    """The values of ``column`` at the keys where both runs have one."""
    pairs = [(_value(before[k], column), _value(after[k], column)) for k in keys]
    pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired values (1.0 when all pairs are equal)."""
    from scipy.stats import wilcoxon

    if len(x) == 0 or np.all(x == y):
        return 1.0
    return float(wilcoxon(x, y).pvalue)


def compare(before: dict, after: dict, modes=None) -> list[dict]:
    """One record per (mode, metric): n, mean before, mean after, p."""
    out = []
    for mode in sorted({k[0] for k in before} & {k[0] for k in after}):
        if modes and mode not in modes:
            continue
        keys = sorted(set(before) & set(after))
        subjects = [k for k in keys if k[0] == mode and k[2] == "all"]
        hips = [k for k in keys if k[0] == mode and k[2] != "all"]
        metrics = [(f"dice_{n}", subjects) for n in KEY] + [
            (c, hips) for c in ("ifs_mm_abs_err", "qfs_mm_abs_err", "ifs_mm_signed", "qfs_mm_signed")]
        for column, ks in metrics:
            x, y = paired(before, after, ks, column)
            if len(x):
                out.append({"mode": mode, "metric": column, "n": len(x), "before": float(x.mean()),
                            "after": float(y.mean()), "p": wilcoxon_p(x, y)})
        for grade, truth in (("edema_grade", "edema_truth"), ("goutallier", "goutallier_truth")):
            right = [(before[k].get(grade) == before[k].get(truth), after[k].get(grade) == after[k].get(truth))
                     for k in hips if before[k].get(grade) not in (None, "") and after[k].get(grade) not in (None, "")]
            if right:
                out.append({"mode": mode, "metric": f"{grade} agreement", "n": len(right),
                            "before": float(np.mean([a for a, _ in right])),
                            "after": float(np.mean([b for _, b in right])), "p": None,
                            "changed": (sum(a and not b for a, b in right), sum(b and not a for a, b in right))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--modes", default=None, help="comma-separated input modes (default: all in both)")
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",")] if a.modes else None
    records = compare(read_rows(a.before), read_rows(a.after), modes)
    if not records:
        print("no rows in common", file=sys.stderr)
        return 1
    mode = None
    for r in records:
        if r["mode"] != mode:
            mode = r["mode"]
            print(f"== {mode}")
        if r["p"] is None:
            lost, won = r["changed"]
            print(f"  {r['metric']:28s} n={r['n']:3d}  {r['before']:.3f} -> {r['after']:.3f}  "
                  f"(right only before {lost}, only after {won})")
        else:
            print(f"  {r['metric']:28s} n={r['n']:3d}  {r['before']:+.3f} -> {r['after']:+.3f}  p = {r['p']:.3f}"
                  if r["metric"].endswith("_signed") else
                  f"  {r['metric']:28s} n={r['n']:3d}  {r['before']:.3f} -> {r['after']:.3f}  p = {r['p']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
