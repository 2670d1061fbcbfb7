"""Tests for the tagging metrics, on arrays small enough to work out by hand."""

import numpy as np
import pytest

from illust2vec.evaluation.metrics import (
    accuracy,
    average_precision,
    calibrate_thresholds,
    contradiction_rate,
    has_top_k,
    head_metrics,
    mean_average_precision,
    per_tag_ap,
    precision_recall_f1,
    threshold_at_precision_equals_recall,
    topk_accuracy,
)

SCORES = np.array(
    [
        [0.9, 0.2, 0.6],
        [0.4, 0.7, 0.1],
        [0.8, 0.3, 0.55],
        [0.1, 0.6, 0.3],
    ]
)
TARGETS = np.array(
    [
        [1, 0, 1],
        [1, 1, 0],
        [0, 0, 0],
        [0, 1, 0],
    ]
)


def test_precision_recall_f1_by_hand():
    # At 0.5 the predictions are rows {0, 2}, {1, 3}, {0, 2} per tag; the positives {0, 1}, {1, 3}, {0}.
    # Per tag: TP 1, 2, 1; predicted 2, 2, 2; positives 2, 2, 1.
    # P = .5, 1, .5; R = .5, 1, 1; F1 = .5, 1, 2/3.
    got = precision_recall_f1(SCORES, TARGETS, 0.5)
    assert got == pytest.approx(
        {
            "micro_precision": 4 / 6,
            "micro_recall": 4 / 5,
            "micro_f1": 8 / 11,
            "macro_precision": 2 / 3,
            "macro_recall": 5 / 6,
            "macro_f1": 13 / 18,
        }
    )


def test_macro_leaves_out_unlabelled_tags_and_zero_division_is_zero():
    # A fourth tag without positives, predicted on one row: micro counts its false positive, macro skips it.
    scores = np.column_stack([SCORES, [0.9, 0, 0, 0]])
    targets = np.column_stack([TARGETS, [0, 0, 0, 0]])
    got = precision_recall_f1(scores, targets, 0.5)
    assert got["micro_precision"] == pytest.approx(4 / 7)
    assert got["macro_f1"] == pytest.approx(13 / 18)
    # Nothing predicted: precision 0, not NaN.
    nothing = precision_recall_f1(SCORES, TARGETS, 0.95)
    assert nothing["micro_precision"] == 0 and nothing["micro_f1"] == 0 and nothing["macro_precision"] == 0
    assert np.isnan(precision_recall_f1(SCORES, np.zeros_like(TARGETS), 0.5)["macro_f1"])


def test_accuracy_is_elementwise():
    # Right per tag: 2, 4, 3 of 4 rows.
    assert accuracy(SCORES, TARGETS, 0.5) == pytest.approx(9 / 12)


def test_average_precision_by_hand():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.1, 0.2], [0, 1]) == pytest.approx(1.0)
    assert np.isnan(average_precision([0.3, 0.2], [0, 0]))


def test_average_precision_ties_are_one_threshold():
    # The tied pair is taken together: precision 1/3 at recall 1, whichever of them the sort puts first.
    assert average_precision([0.9, 0.5, 0.5], [0, 1, 0]) == pytest.approx(1 / 3)
    assert average_precision([0.9, 0.5, 0.5], [0, 0, 1]) == pytest.approx(1 / 3)


def test_mean_average_precision_skips_unlabelled_tags():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.2, 0.9], [0.7, 0.3, 0.1], [0.6, 0.4, 0.2]])
    targets = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    ap = per_tag_ap(scores, targets)
    assert ap[0] == pytest.approx(5 / 6) and np.isnan(ap[1]) and ap[2] == pytest.approx(1.0)
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1) / 2)
    assert np.isnan(mean_average_precision(scores, np.zeros_like(targets)))


