"""metrics.json: read one back, and make results strict JSON."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def read_metrics_json(path) -> dict:
    """training.evaluate's metrics.json as a dict; ValueError starting with the path when the file
    is not JSON or not such an object (compare and export name where it came from)."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("units", {}), dict):
        raise ValueError(f"{path}: not training.evaluate's metrics.json (a JSON object of metrics, "
                         f"not {type(metrics).__name__})")
    return metrics


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays to Python; NaN and inf to None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
