"""``training.evaluate``'s outputs beside metrics.json: report.md, roc.png, confusion.png and the worst
cases' overlays (worst/<id>.png: the image, the ground-truth contour green, the predicted one red)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from model import CLASS_NAMES
from model.atomic_files import atomic_path, write_png, write_text
from model.io import read_image

from . import metrics as M


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


def has_probabilities(res: dict) -> bool:
    """Whether the predictions held class probabilities: a layout of labels alone (Codabench's) has its
    AUCs set to NaN (``training.evaluate``), and the uniform stand-in is not drawn as a ROC curve."""
    return res.get("layout") != "codabench"


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


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(res: dict, key: str, digits: int = 3) -> str:
    lo, hi = res.get("ci", {}).get(key, [None, None])
    return "n/a" if lo is None else f"[{fmt(lo, digits)}, {fmt(hi, digits)}]"


def _id_list(ids: list, limit: int = 50) -> str:
    if not ids:
        return "none"
    shown = ", ".join(f"`{i}`" for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def render_report(res: dict) -> str:
    u = res["units"]
    names = {"dsc": "Dice", "iou": "IoU", "hd95": f"HD95 ({u['distance']})", "nsd": f"NSD @ {fmt(u['tau'], 1)} "
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
    whole = set(res["missing"]["cases"])  # cases with no prediction are also in the mask and label lists
    n_mask = sum(c not in whole for c in res["missing"]["masks"])
    n_label = sum(c not in whole for c in res["missing"]["labels"])
    other = "other " if whole else ""
    banner = []
    if whole:
        banner.append(f"**{len(whole)} case(s) have no prediction at all** and are scored as failures (empty mask, "
                      "uniform probabilities, no label)")
    if n_mask:
        banner.append(f"**{n_mask} {other}case(s) have no usable mask** (scored as an empty mask)")
    if n_label:
        banner.append(f"**{n_label} {other}case(s) have no label** (the argmax of their probabilities where given, "
                      "else scored as wrong)")
    if banner:
        lines += ["; ".join(banner) + "; see Missing below.", ""]
    lines += ["| Metric | Value | 95% CI |", "|---|---|---|"]
    for k in M.HEADLINE:
        if k == "seg_bce" and res.get(k) is not None and not np.isfinite(res[k]):
            continue
        lines.append(f"| {names[k]} | {fmt(res[k], 4)} | {_ci(res, k, 4)} |")
    s = res["segmentation"]
    lines += ["", "## Segmentation (lesion images)", "",
              f"n = {s['n']}; medians: Dice {fmt(s['dice_median'])}, IoU {fmt(s['iou_median'])}, "
              f"HD95 {fmt(s['hd95_median'], 2)} {u['distance']}, NSD {fmt(s['nsd_median'])}; "
              f"{s['n_empty_prediction']} empty prediction(s) (Dice 0, HD95 = image diagonal).",
              "", "## Normal images", ""]
    nm = res["normal_images"]
    lines += [f"n = {nm['n']}; empty prediction on {nm['n_empty_prediction']} "
              f"({fmt(nm['empty_share'])}); mean false-positive area {fmt(nm['mean_fp_area'], 1)} {u['area']}.", ""]
    c = res["classification"]
    lines += ["## Classification", "", "| true \\ predicted | " + " | ".join(CLASS_NAMES) + " | no label | recall |",
              "|---" * (len(CLASS_NAMES) + 3) + "|"]
    for i, name in enumerate(CLASS_NAMES):
        row = " | ".join(str(v) for v in res["confusion_matrix"][i])
        lines.append(f"| {name} | {row} | {c['confusion_missing'][i]} | {fmt(c['recall'][name])} |")
    lines += ["", "Per class F1: " + ", ".join(f"{k} {fmt(v)}" for k, v in c["f1"].items()) +
              "; one-vs-rest AUC: " + ", ".join(f"{k} {fmt(v)}" for k, v in c["auc_ovr"].items()) + ".", "",
              ("![ROC](roc.png) " if has_probabilities(res) else "No ROC curve: the predictions hold labels, no "
               "probabilities. ") + "![Confusion matrix](confusion.png)", ""]
    if res.get("by_source"):
        keys = ["dsc", "hd95", "nsd", "accuracy", "f1_macro", "auc_malignant"]
        lines += ["## Per source", "", "| Source | n | lesion | " + " | ".join(names[k] for k in keys) + " |",
                  "|---" * (len(keys) + 3) + "|"]
        for src, r in res["by_source"].items():
            lines.append(f"| {src or '(none)'} | {r['n_images']} | {r['n_lesion_images']} | " +
                         " | ".join(f"{fmt(r[k])} {_ci(r, k)}" for k in keys) + " |")
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
              f"{_id_list(res['out_of_split'], 10)}",
              *([f"- in split {res['split']}, left out by --limit ({len(res['beyond_limit'])}): "
                 f"{_id_list(res['beyond_limit'], 10)}"] if "beyond_limit" in res else [])]
    if res["problems"]:
        lines += [f"- problems ({len(res['problems'])}):"]
        lines += [f"  - `{p['image_id']}`: {p['problem']}" for p in res["problems"][:50]]
    lines += ["", f"## Worst {len(res['worst'])} cases by Dice (green: ground truth, red: prediction)", ""]
    by_id = {c["image_id"]: c for c in res["cases"]}
    for cid in res["worst"]:
        cs = by_id[cid]
        lines.append(f"- `{cid}` ({cs['label']}, {cs['source']}): Dice {fmt(cs['dice'])}, HD95 "
                     f"{fmt(cs['hd95'], 2)}, predicted {cs['pred_label'] or 'nothing'} — ![{cid}](worst/{cid}.png)")
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, out_dir: Path, data_dir: Path, gts: Mapping[str, np.ndarray],
                  masks: Mapping[str, np.ndarray]) -> None:
    """metrics.json, report.md, roc.png, confusion.png and worst/<id>.png (stale overlays removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(M.to_jsonable(res), indent=1, allow_nan=False) + "\n")
    write_text(out_dir / "report.md", render_report(res))
    if has_probabilities(res):
        plot_roc(res, out_dir / "roc.png")
    else:  # nothing to draw; an earlier evaluation's curves into this folder would pass for this one's
        (out_dir / "roc.png").unlink(missing_ok=True)
    plot_confusion(res, out_dir / "confusion.png")
    worst_dir = out_dir / "worst"
    if worst_dir.is_dir():
        for old in worst_dir.glob("*.png"):
            if old.stem not in res["worst"]:
                old.unlink()
    for cid in res["worst"]:
        image = read_image(data_dir / "images" / f"{cid}.png").array
        write_png(worst_dir / f"{cid}.png", overlay(image, gts[cid], masks.get(cid)))
