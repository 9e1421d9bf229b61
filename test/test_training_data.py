"""The prepared dataset as training and evaluation read it: labels.csv labels (one parser for both)
and masks (a missing one is an error naming the file, never an empty lesion)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from model.io import ImageReadError
from synthetic import make_prepared_dataset
from training import evaluate as E
from training.datasets import DataError, load_pair, load_records, parse_label

REPO = Path(__file__).resolve().parents[1]


def _relabel(data: Path, image_id: str, label: str) -> None:
    path = data / "labels.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        if row["image_id"] == image_id:
            row["label"] = label
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def data(tmp_path) -> Path:
    return make_prepared_dataset(tmp_path / "data", n_per_class=2)


@pytest.mark.parametrize("image_id", ["PACE_00003_001_BUS", "PACE_00001_000_BUS"])  # lesion and normal
def test_a_missing_mask_is_an_error_naming_the_file(data, image_id):
    rec = next(r for r in load_records(data) if r.image_id == image_id)
    assert load_pair(rec)[1].shape == (96, 128)
    (data / "masks" / f"{image_id}.png").unlink()
    with pytest.raises(ImageReadError, match="mask file missing") as err:
        load_pair(rec)
    assert err.value.path == str(data / "masks" / f"{image_id}.png")


def test_labels_are_read_alike_by_training_and_evaluation(data):
    _relabel(data, "PACE_00003_001_BUS", " Benign ")
    _relabel(data, "PACE_00005_002_BUS", "MALIGNANT")
    train_labels = {r.image_id: r.label for r in load_records(data)}
    eval_labels = {r["image_id"]: r["label"] for r in E.load_truth(data, "all")}
    assert train_labels == eval_labels
    assert train_labels["PACE_00003_001_BUS"] == "benign" and train_labels["PACE_00005_002_BUS"] == "malignant"
    assert [r.label_index for r in load_records(data) if r.image_id == "PACE_00003_001_BUS"] == [1]


@pytest.mark.parametrize("bad", ["benignn", "", "2"])
def test_an_unknown_label_names_the_file_the_line_and_the_allowed_labels(data, bad):
    _relabel(data, "PACE_00002_000_BUS", bad)  # the second row: line 3
    pattern = rf"labels\.csv, line 3 \(PACE_00002_000_BUS\): unknown label '{bad}'; allowed: normal, benign, malignant"
    with pytest.raises(DataError, match=pattern):
        load_records(data, "train")
    with pytest.raises(DataError, match=pattern):
        E.load_truth(data, "val")
    assert str(data / "labels.csv") in str(pytest.raises(DataError, load_records, data).value)


def test_train_cli_reports_a_bad_label_without_a_traceback(data, tmp_path):
    from training.train import main

    _relabel(data, "PACE_00002_000_BUS", "lesion")
    res = CliRunner().invoke(main, ["--config", str(REPO / "training" / "configs" / "sd-h.yaml"), "--data", str(data),
                                    "--out", str(tmp_path / "run"), "--encoder", "litemedsam", "--device", "cpu"])
    assert res.exit_code == 1 and "Error: " in res.output and "unknown label 'lesion'" in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_parse_label_accepts_any_case_and_spaces_only():
    assert [parse_label(v, "labels.csv", 2, "x") for v in ("Normal", " benign", "MALIGNANT\t")] == \
        ["normal", "benign", "malignant"]
    with pytest.raises(DataError, match="unknown label None"):
        parse_label(None, "labels.csv", 2, "x")


def test_padded_ids_and_splits_in_hand_edited_csvs_are_read_alike(data):
    """A spreadsheet may pad cells: ' PACE_… ' and ' Val' still name the image and the split, for
    training and evaluation alike."""
    before = {r.image_id: r.split for r in load_records(data)}
    for name in ("labels.csv", "split.csv"):
        path = data / name
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            row["image_id"] = f" {row['image_id']}  "
            if "split" in row:
                row["split"] = f" {row['split'].capitalize()}"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    assert {r.image_id: r.split for r in load_records(data)} == before
    assert sorted(r["image_id"] for r in E.load_truth(data, "val")) == \
        sorted(i for i, s in before.items() if s == "val") != []
    assert all(r.image_path.is_file() for r in load_records(data, "train"))


def test_cache_cli_reports_a_missing_mask_without_a_traceback(data, tmp_path):
    (data / "masks" / "PACE_00003_001_BUS.png").unlink()
    res = subprocess.run([sys.executable, "-m", "training.cache", "--data", str(data), "--cache", str(tmp_path / "c"),
                          "--views", "orig", "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 1, res.stderr
    assert "Error: " in res.stderr and "PACE_00003_001_BUS.png" in res.stderr and "mask file missing" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr
