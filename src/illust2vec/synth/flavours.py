"""How Danbooru, Moebooru and Gelbooru answer: the same posts and tags, each API's parameters and JSON shapes."""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..formats.categories import CATEGORY_CODES, POST_CATEGORIES, RATING_TAGS
from .board import SAMPLE_WIDTH, Board, SynthPost, unit
from .query import (
    DIALECTS,
    POST_LIMIT_MAX,
    TAG_LIMIT_MAX,
    Search,
    bad_parameter,
    int_param,
    not_found,
    paginate,
    parse_limit,
    parse_page,
    parse_page_number,
    parse_search,
    wildcard,
)

MOEBOORU_LIMIT, MOEBOORU_LIMIT_MAX = 40, 100  # post.json's default page and its documented hard limit
MOEBOORU_TAG_LIMIT = 50  # tag.json's default page; limit=0 answers every tag
GELBOORU_LIMIT_MAX = 100
# Moebooru knows s, q and e only; the board's meta tags become yande.re's "faults" (type 6).
MOEBOORU_RATINGS = {"g": "s", "s": "s", "q": "q", "e": "e"}
MOEBOORU_TYPES = {0: 0, 1: 1, 3: 3, 4: 4, 5: 6}
GELBOORU_RATINGS = RATING_TAGS  # g -> general, s -> sensitive, ...

try:  # Danbooru answers in US Eastern time, Gelbooru in US Central; the offset is what a client must parse
    _ZONE: Any = ZoneInfo("America/New_York")
    _GELBOORU_ZONE: Any = ZoneInfo("America/Chicago")
except ZoneInfoNotFoundError:
    _ZONE, _GELBOORU_ZONE = timezone(timedelta(hours=-5)), timezone(timedelta(hours=-6))
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_PIXIV_RE = re.compile(r"pixiv\.net/(?:\w+/)?artworks/(\d+)|illust_id=(\d+)")


@dataclass(frozen=True)
class Tag:
    """One row of /tags.json, derived from the board's posts."""

    id: int
    name: str
    category: int
    post_count: int
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "post_count": self.post_count,
            "category": self.category,
            "created_at": _timestamp(self.created_at),
            "updated_at": _timestamp(self.updated_at),
            "is_deprecated": False,
        }


def make_tags(posts: list[SynthPost]) -> list[Tag]:
    """The board's tags in creation order (ids ascending): a tag is created with the first post that carries it."""
    first: dict[str, tuple[int, datetime, int]] = {}  # name -> (category, created, first post id)
    last: dict[str, datetime] = {}
    counts: Counter[str] = Counter()
    for post in posts:
        for category, names in post.tags.items():
            for name in names:
                first.setdefault(name, (CATEGORY_CODES[category], post.created_at, post.id))
                last[name] = post.created_at
                counts[name] += 1
    order = sorted(first, key=lambda name: (first[name][2], name))
    return [Tag(i + 1, name, first[name][0], counts[name], first[name][1], last[name]) for i, name in enumerate(order)]


