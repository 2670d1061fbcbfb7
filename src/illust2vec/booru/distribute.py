"""`i2v crawl --ray`: a distributor, as img2dataset's: the id range cut into blocks, each crawled by a Ray task.

Each block is an ordinary crawl (`run_crawl`) of its ids with its own SQLite state (`STATE/blocks/NNNNNN`, on the
node that runs it) and its own numbers for its files in --out: block k names its shards and parts from k * RESERVED
on (`images/3000000.tar`, `posts/3000000.parquet`), so blocks never collide, and their union is laid out as one crawl
is: `posts/[0-9]*.parquet` and `images/*.tar`, each post once, read by vocab, build and export-csv as they read one.

The driver keeps the plan of blocks and every finished block (its files and counts) in its own state, so a rerun
skips finished blocks. A task whose worker dies is retried by Ray (`max_retries`); the retry, like any run of a
crawl, first removes the files in its own numbers that its state does not record, so no post is doubled.

Rates: at most P blocks run at once (`--ray-tasks`, default one per CPU of the cluster), and each gets 1/P of
`--api-rate` and `--file-rate`, so the board sees no more than the crawl's rates as a whole; when fewer than P
blocks are left, the crawl runs below them. A 429 pauses the task that got it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter

from rich.console import Console

from ..errors import UserError
from ..formats.posts import STATUSES, record_from_json, record_to_json
from ..util import storage
from ..util.cluster import connect, import_ray
from ..util.progress import progress_bar
from .client import Client, ClientConfig
from .crawl import CONFIG_FILE, RESERVED, SUMMARY_FILE, CrawlConfig, CrawlSummary, run_crawl
from .lister import Lister
from .sites import SITES, Auth
from .state import State
from .writer import Target, clear_failed, file_index, stored_files, write_failed

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # Ray runs a block again this many times when its worker dies


def plan_blocks(ranges: list, size: int) -> list[tuple[int, int]]:
    """Inclusive id ranges (newest first) cut into blocks of at most `size` ids, newest first."""
    blocks = []
    for low, high in ranges:
        top = high
        while top >= low:
            blocks.append((max(low, top - size + 1), top))
            top -= size
    return blocks


async def _ranges(cfg: CrawlConfig, auth: Auth | None) -> list:
    site = SITES[cfg.site]
    ccfg = ClientConfig(api_rate=cfg.api_rate or site.api_rate, user_agent=cfg.user_agent, attempts=cfg.attempts)
    async with Client(ccfg) as client:
        return await Lister(site, cfg.url, cfg.tags, auth).ranges(client, cfg.ids, cfg.shard)


def _blocks(cfg: CrawlConfig, auth: Auth | None, state: State) -> list[tuple[int, int]]:
    """The plan of blocks: made once (asking the board for its newest id when no --ids), then kept in the state so
    that every rerun cuts the same blocks."""
    saved = state.get("blocks")
    if saved is None:
        saved = plan_blocks(asyncio.run(_ranges(cfg, auth)), cfg.block_size)
        state.set("blocks", saved)
    return [tuple(b) for b in saved]


def block_config(cfg: CrawlConfig, k: int, ids: tuple[int, int], running: int) -> dict:
    """Block k's crawl as plain data (what its Ray task is given): its ids, its share of the rates, no Ray."""
    site = SITES[cfg.site]
    return dataclasses.replace(
        cfg,
        ids=ids,
        shard=(0, 1),
        api_rate=(cfg.api_rate or site.api_rate) / running,
        file_rate=(cfg.file_rate or site.file_rate) / running,
        decoders=cfg.decoders or 1,
        ray=False,
        block=k,
    ).plain()


def crawl_block(config: dict, auth: dict | None) -> dict:
    """The body of a block's Ray task: one crawl of the block's ids; its counts, files and failed posts back."""
    cfg = CrawlConfig(**config)
    done = run_crawl(cfg, Auth(**auth) if auth else None, None)
    return {
        "summary": done.summary.as_dict(),
        "files": done.files,
        "failed": [record_to_json(r) for r in done.failed],
    }


def _reconcile(out: storage.Location, blocks: list, finished: dict) -> None:
    """Remove the files in --out that no block owns or that a finished block did not record; a finished block one
    of whose files is gone is crawled again (its own state then fetches just those posts again)."""
    stored = stored_files(out)
    for name, loc in stored.items():
        index = file_index(name)
        k = None if index is None else index // RESERVED
        if k is None or k >= len(blocks) or (str(k) in finished and name not in finished[str(k)]["files"]):
            log.warning("removing %s: no finished block of this crawl recorded it", storage.display(loc))
            storage.remove(loc)
    for k, block in list(finished.items()):
        gone = [f for f in block["files"] if f not in stored]
        if gone:
            log.warning("block %s: %d of its files are gone from %s; crawling it again", k, len(gone), out)
            del finished[k]


