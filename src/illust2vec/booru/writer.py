"""Writing finished posts: image shards and Parquet parts, and the commit protocol that keeps a killed crawl loss-free.

Finished posts are written in batches. The tar shard and the Parquet part are written under temporary names and
renamed into place, and only then recorded in SQLite, both in one transaction. On start, `recover` removes anything
on disk that SQLite does not record: the residue of a killed run, whose posts are still pending and are fetched
again. So a run killed at any moment and run again ends with every post once in the Parquet and every image once
in the shards.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..formats.posts import FAILED, PARTS, POSTS_DIR, part_files, record_to_json, write_posts
from ..formats.shards import IMAGE_SHARDS, IMAGES_DIR, TMP, ShardWriter, image_sample, image_shards
from ..util.images import Stored
from .state import State

log = logging.getLogger(__name__)


def recover(out: Path, state: State) -> int:
    """Remove what a killed run left half-done (temporary files, and renamed files never recorded as committed) and
    the last run's failed.parquet; returns how many half-done files were removed."""
    known = state.files()
    temporary = [p for d in (IMAGES_DIR, POSTS_DIR) for p in (out / d).glob("*" + TMP)]
    uncommitted = [p for p in [*image_shards(out), *part_files(out)] if p.relative_to(out).as_posix() not in known]
    for path in [*temporary, *uncommitted]:
        log.warning("removing %s, left by an interrupted run; its posts will be fetched again", path)
        path.unlink()
    (out / FAILED).unlink(missing_ok=True)  # rewritten at the end of the run, from the state
    return len(temporary) + len(uncommitted)


def write_failed(out: Path, state: State) -> None:
    """posts/failed.parquet: the posts that failed, for the later stages to see; a write error is only logged."""
    failed = state.failed_records()
    if failed:
        try:
            write_posts(out / FAILED, failed)
        except OSError as e:
            log.warning("could not write %s: %s", FAILED, e)


class Writer:
    """Collects finished posts; writes their images' shard and their Parquet part, then commits both."""

    def __init__(self, out: Path, state: State, shard_size: int, flush_seconds: float):
        self.out, self.state = out, state
        (out / POSTS_DIR).mkdir(parents=True, exist_ok=True)
        self.shards = ShardWriter(out, IMAGE_SHARDS, first_index=state.next_index(IMAGES_DIR))
        self.part = state.next_index(POSTS_DIR)
        self.rows: list[dict] = []
        self.shard_size, self.flush_seconds = shard_size, flush_seconds
        self.last_flush = time.monotonic()

    def add(self, record: dict, status: str, reason: str = "", stored: Stored | None = None) -> None:
        """One finished post, with its file when it has one; a full shard is written and committed at once."""
        record = {**record, "status": status, "reason": reason, "shard": None}
        if stored is not None:
            record["shard"] = self.shards.name
            meta = {
                **record_to_json(record),
                "stored_ext": stored.ext,
                "stored_width": stored.stored_width,
                "stored_height": stored.stored_height,
            }
            self.shards.add(*image_sample(record["md5"], stored.ext, stored.data, meta))
        self.rows.append(record)
        if self.shards.count >= self.shard_size:
            self.flush()

    def due(self) -> bool:
        """Whether finished posts have waited flush_seconds: they reach the disk at least that often."""
        return bool(self.rows) and time.monotonic() - self.last_flush >= self.flush_seconds

    def flush(self) -> None:
        """Write the shard and the part under temporary names, rename them, then commit both in SQLite."""
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        files = []
        shard = self.shards.close()
        if shard is not None:
            files.append((shard.name, shard.count, shard.bytes))
        part = PARTS.format(index=self.part)
        write_posts(self.out / part, self.rows)
        files.append((part, len(self.rows), (self.out / part).stat().st_size))
        self.state.commit([{**r, "part": part} for r in self.rows], files)
        self.part += 1
        self.rows = []

    def abort(self) -> None:
        """Drop what is not written yet (after an error): its posts stay pending."""
        self.shards.abort()
        self.rows = []
