"""Segmentation and classification metrics, per image and aggregated, with bootstrap intervals.

Plain numpy/scipy; no file access (``training.evaluate`` reads predictions and writes reports).

Conventions
-----------
Masks
    Any non-zero pixel is lesion. A *lesion image* is one whose ground-truth mask has at least
    one lesion pixel; a *normal image* is one whose ground-truth mask is empty (the data contract
    gives normal images all-zero masks). Segmentation metrics (Dice, IoU, HD95, NSD) are averaged
    over lesion images only; normal images are reported separately.

Units and spacing
    ``spacing`` is (row, col) = (y, x) pixel size, the order of the numpy axes (note that
    ``model.image.LoadedImage.spacing`` is (x, y): swap it). ``spacing=None`` means (1, 1) and
    distances in pixels, areas in pixels; with a spacing (mha files) distances are in mm and
    areas in mm^2. The NSD tolerance ``tau`` is in the same unit as the distances (default 2,
    i.e. 2 px without spacing, 2 mm with one).

Dice and IoU
    2|G&P| / (|G|+|P|) and |G&P| / |G|P|. Empty prediction on a lesion image: 0. Both masks
    empty: NaN (undefined; never part of the segmentation mean, which covers lesion images only).

Surface distances (HD95, NSD)
    Same definition as DeepMind's ``surface_distance`` package (``compute_surface_distances``
    followed by ``compute_robust_hausdorff(.., 95)`` / ``compute_surface_dice_at_tolerance``):
    the surface points are the pixel *corners* whose 2 x 2 neighbourhood of pixels is neither all
    lesion nor all background; each point carries the length of the marching-squares contour
    piece through it (half a pixel diagonal, a pixel side, or a full diagonal for a saddle,
    scaled by the spacing); distances are exact Euclidean distances between corner points
    (``scipy.ndimage.distance_transform_edt`` on the border points with ``sampling=spacing``).
    HD95 = max of the two directed 95th percentiles, each the contour-length-weighted percentile
    (the first sorted distance whose cumulative length share reaches 0.95, no interpolation).
    NSD at tau = (length of G's contour within tau of P's + length of P's contour within tau of
    G's) / (total length of both contours); "within" is ``<= tau``.
    Empty prediction on a lesion image (or a prediction on an empty ground truth): NSD 0 (as in
    surface_distance) and HD95 = the image diagonal sqrt((H*sy)^2 + (W*sx)^2), finite, in the
    same unit (surface_distance returns inf). Both empty: HD95 and NSD NaN.

Normal images
    ``normal_empty_share``: share of normal images whose prediction is empty.
    ``normal_fp_area``: mean predicted lesion area on normal images (pixels, or mm^2 with
    spacing) -- every predicted pixel there is a false positive. ``fp_area`` per case is the
    area of prediction outside the ground truth, for every image.

Classification (class order ``model.CLASS_NAMES`` = normal, benign, malignant)
    Labels are class indices 0..2 (or the names); ``-1`` (or None) as a predicted label means
    "no prediction" and is always wrong: it is a false negative of the true class and a false
    positive of no class, and is counted in ``confusion_missing`` instead of the 3 x 3
    ``confusion_matrix`` (rows = true class, columns = predicted class).
    ``accuracy``: share of images whose predicted label equals the true one.
    ``f1_macro``: unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes that
    occur in the true or the predicted labels (scikit-learn's ``f1_score(average="macro")``).
    ``recall`` per class: TP / (images of that class); NaN when the class does not occur.
    ``auc_malignant``: ROC AUC of P(malignant) for malignant vs rest (Mann-Whitney statistic,
    ties count one half = scikit-learn's ``roc_auc_score``). ``auc_macro``: unweighted mean of
    the one-vs-rest AUCs of the classes that occur and do not cover every image (with all three
    classes present this equals ``roc_auc_score(y, P, multi_class="ovr", average="macro")``;
    scikit-learn raises instead when a class is absent). AUC is NaN when undefined.
    ``sens_at_90_spec``: the best sensitivity among the ROC points (thresholds at every distinct
    P(malignant), predicting malignant when P >= threshold, plus the all-negative point) whose
    specificity is >= 0.9; ``spec_at_90_sens``: the best specificity among points with
    sensitivity >= 0.9. No interpolation between points. Both NaN without positives or negatives.
    ``cross_entropy``: mean of -ln(clip(P[true class], 1e-7, 1)); probabilities are used as given
    (not renormalised).
    ``seg_bce``: per-image mean pixel binary cross-entropy of a lesion-probability map against
    the ground truth (probabilities clipped to [1e-7, 1 - 1e-7]), averaged over the images that
    have a map (all images, normal ones included); NaN when no map is given.

Missing predictions (set by the caller, see ``training.evaluate``)
    A case without a predicted mask (missing, unreadable or of the wrong size) is a failure: on a
    lesion image it is scored as an empty mask (Dice 0, HD95 = diagonal); on a normal image it is
    not an empty prediction (``pred_empty`` False: it lowers ``normal_empty_share``) and its
    predicted and false-positive area is the whole image. A case without probabilities gets
    the uniform (1/3, 1/3, 1/3), and without a label the label -1 (always wrong) unless
    probabilities are given, in which case the label is their argmax (first class on ties).

Aggregation and confidence intervals
    Headline segmentation figures are means over lesion images (medians are given too).
    Bootstrap: ``n_boot`` resamples (default 1000) with replacement of the resampling units (each
    image, or with ``Case.group`` a patient's images together: ``training.evaluate`` groups them), all
    metrics of one resample computed on the same drawn images, ``numpy.random.default_rng(seed)``; the
    interval is the percentile interval (2.5th and 97.5th percentiles with numpy's linear
    interpolation for 95%) of the resampled values, ignoring resamples where the metric is
    undefined (e.g. no lesion image or no malignant case drawn). Same seed, same intervals.
    ``by_source`` repeats everything (with its own bootstrap, same seed) per ``source`` value.
    ``paired_difference``: two models on the same images; the interval of each difference B - A
    comes from resampling the images once for both, so it is narrower than the two intervals
    side by side suggest (``python -m training.compare A B --paired``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from model import CLASS_NAMES

N_CLASSES = len(CLASS_NAMES)
MALIGNANT = CLASS_NAMES.index("malignant")
PROB_EPS = 1e-7
SPEC_TARGET = 0.9
SENS_TARGET = 0.9
ROC_TOL = 1e-12  # float slack for ">= 0.9" comparisons of ratios such as 9/10

# Headline figures, in report order; every one gets a bootstrap interval.
SEG_KEYS = ("dsc", "iou", "hd95", "nsd")
CLS_KEYS = ("accuracy", "f1_macro", "auc_macro", "auc_malignant", "sens_at_90_spec", "spec_at_90_sens",
            "cross_entropy")
HEADLINE = SEG_KEYS + CLS_KEYS + ("normal_empty_share", "normal_fp_area", "seg_bce")


# --------------------------------------------------------------------------------------------
# Segmentation, one image
# --------------------------------------------------------------------------------------------

def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, not shape {mask.shape}")
    return mask != 0


def _spacing(spacing: Sequence[float] | None) -> tuple[float, float]:
    if spacing is None:
        return 1.0, 1.0
    sy, sx = (float(s) for s in spacing)
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise ValueError(f"spacing must be two positive numbers (row, col), not {spacing!r}")
    return sy, sx


def _pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, p = _as_bool(gt, "gt"), _as_bool(pred, "pred")
    if g.shape != p.shape:
        raise ValueError(f"gt {g.shape} and pred {p.shape} differ in shape")
    return g, p


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """2|G&P| / (|G|+|P|); 0 when exactly one mask is empty, NaN when both are."""
    g, p = _pair(gt, pred)
    total = int(g.sum()) + int(p.sum())
    return float("nan") if total == 0 else 2.0 * int((g & p).sum()) / total


def iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """|G&P| / |G|P|; 0 when exactly one mask is empty, NaN when both are."""
    g, p = _pair(gt, pred)
    union = int((g | p).sum())
    return float("nan") if union == 0 else int((g & p).sum()) / union


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """sqrt((H*sy)^2 + (W*sx)^2): the HD95 given to an empty prediction on a lesion image."""
    sy, sx = _spacing(spacing)
    return float(math.hypot(shape[0] * sy, shape[1] * sx))


def contour_length_table(spacing: Sequence[float] | None = None) -> np.ndarray:
    """Contour length through a pixel corner for each of the 16 codes of its 2 x 2 neighbourhood.

    Code bits: 8 = top-left, 4 = top-right, 2 = bottom-left, 1 = bottom-right pixel is lesion.
    """
    sy, sx = _spacing(spacing)
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
    g, p = _pair(gt, pred)
    sy, sx = _spacing(spacing)
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
    g, p = _pair(gt, pred)
    if not g.any() and not p.any():
        return float("nan")
    if not g.any() or not p.any():
        return image_diagonal(g.shape, spacing)
    return robust_hausdorff(surface_distances(g, p, spacing), 95.0)


def nsd(gt: np.ndarray, pred: np.ndarray, tau: float = 2.0, spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice at tolerance ``tau``; 0 when exactly one mask is empty, NaN when both."""
    return surface_dice(surface_distances(gt, pred, spacing), tau)


