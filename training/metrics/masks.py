"""Mask and spacing checks shared by the segmentation metrics, and the image diagonal
(the HD95 of an empty prediction on a lesion image)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """A 2-D mask as booleans (any non-zero pixel is lesion); ValueError naming ``name`` otherwise."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, not shape {mask.shape}")
    return mask != 0


def row_col_spacing(spacing: Sequence[float] | None) -> tuple[float, float]:
    """(row, col) pixel size as two positive floats; None = (1, 1), distances in pixels."""
    if spacing is None:
        return 1.0, 1.0
    sy, sx = (float(s) for s in spacing)
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise ValueError(f"spacing must be two positive numbers (row, col), not {spacing!r}")
    return sy, sx


def mask_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and prediction as boolean masks of one shape."""
    g, p = as_mask(gt, "gt"), as_mask(pred, "pred")
    if g.shape != p.shape:
        raise ValueError(f"gt {g.shape} and pred {p.shape} differ in shape")
    return g, p


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """sqrt((H*sy)^2 + (W*sx)^2): the HD95 given to an empty prediction on a lesion image."""
    sy, sx = row_col_spacing(spacing)
    return float(math.hypot(shape[0] * sy, shape[1] * sx))
