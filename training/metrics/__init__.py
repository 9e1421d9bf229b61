"""Segmentation and classification metrics, per image and aggregated, with bootstrap intervals.

Plain numpy/scipy; no file access but ``read_metrics_json`` (``training.evaluate`` reads
predictions and writes reports). What each figure means: ``conventions.py`` (its docstring) and
docs/metrics.md. One concept per module:

    conventions.py     the definitions, class order, targets, the headline keys
    masks.py           mask and spacing checks, the image diagonal
    segmentation.py    Dice, IoU, pixel BCE; ``segmentation_metrics`` (all of one image)
    surface.py         surface distances (DeepMind's surface_distance), HD95, NSD
    classification.py  labels, confusion, accuracy, F1, AUC, ROC operating points, cross-entropy
    bootstrap.py       percentile intervals over resampled images or patients
    cases.py           ``Case``, ``score_case``, ``evaluate_cases``, ``paired_difference``
    metrics_file.py    metrics.json back in (``read_metrics_json``), strict JSON out (``to_jsonable``)

Everything public is importable from ``training.metrics`` itself.
"""
from .bootstrap import bootstrap_ci
from .cases import Case, evaluate_cases, paired_difference, score_case
from .classification import (accuracy, auc_macro, auc_ovr, binary_auc, class_index, classification_metrics,
                             confusion_matrix, cross_entropy, f1_macro, f1_per_class, operating_points,
                             recall_per_class, roc_curve)
from .conventions import (CLASS_NAMES, CLS_KEYS, HEADLINE, MALIGNANT, N_CLASSES, PROB_EPS, ROC_TOL, SEG_KEYS,
                          SENS_TARGET, SPEC_TARGET)
from .masks import image_diagonal
from .metrics_file import read_metrics_json, to_jsonable
from .segmentation import dice, iou, segmentation_bce, segmentation_metrics
from .surface import contour_length_table, hd95, nsd, robust_hausdorff, surface_dice, surface_distances

__all__ = [
    "CLASS_NAMES", "CLS_KEYS", "HEADLINE", "MALIGNANT", "N_CLASSES", "PROB_EPS", "ROC_TOL", "SEG_KEYS",
    "SENS_TARGET", "SPEC_TARGET",
    "Case", "accuracy", "auc_macro", "auc_ovr", "binary_auc", "bootstrap_ci", "class_index",
    "classification_metrics", "confusion_matrix", "contour_length_table", "cross_entropy", "dice",
    "evaluate_cases", "f1_macro", "f1_per_class", "hd95", "image_diagonal", "iou", "nsd", "operating_points",
    "paired_difference", "read_metrics_json", "recall_per_class", "robust_hausdorff", "roc_curve", "score_case",
    "segmentation_bce", "segmentation_metrics", "surface_dice", "surface_distances", "to_jsonable",
]
