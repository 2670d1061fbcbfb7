"""`i2v crawl`: list a board's posts by id range, download and verify their files, write Parquet and tar shards.

The parts, each in its own module: the resume state in SQLite (state.py), listing the board (lister.py), fetching
and resizing files (fetcher.py), and writing shards and Parquet parts with the commit protocol that makes a crawl
loss-free under kill -9 (writer.py). This module holds the configuration, runs the parts together and sums up.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..errors import UserError, is_disk_full
from ..util import storage
from ..util.cores import cores
from ..util.images import Stored
from ..util.progress import progress_bar
from ..util.shard import check_shard
from .client import USER_AGENT, Client, ClientConfig
from .fetcher import Failed, fetch, skip
from .lister import Lister
from .sites import SITES, Auth, Site, post_record
from .state import State
from .writer import Target, Writer, clear_failed, reconcile, write_failed

log = logging.getLogger(__name__)

CONFIG_FILE = "crawl-config.json"  # the crawl's options, beside its output (credentials never are)
SUMMARY_FILE = "crawl.json"  # the last run's summary
BLOCKS_DIR = "blocks"  # in the state directory of `crawl --ray`: one state directory per block
RESERVED = 1_000_000  # file numbers per block of `crawl --ray`: block k names its files k*RESERVED, k*RESERVED+1...


class DiskFull(UserError):
    """The disk filled up: the crawl stopped cleanly and resumes once there is room."""


def parse_ids(text: str) -> tuple[int, int]:
    """`A..B` (both ends included) -> (A, B)."""
    try:
        a, b = (int(x) for x in text.split(".."))
    except ValueError:
        raise UserError(f"--ids takes A..B with integers, e.g. 1..5000, not {text!r}") from None
    if not 0 < a <= b:
        raise UserError(f"--ids {text}: need 0 < A <= B")
    return a, b


def _ids(value: tuple[int, int] | str | None) -> tuple[int, int] | None:
    """None, `A..B` or (A, B) with 0 < A <= B, as (A, B); else a UserError."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return parse_ids(value)
    try:
        a, b = value
    except (TypeError, ValueError):
        a = b = None
    if not (type(a) is int and type(b) is int):
        raise UserError(f"--ids takes A..B with integers, e.g. 1..5000, not {value!r}")
    return parse_ids(f"{a}..{b}")


def _image_size(value: int | str | None) -> int | None:
    """None, 'original', a number of pixels (at least 16), or a UserError."""
    if value is None or value == "original":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if type(value) is int and value >= 16:
        return value
    raise UserError(f"--image-size takes a number of pixels (at least 16) or 'original', not {value!r}")


def _check_number(name: str, value, low: float, *, whole: bool = False, above: bool = False) -> None:
    """A UserError naming the option unless `value` is a number >= low (> low if `above`; an int if `whole`)."""
    kinds = (int,) if whole else (int, float)
    if type(value) in kinds and (value > low if above else value >= low):
        return
    bound = f"greater than {low}" if above else f"at least {low}"
    raise UserError(f"{name} must be {'a whole number' if whole else 'a number'} {bound}, not {value!r}")


def default_state_dir(out: storage.Location) -> Path:
    """The local state directory of a crawl into a remote `out`: a cache folder named after the URL,
    `$XDG_CACHE_HOME/illust2vec/crawl/NAME` (or under ~/.cache)."""
    shown = storage.display(out)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", shown).strip("_")[:80]
    digest = hashlib.sha1(shown.encode()).hexdigest()[:8]  # two URLs that sanitise alike stay apart
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "illust2vec" / "crawl" / f"{name}-{digest}"


