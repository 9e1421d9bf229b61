"""The embedded default ensemble: loads offline from the repository; real-data metrics hold.

The real-data test prepares ../shared/data (skipped when absent), predicts the validation split
through the container's own path (training.predict -> model.inference.run) and checks the
headline metrics against the figures recorded at export (ensemble.json "validation", also in
MODEL_CARD.md) minus a small tolerance, so a broken preprocessing change fails CI.
"""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from model.predictor import DEFAULT_MODEL_DIR, Predictor
from synthetic import make_ultrasound

SPEC = DEFAULT_MODEL_DIR / "ensemble.json"
pytestmark = pytest.mark.skipif(not SPEC.is_file(), reason="no embedded default model in model/weights/default")
TOLERANCE = {"dsc": 0.02, "accuracy": 0.02, "auc_malignant": 0.02, "auc_macro": 0.02}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_default_model_loads_and_predicts_without_network(no_network, monkeypatch):
    import model.network

    built = []
    real = model.network.build_encoder
    monkeypatch.setattr(model.network, "build_encoder", lambda *a, **k: built.append(a) or real(*a, **k))
    pred = Predictor.from_dir(DEFAULT_MODEL_DIR, device="cpu")
    assert set(pred.members) == {"sd-h", "mgc-a"}
    assert len({id(m.encoder) for m in pred.members.values()}) == 1  # one shared, frozen encoder,
    assert len(built) == 1  # built (and its weights read and verified) once
    img, _ = make_ultrasound(333, 444, seed=9)
    out = pred.predict_one(img)
    assert out.mask.shape == (333, 444) and out.label in ("normal", "benign", "malignant")
    assert abs(sum(out.probabilities.values()) - 1) < 1e-4


def test_default_weights_are_small_safetensors():
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".pkl", ".bin")]
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").is_file()


