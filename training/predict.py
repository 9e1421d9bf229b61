"""Predict one split of a prepared dataset with a model or ensemble directory (PACE layout).

``python -m training.predict --model-dir DIR --data DATA --split val --out PRED`` runs the same
inference path as ``process.py`` (``model.inference.run``) on the split's images only, so that
``training.evaluate`` scores exactly what the container would output.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from model.inference import InferenceError, load_predictor, run, summary_line

from .datasets import DataError, first_of_each_class, load_records


def predict_split(model_dir: Path, data: Path, split: str | None, out: Path, device: str = "auto",
                  batch_size: int = 4, tta: bool = False, precision: str = "auto", progress: bool = True,
                  logits: bool = False, limit: int | None = None, class_prior: str | None = None):
    records = first_of_each_class(load_records(data, None if split == "all" else split), limit)  # data first
    predictor = load_predictor(model_dir, device, batch_size, tta, precision, class_prior=class_prior)
    return run(predictor, data / "images", out, fmt="pace", inputs=[r.image_path for r in records],
               progress=progress, logits=logits)


@click.command(context_settings={"show_default": True})
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Prepared dataset.")
@click.option("--split", default="val", type=click.Choice(["train", "val", "all"]))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Prediction folder (PACE layout).")
@click.option("-d", "--device", default="auto", type=click.Choice(["auto", "cpu", "cuda", "gpu"]))
@click.option("--batch-size", default=4, type=click.IntRange(1))
@click.option("--tta/--no-tta", default=False, help="As process.py's: horizontal-flip test-time augmentation.")
@click.option("--precision", default="auto", type=click.Choice(["auto", "bf16", "fp32"]))
@click.option("--class-prior", default=None, type=click.Choice(["trained", "data"]),
              help="As process.py's [default: the ensemble's postprocess.class_prior].")
@click.option("--logits", is_flag=True, help="Also write OUT/logits/<image_id>.npy (float16 lesion logits at "
              "full size; their sigmoid is the probability), from which training.evaluate reports the segmentation BCE.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Only N of the split's images, the first by image id of each class in turn (a quick check; "
                   "training.evaluate --limit N scores them).")
def main(model_dir, data, split, out, device, batch_size, tta, precision, class_prior, logits, limit):
    """Predict a split of a prepared dataset, for training.evaluate."""
    try:
        result = predict_split(Path(model_dir), Path(data), split, Path(out), device, batch_size, tta, precision,
                               logits=logits, limit=limit, class_prior=class_prior)
    except InferenceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except (FileNotFoundError, DataError) as exc:  # labels.csv / split.csv: the message names the file
        raise click.ClickException(str(exc)) from None
    click.echo(summary_line(result), err=True)
    sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
