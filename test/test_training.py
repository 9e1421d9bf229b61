"""training.train / cache / export on a tiny synthetic dataset with the real LiteMedSAM encoder (frozen)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import training.cache as tc
from model.predictor import Predictor
from training import train as train_mod
from training.cache import build_cache, cache_key
from training.datasets import limit_records, load_pair, load_records
from training.export import export
from training.losses import multitask_loss
from model.predictor import use_bf16
from training.config import load_config
from training.curriculum import curriculum_phase
from training.run_state import data_digest, load_resume_state
from training.train import build_model, epoch_plan, train

REPO = Path(__file__).resolve().parents[1]


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=free * 10, used=free * 9, free=free)


def tiny_cfg(variant: str, epochs: int = 2) -> dict:
    cfg = load_config(REPO / "training" / "configs" / f"{variant}.yaml",
                      {"model.encoder": "litemedsam", "model.mode": "frozen", "epochs": epochs,
                       "batch_size": 4, "optim.lr": 1e-3, "views": ["orig", "hflip"],
                       "curriculum": {"gt_until": 1, "mixed_until": 2, "p_gt": 0.5}})
    cfg["model"]["seg_head"] = {"type": cfg["model"]["seg_head"]["type"], **({"channels": [32, 16]} if variant != "unet-h" else {})}
    return cfg


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def full_loss(run_dir: Path, data: Path, cache_root: Path, cfg: dict, precision: str = "auto") -> float:
    """Training loss over all train images (orig view, GT guide) of the model saved in run_dir/last."""
    from model.checkpoint import load_model

    model = load_model(run_dir / "last")
    recs = load_records(data, "train")
    cache = build_cache(model, recs + load_records(data, "val"), cache_root, cfg["views"], torch.device("cpu"),
                        precision)
    total = 0.0
    with torch.no_grad():
        for r in recs:
            emb, skips, mask = cache.get(r.image_id, 0)
            out = model(embedding=emb[None], guide_mask=mask[None, None])
            total += float(multitask_loss(out["mask_logits"][:, 0], mask[None], out["class_logits"],
                                          torch.tensor([r.label_index]))["loss"])
    return total / len(recs)


def test_curriculum_phases_follow_the_paper():
    cfg = load_config(REPO / "training" / "configs" / "mgc-a.yaml", {})
    phases = [curriculum_phase(cfg, e) for e in range(1, 61)]
    assert phases[:20] == ["gt"] * 20 and phases[20:40] == ["mixed"] * 20 and phases[40:] == ["pred"] * 20


@pytest.mark.parametrize("epochs, counts", [(30, (10, 10, 10)), (3, (1, 1, 1)), (120, (40, 40, 40)), (12, (4, 4, 4))])
def test_curriculum_scales_with_an_epoch_override(epochs, counts):
    """--epochs keeps every phase's share of the run (else 30 epochs would never train on predicted masks)."""
    cfg = load_config(REPO / "training" / "configs" / "mgc-a.yaml", {"epochs": epochs})
    phases = [curriculum_phase(cfg, e) for e in range(1, epochs + 1)]
    assert tuple(phases.count(p) for p in ("gt", "mixed", "pred")) == counts
    assert cfg["curriculum"]["p_gt"] == 0.5
    # a boundary given is kept as given; the other scales (it stayed at its 60-epoch value: --epochs 30 with
    # gt_until 5 kept mixed_until 40, and MGC-A never trained on its predicted masks), on its side of the given
    for given, want in (({"curriculum.gt_until": 5}, (5, 20)), ({"curriculum.gt_until": 25}, (25, 25)),
                        ({"curriculum.mixed_until": 25}, (10, 25)), ({"curriculum.mixed_until": 6}, (6, 6))):
        own = load_config(REPO / "training" / "configs" / "mgc-a.yaml", {"epochs": 30, **given})
        assert (own["curriculum"]["gt_until"], own["curriculum"]["mixed_until"]) == want, given
    p_only = load_config(REPO / "training" / "configs" / "mgc-a.yaml", {"epochs": 30, "curriculum.p_gt": 0.3})
    assert p_only["curriculum"] == {"gt_until": 10, "mixed_until": 20, "p_gt": 0.3}  # p_gt sets no boundary


def test_config_overrides_and_curriculum_rounding():
    """--set and the options replace the file's value (None: not given, the file's kept); the scaled
    curriculum rounds to whole epochs (2.33 -> 2, 4.67 -> 5; at 2 epochs 0.67 -> 1), and a whole
    curriculum given with --set is kept as given; a key under a value that is not a section is a
    ConfigError, not a TypeError."""
    from training.config import ConfigError

    path = REPO / "training" / "configs" / "mgc-a.yaml"
    file_cfg = load_config(path, {})
    assert load_config(path, {"epochs": None, "optim.lr": None}) == file_cfg
    assert load_config(path, {"optim.lr": 0.5})["optim"] == {**file_cfg["optim"], "lr": 0.5}
    assert load_config(path, {"epochs": 7})["curriculum"] == {"gt_until": 2, "mixed_until": 5, "p_gt": 0.5}
    assert load_config(path, {"epochs": 2})["curriculum"] == {"gt_until": 1, "mixed_until": 1, "p_gt": 0.5}
    given = load_config(path, {"epochs": 30, "curriculum": {"gt_until": 5, "mixed_until": 9}})
    assert given["curriculum"] == {"gt_until": 5, "mixed_until": 9}
    with pytest.raises(ConfigError, match=r"epochs.x: epochs is 60 in .*, not a section of keys"):
        load_config(path, {"epochs.x": 1})


def _refused(cfg) -> str:
    from training.config import ConfigError, check_config

    with pytest.raises(ConfigError) as exc:
        check_config(cfg)
    return str(exc.value)


def test_config_value_bounds_are_pinned_at_their_edges():
    """Each check at its edge, both sides, as training needs it: 0 epochs (the run's folder alone) and
    batch size 1 pass, -1 and 0 do not, nor True; lr > 0 but weight decay, loss weights and p_gt may be
    0, p_gt 1 too; dropout below 1; the curriculum's phases may be empty (0, gt_until == mixed_until);
    a missing required key and a value outside its choices are refused; select may be left out."""
    from training.config import check_config

    base = load_config(REPO / "training" / "configs" / "sd-h.yaml", {})
    ok = {"epochs": 0, "batch_size": 1, "seed": 0, "optim.lr": 1e-9, "optim.weight_decay": 0, "loss.seg_weight": 0,
          "curriculum.p_gt": 0, "model.seg_head.dropout": 0.99}
    bad = {"epochs": -1, "batch_size": 0, "seed": True, "optim.lr": 0, "optim.weight_decay": -1e-9,
           "curriculum.p_gt": 1.0001, "model.seg_head.dropout": 1, "model.cls_head.hidden": True,
           "model.seg_head.channels": [12, 16], "curriculum.gt_until": -1, "class_weights.normal": 0,
           "optim.scheduler": "step", "augment": "none", "model.mode": "thawed", "select": "val_loss"}
    for key, value in ok.items():
        assert check_config(load_config(REPO / "training" / "configs" / "sd-h.yaml", {key: value})) == [], key
    assert check_config({**base, "curriculum": {"gt_until": 0, "mixed_until": 0, "p_gt": 1}}) == []
    assert check_config({k: v for k, v in base.items() if k != "select"}) == []
    for key, value in bad.items():
        message = _refused(load_config(REPO / "training" / "configs" / "sd-h.yaml", {key: value}))
        assert key in message, (key, message)
    for key, value in (("model.seg_head.dropout", -0.1), ("model.seg_head.channels", [0, 16]),
                       ("model.seg_head.channels", [128, 64, 32])):
        assert key in _refused(load_config(REPO / "training" / "configs" / "sd-h.yaml", {key: value})), (key, value)
    assert check_config({**base, "loss": {**base["loss"], "seg_weight": 0}}) == []  # one weight 0: trains the other
    assert "curriculum.gt_until (3)" in _refused({**base, "curriculum": {"gt_until": 3, "mixed_until": 2}})
    assert _refused({**base, "loss": {**base["loss"], "seg_weight": 0, "cls_weight": 0}}).endswith("nothing would train")
    assert _refused({**base, "optim": {"weight_decay": 0}}) == "config key optim.lr is missing"
    assert _refused({k: v for k, v in base.items() if k != "views"}) == "config key 'views' is missing"


def test_config_errors_name_the_set_or_option_that_gave_the_value():
    from training.config import config_error_origin

    msg = "config key optim.lr is -1: give a positive finite number"
    assert config_error_origin(msg, "c.yaml", ["optim.lr=-1"]) == f"--set optim.lr=-1: {msg}"
    assert config_error_origin(msg, "c.yaml", ["optim=x"]) == f"--set optim=x: {msg}"  # a section above it
    assert config_error_origin(msg, "c.yaml", ["lr=-1"]) == f"c.yaml: {msg}"  # not optim.lr
    assert config_error_origin(msg, "c.yaml", [], {"optim.lr": "--lr -1.0", "epochs": "--epochs 3"}) == \
        f"--lr -1.0: {msg}"
    assert config_error_origin("c.yaml: not a readable YAML config", "c.yaml", []) == \
        "c.yaml: not a readable YAML config"


def test_epoch_plan_is_seeded_and_class_weighted(tiny_dataset):
    cfg = tiny_cfg("mgc-a")
    recs = load_records(tiny_dataset, "train")
    a, b = epoch_plan(recs, cfg, 3), epoch_plan(recs, cfg, 3)
    assert a == b and a != epoch_plan(recs, cfg, 4)
    cfg["class_weights"] = {"normal": 100.0, "benign": 1.0, "malignant": 1.0}
    many = [recs[i].label for e in range(20) for i, _ in epoch_plan(recs, cfg, e)]
    assert many.count("normal") / len(many) > 0.8


def test_training_reduces_the_loss_and_export_loads(tiny_dataset, cache_dir, tmp_path):
    """Nine epochs of three steps (the curriculum's three phases, three epochs each) at lr 1e-3 lower
    the training loss clearly. fp32 throughout, so the figures are the same on a CPU with bf16 and on
    one without (with three epochs at lr 3e-3 the drop was 4 % in fp32 and more than 5 % in bf16:
    nine steps on twelve images are too few to tell training from noise)."""
    cfg = tiny_cfg("mgc-a", epochs=9)
    cfg["curriculum"] = {"gt_until": 3, "mixed_until": 6, "p_gt": 0.5}
    run, start = tmp_path / "run", tmp_path / "start"
    train(dict(cfg, epochs=0), tiny_dataset, run, "cpu", cache_dir, precision="fp32")  # epoch 0: saves nothing
    torch.manual_seed(cfg["seed"])
    from model.checkpoint import save_model

    save_model(build_model(cfg), start / "last")
    before = full_loss(start, tiny_dataset, cache_dir, cfg, "fp32")
    result = train(cfg, tiny_dataset, run, "cpu", cache_dir, precision="fp32")
    after = full_loss(run, tiny_dataset, cache_dir, cfg, "fp32")
    assert after < before * 0.9, (before, after)
    hist = result["history"]
    assert [h["phase"] for h in hist] == ["gt"] * 3 + ["mixed"] * 3 + ["pred"] * 3
    assert (run / "log.csv").is_file() and (run / "curves.png").is_file() and (run / "best" / "model.safetensors").is_file()
    assert set(json.loads((run / "log.json").read_text())[0]) >= {"train_loss", "val_dsc", "val_acc", "val_auc", "lr", "images_per_s"}
    # frozen external encoder: only the heads are stored
    assert not any(k.startswith("encoder.") for k in load_file(str(run / "best" / "model.safetensors")))
    # a second run of another variant, exported together, loads in the model package
    run2 = tmp_path / "run_sd"
    train(tiny_cfg("sd-h", epochs=1), tiny_dataset, run2, "cpu", cache_dir)
    ens = export([run2, run], tmp_path / "ensemble", data_report=None)
    spec = json.loads((ens / "ensemble.json").read_text())
    assert spec["segmentation_weights"] == {"sd-h": 1.0, "mgc-a": 0.0}
    assert spec["classification_weights"] == {"sd-h": 0.0, "mgc-a": 1.0}
    assert "MODEL_CARD.md" in {p.name for p in ens.iterdir()}
    pred = Predictor.from_dir(ens, device="cpu")
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tiny_dataset / "images" / "PACE_00005_001_BUS.png"))
    out = pred.predict_one(img)
    assert out.mask.shape == img.shape[:2] and abs(sum(out.probabilities.values()) - 1) < 1e-4
    # the two members share one encoder module
    encs = {id(m.encoder) for m in pred.members.values()}
    assert len(encs) == 1


