"""The fake board's HTTP server: routing, the server and warm-up threads, and `start_board`.

What the answers say lives beside it: the query language in `query`, the three APIs' answers in `flavours`,
and the faults in `faults`.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from ..util.cores import cores
from .board import Board, SynthPost
from .cast import SynthConfig
from .faults import Faults, Injector, Verdict
from .flavours import BoardApi, Tag
from .query import ApiError, not_found

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "zip": "application/zip",
    "mp4": "video/mp4",
}
JSON_TYPE = "application/json; charset=utf-8"
REQUEST_STATS = ("requests", "api", "files")

_FILE_RE = re.compile(r"/(original|sample|180x180|preview)/([0-9a-f]{2})/([0-9a-f]{2})/(sample-)?([0-9a-f]{32})\.(\w+)")
_POST_RE = re.compile(r"/posts/(\d+)\.json")
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


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


CHALLENGE_PAGE = (
    '<!DOCTYPE html><html lang="en-US"><head><title>Just a moment...</title>'
    '<meta http-equiv="refresh" content="5"></head><body><h1>Checking your browser before accessing the '
    "board</h1><p>This process is automatic. Please allow up to 5 seconds.</p></body></html>\n"
)


def _refusal(verdict: Verdict) -> Response | None:
    """The answer a fault gives instead of the real one, or None to answer for real."""
    if verdict.retry_after is not None:
        return _rate_limited(verdict.retry_after)
    if verdict.error is not None:
        return _server_error(verdict.error)
    if verdict.html:  # a front end's challenge page, sent with 200 as Cloudflare's are
        return Response(200, CHALLENGE_PAGE.encode(), "text/html; charset=utf-8")
    return None


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
    """A running fake board: `url`, `board`, `tags`, `stats` (faults fired and requests seen), `close()`.

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
        self.api = BoardApi(board, self._render, self._render_all)
        self._stopping = threading.Event()
        self._injector = Injector(self.faults, wait=self._stopping.wait)

        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter(dict.fromkeys(REQUEST_STATS, 0))
        self._md5s: dict[int, str] = {}  # post id -> md5, for posts whose file has been rendered
        self._by_md5: dict[str, SynthPost] = {}  # visible posts only: hidden files are not served
        self._render_locks: dict[int, threading.Lock] = {}
        self._previews: dict[int, bytes] = {}
        self._connections: set[socket.socket] = set()
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
    def tags(self) -> list[Tag]:
        """The board's tags, ids ascending."""
        return self.api.tags

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests, api, files, and each fault fired (rate_limited, throttled, errors, slow, ...)."""
        with self._lock:
            requests = dict(self._requests)
        return requests | self._injector.counts

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Block until every post's file has been rendered (md5s ready); False on timeout."""
        return self._warmed.wait(timeout)

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
                    if not post.is_hidden:
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
        kind = "files" if _FILE_RE.fullmatch(urlsplit(target).path) else "api"
        with self._lock:
            self._requests["requests"] += 1
            self._requests[kind] += 1
        verdict = self._injector.decide(kind)
        if (refusal := _refusal(verdict)) is not None:
            return refusal
        try:
            response = self._route(target, self._base_url(host))
        except ApiError as e:
            response = _error(e)
        except Exception:
            log.exception("error answering %s", target)
            response = _error(ApiError(500, "InternalServerError", "The server failed to answer this request."))
        if verdict.truncate and not head and response.body:
            response.truncate = True
            self._injector.count("truncated")
        elif verdict.cut_json and not head and response.status == 200 and response.content_type == JSON_TYPE:
            response.body = response.body[: len(response.body) // 2]  # and Content-Length with it: a clean end
            self._injector.count("cut_json")
        return response

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
        api = self.api
        if path == "/posts.json":
            return _json(200, api.posts(params, base))
        if path == "/counts/posts.json":
            return _json(200, api.count(params))
        if path == "/tags.json":
            return _json(200, api.tags_json(params))
        if path == "/post.json":
            return _json(200, api.moebooru_posts(params, base))
        if path == "/tag.json":
            return _json(200, api.moebooru_tags(params))
        if path == "/index.php" and params.get("page") == "dapi":
            return _json(200, api.gelbooru(params, base))
        if m := _POST_RE.fullmatch(path):
            return _json(200, api.post(int(m[1]), base))
        if m := _FILE_RE.fullmatch(path):
            return self._file(*m.groups())
        raise not_found()

    def _file(self, kind: str, ab: str, cd: str, sample_prefix: str | None, md5: str, ext: str) -> Response:
        if ab != md5[:2] or cd != md5[2:4] or (sample_prefix is not None) != (kind == "sample"):
            raise not_found()
        post = self._find(md5)
        if post is None:
            raise not_found()
        if kind == "original":
            if ext != post.file_ext:
                raise not_found()
            return Response(200, self._injector.original(post.id, self.board.file(post)), CONTENT_TYPES[ext])
        if ext != "jpg":
            raise not_found()
        if kind == "sample":
            sample = self.board.sample(post)
            if sample is None:
                raise not_found()
            return Response(200, sample, CONTENT_TYPES["jpg"])
        preview = self._previews.get(post.id)
        if preview is None:  # previews are small and every gallery page asks for them again
            preview = self._previews[post.id] = self.board.preview(post)
        return Response(200, preview, CONTENT_TYPES["jpg"])


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
