"""The paper's Table 3 from several ``training.evaluate`` outputs, and a paired comparison of two.

``python -m training.compare EVAL_DIR... --out table3.md``: one row per evaluated model (named
after its folder, with as many parent folders as it takes to tell the models apart) with accuracy,
cross-entropy, macro AUC, segmentation BCE (where the predictions came with ``training.predict
--logits``; else "–"), DSC, HD95 and NSD.

``python -m training.compare EVAL_A EVAL_B --paired --out cmp.md``: the same table, then each
headline figure of A and B with the difference B - A and its paired bootstrap interval
(``training.metrics.paired_difference``: both models scored on the same resampled images). The two
evaluations must cover the same images of the same dataset. An interval that contains 0 means the
data do not tell the two apart.
"""
from __future__ import annotations

from pathlib import Path

import click

from model.atomic_files import write_text
from training import metrics as M

COLUMNS = [("accuracy", "Accuracy"), ("cross_entropy", "CE"), ("auc_macro", "AUC"), ("seg_bce", "BCE"),
           ("dsc", "DSC"), ("hd95", "HD95"), ("nsd", "NSD")]
# The paired table: the headline figures a change of model is judged by, in report order.
PAIRED = [("dsc", "DSC"), ("iou", "IoU"), ("hd95", "HD95"), ("nsd", "NSD"), ("accuracy", "accuracy"),
          ("f1_macro", "macro-F1"), ("auc_macro", "macro AUC"), ("auc_malignant", "malignant AUC"),
          ("cross_entropy", "CE"), ("seg_bce", "BCE"), ("normal_empty_share", "normal images with an empty mask"),
          ("normal_fp_area", "false-positive area on normal images")]


def _metrics(d: Path) -> dict:
    path = d / "metrics.json"
    if not path.is_file():
        raise click.ClickException(f"{d}: no metrics.json (write it with python -m training.evaluate --out {d})")
    try:
        return M.read_metrics_json(path)
    except ValueError as exc:
        raise click.ClickException(f"{exc}; write it with python -m training.evaluate --out {d}") from None


def _num(v, digits: int = 3, sign: str = "") -> str:
    """A figure, or "–" where it is undefined (None from JSON, NaN); ``sign="+"`` writes the sign."""
    return "–" if v is None or v != v else f"{v:{sign}.{digits}f}"


def labels(evals: list[Path]) -> list[str]:
    """Each evaluation's name: its folder, with as many parent folders as it takes to tell it from
    the others (``runs/a/eval`` and ``runs/b/eval`` are ``a/eval`` and ``b/eval``)."""
    parts = [Path(d).resolve().parts for d in evals]
    k = 1  # the whole paths (k = the longest) always tell distinct folders apart
    while len({p[-k:] for p in parts}) < len(set(parts)):  # the same folder given twice keeps one name
        k += 1
    return [Path(*p[-k:]).as_posix() for p in parts]


def _same_units(evals: list[Path], metrics: list[dict]) -> None:
    """HD95 and NSD of evaluations in different units (px or mm) or with another NSD tolerance are not
    comparable: such a mix is refused, naming the two, rather than put in one column."""
    first = None
    for d, m in zip(evals, metrics):
        units = m.get("units", {})
        here = (units.get("distance", "px"), units.get("tau"))
        if first is None:
            first = (d, here)
        elif here[0] != first[1][0]:
            raise click.ClickException(f"distances in {first[1][0]} in {first[0]} but in {here[0]} in {d}: "
                                       "not comparable")
        elif here[1] != first[1][1]:
            raise click.ClickException(f"NSD at a tolerance of {first[1][1]} {first[1][0]} in {first[0]} but of "
                                       f"{here[1]} {here[0]} in {d}: not comparable (evaluate both with the same)")


