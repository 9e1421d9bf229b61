"""training.prepare on synthetic fixtures of every layout, and (when present) on the real data."""
from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from model.atomic_files import write_png
from model.io import read_image
from training import prepare as prep
from training.sources import PACE_CODE_LABEL, read_busbra, read_busi

H, W = 24, 32
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ID = re.compile(r"^PACE_(\d{5})_(000|001|002|100|101)_(BUS|BRE|BBR|ABR)$")


def noise(seed: int, rgb: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (H, W, 3) if rgb else (H, W), dtype=np.uint8)


def box(y0: int, y1: int, x0: int, x1: int, value: int = 255, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def make_busi(root: Path) -> dict:
    """Good cases of every mask kind, a bulk of plain cases, and the broken ones."""
    b, m, n = root / "benign", root / "malignant", root / "normal"
    write_png(b / "benign (1).png", noise(1))  # two masks: lesion is the union
    write_png(b / "benign (1)_mask.png", box(2, 8, 2, 8))
    write_png(b / "benign (1)_mask_1.png", box(10, 20, 20, 30))
    write_png(b / "benign (2).png", noise(2, rgb=True))  # RGB image, RGBA mask
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[4:9, 5:15, :3], rgba[..., 3] = 255, 255
    write_png(b / "benign (2)_mask.png", rgba)
    write_png(b / "benign (3).png", noise(3))  # 1-bit mask
    write_png(b / "benign (3)_mask.png", box(3, 9, 3, 9).astype(bool))
    write_png(b / "benign (4).png", noise(4))  # {0,1} mask
    write_png(b / "benign (4)_mask.png", box(5, 10, 5, 12, value=1))
    write_png(b / "benign (5).png", noise(5))  # broken: mask of the wrong size
    write_png(b / "benign (5)_mask.png", box(1, 5, 1, 5, shape=(H + 2, W)))
    write_png(b / "benign (6).png", noise(6))  # broken: non-binary mask
    write_png(b / "benign (6)_mask.png", box(1, 5, 1, 5, value=128))
    dup = noise(7)  # broken: the same image labelled benign and malignant
    write_png(b / "benign (7).png", dup)
    write_png(b / "benign (7)_mask.png", box(1, 5, 1, 5))
    write_png(m / "malignant (20).png", dup)
    write_png(m / "malignant (20)_mask.png", box(1, 5, 1, 5))
    same = box(0, 12, 0, 16)  # same-label duplicate: pixel-identical, not byte-identical (8-bit vs 1-bit)
    write_png(b / "benign (8).png", same)
    write_png(b / "benign (8)_mask.png", box(2, 6, 2, 6))
    write_png(b / "benign (9).png", same.astype(bool))
    write_png(b / "benign (9)_mask.png", box(2, 6, 2, 6))
    write_png(m / "malignant (1).png", noise(11))  # broken: lesion image without a mask
    for i in range(10, 30):
        write_png(b / f"benign ({i}).png", noise(100 + i))
        write_png(b / f"benign ({i})_mask.png", box(i % 10, i % 10 + 5, 3, 9))
    for i in range(2, 12):
        write_png(m / f"malignant ({i}).png", noise(200 + i))
        write_png(m / f"malignant ({i})_mask.png", box(4, 12, i, i + 6))
    for i in range(1, 11):
        write_png(n / f"normal ({i}).png", noise(300 + i))
        if i != 5:  # normal (5) has no mask file: fine
            write_png(n / f"normal ({i})_mask.png", np.zeros((H, W), np.uint8))
    return {"union": (b / "benign (1).png", box(2, 8, 2, 8) | box(10, 20, 20, 30)),
            "rgba": (b / "benign (2).png", box(4, 9, 5, 15)), "one_bit": (b / "benign (3).png", box(3, 9, 3, 9)),
            "zero_one": (b / "benign (4).png", box(5, 10, 5, 12))}


def make_busbra(root: Path) -> None:
    rows = []
    for case in range(1, 21):
        sides = ["l", "r"] if case % 3 == 0 else ["s"]
        for side in sides:
            name = f"{case:04d}-{side}"
            write_png(root / "Images" / f"bus_{name}.png", noise(400 + 2 * case + (side == "r")))
            write_png(root / "Masks" / f"mask_{name}.png", box(5, 15, 5, 15))
            pathology = "malignant" if case % 2 else "benign"
            rows.append(f"bus_{name},{case},histology,{pathology},4,device,{W},{H},{side},\"[1,2,3,4]\"")
    (root / "bus_data.csv").write_text("ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX\n"
                                       + "\n".join(rows) + "\n")


def make_breast(root: Path) -> None:
    img = root / "BrEaST-Lesions_USG-images_and_masks"
    write_png(img / "case001.png", noise(501))
    write_png(img / "case001_tumor.png", box(2, 6, 2, 6))
    write_png(img / "case001_other1.png", box(15, 20, 15, 20))  # not a lesion mask
    write_png(img / "case002.png", noise(502, rgb=True))
    write_png(img / "case002_tumor.png", box(8, 12, 8, 12))
    write_png(img / "case003.png", noise(503))  # normal, no mask
    (root / "BrEaST-Lesions-USG-clinical-data.csv").write_text(
        "CaseID,Age,Classification\n1,50,benign\n2,61,malignant\n3,40,normal\n")


def make_pace(root: Path) -> None:
    write_png(root / "PACE_00023_002_ABR.png", noise(601))
    write_png(root / "masks" / "PACE_00023_002_ABR_mask.png", box(1, 9, 1, 9))
    write_png(root / "PACE_00024_000_ABR.png", noise(602))
    write_png(root / "PACE_00002_100_BRE.png", noise(603))
    write_png(root / "segmentation" / "PACE_00002_100_BRE_mask.png", box(3, 7, 3, 7))
    write_png(root / "PACE_00025_101_BBR.png", noise(604))
    write_png(root / "PACE_00025_101_BBR_mask.png", box(6, 9, 6, 9))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("raw")
    expected = make_busi(root / "BUSI")
    make_busbra(root / "BUS-BRA")
    make_breast(root / "BrEaST")
    make_pace(root / "PACE")
    return {"root": root, "expected": expected}


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--busi", str(root / "BUSI"), "--busbra", str(root / "BUS-BRA"), "--breast", str(root / "BrEaST"),
            "--pace", str(root / "PACE"), "--out", str(out), *extra]