class BoardApi:
    """The JSON answers of the three APIs over one board; `BoardServer` routes requests here.

    `render(post)` renders the post's file if nobody has yet and returns its md5; `render_all(posts)` does a
    page's posts at once. Every post object carries its md5, so a page renders its posts before answering.
    """

    def __init__(
        self,
        board: Board,
        render: Callable[[SynthPost], str],
        render_all: Callable[[list[SynthPost]], None],
    ):
        self.board = board
        self._render, self._render_all = render, render_all
        self.tags = make_tags(board.posts)
        self._tags_by_count = sorted(self.tags, key=lambda t: (-t.post_count, t.name))
        self._tags_by_name = sorted(self.tags, key=lambda t: t.name)
        self._tag_sets = {p.id: frozenset(t for names in p.tags.values() for t in names) for p in board.posts}
        self._children: dict[int, list[SynthPost]] = {}
        for post in board.posts:
            if post.parent_id is not None:
                self._children.setdefault(post.parent_id, []).append(post)

    def _matching(self, search: Search) -> list[SynthPost]:
        if not search.predicates:
            return self.board.posts
        return [p for p in self.board.posts if search.keeps(p, self._tag_sets[p.id])]

    def _search_page(self, search: Search, page: tuple[str, int], limit: int) -> tuple[list[SynthPost], int]:
        """One page of the posts a search keeps, rendered (md5s ready), and how many it keeps in all."""
        matching = self._matching(search)
        posts = paginate(matching, page, limit, ordered=matching if search.ascending else None)
        self._render_all(posts)
        return posts, len(matching)

    # Danbooru: /posts.json, /posts/<id>.json, /counts/posts.json, /tags.json

    def posts(self, params: dict[str, str], base: str) -> list[dict[str, Any]]:
        search = parse_search(params.get("tags", ""))
        posts, _ = self._search_page(search, parse_page(params), parse_limit(params, POST_LIMIT_MAX))
        return [self.post_json(p, base) for p in posts]

    def post(self, post_id: int, base: str) -> dict[str, Any]:
        post = self.board.get(post_id)
        if post is None:
            raise not_found()
        return self.post_json(post, base)

    def count(self, params: dict[str, str]) -> dict[str, Any]:
        return {"counts": {"posts": len(self._matching(parse_search(params.get("tags", ""))))}}

    def tags_json(self, params: dict[str, str]) -> list[dict[str, Any]]:
        limit = parse_limit(params, TAG_LIMIT_MAX)
        page = parse_page(params)
        order = params.get("search[order]", "date")
        ordered = {"count": self._tags_by_count, "name": self._tags_by_name}.get(order, self.tags[::-1])
        tests: list[Callable[[Tag], bool]] = []
        if pattern := params.get("search[name_matches]", "").strip().lower():
            regex = wildcard(pattern)
            tests.append(lambda t: regex.fullmatch(t.name) is not None)
        if names := params.get("search[name]", "").strip().lower():
            wanted = set(names.split(","))
            tests.append(lambda t: t.name in wanted)
        if category := params.get("search[category]", "").strip():
            try:
                codes = {int(c) for c in category.split(",")}
            except ValueError:
                raise bad_parameter(f"search[category] must be category numbers, not {category!r}") from None
            tests.append(lambda t: t.category in codes)
        kept = [t for t in self.tags if all(test(t) for test in tests)]
        keep = {t.id for t in kept}
        rows = paginate(kept, page, limit, ordered=[t for t in ordered if t.id in keep])
        return [t.to_json() for t in rows]

    # Moebooru: /post.json, /tag.json

    def moebooru_posts(self, params: dict[str, str], base: str) -> list[dict[str, Any]]:
        search = parse_search(params.get("tags", ""), DIALECTS["moebooru"])
        limit = parse_limit(params, MOEBOORU_LIMIT_MAX, MOEBOORU_LIMIT)
        posts, _ = self._search_page(search, ("n", parse_page_number(params, "page", first=1)), limit)
        return [self.moebooru_json(p, base) for p in posts]

    def moebooru_tags(self, params: dict[str, str]) -> list[dict[str, Any]]:
        # As Moebooru's tag/index: name matches a substring unless it has a * wildcard; limit=0 answers every tag.
        limit = int_param(params, "limit")
        if limit is None:
            limit = MOEBOORU_TAG_LIMIT
        elif limit <= 0:
            limit = max(len(self.tags), 1)
        order = params.get("order", "")
        ordered = {"count": self._tags_by_count, "date": self.tags[::-1]}.get(order, self._tags_by_name)
        tests: list[Callable[[Tag], bool]] = []
        if name := params.get("name", "").strip().lower():
            regex = wildcard(name if "*" in name else f"*{name}*")
            tests.append(lambda t: regex.fullmatch(t.name) is not None)
        if (kind := int_param(params, "type")) is not None:
            tests.append(lambda t: MOEBOORU_TYPES[t.category] == kind)
        if (after := int_param(params, "after_id")) is not None:
            tests.append(lambda t: t.id >= after)
        if (tag_id := int_param(params, "id")) is not None:
            tests.append(lambda t: t.id == tag_id)
        kept = [t for t in ordered if all(test(t) for test in tests)]
        rows = paginate(kept, ("n", parse_page_number(params, "page", first=1)), limit, ordered=kept)
        return [_moebooru_tag(t) for t in rows]

    # Gelbooru: /index.php?page=dapi&q=index&s=post|tag&json=1

    def gelbooru(self, params: dict[str, str], base: str) -> dict[str, Any]:
        kind = params.get("s")
        if params.get("q") != "index" or kind not in ("post", "tag"):
            raise not_found()
        if params.get("json") != "1":
            raise bad_parameter("fakebooru answers Gelbooru's API in JSON only: add json=1")
        limit = parse_limit(params, GELBOORU_LIMIT_MAX if kind == "post" else TAG_LIMIT_MAX, GELBOORU_LIMIT_MAX)
        page = ("n", parse_page_number(params, "pid", first=0))
        rows: list[dict[str, Any]]
        if kind == "post":
            posts, count = self._search_page(parse_search(params.get("tags", ""), DIALECTS["gelbooru"]), page, limit)
            rows = [self.gelbooru_json(p, base) for p in posts]
        else:
            tags = self._gelbooru_tags(params)
            rows, count = [_gelbooru_tag(t) for t in paginate(tags, page, limit, ordered=tags)], len(tags)
        answer: dict[str, Any] = {"@attributes": {"limit": limit, "offset": (page[1] - 1) * limit, "count": count}}
        if rows:  # Gelbooru leaves the list out of an empty answer
            answer[kind] = rows
        return answer

    def _gelbooru_tags(self, params: dict[str, str]) -> list[Tag]:
        tests: list[Callable[[Tag], bool]] = []
        if names := params.get("names", "").split():  # as Gelbooru stores them: HTML-escaped
            wanted = set(names)
            tests.append(lambda t: _php_escape(t.name) in wanted)
        if name := params.get("name", "").strip():
            tests.append(lambda t: _php_escape(t.name) == name)
        if pattern := params.get("name_pattern", "").strip():  # SQL LIKE: % any run, _ any one character
            regex = re.compile("".join({"%": ".*", "_": "."}.get(c, re.escape(c)) for c in pattern))
            tests.append(lambda t: regex.fullmatch(_php_escape(t.name)) is not None)
        if (after := int_param(params, "after_id")) is not None:
            tests.append(lambda t: t.id > after)
        key = {"count": lambda t: t.post_count, "date": lambda t: t.id}.get(params.get("orderby", ""), lambda t: t.name)
        return sorted(
            (t for t in self.tags if all(test(t) for test in tests)),
            key=key,
            reverse=params.get("order", "").upper() == "DESC",
        )

    # Post objects

    def _file_urls(self, post: SynthPost, md5: str, base: str) -> tuple[str, str | None, str]:
        """The original, the sample (None without one) and the preview URL of a post: the same files for every API."""
        original = f"{base}/original/{md5[:2]}/{md5[2:4]}/{md5}.{post.file_ext}"
        sample = f"{base}/sample/{md5[:2]}/{md5[2:4]}/sample-{md5}.jpg" if self.board.has_large(post) else None
        return original, sample, f"{base}/180x180/{md5[:2]}/{md5[2:4]}/{md5}.jpg"

    def post_json(self, post: SynthPost, base: str) -> dict[str, Any]:
        """The post as Danbooru's API shows it to an anonymous user (hidden files: no md5 and no file URLs)."""
        md5 = self._render(post)
        groups = {category: sorted(post.tags.get(category, ())) for category in POST_CATEGORIES}
        every = sorted({t for names in groups.values() for t in names})
        children = self._children.get(post.id, [])
        active = any(not c.is_deleted for c in children)
        down = -int(unit(0, "down", post.id) * 3)
        down = min(down, post.score) if post.score < 0 else down
        created = _timestamp(post.created_at)
        pixiv = _PIXIV_RE.search(post.source)
        original, sample, preview = self._file_urls(post, md5, base)
        fields: dict[str, Any] = {
            "id": post.id,
            "created_at": created,
            "uploader_id": _uploader(post),
            "score": post.score,
            "source": post.source,
            "md5": md5,
            "last_comment_bumped_at": None,
            "rating": post.rating,
            "image_width": post.width,
            "image_height": post.height,
            "tag_string": " ".join(every),
            "fav_count": post.score - down,
            "file_ext": post.file_ext,
            "last_noted_at": None,
            "parent_id": post.parent_id,
            "has_children": bool(children),
            "approver_id": None,
            **{f"tag_count_{c}": len(groups[c]) for c in ("general", "artist", "character", "copyright")},
            "file_size": self.board.file_size(post),
            "up_score": post.score - down,
            "down_score": down,
            "is_pending": False,
            "is_flagged": False,
            "is_deleted": post.is_deleted,
            "tag_count": len(every),
            "updated_at": created,
            "is_banned": post.is_banned,
            "pixiv_id": int(pixiv[1] or pixiv[2]) if pixiv else None,
            "last_commented_at": None,
            "has_active_children": active,
            "bit_flags": 0,
            "tag_count_meta": len(groups["meta"]),
            "has_large": sample is not None,
            "has_visible_children": active,
            **{f"tag_string_{c}": " ".join(groups[c]) for c in ("general", "character", "copyright", "artist", "meta")},
            "file_url": original,
            "large_file_url": sample or original,
            "preview_file_url": preview,
        }
        if post.is_hidden:
            for key in ("md5", "file_url", "large_file_url", "preview_file_url"):
                del fields[key]
        return fields

    def moebooru_json(self, post: SynthPost, base: str) -> dict[str, Any]:
        """The post as Moebooru's API shows it (yande.re's fields): one flat tag string, unix time, s/q/e ratings.

        Deleted posts (the board's banned ones too) keep their md5 but lose their file URLs, as on Moebooru.
        """
        md5 = self._render(post)
        original, sample, preview = self._file_urls(post, md5, base)
        sample_size = (SAMPLE_WIDTH, round(post.height * SAMPLE_WIDTH / post.width)) if sample else None
        preview_size, actual_preview = _fit(post.width, post.height, 150), _fit(post.width, post.height, 300)
        fields: dict[str, Any] = {
            "id": post.id,
            "tags": post.tag_string,
            "created_at": int(post.created_at.timestamp()),
            "creator_id": _uploader(post),
            "author": "fakebooru",
            "change": post.id,
            "source": post.source,
            "score": post.score,
            "md5": md5,
            "file_size": self.board.file_size(post),
            "file_ext": post.file_ext,
            "file_url": original,
            "is_shown_in_index": True,
            "preview_url": preview,
            "preview_width": preview_size[0],
            "preview_height": preview_size[1],
            "actual_preview_width": actual_preview[0],
            "actual_preview_height": actual_preview[1],
            "sample_url": sample or original,
            "sample_width": (sample_size or (post.width, post.height))[0],
            "sample_height": (sample_size or (post.width, post.height))[1],
            "sample_file_size": 0,  # not known until the sample is rendered, which listing never does
            "jpeg_url": original,
            "jpeg_width": post.width,
            "jpeg_height": post.height,
            "jpeg_file_size": 0,  # no separate JPEG version
            "rating": MOEBOORU_RATINGS[post.rating],
            "is_rating_locked": False,
            "has_children": bool(self._children.get(post.id)),
            "parent_id": post.parent_id,
            "status": "deleted" if post.is_hidden else "active",
            "is_pending": False,
            "width": post.width,
            "height": post.height,
            "is_held": False,
            "frames_pending_string": "",
            "frames_pending": [],
            "frames_string": "",
            "frames": [],
        }
        if post.is_hidden:
            for key in ("file_url", "sample_url", "jpeg_url"):
                del fields[key]
            fields["flag_detail"] = None
        return fields

    def gelbooru_json(self, post: SynthPost, base: str) -> dict[str, Any]:
        """The post as Gelbooru's JSON API shows it: tags and source HTML-escaped, flags as strings, 0 for no parent."""
        md5 = self._render(post)
        original, sample, preview = self._file_urls(post, md5, base)
        preview_size = _fit(post.width, post.height, 250)
        return {
            "id": post.id,
            "created_at": _gelbooru_time(post.created_at),
            "score": post.score,
            "width": post.width,
            "height": post.height,
            "md5": md5,
            "directory": f"{md5[:2]}/{md5[2:4]}",
            "image": f"{md5}.{post.file_ext}",
            "rating": GELBOORU_RATINGS[post.rating],
            "source": _php_escape(post.source),
            "change": int(post.created_at.timestamp()),
            "owner": "fakebooru",
            "creator_id": _uploader(post),
            "parent_id": post.parent_id or 0,
            "sample": int(sample is not None),
            "preview_height": preview_size[1],
            "preview_width": preview_size[0],
            "tags": _php_escape(post.tag_string),
            "title": "",
            "has_notes": "false",
            "has_comments": "false",
            "file_url": original,
            "preview_url": preview,
            "sample_url": sample or "",
            "sample_height": round(post.height * SAMPLE_WIDTH / post.width) if sample else 0,
            "sample_width": SAMPLE_WIDTH if sample else 0,
            "status": "active",
            "post_locked": 0,
            "has_children": "true" if self._children.get(post.id) else "false",
        }


