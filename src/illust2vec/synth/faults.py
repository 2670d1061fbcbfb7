"""Faults the fake board injects (429 with Retry-After, 5xx, HTML with 200, slow answers, cut bodies, bad md5s),
deterministically."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from .board import unit

FAULT_PATHS = ("api", "files", "all")
RATES = ("slow_rate", "throttle_rate", "error_rate", "html_rate", "truncate_rate", "cut_json_rate", "bad_md5_rate")
# The counters of faults fired, in the order BoardServer.stats lists them after its request counters.
FAULT_STATS = ("rate_limited", "throttled", "errors", "slow", "truncated", "bad_md5", "html", "cut_json")
ERROR_STATUSES = (500, 502, 503)


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
    - html_rate (API requests only): status 200 with an HTML challenge page instead of JSON, as a board's
      front end (Cloudflare, a maintenance switch) answers now and then.
    - truncate_rate: the full Content-Length is sent, then half the body, then the connection is closed: the
      client's HTTP layer notices (a connection closed early).
    - cut_json_rate (API requests only, where truncate_rate did not fire): status 200 with the first half of
      the JSON body and a Content-Length to match, so the answer ends cleanly and only parsing the JSON notices.
    - bad_md5_rate: the fraction of posts whose original file is served with one byte changed, chosen by post
      id, so a retry gets the same bad bytes; it applies whatever `paths` says.
    """

    rate_limit: int = 0
    slow_rate: float = 0.0
    slow_seconds: float = 2.0
    throttle_rate: float = 0.0
    retry_after: int = 1
    error_rate: float = 0.0
    html_rate: float = 0.0
    truncate_rate: float = 0.0
    cut_json_rate: float = 0.0
    bad_md5_rate: float = 0.0
    paths: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in RATES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"Faults.{name} must be between 0 and 1, not {getattr(self, name)}")
        for name in ("rate_limit", "retry_after", "slow_seconds"):
            if getattr(self, name) < 0:
                raise UserError(f"Faults.{name} must not be negative, not {getattr(self, name)}")
        if self.paths not in FAULT_PATHS:
            raise UserError(f"Faults.paths must be one of {', '.join(FAULT_PATHS)}, not {self.paths!r}")

    def fires(self, fault: str, n: int) -> bool:
        """Whether `fault` ('slow', 'throttle', 'error', 'html', 'truncate' or 'cut_json') fires on the n-th selected
        request (html and cut_json then apply only if it is an API request)."""
        rate = getattr(self, f"{fault}_rate")
        return rate > 0 and unit(self.seed, fault, n) < rate

    def error_status(self, n: int) -> int:
        """The status the n-th selected request fails with, where the error fault fires on it."""
        return ERROR_STATUSES[int(unit(self.seed, "status", n) * len(ERROR_STATUSES))]

    def is_bad_md5(self, post_id: int) -> bool:
        """Whether this post's original file is served with bytes that do not match its md5."""
        return self.bad_md5_rate > 0 and unit(self.seed, "bad_md5", post_id) < self.bad_md5_rate

    def applies_to(self, kind: str) -> bool:
        return self.paths in ("all", kind)


@dataclass(frozen=True)
class Verdict:
    """What the faults decided for one request: refuse it (429, 5xx, an HTML page), or answer it, perhaps cut short."""

    retry_after: int | None = None  # answer 429 with this Retry-After instead
    error: int | None = None  # answer this 5xx status instead
    truncate: bool = False  # send the full Content-Length and half the body
    html: bool = False  # answer 200 with an HTML challenge page instead
    cut_json: bool = False  # send half of a JSON body, with a Content-Length to match


class Injector:
    """Applies one server's Faults to its requests, as they arrive, from any number of threads; counts what fires.

    `wait` is how a slow answer waits (a server passes its stop event's `wait`, so closing does not hang).
    """

    def __init__(self, faults: Faults, wait: Callable[[float], object] = time.sleep):
        self.faults = faults
        self._wait = wait
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter(dict.fromkeys(FAULT_STATS, 0))
        self._numbered = 0  # requests that faults apply to, so far
        self._accepted: deque[float] = deque()  # when recent requests passed the rate limit

    @property
    def counts(self) -> dict[str, int]:
        """How many times each fault fired (FAULT_STATS)."""
        with self._lock:
            return dict(self._counts)

    def count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def decide(self, kind: str) -> Verdict:
        """The request-level faults for the next request of `kind` ('api' or 'files'); a slow one waits here."""
        faults = self.faults
        if not faults.applies_to(kind):
            return Verdict()
        with self._lock:
            if faults.rate_limit:
                now = time.monotonic()
                while self._accepted and self._accepted[0] <= now - 1.0:
                    self._accepted.popleft()
                if len(self._accepted) >= faults.rate_limit:
                    self._counts["rate_limited"] += 1
                    return Verdict(retry_after=max(1, math.ceil(self._accepted[0] + 1.0 - now)))
                self._accepted.append(now)
            self._numbered += 1
            n = self._numbered
        if faults.fires("slow", n):
            self.count("slow")
            self._wait(faults.slow_seconds)
        if faults.fires("throttle", n):
            self.count("throttled")
            return Verdict(retry_after=faults.retry_after)
        if faults.fires("error", n):
            self.count("errors")
            return Verdict(error=faults.error_status(n))
        api = kind == "api"
        if api and faults.fires("html", n):
            self.count("html")
            return Verdict(html=True)
        truncate = faults.fires("truncate", n)
        return Verdict(truncate=truncate, cut_json=api and not truncate and faults.fires("cut_json", n))

    def original(self, post_id: int, data: bytes) -> bytes:
        """The bytes to serve as a post's original file: `data`, or `data` with one byte changed (bad_md5)."""
        if not self.faults.is_bad_md5(post_id):
            return data
        self.count("bad_md5")
        return corrupt(data)


def corrupt(data: bytes) -> bytes:
    """One byte flipped in the middle: the same length, so only a client that checks the md5 notices."""
    if not data:
        return data
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    return bytes(bad)
