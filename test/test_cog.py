"""The Cog predictor (predict.py) under Cog's own runtime, and under its stand-ins without it.

``cog predict`` and a Replicate-style deployment run ``python -m cog.server.http`` in the image that
``cog build`` makes: the cog SDK inspects ``predict.py:Predictor``, a worker process runs ``setup()``
once, and each HTTP request's input file is saved under a name of Cog's choosing (a data URI of
``application/octet-stream`` becomes ``…file.bin``). The server here is the cog and coglet wheels
pinned in requirements-dev.txt, on a loopback port, with the embedded default model; its answers are
compared with the same images predicted in this process. The Cog CLI (a Go binary that builds the
image) is not on PyPI and is not exercised. Skips without the cog wheels or without a loopback
network (``unshare -n``).
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))
from conftest import free_loopback_port  # noqa: E402
from make_fixtures import synthetic_ultrasound  # noqa: E402

SPACING, ORIGIN = (0.12, 0.2), (3.0, -1.5)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    """One prediction request. Cog answers a failed prediction before it frees its one slot, so a
    request right after one may be turned away 'At capacity' (seen with torch 2.5.1): it is sent again, as a
    client would."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    for _ in range(100):
        try:
            with urllib.request.urlopen(req, timeout=180) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # a failed prediction may come with an error status
            res = json.loads(exc.read())
        if "At capacity" not in str(res.get("error")):
            return res
        time.sleep(0.1)
    return res


def _settled_health(url: str, within: float = 30.0) -> str:
    """The server's health once its last prediction has released its slot. Cog answers a prediction before
    it marks itself idle, so a health check right after one may still read BUSY (seen in CI): it is asked
    again until it reads something else or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        status = _get(f"{url}/health-check")["status"]
        if status != "BUSY" or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _decoded(uri: str) -> bytes:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), head[:80]
    return base64.b64decode(payload)


@pytest.fixture(scope="module")
def cog_server(tmp_path_factory):
    """``python -m cog.server.http`` serving predict.py:Predictor; yields its base URL once READY."""
    pytest.importorskip("coglet", reason="the Cog runtime (cog and coglet, requirements-dev.txt) is not installed")
    try:
        port = free_loopback_port()
    except OSError as exc:  # a network namespace (unshare -n) has its loopback interface down
        pytest.skip(f"no usable loopback network ({exc})")
    log = tmp_path_factory.mktemp("cog") / "server.log"
    # the worker process is started as `python`: this interpreter's folder first on PATH; its temporary
    # files (Cog's uploads, the last answer's folder, which the server keeps to serve) under pytest's folder
    env = dict(os.environ, PORT=str(port), COG_PREDICT_TYPE_STUB="predict.py:Predictor",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
               TMPDIR=str(tmp_path_factory.mktemp("cog-tmp")))
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=REPO, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, health = time.monotonic() + 180, {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = _get(f"{url}/health-check")
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                health = {}
            if health.get("status") in ("READY", "SETUP_FAILED", "DEFUNCT"):
                break
            time.sleep(0.5)
        assert health.get("status") == "READY", f"the Cog server did not get ready: {health}\n{log.read_text()[-3000:]}"
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cog-images")
    grey, _ = synthetic_ultrasound(180, 240, 31)
    Image.fromarray(grey).save(root / "scan.png")
    mha, _ = synthetic_ultrasound(150, 200, 32)
    img = sitk.GetImageFromArray(mha)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    sitk.WriteImage(img, str(root / "scan.mha"), useCompression=True)
    img.SetDirection((-1.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(root / "scan.nii.gz"))
    (root / "text.png").write_text("this is not an image\n")
    Image.fromarray(np.zeros((120, 160), np.uint8)).save(root / "black.png")
    return {p.name: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The same predictor as the server's setup() (the embedded default model), in this process."""
    import predict

    p = predict.Predictor()
    p.setup()
    yield p, tmp_path_factory.mktemp("cog-in-process")
    if p.served is not None:  # the last answer's folder, which a server keeps to serve until the next one
        shutil.rmtree(p.served)


