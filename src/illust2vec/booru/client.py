"""The one HTTP client of the crawler: request rates, retries, back-off, 429 handling and refusals live here."""

from __future__ import annotations

import asyncio
import email.utils
import html
import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from .. import __version__
from ..errors import UserError

log = logging.getLogger(__name__)
# httpx logs every URL at INFO; URLs can carry credentials (Gelbooru, Moebooru), so keep it quiet.
logging.getLogger("httpx").setLevel(logging.WARNING)

USER_AGENT = f"illust2vec/{__version__} (dataset crawler; https://pypi.org/project/illust2vec/)"
POOL_SIZE = 4  # connections per httpx pool
TRANSIENT_STATUS = {408, 425, 500, 502, 503, 504, 520, 521, 522, 523, 524}  # 52x: Cloudflare's origin errors


class Refused(UserError):
    """The board persistently refuses us (403/401): stop the crawl instead of hammering it."""


class GaveUp(Exception):
    """A request still failed after every attempt; `reason` says why the last one did (status, timeout, reset, or
    what a 2xx answer that is not JSON held), `attempts` how many were made, `not_json` whether it was that."""

    def __init__(self, reason: str, attempts: int, not_json: bool = False):
        super().__init__(f"{reason} after {attempts} attempts")
        self.reason, self.attempts, self.not_json = reason, attempts, not_json


class NotJson(Exception):
    """A 2xx answer whose body is not JSON, where the caller asked not to retry it; the message says what it was."""


_TITLE_RE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


def _unclosed(text: str) -> bool:
    """Whether JSON text ends inside a string or with brackets still open: a body cut short."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return in_string or depth > 0


def describe_not_json(response: httpx.Response) -> str:
    """What a 2xx answer that is not JSON holds, in a few words: an HTML page (with its title), JSON cut short
    (N bytes), malformed JSON, an empty answer, or something else, named by its Content-Type."""
    body = response.content
    size = len(body)
    head = body[:1024].lstrip().lower()
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip() or "no Content-Type"
    if not body.strip():
        return "an empty answer"
    if "html" in content_type or head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        m = _TITLE_RE.search(body[:65536])
        title = " ".join(html.unescape(m[1].decode("utf-8", "replace")).split())[:80] if m else ""
        named = f" titled {title!r}" if title else ""
        return f"an HTML page{named} (a challenge or maintenance page?)"
    if head.startswith((b"{", b"[")):
        text = body.decode("utf-8", "replace")
        if _unclosed(text):
            return f"JSON cut short ({size} bytes)"
        return f"malformed JSON ({size} bytes)"
    return f"an answer that is not JSON ({content_type}, {size} bytes)"


@dataclass(frozen=True)
class ClientConfig:
    """HTTP policy: one instance for the whole crawl."""

    api_rate: float = 1.0  # requests per second to the API; 0: no limit
    file_rate: float = 4.0  # requests per second for files; 0: no limit
    connections: int = 32  # open connections at most (keep-alive pool)
    attempts: int = 6  # tries for 5xx, timeouts, resets, truncated bodies, JSON asked but not sent (not 429)
    backoff: float = 1.0  # first wait before a retry, doubled each time, with jitter
    max_backoff: float = 60.0
    max_retry_after: float = 900.0  # longest single wait a 429 may ask for
    forbidden_attempts: int = 3  # a 403 this many times in a row is a refusal, not a hiccup
    timeout: float = 60.0
    user_agent: str = USER_AGENT

    def __post_init__(self) -> None:
        if not (type(self.timeout) in (int, float) and self.timeout > 0):
            raise UserError(f"ClientConfig.timeout must be a number greater than 0, not {self.timeout!r}")
        for name in ("connections", "attempts", "forbidden_attempts"):
            value = getattr(self, name)
            if not (type(value) is int and value >= 1):
                raise UserError(f"ClientConfig.{name} must be a whole number at least 1, not {value!r}")
        for name in ("api_rate", "file_rate", "backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not (type(value) in (int, float) and value >= 0):
                raise UserError(f"ClientConfig.{name} must be a number at least 0, not {value!r}")


class RateLimiter:
    """Spaces requests to at most `rate` per second (no bursts: Cloudflare blocks them); pausable after a 429."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        """Hold every request of this kind for `seconds`, as a 429's Retry-After asks of the whole client."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next, self._paused_until)
            self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


def retry_after_seconds(value: str | None, default: float = 5.0) -> float:
    """Seconds a Retry-After header asks for: a number of seconds or an HTTP date."""
    if not value:
        return default
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return default


_rng = random.Random()


def backoff_seconds(attempt: int, cfg: ClientConfig, rng: random.Random = _rng) -> float:
    """Exponential back-off with jitter before retry number `attempt` (1-based): base * 2**(attempt-1) * [0.5, 1.5)."""
    return min(cfg.max_backoff, cfg.backoff * 2 ** (attempt - 1)) * (0.5 + rng.random())


