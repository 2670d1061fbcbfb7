"""Listing a board's posts: paging its API by id range, newest first, and looking up the categories of flat tags.

Like gallery-dl's Danbooru extractor, pages go by id (`id:low..below-1`, newest first) and a short page ends a
range. With a state, the ranges and a cursor are saved, so a resumed crawl lists on from where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from ..errors import UserError
from .client import Client, GaveUp, NotJson
from .sites import (
    Auth,
    Post,
    Site,
    auth_params,
    flat_tags,
    page_request,
    parse_page,
    parse_tags,
    post_record,
    tag_requests,
    to_post,
)
from .state import State

BLOCK = 100_000  # id block size for interleaved shards when no --ids range is given
TOP = 10**12  # "below" bound that includes every post


def shard_ranges(lo: int, hi: int, shard: tuple[int, int], contiguous: bool) -> list[tuple[int, int]]:
    """The inclusive id ranges of part I of N of [lo, hi], newest first.

    With an explicit range the parts are contiguous; without one the board keeps growing, so the ids are cut
    into fixed blocks of BLOCK ids dealt out round-robin: every crawler computes the same parts whenever it starts.
    """
    i, n = shard
    if contiguous:
        size = math.ceil((hi - lo + 1) / n)
        a, b = lo + i * size, min(hi, lo + (i + 1) * size - 1)
        return [(a, b)] if a <= b else []
    ranges = []
    for k in range(lo // BLOCK, hi // BLOCK + 1):
        if k % n == i:
            a, b = max(lo, k * BLOCK), min(hi, (k + 1) * BLOCK - 1)
            if a <= b:
                ranges.append((a, b))
    return ranges[::-1]


class Lister:
    """Pages through one board's posts matching a query; tag categories are kept in `state` when there is one."""

    def __init__(self, site: Site, url: str, query: str, auth: Auth | None, state: State | None = None):
        self.site, self.base, self.query, self.auth, self.state = site, url.rstrip("/"), query, auth, state
        self.tag_cache: dict[str, int] = {}
        self.answered = False  # whether the board has answered JSON in this run: then a non-JSON answer is a fault

    async def api_json(self, client: Client, url: str, params: dict[str, str]):
        """The board's JSON answer; a UserError for no answer, an HTTP error, or an answer that is not JSON.

        The first answer of a run that is not JSON stops at once, as a wrong --site or --url most likely; after a
        JSON answer, one that is not (a challenge or maintenance page sent with status 200, JSON cut short) is a
        fault the client retries, and only one that persists stops the crawl, resumable, naming what was sent.
        """
        params = {**params, **auth_params(self.site, self.auth)}
        where = urlsplit(url)
        try:
            response, payload = await client.get_json(url, params=params, kind="api", retry_not_json=self.answered)
        except NotJson as e:
            raise UserError(
                f"{where.netloc}{where.path} did not answer JSON; is --site {self.site.name} right, and --url "
                f"the board's address? It sent {e}"
            ) from None
        except GaveUp as e:  # no answer after every retry: stop, with what is done kept, to resume later
            if e.not_json:
                raise UserError(
                    f"{where.netloc} still answered {where.path} with {e.reason} after {e.attempts} attempts; "
                    "run the same command to resume"
                ) from e
            raise UserError(
                f"{where.netloc} did not answer on {where.path}: {e}; run the same command to resume"
            ) from e
        if response.status_code >= 400:
            try:
                body = response.json()
                message = body.get("message") or body.get("reason") or response.text[:200]
            except (ValueError, AttributeError):
                message = response.text[:200]
            raise UserError(f"{where.netloc} answered HTTP {response.status_code} on {where.path}: {message}")
        self.answered = True
        return payload

    async def top_id(self, client: Client) -> int:
        """The newest post's id (0 on an empty board)."""
        url, params = page_request(self.site, self.base, low=1, below=TOP, query=self.query, limit=1)
        raws = parse_page(self.site, await self.api_json(client, url, params))
        return max((int(r["id"]) for r in raws), default=0)

    async def ranges(self, client: Client, ids: tuple[int, int] | None, shard: tuple[int, int]) -> list:
        """The id ranges this crawler lists: part of `ids` when given, else of the whole board up to its newest."""
        if ids:
            return shard_ranges(ids[0], ids[1], shard, contiguous=True)
        return shard_ranges(1, await self.top_id(client), shard, contiguous=False)

    async def categorise(self, client: Client, raws: list[dict]) -> dict[str, int]:
        """Categories of the tags on a page of a flat-tag site: from SQLite, else asked of the board once."""
        if not self.site.flat_tags:
            return {}
        names = sorted({t for r in raws for t in flat_tags(self.site, r)})
        known = self.state.categories(names) if self.state else dict(self.tag_cache)
        missing = [n for n in names if n not in known]
        if missing:
            found: dict[str, int] = {}
            for url, params in tag_requests(self.site, self.base, missing):
                found.update(parse_tags(self.site, await self.api_json(client, url, params), base_url=self.base))
            # Tags the board does not know are general (0), remembered so that nobody asks again. Where one request
            # answers every tag (Moebooru), keep the whole answer.
            found |= {n: 0 for n in missing if n not in found}
            if self.state:
                self.state.set_categories(found)
            self.tag_cache.update(found)
            known.update(found)
        return known

    async def pages(self, client: Client, ranges: list, start: dict) -> AsyncIterator[tuple[list[Post], dict]]:
        """Yield (posts, cursor) page by page, newest first, from the saved cursor on."""
        for index in range(start.get("range", 0), len(ranges)):
            low, high = ranges[index]
            below = start["below"] if index == start.get("range", 0) and "below" in start else high + 1
            while below > low:
                url, params = page_request(self.site, self.base, low=low, below=below, query=self.query)
                raws = parse_page(self.site, await self.api_json(client, url, params))
                categories = await self.categorise(client, raws)
                posts = [to_post(self.site, r, categories, base_url=self.base) for r in raws]
                posts = [p for p in posts if low <= p.id < below]
                if not posts:
                    break
                below = min(p.id for p in posts)
                yield posts, {"range": index, "below": below}
            yield [], {"range": index + 1}

    async def new_records(
        self, client: Client, ids: tuple[int, int] | None, shard: tuple[int, int], limit: int | None
    ) -> AsyncIterator[list[dict]]:
        """List into the state: yield the records of posts not seen before, page by page, each page recorded as
        pending with the cursor before it is yielded; at most `limit` posts in the state in all."""
        state = self.state
        ranges = state.get("ranges")
        if ranges is None:
            ranges = await self.ranges(client, ids, shard)
            state.set("ranges", ranges)
        start = state.get("cursor", {})
        if start.get("done"):
            return
        async for posts, cursor in self.pages(client, ranges, start):
            if limit is not None and len(posts) > limit - state.count():
                # Only part of the page fits: the cursor moves past the posts kept, not the whole page.
                posts = posts[: max(0, limit - state.count())]
                if not posts:
                    break
                cursor = {"range": cursor["range"], "below": min(p.id for p in posts)}
            yield state.add_posts([post_record(p, "pending") for p in posts], cursor)
            if limit is not None and state.count() >= limit:
                break
        else:
            state.set("cursor", {"done": True})
