"""Evaluate a folder of predictions against a prepared dataset: metrics.json, report.md and plots.

    python -m training.evaluate --pred PRED --data DATA [--split val|train|all] --out DIR \
        [--tau 2] [--n-boot 1000] [--seed 0]

DATA is a ``training.prepare`` folder (images/, masks/, labels.csv, split.csv). PRED is either

* the PACE layout: ``segmentation/<id>_mask.png`` (0/255), ``classification/predictions.csv``
  (``image_id,label`` with Normal|Benign|Malignant) and ``classification/probabilities.csv``
  (``image_id,normal,benign,malignant``); distances in pixels; or
* the Grand Challenge layout: ``images/breast-lesion-segmentation/*.mha`` ({0,1}) and
  ``results.json`` (a list of entries with ``inputs``, ``outputs``, ``error_messages``); the case
  id is the stem of the entry's input file name, the probabilities are the first dict with keys
  normal/benign/malignant anywhere in its outputs, the label the first ``label`` string there,
  the mask the first ``.mha`` named there (else ``<id>.mha``); distances in mm from the mask's
  spacing (a case without a mask takes the most common spacing of the others).

The layout is detected: ``results.json`` or ``images/breast-lesion-segmentation/`` means Grand
Challenge, ``segmentation/`` or ``classification/`` means PACE. ``logits/<id>.npy`` (lesion logits
at the image's size, as ``training.predict --logits`` writes them) adds the segmentation BCE;
without them it is reported as not available.

A case of the evaluated split without a prediction is a failure, never dropped: an empty mask,
probabilities (1/3, 1/3, 1/3), and no label (always wrong) -- or the probabilities' argmax when
only the label is missing. Missing parts, predictions for ids that are not in DATA (``extra``) or
not in the split (``out_of_split``), and unreadable or mis-shaped predictions (``problems``) are
listed in metrics.json and the report. Metric conventions: ``training.metrics`` and docs/metrics.md.

Outputs in DIR: metrics.json, report.md, roc.png, confusion.png, worst/<id>.png (the worst cases
by Dice: image, ground-truth contour green, predicted contour red).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import click
import numpy as np
from scipy import ndimage

from model import CLASS_NAMES
from model.writers import LOGITS_DIR
from model.io import ImageReadError, atomic_path, is_image_file, read_image, read_mask, write_png, write_text
from training import metrics as M
from training.datasets import DataError, csv_rows, first_of_each_class, parse_label, read_split
from training.grouping import linked

GC_MASK_DIR = Path("images") / "breast-lesion-segmentation"
N_WORST = 8


# --------------------------------------------------------------------------------------------
# Reading the dataset and the predictions
# --------------------------------------------------------------------------------------------

def _read_csv(path: Path) -> list[dict[str, str]]:
    return [{k: (v or "").strip() for k, v in row.items()} for _, row in csv_rows(path)]


def load_truth(data_dir: Path | str, split: str = "val") -> list[dict[str, str]]:
    """labels.csv rows (image_id, label, source, ...) of ``split`` (train, val or all), in file order."""
    data_dir = Path(data_dir)
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be train, val or all, not {split!r}")
    rows = _read_csv(data_dir / "labels.csv")
    for line, r in enumerate(rows, start=2):  # line 1: the header
        r["image_id"] = (r.get("image_id") or "").strip()
        r["label"] = parse_label(r.get("label"), data_dir / "labels.csv", line, r.get("image_id", ""))
    if split == "all":
        return rows
    chosen = {iid for iid, s in read_split(data_dir / "split.csv").items() if s == split}
    return [r for r in rows if r["image_id"] in chosen]


def bootstrap_groups(data_dir: Path | str, rows: list[dict[str, str]]) -> dict[str, str]:
    """image id -> the unit the bootstrap resamples it with ("" = alone): a patient's images
    (labels.csv's source and patient_id) joined with their near-duplicates (the same scan
    re-exported, which training.prepare's report.json lists); neither is independent of the other."""
    patients: dict[tuple, list[str]] = {}
    for r in rows:
        if r.get("patient_id"):
            patients.setdefault((r.get("source", ""), r["patient_id"]), []).append(r["image_id"])
    links = list(patients.values())
    report = Path(data_dir) / "report.json"
    if report.is_file():
        try:
            duplicates = json.loads(report.read_text()).get("duplicates", [])
        except (json.JSONDecodeError, AttributeError):
            duplicates = []
        links += [[str(i) for i in d["kept"]] for d in duplicates
                  if isinstance(d, dict) and d.get("kind") == "near-duplicate" and isinstance(d.get("kept"), list)]
    root = linked((r["image_id"] for r in rows), links)
    size = Counter(root.values())
    return {i: f"group:{r}" if size[r] > 1 else "" for i, r in root.items()}


def detect_layout(pred_dir: Path | str) -> str:
    """``"grand-challenge"`` or ``"pace"``; ValueError when neither layout is recognised."""
    pred_dir = Path(pred_dir)
    if (pred_dir / "results.json").is_file() or (pred_dir / GC_MASK_DIR).is_dir():
        return "grand-challenge"
    if (pred_dir / "segmentation").is_dir() or (pred_dir / "classification").is_dir():
        return "pace"
    raise ValueError(f"{pred_dir}: neither the PACE layout (segmentation/, classification/) nor the Grand "
                     f"Challenge layout (results.json, {GC_MASK_DIR}/)")


def _new_entry() -> dict:
    return {"mask": None, "label": None, "probabilities": None}


def _parse_label(value: Any) -> str | None:
    try:
        k = M.class_index(value)
    except (ValueError, TypeError):
        return None
    return CLASS_NAMES[k] if k >= 0 else None


PROB_SUM_TOLERANCE = 1e-3


def _parse_probs(values: Mapping[str, Any]) -> list[float] | None:
    low = {str(k).strip().lower(): v for k, v in values.items()}
    try:
        p = [float(low[c]) for c in CLASS_NAMES]
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(x) and x >= 0 for x in p) or abs(sum(p) - 1.0) > PROB_SUM_TOLERANCE:
        return None  # probabilities: none negative, summing to 1 (10,20,70 would score a perfect log loss)
    return p


