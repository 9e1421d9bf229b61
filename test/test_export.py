"""training.export: everything checked before anything is written, the ensemble put in place at
once, and training.tune's choices kept only for the same members."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from model.checkpoint import save_model  # noqa: E402
from model.predictor import Predictor  # noqa: E402
from test_training import tiny_cfg  # noqa: E402
from training import export as export_mod  # noqa: E402
from training.train import build_model  # noqa: E402


def _run(root: Path, variant: str, seed: int) -> Path:
    """A run folder as training.train leaves it: config.yaml naming the variant, best/ and last/."""
    import torch

    torch.manual_seed(seed)
    model = build_model(tiny_cfg(variant))
    for which in ("best", "last"):
        save_model(model, root / which)
    (root / "config.yaml").write_text(f"variant: {variant}\n")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"sd-h": _run(root / "sd-h", "sd-h", 0), "mgc-a": _run(root / "mgc-a", "mgc-a", 1),
            "mgc-a-2": _run(root / "mgc-a-2", "mgc-a", 2)}


def _export(*args):
    return CliRunner().invoke(export_mod.main, [*map(str, args)])


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tuned(out: Path) -> dict:
    """What training.tune --write leaves in ensemble.json."""
    spec = json.loads((out / "ensemble.json").read_text())
    spec["postprocess"].update({"refine": {"type": "box", "margin": 5, "blend": 0.5}, "largest_component": True})
    spec["postprocess_validation"] = [{"refine": r, "gate_normal": False, "largest_component": c, "dsc": 0.5 + 0.1 * c,
                                       "normal_empty_share": 0.2, "n_lesion": 9, "n_normal": 3}
                                      for r in (None, spec["postprocess"]["refine"],
                                                {**spec["postprocess"]["refine"], "outside": "head"})
                                      for c in (False, True)]
    spec["postprocess_validation_setup"] = {"device": "cpu", "precision": "fp32", "runtime": "torch", "tta": False}
    (out / "ensemble.json").write_text(json.dumps(spec))
    return spec


@pytest.mark.parametrize("mount_point", [False, True])
def test_same_members_keep_the_tuning_and_new_members_do_not(runs, tmp_path, monkeypatch, mount_point):
    """Also where --out is a mount point (cannot be renamed: the ensemble is staged inside it and
    moved in item by item)."""
    out = tmp_path / "ens"
    res = _export(runs["sd-h"], runs["mgc-a"], "--out", out)
    assert res.exit_code == 0, res.output
    if mount_point:
        real_ismount = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real_ismount(p))
        monkeypatch.setattr(Path, "rename", _refuse_renaming(out, Path.rename))
        inode = out.stat().st_ino
    tuned = _tuned(out)
    (out / "NOTES.txt").write_text("the user's own file")
    (out / "data-link").symlink_to(tmp_path / "somewhere-else")  # a link of the user's (dangling): kept as a link
    (out / "backup-mgc-a").mkdir()  # a model folder of the user's, not a member: kept too
    for f in ("config.json", "model.safetensors"):
        (out / "backup-mgc-a" / f).write_bytes((runs["mgc-a-2"] / "best" / f).read_bytes())
    res = _export(runs["sd-h"], runs["mgc-a"], "--out", out, "--no-gate-normal")  # the final export, same runs
    assert res.exit_code == 0 and "note:" not in res.output, res.output
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["postprocess"] == tuned["postprocess"]
    assert spec["postprocess_validation"] == tuned["postprocess_validation"]
    assert spec["postprocess_validation_setup"] == tuned["postprocess_validation_setup"]
    assert (out / "NOTES.txt").read_text() == "the user's own file"
    assert (out / "backup-mgc-a" / "model.safetensors").read_bytes() == (runs["mgc-a-2"] / "best" / "model.safetensors").read_bytes()
    card = (out / "MODEL_CARD.md").read_text()
    assert "Chosen by `training.tune` on the validation split (lesion" in card
    # each option scored on its own row: "outside": "head" was shown as the default box refinement's twin
    assert card.count("| box, margin 5, blend 0.5 |") == 2 and card.count("| box, margin 5, blend 0.5, outside head |") == 2
    spec = json.loads((out / "ensemble.json").read_text())
    spec["postprocess_validation_setup"]["limit"] = 12  # training.tune --limit 12 --write: a quick run's choice
    (out / "ensemble.json").write_text(json.dumps(spec))
    assert _export(runs["sd-h"], runs["mgc-a"], "--out", out, "--no-gate-normal").exit_code == 0
    assert "on the validation split (its first 12 images, each class in turn: a quick run's --limit)" \
        in (out / "MODEL_CARD.md").read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    res = _export(runs["sd-h"], runs["mgc-a-2"], "--out", out)  # another MGC-A model
    assert res.exit_code == 0, res.output
    assert "members differ" in res.output and "training.tune" in res.output
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["postprocess"]["refine"] is None and not spec["postprocess"]["largest_component"]
    assert "postprocess_validation" not in spec and "postprocess_validation_setup" not in spec
    assert "Chosen by" not in (out / "MODEL_CARD.md").read_text()
    Predictor.from_dir(out, device="cpu")  # and it loads
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "NOTES.txt", "backup-mgc-a", "data-link",
                                                     "ensemble.json", "mgc-a", "sd-h"]
    assert (out / "data-link").is_symlink() and os.readlink(out / "data-link") == str(tmp_path / "somewhere-else")
    if mount_point:
        assert out.stat().st_ino == inode  # the folder itself stayed


def _refuse_renaming(folder: Path, rename):
    """Path.rename, except that ``folder`` itself cannot be moved (as a mount point cannot: EBUSY)."""
    def guarded(self, target):
        if Path(self) == folder:
            raise OSError(16, "Device or resource busy", str(self))
        return rename(self, target)

    return guarded


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_class_prior_is_set_by_export_and_kept_for_the_same_members(runs, tmp_path):
    out = tmp_path / "ens"
    assert _export(runs["sd-h"], runs["mgc-a"], "--out", out).exit_code == 0
    assert json.loads((out / "ensemble.json").read_text())["postprocess"]["class_prior"] == "trained"
    res = _export(runs["sd-h"], runs["mgc-a"], "--out", out, "--class-prior", "data")
    assert res.exit_code == 0, res.output
    assert Predictor.from_dir(out, device="cpu").class_prior == "data"
    assert _export(runs["sd-h"], runs["mgc-a"], "--out", out).exit_code == 0  # not given: kept
    assert json.loads((out / "ensemble.json").read_text())["postprocess"]["class_prior"] == "data"
    assert _export(runs["sd-h"], runs["mgc-a"], "--out", out, "--class-prior", "uniform").exit_code == 2


@pytest.mark.parametrize("text", ['{"members": {"seg": "se', "[]", '{"members": ["seg"]}', '{"postprocess": 3}'])
def test_an_ensemble_json_in_out_that_is_cut_short_or_edited_is_replaced_with_a_note(runs, tmp_path, text):
    """Exporting over an ensemble.json that is not one (cut short, or edited by hand into a list) was
    a traceback (JSONDecodeError, AttributeError): now it is replaced, saying that nothing tuned is kept
    from it; the new ensemble loads. One that reads but names no members is another ensemble's (no note)."""
    out = tmp_path / "ens"
    assert _export(runs["sd-h"], runs["mgc-a"], "--out", out).exit_code == 0
    (out / "ensemble.json").write_text(text)
    res = _export(runs["sd-h"], runs["mgc-a"], "--out", out)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    unread = text != '{"postprocess": 3}'
    assert ("cannot be read as an ensemble.json: it is replaced" in res.output) == unread, res.output
    assert json.loads((out / "ensemble.json").read_text())["postprocess"]["class_prior"] == "trained"
    assert Predictor.from_dir(out, device="cpu").class_prior == "trained"


