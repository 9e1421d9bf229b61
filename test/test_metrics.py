"""training.metrics against DeepMind's surface_distance, scikit-learn, and hand-computed values."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from training import metrics as M

sd = pytest.importorskip("surface_distance")
skm = pytest.importorskip("sklearn.metrics")

R2 = math.sqrt(2)


@pytest.fixture(autouse=True)
def _quiet():
    # surface_distance uses the deprecated scipy.ndimage.filters / .morphology namespaces
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@pytest.fixture
def np_inf(monkeypatch):
    """surface_distance still uses ``np.Inf`` (gone in NumPy 2) when one mask is empty."""
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)


def box(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def random_masks(seed, n):
    rng = np.random.default_rng(seed)
    for t in range(n):
        h, w = rng.integers(4, 48, 2)
        g = rng.random((h, w)) < rng.uniform(0.1, 0.7)
        if t % 2:
            g = ndimage.binary_opening(g)
        p = ndimage.binary_dilation(g, iterations=int(rng.integers(0, 3))) ^ (rng.random((h, w)) < 0.05)
        if g.any() and p.any():
            yield g, p


SPACINGS = [(1.0, 1.0), (0.5, 0.5), (2.0, 0.5), (0.3, 1.7), (0.0763, 0.1104)]


# --------------------------------------------------------------------------------------------
# Surface distances vs surface_distance
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", SPACINGS)
def test_surface_distances_identical_to_deepmind(spacing):
    n = 0
    for g, p in random_masks(hash(spacing) % 1000, 40):
        ref = sd.compute_surface_distances(g, p, spacing)
        ours = M.surface_distances(g, p, spacing)
        for key in ref:
            np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
        assert M.hd95(g, p, spacing) == sd.compute_robust_hausdorff(ref, 95)
        assert M.robust_hausdorff(ours, 100) == sd.compute_robust_hausdorff(ref, 100)
        for tau in (0.0, 0.5, 1.0, 2.0, 3.3):
            assert M.nsd(g, p, tau, spacing) == sd.compute_surface_dice_at_tolerance(ref, tau)
        n += 1
    assert n >= 30


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (2.0, 0.5)])
def test_hand_made_shapes_match_deepmind(spacing):
    shape = (30, 40)
    cases = [
        (box(shape, 5, 15, 5, 15), box(shape, 5, 15, 5, 15)),  # identical
        (box(shape, 5, 15, 5, 15), box(shape, 5, 15, 8, 18)),  # shifted
        (box(shape, 0, 30, 0, 40), box(shape, 2, 28, 3, 37)),  # touches the image border
        (box(shape, 3, 4, 3, 4), box(shape, 20, 21, 30, 31)),  # single pixels far apart
        (box(shape, 5, 15, 5, 15) | box(shape, 20, 25, 25, 35), box(shape, 6, 14, 6, 14)),  # two components
        (box(shape, 10, 20, 10, 20) & ~box(shape, 13, 17, 13, 17), box(shape, 10, 20, 10, 20)),  # a hole
        (box(shape, 5, 6, 5, 6) | box(shape, 6, 7, 6, 7), box(shape, 5, 7, 5, 7)),  # saddle corner
    ]
    for g, p in cases:
        ref = sd.compute_surface_distances(g, p, spacing)
        res = M.segmentation_metrics(g, p, spacing, tau=2.0)
        assert res["hd95"] == sd.compute_robust_hausdorff(ref, 95)
        assert res["nsd"] == sd.compute_surface_dice_at_tolerance(ref, 2.0)
        assert res["dice"] == pytest.approx(sd.compute_dice_coefficient(g, p))


def test_contour_length_table_matches_deepmind():
    from surface_distance import lookup_tables as lt

    for spacing in SPACINGS:
        np.testing.assert_array_equal(M.contour_length_table(spacing),
                                      lt.create_table_neighbour_code_to_contour_length(spacing))


def test_weighted_percentile_boundary_like_deepmind():
    """20 unit pieces at distances 0..19: the cumulative share reaches exactly 0.95 at the 19th,
    which is the one taken (searchsorted, left side), as surface_distance does."""
    d = np.arange(20.0)
    dist = {"distances_gt_to_pred": d, "surfel_areas_gt": np.ones(20),
            "distances_pred_to_gt": np.zeros(3), "surfel_areas_pred": np.ones(3)}
    assert M.robust_hausdorff(dist, 95) == 18.0 == sd.compute_robust_hausdorff(dist, 95)
    assert M.robust_hausdorff(dist, 100) == 19.0
    assert M.surface_dice(dist, 2.0) == pytest.approx((3 + 3) / 23) == sd.compute_surface_dice_at_tolerance(dist, 2.0)


def test_concentric_squares_by_hand():
    """GT 10x10, prediction its 6x6 centre. GT contour: 36 unit pieces + 4 corners of sqrt(2)/2;
    28 of its unit pieces are 2 from the prediction, 8 are sqrt(5), the corners 2*sqrt(2).
    Prediction contour: 20 unit pieces + 4 corners, all 2 from the GT contour."""
    g = box((20, 20), 5, 15, 5, 15)
    p = box((20, 20), 7, 13, 7, 13)
    len_g, len_p = 36 + 2 * R2, 20 + 2 * R2
    res = M.segmentation_metrics(g, p, tau=2.0)
    assert res["hd95"] == pytest.approx(2 * R2)  # 95% of GT's length is only reached at the corners
    assert res["nsd"] == pytest.approx((28 + len_p) / (len_g + len_p))
    assert M.nsd(g, p, tau=2.3) == pytest.approx((36 + len_p) / (len_g + len_p))
    assert M.nsd(g, p, tau=2.9) == pytest.approx(1.0)
    assert res["dice"] == pytest.approx(2 * 36 / (100 + 36))
    assert res["iou"] == pytest.approx(36 / 100)
    # spacing scales the distances: isotropic 0.5 mm -> half
    res_mm = M.segmentation_metrics(g, p, spacing=(0.5, 0.5), tau=1.0)
    assert res_mm["hd95"] == pytest.approx(R2)
    assert res_mm["nsd"] == pytest.approx(res["nsd"])
    assert res_mm["gt_area"] == pytest.approx(25.0)  # 100 px of 0.25 mm^2


def test_shift_by_hand_anisotropic():
    """A 4 x 6 box shifted one row down with spacing (row 3, col 1): every vertical piece is 0
    from the other contour, the horizontal ones 3 mm (one row) away."""
    g = box((12, 12), 2, 6, 3, 9)
    p = box((12, 12), 3, 7, 3, 9)
    assert M.hd95(g, p, spacing=(3.0, 1.0)) == pytest.approx(3.0)
    assert M.hd95(g, p, spacing=(1.0, 3.0)) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Empty-mask conventions
# --------------------------------------------------------------------------------------------

def test_empty_prediction_on_lesion_image(np_inf):
    g = box((30, 40), 5, 10, 5, 10)
    p = np.zeros_like(g)
    res = M.segmentation_metrics(g, p)
    assert res["dice"] == 0 and res["iou"] == 0 and res["nsd"] == 0
    assert res["hd95"] == pytest.approx(50.0)  # hypot(30, 40)
    assert res["pred_empty"] and res["has_lesion"] and res["fp_area"] == 0
    assert M.segmentation_metrics(g, p, spacing=(0.5, 2.0))["hd95"] == pytest.approx(math.hypot(15, 80))
    assert M.hd95(g, p) == pytest.approx(50.0)
    # surface_distance: the same NSD, but an infinite HD95
    ref = sd.compute_surface_distances(g, p, (1.0, 1.0))
    assert sd.compute_surface_dice_at_tolerance(ref, 2.0) == 0
    assert math.isinf(sd.compute_robust_hausdorff(ref, 95))


def test_prediction_on_normal_image():
    g = np.zeros((30, 40), bool)
    p = box((30, 40), 0, 3, 0, 4)
    res = M.segmentation_metrics(g, p, spacing=(0.5, 0.25))
    assert not res["has_lesion"] and not res["pred_empty"]
    assert res["dice"] == 0 and res["iou"] == 0 and res["nsd"] == 0
    assert res["hd95"] == pytest.approx(math.hypot(15, 10))
    assert res["fp_area"] == pytest.approx(12 * 0.125) and res["pred_area"] == pytest.approx(1.5)


def test_both_empty_is_undefined():
    z = np.zeros((8, 8), bool)
    res = M.segmentation_metrics(z, z)
    assert all(math.isnan(res[k]) for k in ("dice", "iou", "hd95", "nsd"))
    assert res["pred_empty"] and res["fp_area"] == 0
    assert math.isnan(M.dice(z, z)) and math.isnan(M.hd95(z, z)) and math.isnan(M.nsd(z, z))


def test_shape_and_spacing_errors():
    with pytest.raises(ValueError):
        M.dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError):
        M.hd95(np.ones((4, 4)), np.ones((4, 4)), spacing=(0, 1))


def test_segmentation_bce_by_hand():
    g = np.array([[1, 0], [1, 0]])
    prob = np.array([[0.8, 0.4], [0.0, 1.0]])
    expected = -(math.log(0.8) + math.log(0.6) + math.log(1e-7) + math.log(1e-7)) / 4
    assert M.segmentation_bce(g, prob) == pytest.approx(expected, rel=1e-9)
    assert M.segmentation_bce(g, g.astype(float)) == pytest.approx(-math.log(1 - 1e-7), abs=1e-12)


# --------------------------------------------------------------------------------------------
# Classification vs scikit-learn and by hand
# --------------------------------------------------------------------------------------------

def random_classification(seed, n):
    rng = np.random.default_rng(seed)
    y = np.r_[0, 1, 2, rng.integers(0, 3, n - 3)]
    P = rng.dirichlet([1, 1, 1], n)
    if seed % 2:
        P = np.round(P, 1) + 1e-3  # ties
        P /= P.sum(1, keepdims=True)
    yp = P.argmax(1) if seed % 3 else rng.integers(0, 3, n)
    return y, yp, P


@pytest.mark.parametrize("seed", range(8))
def test_classification_matches_sklearn(seed):
    y, yp, P = random_classification(seed, 20 + 7 * seed)
    assert M.accuracy(y, yp) == pytest.approx(skm.accuracy_score(y, yp))
    assert M.f1_macro(y, yp) == pytest.approx(skm.f1_score(y, yp, average="macro"))
    np.testing.assert_array_equal(M.confusion_matrix(y, yp), skm.confusion_matrix(y, yp, labels=[0, 1, 2]))
    np.testing.assert_allclose(M.recall_per_class(y, yp), skm.recall_score(y, yp, average=None, labels=[0, 1, 2]))
    assert M.auc_macro(y, P) == pytest.approx(skm.roc_auc_score(y, P, multi_class="ovr", average="macro"))
    assert M.binary_auc(y == 2, P[:, 2]) == pytest.approx(skm.roc_auc_score(y == 2, P[:, 2]))
    fpr, tpr, thr = skm.roc_curve(y == 2, P[:, 2], drop_intermediate=False)
    ofpr, otpr, othr = M.roc_curve(y == 2, P[:, 2])
    np.testing.assert_allclose(ofpr, fpr)
    np.testing.assert_allclose(otpr, tpr)
    np.testing.assert_allclose(othr[1:], thr[1:])
    sens, spec = M.operating_points(y == 2, P[:, 2])
    assert sens == pytest.approx(tpr[fpr <= 0.1 + 1e-12].max())
    assert spec == pytest.approx((1 - fpr[tpr >= 0.9 - 1e-12]).max())
    res = M.classification_metrics(y, yp, P)
    assert res["auc_malignant"] == pytest.approx(skm.roc_auc_score(y == 2, P[:, 2]))
    assert res["cross_entropy"] == pytest.approx(skm.log_loss(y, P, labels=[0, 1, 2]))


def test_f1_macro_classes_seen_only_like_sklearn():
    y = [1, 1, 2, 2, 2]
    yp = [1, 2, 2, 2, 1]
    assert M.f1_macro(y, yp) == pytest.approx(skm.f1_score(y, yp, average="macro"))
    assert math.isnan(M.recall_per_class(y, yp)[0])


def test_missing_label_is_wrong_and_a_false_negative():
    y = np.array([0, 1, 2, 2, 1, 0])
    yp = np.array([0, 1, 2, -1, -1, 1])
    assert M.accuracy(y, yp) == pytest.approx(3 / 6)
    # sklearn with explicit labels ignores -1 as a class but counts the false negatives
    assert M.f1_macro(y, yp) == pytest.approx(skm.f1_score(y, yp, labels=[0, 1, 2], average="macro"))
    res = M.classification_metrics(y, yp, np.full((6, 3), 1 / 3))
    assert res["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert res["confusion_missing"] == [0, 1, 1]
    assert res["recall"] == {"normal": 0.5, "benign": 0.5, "malignant": 0.5}


def test_auc_macro_skips_absent_class():
    y = np.array([1, 1, 2, 2, 1, 2])
    P = np.array([[.1, .8, .1], [.2, .3, .5], [.1, .2, .7], [.0, .6, .4], [.3, .5, .2], [.1, .1, .8]])
    expected = (skm.roc_auc_score(y == 1, P[:, 1]) + skm.roc_auc_score(y == 2, P[:, 2])) / 2
    assert M.auc_macro(y, P) == pytest.approx(expected)
    assert math.isnan(M.auc_ovr(y, P)[0])
    assert math.isnan(M.binary_auc(np.zeros(4, bool), np.arange(4)))


def test_operating_points_by_hand():
    neg = np.arange(10) / 10  # 0.0 .. 0.9
    pos = np.array([0.95, 0.85, 0.05])
    score = np.r_[neg, pos]
    is_pos = np.r_[np.zeros(10, bool), np.ones(3, bool)]
    sens, spec = M.operating_points(is_pos, score)
    assert sens == pytest.approx(2 / 3)  # threshold 0.85: one false positive (0.9) = specificity 0.9
    assert spec == pytest.approx(0.1)  # all three positives need threshold 0.05: 9 false positives
    assert M.binary_auc(is_pos, score) == pytest.approx((10 + 9 + 1) / 30)
    assert all(math.isnan(v) for v in M.operating_points(np.ones(3, bool), [0.1, 0.2, 0.3]))


def test_cross_entropy_by_hand():
    P = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    y = [0, 0, 2]
    assert M.cross_entropy(y, P) == pytest.approx(-(math.log(0.7) + math.log(1e-7) + math.log(0.5)) / 3)


def test_class_index():
    assert M.class_index("Malignant") == 2 and M.class_index(" benign ") == 1 and M.class_index(0) == 0
    assert M.class_index(None) == -1 and M.class_index("") == -1
    with pytest.raises(ValueError):
        M.class_index("cancer")


# --------------------------------------------------------------------------------------------
# Bootstrap and evaluate_cases
# --------------------------------------------------------------------------------------------

def make_cases(n=40, seed=0):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        label = int(rng.integers(0, 3)) if i > 2 else i
        g = box((24, 32), 4, 14, 5, 20) if label else np.zeros((24, 32), bool)
        shift = int(rng.integers(0, 6))
        pred = np.roll(box((24, 32), 4, 14, 5, 20), shift, axis=1) if (label or i % 4 == 0) else g
        probs = rng.dirichlet([1, 1, 1]) * 0.5
        probs[label] += 0.5
        cases.append(M.Case(f"c{i:02d}", M.CLASS_NAMES[label], g, pred, probs, source="AB"[i % 2]))
    return cases


def test_bootstrap_is_seeded():
    data = np.random.default_rng(3).normal(size=50)
    stat = (lambda idx: {"mean": float(data[idx].mean())})
    a = M.bootstrap_ci(stat, 50, n_boot=200, seed=1)
    b = M.bootstrap_ci(stat, 50, n_boot=200, seed=1)
    c = M.bootstrap_ci(stat, 50, n_boot=200, seed=2)
    assert a == b and a["mean"] != c["mean"]
    lo, hi = a["mean"]
    assert lo < data.mean() < hi
    # percentile method, by hand
    rng = np.random.default_rng(1)
    means = [data[rng.integers(0, 50, 50)].mean() for _ in range(200)]
    assert a["mean"] == pytest.approx(list(np.percentile(means, [2.5, 97.5])))
    assert a["_valid"]["mean"] == 200


def test_evaluate_cases_bootstrap_deterministic():
    cases = make_cases()
    r1 = M.evaluate_cases(cases, n_boot=100, seed=0)
    r2 = M.evaluate_cases(cases, n_boot=100, seed=0)
    r3 = M.evaluate_cases(cases, n_boot=100, seed=1)
    assert r1["ci"] == r2["ci"] and r1["ci"]["dsc"] != r3["ci"]["dsc"]
    for k in ("dsc", "hd95", "accuracy", "auc_malignant"):
        lo, hi = r1["ci"][k]
        assert lo <= r1[k] <= hi, k


def test_a_patients_images_are_resampled_together():
    """Images of one patient are not independent: the bootstrap resamples patients (``Case.group``).
    Three identical copies of each case, grouped, give exactly the intervals of the cases alone (the
    same draws over the same units); resampled image by image they would look three times as many,
    and their intervals are narrower. The paired comparison resamples the same units."""
    from dataclasses import replace

    rng = np.random.default_rng(8)  # every other case with random probabilities: labels and AUC not perfect
    cases = [replace(c, probabilities=rng.dirichlet([1, 1, 1])) if i % 2 else c for i, c in enumerate(make_cases(30))]
    copies = [replace(c, image_id=f"{c.image_id}-{k}", group=f"P{c.image_id}") for c in cases for k in range(3)]
    alone = M.evaluate_cases(cases, n_boot=200, seed=4, by_source=False)
    grouped = M.evaluate_cases(copies, n_boot=200, seed=4, by_source=False)
    as_images = M.evaluate_cases([replace(c, group="") for c in copies], n_boot=200, seed=4, by_source=False)
    for k in ("dsc", "hd95", "accuracy", "auc_malignant", "cross_entropy"):
        assert grouped[k] == pytest.approx(alone[k]), k
        assert grouped["ci"][k] == pytest.approx(alone["ci"][k]), k
        width = lambda r: r["ci"][k][1] - r["ci"][k][0]  # noqa: E731
        assert width(as_images) < 0.8 * width(grouped), k
    assert grouped["bootstrap"]["unit"] == "group" and grouped["bootstrap"]["n_units"] == 30
    assert alone["bootstrap"]["unit"] == "image" and alone["bootstrap"]["n_units"] == 30
    shifted = [replace(c, pred=np.roll(c.pred, 1, axis=0)) if c.pred is not None else c for c in copies]
    res = M.paired_difference(grouped["cases"], M.evaluate_cases(shifted, n_boot=0)["cases"], n_boot=200, seed=4)
    ref = M.paired_difference(alone["cases"], M.evaluate_cases(
        [replace(c, pred=np.roll(c.pred, 1, axis=0)) if c.pred is not None else c for c in cases], n_boot=0)["cases"],
        n_boot=200, seed=4)
    assert res["bootstrap"]["unit"] == "group" and res["ci"]["dsc"] == pytest.approx(ref["ci"]["dsc"])


def test_evaluate_cases_aggregates():
    cases = make_cases()
    res = M.evaluate_cases(cases, n_boot=50)
    scored = [M.segmentation_metrics(c.gt, c.pred) for c in cases]
    lesion = [s for s in scored if s["has_lesion"]]
    assert res["n_images"] == 40 and res["n_lesion_images"] == len(lesion)
    assert res["dsc"] == pytest.approx(np.mean([s["dice"] for s in lesion]))
    assert res["hd95"] == pytest.approx(np.mean([s["hd95"] for s in lesion]))
    normal = [s for s in scored if not s["has_lesion"]]
    assert res["normal_empty_share"] == pytest.approx(np.mean([s["pred_empty"] for s in normal]))
    assert res["normal_fp_area"] == pytest.approx(np.mean([s["pred_area"] for s in normal]))
    assert 0 < res["normal_empty_share"] < 1
    y = [M.class_index(c.label) for c in cases]
    P = np.array([c.probabilities for c in cases])
    assert res["accuracy"] == pytest.approx(skm.accuracy_score(y, P.argmax(1)))
    assert res["auc_macro"] == pytest.approx(skm.roc_auc_score(y, P, multi_class="ovr"))
    assert set(res["by_source"]) == {"A", "B"}
    a_cases = [c for c in cases if c.source == "A"]
    assert res["by_source"]["A"]["n_images"] == len(a_cases)
    assert res["by_source"]["A"]["accuracy"] == pytest.approx(
        np.mean([M.class_index(c.label) == int(np.argmax(c.probabilities)) for c in a_cases]))
    assert res["units"] == {"distance": "px", "area": "px^2", "tau": 2.0}
    assert math.isnan(res["seg_bce"])


def test_evaluate_cases_missing_prediction_counts_as_failure():
    g = box((20, 20), 5, 10, 5, 10)
    cases = [
        {"image_id": "a", "label": "benign", "gt": g, "pred": g, "probabilities": [0, 1, 0]},
        {"image_id": "b", "label": "malignant", "gt": g, "pred": None, "probabilities": None},
        {"image_id": "c", "label": "normal", "gt": np.zeros_like(g), "pred": None, "probabilities": [.6, .3, .1],
         "pred_label": "Benign"},
    ]
    res = M.evaluate_cases(cases, n_boot=0)
    assert res["dsc"] == pytest.approx(0.5)  # 1 and 0
    assert res["hd95"] == pytest.approx((0 + math.hypot(20, 20)) / 2)
    assert res["nsd"] == pytest.approx(0.5)
    assert res["accuracy"] == pytest.approx(1 / 3)  # b has no label, c's label overrides its argmax
    # c's missing mask is a failure, not a correct empty prediction: its whole 20 x 20 image is false positive
    assert res["normal_empty_share"] == 0.0 and res["normal_fp_area"] == 400.0
    assert res["normal_images"]["n_empty_prediction"] == 0 and res["cases"][2]["fp_area"] == 400.0
    b = res["cases"][1]
    assert b["missing_mask"] and b["missing_probabilities"] and b["missing_label"] and b["pred_label"] is None
    assert b["probabilities"] == pytest.approx([1 / 3] * 3)
    assert res["cross_entropy"] == pytest.approx((0 - math.log(1 / 3) - math.log(0.6)) / 3)
    assert res["classification"]["confusion_missing"] == [0, 0, 1]
    assert "ci" not in res


def test_evaluate_cases_spacing_and_bce():
    g = box((10, 10), 2, 6, 2, 6)
    cases = [M.Case("a", "benign", g, np.zeros_like(g), [0, 1, 0], spacing=(0.5, 2.0),
                    prob_map=np.where(g, 0.8, 0.4))]
    res = M.evaluate_cases(cases, n_boot=0)
    assert res["units"]["distance"] == "mm" and res["hd95"] == pytest.approx(math.hypot(5, 20))
    assert res["seg_bce"] == pytest.approx(-(16 * math.log(0.8) + 84 * math.log(0.6)) / 100)
    with pytest.raises(ValueError):
        M.evaluate_cases(cases + [M.Case("b", "benign", g, g, [0, 1, 0])], n_boot=0)


def test_to_jsonable():
    out = M.to_jsonable({"a": np.float32(0.5), "b": float("nan"), "c": np.arange(2), "d": (np.bool_(True),)})
    assert out == {"a": 0.5, "b": None, "c": [0, 1], "d": [True]}


def test_surface_distances_with_one_empty_mask_like_deepmind(np_inf):
    """Called directly (not through segmentation_metrics' shortcut) with one empty mask: the other
    mask's distances are all inf, as in surface_distance, so NSD is 0 (as documented) and the robust
    Hausdorff distance inf."""
    g = box((20, 30), 4, 12, 6, 20)
    z = np.zeros_like(g)
    for a, b in ((g, z), (z, g)):
        ref = sd.compute_surface_distances(a, b, (1.0, 2.0))
        ours = M.surface_distances(a, b, (1.0, 2.0))
        for key in ref:
            np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
        assert M.nsd(a, b, 2.0, (1.0, 2.0)) == 0.0 == sd.compute_surface_dice_at_tolerance(ref, 2.0)
        assert math.isinf(M.robust_hausdorff(ours, 95))


@pytest.mark.parametrize("seed", range(4))
def test_per_class_figures_match_sklearn(seed):
    """The per-class F1, one-vs-rest AUC and recall of classification_metrics (the report's "Per class"
    line), each under its own class name, and the support (true images per class)."""
    y, yp, P = random_classification(seed, 30 + 5 * seed)
    yp = np.where(np.arange(len(yp)) % 7 == 3, -1, yp)  # a few missing labels
    res = M.classification_metrics(y, yp, P)
    f1 = skm.f1_score(y, yp, labels=[0, 1, 2], average=None)
    recall = skm.recall_score(y, yp, labels=[0, 1, 2], average=None)
    for k, name in enumerate(M.CLASS_NAMES):
        assert res["f1"][name] == pytest.approx(f1[k]), name
        assert res["recall"][name] == pytest.approx(recall[k]), name
        assert res["auc_ovr"][name] == pytest.approx(skm.roc_auc_score(y == k, P[:, k])), name
    assert res["support"] == [int((y == k).sum()) for k in range(3)]


def test_out_of_range_labels_and_bad_probabilities_are_refused():
    """A class index outside 0..2 (or -1 = none) and probabilities that are negative or not finite are
    errors that name the value, not a label or score silently made up."""
    for bad in (3, -2):
        with pytest.raises(ValueError, match="out of range"):
            M.class_index(bad)
    g = box((8, 8), 2, 5, 2, 5)
    for probs in ([0.5, -0.1, 0.6], [float("nan"), 0.5, 0.5], [float("inf"), 0, 0], [0.5, 0.5]):
        with pytest.raises(ValueError, match="probabilities"):
            M.score_case(M.Case("a", "benign", g, g, probs))


def test_segmentation_summary_is_over_lesion_images_only():
    """The headline IoU and NSD, the report's medians and its count of empty predictions cover the
    lesion images only: a normal image with a false-positive mask (Dice and NSD 0) or with an empty
    one (NaN) does not enter them. seg_bce averages the images that have a probability map only."""
    g = box((20, 20), 5, 12, 5, 12)
    z = np.zeros_like(g)
    lesion = [(g, g), (g, np.roll(g, 2, axis=1)), (g, box((20, 20), 6, 10, 6, 14)), (g, z)]
    cases = [M.Case(f"l{i}", "benign", a, b) for i, (a, b) in enumerate(lesion)]
    cases[0].prob_map = np.where(g, 0.9, 0.2)
    cases += [M.Case("n0", "normal", z, box((20, 20), 0, 3, 0, 3)), M.Case("n1", "normal", z, z)]
    res = M.evaluate_cases(cases, n_boot=0)
    per = [M.segmentation_metrics(a, b) for a, b in lesion]
    assert res["nsd"] == pytest.approx(np.mean([s["nsd"] for s in per]))
    assert res["iou"] == pytest.approx(np.mean([s["iou"] for s in per]))
    seg = res["segmentation"]
    for k in ("dice", "iou", "hd95", "nsd"):
        assert seg[f"{k}_median"] == pytest.approx(np.median([s[k] for s in per])), k
        assert seg[f"{k}_std"] == pytest.approx(np.std([s[k] for s in per])), k
    assert seg["n"] == 4 and seg["n_empty_prediction"] == 1
    assert res["normal_images"]["n_empty_prediction"] == 1
    assert res["seg_bce"] == pytest.approx(M.segmentation_bce(g, np.where(g, 0.9, 0.2)))


def test_any_nonzero_pixel_is_lesion_and_spacing_must_be_finite():
    """Masks of any dtype: every non-zero pixel is lesion, negative ones too (255 read as int8 is -1).
    A spacing that is not a finite positive number is refused rather than giving infinite distances."""
    g = box((10, 10), 2, 6, 2, 6)
    signed = np.where(g, -1, 0).astype(np.int8)
    assert M.dice(g, signed) == 1.0 and M.hd95(g, signed) == 0.0
    assert M.segmentation_metrics(signed, g)["gt_area"] == 16.0
    for spacing in ((math.inf, 1.0), (1.0, math.nan), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="spacing"):
            M.hd95(g, g, spacing=spacing)


def test_headline_classification_figures_are_the_functions_own():
    """evaluate_cases' headline classification figures are those of the functions on the same labels
    and probabilities, each under its own name (sensitivity at 90 % specificity is not the specificity
    at 90 % sensitivity)."""
    rng = np.random.default_rng(5)
    cases = make_cases(40, seed=3)
    for i, c in enumerate(cases):
        if i % 3:
            c.probabilities = rng.dirichlet([1, 1, 1])
    res = M.evaluate_cases(cases, n_boot=0, by_source=False)
    y = np.array([M.class_index(c.label) for c in cases])
    P = np.array([c.probabilities for c in cases])
    yp = P.argmax(1)
    sens, spec = M.operating_points(y == 2, P[:, 2])
    assert sens != spec
    assert res["sens_at_90_spec"] == pytest.approx(sens) and res["spec_at_90_sens"] == pytest.approx(spec)
    assert res["auc_malignant"] == pytest.approx(skm.roc_auc_score(y == 2, P[:, 2]))
    assert res["f1_macro"] == pytest.approx(skm.f1_score(y, yp, average="macro"))
    assert res["cross_entropy"] == pytest.approx(skm.log_loss(y, P, labels=[0, 1, 2]))


def test_to_jsonable_gives_strict_json_with_booleans():
    """metrics.json is strict JSON: infinities become null like NaN, and flags stay true/false (not 1/0)."""
    import json

    out = M.to_jsonable({"inf": float("inf"), "ninf": np.float64(-np.inf), "flag": True, "n": np.int64(3)})
    assert json.dumps(out, allow_nan=False) == '{"inf": null, "ninf": null, "flag": true, "n": 3}'
    assert out["flag"] is True


def test_a_missing_mask_on_a_normal_image_with_spacing_is_the_whole_image_in_mm2():
    """With a spacing, the false-positive area of a normal image whose mask is missing is the whole
    image in mm^2, like every other area; a label given as -1 or "" is missing like None."""
    z = np.zeros((20, 40), bool)
    res = M.score_case(M.Case("n", "normal", z, None, None, pred_label=-1, spacing=(0.5, 0.25)))
    assert res["fp_area"] == res["pred_area"] == pytest.approx(20 * 40 * 0.125)
    assert res["missing_mask"] and res["missing_label"] and res["pred_label"] is None
    assert M.score_case(M.Case("n", "normal", z, z, None, pred_label=""))["missing_label"]


def test_the_default_nsd_tolerance_is_2():
    """NSD's documented default tolerance, 2 (px, or mm with a spacing), in every public entry point."""
    g, p = box((20, 20), 5, 15, 5, 15), box((20, 20), 7, 13, 7, 13)  # GT contour 2 to sqrt(8) from P's
    at_2 = M.nsd(g, p, 2.0)
    assert at_2 != M.nsd(g, p, 1.0) and at_2 != M.nsd(g, p, 3.0)
    assert M.nsd(g, p) == at_2 == M.segmentation_metrics(g, p)["nsd"]
    assert M.score_case(M.Case("a", "benign", g, p))["nsd"] == at_2
    assert M.evaluate_cases([M.Case("a", "benign", g, p)], n_boot=0)["nsd"] == at_2
