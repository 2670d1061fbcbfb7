"""Tests for the training losses, on tensors small enough to work out by hand."""

import math

import pytest
import torch

from illust2vec.errors import UserError
from illust2vec.train.losses import (
    LossConfig,
    asl_loss,
    bce_loss,
    cooccurrence,
    exclusive_pairs,
    exclusivity_penalty,
    multitask_loss,
    rating_loss,
    softmax_multihot_loss,
    tag_weights,
)

LOG2 = math.log(2)


def approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-7)


def test_bce_is_torchs_mean():
    torch.manual_seed(0)
    logits = torch.randn(4, 5) * 3
    targets = (torch.rand(4, 5) > 0.5).float()
    assert bce_loss(logits, targets).item() == approx(torch.nn.BCEWithLogitsLoss()(logits, targets).item())
    assert bce_loss(torch.zeros(1, 1), torch.ones(1, 1)).item() == approx(LOG2)


def test_bce_weights_scale_each_tag():
    # Both entries cost log 2; weights 3 and 1 make the mean (3 + 1) log 2 / 2.
    loss = bce_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), weights=torch.tensor([3.0, 1.0]))
    assert loss.item() == approx(2 * LOG2)


def test_asl_without_focusing_or_clip_is_bce():
    torch.manual_seed(1)
    logits = torch.randn(3, 7) * 4
    targets = (torch.rand(3, 7) > 0.6).float()
    weights = torch.rand(7) + 0.5
    for w in (None, weights):
        asl = asl_loss(logits, targets, gamma_neg=0.0, gamma_pos=0.0, clip=0.0, weights=w)
        assert asl.item() == approx(bce_loss(logits, targets, weights=w).item())


def test_asl_down_weights_easy_negatives():
    negative = torch.tensor([[0.0]])
    # p = 0.5 shifts to 0.45: the negative costs 0.45**4 * -log(0.55) instead of BCE's log 2.
    assert asl_loss(torch.zeros(1, 1), negative).item() == approx(0.45**4 * -math.log(0.55))
    # A confident negative (p = sigmoid(-3) < clip) costs nothing; BCE still charges it.
    confident = torch.tensor([[-3.0]])
    assert asl_loss(confident, negative).item() == 0.0
    assert bce_loss(confident, negative).item() == approx(math.log1p(math.exp(-3)))
    # With gamma_pos 0 a positive costs what BCE charges.
    assert asl_loss(torch.zeros(1, 1), torch.ones(1, 1)).item() == approx(LOG2)


def test_softmax_multihot_by_hand():
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # Row 0: -log softmax(1, 0)[0] = log(1 + e^-1). Row 1: target (1/2, 1/2) against (1/2, 1/2): log 2.
    expected = (math.log1p(math.exp(-1)) + LOG2) / 2
    assert softmax_multihot_loss(logits, targets).item() == approx(expected)
    # A row without a positive is left out of the mean.
    with_empty = softmax_multihot_loss(
        torch.cat([logits, torch.tensor([[5.0, -5.0]])]), torch.cat([targets, torch.zeros(1, 2)])
    )
    assert with_empty.item() == approx(expected)


def test_softmax_multihot_without_positives_is_zero():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = softmax_multihot_loss(logits, torch.zeros(3, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))


def test_rating_ignores_unknown():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    target = torch.tensor([0, -1, 1])
    expected = ((math.log(math.exp(2) + 3) - 2) + (math.log(math.e + 3) - 1)) / 2
    assert rating_loss(logits, target).item() == approx(expected)
    assert rating_loss(logits, torch.full((3,), -1)).item() == 0.0


def test_tag_weights_mean_one_rarer_larger():
    # Raw weights (c / 100) ** -0.5 are 1, 2, 10; divided by their mean 13/3.
    w = tag_weights([100, 25, 1], alpha=0.5)
    assert w.tolist() == pytest.approx([3 / 13, 6 / 13, 30 / 13])
    assert w.mean().item() == approx(1.0)
    assert tag_weights([100, 25, 1], alpha=0.0).tolist() == [1.0, 1.0, 1.0]
    # A tag never seen counts as seen once: large but finite.
    assert tag_weights([100, 0], alpha=0.5).tolist() == pytest.approx(tag_weights([100, 1], alpha=0.5).tolist())