def read_pace(pred_dir: Path | str) -> tuple[dict[str, dict], list[dict]]:
    """{image_id: {mask: Path|None, label: str|None, probabilities: [3]|None}} and the problems found."""
    pred_dir = Path(pred_dir)
    preds: dict[str, dict] = {}
    problems: list[dict] = []
    seg = pred_dir / "segmentation"
    if seg.is_dir():
        for p in sorted(seg.iterdir()):
            if p.is_file() and p.name.endswith("_mask.png") and not p.name.startswith("."):
                preds.setdefault(p.name[: -len("_mask.png")], _new_entry())["mask"] = p
    cls = pred_dir / "classification"
    for name, key in (("predictions.csv", "label"), ("probabilities.csv", "probabilities")):
        path = cls / name
        if not path.is_file():
            continue
        for row in _read_csv(path):
            cid = row.get("image_id", "")
            if not cid:
                continue
            value = _parse_label(row.get("label")) if key == "label" else _parse_probs(row)
            if value is None:
                problems.append({"image_id": cid, "problem": f"{name}: unusable row {row}"})
                continue
            entry = preds.setdefault(cid, _new_entry())
            if entry[key] is not None:
                problems.append({"image_id": cid, "problem": f"{name}: duplicate row, first one kept"})
                continue
            entry[key] = value
    return preds, problems


def _walk(obj: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """(key, value) for every value nested in dicts and lists, depth first, in order."""
    yield key, obj
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, key)