def test_cog_server_answers_as_the_predictor_does_in_process(cog_server, images, in_process):
    predictor, scratch = in_process
    import predict

    for name, mime in (("scan.png", "image/png"), ("scan.mha", "application/octet-stream"),
                       ("scan.nii.gz", "application/octet-stream")):
        res = _post(f"{cog_server}/predictions", {"input": {"image": _data_uri(images[name], mime),
                                                            "overlay": name.endswith(".png")}})
        assert res["status"] == "succeeded", res.get("error")
        got = res["output"]
        want = predictor.predict(image=predict.Path(str(images[name])), overlay=name.endswith(".png"), tta=False,
                                 class_prior="model")
        assert got["classification"] == want.classification in ("Normal", "Benign", "Malignant")
        probs = [got[f"probability_{c}"] for c in ("normal", "benign", "malignant")]
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-5)
        assert probs == pytest.approx([want.probability_normal, want.probability_benign, want.probability_malignant],
                                      abs=1e-5)
        if name.endswith(".png"):
            mask = np.asarray(Image.open(io.BytesIO(_decoded(got["segmentation_mask"]))))
            np.testing.assert_array_equal(mask, np.asarray(Image.open(str(want.segmentation_mask))))
            assert set(np.unique(mask).tolist()) <= {0, 255} and mask.shape == (180, 240)
            assert Image.open(io.BytesIO(_decoded(got["overlay"]))).size == (240, 180)
        else:  # sent as file.bin, known as a MetaImage or NIfTI by its content: the mask comes back as one
            assert got["overlay"] is None
            suffix = ".mha" if name.endswith(".mha") else ".nii.gz"
            data = _decoded(got["segmentation_mask"])
            assert data.startswith(b"ObjectType" if suffix == ".mha" else b"\x1f\x8b"), data[:16]
            (scratch / f"served_mask{suffix}").write_bytes(data)
            served = sitk.ReadImage(str(scratch / f"served_mask{suffix}"))
            assert served.GetSpacing() == pytest.approx(SPACING) and served.GetOrigin() == pytest.approx(ORIGIN)
            assert served.GetDirection() == pytest.approx(sitk.ReadImage(str(images[name])).GetDirection())
            np.testing.assert_array_equal(sitk.GetArrayFromImage(served),
                                          sitk.GetArrayFromImage(sitk.ReadImage(str(want.segmentation_mask))))


def test_cog_server_fails_a_bad_input_with_the_reason_and_keeps_serving(cog_server, images):
    for name, reason in (("text.png", "not a readable image"),
                         ("black.png", r"every pixel has the same value (0): nothing to segment")):
        res = _post(f"{cog_server}/predictions", {"input": {"image": _data_uri(images[name], "image/png")}})
        assert res["status"] == "failed" and reason in res["error"], res
    res = _post(f"{cog_server}/predictions", {"input": {"image": _data_uri(images["scan.png"], "image/png"),
                                                        "overlay": False}})
    assert res["status"] == "succeeded" and res["output"]["overlay"] is None, res.get("error")
    assert _settled_health(cog_server) == "READY"


def test_predict_py_runs_on_its_stand_ins_without_cog(tmp_path):
    """Where cog is not installed (the challenge container, plain Python), predict.py's stand-ins for
    BasePredictor, BaseModel, Input and Path keep it importable and its predict() callable."""
    code = f"""
import sys
sys.modules["cog"] = None  # `import cog` raises ImportError
sys.path.insert(0, {str(REPO)!r})
import predict
assert predict.BasePredictor.__module__ == "predict", predict.BasePredictor
p = predict.Predictor()
p.setup()
out = p.predict(image=predict.Path({str(tmp_path / 'scan.png')!r}), overlay=True, tta=False, class_prior="model")
print(out.dict()["classification"], out.segmentation_mask.name, out.overlay.name)
first = out.segmentation_mask.parent
again = p.predict(image=predict.Path({str(tmp_path / 'scan.png')!r}), overlay=False, tta=False, class_prior="model")
# the first answer's folder is gone once the next prediction starts (Cog deletes no output file itself)
assert not first.exists() and again.segmentation_mask.is_file() and again.segmentation_mask.parent != first
try:
    p.predict(image=predict.Path({str(tmp_path / 'notes.png')!r}), overlay=True, tta=False, class_prior="model")
except Exception as exc:
    print("refused:", exc, file=sys.stderr)
"""
    grey, _ = synthetic_ultrasound(100, 130, 33)
    Image.fromarray(grey).save(tmp_path / "scan.png")
    (tmp_path / "notes.png").write_text("not an image")
    tmp = tmp_path / "tmp"  # where the predictions' folders go
    tmp.mkdir()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp)})
    assert res.returncode == 0, res.stderr[-2000:]
    model_line, answer = res.stdout.rstrip("\n").rsplit("\n", 1)
    assert model_line.startswith("model: ") and model_line.endswith("(built in)")  # setup's log line, on stdout
    label, mask, overlay = answer.split()
    assert label in ("Normal", "Benign", "Malignant") and (mask, overlay) == ("scan_mask.png", "scan_overlay.png")
    assert "refused:" in res.stderr and "notes.png" in res.stderr
    # the refused input's folder is gone, and so is the one before it: a long-running server keeps no
    # more than the last answer's files
    assert not [p for p in tmp.iterdir() if p.name.startswith("pfsam-")]


