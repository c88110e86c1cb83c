"""Conversion of results to strict JSON (numpy scalars and arrays to Python, NaN/Inf to null)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def to_jsonable(obj):
    """Recursively convert numpy types to Python, NaN/Inf to None (strict JSON), paths to str."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
