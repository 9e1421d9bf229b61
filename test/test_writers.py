"""The output files of each format, written directly by model/writers.py and model/atomic_files.py
(no model, no pipeline: seconds), compared with what the module docstring of model/writers.py
promises byte for byte: the CSVs' exact text, the GC JSON files, the masks' values and geometry, the
zip's fixed layout, the files' permissions, and which files of an earlier run are named stale.

test_process.py checks the same files after whole runs (minutes); these pin the details that a run
over an untrained model cannot tell apart (a likelihood equal to another class's, a CRLF line end
that ``splitlines`` hides, a zip whose order and dates happen to be the same twice in a second).
"""
from __future__ import annotations

import json
import os
import re
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from make_fixtures import synthetic_ultrasound  # noqa: E402
from model.atomic_files import write_text, write_zip  # noqa: E402
from model.image import LoadedImage  # noqa: E402
from model.overlay import render_overlay  # noqa: E402
from model.predictor import Prediction  # noqa: E402
from model.writers import (MAX_NAME_BYTES, WRITERS, Case, fit_name, output_names,  # noqa: E402
                           stale_outputs)

# three cases whose probabilities differ in every class (a likelihood taken from the wrong class, or
# probabilities in another order, give other numbers), and one that failed
PROBS = {"a": {"normal": 0.0123456789, "benign": 0.8765432101, "malignant": 0.1111111110},
         "b": {"normal": 0.05, "benign": 0.15, "malignant": 0.8},
         "sub_c": {"normal": 0.7000004, "benign": 0.1999996, "malignant": 0.1}}


def _cases(tmp_path: Path, names=("a", "b", "sub_c"), broken=True) -> tuple[list[Case], dict[str, LoadedImage]]:
    """Cases as inference.run makes them: input files, names, predictions (mask, probabilities, label)."""
    src = tmp_path / "in"
    cases, images = [], {}
    for k, name in enumerate(names):
        rel = "sub/c.mha" if name == "sub_c" else f"{name}.png"
        img, mask = synthetic_ultrasound(37 + k, 52 + 3 * k, seed=k)
        loaded = LoadedImage(img, str(src / rel))
        if rel.endswith(".mha"):  # a MetaImage input: its geometry goes to the GC mask
            loaded = LoadedImage(img, str(src / rel), spacing=(0.3, 0.7), origin=(-5.5, 10.25),
                                 direction=(-1.0, 0.0, 0.0, 1.0), itk_suffix=".mha")
        probs = PROBS[name]
        case = Case(src / rel, rel, name, Prediction(mask, probs, max(probs, key=probs.get)))
        cases.append(case)
        images[name] = loaded
    if broken:
        cases.append(Case(src / "broken.png", "broken.png", "broken", None, "corrupt or truncated image (x)"))
    return cases, images


def _write(fmt: str, out: Path, cases, images, task="all", overlay=False):
    writer = WRITERS[fmt](out, task, overlay)
    for case in cases:
        if case.ok:
            writer.write_case(case, images[case.name], case.prediction)
    writer.finish(cases)
    return writer


def test_pace_csvs_and_masks_are_exactly_the_documented_files(tmp_path):
    """predictions.csv ``image_id,label`` with the label capitalised; probabilities.csv
    ``image_id,normal,benign,malignant`` to 6 decimals; LF line ends (as the PACE examples); failed
    cases in errors.csv only (``file,reason`` by the input's relative path); masks 0/255 pixel for
    pixel."""
    cases, images = _cases(tmp_path)
    out = tmp_path / "pace"
    _write("pace", out, cases, images)
    assert (out / "classification" / "predictions.csv").read_bytes() == (
        b"image_id,label\na,Benign\nb,Malignant\nsub_c,Normal\n")
    assert (out / "classification" / "probabilities.csv").read_bytes() == (
        b"image_id,normal,benign,malignant\n"
        b"a,0.012346,0.876543,0.111111\n"
        b"b,0.050000,0.150000,0.800000\n"
        b"sub_c,0.700000,0.200000,0.100000\n")
    assert (out / "errors.csv").read_bytes() == b"file,reason\nbroken.png,corrupt or truncated image (x)\n"
    for case in cases[:3]:
        mask = Image.open(out / "segmentation" / f"{case.name}_mask.png")
        assert mask.mode == "L"
        np.testing.assert_array_equal(np.asarray(mask), case.prediction.mask * 255, err_msg=case.name)
    assert not (out / "segmentation" / "broken_mask.png").exists()