SOFT = np.array(
    [
        [0.5, 0.2, 0.1, 0.1, 0.05, 0.05],  # class 0: top-1
        [0.6, 0.3, 0.05, 0.02, 0.02, 0.01],  # class 1: second
        [0.01, 0.02, 0.03, 0.04, 0.1, 0.8],  # class 0: last, outside the top 5
        [0.9, 0.02, 0.02, 0.02, 0.02, 0.02],  # no label: left out
    ]
)
SOFT_TARGETS = np.zeros((4, 6), dtype=int)
SOFT_TARGETS[0, 0] = SOFT_TARGETS[1, 1] = SOFT_TARGETS[2, 0] = 1


def test_topk_accuracy():
    assert topk_accuracy(SOFT, SOFT_TARGETS, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(SOFT, SOFT_TARGETS, 5) == pytest.approx(2 / 3)
    assert topk_accuracy(SOFT, SOFT_TARGETS, 6) == pytest.approx(1.0)
    assert np.isnan(topk_accuracy(SOFT, np.zeros_like(SOFT_TARGETS), 1))


# One tag, ten rows, four positives. The top four scores hold three positives, so P = R = 3/4 for any threshold
# in (0.6, 0.7]. F1 = 2 TP / (predicted + 4) peaks at the top six: 8/10, for thresholds in (0.3, 0.4].
COLUMN = np.array([0.95, 0.9, 0.85, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05])
COLUMN_TARGETS = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0])


def test_threshold_at_precision_equals_recall():
    threshold = threshold_at_precision_equals_recall(COLUMN[:, None], COLUMN_TARGETS[:, None])
    assert 0.6 < threshold <= 0.7
    assert threshold == pytest.approx(0.65, abs=1e-4)  # the middle of the tied grid points
    got = precision_recall_f1(COLUMN[:, None], COLUMN_TARGETS[:, None], threshold)
    assert got["micro_precision"] == pytest.approx(got["micro_recall"]) == pytest.approx(0.75)
    assert np.isnan(threshold_at_precision_equals_recall(COLUMN[:, None], np.zeros((10, 1))))


def test_calibrate_f1():
    threshold = calibrate_thresholds(COLUMN[:, None], COLUMN_TARGETS[:, None], mode="f1")
    assert 0.3 < threshold <= 0.4
    assert precision_recall_f1(COLUMN[:, None], COLUMN_TARGETS[:, None], threshold)["micro_f1"] == pytest.approx(0.8)


def test_calibrate_per_tag():
    # Tag 0 is COLUMN, tag 1 the same scores with the labels of the top two only, tag 2 unlabelled.
    scores = np.column_stack([COLUMN, COLUMN, COLUMN])
    targets = np.column_stack([COLUMN_TARGETS, [1, 1] + [0] * 8, [0] * 10])
    head = calibrate_thresholds(scores, targets, mode="pr_equal")
    per_tag = calibrate_thresholds(scores, targets, mode="pr_equal", per_tag=True)
    assert per_tag.shape == (3,)
    assert 0.6 < per_tag[0] <= 0.7
    assert 0.85 < per_tag[1] <= 0.9
    assert per_tag[2] == head
    with pytest.raises(ValueError, match="mode"):
        calibrate_thresholds(scores, targets, mode="best")


@pytest.mark.parametrize("k", [1, 2900, 5701, 9999, 10_000])
def test_grid_thresholds_are_exact_at_grid_scores(k):
    # The positive scores exactly a grid point, the negative the point below: only that grid point separates
    # them, so it is found only if "score >= threshold" holds at equality despite floating-point rounding.
    grid = np.arange(10_001) / 10_000
    scores = np.array([[grid[k]], [grid[k - 1]]])
    targets = np.array([[1], [0]])
    assert threshold_at_precision_equals_recall(scores, targets) == grid[k]
    assert calibrate_thresholds(scores, targets, mode="f1") == grid[k]


