"""Choose the ensemble's postprocessing on the validation split, from the embedding cache.

``python -m training.tune --model-dir ENS --data DATA --cache CACHE [--write]`` runs the ensemble's
heads on the cached validation embeddings (the same values the predictor computes: same encoder,
precision and preprocessing), applies each postprocess option through ``Predictor.finish`` (the
container's own path, masks at full resolution) and scores them with ``training.metrics``.

Options: box refinement through LiteMedSAM's decoder (``model/refine.py``: off, the decoder's mask, or
its average with the head's), the largest component only, empty masks on images classified normal.
Rule (written into ensemble.json with ``--write``): refinement and the largest-component option
together by the highest mean Dice on lesion images (off unless it is higher); then gate masks on
images classified normal only if that raises the share of empty masks on normal images while
costing less than 0.005 lesion Dice.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from model.checkpoint import ENSEMBLE_NAME
from model.io import read_mask, write_text
from model.predictor import Predictor
from model.preprocessing import Geometry
from model.refine import REFINE_ENCODERS

from .cache import build_cache, views_for_classes
from .datasets import load_records
from .metrics import dice

OPTIONS = [{"gate_normal": g, "largest_component": c} for g in (False, True) for c in (False, True)]
REFINE_OPTIONS = [None, {"type": "box", "margin": 5, "blend": 1.0}, {"type": "box", "margin": 5, "blend": 0.5}]


def score_options(predictor: Predictor, data: Path, cache_dir: Path, views: list[str], batch: int = 32,
                  refine_options: list | None = None) -> list[dict]:
    records = load_records(data, "val")
    all_records = load_records(data)
    model = next(iter(predictor.members.values()))
    cache = build_cache(model, all_records, cache_dir, views, predictor.device, predictor.precision,
                        view_classes=views_for_classes(views), build=False)
    refine_options = REFINE_OPTIONS if refine_options is None else refine_options
    if model.config["encoder"]["name"] not in REFINE_ENCODERS:
        refine_options = [None]
    gts = {r.image_id: read_mask(r.mask_path) for r in records}
    scores = []
    for refine in refine_options:
        predictor.set_refine(refine)
        results = {i: {"dice": [], "normal_empty": []} for i in range(len(OPTIONS))}
        for s in range(0, len(records), batch):
            recs = records[s:s + batch]
            emb = torch.stack([cache.get(r.image_id, 0)[0] for r in recs]).to(predictor.device)
            seg, cls = predictor.combine(lambda m: (emb, None))
            for j, r in enumerate(recs):
                gt = gts[r.image_id]
                geom = Geometry(gt.shape[0], gt.shape[1], predictor.input_size)
                for i, opt in enumerate(OPTIONS):
                    predictor.post = {**predictor.post, **opt}
                    pred = predictor.finish(seg[j].cpu(), cls[j].cpu(), geom)
                    if gt.any():
                        results[i]["dice"].append(dice(gt, pred.mask))
                    else:
                        results[i]["normal_empty"].append(float(not pred.mask.any()))
        scores += [{"refine": refine, **OPTIONS[i], "dsc": float(np.mean(r["dice"])),
                    "normal_empty_share": float(np.mean(r["normal_empty"])) if r["normal_empty"] else float("nan"),
                    "n_lesion": len(r["dice"]), "n_normal": len(r["normal_empty"])} for i, r in results.items()]
    return scores


def choose(scores: list[dict]) -> dict:
    ungated = [s for s in scores if not s["gate_normal"]]
    best = max(ungated, key=lambda s: (s["dsc"], s["refine"] is None, not s["largest_component"]))
    gated = next(s for s in scores if s["gate_normal"] and s["refine"] == best["refine"]
                 and s["largest_component"] == best["largest_component"])
    gate = (gated["normal_empty_share"] > best["normal_empty_share"]) and (best["dsc"] - gated["dsc"] < 0.005)
    return {"refine": best["refine"], "gate_normal": bool(gate), "largest_component": bool(best["largest_component"])}


@click.command(context_settings={"show_default": True})
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--cache", "cache_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--views", default="orig,hflip,zoom,bright", help="The views the cache was built with.")
@click.option("--write", is_flag=True, help="Write the chosen options into ensemble.json.")
def main(model_dir, data, cache_dir, views, write):
    """Score the postprocess options on the validation split and pick them by the rule above."""
    predictor = Predictor.from_dir(model_dir, device="cpu")
    scores = score_options(predictor, Path(data), Path(cache_dir), views.split(","))
    for s in scores:
        click.echo(json.dumps(s))
    chosen = choose(scores)
    click.echo(f"chosen: {json.dumps(chosen)}")
    if write:
        path = Path(model_dir) / ENSEMBLE_NAME
        spec = json.loads(path.read_text())
        spec["postprocess"] = {**spec.get("postprocess", {}), **chosen}
        spec["postprocess_validation"] = scores
        write_text(path, json.dumps(spec, indent=2) + "\n")


if __name__ == "__main__":
    main()
