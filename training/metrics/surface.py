"""Surface distances as DeepMind's ``surface_distance`` computes them, HD95 and NSD."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from .masks import image_diagonal, mask_pair, row_col_spacing


def contour_length_table(spacing: Sequence[float] | None = None) -> np.ndarray:
    """Contour length through a pixel corner for each of the 16 codes of its 2 x 2 neighbourhood.

    Code bits: 8 = top-left, 4 = top-right, 2 = bottom-left, 1 = bottom-right pixel is lesion.
    """
    sy, sx = row_col_spacing(spacing)
    half_diag = 0.5 * math.sqrt(sy ** 2 + sx ** 2)
    table = np.zeros(16)
    for code in range(16):
        tl, tr, bl, br = (code >> 3) & 1, (code >> 2) & 1, (code >> 1) & 1, code & 1
        inside = tl + tr + bl + br
        if inside in (1, 3):
            table[code] = half_diag  # a corner cut off
        elif inside == 2:
            if tl == tr:
                table[code] = sx  # top or bottom pair: a horizontal piece one pixel wide
            elif tl == bl:
                table[code] = sy  # left or right pair: a vertical piece one pixel high
            else:
                table[code] = 2 * half_diag  # saddle: two diagonal cuts
    return table


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """(h+1) x (w+1) neighbourhood codes of the pixel corners of ``mask`` (outside = background)."""
    p = np.pad(mask.astype(np.uint8), 1)
    return 8 * p[:-1, :-1] + 4 * p[:-1, 1:] + 2 * p[1:, :-1] + p[1:, 1:]


def surface_distances(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float] | None = None) -> dict:
    """Distances from every surface point of one mask to the other mask's surface.

    Returns ``distances_gt_to_pred``, ``distances_pred_to_gt`` (sorted ascending) and the matching
    contour lengths ``surfel_areas_gt``, ``surfel_areas_pred``, as DeepMind's
    ``surface_distance.compute_surface_distances`` does. Where one mask is empty its lists are
    empty and the other's distances are inf.
    """
    g, p = mask_pair(gt, pred)
    sy, sx = row_col_spacing(spacing)
    empty = {k: np.zeros(0) for k in ("distances_gt_to_pred", "distances_pred_to_gt", "surfel_areas_gt",
                                     "surfel_areas_pred")}
    union = g | p
    if not union.any():
        return empty
    rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    table = contour_length_table((sy, sx))
    codes_g, codes_p = _corner_codes(g[box]), _corner_codes(p[box])
    border_g = (codes_g != 0) & (codes_g != 15)
    border_p = (codes_p != 0) & (codes_p != 15)

    def dist_to(border: np.ndarray) -> np.ndarray:
        if not border.any():
            return np.full(border.shape, np.inf)
        return ndimage.distance_transform_edt(~border, sampling=(sy, sx))

    out = {}
    for name, codes, border, other in (("gt_to_pred", codes_g, border_g, border_p),
                                       ("pred_to_gt", codes_p, border_p, border_g)):
        d = dist_to(other)[border]
        a = table[codes[border]]
        order = np.lexsort((a, d))  # by distance, then length: surface_distance's tuple sort
        out[f"distances_{name}"] = d[order]
        out[f"surfel_areas_{name.split('_')[0]}"] = a[order]
    return out


def _directed_percentile(distances: np.ndarray, lengths: np.ndarray, percent: float) -> float:
    if len(distances) == 0:
        return math.inf
    cum = np.cumsum(lengths) / np.sum(lengths)
    idx = int(np.searchsorted(cum, percent / 100.0))
    return float(distances[min(idx, len(distances) - 1)])


def robust_hausdorff(sd: Mapping[str, np.ndarray], percent: float = 95.0) -> float:
    """surface_distance's ``compute_robust_hausdorff`` on a ``surface_distances`` result (inf if a side is empty)."""
    return max(_directed_percentile(sd["distances_gt_to_pred"], sd["surfel_areas_gt"], percent),
               _directed_percentile(sd["distances_pred_to_gt"], sd["surfel_areas_pred"], percent))


def surface_dice(sd: Mapping[str, np.ndarray], tau: float) -> float:
    """surface_distance's ``compute_surface_dice_at_tolerance`` (NaN when both surfaces are empty)."""
    dg, dp = sd["distances_gt_to_pred"], sd["distances_pred_to_gt"]
    ag, ap = sd["surfel_areas_gt"], sd["surfel_areas_pred"]
    total = float(np.sum(ag) + np.sum(ap))
    if total == 0:
        return float("nan")
    return float((np.sum(ag[dg <= tau]) + np.sum(ap[dp <= tau])) / total)


def hd95(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance; the image diagonal when exactly one mask is empty."""
    g, p = mask_pair(gt, pred)
    if not g.any() and not p.any():
        return float("nan")
    if not g.any() or not p.any():
        return image_diagonal(g.shape, spacing)
    return robust_hausdorff(surface_distances(g, p, spacing), 95.0)


def nsd(gt: np.ndarray, pred: np.ndarray, tau: float = 2.0, spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice at tolerance ``tau``; 0 when exactly one mask is empty, NaN when both."""
    return surface_dice(surface_distances(gt, pred, spacing), tau)
