"""The prepared dataset as training and evaluation read it: labels.csv labels (one parser for both)
and masks (a missing one is an error naming the file, never an empty lesion)."""
from __future__ import annotations

import csv
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
    import training.cache

    (data / "masks" / "PACE_00003_001_BUS.png").unlink()
    res = CliRunner().invoke(training.cache.main, ["--data", str(data), "--cache", str(tmp_path / "c"),
                                                   "--views", "orig", "--device", "cpu"])
    assert res.exit_code == 1 and res.exception.__class__ is SystemExit, res.output  # no traceback
    assert "Error: " in res.stderr and "PACE_00003_001_BUS.png" in res.stderr and "mask file missing" in res.stderr


def _edit(data: Path, name: str, text_of) -> None:
    """Rewrite data/name with text_of(its text)."""
    path = data / name
    path.write_text(text_of(path.read_text()))


# (file, edit of its text, the error's message): rows that used to drop out of training unseen
SPLIT_AND_LABEL_FAULTS = {
    "typo": ("split.csv", lambda t: t.replace("PACE_00003_001_BUS,train", "PACE_00003_001_BUS,trian"),
             r"split\.csv, line 4 \(PACE_00003_001_BUS\): unknown split 'trian'; allowed: train, val"),
    "split_row_twice": ("split.csv", lambda t: t + "PACE_00001_000_BUS,val\n",
                        r"split\.csv, line 8: PACE_00001_000_BUS is listed again \(first on line 2\)"),
    "label_row_twice": ("labels.csv", lambda t: t + t.splitlines()[1] + "\n",
                        r"labels\.csv, line 8: PACE_00001_000_BUS is listed again \(first on line 2\)"),
    "no_split_row": ("split.csv", lambda t: t.replace("PACE_00003_001_BUS,train\n", ""),
                     r"labels\.csv, line 4: PACE_00003_001_BUS has no row in .*split\.csv"),
    "unknown_id": ("split.csv", lambda t: t + "PACE_09999_001_BUS,train\n",
                   r"split\.csv: 1 image id\(s\) not in .*labels\.csv: PACE_09999_001_BUS"),
    "no_split_column": ("split.csv", lambda t: t.replace("image_id,split", "image_id,fold"),
                        r"split\.csv: no split column \(header: image_id,fold\)"),
    "no_id_column": ("labels.csv", lambda t: t.replace("image_id,", "id,", 1),
                     r"labels\.csv: no image_id column"),
    "split_row_without_id": ("split.csv", lambda t: t.replace("PACE_00003_001_BUS,train", " ,train"),
                             r"split\.csv, line 4: no image_id"),
    "label_row_without_id": ("labels.csv", lambda t: t.replace("PACE_00003_001_BUS,benign", ",benign"),
                             r"labels\.csv, line 4: no image_id"),
}


@pytest.mark.parametrize("fault", sorted(SPLIT_AND_LABEL_FAULTS))
def test_rows_of_labels_and_split_that_do_not_match_are_errors_naming_the_file_and_id(data, fault):
    name, edit, message = SPLIT_AND_LABEL_FAULTS[fault]
    _edit(data, name, edit)
    with pytest.raises(DataError, match=message):
        load_records(data, "train")