LABELS = torch.tensor(
    [
        [1.0, 0.0, 1.0],
        [0.0, 1.0, 0.0],
        [1.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
    ]
)


def test_cooccurrence_counts_pairs_over_batches():
    cooc = cooccurrence([LABELS[:3], LABELS[3:]])
    assert cooc.dtype == torch.int64
    assert cooc.tolist() == [[2, 0, 2], [0, 2, 1], [2, 1, 3]]


def test_cooccurrence_only_masked_rows():
    masks = [torch.tensor([True, True, False]), torch.tensor([False])]
    assert cooccurrence([LABELS[:3], LABELS[3:]], masks).tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def test_exclusive_pairs_never_together():
    cooc = cooccurrence([LABELS])
    pairs = exclusive_pairs(cooc, cooc.diagonal(), min_count=2)
    expected = torch.zeros(3, 3, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = True
    assert torch.equal(pairs, expected)
    # Tag 0 and 1 appear twice each: too rare for min_count 3.
    assert not exclusive_pairs(cooc, cooc.diagonal(), min_count=3).any()
    # Independent tags seen twice in four rows would meet once: not enough evidence for min_expected 5.
    assert not exclusive_pairs(cooc, cooc.diagonal(), min_count=2, rows=4).any()
    assert torch.equal(exclusive_pairs(cooc, cooc.diagonal(), min_count=2, rows=4, min_expected=1.0), expected)


def test_exclusivity_penalty_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3), -math.log(3), 0.0]])  # p = (.5, .5, .5), (.75, .25, .5)
    one = torch.zeros(3, 3, dtype=torch.bool)
    one[0, 1] = one[1, 0] = True
    # p0 p1 per row: 0.25 and 0.1875.
    assert exclusivity_penalty(logits, one).item() == approx((0.25 + 0.1875) / 2)
    two = one.clone()
    two[1, 2] = two[2, 1] = True
    # Adding p1 p2 (0.25 and 0.125), then dividing by the two pairs.
    assert exclusivity_penalty(logits, two).item() == approx((0.5 + 0.3125) / 2 / 2)
    assert exclusivity_penalty(logits, torch.zeros(3, 3, dtype=torch.bool)).item() == 0.0


def _pairs():
    pairs = torch.zeros(4, 4, dtype=torch.bool)
    pairs[0, 1] = pairs[1, 0] = True
    return pairs


@pytest.mark.parametrize(
    "loss",
    [
        lambda x, y: bce_loss(x, y, weights=torch.rand(4)),
        lambda x, y: asl_loss(x, y),
        lambda x, y: asl_loss(x, y, gamma_neg=2.5, gamma_pos=0.5, clip=0.05),
        lambda x, y: asl_loss(x, y, gamma_neg=2.5, gamma_pos=0.5, clip=0.0),
        lambda x, y: softmax_multihot_loss(x, y),
        lambda x, y: rating_loss(x, torch.tensor([0, -1, 3, 2])),
        lambda x, y: exclusivity_penalty(x, _pairs()),
    ],
)
def test_gradients_are_finite_even_for_extreme_logits(loss):
    logits = torch.tensor([[60.0, -60.0, 0.0, 3.0], [-60.0, 60.0, 1.0, -2.0], [0.0] * 4, [30.0, 30.0, -30.0, -30.0]])
    logits.requires_grad_(True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.0] * 4, [0.0, 1.0, 1.0, 0.0]])
    value = loss(logits, targets)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def _batch():
    torch.manual_seed(2)
    logits = {"general": torch.randn(2, 4), "character": torch.randn(2, 3), "rating": torch.randn(2, 4)}
    targets = {
        "general": torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]),
        "character": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]),
        "rating": torch.tensor([2, -1]),
    }
    activations = {"general": "sigmoid", "character": "softmax", "rating": "softmax"}
    return logits, targets, activations


def test_multitask_sums_the_heads():
    logits, targets, activations = _batch()
    total, parts = multitask_loss(logits, targets, activations, LossConfig())
    expected = {
        "general": bce_loss(logits["general"], targets["general"]).item(),
        "character": softmax_multihot_loss(logits["character"], targets["character"]).item(),
        "rating": rating_loss(logits["rating"], targets["rating"]).item(),
    }
    assert parts == pytest.approx(expected)
    assert total.item() == approx(sum(expected.values()))


def test_multitask_weights_exclusivity_and_asl():
    logits, targets, activations = _batch()
    cfg = LossConfig(kind="asl", frequency_weighting=True, exclusivity=0.5, head_weights=(("character", 2.0),))
    weights = {"general": torch.tensor([0.5, 1.5, 1.0, 1.0])}
    total, parts = multitask_loss(logits, targets, activations, cfg, weights=weights, pairs={"general": _pairs()})
    general = asl_loss(logits["general"], targets["general"], weights=weights["general"]).item()
    penalty = exclusivity_penalty(logits["general"], _pairs()).item()
    assert parts["general"] == approx(general)
    assert parts["general/exclusivity"] == approx(penalty)
    assert total.item() == approx(general + 0.5 * penalty + 2 * parts["character"] + parts["rating"])


def test_multitask_gradients_reach_every_head():
    logits, targets, activations = _batch()
    for x in logits.values():
        x.requires_grad_(True)
    total, _ = multitask_loss(logits, targets, activations, LossConfig(exclusivity=1.0), pairs={"general": _pairs()})
    total.backward()
    for x in logits.values():
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_config_and_inputs_are_checked():
    with pytest.raises(UserError, match="loss must be one of bce, asl, not 'focal'"):
        LossConfig(kind="focal")
    with pytest.raises(UserError, match="loss exclusivity must not be negative"):
        LossConfig(exclusivity=-1)
    logits, targets, activations = _batch()
    with pytest.raises(ValueError, match="weights"):
        multitask_loss(logits, targets, activations, LossConfig(frequency_weighting=True))
    with pytest.raises(ValueError, match="pairs"):
        multitask_loss(logits, targets, activations, LossConfig(exclusivity=0.1))
    with pytest.raises(ValueError, match="activation"):
        multitask_loss(logits, targets, activations | {"general": "relu"}, LossConfig())
