"""training.evaluate end to end on a tiny generated dataset, in the PACE and Grand Challenge layouts."""
from __future__ import annotations

import csv
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from make_test_model import make_test_ensemble
from model.atomic_files import write_png
from model.io import read_image
from training import evaluate as E
from training import predict as P
from training import read_predictions as R
from training import metrics as M
from training.datasets import DataError, first_of_each_class, load_records

# the container's path again and again on the same images: a repeat batch gets what the real
# encoder gave it (test/encoder_memo.py)
pytestmark = pytest.mark.usefixtures("encoder_memo")

sitk = pytest.importorskip("SimpleITK")
sd = pytest.importorskip("surface_distance")

H, W = 24, 32
GC_SPACING_XY = (0.5, 0.25)  # mha spacing is (x, y); metrics take (row, col) = (0.25, 0.5)


def box(r0, r1, c0, c1):
    m = np.zeros((H, W), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


EMPTY = np.zeros((H, W), np.uint8)
GT2 = box(6, 16, 8, 24)
PRED2 = box(6, 16, 12, 28)  # GT2 shifted 4 columns: Dice 2*120/320
# id: (label, source, split, ground truth)
CASES = {
    "PACE_00001_001_BUS": ("benign", "BUS", "val", box(4, 14, 5, 20)),
    "PACE_00002_002_BUS": ("malignant", "BUS", "val", GT2),
    "PACE_00003_000_BBR": ("normal", "BBR", "val", EMPTY),
    "PACE_00004_000_BBR": ("normal", "BBR", "val", EMPTY),
    "PACE_00005_002_BBR": ("malignant", "BBR", "val", box(3, 9, 3, 9)),  # no prediction at all
    "PACE_00006_001_BBR": ("benign", "BBR", "val", box(10, 20, 10, 30)),
    "PACE_00007_001_BUS": ("benign", "BUS", "train", box(2, 8, 2, 8)),
}
# id: (mask, label, probabilities normal/benign/malignant)
PREDS = {
    "PACE_00001_001_BUS": (box(4, 14, 5, 20), "Benign", (0.1, 0.8, 0.1)),
    "PACE_00002_002_BUS": (PRED2, "Malignant", (0.1, 0.3, 0.6)),
    "PACE_00003_000_BBR": (EMPTY, "Normal", (0.7, 0.2, 0.1)),
    "PACE_00004_000_BBR": (box(0, 2, 0, 3), "Benign", (0.3, 0.5, 0.2)),  # 6 false-positive pixels
    "PACE_00006_001_BBR": (EMPTY, "Benign", (0.15, 0.45, 0.4)),
    "PACE_00007_001_BUS": (box(2, 8, 2, 8), "Benign", (0.1, 0.8, 0.1)),  # train split: out of split
    "PACE_99999_001_BUS": (box(2, 8, 2, 8), "Benign", (0.1, 0.8, 0.1)),  # not in the dataset: extra
}
VAL = [k for k, v in CASES.items() if v[2] == "val"]
MISSING = "PACE_00005_002_BBR"
EXTRA = "PACE_99999_001_BUS"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def make_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "source", "original_path", "patient_id"])
        for i, (cid, (label, source, _, gt)) in enumerate(CASES.items()):
            w.writerow([cid, label, source, f"/raw/{cid}.png", i])
            write_png(root / "images" / f"{cid}.png", rng.integers(0, 256, (H, W), dtype=np.uint8))
            write_png(root / "masks" / f"{cid}.png", (gt * 255).astype(np.uint8))
    with open(root / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "split"])
        for cid, (_, _, split, _) in CASES.items():
            w.writerow([cid, split])
    return root


