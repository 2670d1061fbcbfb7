"""The one evaluator: predictions of a tiny tagger over batches, the named metrics of every head, calibration."""

import numpy as np
import pytest
import torch

from illust2vec.errors import UserError
from illust2vec.evaluation.calibration import calibrate, per_tag_rows
from illust2vec.evaluation.evaluator import Predictions, PredictOptions, by_head, compute_metrics, predict
from illust2vec.formats.bundle import DEFAULT_THRESHOLDS
from illust2vec.models import create_tagger, default_heads

PROBS = {
    "rating": np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.6, 0.1], [0.4, 0.5, 0.05, 0.05]]),
    "general": np.array([[0.9, 0.8, 0.1], [0.9, 0.2, 0.9], [0.1, 0.6, 0.7]]),
    "character": np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]),
}
TARGETS = {
    "rating": np.array([0, 2, 0]),
    "general": np.array([[1, 0, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float32),
    "character": np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32),
}
ACTIVATIONS = {"rating": "softmax", "general": "sigmoid", "character": "softmax"}


def test_compute_metrics_names_every_head_and_sums_the_losses():
    preds = Predictions(PROBS, TARGETS)
    pairs = np.zeros((3, 3), bool)
    pairs[0, 1] = pairs[1, 0] = True  # tags 0 and 1 exclude each other
    got = compute_metrics(preds, ACTIVATIONS, {"general": 0.5, "character": 0.5}, pairs)
    assert got["loss"] == pytest.approx(got["rating/loss"] + got["general/loss"] + got["character/loss"])
    assert got["rating/accuracy"] == pytest.approx(2 / 3)
    assert got["character/top1"] == pytest.approx(2 / 3)  # rows 0 and 1 right, row 2 wrong
    assert "general/top1" not in got and got["general/images"] == 3 and got["general/positives"] == 5
    # At 0.5 row 0 predicts tags 0 and 1 (exclusive): one of three single-character images contradicts itself.
    assert got["general/contradictions"] == pytest.approx(1 / 3)
    assert got["general/threshold"] == 0.5 and got["character/threshold"] == 0.5
    higher = compute_metrics(preds, ACTIVATIONS, {"general": 0.85})
    assert "general/contradictions" not in higher and higher["general/precision"] == 1.0
    assert higher["general/recall"] == pytest.approx(3 / 5)
    heads = by_head(got)
    assert set(heads) == {"rating", "general", "character"} and "loss" not in heads
    assert heads["general"]["mAP"] == got["general/mAP"] and heads["general"]["contradictions"] == pytest.approx(1 / 3)


def test_predict_keeps_order_and_gives_empty_heads_arrays_without_images():
    heads = default_heads({"rating": 4, "general": 3, "character": 2}, softmax=("character",))
    model = create_tagger("test_resnet", heads=heads, image_size=32).eval()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    targets = {
        "rating": torch.tensor([0, 1, 2, 3, -1]),
        "general": torch.rand(5, 3).round(),
        "character": torch.eye(5, 2),
    }
    batches = [
        (images[:2], {k: v[:2] for k, v in targets.items()}),
        (images[2:], {k: v[2:] for k, v in targets.items()}),
    ]
    seen = []
    preds = predict(model, batches, torch.device("cpu"), PredictOptions(features=True), progress=seen.append)
    assert seen == [2, 5] and preds.images == 5
    with torch.no_grad():
        expected = model.activate(model(images))
        features = model.extract_feature(images)
    for head in ("rating", "general", "character"):
        np.testing.assert_allclose(preds.probs[head], expected[head].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(preds.targets[head], targets[head].numpy())
    np.testing.assert_allclose(preds.features, features.numpy(), rtol=1e-5, atol=1e-6)
    # max_samples stops after the batch that reaches it.
    assert predict(model, batches, torch.device("cpu"), PredictOptions(max_samples=1)).images == 2
    empty = predict(model, [], torch.device("cpu"), PredictOptions())
    assert empty.images == 0 and empty.features is None
    assert empty.probs["general"].shape == (0, 3) and empty.targets["rating"].shape == (0,)
    with pytest.raises(UserError, match="autocast must be"):
        PredictOptions(autocast="int8")


def test_calibration_thresholds_and_per_tag_rows():
    preds = Predictions(PROBS, TARGETS)
    names = {"rating": ["general", "sensitive", "questionable", "explicit"], "general": ["a", "b", "c"]}
    names["character"] = ["x", "y"]
    got = calibrate(preds, names, "f1", per_tag=True)
    assert got.heads["rating"] == DEFAULT_THRESHOLDS["rating"]  # read as its arg-max
    # General: every positive scores >= 0.6 and every negative <= 0.2 but one at 0.8; F1 peaks (10/11) with all
    # five positives and that one negative predicted, at thresholds in (0.2, 0.6].
    assert 0.2 < got.heads["general"] <= 0.6
    assert set(got.tags) == {"a", "b", "c", "x", "y"}
    rows = {(r[0], r[1]): r for r in per_tag_rows(preds, names, got)}
    head, tag, support, ap, threshold, precision, recall, f1 = rows[("general", "a")]
    assert support == 2 and ap == pytest.approx(1.0) and threshold == got.tags["a"] and precision == 1.0
    assert rows[("rating", "sensitive")][2:5] == (0, rows[("rating", "sensitive")][3], None)
    assert np.isnan(rows[("rating", "sensitive")][6])  # recall of a class without images
    with pytest.raises(UserError, match="--mode must be one of f1, pr_equal"):
        calibrate(preds, names, "best", per_tag=False)