def segmentation_bce(gt: np.ndarray, prob: np.ndarray, eps: float = PROB_EPS) -> float:
    """Mean pixel binary cross-entropy of a lesion-probability map against the ground truth mask."""
    g = _as_bool(gt, "gt")
    prob = np.asarray(prob, dtype=np.float64)
    if prob.shape != g.shape:
        raise ValueError(f"probability map {prob.shape} and gt {g.shape} differ in shape")
    p = np.clip(prob, eps, 1.0 - eps)
    return float(-np.mean(np.where(g, np.log(p), np.log1p(-p))))


def segmentation_metrics(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float] | None = None,
                         tau: float = 2.0) -> dict:
    """Every per-image segmentation figure (see the module conventions); one distance computation.

    Keys: has_lesion, pred_empty, dice, iou, hd95, nsd (NaN on a normal image with an empty
    prediction), gt_area, pred_area, fp_area (areas in px, or mm^2 with spacing).
    """
    g, p = _pair(gt, pred)
    sy, sx = _spacing(spacing)
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


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------

def class_index(label: Any) -> int:
    """A class name (any case) or index -> 0..2; None / -1 / '' -> -1 (no prediction)."""
    if label is None:
        return -1
    if isinstance(label, (int, np.integer)):
        if -1 <= int(label) < N_CLASSES:
            return int(label)
        raise ValueError(f"class index {label} out of range")
    name = str(label).strip().lower()
    if name == "":
        return -1
    if name not in CLASS_NAMES:
        raise ValueError(f"unknown class {label!r} (expected one of {CLASS_NAMES})")
    return CLASS_NAMES.index(name)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int]) -> np.ndarray:
    """3 x 3 counts, rows = true class, columns = predicted; predictions of -1 are left out."""
    y, yp = np.asarray(y_true, int), np.asarray(y_pred, int)
    ok = yp >= 0
    return np.bincount(y[ok] * N_CLASSES + yp[ok], minlength=N_CLASSES ** 2).reshape(N_CLASSES, N_CLASSES)


