"""Run directories -> the ensemble directory the model package loads, with a model card.

``python -m training.export RUN_SDH RUN_MGCA --out DIR [--metrics metrics.json]``: each run's
``best/`` model becomes a member named after its variant; by default the mask comes from SD-H
(else UNet-H, else MGC-A) and the class from MGC-A (else SD-H, else UNet-H).
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from model.checkpoint import ENSEMBLE_NAME, read_config, save_ensemble
from model.io import write_text

SEG_PREFERENCE = ("sd-h", "unet-h", "mgc-a")
HEADLINE = ("n_images", "dsc", "iou", "hd95", "nsd", "accuracy", "f1_macro", "auc_macro", "auc_malignant",
            "sens_at_90_spec", "spec_at_90_sens", "normal_empty_share")
CLS_PREFERENCE = ("mgc-a", "sd-h", "unet-h")


def run_variant(run: Path) -> str:
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        variant = yaml.safe_load(cfg_path.read_text()).get("variant")
        if variant:
            return variant
    return run.name


def pick(names: list[str], preference: tuple[str, ...]) -> str:
    for p in preference:
        if p in names:
            return p
    return names[0]


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def model_card(out: Path, members: dict[str, Path], seg: str, cls: str, metrics: dict | None,
               data_report: dict | None, command: str) -> str:
    lines = ["# PF-SAM BUS ensemble: model card", "",
             f"Segmentation from **{seg}**, classification from **{cls}**.", "", "## Members", ""]
    for name, mdir in members.items():
        cfg = read_config(mdir)
        prov = cfg.get("provenance", {})
        enc = cfg["encoder"]
        lines.append(f"- `{name}`: encoder `{enc['name']}` ({enc['mode']}, input {enc['input_size']}, "
                     f"{enc['normalization']} normalisation, weights {enc['weights'].get('source')} "
                     f"sha256 {str(enc['weights'].get('sha256', ''))[:12]}), seg head `{cfg['seg_head']['type']}`, "
                     f"classifier `{cfg['cls_head']['type']}`; best epoch {prov.get('epoch')} "
                     f"(head-grid validation: " + ", ".join(f"{k} {_fmt(v)}" for k, v in prov.get('metrics', {}).items()) + ")")
    lines += ["", "## Data and split", ""]
    if data_report:
        counts = data_report.get("counts", {})
        lines.append(f"Sources: {', '.join(data_report.get('sources', {}))}. Images: {data_report.get('prepared')}.")
        lines.append("")
        for key in ("split_label", "source_split"):
            if key in counts:
                lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in counts[key].items()))
        lines.append("")
        lines.append("Split: per class 80/20 with seed 0, grouped by patient where known (BUS-BRA); "
                     "conflicting duplicates removed (training.prepare).")
    spec = json.loads((out / ENSEMBLE_NAME).read_text())
    lines += ["", "## Postprocessing", "", f"`{json.dumps(spec['postprocess'])}`", ""]
    if spec.get("postprocess_validation"):
        lines += ["Chosen by `training.tune` on the validation split (lesion-image Dice, share of empty masks "
                  "on normal images):", "", "| refine | gate_normal | largest_component | DSC | normal empty |",
                  "|---|---|---|---|---|"]
        for r in spec["postprocess_validation"]:
            ref = r.get("refine")
            ref = f"box, margin {ref['margin']}, blend {ref['blend']}" if ref else "off"
            lines.append(f"| {ref} | {r['gate_normal']} | {r['largest_component']} | {r['dsc']:.4f} | "
                         f"{r['normal_empty_share']:.3f} |")
    lines += ["", "## Validation metrics (training.evaluate, full resolution)", ""]
    if metrics:
        keys = ["n_images", "dsc", "iou", "hd95", "nsd", "accuracy", "f1_macro", "auc_macro", "auc_malignant",
                "sens_at_90_spec", "spec_at_90_sens"]
        ci = metrics.get("ci", {})
        lines += ["| metric | value | 95% CI |", "|---|---|---|"]
        for k in keys:
            if k in metrics:
                c = ci.get(k)
                ci_txt = f"{c[0]:.3f} – {c[1]:.3f}" if isinstance(c, (list, tuple)) and len(c) == 2 else ""
                lines.append(f"| {k} | {_fmt(metrics[k])} | {ci_txt} |")
    else:
        lines.append("(not evaluated: pass --metrics)")
    lines += ["", "## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)


def export(runs: list[Path], out: Path, which: str = "best", metrics_path: Path | None = None,
           postprocess: dict | None = None, data_report: Path | None = None, command: str = "") -> Path:
    members = {}
    for run in runs:
        name = run_variant(run)
        if name in members:
            raise click.ClickException(f"two runs of variant {name!r}: {members[name].parent} and {run}")
        mdir = run / which
        read_config(mdir)  # fails early with a clear message
        members[name] = mdir
    names = list(members)
    seg, cls = pick(names, SEG_PREFERENCE), pick(names, CLS_PREFERENCE)
    metrics = json.loads(metrics_path.read_text()) if metrics_path else None
    extra = {"validation": {k: metrics[k] for k in HEADLINE if k in metrics}} if metrics else {}
    old = out / ENSEMBLE_NAME
    if old.is_file():  # keep training.tune's validation of the postprocess options
        tuned = json.loads(old.read_text()).get("postprocess_validation")
        if tuned:
            extra["postprocess_validation"] = tuned
    save_ensemble(out, members, {n: float(n == seg) for n in names}, {n: float(n == cls) for n in names},
                  postprocess=postprocess, extra=extra)
    report = json.loads(data_report.read_text()) if data_report and data_report.is_file() else None
    write_text(out / "MODEL_CARD.md", model_card(out, {n: out / n for n in names}, seg, cls, metrics, report,
                                                 command or "training/reproduce.sh"))
    return out


@click.command(context_settings={"show_default": True})
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Ensemble directory to write.")
@click.option("--which", default="best", type=click.Choice(["best", "last"]))
@click.option("--metrics", "metrics_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="metrics.json from training.evaluate, for the model card.")
@click.option("--data-report", default=None, type=click.Path(dir_okay=False), help="DATA/report.json for the card.")
@click.option("--gate-normal/--no-gate-normal", default=None,
              help="Empty the mask when the class is normal [default: as in OUT/ensemble.json (training.tune), else off].")
@click.option("--largest-component/--all-components", default=None,
              help="Keep only the largest lesion [default: as in OUT/ensemble.json, else off].")
@click.option("--command", default="", help="The command that reproduces the ensemble (for the card).")
def main(runs, out, which, metrics_path, data_report, gate_normal, largest_component, command):
    """Export trained runs as an ensemble directory (safetensors + JSON + MODEL_CARD.md)."""
    previous = {}
    if (Path(out) / ENSEMBLE_NAME).is_file():  # keep what training.tune chose unless told otherwise
        previous = json.loads((Path(out) / ENSEMBLE_NAME).read_text()).get("postprocess", {})
    post = {"gate_normal": gate_normal, "largest_component": largest_component}
    post = {k: bool(previous.get(k, False)) if v is None else v for k, v in post.items()}
    if previous.get("refine"):
        post["refine"] = previous["refine"]
    export([Path(r) for r in runs], Path(out), which, Path(metrics_path) if metrics_path else None, post,
           Path(data_report) if data_report else None, command)
    click.echo(f"ensemble written to {out}")


if __name__ == "__main__":
    main()