def test_resume_reproduces_the_uninterrupted_run(tiny_dataset, cache_dir, tmp_path):
    """Also the cosine schedule: the log's lr is the rate each epoch ran at (it was the next epoch's:
    the scheduler stepped before the rate was read), in the resumed run's log too."""
    cfg = tiny_cfg("mgc-a", epochs=3)
    cfg["optim"] = {**cfg["optim"], "scheduler": "cosine"}
    straight = tmp_path / "straight"
    train(cfg, tiny_dataset, straight, "cpu", cache_dir)
    broken = tmp_path / "broken"
    train(cfg, tiny_dataset, broken, "cpu", cache_dir, stop_after=1)
    train(cfg, tiny_dataset, broken, "cpu", cache_dir, resume=True)
    cosine = [1e-3 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]  # 1e-3, 7.5e-4, 2.5e-4
    for run in (straight, broken):
        assert [h["lr"] for h in json.loads((run / "log.json").read_text())] == pytest.approx(cosine, rel=1e-9)
        with open(run / "log.csv") as fh:
            assert [float(r["lr"]) for r in csv.DictReader(fh)] == pytest.approx(cosine, rel=1e-9)
    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(broken / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_resume_samples_the_views_the_run_started_with(tiny_dataset, tmp_path, capsys):
    """A run with --no-cache-build on a cache of the first view only, resumed with a plain --cache
    (which encodes the views it lacked), sampled every view from then on, in silence: its weights
    differed from the uninterrupted run's. state.pt records the views the cache lacked at the start;
    the resumed run leaves them out too, and a resume on a cache lacking views the run sampled is
    refused."""
    import click

    cfg = tiny_cfg("mgc-a", epochs=2)
    cfg["class_weights"] = {"normal": 3.0, "benign": 1.0, "malignant": 1.5}
    cpu, cache = torch.device("cpu"), tmp_path / "cache"
    first_only = {"orig": ["normal", "benign", "malignant"], "hflip": []}  # training.cache --first-view-only
    build_cache(build_model(cfg), load_records(tiny_dataset), cache, cfg["views"], cpu, "fp32", view_classes=first_only)
    other = tmp_path / "other_cache"  # the first view only, kept for the refusal below
    shutil.copytree(cache, other)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(cfg, tiny_dataset, straight, "cpu", cache, precision="fp32", cache_build=False)
    train(cfg, tiny_dataset, broken, "cpu", cache, precision="fp32", cache_build=False, stop_after=1)
    lacked = torch.load(broken / "state.pt", weights_only=True)["run"]["views_missing"]
    train_ids = {r.image_id for r in load_records(tiny_dataset, "train")}
    assert lacked and set(lacked) == train_ids and all(v == [1] for v in lacked.values())
    train(cfg, tiny_dataset, broken, "cpu", cache, precision="fp32", resume=True)  # builds the flipped views
    assert "the resumed run leaves them out too" in capsys.readouterr().err
    (key,) = [p for p in cache.iterdir() if p.is_dir()]
    done = np.fromfile(key / "done.u8", np.uint8)
    assert done.sum() > len(load_records(tiny_dataset))  # the flipped views were encoded meanwhile
    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(broken / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a run that sampled both views, resumed on a cache with the first view only: refused
    full = tmp_path / "full"
    train(cfg, tiny_dataset, full, "cpu", cache, precision="fp32", stop_after=1)
    assert torch.load(full / "state.pt", weights_only=True)["run"]["views_missing"] == {}
    with pytest.raises(click.ClickException, match=r"continues a run that sampled \d+ views the embedding cache "
                                                   r"lacks now \(e\.g\. 'hflip' of PACE_.*resume without "
                                                   r"--no-cache-build"):
        train(cfg, tiny_dataset, full, "cpu", other, precision="fp32", resume=True, cache_build=False)
    assert torch.load(full / "state.pt", weights_only=True)["epoch"] == 1


def test_a_new_run_into_the_folder_of_an_earlier_run_is_refused(tiny_dataset, cache_dir, tmp_path):
    """Without --resume a run into an --out that held a run started at epoch 1 there: it overwrote
    state.pt (Ctrl-C, then the command again without --resume) and kept the earlier run's best/,
    which training.export then packaged (a run whose metric was never defined writes none). It is
    refused before anything is written, naming the folder and --resume; a folder that a run left
    with its config.yaml alone (stopped before its first epoch ended) takes a new run."""
    import click

    from training.run_state import RUN_FILES

    cfg = tiny_cfg("sd-h", epochs=2)
    run = tmp_path / "run"
    train(cfg, tiny_dataset, run, "cpu", cache_dir, stop_after=1)
    # every file a run writes but its config.yaml marks the folder as an earlier run's
    assert {p.name for p in run.iterdir()} == set(RUN_FILES) | {"config.yaml"}
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(click.ClickException, match=rf"--out {run} holds an earlier run \(state\.pt, last, best, "
                                                   r"log\.json, log\.csv, summary\.json, curves\.png\); pass --resume to continue it, or "
                                                   r"choose another --out or remove that folder first"):
        train(cfg, tiny_dataset, run, "cpu", cache_dir)
    (run / "state.pt").unlink()  # a best/ without state.pt (copied elsewhere, say): no --resume to offer
    res = CliRunner().invoke(train_mod.main, ["--config", str(REPO / "training" / "configs" / "sd-h.yaml"),
                                              "--data", str(tiny_dataset), "--out", str(run), "--device", "cpu"])
    assert res.exit_code == 1 and f"--out {run} holds an earlier run (last, best," in res.output, res.output
    assert "--resume" not in res.output
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == {k: v for k, v in before.items() if k != "state.pt"}
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text("epochs: 1\n")  # a run that stopped before its first epoch ended
    result = train(dict(cfg, epochs=1), tiny_dataset, started, "cpu", cache_dir)
    assert [h["epoch"] for h in result["history"]] == [1] and (started / "state.pt").is_file()


def test_ctrl_c_ends_python_m_training_train_by_sigint_after_saying_so(tiny_dataset, tmp_path):
    """Run as a program (python -m training.train), a Ctrl-C'd run exited 130 after its message; bash goes
    on after a child that merely exits 130, so a shell loop over training runs went on to the next run.
    It now ends by SIGINT itself (the shell's 130) after its message, as process.py does. The Ctrl-C
    comes as the run reads its config (training.config.load_config replaced before the module runs)."""
    import signal
    import subprocess

    program = ("import os, runpy, signal, time\n"
               "import training.config\n"
               "def interrupted(*a, **k):\n"
               "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
               "    raise AssertionError('SIGINT did not stop the run')\n"
               "training.config.load_config = interrupted\n"
               "runpy.run_module('training.train', run_name='__main__', alter_sys=True)\n")
    proc = subprocess.run([sys.executable, "-c", program, "--config",
                           str(REPO / "training" / "configs" / "default-sd-h.yaml"), "--data", str(tiny_dataset),
                           "--device", "cpu", "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == -signal.SIGINT, (proc.returncode, proc.stderr[-3000:])
    assert f"interrupted before an epoch ended: nothing to resume in {tmp_path / 'run'}" in proc.stderr, proc.stderr


def test_a_run_whose_mixed_phase_does_not_end_before_its_last_epoch_says_so(tiny_dataset, cache_dir, tmp_path, capsys):
    """MGC-A trained without its predicted-mask phase (curriculum.mixed_until at or past the last epoch)
    never sees the mask it gets at inference: the run says so at its start; SD-H (no mask) does not."""
    cfg = tiny_cfg("mgc-a", epochs=2)
    train(dict(cfg, epochs=1), tiny_dataset, tmp_path / "mgca", "cpu", cache_dir)
    assert "note: curriculum.gt_until (1) is not before the last epoch (1): MGC-A never trains on its own " \
        "predicted mask" in capsys.readouterr().err
    train(dict(cfg, epochs=2), tiny_dataset, tmp_path / "mgca2", "cpu", cache_dir)
    assert "note: curriculum.mixed_until (2) is not before the last epoch (2): MGC-A never reaches the phase of " \
        "its own predicted mask alone" in capsys.readouterr().err
    train(dict(tiny_cfg("sd-h", epochs=2), epochs=1), tiny_dataset, tmp_path / "sdh", "cpu", cache_dir)
    assert "curriculum.mixed_until" not in capsys.readouterr().err


def _train_one_epoch_with_workers(data: Path, cache_dir: Path, run: Path, workers: int):
    """``python -m training.train`` in-process: default-sd-h, one epoch from the cache, ``workers`` loaders."""
    return CliRunner().invoke(train_mod.main, ["--config", str(REPO / "training" / "configs" / "default-sd-h.yaml"),
                                               "--data", str(data), "--out", str(run), "--device", "cpu",
                                               "--cache", str(cache_dir), "--epochs", "1", "--workers", str(workers),
                                               "--set", "views=[orig]"])


def test_a_dataloader_worker_killed_by_sigterm_stops_the_run_as_its_own_sigterm_does(tiny_dataset, cache_dir,
                                                                                     tmp_path, monkeypatch):
    """A scheduler's SIGTERM reaches every process of the job: a DataLoader worker died of it and, when
    torch reported that before the run saw its own SIGTERM, the run ended with "DataLoader worker ...
    killed by signal" and a traceback (exit 1) instead of its stop naming state.pt (exit 143). Here the
    worker gets SIGTERM as it loads its first item (it dies of it: the run's own handler, inherited at
    the fork, is not its), and the run stops as for its own."""
    import signal

    from torch.utils.data import get_worker_info

    real = train_mod.CachedSet.__getitem__

    def signalled(self, item):
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, item)

    monkeypatch.setattr(train_mod.CachedSet, "__getitem__", signalled)
    before = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    res = _train_one_epoch_with_workers(tiny_dataset, cache_dir, run, 1)
    assert res.exit_code == 143, (res.output, res.exception)
    assert f"stopped by SIGTERM before an epoch ended: nothing to resume in {run}" in res.output, res.output
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_jobs_sigterm_to_the_run_and_its_workers_stops_it_without_a_traceback(tiny_dataset, cache_dir, tmp_path,
                                                                                 monkeypatch):
    """The job's SIGTERM reaches the run and each of its DataLoader workers: each worker's death raised torch's
    "DataLoader worker ... killed by signal" again (after the stop's message, from the iterator's __del__ or
    from any later child's SIGCHLD) while the traceback kept the iterator alive. Here every worker signals
    the run and itself on its first item: the stop is said once, and no error follows, not even later."""
    import gc
    import signal
    import subprocess
    import time

    from torch.utils.data import get_worker_info

    real = train_mod.CachedSet.__getitem__

    def signalled(self, item):
        if get_worker_info() is not None:
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, item)

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(train_mod.CachedSet, "__getitem__", signalled)
    res = _train_one_epoch_with_workers(tiny_dataset, cache_dir, tmp_path / "run", 2)
    assert res.exit_code == 143, (res.output, res.exception)
    assert res.output.count("stopped by SIGTERM") == 1 and "Traceback" not in res.output, res.output
    del res
    gc.collect()
    subprocess.run(["true"], check=True)  # a later child's SIGCHLD: torch's handler found the dead workers
    time.sleep(0.5)
    assert unraisable == []


def test_sigterm_stops_training_as_ctrl_c_does_saying_what_can_be_resumed(tiny_dataset, tmp_path, monkeypatch):
    """SIGTERM (a job's time limit, SLURM's preemption, docker stop) ended a run with no word (exit -15):
    now it stops it as Ctrl-C does, naming state.pt to resume from (or that there is none), with exit
    143, and the caller's handler is back afterwards. --set epochs=0 says that nothing was trained (it
    said that the last epoch's model was in last/, which does not exist)."""
    import signal
    import time

    args = ["--config", str(REPO / "training" / "configs" / "default-sd-h.yaml"), "--data", str(tiny_dataset),
            "--device", "cpu"]
    state = tmp_path / "run" / "state.pt"

    def killed_partway(cfg, data, out, *a, **k):
        out.mkdir(parents=True, exist_ok=True)
        if out.name == "run":
            state.write_bytes(b"epoch 1's state")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_mod, "train", killed_partway)
    for name, said in (("run", f"stopped by SIGTERM: {state} holds the run's last finished epoch; continue it with "
                               "the same command and --resume"),
                       ("early", f"stopped by SIGTERM before an epoch ended: nothing to resume in {tmp_path / 'early'}")):
        res = CliRunner().invoke(train_mod.main, [*args, "--out", str(tmp_path / name)])
        assert res.exit_code == 143 and said in res.output, res.output
        assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.undo()
    res = CliRunner().invoke(train_mod.main, [*args, "--out", str(tmp_path / "none"), "--set", "epochs=0"])
    assert res.exit_code == 0 and f"done: 0 epochs, nothing trained; {tmp_path / 'none'} holds the run's config " \
        "alone" in res.output, res.output
    assert [p.name for p in (tmp_path / "none").iterdir()] == ["config.yaml"]


def test_resume_of_a_limit_run_of_the_earlier_rule_is_refused(tiny_dataset, cache_dir, tmp_path):
    """--limit took the first N images by id before it took each class in turn: a --limit run started
    by that version would resume on other images, so it is refused; a run of this version resumes."""
    import click

    from training.run_state import LIMIT_RULE

    cfg = tiny_cfg("sd-h", epochs=2)
    run = tmp_path / "run"
    train(cfg, tiny_dataset, run, "cpu", cache_dir, stop_after=1, limit=4)
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["run"]["limit"] == 4 and state["run"]["limit_rule"] == LIMIT_RULE
    prov = json.loads((run / "last" / "config.json").read_text())["provenance"]  # what an exported card shows
    assert prov["limit"] == 4 and prov["images"] == {"train": 4, "val": 3}
    now = dict(state["run"])
    load_resume_state(run / "state.pt", cfg, now)  # the same version: resumes
    del state["run"]["limit_rule"]
    torch.save(state, run / "state.pt")
    with pytest.raises(click.ClickException, match=r"continues a --limit run of an earlier version, whose --limit "
                                                   r"took other images"):
        load_resume_state(run / "state.pt", cfg, now)


def test_resume_with_other_settings_is_refused_naming_them(tiny_dataset, cache_dir, tmp_path, capsys):
    """state.pt records the run's config: --resume --epochs 4 after a run started with 2 epochs would
    run the curriculum backwards and restart the cosine schedule, so it is refused (and config.yaml
    kept); the same settings resume."""
    import click

    cfg = tiny_cfg("sd-h", epochs=2)
    run = tmp_path / "run"
    train(cfg, tiny_dataset, run, "cpu", cache_dir, stop_after=1)
    written = (run / "config.yaml").read_text()
    longer = load_config(REPO / "training" / "configs" / "sd-h.yaml", {"epochs": 4})  # the CLI's --epochs 4
    longer = dict(cfg, epochs=4, curriculum=longer["curriculum"])
    with pytest.raises(click.ClickException, match=r"other settings \(curriculum\.mixed_until: 2 → 3; "
                                                   r"epochs: 2 → 4\)") as err:
        train(longer, tiny_dataset, run, "cpu", cache_dir, resume=True)
    assert str(run / "state.pt") in err.value.message and "config.yaml" in err.value.message
    with pytest.raises(click.ClickException, match=r"optim\.lr: 0\.001 → 0\.002\)"):
        train(dict(cfg, optim={**cfg["optim"], "lr": 2e-3}), tiny_dataset, run, "cpu", cache_dir, resume=True)
    with pytest.raises(click.ClickException, match=r"started with --limit \(none\), not --limit 4 \(another set of images\)"):
        train(cfg, tiny_dataset, run, "cpu", cache_dir, resume=True, limit=4)
    assert (run / "config.yaml").read_text() == written
    assert torch.load(run / "state.pt", weights_only=True)["epoch"] == 1
    # another precision or device: allowed (a run may end on another machine), with a warning
    started = torch.load(run / "state.pt", weights_only=True)["run"]
    assert started == {"limit": None, "precision": "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32",
                       "encoder_precision": "fp32", "device": "cpu", "encoder_sha256": build_model(cfg).config["encoder"]["weights"]["sha256"],
                       "data_sha256": data_digest(tiny_dataset), "cache": True, "views_missing": {}}
    other = {"fp32": "bf16", "bf16": "fp32"}[started["precision"]]
    load_resume_state(run / "state.pt", cfg, dict(started, precision=other, device="cuda", cache=False))
    warning = capsys.readouterr().err
    assert (f"another precision: {started['precision']} → {other}, device: cpu → cuda, cache: embeddings from the "
            "cache → the encoder on the fly") in warning, warning
    # the frozen encoder's own precision (recorded since session 49; before, the heads' was the encoder's)
    load_resume_state(run / "state.pt", cfg, dict(started, encoder_precision="bf16"))
    assert "another encoder precision: fp32 → bf16;" in capsys.readouterr().err
    older = {k: v for k, v in started.items() if k != "encoder_precision"}
    torch.save({**torch.load(run / "state.pt", weights_only=True), "run": dict(older, precision="bf16")},
               tmp_path / "older.pt")
    load_resume_state(tmp_path / "older.pt", cfg, dict(started, precision="bf16"))  # its encoder ran in bf16
    assert "another encoder precision: bf16 → fp32;" in capsys.readouterr().err
    # other data (training.prepare run again into DATA): refused, where it used to resume in silence
    moved = tmp_path / "data"
    shutil.copytree(tiny_dataset, moved)
    rows = (moved / "split.csv").read_text().splitlines()
    image_id, side = rows[1].split(",")
    rows[1] = f"{image_id},{'val' if side == 'train' else 'train'}"  # one image moves to the other side
    (moved / "split.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(click.ClickException, match=r"started on other data: DATA's labels.csv or split.csv changed"):
        train(cfg, moved, run, "cpu", cache_dir, resume=True)
    result = train(cfg, tiny_dataset, run, "cpu", cache_dir, resume=True)
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_resume_is_refused_after_a_relabelling_or_where_no_state_pt_is(tiny_dataset, tmp_path):
    """state.pt's data digest covers labels.csv as well as split.csv: an image relabelled since the run
    started is refused as one moved to the other side is. --resume into a folder without state.pt (a
    mistyped --out) is refused before anything is written, never started afresh."""
    import re

    import click

    cfg = tiny_cfg("sd-h", epochs=2)
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    started = {"limit": None, "data_sha256": data_digest(data)}
    torch.save({"epoch": 1, "config": cfg, "run": started}, tmp_path / "state.pt")
    assert load_resume_state(tmp_path / "state.pt", cfg, dict(started))["epoch"] == 1
    labels = (data / "labels.csv").read_text()
    assert labels.count(",benign,") > 1
    (data / "labels.csv").write_text(labels.replace(",benign,", ",malignant,", 1))  # one image relabelled
    with pytest.raises(click.ClickException, match=r"started on other data: DATA's labels.csv or split.csv changed"):
        load_resume_state(tmp_path / "state.pt", cfg, dict(started, data_sha256=data_digest(data)))
    run = tmp_path / "run"
    with pytest.raises(click.ClickException, match=rf"--resume: {re.escape(str(run / 'state.pt'))} not found"):
        train(cfg, tiny_dataset, run, "cpu", None, resume=True)
    assert not run.exists()


def test_a_state_pt_of_an_older_version_without_its_config_resumes_with_a_warning(tmp_path, capsys):
    """state.pt written before it recorded the run's config (and how the run was started): nothing to
    compare, so it resumes, saying so, rather than being refused as a run with other settings."""
    cfg = tiny_cfg("sd-h", epochs=2)
    torch.save({"epoch": 1, "history": [], "best": {"epoch": 0}}, tmp_path / "state.pt")
    assert load_resume_state(tmp_path / "state.pt", cfg, {"limit": None, "data_sha256": "0" * 64})["epoch"] == 1
    assert "records no config (an older version wrote it); resuming with this one" in capsys.readouterr().err


def test_a_state_pt_cut_short_or_not_a_training_state_is_refused_naming_it(tmp_path):
    """A damaged state.pt (cut short: a full disk, a copy interrupted), one that is no zip of tensors,
    and one that holds something other than a training state are refused naming the file and what to
    do, never a traceback from inside torch."""
    import click

    cfg = tiny_cfg("sd-h", epochs=2)
    path = tmp_path / "state.pt"
    torch.save({"epoch": 1, "config": cfg, "weights": torch.zeros(4096)}, path)
    whole = path.read_bytes()
    for data in (whole[:5000], b"not a checkpoint at all", b"junk", None):
        if data is None:
            torch.save([1, 2, 3], path)
        else:
            path.write_bytes(data)
        with pytest.raises(click.ClickException, match=r"--resume: .*state\.pt (cannot be read \(|holds no training "
                                                       r"state \(a list\)).*start the run again into a new --out"):
            load_resume_state(path, cfg, {"limit": None, "data_sha256": "0" * 64})


def test_a_date_in_the_config_does_not_stop_the_run_from_resuming(tmp_path):
    """YAML reads 2025-01-31 as a date, which torch.load(weights_only=True) refuses in state.pt: the
    config keeps it as text, from the file and from --set alike."""
    import yaml

    path = tmp_path / "dated.yaml"
    path.write_text((REPO / "training" / "configs" / "sd-h.yaml").read_text() + "\nnotes: {started: 2025-01-31}\n")
    cfg = load_config(path, {"trial": yaml.safe_load("2026-11-29 10:00:00")})
    assert cfg["notes"] == {"started": "2025-01-31"} and cfg["trial"] == "2026-11-29T10:00:00"
    torch.save({"config": cfg}, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["config"] == cfg


def test_resume_accepts_a_moved_encoder_checkpoint_with_the_same_sha256(tmp_path, capsys):
    """The config names the checkpoint by path; a run whose checkpoint was moved (another machine,
    another folder) resumes when the file at the new path has the sha256 the run started from, and
    is refused when it holds other weights."""
    import click

    from training.run_state import STATE_NAME

    first, moved, other = tmp_path / "a" / "my_sam.pth", tmp_path / "b" / "my_sam.pth", tmp_path / "c" / "my_sam.pth"
    for path, content in ((first, b"weights one"), (moved, b"weights one"), (other, b"weights two")):
        path.parent.mkdir()
        path.write_bytes(content)
    cfg = load_config(REPO / "training" / "configs" / "sd-h.yaml",
                      {"model.encoder": "sam_vit_b", "model.encoder_checkpoint": str(first)})
    from model.checkpoint import encoder_weights_info

    state = {"epoch": 1, "config": cfg, "run": {"encoder_sha256": encoder_weights_info("sam_vit_b", first)["sha256"]}}
    torch.save(state, tmp_path / STATE_NAME)
    first.unlink()
    moved_cfg = load_config(REPO / "training" / "configs" / "sd-h.yaml",
                            {"model.encoder": "sam_vit_b", "model.encoder_checkpoint": str(moved)})
    assert load_resume_state(tmp_path / STATE_NAME, moved_cfg)["epoch"] == 1
    assert "the encoder checkpoint moved" in capsys.readouterr().err
    other_cfg = load_config(REPO / "training" / "configs" / "sd-h.yaml",
                            {"model.encoder": "sam_vit_b", "model.encoder_checkpoint": str(other)})
    with pytest.raises(click.ClickException, match=r"other settings \(model\.encoder_checkpoint: "):
        load_resume_state(tmp_path / STATE_NAME, other_cfg)


def test_resume_with_an_encoder_checkpoint_that_cannot_be_read_is_refused(tmp_path, capsys):
    """A config whose encoder checkpoint moved to a path where no file is (or one that cannot be read)
    is not taken for the same weights: refused as other settings, without a note that it moved."""
    import click

    from model.checkpoint import encoder_weights_info
    from training.run_state import STATE_NAME

    first = tmp_path / "a" / "my_sam.pth"
    first.parent.mkdir()
    first.write_bytes(b"weights one")
    cfg = load_config(REPO / "training" / "configs" / "sd-h.yaml",
                      {"model.encoder": "sam_vit_b", "model.encoder_checkpoint": str(first)})
    torch.save({"epoch": 1, "config": cfg, "run": {"encoder_sha256": encoder_weights_info("sam_vit_b", first)["sha256"]}},
               tmp_path / STATE_NAME)
    gone = load_config(REPO / "training" / "configs" / "sd-h.yaml",
                       {"model.encoder": "sam_vit_b", "model.encoder_checkpoint": str(tmp_path / "b" / "my_sam.pth")})
    with pytest.raises(click.ClickException, match=r"other settings \(model\.encoder_checkpoint: "):
        load_resume_state(tmp_path / STATE_NAME, gone)
    assert "the encoder checkpoint moved" not in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_restores_the_cpu_rng_state(tiny_dataset, tmp_path):
    """state.pt loaded onto the GPU put the torch RNG state there, and torch.set_rng_state takes a
    CPU tensor only: resuming on CUDA crashed. The state is loaded on the CPU."""
    cfg = tiny_cfg("sd-h", epochs=2)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(cfg, tiny_dataset, straight, "cuda", tmp_path / "cache")
    train(cfg, tiny_dataset, broken, "cuda", tmp_path / "cache", stop_after=1)
    train(cfg, tiny_dataset, broken, "cuda", tmp_path / "cache", resume=True)
    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(broken / "last" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_rng_states_are_restored_from_wherever_they_were_loaded(monkeypatch):
    """set_rng_state hands torch CPU byte tensors, also for states loaded onto another device."""
    from training.run_state import get_rng_state, set_rng_state

    moved = []

    class Elsewhere(torch.Tensor):  # a tensor loaded elsewhere: torch refuses it until .cpu()
        def cpu(self, *a, **kw):
            moved.append(True)
            return torch.Tensor(self).clone().as_subclass(torch.Tensor)

    real = torch.set_rng_state
    monkeypatch.setattr(torch, "set_rng_state",
                        lambda t: real(t) if type(t) is torch.Tensor else (_ for _ in ()).throw(
                            TypeError("RNG state must be a torch.ByteTensor")))
    state = get_rng_state()
    expected = torch.rand(3)
    state["torch"] = state["torch"].as_subclass(Elsewhere)
    set_rng_state(state)
    assert moved and torch.equal(torch.rand(3), expected)


def test_cache_key_changes_with_what_the_values_depend_on(tiny_dataset):
    cfg = tiny_cfg("sd-h")
    model = build_model(cfg)
    k = cache_key(model, ["orig"], "fp32", False)
    assert k == cache_key(model, ["orig"], "fp32", False)
    assert len({k, cache_key(model, ["orig", "hflip"], "fp32", False), cache_key(model, ["orig"], "bf16", False),
                cache_key(model, ["orig"], "fp32", True)}) == 4


def test_cache_key_follows_what_preprocessing_computes(monkeypatch):
    model = build_model(tiny_cfg("sd-h"))
    k = cache_key(model, ["orig"], "fp32", False)
    real = tc.preprocess
    monkeypatch.setattr(tc, "preprocess", lambda img, size, norm: (lambda x, g: (x * 0.999, g))(*real(img, size, norm)))
    assert cache_key(model, ["orig"], "fp32", False) != k
    monkeypatch.setattr(tc, "preprocess", real)
    assert cache_key(model, ["orig"], "fp32", False) == k


def test_cache_key_covers_code_the_encoder_runs_from_other_files(tmp_path, monkeypatch):
    """The SAM ViT's fused attention kernel lives in other files (CODE_FILES): editing them
    changes the encoder-code part of the cache key."""
    from model.encoders import sam_vit
    from training.cache import _source_sha

    assert sam_vit.CODE_FILES and all(p.is_file() for p in sam_vit.CODE_FILES)
    extra = tmp_path / "kernel.py"
    extra.write_text("A = 1\n")
    monkeypatch.setattr(sam_vit, "CODE_FILES", (*sam_vit.CODE_FILES, extra))
    before = _source_sha(sam_vit)
    assert _source_sha(sam_vit) == before
    extra.write_text("A = 2\n")
    assert _source_sha(sam_vit) != before


def test_cli_help_and_nan_stop(tiny_dataset, cache_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "training.train", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "--frozen / --finetune" in out.stdout

    run = tmp_path / "nan"  # in-process (the module's own entry point ran above)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(train_mod.main, [
            "--config", str(REPO / "training" / "configs" / "sd-h.yaml"), "--data", str(tiny_dataset), "--out",
            str(run), "--encoder", "litemedsam", "--frozen", "--epochs", "2", "--lr", "1e30", "--cache",
            str(cache_dir), "--device", "cpu", "--set", "views=[orig,hflip]", "--set", "model.seg_head.channels=[32,16]"])
    assert res.exit_code == 2, res.output[-2000:]
    # the stop's message read the loss without torch's warning about a tensor that requires grad
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
    assert "loss is" in res.output
    # the message tells where the last good checkpoint is, or that there is none (the first epoch failed)
    if (run / "state.pt").is_file():
        assert f"last good checkpoint (epoch {torch.load(run / 'state.pt', weights_only=True)['epoch']})" in res.output
    else:
        assert "epoch 1: " in res.output and "No checkpoint was written" in res.output, res.output[-2000:]


def test_an_epoch_with_a_non_finite_validation_loss_or_weights_is_not_saved(tiny_dataset, cache_dir, tmp_path,
                                                                            monkeypatch):
    """Only the training loss was checked: at lr 1e20 with one step per epoch (batch 32 > 9 images) epoch
    1's training loss is finite, its step ruins the weights, and the epoch was saved (state.pt, last/,
    val_loss NaN) as the 'last good checkpoint' that epoch 2's stop pointed to. Now the run stops
    before that epoch is saved; so it does for non-finite weights under a finite validation loss."""
    from training.train import NonFiniteLoss

    cfg = dict(tiny_cfg("sd-h", epochs=2), batch_size=32)
    cfg["optim"] = {**cfg["optim"], "lr": 1e20}
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"epoch 1: validation loss is nan; stopping\. No checkpoint was "
                                            r"written \(the first epoch failed\)"):
        train(cfg, tiny_dataset, run, "cpu", cache_dir, precision="fp32")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # no state.pt, last/, best/ or logs
    good = tmp_path / "good"  # epoch 1 is saved; epoch 2's weights turn NaN (the loss stays finite)
    real, calls = train_mod.evaluate_epoch, []

    def poisoned(net, *args):  # epoch 2's weights turn NaN; its validation loss reads finite
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                net.seg_head.out.bias.fill_(float("nan"))
            return {**real(net, *args), "val_loss": 0.5}
        return real(net, *args)

    monkeypatch.setattr(train_mod, "evaluate_epoch", poisoned)
    with pytest.raises(NonFiniteLoss, match=rf"epoch 2: weights are not finite \(e\.g\. seg_head\.out\.bias\); "
                                            rf"stopping\. The last good checkpoint \(epoch 1\) is kept in "
                                            rf"{str(good / 'state.pt')}"):
        train(tiny_cfg("sd-h", epochs=2), tiny_dataset, good, "cpu", cache_dir, precision="fp32")
    state = torch.load(good / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert [h["epoch"] for h in json.loads((good / "log.json").read_text())] == [1]


def _scripted_validation(monkeypatch, dscs: list[float]) -> tuple[list[dict], list[tuple[float, int]]]:
    """training.train with each epoch's validation Dice set from ``dscs`` (the other figures fixed): the
    heads' weights at each validation, and each training step's (loss, batch size)."""
    snapshots, steps = [], []
    real_batch = train_mod.run_batch

    def evaluate(net, *args):
        snapshots.append({k: v.detach().clone() for k, v in net.head_state_dict().items()})
        return {"val_loss": 1.0, "val_dsc": dscs[len(snapshots) - 1], "val_acc": 0.5, "val_auc": 0.5}

    def run_batch(model, batch, *args):
        out, losses = real_batch(model, batch, *args)
        if model.training:
            steps.append((float(losses["loss"].detach()), len(batch["label"])))
        return out, losses

    monkeypatch.setattr(train_mod, "evaluate_epoch", evaluate)
    monkeypatch.setattr(train_mod, "run_batch", run_batch)
    return snapshots, steps


def test_best_is_the_first_epoch_of_the_highest_metric_also_after_a_resume(tiny_dataset, cache_dir, tmp_path,
                                                                            monkeypatch):
    """best/ holds the epoch whose selection metric (SD-H: val_dsc) is highest, the first of a tie; a
    later, worse epoch leaves it alone, in a resumed run too (whose best is restored from state.pt).
    Each epoch is logged once, in order, with its training loss (the mean over the images, not the
    batches: 9 images in batches of 4, 4 and 1) and the images per second of those 9 images."""
    dscs = [0.3, 0.7, 0.7, 0.5]
    cfg = tiny_cfg("sd-h", epochs=4)
    run = tmp_path / "run"
    snapshots, steps = _scripted_validation(monkeypatch, dscs)
    train(cfg, tiny_dataset, run, "cpu", cache_dir, precision="fp32", stop_after=2)
    train(cfg, tiny_dataset, run, "cpu", cache_dir, precision="fp32", resume=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"] == {"epoch": 2, "value": 0.7, "metric": "val_dsc"}
    assert summary["last"]["epoch"] == 4 and summary["last"]["val_dsc"] == 0.5
    prov = json.loads((run / "best" / "config.json").read_text())["provenance"]
    assert prov["epoch"] == 2 and prov["metrics"]["val_dsc"] == 0.7
    best = load_file(str(run / "best" / "model.safetensors"))
    assert best.keys() == snapshots[1].keys()
    assert all(torch.equal(best[k], snapshots[1][k]) for k in best)  # epoch 2's weights
    assert not all(torch.equal(best[k], snapshots[2][k]) for k in best)  # not epoch 3's (the tie)
    last = load_file(str(run / "last" / "model.safetensors"))
    assert all(torch.equal(last[k], snapshots[3][k]) for k in last)
    log = json.loads((run / "log.json").read_text())
    with open(run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [h["epoch"] for h in log] == [1, 2, 3, 4] and [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [h["val_dsc"] for h in log] == dscs and [float(r["val_dsc"]) for r in rows] == dscs
    n_train = len(load_records(tiny_dataset, "train"))
    k = -(-n_train // cfg["batch_size"])  # steps per epoch
    assert len(steps) == 4 * k and n_train % cfg["batch_size"]  # a smaller last batch
    per_epoch = [steps[e * k:(e + 1) * k] for e in range(4)]
    for h, epoch_steps in zip(log, per_epoch):
        assert sum(n for _, n in epoch_steps) == n_train
        assert h["train_loss"] == pytest.approx(sum(loss * n for loss, n in epoch_steps) / n_train, rel=1e-6)
        assert h["images_per_s"] * h["seconds"] == pytest.approx(n_train, rel=1e-9)


def test_cache_serves_a_subset_of_its_images(tiny_dataset, tmp_path, monkeypatch):
    """Also: encoding on a CPU keeps freed memory in the heap (model/allocator.py), as inference and
    training do; without it `python -m training.cache` took 2.5 s per view here, 1.6 s with it."""
    tuned, real = [], tc.keep_freed_memory
    monkeypatch.setattr(tc, "keep_freed_memory", lambda: tuned.append(1) or real())
    model = build_model(tiny_cfg("sd-h"))
    records = load_records(tiny_dataset)[:6]  # train and val images, normal and benign
    full = build_cache(model, records, tmp_path, ["orig"], torch.device("cpu"), "fp32")
    assert tuned
    sub = build_cache(model, records[::3], tmp_path, ["orig"], torch.device("cpu"), "fp32", build=False)
    assert len(records[::3]) == 2
    for r in records[::3]:
        assert torch.equal(sub.get(r.image_id, 0)[0], full.get(r.image_id, 0)[0])


def test_cache_grows_by_the_images_it_lacks_and_keeps_the_rest(tiny_dataset, tmp_path, monkeypatch):
    """A cache built for fewer images (a --limit run) refused a run on more: it had to be deleted and
    every image encoded again. Now the images it lacks are appended and encoded, no others; with
    --no-cache-build (build=False) they are refused, naming one. A growth cut short before meta.json
    was written (longer files, the old list) still serves the old list and grows again cleanly."""
    from training.cache import CacheError

    cpu = torch.device("cpu")
    model = build_model(tiny_cfg("sd-h"))
    records = load_records(tiny_dataset)[:6]
    first = build_cache(model, records, tmp_path, ["orig"], cpu, "fp32")
    before = {r.image_id: first.get(r.image_id, 0)[0] for r in records}
    root, n_bytes = first.root, (first.root / "embedding.f16").stat().st_size
    stranger = records[0].__class__(**{**records[0].__dict__, "image_id": "PACE_99999_001_BUS"})  # records[0]'s files
    with pytest.raises(CacheError, match=r"1 of these images are not in the cache \(e\.g\. PACE_99999_001_BUS.*"
                                         r"add them with training\.cache or train without --no-cache-build"):
        build_cache(model, [*records, stranger], tmp_path, ["orig"], cpu, "fp32", build=False)
    assert (root / "embedding.f16").stat().st_size == n_bytes  # refused before anything changed
    tc._grow_files(root, 6, 9, 1, None)  # as if a growth was killed before it wrote meta.json
    again = build_cache(model, records, tmp_path, ["orig"], cpu, "fp32", build=False)
    assert all(torch.equal(again.get(i, 0)[0], e) for i, e in before.items())
    loaded = []
    monkeypatch.setattr(tc, "load_pair", lambda rec: loaded.append(rec.image_id) or load_pair(rec))
    grown = build_cache(model, [*records, stranger], tmp_path, ["orig"], cpu, "fp32")
    assert loaded == ["PACE_99999_001_BUS"]  # only the new image was encoded
    assert grown.ids == [*first.ids, "PACE_99999_001_BUS"]  # appended: the cached rows did not move
    assert (root / "embedding.f16").stat().st_size == n_bytes // 6 * 7
    assert all(torch.equal(grown.get(i, 0)[0], e) for i, e in before.items())
    new = grown.get("PACE_99999_001_BUS", 0)
    assert new[0].abs().sum() > 0 and torch.allclose(new[0], before[records[0].image_id], atol=2e-3, rtol=1e-2)
    assert torch.equal(new[2], grown.get(records[0].image_id, 0)[2])  # its mask target too
    reopened = build_cache(model, [*records, stranger], tmp_path, ["orig"], cpu, "fp32", build=False)
    assert torch.equal(reopened.get("PACE_99999_001_BUS", 0)[0], new[0])


@pytest.mark.slow  # a training.cache subprocess and two training runs: 14 s on the slowest host
def test_cache_limit_builds_what_train_limit_reads(tiny_dataset, tmp_path):
    """`training.cache --limit N` encodes the images `training.train --limit N` uses, no others, so that
    run trains with --no-cache-build; a run on more images with --no-cache-build is refused."""
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "training.cache", "--data", str(tiny_dataset), "--cache", str(cache),
                           "--views", "orig,hflip", "--first-view-only", "--limit", "2", "--device", "cpu",
                           "--precision", "fp32"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (meta,) = cache.glob("*/meta.json")
    assert f"{meta.parent}: 5 images (2 train, 3 val) of the 5 it holds; views encoded for them: orig 5, hflip 0" \
        in proc.stderr, proc.stderr[-2000:]
    train, val = load_records(tiny_dataset, "train"), load_records(tiny_dataset, "val")
    assert len(train) > 2  # the limit leaves training images out
    train, val = limit_records(train, val, 2)  # 2 training images, a validation image of each class
    assert json.loads(meta.read_text())["ids"] == sorted(r.image_id for r in train + val)

    common = ["--config", str(REPO / "training" / "configs" / "sd-h.yaml"),  # in-process: the cache's CLI ran above
              "--data", str(tiny_dataset), "--encoder", "litemedsam", "--frozen", "--epochs", "1",
              "--cache", str(cache), "--no-cache-build", "--device", "cpu", "--precision", "fp32",
              "--set", "views=[orig,hflip]", "--set", "model.seg_head.channels=[16,8]"]
    run = CliRunner().invoke(train_mod.main, [*common, "--out", str(tmp_path / "run"), "--limit", "2"])
    assert run.exit_code == 0, run.output[-2000:]
    assert (tmp_path / "run" / "last" / "config.json").is_file()
    more = CliRunner().invoke(train_mod.main, [*common, "--out", str(tmp_path / "more"), "--limit", "3"])
    assert more.exit_code == 1 and "1 of these images are not in the cache" in more.output, more.output[-2000:]


def test_a_damaged_cache_or_folder_is_an_error_naming_it_not_zeros_or_a_crash(tiny_dataset, tmp_path, monkeypatch):
    """A cache file cut short (a full disk, an interrupted copy) was padded with zeros by numpy and
    trained on as embeddings; a disk too small for the build killed it with SIGBUS mid-way; a
    read-only folder gave an OSError traceback, and a finished cache on a read-only mount could not be
    trained on (its files were opened for writing)."""
    from training.cache import CacheError

    model = build_model(tiny_cfg("sd-h"))
    records = load_records(tiny_dataset)[:4]
    cpu = torch.device("cpu")
    monkeypatch.setattr(tc.shutil, "disk_usage", lambda p: shutil_usage(free=3 * 2**20))  # about one view
    with pytest.raises(CacheError, match=r"4 views to encode need 0\.0\d GiB, and only 0\.00 GiB are free there"):
        build_cache(model, records, tmp_path / "small", ["orig"], cpu, "fp32")
    monkeypatch.undo()
    built = build_cache(model, records, tmp_path / "c", ["orig"], cpu, "fp32")
    opened = build_cache(model, records, tmp_path / "c", ["orig"], cpu, "fp32", build=False)
    assert opened.embedding.mode == "r" and built.embedding.mode != "r"  # reading needs no write permission
    emb = built.root / "embedding.f16"
    with open(emb, "r+b") as fh:
        fh.truncate(emb.stat().st_size // 2)
    for build in (True, False):
        with pytest.raises(CacheError, match=rf"embedding.f16: {emb.stat().st_size} bytes where the cache needs "
                                             rf"{2 * emb.stat().st_size}.*delete .* and build the cache again"):
            build_cache(model, records, tmp_path / "c", ["orig"], cpu, "fp32", build=build)
    assert emb.stat().st_size == 4 * 256 * 64 * 64  # left as it was: nothing padded

    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(tc.Path, "mkdir", read_only)
    with pytest.raises(CacheError, match=r"ro/[0-9a-f]+: the embedding cache cannot be written there "
                                         r"\(Read-only file system\); give --cache a folder this user can write"):
        build_cache(model, records, tmp_path / "ro", ["orig"], cpu, "fp32")


def test_cache_key_of_random_encoder_weights_follows_their_values():
    """Random weights were keyed as "random" alone: a run with another seed trained on the first run's
    embeddings."""
    keys = []
    for seed in (0, 0, 1):
        cfg = tiny_cfg("sd-h")
        cfg["model"]["encoder_weights"] = "random"
        torch.manual_seed(seed)
        keys.append(cache_key(build_model(cfg), ["orig"], "fp32", False))
    assert keys[0] == keys[1] != keys[2]


def test_cache_gives_validation_images_the_first_view_only(tiny_dataset, tmp_path):
    """Validation reads the unaugmented view alone: the augmented views are encoded for training
    images only (with the configs' four views on BUSI + BUS-BRA split 80/20, 12 % of the encoder
    passes had gone to validation views that nothing read)."""
    model = build_model(tiny_cfg("sd-h"))
    records = [r for r in load_records(tiny_dataset) if r.label == "normal"][2:]  # the last train, the val image
    assert [r.split for r in records] == ["train", "val"]
    cache = build_cache(model, records, tmp_path, ["orig", "hflip"], torch.device("cpu"), "fp32")
    done = {r.split: cache.done[cache.index[r.image_id]].tolist() for r in records}
    assert done == {"train": [1, 1], "val": [1, 0]}
    train_rec = records[0]
    _, _, mask = cache.get(train_rec.image_id, 1)  # the mirrored view of the training image
    assert torch.equal(mask, cache.get(train_rec.image_id, 0)[2].flip(-1))


def test_cache_encodes_again_what_the_data_changed(tmp_path):
    """meta.json records each image's prepared files (sha256): after a mask is corrected (the data
    prepared again) a build encodes that image again and serves the new mask; training on the cache
    as it is (--no-cache-build) refuses the stale entry."""
    from model.atomic_files import write_png
    from synthetic import make_prepared_dataset
    from training.cache import CacheError

    data = make_prepared_dataset(tmp_path / "data", n_per_class=1)
    model = build_model(tiny_cfg("sd-h"))
    records = load_records(data)
    cache = build_cache(model, records, tmp_path / "cache", ["orig"], torch.device("cpu"), "fp32")
    before = {r.image_id: cache.get(r.image_id, 0)[2].clone() for r in records}
    lesion = next(r for r in records if r.label == "benign")
    corrected = np.zeros((96, 128), np.uint8)
    corrected[10:40, 20:70] = 255
    write_png(lesion.mask_path, corrected)
    with pytest.raises(CacheError, match=rf"1 cached images were encoded from other image or mask files.*{lesion.image_id}"):
        build_cache(model, records, tmp_path / "cache", ["orig"], torch.device("cpu"), "fp32", build=False)
    cache = build_cache(model, records, tmp_path / "cache", ["orig"], torch.device("cpu"), "fp32")
    fresh = build_cache(model, records, tmp_path / "fresh", ["orig"], torch.device("cpu"), "fp32")
    assert not torch.equal(cache.get(lesion.image_id, 0)[2], before[lesion.image_id])
    for r in records:
        assert torch.equal(cache.get(r.image_id, 0)[2], fresh.get(r.image_id, 0)[2]), r.image_id
        assert torch.equal(cache.get(r.image_id, 0)[0], fresh.get(r.image_id, 0)[0]), r.image_id
    build_cache(model, records, tmp_path / "cache", ["orig"], torch.device("cpu"), "fp32", build=False)  # current


def test_a_new_cache_beside_others_is_announced(tiny_dataset, tmp_path, capsys):
    """A cache of another key (precision, encoder code, preprocessing) is not reused: the new one was
    encoded beside it without a word (hours, and the old one's disk stays taken). A note names both."""
    model = build_model(tiny_cfg("sd-h"))
    records = load_records(tiny_dataset)[:2]
    first = build_cache(model, records, tmp_path, ["orig"], torch.device("cpu"), "fp32")
    assert "note:" not in capsys.readouterr().err  # the first in its folder
    build_cache(model, records, tmp_path, ["orig"], torch.device("cpu"), "fp32")
    assert "note:" not in capsys.readouterr().err  # found: reused
    second = build_cache(model, records, tmp_path, ["orig", "hflip"], torch.device("cpu"), "fp32")
    err = " ".join(capsys.readouterr().err.split())
    assert (f"note: {tmp_path} holds 1 other cache(s) ({first.root.name}), none for this model: encoding a new one, "
            f"{second.root.name} (encoder litemedsam, precision fp32, views orig,hflip;") in err


def test_training_on_a_cache_of_another_precision_says_so_and_leaves_no_trace(tiny_dataset, tmp_path):
    """--no-cache-build where the model's key is absent (here: an fp32 cache, a bf16 run) names the
    key and the caches that are there, and creates nothing (no empty key folder, no sparse arrays)."""
    from training.cache import CacheError

    model = build_model(tiny_cfg("sd-h"))
    records = load_records(tiny_dataset)[:4]
    build_cache(model, records, tmp_path, ["orig"], torch.device("cpu"), "fp32")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CacheError, match=r"no cache for this model .*precision bf16.*build it with training.cache"):
        build_cache(model, records, tmp_path, ["orig"], torch.device("cpu"), "bf16", build=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and len(before) == 1
    with pytest.raises(CacheError, match=before[0]):  # the existing key is named
        build_cache(model, records, tmp_path, ["orig"], torch.device("cpu"), "bf16", build=False)
    with pytest.raises(CacheError) as refused:  # ... as this model's at the other precision, with the option
        build_cache(model, records, tmp_path, ["orig"], torch.device("cpu"), "bf16", build=False)
    assert f"the one there for fp32, {before[0]}, is this model's at --precision fp32)" in str(refused.value)


def test_a_frozen_litemedsam_is_encoded_for_training_as_inference_runs_it(tiny_dataset, tmp_path, monkeypatch):
    """On a CPU with native bf16 the cache ran LiteMedSAM's encoder in bf16 under --precision auto, while
    the container runs it in fp32 (its bf16 embedding is about 5 % away): the heads were trained and chosen on
    embeddings inference never gives them. Under auto the encoder now runs as inference runs it (LiteMedSAM
    fp32; SAM's ViTs bf16 where native), the cache and a run without one alike; --precision bf16 forces it."""
    import model.predictor as mp
    from model.predictor import encoder_bf16
    from training.cache import cache_key
    from training.train import run_batch

    monkeypatch.setattr(mp, "bf16_supported", lambda device: True)  # as on the AMX and AVX512-BF16 hosts
    cpu = torch.device("cpu")
    assert not encoder_bf16("auto", cpu, "litemedsam") and encoder_bf16("auto", cpu, "sam_vit_b")
    assert encoder_bf16("bf16", cpu, "litemedsam") and not encoder_bf16("fp32", cpu, "sam_vit_b")
    model = build_model(tiny_cfg("sd-h"))
    records = load_records(tiny_dataset)[:2]
    cache = build_cache(model, records, tmp_path, ["orig"], cpu, "auto")
    assert cache.root.name == cache_key(model, ["orig"], "fp32", False)
    from model.preprocessing import preprocess

    x = torch.stack([preprocess(load_pair(r)[0], model.input_size, model.normalization)[0] for r in records])
    with torch.no_grad():
        want = model.encoder(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model.encoder(x)[0].float()
    got = torch.stack([cache.get(r.image_id, 0)[0].float() for r in records])
    assert (got - want).norm() / want.norm() < 2e-3  # fp32, stored as fp16
    assert (bf - want).norm() / want.norm() > 0.01  # what the cache held before
    # without a cache: heads in bf16, the frozen encoder in fp32
    seen = []
    real_heads = model.heads
    monkeypatch.setattr(model, "heads", lambda emb, feats=None, guide=None: seen.append(emb) or real_heads(emb, feats, guide))
    batch = {"x": x, "mask": torch.zeros(2, 256, 256), "label": torch.tensor([1, 1])}
    model.eval()
    with torch.no_grad():
        run_batch(model, batch, cpu, True, "pred", 0.0, None, tiny_cfg("sd-h"), False)
    assert (seen[0].float() - want).norm() / want.norm() < 1e-4


def _torchrun_two(data: Path, run: Path, cache: Path, timeout: int) -> subprocess.CompletedProcess:
    """training.train under torchrun with two CPU ranks (gloo); skips without a loopback network."""
    from conftest import free_loopback_port

    try:  # the ranks meet over the loopback interface, which a network namespace (unshare -n) has down
        port = free_loopback_port()
    except OSError as exc:
        pytest.skip(f"no usable loopback network for the ranks to meet ({exc})")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                           "-m", "training.train", "--config", "training/configs/mgc-a.yaml", "--data", str(data),
                           "--out", str(run), "--encoder", "litemedsam", "--frozen", "--epochs", "2",
                           "--batch-size", "2", "--lr", "1e-3", "--cache", str(cache), "--device", "cpu",
                           "--set", "views=[orig]", "--set", "model.seg_head.channels=[16,8]",
                           "--set", "curriculum={gt_until: 1, mixed_until: 1, p_gt: 0.5}"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "TMPDIR": str(run.parent)})  # torchrun's log folder (torchelastic_*) stays there


@pytest.mark.slow
def test_torchrun_ranks_stop_when_rank_0_cannot_build_the_cache(tiny_dataset, tmp_path):
    """Rank 0 alone builds the embedding cache; when it fails (here a missing mask) the other rank
    learns it and stops too with a message, instead of waiting at a barrier (NCCL: until its timeout;
    gloo: a traceback from the barrier once rank 0 has exited)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    missing = sorted((data / "masks").glob("*.png"))[0]
    missing.unlink()
    try:
        proc = _torchrun_two(data, tmp_path / "run", tmp_path / "cache", timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks did not stop within 180 s after rank 0 failed")
    assert proc.returncode != 0
    assert "mask file missing" in proc.stderr and missing.name in proc.stderr, proc.stderr[-3000:]
    assert "rank 0 could not build the embedding cache" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_dataset, tmp_path):
    """The same script under torchrun (gloo on CPU): ranks take equal shards (9 training samples do
    not split evenly), rank 0 alone logs and saves, and the result loads in the model package."""
    run = tmp_path / "ddp"
    proc = _torchrun_two(tiny_dataset, run, tmp_path / "cache", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((run / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2]  # one writer: no duplicated rows
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["val_dsc"] <= 1 for r in log)
    from model.io import read_image

    pred = Predictor.from_dir(run / "best", device="cpu")
    rec = load_records(tiny_dataset)[0]
    out = pred.predict_one(read_image(rec.image_path).array)
    assert out.mask.shape == read_image(rec.image_path).array.shape[:2] and (run / "state.pt").is_file()


def test_train_cli_says_when_no_epoch_had_a_defined_selection_metric(tmp_path, monkeypatch):
    """A run whose selection metric was NaN in every epoch (AUC on a one-class validation split)
    wrote no best/: the CLI says so and names last/, instead of 'best val_auc=-inf at epoch 0'."""
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: {"best": {"epoch": 0, "value": -float("inf"),
                                                                      "metric": "val_auc"}, "history": []})
    res = CliRunner().invoke(train_mod.main, ["--config", str(REPO / "training" / "configs" / "mgc-a.yaml"),
                                              "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "val_auc was undefined in every epoch" in res.output and "run/last" in res.output
    assert "-inf" not in res.output
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 evaluates, saves and reports
    res = CliRunner().invoke(train_mod.main, ["--config", str(REPO / "training" / "configs" / "mgc-a.yaml"),
                                              "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0 and res.output == ""


def test_ctrl_c_says_how_to_continue_the_run(tmp_path, monkeypatch):
    """Ctrl-C ended with click's bare 'Aborted!'; now it names state.pt and --resume where there is a
    finished epoch to continue, and says there is none otherwise."""
    def interrupted(*args, **kwargs):  # Ctrl-C during training
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    args = ["--config", str(REPO / "training" / "configs" / "sd-h.yaml"), "--data", str(tmp_path),
            "--out", str(tmp_path / "run"), "--device", "cpu"]
    res = CliRunner().invoke(train_mod.main, args)
    assert res.exit_code == 130 and "interrupted before an epoch ended: nothing to resume in" in res.output, res.output
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.pt").write_bytes(b"")
    res = CliRunner().invoke(train_mod.main, args)
    assert res.exit_code == 130 and "Aborted!" not in res.output, res.output
    assert (f"interrupted: {tmp_path / 'run' / 'state.pt'} holds the run's last finished epoch; continue it with the "
            "same command and --resume") in res.output


def test_a_run_with_undefined_metrics_writes_strict_json(tiny_dataset, cache_dir, tmp_path):
    """A validation split of benign images only: the macro AUC is undefined and no epoch is best.
    log.json, summary.json and last/config.json say so with null, which strict JSON parsers (and
    evaluate's metrics.json) accept, rather than Python's NaN and -Infinity."""
    import shutil

    def strict(path):
        return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path.name} holds {c}"))

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    labels = {r["image_id"]: r["label"] for r in csv.DictReader(open(data / "labels.csv"))}
    benign = [i for i, label in labels.items() if label == "benign"]
    with open(data / "split.csv", "w", newline="") as fh:
        fh.write("image_id,split\n" + "".join(f"{i},{'val' if i in benign[:2] else 'train'}\n" for i in labels))
    cfg = tiny_cfg("mgc-a", epochs=1)
    run = tmp_path / "run"
    result = train(cfg, data, run, "cpu", cache_dir, precision="fp32")
    row = result["history"][0]
    assert math.isnan(row["val_auc"]) and 0.0 <= row["val_dsc"] <= 1.0 and result["best"]["epoch"] == 0
    assert strict(run / "log.json")[0]["val_auc"] is None
    summary = strict(run / "summary.json")
    assert summary["best"] == {"epoch": 0, "value": None, "metric": "val_auc"} and summary["last"]["val_auc"] is None
    metrics = strict(run / "last" / "config.json")["provenance"]["metrics"]
    assert metrics["val_auc"] is None and metrics["val_dsc"] == pytest.approx(row["val_dsc"])
    assert not (run / "best").exists()


def test_a_run_that_fails_before_training_leaves_no_run_folder(tiny_dataset, tmp_path):
    """A missing encoder checkpoint is reported with the command that gets it, and the --out folder
    is not created (a folder without a run in it looks like a crashed run)."""
    res = CliRunner().invoke(train_mod.main, ["--config", str(REPO / "training" / "configs" / "sd-h.yaml"),
                                              "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
                                              "--encoder", "sam_vit_b", "--encoder-checkpoint",
                                              str(tmp_path / "sam_vit_b_01ec64.pth"), "--device", "cpu"])
    assert res.exit_code != 0
    assert "sam_vit_b_01ec64.pth: checkpoint not found; get it with: https://dl.fbaipublicfiles.com" in res.output
    assert not (tmp_path / "run").exists()


SD_H = (REPO / "training" / "configs" / "sd-h.yaml").read_text()
# (config text or None for sd-h.yaml, extra arguments, what the error says): each used to fail with a
# traceback, some after the run folder was written, or (select, --set optim.lrr) to run as not asked
CONFIG_FAULTS = {
    "typo": (SD_H.replace("batch_size:", "batchsize:"), [], "unknown config key 'batchsize': did you mean 'batch_size'?"),
    "select": (SD_H.replace("select: val_dsc", "select: val_dice"), [],
               "config key select is 'val_dice': not a metric the run computes; allowed: val_dsc, val_acc, val_auc"),
    "set_typo": (None, ["--set", "optim.lrr=5"], "unknown config key optim.lrr: did you mean optim.lr?"),
    "scheduler": (None, ["--set", "optim.scheduler=cosin"], "optim.scheduler is 'cosin'; allowed: constant, cosine"),
    "empty": ("", [], "not a config (a mapping of keys to values) but an empty file"),
    "malformed": ("model: {encoder: litemedsam\n  mode: frozen\n", [], "not a readable YAML config"),
    "set_without_value": (None, ["--set", "optim.lr"], "'optim.lr': give key=value"),
    "batch_size_0": (None, ["--batch-size", "0"], "Invalid value for '--batch-size': 0 is not in the range x>=1"),
    "precision": (None, ["--precision", "fp16"], "Invalid value for '--precision': 'fp16' is not one of"),
    "no_labels": (None, ["--data", "NOLABELS"], "labels.csv not found: prepare the data first"),
    # a class weight of 0 trained and exported an ensemble that could not be loaded; a negative one
    # failed in numpy after config.yaml was written
    **{f"class_weight_{v}": (None, ["--set", f"class_weights.normal={v}"],
                             f"config key class_weights.normal is {w}: give a positive finite number")
       for v, w in (("0", "0"), ("-1", "-1"), (".nan", "nan"), (".inf", "inf"), ("yes", "True"))},
    # tracebacks, some after the run folder was written, or (p_gt, the curriculum's order) silently accepted
    "encoder": (None, ["--encoder", "sam_vit_bb"], "Invalid value for '--encoder': 'sam_vit_bb' is not one of"),
    "seg_head_type": (None, ["--set", "model.seg_head.type=foo"],
                      "config key model.seg_head.type is 'foo'; allowed: sd-h, unet-h"),
    "seg_head_option": (None, ["--set", "model.seg_head.chanels=[64,32]"],
                        "unknown config key model.seg_head.chanels; sd-h takes type, channels, dropout"),
    "channels": (None, ["--set", "model.seg_head.channels=[64]"], "config key model.seg_head.channels is [64]: "
                 "give 2 channel counts, e.g. [128, 64] (sd-h takes 2; each 1 to 7 or a multiple of 8)"),
    "channels_norm": (None, ["--set", "model.seg_head.channels=[12,8]"], "channels is [12, 8]: give 2 channel"),
    "hidden": (None, ["--set", "model.cls_head.hidden=0"], "config key model.cls_head.hidden is 0: give a positive"),
    "lr": (None, ["--lr", "-1"], "--lr -1.0: config key optim.lr is -1.0: give a positive finite number"),
    "lr_nan": (None, ["--lr", "nan"], "--lr nan: config key optim.lr is nan: give a positive finite number"),
    "weight_decay": (None, ["--set", "optim.weight_decay=-0.1"], "optim.weight_decay is -0.1: give a finite number"),
    "loss_weights": (None, ["--set", "loss={seg_weight: 0, cls_weight: 0, eps: 1.0e-6}"],
                     "loss.seg_weight and loss.cls_weight are both 0: nothing would train"),
    "views_unknown": (None, ["--set", "views=[orig,foo]"],
                      "config key views is ['orig', 'foo']: unknown view 'foo'; allowed: orig, hflip, zoom, bright"),
    "views_empty": (None, ["--set", "views=[]"], "config key views is []: give a list of views from orig, hflip"),
    "views_first": (None, ["--set", "views=[hflip,orig]"],
                    "config key views is ['hflip', 'orig']: must start with orig (validation reads the first view"),
    "views_twice": (None, ["--set", "views=[orig,hflip,hflip]"], "a view is listed twice"),
    "p_gt": (None, ["--set", "curriculum.p_gt=1.5"], "config key curriculum.p_gt is 1.5: give a number from 0 to 1"),
    "curriculum_order": (None, ["--set", "curriculum={gt_until: 5, mixed_until: 2}"],
                         "config keys curriculum.gt_until (5) and curriculum.mixed_until (2): the ground-truth phase "
                         "must end no later than the mixed one"),
    "curriculum_text": (None, ["--set", "curriculum.gt_until=abc"], "curriculum.gt_until is 'abc': give a whole number"),
    "workers": (None, ["--workers", "-1"], "Invalid value for '--workers': -1 is not in the range x>=0"),
}
NAMED_SET = {"set_typo", "scheduler", "seg_head_type", "seg_head_option", "channels", "channels_norm", "hidden",
             "weight_decay", "loss_weights", "views_unknown", "views_empty", "views_first", "views_twice", "p_gt",
             "curriculum_order", "curriculum_text", *(f for f in CONFIG_FAULTS if f.startswith("class_weight_"))}


@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_config_and_option_faults_are_clear_errors_before_the_run_folder(tiny_dataset, tmp_path, fault):
    text, extra, message = CONFIG_FAULTS[fault]
    config = REPO / "training" / "configs" / "sd-h.yaml"
    if text is not None:
        config = tmp_path / "c.yaml"
        config.write_text(text)
    data = tiny_dataset
    if "NOLABELS" in extra:
        data, extra = tmp_path / "data", []
        data.mkdir()
        (data / "split.csv").write_text("image_id,split\n")
    res = CliRunner().invoke(train_mod.main, ["--config", str(config), "--data", str(data), "--out",
                                              str(tmp_path / "run"), "--encoder", "litemedsam", "--device", "cpu",
                                              "--epochs", "1", *extra])
    assert res.exit_code in (1, 2) and isinstance(res.exception, SystemExit), res.output
    assert message in res.output, res.output
    if text is not None:
        assert str(config) in res.output
    if fault in NAMED_SET:  # the value came from --set, not from the config file
        assert f"--set {extra[1]}: " in res.output and str(config) not in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_an_unknown_encoder_in_the_config_file_is_named_with_the_file(tiny_dataset, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(SD_H.replace("encoder: sam_vit_b", "encoder: sam_vit_bb"))
    res = CliRunner().invoke(train_mod.main, ["--config", str(config), "--data", str(tiny_dataset), "--out",
                                              str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert (f"{config}: config key model.encoder is 'sam_vit_bb'; allowed: sam_vit_b, sam_vit_l, sam_vit_h, "
            "medsam_vit_b, litemedsam") in res.output, res.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--precision", "foo"], "Invalid value for '--precision': 'foo' is not one of 'auto', 'bf16', 'fp32'"),
    (["--views", "orig,flip"], "Invalid value for '--views': 'orig,flip' (['orig', 'flip']: unknown view 'flip'; "
                               "allowed: orig, hflip, zoom, bright)"),
    (["--views", "hflip"], "must start with orig"),
    (["--encoder", "sam_vit_bb"], "Invalid value for '--encoder': 'sam_vit_bb' is not one of"),
    (["--batch-size", "0"], "Invalid value for '--batch-size': 0 is not in the range x>=1"),
])
def test_cache_cli_refuses_bad_options_before_anything_is_built(tiny_dataset, tmp_path, args, message):
    """training.cache --precision foo and --views orig,flip ended in tracebacks (in-process: click's own
    usage error, exit 2; test_cache_limit_builds_what_train_limit_reads runs the module as a command)."""
    res = CliRunner().invoke(tc.main, ["--data", str(tiny_dataset), "--cache", str(tmp_path / "cache"),
                                       "--device", "cpu", *args])
    assert res.exit_code == 2 and message in res.stderr and res.exception.__class__ is SystemExit, res.output
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_is_a_clear_error(tiny_dataset, tmp_path):
    for device in ("cuda", "cuda:0"):  # model.predictor.resolve_device refuses both
        res = CliRunner().invoke(train_mod.main, ["--config", str(REPO / "training" / "configs" / "sd-h.yaml"),
                                                  "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
                                                  "--device", device])
        assert res.exit_code == 2 and "no CUDA GPU is available" in res.output and not (tmp_path / "run").exists()


def test_config_keys_of_the_users_own_are_kept_and_every_shipped_config_passes(capsys):
    """Only keys training reads are checked: notes of one's own (not close to a key) are kept."""
    from training.config import check_config

    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        assert check_config(load_config(path, {})) == [], path
    assert check_config(load_config(REPO / "training" / "configs" / "sd-h.yaml", {"notes": "x", "trial": 2})) == \
        ["notes", "trial"]


def test_views_on_the_fly_are_random_per_draw_and_reproducible(tiny_dataset):
    """Fine-tuning (no cache): each draw of zoom or bright gets its own parameters from (seed, epoch,
    position), the same again for the same draw (resume, other workers); the mask is cropped with
    the image; the fixed views (the cache's) are unchanged by the seed; validation stays fixed."""
    from training.augment import apply_view
    from training.train import ImageSet, view_seed

    recs = [r for r in load_records(tiny_dataset, "train") if r.label != "normal"]
    views = ["orig", "hflip", "zoom", "bright"]
    rand = ImageSet(recs, views, 256, "minmax", random_seed=0)
    fixed = ImageSet(recs, views, 256, "minmax")
    for v in (2, 3):
        a, b, again = rand[(0, v, 1, 5)], rand[(0, v, 1, 6)], rand[(0, v, 1, 5)]
        assert not torch.equal(a["x"], b["x"])  # two draws differ
        assert torch.equal(a["x"], again["x"]) and torch.equal(a["mask"], again["mask"])  # the same draw repeats
        assert not torch.equal(a["x"], fixed[(0, v, 1, 5)]["x"])
        assert torch.equal(fixed[(0, v, 1, 5)]["x"], fixed[(0, v)]["x"])  # fixed views ignore the draw
        assert torch.equal(rand[(0, v)]["x"], fixed[(0, v)]["x"])  # no draw (validation): fixed
    for v in (0, 1):  # orig and flip have nothing to draw
        assert torch.equal(rand[(0, v, 1, 5)]["x"], fixed[(0, v)]["x"])
    frozen, tuned = tiny_cfg("sd-h"), tiny_cfg("sd-h")
    tuned["model"]["mode"] = "finetuned"
    assert view_seed(tuned, build_model(tuned)) == tuned["seed"]
    assert view_seed(frozen, build_model(frozen)) is None  # a frozen encoder: the cache's views, cached or not
    assert view_seed(dict(tuned, augment="fixed"), build_model(tuned)) is None
    image, mask = load_pair(recs[0])
    assert mask.any()
    rng = np.random.default_rng(7)
    for _ in range(20):  # a random crop keeps image and mask aligned, within the configured range
        img_c, m_c = apply_view(image, mask, "zoom", rng)
        assert img_c.shape[:2] == m_c.shape and 0.74 * mask.shape[0] <= m_c.shape[0] <= 0.96 * mask.shape[0]
        y = next(y0 for y0 in range(mask.shape[0] - m_c.shape[0] + 1)
                 for x0 in range(mask.shape[1] - m_c.shape[1] + 1)
                 if np.array_equal(image[y0:y0 + m_c.shape[0], x0:x0 + m_c.shape[1]], img_c)
                 and np.array_equal(mask[y0:y0 + m_c.shape[0], x0:x0 + m_c.shape[1]], m_c))
        assert y is not None and m_c.sum() == mask.sum()  # the lesion is never cropped away


def test_a_cache_given_to_a_fine_tuning_run_is_named_as_unused(tiny_dataset, tmp_path, capsys):
    """--cache with a fine-tuned encoder was ignored without a word (the run encodes every image on the fly)."""
    cfg = tiny_cfg("sd-h", epochs=0)
    cfg["model"]["mode"] = "finetuned"
    train(cfg, tiny_dataset, tmp_path / "run", "cpu", tmp_path / "cache", precision="fp32")
    err = capsys.readouterr().err
    assert f"note: --cache {tmp_path / 'cache'} is not used: the encoder is fine-tuned" in err, err
    assert not (tmp_path / "cache").exists()
    train(tiny_cfg("sd-h", epochs=0), tiny_dataset, tmp_path / "frozen", "cpu", None, precision="fp32")
    assert "is not used" not in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tuning_with_random_views_resumes_to_the_same_weights(tiny_dataset, tmp_path):
    """The on-the-fly path (encoder fine-tuned, no cache) with random views: a run stopped after epoch
    1 and resumed ends with the weights of the uninterrupted run, and the encoder did train.

    Equal to within float rounding, not bit for bit: fine-tuning the encoder runs CPU kernels whose
    summation order can follow the memory alignment of their buffers (seen once in about ten runs
    on this machine, under load, and once in CI on a host without AVX-512). Adam turns such a
    rounding difference in a near-zero gradient into a step of about lr, so element-wise tolerances
    break; the whole weight vector is compared instead. The run with the fixed views (another
    draw) lies at 0.41 of the weights' change from the start (measured), the resumed one at 0
    (bit for bit) or, with a rounding difference, must stay below a tenth of the other draw's
    distance."""
    cfg = tiny_cfg("sd-h", epochs=2)
    cfg["model"]["mode"] = "finetuned"
    cfg["views"] = ["orig", "hflip", "zoom", "bright"]
    cfg["class_weights"] = {"normal": 3.0, "benign": 1.0, "malignant": 3.0}  # draws of zoom and bright
    straight, broken, fixed = tmp_path / "straight", tmp_path / "broken", tmp_path / "fixed"
    train(cfg, tiny_dataset, straight, "cpu", None, precision="fp32")
    train(cfg, tiny_dataset, broken, "cpu", None, precision="fp32", stop_after=1)
    train(cfg, tiny_dataset, broken, "cpu", None, precision="fp32", resume=True)
    train(dict(cfg, augment="fixed"), tiny_dataset, fixed, "cpu", None, precision="fp32")
    a, b, f = (load_file(str(run / "last" / "model.safetensors")) for run in (straight, broken, fixed))
    assert a.keys() == b.keys() and any(k.startswith("encoder.") for k in a)

    def distance(x, y):
        return float(sum(((x[k] - y[k]).double() ** 2).sum() for k in x if x[k].is_floating_point()) ** 0.5)

    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())  # batch-norm step counts
    assert distance(a, f) > 0 and distance(a, b) < 0.1 * distance(a, f), (distance(a, b), distance(a, f))
    assert not all(torch.allclose(a[k], f[k], rtol=1e-4, atol=1e-6) for k in a)
    start = build_model(cfg).state_dict()
    assert not torch.equal(start["encoder.neck.0.weight"], a["encoder.neck.0.weight"])


def test_curriculum_draws_replay_per_epoch_and_differ_between_torchrun_ranks():
    """Every rank drew the mixed phase's ground-truth-or-prediction picks with the same generator, so
    the picks of rank 0's k-th sample were those of every rank's k-th sample; now each rank draws its
    own, one process draws as before (seed * 1000 + epoch), and a resumed epoch draws the same."""
    from training.curriculum import curriculum_generator, guide_masks

    gt, pred = torch.ones(64, 8, 8), torch.full((64, 1, 8, 8), -20.0)  # sigmoid(-20) ~ 0: tells them apart

    def picks(gen):
        return guide_masks("mixed", gt, pred, 0.5, gen)[:, 0, 0, 0].round().bool().tolist()

    one = picks(curriculum_generator(3, 25))
    assert one == picks(torch.Generator().manual_seed(3 * 1000 + 25)) == picks(curriculum_generator(3, 25))
    ranks = [picks(curriculum_generator(3, 25, rank, 2)) for rank in (0, 1)]
    assert ranks[0] != ranks[1] and ranks[0] == picks(curriculum_generator(3, 25, 0, 2))
    assert 16 < sum(ranks[0]) < 48 and 16 < sum(ranks[1]) < 48  # about half ground truth on each


def _reference_loss(logits: np.ndarray, target: np.ndarray, class_logits: np.ndarray, labels: np.ndarray,
                    eps: float = 1e-6) -> dict:
    """The paper's loss in float64 numpy, written out from its formula (not from training.losses)."""
    x, g = logits.astype(np.float64), target.astype(np.float64)
    bce = float(np.mean(np.maximum(x, 0) - x * g + np.log1p(np.exp(-np.abs(x)))))  # BCE on the logits
    p = (1 / (1 + np.exp(-x))).reshape(len(x), -1)
    gf = g.reshape(len(g), -1)
    dice = float(np.mean(1 - (2 * (p * gf).sum(1) + eps) / (p.sum(1) + gf.sum(1) + eps)))
    z = class_logits.astype(np.float64)
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    ce = float(-np.mean(logp[np.arange(len(z)), labels]))
    return {"loss": 0.6 * (bce + dice) + 0.4 * ce, "seg": bce + dice, "bce": bce, "dice": dice, "ce": ce}


def test_loss_is_the_papers_weighted_bce_dice_and_ce():
    """0.6 * (BCE + Dice) + 0.4 * CE on a malignant and a normal synthetic image: BCE on the logits
    (a confidently wrong pixel costs its logit, not the 100 a clamped log of a probability gives),
    Dice per image with eps = 1e-6, averaged over the batch (the normal image's empty mask gives
    1 - eps / (sum(p) + eps), far from 0 even for a nearly empty prediction), CE on the class logits."""
    from synthetic import make_ultrasound

    masks = np.stack([make_ultrasound(48, 64, lesion=True, seed=3, malignant=True)[1],
                      make_ultrasound(48, 64, lesion=False, seed=4)[1]]).astype(np.float32)
    assert masks[0].any() and not masks[1].any()
    rng = np.random.default_rng(0)
    logits = np.where(masks > 0, 3.0, -3.0) + rng.normal(0, 2, masks.shape)
    logits[0, :4] = 40.0  # confidently wrong: background called lesion (sigmoid(40) == 1.0 in float32)
    logits[1] = -20.0  # the normal image: nearly empty, sum(p) ~ 6e-6, comparable to eps
    class_logits = np.array([[0.2, -1.0, 2.5], [1.5, 0.3, -0.7]], np.float32)
    labels = np.array([2, 0])
    got = multitask_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(masks),
                         torch.tensor(class_logits), torch.tensor(labels))
    want = _reference_loss(logits.astype(np.float32), masks, class_logits, labels)
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-4), (key, float(got[key]), value)
    normal_dice = _reference_loss(logits[1:].astype(np.float32), masks[1:], class_logits[1:], labels[1:])["dice"]
    assert 0.1 < normal_dice < 0.9  # eps decides this value: it is not simply 0 or 1
    # a perfect, confident prediction costs (almost) nothing for the mask
    perfect = multitask_loss(torch.tensor(np.where(masks > 0, 30.0, -30.0), dtype=torch.float32), torch.tensor(masks),
                             torch.tensor(class_logits), torch.tensor(labels))
    assert float(perfect["bce"]) < 1e-6 and float(perfect["dice"]) < 0.05


def test_the_paper_configs_use_the_papers_loss_and_optimiser_settings():
    """training/configs/{sd-h,mgc-a}.yaml are the paper's runs: loss 0.6 / 0.4 with eps 1e-6, Adam at
    lr 1e-4 without weight decay, 60 epochs; every shipped config keeps the paper's loss."""
    for variant in ("sd-h", "mgc-a"):
        cfg = load_config(REPO / "training" / "configs" / f"{variant}.yaml", {})
        assert cfg["loss"] == {"seg_weight": 0.6, "cls_weight": 0.4, "eps": 1e-6}, variant
        assert cfg["optim"]["lr"] == 1e-4 and cfg["optim"].get("weight_decay", 0) == 0 and cfg["epochs"] == 60
    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        assert load_config(path, {})["loss"] == {"seg_weight": 0.6, "cls_weight": 0.4, "eps": 1e-6}, path


def test_guide_masks_of_each_phase():
    """gt: the ground truth; pred: the sigmoid of the prediction, detached (the classifier's loss
    does not train the segmentation head through its guide); mixed: per image either the ground
    truth (with probability p_gt) or the prediction, never a blend."""
    from synthetic import make_ultrasound
    from training.curriculum import guide_masks

    gt = torch.tensor(np.stack([make_ultrasound(32, 40, seed=s)[1] for s in range(200)]), dtype=torch.float32)
    logits = torch.full((200, 1, 32, 40), -1.0, requires_grad=True)  # sigmoid 0.27: neither 0 nor 1
    assert torch.equal(guide_masks("gt", gt, logits, 0.5, None), gt[:, None])
    pred = guide_masks("pred", gt, logits, 0.5, None)
    assert torch.allclose(pred, torch.sigmoid(logits)) and not pred.requires_grad

    def gt_share(p_gt):
        out = guide_masks("mixed", gt, logits, p_gt, torch.Generator().manual_seed(1))
        is_gt = [torch.equal(o, g[None]) for o, g in zip(out, gt)]
        is_pred = [torch.allclose(o, torch.sigmoid(lg)) for o, lg in zip(out, logits)]
        assert all(a != b for a, b in zip(is_gt, is_pred))  # each image one or the other
        return sum(is_gt) / len(is_gt)

    assert gt_share(1.0) == 1 and gt_share(0.0) == 0
    assert 0.8 < gt_share(0.9) < 0.97 and 0.03 < gt_share(0.1) < 0.2


def test_fixed_views_and_the_views_each_class_draws_from(tiny_dataset):
    """The cache's fixed views: hflip mirrors image and mask together, zoom is the central 85 % (7.5 %
    off each side), bright is gamma 0.8 and gain 1.1 (brighter). The paper's class rule: normal
    images draw from every view (strong), malignant from orig/hflip/zoom (milder), benign flips only."""
    from training.augment import apply_view, class_views

    recs = [r for r in load_records(tiny_dataset, "train") if r.label == "malignant"]
    image, mask = load_pair(recs[0])
    h, w = mask.shape
    img_f, m_f = apply_view(image, mask, "hflip")
    assert np.array_equal(img_f, image[:, ::-1]) and np.array_equal(m_f, mask[:, ::-1])
    assert not np.array_equal(m_f, mask)  # the lesion is off the vertical midline: the flip moves it
    img_z, m_z = apply_view(image, mask, "zoom")
    dh, dw = int(h * 0.075), int(w * 0.075)
    assert np.array_equal(img_z, image[dh:h - dh, dw:w - dw]) and np.array_equal(m_z, mask[dh:h - dh, dw:w - dw])
    img_b, m_b = apply_view(image, mask, "bright")
    scaled = (image.astype(np.float32) - image.min()) / (image.max() - image.min())
    want = (np.clip(scaled ** 0.8 * 1.1, 0, 1) * 255).astype(np.uint8)
    assert np.abs(img_b.astype(int) - want.astype(int)).max() <= 1 and m_b is mask
    assert img_b.mean() > image.mean() + 10
    assert class_views(["orig", "hflip", "zoom", "bright"]) == {"normal": [0, 1, 2, 3], "malignant": [0, 1, 2],
                                                                 "benign": [0, 1]}
    assert class_views(["orig", "bright"]) == {"normal": [0, 1], "malignant": [0], "benign": [0]}


def test_random_zoom_keeps_the_lesion_and_the_aspect_and_can_show_every_part_of_the_image():
    """Fine-tuning's zoom: a crop of 75-95 % of each side (the same share of both: the aspect ratio
    stays), its place random but never cutting off a lesion near an edge or a corner, centred on a
    lesion larger than the crop; without a lesion every position is drawn, up to each edge."""
    from training.augment import apply_view

    h, w = 60, 100
    image = np.arange(h * w, dtype=np.int32).reshape(h, w)  # each pixel its own value: where a crop lies

    def draws(mask: np.ndarray, n: int = 300, seed: int = 0):
        rng = np.random.default_rng(seed)
        for _ in range(n):
            img_c, m_c = apply_view(image, mask, "zoom", rng)
            y0, x0 = divmod(int(img_c[0, 0]), w)
            ch, cw = m_c.shape
            assert np.array_equal(img_c, image[y0:y0 + ch, x0:x0 + cw]) and np.array_equal(
                m_c, mask[y0:y0 + ch, x0:x0 + cw])
            yield y0, x0, ch, cw, m_c

    empty = np.zeros((h, w), np.uint8)
    seen = list(draws(empty))
    keep = [ch / h for _, _, ch, _, _ in seen]
    assert 0.74 <= min(keep) < 0.8 and 0.9 < max(keep) <= 0.96  # the size is drawn over the range
    assert all(abs(ch / h - cw / w) <= 0.5 / h + 0.5 / w for _, _, ch, cw, _ in seen)  # the aspect ratio kept
    assert any(y0 == 0 for y0, *_ in seen) and any(y0 + ch == h for y0, _, ch, _, _ in seen)
    assert any(x0 == 0 for _, x0, *_ in seen) and any(x0 + cw == w for _, x0, _, cw, _ in seen)

    for rows, cols in ((slice(0, 5), slice(95, 100)), (slice(50, 60), slice(0, 12)), (slice(40, 58), slice(3, 9)),
                       (slice(2, 10), slice(60, 99))):
        mask = empty.copy()
        mask[rows, cols] = 1
        assert all(m_c.sum() == mask.sum() for *_, m_c in draws(mask, 200, seed=rows.start)), (rows, cols)
    big = empty.copy()
    big[2:60, 10:20] = 1  # 58 rows: more than any crop holds (57 at most)
    for y0, _, ch, _, m_c in draws(big, 50):
        if ch < 58:
            assert abs(y0 + ch / 2 - 31) <= 0.5 and m_c.sum() == ch * 10  # centred on rows 2..59, all its columns
    with pytest.raises(ValueError, match="unknown view 'zooom'"):
        apply_view(image, empty, "zooom")
    assert all(a is b for a, b in zip(apply_view(image, empty, "orig"), (image, empty)))


def test_random_brightness_draws_gamma_and_gain_over_their_ranges():
    """Fine-tuning's bright view: out = (scaled ** gamma) * gain, gamma log-uniform in 0.7-1.4 and gain
    in 0.9-1.15 (augment.GAMMA, GAIN); both fitted back from the output of a grey ramp, over 60 draws."""
    from training.augment import GAIN, GAMMA, apply_view

    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    s = ramp[0].astype(np.float64) / 255
    rng = np.random.default_rng(0)
    fitted = []
    for _ in range(60):
        out, mask = apply_view(ramp, np.zeros(ramp.shape, np.uint8), "bright", rng)
        assert out.dtype == np.uint8 and not mask.any()
        y = (out[0].astype(np.float64) + 0.5) / 255  # the uint8 conversion floors
        use = (out[0] >= 30) & (out[0] <= 240)  # neither clipped nor too coarse
        gamma, log_gain = np.polyfit(np.log(s[use]), np.log(y[use]), 1)
        fitted.append((gamma, np.exp(log_gain)))
    gammas, gains = np.array(fitted).T
    assert GAMMA[0] - 0.03 <= gammas.min() < 0.8 and 1.25 < gammas.max() <= GAMMA[1] + 0.03, gammas
    assert GAIN[0] - 0.02 <= gains.min() < 0.95 and 1.1 < gains.max() <= GAIN[1] + 0.02, gains


def test_cache_encodes_each_view_for_the_classes_that_draw_it(tiny_dataset, tmp_path):
    """training.cache passes views_for_classes: a view is encoded only for the training images of the
    classes that sample it (bright: normal only, zoom: normal and malignant), none for benign."""
    from training.cache import views_for_classes

    views = ["orig", "zoom", "bright"]
    assert views_for_classes(views) == {"orig": ["normal", "malignant", "benign"], "zoom": ["normal", "malignant"],
                                        "bright": ["normal"]}
    model = build_model(tiny_cfg("sd-h"))
    records = [next(r for r in load_records(tiny_dataset, "train") if r.label == c) for c in ("normal", "benign",
                                                                                               "malignant")]
    cache = build_cache(model, records, tmp_path, views, torch.device("cpu"), "fp32",
                        view_classes=views_for_classes(views))
    done = {r.label: cache.done[cache.index[r.image_id]].tolist() for r in records}
    assert done == {"normal": [1, 1, 1], "benign": [1, 0, 0], "malignant": [1, 1, 0]}


def test_cache_key_follows_what_each_view_computes(monkeypatch):
    """The key's preprocessing fingerprint runs every view, not only the first: a change of what the
    zoom view computes starts a new cache for a config with zoom, not for one without."""
    model = build_model(tiny_cfg("sd-h"))
    with_zoom, without = cache_key(model, ["orig", "zoom"], "fp32", False), cache_key(model, ["orig"], "fp32", False)
    real = tc.apply_view
    monkeypatch.setattr(tc, "apply_view", lambda img, m, view: real(img, m, "hflip" if view == "zoom" else view))
    assert cache_key(model, ["orig", "zoom"], "fp32", False) != with_zoom
    assert cache_key(model, ["orig"], "fp32", False) == without


def test_rng_state_round_trip_restores_pythons_random_too():
    """state.pt's RNG states: torch's and Python's ``random`` both continue where the run left them."""
    import random

    from training.run_state import get_rng_state, set_rng_state

    torch.manual_seed(5)
    random.seed(5)
    state = get_rng_state()
    expected = (torch.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(6)
    random.seed(6)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and [random.random() for _ in range(3)] == expected[1]
