"""The one threshold resolver: given, MCut (the character floor), the model's per head and per tag; and Selection's
own checks."""

import numpy as np
import pytest

from illust2vec.errors import UserError
from illust2vec.formats.bundle import Thresholds
from illust2vec.infer.thresholds import MIN_CHARACTER_MCUT, Selection, mcut_threshold, resolve

NAMES = ["r_general", "r_explicit", "g1", "g2", "g3", "c1", "c2", "c3"]
HEADS = {"rating": [0, 1], "general": [2, 3, 4], "character": [5, 6, 7]}
PROBS = np.array([0.7, 0.3, 0.9, 0.8, 0.1, 0.12, 0.1, 0.02], np.float32)
MODEL = Thresholds(heads={"general": 0.4, "character": 0.8}, tags={"g2": 0.85})


def test_model_thresholds_per_head_and_per_tag():
    got = resolve(HEADS, NAMES, PROBS, MODEL, Selection())
    assert set(got) == {"general", "character"}  # rating has none
    assert got["general"].source == "model" and got["general"].value == pytest.approx(0.4)
    assert got["general"].tags.tolist() == pytest.approx([0.4, 0.85, 0.4])
    assert got["character"].tags.tolist() == pytest.approx([0.8] * 3)


def test_a_given_threshold_replaces_the_per_tag_ones():
    got = resolve(HEADS, NAMES, PROBS, MODEL, Selection(general=0.5))
    assert got["general"].source == "given" and got["general"].tags.tolist() == [0.5] * 3
    assert got["character"].source == "model"


def test_mcut_and_the_character_floor():
    got = resolve(HEADS, NAMES, PROBS, MODEL, Selection(general=0.1, mcut_general=True, mcut_character=True))
    assert got["general"].source == "mcut"  # MCut wins over a given threshold
    assert got["general"].value == pytest.approx((0.8 + 0.1) / 2)
    raw = mcut_threshold(PROBS[5:])
    assert raw < MIN_CHARACTER_MCUT and got["character"].value == MIN_CHARACTER_MCUT


def test_selection_checks_itself():
    with pytest.raises(UserError, match="general"):
        Selection(general=1.5)
    assert Selection(exclude={"a"}).exclude == frozenset({"a"})