def test_a_run_without_best_is_a_clear_error(runs, tmp_path):
    run = tmp_path / "no-best"
    run.mkdir()
    (run / "config.yaml").write_text("variant: mgc-a\n")
    (run / "last").symlink_to(runs["mgc-a"] / "last")
    res = _export(runs["sd-h"], run, "--out", tmp_path / "ens")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "no-best/best: no config.json" in res.output and "--which last" in res.output
    assert not (tmp_path / "ens").exists()
    assert _export(runs["sd-h"], run, "--out", tmp_path / "ens", "--which", "last").exit_code == 0
    res = _export(runs["sd-h"] / "best", "--out", tmp_path / "ens2")  # a model folder where a run folder belongs
    assert res.exit_code == 1 and "is a model inside the training run" in res.output and "--which last" not in res.output


def test_a_failed_export_leaves_the_existing_ensemble_as_it_was(runs, tmp_path):
    out = tmp_path / "ens"
    assert _export(runs["sd-h"], runs["mgc-a"], "--out", out).exit_code == 0
    before = _tree(out)
    broken = tmp_path / "broken"
    (broken / "best").mkdir(parents=True)
    (broken / "config.yaml").write_text("variant: mgc-a\n")
    (broken / "best" / "config.json").write_bytes((runs["mgc-a-2"] / "best" / "config.json").read_bytes())
    res = _export(runs["sd-h"], broken, "--out", out)  # its weights are missing
    assert res.exit_code == 1 and "model.safetensors" in res.output and "Traceback" not in res.output
    assert _tree(out) == before
    # a save stopped between its two files: epoch N's weights beside epoch N-1's config.json (they loaded
    # nowhere, but were exported over a working ensemble)
    (broken / "best" / "model.safetensors").write_bytes((runs["mgc-a"] / "best" / "model.safetensors").read_bytes())
    res = _export(runs["sd-h"], broken, "--out", out)
    assert res.exit_code == 1 and f"{broken / 'best'}: model.safetensors is not the file that config.json was saved " \
        "with" in res.output, res.output
    assert _tree(out) == before