def make_pace(root: Path) -> Path:
    for cid, (mask, _, _) in PREDS.items():
        write_png(root / "segmentation" / f"{cid}_mask.png", (mask * 255).astype(np.uint8))
    (root / "classification").mkdir(parents=True)
    with open(root / "classification" / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label"])
        w.writerows([cid, label] for cid, (_, label, _) in PREDS.items())
    with open(root / "classification" / "probabilities.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "normal", "benign", "malignant"])
        w.writerows([cid, *probs] for cid, (_, _, probs) in PREDS.items())
    return root


def write_mha(path: Path, mask: np.ndarray, three_d: bool = False) -> None:
    img = sitk.GetImageFromArray(mask[None] if three_d else mask)
    img.SetSpacing(GC_SPACING_XY + ((1.0,) if three_d else ()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def make_gc(root: Path) -> Path:
    seg = root / "images" / "breast-lesion-segmentation"
    entries = []
    for i, (cid, (mask, label, probs)) in enumerate(PREDS.items()):
        probs_d = dict(zip(("normal", "benign", "malignant"), probs))
        if i % 2 == 0:  # mask under another name, named in results.json
            name = f"output-{i:03d}.mha"
            outputs = [{"type": "mask", "filename": f"images/breast-lesion-segmentation/{name}"},
                       {"label": label, "probabilities": probs_d}]
        else:  # mask named after the case, probabilities nested deeper, no label (argmax is used)
            name = f"{cid}.mha"
            outputs = [{"type": "mask"}, {"classification": {"scores": {"probabilities": probs_d}}}]
        write_mha(seg / name, mask, three_d=(i == 1))
        entries.append({"inputs": [{"image": {"name": f"{cid}.mha"}}], "outputs": outputs, "error_messages": []})
    (root / "results.json").write_text(json.dumps(entries))
    return root


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path / "data")


def expected_hd95(spacing, diag):
    shifted = sd.compute_robust_hausdorff(sd.compute_surface_distances(GT2 > 0, PRED2 > 0, spacing), 95)
    return (0.0 + shifted + diag + diag) / 4  # lesion images: exact, shifted, missing, empty


def check_common(res: dict, out: Path) -> None:
    assert res["n_images"] == len(VAL) == 6
    assert res["n_lesion_images"] == 4 and res["n_normal_images"] == 2
    assert res["dsc"] == pytest.approx((1 + 0.75 + 0 + 0) / 4)
    assert res["iou"] == pytest.approx((1 + 120 / 200 + 0 + 0) / 4)
    assert res["accuracy"] == pytest.approx(4 / 6)  # PACE_00004 wrong, PACE_00005 has no label
    assert res["normal_empty_share"] == pytest.approx(0.5)
    assert res["missing"]["cases"] == [MISSING]
    assert res["missing"]["masks"] == [MISSING]
    assert res["missing"]["probabilities"] == [MISSING]
    assert res["extra"] == [EXTRA]
    assert res["out_of_split"] == ["PACE_00007_001_BUS"]
    missing = next(c for c in res["cases"] if c["image_id"] == MISSING)
    assert missing["missing_mask"] and missing["dice"] == 0 and missing["probabilities"] == pytest.approx([1 / 3] * 3)
    assert res["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert res["classification"]["confusion_missing"] == [0, 0, 1]
    # malignant vs rest: P(malignant) 0.6 and 1/3 (missing) against 0.1, 0.1, 0.2, 0.4
    y = np.array([1, 2, 0, 0, 2, 1]) == 2
    p = np.array([0.1, 0.6, 0.1, 0.2, 1 / 3, 0.4])
    assert res["auc_malignant"] == pytest.approx((4 + 3) / 8)
    assert res["auc_malignant"] == pytest.approx(M.binary_auc(y, p))
    assert set(res["by_source"]) == {"BUS", "BBR"} and res["by_source"]["BUS"]["n_images"] == 2
    assert res["by_source"]["BUS"]["dsc"] == pytest.approx((1 + 0.75) / 2)
    for k in ("dsc", "accuracy"):
        lo, hi = res["ci"][k]
        assert lo <= res[k] <= hi
    assert res["worst"][:2] == [MISSING, "PACE_00006_001_BBR"]  # Dice 0, ties by id
    assert len(res["worst"]) == 4

    saved = json.loads((out / "metrics.json").read_text())
    for key in ("dsc", "iou", "hd95", "nsd", "accuracy", "f1_macro", "auc_macro", "auc_malignant",
                "sens_at_90_spec", "spec_at_90_sens", "n_images", "ci", "by_source", "normal_images",
                "confusion_matrix", "missing", "extra"):
        assert key in saved, key
    assert saved["dsc"] == pytest.approx(res["dsc"]) and saved["missing"]["cases"] == [MISSING]
    report = (out / "report.md").read_text()
    assert MISSING in report and EXTRA in report and "failures" in report
    for name in ("roc.png", "confusion.png"):
        assert read_image(out / name).array.shape[0] > 100
    overlays = sorted(p.stem for p in (out / "worst").glob("*.png"))
    assert overlays == sorted(res["worst"])
    ov = read_image(out / "worst" / "PACE_00002_002_BUS.png").array
    assert ov.shape == (H, W, 3)
    green = np.all(ov == (0, 255, 0), axis=2)
    red = np.all(ov == (255, 0, 0), axis=2)
    assert green[6, 8] and red[6, 27] and not red[6, 8]  # GT's and the prediction's corners
    ov_missing = read_image(out / "worst" / f"{MISSING}.png").array
    assert np.all(ov_missing == (0, 255, 0), axis=2).any() and not np.all(ov_missing == (255, 0, 0), axis=2).any()


def test_pace_layout_cli(tmp_path, data):
    pred = make_pace(tmp_path / "pred")
    out = tmp_path / "out"
    result = CliRunner().invoke(E.main, ["--pred", str(pred), "--data", str(data), "--split", "val", "--out",
                                         str(out), "--n-boot", "50", "--seed", "3", "--tau", "3"])
    assert result.exit_code == 0, result.output
    assert "6 images (pace layout); missing: 1 predictions, 1 masks, 1 labels, 1 probabilities" in result.output
    assert "; 1 extra" in result.output
    res = json.loads((out / "metrics.json").read_text())
    assert res["layout"] == "pace" and res["units"] == {"distance": "px", "area": "px^2", "tau": 3.0}
    assert res["bootstrap"] == {"n_boot": 50, "seed": 3, "level": 0.95, "method": "percentile", "unit": "image",
                                "n_units": 6}  # one patient per image in this labels.csv
    assert res["hd95"] == pytest.approx(expected_hd95((1.0, 1.0), 40.0))  # diagonal of 24 x 32
    assert res["normal_images"]["mean_fp_area"] == pytest.approx(3.0)  # 6 px and 0 px
    assert res["f1_macro"] == pytest.approx(np.mean([2 / 3, 0.8, 2 / 3]))
    direct = E.evaluate_predictions(pred, data, "val", tmp_path / "out2", tau=3.0, n_boot=50, seed=3)
    check_common(direct, tmp_path / "out2")
    assert direct["ci"] == res["ci"] and direct["nsd"] == pytest.approx(res["nsd"])  # --tau reaches the metrics
    assert direct["nsd"] != pytest.approx(E.evaluate_predictions(pred, data, "val", n_boot=0)["nsd"])


def test_a_missing_or_unusable_mask_of_a_normal_image_is_a_failure(tmp_path, data):
    """The CLI said 'each scored as a failure' of the normal images' missing masks, yet scored them as
    correct empty predictions (share 1.000, false-positive area 0). A missing mask (PACE_00003: its
    prediction was empty) and one of the wrong size (PACE_00004) now count as failures: not empty,
    the whole image false positive."""
    pred = make_pace(tmp_path / "pred")
    (pred / "segmentation" / "PACE_00003_000_BBR_mask.png").unlink()
    write_png(pred / "segmentation" / "PACE_00004_000_BBR_mask.png", np.zeros((H, W + 1), np.uint8))
    out = tmp_path / "out"
    result = CliRunner().invoke(E.main, ["--pred", str(pred), "--data", str(data), "--out", str(out), "--n-boot", "0"])
    assert result.exit_code == 0, result.output
    assert "missing: 1 predictions, 3 masks" in result.output and "each scored as a failure" in result.output
    res = json.loads((out / "metrics.json").read_text())
    assert sorted(res["missing"]["masks"]) == ["PACE_00003_000_BBR", "PACE_00004_000_BBR", MISSING]
    assert res["normal_empty_share"] == 0.0 and res["normal_images"]["n_empty_prediction"] == 0
    assert res["normal_fp_area"] == res["normal_images"]["mean_fp_area"] == H * W
    assert res["dsc"] == pytest.approx((1 + 0.75 + 0 + 0) / 4)  # lesion images as before
    report = (out / "report.md").read_text()
    assert "PACE_00004_000_BBR" in report and "scored as missing" in report


def test_the_bootstrap_resamples_patients_and_near_duplicates_together(tmp_path, data):
    """Images of one patient (labels.csv) and near-duplicates (report.json, training.prepare) are
    one unit each; an image of another split or a conflicting group (kept: null) joins nothing."""
    rows = list(csv.DictReader(open(data / "labels.csv")))
    for r in rows:  # the BBR normal pair: one patient
        if r["image_id"] in ("PACE_00003_000_BBR", "PACE_00004_000_BBR"):
            r["patient_id"] = "P1"
        if r["image_id"] in ("PACE_00002_002_BUS", MISSING):  # one patient id in two sources: two patients
            r["patient_id"] = "P2"
    with open(data / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    near = [{"kind": "near-duplicate", "kept": ["PACE_00001_001_BUS", "PACE_00006_001_BBR", "PACE_00007_001_BUS"]},
            {"kind": "near-duplicate", "kept": None, "images": [{"image_id": "PACE_00002_002_BUS"}]}]
    (data / "report.json").write_text(json.dumps({"duplicates": near}))
    groups = E.bootstrap_groups(data, E.load_truth(data, "val"))
    assert groups["PACE_00003_000_BBR"] == groups["PACE_00004_000_BBR"] != ""
    assert groups["PACE_00001_001_BUS"] == groups["PACE_00006_001_BBR"] != groups["PACE_00003_000_BBR"]
    assert groups["PACE_00002_002_BUS"] == groups[MISSING] == ""
    res = E.evaluate_predictions(make_pace(tmp_path / "pred"), data, "val", None, n_boot=50)
    assert res["bootstrap"]["unit"] == "group" and res["bootstrap"]["n_units"] == 4
    # bench/feature_probe.py's paired intervals resample the same units (they resampled images alone)
    import runpy
    probe = runpy.run_path(str(Path(E.__file__).parents[1] / "bench" / "feature_probe.py"))
    val = [r["image_id"] for r in E.load_truth(data, "val")]
    units = sorted(sorted(val[i] for i in u) for u in probe["_units"](data, val))
    expected: dict[str, list[str]] = {}
    for i in val:
        expected.setdefault(groups[i] or i, []).append(i)
    assert units == sorted(sorted(m) for m in expected.values()) and len(units) == 4 < len(val)


def test_grand_challenge_layout(tmp_path, data):
    pred = make_gc(tmp_path / "gc")
    assert R.detect_layout(pred) == "grand-challenge"
    out = tmp_path / "out"
    res = E.evaluate_predictions(pred, data, "val", out, n_boot=50)
    assert res["layout"] == "grand-challenge" and res["units"]["distance"] == "mm"
    check_common(res, out)
    spacing_rc = (GC_SPACING_XY[1], GC_SPACING_XY[0])
    assert res["hd95"] == pytest.approx(expected_hd95(spacing_rc, math.hypot(H * 0.25, W * 0.5)))
    assert res["normal_images"]["mean_fp_area"] == pytest.approx(6 * 0.125 / 2)
    assert res["problems"] == []
    # odd entries name no label: the argmax is used, and they are listed
    assert res["missing"]["labels"] == ["PACE_00002_002_BUS", "PACE_00004_000_BBR", MISSING]
    # CLI on the same folder, all splits: the train case is evaluated, no longer out of split
    result = CliRunner().invoke(E.main, ["--pred", str(pred), "--data", str(data), "--split", "all", "--out",
                                         str(tmp_path / "all"), "--n-boot", "20"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert saved["n_images"] == 7 and saved["out_of_split"] == [] and saved["extra"] == [EXTRA]
    # masks of images that had no spacing (PNG: ITK's default 1 x 1) were scored in "mm": in pixels, as the
    # PACE masks of the same images (training.compare refused the two as in other units)
    for mha in (pred / "images" / "breast-lesion-segmentation").glob("*.mha"):
        img = sitk.ReadImage(str(mha))
        img.SetSpacing((1.0,) * img.GetDimension())
        sitk.WriteImage(img, str(mha), useCompression=True)
    pixels = E.evaluate_predictions(pred, data, "val", n_boot=0)
    pace = E.evaluate_predictions(make_pace(tmp_path / "pace"), data, "val", n_boot=0)
    assert pixels["units"] == pace["units"] == {"distance": "px", "area": "px^2", "tau": 2.0}
    assert pixels["hd95"] == pytest.approx(pace["hd95"]) and pixels["nsd"] == pytest.approx(pace["nsd"])


def test_bad_predictions_are_reported(tmp_path, data):
    pred = make_pace(tmp_path / "pred")
    write_png(pred / "segmentation" / "PACE_00001_001_BUS_mask.png", np.zeros((H + 1, W), np.uint8))
    with open(pred / "classification" / "predictions.csv", "a") as f:
        f.write("PACE_00002_002_BUS,Cancer\n")
    res = E.evaluate_predictions(pred, data, "val", None, n_boot=0)
    assert "PACE_00001_001_BUS" in res["missing"]["masks"]
    assert res["dsc"] == pytest.approx((0 + 0.75 + 0 + 0) / 4)  # the mis-shaped mask is scored as missing
    problems = {p["image_id"]: p["problem"] for p in res["problems"]}
    assert "shape" in problems["PACE_00001_001_BUS"] and "PACE_00002_002_BUS" in problems


@pytest.mark.parametrize("row", ["10,20,70", "0.5,0.6,0.2", "0.1,0.8,0.098"])
def test_probabilities_that_do_not_sum_to_1_are_unusable(tmp_path, data, row):
    """'10,20,70' (percentages) used to score a cross-entropy of -0.0, perfect; a row that is not a
    distribution (sum off by more than 1e-3) is reported and scored as missing."""
    pred = make_pace(tmp_path / "pred")
    path = pred / "classification" / "probabilities.csv"
    text = path.read_text().replace("PACE_00001_001_BUS,0.1,0.8,0.1", f"PACE_00001_001_BUS,{row}")
    path.write_text(text)
    res = E.evaluate_predictions(pred, data, "val", None, n_boot=0)
    assert "PACE_00001_001_BUS" in res["missing"]["probabilities"]
    problems = {p["image_id"]: p["problem"] for p in res["problems"]}
    assert problems["PACE_00001_001_BUS"].startswith("probabilities.csv: unusable row")
    assert R._parse_probs({"normal": "0.3334", "benign": "0.3333", "malignant": "0.3333"}) == [0.3334, 0.3333, 0.3333]


def test_a_csv_that_is_not_text_is_an_error_naming_it(tmp_path, data):
    pred = make_pace(tmp_path / "pred")
    path = pred / "classification" / "predictions.csv"
    path.write_bytes(b"image_id,label\n\xff\xfe\x00bad\n")
    result = CliRunner().invoke(E.main, ["--pred", str(pred), "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{path}: not a UTF-8 text file" in result.output


def test_labels_and_split_are_checked_as_training_checks_them(tmp_path, data):
    """An id listed twice in labels.csv was scored twice (double weight in every mean and the bootstrap),
    and a split.csv id that labels.csv lacks was dropped in silence; both are refused, as in training."""
    pred = make_pace(tmp_path / "pred")
    labels = data / "labels.csv"
    rows = labels.read_text().splitlines()
    labels.write_text("\n".join([*rows, rows[1]]) + "\n")
    with pytest.raises(DataError, match=f"{rows[1].split(',')[0]} is listed again"):
        E.evaluate_predictions(pred, data, "val", n_boot=10)
    labels.write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(DataError, match=r"split.csv: 1 image id\(s\) not in .*labels.csv"):
        E.evaluate_predictions(pred, data, "val", n_boot=10)


def test_unknown_layout_fails(tmp_path, data):
    (tmp_path / "nothing").mkdir()
    result = CliRunner().invoke(E.main, ["--pred", str(tmp_path / "nothing"), "--data", str(data),
                                         "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "layout" in result.output


def test_logits_give_the_segmentation_bce(tiny_dataset, tmp_path):
    """training.predict --logits writes each image's lesion logits at its size (above 0: the written
    mask), and training.evaluate turns them into the segmentation BCE; without them the BCE is
    not available (NaN), never a made-up number."""
    ens = make_test_ensemble(tmp_path / "ens")
    res = CliRunner().invoke(P.main, ["--model-dir", str(ens), "--data", str(tiny_dataset), "--out",
                                      str(tmp_path / "pred"), "-d", "cpu", "--logits"])
    assert res.exit_code == 0, res.output
    bces = []
    for r in load_records(tiny_dataset, "val"):  # in the split's order, as evaluate scores them
        logits = np.load(tmp_path / "pred" / "logits" / f"{r.image_id}.npy", allow_pickle=False)
        mask = np.asarray(read_image(tmp_path / "pred" / "segmentation" / f"{r.image_id}_mask.png").array) > 0
        gt = np.asarray(read_image(r.mask_path).array) > 0
        assert logits.dtype == np.float16 and logits.shape == mask.shape == gt.shape
        differ = (logits > 0) != mask  # only where a logit within 6e-8 of 0 rounded to 0 in float16
        assert not np.any(differ & (logits != 0)) and differ.mean() < 0.01 and logits.astype(np.float32).std() > 0
        bces.append(M.segmentation_bce(gt, 1 / (1 + np.exp(-logits.astype(np.float64)))))
    with_maps = E.evaluate_predictions(tmp_path / "pred", tiny_dataset, "val", n_boot=10)
    assert with_maps["seg_bce"] == pytest.approx(np.mean(bces), rel=1e-9) and with_maps["seg_bce"] > 0
    assert with_maps["missing"]["probability_maps"] == [] and not with_maps["problems"]
    # a lost and a mis-shaped logits file: each scored as an empty prediction (the container's 1e-6), listed
    recs = load_records(tiny_dataset, "val")
    lesion = [r for r in recs if (np.asarray(read_image(r.mask_path).array) > 0).any()]
    lost, bad = lesion[0], lesion[1]
    (tmp_path / "pred" / "logits" / f"{lost.image_id}.npy").unlink()
    np.save(tmp_path / "pred" / "logits" / f"{bad.image_id}.npy", np.zeros((3, 3), np.float16))
    broken = E.evaluate_predictions(tmp_path / "pred", tiny_dataset, "val", n_boot=10)
    assert broken["missing"]["probability_maps"] == sorted([lost.image_id, bad.image_id], key=[r.image_id for r in recs].index)
    assert any(p["image_id"] == bad.image_id and "shape" in p["problem"] for p in broken["problems"])
    fail = {r.image_id: M.segmentation_bce(np.asarray(read_image(r.mask_path).array) > 0,
                                           np.full(np.asarray(read_image(r.mask_path).array).shape, 1e-6))
            for r in (lost, bad)}
    expect = [fail.get(r.image_id, b) for r, b in zip(recs, bces)]
    assert broken["seg_bce"] == pytest.approx(np.mean(expect), rel=1e-9) and broken["seg_bce"] > with_maps["seg_bce"]
    # predicting again without --logits into the same folder removes the old logits: never scored against new masks
    res = CliRunner().invoke(P.main, ["--model-dir", str(ens), "--data", str(tiny_dataset), "--out",
                                      str(tmp_path / "pred"), "-d", "cpu"])
    assert res.exit_code == 0 and not list((tmp_path / "pred" / "logits").glob("*.npy"))
    again = E.evaluate_predictions(tmp_path / "pred", tiny_dataset, "val", n_boot=10)  # its logits/ left empty:
    assert math.isnan(again["seg_bce"]) and "probability_maps" not in again["missing"]  # no BCE, not all failed
    res = CliRunner().invoke(P.main, ["--model-dir", str(ens), "--data", str(tiny_dataset), "--out",
                                      str(tmp_path / "plain"), "-d", "cpu"])
    assert res.exit_code == 0 and not (tmp_path / "plain" / "logits").exists()
    assert math.isnan(E.evaluate_predictions(tmp_path / "plain", tiny_dataset, "val", n_boot=10)["seg_bce"])


def test_predict_and_evaluate_limit_take_the_same_first_images(tiny_dataset, tmp_path):
    """A quick check: predict --limit N writes N of the split's images, the first of each class in turn,
    and evaluate --limit N scores exactly those (nothing missing); without --limit evaluate counts the
    rest as missing."""
    ens = make_test_ensemble(tmp_path / "ens")
    recs = load_records(tiny_dataset, "val")
    ids = sorted(r.image_id for r in recs)
    assert len(ids) > 2
    first = {c: min(r.image_id for r in recs if r.label == c) for c in ("normal", "benign")}
    taken = sorted(first.values())  # a normal and a benign image: the classes' order
    ids = taken + sorted(set(ids) - set(taken))
    res = CliRunner().invoke(P.main, ["--model-dir", str(ens), "--data", str(tiny_dataset), "--out",
                                      str(tmp_path / "pred"), "-d", "cpu", "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "pred" / "segmentation").iterdir()) == [f"{i}_mask.png" for i in ids[:2]]
    res = CliRunner().invoke(E.main, ["--pred", str(tmp_path / "pred"), "--data", str(tiny_dataset), "--out",
                                      str(tmp_path / "eval"), "--n-boot", "10", "--limit", "2"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and metrics["missing"]["cases"] == []
    full = E.evaluate_predictions(tmp_path / "pred", tiny_dataset, "val", n_boot=10)
    assert full["n_images"] == len(ids) and sorted(full["missing"]["cases"]) == ids[2:]
    # predictions of the whole split scored with --limit: the rest were reported as "in the dataset but
    # not in split val", as if they were training images; they are the split's, left out by the limit
    res = CliRunner().invoke(P.main, ["--model-dir", str(ens), "--data", str(tiny_dataset), "--out",
                                      str(tmp_path / "pred_all"), "-d", "cpu"])
    assert res.exit_code == 0, res.output
    limited = E.evaluate_predictions(tmp_path / "pred_all", tiny_dataset, "val", tmp_path / "eval_all", n_boot=10,
                                     limit=2)
    assert limited["n_images"] == 2 and limited["out_of_split"] == [] and limited["beyond_limit"] == ids[2:]
    assert f"- in split val, left out by --limit ({len(ids) - 2}): " in (tmp_path / "eval_all" / "report.md").read_text()


def test_predict_takes_the_split_asked_for_and_passes_its_options_to_the_predictor(tiny_dataset, tmp_path,
                                                                                    monkeypatch):
    """--split all / train predict those images (all: both sides of split.csv), --limit N the first of
    each class in turn of that split; -d, --batch-size, --tta, --precision and --class-prior reach the
    predictor that model.inference.run uses (without --class-prior, the ensemble's postprocess.class_prior)."""
    ens = make_test_ensemble(tmp_path / "ens")
    made, real = [], P.load_predictor
    monkeypatch.setattr(P, "load_predictor", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])

    def written(out):
        return sorted(p.name[:-len("_mask.png")] for p in (out / "segmentation").iterdir())

    data = tmp_path / "data"  # the first image moved to val: --split all --limit 2 takes one of each side
    shutil.copytree(tiny_dataset, data)
    rows = (data / "split.csv").read_text().splitlines()
    image_id, _ = rows[1].split(",")
    rows[1] = f"{image_id},val"
    (data / "split.csv").write_text("\n".join(rows) + "\n")
    picked = first_of_each_class(load_records(data), 2)
    assert sorted(r.split for r in picked) == ["train", "val"]
    res = CliRunner().invoke(P.main, ["--model-dir", str(ens), "--data", str(data), "--out", str(tmp_path / "all"),
                                      "--split", "all", "--limit", "2", "-d", "cpu", "--batch-size", "3", "--tta",
                                      "--precision", "fp32", "--class-prior", "data"])
    assert res.exit_code == 0, res.output
    assert written(tmp_path / "all") == [r.image_id for r in picked]
    (pred,) = made
    assert (pred.device.type, pred.batch_size, pred.tta, pred.precision, pred.class_prior) == \
        ("cpu", 3, True, "fp32", "data")
    spec = json.loads((ens / "ensemble.json").read_text())  # without --class-prior the ensemble's own stands
    assert spec["postprocess"]["class_prior"] == "trained"
    spec["postprocess"]["class_prior"] = "data"
    (ens / "ensemble.json").write_text(json.dumps(spec))
    res = CliRunner().invoke(P.main, ["--model-dir", str(ens), "--data", str(data), "--out", str(tmp_path / "train"),
                                      "--split", "train", "--limit", "1", "-d", "cpu"])
    assert res.exit_code == 0, res.output
    assert written(tmp_path / "train") == [r.image_id for r in first_of_each_class(load_records(data, "train"), 1)]
    assert (made[-1].batch_size, made[-1].tta, made[-1].precision, made[-1].class_prior) == (4, False, "auto", "data")


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_batch_size_below_1_is_a_usage_error_in_predict_and_tune(tiny_dataset, tmp_path, value):
    """training.predict and training.tune took --batch-size 0 or -2 and ran with batches of one, as if
    it had been given; process.py, train and cache refuse it: so do they, before anything runs."""
    from training import tune as T

    for main, out in ((P.main, ["--out", str(tmp_path / "out")]), (T.main, [])):
        res = CliRunner().invoke(main, ["--model-dir", str(tmp_path), "--data", str(tiny_dataset), *out,
                                        "--batch-size", value])
        assert res.exit_code == 2 and "Invalid value for '--batch-size'" in res.output, (main, res.output)
        assert not (tmp_path / "out").exists()


def test_predict_exits_1_when_the_model_cannot_load_and_3_when_an_image_fails(tiny_dataset, tmp_path):
    """As process.py: a model folder that holds no model is an error (exit 1, no traceback); a split
    image that cannot be read is listed and the others are predicted (exit 3); -d cuda without a GPU is
    an error too, not a run on the CPU, and --limit 0 a usage error, not every image."""
    import torch

    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(P.main, ["--model-dir", str(tmp_path / "empty"), "--data", str(tiny_dataset), "--out",
                                      str(tmp_path / "p0"), "--limit", "0"])  # not "no limit": a usage error
    assert res.exit_code == 2 and "Invalid value for '--limit'" in res.output, res.output
    res = CliRunner().invoke(P.main, ["--model-dir", str(tmp_path / "empty"), "--data", str(tiny_dataset), "--out",
                                      str(tmp_path / "p0"), "-d", "cpu"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"error: cannot load the model from {tmp_path / 'empty'}" in res.output
    if not torch.cuda.is_available():  # -d reaches the predictor: a GPU asked for is not replaced by the CPU
        res = CliRunner().invoke(P.main, ["--model-dir", str(tmp_path / "empty"), "--data", str(tiny_dataset),
                                          "--out", str(tmp_path / "p0"), "-d", "cuda"])
        assert res.exit_code == 1 and "error: device 'cuda' requested but no CUDA GPU is available" in res.output, \
            res.output
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    first, second = first_of_each_class(load_records(data, "val"), 2)
    first.image_path.write_bytes(b"not an image")
    res = CliRunner().invoke(P.main, ["--model-dir", str(make_test_ensemble(tmp_path / "ens")), "--data", str(data),
                                      "--out", str(tmp_path / "p1"), "-d", "cpu", "--limit", "2"])
    assert res.exit_code == 3 and isinstance(res.exception, SystemExit), res.output
    assert "1 of 2 images processed, 1 failed" in res.output
    assert f"error: {first.image_path.name}: " in res.output  # named as below DATA/images, as process.py names it
    assert [p.name for p in (tmp_path / "p1" / "segmentation").iterdir()] == [f"{second.image_id}_mask.png"]


def test_the_layout_is_detected_from_any_of_its_folders(tmp_path):
    """Either folder of a layout names it (a Grand Challenge run without results.json, a PACE run with
    classification only); a folder with results.json is Grand Challenge even beside a segmentation/."""
    cases = {"gc_masks": [GC_MASK := R.GC_MASK_DIR], "pace_cls": [Path("classification")],
             "pace_seg": [Path("segmentation")], "both": [Path("segmentation"), "results.json"]}
    want = {"gc_masks": "grand-challenge", "pace_cls": "pace", "pace_seg": "pace", "both": "grand-challenge"}
    for name, parts in cases.items():
        for part in parts:
            if part == "results.json":
                (tmp_path / name / part).write_text("[]")
            else:
                (tmp_path / name / part).mkdir(parents=True)
        assert R.detect_layout(tmp_path / name) == want[name], name
    assert GC_MASK == Path("images") / "breast-lesion-segmentation"


def test_a_codabench_folder_is_scored_with_its_labels(tmp_path, data):
    """process.py --format codabench writes the labels alone, in classification.csv: evaluate took the
    folder for the PACE layout and scored every label missing (accuracy 0). Its labels are read; its
    probabilities are absent by design (listed missing)."""
    pace = make_pace(tmp_path / "pace")
    cb = tmp_path / "cb"
    shutil.copytree(pace / "segmentation", cb / "segmentation")
    shutil.copy2(pace / "classification" / "predictions.csv", cb / "classification.csv")
    assert R.detect_layout(cb) == "codabench"
    res = E.evaluate_predictions(cb, data, "val", n_boot=0)
    ref = E.evaluate_predictions(pace, data, "val", n_boot=0)
    labelled = {r["image_id"] for r in csv.DictReader(open(cb / "classification.csv")) if r.get("label")}
    assert res["layout"] == "codabench" and res["dsc"] == ref["dsc"]
    assert sorted(res["missing"]["labels"]) == sorted(set(VAL) - labelled) != sorted(VAL)
    assert sorted(res["missing"]["probabilities"]) == sorted(VAL) and res["accuracy"] > 0
    # what needs probabilities is not scored from the uniform stand-in (AUC 0.5, cross-entropy ln 3): "–"
    for key in E.PROBABILITY_KEYS:
        assert math.isnan(res[key]) and all(math.isnan(v) for v in res.get("ci", {}).get(key, [math.nan])), key
        assert all(math.isnan(part[key]) for part in res["by_source"].values() if key in part), key
    out = tmp_path / "eval_cb"
    E.evaluate_predictions(pace, data, "val", out, n_boot=10)  # an earlier evaluation into the same folder
    assert (out / "roc.png").is_file() and "![ROC](roc.png)" in (out / "report.md").read_text()
    E.evaluate_predictions(cb, data, "val", out, n_boot=10)
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| Macro AUC", "| AUC malignant", "| Cross-entropy"))]
    assert len(rows) == 3 and all(line.split("|")[2].strip() == "n/a" for line in rows), rows
    assert json.loads((out / "metrics.json").read_text())["auc_macro"] is None
    # no ROC curves of the stand-in (three diagonals "AUC 0.500"), and not the earlier evaluation's either
    assert not (out / "roc.png").exists() and "roc.png" not in report
    assert "No ROC curve: the predictions hold labels, no probabilities." in report
    assert (out / "confusion.png").is_file()


def test_pace_rows_are_read_as_written_and_first_rows_kept(tmp_path):
    """probabilities.csv's class columns in any case (Normal,Benign,Malignant); a row with a negative
    probability is unusable even when it sums to 1; a second row of an id is reported and the first
    kept; hidden files (macOS ._ copies) in segmentation/ are not masks."""
    pred = tmp_path / "pred"
    write_png(pred / "segmentation" / "a_mask.png", np.zeros((H, W), np.uint8))
    write_png(pred / "segmentation" / "._a_mask.png", np.zeros((H, W), np.uint8))
    (pred / "classification").mkdir()
    (pred / "classification" / "predictions.csv").write_text("image_id,label\na,Malignant\na,Normal\nb,benign\n")
    (pred / "classification" / "probabilities.csv").write_text(
        "image_id,Normal,BENIGN,malignant\na,0.1,0.2,0.7\na,0.7,0.2,0.1\nb,-0.1,0.6,0.5\n")
    preds, problems = R.read_pace(pred)
    assert sorted(preds) == ["a", "b"]
    assert preds["a"] == {"mask": pred / "segmentation" / "a_mask.png", "label": "malignant",
                          "probabilities": [0.1, 0.2, 0.7]}
    assert preds["b"] == {"mask": None, "label": "benign", "probabilities": None}
    said = [(p["image_id"], p["problem"][:30]) for p in problems]
    assert said == [("a", "predictions.csv: duplicate row"), ("a", "probabilities.csv: duplicate r"),
                    ("b", "probabilities.csv: unusable ro")], problems


def test_pace_csvs_with_a_byte_order_mark_are_read_and_one_without_ids_is_refused(tmp_path):
    """predictions.csv and probabilities.csv saved with a byte order mark (pandas' utf-8-sig, Excel):
    every row was skipped as if it had no image_id, and the run scored accuracy 0 with no word why. They
    are read; a file with no image_id column at all is an error naming it."""
    from training.datasets import DataError

    pred = tmp_path / "pred"
    (pred / "classification").mkdir(parents=True)
    (pred / "classification" / "predictions.csv").write_bytes("image_id,label\r\na,Malignant\r\n".encode("utf-8-sig"))
    (pred / "classification" / "probabilities.csv").write_bytes(
        "image_id,normal,benign,malignant\na,0.1,0.2,0.7\n".encode("utf-8-sig"))
    preds, problems = R.read_pace(pred)
    assert preds == {"a": {"mask": None, "label": "malignant", "probabilities": [0.1, 0.2, 0.7]}} and problems == []
    (pred / "classification" / "predictions.csv").write_text("id,label\na,Malignant\n")
    with pytest.raises(DataError, match=r"predictions.csv: no image_id column \(header: id,label\)"):
        R.read_pace(pred)


def test_grand_challenge_entries_are_read_leniently_but_as_documented(tmp_path):
    """The case id is the first input name (not an output's, not a later input's); the first
    probability dict and the first label (``label``, ``class`` or ``prediction``; a boolean is no
    label) win over later ones; a mask named only by its file name is looked up in the mask folder;
    a second entry of a case, error messages and a mask not named for a case that results.json has are
    problems; a lone entry (not in a list) is read; a .nii.gz suffix, in any case, is stripped whole; a
    name without an image suffix (a DICOM UID) is kept whole, as process.py names its outputs."""
    pred = tmp_path / "gc"
    seg = pred / R.GC_MASK_DIR
    for name in ("out-a.mha", "a.mha", "b.mha", "stray.mha"):
        write_mha(seg / name, EMPTY)
    probs = {"Normal": 0.1, "benign": 0.2, "malignant": 0.7}
    entries = [
        {"inputs": [{"image": {"name": "a.mha"}}, {"image": {"name": "other.mha"}}],
         "outputs": [{"image": {"name": "out-a.mha"}}, {"label": True}, {"scores": probs},
                     {"label": "Malignant"}, {"class": "normal"},
                     {"p": {"normal": 0.8, "benign": 0.1, "malignant": 0.1}}],
         "error_messages": []},
        {"inputs": [{"image": {"name": "a.mha"}}], "outputs": [{"label": "malignant"}], "error_messages": []},
        {"inputs": [{"image": {"name": "x/b.NII.GZ"}}], "outputs": [{"prediction": "malignant"}], "error_messages": ["oom"]},
    ]
    (pred / "results.json").write_text(json.dumps(entries))
    preds, problems = R.read_grand_challenge(pred)
    assert preds["a"] == {"mask": seg / "out-a.mha", "label": "malignant", "probabilities": [0.1, 0.2, 0.7]}
    assert preds["b"] == {"mask": seg / "b.mha", "label": "malignant", "probabilities": None}
    assert preds["stray"] == {"mask": seg / "stray.mha", "label": None, "probabilities": None}
    assert sorted(preds) == ["a", "b", "stray"]
    said = {(p["image_id"], p["problem"].split(":")[0]) for p in problems}
    assert said == {("a", "results.json entry 1"), ("b", "error_messages"), ("a", "a.mha not named in results.json; ignored")}
    # a lone entry
    (pred / "results.json").write_text(json.dumps({"inputs": [{"image": {"name": "c.png"}}],
                                                    "outputs": [{"class": "Benign"}]}))
    preds, _ = R.read_grand_challenge(pred)
    assert preds["c"]["label"] == "benign"
    (pred / "results.json").write_text(json.dumps({"inputs": [{"image": {"name": "dcm/1.2.840.113619.2.55.7"}}],
                                                    "outputs": [{"class": "normal"}]}))
    preds, _ = R.read_grand_challenge(pred)
    assert preds["1.2.840.113619.2.55.7"]["label"] == "normal"


def test_probability_maps_are_the_sigmoid_of_the_logits(tmp_path):
    np.save(tmp_path / "a.npy", np.array([[-2.0, 0.0, 3.0]], np.float16))
    maps = R.ProbabilityMaps(tmp_path)
    assert list(maps) == ["a"] and len(maps) == 1
    assert maps["a"] == pytest.approx(1 / (1 + np.exp(-np.array([[-2.0, 0.0, 3.0]]))))
    with pytest.raises(KeyError):
        maps["b"]


def test_a_grand_challenge_case_without_a_mask_takes_the_most_common_spacing(tmp_path, data):
    """The missing case's HD95 (the image diagonal) is in mm of the spacing most masks have, not of
    an odd one out; a case with a mask keeps its own spacing."""
    pred = make_gc(tmp_path / "gc")
    odd = sitk.GetImageFromArray(EMPTY)
    odd.SetSpacing((1.0, 1.0))
    sitk.WriteImage(odd, str(pred / "images" / "breast-lesion-segmentation" / "output-004.mha"))  # PACE_00006
    res = E.evaluate_predictions(pred, data, "val", None, n_boot=0)
    hd95 = {c["image_id"]: c["hd95"] for c in res["cases"]}
    assert hd95[MISSING] == pytest.approx(math.hypot(H * 0.25, W * 0.5))
    assert hd95["PACE_00006_001_BBR"] == pytest.approx(math.hypot(H, W))


def test_the_report_shows_the_figures_of_metrics_json(tmp_path, data):
    """report.md is what a reader quotes: each headline row shows the value and both ends of its own
    interval; per-source rows their own intervals; the confusion rows as true x predicted with the
    unlabelled count and recall; the missing lists each their own ids; the worst cases their predicted
    label; a NaN BCE (no logits) row left out. A rerun into the same folder drops stale overlays."""
    from training.report import _id_list, fmt

    pred = make_pace(tmp_path / "pred")
    path = pred / "classification" / "predictions.csv"
    text = path.read_text().replace("PACE_00001_001_BUS,Benign\n", "")  # no label: argmax (benign)
    path.write_text(text.replace("PACE_00006_001_BBR,Benign", "PACE_00006_001_BBR,Malignant"))
    out = tmp_path / "out"
    write_png(out / "worst" / "PACE_00003_000_BBR.png", np.zeros((H, W, 3), np.uint8))  # an earlier run's
    res = E.evaluate_predictions(pred, data, "val", out, n_boot=200)
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    # the banner counts what is missing: here one case without any prediction and one without a label
    assert "**1 case(s) have no prediction at all** and are scored as failures" in report
    assert "**1 other case(s) have no label**" in report and "no usable mask**" not in report
    for key, name in (("dsc", "Dice"), ("accuracy", "Accuracy"), ("iou", "IoU")):
        lo, hi = res["ci"][key]
        assert lo < hi, key
        assert f"| {name} | {res[key]:.4f} | [{lo:.4f}, {hi:.4f}] |" in lines, key
    assert math.isnan(res["seg_bce"]) and "Segmentation BCE" not in report and fmt(float("nan")) == "n/a"
    assert "| normal | 1 | 1 | 0 | 0 | 0.500 |" in lines
    assert "| benign | 0 | 1 | 1 | 0 | 0.500 |" in lines
    assert "| malignant | 0 | 0 | 1 | 1 | 0.500 |" in lines
    bus = res["by_source"]["BUS"]
    lo, hi = bus["ci"]["dsc"]
    assert [lo, hi] != res["ci"]["dsc"]
    row = next(line for line in lines if line.startswith("| BUS | 2 | 2 | "))
    assert row.startswith(f"| BUS | 2 | 2 | {bus['dsc']:.3f} [{lo:.3f}, {hi:.3f}] |"), row
    assert f"- no label, argmax of the probabilities used where present (2): `PACE_00001_001_BUS`, `{MISSING}`" in lines
    assert f"- no probabilities (1): `{MISSING}`" in lines
    worst = next(line for line in lines if line.startswith("- `PACE_00006_001_BBR`"))
    assert "(benign, BBR): Dice 0.000" in worst and "predicted malignant" in worst, worst
    assert sorted(p.stem for p in (out / "worst").glob("*.png")) == sorted(res["worst"])
    assert _id_list([f"i{n}" for n in range(53)]).endswith(", `i49`, ... (3 more)")


def test_overlays_scale_the_image_and_widen_the_contour_on_large_images():
    """A float image is stretched to 0..255 (else the overlay is black); on a 512-pixel image the
    contour is drawn at width 3 (min side // 256 + 1: the edge dilated twice), visible once scaled down."""
    from training.report import overlay

    image = np.array([[0.0, 0.5], [1.0, 1.0]])
    rgb = overlay(image, np.zeros((2, 2), np.uint8), None)
    assert rgb.dtype == np.uint8 and rgb[..., 0].tolist() == [[0, 127], [255, 255]]
    gt = np.zeros((512, 512), np.uint8)
    gt[100:300, 100:300] = 1
    rgb = overlay(np.zeros((512, 512), np.uint8), gt, None)
    green = np.all(rgb == (0, 255, 0), axis=2)
    assert green[200, 97:104].tolist() == [False, True, True, True, True, True, False]  # edge at 100, +-2
