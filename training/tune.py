"""Choose the ensemble's postprocessing on the validation split.

``python -m training.tune --model-dir ENS --data DATA [--write]`` reads each validation image and
encodes it through the predictor itself (``Predictor.encode_views``: the container's encoder runtime,
precision, preprocessing and TTA, so the scores are those of ``process.py`` on these images), then
combines each batch's encoding under every postprocess option (``Predictor.combine_views`` and
``Predictor.finish``: masks at full resolution) and scores them with ``training.metrics``. One
encoder pass per image serves all options.

Options: box refinement through LiteMedSAM's decoder (``model/refine.py``: off, the decoder's mask, or
its average with the head's; outside the box nothing, or the head's other components), the largest
component only, empty masks on images classified normal.
Rule (written into ensemble.json with ``--write``): refinement and the largest-component option
together by the highest mean Dice on lesion images (off unless it is higher); then gate masks on
images classified normal only if that raises the share of empty masks on normal images while
costing less than 0.005 lesion Dice.
"""
from __future__ import annotations

import json
import operator
import sys
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import ENSEMBLE_NAME
from model.atomic_files import write_text
from model.inference import InferenceError, load_predictor
from model.predictor import GPUOutOfMemoryError, Predictor, fit_in_gpu_memory
from model.preprocessing import preprocess
from model.refine import REFINE_ENCODERS

from .datasets import DataError, first_of_each_class, load_pair, load_records
from .metrics import dice

OPTIONS = [{"gate_normal": g, "largest_component": c} for g in (False, True) for c in (False, True)]
REFINE_OPTIONS = [None, *({"type": "box", "margin": 5, "blend": blend, **outside} for outside in ({}, {"outside": "head"})
                         for blend in (1.0, 0.5))]


def score_options(predictor: Predictor, data: Path, batch: int = 8, refine_options: list | None = None,
                  limit: int | None = None) -> list[dict]:
    """Mean lesion Dice and the share of empty masks on normal images of every (refinement,
    postprocess option) on the validation split (``limit`` of its images, each class in turn, when given)."""
    records = first_of_each_class(load_records(data, "val"), limit)
    if not records:
        raise click.UsageError(f"{data}: no validation images (prepared with training.prepare?)")
    refine_options = REFINE_OPTIONS if refine_options is None else refine_options
    if predictor.seg_encoder_name not in REFINE_ENCODERS:  # no decoder to refine with: scored without
        refine_options = [None]
    results = {(ri, oi): {"dice": [], "normal_empty": []}
               for ri in range(len(refine_options)) for oi in range(len(OPTIONS))}
    shipped = (predictor.refiner, dict(predictor.post))
    refiners = []
    for refine in refine_options:  # built once (each reads and hash-checks the decoder's weights)
        predictor.set_refine(refine)
        refiners.append(predictor.refiner)
    bar = tqdm(total=len(records), desc="tune", unit="image", file=sys.stderr, disable=None)  # off unless a terminal
    try:
        for s in range(0, len(records), batch):
            pairs = [load_pair(r) for r in records[s:s + batch]]
            for (image, gt), outputs in zip(pairs, _combined(predictor, refiners, [image for image, _ in pairs])):
                for ri, (seg, cls, geom) in enumerate(outputs):
                    for oi, opt in enumerate(OPTIONS):
                        predictor.post = {**shipped[1], **opt}
                        pred = predictor.finish(seg, cls, geom)
                        if gt.any():
                            results[ri, oi]["dice"].append(dice(gt, pred.mask))
                        else:
                            results[ri, oi]["normal_empty"].append(float(not pred.mask.any()))
            bar.update(len(pairs))
    finally:
        bar.close()
        predictor.refiner, predictor.post = shipped
    # None (JSON null) where the split has no image of the kind (with --limit)
    return [{"refine": refine_options[ri], **OPTIONS[oi], "dsc": float(np.mean(r["dice"])) if r["dice"] else None,
             "normal_empty_share": float(np.mean(r["normal_empty"])) if r["normal_empty"] else None,
             "n_lesion": len(r["dice"]), "n_normal": len(r["normal_empty"])} for (ri, oi), r in results.items()]


