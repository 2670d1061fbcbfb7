"""Calibration on top of the evaluator: thresholds per head (and per tag) from a split's predictions, and the
per-tag figures at those thresholds (per_tag.csv)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from ..errors import UserError
from ..formats.bundle import DEFAULT_THRESHOLDS, Thresholds
from .evaluator import Predictions
from .metrics import MODES, calibrate_thresholds, per_tag_ap


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")


def calibrate(preds: Predictions, names: Mapping[str, Sequence[str]], mode: str, per_tag: bool) -> Thresholds:
    """Thresholds per head (and per tag) from one split's scores: those that maximise micro F1 ("f1") or where micro
    precision equals recall ("pr_equal"). A head or tag without positives keeps the default; rating is read as its
    arg-max and keeps its default too.

    Args:
        preds: the split's predictions.
        names: head -> its tag names, in column order (for per-tag thresholds).
        mode: "f1" or "pr_equal".
        per_tag: also one threshold per tag with a positive.
    """
    check_mode(mode)
    heads, tags = {}, {}
    for head, p in preds.probs.items():
        t = preds.targets[head]
        if t.ndim == 1:
            continue
        head_thr = calibrate_thresholds(p, t, mode=mode)
        heads[head] = float(head_thr) if math.isfinite(head_thr) else DEFAULT_THRESHOLDS.get(head, 0.5)
        if per_tag:
            got = calibrate_thresholds(p, t, mode=mode, per_tag=True)
            labelled = t.sum(axis=0) > 0
            for name, thr, has in zip(names[head], np.asarray(got), labelled, strict=True):
                if has and math.isfinite(thr):
                    tags[name] = float(thr)
    return Thresholds(heads={**DEFAULT_THRESHOLDS, **heads}, tags=tags, method=mode)


def per_tag_rows(
    preds: Predictions, names: Mapping[str, Sequence[str]], thresholds: Thresholds
) -> Iterator[tuple[str, str, int, float, float | None, float, float, float]]:
    """(head, tag, support, AP, threshold, precision, recall, F1) per tag at its threshold; rating's classes one
    against the rest at the arg-max, without a threshold. Precision is 0 for a tag never predicted; recall and F1
    are NaN for a tag without positives."""
    for head, p in preds.probs.items():
        t = preds.targets[head]
        if t.ndim == 1:  # rating: per-class one-vs-rest figures at the arg-max
            t = np.eye(p.shape[1], dtype=np.float32)[np.where(t >= 0, t, 0)] * (t >= 0)[:, None]
            pred = np.eye(p.shape[1], dtype=bool)[p.argmax(axis=1)]
            thr = [None] * p.shape[1]
        else:
            thr = [thresholds.tags.get(n, thresholds.heads.get(head, 0.5)) for n in names[head]]
            pred = p >= np.asarray(thr)[None]
        pos = t > 0.5
        ap = per_tag_ap(p, t)
        tp, n_pred, n_pos = (pred & pos).sum(0), pred.sum(0), pos.sum(0)
        for j, name in enumerate(names[head]):
            prec = tp[j] / n_pred[j] if n_pred[j] else 0.0
            rec = tp[j] / n_pos[j] if n_pos[j] else float("nan")
            f1 = 2 * tp[j] / (n_pred[j] + n_pos[j]) if n_pred[j] + n_pos[j] else float("nan")
            yield head, name, int(n_pos[j]), float(ap[j]), thr[j], float(prec), float(rec), float(f1)
