"""An HTTP server over the synthetic board that speaks Danbooru's, Moebooru's and Gelbooru's APIs, faults included."""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import re
import socket
import sys
import threading
import time
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..util.cores import cores
from .board import SAMPLE_WIDTH, Board, SynthPost
from .cast import SynthConfig

log = logging.getLogger(__name__)

POST_LIMIT = 20  # Danbooru's default page size
POST_LIMIT_MAX = 200
TAG_LIMIT_MAX = 1000
MAX_PAGE = 1000  # numbered pages beyond this are refused (anonymous users on Danbooru)
MAX_PLAIN_TAGS = 2  # tags per search for anonymous users; metatags (id:, rating:, order:) are free
CATEGORIES = {"general": 0, "artist": 1, "copyright": 3, "character": 4, "meta": 5}
RATINGS = {"g": "g", "general": "g", "s": "s", "sensitive": "s", "q": "q", "questionable": "q"}
RATINGS |= {"e": "e", "explicit": "e"}
MOEBOORU_LIMIT, MOEBOORU_LIMIT_MAX = 40, 100  # post.json's default page and its documented hard limit
MOEBOORU_TAG_LIMIT = 50  # tag.json's default page; limit=0 answers every tag
GELBOORU_LIMIT_MAX = 100
# Moebooru knows s, q and e only; the board's meta tags become yande.re's "faults" (type 6).
MOEBOORU_RATINGS = {"g": "s", "s": "s", "q": "q", "e": "e"}
MOEBOORU_TYPES = {0: 0, 1: 1, 3: 3, 4: 4, 5: 6}
GELBOORU_RATINGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "zip": "application/zip",
    "mp4": "video/mp4",
}
JSON_TYPE = "application/json; charset=utf-8"
FAULT_PATHS = ("api", "files", "all")
STAT_KEYS = ("requests", "api", "files", "rate_limited", "throttled", "errors", "slow", "truncated", "bad_md5")

try:  # Danbooru answers in US Eastern time, Gelbooru in US Central; the offset is what a client must parse
    _ZONE: Any = ZoneInfo("America/New_York")
    _GELBOORU_ZONE: Any = ZoneInfo("America/Chicago")
except ZoneInfoNotFoundError:
    _ZONE, _GELBOORU_ZONE = timezone(timedelta(hours=-5)), timezone(timedelta(hours=-6))
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_FILE_RE = re.compile(r"/(original|sample|180x180|preview)/([0-9a-f]{2})/([0-9a-f]{2})/(sample-)?([0-9a-f]{32})\.(\w+)")
_POST_RE = re.compile(r"/posts/(\d+)\.json")
_PIXIV_RE = re.compile(r"pixiv\.net/(?:\w+/)?artworks/(\d+)|illust_id=(\d+)")
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


