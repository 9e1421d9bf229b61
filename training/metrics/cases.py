"""Per-case records (``Case``), their scores, and the whole evaluation: ``evaluate_cases`` and
``paired_difference``."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .bootstrap import bootstrap_ci
from .classification import (accuracy, auc_macro, binary_auc, class_index, classification_metrics, cross_entropy,
                             f1_macro, operating_points)
from .conventions import CLASS_NAMES, CLS_KEYS, MALIGNANT, N_CLASSES
from .masks import as_mask, row_col_spacing
from .segmentation import segmentation_bce, segmentation_metrics


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
    gt = as_mask(case.gt, "gt")
    pred = np.zeros_like(gt) if case.pred is None else as_mask(case.pred, "pred")
    seg = segmentation_metrics(gt, pred, case.spacing, tau)
    if case.pred is None and not seg["has_lesion"]:  # a failure, not a correct empty prediction
        sy, sx = row_col_spacing(case.spacing)
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
           "spacing": list(row_col_spacing(case.spacing)) if case.spacing is not None else None,
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
    """Score every case and aggregate: the nested results dict (see conventions.py).

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