@dataclass(frozen=True)
class CrawlConfig:
    """What to crawl and how; saved as crawl-config.json beside the output (credentials never are).

    `ids` may be given as `A..B`, `shard` as `I/N` and `image_size` as a number or 'original', as on the command
    line; they are kept as (A, B), (I, N) and pixels or None. `out` is a local directory (a `Path`) or a URL
    (`s3://`, `gs://`; kept as a string). A bad value is a UserError naming it.
    """

    url: str
    out: str | Path
    site: str = "danbooru"
    tags: str = ""
    ids: tuple[int, int] | None = None  # inclusive range
    shard: tuple[int, int] = (0, 1)  # (I, N): this crawler takes part I of N, 0 <= I < N
    limit: int | None = None  # posts to list at most
    concurrency: int = 16  # downloads in flight (per task with --ray)
    api_rate: float | None = None  # requests/s; None takes the site's default
    file_rate: float | None = None
    image_size: int | None = None  # longer side to resize to; None keeps the original
    user_agent: str | None = USER_AGENT  # None: illust2vec's own
    keep_non_images: bool = False  # store zip/mp4/... files too (as is)
    shard_size: int = 1000  # images per tar shard
    flush_seconds: float = 60.0  # finished posts reach the output at least this often
    attempts: int = 6
    backoff: float = 1.0  # first retry wait in seconds (doubles each time)
    decoders: int | None = None  # decoding and resizing threads; None: one per core
    dry_run: bool = False
    state_dir: Path | None = None  # the local resume state; None: `out` when local, else default_state_dir(out)
    ray: bool = False  # distribute blocks of ids over a Ray cluster (booru/distribute.py)
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local cluster for this run
    block_size: int = 100_000  # ids per block with --ray
    ray_tasks: int | None = None  # blocks crawled at once with --ray; None: one per CPU of the cluster
    block: int | None = None  # set by --ray in the config of each block's task: which block this crawl is

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the normalised values are set once, here
        parts = urlsplit(self.url if isinstance(self.url, str) else "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"--url takes a board's address, e.g. https://danbooru.donmai.us, not {self.url!r}")
        if self.site not in SITES:
            raise UserError(f"--site must be one of {', '.join(SITES)}, not {self.site!r}")
        set_(self, "out", storage.location(self.out, "--out", write=True))
        if self.state_dir is not None:
            set_(self, "state_dir", Path(self.state_dir))
        set_(self, "ids", _ids(self.ids))
        set_(self, "shard", check_shard(self.shard))
        set_(self, "image_size", _image_size(self.image_size))
        set_(self, "user_agent", self.user_agent or USER_AGENT)
        if self.limit is not None:
            _check_number("--limit", self.limit, 1, whole=True)
        _check_number("--concurrency", self.concurrency, 1, whole=True)
        _check_number("--shard-size", self.shard_size, 1, whole=True)
        for name, rate in (("--api-rate", self.api_rate), ("--file-rate", self.file_rate)):
            if rate is not None:
                _check_number(name, rate, 0, above=True)
        _check_number("flush_seconds", self.flush_seconds, 0, above=True)
        _check_number("attempts", self.attempts, 1, whole=True)
        _check_number("backoff", self.backoff, 0)
        if self.decoders is not None:
            _check_number("decoders", self.decoders, 1, whole=True)
        self._check_ray()

    def _check_ray(self) -> None:
        _check_number("--block-size", self.block_size, 1, whole=True)
        if self.ray_tasks is not None:
            _check_number("--ray-tasks", self.ray_tasks, 1, whole=True)
        if self.block is not None:
            _check_number("block", self.block, 0, whole=True)
        if self.ray and self.limit is not None and not self.dry_run:
            raise UserError("--limit takes the newest posts first, which cannot be split into blocks: drop --ray or it")

    def identity(self) -> dict:
        """The fields that define the crawl: a directory holds one crawl, resumed only with the same ones."""
        identity = {
            "url": self.url,
            "site": self.site,
            "tags": self.tags,
            "ids": list(self.ids) if self.ids else None,
            "shard": list(self.shard),
            "image_size": self.image_size,
            "keep_non_images": self.keep_non_images,
        }
        if self.ray:  # a crawl in blocks numbers its files apart from a plain crawl's: the two never share --out
            identity["ray_block_size"] = self.block_size
        return identity

    def home(self) -> Path:
        """The local directory that holds the resume state (of the whole crawl, or of this block)."""
        home = self.state_dir or (self.out if storage.is_local(self.out) else default_state_dir(self.out))
        return home / BLOCKS_DIR / f"{self.block:06d}" if self.block is not None else home

    def target(self) -> Target:
        """Where the files are written: in place in a local --out, else in the state directory and uploaded."""
        remote = storage.is_remote(self.out)
        root = self.home() if remote else self.out
        if self.block is None:
            return Target(root, self.out if remote else None)
        first = self.block * RESERVED
        return Target(root, self.out if remote else None, first, first + RESERVED)

    def to_json(self) -> dict:
        """As crawl-config.json holds it (the URL as `storage.display` shows it)."""
        d = self.plain()
        d["out"] = storage.display(self.out)
        return d

    def plain(self) -> dict:
        """Plain data that `CrawlConfig(**d)` makes again: what a Ray task is given."""
        d = asdict(self)
        d["out"] = str(self.out)
        d["state_dir"] = str(self.state_dir) if self.state_dir is not None else None
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
    blocks: dict[str, int] | None = None  # with --ray: blocks in all, skipped (finished before), crawled now
    cluster_seconds: float = 0.0  # with --ray: of `seconds`, those spent connecting to (or starting) the cluster

    @property
    def failed(self) -> int:
        return self.statuses.get("failed", 0)

    def as_dict(self) -> dict:
        """As crawl.json holds it."""
        return asdict(self)


@dataclass
class ListingCounts:
    """What a dry run found: posts listed, and how many of them have an image, no file, or another kind of file."""

    posts: int = 0
    image: int = 0
    no_file: int = 0
    not_image: int = 0

    def as_dict(self) -> dict:
        """The counts that are not zero, as `i2v crawl --dry-run` prints them."""
        return {k: v for k, v in asdict(self).items() if v}


class _Display:
    """The two progress bars (listing, fetching) with rates beside them, refreshed at most four times a second."""

    def __init__(self, progress: Progress | None, stats: Counter, resumed: int):
        self.progress, self.stats, self.resumed = progress, stats, resumed
        self.t0 = time.monotonic()
        self._shown = 0.0
        if progress is not None:
            self.tasks = {
                "listed": progress.add_task("listing posts", total=None, info=""),
                "done": progress.add_task("fetching files", total=resumed, info=""),
            }

    def advance(self, what: str, n: int, final: bool = False) -> None:
        if self.progress is None:
            return
        self.progress.advance(self.tasks[what], n)
        self.stats[f"progress_{what}"] += n
        now = time.monotonic()
        if now - self._shown < 0.25 and not final:  # the figures change slowly; formatting them per post costs CPU
            return
        self._shown = now
        self.progress.update(self.tasks["done"], total=self.stats["listed"] + self.resumed)
        dt = max(1e-6, now - self.t0)
        info = (
            f"{self.stats['progress_done'] / dt:5.1f} posts/s  {self.stats['images'] / dt:5.1f} img/s  "
            f"{self.stats['bytes'] / dt / 1e6:5.1f} MB/s  {self.stats['failed']} failed"
        )
        self.progress.update(self.tasks["done"], info=info)


class _Run:
    """One run of the crawl: the lister, the download workers and the writer, sharing a client and a pool."""

    def __init__(self, cfg: CrawlConfig, state: State, auth: Auth | None, progress: Progress | None, target: Target):
        self.cfg, self.state, self.target = cfg, state, target
        self.site: Site = SITES[cfg.site]
        self.lister = Lister(self.site, cfg.url, cfg.tags, auth, state)
        self.writer = Writer(target, state, cfg.shard_size, cfg.flush_seconds)
        self.stats: Counter[str] = Counter()
        self.failures: list[str] = []
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.concurrency * 4)
        self.state.retry_failed()
        self.resumed = self.state.pending()
        self.display = _Display(progress, self.stats, len(self.resumed))

    def summary(self) -> CrawlSummary:
        return CrawlSummary(
            statuses=self.state.statuses(),
            **{k: self.stats[k] for k in ("listed", "images", "bytes", "requests", "retries", "rate_limited")},
            seconds=round(time.monotonic() - self.display.t0, 2),
            failures=self.failures[:20],
        )

    async def route(self, record: dict) -> None:
        """Posts without a file, or not an image, are finished at once; the rest queue for download."""
        skipped = skip(record, self.cfg.keep_non_images)
        if skipped:
            self.finish(record, *skipped)
        else:
            await self.queue.put(record)

    def finish(self, record: dict, status: str, reason: str = "", stored: Stored | None = None) -> None:
        self.writer.add(record, status, reason, stored)
        self.display.advance("done", 1)

    def fail(self, record: dict, reason: str) -> None:
        self.state.mark_failed(record["id"], reason)
        self.failures.append(f"post {record['id']}: {reason}")
        self.stats["failed"] += 1
        log.debug("post %s failed: %s", record["id"], reason)
        self.display.advance("done", 1)

    async def worker(self, client: Client, pool: Executor) -> None:
        while (record := await self.queue.get()) is not None:
            try:
                stored, downloaded = await fetch(client, record, pool, self.cfg.image_size, self.cfg.attempts)
            except Failed as e:
                self.fail(record, str(e))
                continue
            self.stats["images"] += 1
            self.stats["bytes"] += downloaded
            self.finish(record, "ok", "", stored)

    async def produce(self, client: Client, workers: int) -> None:
        """Queue the posts a previous run left pending, then list the rest; a None per worker ends the run."""
        for record in self.resumed:
            await self.route(record)
        cfg = self.cfg
        async for new in self.lister.new_records(client, cfg.ids, cfg.shard, cfg.limit):
            self.stats["listed"] += len(new)
            self.display.advance("listed", len(new))
            for record in new:
                await self.route(record)
        for _ in range(workers):
            await self.queue.put(None)

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.writer.due():
                self.writer.flush()
            self.display.advance("done", 0)

    async def fetch_all(self, client: Client, pool: Executor) -> None:
        """The producer, the workers and the ticker until every post is done, or until the first error."""
        workers = [asyncio.create_task(self.worker(client, pool)) for _ in range(self.cfg.concurrency)]
        tasks = [asyncio.create_task(self.produce(client, len(workers))), *workers]
        ticker = asyncio.create_task(self.ticker())
        together = asyncio.gather(*tasks)
        try:
            # Fail fast: a refusal in any task, or an upload that fails in the ticker's flush, must not leave the
            # others waiting on a full queue or fetching on. The ticker only ever ends by an error.
            done, _ = await asyncio.wait([together, ticker], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            for task in (*tasks, ticker):
                task.cancel()
            await asyncio.gather(together, *tasks, ticker, return_exceptions=True)
            self.stats.update({k: client.stats[k] for k in ("requests", "retries", "rate_limited")})

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
        # Threads, not processes: Pillow releases the GIL while it decodes, resizes and encodes, so threads use
        # every core without copying each file between processes or leaving orphans when the crawl is killed.
        pool = ThreadPoolExecutor(cfg.decoders or cores(), thread_name_prefix="decode")
        try:
            async with Client(ccfg) as client:
                await self.fetch_all(client, pool)
            self.writer.flush()
            self.display.advance("done", 0, final=True)
        except BaseException as e:
            if is_disk_full(e):
                self.writer.abort()
                raise DiskFull(
                    f"the disk under {self.target.root} is full ({e}); free some space and run the same command "
                    "to resume"
                ) from e
            # Anything else (a refusal, Ctrl-C): keep what is finished, then stop.
            try:
                self.writer.flush()
            except Exception as flush_error:  # noqa: BLE001 (the original error is the one to report)
                log.warning("could not save the last batch (%s); it will be fetched again", flush_error)
                self.writer.abort()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


async def _dry_run(cfg: CrawlConfig, auth: Auth | None) -> ListingCounts:
    site = SITES[cfg.site]
    lister = Lister(site, cfg.url, cfg.tags, auth)
    counts = ListingCounts()
    ccfg = ClientConfig(api_rate=cfg.api_rate or site.api_rate, user_agent=cfg.user_agent, attempts=cfg.attempts)
    async with Client(ccfg) as client:
        ranges = await lister.ranges(client, cfg.ids, cfg.shard)
        async for posts, _ in lister.pages(client, ranges, {}):
            for post in posts:
                if cfg.limit is not None and counts.posts >= cfg.limit:
                    return counts
                counts.posts += 1
                skipped = skip(post_record(post, "pending"), keep_non_images=False)
                kind = skipped[0] if skipped else "image"
                setattr(counts, kind, getattr(counts, kind) + 1)
    return counts


@dataclass
class Finished:
    """What one crawl (a whole one, or a block of `crawl --ray`) ends with: its summary, the files it recorded and
    the posts that failed."""

    summary: CrawlSummary
    files: list[str]
    failed: list[dict]


def crawl(cfg: CrawlConfig, auth: Auth | None = None, console: Console | None = None) -> CrawlSummary | ListingCounts:
    """Run (or resume) a crawl into cfg.out; returns the summary. A dry run only lists, and returns counts; with
    `cfg.ray` the crawl is distributed in blocks over a Ray cluster (booru/distribute.py)."""
    if cfg.dry_run:
        return asyncio.run(_dry_run(cfg, auth))
    console = console or Console(stderr=True)
    if cfg.ray:
        from .distribute import crawl_ray

        return crawl_ray(cfg, auth, console)
    with progress_bar(console) as progress:
        return run_crawl(cfg, auth, progress).summary


def run_crawl(cfg: CrawlConfig, auth: Auth | None, progress: Progress | None) -> Finished:
    """One crawl into cfg.out with its state in cfg.home(): reconcile, fetch, write; what `crawl` and each block of
    `crawl --ray` run. A block leaves the files of the whole crawl (config, summary, failed.parquet) to the driver."""
    with storage.errors(cfg.out, "cannot write"):
        storage.makedirs(cfg.out)  # a missing bucket or wrong credentials: one line before any work
    target = cfg.target()
    state = State.open(cfg.home(), cfg.identity())
    whole = cfg.block is None
    try:
        if whole:
            storage.write_text(storage.join(cfg.out, CONFIG_FILE), json.dumps(cfg.to_json(), indent=1))
            clear_failed(target)
        reconcile(target, state)
        run = _Run(cfg, state, auth, progress, target)
        try:
            asyncio.run(run.run())
        finally:
            if whole:
                write_failed(target, state.failed_records())
        summary = run.summary()
        text = json.dumps(summary.as_dict(), indent=1)
        storage.write_text(storage.join(cfg.out, SUMMARY_FILE) if whole else cfg.home() / SUMMARY_FILE, text)
        return Finished(summary, sorted(state.files()), state.failed_records())
    finally:
        state.close()


def print_summary(summary: CrawlSummary, console: Console) -> None:
    """The table of posts by status and a line on this run, as `i2v crawl` prints them on stderr."""
    table = Table(title="crawl: posts by status (whole directory)")
    for status in summary.statuses:
        table.add_column(status)
    table.add_row(*(str(n) for n in summary.statuses.values()))
    console.print(table)
    if summary.blocks:
        b = summary.blocks
        console.print(
            f"blocks: {b['total']} in all, {b['skipped']} finished before, {b['crawled']} crawled now "
            f"(the Ray cluster was up in {summary.cluster_seconds:.1f} s)"
        )
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


__all__ = [
    "BLOCKS_DIR",
    "RESERVED",
    "CrawlConfig",
    "CrawlSummary",
    "DiskFull",
    "Finished",
    "ListingCounts",
    "crawl",
    "default_state_dir",
    "parse_ids",
    "print_summary",
    "run_crawl",
]