class _Driver:
    """Runs the blocks left to do, at most `running` at once, and records each as it finishes."""

    def __init__(self, cfg: CrawlConfig, auth: Auth | None, blocks: list, state: State):
        self.cfg, self.auth, self.blocks, self.state = cfg, auth, blocks, state
        self.finished: dict = state.get("finished", {})
        self.results: list[dict] = []  # this run's, finished or not
        self.start_seconds = 0.0  # connecting to (or starting) the cluster

    def record(self, k: int, result: dict) -> None:
        self.results.append(result)
        summary = result["summary"]
        if summary["statuses"].get("failed", 0):
            return  # not finished: a rerun retries its failed posts
        self.finished[str(k)] = {"ids": list(self.blocks[k]), "files": result["files"], "statuses": summary["statuses"]}
        self.state.set("finished", self.finished)

    def run(self, todo: list[int], console: Console) -> None:
        ray = import_ray()
        t0 = time.monotonic()
        with connect(self.cfg.ray_address) as info:
            self.start_seconds = time.monotonic() - t0
            running = max(1, min(len(todo), self.cfg.ray_tasks or int(info.cpus) or 1))
            task = ray.remote(crawl_block).options(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)
            auth = dataclasses.asdict(self.auth) if self.auth else None
            log.info("crawling %d blocks, %d at a time, each at 1/%d of the rates", len(todo), running, running)
            with progress_bar(console) as progress:
                bar = progress.add_task("crawling blocks", total=len(self.blocks), info="")
                progress.advance(bar, len(self.blocks) - len(todo))
                pending: dict = {}
                queue = list(todo)
                try:
                    while queue or pending:
                        while queue and len(pending) < running:
                            k = queue.pop(0)
                            config = block_config(self.cfg, k, self.blocks[k], running)
                            pending[task.remote(config, auth)] = k
                        ready, _ = ray.wait(list(pending), num_returns=1)
                        k = pending.pop(ready[0])
                        self.record(k, self._result(ray, ready[0], k))
                        progress.advance(bar, 1)
                except BaseException:
                    self._stop(ray, pending)
                    raise

    def _result(self, ray, ref, k: int) -> dict:
        """A block's result, or one line saying why it failed (a UserError of the crawl as it was raised)."""
        a, b = self.blocks[k]
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise UserError(f"block {k} (ids {a}..{b}): {e.cause}") from None
            raise
        except ray.exceptions.RayError as e:
            what = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(
                f"block {k} (ids {a}..{b}) failed {MAX_RETRIES + 1} times ({what}); run the same command to resume"
            ) from None

    def _stop(self, ray, pending: dict) -> None:
        """Cancel the blocks still running (each keeps what it finished), and record those that finished first."""
        for ref in pending:
            ray.cancel(ref)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=30)
        for ref in ready:
            with contextlib.suppress(Exception):  # cancelled or failed: it is crawled again next time
                self.record(pending[ref], ray.get(ref))


def crawl_ray(cfg: CrawlConfig, auth: Auth | None, console: Console) -> CrawlSummary:
    """Run (or resume) a crawl in blocks on a Ray cluster; returns the summary of the whole crawl."""
    t0 = time.monotonic()
    with storage.errors(cfg.out, "cannot write"):
        storage.makedirs(cfg.out)
    home = cfg.home()
    state = State.open(home, cfg.identity())
    try:
        blocks = _blocks(cfg, auth, state)
        driver = _Driver(cfg, auth, blocks, state)
        _reconcile(cfg.out, blocks, driver.finished)
        state.set("finished", driver.finished)
        target = Target(home, None if storage.is_local(cfg.out) else cfg.out)
        storage.write_text(storage.join(cfg.out, CONFIG_FILE), json.dumps(cfg.to_json(), indent=1))
        clear_failed(target)
        todo = [k for k in range(len(blocks)) if str(k) not in driver.finished]
        try:
            if todo:
                driver.run(todo, console)
        finally:
            failed = [record_from_json(r) for result in driver.results for r in result["failed"]]
            write_failed(target, sorted(failed, key=lambda r: r["id"]))
        summary = _summary(driver, len(blocks) - len(todo), time.monotonic() - t0)
        storage.write_text(storage.join(cfg.out, SUMMARY_FILE), json.dumps(summary.as_dict(), indent=1))
        return summary
    finally:
        state.close()


def _summary(driver: _Driver, skipped: int, seconds: float) -> CrawlSummary:
    """The whole crawl's counts (finished blocks, and this run's unfinished ones) and what this run did."""
    statuses: Counter[str] = Counter(dict.fromkeys(STATUSES, 0))
    for block in driver.finished.values():
        statuses.update(block["statuses"])
    run: Counter[str] = Counter()
    failures: list[str] = []
    for result in driver.results:
        s = result["summary"]
        if s["statuses"].get("failed", 0):
            statuses.update(s["statuses"])
        run.update({k: s[k] for k in ("listed", "images", "bytes", "requests", "retries", "rate_limited")})
        failures += s["failures"]
    total = len(driver.blocks)
    return CrawlSummary(
        statuses=dict(statuses),
        **{k: run[k] for k in ("listed", "images", "bytes", "requests", "retries", "rate_limited")},
        seconds=round(seconds, 2),
        failures=failures[:20],
        blocks={"total": total, "skipped": skipped, "crawled": len(driver.results)},
        cluster_seconds=round(driver.start_seconds, 2),
    )


__all__ = ["block_config", "crawl_block", "crawl_ray", "plan_blocks"]
