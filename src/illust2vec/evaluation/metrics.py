"""Tagging metrics on numpy arrays (precision, recall, F1, AP, top-k, thresholds, loss, contradictions), and the
one naming of them: `head_metrics` yields ("general/mAP", 0.61), ("character/top1", 0.8), ...

Training's validation (metrics.csv, prefixed "val/") and `i2v evaluate` (metrics.json, grouped by head) both name
their figures here.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Thresholds are searched on the grid k / GRID_STEPS over [0, 1] (steps of 1e-4, the precision WD taggers publish
# theirs at); k / GRID_STEPS rather than linspace, so that grid point 2900 is the float 0.29 a person would write.
GRID_STEPS = 10_000
# Elements per block of rows or columns: caps the temporaries at a few hundred MB whatever the data's size.
_BLOCK = 1 << 22
MODES = ("f1", "pr_equal")
ACTIVATIONS = ("sigmoid", "softmax")


def _check(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    t = np.asarray(targets)
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"scores and targets must be 2-D arrays of one shape, not {s.shape} and {t.shape}")
    return s, t


def _row_slices(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _BLOCK // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, start + step)


def _div(a, b) -> np.ndarray:
    # Zero division gives 0 (sklearn's zero_division=0): no prediction is no correct prediction.
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def _confusion(s: np.ndarray, t: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.zeros(s.shape[1], dtype=np.int64)
    n_pred = np.zeros_like(tp)
    n_pos = np.zeros_like(tp)
    for rows in _row_slices(*s.shape):
        pred = s[rows] >= threshold
        pos = t[rows] > 0.5
        tp += (pred & pos).sum(axis=0)
        n_pred += pred.sum(axis=0)
        n_pos += pos.sum(axis=0)
    return tp, n_pred, n_pos


def precision_recall_f1(scores, targets, threshold: float) -> dict[str, float]:
    """Micro and macro precision, recall and F1 of predicting every score at or above `threshold`.

    Micro counts true and false positives over all tags together. Macro averages per-tag values over the tags
    with at least one positive (a tag nobody has says nothing about recall); macro F1 is the mean of per-tag
    F1, not the harmonic mean of macro precision and recall (sklearn's convention). A ratio whose denominator
    is 0 (a tag never predicted) is 0; macro values are NaN when no tag has a positive.

    Args:
        scores: [rows, tags] probabilities.
        targets: [rows, tags] 0/1 labels.
        threshold: a score at or above it is a positive prediction.
    """
    s, t = _check(scores, targets)
    tp, n_pred, n_pos = _confusion(s, t, threshold)
    out = {
        "micro_precision": float(_div(tp.sum(), n_pred.sum())),
        "micro_recall": float(_div(tp.sum(), n_pos.sum())),
        # 2TP / (predicted + actual) is 2PR / (P + R), and 0 rather than 0/0 when nothing is right.
        "micro_f1": float(_div(2 * tp.sum(), n_pred.sum() + n_pos.sum())),
    }
    labelled = n_pos > 0
    if not labelled.any():
        return out | {"macro_precision": np.nan, "macro_recall": np.nan, "macro_f1": np.nan}
    tp, n_pred, n_pos = tp[labelled], n_pred[labelled], n_pos[labelled]
    return out | {
        "macro_precision": float(_div(tp, n_pred).mean()),
        "macro_recall": float(_div(tp, n_pos).mean()),
        "macro_f1": float(_div(2 * tp, n_pred + n_pos).mean()),
    }


def per_tag_ap(scores, targets) -> np.ndarray:
    """Average precision of each tag (see `average_precision`); NaN for tags without a positive.

    Each labelled column is sorted once, in blocks of columns so memory stays bounded.
    """
    s, t = _check(scores, targets)
    n_rows, n_cols = s.shape
    out = np.full(n_cols, np.nan)
    labelled = np.flatnonzero((t > 0.5).any(axis=0))
    step = max(1, _BLOCK // max(n_rows, 1))
    for start in range(0, len(labelled), step):
        cols = labelled[start : start + step]
        # One row per tag, contiguous, so each sort runs over contiguous memory.
        col_scores = np.ascontiguousarray(s[:, cols].T)
        col_pos = t[:, cols].T > 0.5
        ascending = np.sort(col_scores, axis=1)
        for i, j in enumerate(cols):
            # sum_n (R_n - R_{n-1}) P_n over the distinct scores is, summed per positive, the precision at the
            # threshold equal to that positive's score: (positives >= v) / (rows >= v). Ties are thus one
            # threshold (as in sklearn), whatever order a sort leaves them in. The loop is over tags, not rows.
            v = np.sort(col_scores[i][col_pos[i]])
            at_or_above = n_rows - np.searchsorted(ascending[i], v, side="left")
            positives_at_or_above = len(v) - np.searchsorted(v, v, side="left")
            out[j] = np.mean(positives_at_or_above / at_or_above)
    return out


def average_precision(scores_col, targets_col) -> float:
    """Average precision of one tag: ``sum_n (R_n - R_{n-1}) P_n`` over descending score thresholds.

    As sklearn's ``average_precision_score``: tied scores form a single threshold. NaN when no positive.
    """
    s = np.asarray(scores_col).reshape(-1, 1)
    t = np.asarray(targets_col).reshape(-1, 1)
    return float(per_tag_ap(s, t)[0])


def mean_average_precision(scores, targets) -> float:
    """Mean AP over the tags with at least one positive (the WD tagger and DeepDanbooru convention); NaN if none."""
    ap = per_tag_ap(scores, targets)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if ap.size else np.nan


def accuracy(scores, targets, threshold: float) -> float:
    """Fraction of all (row, tag) entries predicted right at `threshold`: the seed's Keras "binary accuracy"."""
    s, t = _check(scores, targets)
    if s.size == 0:
        return np.nan
    right = sum(int(((s[rows] >= threshold) == (t[rows] > 0.5)).sum()) for rows in _row_slices(*s.shape))
    return right / s.size


def topk_accuracy(scores, targets, k: int) -> float:
    """Fraction of rows with a positive whose k highest scores include one; for softmax heads.

    Rows without a positive are left out; NaN when there are none. Ties at the k-th place are broken by
    ``np.argpartition``, deterministically for given arrays.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    s, t = _check(scores, targets)
    hits = counted = 0
    for rows in _row_slices(*s.shape):
        pos = t[rows] > 0.5
        has = pos.any(axis=1)
        counted += int(has.sum())
        if k >= s.shape[1]:
            hits += int(has.sum())
            continue
        top = np.argpartition(-s[rows], k - 1, axis=1)[:, :k]
        hits += int(np.take_along_axis(pos, top, axis=1).any(axis=1).sum())
    return hits / counted if counted else np.nan


def _grid() -> np.ndarray:
    return np.arange(GRID_STEPS + 1) / GRID_STEPS


def _grid_bins(s: np.ndarray) -> np.ndarray:
    # Index of the largest grid threshold <= score, so "score >= grid[k]" is exactly "bin >= k". The floor
    # guesses it; the two corrections fix scores that rounding put one bin off. They compare in the scores' own
    # dtype, as numpy does when a metric later applies the threshold to them (float32 0.29 >= 0.29 is True).
    # Other dtypes go to float64: float16 is too coarse for a one-step correction.
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    grid = _grid().astype(s.dtype)
    s = np.clip(s, 0, 1)
    idx = np.clip(np.floor(s.astype(np.float64) * GRID_STEPS).astype(np.int64), 0, GRID_STEPS)
    idx -= grid[idx] > s
    idx += (idx < GRID_STEPS) & (grid[np.minimum(idx + 1, GRID_STEPS)] <= s)
    return idx


def _grid_counts(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Per column of the block and grid threshold: how many rows score at or above it, and how many positives.
    n_cols = s.shape[1]
    width = GRID_STEPS + 1
    flat = _grid_bins(s) + np.arange(n_cols) * width
    every = np.bincount(flat.ravel(), minlength=n_cols * width).reshape(n_cols, width)
    pos = np.bincount(flat[t > 0.5], minlength=n_cols * width).reshape(n_cols, width)
    # Reverse cumulative sums: counts at threshold k are the counts of bins k and above.
    return every[:, ::-1].cumsum(axis=1)[:, ::-1], pos[:, ::-1].cumsum(axis=1)[:, ::-1]


def _best_thresholds(n_pred: np.ndarray, tp: np.ndarray, mode: str) -> np.ndarray:
    # n_pred, tp: [rows, grid]; each row is a head or a tag. Returns one grid threshold per row (NaN if unlabelled).
    n_pos = tp[:, :1]  # threshold 0 predicts everything, so its true positives are all positives
    if mode == "f1":
        cost = -_div(2 * tp, n_pred + n_pos)
    else:
        # P = R exactly where as many are predicted as are labelled; thresholds without a true positive
        # have P = R = 0 and say nothing, so they are out.
        cost = np.where(tp > 0, np.abs(_div(tp, n_pred) - _div(tp, n_pos)), np.inf)
    best = cost.min(axis=1, keepdims=True)
    is_best = cost == best
    # Several neighbouring grid points often tie (no score between them): take the middle of the first run of
    # them, which sits between the scores that bound it rather than against one of them.
    first = is_best.argmax(axis=1)
    misses = np.cumsum(~is_best, axis=1)
    run = is_best & (misses == np.take_along_axis(misses, first[:, None], axis=1))
    middle = first + (run.sum(axis=1) - 1) // 2
    out = _grid()[middle]
    return np.where(n_pos[:, 0] > 0, out, np.nan)


def calibrate_thresholds(scores, targets, mode: str = "f1", per_tag: bool = False) -> float | np.ndarray:
    """The threshold that maximises micro F1 (``"f1"``) or makes micro precision equal recall (``"pr_equal"``).

    Thresholds are searched on a grid of steps of 1e-4 over [0, 1] (scores are probabilities), from one pass
    of histograms over the data, so the search costs the same whatever the number of distinct scores. Among
    grid points that tie, the middle of the first run of them is taken.

    Args:
        scores: [rows, tags] probabilities.
        targets: [rows, tags] 0/1 labels.
        mode: "f1" or "pr_equal".
        per_tag: one threshold per tag (each tag's own F1 or P = R) instead of one for the head; tags without a
            positive get the head's.

    Returns:
        The head's threshold (NaN when there is no positive at all), or a [tags] array.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    s, t = _check(scores, targets)
    n_rows, n_cols = s.shape
    head_pred = np.zeros(GRID_STEPS + 1, dtype=np.int64)
    head_tp = np.zeros_like(head_pred)
    tags = np.full(n_cols, np.nan)
    step = max(1, min(_BLOCK // max(n_rows, 1), _BLOCK // (GRID_STEPS + 1)))
    for start in range(0, n_cols, step):
        cols = slice(start, start + step)
        n_pred, tp = _grid_counts(s[:, cols], t[:, cols])
        head_pred += n_pred.sum(axis=0)
        head_tp += tp.sum(axis=0)
        if per_tag:
            tags[cols] = _best_thresholds(n_pred, tp, mode)
    head = float(_best_thresholds(head_pred[None], head_tp[None], mode)[0])
    if not per_tag:
        return head
    return np.where(np.isnan(tags), head, tags)


def threshold_at_precision_equals_recall(scores, targets) -> float:
    """The threshold at which micro precision equals micro recall: the figure WD taggers publish.

    P = R exactly when as many entries are predicted as are labelled, so this is close to the score of the
    k-th highest entry for k positives; it is searched on the grid of `calibrate_thresholds` for the smallest
    ``|P - R|`` among thresholds with a true positive. NaN when there is no positive.
    """
    return calibrate_thresholds(scores, targets, mode="pr_equal")


# Heads whose top-1 is quoted even when they are sigmoid: an image has one character, copyright or artist in the
# common case, and "is the best guess right" is the figure people ask for.
TOP_K_HEADS = ("character", "copyright", "artist")


def has_top_k(head: str, activation: str) -> bool:
    """The one top-1 rule: softmax heads and the character, copyright and artist heads get top1 and top5."""
    return activation == "softmax" or head in TOP_K_HEADS


def head_loss(scores, targets, activation: str) -> float:
    """A head's loss from probabilities: cross-entropy for softmax heads and class indices (rating: -1 unknown is
    left out), binary cross-entropy for sigmoid heads; NaN with nothing to count."""
    eps = 1e-7
    p = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if t.ndim == 1:
        keep = t >= 0
        return float(-np.log(np.clip(p[keep, t[keep]], eps, 1)).mean()) if keep.any() else float("nan")
    if activation == "softmax":
        rows = t.sum(1) > 0
        if not rows.any():
            return float("nan")
        q = t[rows] / t[rows].sum(1, keepdims=True)
        return float(-(q * np.log(np.clip(p[rows], eps, 1))).sum(1).mean())
    if not p.size:
        return float("nan")
    p = np.clip(p, eps, 1 - eps)
    return float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean())


def contradiction_rate(probs: np.ndarray, single: np.ndarray, pairs: np.ndarray, threshold: float) -> float:
    """Fraction of single-character images on which two mutually exclusive general tags (two hair colours, two eye
    colours: pairs never seen together in training) are both predicted at `threshold`; NaN without such images."""
    pred = (probs[single] >= threshold).astype(np.float32)
    if not len(pred):
        return float("nan")
    both = (pred @ pairs.astype(np.float32)) * pred  # > 0 where a predicted tag has a predicted exclusive partner
    return float((both.sum(axis=1) > 0).mean())


def head_metrics(head: str, scores, targets, activation: str, threshold: float = 0.5) -> Iterator[tuple[str, float]]:
    """Named metrics of one head, big_vision style: ``("general/mAP", 0.61)``, ``("character/top1", 0.8)``.

    Multi-label targets ([rows, tags] 0/1) yield, in this order: loss; accuracy (of every row-tag entry), precision,
    recall and F1 (micro), macro precision, recall and F1, at `threshold`; mAP; the threshold; the threshold where
    micro precision equals recall and the precision and recall there; top1 and top5 where `has_top_k`; the number
    of images and of positives. Class-index targets ([rows] integers, -1 unknown, like rating) yield loss, accuracy
    (top-1 over the rows with a known class) and images.

    Args:
        head: the head's name, the metrics' prefix.
        scores: [rows, tags] probabilities (after the head's sigmoid or softmax).
        targets: [rows, tags] 0/1 labels, or [rows] class indices.
        activation: "sigmoid" or "softmax".
        threshold: the decision threshold for the thresholded metrics.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    s = np.asarray(scores)
    t = np.asarray(targets)
    yield f"{head}/loss", head_loss(s, t, activation)
    if t.ndim == 1:
        one_hot = np.zeros(s.shape, dtype=bool)
        known = t >= 0
        one_hot[np.flatnonzero(known), t[known].astype(np.int64)] = True
        yield f"{head}/accuracy", topk_accuracy(s, one_hot, 1)
        yield f"{head}/images", int(known.sum())
        return
    prf = precision_recall_f1(s, t, threshold)
    yield f"{head}/accuracy", accuracy(s, t, threshold)
    yield f"{head}/precision", prf["micro_precision"]
    yield f"{head}/recall", prf["micro_recall"]
    yield f"{head}/f1", prf["micro_f1"]
    yield f"{head}/macro_precision", prf["macro_precision"]
    yield f"{head}/macro_recall", prf["macro_recall"]
    yield f"{head}/macro_f1", prf["macro_f1"]
    yield f"{head}/mAP", mean_average_precision(s, t)
    yield f"{head}/threshold", float(threshold)
    pr = threshold_at_precision_equals_recall(s, t)
    at = precision_recall_f1(s, t, pr) if np.isfinite(pr) else {}
    yield f"{head}/threshold_p_eq_r", pr
    yield f"{head}/precision_at_p_eq_r", at.get("micro_precision", np.nan)
    yield f"{head}/recall_at_p_eq_r", at.get("micro_recall", np.nan)
    if has_top_k(head, activation):
        yield f"{head}/top1", topk_accuracy(s, t, 1)
        yield f"{head}/top5", topk_accuracy(s, t, 5)
    yield f"{head}/images", int(len(t))
    yield f"{head}/positives", int((t > 0.5).sum())