@pytest.mark.parametrize("side", ["train", "val"])
def test_train_cli_refuses_an_empty_split_before_making_the_run_folder(data, tmp_path, side):
    """An empty val split used to fail after a whole epoch (and leave a run folder), an empty train
    split with 'Probabilities do not sum to 1'."""
    from training.train import main

    other = "val" if side == "train" else "train"
    _edit(data, "split.csv", lambda t: t.replace(f",{side}\n", f",{other}\n"))
    res = CliRunner().invoke(main, ["--config", str(REPO / "training" / "configs" / "default-sd-h.yaml"),
                                    "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"{data / 'split.csv'}: no {side} images (of the 6 listed" in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_split_without_images(data, tmp_path):
    _edit(data, "split.csv", lambda t: t.replace(",val\n", ",train\n"))
    res = CliRunner().invoke(E.main, ["--pred", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"{data / 'split.csv'}: no val images; nothing to evaluate" in res.output


@pytest.mark.parametrize("cli", ["predict", "tune"])
def test_predict_and_tune_report_a_missing_labels_csv_without_a_traceback(data, tmp_path, cli):
    from training import predict, tune

    (data / "labels.csv").unlink()
    args = ["--model-dir", str(tmp_path), "--data", str(data)] + (["--out", str(tmp_path / "p")] if cli == "predict" else [])
    res = CliRunner().invoke({"predict": predict.main, "tune": tune.main}[cli], args)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"{data / 'labels.csv'} not found: prepare the data first" in res.output


def test_limit_takes_each_class_in_turn_so_a_quick_run_sees_every_class():
    """--limit N took the first N images by id: on BUSI prepared by training.prepare the first 32
    training and 8 validation images were all benign (a smoke run had nothing to classify and no AUC)."""
    from training.datasets import Record, first_of_each_class, limit_records

    def rec(i: int, label: str) -> Record:
        return Record(f"PACE_{i:05d}_000_BUS", label, "BUS", "train", Path("i.png"), Path("m.png"))

    # the ids of one class first, as prepare numbers BUSI's folders
    recs = [rec(i, "benign") for i in range(10)] + [rec(10 + i, "malignant") for i in range(3)] + \
        [rec(20 + i, "normal") for i in range(2)]
    six = first_of_each_class(recs, 6)
    assert [r.image_id for r in six] == sorted(r.image_id for r in six)  # by id
    assert sorted(r.label for r in six) == ["benign"] * 2 + ["malignant"] * 2 + ["normal"] * 2
    assert {r.image_id for r in six if r.label == "benign"} == {recs[0].image_id, recs[1].image_id}  # a class's first
    twelve = [r.label for r in first_of_each_class(recs, 12)]  # normal and malignant run out: benign fills up
    assert (twelve.count("normal"), twelve.count("malignant"), twelve.count("benign")) == (2, 3, 7)
    assert first_of_each_class(recs, 99) == sorted(recs, key=lambda r: r.image_id)
    assert first_of_each_class(recs, None) is recs
    train, val = limit_records(recs, recs[::-1], 8)  # N/4 validation images, at least one per class
    assert len(train) == 8 and sorted(r.label for r in val) == ["benign", "malignant", "normal"]
    assert len(limit_records(recs, recs, 20)[1]) == 5
    # labels.csv rows (training.evaluate) take the same images as records (training.predict)
    rows = [{"image_id": r.image_id, "label": r.label} for r in reversed(recs)]
    picked = first_of_each_class(rows, 5, label=lambda r: r["label"], image_id=lambda r: r["image_id"])
    assert [r["image_id"] for r in picked] == [r.image_id for r in first_of_each_class(recs, 5)]


@pytest.mark.slow  # prepares the whole of BUSI: 15 s on the slowest host
@pytest.mark.real_data
def test_limit_on_prepared_busi_holds_every_class(shared_data, tmp_path):
    from collections import Counter

    from training.datasets import limit_records
    from training.prepare import prepare

    prepare({"busi": shared_data / "BUSI"}, tmp_path / "data")
    train, val = limit_records(load_records(tmp_path / "data", "train"), load_records(tmp_path / "data", "val"), 32)
    assert Counter(r.label for r in train) != Counter(r.label for r in load_records(tmp_path / "data", "train")[:32])
    assert set(Counter(r.label for r in train)) == set(Counter(r.label for r in val)) == {"normal", "benign", "malignant"}


def test_load_pair_gives_a_0_1_mask_of_the_images_size(data):
    """The mask as uint8 {0, 1} whatever its file holds (0/255 grey, or RGB); one of another size is an
    error naming the file, never stretched or cut to fit."""
    import numpy as np

    from model.atomic_files import write_png
    from model.io import read_image

    rec = next(r for r in load_records(data) if r.label == "malignant")
    stored = read_image(rec.mask_path).array
    image, mask = load_pair(rec)
    assert mask.dtype == np.uint8 and mask.shape == image.shape[:2] and set(np.unique(mask).tolist()) == {0, 1}
    assert np.array_equal(mask, (stored > 0).astype(np.uint8))
    write_png(rec.mask_path, np.dstack([stored] * 3))
    assert np.array_equal(load_pair(rec)[1], mask)
    write_png(rec.mask_path, stored[:, :-1])
    with pytest.raises(ImageReadError, match=r"mask \(96, 127\) does not match image \(96, 128\)") as err:
        load_pair(rec)
    assert err.value.path == str(rec.mask_path)


def test_load_records_takes_the_split_asked_for_sorted_by_id_with_every_class_index(data):
    """load_records(data, split): only that side, sorted by image id however labels.csv is ordered, and
    each label's index in model.CLASS_NAMES (the classifier's target)."""
    from model import CLASS_NAMES

    _edit(data, "labels.csv", lambda t: t.splitlines()[0] + "\n" + "\n".join(reversed(t.splitlines()[1:])) + "\n")
    sides = {s: load_records(data, s) for s in ("train", "val")}
    every = load_records(data)
    assert [r.image_id for r in every] == sorted(r.image_id for r in every) and len(every) == 6
    for side, recs in sides.items():
        assert recs and all(r.split == side for r in recs)
        assert [r.image_id for r in recs] == sorted(r.image_id for r in recs)
    assert sorted(r.image_id for r in sides["train"] + sides["val"]) == [r.image_id for r in every]
    assert {r.label: r.label_index for r in every} == {c: CLASS_NAMES.index(c) for c in CLASS_NAMES}


def test_csv_headers_and_values_as_a_spreadsheet_saves_them_are_read(data):
    """Column names in another case or padded (`` Image_ID ``) name the same columns; ``read_csv`` (what
    evaluation reads labels.csv with) strips every value."""
    from training.datasets import read_csv

    before = {r.image_id: (r.label, r.split) for r in load_records(data)}
    _edit(data, "labels.csv", lambda t: t.replace("image_id,label,source,", " Image_ID ,LABEL, Source,", 1)
          .replace(",BUS,", ", BUS ,"))
    _edit(data, "split.csv", lambda t: t.replace("image_id,split", "IMAGE_ID, Split "))
    assert {r.image_id: (r.label, r.split) for r in load_records(data)} == before
    rows = read_csv(data / "labels.csv")
    assert {r["source"] for r in rows} == {"BUS"} and rows[0]["image_id"] == "PACE_00001_000_BUS"
    assert rows[0]["patient_id"] == ""


def test_limit_of_a_number_that_is_not_a_multiple_of_three_takes_the_classes_in_order():
    """The extra images of --limit 5 go to the classes in CLASS_NAMES order (normal, then benign), not to
    whichever class has the smallest ids."""
    from training.datasets import Record, first_of_each_class

    recs = [Record(f"PACE_{i:05d}_000_BUS", label, "BUS", "train", Path("i.png"), Path("m.png"))
            for i, label in enumerate(["benign"] * 4 + ["malignant"] * 4 + ["normal"] * 4)]
    picked = [r.label for r in first_of_each_class(recs, 5)]
    assert (picked.count("normal"), picked.count("benign"), picked.count("malignant")) == (2, 2, 1)