def test_a_model_folder_inside_a_run_is_refused_naming_the_run(runs, tmp_path):
    """training.train prints "model in RUN/best"; given those, export said "two runs of variant 'best'"."""
    res = _export(runs["sd-h"] / "best", runs["mgc-a"] / "best", "--out", tmp_path / "ens")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{runs['sd-h'] / 'best'} is a model inside the training run {runs['sd-h']}: give the run folder, " \
        f"{runs['sd-h']} (--which picks its best/ or last/)" in " ".join(res.output.split())
    assert not (tmp_path / "ens").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_metrics_that_are_not_evaluates_json_are_a_clear_error_and_nothing_is_written(runs, tmp_path, text):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(text)
    res = _export(runs["sd-h"], runs["mgc-a"], "--out", tmp_path / "ens", "--metrics", metrics)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"--metrics {metrics}: not" in res.output
    assert not (tmp_path / "ens").exists()


def test_members_with_different_preprocessing_are_refused(runs, tmp_path):
    other = tmp_path / "vit"
    (other / "best").mkdir(parents=True)
    (other / "config.yaml").write_text("variant: mgc-a\n")
    cfg = json.loads((runs["mgc-a"] / "best" / "config.json").read_text())
    cfg["encoder"] = {"name": "sam_vit_b", "mode": "finetuned", "input_size": 1024, "normalization": "sam",
                      "weights": {"source": "random", "included": True}}
    cfg.pop("weights_sha256")  # an older config, which records no pair: the check of the inputs is what is tested
    (other / "best" / "config.json").write_text(json.dumps(cfg))
    (other / "best" / "model.safetensors").write_bytes(b"")
    res = _export(runs["sd-h"], other, "--out", tmp_path / "ens")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "one input size and normalisation" in res.output
    assert "litemedsam at 256 px, minmax" in res.output and "sam_vit_b at 1024 px, sam" in res.output
    assert not (tmp_path / "ens").exists()