def _images(m: dict) -> object:
    """What an evaluation scored: its images' ids, else (from an older metrics.json) their count, split and data."""
    ids = frozenset(str(c.get("image_id")) for c in m.get("cases") or [] if isinstance(c, dict))
    return ids or (m.get("n_images"), m.get("split"), m.get("data_dir"))


def table(evals: list[Path]) -> str:
    """One row per evaluation; below it a note where they did not score the same images (a --limit run
    beside a full one, another split): then their rows cannot be read against each other."""
    metrics = [_metrics(d) for d in evals]
    _same_units(evals, metrics)
    lines = ["| model | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    names = labels(evals)
    for m, label in zip(metrics, names):
        cells = []
        for key, _ in COLUMNS:
            v = m.get(key)
            cells.append(_num(v) if v is None or isinstance(v, (int, float)) else str(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if len({_images(m) for m in metrics}) > 1:
        counts = ", ".join(f"{label}: {m.get('n_images', '?')}" for label, m in zip(names, metrics))
        lines += ["", f"Note: these evaluations scored different images (images scored: {counts}); their rows "
                      "are not comparable figure for figure. Evaluate every model on the same split and images "
                      "(the same --limit, or none)."]
    return "\n".join(lines) + "\n"


def paired(a: Path, b: Path, n_boot: int = 1000, seed: int = 0) -> str:
    """The paired comparison of two evaluations, as Markdown."""
    ma, mb = _metrics(a), _metrics(b)
    for d, m in ((a, ma), (b, mb)):
        if not m.get("cases"):
            raise click.ClickException(f"{d}/metrics.json has no per-image cases (written by an older "
                                       "training.evaluate? evaluate the predictions again)")
    _same_units([a, b], [ma, mb])
    unit_a = ma.get("units", {}).get("distance", "px")
    try:
        res = M.paired_difference(ma["cases"], mb["cases"], n_boot=n_boot, seed=seed)
    except ValueError as exc:
        raise click.ClickException(f"{a} and {b}: {exc}") from None
    ci = res.get("ci", {})
    name_a, name_b = labels([a, b])
    lines = [f"Paired comparison on {res['n_images']} images ({res['n_lesion_images']} with a lesion): "
             f"A = {name_a}, B = {name_b}; {n_boot} paired bootstrap resamples, seed {seed}, 95 % intervals.", "",
             "| metric | A | B | B − A | 95 % interval of B − A |", "|---|---|---|---|---|"]
    for key, name in PAIRED:
        digits = 2 if key in ("hd95", "normal_fp_area") else 3
        low, high = ci.get(key, [None, None])
        interval = "–" if low is None else f"{_num(low, digits, '+')} … {_num(high, digits, '+')}"
        label = f"{name} ({unit_a})" if key == "hd95" else name
        lines.append(f"| {label} | {_num(res['a'][key], digits)} | {_num(res['b'][key], digits)} | "
                     f"{_num(res['diff'][key], digits, '+')} | {interval} |")
    d = res["dice"]
    lines += ["", f"Dice per lesion image: B higher on {d['b_higher']}, lower on {d['b_lower']}, "
                  f"equal on {d['equal']}."]
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("evals", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Markdown file to write.")
@click.option("--paired", "is_paired", is_flag=True,
              help="Two evaluations of the same images (A B): add B − A with paired bootstrap intervals.")
@click.option("--n-boot", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Bootstrap resamples (--paired).")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed (--paired).")
def main(evals, out, is_paired, n_boot, seed):
    """Write the Table-3 comparison of several evaluated models (EVAL dirs of training.evaluate);
    with --paired, of two models on the same images, with the differences and their intervals."""
    paths = [Path(e) for e in evals]
    if is_paired and len(paths) != 2:
        raise click.UsageError(f"--paired compares two evaluations (A B), not {len(paths)}")
    text = table(paths)
    if is_paired:
        text += "\n" + paired(paths[0], paths[1], n_boot, seed)
    write_text(out, text)
    click.echo(text)


if __name__ == "__main__":
    main()
