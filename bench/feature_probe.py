"""How much class information LiteMedSAM's frozen features hold, stage by stage: a linear probe.

Encodes every image of a prepared data folder once (unaugmented view; ``--precision``: fp32 by
default, as inference and since session 49 ``training.cache`` run LiteMedSAM; the README's session-24
figures were encoded with bf16 autocast, ``--precision bf16``, as the cache did then), pools each feature map (the neck embedding, the outputs of
stages 3, 2 and 1 at 64 x 64, stage 0's at 128 x 128 average-pooled to 64) into its lesion mean and
background mean, weighted by the true mask (``--ring K``: the background split into a ring of K
cells around the lesion and the rest), and fits a logistic regression (standardised, balanced
class weights) per feature map on the training split. Validation is scored twice: pooled by the
true mask (the ceiling a mask-guided head could reach on these features) and, with
``--pred-masks``, by the masks a model predicted (the deployed case; e.g. ``training.predict``'s
``segmentation/`` folder), against that model's own ``--probs`` (its ``probabilities.csv``) with
paired 95 % bootstrap intervals that resample a patient's images and their near-duplicates together,
as ``training.evaluate`` does (since session 50; the README's session-24 intervals resampled images).

    python bench/feature_probe.py data/prepared [--pred-masks PRED/segmentation]
        [--probs PRED/classification/probabilities.csv] [--ring K] [--limit N]
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import CLASS_NAMES as CLASSES  # noqa: E402
from model.encoders import build_encoder  # noqa: E402
from model.io import read_mask  # noqa: E402
from model.predictor import encoder_bf16  # noqa: E402
from model.preprocessing import mask_to_model, preprocess  # noqa: E402
from training.datasets import load_pair, load_records  # noqa: E402
from training.evaluate import bootstrap_groups, load_truth  # noqa: E402
from training.metrics import accuracy, auc_macro, binary_auc, bootstrap_ci  # noqa: E402

MAPS = ("neck", "stage3", "stage2", "stage1", "stage0")
COMBOS = (("neck",), ("stage3",), ("stage2",), ("stage1",), ("stage0",), ("neck", "stage2"),
          ("neck", "stage3", "stage2", "stage1"))


def _pooled(maps: dict[str, torch.Tensor], mask64: torch.Tensor, ring: int = 0) -> dict[str, np.ndarray]:
    """Lesion and background means of each ``B x C x H x W`` map, weighted by ``B x 64 x 64`` masks;
    with ``ring`` k > 0, the background split into a ring around the lesion (the mask dilated by
    k cells, less the mask) and the rest."""
    if ring:
        grown = F.max_pool2d(mask64[:, None], 2 * ring + 1, 1, ring)[:, 0]
        w = torch.stack([mask64, (grown - mask64).clamp(0, 1), 1 - grown], 1).flatten(2)
    else:
        w = torch.stack([mask64, 1 - mask64], 1).flatten(2)  # B x 2 x HW
    out = {}
    for name, f in maps.items():
        f = f.float()
        if f.shape[-1] != 64:
            f = F.avg_pool2d(f, f.shape[-1] // 64)
        means = torch.einsum("bkn,bcn->bkc", w, f.flatten(2)) / (w.sum(-1, keepdim=True) + 1e-6)
        out[name] = means.flatten(1).numpy()
    return out


def encode(data_dir: Path, pred_masks: Path | None, limit: int | None, ring: int = 0, batch_size: int = 8,
           precision: str = "auto"):
    records = sorted(load_records(data_dir), key=lambda r: r.image_id)
    if limit:  # evenly spaced over the ids, so that every source and class is in it
        records = records[::max(1, len(records) // limit)][:limit]
    enc, spec = build_encoder("litemedsam")
    enc.eval().fuse()  # BatchNorm folded, as training.cache encodes
    enc = enc.to(memory_format=torch.channels_last)
    grab = {}
    enc.layers[3].register_forward_hook(lambda m, i, o: grab.__setitem__("stage3", o))
    bf16 = encoder_bf16(precision, torch.device("cpu"), "litemedsam")
    true, pred = {n: [] for n in MAPS}, {n: [] for n in MAPS}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        xs, masks, pmasks = [], [], []
        for r in chunk:
            image, mask = load_pair(r)
            x, geom = preprocess(image, spec.input_size, spec.normalization)
            xs.append(x)
            masks.append(mask_to_model(mask, geom, 64).float())
            if pred_masks is not None and r.split == "val":
                pm = read_mask(pred_masks / f"{r.image_id}_mask.png")
                pmasks.append(mask_to_model(pm, geom, 64).float())
            else:
                pmasks.append(masks[-1])
        x = torch.stack(xs).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            neck, feats = enc(x)
        maps = {"neck": neck, "stage3": grab["stage3"], "stage2": feats[2], "stage1": feats[1], "stage0": feats[0]}
        for store, m in ((true, masks), (pred, pmasks)):
            for name, v in _pooled(maps, torch.stack(m), ring).items():
                store[name].append(v)
        print(f"\r{start + len(chunk)}/{len(records)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    cat = lambda d: {n: np.concatenate(v) for n, v in d.items()}  # noqa: E731
    return records, cat(true), cat(pred)


def _metrics(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """Accuracy, macro AUC (over the classes present) and malignant-vs-rest AUC."""
    return accuracy(y, p.argmax(1)), auc_macro(y, p), binary_auc(y == 2, p[:, 2])


def _units(data_dir: Path, ids: list[str]) -> list[np.ndarray]:
    """The bootstrap's units among ``ids``, as training.evaluate resamples them: a patient's images
    and their near-duplicates together (``training.evaluate.bootstrap_groups``), any other image alone."""
    groups = bootstrap_groups(data_dir, load_truth(data_dir, "all"))
    members: dict[str, list[int]] = {}
    for i, image_id in enumerate(ids):
        members.setdefault(groups.get(image_id) or f"image:{image_id}", []).append(i)
    return [np.array(m) for m in members.values()]


def _paired(y, p, q, units: list[np.ndarray]) -> str:
    """95 % paired bootstrap interval of accuracy and malignant AUC, ``p`` minus ``q``, resampling ``units``."""
    def diff(i):
        return {"acc": accuracy(y[i], p[i].argmax(1)) - accuracy(y[i], q[i].argmax(1)),
                "mal": binary_auc(y[i] == 2, p[i, 2]) - binary_auc(y[i] == 2, q[i, 2])}
    ci = bootstrap_ci(diff, len(y), groups=units)
    return f"acc {ci['acc'][0]:+.3f} … {ci['acc'][1]:+.3f}, mal AUC {ci['mal'][0]:+.3f} … {ci['mal'][1]:+.3f}"


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--pred-masks", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Predicted masks of the validation images (ID_mask.png), to pool by as deployed.")
@click.option("--probs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="That model's probabilities.csv, to compare the probe with (paired intervals).")
@click.option("--limit", type=int, help="Only N images, evenly spaced over the ids: a quick check.")
@click.option("--ring", default=0, show_default=True,
              help="Pool a ring of this many 64-grid cells around the lesion apart from the rest of the background.")
@click.option("--C", "c_values", default="0.01,0.1", show_default=True, help="Inverse regularisation strengths.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32"]),
              help="The encoder's: auto as training.cache (fp32 for LiteMedSAM); bf16 as the session-24 figures.")
def main(data_dir, pred_masks, probs, limit, ring, c_values, precision):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    records, true, pred = encode(data_dir, pred_masks, limit, ring, precision=precision)
    y = np.array([CLASSES.index(r.label) for r in records])
    tr = np.array([r.split == "train" for r in records])
    va = ~tr
    shipped = None
    if probs is not None:
        rows = {r["image_id"]: [float(r[c]) for c in CLASSES] for r in csv.DictReader(probs.open())}
        shipped = np.array([rows[r.image_id] for r, v in zip(records, va) if v])
        units = _units(data_dir, [r.image_id for r, v in zip(records, va) if v])
        acc, mac, mal = _metrics(y[va], shipped)
        print(f"{'the model of --probs':34s} pred mask: acc {acc:.3f}  macro AUC {mac:.3f}  mal AUC {mal:.3f}")
    for combo in COMBOS:
        x_true = np.concatenate([true[n] for n in combo], 1)
        x_pred = np.concatenate([pred[n] for n in combo], 1)
        for c in (float(v) for v in c_values.split(",")):
            scaler = StandardScaler().fit(x_true[tr])
            lr = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(scaler.transform(x_true[tr]), y[tr])
            line = f"{'+'.join(combo) + f' C={c:g}':34s}"
            for tag, x in (("true mask", x_true), ("pred mask", x_pred)) if pred_masks else (("true mask", x_true),):
                p = np.zeros((int(va.sum()), len(CLASSES)))  # a class absent from training (--limit) stays 0
                p[:, lr.classes_] = lr.predict_proba(scaler.transform(x[va]))
                acc, mac, mal = _metrics(y[va], p)
                line += f" {tag}: acc {acc:.3f}  macro AUC {mac:.3f}  mal AUC {mal:.3f} |"
                if tag == "pred mask" and shipped is not None:
                    line += f" vs --probs: {_paired(y[va], p, shipped, units)}"
            print(line)


if __name__ == "__main__":
    main()