def test_codabench_zip_is_the_same_bytes_whatever_the_order_and_time(tmp_path, monkeypatch):
    """submission.zip: classification.csv (as PACE's predictions.csv) and segmentation/<id>_mask.png,
    entries sorted whatever order the members come in, dated 1980-01-01 (not the time of the run),
    regular files readable by all (0644); PNGs stored (already compressed), the CSV deflated."""
    cases, images = _cases(tmp_path)
    out = tmp_path / "cb"
    _write("codabench", out, cases, images)
    assert (out / "classification.csv").read_bytes() == b"image_id,label\na,Benign\nb,Malignant\nsub_c,Normal\n"
    with zipfile.ZipFile(out / "submission.zip") as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["classification.csv", "segmentation/a_mask.png",
                                               "segmentation/b_mask.png", "segmentation/sub_c_mask.png"]
        for info in infos:
            assert zf.read(info) == (out / info.filename).read_bytes()
            assert info.date_time == (1980, 1, 1, 0, 0, 0), info.filename
            assert stat.S_IMODE(info.external_attr >> 16) == 0o644, info.filename
            assert info.compress_type == (zipfile.ZIP_STORED if info.filename.endswith(".png")
                                          else zipfile.ZIP_DEFLATED), info.filename
    first = (out / "submission.zip").read_bytes()
    members = {n: out / n for n in ("segmentation/sub_c_mask.png", "classification.csv", "segmentation/a_mask.png",
                                    "segmentation/b_mask.png")}  # another order
    write_zip(tmp_path / "again.zip", members)
    assert (tmp_path / "again.zip").read_bytes() == first


def test_gc_json_files_and_masks(tmp_path):
    """results.json: one entry per input, the mask's path and the classification, the input's name
    and path, and a failure's message naming its relative path; with exactly one input also
    breast-lesion-classification.json and malignancy-likelihood.json (P(malignant), not another
    class's); masks 0/1 with a MetaImage input's spacing (x, y), origin and direction."""
    cases, images = _cases(tmp_path)
    out = tmp_path / "gc"
    _write("gc", out, cases, images)
    results = json.loads((out / "results.json").read_text())
    assert [r["inputs"][0]["image"]["name"] for r in results] == ["a.png", "b.png", "c.mha", "broken.png"]
    assert [r["inputs"][0]["path"] for r in results] == [str(c.path) for c in cases]
    for r, case in zip(results[:3], cases):
        assert r["error_messages"] == []
        assert r["outputs"] == [
            {"type": "mask", "filename": f"images/breast-lesion-segmentation/{case.name}.mha"},
            {"type": "classification", "label": case.prediction.label, "probabilities": PROBS[case.name]}]
        mask = sitk.ReadImage(str(out / r["outputs"][0]["filename"]))
        assert mask.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), case.prediction.mask)
    assert results[3]["outputs"] == [] and results[3]["error_messages"] == [
        "broken.png: corrupt or truncated image (x)"]
    mha = sitk.ReadImage(str(out / "images" / "breast-lesion-segmentation" / "sub_c.mha"))
    # compressed (a 10000 x 10000 mask, mostly 0, is 100 MB uncompressed)
    assert b"CompressedData = True" in (out / "images" / "breast-lesion-segmentation" / "sub_c.mha").read_bytes()
    assert mha.GetSpacing() == pytest.approx((0.3, 0.7)) and mha.GetOrigin() == pytest.approx((-5.5, 10.25))
    assert mha.GetDirection() == pytest.approx((-1.0, 0.0, 0.0, 1.0))
    assert not (out / "breast-lesion-classification.json").exists()  # four inputs, not one

    one, images = _cases(tmp_path, names=("a",), broken=False)
    _write("gc", out, one, images)
    assert json.loads((out / "breast-lesion-classification.json").read_text()) == {
        "label": "benign", "probabilities": PROBS["a"]}
    assert json.loads((out / "malignancy-likelihood.json").read_text()) == PROBS["a"]["malignant"]
    assert not (out / "errors.csv").exists()  # the earlier run's, removed


