"""The paper's Table 3 from several ``training.evaluate`` outputs.

``python -m training.compare EVAL_DIR... --out table3.md``: one row per evaluated model (named
after its folder) with accuracy, cross-entropy, macro AUC, segmentation BCE (where the predictions
came with ``training.predict --logits``; else "–"), DSC, HD95 and NSD.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from model.io import write_text

COLUMNS = [("accuracy", "Accuracy"), ("cross_entropy", "CE"), ("auc_macro", "AUC"), ("seg_bce", "BCE"),
           ("dsc", "DSC"), ("hd95", "HD95"), ("nsd", "NSD")]


def table(evals: list[Path]) -> str:
    lines = ["| model | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for d in evals:
        m = json.loads((d / "metrics.json").read_text())
        cells = []
        for key, _ in COLUMNS:
            v = m.get(key)
            cells.append("–" if v is None else f"{v:.3f}" if isinstance(v, (int, float)) else str(v))
        lines.append(f"| {d.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("evals", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Markdown file to write.")
def main(evals, out):
    """Write the Table-3 comparison of several evaluated models."""
    text = table([Path(e) for e in evals])
    write_text(out, text)
    click.echo(text)


if __name__ == "__main__":
    main()
