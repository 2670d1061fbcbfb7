"""The fake board's query language on its own: searches, id ranges, ratings, the tag limit, limits and pages."""

from types import SimpleNamespace

import pytest

from illust2vec.synth.board import Board
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.query import (
    DIALECTS,
    MAX_PAGE,
    POST_LIMIT,
    ApiError,
    paginate,
    parse_limit,
    parse_page,
    parse_page_number,
    parse_search,
)

BOARD = Board(SynthConfig(posts=300, seed=12, deleted_fraction=0.1, banned_fraction=0.05))
POSTS = BOARD.posts
TAGS = {p.id: frozenset(t for names in p.tags.values() for t in names) for p in POSTS}


def kept(text: str, dialect: str = "danbooru") -> list[int]:
    search = parse_search(text, DIALECTS[dialect])
    return [p.id for p in POSTS if search.keeps(p, TAGS[p.id])]


def ids(test) -> list[int]:
    return [p.id for p in POSTS if test(p)]


def test_empty_search_keeps_everything_newest_first():
    search = parse_search("")
    assert search.predicates == [] and not search.ascending
    assert kept("") == ids(lambda p: True)


@pytest.mark.parametrize(
    ("text", "test"),
    [
        ("id:40", lambda p: p.id == 40),
        ("id:10..80", lambda p: 10 <= p.id <= 80),
        ("id:..80", lambda p: p.id <= 80),
        ("id:300..", lambda p: p.id >= 300),
        ("id:>300", lambda p: p.id > 300),
        ("id:>=300", lambda p: p.id >= 300),
        ("id:<50", lambda p: p.id < 50),
        ("id:<=50", lambda p: p.id <= 50),
        ("id:3,5,7,50", lambda p: p.id in {3, 5, 7, 50}),
        ("-id:10..400", lambda p: not 10 <= p.id <= 400),
    ],
)
def test_id_ranges(text, test):
    assert kept(text) == ids(test)
    assert kept(text)  # the board has posts on both sides of every bound


def test_a_bad_id_range_is_refused():
    with pytest.raises(ApiError) as e:
        parse_search("id:abc")
    assert e.value.status == 422 and "id:abc" in e.value.message


def test_ratings_by_letter_word_and_list():
    assert kept("rating:g") == kept("rating:general") == ids(lambda p: p.rating == "g")
    assert kept("rating:q,e") == ids(lambda p: p.rating in "qe")
    assert kept("-rating:g") == ids(lambda p: p.rating != "g")
    with pytest.raises(ApiError) as e:
        parse_search("rating:safe")  # Moebooru's and Gelbooru's word, not Danbooru's
    assert e.value.status == 422 and "use g, general, s, sensitive" in e.value.message


def test_each_dialect_has_its_own_rating_words():
    assert kept("rating:safe", "moebooru") == ids(lambda p: p.rating in "gs" and not p.is_hidden)
    assert kept("rating:safe", "gelbooru") == kept("rating:general,sensitive", "gelbooru")
    assert kept("rating:sensitive", "gelbooru") == ids(lambda p: p.rating == "s" and not p.is_hidden)


def test_plain_tags_negation_and_wildcards():
    solo = ids(lambda p: "solo" in TAGS[p.id])
    assert kept("solo") == solo and kept("SOLO") == solo  # searches are case-insensitive
    assert kept("-solo") == ids(lambda p: "solo" not in TAGS[p.id])
    assert kept("*_hair") == ids(lambda p: any(t.endswith("_hair") for t in TAGS[p.id]))
    assert kept("solo smile") == ids(lambda p: {"solo", "smile"} <= TAGS[p.id])
    assert kept("-") == []  # a lone dash is a tag, not a negation, and no post carries it


def test_danbooru_allows_two_plain_tags_and_free_metatags():
    assert kept("solo smile id:>10 rating:g order:id")  # metatags do not count
    with pytest.raises(ApiError) as e:
        parse_search("solo smile blush")
    assert e.value.status == 422 and e.value.error == "PostQuery::TagLimitError"
    assert "more than 2 tags" in e.value.message
    parse_search("a b c d e f", DIALECTS["moebooru"])
    with pytest.raises(ApiError):
        parse_search("a b c d e f g", DIALECTS["moebooru"])
    parse_search(" ".join(f"t{i}" for i in range(30)), DIALECTS["gelbooru"])  # no limit


def test_order_words_per_dialect():
    assert parse_search("order:id").ascending and parse_search("order:id_asc").ascending
    assert not parse_search("order:random").ascending  # unknown orders: newest first
    assert not parse_search("-order:id").ascending  # a negated order is a plain (unknown) tag
    assert parse_search("sort:id:asc", DIALECTS["gelbooru"]).ascending
    assert not parse_search("order:id", DIALECTS["gelbooru"]).ascending


def test_hidden_posts_per_dialect():
    hidden = ids(lambda p: p.is_hidden)
    assert hidden and set(hidden) <= set(kept(""))  # Danbooru lists them (without their files)
    assert kept("", "moebooru") == ids(lambda p: not p.is_hidden)
    assert kept("deleted:true", "moebooru") == hidden
    assert kept("deleted:all", "moebooru") == kept("")
    assert kept("", "gelbooru") == ids(lambda p: not p.is_hidden)
    assert kept("deleted:all", "gelbooru") == []  # no such metatag there: a plain tag that no post carries


def test_limit_is_clamped_and_checked():
    assert parse_limit({}, 200) == POST_LIMIT and parse_limit({"limit": " "}, 200) == POST_LIMIT
    assert parse_limit({"limit": "0"}, 200) == 1 and parse_limit({"limit": "500"}, 200) == 200
    with pytest.raises(ApiError) as e:
        parse_limit({"limit": "x"}, 200)
    assert e.value.status == 422


def test_pages_numbers_and_seeks():
    assert parse_page({}) == ("n", 1) and parse_page({"page": "-3"}) == ("n", 1)
    assert parse_page({"page": "b120"}) == ("b", 120) and parse_page({"page": "A7"}) == ("a", 7)
    assert parse_page({"page": str(MAX_PAGE)}) == ("n", MAX_PAGE)
    with pytest.raises(ApiError) as e:
        parse_page({"page": str(MAX_PAGE + 1)})
    assert e.value.status == 410
    with pytest.raises(ApiError) as e:
        parse_page({"page": "c5"})
    assert e.value.status == 422
    assert parse_page_number({"pid": "0"}, "pid", first=0) == 1 and parse_page_number({"pid": "2"}, "pid", first=0) == 3
    assert parse_page_number({"page": "-1"}) == 1


def test_paginate_numbered_and_by_id():
    items = [SimpleNamespace(id=i) for i in (2, 4, 6, 8, 10, 12)]

    def page(kind: str, n: int, limit: int = 2, **kw) -> list[int]:
        return [x.id for x in paginate(items, (kind, n), limit, **kw)]

    assert page("n", 1) == [12, 10] and page("n", 3) == [4, 2] and page("n", 4) == []
    assert page("n", 1, ordered=items) == [2, 4]
    assert page("b", 8) == [6, 4] and page("b", 3) == [2] and page("b", 2) == []
    assert page("a", 6) == [10, 8] and page("a", 5) == [8, 6] and page("a", 12) == []