class Client:
    """Async HTTP client with one policy for the API and for files; counts what happened in `stats`."""

    def __init__(self, cfg: ClientConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.cfg = cfg
        self.stats: Counter[str] = Counter()
        self.limiters = {"api": RateLimiter(cfg.api_rate), "file": RateLimiter(cfg.file_rate)}
        # Several small connection pools instead of one big one: httpcore scans its whole pool for every request,
        # which at 32 connections cost more CPU than the downloads themselves (measured with py-spy).
        pools = max(1, -(-cfg.connections // POOL_SIZE))
        self._pools = [
            httpx.AsyncClient(
                headers={"User-Agent": cfg.user_agent},
                timeout=httpx.Timeout(cfg.timeout, connect=min(30.0, cfg.timeout)),
                limits=httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE),
                follow_redirects=True,
                transport=transport,
            )
            for _ in range(pools)
        ]
        self._next_pool = 0

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        for pool in self._pools:
            await pool.aclose()

    async def get(self, url: str, params: dict[str, str] | None = None, kind: str = "api") -> httpx.Response:
        """GET with the policy: rate limit, 429 waits, retries with back-off; raises GaveUp or Refused.

        Answers other than 2xx that retrying cannot fix (404, 410, 422, ...) are returned for the caller to judge.
        """
        response, _ = await self._get(url, params, kind, want_json=False, retry_not_json=False)
        return response

    async def get_json(
        self, url: str, params: dict[str, str] | None = None, kind: str = "api", retry_not_json: bool = True
    ) -> tuple[httpx.Response, Any]:
        """GET a JSON answer with the same policy: (response, payload); payload is None for an answer of 400 or
        more that retrying cannot fix, returned for the caller to judge.

        A 2xx whose body is not JSON (a challenge or maintenance page sent with status 200, JSON cut short) is a
        transient fault: it is retried like a 5xx, and when it persists GaveUp says what the board sent
        (`not_json`). With `retry_not_json=False` it raises NotJson at once instead: a caller's first answer that
        is not JSON says more about the address asked than about the board's health.
        """
        return await self._get(url, params, kind, want_json=True, retry_not_json=retry_not_json)

    async def _send(self, url: str, params: dict[str, str] | None) -> tuple[httpx.Response | None, str | None]:
        """One request on the next pool: (response, None), or (None, why there was no answer)."""
        self.stats["requests"] += 1
        http = self._pools[self._next_pool]
        self._next_pool = (self._next_pool + 1) % len(self._pools)
        try:
            response = await http.get(url, params=params)
        except httpx.TimeoutException:
            return None, "timeout"
        except httpx.RemoteProtocolError:
            return None, "connection closed early (truncated body)"
        except httpx.TransportError as e:
            return None, f"connection error ({type(e).__name__})"
        self.stats["bytes"] += len(response.content)
        return response, None

    async def _get(
        self, url: str, params: dict[str, str] | None, kind: str, want_json: bool, retry_not_json: bool
    ) -> tuple[httpx.Response, Any]:
        where = httpx.URL(url).copy_with(query=None)  # never log query strings: they may hold credentials
        attempt, forbidden = 0, 0
        limiter = self.limiters[kind]
        while True:
            await limiter.wait()
            response, reason = await self._send(url, params)
            not_json = False
            if response is not None:
                status = response.status_code
                if status < 400:
                    if not want_json:
                        return response, None
                    try:
                        return response, response.json()
                    except ValueError:
                        reason, not_json = describe_not_json(response), True
                    if not retry_not_json:
                        raise NotJson(reason)
                    self.stats["not_json"] += 1
                elif status == 429:
                    wait = min(self.cfg.max_retry_after, retry_after_seconds(response.headers.get("Retry-After")))
                    self.stats["rate_limited"] += 1
                    log.info("429 from %s: waiting %.1f s as Retry-After asks", where.host, wait)
                    limiter.pause(wait)
                    continue  # a 429 is the board pacing us, not a failure: no attempt is spent
                elif status in (401, 403):
                    forbidden += 1
                    if status == 401 or forbidden >= self.cfg.forbidden_attempts:
                        raise Refused(
                            f"{where.host} refuses us (HTTP {status} on {where.path}): check --login/--api-key, "
                            "the User-Agent, or lower the request rate; the board may also block this network"
                        )
                    reason = f"HTTP {status}"
                elif status in TRANSIENT_STATUS:
                    reason = f"HTTP {status}"
                else:
                    return response, None
            attempt += 1
            self.stats["retries"] += 1
            if attempt >= self.cfg.attempts:
                self.stats["gave_up"] += 1
                raise GaveUp(reason or "no answer", attempt, not_json)
            wait = backoff_seconds(attempt, self.cfg)
            log.debug("%s on %s%s: retry %d in %.1f s", reason, where.host, where.path, attempt, wait)
            await asyncio.sleep(wait)