def test_metrics_without_logits_go_into_the_model_card(runs, tmp_path):
    """training.evaluate on predictions without --logits (what reproduce.sh does) leaves seg_bce and
    its interval null; the export writes the card with those cells empty (it crashed on them)."""
    from test_evaluate import make_data, make_pace
    from training import evaluate as evaluate_mod

    res = CliRunner().invoke(evaluate_mod.main, ["--pred", str(make_pace(tmp_path / "pred")),
                                                 "--data", str(make_data(tmp_path / "data")), "--split", "val",
                                                 "--out", str(tmp_path / "eval"), "--n-boot", "20"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["ci"]["seg_bce"] == [None, None]  # the case that crashed the export
    res = _export(runs["sd-h"], runs["mgc-a"], "--out", tmp_path / "ens", "--metrics", tmp_path / "eval" / "metrics.json")
    assert res.exit_code == 0, res.output
    card = (tmp_path / "ens" / "MODEL_CARD.md").read_text()
    dsc_lo, dsc_hi = metrics["ci"]["dsc"]
    assert f"| dsc | {metrics['dsc']:.3f} | {dsc_lo:.3f} – {dsc_hi:.3f} |" in card
    assert "| seg_bce | – |  |" in card
    # how the intervals were resampled (the shipped card's were image by image, evaluate's since resample patients)
    boot = metrics["bootstrap"]
    unit = {"image": f"{boot['n_units']} images",
            "group": f"{boot['n_units']} units: a patient's images and their near-duplicates together"}[boot["unit"]]
    assert f"95 % intervals: percentile bootstrap, 20 resamples of {unit}" in card and "(seed 0)" in card
    # the split the figures come from, and that it also chose the best epochs: optimistic
    assert "## Metrics on the val split" in card and "also chose each member's best epoch" in card
    assert "optimistic" in card and "; best epoch " in card
    # the last epochs (--which last): the card said "best epoch" and that the split chose it
    res = _export(runs["sd-h"], runs["mgc-a"], "--out", tmp_path / "last", "--which", "last",
                  "--metrics", tmp_path / "eval" / "metrics.json")
    assert res.exit_code == 0, res.output
    card = (tmp_path / "last" / "MODEL_CARD.md").read_text()
    assert "; last epoch " in card and "best epoch" not in card and "split chose nothing here" in card, card


def test_a_data_report_that_is_missing_or_not_a_report_is_an_error(runs, tmp_path):
    """A mistyped --data-report used to export with the card's data section empty, exit 0."""
    res = _export(runs["sd-h"], "--out", tmp_path / "ens", "--data-report", tmp_path / "reprot.json")
    assert res.exit_code == 2 and "reprot.json" in res.output and "does not exist" in res.output, res.output
    (tmp_path / "labels.csv").write_text("image_id,label\n")
    res = _export(runs["sd-h"], "--out", tmp_path / "ens", "--data-report", tmp_path / "labels.csv")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert f"--data-report {tmp_path / 'labels.csv'}: not training.prepare's report.json" in res.output
    assert not (tmp_path / "ens").exists()


def test_the_model_card_states_the_split_the_data_report_records(runs, tmp_path):
    """The split's fraction and seed come from training.prepare's report.json; what it does not
    record is "unknown" (the card said "80/20 with seed 0" whatever the data)."""
    report = {"sources": {"busi": "/x"}, "prepared": 12, "seed": 7, "val_fraction": 0.25,
              "counts": {"split_label": {"train/benign": 3}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    ens = export_mod.export([runs["sd-h"]], tmp_path / "ens", data_report=tmp_path / "report.json")
    card = (ens / "MODEL_CARD.md").read_text()
    assert "Split: per class 75/25 with seed 7," in card and "80/20" not in card
    (tmp_path / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k not in ("seed", "val_fraction")}))
    ens = export_mod.export([runs["sd-h"]], tmp_path / "ens2", data_report=tmp_path / "report.json")
    card = (ens / "MODEL_CARD.md").read_text()
    assert "Split: per class train/val fraction unknown with seed unknown," in card and "seed 0" not in card
    assert "near-duplicates not grouped" in card  # a report of before session 27 says nothing of them
    near = {"enabled": True, "correlation": 0.95, "pairs": 164, "groups": 106, "images": 239, "dropped_conflicting": 14}
    (tmp_path / "report.json").write_text(json.dumps({**report, "near_duplicates": near}))
    card = (export_mod.export([runs["sd-h"]], tmp_path / "ens3", data_report=tmp_path / "report.json")
            / "MODEL_CARD.md").read_text()
    assert ("near-duplicates (thumbnails correlating above 0.95) kept on one side, 106 groups of 239 images, "
            "14 images of groups with conflicting labels removed") in card  # a report of before session 47
    near.update(crop_correlation=0.95, crop_pairs=8, groups=112, images=252, dropped_conflicting=15)
    (tmp_path / "report.json").write_text(json.dumps({**report, "near_duplicates": near}))
    card = (export_mod.export([runs["sd-h"]], tmp_path / "ens4", data_report=tmp_path / "report.json")
            / "MODEL_CARD.md").read_text()
    assert ("near-duplicates (thumbnails correlating above 0.95, or one's middle found in the other above 0.95) "
            "kept on one side, 112 groups of 252 images, 15 images of groups with conflicting labels removed") in card


def _frozen_vit_run(root: Path, checkpoint: Path) -> Path:
    """A run of SD-H on a frozen ViT-B (a small random one, 128 px) whose weights are the external
    checkpoint ``checkpoint``, written here as a SAM checkpoint: training stores only the heads then."""
    import torch

    from model.checkpoint import encoder_weights_info
    from model.encoders import build_encoder
    from model.network import PFSAMNet, make_config

    torch.manual_seed(0)
    encoder, _ = build_encoder("sam_vit_b", weights="random", input_size=128)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"image_encoder.{k}": v.half() for k, v in encoder.state_dict().items()}, checkpoint)
    cfg = make_config("sam_vit_b", "frozen", "sd-h", "gap", seg_head_args={"channels": [32, 16]},
                      encoder_weights=encoder_weights_info("sam_vit_b", checkpoint))
    cfg["encoder"]["input_size"] = 128
    save_model(PFSAMNet(cfg, encoder_checkpoint=checkpoint), root / "best")
    (root / "config.yaml").write_text("variant: sd-h\n")
    return root