def run_cli(argv: list[str]):
    result = CliRunner().invoke(prep.main, argv)
    assert result.exit_code == 0, result.output
    return result


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def prepared(fixtures, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out")
    result = run_cli(args(fixtures["root"], out))
    labels = read_csv(out / "labels.csv")
    return {"out": out, "stderr": result.stderr, "labels": labels, "split": read_csv(out / "split.csv"),
            "report": json.loads((out / "report.json").read_text()),
            "by_path": {Path(r["original_path"]): r for r in labels}}


def test_outputs_and_labels(prepared, fixtures):
    out, labels = prepared["out"], prepared["labels"]
    assert list(labels[0]) == ["image_id", "label", "source", "original_path", "patient_id"]
    assert list(prepared["split"][0]) == ["image_id", "split"]
    ids = [r["image_id"] for r in labels]
    assert len(ids) == len(set(ids))
    assert {p.stem for p in (out / "images").glob("*.png")} == set(ids)
    assert {p.stem for p in (out / "masks").glob("*.png")} == set(ids)
    for r in labels:
        m = ID.match(r["image_id"])
        assert m, r["image_id"]
        assert PACE_CODE_LABEL[m[2]] == r["label"] and m[3] == r["source"]
        image = read_image(out / "images" / f"{r['image_id']}.png").array
        original = read_image(r["original_path"]).array
        assert np.array_equal(image, original)  # original pixels, grey stays grey, RGB stays RGB
        mask = read_image(out / "masks" / f"{r['image_id']}.png").array
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert mask.any() == (r["label"] != "normal")
    # BUSI 25 + 10 + 10 good cases, BUS-BRA 26 images, BrEaST 3, PACE 4 (one per source code)
    assert Counter(r["source"] for r in labels) == {"BUS": 45, "BBR": 27, "BRE": 4, "ABR": 2}
    assert Counter(r["label"] for r in labels) == {"benign": 40, "malignant": 26, "normal": 12}


def test_ids_numbered_and_pace_ids_kept(prepared, fixtures):
    root, ids = fixtures["root"], {r["image_id"] for r in prepared["labels"]}
    assert {"PACE_00023_002_ABR", "PACE_00024_000_ABR", "PACE_00002_100_BRE", "PACE_00025_101_BBR"} <= ids
    numbers = Counter(int(ID.match(i)[1]) for i in ids)
    assert max(numbers.values()) == 1  # numbered ids skip the numbers of the PACE input
    # n counts up in (source, path) order: BBR before BRE before BUS
    by_path = prepared["by_path"]
    first_bbr = by_path[root / "BUS-BRA" / "Images" / "bus_0001-s.png"]["image_id"]
    assert first_bbr == "PACE_00001_002_BBR"
    assert by_path[root / "BrEaST" / "BrEaST-Lesions_USG-images_and_masks" / "case003.png"]["image_id"].endswith(
        "_000_BRE")


def test_a_prepared_folder_reads_back_as_pace_data(prepared, tmp_path):
    """prepare's own layout (images/<id>.png, masks/<id>.png, labels.csv) is PACE data: read back with
    --pace it gives the same ids, labels, sources, patient ids and masks, and no mask is taken for an
    image."""
    out = tmp_path / "again"
    result = run_cli(["--pace", str(prepared["out"]), "--out", str(out)])
    n = len(prepared["labels"])
    assert f"prepared {n} of {n} images" in result.output and " 0 errors" in result.output, result.output
    key = lambda rows: sorted((r["image_id"], r["label"], r["source"], r["patient_id"]) for r in rows)  # noqa: E731
    again = read_csv(out / "labels.csv")
    assert key(again) == key(prepared["labels"])  # patient ids too (from the folder's labels.csv)
    assert any(r["patient_id"] for r in again)
    for r in again:
        np.testing.assert_array_equal(read_image(out / "masks" / f"{r['image_id']}.png").array,
                                      read_image(prepared["out"] / "masks" / f"{r['image_id']}.png").array)


def test_a_labels_csv_with_a_byte_order_mark_keeps_its_patient_ids(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte order mark: the first column was read as
    "\ufeffimage_id", no patient id matched, and the split went by image without a word (patients on both
    sides). The mark is now no part of the name; a labels.csv without the columns is warned about."""
    from training.datasets import read_csv
    from training.sources import read_pace

    root = tmp_path / "PACE"
    rows = ["image_id,label,patient_id"]
    for i in range(4):
        write_png(root / f"PACE_{i:05d}_001_BUS.png", noise(i))
        write_png(root / f"PACE_{i:05d}_001_BUS_mask.png", box(2, 8, 2, 8))
        rows.append(f"PACE_{i:05d}_001_BUS,benign,p{i // 2}")
    (root / "labels.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8-sig"))
    warned = {}
    records = read_pace(root, lambda path, why: warned.setdefault(path.name, why))
    assert {r.image_id: r.patient_id for r in records} == {f"PACE_{i:05d}_001_BUS": f"p{i // 2}" for i in range(4)}
    assert warned == {}
    assert read_csv(root / "labels.csv")[0]["image_id"] == "PACE_00000_001_BUS"  # evaluate's, train's reader too
    (root / "labels.csv").write_text("id,label\nPACE_00000_001_BUS,benign\n")
    read_pace(root, lambda path, why: warned.setdefault(path.name, why))
    assert warned["labels.csv"].startswith("no image_id column (header: id,label): no patient ids read")


def test_challenge_release_names_are_read(tmp_path):
    """The challenge's release names its files PABC_<subject>_<code>_<source> (its dataset.md)."""
    from training.sources import read_pace

    write_png(tmp_path / "images" / "PABC_00001_000_BUS.png", noise(1))
    write_png(tmp_path / "images" / "PABC_00003_101_BBR.png", noise(2))
    write_png(tmp_path / "masks" / "PABC_00003_101_BBR.png", box(1, 5, 1, 5))
    records = {r.image_id: r for r in read_pace(tmp_path)}
    assert sorted(records) == ["PABC_00001_000_BUS", "PABC_00003_101_BBR"]
    nested = tmp_path / "Segmentation"  # a release folder named like a mask folder: only an image's own folder counts
    write_png(nested / "images" / "PABC_00007_002_BUS.png", noise(3))
    write_png(nested / "images" / "PABC_00007_002_BUS_mask.png", box(2, 6, 2, 6))
    assert {r.image_id: r for r in read_pace(nested)}["PABC_00007_002_BUS"].masks == (
        nested / "images" / "PABC_00007_002_BUS_mask.png",)
    assert records["PABC_00003_101_BBR"].label == "malignant" and records["PABC_00003_101_BBR"].source == "BBR"
    assert records["PABC_00003_101_BBR"].masks == (tmp_path / "masks" / "PABC_00003_101_BBR.png",)
    assert records["PABC_00001_000_BUS"].label == "normal" and not any(r.problem for r in records.values())


def test_masks_union_and_kinds(prepared, fixtures):
    for path, expected in fixtures["expected"].values():
        row = prepared["by_path"][path]
        mask = read_image(prepared["out"] / "masks" / f"{row['image_id']}.png").array
        assert np.array_equal(mask, expected)
    breast = fixtures["root"] / "BrEaST" / "BrEaST-Lesions_USG-images_and_masks" / "case001.png"
    mask = read_image(prepared["out"] / "masks" / f"{prepared['by_path'][breast]['image_id']}.png").array
    assert np.array_equal(mask, box(2, 6, 2, 6))  # case001_other1.png ignored
    row = prepared["by_path"][fixtures["root"] / "BUSI" / "normal" / "normal (5).png"]
    assert not read_image(prepared["out"] / "masks" / f"{row['image_id']}.png").array.any()


def test_errors_reported_and_skipped(prepared, fixtures):
    busi = fixtures["root"] / "BUSI"
    errors = {Path(e["path"]).name: e["reason"] for e in prepared["report"]["errors"]}
    assert "differs from image size" in errors["benign (5)_mask.png"]
    assert "not binary" in errors["benign (6)_mask.png"]
    assert "without a mask" in errors["malignant (1).png"]
    assert len(errors) == 3
    for name in ("benign (5)_mask.png", "benign (6)_mask.png", "malignant (1).png"):
        assert name in prepared["stderr"]
    for name in ("benign/benign (5).png", "benign/benign (6).png", "malignant/malignant (1).png"):
        assert busi / name not in prepared["by_path"]


def test_duplicates(prepared, fixtures):
    busi, report = fixtures["root"] / "BUSI", prepared["report"]
    assert busi / "benign" / "benign (7).png" not in prepared["by_path"]
    assert busi / "malignant" / "malignant (20).png" not in prepared["by_path"]
    kept = [busi / "benign" / f"benign ({i}).png" in prepared["by_path"] for i in (8, 9)]
    assert kept == [True, False]
    dups = {frozenset(Path(i["path"]).name for i in d["images"]): d for d in report["duplicates"]}
    assert len(dups) == 2
    conflict = dups[frozenset({"benign (7).png", "malignant (20).png"})]
    assert conflict["conflicting_labels"] and conflict["kept"] is None and conflict["kind"] == "byte-identical"
    same = dups[frozenset({"benign (8).png", "benign (9).png"})]
    assert not same["conflicting_labels"] and same["kind"] == "pixel-identical" and same["kept"]
    pixels = Counter(hashlib.sha256(read_image(prepared["out"] / "images" / f"{r['image_id']}.png").array.tobytes())
                     .hexdigest() for r in prepared["labels"])
    assert max(pixels.values()) == 1  # no image twice, so never in both train and val


def test_split(prepared):
    labels, split = prepared["labels"], prepared["split"]
    assert [r["image_id"] for r in split] == [r["image_id"] for r in labels]
    assert {r["split"] for r in split} == {"train", "val"}
    of = {r["image_id"]: r["split"] for r in split}
    patients = defaultdict(set)
    for r in labels:
        if r["patient_id"]:
            patients[(r["source"], r["patient_id"])].add(of[r["image_id"]])
    assert len(patients) == 23 and all(len(s) == 1 for s in patients.values())
    assert any(len([r for r in labels if (r["source"], r["patient_id"]) == p]) == 2 for p in patients)
    total, val = Counter(r["label"] for r in labels), Counter(r["label"] for r in labels if of[r["image_id"]] == "val")
    for label in total:
        assert abs(val[label] - 0.2 * total[label]) <= 2, (label, val, total)
    counts = prepared["report"]["counts"]
    assert counts["split"] == dict(sorted(Counter(of.values()).items()))
    assert counts["label"] == dict(sorted(total.items()))


def test_deterministic_rerun_and_overwrite(prepared, fixtures, tmp_path):
    """Over an earlier run the files are overwritten and those of ids its labels.csv listed but this
    run drops are removed; a file prepare never wrote there is left in place, with a warning."""
    out = prepared["out"]
    gone = "PACE_99999_001_BUS"
    for sub in ("images", "masks"):
        (out / sub / f"{gone}.png").write_bytes(b"x")
    with open(out / "labels.csv", "a") as fh:
        fh.write(f"{gone},benign,BUS,/nowhere/{gone}.png,\n")
    (out / "images" / "my_notes.png").write_bytes(b"x")
    result = run_cli(args(fixtures["root"], out, "--seed", "0"))
    assert not (out / "images" / f"{gone}.png").exists() and not (out / "masks" / f"{gone}.png").exists()
    assert (out / "images" / "my_notes.png").read_bytes() == b"x"
    assert f"{out / 'images' / 'my_notes.png'}: not written by training.prepare" in result.stderr
    (out / "images" / "my_notes.png").unlink()
    assert read_csv(out / "labels.csv") == prepared["labels"] and read_csv(out / "split.csv") == prepared["split"]
    run_cli(args(fixtures["root"], tmp_path / "seed1", "--seed", "1", "--val-fraction", "0.3"))
    other = read_csv(tmp_path / "seed1" / "split.csv")
    assert [r["image_id"] for r in other] == [r["image_id"] for r in prepared["split"]]
    assert other != prepared["split"]
    assert 0.25 < sum(r["split"] == "val" for r in other) / len(other) < 0.35


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_an_out_folder_overlapping_a_source_is_refused_and_nothing_is_deleted(tmp_path, where):
    """--out must not be a source folder, lie inside one or hold one: prepare removes files in --out
    (it deleted a benign image without a mask and a stray PNG of the source before)."""
    src = tmp_path / "top" / "PACE"
    make_pace(src)
    write_png(src / "PACE_00030_001_BUS.png", noise(605))  # benign without a mask: not prepared
    write_png(src / "images" / "my_notes_scan.png", noise(606))
    before = _files(tmp_path)
    out = {"same": src, "inside": src / "prepared", "contains": tmp_path / "top"}[where]
    result = CliRunner().invoke(prep.main, ["--pace", str(src), "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"--out {out}" in result.output and f"--pace source folder {src}" in result.output, result.output
    assert _files(tmp_path) == before


def test_no_images_found_is_refused_and_an_existing_dataset_is_kept(prepared, tmp_path):
    """A source with no image it can read (the wrong folder) used to 'prepare 0 of 0', empty the
    existing dataset in --out and write an empty labels.csv."""
    wrong = tmp_path / "wrong"
    write_png(wrong / "scan1.png", noise(607))  # no PACE name: not a PACE image
    before = _files(prepared["out"])
    result = CliRunner().invoke(prep.main, ["--pace", str(wrong), "--out", str(prepared["out"])])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"no images found in --pace {wrong}" in result.output
    assert _files(prepared["out"]) == before


def test_none_prepared_is_refused_and_an_existing_dataset_is_kept(prepared, tmp_path):
    src = tmp_path / "pace"
    write_png(src / "PACE_00030_001_BUS.png", noise(608))  # benign without a mask: skipped
    before = _files(prepared["out"])
    result = CliRunner().invoke(prep.main, ["--pace", str(src), "--out", str(prepared["out"])])
    assert result.exit_code == 1 and "none of the 1 images found could be prepared" in result.output, result.output
    assert _files(prepared["out"]) == before


def test_none_kept_after_duplicates_leaves_no_files_behind(prepared, tmp_path):
    """The same pixels under two labels are both dropped, after each was written: with nothing left to
    prepare, the images and masks written by this run used to stay in --out beside the old labels.csv."""
    src = tmp_path / "pace"
    write_png(src / "PACE_00030_001_BUS.png", noise(609))
    write_png(src / "PACE_00030_001_BUS_mask.png", box(1, 9, 1, 9))
    write_png(src / "PACE_00031_002_BUS.png", noise(609))  # the same scan, labelled malignant
    write_png(src / "PACE_00031_002_BUS_mask.png", box(1, 9, 1, 9))
    for out in (prepared["out"], tmp_path / "fresh"):
        before = _files(out) if out.exists() else {}
        result = CliRunner().invoke(prep.main, ["--pace", str(src), "--out", str(out)])
        assert result.exit_code == 1 and "none of the 2 images found could be prepared" in result.output, result.output
        assert _files(out) == before


def test_a_rerun_that_stops_partway_leaves_no_dataset_whose_labels_name_other_images(tmp_path, monkeypatch):
    """An image that cannot be read (here a broken link) is reported and skipped, not the end of the run
    (it stopped prepare with "No such file or directory" after the earlier run's images had been
    overwritten, beside that run's labels.csv). A run stopped partway over an earlier one leaves no
    split.csv, so that training, prediction and evaluation refuse the folder until it is prepared again,
    rather than read labels that name other images."""
    from training.datasets import load_records

    src, out = tmp_path / "pace", tmp_path / "out"
    for k in range(6):
        write_png(src / f"PACE_{30 + k:05d}_001_BUS.png", noise(700 + k))
        write_png(src / f"PACE_{30 + k:05d}_001_BUS_mask.png", box(1, 9 + k, 1, 9))
    run_cli(["--pace", str(src), "--out", str(out)])
    first = _files(out)
    (src / "PACE_00029_001_BUS.png").symlink_to(tmp_path / "gone.png")  # listed first
    write_png(src / "PACE_00029_001_BUS_mask.png", box(1, 9, 1, 9))
    result = CliRunner().invoke(prep.main, ["--pace", str(src), "--out", str(out)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"error: {src / 'PACE_00029_001_BUS.png'}: broken link" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["prepared"] == 6 and [e["image_id"] for e in report["errors"]] == ["PACE_00029_001_BUS"]
    assert {k: v for k, v in _files(out).items() if k != "report.json"} == \
        {k: v for k, v in first.items() if k != "report.json"}
    calls = []

    def stop_on_the_second(*a, **k):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write_case(*a, **k)

    real_write_case = prep.write_case
    monkeypatch.setattr(prep, "write_case", stop_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare({"pace": src}, out)
    assert not (out / "split.csv").exists() and not (out / "report.json").exists()
    with pytest.raises(FileNotFoundError, match=r"split.csv not found: prepare the data first"):
        load_records(out)
    monkeypatch.setattr(prep, "write_case", real_write_case)
    run_cli(["--pace", str(src), "--out", str(out)])
    assert read_csv(out / "split.csv") == read_csv(tmp_path / "out" / "split.csv") and len(load_records(out)) == 6


def test_a_split_without_validation_images_is_a_warning(fixtures, tmp_path):
    result = run_cli(args(fixtures["root"], tmp_path / "o", "--val-fraction", "0"))
    assert "split.csv: no validation images in split.csv" in result.stderr, result.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert any("no validation images" in w["reason"] for w in report["warnings"])


def test_cli_errors(tmp_path, fixtures):
    result = CliRunner().invoke(prep.main, ["--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "at least one source" in result.output
    breast = tmp_path / "breast"
    write_png(breast / "case001.png", noise(1))
    (breast / "BrEaST-Lesions-USG-clinical-data-Dec-15-2023.xlsx").write_bytes(b"PK")
    try:
        import openpyxl  # noqa: F401
    except ImportError:  # without openpyxl an xlsx table is a clear error asking for a csv export
        result = CliRunner().invoke(prep.main, ["--breast", str(breast), "--out", str(tmp_path / "o")])
        assert result.exit_code != 0 and "csv" in result.output and "openpyxl" in result.output


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real data not present")
def test_real_data(tmp_path):
    busi = read_busi(REAL_DATA / "BUSI")
    assert Counter(r.label for r in busi) == {"benign": 371, "malignant": 178, "normal": 113}
    assert not [r for r in busi if r.problem]
    by_bytes = defaultdict(list)
    for r in busi:
        by_bytes[hashlib.sha256(r.image.read_bytes()).hexdigest()].append(r)
    conflicts = [g for g in by_bytes.values() if len({r.label for r in g}) > 1]
    assert [sorted(r.image.name for r in g) for g in conflicts] == [["benign (433).png", "malignant (145).png"]]
    busbra = read_busbra(REAL_DATA / "BUS-BRA")
    assert len(busbra) == 1492 and not [r for r in busbra if r.problem]
    assert all(r.patient_id for r in busbra)
    run_cli(["--busi", str(REAL_DATA / "BUSI"), "--busbra", str(REAL_DATA / "BUS-BRA"),
             "--out", str(tmp_path), "--limit", "8"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prepared"] == 16 and not report["errors"]
    assert report["counts"]["source"] == {"BBR": 8, "BUS": 8}


def test_files_the_readers_leave_out_are_reported(tmp_path):
    """BUSI and PACE files that are not used (not a PNG, a name the layout does not use, a mask
    without its image) are warnings on stderr and in report.json, each with its reason."""
    from PIL import Image

    busi, pace = tmp_path / "BUSI", tmp_path / "PACE"
    write_png(busi / "benign" / "benign (1).png", noise(1))
    write_png(busi / "benign" / "benign (1)_mask.png", box(2, 8, 2, 8))
    Image.fromarray(noise(2)).save(busi / "benign" / "benign (2).jpg")
    write_png(busi / "malignant" / "malignant (3)_mask.png", box(2, 8, 2, 8))
    write_png(pace / "PACE_00040_000_BUS.png", noise(3))
    write_png(pace / "scan 7.png", noise(4))
    Image.fromarray(noise(5)).save(pace / "PACE_00041_000_BUS.jpg")
    write_png(pace / "masks" / "PACE_00042_001_BUS.png", box(1, 5, 1, 5))
    write_png(pace / "PACE_00043_002_BUS_mask.png", box(1, 5, 1, 5))
    result = run_cli(["--busi", str(busi), "--pace", str(pace), "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    warned = {Path(w["path"]).relative_to(tmp_path).as_posix(): w["reason"] for w in report["warnings"]}
    assert warned == {
        "BUSI/benign/benign (2).jpg": "not used: BUSI images and masks are PNG files",
        "BUSI/malignant/malignant (3)_mask.png": "not used: a mask without its image (malignant (3).png)",
        "PACE/scan 7.png": "not used: the name is not a PACE name (PACE_<5 digits>_<class code>_<source>, or PABC_…)",
        "PACE/PACE_00041_000_BUS.jpg": "not used: PACE images and masks are PNG files",
        "PACE/masks/PACE_00042_001_BUS.png": "not used: a mask without its image (PACE_00042_001_BUS.png)",
        "PACE/PACE_00043_002_BUS_mask.png": "not used: a mask without its image (PACE_00043_002_BUS.png)",
        "out/split.csv": "no validation images in split.csv (2 images, --val-fraction 0.2); "
                         "training.train refuses such a split",  # one image per class: none to spare
    }
    for path, reason in warned.items():
        assert f"warning: {tmp_path / path}: {reason}" in result.stderr
    assert report["prepared"] == 2 and not report["errors"]


def _smooth_scan(seed: int) -> np.ndarray:
    """A scan-like image with structure on the scale of a thumbnail's pixels (a smoothed random field):
    two of them correlate far below the near-duplicate threshold (0.57 at most over 60 seeds)."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(np.random.default_rng(seed).random((96, 128)), 8)
    return ((f - f.min()) / (f.max() - f.min()) * 200 + 20).astype(np.uint8)


def _reexported(image: np.ndarray, seed: int) -> np.ndarray:
    """The same scan exported again: a pixel or two cropped off each side, resized back, noise, JPEG."""
    import io as iolib

    from PIL import Image

    crop = image[1:-1, 2:-2]
    a = np.asarray(Image.fromarray(crop).resize((128, 96), Image.BILINEAR), np.float32)
    a = np.clip(a + np.random.default_rng(seed).normal(0, 4, a.shape), 0, 255).astype(np.uint8)
    buf = iolib.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(buf))


def test_near_duplicates_share_a_side_and_conflicting_ones_are_dropped(tmp_path):
    """BUSI holds the same scan exported twice, not pixel-identical, sometimes under two labels: such
    images (thumbnails correlating above 0.95) stay on one side of the split, and a group whose labels
    disagree is dropped; ``--no-near-duplicates`` keeps the split as pixel identity alone makes it."""
    root = tmp_path / "BUSI"
    lesion = box(30, 60, 40, 90, shape=(96, 128))
    for label, n, base in (("benign", 14, 0), ("malignant", 10, 100), ("normal", 8, 200)):
        for i in range(1, n + 1):
            write_png(root / label / f"{label} ({i}).png", _smooth_scan(base + i))
            write_png(root / label / f"{label} ({i})_mask.png", lesion if label != "normal" else lesion * 0)
    pairs = {"benign (15)": ("benign", 1), "benign (16)": ("benign", 1), "malignant (11)": ("malignant", 102),
             "malignant (12)": ("benign", 2), "normal (9)": ("normal", 201)}  # name -> (label, scan seed)
    for k, (name, (label, seed)) in enumerate(pairs.items()):
        folder = name.split(" ")[0]
        write_png(root / folder / f"{name}.png", _reexported(_smooth_scan(seed), k))
        write_png(root / folder / f"{name}_mask.png", lesion if folder != "normal" else lesion * 0)

    run_cli(["--busi", str(root), "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    names = {r["image_id"]: Path(r["original_path"]).stem for r in read_csv(tmp_path / "out" / "labels.csv")}
    side = {names[r["image_id"]]: r["split"] for r in read_csv(tmp_path / "out" / "split.csv")}
    groups = {frozenset(Path(i["path"]).stem for i in d["images"]): d for d in report["duplicates"]
              if d["kind"] == "near-duplicate"}
    assert set(groups) == {frozenset({"benign (1)", "benign (15)", "benign (16)"}),
                           frozenset({"malignant (2)", "malignant (11)"}), frozenset({"benign (2)", "malignant (12)"}),
                           frozenset({"normal (1)", "normal (9)"})}
    assert all(d["correlation"][0] > 0.95 for d in groups.values())
    conflict = groups[frozenset({"benign (2)", "malignant (12)"})]
    assert conflict["conflicting_labels"] and conflict["kept"] is None
    assert "benign (2)" not in side and "malignant (12)" not in side  # the same scan under two labels: neither
    for members in (("benign (1)", "benign (15)", "benign (16)"), ("malignant (2)", "malignant (11)"),
                    ("normal (1)", "normal (9)")):
        assert len({side[m] for m in members}) == 1, members
    assert report["near_duplicates"] == {"enabled": True, "correlation": 0.95, "crop_correlation": 0.95, "pairs": 6,
                                         "crop_pairs": 0, "groups": 4, "images": 9, "dropped_conflicting": 2}
    assert len(side) == 14 + 10 + 8 + 5 - 2

    run_cli(["--busi", str(root), "--out", str(tmp_path / "plain"), "--no-near-duplicates"])
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert plain["near_duplicates"]["enabled"] is False and plain["prepared"] == 14 + 10 + 8 + 5
    assert not [d for d in plain["duplicates"] if d["kind"] == "near-duplicate"]


def test_a_scan_exported_again_with_another_crop_is_a_near_duplicate(tmp_path):
    """The same scan with 12 % of its width cut off one side: its whole-image thumbnail squeezes other
    columns into 32, and correlates below 0.95 (0.91 here; BUSI's benign (154) and (21): 0.944), so the
    two could land on both sides of the split. The aspect-kept crop search finds the one inside the
    other (about 0.998) and groups them; unrelated scans of the same kind stay apart."""
    import io as iolib

    from PIL import Image

    from synthetic import make_ultrasound

    root = tmp_path / "BUSI"
    lesion = box(100, 160, 150, 250, shape=(300, 400))
    for i in range(1, 11):
        write_png(root / "benign" / f"benign ({i}).png", make_ultrasound(300, 400, seed=i + 1)[0])
        write_png(root / "benign" / f"benign ({i})_mask.png", lesion)
    for name, source in (("benign (11)", 2), ("benign (12)", 4)):  # re-crops of benign (1) and (3)
        scan = make_ultrasound(300, 400, seed=source)[0][:, 48:]
        buf = iolib.BytesIO()
        Image.fromarray(scan).save(buf, "PNG")
        (root / "benign" / f"{name}.png").write_bytes(buf.getvalue())
        write_png(root / "benign" / f"{name}_mask.png", lesion[:, 48:])
        whole = make_ultrasound(300, 400, seed=source)[0]
        assert 0.85 < float(prep.thumbnail(whole) @ prep.thumbnail(scan)) < 0.95  # what the thumbnails miss
    run_cli(["--busi", str(root), "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    groups = {frozenset(Path(i["path"]).stem for i in d["images"]): d for d in report["duplicates"]
              if d["kind"] == "near-duplicate"}
    assert set(groups) == {frozenset({"benign (1)", "benign (11)"}), frozenset({"benign (3)", "benign (12)"})}
    for d in groups.values():
        assert d["correlation"] is None and d["crop_correlation"][0] > 0.99 and not d["conflicting_labels"]
    names = {r["image_id"]: Path(r["original_path"]).stem for r in read_csv(tmp_path / "out" / "labels.csv")}
    side = {names[r["image_id"]]: r["split"] for r in read_csv(tmp_path / "out" / "split.csv")}
    assert side["benign (1)"] == side["benign (11)"] and side["benign (3)"] == side["benign (12)"]
    assert report["near_duplicates"]["crop_pairs"] == 2 and report["near_duplicates"]["pairs"] == 0


def test_split_keeps_linked_images_and_their_patients_together():
    """``assign_split``'s ``together``: 20 linked pairs all on one side each (by chance about 0.68 ** 20),
    and a link between two patients' images joins the patients' groups (all their images on one side);
    without links the split is the patient split as before."""
    rows = [{"image_id": f"i{k:03d}", "label": ("benign", "malignant")[k % 2], "source": "BUS", "patient_id": ""}
            for k in range(100)]
    rows += [{"image_id": f"p{k}{s}", "label": "benign", "source": "BBR", "patient_id": f"P{k}"}
             for k in range(20) for s in "ab"]
    pairs = [[f"i{k:03d}", f"i{k + 50:03d}"] for k in range(20)] + [["p0a", "p1b"]]
    split = prep.assign_split(rows, 0.2, 0, together=pairs)
    assert all(split[a] == split[b] for a, b in pairs)
    assert len({split[i] for i in ("p0a", "p0b", "p1a", "p1b")}) == 1
    assert prep.assign_split(rows, 0.2, 0, together=[]) == prep.assign_split(rows, 0.2, 0)
    assert any(split[a] != split[b] for a, b in [[f"i{k:03d}", f"i{k + 50:03d}"] for k in range(20)]
               for split in [prep.assign_split(rows, 0.2, 0)])


@pytest.mark.slow  # prepares the whole of BUSI: 13 s on the slowest host
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real data not present")
def test_real_busi_near_duplicates(tmp_path):
    """On BUSI: the pairs looked at by eye in session 27 (the same scan, re-exported) are found, the
    same scan labelled benign and malignant (or normal) is dropped, and no group spans the split."""
    run_cli(["--busi", str(REAL_DATA / "BUSI"), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    groups = [d for d in report["duplicates"] if d["kind"] == "near-duplicate"]
    names = [{Path(i["path"]).name for i in d["images"]} for d in groups]

    def grouped(*files: str) -> dict:
        return next(d for d, n in zip(groups, names) if set(files) <= n)

    for same in (("malignant (4).png", "malignant (5).png"), ("benign (152).png", "benign (18).png"),
                 ("benign (266).png", "benign (279).png"), ("normal (58).png", "normal (60).png"),
                 # re-exported with another crop (session 47's review: their thumbnails correlate 0.914-0.944)
                 ("benign (154).png", "benign (21).png"), ("benign (141).png", "benign (64).png"),
                 ("malignant (129).png", "malignant (128).png")):
        assert not grouped(*same)["conflicting_labels"], same
    for conflict in (("benign (399).png", "malignant (93).png"), ("benign (437).png", "normal (34).png"),
                     ("benign (42).png", "malignant (51).png")):
        assert grouped(*conflict)["kept"] is None, conflict
    side = {r["image_id"]: r["split"] for r in read_csv(tmp_path / "split.csv")}
    for d in groups:
        if d["kept"]:
            assert len({side[i] for i in d["kept"]}) == 1, d["kept"]
    assert report["near_duplicates"]["pairs"] >= 150 and report["near_duplicates"]["dropped_conflicting"] >= 10


def test_the_split_follows_the_seed_and_takes_the_fraction_of_each_source_and_class():
    """Single images (no patients): the validation side holds round(fraction * n) of every (source,
    label), whatever the seed; the seed decides which images, the same seed the same ones."""
    rows = [{"image_id": f"PACE_{k:05d}_{code}_{src}", "label": label, "source": src, "patient_id": ""}
            for src, counts in (("BUS", (40, 90, 45)), ("BBR", (0, 25, 15)))
            for code, label, n in zip(("000", "001", "002"), ("normal", "benign", "malignant"), counts)
            for k in range(n)]
    splits = {seed: prep.assign_split(rows, 0.2, seed) for seed in (0, 1)}
    assert prep.assign_split(rows, 0.2, 0) == splits[0] and splits[0] != splits[1]
    for split in splits.values():
        total = Counter((r["source"], r["label"]) for r in rows)
        val = Counter((r["source"], r["label"]) for r in rows if split[r["image_id"]] == "val")
        assert val == Counter({k: round(0.2 * n) for k, n in total.items()}), val
    assert Counter(prep.assign_split(rows, 0.3, 0).values())["val"] == sum(
        round(0.3 * n) for n in Counter((r["source"], r["label"]) for r in rows).values())


def test_a_normal_image_with_a_non_empty_mask_gets_an_empty_mask_and_a_warning(tmp_path):
    """A normal image has no lesion: a mask file drawn on it anyway is written empty (all zero), and
    the report says so; the lesion images' masks are kept."""
    root = tmp_path / "BUSI"
    for i in range(1, 4):
        write_png(root / "benign" / f"benign ({i}).png", noise(700 + i))
        write_png(root / "benign" / f"benign ({i})_mask.png", box(4, 12, 5, 15))
    write_png(root / "normal" / "normal (1).png", noise(710))
    write_png(root / "normal" / "normal (1)_mask.png", box(2, 9, 3, 11))
    out = tmp_path / "out"
    run_cli(["--busi", str(root), "--out", str(out)])
    by_label = {r["label"]: r["image_id"] for r in read_csv(out / "labels.csv")}
    assert not read_image(out / "masks" / f"{by_label['normal']}.png").array.any()
    assert np.array_equal(read_image(out / "masks" / f"{by_label['benign']}.png").array, box(4, 12, 5, 15))
    report = json.loads((out / "report.json").read_text())
    assert [w["image_id"] for w in report["warnings"] if "non-empty mask" in w["reason"]] == [by_label["normal"]]


def test_linked_joins_every_member_of_a_link_under_the_groups_smallest_item():
    """``training.grouping.linked``: a link of three separate groups joins all three; every item maps
    to its group's smallest item; a link's members outside the items are ignored."""
    from training.grouping import linked

    groups = linked(["e", "d", "c", "b", "a", "x"], [["d", "e"], ["b", "c"], ["e", "c", "a"], ["x", "zz"]])
    assert groups == {"a": "a", "b": "a", "c": "a", "d": "a", "e": "a", "x": "x"}
    assert linked([3, 1, 2], []) == {1: 1, 2: 2, 3: 3}


def test_busbra_tables_as_spreadsheets_save_them_are_read(tmp_path):
    """bus_data.csv saved again by a spreadsheet: a byte-order mark before the header, padded IDs,
    Pathology in any case; a Pathology that is neither benign nor malignant is a problem, not a class."""
    root = tmp_path / "BUS-BRA"
    rows = []
    for case, (name, pathology) in enumerate((("0001-s", "Malignant"), ("0002-l", " benign "), ("0002-r", "BENIGN"),
                                              ("0003-s", "normal"), ("0004-s", "")), start=1):
        write_png(root / "Images" / f"bus_{name}.png", noise(800 + case))
        write_png(root / "Masks" / f"mask_{name}.png", box(5, 15, 5, 15))
        rows.append(f" bus_{name} ,{case if case < 3 else case - 1},x,{pathology},4,d,{W},{H},s,\"[1,2,3,4]\"")
    (root / "bus_data.csv").write_text("\ufeffID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX\n"
                                       + "\n".join(rows) + "\n", encoding="utf-8")
    records = {r.image.stem: r for r in read_busbra(root)}
    assert {k: r.label for k, r in records.items() if not r.problem} == {
        "bus_0001-s": "malignant", "bus_0002-l": "benign", "bus_0002-r": "benign"}
    assert records["bus_0002-l"].patient_id == records["bus_0002-r"].patient_id == "2"
    assert records["bus_0003-s"].problem == "unknown Pathology 'normal' in bus_data.csv"  # BUS-BRA has no normal class
    assert records["bus_0004-s"].problem == "unknown Pathology '' in bus_data.csv"
    assert records["bus_0003-s"].label == records["bus_0004-s"].label == ""


def test_breast_tables_beside_the_images_and_several_tumour_masks(tmp_path):
    """BrEaST: the clinical csv may lie in the images folder; Classification in any case; an unknown
    Classification is a problem; caseNNN_tumor1/_tumor2 are one lesion mask each, all of them kept."""
    from training.sources import read_breast

    img = tmp_path / "BrEaST" / "BrEaST-Lesions_USG-images_and_masks"
    write_png(img / "case001.png", noise(901))
    write_png(img / "case001_tumor1.png", box(2, 6, 2, 6))
    write_png(img / "case001_tumor2.png", box(12, 18, 20, 28))
    write_png(img / "case002.png", noise(902))
    write_png(img / "case002_tumor.png", box(8, 12, 8, 12))
    write_png(img / "case003.png", noise(903))
    write_png(img / "case003_tumor.png", box(8, 12, 8, 12))
    (img / "BrEaST-Lesions-USG-clinical-data.csv").write_text(
        "CaseID,Age,Classification\n001,50,Benign\n002,61,MALIGNANT\n003,40,suspicious\n")
    records = {r.image.stem: r for r in read_breast(tmp_path / "BrEaST")}
    assert records["case001"].masks == (img / "case001_tumor1.png", img / "case001_tumor2.png")
    assert (records["case001"].label, records["case002"].label) == ("benign", "malignant")
    assert not records["case001"].problem and not records["case002"].problem
    assert records["case003"].problem == "unknown Classification 'suspicious'" and records["case003"].label == ""
    prep.prepare({"breast": tmp_path / "BrEaST"}, tmp_path / "out")
    row = next(r for r in read_csv(tmp_path / "out" / "labels.csv") if r["original_path"].endswith("case001.png"))
    assert np.array_equal(read_image(tmp_path / "out" / "masks" / f"{row['image_id']}.png").array,
                          box(2, 6, 2, 6) | box(12, 18, 20, 28))  # the union of both tumours


def test_pace_mask_layouts_class_and_source_codes(tmp_path):
    """PACE masks as <id>_mask.png plus <id>_mask_1.png (the lesion: their union), or <id>.png in a
    Masks/ or segmentation/ folder; a class or source code outside the naming is a problem, a name with
    more after the source code is not a PACE name; an image id found twice is prepared once."""
    from training.sources import read_pace

    root = tmp_path / "PACE"
    write_png(root / "PACE_00050_001_BUS.png", noise(1))
    write_png(root / "PACE_00050_001_BUS_mask.png", box(2, 8, 2, 8))
    write_png(root / "PACE_00050_001_BUS_mask_1.png", box(10, 20, 20, 30))
    write_png(root / "PACE_00051_002_BBR.png", noise(2))
    write_png(root / "Masks" / "PACE_00051_002_BBR.png", box(3, 9, 3, 9))
    write_png(root / "PACE_00052_101_BRE.png", noise(3))
    write_png(root / "segmentation" / "PACE_00052_101_BRE.png", box(4, 9, 4, 9))
    write_png(root / "PACE_00053_003_BUS.png", noise(4))  # no class 003
    write_png(root / "PACE_00054_000_XYZ.png", noise(5))  # no source XYZ
    write_png(root / "PACE_00055_000_BUS_copy.png", noise(6))
    write_png(root / "again" / "PACE_00050_001_BUS.png", noise(7))  # the id of another image
    warned = {}
    records = {str(r.image.relative_to(root)): r
               for r in read_pace(root, lambda path, why: warned.setdefault(path.name, why))}
    assert records["PACE_00050_001_BUS.png"].masks == (root / "PACE_00050_001_BUS_mask.png",
                                                       root / "PACE_00050_001_BUS_mask_1.png")
    assert records["PACE_00051_002_BBR.png"].masks == (root / "Masks" / "PACE_00051_002_BBR.png",)
    assert records["PACE_00052_101_BRE.png"].masks == (root / "segmentation" / "PACE_00052_101_BRE.png",)
    assert records["PACE_00053_003_BUS.png"].problem == "unknown class code 003 in the file name"
    assert records["PACE_00054_000_XYZ.png"].problem == "unknown source code XYZ in the file name"
    assert "not a PACE name" in warned["PACE_00055_000_BUS_copy.png"]
    assert set(records) == {"PACE_00050_001_BUS.png", "PACE_00051_002_BBR.png", "PACE_00052_101_BRE.png",
                            "PACE_00053_003_BUS.png", "PACE_00054_000_XYZ.png", "again/PACE_00050_001_BUS.png"}

    report = prep.prepare({"pace": root}, tmp_path / "out")
    labels = read_csv(tmp_path / "out" / "labels.csv")
    assert sorted(r["image_id"] for r in labels) == ["PACE_00050_001_BUS", "PACE_00051_002_BBR", "PACE_00052_101_BRE"]
    assert {Path(e["path"]).relative_to(root).as_posix(): e["reason"] for e in report["errors"]} == {
        "PACE_00053_003_BUS.png": "unknown class code 003 in the file name",
        "PACE_00054_000_XYZ.png": "unknown source code XYZ in the file name",
        "again/PACE_00050_001_BUS.png":
            f"image id PACE_00050_001_BUS already used by {root / 'PACE_00050_001_BUS.png'}"}
    assert np.array_equal(read_image(tmp_path / "out" / "masks" / "PACE_00050_001_BUS.png").array,
                          box(2, 8, 2, 8) | box(10, 20, 20, 30))
    assert np.array_equal(read_image(tmp_path / "out" / "images" / "PACE_00050_001_BUS.png").array, noise(1))

    alone = tmp_path / "segmentation"  # a PACE folder named like a mask folder: its own images are images
    write_png(alone / "PACE_00056_000_BUS.png", noise(8))
    assert [(r.image_id, r.label, r.problem) for r in read_pace(alone)] == [("PACE_00056_000_BUS", "normal", "")]


def test_prepared_images_keep_their_pixels_without_alpha_and_at_16_bits(tmp_path):
    """The images a PNG source holds are written as they are, alpha dropped: an 8-bit RGBA or grey-alpha
    image as its RGB or grey pixels; a 16-bit grey or RGB image (model.io reads all 16 bits of both)
    at 16 bits. A 16-bit RGB image stopped prepare with a TypeError from Pillow before."""
    import SimpleITK as sitk
    from PIL import Image

    root = tmp_path / "PACE"
    root.mkdir()
    rgba = np.dstack([noise(1, rgb=True), np.full((H, W), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "PACE_00001_000_BUS.png")
    grey_alpha = np.dstack([noise(2), np.full((H, W), 90, np.uint8)])
    Image.fromarray(grey_alpha, "LA").save(root / "PACE_00002_000_BUS.png")
    rgb16 = np.random.default_rng(3).integers(0, 65536, (H, W, 3)).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(rgb16, isVector=True), str(root / "PACE_00003_000_BUS.png"))
    grey16 = np.random.default_rng(4).integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(grey16).save(root / "PACE_00004_000_BUS.png")
    assert read_image(root / "PACE_00003_000_BUS.png").array.dtype == np.uint16

    report = prep.prepare({"pace": root}, tmp_path / "out")
    assert report["prepared"] == 4 and not report["errors"], report["errors"]
    images = tmp_path / "out" / "images"
    for image_id, want in (("PACE_00001_000_BUS", rgba[..., :3]), ("PACE_00002_000_BUS", grey_alpha[..., 0]),
                           ("PACE_00003_000_BUS", rgb16), ("PACE_00004_000_BUS", grey16)):
        got = read_image(images / f"{image_id}.png").array
        assert got.dtype == want.dtype and got.shape == want.shape, (image_id, got.dtype, got.shape)
        assert np.array_equal(got, want), image_id


def test_a_lesion_mask_that_is_empty_or_of_another_width_is_an_error(tmp_path):
    """A benign or malignant image whose mask marks nothing has no lesion to learn from, and a mask of
    another width does not lie on the image: each is reported by name and skipped, the rest prepared."""
    root = tmp_path / "BUSI"
    write_png(root / "benign" / "benign (1).png", noise(11))
    write_png(root / "benign" / "benign (1)_mask.png", box(2, 8, 2, 8))
    write_png(root / "benign" / "benign (2).png", noise(12))
    write_png(root / "benign" / "benign (2)_mask.png", np.zeros((H, W), np.uint8))
    write_png(root / "malignant" / "malignant (1).png", noise(13))
    write_png(root / "malignant" / "malignant (1)_mask.png", box(2, 8, 2, 8, shape=(H, W + 3)))
    write_png(root / "malignant" / "malignant (2).png", noise(14))
    write_png(root / "malignant" / "malignant (2)_mask.png", box(2, 8, 2, 8, shape=(H, 1)))  # would broadcast
    report = prep.prepare({"busi": root}, tmp_path / "out")
    assert {Path(e["path"]).name: e["reason"] for e in report["errors"]} == {
        "benign (2).png": "lesion image with an empty mask",
        "malignant (1)_mask.png": f"mask size {W + 3}x{H} differs from image size {W}x{H}",
        "malignant (2)_mask.png": f"mask size 1x{H} differs from image size {W}x{H}"}
    assert [Path(r["original_path"]).name for r in read_csv(tmp_path / "out" / "labels.csv")] == ["benign (1).png"]


def test_ids_are_numbered_in_source_then_path_order(prepared):
    """n counts up over (source, original path): every BBR id before every BRE id before every BUS id
    (the paths alone sort BUSI before BrEaST)."""
    numbers = defaultdict(list)
    for r in prepared["labels"]:
        if r["source"] != "ABR" and "PACE" not in Path(r["original_path"]).parent.parts:
            numbers[r["source"]].append(int(ID.match(r["image_id"])[1]))
    assert max(numbers["BBR"]) < min(numbers["BRE"]) and max(numbers["BRE"]) < min(numbers["BUS"])
    for source, ns in numbers.items():  # and by path within a source
        paths = [r["original_path"] for r in sorted(prepared["labels"], key=lambda r: r["image_id"])
                 if r["source"] == source and int(ID.match(r["image_id"])[1]) in ns]
        assert paths == sorted(paths), source


def test_patients_of_two_sources_with_the_same_id_are_two_patients():
    """Patients are (source, patient_id): BUS-BRA's case 7 and BrEaST's case 7 are different people,
    free to land on different sides of the split; each one's images stay together."""
    rows = [{"image_id": f"{src}{k}{s}", "label": "benign", "source": src, "patient_id": str(k)}
            for src in ("BBR", "BRE") for k in range(30) for s in "ab"]
    split = prep.assign_split(rows, 0.2, 0)
    assert all(split[f"{src}{k}a"] == split[f"{src}{k}b"] for src in ("BBR", "BRE") for k in range(30))
    assert any(split[f"BBR{k}a"] != split[f"BRE{k}a"] for k in range(30))
    assert Counter(split.values())["val"] == 2 * 2 * 6  # 20 % of each source's 60 images
