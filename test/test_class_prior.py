"""The class prior option: ``postprocess.class_prior`` in ensemble.json, ``--class-prior`` on the CLIs.

``data`` divides each classification member's training sampling weights out of its probabilities
(Bayes' rule) before the members are averaged; ``trained`` leaves them as learnt. Checked on the
embedded default model (real LiteMedSAM weights, MGC-A trained with normal x3, malignant x1.5) and on
a two-member test ensemble where only one member records sampling weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import process
from make_test_model import make_test_ensemble
from model import inference
from model.checkpoint import CheckpointError, class_sampling_weights, read_config
from model.predictor import DEFAULT_MODEL_DIR, Predictor
from synthetic import make_ultrasound

# the container's path again and again on the same images: a repeat batch gets what the real
# encoder gave it (test/encoder_memo.py)
pytestmark = pytest.mark.usefixtures("encoder_memo")

CLASSES = ("normal", "benign", "malignant")


def _images(n: int = 3) -> list[np.ndarray]:
    return [make_ultrasound(180 + 37 * i, 240 - 21 * i, lesion=i != 1, seed=40 + i, malignant=i == 2)[0]
            for i in range(n)]


def _probs(predictions) -> np.ndarray:
    return np.array([[p.probabilities[c] for c in CLASSES] for p in predictions])


def _bayes(p: np.ndarray, w) -> np.ndarray:
    q = p / np.asarray(w, dtype=np.float64)
    return q / q.sum(axis=1, keepdims=True)


def test_sampling_weights_are_read_from_a_members_training_record():
    cfg = read_config(DEFAULT_MODEL_DIR / "mgc-a")
    assert class_sampling_weights(cfg) == [3.0, 1.0, 1.5]  # README: normal x3, malignant x1.5
    assert class_sampling_weights({"provenance": {"train_config": {"class_weights": {"malignant": 2}}}}) == [1, 1, 2]
    assert class_sampling_weights({}) == [1.0, 1.0, 1.0]  # no record: nothing to divide out
    with pytest.raises(CheckpointError, match="positive"):
        class_sampling_weights({"provenance": {"train_config": {"class_weights": {"normal": 0}}}})


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "ensemble.json").is_file(), reason="no embedded default model")
def test_data_prior_divides_the_default_models_sampling_weights_out():
    pred = Predictor.from_dir(DEFAULT_MODEL_DIR, device="cpu")
    assert pred.class_prior == "trained"  # the shipped ensemble.json keeps the probabilities as trained
    images = _images()
    trained = pred.predict(images)
    pred.class_prior = "data"
    data = pred.predict(images)
    p_trained, p_data = _probs(trained), _probs(data)
    np.testing.assert_allclose(p_data, _bayes(p_trained, [3.0, 1.0, 1.5]), atol=2e-6)
    assert not np.allclose(p_data, p_trained, atol=1e-3)
    assert (p_data[:, 1] > p_trained[:, 1]).all()  # benign, the class not oversampled, gains
    for t, d in zip(trained, data):
        assert np.array_equal(t.mask, d.mask)  # the mask does not depend on the prior
        assert d.label == CLASSES[int(np.argmax([d.probabilities[c] for c in CLASSES]))]
    with pytest.raises(ValueError, match="class_prior must be one of trained, data"):
        pred.class_prior = "uniform"


def _copy(ensemble: Path, dst: Path, classification_weights=None, postprocess=None, class_weights=None) -> Path:
    shutil.copytree(ensemble, dst)
    spec = json.loads((dst / "ensemble.json").read_text())
    if classification_weights is not None:
        spec["classification_weights"] = classification_weights
    spec["postprocess"].update(postprocess or {})
    (dst / "ensemble.json").write_text(json.dumps(spec))
    if class_weights is not None:  # as training.train records its config in the member's provenance
        cfg_path = dst / "mgca" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.setdefault("provenance", {})["train_config"] = {"class_weights": class_weights}
        cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def weighted_ensemble(tmp_path_factory) -> Path:
    """The two-member test ensemble (classification weights mgca 1.0, sdh 0.5), mgca recording sampling
    weights normal x4, malignant x2, sdh none."""
    root = tmp_path_factory.mktemp("prior")
    base = make_test_ensemble(root / "base")
    return _copy(base, root / "weighted", class_weights={"normal": 4.0, "benign": 1.0, "malignant": 2.0})


def test_each_member_is_corrected_by_its_own_weights_before_the_average(weighted_ensemble, tmp_path):
    images = _images(2)

    def probs(model_dir, class_prior=None):
        return _probs(inference.load_predictor(model_dir, device="cpu", class_prior=class_prior).predict(images))

    only_mgca = probs(_copy(weighted_ensemble, tmp_path / "m", classification_weights={"mgca": 1.0}))
    only_sdh = probs(_copy(weighted_ensemble, tmp_path / "s", classification_weights={"sdh": 1.0}))
    np.testing.assert_allclose(probs(weighted_ensemble, "trained"), (only_mgca + 0.5 * only_sdh) / 1.5, atol=2e-6)
    expected = (_bayes(only_mgca, [4.0, 1.0, 2.0]) + 0.5 * only_sdh) / 1.5  # sdh has no weights: as trained
    np.testing.assert_allclose(probs(weighted_ensemble, "data"), expected, atol=2e-6)


def test_the_ensembles_setting_is_the_default_and_the_cli_overrides_it(weighted_ensemble, tmp_path):
    ens = _copy(weighted_ensemble, tmp_path / "ens", postprocess={"class_prior": "data"})
    assert inference.load_predictor(ens, device="cpu").class_prior == "data"
    assert inference.load_predictor(ens, device="cpu", class_prior="trained").class_prior == "trained"
    img_dir = tmp_path / "in"
    img_dir.mkdir()
    from model.atomic_files import write_png

    write_png(img_dir / "case.png", _images(1)[0])
    rows = {}
    for flag in ([], ["--class-prior", "trained"], ["--class-prior", "data"]):
        out = tmp_path / f"out{len(rows)}"
        res = CliRunner().invoke(process.main, ["-i", str(img_dir), "-o", str(out), "--format", "pace", "-d", "cpu",
                                                "--model-dir", str(ens), "--no-progress", *flag])
        assert res.exit_code == 0, res.output
        lines = (out / "classification" / "probabilities.csv").read_text().splitlines()
        rows[" ".join(flag) or "default"] = lines[1]
    assert rows["default"] == rows["--class-prior data"] != rows["--class-prior trained"]


def test_an_unknown_class_prior_in_ensemble_json_is_an_error_naming_the_folder(weighted_ensemble, tmp_path):
    ens = _copy(weighted_ensemble, tmp_path / "bad", postprocess={"class_prior": "uniform"})
    with pytest.raises(inference.InferenceError, match=r"bad.*postprocess\.class_prior must be one of trained, data"):
        inference.load_predictor(ens, device="cpu")
    res = CliRunner().invoke(process.main, ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "--class-prior", "flat"])
    assert res.exit_code == 2 and "flat" in res.output  # click refuses it before anything loads
