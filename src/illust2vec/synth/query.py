"""The fake board's query language: searches (tags, negation, wildcards, id:, rating:, order:), limits and pages."""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from ..formats.categories import RATING_TAGS
from .board import SynthPost

POST_LIMIT = 20  # Danbooru's default page size
POST_LIMIT_MAX = 200
TAG_LIMIT_MAX = 1000
MAX_PAGE = 1000  # numbered pages beyond this are refused (anonymous users on Danbooru)
MAX_PLAIN_TAGS = 2  # tags per search for anonymous users; metatags (id:, rating:, order:) are free
# rating:<word> on Danbooru: the letter or the word (g, general, s, sensitive, ...); Gelbooru knows the words.
RATINGS = {key: code for code, word in RATING_TAGS.items() for key in (code, word)}


class ApiError(Exception):
    """An answer in Danbooru's error format: `{"success": false, "error": ..., "message": ...}`."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def not_found() -> ApiError:
    return ApiError(404, "ActiveRecord::RecordNotFound", "That record was not found.")


def bad_parameter(message: str) -> ApiError:
    return ApiError(422, "ArgumentError", message)


# A predicate over (post, the post's set of tags); search terms compile to these.
Predicate = Callable[[SynthPost, frozenset[str]], bool]


@dataclass(frozen=True)
class Dialect:
    """How one board software reads a search, so one search engine serves all three APIs (STYLE rule 9)."""

    name: str
    max_plain_tags: int  # plain tags one search may hold; 0: no limit
    order_key: str  # the ordering metatag: order:id (Danbooru, Moebooru) or sort:id:asc (Gelbooru)
    ascending: tuple[str, ...]  # its values that mean oldest first; any other means newest first
    ratings: dict[str, frozenset[str]]  # rating:<word> -> the board ratings it keeps
    deleted: str  # deleted and banned posts: "shown", "metatag" (hidden unless deleted:true or deleted:all), "never"


def _ratings(table: dict[str, str]) -> dict[str, frozenset[str]]:
    return {word: frozenset(codes) for word, codes in table.items()}


DIALECTS = {
    "danbooru": Dialect("danbooru", MAX_PLAIN_TAGS, "order", ("id", "id_asc"), _ratings(RATINGS), "shown"),
    # Moebooru rates safe, questionable or explicit; its safe covers the board's general and sensitive.
    "moebooru": Dialect(
        name="moebooru",
        max_plain_tags=6,
        order_key="order",
        ascending=("id",),
        ratings=_ratings({"s": "gs", "safe": "gs", "q": "q", "questionable": "q", "e": "e", "explicit": "e"}),
        deleted="metatag",
    ),
    # Gelbooru's API lists active posts only; its legacy "safe" covers general and sensitive.
    "gelbooru": Dialect(
        name="gelbooru",
        max_plain_tags=0,
        order_key="sort",
        ascending=("id:asc",),
        ratings=_ratings({"safe": "gs"} | {word: code for code, word in RATING_TAGS.items()}),
        deleted="never",
    ),
}


@dataclass
class Search:
    """A parsed `tags` parameter: what to keep and in which order."""

    predicates: list[Predicate]
    ascending: bool = False

    def keeps(self, post: SynthPost, tags: frozenset[str]) -> bool:
        """Whether the post, whose tags are `tags`, matches every term."""
        return all(test(post, tags) for test in self.predicates)


def parse_search(text: str, dialect: Dialect = DIALECTS["danbooru"]) -> Search:
    """Parse a search: plain tags, `-negation`, `*` wildcards, `id:`, `rating:`, the dialect's order and `deleted:`."""
    search = Search([])
    plain = 0
    deleted = "all" if dialect.deleted == "shown" else "hide"
    for term in text.split():
        negated = term.startswith("-") and len(term) > 1
        body = (term[1:] if negated else term).lower()
        key, colon, value = body.partition(":")
        if colon and key == dialect.order_key and not negated:
            # Unknown orders fall back to newest first, as the boards do.
            search.ascending = value in dialect.ascending
            continue
        if colon and key == "deleted" and dialect.deleted == "metatag" and not negated:
            deleted = "only" if value == "true" else "all"
            continue
        if colon and key == "id":
            test = _id_predicate(value)
        elif colon and key == "rating":
            test = _rating_predicate(value, dialect)
        else:
            plain += 1
            test = _tag_predicate(body)
        search.predicates.append((lambda p, t, test=test: not test(p, t)) if negated else test)
    if dialect.max_plain_tags and plain > dialect.max_plain_tags:
        raise ApiError(
            422,
            "PostQuery::TagLimitError",
            f"You cannot search for more than {dialect.max_plain_tags} tags at a time. "
            "Upgrade your account to search for more tags at once.",
        )
    if deleted != "all":
        search.predicates.append(lambda p, _, only=deleted == "only": p.is_hidden == only)
    return search


