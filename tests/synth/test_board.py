"""The synthetic board's generator: tags follow from what is drawn, deterministically, with a real board's quirks."""

import hashlib
import io
import time
import zipfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from illust2vec.errors import UserError
from illust2vec.synth import cast, draw
from illust2vec.synth.board import Board, draw_post, scene_tags
from illust2vec.synth.cast import SynthConfig

COUNT_TAGS = {"1girl", "2girls", "3girls", "1boy", "2boys", "3boys", "solo", "multiple_girls", "multiple_boys"}


@pytest.fixture(scope="module")
def board() -> Board:
    return Board(SynthConfig(posts=400, seed=3, label_noise=0.0, non_image_fraction=0.03))


def _colours(image: Image.Image) -> set[int]:
    arr = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.int32)
    return set(np.unique(arr[:, 0] << 16 | arr[:, 1] << 8 | arr[:, 2]).tolist())


def _packed(rgb: tuple[int, int, int]) -> int:
    return rgb[0] << 16 | rgb[1] << 8 | rgb[2]


def test_trait_colours_are_distinct_and_unlike_anything_else():
    hair, eyes = set(cast.HAIR_COLOURS.values()), set(cast.EYE_COLOURS.values())
    assert len(hair) == len(cast.HAIR_COLOURS) and len(eyes) == len(cast.EYE_COLOURS)
    assert not hair & eyes
    for c in hair | eyes:
        assert all(v % 2 == 0 for v in c), c
    others = [cast.SKIN, cast.SKIN_SHADE, draw.WHITE, draw.EYE_WHITE, draw.PUPIL, draw.MOUTH, draw.BLUSH, draw.HAT]
    others += [c for _, main, trim in cast.OUTFITS.values() for c in (main, trim)]
    for c in others:
        assert any(v % 2 for v in c), c


def test_hair_and_eye_tags_present_exactly_when_their_colours_are_drawn(board):
    checked = 0
    for post in board.posts[:150]:
        pixels = _colours(draw_post(post))
        for tag, rgb in {**cast.HAIR_COLOURS, **cast.EYE_COLOURS}.items():
            assert (tag in post.true_general) == (_packed(rgb) in pixels), (post.id, tag)
        checked += 1
    assert checked == 150


def test_every_tag_of_a_scene_is_drawn_and_nothing_else(board):
    for post in board.posts[:200]:
        drawn = draw.render(post.scene).drawn
        assert drawn == set(post.true_general) - COUNT_TAGS, post.id
        girls = sum(f.girl for f in post.scene.figures)
        boys = len(post.scene.figures) - girls
        counts = set(post.true_general) & COUNT_TAGS
        assert ("solo" in counts) == (girls + boys == 1)
        assert (f"{girls}girl" in counts or f"{girls}girls" in counts) == (girls > 0)
        assert ("multiple_boys" in counts) == (boys > 1)


def test_characters_carry_their_traits(board):
    by_name = {c.name: c for c in board.world.characters}
    seen = 0
    for post in board.posts:
        for name in post.tags["character"]:
            c = by_name[name]
            assert {c.hair, c.eyes, *cast.HAIRSTYLES[c.hairstyle], *c.accessories} <= set(post.true_general)
            assert c.series in post.tags["copyright"]
            seen += 1
    assert seen > 300


def test_same_seed_same_board_other_seed_other_board():
    a, b = Board(SynthConfig(posts=30, seed=7)), Board(SynthConfig(posts=30, seed=7))
    assert [p.tag_string for p in a.posts] == [p.tag_string for p in b.posts]
    for pa, pb in zip(a.posts[:8], b.posts[:8], strict=True):
        assert a.md5(pa) == b.md5(pb) == hashlib.md5(b.file(pb)).hexdigest()
    c = Board(SynthConfig(posts=30, seed=8))
    assert [p.tag_string for p in a.posts] != [p.tag_string for p in c.posts]