def test_head_metrics_names():
    sigmoid = dict(head_metrics("general", SCORES, TARGETS, "sigmoid"))
    names = ["loss", "accuracy", "precision", "recall", "f1", "macro_precision", "macro_recall", "macro_f1", "mAP"]
    names += ["threshold", "threshold_p_eq_r", "precision_at_p_eq_r", "recall_at_p_eq_r", "images", "positives"]
    assert list(sigmoid) == [f"general/{k}" for k in names]  # no top-k: a sigmoid head of many tags per image
    assert sigmoid["general/precision"] == pytest.approx(4 / 6) and sigmoid["general/recall"] == pytest.approx(4 / 5)
    assert sigmoid["general/f1"] == pytest.approx(8 / 11) and sigmoid["general/macro_f1"] == pytest.approx(13 / 18)
    assert sigmoid["general/accuracy"] == pytest.approx(9 / 12) and sigmoid["general/threshold"] == 0.5
    assert sigmoid["general/images"] == 4 and sigmoid["general/positives"] == 5
    # BCE over the 12 entries, by hand.
    p = np.clip(SCORES, 1e-7, 1 - 1e-7)
    bce = -(TARGETS * np.log(p) + (1 - TARGETS) * np.log(1 - p)).mean()
    assert sigmoid["general/loss"] == pytest.approx(bce)
    softmax = dict(head_metrics("character", SOFT, SOFT_TARGETS, "softmax"))
    assert softmax["character/top1"] == pytest.approx(1 / 3) and softmax["character/top5"] == pytest.approx(2 / 3)
    assert "character/mAP" in softmax


def test_top_k_is_decided_once_by_activation_or_head():
    assert has_top_k("general", "softmax") and has_top_k("character", "sigmoid") and has_top_k("artist", "sigmoid")
    assert not has_top_k("general", "sigmoid")
    # A sigmoid character head quotes top-1 too; at 0.5 the same scores give the thresholded figures as well.
    named = dict(head_metrics("character", SOFT, SOFT_TARGETS, "sigmoid"))
    assert named["character/top1"] == pytest.approx(1 / 3) and named["character/top5"] == pytest.approx(2 / 3)


def test_precision_equals_recall_figures():
    named = dict(head_metrics("general", COLUMN[:, None], COLUMN_TARGETS[:, None], "sigmoid", threshold=0.35))
    assert named["general/threshold_p_eq_r"] == pytest.approx(0.65, abs=1e-4)
    assert named["general/precision_at_p_eq_r"] == pytest.approx(0.75) == named["general/recall_at_p_eq_r"]
    assert named["general/f1"] == pytest.approx(0.8) and named["general/threshold"] == 0.35
    empty = dict(head_metrics("general", COLUMN[:, None], np.zeros((10, 1)), "sigmoid"))
    assert np.isnan(empty["general/threshold_p_eq_r"]) and np.isnan(empty["general/precision_at_p_eq_r"])


def test_head_metrics_rating_from_indices():
    scores = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.6, 0.1], [0.9, 0.05, 0.03, 0.02], [0.4, 0.5, 0.05, 0.05]])
    # Right, right, unknown, wrong.
    named = dict(head_metrics("rating", scores, np.array([0, 2, -1, 0]), "softmax"))
    assert list(named) == ["rating/loss", "rating/accuracy", "rating/images"]
    assert named["rating/accuracy"] == pytest.approx(2 / 3) and named["rating/images"] == 3
    assert named["rating/loss"] == pytest.approx(-(np.log(0.7) + np.log(0.6) + np.log(0.4)) / 3)


def test_contradiction_rate_counts_single_character_images_with_an_exclusive_pair_predicted():
    # Tags 0 and 1 exclude each other (two hair colours); tag 2 goes with anything.
    pairs = np.zeros((3, 3), bool)
    pairs[0, 1] = pairs[1, 0] = True
    probs = np.array(
        [
            [0.9, 0.8, 0.1],  # both hair colours: a contradiction
            [0.9, 0.2, 0.9],  # one hair colour and an unrelated tag: fine
            [0.9, 0.6, 0.0],  # both, on a two-character image: not counted
            [0.4, 0.6, 0.9],  # one (the other under the threshold): fine
        ]
    )
    single = np.array([True, True, False, True])
    assert contradiction_rate(probs, single, pairs, 0.5) == pytest.approx(1 / 3)
    assert contradiction_rate(probs, single, pairs, 0.85) == 0.0
    assert np.isnan(contradiction_rate(probs, np.zeros(4, bool), pairs, 0.5))
