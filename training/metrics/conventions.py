"""What every metric in ``training.metrics`` means: the conventions, and the constants they name.

Conventions
-----------
Masks
    Any non-zero pixel is lesion. A *lesion image* is one whose ground-truth mask has at least
    one lesion pixel; a *normal image* is one whose ground-truth mask is empty (the data contract
    gives normal images all-zero masks). Segmentation metrics (Dice, IoU, HD95, NSD) are averaged
    over lesion images only; normal images are reported separately.

Units and spacing
    ``spacing`` is (row, col) = (y, x) pixel size, the order of the numpy axes (note that
    ``model.image.LoadedImage.spacing`` is (x, y): swap it). ``spacing=None`` means (1, 1) and
    distances in pixels, areas in pixels; with a spacing (mha files) distances are in mm and
    areas in mm^2. The NSD tolerance ``tau`` is in the same unit as the distances (default 2,
    i.e. 2 px without spacing, 2 mm with one).

Dice and IoU
    2|G&P| / (|G|+|P|) and |G&P| / |G|P|. Empty prediction on a lesion image: 0. Both masks
    empty: NaN (undefined; never part of the segmentation mean, which covers lesion images only).

Surface distances (HD95, NSD)
    Same definition as DeepMind's ``surface_distance`` package (``compute_surface_distances``
    followed by ``compute_robust_hausdorff(.., 95)`` / ``compute_surface_dice_at_tolerance``):
    the surface points are the pixel *corners* whose 2 x 2 neighbourhood of pixels is neither all
    lesion nor all background; each point carries the length of the marching-squares contour
    piece through it (half a pixel diagonal, a pixel side, or a full diagonal for a saddle,
    scaled by the spacing); distances are exact Euclidean distances between corner points
    (``scipy.ndimage.distance_transform_edt`` on the border points with ``sampling=spacing``).
    HD95 = max of the two directed 95th percentiles, each the contour-length-weighted percentile
    (the first sorted distance whose cumulative length share reaches 0.95, no interpolation).
    NSD at tau = (length of G's contour within tau of P's + length of P's contour within tau of
    G's) / (total length of both contours); "within" is ``<= tau``.
    Empty prediction on a lesion image (or a prediction on an empty ground truth): NSD 0 (as in
    surface_distance) and HD95 = the image diagonal sqrt((H*sy)^2 + (W*sx)^2), finite, in the
    same unit (surface_distance returns inf). Both empty: HD95 and NSD NaN.

Normal images
    ``normal_empty_share``: share of normal images whose prediction is empty.
    ``normal_fp_area``: mean predicted lesion area on normal images (pixels, or mm^2 with
    spacing) -- every predicted pixel there is a false positive. ``fp_area`` per case is the
    area of prediction outside the ground truth, for every image.

Classification (class order ``model.CLASS_NAMES`` = normal, benign, malignant)
    Labels are class indices 0..2 (or the names); ``-1`` (or None) as a predicted label means
    "no prediction" and is always wrong: it is a false negative of the true class and a false
    positive of no class, and is counted in ``confusion_missing`` instead of the 3 x 3
    ``confusion_matrix`` (rows = true class, columns = predicted class).
    ``accuracy``: share of images whose predicted label equals the true one.
    ``f1_macro``: unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes that
    occur in the true or the predicted labels (scikit-learn's ``f1_score(average="macro")``).
    ``recall`` per class: TP / (images of that class); NaN when the class does not occur.
    ``auc_malignant``: ROC AUC of P(malignant) for malignant vs rest (Mann-Whitney statistic,
    ties count one half = scikit-learn's ``roc_auc_score``). ``auc_macro``: unweighted mean of
    the one-vs-rest AUCs of the classes that occur and do not cover every image (with all three
    classes present this equals ``roc_auc_score(y, P, multi_class="ovr", average="macro")``;
    scikit-learn raises instead when a class is absent). AUC is NaN when undefined.
    ``sens_at_90_spec``: the best sensitivity among the ROC points (thresholds at every distinct
    P(malignant), predicting malignant when P >= threshold, plus the all-negative point) whose
    specificity is >= 0.9; ``spec_at_90_sens``: the best specificity among points with
    sensitivity >= 0.9. No interpolation between points. Both NaN without positives or negatives.
    ``cross_entropy``: mean of -ln(clip(P[true class], 1e-7, 1)); probabilities are used as given
    (not renormalised).
    ``seg_bce``: per-image mean pixel binary cross-entropy of a lesion-probability map against
    the ground truth (probabilities clipped to [1e-7, 1 - 1e-7]), averaged over the images that
    have a map (all images, normal ones included); NaN when no map is given.

Missing predictions (set by the caller, see ``training.evaluate``)
    A case without a predicted mask (missing, unreadable or of the wrong size) is a failure: on a
    lesion image it is scored as an empty mask (Dice 0, HD95 = diagonal); on a normal image it is
    not an empty prediction (``pred_empty`` False: it lowers ``normal_empty_share``) and its
    predicted and false-positive area is the whole image. A case without probabilities gets
    the uniform (1/3, 1/3, 1/3), and without a label the label -1 (always wrong) unless
    probabilities are given, in which case the label is their argmax (first class on ties).

Aggregation and confidence intervals
    Headline segmentation figures are means over lesion images (medians are given too).
    Bootstrap: ``n_boot`` resamples (default 1000) with replacement of the resampling units (each
    image, or with ``Case.group`` a patient's images together: ``training.evaluate`` groups them), all
    metrics of one resample computed on the same drawn images, ``numpy.random.default_rng(seed)``; the
    interval is the percentile interval (2.5th and 97.5th percentiles with numpy's linear
    interpolation for 95%) of the resampled values, ignoring resamples where the metric is
    undefined (e.g. no lesion image or no malignant case drawn). Same seed, same intervals.
    ``by_source`` repeats everything (with its own bootstrap, same seed) per ``source`` value.
    ``paired_difference``: two models on the same images; the interval of each difference B - A
    comes from resampling the images once for both, so it is narrower than the two intervals
    side by side suggest (``python -m training.compare A B --paired``).
"""
from __future__ import annotations

from model import CLASS_NAMES

N_CLASSES = len(CLASS_NAMES)
MALIGNANT = CLASS_NAMES.index("malignant")
PROB_EPS = 1e-7
SPEC_TARGET = 0.9
SENS_TARGET = 0.9
ROC_TOL = 1e-12  # float slack for ">= 0.9" comparisons of ratios such as 9/10

# Headline figures, in report order; every one gets a bootstrap interval.
SEG_KEYS = ("dsc", "iou", "hd95", "nsd")
CLS_KEYS = ("accuracy", "f1_macro", "auc_macro", "auc_malignant", "sens_at_90_spec", "spec_at_90_sens",
            "cross_entropy")
HEADLINE = SEG_KEYS + CLS_KEYS + ("normal_empty_share", "normal_fp_area", "seg_bce")