def _cls_counts(y: np.ndarray, yp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class TP, FP, FN (a -1 prediction is a false negative of the true class only)."""
    tp = np.bincount(y[yp == y], minlength=N_CLASSES)
    fp = np.bincount(yp[(yp != y) & (yp >= 0)], minlength=N_CLASSES)
    fn = np.bincount(y[yp != y], minlength=N_CLASSES)
    return tp, fp, fn


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y, yp = np.asarray(y_true, int), np.asarray(y_pred, int)
    return float(np.mean(y == yp)) if len(y) else float("nan")


def f1_per_class(y_true: Sequence[int], y_pred: Sequence[int]) -> np.ndarray:
    """2TP / (2TP+FP+FN) per class; NaN for a class absent from both true and predicted labels."""
    tp, fp, fn = _cls_counts(np.asarray(y_true, int), np.asarray(y_pred, int))
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.maximum(den, 1), np.nan)


def f1_macro(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    f1 = f1_per_class(y_true, y_pred)
    return float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")


def recall_per_class(y_true: Sequence[int], y_pred: Sequence[int]) -> np.ndarray:
    y, yp = np.asarray(y_true, int), np.asarray(y_pred, int)
    tp, _, _ = _cls_counts(y, yp)
    n = np.bincount(y, minlength=N_CLASSES)
    return np.where(n > 0, tp / np.maximum(n, 1), np.nan)


def binary_auc(positive: Sequence[bool], score: Sequence[float]) -> float:
    """ROC AUC (Mann-Whitney, ties count one half); NaN without positives or without negatives."""
    pos = np.asarray(positive, bool)
    s = np.asarray(score, float)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_ovr(y_true: Sequence[int], probs: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of each class from its probability column (NaN where undefined)."""
    y, P = np.asarray(y_true, int), np.asarray(probs, float)
    return np.array([binary_auc(y == k, P[:, k]) for k in range(N_CLASSES)])


def auc_macro(y_true: Sequence[int], probs: np.ndarray) -> float:
    a = auc_ovr(y_true, probs)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def roc_curve(positive: Sequence[bool], score: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first, after the (0, 0) point at +inf.

    A case is called positive when its score is >= the threshold.
    """
    pos = np.asarray(positive, bool)
    s = np.asarray(score, float)
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1] if len(s) else np.zeros(0, int)
    tp = np.r_[0, np.cumsum(pos)[last]]
    fp = np.r_[0, np.cumsum(~pos)[last]]
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / n_pos if n_pos else np.full(len(tp), np.nan)
        fpr = fp / n_neg if n_neg else np.full(len(fp), np.nan)
    return fpr, tpr, np.r_[np.inf, s[last]]


def operating_points(positive: Sequence[bool], score: Sequence[float], spec_target: float = SPEC_TARGET,
                     sens_target: float = SENS_TARGET) -> tuple[float, float]:
    """(best sensitivity with specificity >= spec_target, best specificity with sensitivity >= sens_target)."""
    pos = np.asarray(positive, bool)
    if pos.all() or not pos.any():
        return float("nan"), float("nan")
    fpr, tpr, _ = roc_curve(pos, score)
    spec = 1.0 - fpr
    return float(tpr[spec >= spec_target - ROC_TOL].max()), float(spec[tpr >= sens_target - ROC_TOL].max())


def cross_entropy(y_true: Sequence[int], probs: np.ndarray, eps: float = PROB_EPS) -> float:
    """Mean -ln(clip(P[true class], eps, 1))."""
    y, P = np.asarray(y_true, int), np.asarray(probs, float)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(P[np.arange(len(y)), y], eps, 1.0))))


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], probs: np.ndarray) -> dict:
    """All classification figures for labels (0..2, -1 = none) and N x 3 probabilities."""
    y, yp, P = np.asarray(y_true, int), np.asarray(y_pred, int), np.asarray(probs, float).reshape(-1, N_CLASSES)
    sens, spec = operating_points(y == MALIGNANT, P[:, MALIGNANT])
    return {
        "accuracy": accuracy(y, yp), "f1_macro": f1_macro(y, yp),
        "auc_macro": auc_macro(y, P), "auc_malignant": binary_auc(y == MALIGNANT, P[:, MALIGNANT]),
        "sens_at_90_spec": sens, "spec_at_90_sens": spec, "cross_entropy": cross_entropy(y, P),
        "recall": dict(zip(CLASS_NAMES, recall_per_class(y, yp).tolist())),
        "f1": dict(zip(CLASS_NAMES, f1_per_class(y, yp).tolist())),
        "auc_ovr": dict(zip(CLASS_NAMES, auc_ovr(y, P).tolist())),
        "confusion_matrix": confusion_matrix(y, yp).tolist(),
        "confusion_missing": np.bincount(y[yp < 0], minlength=N_CLASSES).tolist(),
        "support": np.bincount(y, minlength=N_CLASSES).tolist(),
    }


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------

def bootstrap_ci(statistic, n: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 groups: Sequence[np.ndarray] | None = None) -> dict:
    """Percentile intervals of ``statistic(indices) -> {name: value}`` over resampled indices.

    ``groups``: the indices of each unit that is resampled whole (a patient's images, which are not
    independent of each other); None: each index is its own unit.
    Returns {name: [low, high]} ([None, None] when no resample gives a finite value) and, under
    ``"_valid"``, how many resamples gave a finite value per name.
    """
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(n_boot):
        if groups is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        for k, v in statistic(idx).items():
            values.setdefault(k, []).append(v)
    alpha = 100 * (1 - level) / 2
    out: dict[str, Any] = {"_valid": {}}
    for k, vs in values.items():
        a = np.asarray(vs, float)
        a = a[np.isfinite(a)]
        out["_valid"][k] = int(len(a))
        out[k] = [float(x) for x in np.percentile(a, [alpha, 100 - alpha])] if len(a) else [None, None]
    return out


# --------------------------------------------------------------------------------------------
# Per-case records and the whole evaluation
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One image's ground truth and prediction, as ``evaluate_cases`` takes it (or the same keys in a dict).

    ``pred`` None = no predicted mask (scored as empty); ``probabilities`` None = none (uniform);
    ``pred_label`` None = argmax of the probabilities, or -1 (wrong) without them.
    """

    image_id: str
    label: Any  # true class: name or index
    gt: np.ndarray
    pred: np.ndarray | None = None
    probabilities: Sequence[float] | Mapping[str, float] | None = None
    pred_label: Any = None
    source: str = ""
    spacing: Sequence[float] | None = None  # (row, col)
    prob_map: np.ndarray | None = None
    seg_bce: float | None = None  # already computed (training.evaluate: no full-size map kept per case)
    group: str = ""  # the unit the bootstrap resamples whole, e.g. "BBR:patient 12"; "" = the image alone


def _probs(p) -> np.ndarray | None:
    if p is None:
        return None
    if isinstance(p, Mapping):
        p = [p[c] for c in CLASS_NAMES]
    arr = np.asarray(p, float).reshape(-1)
    if arr.shape != (N_CLASSES,) or not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"probabilities must be {N_CLASSES} finite non-negative numbers, not {p!r}")
    return arr


def score_case(case: Case | Mapping, tau: float = 2.0) -> dict:
    """One record's metrics: segmentation figures, labels, probabilities and flags for missing parts."""
    if not isinstance(case, Case):
        known = {f.name for f in fields(Case)}
        case = Case(**{k: v for k, v in case.items() if k in known})
    gt = _as_bool(case.gt, "gt")
    pred = np.zeros_like(gt) if case.pred is None else _as_bool(case.pred, "pred")
    seg = segmentation_metrics(gt, pred, case.spacing, tau)
    if case.pred is None and not seg["has_lesion"]:  # a failure, not a correct empty prediction
        sy, sx = _spacing(case.spacing)
        area = float(gt.size * sy * sx)
        seg.update(pred_empty=False, pred_area=area, fp_area=area)
    probs = _probs(case.probabilities)
    pred_label = class_index(case.pred_label)
    if pred_label < 0 and probs is not None:
        pred_label = int(np.argmax(probs))
    out = {"image_id": str(case.image_id), "source": str(case.source or ""), "group": str(case.group or ""),
           "label": CLASS_NAMES[class_index(case.label)],
           "pred_label": CLASS_NAMES[pred_label] if pred_label >= 0 else None,
           "probabilities": (probs if probs is not None else np.full(N_CLASSES, 1.0 / N_CLASSES)).tolist(),
           "missing_mask": case.pred is None, "missing_probabilities": probs is None,
           "missing_label": pred_label < 0,
           "spacing": list(_spacing(case.spacing)) if case.spacing is not None else None,
           "seg_bce": segmentation_bce(gt, case.prob_map) if case.prob_map is not None
           else float(case.seg_bce) if case.seg_bce is not None else float("nan")}
    out.update(seg)
    return out


class _Table:
    """Per-case scores as arrays, for fast recomputation on bootstrap indices."""

    def __init__(self, scored: Sequence[dict]):
        self.n = len(scored)
        self.y = np.array([class_index(c["label"]) for c in scored], int)
        self.yp = np.array([class_index(c["pred_label"]) for c in scored], int)
        self.P = np.array([c["probabilities"] for c in scored], float).reshape(-1, N_CLASSES)
        self.lesion = np.array([c["has_lesion"] for c in scored], bool)
        self.pred_empty = np.array([c["pred_empty"] for c in scored], bool)
        self.seg = {k: np.array([c[k] for c in scored], float) for k in ("dice", "iou", "hd95", "nsd", "pred_area",
                                                                        "seg_bce")}
        # the bootstrap's units: a patient's images together (``Case.group``); None when every image
        # is its own unit (as in metrics.json files written before groups were recorded)
        members: dict[str, list[int]] = {}
        for i, c in enumerate(scored):
            members.setdefault(c.get("group") or f"image:{c['image_id']}", []).append(i)
        self.groups = [np.array(m) for m in members.values()] if len(members) < self.n else None

    def headline(self, idx: np.ndarray) -> dict:
        les, nor = idx[self.lesion[idx]], idx[~self.lesion[idx]]
        mean = (lambda a: float(np.mean(a)) if len(a) else float("nan"))
        out = {"dsc": mean(self.seg["dice"][les]), "iou": mean(self.seg["iou"][les]),
               "hd95": mean(self.seg["hd95"][les]), "nsd": mean(self.seg["nsd"][les])}
        y, yp, P = self.y[idx], self.yp[idx], self.P[idx]
        sens, spec = operating_points(y == MALIGNANT, P[:, MALIGNANT])
        out.update(accuracy=accuracy(y, yp), f1_macro=f1_macro(y, yp), auc_macro=auc_macro(y, P),
                   auc_malignant=binary_auc(y == MALIGNANT, P[:, MALIGNANT]), sens_at_90_spec=sens,
                   spec_at_90_sens=spec, cross_entropy=cross_entropy(y, P),
                   normal_empty_share=mean(self.pred_empty[nor]), normal_fp_area=mean(self.seg["pred_area"][nor]))
        bce = self.seg["seg_bce"][idx]
        out["seg_bce"] = mean(bce[np.isfinite(bce)])
        return out


def _median(a: np.ndarray) -> float:
    return float(np.median(a)) if len(a) else float("nan")


def _summarise(t: _Table, n_boot: int, seed: int, level: float) -> dict:
    idx = np.arange(t.n)
    out: dict[str, Any] = {"n_images": t.n, "n_lesion_images": int(t.lesion.sum()),
                           "n_normal_images": int((~t.lesion).sum())}
    out.update(t.headline(idx))
    les = t.lesion
    out["segmentation"] = {
        "n": int(les.sum()),
        **{f"{k}_median": _median(t.seg[k][les]) for k in ("dice", "iou", "hd95", "nsd")},
        **{f"{k}_std": float(np.std(t.seg[k][les])) if les.any() else float("nan")
           for k in ("dice", "iou", "hd95", "nsd")},
        "n_empty_prediction": int((t.pred_empty & les).sum()),
    }
    out["normal_images"] = {"n": int((~les).sum()), "n_empty_prediction": int((t.pred_empty & ~les).sum()),
                            "empty_share": out["normal_empty_share"], "mean_fp_area": out["normal_fp_area"]}
    cls = classification_metrics(t.y, t.yp, t.P)
    out["classification"] = {k: v for k, v in cls.items() if k not in CLS_KEYS and k != "confusion_matrix"}
    out["confusion_matrix"] = cls["confusion_matrix"]
    if n_boot > 0 and t.n > 0:
        ci = bootstrap_ci(t.headline, t.n, n_boot, seed, level, t.groups)
        out["ci_valid_resamples"] = ci.pop("_valid")
        out["ci"] = ci
    return out


def _unit(t: _Table) -> dict:
    return {"unit": "image" if t.groups is None else "group", "n_units": t.n if t.groups is None else len(t.groups)}


def evaluate_cases(cases: Iterable[Case | Mapping], tau: float = 2.0, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95, by_source: bool = True) -> dict:
    """Score every case and aggregate: the nested results dict (see the module conventions).

    Top level: the headline figures (``dsc iou hd95 nsd accuracy f1_macro auc_macro auc_malignant
    sens_at_90_spec spec_at_90_sens cross_entropy normal_empty_share normal_fp_area seg_bce``),
    ``n_images``, ``ci`` ({name: [low, high]}), ``segmentation``, ``normal_images``,
    ``classification`` (per-class recall/F1/AUC, confusion counts), ``confusion_matrix``,
    ``units``, ``by_source`` ({source: the same without ``cases``}) and ``cases`` (per-case scores).
    """
    scored = [score_case(c, tau) for c in cases]
    with_spacing = {c["spacing"] is not None for c in scored}
    if len(with_spacing) > 1:
        raise ValueError("some cases have a spacing and some do not: distances would mix mm and pixels")
    mm = with_spacing == {True}
    table = _Table(scored)
    out = _summarise(table, n_boot, seed, level)
    out["units"] = {"distance": "mm" if mm else "px", "area": "mm^2" if mm else "px^2", "tau": float(tau)}
    out["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "level": float(level), "method": "percentile",
                        **_unit(table)}
    if by_source:
        sources = sorted({c["source"] for c in scored})
        out["by_source"] = {s: _summarise(_Table([c for c in scored if c["source"] == s]), n_boot, seed,
                                       level)
                            for s in sources}
    out["cases"] = scored
    return out


def paired_difference(a: Sequence[Mapping], b: Sequence[Mapping], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Two evaluations of the same images (``evaluate_cases(...)["cases"]`` or metrics.json's
    ``cases``), compared: the headline figures of each, ``diff`` = B - A, and a paired bootstrap
    interval of each difference (both scored on the same resampled images each time, so what the
    images share cancels). ``dice`` counts the lesion images where B's Dice is higher, lower or equal.

    The images must be the same, with the same true labels; else a ValueError names the first few
    that differ.
    """
    by_id = {str(c["image_id"]): c for c in b}
    ids = [str(c["image_id"]) for c in a]
    only_a, only_b = sorted(set(ids) - set(by_id)), sorted(set(by_id) - set(ids))
    if only_a or only_b or len(ids) != len(by_id) or len(b) != len(by_id):
        raise ValueError(f"not the same images: {len(only_a)} only in A {only_a[:3]}, {len(only_b)} only in B "
                         f"{only_b[:3]}" + ("; an image id occurs twice" if not (only_a or only_b) else ""))
    b = [by_id[i] for i in ids]
    other = [i for i, ca, cb in zip(ids, a, b) if class_index(ca["label"]) != class_index(cb["label"])]
    if other:
        raise ValueError(f"{len(other)} images have other true labels in A and B (another dataset?): {other[:3]}")
    ta, tb = _Table(a), _Table(b)
    idx = np.arange(ta.n)
    va, vb = ta.headline(idx), tb.headline(idx)
    out: dict[str, Any] = {"n_images": ta.n, "n_lesion_images": int(ta.lesion.sum()), "a": va, "b": vb,
                           "diff": {k: vb[k] - va[k] for k in va}}
    les = ta.lesion
    da, db = ta.seg["dice"][les], tb.seg["dice"][les]
    out["dice"] = {"b_higher": int((db > da).sum()), "b_lower": int((db < da).sum()), "equal": int((db == da).sum())}
    if n_boot > 0 and ta.n > 0:
        def diff(i: np.ndarray) -> dict:
            ha, hb = ta.headline(i), tb.headline(i)
            return {k: hb[k] - ha[k] for k in ha}

        ci = bootstrap_ci(diff, ta.n, n_boot, seed, level, ta.groups)
        out["ci_valid_resamples"] = ci.pop("_valid")
        out["ci"] = ci
        out["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "level": float(level), "method": "percentile",
                            "paired": True, **_unit(ta)}
    return out


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