def test_outputs_are_readable_by_others_like_any_file(tmp_path):
    """Files are written as a temporary file (mkstemp: mode 0600) then renamed: they get the mode of
    any new file (0666 less the umask, 0644 in the container), so that a grader or the host user can
    read what the container wrote, not only the container's own user."""
    from model.atomic_files import write_png

    umask = os.umask(0)
    os.umask(umask)
    write_text(tmp_path / "results.json", "[]\n")
    write_png(tmp_path / "mask.png", np.zeros((4, 4), np.uint8))
    write_zip(tmp_path / "submission.zip", {"results.json": tmp_path / "results.json"})
    for name in ("results.json", "mask.png", "submission.zip"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert 0o666 & ~umask != 0o600  # else the test could not tell the temporary file's mode apart


def test_long_names_end_in_8_hex_digits_of_the_whole_names_digest(tmp_path):
    """A name past MAX_NAME_BYTES keeps its start, cut on whole characters, then ``_`` and 8 hex
    digits of the SHA-256 of the whole name (as the module docstring says): names that differ only
    past the cut stay distinct."""
    import hashlib

    long = "é" * 125 + "x"
    got = fit_name(long)
    assert got == "é" * 113 + "_" + hashlib.sha256(long.encode()).hexdigest()[:8]
    assert len(got.encode()) <= MAX_NAME_BYTES
    assert fit_name("n" * MAX_NAME_BYTES) == "n" * MAX_NAME_BYTES
    root = Path("/in")
    names = output_names([root / f"{'é' * 125}{c}.png" for c in "xy"], root)
    assert names[0] != names[1] and all(re.fullmatch("é{113}_[0-9a-f]{8}", n) for n in names)


def test_a_segmentation_only_run_names_classification_files_that_list_other_images(tmp_path):
    """``-t seg`` writes no classification; a classification CSV left in the folder is this run's
    partner (the PACE template's ``-t cls`` run) only when it lists images and all of them are this
    run's; one that lists another image too, or none, is an earlier run's and is named. Codabench's
    classification.csv is checked like PACE's."""
    cases, images = _cases(tmp_path, names=("a", "b"), broken=False)
    out = tmp_path / "out"
    writer = _write("pace", out, cases, images, task="seg")
    for text, named in (("image_id,label\na,Benign\nb,Normal\n", False),  # the partner run's: both ours
                        ("image_id,label\na,Benign\n", False),
                        ("image_id,label\na,Benign\nother,Normal\n", True),  # lists another image too
                        ("image_id,label\n", True)):  # lists no image (an earlier run in which all failed)
        for rel in ("classification/predictions.csv", "classification.csv"):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(text)
            assert (out / rel in stale_outputs(out, cases, "seg", writer)) == named, (rel, text)
            (out / rel).unlink()


def test_a_classification_only_overlay_has_no_contour(tmp_path):
    """With ``-t cls --overlay`` the overlay shows the image and the label only: no lesion contour
    from a segmentation that the run does not output."""
    cases, images = _cases(tmp_path, names=("b",), broken=False)
    out = tmp_path / "out"
    _write("pace", out, cases, images, task="cls", overlay=True)
    pred = cases[0].prediction
    assert pred.mask.any()
    got = np.asarray(Image.open(out / "overlays" / "b.png"))
    np.testing.assert_array_equal(got, render_overlay(images["b"].array, None, pred.label, pred.probabilities))
    assert not np.array_equal(got, render_overlay(images["b"].array, pred.mask, pred.label, pred.probabilities))


def test_summary_text_is_utf8_under_an_ascii_locale(tmp_path):
    """Under LC_ALL=C with Python's UTF-8 mode off, text files were written in the locale's encoding:
    a summary naming a file such as '乳腺 1.png' could not be written, and every case then failed."""
    import subprocess

    path = tmp_path / "errors.csv"
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from model.atomic_files import write_text; "
                           "write_text(sys.argv[1], 'file,reason\\n\\u4e73\\u817a 1.png,x\\n')", str(path)],
                          cwd=str(Path(__file__).resolve().parents[1]), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert path.read_bytes().decode("utf-8") == "file,reason\n乳腺 1.png,x\n"
    # and read back as UTF-8: training's csv and json readers (evaluate reads process.py's predictions.csv)
    read = ("import sys; from pathlib import Path; from training.datasets import csv_rows; "
            "from training.read_predictions import read_pace; "
            "print(csv_rows(Path(sys.argv[1]))[0][1]['file'] == '\\u4e73\\u817a 1.png')")
    proc = subprocess.run([sys.executable, "-c", read, str(path)], cwd=str(Path(__file__).resolve().parents[1]),
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
