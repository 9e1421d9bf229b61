"""process.py (Grand Challenge and PACE formats), model/inference.py and the Cog predictor.

The model is a small untrained ensemble made with the model package's own save function
(test/make_test_model.py). Most runs go through click's CliRunner with the ensemble loaded once
(``process.load_predictor`` patched to return it); one run starts process.py as a real subprocess.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

import process  # noqa: E402
from make_fixtures import synthetic_ultrasound  # noqa: E402
from make_test_model import make_test_ensemble  # noqa: E402
from model import inference  # noqa: E402
from model import io as inference_io  # noqa: E402
from model.overlay import render_overlay  # noqa: E402
from model.writers import output_names  # noqa: E402

# the container's path again and again on the same images: a repeat batch gets what the real
# encoder gave it (test/encoder_memo.py)
pytestmark = pytest.mark.usefixtures("encoder_memo")

CLASSES = ("normal", "benign", "malignant")
MHA_SPACING = (0.3, 0.7)
MHA_ORIGIN = (-5.5, 10.25)
MHA_DIRECTION = (-1.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------
# Fixtures


def _write_inputs(root: Path) -> dict[str, tuple[int, int]]:
    """Odd sizes and modes; returns {file name: (height, width)}."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = {}

    def img(h, w, seed):
        return synthetic_ultrasound(h, w, seed)[0]

    g = img(67, 93, 11)
    Image.fromarray(g).save(root / "grey_odd.png")
    sizes["grey_odd.png"] = (67, 93)
    rgb = np.stack([img(51, 77, 12)] * 3, axis=-1)
    rgb[..., 2] = rgb[..., 2] // 2  # not grey
    Image.fromarray(rgb).save(root / "colour.png")
    sizes["colour.png"] = (51, 77)
    rgba = np.concatenate([np.stack([img(45, 61, 13)] * 3, -1), np.full((45, 61, 1), 200, np.uint8)], -1)
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba).save(root / "nested" / "deeper" / "alpha.png")
    assert Image.open(root / "nested" / "deeper" / "alpha.png").mode == "RGBA"
    sizes["alpha.png"] = (45, 61)
    Image.fromarray(np.stack([img(59, 83, 14)] * 3, -1)).save(root / "photo.JPEG", quality=90)
    sizes["photo.JPEG"] = (59, 83)
    m = sitk.GetImageFromArray(img(41, 55, 15))
    m.SetSpacing(MHA_SPACING)
    m.SetOrigin(MHA_ORIGIN)
    m.SetDirection(MHA_DIRECTION)
    sitk.WriteImage(m, str(root / "scan.mha"), useCompression=True)
    sizes["scan.mha"] = (41, 55)
    return sizes


@pytest.fixture(scope="session")
def ensemble_dir(tmp_path_factory) -> Path:
    return make_test_ensemble(tmp_path_factory.mktemp("ensemble") / "ens")


@pytest.fixture(scope="session")
def predictor(ensemble_dir):
    return inference.load_predictor(ensemble_dir, device="cpu", batch_size=4)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs") / "in"
    return root, _write_inputs(root)


def _invoke_with(predictor, args) -> object:
    """process.py's click command in-process, ``load_predictor`` answering with ``predictor``."""
    calls = []

    def fake_load(model_dir=None, device="auto", batch_size=4, tta=False, precision="auto", compile_backend=None,
                  runtime="auto", class_prior=None):
        calls.append({"model_dir": model_dir, "device": device, "batch_size": batch_size, "tta": tta,
                      "precision": precision, "compile_backend": compile_backend, "runtime": runtime,
                      "class_prior": class_prior})
        predictor.batch_size, predictor.tta = batch_size, tta
        return predictor

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(process, "load_predictor", fake_load)
        try:
            args = [*map(str, args)]
            quiet = [] if {"--progress", "--no-progress"} & set(args) else ["--no-progress"]
            result = CliRunner().invoke(process.main, [*args, *quiet], catch_exceptions=False)
        finally:
            predictor.batch_size, predictor.tta = 4, False
    result.calls = calls
    return result


@pytest.fixture
def cli(predictor):
    """Run process.py in-process with the preloaded ensemble: ``cli("-i", d, "-o", out, ...)``."""
    return lambda *args: _invoke_with(predictor, args)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _stem(name: str) -> str:
    return Path(name).stem


# ------------------------------------------------------------------------------------------
# Grand Challenge format (a real subprocess, the real model loading path)


@pytest.fixture(scope="module")
def gc_run(inputs, ensemble_dir, tmp_path_factory):
    root, sizes = inputs
    out = tmp_path_factory.mktemp("gc") / "out"
    proc = subprocess.run([sys.executable, str(REPO / "process.py"), "-i", str(root), "-o", str(out),
                           "--model-dir", str(ensemble_dir), "-d", "cpu", "--batch-size", "2"],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO / "test"))
    return proc, out, sizes


def test_gc_exit_code_progress_and_file_names(gc_run):
    proc, out, sizes = gc_run
    assert proc.returncode == 0, proc.stderr
    assert "5 of 5 images processed" in proc.stdout
    assert proc.stderr == ""  # a clean Grand Challenge job: nothing it would mark as a warning
    assert "100%" not in proc.stderr and "\r" not in proc.stderr  # stderr is a log here, not a terminal: no bar
    expected = {f"images/breast-lesion-segmentation/{_stem(n)}.mha" for n in sizes} | {"results.json"}
    assert set(_files(out)) == expected  # no errors.csv, no single-case files, no temporary files


def test_gc_masks_have_the_inputs_geometry(gc_run, inputs):
    _, out, sizes = gc_run
    root, _ = inputs
    for name, (h, w) in sizes.items():
        mask = sitk.ReadImage(str(out / "images" / "breast-lesion-segmentation" / f"{_stem(name)}.mha"))
        arr = sitk.GetArrayFromImage(mask)
        assert arr.shape == (h, w) and arr.dtype == np.uint8, name
        assert set(np.unique(arr).tolist()) <= {0, 1}, name
        if name.endswith(".mha"):
            assert mask.GetSpacing() == pytest.approx(MHA_SPACING)
            assert mask.GetOrigin() == pytest.approx(MHA_ORIGIN)
            assert mask.GetDirection() == pytest.approx(MHA_DIRECTION)
        else:
            assert mask.GetSpacing() == (1.0, 1.0) and mask.GetOrigin() == (0.0, 0.0)


def test_gc_results_json(gc_run):
    _, out, sizes = gc_run
    results = json.loads((out / "results.json").read_text())
    assert len(results) == len(sizes)
    assert {r["inputs"][0]["image"]["name"] for r in results} == set(sizes)
    for r in results:
        name = r["inputs"][0]["image"]["name"]
        assert Path(r["inputs"][0]["path"]).name == name
        assert r["error_messages"] == []
        mask, cls = r["outputs"]
        assert mask == {"type": "mask", "filename": f"images/breast-lesion-segmentation/{_stem(name)}.mha"}
        assert cls["type"] == "classification" and set(cls["probabilities"]) == set(CLASSES)
        assert math.isclose(sum(cls["probabilities"].values()), 1.0, abs_tol=1e-5)
        assert cls["label"] == max(cls["probabilities"], key=cls["probabilities"].get)


def test_progress_bar_when_asked_for(cli, tmp_path):
    res = cli("-i", _one_image(tmp_path), "-o", tmp_path / "out", "--progress")
    assert res.exit_code == 0 and "100%" in res.stderr and "1/1" in res.stderr
    (tmp_path / "two").mkdir()
    d = _one_image(tmp_path / "two")  # an image that cannot be read counts as done too
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    res = cli("-i", d, "-o", tmp_path / "out2", "--progress")
    assert res.exit_code == 3 and "100%" in res.stderr and "2/2" in res.stderr, res.stderr


def test_gc_single_input_writes_the_case_json_files(cli, inputs, tmp_path):
    root, _ = inputs
    single = tmp_path / "in" / "images" / "breast-ultrasound-image"
    single.mkdir(parents=True)
    (single / "scan.mha").write_bytes((root / "scan.mha").read_bytes())
    out = tmp_path / "out"
    res = cli("-i", tmp_path / "in", "-o", out)
    assert res.exit_code == 0, res.output
    cls = json.loads((out / "breast-lesion-classification.json").read_text())
    likelihood = json.loads((out / "malignancy-likelihood.json").read_text())
    entry = json.loads((out / "results.json").read_text())[0]
    assert cls["label"] == entry["outputs"][1]["label"]
    assert cls["probabilities"] == pytest.approx(entry["outputs"][1]["probabilities"])
    assert isinstance(likelihood, float) and likelihood == pytest.approx(cls["probabilities"]["malignant"])
    assert (out / "images" / "breast-lesion-segmentation" / "scan.mha").is_file()
    # a later run with several inputs into the same folder removes the one-input answer
    res = cli("-i", root, "-o", out)
    assert res.exit_code == 0, res.output
    assert len(json.loads((out / "results.json").read_text())) > 1
    assert not (out / "breast-lesion-classification.json").exists() and not (out / "malignancy-likelihood.json").exists()


def test_gc_two_one_task_runs_into_one_folder_list_both_tasks(cli, inputs, tmp_path, monkeypatch):
    """The PACE template's -t seg and -t cls runs into one folder, in either order: the second run's
    results.json lists both tasks' outputs of each input, as one run of both does; the one-input
    answer files stand beside a seg run after a cls run of that input, not of another."""
    root, sizes = inputs
    both = tmp_path / "both"
    assert cli("-i", root, "-o", both).exit_code == 0
    expected = json.loads((both / "results.json").read_text())
    for first, second in (("seg", "cls"), ("cls", "seg")):
        out = tmp_path / f"{first}-{second}"
        for task in (first, second):
            res = cli("-i", root, "-o", out, "-t", task)
            assert res.exit_code == 0 and "not written by this run" not in res.output, res.output
            other = "segmentation" if task == "cls" else "classification"
            note = f"also holds the {other} of {len(sizes)} of these inputs from an earlier run in {out}"
            assert (note in res.output) == (task == second), (task, res.output)  # said when carried over
        assert json.loads((out / "results.json").read_text()) == expected, (first, second)
    # an earlier run's mask that is gone is not listed; an earlier run of other inputs adds nothing
    out = tmp_path / "seg-cls"
    gone = out / "images" / "breast-lesion-segmentation" / f"{_stem(sorted(sizes)[0])}.mha"
    gone.unlink()
    assert cli("-i", root, "-o", out, "-t", "cls").exit_code == 0
    listed = {r["inputs"][0]["image"]["name"]: [o["type"] for o in r["outputs"]]
              for r in json.loads((out / "results.json").read_text())}
    assert listed[sorted(sizes)[0]] == ["classification"]
    assert all(v == ["mask", "classification"] for k, v in listed.items() if k != sorted(sizes)[0])
    single = tmp_path / "single"
    (single / "in").mkdir(parents=True)
    (single / "in" / "scan.mha").write_bytes((root / "scan.mha").read_bytes())
    assert cli("-i", single / "in", "-o", single / "out", "-t", "cls").exit_code == 0
    answer = (single / "out" / "breast-lesion-classification.json").read_text()
    assert cli("-i", single / "in", "-o", single / "out", "-t", "seg").exit_code == 0
    assert (single / "out" / "breast-lesion-classification.json").read_text() == answer
    entry = json.loads((single / "out" / "results.json").read_text())[0]
    assert [o["type"] for o in entry["outputs"]] == ["mask", "classification"]
    results = single / "out" / "results.json"  # an earlier answer that is not whole (NaN, a bool) is not carried
    assert cli("-i", single / "in", "-o", single / "out", "-t", "cls").exit_code == 0
    for bad in ({"normal": float("nan"), "benign": 0.5, "malignant": 0.5}, {"normal": True, "benign": 0, "malignant": 0}):
        entries = json.loads(results.read_text())
        entries[0]["outputs"][-1]["probabilities"] = bad
        results.write_text(json.dumps(entries))
        assert cli("-i", single / "in", "-o", single / "out", "-t", "seg").exit_code == 0
        assert [o["type"] for o in json.loads(results.read_text())[0]["outputs"]] == ["mask"], bad
        assert not (single / "out" / "breast-lesion-classification.json").exists()
    monkeypatch.chdir(single)  # the same input given relative by one run, absolute by the other
    for first, second in (("in", single / "in"), (single / "in", "./in/../in")):
        assert cli("-i", first, "-o", single / "out", "-t", "cls").exit_code == 0
        assert cli("-i", second, "-o", single / "out", "-t", "seg").exit_code == 0
        entry = json.loads(results.read_text())[0]
        assert [o["type"] for o in entry["outputs"]] == ["mask", "classification"], (first, second)
        assert (single / "out" / "breast-lesion-classification.json").is_file()
    other = _one_image(single)
    assert cli("-i", other, "-o", single / "out", "-t", "seg").exit_code == 0
    assert not (single / "out" / "breast-lesion-classification.json").exists()
    entry = json.loads((single / "out" / "results.json").read_text())[0]
    assert [o["type"] for o in entry["outputs"]] == ["mask"]


