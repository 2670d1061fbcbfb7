"""`i2v crawl`: list a board's posts by id range, download and verify their files, write Parquet and tar shards.

Loss-free by construction: SQLite (`crawl.sqlite`) holds every post listed and the listing cursor. Finished posts
are written in batches: the tar shard and the Parquet part are written under temporary names, renamed, and only
then recorded in SQLite in one transaction. On start, anything on disk that SQLite does not record is the residue
of a killed run and is removed; its posts are still pending and are fetched again. So a run killed at any moment
and run again ends with every post once in the Parquet and every image once in the shards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import UserError, is_disk_full
from ..formats.shards import ShardWriter, sample_json
from ..util.cores import cores
from ..util.images import BadImage, Stored, shrink
from .client import USER_AGENT, Client, ClientConfig
from .download import DownloadFailed, fetch_verified
from .posts import STATUSES, post_record, record_from_json, record_to_json, write_posts
from .sites import (
    IMAGE_EXTS,
    SITES,
    Auth,
    Post,
    Site,
    auth_params,
    flat_tags,
    page_request,
    parse_page,
    parse_tags,
    tag_requests,
    to_post,
)

log = logging.getLogger(__name__)

BLOCK = 100_000  # id block size for interleaved shards when no --ids range is given
TOP = 10**12  # "below" bound that includes every post


class DiskFull(UserError):
    """The disk filled up: the crawl stopped cleanly and resumes once there is room."""


@dataclass(frozen=True)
class CrawlConfig:
    """What to crawl and how; saved as crawl-config.json beside the output (credentials never are)."""

    url: str
    out: Path
    site: str = "danbooru"
    tags: str = ""
    ids: tuple[int, int] | None = None  # inclusive range
    shard: tuple[int, int] = (0, 1)  # (I, N): this crawler takes part I of N, 0 <= I < N
    limit: int | None = None  # posts to list at most
    concurrency: int = 16  # downloads in flight
    api_rate: float | None = None  # requests/s; None takes the site's default
    file_rate: float | None = None
    image_size: int | None = None  # longer side to resize to; None keeps the original
    user_agent: str = USER_AGENT
    keep_non_images: bool = False  # store zip/mp4/... files too (as is)
    shard_size: int = 1000  # images per tar shard
    flush_seconds: float = 60.0  # finished posts reach disk at least this often
    attempts: int = 6
    backoff: float = 1.0  # first retry wait in seconds (doubles each time)
    decoders: int | None = None  # decoding and resizing threads; None: one per core
    dry_run: bool = False

    def identity(self) -> dict:
        """The fields that define the crawl: a directory holds one crawl, resumed only with the same ones."""
        return {
            "url": self.url,
            "site": self.site,
            "tags": self.tags,
            "ids": list(self.ids) if self.ids else None,
            "shard": list(self.shard),
            "image_size": self.image_size,
            "keep_non_images": self.keep_non_images,
        }

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass
class CrawlSummary:
    """Counts by status over the whole crawl directory, and what this run did."""

    statuses: dict[str, int]
    listed: int = 0
    images: int = 0
    bytes: int = 0
    seconds: float = 0.0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.statuses.get("failed", 0)


def parse_ids(text: str) -> tuple[int, int]:
    """`A..B` (both ends included) -> (A, B)."""
    try:
        a, b = (int(x) for x in text.split(".."))
    except ValueError:
        raise UserError(f"--ids takes A..B with integers, e.g. 1..5000, not {text!r}") from None
    if not 0 < a <= b:
        raise UserError(f"--ids {text}: need 0 < A <= B")
    return a, b


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N) with 0 <= I < N (job-array task ids start at 0)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes I/N, e.g. 0/10, not {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= I < N")
    return i, n


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


class State:
    """The crawl's memory in SQLite: config, listing cursor, every post and its status, committed files."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS posts(id INTEGER PRIMARY KEY, record TEXT NOT NULL, status TEXT NOT NULL,
                reason TEXT NOT NULL DEFAULT '', part TEXT, shard TEXT);
            CREATE INDEX IF NOT EXISTS posts_status ON posts(status);
            CREATE TABLE IF NOT EXISTS files(name TEXT PRIMARY KEY, count INTEGER NOT NULL, bytes INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS tags(name TEXT PRIMARY KEY, category INTEGER NOT NULL);
            """
        )

    def close(self) -> None:
        self.db.close()

    def get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def add_posts(self, records: list[dict], cursor: dict) -> list[dict]:
        """Record listed posts as pending and move the cursor, in one transaction; returns the new ones."""
        new = []
        with self.db:
            self.db.execute("BEGIN")
            for r in records:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO posts(id, record, status) VALUES (?, ?, 'pending')",
                    (r["id"], json.dumps(record_to_json(r))),
                )
                if cur.rowcount:
                    new.append(r)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (json.dumps(cursor),))
        return new

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM posts").fetchone()[0]

    def pending(self) -> list[dict]:
        rows = self.db.execute("SELECT record FROM posts WHERE status='pending' ORDER BY id DESC").fetchall()
        return [record_from_json(json.loads(r[0])) for r in rows]

    def retry_failed(self) -> int:
        return self.db.execute("UPDATE posts SET status='pending', reason='' WHERE status='failed'").rowcount

    def mark_failed(self, post_id: int, reason: str) -> None:
        self.db.execute("UPDATE posts SET status='failed', reason=? WHERE id=?", (reason, post_id))

    def failed_records(self) -> list[dict]:
        rows = self.db.execute("SELECT record, reason FROM posts WHERE status='failed' ORDER BY id").fetchall()
        return [{**record_from_json(json.loads(r)), "status": "failed", "reason": reason} for r, reason in rows]

    def commit(self, rows: list[dict], files: list[tuple[str, int, int]]) -> None:
        """Mark finished posts and record the files that hold them, in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE posts SET status=?, reason=?, part=?, shard=? WHERE id=?",
                [(r["status"], r["reason"], r["part"], r["shard"], r["id"]) for r in rows],
            )
            self.db.executemany("INSERT INTO files VALUES (?, ?, ?)", files)

    def files(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM files")}

    def next_index(self, prefix: str) -> int:
        names = [n for n in self.files() if n.startswith(prefix + "/")]
        return 1 + max((int(Path(n).name.split(".")[0]) for n in names), default=-1)

    def statuses(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self.db.execute("SELECT status, COUNT(*) FROM posts GROUP BY status"):
            counts[status] = n
        return counts

    def categories(self, names: list[str]) -> dict[str, int]:
        out = {}
        for i in range(0, len(names), 500):
            chunk = names[i : i + 500]
            q = f"SELECT name, category FROM tags WHERE name IN ({','.join('?' * len(chunk))})"
            out.update(dict(self.db.execute(q, chunk).fetchall()))
        return out

    def set_categories(self, categories: dict[str, int]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO tags VALUES (?, ?)", categories.items())


def recover(out: Path, state: State) -> int:
    """Remove what a killed run left half-done: temporary files, and renamed files never recorded as committed."""
    known = state.files()
    removed = 0
    for pattern in ("images/*.tmp", "posts/*.tmp", "images/*.tar", "posts/[0-9]*.parquet"):
        for path in out.glob(pattern):
            if path.suffix == ".tmp" or path.relative_to(out).as_posix() not in known:
                log.warning("removing %s, left by an interrupted run; its posts will be fetched again", path)
                path.unlink()
                removed += 1
    return removed


class Batcher:
    """Collects finished posts; writes their images' shard and their Parquet part, then commits both."""

    def __init__(self, out: Path, state: State, shard_size: int, flush_seconds: float):
        self.out, self.state = out, state
        (out / "posts").mkdir(parents=True, exist_ok=True)
        self.shards = ShardWriter(out, "images/{index:06d}.tar", first_index=state.next_index("images"))
        self.part = state.next_index("posts")
        self.rows: list[dict] = []
        self.shard_size, self.flush_seconds = shard_size, flush_seconds
        self.last_flush = time.monotonic()

    def add(self, record: dict, status: str, reason: str = "", stored: Stored | None = None) -> None:
        record = {**record, "status": status, "reason": reason, "shard": None}
        if stored is not None:
            meta = {
                **record_to_json(record),
                "stored_ext": stored.ext,
                "stored_width": stored.stored_width,
                "stored_height": stored.stored_height,
            }
            meta["shard"] = self.shards.name
            self.shards.add(record["md5"], {stored.ext: stored.data, "json": sample_json(meta)})
            record["shard"] = self.shards.name
        self.rows.append(record)
        if self.shards.count >= self.shard_size:
            self.flush()

    def due(self) -> bool:
        return bool(self.rows) and time.monotonic() - self.last_flush >= self.flush_seconds

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        files = []
        shard = self.shards.close()
        if shard is not None:
            files.append((shard.name, shard.count, shard.bytes))
        part = f"posts/{self.part:06d}.parquet"
        write_posts(self.out / part, self.rows)
        files.append((part, len(self.rows), (self.out / part).stat().st_size))
        self.state.commit([{**r, "part": part} for r in self.rows], files)
        self.part += 1
        self.rows = []

    def abort(self) -> None:
        self.shards.abort()
        self.rows = []


class _Run:
    """One run of the crawl: the lister, the download workers and the batcher, sharing a client and a pool."""

    def __init__(self, cfg: CrawlConfig, site: Site, state: State, auth: Auth | None, progress: Progress | None):
        self.cfg, self.site, self.state, self.auth = cfg, site, state, auth
        self.base = cfg.url.rstrip("/")
        self.progress = progress
        self.stats: Counter[str] = Counter()
        self.failures: list[str] = []
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.concurrency * 4)
        self.t0 = time.monotonic()
        self.tag_cache: dict[str, int] = {}
        self._shown = 0.0

    # Listing

    async def api_json(self, client: Client, url: str, params: dict[str, str]):
        params = {**params, **auth_params(self.site, self.auth)}
        response = await client.get(url, params=params, kind="api")
        where = urlsplit(url)
        if response.status_code >= 400:
            try:
                body = response.json()
                message = body.get("message") or body.get("reason") or response.text[:200]
            except (ValueError, AttributeError):
                message = response.text[:200]
            raise UserError(f"{where.netloc} answered HTTP {response.status_code} on {where.path}: {message}")
        try:
            return response.json()
        except ValueError:
            raise UserError(
                f"{where.netloc}{where.path} did not answer JSON; is --site {self.cfg.site} right?"
            ) from None

    async def top_id(self, client: Client) -> int:
        url, params = page_request(self.site, self.base, low=1, below=TOP, query=self.cfg.tags, limit=1)
        raws = parse_page(self.site, await self.api_json(client, url, params))
        return max((int(r["id"]) for r in raws), default=0)

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

    async def pages(self, client: Client, ranges: list[tuple[int, int]], start: dict):
        """Yield (posts, cursor) page by page, newest first, from the saved cursor on."""
        for index in range(start.get("range", 0), len(ranges)):
            low, high = ranges[index]
            below = start["below"] if index == start.get("range", 0) and "below" in start else high + 1
            while below > low:
                url, params = page_request(self.site, self.base, low=low, below=below, query=self.cfg.tags)
                raws = parse_page(self.site, await self.api_json(client, url, params))
                categories = await self.categorise(client, raws)
                posts = [to_post(self.site, r, categories, base_url=self.base) for r in raws]
                posts = [p for p in posts if low <= p.id < below]
                if not posts:
                    break
                below = min(p.id for p in posts)
                yield posts, {"range": index, "below": below}
            yield [], {"range": index + 1}

    async def lister(self, client: Client) -> None:
        cfg = self.cfg
        ranges = self.state.get("ranges")
        if ranges is None:
            if cfg.ids:
                lo, hi, contiguous = cfg.ids[0], cfg.ids[1], True
            else:
                lo, hi, contiguous = 1, await self.top_id(client), False
            ranges = shard_ranges(lo, hi, cfg.shard, contiguous)
            self.state.set("ranges", ranges)
        start = self.state.get("cursor", {})
        if start.get("done"):
            return
        async for posts, cursor in self.pages(client, ranges, start):
            if cfg.limit is not None and len(posts) > cfg.limit - self.state.count():
                # Only part of the page fits: the cursor moves past the posts kept, not the whole page.
                posts = posts[: max(0, cfg.limit - self.state.count())]
                if not posts:
                    break
                cursor = {"range": cursor["range"], "below": min(p.id for p in posts)}
            new = self.state.add_posts([post_record(p, "pending") for p in posts], cursor)
            self.stats["listed"] += len(new)
            self.advance("listed", len(new))
            for record in new:
                await self.route(record)
            if cfg.limit is not None and self.state.count() >= cfg.limit:
                break
        else:
            self.state.set("cursor", {"done": True})

    # Downloading

    async def route(self, record: dict) -> None:
        """Posts without a file, or not an image, are finished at once; the rest queue for download."""
        if not (record["md5"] and record["file_url"]):
            self.finish(record, "no_file", "the board shows no file (deleted, banned or restricted)")
        elif record["file_ext"] not in IMAGE_EXTS and not self.cfg.keep_non_images:
            self.finish(record, "not_image", f"{record['file_ext'] or 'unknown'} file")
        else:
            await self.queue.put(record)

    def finish(self, record: dict, status: str, reason: str = "", stored: Stored | None = None) -> None:
        self.batcher.add(record, status, reason, stored)
        self.advance("done", 1)

    def fail(self, record: dict, reason: str) -> None:
        self.state.mark_failed(record["id"], reason)
        self.failures.append(f"post {record['id']}: {reason}")
        self.stats["failed"] += 1
        log.debug("post %s failed: %s", record["id"], reason)
        self.advance("done", 1)

    async def worker(self, client: Client, pool: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while (record := await self.queue.get()) is not None:
            try:
                data = await fetch_verified(client, record["file_url"], record["md5"], self.cfg.attempts)
            except DownloadFailed as e:
                self.fail(record, str(e))
                continue
            if record["file_ext"] not in IMAGE_EXTS:  # kept non-image: stored as is
                stored = Stored(data, record["file_ext"], record["width"], record["height"], 0, 0)
            else:
                try:
                    stored = await loop.run_in_executor(pool, shrink, data, self.cfg.image_size)
                except BadImage as e:
                    self.fail(record, str(e))
                    continue
                except Exception as e:  # noqa: BLE001 (a broken file may make the decoder raise anything)
                    self.fail(record, f"cannot decode ({type(e).__name__}: {e})")
                    continue
            self.stats["images"] += 1
            self.stats["bytes"] += len(data)
            self.finish(record, "ok", "", stored)

    async def produce(self, client: Client, resumed: list[dict], workers: int) -> None:
        """Queue the posts a previous run left pending, then list the rest; a None per worker ends the run."""
        for record in resumed:
            await self.route(record)
        await self.lister(client)
        for _ in range(workers):
            await self.queue.put(None)

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.batcher.due():
                self.batcher.flush()
            self.advance("done", 0)

    def advance(self, what: str, n: int) -> None:
        if self.progress is None:
            return
        self.progress.advance(self.tasks[what], n)
        self.stats[f"progress_{what}"] += n
        now = time.monotonic()
        if now - self._shown < 0.25:  # the figures change slowly; formatting them per post costs real CPU
            return
        self._shown = now
        self.progress.update(self.tasks["done"], total=self.stats["listed"] + self.resumed)
        dt = max(1e-6, now - self.t0)
        info = (
            f"{self.stats['progress_done'] / dt:5.1f} posts/s  {self.stats['images'] / dt:5.1f} img/s  "
            f"{self.stats['bytes'] / dt / 1e6:5.1f} MB/s  {self.stats['failed']} failed"
        )
        self.progress.update(self.tasks["done"], info=info)

    async def run(self) -> None:
        cfg = self.cfg
        ccfg = ClientConfig(
            api_rate=cfg.api_rate or self.site.api_rate,
            file_rate=cfg.file_rate or self.site.file_rate,
            connections=max(4, cfg.concurrency + 2),
            attempts=cfg.attempts,
            backoff=cfg.backoff,
            user_agent=cfg.user_agent,
        )
        self.batcher = Batcher(cfg.out, self.state, cfg.shard_size, cfg.flush_seconds)
        self.state.retry_failed()
        resumed = self.state.pending()
        self.resumed = len(resumed)
        if self.progress is not None:
            self.tasks = {
                "listed": self.progress.add_task("listing posts", total=None, info=""),
                "done": self.progress.add_task("fetching files", total=len(resumed), info=""),
            }
        # Threads, not processes: Pillow releases the GIL while it decodes, resizes and encodes, so threads use
        # every core without copying each file between processes or leaving orphans when the crawl is killed.
        pool = ThreadPoolExecutor(cfg.decoders or cores(), thread_name_prefix="decode")
        try:
            async with Client(ccfg) as client:
                workers = [asyncio.create_task(self.worker(client, pool)) for _ in range(cfg.concurrency)]
                producer = asyncio.create_task(self.produce(client, resumed, len(workers)))
                ticker = asyncio.create_task(self.ticker())
                tasks = [producer, *workers]
                try:
                    # Fail fast: a refusal in any task must not leave the others waiting on a full queue.
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                    for task in done:
                        if task.exception() is not None:
                            raise task.exception()
                finally:
                    for task in (*tasks, ticker):
                        task.cancel()
                    await asyncio.gather(*tasks, ticker, return_exceptions=True)
                    self.stats.update({k: client.stats[k] for k in ("requests", "retries", "rate_limited")})
            self.batcher.flush()
            self._shown = 0.0
            self.advance("done", 0)  # the final figures
        except BaseException as e:
            if is_disk_full(e):
                self.batcher.abort()
                raise DiskFull(
                    f"the disk under {cfg.out} is full ({e}); free some space and run the same command to resume"
                ) from e
            # Anything else (a refusal, Ctrl-C): keep what is finished, then stop.
            try:
                self.batcher.flush()
            except Exception as flush_error:  # noqa: BLE001 (the original error is the one to report)
                log.warning("could not save the last batch (%s); it will be fetched again", flush_error)
                self.batcher.abort()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


async def _dry_run(cfg: CrawlConfig, site: Site, auth: Auth | None) -> dict:
    run = _Run(cfg, site, None, auth, None)
    counts: Counter[str] = Counter()
    ccfg = ClientConfig(api_rate=cfg.api_rate or site.api_rate, user_agent=cfg.user_agent, attempts=cfg.attempts)
    async with Client(ccfg) as client:
        if cfg.ids:
            ranges = shard_ranges(cfg.ids[0], cfg.ids[1], cfg.shard, True)
        else:
            ranges = shard_ranges(1, await run.top_id(client), cfg.shard, False)
        async for posts, _ in run.pages(client, ranges, {}):
            for p in posts:
                if cfg.limit is not None and counts["posts"] >= cfg.limit:
                    return dict(counts)
                counts["posts"] += 1
                counts[
                    "image" if p.has_file and p.file_ext in IMAGE_EXTS else "no_file" if not p.has_file else "not_image"
                ] += 1
    return dict(counts)


def crawl(cfg: CrawlConfig, auth: Auth | None = None, console: Console | None = None) -> CrawlSummary | dict:
    """Run (or resume) a crawl into cfg.out; returns the summary. A dry run only lists, and returns counts."""
    site = SITES.get(cfg.site)
    if site is None:
        raise UserError(f"--site must be one of {', '.join(SITES)}, not {cfg.site!r}")
    if cfg.dry_run:
        return asyncio.run(_dry_run(cfg, site, auth))
    console = console or Console(stderr=True)
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
        state = State(cfg.out / "crawl.sqlite")
    except (OSError, sqlite3.Error) as e:
        raise UserError(f"cannot use {cfg.out} for the crawl: {e}") from e
    try:
        saved = state.get("identity")
        if saved is None:
            state.set("identity", cfg.identity())
        elif saved != cfg.identity():
            raise UserError(
                f"{cfg.out} holds another crawl ({json.dumps(saved)}); "
                "resume it with the same options or use another --out"
            )
        (cfg.out / "crawl-config.json").write_text(json.dumps(cfg.to_json(), indent=1))
        recover(cfg.out, state)
        (cfg.out / "posts" / "failed.parquet").unlink(missing_ok=True)
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        ]
        run = None
        with Progress(*columns, console=console, transient=False) as progress:
            run = _Run(cfg, site, state, auth, progress)
            try:
                asyncio.run(run.run())
            finally:
                failed = state.failed_records()
                if failed:
                    try:
                        write_posts(cfg.out / "posts" / "failed.parquet", failed)
                    except OSError as e:
                        log.warning("could not write posts/failed.parquet: %s", e)
        summary = CrawlSummary(
            statuses=state.statuses(),
            listed=run.stats["listed"],
            images=run.stats["images"],
            bytes=run.stats["bytes"],
            seconds=round(time.monotonic() - run.t0, 2),
            requests=run.stats["requests"],
            retries=run.stats["retries"],
            rate_limited=run.stats["rate_limited"],
            failures=run.failures[:20],
        )
        (cfg.out / "crawl.json").write_text(json.dumps(asdict(summary), indent=1))
        return summary
    finally:
        state.close()


def print_summary(summary: CrawlSummary, console: Console) -> None:
    table = Table(title="crawl: posts by status (whole directory)")
    for status in summary.statuses:
        table.add_column(status)
    table.add_row(*(str(n) for n in summary.statuses.values()))
    console.print(table)
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    console.print(
        f"this run: {summary.listed} posts listed, {summary.images} images ({summary.bytes / 1e6:.1f} MB) in "
        f"{summary.seconds:.1f} s ({rate:.1f} images/s), {summary.requests} requests, {summary.retries} retries, "
        f"{summary.rate_limited} rate-limited answers"
    )
    for line in summary.failures[:10]:
        console.print(f"  failed: {line}")
    if summary.failed:
        console.print(f"[red]{summary.failed} posts failed[/]: run the same command again to retry them")


__all__ = ["CrawlConfig", "CrawlSummary", "DiskFull", "Post", "crawl", "parse_ids", "parse_shard", "print_summary"]