def test_include_encoder_checkpoint_makes_an_ensemble_that_runs_offline(tmp_path, monkeypatch):
    """A member on a frozen SAM ViT / MedSAM encoder stores only its heads and loads the encoder's
    checkpoint at run time, from $PFSAM_CHECKPOINT_DIR, its own folder or a checkpoints folder; on
    Grand Challenge only the uploaded model is there. --include-encoder-checkpoint copies the
    verified file into the member's folder, and export.sh refuses an ensemble without it."""
    import torch

    from model.checkpoint import CheckpointError
    from model.encoders.weights import load_image_encoder_state
    from test_scripts import run_export_sh

    name = "pfsam_test_vit_b.pth"  # no such file in checkpoints/ or /opt/ml/checkpoints
    ckpts = tmp_path / "ckpts"
    run = _frozen_vit_run(tmp_path / "run", ckpts / name)
    monkeypatch.setenv("PFSAM_CHECKPOINT_DIR", str(ckpts))
    plain, full = tmp_path / "plain", tmp_path / "full"
    res = _export(run, "--out", plain)
    assert res.exit_code == 0, res.output
    assert f"note: member 'sd-h' loads its encoder checkpoint {name} at run time" in res.output
    assert "--include-encoder-checkpoint" in res.output and not (plain / "sd-h" / name).exists()
    res = _export(run, "--out", full, "--include-encoder-checkpoint")
    assert res.exit_code == 0 and "note:" not in res.output, res.output
    assert (full / "sd-h" / name).read_bytes() == (ckpts / name).read_bytes()

    # where the checkpoint folder is gone (the container): the plain ensemble does not load, the full one does
    monkeypatch.delenv("PFSAM_CHECKPOINT_DIR")
    shutil.move(ckpts, tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=f"needs the encoder checkpoint {name}"):
        Predictor.from_dir(plain, device="cpu")
    encoder = Predictor.from_dir(full, device="cpu", precision="fp32", runtime="torch").members["sd-h"].encoder
    weights = load_image_encoder_state(tmp_path / "elsewhere" / name)
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"].float())

    # export.sh refuses the plain ensemble, naming the member and the fix (one that holds the file is
    # exported: test_scripts.py, without a 170 MB file to compress)
    res, _ = run_export_sh(tmp_path / "sh", plain)
    assert res.returncode == 1 and f"member 'sd-h' needs the encoder checkpoint {name}" in res.stderr
    assert "--include-encoder-checkpoint" in res.stderr

    # the file cannot be found, or is not the one the member was trained on: a clear error, nothing written
    res = _export(run, "--out", tmp_path / "none", "--include-encoder-checkpoint")
    assert res.exit_code == 1 and not (tmp_path / "none").exists()
    assert f"member 'sd-h' ({run / 'best'}) needs its encoder checkpoint {name}" in res.output
    assert "PFSAM_CHECKPOINT_DIR" in res.output
    other = tmp_path / "other"
    other.mkdir()
    (other / name).write_bytes(b"other weights")
    monkeypatch.setenv("PFSAM_CHECKPOINT_DIR", str(other))
    res = _export(run, "--out", full, "--include-encoder-checkpoint")
    assert res.exit_code == 1 and "does not match the expected" in res.output and str(other / name) in res.output
    assert (full / "sd-h" / name).read_bytes() == (tmp_path / "elsewhere" / name).read_bytes()  # left as it was