# ------------------------------------------------------------------------------------------
# PACE format


@pytest.fixture(scope="module")
def pace_run(predictor, inputs, tmp_path_factory):
    root, sizes = inputs
    out = tmp_path_factory.mktemp("pace") / "out"
    res = _invoke_with(predictor, ("-i", root, "-o", out, "--format", "pace", "--overlay", "--logits", "--batch-size",
                                   "2"))  # as gc_run; with overlays and logits
    return res, out, sizes


def test_pace_masks_csvs_and_overlays(pace_run):
    res, out, sizes = pace_run
    assert res.exit_code == 0, res.output
    assert res.calls[-1]["batch_size"] == 2
    stems = sorted(_stem(n) for n in sizes)
    assert _files(out) == sorted(
        ["classification/predictions.csv", "classification/probabilities.csv"]
        + [f"segmentation/{s}_mask.png" for s in stems] + [f"overlays/{s}.png" for s in stems]
        + [f"logits/{s}.npy" for s in stems])
    for name, (h, w) in sizes.items():
        mask = Image.open(out / "segmentation" / f"{_stem(name)}_mask.png")
        assert mask.size == (w, h) and mask.mode == "L"
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        overlay = Image.open(out / "overlays" / f"{_stem(name)}.png")
        assert overlay.size == (w, h) and overlay.mode == "RGB"
    text = (out / "classification" / "predictions.csv").read_text().splitlines()
    assert text[0] == "image_id,label"
    rows = list(csv.DictReader(open(out / "classification" / "predictions.csv")))
    assert sorted(r["image_id"] for r in rows) == stems
    assert {r["label"] for r in rows} <= {"Normal", "Benign", "Malignant"}
    assert (out / "classification" / "probabilities.csv").read_text().splitlines()[0] == "image_id,normal,benign,malignant"
    probs = {r["image_id"]: r for r in csv.DictReader(open(out / "classification" / "probabilities.csv"))}
    assert sorted(probs) == stems
    for r in rows:
        p = {k: float(probs[r["image_id"]][k]) for k in CLASSES}
        assert math.isclose(sum(p.values()), 1.0, abs_tol=1e-5)
        assert r["label"].lower() == max(p, key=p.get)


def test_pace_outputs_are_the_predictors_answers(pace_run, predictor, inputs):
    """Each image's mask, label and probabilities in the PACE files are what the predictor answers for
    that image alone (probabilities to the 6 decimals written, and the float rounding of a batch of two), not only well-formed."""
    res, out, sizes = pace_run
    root, _ = inputs
    labels = {r["image_id"]: r["label"] for r in csv.DictReader(open(out / "classification" / "predictions.csv"))}
    probs = {r["image_id"]: r for r in csv.DictReader(open(out / "classification" / "probabilities.csv"))}
    for path in sorted(root.rglob("*.*")):
        pred = predictor.predict_one(inference_io.read_image(path).array)
        name = _stem(path.name)
        assert labels[name] == pred.label.capitalize(), name
        for k in CLASSES:
            assert float(probs[name][k]) == pytest.approx(pred.probabilities[k], abs=2e-6), (name, k)
        mask = np.asarray(Image.open(out / "segmentation" / f"{name}_mask.png"))
        np.testing.assert_array_equal(mask, pred.mask * 255, err_msg=name)


def test_pace_and_gc_agree(pace_run, gc_run):
    _, pace_out, sizes = pace_run
    _, gc_out, _ = gc_run
    results = {r["inputs"][0]["image"]["name"]: r for r in json.loads((gc_out / "results.json").read_text())}
    labels = {r["image_id"]: r["label"] for r in csv.DictReader(open(pace_out / "classification" / "predictions.csv"))}
    for name in sizes:
        gc_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(gc_out / results[name]["outputs"][0]["filename"])))
        pace_mask = np.asarray(Image.open(pace_out / "segmentation" / f"{_stem(name)}_mask.png"))
        np.testing.assert_array_equal(gc_mask * 255, pace_mask)
        assert labels[_stem(name)].lower() == results[name]["outputs"][1]["label"]


@pytest.mark.slow  # two more process runs; test.sh's "pace" run does the same in the container
def test_main_py_runs_the_pace_template_command(inputs, ensemble_dir, pace_run, tmp_path):
    """The PACE template's command line, ``python main.py -i IN -o OUT -t seg|cls -d ...``, as a
    real process: the PACE layout by default, the same masks and labels as process.py --format pace."""
    root, sizes = inputs
    _, pace_out, _ = pace_run
    for task, expected in (("seg", [f"segmentation/{_stem(n)}_mask.png" for n in sizes]),
                           ("cls", ["classification/predictions.csv", "classification/probabilities.csv"])):
        out = tmp_path / task
        proc = subprocess.run([sys.executable, "main.py", "-i", str(root), "-o", str(out), "-t", task, "-d", "cpu",
                               "--model-dir", str(ensemble_dir), "--batch-size", "2"],
                              capture_output=True, text=True, timeout=300, cwd=str(REPO))
        assert proc.returncode == 0, proc.stderr
        assert _files(out) == sorted(expected)
        for f in expected:
            if f.endswith(".png"):
                np.testing.assert_array_equal(np.asarray(Image.open(out / f)), np.asarray(Image.open(pace_out / f)))
            elif f.endswith("predictions.csv"):
                assert (out / f).read_text() == (pace_out / f).read_text()
    usage = subprocess.run([sys.executable, "main.py", "--help"], capture_output=True, text=True, cwd=str(REPO))
    assert usage.returncode == 0 and "Usage: main.py" in usage.stdout and "[default: pace]" in usage.stdout


@pytest.mark.parametrize("entry", ["process.py", "main.py"])
def test_version_names_the_product_and_its_torch(entry):
    import torch

    import model

    proc = subprocess.run([sys.executable, entry, "--version"], capture_output=True, text=True, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"PF-SAM BUS {model.__version__} ") and f"torch {torch.__version__}" in proc.stdout
    assert re.fullmatch(r"\d+\.\d+\.\d+", model.__version__)


def test_main_run_in_process_gives_the_callers_sigterm_handler_back(cli, inputs, tmp_path, monkeypatch):
    """process.main installs its SIGTERM handler for the run only: called in-process (a test suite, a
    notebook), the caller's own handler is back afterwards, after a failed run as after a finished one."""
    import signal

    def callers_handler(signum, frame):
        pass

    seen = []
    real_find_inputs = process.find_inputs

    def find_inputs(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_find_inputs(*args, **kwargs)

    monkeypatch.setattr(process, "find_inputs", find_inputs)
    before = signal.signal(signal.SIGTERM, callers_handler)
    try:
        missing = CliRunner().invoke(process.main, ["-i", str(tmp_path / "missing"), "-o", str(tmp_path / "o1")])
        assert missing.exit_code == 1 and "missing" in missing.output
        assert signal.getsignal(signal.SIGTERM) is callers_handler
        finished = cli("-i", inputs[0], "-o", tmp_path / "o2", "-d", "cpu")
        assert finished.exit_code == 0, finished.output
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert seen == [process._stop, process._stop]  # during the run, its own handler


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_stops_the_run_promptly_and_keeps_what_is_written(tmp_path, sig):
    """docker stop sends SIGTERM, which Python as a container's PID 1 ignored until the SIGKILL 10 s
    later: now it ends the run at once (exit 143) with no temporary file left and the written masks whole.
    Ctrl-C (SIGINT) the same, the process then ending by SIGINT itself (the shell's 130), so that a shell
    loop over runs stops too (an exit 130, or click's exit 1, let bash go on to the next run)."""
    import signal
    import time

    sig = getattr(signal, sig)

    d = tmp_path / "in"
    d.mkdir()
    for k in range(40):
        Image.fromarray(synthetic_ultrasound(300, 400, k)[0]).save(d / f"case{k:02d}.png")
    out = tmp_path / "out"
    # SIGINT at its default in the child, as under a terminal: a background job of a non-interactive shell
    # (a CI runner) starts with it ignored, and Python then never turns it into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "process.py", "-i", str(d), "-o", str(out), "--format", "pace",
                             "-d", "cpu", "--no-progress"], cwd=str(REPO), stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list((out / "segmentation").glob("*_mask.png")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), err[-2000:]
    assert time.monotonic() - t0 < 10 and f"stopped by {sig.name}" in err
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], list(out.rglob("*"))  # no temporary file
    masks = sorted((out / "segmentation").glob("*_mask.png"))
    assert 1 <= len(masks) < 40
    for m in masks:
        assert np.asarray(Image.open(m)).shape == (300, 400)


def test_codabench_format_is_the_validation_phase_upload(cli, pace_run, inputs, tmp_path):
    """submission.zip holds classification.csv (image_id,label) and segmentation/<id>_mask.png, nothing
    else, equal to the files beside it and to the PACE outputs; a failed case is in neither; the
    same predictions give the same zip bytes."""
    import zipfile

    root, sizes = inputs
    _, pace_out, _ = pace_run
    d = tmp_path / "in"
    shutil.copytree(root, d)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    res = cli("-i", d, "-o", out, "--format", "codabench", "--batch-size", "2")
    assert res.exit_code == 3, res.output  # the broken file failed, the others were written
    stems = sorted(_stem(n) for n in sizes)
    masks = [f"segmentation/{s}_mask.png" for s in stems]
    assert _files(out) == sorted(["classification.csv", "errors.csv", "submission.zip"] + masks)
    assert (out / "classification.csv").read_text() == (pace_out / "classification" / "predictions.csv").read_text()
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert zf.testzip() is None
        assert zf.namelist() == sorted(["classification.csv"] + masks)
        for name in zf.namelist():
            assert zf.read(name) == (out / name).read_bytes()
    for m in masks:
        np.testing.assert_array_equal(np.asarray(Image.open(out / m)), np.asarray(Image.open(pace_out / m)))
    first = (out / "submission.zip").read_bytes()
    assert cli("-i", d, "-o", out, "--format", "codabench", "--batch-size", "2", "--logits").exit_code == 3
    assert (out / "submission.zip").read_bytes() == first  # the logits beside it, not in it
    assert _files(out / "logits") == [f"{s}.npy" for s in stems]
    seg_only = cli("-i", root, "-o", tmp_path / "seg", "--format", "codabench", "-t", "seg")
    assert seg_only.exit_code == 0
    with zipfile.ZipFile(tmp_path / "seg" / "submission.zip") as zf:
        assert zf.namelist() == masks
    # the template's two one-task runs into one folder, in either order: the second run's zip holds both
    # tasks' files of its images, as one run of both tasks writes them (the masks of the failed case aside)
    for first, second, folder in (("seg", "cls", tmp_path / "seg"), ("cls", "seg", tmp_path / "cls-seg")):
        if first == "cls":
            assert cli("-i", root, "-o", folder, "--format", "codabench", "-t", first).exit_code == 0
        res = cli("-i", root, "-o", folder, "--format", "codabench", "-t", second)
        assert res.exit_code == 0 and "not written by this run" not in res.output, res.output
        other = "segmentation" if second == "cls" else "classification"
        assert f"also holds the {other} of {len(masks)} of these inputs from an earlier run" in res.output, res.output
        with zipfile.ZipFile(folder / "submission.zip") as zf:
            assert zf.namelist() == sorted(["classification.csv"] + masks), (first, second)
            for name in zf.namelist():
                assert zf.read(name) == (out / name).read_bytes(), (first, second, name)
    other = tmp_path / "other"  # a classification.csv of other images is not this run's: warned, not zipped
    assert cli("-i", _one_image(tmp_path), "-o", other, "--format", "codabench", "-t", "cls").exit_code == 0
    res = cli("-i", root, "-o", other, "--format", "codabench", "-t", "seg")
    assert res.exit_code == 0 and "classification.csv" in res.output, res.output
    with zipfile.ZipFile(other / "submission.zip") as zf:
        assert zf.namelist() == masks


