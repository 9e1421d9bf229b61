"""Agreement of two process.py --format pace outputs of the same images (e.g. fp32 vs bf16):
per-image mask Dice (both empty = 1), label agreement, largest class-probability difference.

    python bench/agreement.py OUT_A OUT_B [--json FILE]
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def agreement(a: Path, b: Path) -> dict:
    masks = sorted(p.name for p in (a / "segmentation").glob("*_mask.png"))
    if not masks:
        raise SystemExit(f"{a}/segmentation holds no *_mask.png")
    d = [dice(np.asarray(Image.open(a / "segmentation" / m)) > 0, np.asarray(Image.open(b / "segmentation" / m)) > 0)
         for m in masks]
    pa, pb = ({r["image_id"]: r for r in csv.DictReader(open(o / "classification" / "probabilities.csv"))}
              for o in (a, b))
    la, lb = ({r["image_id"]: r["label"] for r in csv.DictReader(open(o / "classification" / "predictions.csv"))}
              for o in (a, b))
    dp = max(abs(float(pa[k][c]) - float(pb[k][c])) for k in pa for c in ("normal", "benign", "malignant"))
    return {"images": len(masks), "dice_mean": float(np.mean(d)), "dice_min": float(np.min(d)),
            "dice_below_0.99": int(sum(x < 0.99 for x in d)),
            "label_agreement": sum(la[k] == lb[k] for k in la) / len(la), "max_abs_prob_diff": dp}


if __name__ == "__main__":
    args = sys.argv[1:]
    out = None
    if "--json" in args:
        i = args.index("--json")
        out = Path(args[i + 1])
        del args[i:i + 2]
    if args in (["-h"], ["--help"]):
        print(__doc__.strip())
        raise SystemExit(0)
    if len(args) != 2:
        raise SystemExit(__doc__)
    res = agreement(Path(args[0]), Path(args[1]))
    print(json.dumps(res))
    if out:
        out.write_text(json.dumps(res, indent=2))