def _timestamp(t: datetime) -> str:
    return t.astimezone(_ZONE).isoformat(timespec="milliseconds")


def _uploader(post: SynthPost) -> int:
    return 10_000 + int(unit(0, "uploader", post.id) * 990_000)


def _fit(width: int, height: int, box: int) -> tuple[int, int]:
    """The size of a thumbnail that fits in box x box."""
    scale = min(box / max(width, 1), box / max(height, 1), 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _gelbooru_time(t: datetime) -> str:
    # Written without strftime's %a and %b, which follow the locale.
    local = t.astimezone(_GELBOORU_ZONE)
    return f"{_DAYS[local.weekday()]} {_MONTHS[local.month - 1]} {local:%d %H:%M:%S %z %Y}"


def _php_escape(text: str) -> str:
    # PHP's htmlspecialchars with ENT_QUOTES, as Gelbooru stores tags and sources (rubik&#039;s_cube, &gt;_&lt;).
    return html.escape(text, quote=True).replace("&#x27;", "&#039;")


def _moebooru_tag(tag: Tag) -> dict[str, Any]:
    return {
        "id": tag.id,
        "name": tag.name,
        "count": tag.post_count,
        "type": MOEBOORU_TYPES[tag.category],
        "ambiguous": False,
    }


def _gelbooru_tag(tag: Tag) -> dict[str, Any]:
    return {"id": tag.id, "name": _php_escape(tag.name), "count": tag.post_count, "type": tag.category, "ambiguous": 0}