# ------------------------------------------------------------------------------------------
# Tasks


def _one_image(tmp_path: Path) -> Path:
    d = tmp_path / "one"
    d.mkdir()
    Image.fromarray(synthetic_ultrasound(50, 70, 21)[0]).save(d / "case.png")
    return d


def test_task_seg_writes_only_segmentation(cli, tmp_path):
    d = _one_image(tmp_path)
    res = cli("-i", d, "-o", tmp_path / "gc", "-t", "seg")
    assert res.exit_code == 0, res.output
    assert _files(tmp_path / "gc") == ["images/breast-lesion-segmentation/case.mha", "results.json"]
    entry = json.loads((tmp_path / "gc" / "results.json").read_text())[0]
    assert [o["type"] for o in entry["outputs"]] == ["mask"]
    res = cli("-i", d, "-o", tmp_path / "pace", "-t", "seg", "--format", "pace")
    assert res.exit_code == 0, res.output
    assert _files(tmp_path / "pace") == ["segmentation/case_mask.png"]


def test_task_cls_writes_only_classification(cli, tmp_path):
    d = _one_image(tmp_path)
    res = cli("-i", d, "-o", tmp_path / "gc", "-t", "cls")
    assert res.exit_code == 0, res.output
    assert _files(tmp_path / "gc") == ["breast-lesion-classification.json", "malignancy-likelihood.json",
                                       "results.json"]
    entry = json.loads((tmp_path / "gc" / "results.json").read_text())[0]
    assert [o["type"] for o in entry["outputs"]] == ["classification"]
    res = cli("-i", d, "-o", tmp_path / "pace", "-t", "cls", "--format", "pace", "--tta")
    assert res.exit_code == 0, res.output
    assert res.calls[-1]["tta"] is True
    assert _files(tmp_path / "pace") == ["classification/predictions.csv", "classification/probabilities.csv"]


def test_logits_are_each_masks_lesion_logits_at_its_size(cli, predictor, pace_run, inputs, tmp_path):
    """--logits: logits/<name>.npy beside each mask, float16 at the mask's height x width, above 0
    exactly where the mask is (threshold 0.5), in the PACE and the GC layout (the mha's mask in its
    geometry, the logits as its pixel array). A later run without --logits removes the logits of the
    images it writes and names the ones it did not; ``-t cls`` writes none; the shared predictor is
    left as it was."""
    root, sizes = inputs
    res = cli("-i", root, "-o", tmp_path / "gc", "--logits", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    assert predictor.keep_logits is False
    signs = set()
    for fmt, out in (("pace", pace_run[1]), ("gc", tmp_path / "gc")):
        assert _files(out / "logits") == sorted(f"{_stem(n)}.npy" for n in sizes)
        for name, (h, w) in sizes.items():
            logits = np.load(out / "logits" / f"{_stem(name)}.npy", allow_pickle=False)
            assert logits.dtype == np.float16 and logits.shape == (h, w), name
            if fmt == "gc":
                mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / "breast-lesion-segmentation"
                                                                 / f"{_stem(name)}.mha")))
            else:
                mask = np.asarray(Image.open(out / "segmentation" / f"{_stem(name)}_mask.png")) // 255
            np.testing.assert_array_equal(logits > 0, mask == 1, err_msg=name)
            assert np.isfinite(logits).all() and len(np.unique(logits)) > 10, name  # a map, not a mask's sign
            signs |= set(np.sign(logits.astype(np.float32)).ravel().tolist())
    assert {-1.0, 1.0} <= signs  # lesion and background pixels among the images
    d, out = _one_image(tmp_path), tmp_path / "again"
    assert cli("-i", d, "-o", out, "--format", "pace", "--logits").exit_code == 0
    assert _files(out / "logits") == ["case.npy"]
    np.save(out / "logits" / "other.npy", np.zeros((2, 2), np.float16))  # not this image's
    res = cli("-i", d, "-o", out, "--format", "pace")
    assert res.exit_code == 0, res.output
    assert _files(out / "logits") == ["other.npy"]
    assert "1 file in" in res.output and "logits/other.npy" in res.output
    res = cli("-i", d, "-o", tmp_path / "cls", "--format", "pace", "-t", "cls", "--logits")
    assert res.exit_code == 0, res.output
    assert _files(tmp_path / "cls") == ["classification/predictions.csv", "classification/probabilities.csv"]
    assert "note: --logits writes nothing with -t cls" in res.output  # it was dropped without a word


def test_a_file_named_logits_in_the_output_folder_stops_only_a_run_that_writes_logits(cli, tmp_path):
    """A run without --logits removes an earlier run's logits from logits/, and must not fail its
    cases where logits is a file, not such a folder; a run with --logits is refused before the model
    loads, naming it."""
    d, out = _one_image(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "logits").write_text("not a folder")
    res = cli("-i", d, "-o", out, "--format", "pace")
    assert res.exit_code == 0, res.output
    assert _files(out / "segmentation") == ["case_mask.png"] and (out / "logits").read_text() == "not a folder"
    res = cli("-i", d, "-o", out, "--format", "pace", "--logits")
    assert res.exit_code == 1 and "an earlier run left a file there, not a folder" in res.output, res.output