def test_long_tail_mix_of_casts_and_originals(board):
    counts = Counter(name for p in board.posts for name in p.tags["character"])
    ordered = [n for _, n in counts.most_common()]
    assert ordered[0] >= 5 * ordered[len(ordered) // 2]
    n_figures = Counter(len(p.scene.figures) for p in board.posts)
    assert n_figures[1] > n_figures[2] > n_figures[3] > 0
    originals = [p for p in board.posts if p.tags["copyright"] == ["original"]]
    assert originals and all(not p.tags["character"] for p in originals)
    assert Counter(p.rating for p in board.posts).keys() == {"g", "s", "q", "e"}
    assert len({p.tags["artist"][0] for p in board.posts}) > 5


def test_label_noise_only_removes_true_tags():
    noisy = Board(SynthConfig(posts=200, seed=1, label_noise=0.3))
    missing = 0
    for p in noisy.posts:
        assert set(p.tags["general"]) <= set(p.true_general)
        missing += len(p.true_general) - len(p.tags["general"])
    total = sum(len(p.true_general) for p in noisy.posts)
    assert 0.25 < missing / total < 0.35


def test_files_decode_in_every_awkward_variant(board):
    seen: Counter = Counter()
    for post in board.posts:
        data = board.file(post)
        if not post.is_image:
            assert post.file_ext in ("zip", "mp4")
            with pytest.raises(OSError):
                Image.open(io.BytesIO(data)).load()
            seen[post.file_ext] += 1
            continue
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.size == (post.width, post.height)
        seen[(img.format, img.mode)] += 1
        if img.info.get("progressive"):
            seen["progressive"] += 1
        if img.mode == "RGBA":
            assert np.asarray(img)[..., 3].min() == 0  # a transparent background
            assert "transparent_background" in post.true_general
    assert seen[("JPEG", "RGB")] and seen[("JPEG", "CMYK")] and seen["progressive"]
    assert seen[("PNG", "RGB")] and seen[("PNG", "RGBA")] and seen[("PNG", "P")]
    assert seen[("WEBP", "RGB")] and seen[("GIF", "P")]
    assert seen["zip"] + seen["mp4"] > 0


def test_sizes_orientations_and_board_quirks(board):
    sizes = [(p.width, p.height) for p in board.posts]
    assert all(min(s) >= 300 and max(s) <= 2000 for s in sizes)
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert max(max(s) for s in sizes) > 1500
    ids = [p.id for p in board.posts]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[-1] > len(ids)  # gaps, as on a real board
    assert any(p.is_deleted for p in board.posts) and any(p.is_banned for p in board.posts)
    children = [p for p in board.posts if p.parent_id is not None]
    assert children
    for child in children:
        parent = board.get(child.parent_id)
        assert parent.id < child.id and parent.tags["character"] == child.tags["character"]


def test_knobs_shape_the_task():
    small = Board(SynthConfig(posts=120, seed=2, characters=3, series=2, props=0, original_fraction=0.0))
    assert len({n for p in small.posts for n in p.tags["character"]}) <= 3
    assert len({s for p in small.posts for s in p.tags["copyright"]}) <= 2
    assert not any(t in p.true_general for p in small.posts for t in cast.PROP_SHAPES)
    many = Board(SynthConfig(posts=120, seed=2, props=12))
    vocab = cast.all_general_tags(many.world)
    assert len([t for t, _ in many.world.props]) == 12
    assert {t for p in many.posts for t in p.true_general} <= set(vocab)


def test_scene_tags_follow_rating():
    b = Board(SynthConfig(posts=300, seed=4))
    for p in b.posts:
        tags = set(scene_tags(p.scene))
        assert ("nude" in tags) == (p.rating == "e")
        assert ("bare_shoulders" in tags) == (p.rating in ("s", "q"))
        if p.rating == "e":
            assert not tags & {t for group, _, _ in cast.OUTFITS.values() for t in group}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"posts": -1}, "posts"),
        ({"characters": -3}, "characters"),
        ({"artists": 0}, "artists"),
        ({"series": 0}, "series"),  # 40 characters need a series to belong to
        ({"label_noise": 1.2}, "label_noise"),
        ({"child_fraction": -0.1}, "child_fraction"),
        ({"pixel_noise": -1.0}, "pixel_noise"),
        ({"min_size": 0}, "min_size"),
        ({"min_size": 500, "max_size": 400}, "min_size"),
    ],
)
def test_config_checks_itself(kwargs, field):
    with pytest.raises(UserError, match=f"SynthConfig.{field} "):
        SynthConfig(**kwargs)


def test_a_board_without_characters_needs_no_series():
    board = Board(SynthConfig(posts=20, seed=1, characters=0, series=0))
    assert all(p.tags["copyright"] == ["original"] and not p.tags["character"] for p in board.posts)


def test_files_do_not_depend_on_the_clock(monkeypatch):
    # An evicted file is rendered again and must still match the md5 the board already handed out.
    cfg = SynthConfig(posts=80, seed=6, non_image_fraction=0.3, min_size=64, max_size=300)
    digests = set()
    for now in (1.5e9, 1.6e9):
        monkeypatch.setattr(zipfile, "time", SimpleNamespace(time=lambda now=now: now, localtime=time.gmtime))
        board = Board(cfg)
        ugoira = next(p for p in board.posts if p.file_ext == "zip")
        digests.add(hashlib.md5(board.file(ugoira)).hexdigest())
    assert len(digests) == 1