def _stem(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    for suffix in (".nii.gz", ".mha", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".mhd", ".nii"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return Path(base).stem


def _gc_case_id(entry: Mapping) -> str | None:
    inputs = entry.get("inputs", [])
    names = [v for k, v in _walk(inputs) if k == "name" and isinstance(v, str)]
    names += [v for k, v in _walk(inputs) if isinstance(v, str) and is_image_file(Path(v))]
    return _stem(names[0]) if names else None


def read_grand_challenge(pred_dir: Path | str) -> tuple[dict[str, dict], list[dict]]:
    """The Grand Challenge layout as ``read_pace`` returns the PACE one (leniently, see the module doc)."""
    pred_dir = Path(pred_dir)
    mask_dir = pred_dir / GC_MASK_DIR
    preds: dict[str, dict] = {}
    problems: list[dict] = []
    referenced: set[Path] = set()
    results = pred_dir / "results.json"
    entries: list = []
    if results.is_file():
        try:
            entries = json.loads(results.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append({"image_id": None, "problem": f"results.json is not valid JSON ({exc})"})
        if isinstance(entries, Mapping):
            entries = [entries]
        if not isinstance(entries, list):
            problems.append({"image_id": None, "problem": "results.json is not a list of entries"})
            entries = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            problems.append({"image_id": None, "problem": f"results.json entry {i} is not an object"})
            continue
        cid = _gc_case_id(entry)
        if not cid:
            problems.append({"image_id": None, "problem": f"results.json entry {i}: no input file name"})
            continue
        if cid in preds:
            problems.append({"image_id": cid, "problem": f"results.json entry {i}: duplicate case, first one kept"})
            continue
        entry_out = _new_entry()
        outputs = entry.get("outputs", [])
        for k, v in _walk(outputs):
            if entry_out["probabilities"] is None and isinstance(v, Mapping):
                if set(CLASS_NAMES) <= {str(x).strip().lower() for x in v}:
                    entry_out["probabilities"] = _parse_probs(v)
            if entry_out["label"] is None and k in ("label", "class", "prediction") and isinstance(v, (str, int)) \
                    and not isinstance(v, bool):
                entry_out["label"] = _parse_label(v)
            if entry_out["mask"] is None and isinstance(v, str) and is_image_file(Path(v)):
                for cand in (pred_dir / v, mask_dir / Path(v).name):
                    if cand.is_file():
                        entry_out["mask"] = cand
                        break
        if entry_out["mask"] is None and (mask_dir / f"{cid}.mha").is_file():
            entry_out["mask"] = mask_dir / f"{cid}.mha"
        if entry_out["mask"] is not None:
            referenced.add(entry_out["mask"].resolve())
        if entry.get("error_messages"):
            problems.append({"image_id": cid, "problem": f"error_messages: {entry['error_messages']}"})
        preds[cid] = entry_out
    if mask_dir.is_dir():
        for p in sorted(mask_dir.iterdir()):
            if p.is_file() and is_image_file(p) and p.resolve() not in referenced:
                cid = _stem(p.name)
                if cid in preds:
                    problems.append({"image_id": cid, "problem": f"{p.name} not named in results.json; ignored"})
                else:
                    preds[cid] = {**_new_entry(), "mask": p}
    return preds, problems


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

FAILED_PROBABILITY = 1e-6  # a case without its map: the container's empty prediction (its clamp)


class ProbabilityMaps(Mapping):
    """Lesion probabilities from a folder of ``<id>.npy`` logits, read when asked for (no pickle)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __getitem__(self, cid: str) -> np.ndarray:
        path = self.folder / f"{cid}.npy"
        if not path.is_file():
            raise KeyError(cid)
        try:
            logits = np.load(path, allow_pickle=False).astype(np.float64)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: not readable lesion logits ({exc})") from None
        return 1.0 / (1.0 + np.exp(-logits))

    def __iter__(self) -> Iterator[str]:
        return (p.stem for p in sorted(self.folder.glob("*.npy")))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.npy"))


def evaluate_predictions(pred_dir: Path | str, data_dir: Path | str, split: str = "val",
                         out_dir: Path | str | None = None, *, tau: float = 2.0, n_boot: int = 1000, seed: int = 0,
                         n_worst: int = N_WORST, prob_maps: Mapping[str, np.ndarray] | None = None,
                         limit: int | None = None) -> dict:
    """Score ``pred_dir`` (PACE or Grand Challenge layout) on ``split`` of ``data_dir``; write the
    report files to ``out_dir`` when given. Returns the metrics.json dict (NaN kept as float NaN).

    ``prob_maps`` ({image_id: H x W lesion probabilities}) adds the segmentation BCE. ``limit``: only
    N of the split's images, each class in turn (those ``training.predict --limit N`` predicts).
    """
    pred_dir, data_dir = Path(pred_dir), Path(data_dir)
    if prob_maps is None and (pred_dir / LOGITS_DIR).is_dir():
        prob_maps = ProbabilityMaps(pred_dir / LOGITS_DIR)
    truth = load_truth(data_dir, split)
    if limit is not None:
        truth = first_of_each_class(truth, limit, label=lambda r: r["label"], image_id=lambda r: r["image_id"])
    if not truth:
        raise DataError(f"{data_dir / 'labels.csv'}: no images" if split == "all" else
                        f"{data_dir / 'split.csv'}: no {split} images; nothing to evaluate")
    layout = detect_layout(pred_dir)
    preds, problems = (read_grand_challenge if layout == "grand-challenge" else read_pace)(pred_dir)
    all_ids = {r["image_id"] for r in load_truth(data_dir, "all")}
    eval_ids = [r["image_id"] for r in truth]

    masks: dict[str, np.ndarray] = {}
    spacings: dict[str, tuple[float, float]] = {}
    gts: dict[str, np.ndarray] = {}
    for cid in eval_ids:
        gts[cid] = read_mask(data_dir / "masks" / f"{cid}.png")
        path = preds.get(cid, {}).get("mask")
        if path is None:
            continue
        try:
            m = read_mask(path)
            if layout == "grand-challenge":
                sx, sy = read_image(path).spacing[:2]
                spacings[cid] = (float(sy), float(sx))
        except ImageReadError as exc:
            problems.append({"image_id": cid, "problem": f"unreadable mask: {exc.reason}"})
            continue
        if m.shape != gts[cid].shape:
            problems.append({"image_id": cid, "problem": f"mask shape {m.shape} != ground truth {gts[cid].shape}; "
                                                         "scored as missing"})
            continue
        masks[cid] = m
    default_spacing = Counter(spacings.values()).most_common(1)[0][0] if spacings else (1.0, 1.0)

    cases, missing_maps = [], []
    groups = bootstrap_groups(data_dir, truth)
    for r in truth:
        cid = r["image_id"]
        p = preds.get(cid, {})
        bce = None
        if prob_maps is not None:  # one map at a time; a missing or bad one scores as an empty prediction
            try:
                prob = prob_maps.get(cid)
                if prob is not None and prob.shape != gts[cid].shape:
                    problems.append({"image_id": cid, "problem": f"probability map shape {prob.shape} != ground "
                                                                 f"truth {gts[cid].shape}; scored as missing"})
                    prob = None
            except ValueError as exc:
                problems.append({"image_id": cid, "problem": f"{exc}; scored as missing"})
                prob = None
            if prob is None:
                missing_maps.append(cid)
                prob = np.full(gts[cid].shape, FAILED_PROBABILITY)
            bce = M.segmentation_bce(gts[cid], prob)
        cases.append(M.Case(image_id=cid, label=r["label"], gt=gts[cid], pred=masks.get(cid),
                            probabilities=p.get("probabilities"), pred_label=p.get("label"),
                            source=r.get("source", ""),
                            group=groups[cid],
                            spacing=spacings.get(cid, default_spacing) if layout == "grand-challenge" else None,
                            seg_bce=bce))
    res = M.evaluate_cases(cases, tau=tau, n_boot=n_boot, seed=seed)
    res["missing"] = {
        "cases": [c for c in eval_ids if c not in preds],
        "masks": [c for c in eval_ids if c not in masks],
        "labels": [c for c in eval_ids if preds.get(c, {}).get("label") is None],
        "probabilities": [c for c in eval_ids if preds.get(c, {}).get("probabilities") is None],
    }
    if prob_maps is not None:
        res["missing"]["probability_maps"] = missing_maps
    res["extra"] = sorted(c for c in preds if c not in all_ids)
    res["out_of_split"] = sorted(c for c in preds if c in all_ids and c not in set(eval_ids))
    res["problems"] = problems
    res["layout"] = layout
    res["split"] = split
    res["pred_dir"], res["data_dir"] = str(pred_dir), str(data_dir)
    lesion = [c for c in res["cases"] if c["has_lesion"]]
    res["worst"] = [c["image_id"] for c in sorted(lesion, key=lambda c: (c["dice"], c["image_id"]))[:n_worst]]
    if out_dir is not None:
        write_outputs(res, Path(out_dir), data_dir, gts, masks)
    return res


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def _to_rgb(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[..., :3] if a.shape[2] >= 3 else a[..., 0]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a.copy()


def _contour(mask: np.ndarray, width: int) -> np.ndarray:
    m = mask.astype(bool)
    edge = m & ~ndimage.binary_erosion(m, border_value=0)
    return ndimage.binary_dilation(edge, iterations=width - 1) if width > 1 and edge.any() else edge


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray | None) -> np.ndarray:
    """RGB uint8 image with the ground-truth contour in green and the predicted one in red."""
    rgb = _to_rgb(image)
    width = max(1, min(gt.shape) // 256 + 1)
    rgb[_contour(gt, width)] = (0, 255, 0)
    if pred is not None:
        rgb[_contour(pred, width)] = (255, 0, 0)
    return rgb


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_roc(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = np.array([M.class_index(c["label"]) for c in res["cases"]], int)
    P = np.array([c["probabilities"] for c in res["cases"]], float).reshape(-1, M.N_CLASSES)
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, name in enumerate(CLASS_NAMES):
        if 0 < (y == k).sum() < len(y):
            fpr, tpr, _ = M.roc_curve(y == k, P[:, k])
            auc = M.binary_auc(y == k, P[:, k])
            ax.plot(fpr, tpr, lw=2.5 if name == "malignant" else 1.2,
                    label=f"{name} vs rest (AUC {auc:.3f})", drawstyle="default")
    mal = y == M.MALIGNANT
    if 0 < mal.sum() < len(y):  # the two operating points, where they lie on the malignant curve
        fpr, tpr, _ = M.roc_curve(mal, P[:, M.MALIGNANT])
        ok = 1 - fpr >= M.SPEC_TARGET - M.ROC_TOL
        i = np.flatnonzero(ok)[np.argmax(tpr[ok])]
        ax.plot([fpr[i]], [tpr[i]], "ko", ms=5, label=f"sens {tpr[i]:.3f} @ spec >= {M.SPEC_TARGET:g}")
        ok = tpr >= M.SENS_TARGET - M.ROC_TOL
        i = np.flatnonzero(ok)[np.argmin(fpr[ok])]
        ax.plot([fpr[i]], [tpr[i]], "ks", ms=5, label=f"spec {1 - fpr[i]:.3f} @ sens >= {M.SENS_TARGET:g}")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC, one vs rest (n={len(y)})")
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, path)


def plot_confusion(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(res["confusion_matrix"])
    fig = Figure(figsize=(4.6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    miss = sum(res["classification"]["confusion_missing"])
    ax.set(xlabel="predicted" + (f" ({miss} without a label not shown)" if miss else ""), ylabel="true",
           title="Confusion matrix")
    _save_figure(fig, path)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(res: dict, key: str, digits: int = 3) -> str:
    lo, hi = res.get("ci", {}).get(key, [None, None])
    return "n/a" if lo is None else f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _id_list(ids: list, limit: int = 50) -> str:
    if not ids:
        return "none"
    shown = ", ".join(f"`{i}`" for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def render_report(res: dict) -> str:
    u = res["units"]
    names = {"dsc": "Dice", "iou": "IoU", "hd95": f"HD95 ({u['distance']})", "nsd": f"NSD @ {_fmt(u['tau'], 1)} "
             f"{u['distance']}", "accuracy": "Accuracy", "f1_macro": "Macro F1", "auc_macro": "Macro AUC (OvR)",
             "auc_malignant": "AUC malignant vs rest", "sens_at_90_spec": "Sensitivity @ 90% specificity",
             "spec_at_90_sens": "Specificity @ 90% sensitivity", "cross_entropy": "Cross-entropy",
             "normal_empty_share": "Normal images with empty prediction",
             "normal_fp_area": f"Mean FP area on normal images ({u['area']})", "seg_bce": "Segmentation BCE"}
    b = res["bootstrap"]
    lines = [f"# Evaluation: {res['pred_dir']}", "",
             f"Data `{res['data_dir']}`, split **{res['split']}**, layout **{res['layout']}**: "
             f"{res['n_images']} images ({res['n_lesion_images']} with a lesion, {res['n_normal_images']} normal).",
             f"95% intervals: {b['method']} bootstrap, {b['n_boot']} resamples, seed {b['seed']}. "
             "Segmentation figures are means over lesion images. Conventions: docs/metrics.md.", ""]
    n_miss = len(res["missing"]["cases"])
    if n_miss or res["missing"]["masks"] or res["missing"]["labels"]:
        lines += [f"**{n_miss} case(s) have no prediction at all** and are scored as failures (empty mask, "
                  "uniform probabilities, no label); see Missing below.", ""]
    lines += ["| Metric | Value | 95% CI |", "|---|---|---|"]
    for k in M.HEADLINE:
        if k == "seg_bce" and res.get(k) is not None and not np.isfinite(res[k]):
            continue
        lines.append(f"| {names[k]} | {_fmt(res[k], 4)} | {_ci(res, k, 4)} |")
    s = res["segmentation"]
    lines += ["", "## Segmentation (lesion images)", "",
              f"n = {s['n']}; medians: Dice {_fmt(s['dice_median'])}, IoU {_fmt(s['iou_median'])}, "
              f"HD95 {_fmt(s['hd95_median'], 2)} {u['distance']}, NSD {_fmt(s['nsd_median'])}; "
              f"{s['n_empty_prediction']} empty prediction(s) (Dice 0, HD95 = image diagonal).",
              "", "## Normal images", ""]
    nm = res["normal_images"]
    lines += [f"n = {nm['n']}; empty prediction on {nm['n_empty_prediction']} "
              f"({_fmt(nm['empty_share'])}); mean false-positive area {_fmt(nm['mean_fp_area'], 1)} {u['area']}.", ""]
    c = res["classification"]
    lines += ["## Classification", "", "| true \\ predicted | " + " | ".join(CLASS_NAMES) + " | no label | recall |",
              "|---" * (len(CLASS_NAMES) + 3) + "|"]
    for i, name in enumerate(CLASS_NAMES):
        row = " | ".join(str(v) for v in res["confusion_matrix"][i])
        lines.append(f"| {name} | {row} | {c['confusion_missing'][i]} | {_fmt(c['recall'][name])} |")
    lines += ["", "Per class F1: " + ", ".join(f"{k} {_fmt(v)}" for k, v in c["f1"].items()) +
              "; one-vs-rest AUC: " + ", ".join(f"{k} {_fmt(v)}" for k, v in c["auc_ovr"].items()) + ".", "",
              "![ROC](roc.png) ![Confusion matrix](confusion.png)", ""]
    if res.get("by_source"):
        keys = ["dsc", "hd95", "nsd", "accuracy", "f1_macro", "auc_malignant"]
        lines += ["## Per source", "", "| Source | n | lesion | " + " | ".join(names[k] for k in keys) + " |",
                  "|---" * (len(keys) + 3) + "|"]
        for src, r in res["by_source"].items():
            lines.append(f"| {src or '(none)'} | {r['n_images']} | {r['n_lesion_images']} | " +
                         " | ".join(f"{_fmt(r[k])} {_ci(r, k)}" for k in keys) + " |")
        lines.append("")
    miss = res["missing"]
    lines += ["## Missing and extra predictions", "",
              f"- no prediction at all ({len(miss['cases'])}): {_id_list(miss['cases'])}",
              f"- no usable mask ({len(miss['masks'])}): {_id_list(miss['masks'])}",
              f"- no label, argmax of the probabilities used where present ({len(miss['labels'])}): "
              f"{_id_list(miss['labels'])}",
              f"- no probabilities ({len(miss['probabilities'])}): {_id_list(miss['probabilities'])}",
              *([f"- no usable lesion logits, BCE of an empty prediction used ({len(miss['probability_maps'])}): "
                 f"{_id_list(miss['probability_maps'])}"] if "probability_maps" in miss else []),
              f"- extra, not in the dataset ({len(res['extra'])}): {_id_list(res['extra'])}",
              f"- in the dataset but not in split {res['split']} ({len(res['out_of_split'])}): "
              f"{_id_list(res['out_of_split'], 10)}"]
    if res["problems"]:
        lines += [f"- problems ({len(res['problems'])}):"]
        lines += [f"  - `{p['image_id']}`: {p['problem']}" for p in res["problems"][:50]]
    lines += ["", f"## Worst {len(res['worst'])} cases by Dice (green: ground truth, red: prediction)", ""]
    by_id = {c["image_id"]: c for c in res["cases"]}
    for cid in res["worst"]:
        cs = by_id[cid]
        lines.append(f"- `{cid}` ({cs['label']}, {cs['source']}): Dice {_fmt(cs['dice'])}, HD95 "
                     f"{_fmt(cs['hd95'], 2)}, predicted {cs['pred_label'] or 'nothing'} — ![{cid}](worst/{cid}.png)")
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, out_dir: Path, data_dir: Path, gts: Mapping[str, np.ndarray],
                  masks: Mapping[str, np.ndarray]) -> None:
    """metrics.json, report.md, roc.png, confusion.png and worst/<id>.png (stale overlays removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(M.to_jsonable(res), indent=1, allow_nan=False) + "\n")
    write_text(out_dir / "report.md", render_report(res))
    plot_roc(res, out_dir / "roc.png")
    plot_confusion(res, out_dir / "confusion.png")
    worst_dir = out_dir / "worst"
    if worst_dir.is_dir():
        for old in worst_dir.glob("*.png"):
            if old.stem not in res["worst"]:
                old.unlink()
    for cid in res["worst"]:
        image = read_image(data_dir / "images" / f"{cid}.png").array
        write_png(worst_dir / f"{cid}.png", overlay(image, gts[cid], masks.get(cid)))


@click.command()
@click.option("--pred", "pred_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Predictions: PACE layout or Grand Challenge layout (detected).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Prepared dataset (training.prepare output).")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tau", type=float, default=2.0, show_default=True,
              help="NSD tolerance, in pixels (PACE) or mm (Grand Challenge mha spacing).")
@click.option("--n-boot", type=click.IntRange(min=0), default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Only N of the split's images, the first by image id of each class in turn (as training.predict "
                   "--limit N).")
def main(pred_dir: Path, data_dir: Path, split: str, out_dir: Path, tau: float, n_boot: int, seed: int,
         limit: int | None) -> None:
    """Evaluate predictions against a prepared dataset and write metrics.json, report.md and plots."""
    try:
        res = evaluate_predictions(pred_dir, data_dir, split, out_dir, tau=tau, n_boot=n_boot, seed=seed, limit=limit)
    except (ValueError, FileNotFoundError, ImageReadError) as exc:
        raise click.ClickException(str(exc)) from None
    u = res["units"]["distance"]
    miss = res["missing"]
    click.echo(f"{res['n_images']} images ({res['layout']} layout); missing: {len(miss['cases'])} predictions, "
               f"{len(miss['masks'])} masks, {len(miss['labels'])} labels, {len(miss['probabilities'])} probabilities"
               + (f", {len(miss['probability_maps'])} logits" if "probability_maps" in miss else "")
               + f" (each scored as a failure; listed in report.md); {len(res['extra'])} extra")
    click.echo(f"Dice {_fmt(res['dsc'])}  IoU {_fmt(res['iou'])}  HD95 {_fmt(res['hd95'], 2)} {u}  "
               f"NSD {_fmt(res['nsd'])}")
    click.echo(f"accuracy {_fmt(res['accuracy'])}  macro-F1 {_fmt(res['f1_macro'])}  macro-AUC "
               f"{_fmt(res['auc_macro'])}  AUC malignant {_fmt(res['auc_malignant'])}")
    click.echo(f"written to {out_dir}")


if __name__ == "__main__":
    main()