def test_runtime_precision_and_compile_options_reach_the_predictor(cli, tmp_path):
    d = _one_image(tmp_path)
    res = cli("-i", d, "-o", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert (res.calls[-1]["runtime"], res.calls[-1]["precision"], res.calls[-1]["compile_backend"]) == \
        ("auto", "auto", None)
    res = cli("-i", d, "-o", tmp_path / "b", "--runtime", "torch", "--precision", "fp32", "--compile")
    assert res.exit_code == 0, res.output
    assert (res.calls[-1]["runtime"], res.calls[-1]["precision"], res.calls[-1]["compile_backend"]) == \
        ("torch", "fp32", "inductor")
    assert cli("-i", d, "-o", tmp_path / "c", "--runtime", "tensorrt").exit_code == 2  # refused by the CLI
    res = cli("-i", d, "-o", tmp_path / "d", "--model-dir", tmp_path / "my-ensemble", "-d", "cpu")
    assert res.exit_code == 0, res.output
    assert (res.calls[-1]["model_dir"], res.calls[-1]["device"]) == (tmp_path / "my-ensemble", "cpu")
    # options that cannot run together: a usage error before the model loads (--compile --runtime onnx
    # loaded it, then failed every image with torch's "This is a bug" guard assertion, exit 1)
    for args, reason in ((["--compile", "--runtime", "onnx"], "--compile runs the encoder in PyTorch: not with "
                                                                "--runtime onnx"),
                         (["--runtime", "onnx", "--precision", "bf16"], "in fp32 only (not with --precision bf16)"),
                         (["--runtime", "onnx", "-d", "gpu"], "on the CPU in fp32 only (not with -d gpu)")):
        res = cli("-i", d, "-o", tmp_path / "e", *args)
        assert res.exit_code == 2 and reason in res.output and not res.calls, (args, res.output)
    assert not (tmp_path / "e").exists()


def test_ctrl_c_stops_the_run_with_exit_130_keeping_what_is_written(cli, tmp_path, monkeypatch):
    """Ctrl-C gave click's bare "Aborted!" and exit 1, the status of a run that processed nothing;
    now it is reported as SIGTERM is, exit 130 (128 + SIGINT)."""
    d = _one_image(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(process, "run", interrupted)
    res = cli("-i", d, "-o", tmp_path / "out")
    assert res.exit_code == 130 and "stopped by SIGINT: outputs written so far are kept" in res.output, res.output
    assert "Aborted" not in res.output


def test_a_stopped_run_says_that_the_summary_in_the_folder_is_an_earlier_runs(cli, inputs, tmp_path, monkeypatch):
    """A run stopped (Ctrl-C, SIGTERM) after writing some masks into a folder that an earlier run filled
    left that run's predictions.csv beside them without a word (a grader reads it as this run's). It is
    kept (a -t cls run's answers beside a stopped -t seg run's masks are still its answers) and named in a
    note; a run stopped before writing anything says nothing and leaves every file as it was."""
    import model.inference as inference

    root, sizes = inputs
    out = tmp_path / "out"
    d = tmp_path / "in"
    shutil.copytree(root, d)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # so that there is an errors.csv
    assert cli("-i", d, "-o", out, "--format", "pace").exit_code == 3
    summary = ["classification/predictions.csv", "classification/probabilities.csv", "errors.csv"]
    before = {f: (out / f).read_bytes() for f in summary}
    real = inference._predict
    for calls_before_stop, said in ((0, False), (1, True)):
        calls = []

        def stopped(predictor, arrays):
            calls.append(1)
            if len(calls) > calls_before_stop:
                raise KeyboardInterrupt
            return real(predictor, arrays)

        monkeypatch.setattr(inference, "_predict", stopped)
        res = cli("-i", d, "-o", out, "--format", "pace", "--batch-size", "1")
        assert res.exit_code == 130, res.output
        note = (f"note: predictions.csv, probabilities.csv, errors.csv in {out} are an earlier run's: this run, "
                "stopped, wrote some of its outputs but not its own summary")
        assert (note in res.output) == said, res.output
        assert {f: (out / f).read_bytes() for f in summary} == before  # nothing of the earlier run lost
        assert len(list((out / "segmentation").glob("*_mask.png"))) == len(sizes)


# ------------------------------------------------------------------------------------------
# Failures and exit codes


def test_some_cases_failing_exits_3_and_reports_them(cli, tmp_path):
    d = _one_image(tmp_path)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (d / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    res = cli("-i", d, "-o", out, "--format", "gc")
    assert res.exit_code == 3, res.output
    assert "broken.png" in res.stderr and "empty.jpg" in res.stderr
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert [e["file"] for e in errors] == ["broken.png", "empty.jpg"]
    assert "empty" in errors[1]["reason"]
    results = {r["inputs"][0]["image"]["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert results["case.png"]["error_messages"] == [] and len(results["case.png"]["outputs"]) == 2
    assert results["broken.png"]["outputs"] == [] and results["broken.png"]["error_messages"]
    assert (out / "images" / "breast-lesion-segmentation" / "case.mha").is_file()
    assert not (out / "breast-lesion-classification.json").exists()  # three inputs, not one
    # the same folder in PACE format: errors.csv too, the good case in the CSVs
    res = cli("-i", d, "-o", tmp_path / "pace", "--format", "pace")
    assert res.exit_code == 3
    assert [e["file"] for e in csv.DictReader(open(tmp_path / "pace" / "errors.csv"))] == ["broken.png", "empty.jpg"]
    assert [r["image_id"] for r in csv.DictReader(open(tmp_path / "pace" / "classification" / "predictions.csv"))] == ["case"]
    # a later clean run into the same folder removes the stale errors.csv
    (d / "broken.png").unlink()
    (d / "empty.jpg").unlink()
    assert cli("-i", d, "-o", out).exit_code == 0
    assert not (out / "errors.csv").exists()


def test_files_an_earlier_run_left_in_the_output_folder_are_named_in_a_warning(cli, tmp_path):
    d = _one_image(tmp_path)
    Image.fromarray(synthetic_ultrasound(33, 44, 3)[0]).save(d / "other.png")
    out = tmp_path / "out"
    res = cli("-i", d, "-o", out, "--format", "pace")
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    assert "warning" not in cli("-i", d, "-o", out, "--format", "pace").output  # the same files again
    (d / "other.png").write_bytes(b"")  # now it fails: its mask from the first run is left, and named
    res = cli("-i", d, "-o", out, "--format", "pace", "--overlay")
    assert res.exit_code == 3
    assert f"warning: 1 file in {out} was not written by this run (an earlier run's?): segmentation/other_mask.png" \
        in res.output
    assert _files(out / "segmentation") == ["case_mask.png", "other_mask.png"]  # nothing is deleted
    res = cli("-i", d / "case.png", "-o", out, "--format", "gc")
    assert f"warning: 3 files in {out} were not written by this run (an earlier run's?): overlays/case.png, " \
           "segmentation/case_mask.png, segmentation/other_mask.png" in res.output


def test_a_segmentation_only_run_names_an_earlier_runs_classification_files(cli, tmp_path):
    d = _one_image(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(synthetic_ultrasound(40, 60, 5)[0]).save(other / "scan.png")
    out = tmp_path / "pace"
    assert cli("-i", other, "-o", out, "--format", "pace").exit_code == 0
    res = cli("-i", d, "-o", out, "--format", "pace", "-t", "seg")
    assert res.exit_code == 0, res.output
    assert f"warning: 3 files in {out} were not written by this run (an earlier run's?): " \
           "classification/predictions.csv, classification/probabilities.csv, segmentation/scan_mask.png" \
           in res.output
    assert (out / "classification" / "predictions.csv").is_file()  # named, not deleted
    assert "warning" not in cli("-i", d, "-o", tmp_path / "fresh", "--format", "pace", "-t", "seg").output


def test_the_pace_templates_two_runs_into_one_folder_warn_of_nothing(cli, tmp_path):
    """The PACE template runs ``main.py -i /input -o /output -t seg`` and ``-t cls`` into one output
    folder: each run found the other's files for the same images and warned that an earlier run had
    left them. Only files for other images are named (the seg run's logits too, with --logits)."""
    d = _one_image(tmp_path)
    out = tmp_path / "out"
    for task in ("seg", "cls", "seg", "cls"):  # either order, and again
        res = cli("-i", d, "-o", out, "--format", "pace", "-t", task, "--logits")
        assert res.exit_code == 0 and "warning" not in res.output, (task, res.output)
    assert _files(out) == ["classification/predictions.csv", "classification/probabilities.csv",
                           "logits/case.npy", "segmentation/case_mask.png"]
    Image.fromarray(synthetic_ultrasound(40, 60, 5)[0]).save(d / "scan.png")
    assert cli("-i", d, "-o", out, "--format", "pace", "-t", "seg", "--logits").exit_code == 0  # both images'
    (d / "scan.png").unlink()
    res = cli("-i", d, "-o", out, "--format", "pace", "-t", "cls")  # scan's mask and logits are another image's
    assert f"warning: 2 files in {out} were not written by this run (an earlier run's?): logits/scan.npy, " \
           "segmentation/scan_mask.png" in res.output


def test_a_prediction_failure_is_isolated_to_its_image(cli, predictor, tmp_path, monkeypatch):
    d = _one_image(tmp_path)
    Image.fromarray(synthetic_ultrasound(33, 44, 3)[0]).save(d / "poison.png")
    real = predictor.predict

    def flaky(arrays):
        if any(a.shape[:2] == (33, 44) for a in arrays):
            raise RuntimeError("simulated failure")
        return real(arrays)

    monkeypatch.setattr(predictor, "predict", flaky)
    res = cli("-i", d, "-o", tmp_path / "out", "--format", "pace")
    assert res.exit_code == 3, res.output
    assert _files(tmp_path / "out") == ["classification/predictions.csv", "classification/probabilities.csv",
                                        "errors.csv", "segmentation/case_mask.png"]
    assert "simulated failure" in (tmp_path / "out" / "errors.csv").read_text()


def test_the_images_after_a_failing_one_in_its_batch_are_still_predicted_and_written(cli, predictor, tmp_path,
                                                                                     monkeypatch):
    """The failing image comes first in a batch of four: the batch is retried image by image, and the
    three after it are written and listed as any others; errors.csv holds the failing one alone, with
    the exception's type and the first line of its message."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(synthetic_ultrasound(33, 44, 3)[0]).save(d / "a_poison.png")
    for k, name in enumerate(["b.png", "c.png", "d.png"]):
        Image.fromarray(synthetic_ultrasound(40 + k, 52, 10 + k)[0]).save(d / name)
    real = predictor.predict
    sizes = []

    def flaky(arrays):
        sizes.append(len(arrays))
        if any(a.shape[:2] == (33, 44) for a in arrays):
            raise RuntimeError("simulated failure\n  (details on further lines: not in errors.csv)")
        return real(arrays)

    monkeypatch.setattr(predictor, "predict", flaky)
    out = tmp_path / "out"
    res = cli("-i", d, "-o", out, "--format", "pace")
    assert res.exit_code == 3, res.output
    assert sizes == [4, 1, 1, 1, 1]  # one batch, then each image alone
    assert "3 of 4 images processed, 1 failed" in res.output
    assert _files(out / "segmentation") == ["b_mask.png", "c_mask.png", "d_mask.png"]
    assert [r["image_id"] for r in csv.DictReader(open(out / "classification" / "predictions.csv"))] == ["b", "c", "d"]
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert [(e["file"], e["reason"]) for e in errors] == [("a_poison.png",
                                                           "prediction failed: RuntimeError: simulated failure")]


def test_summary_files_that_cannot_be_written_are_reported_without_pointing_to_a_missing_file(cli, tmp_path,
                                                                                              monkeypatch):
    """An earlier run into the same folder left an errors.csv. When this run's summary files cannot be
    written, errors.csv is replaced by this run's reasons where it can be written, and removed where it
    cannot (a full disk): the summary line never points to the earlier run's file."""
    from model import writers

    d = _one_image(tmp_path)
    out = tmp_path / "out"
    (d / "bad.png").write_bytes(b"garbage")
    assert cli("-i", d, "-o", out, "--format", "pace").exit_code == 3
    assert "bad.png" in (out / "errors.csv").read_text()
    (out / "segmentation" / "case_mask.png").write_bytes(b"the earlier run's mask")
    (d / "bad.png").unlink()
    real_write_text = writers.write_text

    def csv_fails(path, *args, **kwargs):  # the CSVs cannot be written, errors.csv can
        if Path(path).parent.name == "classification":
            raise OSError(5, "Input/output error")
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(writers, "write_text", csv_fails)
    res = cli("-i", d, "-o", out, "--format", "pace")
    assert res.exit_code == 1, res.output
    assert f"0 of 1 image processed, 1 failed (see {out / 'errors.csv'})" in res.output
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert [r["file"] for r in errors] == ["case.png"] and errors[0]["reason"].startswith("summary files not written")
    # failed, like any failed case: its mask goes, and the earlier run's that it replaced comes back
    assert (out / "segmentation" / "case_mask.png").read_bytes() == b"the earlier run's mask"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers, "write_text", full_disk)
    res = cli("-i", d, "-o", out, "--format", "pace")
    assert res.exit_code == 1, res.output
    assert "writing the summary files into" in res.output and "No space left on device" in res.output
    assert "0 of 1 image processed, 1 failed (the reasons are above; errors.csv could not be written)" in res.output
    assert not (out / "errors.csv").exists()


@pytest.mark.parametrize("fmt, blocked, written_before", [
    ("pace", "classification/probabilities.csv", ["classification/predictions.csv"]),
    ("codabench", "submission.zip", ["classification.csv"]),
    ("gc", "breast-lesion-classification.json", ["results.json"]),
])
def test_a_summary_file_that_cannot_be_written_leaves_no_summary_file_claiming_a_case(cli, tmp_path, fmt, blocked,
                                                                                       written_before):
    """A folder stands where one summary file goes (a full disk fails the same way, at any file): the
    summary files written before it would list the cases as done, beside errors.csv saying they failed
    and with their masks removed. They go too."""
    d = _one_image(tmp_path)
    out = tmp_path / "out"
    (out / blocked).mkdir(parents=True)
    res = cli("-i", d, "-o", out, "--format", fmt)
    assert res.exit_code == 1, res.output
    assert "writing the summary files into" in res.output and "0 of 1 image processed, 1 failed" in res.output
    assert _files(out) == ["errors.csv"], _files(out)  # no mask, and none of written_before
    assert all(not (out / name).exists() for name in written_before)
    (out / blocked).rmdir()
    assert cli("-i", d, "-o", out, "--format", fmt).exit_code == 0  # the same run, unblocked, writes them
    assert all((out / name).is_file() for name in written_before + [blocked]) and not (out / "errors.csv").exists()


def _two_images(tmp_path: Path) -> Path:
    d = tmp_path / "two"
    d.mkdir()
    for name, seed in (("a", 31), ("b", 32)):
        Image.fromarray(synthetic_ultrasound(50, 70, seed)[0]).save(d / f"{name}.png")
    return d


def _contents(root: Path) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in _files(root)}


@pytest.mark.parametrize("fmt, blocked", [("pace", "classification/probabilities.csv"),
                                          ("codabench", "submission.zip"), ("gc", "results.json")])
def test_a_rerun_whose_summary_cannot_be_written_leaves_the_earlier_runs_outputs_as_they_were(
        cli, tmp_path, monkeypatch, fmt, blocked):
    """A full disk (at one summary file) on a rerun into a folder holding a complete earlier run: that
    run's summary files, which this run never replaced, were all removed, and its masks with them
    (this run had written over them). Now the earlier run's files come back byte for byte, no summary
    file of this run stands beside them, and no temporary file is left."""
    from model import writers
    from model.atomic_files import atomic_path

    d = _two_images(tmp_path)
    out = tmp_path / "out"
    assert cli("-i", d, "-o", out, "--format", fmt, "--overlay").exit_code == 0
    masks = [p for p in _files(out) if p.endswith((".png", ".mha")) and not p.startswith("overlays")]
    assert len(masks) == 2
    for rel in masks + ["overlays/a.png"]:  # another model's outputs: not what this run writes
        if rel.endswith(".mha"):
            img = sitk.ReadImage(str(out / rel))
            img2 = sitk.GetImageFromArray(1 - sitk.GetArrayFromImage(img))
            img2.CopyInformation(img)
            sitk.WriteImage(img2, str(out / rel), useCompression=True)
        else:
            Image.fromarray(255 - np.asarray(Image.open(out / rel))).save(out / rel)
    (out / "errors.csv").write_text("file,reason\nold.png,an earlier failure\n")
    earlier = _contents(out)

    def full_disk(real):
        def write(path, data):
            if Path(path) == out / blocked:
                with atomic_path(path) as tmp:
                    raise OSError(28, "No space left on device", str(tmp))
            real(path, data)
        return write
    monkeypatch.setattr(writers, "write_text", full_disk(writers.write_text))
    monkeypatch.setattr(writers, "write_zip", full_disk(writers.write_zip))
    res = cli("-i", d, "-o", out, "--format", fmt, "--overlay")
    assert res.exit_code == 1, res.output
    assert f"writing the summary files into {out} failed: OSError: [Errno 28] No space left on device: " \
           f"'{out / blocked}'" in res.output
    assert "0 of 2 images processed, 2 failed" in res.output and "also holds" not in res.output
    after = _contents(out)
    errors = after.pop("errors.csv").decode()
    assert "a.png,summary files not written" in errors and "b.png" in errors
    earlier.pop("errors.csv")
    assert after == earlier  # every earlier file back, byte for byte; nothing else (no temporary or kept file)


def test_a_case_whose_last_output_fails_gets_its_earlier_outputs_back(cli, tmp_path, monkeypatch):
    """One output of a case cannot be written (its logits, after its mask, on a full disk): the case
    fails and its mask goes; the earlier run's mask of that image, which the failed case had written
    over, comes back (it was removed too). The other image is written; the error names the file."""
    import errno

    from model import writers
    from model.atomic_files import atomic_path

    d = _two_images(tmp_path)
    out = tmp_path / "out"
    assert cli("-i", d, "-o", out, "--format", "pace", "--logits").exit_code == 0
    Image.fromarray(np.full((50, 70), 255, np.uint8)).save(out / "segmentation" / "b_mask.png")
    old_b = (out / "segmentation" / "b_mask.png").read_bytes()
    real = writers.write_npy

    def full_disk(path, array):
        if Path(path).name == "b.npy":
            with atomic_path(path) as tmp:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        real(path, array)
    monkeypatch.setattr(writers, "write_npy", full_disk)
    res = cli("-i", d, "-o", out, "--format", "pace", "--logits")
    assert res.exit_code == 3, res.output
    assert f"error: b.png: writing the outputs failed: OSError: [Errno 28] No space left on device: " \
           f"'{out / 'logits' / 'b.npy'}'" in res.output
    assert (out / "segmentation" / "b_mask.png").read_bytes() == old_b
    assert "a_mask.png" in _files(out / "segmentation") and not any(".pfsam-" in f for f in _files(out))


def test_a_mask_itk_cannot_write_whole_fails_its_case_not_the_run(cli, tmp_path, monkeypatch):
    """ITK's MetaImage writer does not report a full disk: a small compressed mask came out as 0 bytes,
    renamed onto its name, and the run said all was done. The mask is read back: its case fails,
    naming the file; the other is written."""
    import SimpleITK

    d = _two_images(tmp_path)
    real = SimpleITK.WriteImage

    def full_disk(img, path, *args, **kwargs):
        real(img, path, *args, **kwargs)
        if full_disk.calls:  # the disk is full from the second mask on: ITK leaves 0 bytes and says nothing
            Path(path).write_bytes(b"")
        full_disk.calls += 1
    full_disk.calls = 0
    monkeypatch.setattr(SimpleITK, "WriteImage", full_disk)
    res = cli("-i", d, "-o", tmp_path / "out", "--format", "gc")
    assert res.exit_code == 3, res.output
    masks = tmp_path / "out" / "images" / "breast-lesion-segmentation"
    assert "error: b.png: writing the outputs failed: OSError: [Errno 5] ITK wrote a file that does not read back " \
           f"whole (is the disk full?): '{masks / 'b.mha'}'" in res.output
    assert _files(masks) == ["a.mha"] and (masks / "a.mha").stat().st_size > 0
    entries = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [bool(e["error_messages"]) for e in entries] == [False, True]


def test_a_killed_runs_unfinished_files_are_removed_by_the_next_run(cli, tmp_path):
    """SIGKILL leaves hidden temporary and kept files (with the mask's suffix) in the folders that graders
    read whole, also one this run does not write into (overlays/): the next run into the folder removes
    them, with a note. A live run's files are left alone, known by its lock file, which it holds
    (flock) from any container; a process's files outside a run while that process lives."""
    import fcntl

    d = _one_image(tmp_path)
    out = tmp_path / "out"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for sub in ("segmentation", "overlays", "classification"):
        (out / sub).mkdir(parents=True)
    killed = ["segmentation/.pfsam-r0a1b2c-x1y2z3.tmp.png", "overlays/.pfsam-r0a1b2c-q9.kept.png",
              f".pfsam-p{gone}-write-check-k4", "classification/.pfsam-r77-z.tmp.csv"]  # r77: its lock is gone
    (out / ".pfsam-r0a1b2c-run.lock").write_bytes(b"")  # a killed run's lock: no process holds it
    live = ["segmentation/.pfsam-rfeed-abc.tmp.png", f"segmentation/.pfsam-p{os.getppid()}-def.tmp.png",
            ".pfsam-rfeed-run.lock"]
    for rel in killed + live:
        (out / rel).write_bytes(b"")
    held = os.open(out / ".pfsam-rfeed-run.lock", os.O_RDWR)  # a run in another container, as far as it can tell
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        res = cli("-i", d, "-o", out, "--format", "pace")
    finally:
        os.close(held)
    assert res.exit_code == 0, res.output
    assert "note: removed 5 unfinished files of a run that was killed" in res.output
    assert "not written by this run" not in res.output  # a live run's hidden files are no earlier outputs
    assert _files(out) == sorted(["classification/predictions.csv", "classification/probabilities.csv",
                                  "segmentation/case_mask.png", *live])


def test_a_log_stream_that_cannot_be_written_does_not_stop_the_run(predictor, tmp_path, monkeypatch):
    """stderr on a full disk (or a closed pipe) with a bad input among the good ones: logging the bad
    one's error raised, and the run ended before the good images were written."""
    d = _one_image(tmp_path)
    (d / "bad.png").write_bytes(b"not a png")

    from synthetic import UnwritableStream
    monkeypatch.setattr(sys, "stderr", UnwritableStream())
    monkeypatch.setattr(sys, "stdout", UnwritableStream())
    result = inference.run(predictor, d, tmp_path / "out", fmt="pace", progress=False)
    assert result.exit_code == 3 and _files(tmp_path / "out" / "segmentation") == ["case_mask.png"]
    assert "bad.png" in (tmp_path / "out" / "errors.csv").read_text()


def test_nothing_processed_exits_1(cli, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"garbage")
    res = cli("-i", d, "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert "a.png" in (tmp_path / "out" / "errors.csv").read_text()


@pytest.mark.parametrize("make", ["missing", "empty", "no-images"])
def test_no_inputs_exits_1_with_a_reason(cli, tmp_path, make):
    d = tmp_path / "in"
    if make != "missing":
        d.mkdir()
    if make == "no-images":
        (d / "notes.txt").write_text("not an image")
    res = cli("-i", d, "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert ("does not exist" if make == "missing" else "no images") in res.stderr
    assert not res.calls  # the model is not even loaded


@pytest.mark.parametrize("problem", ["missing", "a-file", "not-a-model", "bad-json"])
def test_model_that_cannot_load_exits_1(tmp_path, problem):
    d = _one_image(tmp_path)
    model_dir = tmp_path / "model"
    if problem == "a-file":
        model_dir.write_text("{}")
    elif problem != "missing":
        model_dir.mkdir()
    if problem == "bad-json":
        (model_dir / "ensemble.json").write_text("{not json")
    res = CliRunner().invoke(process.main, ["-i", str(d), "-o", str(tmp_path / "out"), "--model-dir", str(model_dir)])
    assert res.exit_code == 1
    assert "cannot load the model" in res.stderr and str(model_dir) in res.stderr
    if problem in ("missing", "a-file"):  # the folder was named: no advice to name one
        assert res.stderr.strip().endswith({"missing": "does not exist", "a-file": "is a file, not a model folder"}[problem])


def test_gpu_without_cuda_exits_1(ensemble_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    d = _one_image(tmp_path)
    res = CliRunner().invoke(process.main, ["-i", str(d), "-o", str(tmp_path / "out"), "--model-dir",
                                            str(ensemble_dir), "-d", "gpu"])
    assert res.exit_code == 1 and "cuda" in res.stderr.lower()


def test_bad_option_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(process.main, ["-t", "everything"])
    assert res.exit_code == 2


# ------------------------------------------------------------------------------------------
# Output names


def test_output_name_rule():
    root = Path("/in")
    paths = [root / p for p in ("a.png", "a.jpg", "x/b.png", "y/b.png", "A.PNG", "c.tif", "z/c.tif")]
    names = output_names(paths, root)
    assert dict(zip([p.relative_to(root).as_posix() for p in paths], names)) == {
        "A.PNG": "A", "a.jpg": "a_jpg", "a.png": "a_png",  # sorted: "A.PNG" < "a.jpg" < "a.png"
        "c.tif": "c", "z/c.tif": "z_c", "x/b.png": "b", "y/b.png": "y_b"}
    assert output_names(list(reversed(paths)), root) == list(reversed(names))  # order-independent
    assert len({n.casefold() for n in names}) == len(names)
    # generated names never collide with real stems either
    same = [root / "a.png", root / "a.jpg", root / "a_png.png", root / "a_jpg.jpg"]
    assert len({n.casefold() for n in output_names(same, root)}) == 4
    # DICOM files listed by content keep their whole names: UIDs that differ in their last number
    dicom = [root / "s1" / "1.2.840.5.7", root / "s1" / "1.2.840.5.8", root / "s2" / "IM0001", root / "s3" / "IM0001",
             root / "IM0001.dcm"]
    assert output_names(dicom, root) == ["1.2.840.5.7", "1.2.840.5.8", "s2_IM0001", "s3_IM0001", "IM0001"]
    assert output_names([root / "IM0001", root / "IM0001.dcm", root / "im0001.DCM"], root) == [
        "IM0001", "IM0001_dcm", "im0001_dcm_2"]


def test_names_too_long_for_the_file_system_are_cut_distinctly(cli, tmp_path):
    """Up to 236 bytes a name is the stem; past it (``<stem>_mask.png`` would pass the 255-byte limit
    and the case failed) the start and a digest, cut on whole UTF-8 characters, still distinct."""
    from model.writers import MAX_NAME_BYTES

    root = Path("/in")
    stems = ["é" * 125 + "x", "é" * 125 + "y", "n" * MAX_NAME_BYTES]  # 251 bytes each, 236
    names = output_names([root / f"{s}.png" for s in stems], root)
    assert names[2] == stems[2]
    assert names[0] != names[1] and all(n.startswith("é" * 113 + "_") for n in names[:2])
    assert all(len(n.encode()) <= MAX_NAME_BYTES for n in names)
    assert output_names([root / f"{stems[0]}.png"], root) == names[:1]  # the same from run to run
    d = tmp_path / "in"
    d.mkdir()
    img = synthetic_ultrasound(40, 52, 3)[0]
    for s in stems:
        Image.fromarray(img).save(d / f"{s}.png")
    res = cli("-i", d, "-o", tmp_path / "out", "--format", "pace")
    assert res.exit_code == 0, res.output
    assert _files(tmp_path / "out" / "segmentation") == sorted(f"{n}_mask.png" for n in names)


def test_an_output_folder_inside_the_input_folder_is_not_read_back(cli, tmp_path):
    d = _one_image(tmp_path)
    assert cli("-i", d, "-o", d / "out", "--format", "pace").exit_code == 0
    res = cli("-i", d, "-o", d / "out", "--format", "pace")  # again: out/segmentation/*.png are not inputs
    assert res.exit_code == 0, res.output
    assert _files(d / "out" / "segmentation") == ["case_mask.png"]


def test_an_output_folder_inside_the_input_folder_named_through_a_link_or_relatively_is_not_read_back(
        cli, tmp_path, monkeypatch):
    """The output folder inside the input folder, either named by another path than the one the images
    are found by: through a linked folder, or relative to the working folder while the input folder
    is absolute. The second run into it still finds one image, not the first run's masks too."""
    runs = {}
    for how in ("output-link", "input-link", "relative"):
        (tmp_path / how).mkdir()
        d = _one_image(tmp_path / how)
        (d / "out").mkdir()
        runs[how] = (d, {"output-link": ["-i", d, "-o", tmp_path / how / "out-link"],
                         "input-link": ["-i", tmp_path / how / "in-link", "-o", d / "out"],
                         "relative": ["-i", d, "-o", "out"]}[how])
    (tmp_path / "output-link" / "out-link").symlink_to(runs["output-link"][0] / "out", target_is_directory=True)
    (tmp_path / "input-link" / "in-link").symlink_to(runs["input-link"][0], target_is_directory=True)
    monkeypatch.chdir(runs["relative"][0])
    for how, (d, args) in runs.items():
        for _ in range(2):
            res = cli(*args, "--format", "pace", "--overlay")
            assert res.exit_code == 0 and "1 of 1 image processed" in res.output, (how, res.output)
        assert _files(d / "out") == ["classification/predictions.csv", "classification/probabilities.csv",
                                     "overlays/case.png", "segmentation/case_mask.png"], how


@pytest.mark.parametrize("where", ["same", "parent"])
def test_an_output_folder_that_is_or_holds_the_input_folder_reads_the_images_but_not_its_outputs(cli, tmp_path, where):
    d = _one_image(tmp_path)
    out = d if where == "same" else tmp_path
    for _ in range(2):  # the second run finds the first one's masks and overlays and leaves them
        res = cli("-i", d, "-o", out, "--format", "pace", "--overlay")
        assert res.exit_code == 0, res.output
        assert "1 of 1 image processed" in res.output
    res = cli("-i", d, "-o", out, "--format", "gc")
    assert res.exit_code == 0 and "1 of 1 image processed" in res.output, res.output
    assert _files(out / "segmentation") == ["case_mask.png"] and _files(out / "overlays") == ["case.png"]
    assert _files(out / "images") == ["breast-lesion-segmentation/case.mha"]


def test_a_datasets_masks_beside_their_images_are_skipped_and_a_mask_elsewhere_is_refused(cli, tmp_path):
    """BUSI keeps its ground truth beside the images (``X_mask.png``, ``X_mask_1.png`` beside ``X.png``):
    those are skipped with one note, and so is ``_MASK`` in another case or suffix; ``lone_mask.png``,
    with no ``lone`` image beside it, is an input (and ``lone_mask_mask.png`` its mask). A two-valued
    image (BUS-BRA's ``Masks/``, a drawing) is refused as its file's error; the images are still
    predicted. Given by name, a mask is read (and refused for its content)."""
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name, seed in (("benign (4)", 1), ("sub/b", 2), ("lone_mask", 3)):
        image, mask = synthetic_ultrasound(60, 80, seed)
        Image.fromarray(image).save(d / f"{name}.png")
        Image.fromarray(mask * 255).save(d / f"{name}_mask.png")
    Image.fromarray(synthetic_ultrasound(60, 80, 4)[1] * 255).save(d / "benign (4)_mask_1.png")
    Image.fromarray(synthetic_ultrasound(60, 80, 5)[1] * 255).convert("RGB").save(d / "sub" / "b_MASK.bmp")
    Image.fromarray(synthetic_ultrasound(60, 80, 6)[1].astype(bool)).save(d / "drawing.png")  # 1-bit
    res = cli("-i", d, "-o", tmp_path / "out", "--format", "pace")
    assert res.exit_code == 3, res.output
    assert "note: 5 file(s) named as the mask of an image beside them (such as benign (4)_mask.png) are " \
           "ground truth, not inputs: skipped" in res.output
    assert _files(tmp_path / "out" / "segmentation") == ["b_mask.png", "benign (4)_mask.png", "lone_mask_mask.png"]
    errors = (tmp_path / "out" / "errors.csv").read_text()
    assert "drawing.png" in errors and "the image holds two values only (0 and 255): a mask or a drawing" in errors
    assert errors.count("\n") == 2, errors  # its header and the drawing
    assert "3 of 4 images processed" in res.output, res.output
    res = cli("-i", d / "sub" / "b_mask.png", "-o", tmp_path / "one", "--format", "pace")
    assert res.exit_code == 1 and "b_mask.png: the image holds two values only (0 and 255)" in res.output


def test_busi_folders_are_read_without_their_masks(cli, shared_data, tmp_path):
    """A real BUSI folder as published (images and their masks side by side): only the images are predicted."""
    src = shared_data / "BUSI" / "benign"
    d = tmp_path / "benign"
    d.mkdir()
    for name in ("benign (100).png", "benign (100)_mask.png", "benign (100)_mask_1.png", "benign (1).png",
                 "benign (1)_mask.png"):
        (d / name).symlink_to(src / name)
    res = cli("-i", d, "-o", tmp_path / "out", "--format", "pace")
    assert res.exit_code == 0 and "2 of 2 images processed" in res.output, res.output
    assert "note: 3 file(s) named as the mask" in res.output
    assert _files(tmp_path / "out" / "segmentation") == ["benign (1)_mask.png", "benign (100)_mask.png"]


def test_a_folder_tree_nested_too_deep_is_one_error_and_the_other_images_are_predicted(cli, tmp_path):
    """A chain of folders 1100 deep below the input folder ended the whole run in a RecursionError
    (Python 3.11's os.walk recurses per level), with no output at all. Folders more than 100 below the
    input folder are not walked: the first of them is an error by name, the images above are predicted."""
    from model.io import MAX_DEPTH

    d = _one_image(tmp_path)
    deep = d
    for _ in range(1100):
        deep = deep / "d"
        deep.mkdir()
    Image.fromarray(synthetic_ultrasound(50, 70, 3)[0]).save(deep / "lost.png")
    Image.fromarray(synthetic_ultrasound(50, 70, 4)[0]).save(d / "d" / "near.png")
    try:
        res = cli("-i", d, "-o", tmp_path / "out", "--format", "pace")
    finally:  # from the bottom up: Python 3.11's shutil.rmtree (pytest's clean-up of old runs) recurses too
        while deep != d:
            for f in deep.iterdir():
                f.unlink()
            deep.rmdir()
            deep = deep.parent
    assert res.exit_code == 3, res.output[-2000:]
    assert "2 of 2 images processed, 1 folder not listed" in res.output
    first = "/".join(["d"] * (MAX_DEPTH + 1))
    assert f"error: {first}: folder cannot be walked, so its images are not read: it lies more than 100 folders " \
           f"below the input folder" in res.output
    assert _files(tmp_path / "out" / "segmentation") == ["case_mask.png", "near_mask.png"]


@pytest.mark.parametrize("sub", ["segmentation", "overlays", "logits", "classification", "images"])
def test_an_output_folder_that_links_elsewhere_is_refused_before_the_model_loads(cli, tmp_path, sub):
    """A run writes, replaces and removes files in its output folders: one that is a link (which an input
    folder given as -o can bring along) had masks and overlays written outside the output folder, and
    an earlier run's logits and hidden files deleted there. Refused, naming it; nothing outside changes."""
    d = _one_image(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "case.npy").write_bytes(b"someone's file")
    (victim / "case_mask.png").write_bytes(b"someone's file")
    (out / sub).symlink_to(victim, target_is_directory=True)
    res = cli("-i", d, "-o", out, "--format", "pace", "--overlay")
    assert res.exit_code == 1 and not res.calls, res.output
    assert f"error: {out / sub} is a link (to {victim}): a run writes only below its output folder" in res.output
    assert sorted(p.name for p in victim.iterdir()) == ["case.npy", "case_mask.png"]
    assert (victim / "case.npy").read_bytes() == b"someone's file"


def test_a_codabench_zip_holds_no_file_that_a_link_in_the_mask_folder_points_to(cli, tmp_path):
    """A -t cls run's zip holds the masks an earlier -t seg run left: a link there named as a mask had
    its target's bytes put into the upload."""
    d = _one_image(tmp_path)
    out = tmp_path / "out"
    (out / "segmentation").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"not for the upload")
    (out / "segmentation" / "case_mask.png").symlink_to(tmp_path / "secret.png")
    res = cli("-i", d, "-o", out, "--format", "codabench", "-t", "cls")
    assert res.exit_code == 0, res.output
    import zipfile
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert zf.namelist() == ["classification.csv"]


def test_linked_folders_broken_links_and_unlistable_folders_are_not_skipped_in_silence(cli, tmp_path, monkeypatch):
    """Images in a linked folder are read; a broken link and a folder that cannot be listed (its
    permissions: simulated, since the tests run as root) are named in errors.csv with the reason and
    the run exits 3; a link back to a parent folder is walked once."""
    d = _one_image(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    for k in range(2):
        Image.fromarray(synthetic_ultrasound(40, 50, 30 + k)[0]).save(other / f"b{k}.png")
    (d / "linked").symlink_to(other, target_is_directory=True)
    (d / "linked" / "loop").symlink_to(d, target_is_directory=True)
    (d / "broken.png").symlink_to(tmp_path / "gone.png")
    (d / "locked").mkdir()
    Image.fromarray(synthetic_ultrasound(40, 50, 40)[0]).save(d / "locked" / "x.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == d / "locked":
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    res = cli("-i", d, "-o", tmp_path / "out", "--format", "pace")
    assert res.exit_code == 3, res.output
    assert "3 of 4 images processed, 1 failed, 1 folder not listed (see" in res.output
    assert _files(tmp_path / "out" / "segmentation") == ["b0_mask.png", "b1_mask.png", "case_mask.png"]
    errors = {r["file"]: r["reason"] for r in csv.DictReader(open(tmp_path / "out" / "errors.csv"))}
    assert set(errors) == {"broken.png", "locked"}
    assert errors["broken.png"] == f"broken link: its target {tmp_path / 'gone.png'} does not exist"
    assert errors["locked"].startswith("folder cannot be listed, so its images are not read: permission denied")


def test_a_folder_not_listed_is_pointed_to_in_errors_csv_when_every_image_was_processed(cli, tmp_path, monkeypatch):
    """Every image found is written, but a folder could not be listed (simulated, as above): the run
    exits 3 and the summary line points to errors.csv, which names the folder; with nothing but that
    folder, nothing is processed (exit 1)."""
    d = _one_image(tmp_path)
    (d / "locked").mkdir()
    Image.fromarray(synthetic_ultrasound(40, 50, 40)[0]).save(d / "locked" / "x.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)).name == "locked":
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    res = cli("-i", d, "-o", out, "--format", "pace")
    assert res.exit_code == 3, res.output
    assert f"1 of 1 image processed, 1 folder not listed (see {out / 'errors.csv'}); outputs in {out}" in res.output
    assert [r["file"] for r in csv.DictReader(open(out / "errors.csv"))] == ["locked"]
    (d / "case.png").unlink()
    res = cli("-i", d, "-o", tmp_path / "out2", "--format", "pace")
    assert res.exit_code == 1, res.output
    assert "0 of 0 images processed, 1 folder not listed (see" in res.output


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(predictor, tmp_path, monkeypatch):
    d = _one_image(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    res = _invoke_with(predictor, ["-i", d, "-o", a_file])
    assert res.exit_code == 1 and res.calls == [], res.output
    assert f"error: output folder {a_file} is a file, not a folder" in res.output
    # a folder this user may not write into (a read-only mount; simulated, the tests run as root)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = inference_io.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(inference_io.tempfile, "mkstemp", mkstemp)
    res = _invoke_with(predictor, ["-i", d, "-o", locked])
    assert res.exit_code == 1 and res.calls == [], res.output
    assert f"error: cannot write into the output folder {locked}: permission denied: not writable by this user" \
        in res.output and "owner uid" in res.output and "build-arg" not in res.output
    # in the image (its Dockerfile sets PFSAM_IMAGE), for a folder another user owns (PACE's command mounts one
    # Docker created, root's, and has no --user): how to run it
    monkeypatch.setenv("PFSAM_IMAGE", "1")
    real_getuid = inference_io.os.getuid
    monkeypatch.setattr(inference_io.os, "getuid", lambda: 1000)
    res = _invoke_with(predictor, ["-i", d, "-o", locked])
    assert res.exit_code == 1 and "(uid 1000; the folder has mode" in res.output
    assert "owner uid 0): give docker run --user with the folder's owner (--user 0), or build the image to run as " \
        "root for a command that cannot (PACE's): ./build.sh --build-arg USER_UID=0 --build-arg USER_GID=0" \
        in res.output.replace("\n", " ")
    monkeypatch.delenv("PFSAM_IMAGE")
    monkeypatch.setattr(inference_io.os, "getuid", real_getuid)
    res = _invoke_with(predictor, ["-i", d, "-o", locked / "new" / "out"])  # a folder to create below it
    assert res.exit_code == 1 and res.calls == [], res.output
    assert f"error: cannot create the output folder {locked / 'new' / 'out'}: permission denied" in res.output
    res = _invoke_with(predictor, ["-i", d, "-o", a_file / "out"])
    assert res.exit_code == 1 and f"{a_file} is a file, not a folder" in res.output and res.calls == []
    assert list(locked.iterdir()) == []
    monkeypatch.undo()
    assert _invoke_with(predictor, ["-i", d, "-o", locked, "--format", "pace"]).exit_code == 0
    assert sorted(p.name for p in locked.iterdir()) == ["classification", "segmentation"]  # no check file left
    # an earlier run's folder that this user may not write into (that run ran as another user): refused
    # before the model loads, naming it; it used to run every image and then fail each on a temporary file
    seg = locked / "segmentation"

    def seg_locked(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == seg:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(inference_io.tempfile, "mkstemp", seg_locked)
    res = _invoke_with(predictor, ["-i", d, "-o", locked, "--format", "pace"])
    assert res.exit_code == 1 and res.calls == [], res.output
    assert f"error: cannot write into {seg}, a folder an earlier run left in the output folder: permission " \
           "denied" in res.output
    for ok in (["--format", "pace", "-t", "cls"], ["--format", "gc"]):  # runs that write nothing there
        assert _invoke_with(predictor, ["-i", d, "-o", locked, *ok]).exit_code == 0, ok
    monkeypatch.undo()
    (locked / "overlays").write_text("a file where the folder goes")
    res = _invoke_with(predictor, ["-i", d, "-o", locked, "--format", "pace", "--overlay"])
    assert res.exit_code == 1 and res.calls == [], res.output
    assert f"error: cannot write into {locked / 'overlays'}: an earlier run left a file there" in res.output


def test_an_earlier_runs_file_where_a_later_output_folder_goes_is_refused_before_the_model_loads(predictor, tmp_path):
    """The first folder the run writes into (segmentation/) is not there yet; the second one's place
    (classification/) holds an earlier run's file: refused before the model loads, naming it."""
    d = _one_image(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "classification").write_text("a file where the folder goes")
    res = _invoke_with(predictor, ["-i", d, "-o", out, "--format", "pace"])
    assert res.exit_code == 1 and res.calls == [], res.output
    assert f"error: cannot write into {out / 'classification'}: an earlier run left a file there" in res.output


def test_a_single_image_that_fails_is_named_by_its_file_name(cli, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    res = cli("-i", bad, "-o", tmp_path / "out", "--format", "pace")
    assert res.exit_code == 1, res.output
    assert "error: broken.png: " in res.output
    assert [r["file"] for r in csv.DictReader(open(tmp_path / "out" / "errors.csv"))] == ["broken.png"]


def test_a_failing_image_in_a_subfolder_is_named_by_its_path_below_the_input_folder(cli, tmp_path):
    d = _one_image(tmp_path)
    (d / "site-b" / "day 2").mkdir(parents=True)
    (d / "site-b" / "day 2" / "case.png").write_bytes(b"")  # the same name as the good one above it
    out = tmp_path / "out"
    res = cli("-i", d, "-o", out, "--format", "pace")
    assert res.exit_code == 3, res.output
    assert "error: site-b/day 2/case.png: " in res.output
    assert [r["file"] for r in csv.DictReader(open(out / "errors.csv"))] == ["site-b/day 2/case.png"]


def test_batches_are_bounded_by_count_and_by_pixels(tmp_path, monkeypatch):
    """plan_batches reads the sizes from the headers (PNG and MetaImage); an unreadable file counts 0."""
    from model.writers import Case

    sizes = {"a.png": (60, 80), "b.mha": (100, 100), "c.png": (20, 30), "d.png": (120, 90), "e.png": (40, 40)}
    for name, (h, w) in sizes.items():
        img = synthetic_ultrasound(h, w, 3)[0]
        if name.endswith(".mha"):
            sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / name))
        else:
            Image.fromarray(img).save(tmp_path / name)
    (tmp_path / "f.png").write_bytes(b"not a png")
    cases = [Case(tmp_path / n, n, Path(n).stem) for n in [*sizes, "f.png"]]
    assert [inference_io.image_pixels(c.path) for c in cases] == [h * w for h, w in sizes.values()] + [0]
    names = lambda batches: [[c.rel for c in b] for b in batches]  # noqa: E731
    assert names(inference.plan_batches(cases, 4)) == [["a.png", "b.mha", "c.png", "d.png"], ["e.png", "f.png"]]
    monkeypatch.setattr(inference, "PIXELS_PER_BATCH", 15_000)  # 4800 + 10000 fit, 600 more do not
    assert names(inference.plan_batches(cases, 4)) == [["a.png", "b.mha"], ["c.png", "d.png", "e.png", "f.png"]]
    monkeypatch.setattr(inference, "PIXELS_PER_BATCH", 5_000)  # an image above the bound is a batch of its own
    assert names(inference.plan_batches(cases, 4)) == [["a.png"], ["b.mha"], ["c.png"], ["d.png"], ["e.png", "f.png"]]


def test_a_written_case_keeps_its_label_and_probabilities_not_its_mask(predictor, inputs, tmp_path):
    root, _ = inputs
    result = inference.run(predictor, root, tmp_path / "out", fmt="pace", progress=False)
    assert result.exit_code == 0 and result.succeeded
    for case in result.succeeded:
        assert case.prediction.mask is None  # a full-size array per case, held to the end of the run before
        assert case.prediction.label in CLASSES and math.isclose(sum(case.prediction.probabilities.values()), 1,
                                                                   abs_tol=1e-5)


def test_colliding_inputs_are_all_written(cli, tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    img = synthetic_ultrasound(40, 52, 5)[0]
    Image.fromarray(img).save(d / "a.png")
    Image.fromarray(img).save(d / "a.jpg")
    Image.fromarray(img).save(d / "sub" / "a.png")
    res = cli("-i", d, "-o", tmp_path / "out", "--format", "pace")
    assert res.exit_code == 0, res.output
    assert _files(tmp_path / "out" / "segmentation") == ["a_mask.png", "a_png_mask.png", "sub_a_mask.png"]
    ids = [r["image_id"] for r in csv.DictReader(open(tmp_path / "out" / "classification" / "predictions.csv"))]
    assert ids == ["a", "a_png", "sub_a"]


# ------------------------------------------------------------------------------------------
# Pieces


def test_default_model_dir_prefers_opt_ml_model(tmp_path, monkeypatch):
    from model.predictor import DEFAULT_MODEL_DIR

    monkeypatch.setattr(inference, "SAGEMAKER_MODEL_DIR", tmp_path / "absent")
    assert inference.default_model_dir() == Path(DEFAULT_MODEL_DIR)
    monkeypatch.setattr(inference, "SAGEMAKER_MODEL_DIR", tmp_path)
    (tmp_path / ".hidden").write_text("")  # an empty mount (hidden files aside): the built-in model
    assert inference.default_model_dir() == Path(DEFAULT_MODEL_DIR)
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "weights.bin").write_text("")
    with pytest.raises(inference.InferenceError, match=r"holds ens but no ensemble.json or config.json.*training.export"):
        inference.default_model_dir()  # an upload without an ensemble is never replaced by the built-in model
    (tmp_path / "ens" / "ensemble.json").write_text("{}")
    assert inference.default_model_dir() == tmp_path / "ens"  # a tarball packed with its folder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ensemble.json").write_text("{}")
    with pytest.raises(inference.InferenceError, match="several ensembles"):
        inference.default_model_dir()
    (tmp_path / "ensemble.json").write_text("{}")
    assert inference.default_model_dir() == tmp_path
    single = tmp_path / "single"  # one model (config.json + weights), as --model-dir loads it
    (single / "model").mkdir(parents=True)
    (single / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(inference, "SAGEMAKER_MODEL_DIR", single)
    assert inference.default_model_dir() == single / "model"


def test_the_model_that_runs_is_named(ensemble_dir, inputs, tmp_path, monkeypatch):
    """process.py says which model it loaded when none was named: an upload that is not used would
    otherwise go unnoticed."""
    import shutil as sh

    upload = tmp_path / "opt-ml-model"
    sh.copytree(ensemble_dir, upload / "ens")
    monkeypatch.setattr(inference, "SAGEMAKER_MODEL_DIR", upload)
    root, _ = inputs
    res = CliRunner().invoke(process.main, ["-i", str(root), "-o", str(tmp_path / "out"), "-d", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"model: {upload / 'ens'} (uploaded)" in res.stdout
    (upload / "ens" / "ensemble.json").unlink()
    res = CliRunner().invoke(process.main, ["-i", str(root), "-o", str(tmp_path / "out2"), "-d", "cpu"])
    assert res.exit_code == 1 and "no ensemble.json" in res.stderr and not (tmp_path / "out2").exists()


def test_overlay_draws_the_contour_and_the_label():
    img = np.full((60, 80), 100, np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[20:50, 30:70] = 1
    ov = render_overlay(img, mask, None, None)
    assert ov.shape == (60, 80, 3) and ov.dtype == np.uint8
    assert (ov[20, 40] == (255, 40, 40)).all() and (ov[35, 50] == 100).all() and (ov[5, 5] == 100).all()
    labelled = render_overlay(img, mask, "benign", {"normal": 0.1, "benign": 0.7, "malignant": 0.2})
    assert (labelled[:8, :30] != ov[:8, :30]).any()  # text drawn at the top left
    assert render_overlay(np.zeros((30, 40, 4), np.uint16), None, "normal", None).shape == (30, 40, 3)


def test_overlay_shows_the_image_as_it_is_and_the_probability_of_its_label():
    """A 16-bit image is shown from its own darkest to its brightest value (black to white), a colour
    image in its colours; the contour widens with the image (3 pixels at 600 x 800, as seen in a
    viewer); the text gives the probability of the label shown, not the highest of the others."""
    from model.overlay import to_display_rgb

    grey16 = np.array([[1000, 1500], [2000, 1000]], np.uint16)
    assert to_display_rgb(grey16)[..., 0].tolist() == [[0, 128], [255, 0]]
    colour = synthetic_ultrasound(20, 30, 2)[0][..., None] * np.array([1, 0, 0], np.uint8)
    assert np.array_equal(to_display_rgb(colour), colour)
    img = np.full((600, 800), 100, np.uint8)
    mask = np.zeros((600, 800), np.uint8)
    mask[200:400, 300:600] = 1
    ov = render_overlay(img, mask, None, None)
    assert (ov[200:203, 450] == (255, 40, 40)).all() and (ov[203, 450] == 100).all()
    assert (ov[300, 597:600] == (255, 40, 40)).all() and (ov[300, 596] == 100).all()

    def shown(malignant):
        return render_overlay(img, mask, "benign", {"normal": 0.2 - malignant / 10, "benign": 0.3,
                                                    "malignant": 0.5 + malignant / 10})
    assert np.array_equal(shown(0), shown(1))  # "Benign 0.30" both times


def test_no_temporary_files_are_left(gc_run):
    _, out, _ = gc_run
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------
# Cog


def test_cog_predictor_setup_and_predict(ensemble_dir, inputs, tmp_path, monkeypatch):
    import predict as cog_predict

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the answers' folders (a server keeps the last)
    root, sizes = inputs
    p = cog_predict.Predictor()
    p.setup(model_dir=str(ensemble_dir))
    out = p.predict(image=cog_predict.Path(str(root / "colour.png")), overlay=True, tta=False, class_prior="model")
    assert out.classification in ("Normal", "Benign", "Malignant")  # as in the challenge's classification.csv
    probs = (out.probability_normal, out.probability_benign, out.probability_malignant)
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-5)
    assert out.classification.lower() == CLASSES[int(np.argmax(probs))]
    h, w = sizes["colour.png"]
    mask = Image.open(str(out.segmentation_mask))
    assert mask.size == (w, h) and set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert Image.open(str(out.overlay)).size == (w, h)
    mha = p.predict(image=cog_predict.Path(str(root / "scan.mha")), overlay=False, tta=False, class_prior="model")
    assert str(mha.segmentation_mask).endswith(".mha") and mha.overlay is None
    assert sitk.ReadImage(str(mha.segmentation_mask)).GetSpacing() == pytest.approx(MHA_SPACING)
    assert not Path(str(out.segmentation_mask)).exists()  # the answer before the last one is gone (served)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(Exception, match="not a readable image|corrupt"):
        p.predict(image=cog_predict.Path(str(bad)), overlay=False, tta=False, class_prior="model")
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((200, 300), np.uint8)).save(black)
    with pytest.raises(Exception, match=r"black.png: every pixel has the same value \(0\): nothing to segment"):
        p.predict(image=cog_predict.Path(str(black)), overlay=False, tta=False, class_prior="model")


def test_cog_predict_takes_tta_per_prediction(ensemble_dir, inputs, predictor, tmp_path, monkeypatch):
    """``tta`` is an input of each prediction: on, the answer is the flip-averaged one of a predictor
    loaded with TTA; off again, the plain one."""
    import predict as cog_predict

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the answers' folders (a server keeps the last)
    root, _ = inputs
    image = root / "colour.png"
    arr = np.asarray(Image.open(image))
    with_tta = inference.load_predictor(ensemble_dir, device="cpu", batch_size=1, tta=True).predict([arr])[0]
    plain = predictor.predict([arr])[0]
    assert with_tta.probabilities != pytest.approx(plain.probabilities, abs=1e-6)  # the flip changes the answer
    p = cog_predict.Predictor()
    p.setup(model_dir=str(ensemble_dir))
    for tta, expected in ((True, with_tta), (False, plain)):
        out = p.predict(image=cog_predict.Path(str(image)), overlay=False, tta=tta, class_prior="model")
        probs = {"normal": out.probability_normal, "benign": out.probability_benign,
                 "malignant": out.probability_malignant}
        assert probs == pytest.approx(expected.probabilities, abs=1e-5), tta
        np.testing.assert_array_equal(np.asarray(Image.open(str(out.segmentation_mask))) > 0, expected.mask > 0)


def test_cog_yaml_pins_match_the_runtime_requirements():
    import yaml

    cog = yaml.safe_load((REPO / "cog.yaml").read_text())
    assert cog["predict"] == "predict.py:Predictor"
    pinned = {line.split("==")[0].lower(): line.split("==")[1] for line in cog["build"]["python_packages"]}
    runtime = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            runtime[name.lower()] = version
    assert "torch" not in runtime
    assert {k: v for k, v in pinned.items() if k != "torch"} == runtime


def test_dev_requirements_pin_the_runtime_versions():
    dev = {}
    for line in (REPO / "requirements-dev.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            dev[name.lower()] = version
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            assert dev.get(name.lower()) == version, name


def test_a_missing_gpu_is_named_as_such(inputs, tmp_path, monkeypatch):
    """-d gpu without CUDA: exit 1, the reason is the device (not 'cannot load the model')."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(process.main, ["-i", str(inputs[0]), "-o", str(tmp_path / "out"), "-d", "gpu",
                                            "--no-progress"])
    assert res.exit_code == 1
    assert "no CUDA GPU is available" in res.output and "cannot load the model" not in res.output, res.output


def test_main_py_runs_on_the_cpu_where_gpu_is_asked_and_none_is_seen(inputs, ensemble_dir, tmp_path, monkeypatch):
    """The organisers' command always says -d gpu, and the PACE template's main.py then falls back to the
    CPU where torch sees no GPU: main.py did not (exit 1, nothing written: no submission). It does now,
    with a warning; process.py still refuses, and either runs -d gpu where a GPU is seen."""
    import runpy

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root, sizes = inputs
    out = tmp_path / "pace"
    monkeypatch.setattr(sys, "argv", ["main.py", "-i", str(root), "-o", str(out), "-t", "seg", "-d", "gpu",
                                      "--model-dir", str(ensemble_dir), "--no-progress"])
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    assert stop.value.code == 0
    assert sorted(p.name for p in (out / "segmentation").iterdir()) == sorted(f"{_stem(n)}_mask.png" for n in sizes)
    res = CliRunner().invoke(process.main, ["-i", str(root), "-o", str(tmp_path / "gc"), "-d", "gpu",
                                            "--model-dir", str(ensemble_dir), "--no-progress",
                                            "--gpu-fallback"])
    assert res.exit_code == 0 and "warning: -d gpu, but no CUDA GPU is visible" in res.stderr
    assert "running on the CPU" in res.stderr
    res = CliRunner().invoke(process.main, ["-i", str(root), "-o", str(tmp_path / "strict"), "-d", "gpu",
                                            "--model-dir", str(ensemble_dir), "--no-progress"])
    assert res.exit_code == 1 and "no CUDA GPU is available" in res.stderr
    assert "--gpu-fallback" not in CliRunner().invoke(process.main, ["--help"]).output  # main.py's, not a user's


_AS_NOBODY = """import runpy, sys
from pathlib import Path
import model.inference
model.inference.SAGEMAKER_MODEL_DIR = Path(sys.argv[1])  # where Grand Challenge mounts the upload
sys.argv = ["process.py", *sys.argv[2:]]
runpy.run_path("process.py", run_name="__main__")
"""


def _can_run_as_nobody() -> bool:
    """Root with setpriv, in a user namespace that maps uid 65534 (under ``unshare -r`` only root is)."""
    if not hasattr(os, "getuid") or os.getuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "true"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _can_run_as_nobody(), reason="needs root, setpriv and uid 65534 to run process.py as "
                                                      "another user")
def test_a_folder_this_user_may_not_enter_is_an_error_naming_it_not_a_traceback(tmp_path):
    """Real permissions, not simulated: process.py runs as uid 65534 (a container's user) against folders
    of mode 700 owned by root. Python's exists()/is_dir() raise PermissionError there instead of
    answering False, which ended the run with a traceback; each is an ``error:`` line naming the folder in
    the way, exit 1, before any model work."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="pfsam-perm-", dir="/tmp"))  # pytest's tmp_path is root's alone
    try:
        base.chmod(0o755)
        (base / "in").mkdir(mode=0o755)
        Image.fromarray(synthetic_ultrasound(50, 70, 21)[0]).save(base / "in" / "case.png")
        (base / "in" / "case.png").chmod(0o644)
        (base / "out").mkdir()
        (base / "out").chmod(0o777)
        locked = base / "locked"
        (locked / "data").mkdir(parents=True)
        (locked / "model").mkdir()
        (locked / "model" / "ensemble.json").write_text("{}")
        locked.chmod(0o700)  # root's: the other user may not enter it
        upload = base / "upload"  # an uploaded model.tar.gz unpacked with umask 077
        (upload / "ens").mkdir(parents=True)
        upload.chmod(0o700)

        def run(upload_dir: Path, *args: str) -> subprocess.CompletedProcess:
            env = {**os.environ, "HOME": str(base / "out"), "PYTHONDONTWRITEBYTECODE": "1"}
            cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c",
                   _AS_NOBODY, str(upload_dir), *args, "-d", "cpu", "--no-progress"]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env)

        no_upload = base / "none"
        in_ok, out_ok = str(base / "in"), str(base / "out" / "o")
        checks = [
            (run(no_upload, "-i", str(locked / "data"), "-o", out_ok),
             f"error: input folder {locked / 'data'} cannot be read: {locked}, a folder on its way, cannot be "
             "entered: permission denied: not searchable by this user (uid 65534; the folder has mode 700, owner uid 0)"),
            (run(no_upload, "-i", in_ok, "-o", str(locked / "out")),
             f"error: cannot use the output folder {locked / 'out'}: {locked}, a folder on its way, cannot be entered"),
            (run(no_upload, "-i", in_ok, "-o", out_ok, "--model-dir", str(locked / "model")),
             f"error: cannot load the model from {locked / 'model'}: {locked}, a folder on its way, cannot be entered"),
            (run(upload, "-i", in_ok, "-o", out_ok),
             f"error: cannot read the uploaded model in {upload}: {upload}, a folder on its way, cannot be entered: "
             "permission denied: not searchable by this user (uid 65534; the folder has mode 700, owner uid 0)"),
        ]
        for proc, expected in checks:
            assert proc.returncode == 1, proc.stderr
            assert "Traceback" not in proc.stderr and expected in proc.stderr, proc.stderr
        assert not (base / "out" / "o").exists()  # refused before anything was written
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not _can_run_as_nobody(), reason="needs root, setpriv and uid 65534 to run process.py as "
                                                      "another user")
def test_a_subfolder_that_can_be_listed_but_not_entered_fails_alone(tmp_path):
    """A folder below the input of mode 644 for the container's user (its names can be listed, its files
    not looked at): the run stopped with a PermissionError traceback before any image, nothing written
    (or, with a file without an image suffix in it, with an error naming the folder, again nothing
    processed). It is now one failed entry naming the folder and the reason; every other image is written."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="pfsam-perm-", dir="/tmp"))  # pytest's tmp_path is root's alone
    try:
        base.chmod(0o755)
        sub = base / "in" / "sub"
        sub.mkdir(parents=True)
        (base / "in").chmod(0o755)
        for path, seed in ((base / "in" / "case.png", 21), (sub / "b.png", 22)):
            Image.fromarray(synthetic_ultrasound(50, 70, seed)[0]).save(path)
            path.chmod(0o644)
        (sub / "IM0001").write_bytes(b"\0" * 128 + b"DICM")  # no image suffix: looked at by its content
        sub.chmod(0o644)
        (base / "out").mkdir(mode=0o777)
        (base / "out").chmod(0o777)
        env = {**os.environ, "HOME": str(base / "out"), "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c",
               _AS_NOBODY, str(base / "none"), "-i", str(base / "in"), "-o", str(base / "out" / "o"),
               "--format", "pace", "-d", "cpu", "--no-progress"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env)
        assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
        assert "1 of 1 image processed, 1 folder not listed" in proc.stderr, proc.stderr
        assert _files(base / "out" / "o" / "segmentation") == ["case_mask.png"]
        errors = {r["file"]: r["reason"] for r in csv.DictReader(open(base / "out" / "o" / "errors.csv"))}
        assert errors == {"sub": "folder cannot be entered, so its images are not read: permission denied: not "
                                 "searchable by this user (uid 65534; the folder has mode 644, owner uid 0) (its names "
                                 "can be listed, but no file in it can be opened)"}, errors
    finally:
        shutil.rmtree(base, ignore_errors=True)