def test_each_task_goes_to_its_member_and_every_member_is_written(runs, tmp_path):
    """SD-H segments, MGC-A classifies (weight 1 each, 0 for the other task); a lone member does both;
    every run given is a member, its files byte for byte those of its run's best/."""
    out = tmp_path / "ens"
    res = _export(runs["mgc-a"], runs["sd-h"], "--out", out)
    assert res.exit_code == 0, res.output
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["members"] == {"mgc-a": "mgc-a", "sd-h": "sd-h"}
    assert spec["segmentation_weights"] == {"mgc-a": 0.0, "sd-h": 1.0}
    assert spec["classification_weights"] == {"mgc-a": 1.0, "sd-h": 0.0}
    for name in ("sd-h", "mgc-a"):
        assert _tree(out / name) == _tree(runs[name] / "best")
    alone = tmp_path / "alone"
    assert _export(runs["mgc-a"], "--out", alone).exit_code == 0
    spec = json.loads((alone / "ensemble.json").read_text())
    assert spec["segmentation_weights"] == spec["classification_weights"] == {"mgc-a": 1.0}


def test_the_model_card_names_each_members_task_epoch_validation_and_the_command(tmp_path):
    """The card's head names which member segments and which classifies; each member's line its
    encoder and heads, the epoch exported and that epoch's head-grid validation figures (an undefined
    one as –); the data section the report's sources and counts; Reproduce the command given."""
    import torch

    from model.checkpoint import read_config

    runs = {}
    for variant, epoch, metrics in (("sd-h", 7, {"val_dsc": 0.61234, "val_auc": None}),
                                    ("mgc-a", 3, {"val_dsc": 0.25, "val_auc": 0.875})):
        torch.manual_seed(epoch)
        quick = {"limit": 12, "images": {"train": 12, "val": 3}} if variant == "mgc-a" else {}
        save_model(build_model(tiny_cfg(variant)), tmp_path / variant / "best",
                   provenance={"variant": variant, "epoch": epoch, "metrics": metrics, **quick})
        (tmp_path / variant / "config.yaml").write_text(f"variant: {variant}\n")
        runs[variant] = tmp_path / variant
    report = {"sources": {"busi": "/x", "bus-bra": "/y"}, "prepared": 12, "seed": 0, "val_fraction": 0.2,
              "counts": {"split_label": {"train/benign": 3, "val/normal": 1}, "source_split": {"busi/train": 9}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    command = "python -m training.export runs/mgc-a runs/sd-h --out ens"
    ens = export_mod.export([runs["mgc-a"], runs["sd-h"]], tmp_path / "ens", data_report=tmp_path / "report.json",
                            command=command)
    card = (ens / "MODEL_CARD.md").read_text()
    assert "Segmentation from **sd-h**, classification from **mgc-a**." in card
    for name, seg, cls, line in (("sd-h", "sd-h", "gap", "; best epoch 7 (head-grid validation: val_dsc 0.612, val_auc –)"),
                                 ("mgc-a", "sd-h", "mgc-a", "; best epoch 3 (head-grid validation: val_dsc 0.250, "
                                                            "val_auc 0.875); **a quick run**: trained with `--limit 12` "
                                                            "on 12 training and validated on 3 images, not the whole "
                                                            "split")):
        enc = read_config(ens / name)["encoder"]
        assert (f"- `{name}`: encoder `{enc['name']}` ({enc['mode']}, input {enc['input_size']}, "
                f"{enc['normalization']} normalisation, weights {enc['weights']['source']} sha256 "
                f"{str(enc['weights'].get('sha256', ''))[:12]}), seg head `{seg}`, classifier `{cls}`{line}") in card
    assert "Sources: busi, bus-bra. Images: 12." in card
    assert "- split_label: train/benign 3, val/normal 1\n- source_split: busi/train 9\n" in card
    assert "Split: per class 80/20 with seed 0," in card
    assert card.endswith(f"## Reproduce\n\n```\n{command}\n```\n")
    plain = export_mod.export([runs["sd-h"]], tmp_path / "plain")
    card = (plain / "MODEL_CARD.md").read_text()
    assert "(not recorded: pass --command to training.export)" in card and "(not evaluated: pass --metrics)" in card
    assert "Segmentation from **sd-h**, classification from **sd-h**." in card