def test_test_sh_expects_outputs_of_this_model():
    """test.sh compares the container's outputs with test/expected_output.json, which records the
    fingerprint of the model it was made with: any edit under model/weights/default (even
    ensemble.json's validation scores) needs test/make_expected.sh, or CI's Docker check fails late."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_output import model_fingerprint

    expected = json.loads((Path(__file__).resolve().parent / "expected_output.json").read_text())
    assert expected["model"]["kind"] == "default"
    assert expected["model"]["fingerprint"] == model_fingerprint(DEFAULT_MODEL_DIR), "run test/make_expected.sh"


@pytest.mark.slow
@pytest.mark.real_data
def test_default_model_meets_its_model_card_on_real_validation_images(shared_data, tmp_path):
    from training.evaluate import evaluate_predictions
    from training.prepare import main as prepare_main
    from training.predict import predict_split

    recorded = json.loads(SPEC.read_text())["validation"]
    data = tmp_path / "data"
    from click.testing import CliRunner

    res = CliRunner().invoke(prepare_main, ["--busi", str(shared_data / "BUSI"), "--busbra",
                                            str(shared_data / "BUS-BRA"), "--out", str(data),
                                            "--no-near-duplicates"])  # the split the model was trained on
    assert res.exit_code == 0, res.output
    result = predict_split(DEFAULT_MODEL_DIR, data, "val", tmp_path / "pred", device="cpu", batch_size=8,
                           progress=False)
    assert result.exit_code == 0
    metrics = evaluate_predictions(tmp_path / "pred", data, "val", tmp_path / "eval", n_boot=50)
    assert metrics["n_images"] == recorded["n_images"]
    for key, tol in TOLERANCE.items():
        assert metrics[key] >= recorded[key] - tol, (key, metrics[key], recorded[key])
    assert np.isfinite(metrics["hd95"]) and metrics["hd95"] <= recorded["hd95"] * 1.1 + 1


@pytest.mark.slow
@pytest.mark.real_data
def test_cpu_default_precision_is_fp32_and_bf16_is_measured(shared_data):
    """On CPU the default (``auto``) path is fp32: its masks are those of fp32 exactly. bf16 on CPU is
    opt-in because it moves masks beyond the tolerance (Dice >= 0.99 against fp32); the figure
    printed here is the one the README quotes (24 BUSI images, both lesion classes)."""
    from model.io import read_image
    from training.metrics import dice

    from model.predictor import bf16_supported

    paths = [p for cls in ("benign", "malignant") for p in sorted((shared_data / "BUSI" / cls).glob("*).png"))[:12]]
    images = [read_image(p).array for p in paths]
    runs = {prec: Predictor.from_dir(DEFAULT_MODEL_DIR, device="cpu", batch_size=8, precision=prec).predict(images)
            for prec in ("auto", "fp32")}
    for a, b in zip(runs["auto"], runs["fp32"]):
        assert np.array_equal(a.mask, b.mask) and a.label == b.label
    if not bf16_supported(torch.device("cpu")):  # emulated there: same rounding, 15 times the time (7 min)
        pytest.skip("auto is fp32 (checked); bf16 is measured on CPUs with native bf16 only (AVX512-BF16 or AMX)")
    runs["bf16"] = Predictor.from_dir(DEFAULT_MODEL_DIR, device="cpu", batch_size=8, precision="bf16").predict(images)
    scores = [dice(a.mask, b.mask) if a.mask.any() or b.mask.any() else 1.0 for a, b in zip(runs["fp32"], runs["bf16"])]
    agree = np.mean([a.label == b.label for a, b in zip(runs["fp32"], runs["bf16"])])
    print(f"bf16 vs fp32 on {len(images)} BUSI images: mean Dice {np.mean(scores):.4f}, min {np.min(scores):.4f}, "
          f"labels agree {agree:.2f}")
    assert 0.85 < np.mean(scores) < 1.0  # bf16 runs (not silently fp32) and stays close


def test_the_default_model_gives_the_recorded_answer_for_a_test_input():
    """The shipped model's answer for test/input's bus_grey.png is the one test/expected_output.json
    records for the container (test.sh): the same label, the same lesion (within 1 % of its pixels)
    and probabilities within test.sh's 1e-3. A change in any layer the default model runs that
    still loads its weights (a head's activation or normalisation, the encoder, pre- or
    post-processing) shows here in seconds, not only in the Docker check or the slow real-data test."""
    from pathlib import Path

    from model.io import read_image

    here = Path(__file__).resolve().parent
    expected = json.loads((here / "expected_output.json").read_text())["runs"]["all"]["cases"]["bus_grey.png"]
    image = read_image(here / "input" / "images" / "breast-ultrasound-image" / "bus_grey.png")
    out = Predictor.from_dir(DEFAULT_MODEL_DIR, device="cpu").predict_one(image.array)
    assert list(out.mask.shape[::-1]) == expected["mask"]["size"]
    assert abs(int(out.mask.sum()) - expected["mask"]["lesion_pixels"]) <= 0.01 * expected["mask"]["lesion_pixels"]
    assert out.label == expected["label"]
    for name, p in expected["probabilities"].items():
        assert abs(out.probabilities[name] - p) < 1e-3, (name, out.probabilities[name], p)


def test_the_default_models_weights_are_checked_against_their_configs(tmp_path):
    """The embedded members' config.json files record their model.safetensors' sha256: one flipped bit
    in MGC-A's weights (the "normal" logit's bias turned to -3e37, finite) loaded without a word and
    the model could never answer normal; it is refused naming the file."""
    import shutil

    from model.checkpoint import CheckpointError, load_model

    for member in ("sd-h", "mgc-a"):
        cfg = json.loads((DEFAULT_MODEL_DIR / member / "config.json").read_text())
        assert len(cfg["weights_sha256"]) == 64, member
    copy = tmp_path / "default"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    weights = copy / "mgc-a" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 3] ^= 0x40  # bit 30 of the first tensor's first float32
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"mgc-a: model.safetensors is not the file that config.json was saved"):
        load_model(copy / "mgc-a")
    assert load_model(copy / "sd-h") is not None