def _unit(seed: int, label: str, n: int) -> float:
    """A uniform number in [0, 1) that depends only on its arguments: the source of every fault decision."""
    digest = hashlib.blake2b(f"{seed}/{label}/{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Faults:
    """Misbehaviour to inject, so that a crawler's retries, back-off and checks meet a board that fails.

    The requests that `paths` selects ('api', 'files' or 'all') are numbered 1, 2, 3, ... as they arrive,
    and whether a fault fires on request n is a pure function of (seed, fault, n): a client that sends one
    request at a time sees the same faults on every run, and `fires` tells a test how many to expect.
    In the order they are checked:

    - rate_limit: at most this many requests are accepted in any one-second window; the rest get 429 with
      Retry-After (seconds until a slot frees). The only fault that depends on time; refused requests get no number.
    - slow_rate: the answer, whatever it is, is delayed by slow_seconds.
    - throttle_rate: 429 with `Retry-After: retry_after`, whatever the pace (a deterministic rate limit).
    - error_rate: 500, 502 or 503 (the last two as a proxy's HTML page, as a real board's front end sends them).
    - truncate_rate: the full Content-Length is sent, then half the body, then the connection is closed.
    - bad_md5_rate: the fraction of posts whose original file is served with one byte changed, chosen by post
      id, so a retry gets the same bad bytes; it applies whatever `paths` says.
    """

    rate_limit: int = 0
    slow_rate: float = 0.0
    slow_seconds: float = 2.0
    throttle_rate: float = 0.0
    retry_after: int = 1
    error_rate: float = 0.0
    truncate_rate: float = 0.0
    bad_md5_rate: float = 0.0
    paths: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("slow_rate", "throttle_rate", "error_rate", "truncate_rate", "bad_md5_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {getattr(self, name)}")
        if self.paths not in FAULT_PATHS:
            raise ValueError(f"paths must be one of {', '.join(FAULT_PATHS)}, not {self.paths!r}")
        if self.rate_limit < 0 or self.retry_after < 0 or self.slow_seconds < 0:
            raise ValueError("rate_limit, retry_after and slow_seconds must not be negative")

    def fires(self, fault: str, n: int) -> bool:
        """Whether `fault` ('slow', 'throttle', 'error' or 'truncate') fires on the n-th selected request."""
        rate = getattr(self, f"{fault}_rate")
        return rate > 0 and _unit(self.seed, fault, n) < rate

    def is_bad_md5(self, post_id: int) -> bool:
        """Whether this post's original file is served with bytes that do not match its md5."""
        return self.bad_md5_rate > 0 and _unit(self.seed, "bad_md5", post_id) < self.bad_md5_rate

    def applies_to(self, kind: str) -> bool:
        return self.paths in ("all", kind)


class ApiError(Exception):
    """An answer in Danbooru's error format: `{"success": false, "error": ..., "message": ...}`."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def _not_found() -> ApiError:
    return ApiError(404, "ActiveRecord::RecordNotFound", "That record was not found.")


def _bad_parameter(message: str) -> ApiError:
    return ApiError(422, "ArgumentError", message)


@dataclass
class Response:
    """What the server answers to one request, before it is written (and perhaps cut short) on the wire."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    truncate: bool = False


def _json(status: int, payload: Any) -> Response:
    return Response(status, json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


def _error(e: ApiError) -> Response:
    return _json(e.status, {"success": False, "error": e.error, "message": e.message})


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


def _timestamp(t: datetime) -> str:
    return t.astimezone(_ZONE).isoformat(timespec="milliseconds")


def _make_tags(posts: list[SynthPost]) -> list[Tag]:
    """The board's tags in creation order (ids ascending): a tag is created with the first post that carries it."""
    first: dict[str, tuple[int, datetime, int]] = {}  # name -> (category, created, first post id)
    last: dict[str, datetime] = {}
    counts: Counter[str] = Counter()
    for post in posts:
        for category, names in post.tags.items():
            for name in names:
                first.setdefault(name, (CATEGORIES[category], post.created_at, post.id))
                last[name] = post.created_at
                counts[name] += 1
    order = sorted(first, key=lambda name: (first[name][2], name))
    return [Tag(i + 1, name, first[name][0], counts[name], first[name][1], last[name]) for i, name in enumerate(order)]


# A predicate over (post, the post's set of tags); search terms compile to these.
Predicate = Callable[[SynthPost, frozenset[str]], bool]


@dataclass(frozen=True)
class Flavour:
    """How one board software reads a search, so one search engine serves all three APIs (STYLE rule 9)."""

    name: str
    max_plain_tags: int  # plain tags one search may hold; 0: no limit
    order_key: str  # the ordering metatag: order:id (Danbooru, Moebooru) or sort:id:asc (Gelbooru)
    ascending: tuple[str, ...]  # its values that mean oldest first; any other means newest first
    ratings: dict[str, frozenset[str]]  # rating:<word> -> the board ratings it keeps
    deleted: str  # deleted and banned posts: "shown", "metatag" (hidden unless deleted:true or deleted:all), "never"


def _ratings(table: dict[str, str]) -> dict[str, frozenset[str]]:
    return {word: frozenset(code) for word, code in table.items()}


FLAVOURS = {
    "danbooru": Flavour("danbooru", MAX_PLAIN_TAGS, "order", ("id", "id_asc"), _ratings(RATINGS), "shown"),
    # Moebooru rates safe, questionable or explicit; its safe covers the board's general and sensitive.
    "moebooru": Flavour(
        name="moebooru",
        max_plain_tags=6,
        order_key="order",
        ascending=("id",),
        ratings=_ratings({"s": "gs", "safe": "gs", "q": "q", "questionable": "q", "e": "e", "explicit": "e"}),
        deleted="metatag",
    ),
    # Gelbooru's API lists active posts only; its legacy "safe" covers general and sensitive.
    "gelbooru": Flavour(
        name="gelbooru",
        max_plain_tags=0,
        order_key="sort",
        ascending=("id:asc",),
        ratings=_ratings({"safe": "gs"} | {word: code for code, word in GELBOORU_RATINGS.items()}),
        deleted="never",
    ),
}


@dataclass
class Search:
    """A parsed `tags` parameter: what to keep and in which order."""

    predicates: list[Predicate]
    ascending: bool = False


def parse_search(text: str, flavour: Flavour = FLAVOURS["danbooru"]) -> Search:
    """Parse a search: plain tags, `-negation`, `*` wildcards, `id:`, `rating:`, the flavour's order and `deleted:`."""
    search = Search([])
    plain = 0
    deleted = "all" if flavour.deleted == "shown" else "hide"
    for term in text.split():
        negated = term.startswith("-") and len(term) > 1
        body = (term[1:] if negated else term).lower()
        key, colon, value = body.partition(":")
        if colon and key == flavour.order_key and not negated:
            # Unknown orders fall back to newest first, as the boards do.
            search.ascending = value in flavour.ascending
            continue
        if colon and key == "deleted" and flavour.deleted == "metatag" and not negated:
            deleted = "only" if value == "true" else "all"
            continue
        if colon and key == "id":
            test = _id_predicate(value)
        elif colon and key == "rating":
            test = _rating_predicate(value, flavour)
        else:
            plain += 1
            test = _tag_predicate(body)
        search.predicates.append((lambda p, t, test=test: not test(p, t)) if negated else test)
    if flavour.max_plain_tags and plain > flavour.max_plain_tags:
        raise ApiError(
            422,
            "PostQuery::TagLimitError",
            f"You cannot search for more than {flavour.max_plain_tags} tags at a time. "
            "Upgrade your account to search for more tags at once.",
        )
    if deleted != "all":
        search.predicates.append(lambda p, _, only=deleted == "only": _hidden(p) == only)
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
        raise _bad_parameter(f"Invalid id range: id:{value}") from None
    return lambda p, _: p.id == n


def _rating_predicate(value: str, flavour: Flavour) -> Predicate:
    names = value.split(",")
    if not all(name in flavour.ratings for name in names):
        raise _bad_parameter(f"Invalid rating: rating:{value} (use {', '.join(flavour.ratings)})")
    wanted = frozenset().union(*(flavour.ratings[name] for name in names))
    return lambda p, _: p.rating in wanted


def _tag_predicate(name: str) -> Predicate:
    if "*" not in name:
        return lambda _, tags: name in tags
    pattern = re.compile(".*".join(re.escape(part) for part in name.split("*")))
    return lambda _, tags: any(pattern.fullmatch(t) for t in tags)


def parse_limit(params: dict[str, str], maximum: int, default: int = POST_LIMIT) -> int:
    """The `limit` parameter, clamped to 1..maximum as Danbooru does; a non-number is refused."""
    text = params.get("limit", "").strip()
    if not text:
        return default
    try:
        return min(max(int(text), 1), maximum)
    except ValueError:
        raise _bad_parameter(f"limit must be a whole number, not {text!r}") from None


def parse_page(params: dict[str, str]) -> tuple[str, int]:
    """The `page` parameter: ('n', number), ('b', id) for ids below, or ('a', id) for ids above."""
    text = params.get("page", "").strip().lower()
    if not text:
        return "n", 1
    if re.fullmatch(r"[ab]\d+", text):
        return text[0], int(text[1:])
    if not re.fullmatch(r"-?\d+", text):
        raise _bad_parameter(f"page must be a number, or b<id> or a<id>, not {text!r}")
    page = max(int(text), 1)
    if page > MAX_PAGE:
        raise ApiError(
            410,
            "PaginationExtension::PaginationError",
            f"You cannot go beyond page {MAX_PAGE}. Please narrow your search terms.",
        )
    return "n", page


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


def parse_page_number(params: dict[str, str], key: str = "page", first: int = 1) -> int:
    """A numbered page counted from `first` (Moebooru's page from 1, Gelbooru's pid from 0) as a page from 1."""
    text = params.get(key, "").strip()
    if not text:
        return 1
    if not re.fullmatch(r"-?\d+", text):
        raise _bad_parameter(f"{key} must be a whole number, not {text!r}")
    return max(int(text) - first, 0) + 1


def _int_param(params: dict[str, str], key: str) -> int | None:
    text = params.get(key, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise _bad_parameter(f"{key} must be a whole number, not {text!r}") from None


class _HTTPServer(ThreadingHTTPServer):
    # The standard library's server, not a framework: a test fixture must start in-process in milliseconds on
    # an ephemeral port and misbehave on purpose at the byte level (bodies cut short, answers held back),
    # which a framework's response machinery would hide or "fix".
    daemon_threads = True
    allow_reuse_address = True
    # socketserver listens with a backlog of 5: a crawler opening 32 connections at once overflows it, and the
    # kernel drops the extra SYNs, which clients resend only after a second. Real boards accept far more.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: BoardServer):
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer is normal for a crawler under test; no traceback on stderr.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: crawlers reuse connections
    # Headers and body go out in separate writes; with Nagle's algorithm the body would wait for the client's
    # delayed ACK (40 ms a request on Linux).
    disable_nagle_algorithm = True
    server_version = "fakebooru"
    sys_version = ""
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.app._connections.add(self.connection)

    def finish(self) -> None:
        self.server.app._connections.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _refuse(self) -> None:
        self.close_connection = True  # the request body, if any, is not read
        self._write(_error(ApiError(405, "MethodNotAllowed", "This board is read-only.")), head=False)

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

    def _answer(self, head: bool) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length, self.close_connection = 0, True
        if length > 0:  # a GET with a body: read it so the next request on this connection starts in the right place
            self.rfile.read(length)
        self._write(self.server.app.respond(self.path, self.headers.get("Host"), head=head), head=head)

    def _write(self, response: Response, head: bool) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if head:
            return
        if response.truncate:
            self.wfile.write(response.body[: len(response.body) // 2])
            self.close_connection = True
            return
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class BoardServer:
    """A running fake board: `url`, `board`, `stats` (faults fired and requests seen), `close()`.

    It answers Danbooru's API (/posts.json, /tags.json), Moebooru's (/post.json, /tag.json) and Gelbooru's
    (/index.php?page=dapi&json=1) over the same posts and files. Start one with `start_board`. Use it as a
    context manager, or call `close()`.
    """

    def __init__(
        self,
        board: Board,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        warm: bool = True,
    ):
        self.board = board
        self.faults = faults or Faults()
        self.tags = _make_tags(board.posts)
        self._tags_by_count = sorted(self.tags, key=lambda t: (-t.post_count, t.name))
        self._tags_by_name = sorted(self.tags, key=lambda t: t.name)
        self._tag_sets = {p.id: frozenset(t for names in p.tags.values() for t in names) for p in board.posts}
        self._children: dict[int, list[SynthPost]] = {}
        for post in board.posts:
            if post.parent_id is not None:
                self._children.setdefault(post.parent_id, []).append(post)

        self._lock = threading.Lock()
        self._stats: Counter[str] = Counter(dict.fromkeys(STAT_KEYS, 0))
        self._numbered = 0  # requests that faults apply to, so far
        self._accepted: deque[float] = deque()  # when recent requests passed the rate limit
        self._md5s: dict[int, str] = {}  # post id -> md5, for posts whose file has been rendered
        self._by_md5: dict[str, SynthPost] = {}  # visible posts only: hidden files are not served
        self._render_locks: dict[int, threading.Lock] = {}
        self._previews: dict[int, bytes] = {}
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._warmed = threading.Event()
        # A few threads render a page's posts at once, so a page of posts nobody has rendered yet answers quickly.
        self._pool = ThreadPoolExecutor(max_workers=min(4, cores()), thread_name_prefix="fakebooru-render")

        self._httpd = _HTTPServer((host, port), self)
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="fakebooru-http", daemon=True
        )
        self._serve_thread.start()
        self._warm_thread = threading.Thread(target=self._warm, name="fakebooru-warm", daemon=True)
        if warm:
            self._warm_thread.start()

    # Life cycle

    def __enter__(self) -> BoardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving: close the listening socket and every open connection, stop warming up. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for conn in list(self._connections):  # keep-alive connections would otherwise outlive the server
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._warm_thread.is_alive():
            self._warm_thread.join(timeout=10)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests, api, files, and each fault fired (rate_limited, throttled, errors, slow, ...)."""
        with self._lock:
            return dict(self._stats)

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Block until every post's file has been rendered (md5s ready); False on timeout."""
        return self._warmed.wait(timeout)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    # Rendering

    def _warm(self) -> None:
        # Highest id first: the order in which crawlers walk the board.
        for post in reversed(self.board.posts):
            if self._stopping.is_set():
                return
            try:
                self._render(post)
            except Exception:
                log.exception("rendering post %d failed", post.id)
        self._warmed.set()

    def _render(self, post: SynthPost) -> str:
        """Render the post's file if nobody has yet (one thread per post), and return its md5."""
        md5 = self._md5s.get(post.id)
        if md5 is not None:
            return md5
        with self._lock:
            lock = self._render_locks.setdefault(post.id, threading.Lock())
        with lock:
            md5 = self._md5s.get(post.id)
            if md5 is None:
                md5 = self.board.md5(post)
                with self._lock:
                    self._md5s[post.id] = md5
                    if not _hidden(post):
                        self._by_md5[md5] = post
        return md5

    def _render_all(self, posts: list[SynthPost]) -> None:
        if len(posts) > 1:
            list(self._pool.map(self._render, posts))
        elif posts:
            self._render(posts[0])

    def _find(self, md5: str) -> SynthPost | None:
        post = self._by_md5.get(md5)
        if post is not None or self._warmed.is_set():
            return post
        # Not rendered yet (a client that kept URLs from an earlier run of the same board): help the warm-up
        # along, newest first, until the md5 turns up or every post has been rendered.
        todo = [p for p in reversed(self.board.posts) if p.id not in self._md5s]
        for start in range(0, len(todo), 16):
            self._render_all(todo[start : start + 16])
            if md5 in self._by_md5:
                break
        return self._by_md5.get(md5)

    # Requests

    def respond(self, target: str, host: str | None = None, head: bool = False) -> Response:
        """Answer one GET (or HEAD) request for `target` (path and query), faults included."""
        path = urlsplit(target).path
        kind = "files" if _FILE_RE.fullmatch(path) else "api"
        self._count("requests")
        self._count(kind)
        replaced, truncate = self._fault() if self.faults.applies_to(kind) else (None, False)
        if replaced is not None:
            return replaced
        try:
            response = self._route(target, self._base_url(host))
        except ApiError as e:
            response = _error(e)
        except Exception:
            log.exception("error answering %s", target)
            response = _error(ApiError(500, "InternalServerError", "The server failed to answer this request."))
        if truncate and not head and response.body:
            response.truncate = True
            self._count("truncated")
        return response

    def _fault(self) -> tuple[Response | None, bool]:
        """Apply the request-level faults: an answer that replaces the real one (or None), and whether to truncate."""
        faults = self.faults
        with self._lock:
            if faults.rate_limit:
                now = time.monotonic()
                while self._accepted and self._accepted[0] <= now - 1.0:
                    self._accepted.popleft()
                if len(self._accepted) >= faults.rate_limit:
                    self._stats["rate_limited"] += 1
                    wait = max(1, math.ceil(self._accepted[0] + 1.0 - now))
                    return _rate_limited(wait), False
                self._accepted.append(now)
            self._numbered += 1
            n = self._numbered
        if faults.fires("slow", n):
            self._count("slow")
            self._stopping.wait(faults.slow_seconds)
        if faults.fires("throttle", n):
            self._count("throttled")
            return _rate_limited(faults.retry_after), False
        if faults.fires("error", n):
            self._count("errors")
            return _server_error((500, 502, 503)[int(_unit(faults.seed, "status", n) * 3)]), False
        return None, faults.fires("truncate", n)

    def _base_url(self, host: str | None) -> str:
        # URLs in answers name the host the client asked for, as a real site's do, so a server bound to
        # 0.0.0.0 hands out addresses that work from where the client stands.
        if host and _HOST_RE.fullmatch(host.strip()):
            return f"http://{host.strip()}"
        return self.url

    def _route(self, target: str, base: str) -> Response:
        parts = urlsplit(target)
        path = parts.path
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if path == "/posts.json":
            return self._posts(params, base)
        if path == "/counts/posts.json":
            search = parse_search(params.get("tags", ""))
            return _json(200, {"counts": {"posts": len(self._matching(search))}})
        if path == "/tags.json":
            return self._tags(params)
        if path == "/post.json":
            return self._moebooru_posts(params, base)
        if path == "/tag.json":
            return self._moebooru_tags(params)
        if path == "/index.php" and params.get("page") == "dapi":
            return self._gelbooru(params, base)
        if m := _POST_RE.fullmatch(path):
            post = self.board.get(int(m[1]))
            if post is None:
                raise _not_found()
            self._render(post)
            return _json(200, self.post_json(post, base))
        if m := _FILE_RE.fullmatch(path):
            return self._file(*m.groups())
        raise _not_found()

    def _matching(self, search: Search) -> list[SynthPost]:
        if not search.predicates:
            return self.board.posts
        tag_sets = self._tag_sets
        return [p for p in self.board.posts if all(test(p, tag_sets[p.id]) for test in search.predicates)]

    def _search_page(self, search: Search, page: tuple[str, int], limit: int) -> tuple[list[SynthPost], int]:
        """One page of the posts a search keeps, rendered (md5s ready), and how many it keeps in all."""
        matching = self._matching(search)
        posts = paginate(matching, page, limit, ordered=matching if search.ascending else None)
        self._render_all(posts)
        return posts, len(matching)

    def _posts(self, params: dict[str, str], base: str) -> Response:
        search = parse_search(params.get("tags", ""))
        posts, _ = self._search_page(search, parse_page(params), parse_limit(params, POST_LIMIT_MAX))
        return _json(200, [self.post_json(p, base) for p in posts])

    def _tags(self, params: dict[str, str]) -> Response:
        limit = parse_limit(params, TAG_LIMIT_MAX)
        page = parse_page(params)
        order = params.get("search[order]", "date")
        ordered = {"count": self._tags_by_count, "name": self._tags_by_name}.get(order, self.tags[::-1])
        tests: list[Callable[[Tag], bool]] = []
        if pattern := params.get("search[name_matches]", "").strip().lower():
            regex = re.compile(".*".join(re.escape(part) for part in pattern.split("*")))
            tests.append(lambda t: regex.fullmatch(t.name) is not None)
        if names := params.get("search[name]", "").strip().lower():
            wanted = set(names.split(","))
            tests.append(lambda t: t.name in wanted)
        if category := params.get("search[category]", "").strip():
            try:
                codes = {int(c) for c in category.split(",")}
            except ValueError:
                raise _bad_parameter(f"search[category] must be category numbers, not {category!r}") from None
            tests.append(lambda t: t.category in codes)
        kept = [t for t in self.tags if all(test(t) for test in tests)]
        keep = {t.id for t in kept}
        rows = paginate(kept, page, limit, ordered=[t for t in ordered if t.id in keep])
        return _json(200, [t.to_json() for t in rows])

    # Moebooru and Gelbooru: the same board through their APIs

    def _moebooru_posts(self, params: dict[str, str], base: str) -> Response:
        search = parse_search(params.get("tags", ""), FLAVOURS["moebooru"])
        limit = parse_limit(params, MOEBOORU_LIMIT_MAX, MOEBOORU_LIMIT)
        posts, _ = self._search_page(search, ("n", parse_page_number(params, "page", first=1)), limit)
        return _json(200, [self.moebooru_json(p, base) for p in posts])

    def _moebooru_tags(self, params: dict[str, str]) -> Response:
        # As Moebooru's tag/index: name matches a substring unless it has a * wildcard; limit=0 answers every tag.
        limit = _int_param(params, "limit")
        if limit is None:
            limit = MOEBOORU_TAG_LIMIT
        elif limit <= 0:
            limit = max(len(self.tags), 1)
        order = params.get("order", "")
        ordered = {"count": self._tags_by_count, "date": self.tags[::-1]}.get(order, self._tags_by_name)
        tests: list[Callable[[Tag], bool]] = []
        if name := params.get("name", "").strip().lower():
            regex = _wildcard(name if "*" in name else f"*{name}*")
            tests.append(lambda t: regex.fullmatch(t.name) is not None)
        if (kind := _int_param(params, "type")) is not None:
            tests.append(lambda t: MOEBOORU_TYPES[t.category] == kind)
        if (after := _int_param(params, "after_id")) is not None:
            tests.append(lambda t: t.id >= after)
        if (tag_id := _int_param(params, "id")) is not None:
            tests.append(lambda t: t.id == tag_id)
        kept = [t for t in ordered if all(test(t) for test in tests)]
        rows = paginate(kept, ("n", parse_page_number(params, "page", first=1)), limit, ordered=kept)
        return _json(200, [_moebooru_tag(t) for t in rows])

    def _gelbooru(self, params: dict[str, str], base: str) -> Response:
        kind = params.get("s")
        if params.get("q") != "index" or kind not in ("post", "tag"):
            raise _not_found()
        if params.get("json") != "1":
            raise _bad_parameter("fakebooru answers Gelbooru's API in JSON only: add json=1")
        limit = parse_limit(params, GELBOORU_LIMIT_MAX if kind == "post" else TAG_LIMIT_MAX, GELBOORU_LIMIT_MAX)
        page = ("n", parse_page_number(params, "pid", first=0))
        rows: list[dict[str, Any]]
        if kind == "post":
            posts, count = self._search_page(parse_search(params.get("tags", ""), FLAVOURS["gelbooru"]), page, limit)
            rows = [self.gelbooru_json(p, base) for p in posts]
        else:
            tags = self._gelbooru_tags(params)
            rows, count = [_gelbooru_tag(t) for t in paginate(tags, page, limit, ordered=tags)], len(tags)
        answer: dict[str, Any] = {"@attributes": {"limit": limit, "offset": (page[1] - 1) * limit, "count": count}}
        if rows:  # Gelbooru leaves the list out of an empty answer
            answer[kind] = rows
        return _json(200, answer)

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
        if (after := _int_param(params, "after_id")) is not None:
            tests.append(lambda t: t.id > after)
        key = {"count": lambda t: t.post_count, "date": lambda t: t.id}.get(params.get("orderby", ""), lambda t: t.name)
        return sorted(
            (t for t in self.tags if all(test(t) for test in tests)),
            key=key,
            reverse=params.get("order", "").upper() == "DESC",
        )

    def _file(self, kind: str, ab: str, cd: str, sample_prefix: str | None, md5: str, ext: str) -> Response:
        if ab != md5[:2] or cd != md5[2:4] or (sample_prefix is not None) != (kind == "sample"):
            raise _not_found()
        post = self._find(md5)
        if post is None:
            raise _not_found()
        if kind == "original":
            if ext != post.file_ext:
                raise _not_found()
            data = self.board.file(post)
            if self.faults.is_bad_md5(post.id):
                self._count("bad_md5")
                data = _corrupt(data)
            return Response(200, data, CONTENT_TYPES[post.file_ext])
        if ext != "jpg":
            raise _not_found()
        if kind == "sample":
            sample = self.board.sample(post)
            if sample is None:
                raise _not_found()
            return Response(200, sample, CONTENT_TYPES["jpg"])
        preview = self._previews.get(post.id)
        if preview is None:  # previews are small and every gallery page asks for them again
            preview = self._previews[post.id] = self.board.preview(post)
        return Response(200, preview, CONTENT_TYPES["jpg"])

    # Post objects

    def _file_urls(self, post: SynthPost, md5: str, base: str) -> tuple[str, str | None, str]:
        """The original, the sample (None without one) and the preview URL of a post: the same files for every API."""
        original = f"{base}/original/{md5[:2]}/{md5[2:4]}/{md5}.{post.file_ext}"
        sample = f"{base}/sample/{md5[:2]}/{md5[2:4]}/sample-{md5}.jpg" if self.board.has_large(post) else None
        return original, sample, f"{base}/180x180/{md5[:2]}/{md5[2:4]}/{md5}.jpg"

    def post_json(self, post: SynthPost, base: str | None = None) -> dict[str, Any]:
        """The post as Danbooru's API shows it to an anonymous user (hidden files: no md5 and no file URLs)."""
        base = base or self.url
        md5 = self._render(post)
        groups = {category: sorted(post.tags.get(category, ())) for category in CATEGORIES}
        every = sorted({t for names in groups.values() for t in names})
        children = self._children.get(post.id, [])
        active = any(not c.is_deleted for c in children)
        down = -int(_unit(0, "down", post.id) * 3)
        down = min(down, post.score) if post.score < 0 else down
        created = _timestamp(post.created_at)
        pixiv = _PIXIV_RE.search(post.source)
        original, sample, preview = self._file_urls(post, md5, base)
        has_large = sample is not None
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
            "has_large": has_large,
            "has_visible_children": active,
            **{f"tag_string_{c}": " ".join(groups[c]) for c in ("general", "character", "copyright", "artist", "meta")},
            "file_url": original,
            "large_file_url": sample or original,
            "preview_file_url": preview,
        }
        if _hidden(post):
            for key in ("md5", "file_url", "large_file_url", "preview_file_url"):
                del fields[key]
        return fields

    def moebooru_json(self, post: SynthPost, base: str | None = None) -> dict[str, Any]:
        """The post as Moebooru's API shows it (yande.re's fields): one flat tag string, unix time, s/q/e ratings.

        Deleted posts (the board's banned ones too) keep their md5 but lose their file URLs, as on Moebooru.
        """
        base = base or self.url
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
            "status": "deleted" if _hidden(post) else "active",
            "is_pending": False,
            "width": post.width,
            "height": post.height,
            "is_held": False,
            "frames_pending_string": "",
            "frames_pending": [],
            "frames_string": "",
            "frames": [],
        }
        if _hidden(post):
            for key in ("file_url", "sample_url", "jpeg_url"):
                del fields[key]
            fields["flag_detail"] = None
        return fields

    def gelbooru_json(self, post: SynthPost, base: str | None = None) -> dict[str, Any]:
        """The post as Gelbooru's JSON API shows it: tags and source HTML-escaped, flags as strings, 0 for no parent."""
        base = base or self.url
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


def _uploader(post: SynthPost) -> int:
    return 10_000 + int(_unit(0, "uploader", post.id) * 990_000)


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


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _hidden(post: SynthPost) -> bool:
    return post.is_deleted or post.is_banned


def _corrupt(data: bytes) -> bytes:
    # One byte flipped in the middle: same length, so only a client that checks the md5 notices.
    if not data:
        return data
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    return bytes(bad)


def _rate_limited(seconds: int) -> Response:
    response = _error(ApiError(429, "TooManyRequests", "You are being rate limited. Please slow down."))
    response.headers["Retry-After"] = str(seconds)
    return response


def _server_error(status: int) -> Response:
    if status == 500:
        return _error(ApiError(500, "InternalServerError", "An unexpected error occurred."))
    title = {502: "502 Bad Gateway", 503: "503 Service Temporarily Unavailable"}[status]
    page = f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center></body></html>\n"
    return Response(status, page.encode(), "text/html; charset=utf-8")


def start_board(
    config: SynthConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Faults | None = None,
    warm: bool = True,
) -> BoardServer:
    """Build the board for `config` and serve it on a background thread (port 0: a free port is chosen).

    With `warm`, a background thread renders every post's file from the highest id down, so md5s are ready
    when a crawler asks; pages never wait for it beyond rendering their own posts.
    """
    return BoardServer(Board(config), host, port, faults, warm)


def serve_board(
    config: SynthConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Faults | None = None,
    out: TextIO | None = None,
    warm: bool = False,
) -> None:
    """Serve the board until interrupted (Ctrl-C); the first line on `out` (stdout) is the server's URL.

    With `warm`, every file is rendered before the URL is printed, so no request waits on rendering.
    """
    out = out or sys.stdout
    with start_board(config, host, port, faults) as server:
        if warm:
            server.wait_warm()
        print(server.url, file=out, flush=True)
        # Waiting on an event nobody sets: Ctrl-C raises KeyboardInterrupt here, and the server closes.
        with suppress(KeyboardInterrupt):
            threading.Event().wait()
