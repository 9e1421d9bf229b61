"""Evaluate a folder of predictions against a prepared dataset: metrics.json, report.md and plots.

    python -m training.evaluate --pred PRED --data DATA [--split val|train|all] --out DIR \
        [--tau 2] [--n-boot 1000] [--seed 0]

DATA is a ``training.prepare`` folder (images/, masks/, labels.csv, split.csv). PRED is

* the PACE layout: ``segmentation/<id>_mask.png`` (0/255), ``classification/predictions.csv``
  (``image_id,label`` with Normal|Benign|Malignant) and ``classification/probabilities.csv``
  (``image_id,normal,benign,malignant``); distances in pixels; or
* the Grand Challenge layout: ``images/breast-lesion-segmentation/*.mha`` ({0,1}) and
  ``results.json`` (a list of entries with ``inputs``, ``outputs``, ``error_messages``); the case
  id is the stem of the entry's input file name, the probabilities are the first dict with keys
  normal/benign/malignant anywhere in its outputs, the label the first ``label`` string there,
  the mask the first ``.mha`` named there (else ``<id>.mha``); distances in mm from the mask's
  spacing (a case without a mask takes the most common spacing of the others), in pixels where every
  mask has ITK's default 1 x 1 (the masks of images without a spacing, such as PNGs); or
* the Codabench layout (``process.py --format codabench``): PACE's masks and ``classification.csv``
  (``image_id,label``) beside them, no probabilities: what needs them is n/a.

The layout is detected: ``results.json`` or ``images/breast-lesion-segmentation/`` means Grand
Challenge, ``classification.csv`` without ``classification/`` Codabench, ``segmentation/`` or
``classification/`` PACE. ``logits/<id>.npy`` (lesion logits
at the image's size, as ``training.predict --logits`` and ``process.py --logits`` write them, in
either layout) adds the segmentation BCE;
without them it is reported as not available.

A case of the evaluated split without a prediction is a failure, never dropped: an empty mask,
probabilities (1/3, 1/3, 1/3), and no label (always wrong) -- or the probabilities' argmax when
only the label is missing. Missing parts, predictions for ids that are not in DATA (``extra``) or
not in the split (``out_of_split``), and unreadable or mis-shaped predictions (``problems``) are
listed in metrics.json and the report. Metric conventions: ``training.metrics`` and docs/metrics.md.

Outputs in DIR: metrics.json, report.md, roc.png (not for the Codabench layout: no probabilities),
confusion.png, worst/<id>.png (the worst cases
by Dice: image, ground-truth contour green, predicted contour red). The predictions are read by
``training.read_predictions``, the files beside metrics.json written by ``training.report``.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Mapping

import click
import numpy as np

from model.writers import LOGITS_DIR
from model.io import ImageReadError, read_image, read_mask
from training import metrics as M
from training.datasets import DataError, first_of_each_class, load_records, parse_label, read_csv, read_split
from training.grouping import linked
from training.read_predictions import ProbabilityMaps, detect_layout, read_grand_challenge, read_pace
from training.report import fmt, write_outputs

N_WORST = 8


# --------------------------------------------------------------------------------------------
# Reading the dataset
# --------------------------------------------------------------------------------------------

def load_truth(data_dir: Path | str, split: str = "val") -> list[dict[str, str]]:
    """labels.csv rows (image_id, label, source, ...) of ``split`` (train, val or all), in file order."""
    data_dir = Path(data_dir)
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be train, val or all, not {split!r}")
    load_records(data_dir)  # training's checks: each id once in labels.csv, the same ids in split.csv
    rows = read_csv(data_dir / "labels.csv")
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
            duplicates = json.loads(report.read_text(encoding="utf-8")).get("duplicates", [])
        except (json.JSONDecodeError, AttributeError):
            duplicates = []
        links += [[str(i) for i in d["kept"]] for d in duplicates
                  if isinstance(d, dict) and d.get("kind") == "near-duplicate" and isinstance(d.get("kept"), list)]
    root = linked((r["image_id"] for r in rows), links)
    size = Counter(root.values())
    return {i: f"group:{r}" if size[r] > 1 else "" for i, r in root.items()}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

FAILED_PROBABILITY = 1e-6  # a case without its map: the container's empty prediction (its clamp)


PROBABILITY_KEYS = ("auc_macro", "auc_malignant", "sens_at_90_spec", "spec_at_90_sens", "cross_entropy")


def _without_probabilities(res: dict) -> None:
    """The metrics that need class probabilities set to NaN (shown as "–"), with their intervals, overall
    and per source: a layout that holds labels alone (Codabench's) would otherwise score the uniform
    probabilities that stand in for missing ones (AUC 0.5, cross-entropy ln 3) as if measured."""
    nan = float("nan")
    for part in [res, *res.get("by_source", {}).values()]:
        for key in PROBABILITY_KEYS:
            if key in part:
                part[key] = nan
            if key in part.get("ci", {}):
                part["ci"][key] = [nan, nan]
        if "auc_ovr" in part.get("classification", {}):
            part["classification"]["auc_ovr"] = dict.fromkeys(part["classification"]["auc_ovr"], nan)


def evaluate_predictions(pred_dir: Path | str, data_dir: Path | str, split: str = "val",
                         out_dir: Path | str | None = None, *, tau: float = 2.0, n_boot: int = 1000, seed: int = 0,
                         n_worst: int = N_WORST, prob_maps: Mapping[str, np.ndarray] | None = None,
                         limit: int | None = None) -> dict:
    """Score ``pred_dir`` (PACE, Codabench or Grand Challenge layout) on ``split`` of ``data_dir``; write the
    report files to ``out_dir`` when given. Returns the metrics.json dict (NaN kept as float NaN).

    ``prob_maps`` ({image_id: H x W lesion probabilities}) adds the segmentation BCE. ``limit``: only
    N of the split's images, each class in turn (those ``training.predict --limit N`` predicts).
    """
    pred_dir, data_dir = Path(pred_dir), Path(data_dir)
    if prob_maps is None and (pred_dir / LOGITS_DIR).is_dir() and len(maps := ProbabilityMaps(pred_dir / LOGITS_DIR)):
        prob_maps = maps  # an empty logits/ (left by predicting again without --logits): predictions without any
    truth = load_truth(data_dir, split)
    split_ids = {r["image_id"] for r in truth}
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
    # distances in mm where the masks say so: Grand Challenge masks of images that had no spacing (PNG, JPEG:
    # ITK's default 1 x 1) are in pixels, as the PACE masks of the same images are
    in_mm = layout == "grand-challenge" and any(v != (1.0, 1.0) for v in spacings.values())

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
                            spacing=spacings.get(cid, default_spacing) if in_mm else None,
                            seg_bce=bce))
    res = M.evaluate_cases(cases, tau=tau, n_boot=n_boot, seed=seed)
    if layout == "codabench":  # no probabilities by design: not the scores of the uniform stand-in
        _without_probabilities(res)
    res["missing"] = {
        "cases": [c for c in eval_ids if c not in preds],
        "masks": [c for c in eval_ids if c not in masks],
        "labels": [c for c in eval_ids if preds.get(c, {}).get("label") is None],
        "probabilities": [c for c in eval_ids if preds.get(c, {}).get("probabilities") is None],
    }
    if prob_maps is not None:
        res["missing"]["probability_maps"] = missing_maps
    res["extra"] = sorted(c for c in preds if c not in all_ids)
    res["out_of_split"] = sorted(c for c in preds if c in all_ids and c not in split_ids)
    if limit is not None:  # the split's images that --limit left out: not scored, but not out of the split
        res["beyond_limit"] = sorted(c for c in preds if c in split_ids and c not in set(eval_ids))
    res["problems"] = problems
    res["layout"] = layout
    res["split"] = split
    res["pred_dir"], res["data_dir"] = str(pred_dir), str(data_dir)
    lesion = [c for c in res["cases"] if c["has_lesion"]]
    res["worst"] = [c["image_id"] for c in sorted(lesion, key=lambda c: (c["dice"], c["image_id"]))[:n_worst]]
    if out_dir is not None:
        write_outputs(res, Path(out_dir), data_dir, gts, masks)
    return res


@click.command()
@click.option("--pred", "pred_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Predictions: PACE, Codabench (labels only) or Grand Challenge layout (detected).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Prepared dataset (training.prepare output).")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tau", type=float, default=2.0, show_default=True,
              help="NSD tolerance, in the distances' unit: pixels (PACE, Codabench), or mm (Grand Challenge masks with "
                   "a spacing other than 1 x 1).")
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
    click.echo(f"Dice {fmt(res['dsc'])}  IoU {fmt(res['iou'])}  HD95 {fmt(res['hd95'], 2)} {u}  "
               f"NSD {fmt(res['nsd'])}")
    click.echo(f"accuracy {fmt(res['accuracy'])}  macro-F1 {fmt(res['f1_macro'])}  macro-AUC "
               f"{fmt(res['auc_macro'])}  AUC malignant {fmt(res['auc_malignant'])}")
    click.echo(f"written to {out_dir}")


if __name__ == "__main__":
    main()
