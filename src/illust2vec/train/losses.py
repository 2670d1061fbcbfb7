"""Training losses for a multi-head tagger: BCE or ASL, softmax over multi-hot targets, rating, tag exclusivity, and
keeping an original model's outputs (learning without forgetting, for `i2v train --init`).

A NaN target means "no label": that entry is left out of a sigmoid head's loss (an extended model's tag that the new
data set does not label, when no original model stands in for it), and counts as 0 in a softmax head's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError

KINDS = ("bce", "asl")
ACTIVATIONS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class LossConfig:
    """How the heads' losses are computed and combined into one training loss."""

    kind: str = "bce"  # "bce" or "asl", for sigmoid heads
    asl_gamma_neg: float = 4.0  # ASL (Ridnik et al. 2021) defaults
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    frequency_weighting: bool = False  # per-tag weights from tag counts (see tag_weights), for sigmoid heads
    frequency_alpha: float = 0.5
    exclusivity: float = 0.0  # weight of the exclusivity penalty (0 = off)
    head_weights: tuple[tuple[str, float], ...] = ()  # per-head loss weights; a head not named weighs 1

    def __post_init__(self):
        # JSON brings head_weights back as lists; the config keeps tuples, so that it compares equal to the saved one.
        object.__setattr__(self, "head_weights", tuple((str(h), float(w)) for h, w in self.head_weights))
        if self.kind not in KINDS:
            raise UserError(f"loss must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not 0.0 <= self.asl_clip < 1.0:
            raise UserError(f"loss asl_clip must be in [0, 1), not {self.asl_clip}")
        for name in ("asl_gamma_neg", "asl_gamma_pos", "frequency_alpha", "exclusivity"):
            if getattr(self, name) < 0:
                raise UserError(f"loss {name} must not be negative, not {getattr(self, name)}")


def bce_loss(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of a sigmoid head, averaged over batch and tags.

    Args:
        logits: [B, N] raw scores.
        targets: [B, N] multi-hot labels.
        weights: optional [N] per-tag weights (mean 1 keeps the loss's scale, see `tag_weights`).
    """
    targets = targets.float()
    known = ~targets.isnan()
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.nan_to_num(0.0), reduction="none")
    if weights is not None:
        loss = loss * weights.to(loss)
    return _known_mean(loss, known)


def _known_mean(loss: Tensor, known: Tensor) -> Tensor:
    """The mean over the entries whose target is known (all of them: the plain mean); 0 when none is."""
    return torch.where(known, loss, torch.zeros_like(loss)).sum() / known.sum().clamp(min=1)


def _focusing(base: Tensor, gamma: float) -> Tensor:
    # base ** gamma with a finite gradient where base is 0: a fractional gamma's derivative there is infinite,
    # and infinity times the zero from the clamp before it would turn the whole gradient into NaN.
    if gamma == 0:
        return torch.ones_like(base)
    positive = base > 0
    return torch.where(positive, torch.where(positive, base, torch.ones_like(base)) ** gamma, torch.zeros_like(base))


def asl_loss(
    logits: Tensor,
    targets: Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    weights: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Asymmetric loss (Ridnik et al. 2021) of a sigmoid head: easy negatives count less than in BCE.

    Negatives are focused with ``p_m ** gamma_neg`` where ``p_m = max(p - clip, 0)`` (probability shifting:
    a negative predicted below `clip` costs nothing); positives with ``(1 - p) ** gamma_pos``.

    Normalisation: the paper's code sums over batch and tags; this takes the mean over both, like `bce_loss`, so
    with ``gamma_neg = gamma_pos = clip = 0`` the two are equal and a config can switch between them without
    retuning the learning rate by a factor of N. ASL's values are still smaller than BCE's, because the many easy
    negatives that dominate BCE contribute almost nothing.

    Args:
        logits: [B, N] raw scores.
        targets: [B, N] multi-hot labels.
        gamma_neg: focusing exponent for negatives.
        gamma_pos: focusing exponent for positives.
        clip: probability margin below which a negative costs nothing.
        weights: optional [N] per-tag weights.
        eps: floor inside the shifted negative's logarithm.
    """
    logits = logits.float()
    targets = targets.float()
    known = ~targets.isnan()
    targets = targets.nan_to_num(0.0)
    p = torch.sigmoid(logits)
    # log p and log(1 - p) from logsigmoid stay finite for any logit, where log(sigmoid(x)) would give -inf.
    log_pos = F.logsigmoid(logits)
    if clip > 0:
        p_neg = (p - clip).clamp(min=0)
        # 1 - p_m = min(1 - p + clip, 1), and 1 - p = sigmoid(-x) is accurate even where p rounds to 1.
        log_neg = torch.log((torch.sigmoid(-logits) + clip).clamp(min=eps, max=1.0))
    else:
        p_neg = p
        log_neg = F.logsigmoid(-logits)
    loss_pos = targets * _focusing(torch.sigmoid(-logits), gamma_pos) * log_pos
    loss_neg = (1 - targets) * _focusing(p_neg, gamma_neg) * log_neg
    loss = -(loss_pos + loss_neg)
    if weights is not None:
        loss = loss * weights.to(loss)
    return _known_mean(loss, known)


def softmax_multihot_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of a softmax head against its multi-hot labels, each row normalised to sum 1.

    This is the seed's loss for character and copyright. Rows without a positive label carry no target
    distribution and are left out of the mean; with none at all the loss is 0 (and still has a gradient graph).
    """
    targets = targets.float().nan_to_num(0.0)
    totals = targets.sum(dim=1)
    has_positive = totals > 0
    dist = targets / totals.clamp(min=1e-12).unsqueeze(1)
    rows = -(dist * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    # A masked mean rather than indexing: no host sync, and 0 rather than NaN when nothing is labelled.
    return (rows * has_positive).sum() / has_positive.sum().clamp(min=1)


def rating_loss(logits: Tensor, target_index: Tensor) -> Tensor:
    """Cross-entropy of the single-label rating head; rows whose index is -1 (unknown rating) are ignored.

    Returns 0 when every row is unknown, where torch's own ``ignore_index`` mean would give NaN.
    """
    rows = F.cross_entropy(logits.float(), target_index.long(), ignore_index=-1, reduction="none")
    known = target_index >= 0
    return (rows * known).sum() / known.sum().clamp(min=1)


def tag_weights(counts: Sequence[int], alpha: float) -> Tensor:
    """Per-tag loss weights from tag frequencies, so rare tags count more; their mean is 1.

    ``w_i = (max(c_i, 1) / max_j c_j) ** -alpha``, then divided by the mean. `alpha` 0 gives all ones, 0.5 a
    tag 100 times rarer than the most frequent one ten times its weight, 1 inverse frequency. A count is
    floored at 1 so a tag never seen in training gets a large but finite weight. Dividing by the mean keeps
    the loss's scale, so switching weighting on needs no new learning rate.
    """
    c = torch.as_tensor(list(counts), dtype=torch.float64).clamp(min=1)
    if c.numel() == 0:
        return torch.ones(0)
    w = (c / c.max()) ** -alpha
    return (w / w.mean()).float()


def cooccurrence(targets_iter: Iterable[Tensor], single_mask_iter: Iterable[Tensor] | None = None) -> Tensor:
    """How often each pair of tags is labelled on the same post, counted over batches of multi-hot labels.

    Args:
        targets_iter: [B, N] multi-hot batches, e.g. one head's labels from the training loader.
        single_mask_iter: optional [B] boolean batches, in step with `targets_iter`; only rows where it is
            True count (e.g. posts with exactly one character, where two hair colours cannot both be right).

    Returns:
        [N, N] int64 counts on the batches' device; the diagonal holds each tag's count over the rows that
        counted. Dense: 10k tags take 800 MB.
    """
    masks = single_mask_iter if single_mask_iter is not None else _always()
    total = None
    for batch, mask in zip(targets_iter, masks, strict=single_mask_iter is not None):
        rows = (batch > 0.5).float()
        if mask is not None:
            rows = rows[mask.to(device=rows.device, dtype=torch.bool)]
        # float32 counts one batch exactly (up to 2**24 rows); the running sum is int64 so a data set's is too.
        part = (rows.T @ rows).round().long()
        total = part if total is None else total + part
    if total is None:
        raise ValueError("cooccurrence needs at least one batch of labels")
    return total


def _always():
    while True:
        yield None


def exclusive_pairs(
    cooc: Tensor, counts: Tensor, min_count: int = 20, rows: int | None = None, min_expected: float = 5.0
) -> Tensor:
    """Pairs of tags that are each common enough but never labelled together: candidates for the penalty.

    Args:
        cooc: [N, N] co-occurrence counts from `cooccurrence`.
        counts: [N] tag counts over the same rows (``cooc.diagonal()`` is the safe choice: counts over all posts
            would call a pair exclusive merely because one tag is rare on single-character posts).
        min_count: both tags must appear at least this often.
        rows: optional number of rows counted. When given, a pair also needs ``c_i * c_j / rows >= min_expected``:
            if the tags were independent they would have met at least that often, so never meeting is evidence
            rather than chance. Without it, with thousands of tags most pairs of rarer tags count as exclusive.
        min_expected: see `rows`.

    Returns:
        [N, N] bool, symmetric, False on the diagonal.
    """
    counts = counts.to(torch.float64)
    common = counts >= min_count
    pairs = (cooc == 0) & common.unsqueeze(0) & common.unsqueeze(1)
    if rows is not None:
        pairs &= torch.outer(counts, counts) / max(rows, 1) >= min_expected
    pairs &= pairs.T.clone()
    pairs.fill_diagonal_(False)
    return pairs


def exclusivity_penalty(logits: Tensor, pairs: Tensor) -> Tensor:
    """Mean over the batch of the summed joint probability ``p_i * p_j`` of exclusive pairs, per pair.

    Each unordered pair counts once, and the sum is divided by the number of pairs, so the penalty lies in
    [0, 1] whatever the vocabulary; it is 0 when there are no pairs.

    Args:
        logits: [B, N] raw scores of a sigmoid head.
        pairs: [N, N] symmetric bool (or 0/1 float) matrix from `exclusive_pairs`. For thousands of tags pass it
            already as float on the logits' device, so it is not converted on every step.
    """
    p = torch.sigmoid(logits.float())
    matrix = pairs.to(device=p.device, dtype=p.dtype)
    # sum over i<j of P_ij p_i p_j is half the full quadratic form, as P is symmetric with a zero diagonal.
    per_row = 0.5 * ((p @ matrix) * p).sum(dim=1)
    n_pairs = 0.5 * matrix.sum()
    return per_row.mean() / n_pairs.clamp(min=1)


def multitask_loss(
    logits: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    activations: Mapping[str, str],
    cfg: LossConfig,
    weights: Mapping[str, Tensor] | None = None,
    pairs: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The training loss over all heads, and each head's part as a float for logging.

    A head whose targets are class indices ([B] integers, like rating) uses `rating_loss`; a softmax head with
    multi-hot targets `softmax_multihot_loss`; a sigmoid head `bce_loss` or `asl_loss` (per `cfg.kind`), with
    its per-tag `weights` when `cfg.frequency_weighting` is on (a head missing from `weights` is unweighted).
    When `cfg.exclusivity` > 0, each sigmoid head named in `pairs` adds ``cfg.exclusivity * exclusivity_penalty``.
    Head weights multiply a head's whole part. Switching either option on without its mapping is an error.

    Returns:
        The total, and ``{head: loss, f"{head}/exclusivity": penalty}`` (unweighted values).
    """
    if cfg.frequency_weighting and weights is None:
        raise ValueError("frequency_weighting is on but no per-tag weights were given")
    if cfg.exclusivity > 0 and pairs is None:
        raise ValueError("exclusivity is on but no exclusive pairs were given")
    head_weights = dict(cfg.head_weights)
    names: list[str] = []
    parts: list[Tensor] = []
    total = None
    for head, x in logits.items():
        y = targets[head]
        activation = activations[head]
        if activation not in ACTIVATIONS:
            raise ValueError(f"head {head!r}: activation must be one of {ACTIVATIONS}, not {activation!r}")
        if y.dim() == 1:
            if activation != "softmax":
                raise ValueError(f"head {head!r} has class-index targets but a {activation} activation")
            loss = rating_loss(x, y)
        elif activation == "softmax":
            loss = softmax_multihot_loss(x, y)
        else:
            w = weights.get(head) if cfg.frequency_weighting and weights is not None else None
            if cfg.kind == "asl":
                loss = asl_loss(x, y, cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip, weights=w)
            else:
                loss = bce_loss(x, y, weights=w)
        names.append(head)
        parts.append(loss)
        head_loss = loss
        if cfg.exclusivity > 0 and pairs is not None and head in pairs and activation == "sigmoid":
            penalty = exclusivity_penalty(x, pairs[head])
            names.append(f"{head}/exclusivity")
            parts.append(penalty)
            head_loss = head_loss + cfg.exclusivity * penalty
        head_loss = head_weights.get(head, 1.0) * head_loss
        total = head_loss if total is None else total + head_loss
    if total is None:
        raise ValueError("multitask_loss needs at least one head")
    # One host transfer for all the logged values, rather than a device sync per head.
    values = torch.stack([part.detach() for part in parts]).tolist()
    return total, dict(zip(names, values, strict=True))


def prior_bias(counts: Sequence[int], samples: int, activation: str) -> Tensor:
    """Output biases that predict every tag at its frequency: logit(p) for a sigmoid head, log(p) of the smoothed
    class frequencies for a softmax head (the prior initialisation of RetinaNet's focal loss paper).

    Args:
        counts: how many of the `samples` training images carry each tag of the head.
        samples: the training images.
        activation: the head's, "sigmoid" or "softmax".
    """
    n = torch.tensor(list(counts), dtype=torch.float64)
    if activation == "softmax":
        return torch.log((n + 1) / (n.sum() + len(n)))
    p = ((n + 0.5) / (samples + 1)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def keep_old_loss(
    logits: Mapping[str, Tensor],
    original: Mapping[str, Tensor],
    columns: Mapping[str, tuple[Tensor, Tensor]],
    activations: Mapping[str, str],
    masks: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Learning without forgetting (Li and Hoiem 2016): the original model's outputs for its own tags as soft targets.

    A sigmoid head: binary cross-entropy against the original's probabilities, averaged over images and tags. A
    softmax head: cross-entropy between the original's distribution over its classes and the model's over the same
    classes. Summed over the heads.

    Args:
        logits: the model's logits per head.
        original: the original model's logits per head (no gradient).
        columns: head -> (the model's columns, the original's columns) of the tags both have, in step.
        activations: head -> the model's activation ("sigmoid" or "softmax").
        masks: head -> a bool (images, len(columns)) tensor of the entries that count, for a sigmoid head (the rest
            are left out; the mean still divides by every entry, so a mask only takes terms away).
    """
    total = None
    for head, (ours, theirs) in columns.items():
        if head not in logits or head not in original or len(ours) == 0:
            continue
        x = logits[head].float().index_select(1, ours)
        y = original[head].float().index_select(1, theirs)
        if activations[head] == "softmax":
            loss = -(y.softmax(dim=1) * F.log_softmax(x, dim=1)).sum(dim=1).mean()
        elif masks is not None and head in masks:
            each = F.binary_cross_entropy_with_logits(x, torch.sigmoid(y), reduction="none")
            loss = (each * masks[head]).sum() / each.numel()
        else:
            loss = F.binary_cross_entropy_with_logits(x, torch.sigmoid(y))
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError("keep_old_loss: the model and the original share no tags")
    return total