def _combined(predictor: Predictor, refiners: list, images: list) -> list:
    """Per image, (mask probabilities, class probabilities, geometry) under each refiner, from one
    encoder pass over the batch; a batch that runs out of GPU memory is retried in halves, as in
    ``process.py`` (``fit_in_gpu_memory``)."""
    def one_pass(batch: list) -> list:
        pre = [preprocess(image, predictor.input_size, predictor.normalization) for image in batch]
        widths, heights = [geom.resized[1] for _, geom in pre], [geom.resized[0] for _, geom in pre]
        views = predictor.encode_views(torch.stack([x for x, _ in pre]), widths)
        per_refiner = []
        for refiner in refiners:
            predictor.refiner = refiner
            per_refiner.append(predictor.combine_views(views, widths, heights))
        return [[(seg[j], cls[j], pre[j][1]) for seg, cls in per_refiner] for j in range(len(batch))]

    return fit_in_gpu_memory(one_pass, images, operator.add)


def choose(scores: list[dict]) -> dict:
    ungated = [s for s in scores if not s["gate_normal"]]
    best = max(ungated, key=lambda s: (-1.0 if s["dsc"] is None else s["dsc"], s["refine"] is None,
                                       not s["largest_component"]))
    gated = next(s for s in scores if s["gate_normal"] and s["refine"] == best["refine"]
                 and s["largest_component"] == best["largest_component"])
    if None in (gated["normal_empty_share"], best["normal_empty_share"], gated["dsc"], best["dsc"]):
        gate = False  # no normal (or no lesion) image scored: nothing supports gating
    else:
        gate = (gated["normal_empty_share"] > best["normal_empty_share"]) and (best["dsc"] - gated["dsc"] < 0.005)
    return {"refine": best["refine"], "gate_normal": bool(gate), "largest_component": bool(best["largest_component"])}


@click.command(context_settings={"show_default": True})
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="A folder written by training.prepare; its validation split is scored.")
@click.option("-d", "--device", type=click.Choice(["auto", "cpu", "cuda", "gpu"]), default="auto",
              help="As process.py's: gpu (or cuda) = CUDA; auto = CUDA when available, else CPU.")
@click.option("--tta/--no-tta", default=False, help="As process.py's: horizontal-flip test-time augmentation.")
@click.option("--precision", default="auto", type=click.Choice(["auto", "bf16", "fp32"]),
              help="As process.py's (auto: bf16 on CUDA 8.0+ for SAM ViT encoders, else fp32).")
@click.option("--batch-size", default=8, type=click.IntRange(1))
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Score only N validation images, the first by image id of each class in turn.")
@click.option("--write", is_flag=True, help="Write the chosen options into ensemble.json.")
def main(model_dir, data, device, tta, precision, batch_size, limit, write):
    """Score the postprocess options on the validation split, as process.py would predict them, and
    pick them: refinement and largest component by the highest mean lesion Dice; gating on normal
    only where it empties more normal masks for less than 0.005 Dice."""
    try:  # the data's faults (no labels.csv, ids that do not match) before the model is loaded
        load_records(Path(data), "val")
    except (FileNotFoundError, DataError) as exc:
        raise click.ClickException(str(exc)) from None
    try:  # the container's loading path: a missing GPU or checkpoint is a message, not a traceback
        predictor = load_predictor(model_dir, device=device, batch_size=batch_size, tta=tta, precision=precision)
    except InferenceError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        scores = score_options(predictor, Path(data), batch_size, limit=limit)
    except GPUOutOfMemoryError as exc:
        raise click.ClickException(str(exc)) from None
    for s in scores:
        click.echo(json.dumps(s))
    chosen = choose(scores)
    click.echo(f"chosen: {json.dumps(chosen)}")
    if write:
        path = Path(model_dir) / ENSEMBLE_NAME
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["postprocess"] = {**spec.get("postprocess", {}), **chosen}
        spec["postprocess_validation"] = scores
        spec["postprocess_validation_setup"] = {"device": predictor.device.type, "precision": "bf16" if predictor.bf16
                                                else "fp32", "runtime": predictor.encoder_runtime, "tta": predictor.tta,
                                                "limit": limit}  # --limit: a quick run's choice, on that many images
        write_text(path, json.dumps(spec, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
