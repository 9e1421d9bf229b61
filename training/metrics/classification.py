"""Classification figures: labels, confusion, accuracy, F1, AUC, ROC operating points, cross-entropy."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata

from .conventions import CLASS_NAMES, MALIGNANT, N_CLASSES, PROB_EPS, ROC_TOL, SENS_TARGET, SPEC_TARGET


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