def test_predict_py_called_with_real_cog_takes_the_documented_defaults(tmp_path):
    """Called from Python where cog is installed (the development .venv), an argument left out
    arrived as cog's Input(...) placeholder: bool() of it turned TTA on (twice the encoder time,
    other probabilities than process.py's) and class_prior failed with the placeholder's repr."""
    pytest.importorskip("cog")
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import predict
assert predict.BasePredictor.__module__.startswith("cog"), predict.BasePredictor
p = predict.Predictor()
p.setup()
short = p.predict(image=predict.Path({str(tmp_path / 'scan.png')!r}))
assert p.predictor.tta is False and p.predictor.class_prior == p.model_class_prior
full = p.predict(image=predict.Path({str(tmp_path / 'scan.png')!r}), overlay=True, tta=False, class_prior="model")
assert short.overlay is not None and short.classification == full.classification
assert short.probability_malignant == full.probability_malignant, (short.probability_malignant, full.probability_malignant)
try:
    p.predict()
except TypeError as exc:
    print("refused:", exc)
"""
    grey, _ = synthetic_ultrasound(100, 130, 34)
    Image.fromarray(grey).save(tmp_path / "scan.png")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "refused: predict() needs image" in res.stdout, res.stdout


def test_cog_server_takes_the_class_prior(cog_server, images):
    """``class_prior``: ``model`` (the default model's ensemble.json: trained) and ``trained`` give the
    same answer; ``data`` divides its MGC-A's sampling weights (normal x3, malignant x1.5) out; any
    other value is refused by Cog's own input check."""
    answers = {}
    for prior in ("model", "trained", "data"):
        res = _post(f"{cog_server}/predictions", {"input": {"image": _data_uri(images["scan.png"], "image/png"),
                                                            "overlay": False, "class_prior": prior}})
        assert res["status"] == "succeeded", res.get("error")
        answers[prior] = np.array([res["output"][f"probability_{c}"] for c in ("normal", "benign", "malignant")])
    np.testing.assert_allclose(answers["model"], answers["trained"], atol=1e-7)
    expected = answers["trained"] / [3.0, 1.0, 1.5]
    np.testing.assert_allclose(answers["data"], expected / expected.sum(), atol=1e-5)
    res = _post(f"{cog_server}/predictions", {"input": {"image": _data_uri(images["scan.png"], "image/png"),
                                                        "class_prior": "flat"}})
    assert res.get("status") != "succeeded" and "flat" in json.dumps(res), res


def test_the_build_context_keeps_what_cog_build_needs():
    """`cog build` reads .dockerignore as gitignore rules (go-gitignore): it refuses to build when its
    own folder .cog is ignored, and its image runs predict.py from the context; the Dockerfile build
    still gets only the application's files (the rules start with `**`)."""
    pathspec = pytest.importorskip("pathspec", reason="pathspec (requirements-dev.txt) is not installed")
    spec = pathspec.GitIgnoreSpec.from_lines((REPO / ".dockerignore").read_text().splitlines())
    for kept in ("predict.py", "cog.yaml", ".cog/tmp/build1/weights", "process.py", "main.py", "docker-entrypoint.sh",
                 "requirements.txt", "model/inference.py", "model/weights/default/ensemble.json"):
        assert not spec.match_file(kept), kept
    for left_out in (".venv/bin/python", ".git/HEAD", "data/prepared/labels.csv", "runs/x/best/model.safetensors",
                     "test/test_cog.py", "pfsam-bus.tar.gz", "model/weights/mine/ensemble.json",
                     "model/__pycache__/io.cpython-311.pyc", "README.md"):
        assert spec.match_file(left_out), left_out
