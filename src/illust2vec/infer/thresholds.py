"""How scores become tags: the one place where a head's thresholds are decided (given, MCut, or the model's).

`Tagger.select` (`i2v tag`, `i2v embed`, the Python API), `i2v show`'s bars and `i2v serve`'s answers all call
`resolve`; the page of `i2v serve` reads MCut's thresholds from the API's answer instead of computing its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..formats.bundle import DEFAULT_THRESHOLDS, Thresholds

MIN_CHARACTER_MCUT = 0.15  # the WD Space's floor under MCut's character threshold
MCUT_HEADS = ("general", "character")


def mcut_threshold(probs: np.ndarray) -> float:
    """Maximum Cut thresholding (Largeron et al., 2012), as the WD Space does it: the midpoint of the largest gap
    between consecutive sorted scores."""
    p = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    if p.size < 2:
        return 0.5
    gaps = p[:-1] - p[1:]
    t = int(gaps.argmax())
    return float((p[t] + p[t + 1]) / 2)


@dataclass(frozen=True)
class Selection:
    """How scores become tags: thresholds per head (None: the model's calibrated or default ones), MCut, exclusions."""

    general: float | None = None
    character: float | None = None
    copyright: float | None = None
    artist: float | None = None
    mcut_general: bool = False
    mcut_character: bool = False
    exclude: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for head in ("general", "character", "copyright", "artist"):
            t = getattr(self, head)
            if t is not None and not 0.0 <= t <= 1.0:
                raise UserError(f"the {head} threshold must be between 0 and 1, not {t}")
        object.__setattr__(self, "exclude", frozenset(self.exclude))

    def override(self, head: str) -> float | None:
        return getattr(self, head, None)

    def mcut(self, head: str) -> bool:
        return (head == "general" and self.mcut_general) or (head == "character" and self.mcut_character)


@dataclass(frozen=True)
class HeadThreshold:
    """One head's thresholds for one image.

    Attributes:
        value: the head's threshold: the one given, MCut's (floored at MIN_CHARACTER_MCUT for characters), or the
            model's for the head.
        tags: per tag of the head, in the head's order: `value`, or the model's per-tag threshold where it has one
            (only when neither a threshold nor MCut was asked for).
        source: "given", "mcut" or "model".
    """

    value: float
    tags: np.ndarray
    source: str


def head_threshold(
    head: str, names: Sequence[str], probs: np.ndarray, model: Thresholds, sel: Selection
) -> HeadThreshold:
    """The thresholds of one head (not rating) for one image's probabilities `probs` of that head's tags `names`.

    MCut replaces both a given threshold and the model's; a given threshold replaces the model's, per-tag ones
    included."""
    n = len(names)
    if sel.mcut(head):
        t = mcut_threshold(probs)
        if head == "character":
            t = max(MIN_CHARACTER_MCUT, t)
        return HeadThreshold(t, np.full(n, t), "mcut")
    given = sel.override(head)
    if given is not None:
        return HeadThreshold(float(given), np.full(n, float(given)), "given")
    base = float(model.heads.get(head, DEFAULT_THRESHOLDS.get(head, 0.5)))
    return HeadThreshold(base, np.array([float(model.tags.get(t, base)) for t in names]), "model")


def resolve(
    heads: Mapping[str, Sequence[int]], names: Sequence[str], probs: np.ndarray, model: Thresholds, sel: Selection
) -> dict[str, HeadThreshold]:
    """Every head's thresholds (rating has none: its classes sum to one) for one image's probabilities.

    Args:
        heads: head -> the indices of its tags in `names` and `probs` (a model's `Labels.heads`).
        names: every tag's name.
        probs: one image's probabilities [tags].
        model: the model's thresholds (calibrated per head, optionally per tag).
        sel: what was asked for.
    """
    out = {}
    for head, ix in heads.items():
        if head != "rating":
            out[head] = head_threshold(head, [names[i] for i in ix], probs[list(ix)], model, sel)
    return out
