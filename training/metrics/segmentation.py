"""Per-image segmentation figures: Dice, IoU, pixel BCE, and all of them at once."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .conventions import PROB_EPS
from .masks import as_mask, image_diagonal, mask_pair, row_col_spacing
from .surface import robust_hausdorff, surface_dice, surface_distances


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """2|G&P| / (|G|+|P|); 0 when exactly one mask is empty, NaN when both are."""
    g, p = mask_pair(gt, pred)
    total = int(g.sum()) + int(p.sum())
    return float("nan") if total == 0 else 2.0 * int((g & p).sum()) / total


def iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """|G&P| / |G|P|; 0 when exactly one mask is empty, NaN when both are."""
    g, p = mask_pair(gt, pred)
    union = int((g | p).sum())
    return float("nan") if union == 0 else int((g & p).sum()) / union


def segmentation_bce(gt: np.ndarray, prob: np.ndarray, eps: float = PROB_EPS) -> float:
    """Mean pixel binary cross-entropy of a lesion-probability map against the ground truth mask."""
    g = as_mask(gt, "gt")
    prob = np.asarray(prob, dtype=np.float64)
    if prob.shape != g.shape:
        raise ValueError(f"probability map {prob.shape} and gt {g.shape} differ in shape")
    p = np.clip(prob, eps, 1.0 - eps)
    return float(-np.mean(np.where(g, np.log(p), np.log1p(-p))))


def segmentation_metrics(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float] | None = None,
                         tau: float = 2.0) -> dict:
    """Every per-image segmentation figure (see conventions.py); one distance computation.

    Keys: has_lesion, pred_empty, dice, iou, hd95, nsd (NaN on a normal image with an empty
    prediction), gt_area, pred_area, fp_area (areas in px, or mm^2 with spacing).
    """
    g, p = mask_pair(gt, pred)
    sy, sx = row_col_spacing(spacing)
    px = sy * sx
    has, pred_any = bool(g.any()), bool(p.any())
    out = {"has_lesion": has, "pred_empty": not pred_any, "dice": dice(g, p), "iou": iou(g, p),
           "gt_area": float(g.sum() * px), "pred_area": float(p.sum() * px), "fp_area": float((p & ~g).sum() * px)}
    if not has and not pred_any:
        out["hd95"] = out["nsd"] = float("nan")
    elif not has or not pred_any:
        out["hd95"], out["nsd"] = image_diagonal(g.shape, (sy, sx)), 0.0
    else:
        sd = surface_distances(g, p, (sy, sx))
        out["hd95"], out["nsd"] = robust_hausdorff(sd, 95.0), surface_dice(sd, tau)
    return out