def _id_predicate(value: str) -> Predicate:
    """`id:` ranges as Danbooru parses them: N, A..B (inclusive, either end open), >N, >=N, <N, <=N, A,B,C."""
    try:
        if "," in value:
            ids = {int(v) for v in value.split(",")}
            return lambda p, _: p.id in ids
        if ".." in value:
            lo_text, hi_text = value.split("..", 1)
            lo = int(lo_text) if lo_text else -math.inf
            hi = int(hi_text) if hi_text else math.inf
            return lambda p, _: lo <= p.id <= hi
        for op, test in ((">=", int.__ge__), ("<=", int.__le__), (">", int.__gt__), ("<", int.__lt__)):
            if value.startswith(op):
                n = int(value[len(op) :])
                return lambda p, _, test=test, n=n: test(p.id, n)
        n = int(value)
    except ValueError:
        raise bad_parameter(f"Invalid id range: id:{value}") from None
    return lambda p, _: p.id == n


def _rating_predicate(value: str, dialect: Dialect) -> Predicate:
    names = value.split(",")
    if not all(name in dialect.ratings for name in names):
        raise bad_parameter(f"Invalid rating: rating:{value} (use {', '.join(dialect.ratings)})")
    wanted = frozenset().union(*(dialect.ratings[name] for name in names))
    return lambda p, _: p.rating in wanted


def _tag_predicate(name: str) -> Predicate:
    if "*" not in name:
        return lambda _, tags: name in tags
    pattern = wildcard(name)
    return lambda _, tags: any(pattern.fullmatch(t) for t in tags)


def wildcard(pattern: str) -> re.Pattern[str]:
    """A `*` wildcard (any run of characters) as a regular expression; everything else matches itself."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def parse_limit(params: dict[str, str], maximum: int, default: int = POST_LIMIT) -> int:
    """The `limit` parameter, clamped to 1..maximum as Danbooru does; a non-number is refused."""
    text = params.get("limit", "").strip()
    if not text:
        return default
    try:
        return min(max(int(text), 1), maximum)
    except ValueError:
        raise bad_parameter(f"limit must be a whole number, not {text!r}") from None


def parse_page(params: dict[str, str]) -> tuple[str, int]:
    """The `page` parameter: ('n', number), ('b', id) for ids below, or ('a', id) for ids above."""
    text = params.get("page", "").strip().lower()
    if not text:
        return "n", 1
    if re.fullmatch(r"[ab]\d+", text):
        return text[0], int(text[1:])
    if not re.fullmatch(r"-?\d+", text):
        raise bad_parameter(f"page must be a number, or b<id> or a<id>, not {text!r}")
    page = max(int(text), 1)
    if page > MAX_PAGE:
        raise ApiError(
            410,
            "PaginationExtension::PaginationError",
            f"You cannot go beyond page {MAX_PAGE}. Please narrow your search terms.",
        )
    return "n", page


def parse_page_number(params: dict[str, str], key: str = "page", first: int = 1) -> int:
    """A numbered page counted from `first` (Moebooru's page from 1, Gelbooru's pid from 0) as a page from 1."""
    text = params.get(key, "").strip()
    if not text:
        return 1
    if not re.fullmatch(r"-?\d+", text):
        raise bad_parameter(f"{key} must be a whole number, not {text!r}")
    return max(int(text) - first, 0) + 1


def int_param(params: dict[str, str], key: str) -> int | None:
    """A whole-number parameter, or None when it is absent or blank; anything else is refused."""
    text = params.get(key, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise bad_parameter(f"{key} must be a whole number, not {text!r}") from None


def paginate(items: list, page: tuple[str, int], limit: int, ordered: list | None = None) -> list:
    """One page of `items` (sorted by ascending id), as Danbooru pages.

    b<id> and a<id> seek by id whatever the order and answer newest first (a<id> takes the `limit` ids just
    above, then reverses them); numbered pages slice `ordered`, which defaults to newest first.
    """
    kind, n = page
    if kind == "n":
        seq = ordered if ordered is not None else items[::-1]
        return seq[(n - 1) * limit : n * limit]
    ids = [item.id for item in items]
    if kind == "b":
        i = bisect_left(ids, n)
        return items[max(i - limit, 0) : i][::-1]
    i = bisect_right(ids, n)
    return items[i : i + limit][::-1]
