"""Run directories -> the ensemble directory the model package loads, with a model card.

``python -m training.export RUN_SDH RUN_MGCA --out DIR [--metrics metrics.json]``: each run's
``best/`` model becomes a member named after its variant; by default the mask comes from SD-H
(else UNet-H, else MGC-A) and the class from MGC-A (else SD-H, else UNet-H). A member on a frozen
SAM ViT / MedSAM encoder stores only its heads and loads the encoder's checkpoint at run time;
``--include-encoder-checkpoint`` copies that file (sha256-checked) into the member's folder, where the
model loads it from, so that the ensemble runs offline (a Grand Challenge upload).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import click
import yaml

from model.checkpoint import (CONFIG_NAME, ENSEMBLE_NAME, WEIGHTS_NAME, CheckpointError, check_weights_pair,
                              locate_checkpoint, read_config,
                              save_ensemble)
from model.encoders.weights import WeightsError, how_to_get, sha256_of, verify_checkpoint
from model.atomic_files import write_text

from .metrics import read_metrics_json

SEG_PREFERENCE = ("sd-h", "unet-h", "mgc-a")
HEADLINE = ("n_images", "dsc", "iou", "hd95", "nsd", "accuracy", "f1_macro", "auc_macro", "auc_malignant",
            "sens_at_90_spec", "spec_at_90_sens", "normal_empty_share", "seg_bce")
CLS_PREFERENCE = ("mgc-a", "sd-h", "unet-h")


def run_variant(run: Path) -> str:
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        variant = yaml.safe_load(cfg_path.read_text(encoding="utf-8")).get("variant")
        if variant:
            return variant
    return run.name


def pick(names: list[str], preference: tuple[str, ...]) -> str:
    for p in preference:
        if p in names:
            return p
    return names[0]


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "–" if v is None else str(v)


def split_text(data_report: dict) -> str:
    """The split as the data report records it (training.prepare's ``val_fraction`` and ``seed``);
    "unknown" for what it does not record."""
    frac, seed = data_report.get("val_fraction"), data_report.get("seed")
    if isinstance(frac, (int, float)) and not isinstance(frac, bool) and 0 <= frac <= 1:
        val = round(100 * frac, 1)
        ratio = f"{100 - val:g}/{val:g}"
    else:
        ratio = "train/val fraction unknown"
    return f"per class {ratio} with seed {seed if seed is not None else 'unknown'}"


def near_duplicate_text(data_report: dict) -> str:
    """How the split treated near-duplicate images, as the data report records it."""
    near = data_report.get("near_duplicates") or {}
    if not near.get("enabled"):
        return ("near-duplicates not grouped (the same scan re-exported can be on both sides: prepared "
                "with --no-near-duplicates or before session 27)")
    crops = (f", or one's middle found in the other above {near['crop_correlation']}"
             if near.get("crop_correlation") is not None else "")
    return (f"near-duplicates (thumbnails correlating above {near.get('correlation')}{crops}) kept on one side, "
            f"{near.get('groups')} groups of {near.get('images')} images, {near.get('dropped_conflicting')} "
            f"images of groups with conflicting labels removed")


def selection_caveat(split: str, tuned: bool, which: str = "best") -> str:
    """What the metrics' split was also used for: training.train picks each member's best epoch on the
    validation split (``which`` best), and training.tune the postprocessing; figures on that split are
    then optimistic."""
    if split == "val":
        used = " and ".join((["each member's best epoch"] if which == "best" else [])
                            + (["the postprocessing above"] if tuned else []))
        if not used:
            return ("The members are their runs' last epochs and no postprocessing was tuned, so the validation "
                    "split chose nothing here; a challenge's test phase or a held-out set still gives the figures "
                    "to quote.")
        return (f"The validation split also chose {used}, and the data has no untouched test split (the "
                "paper's per-class 80/20 protocol), so these figures are optimistic; a challenge's test phase "
                "or a held-out set gives an unbiased one.")
    if split == "train":
        return "These are figures on the training split: they say how well the model fits, not how it generalises."
    return ("These figures mix the training and validation splits (split all): they say how well the model fits, "
            "not how it generalises.")


def _limit_text(prov: dict) -> str:
    """A member trained with ``--limit``: said on its line, so that a quick run's model is not taken for a full one."""
    if not prov.get("limit"):
        return ""
    images = prov.get("images") or {}
    return (f"; **a quick run**: trained with `--limit {prov['limit']}` on {images.get('train', '?')} training "
            f"and validated on {images.get('val', '?')} images, not the whole split")


def model_card(out: Path, members: dict[str, Path], seg: str, cls: str, metrics: dict | None,
               data_report: dict | None, command: str, which: str = "best") -> str:
    lines = ["# PF-SAM BUS ensemble: model card", "",
             f"Segmentation from **{seg}**, classification from **{cls}**.", "", "## Members", ""]
    for name, mdir in members.items():
        cfg = read_config(mdir)
        prov = cfg.get("provenance", {})
        enc = cfg["encoder"]
        lines.append(f"- `{name}`: encoder `{enc['name']}` ({enc['mode']}, input {enc['input_size']}, "
                     f"{enc['normalization']} normalisation, weights {enc['weights'].get('source')} "
                     f"sha256 {str(enc['weights'].get('sha256', ''))[:12]}), seg head `{cfg['seg_head']['type']}`, "
                     f"classifier `{cfg['cls_head']['type']}`; {which} epoch {prov.get('epoch')} "
                     f"(head-grid validation: " + ", ".join(f"{k} {_fmt(v)}" for k, v in prov.get('metrics', {}).items()) + ")"
                     + _limit_text(prov))
    lines += ["", "## Data and split", ""]
    if data_report:
        counts = data_report.get("counts", {})
        lines.append(f"Sources: {', '.join(data_report.get('sources', {}))}. Images: {data_report.get('prepared')}.")
        lines.append("")
        for key in ("split_label", "source_split"):
            if key in counts:
                lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in counts[key].items()))
        lines.append("")
        lines.append(f"Split: {split_text(data_report)}, grouped by patient where known (BUS-BRA); "
                     f"conflicting duplicates removed; {near_duplicate_text(data_report)} (training.prepare).")
    spec = json.loads((out / ENSEMBLE_NAME).read_text(encoding="utf-8"))
    lines += ["", "## Postprocessing", "", f"`{json.dumps(spec['postprocess'])}`", ""]
    if spec.get("postprocess_validation"):
        setup = spec.get("postprocess_validation_setup") or {}
        subset = f" (its first {setup['limit']} images, each class in turn: a quick run's --limit)" \
            if setup.get("limit") else ""
        lines += [f"Chosen by `training.tune` on the validation split{subset} (lesion-image Dice, share of empty "
                  "masks on normal images):", "", "| refine | gate_normal | largest_component | DSC | normal empty |",
                  "|---|---|---|---|---|"]
        for r in spec["postprocess_validation"]:
            ref = r.get("refine")
            ref = (f"box, margin {ref['margin']}, blend {ref['blend']}"
                   + (f", outside {ref['outside']}" if ref.get("outside") else "")) if ref else "off"
            dsc, empty = r.get("dsc"), r.get("normal_empty_share")
            lines.append(f"| {ref} | {r['gate_normal']} | {r['largest_component']} | "
                         f"{'–' if dsc is None else f'{dsc:.4f}'} | {'–' if empty is None else f'{empty:.3f}'} |")
    split = (metrics or {}).get("split", "val")
    lines += ["", f"## Metrics on the {split} split (training.evaluate, full resolution)", ""]
    if metrics:
        lines += [selection_caveat(split, bool(spec.get("postprocess_validation")), which), ""]
        keys = ["n_images", "dsc", "iou", "hd95", "nsd", "accuracy", "f1_macro", "auc_macro", "auc_malignant",
                "sens_at_90_spec", "spec_at_90_sens", "cross_entropy", "normal_empty_share", "seg_bce"]
        ci = metrics.get("ci", {})
        boot = metrics.get("bootstrap") or {}
        if boot.get("n_boot"):
            unit = (f"{boot.get('n_units')} units: a patient's images and their near-duplicates together, any "
                    f"other image alone" if boot.get("unit") == "group" else f"{boot.get('n_units')} images")
            lines += [f"95 % intervals: {boot.get('method', 'percentile')} bootstrap, {boot['n_boot']} resamples "
                      f"of {unit} (seed {boot.get('seed')}).", ""]
        lines += ["| metric | value | 95% CI |", "|---|---|---|"]
        for k in keys:
            if k in metrics:
                c = ci.get(k)
                # training.evaluate writes [null, null] where an interval cannot be computed (for
                # example seg_bce without --logits, or one class only): leave the cell empty.
                ci_txt = f"{c[0]:.3f} – {c[1]:.3f}" if isinstance(c, (list, tuple)) and len(c) == 2 \
                    and all(isinstance(v, (int, float)) for v in c) else ""
                lines.append(f"| {k} | {_fmt(metrics[k])} | {ci_txt} |")
    else:
        lines.append("(not evaluated: pass --metrics)")
    lines += ["", "## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)


TUNED_KEYS = ("postprocess_validation", "postprocess_validation_setup")  # training.tune's record


def _member_digest(mdir: Path) -> str:
    return "".join(sha256_of(mdir / f) for f in (CONFIG_NAME, WEIGHTS_NAME))


def _check_members(members: dict[str, Path], which: str) -> None:
    """Everything export needs, checked before anything is written: each member's config and
    weights, and one input size and normalisation across the members (as the predictor needs)."""
    inputs = {}
    for name, mdir in members.items():
        try:
            cfg = read_config(mdir)
        except CheckpointError as exc:
            no_best = which == "best" and not mdir.exists() and (mdir.parent / "last" / CONFIG_NAME).is_file()
            hint = (" (a run whose selection metric was undefined in every epoch has no best/: "
                    "export its last epoch with --which last)") if no_best else ""
            raise click.ClickException(f"{exc}{hint}") from None
        if not (mdir / WEIGHTS_NAME).is_file():
            raise click.ClickException(f"{mdir}: no {WEIGHTS_NAME}")
        try:  # an epoch's save stopped between its two files: the ensemble would not load
            check_weights_pair(mdir, cfg)
        except CheckpointError as exc:
            raise click.ClickException(str(exc)) from None
        inputs[name] = (cfg["encoder"]["name"], cfg["encoder"]["input_size"], cfg["encoder"]["normalization"])
    if len({(size, norm) for _, size, norm in inputs.values()}) > 1:
        found = ", ".join(f"{n}: {e} at {size} px, {norm} normalisation" for n, (e, size, norm) in inputs.items())
        raise click.ClickException(f"the members need one input size and normalisation (one image "
                                   f"preprocessing for the ensemble); found {found}")


def _external_encoders(members: dict[str, Path]) -> dict[str, dict]:
    """The members that load their encoder's checkpoint at run time (a frozen SAM ViT / MedSAM encoder:
    ``"source": "checkpoint"``, not included), with their config's ``encoder.weights``."""
    infos = {name: read_config(mdir)["encoder"]["weights"] for name, mdir in members.items()}
    return {name: info for name, info in infos.items()
            if info.get("source") == "checkpoint" and not info.get("included", True)}


def _encoder_checkpoints(members: dict[str, Path]) -> dict[str, Path]:
    """Each such member's checkpoint file, found where loading the member looks
    (``model.checkpoint.checkpoint_dirs``) and checked against the sha256 its config records."""
    found = {}
    for name, info in _external_encoders(members).items():
        file = str(info.get("file", ""))
        try:
            path = locate_checkpoint(file, model_dir=members[name])
        except WeightsError:
            raise click.ClickException(
                f"member {name!r} ({members[name]}) needs its encoder checkpoint {file} to include it: put the file "
                f"into checkpoints/ or set PFSAM_CHECKPOINT_DIR to its folder (get it: {how_to_get(file)})") from None
        try:
            verify_checkpoint(path, info.get("sha256"))
        except WeightsError as exc:
            raise click.ClickException(f"member {name!r} ({members[name]}): {exc}") from None
        found[name] = path
    return found


def _old_spec(out: Path) -> dict | None:
    """``out``'s current ensemble.json; None where there is none, or it is not one (cut short, edited)."""
    try:
        spec = json.loads((out / ENSEMBLE_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return spec if isinstance(spec, dict) and isinstance(spec.get("members", {}), dict) else None


def _old_members(out: Path) -> set[str]:
    """The member folders that ``out``'s current ensemble.json names (they are replaced on export)."""
    spec = _old_spec(out)
    return {str(name) for name in spec.get("members", {}).values()} if spec else set()


def _replace_items(new: Path, out: Path) -> None:
    """``_replace_dir`` for an ``out`` that cannot be renamed, with ``new`` staged inside it: the old
    members move aside, then the new members, the card and last ensemble.json (each rename atomic)
    move in, so an interruption leaves every file whole and the old ones in ``out/.export-old-*``."""
    old = Path(tempfile.mkdtemp(prefix=".export-old-", dir=out))
    for name in sorted(_old_members(out) - {".", ""}):
        if (out / name).is_dir():
            (out / name).rename(old / name)
    for p in sorted(new.iterdir(), key=lambda p: (p.name == ENSEMBLE_NAME, p.name)):  # ensemble.json last
        if (out / p.name).is_dir():
            (out / p.name).rename(old / p.name)
        os.replace(p, out / p.name)
    shutil.rmtree(old)


def _replace_dir(new: Path, out: Path) -> None:
    """Put the finished ``new`` folder in place of ``out``, keeping ``out``'s other files and folders
    (all but its ensemble.json, card and the member folders that ensemble.json names) and never
    leaving a half-written ensemble behind."""
    if out.exists():
        old_members = _old_members(out)
        for p in out.iterdir():
            if (new / p.name).exists() or p.name in old_members:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.copytree(p, new / p.name, symlinks=True)  # links stay links, never followed
            else:
                shutil.copy2(p, new / p.name, follow_symlinks=False)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        new.rename(out)
        shutil.rmtree(old)
    else:
        new.rename(out)


def export(runs: list[Path], out: Path, which: str = "best", metrics_path: Path | None = None,
           postprocess: dict | None = None, data_report: Path | None = None, command: str = "",
           include_encoder_checkpoint: bool = False) -> Path:
    """Write the ensemble of ``runs``' ``which/`` models into ``out``, all checked first and put in
    place at once. ``include_encoder_checkpoint``: copy each member's external encoder checkpoint
    (``_encoder_checkpoints``) into its folder. ``postprocess``: options given (None values are
    inherited). When ``out`` already holds an ensemble of the same members (byte for byte), its tuned
    postprocess options and training.tune's record of them are kept for the options not given; when
    the members changed, they are not (the note says to run training.tune again)."""
    members = {}
    for run in runs:
        if run.name in ("best", "last") and not (run / "config.yaml").is_file() \
                and (run.parent / "config.yaml").is_file():  # what training.train prints as "model in RUN/best"
            raise click.ClickException(f"{run} is a model inside the training run {run.parent}: give the run "
                                       f"folder, {run.parent} (--which picks its best/ or last/)")
        name = run_variant(run)
        if name in members:
            raise click.ClickException(f"two runs of variant {name!r}: {members[name].parent} and {run}")
        members[name] = run / which
    _check_members(members, which)
    checkpoints = _encoder_checkpoints(members) if include_encoder_checkpoint else {}
    if not include_encoder_checkpoint:
        for name, info in _external_encoders(members).items():
            click.echo(f"note: member {name!r} loads its encoder checkpoint {info.get('file')} at run time, which the "
                       "ensemble does not hold; for a Grand Challenge upload (offline) export with "
                       "--include-encoder-checkpoint", err=True)
    names = list(members)
    seg, cls = pick(names, SEG_PREFERENCE), pick(names, CLS_PREFERENCE)
    try:
        metrics = read_metrics_json(metrics_path) if metrics_path else None
    except ValueError as exc:
        raise click.ClickException(f"--metrics {exc}; give training.evaluate's metrics.json") from None
    extra = {"validation": {k: metrics[k] for k in HEADLINE if k in metrics}} if metrics else {}
    report = None
    if data_report:
        try:
            report = json.loads(Path(data_report).read_text(encoding="utf-8"))
            if not isinstance(report, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise click.ClickException(f"--data-report {data_report}: not training.prepare's report.json "
                                       f"({' '.join(str(exc).split())})") from None
    given = {k: v for k, v in (postprocess or {}).items() if v is not None}
    post = dict(given)
    old = out / ENSEMBLE_NAME
    spec = _old_spec(out)
    if spec is None and old.is_file():
        click.echo(f"note: {old} cannot be read as an ensemble.json: it is replaced, and no tuned postprocess "
                   "options are kept from it", err=True)
    if spec is not None:
        same = (sorted(spec.get("members", {})) == sorted(names)
                and all((out / n / WEIGHTS_NAME).is_file() and _member_digest(out / n) == _member_digest(members[n])
                        for n in names))
        if same:  # the same models: what training.tune chose for them still holds
            post = {**(spec.get("postprocess") if isinstance(spec.get("postprocess"), dict) else {}), **given}
            extra.update({k: spec[k] for k in TUNED_KEYS if k in spec})
        else:
            click.echo(f"note: the members differ from {old}'s: its tuned postprocess options are not kept "
                       "(run training.tune --write on the new ensemble)", err=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # staged beside --out and swapped in; inside it, item by item, where --out cannot be renamed (a mount
    # point, e.g. a folder bind-mounted into a training container) or its parent is not writable
    in_place = out.is_dir() and (os.path.ismount(out) or not os.access(out.parent, os.W_OK))
    tmp = Path(tempfile.mkdtemp(prefix=".export-new-" if in_place else f".{out.name}.new-",
                                dir=out if in_place else out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the model folder must be readable like any folder
    try:
        save_ensemble(tmp, members, {n: float(n == seg) for n in names}, {n: float(n == cls) for n in names},
                      postprocess=post, extra=extra)
        for name, path in checkpoints.items():  # where loading the member looks first after $PFSAM_CHECKPOINT_DIR
            shutil.copyfile(path, tmp / name / path.name)
        write_text(tmp / "MODEL_CARD.md", model_card(tmp, {n: tmp / n for n in names}, seg, cls, metrics, report,
                                                     command or "(not recorded: pass --command to training.export)",
                                                     which))
        (_replace_items if in_place else _replace_dir)(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


@click.command(context_settings={"show_default": True})
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Ensemble directory to write.")
@click.option("--which", default="best", type=click.Choice(["best", "last"]))
@click.option("--metrics", "metrics_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="metrics.json from training.evaluate, for the model card.")
@click.option("--data-report", default=None, type=click.Path(exists=True, dir_okay=False),
              help="DATA/report.json for the card.")
@click.option("--gate-normal/--no-gate-normal", default=None,
              help="Empty the mask when the class is normal [default: as training.tune chose in OUT/ensemble.json for the "
                   "same members, else off].")
@click.option("--largest-component/--all-components", default=None,
              help="Keep only the largest lesion [default: as in OUT/ensemble.json for the same members, else off].")
@click.option("--class-prior", default=None, type=click.Choice(["trained", "data"]),
              help="postprocess.class_prior, process.py's default for this ensemble [default: as in OUT/ensemble.json "
                   "for the same members, else trained].")
@click.option("--command", default="", help="The command that reproduces the ensemble (for the card).")
@click.option("--include-encoder-checkpoint", is_flag=True,
              help="Copy each member's external encoder checkpoint (frozen SAM ViT / MedSAM; found in "
                   "$PFSAM_CHECKPOINT_DIR, the exported RUN/best or RUN/last folder, checkpoints/ or /opt/ml/checkpoints, "
                   "by file name, and sha256-checked) into its folder, so "
                   "that the ensemble runs offline, e.g. as a Grand Challenge model upload (export.sh refuses one "
                   "without).")
def main(runs, out, which, metrics_path, data_report, gate_normal, largest_component, class_prior, command,
         include_encoder_checkpoint):
    """Export trained runs as an ensemble directory (safetensors + JSON + MODEL_CARD.md)."""
    post = {"gate_normal": gate_normal, "largest_component": largest_component, "class_prior": class_prior}
    try:
        export([Path(r) for r in runs], Path(out), which, Path(metrics_path) if metrics_path else None, post,
               Path(data_report) if data_report else None, command, include_encoder_checkpoint)
    except OSError as exc:  # a full disk, a folder it may not write: the ensemble there before is kept
        raise click.ClickException(f"writing the ensemble into {out} failed: {exc} (what was in {out} is "
                                   f"kept as it was)") from None
    click.echo(f"ensemble written to {out}")


if __name__ == "__main__":
    main()
