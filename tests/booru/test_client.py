"""The crawler's HTTP client: 429 waits without spending attempts, back-off on failures, refusals stop."""

import asyncio
import random

import httpx
import pytest

from illust2vec.booru.client import (
    Client,
    ClientConfig,
    GaveUp,
    NotJson,
    RateLimiter,
    Refused,
    backoff_seconds,
    describe_not_json,
    retry_after_seconds,
)
from illust2vec.errors import UserError

FAST = ClientConfig(api_rate=0, file_rate=0, attempts=5, backoff=0.001, max_backoff=0.01)


def scripted(statuses: list[int], headers: dict | None = None):
    """A transport answering the given statuses in order (then 200), counting calls."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status = statuses[len(calls) - 1] if len(calls) <= len(statuses) else 200
        return httpx.Response(status, headers=headers if status == 429 else None, json={"n": len(calls)})

    return httpx.MockTransport(handler), calls


async def _get(transport, cfg=FAST, **kw):
    async with Client(cfg, transport=transport) as client:
        response = await client.get("http://board.test/posts.json", **kw)
        return response, client.stats


def test_retry_after_parses_seconds_and_dates():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None, default=3.0) == 3.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after_seconds("garbage", default=2.0) == 2.0


def test_backoff_grows_exponentially_with_jitter_and_a_ceiling():
    cfg = ClientConfig(backoff=1.0, max_backoff=60.0)
    rng = random.Random(0)
    waits = [backoff_seconds(a, cfg, rng) for a in range(1, 10)]
    for attempt, wait in enumerate(waits, start=1):
        base = min(60.0, 2 ** (attempt - 1))
        assert 0.5 * base <= wait < 1.5 * base


def test_429_waits_as_told_and_spends_no_attempt():
    transport, calls = scripted([429] * 7, headers={"Retry-After": "0"})
    response, stats = asyncio.run(_get(transport))
    assert response.status_code == 200 and len(calls) == 8  # 7 refusals > 5 attempts, yet it got through
    assert stats["rate_limited"] == 7 and stats["retries"] == 0


def test_5xx_retries_then_succeeds_or_gives_up():
    transport, calls = scripted([500, 502, 503])
    response, stats = asyncio.run(_get(transport))
    assert response.status_code == 200 and stats["retries"] == 3
    transport, calls = scripted([503] * 10)
    with pytest.raises(GaveUp, match="HTTP 503 after 5 attempts"):
        asyncio.run(_get(transport))
    assert len(calls) == 5


def test_connection_errors_and_timeouts_are_retried():
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("reset")
        if len(calls) == 2:
            raise httpx.ReadTimeout("slow")
        if len(calls) == 3:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        return httpx.Response(200, json={})

    response, stats = asyncio.run(_get(httpx.MockTransport(handler)))
    assert response.status_code == 200 and stats["retries"] == 3


CHALLENGE = b"<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>Checking</body></html>"
PAGE = b'[{"id":3,"tag_string":"a b"},{"id":2,"tag_string":"c"}]'


def answering(bodies: list[tuple[bytes, str]]):
    """A transport answering 200 with the given (body, Content-Type) in order, then the JSON page; counts calls."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        body, kind = bodies[len(calls) - 1] if len(calls) <= len(bodies) else (PAGE, "application/json")
        return httpx.Response(200, content=body, headers={"Content-Type": kind})

    return httpx.MockTransport(handler), calls


async def _get_json(transport, cfg=FAST, **kw):
    async with Client(cfg, transport=transport) as client:
        response, payload = await client.get_json("http://board.test/posts.json", **kw)
        return payload, client.stats


def test_answers_that_are_not_json_are_retried_like_a_5xx():
    html = (CHALLENGE, "text/html; charset=utf-8")
    cut = (PAGE[: len(PAGE) // 2], "application/json; charset=utf-8")
    transport, calls = answering([html, cut, html])
    payload, stats = asyncio.run(_get_json(transport))
    assert payload == [{"id": 3, "tag_string": "a b"}, {"id": 2, "tag_string": "c"}] and len(calls) == 4
    assert stats["retries"] == 3 and stats["not_json"] == 3
    # A plain GET leaves the body to its caller, as before.
    transport, calls = answering([html])
    response, _ = asyncio.run(_get(transport))
    assert response.content == CHALLENGE and len(calls) == 1


def test_persistent_answers_that_are_not_json_give_up_saying_what_was_sent():
    transport, calls = answering([(CHALLENGE, "text/html")] * 10)
    with pytest.raises(GaveUp) as e:
        asyncio.run(_get_json(transport))
    assert len(calls) == FAST.attempts and e.value.not_json and e.value.attempts == FAST.attempts
    assert e.value.reason == "an HTML page titled 'Just a moment...' (a challenge or maintenance page?)"
    transport, calls = scripted([503] * 10)  # a fault of another kind is not called one
    with pytest.raises(GaveUp) as e:
        asyncio.run(_get_json(transport))
    assert not e.value.not_json and e.value.reason == "HTTP 503"


def test_not_json_is_raised_at_once_when_asked():
    transport, calls = answering([(CHALLENGE, "text/html")])
    with pytest.raises(NotJson, match="an HTML page titled 'Just a moment...'"):
        asyncio.run(_get_json(transport, retry_not_json=False))
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("body", "kind", "said"),
    [
        (CHALLENGE, "text/html", "an HTML page titled 'Just a moment...' (a challenge or maintenance page?)"),
        (b"  <html><body>Down for maintenance</body></html>", "text/plain", "an HTML page (a challenge"),
        (PAGE[:20], "application/json", "JSON cut short (20 bytes)"),
        (b'{"message": "a \\" [ brace', "application/json", "JSON cut short (25 bytes)"),
        (b'[{"id": 1}]]', "application/json", "malformed JSON (12 bytes)"),
        (b"", "application/json", "an empty answer"),
        (b"Service ok", "text/plain", "an answer that is not JSON (text/plain, 10 bytes)"),
    ],
)
def test_what_an_answer_that_is_not_json_holds(body, kind, said):
    assert describe_not_json(httpx.Response(200, content=body, headers={"Content-Type": kind})).startswith(said)


def test_persistent_403_is_a_refusal_and_404_is_returned():
    transport, calls = scripted([403] * 10)
    with pytest.raises(Refused, match="refuses us"):
        asyncio.run(_get(transport))
    assert len(calls) == FAST.forbidden_attempts
    transport, _ = scripted([404])
    response, _ = asyncio.run(_get(transport))
    assert response.status_code == 404


def test_credentials_in_params_never_reach_the_log(caplog):
    transport, _ = scripted([500, 500])
    with caplog.at_level("DEBUG"):
        asyncio.run(_get(transport, params={"api_key": "SECRET123"}))
    assert "SECRET123" not in caplog.text


def test_rate_limiter_spaces_requests():
    async def go():
        limiter = RateLimiter(rate=50.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(6):
            await limiter.wait()
        return loop.time() - t0

    assert asyncio.run(go()) >= 5 / 50.0 * 0.9  # 6 requests need at least 5 intervals


@pytest.mark.parametrize("field, value", [("api_rate", -1), ("connections", 0), ("attempts", 1.5), ("timeout", 0)])
def test_client_config_checks_itself(field, value):
    with pytest.raises(UserError, match=f"ClientConfig.{field} must be"):
        ClientConfig(**{field: value})
