"""Writing finished posts: image shards and Parquet parts, and the commit protocol that keeps a killed crawl loss-free.

Finished posts are written in batches: one tar shard of their images and one Parquet part. Both are written under
temporary names and renamed into place, in the crawl directory itself, or, for an output on object storage, in the
local state directory and then uploaded; only once they are in the output are they recorded in SQLite, both in one
transaction. On start, `reconcile` makes the output agree with the record: what the output holds and SQLite does
not record (the residue of a killed run, whose posts are still pending) is removed, and the posts of recorded files
the output lacks (an emptied bucket, a new one) go back to pending. So a run killed at any moment, even between an
upload and its record, and run again ends with every post once in the Parquet and every image once in the shards.

A block of `i2v crawl --ray` writes into the same output as the other blocks, with numbers reserved for it
(`Target.first` up to `Target.stop`); it reconciles only the files whose numbers are its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..formats.posts import FAILED, PARTS, POSTS_DIR, record_to_json, write_posts
from ..formats.shards import IMAGE_SHARDS, IMAGES_DIR, TMP, ShardWriter, image_sample
from ..util import storage
from ..util.images import Stored
from .state import State

log = logging.getLogger(__name__)

# Tests only: "N:PATH" makes the first process to create PATH kill itself (SIGKILL) right after its Nth batch is in
# the output (uploaded, or renamed into place) and before it is recorded: the worst moment for the commit protocol.
KILL_BEFORE_RECORD = "I2V_TEST_KILL_BEFORE_RECORD"


@dataclass(frozen=True)
class Target:
    """Where a crawl's files go: written in the local directory `root`; uploaded to `out` when that is remote (None:
    written in place); numbered from `first`, below `stop` when a block of a larger crawl owns only those."""

    root: Path
    out: storage.Location | None = None
    first: int = 0
    stop: int | None = None

    @property
    def dest(self) -> storage.Location:
        """The output: where the files end up."""
        return self.root if self.out is None else self.out

    def owns(self, name: str) -> bool:
        """Whether the file `name` (`images/N.tar`, `posts/N.parquet`, maybe `.tmp`) is this crawl's to keep or
        remove: any file for a whole crawl, those numbered in [first, stop) for a block."""
        if self.stop is None:
            return True
        index = file_index(name)
        return index is not None and self.first <= index < self.stop


def file_index(name: str) -> int | None:
    """The number of a crawl file (`images/000012.tar` -> 12); None for a name that has none."""
    stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
    return int(stem) if stem.isdigit() else None


def stored_files(dest: storage.Location) -> dict[str, storage.Location]:
    """The shards and parts in an output, by name relative to it (`images/000003.tar`): its location."""
    found = {}
    for folder, pattern in ((IMAGES_DIR, "*.tar"), (POSTS_DIR, "[0-9]*.parquet")):
        for loc in storage.listing(storage.join(dest, folder), pattern):
            found[f"{folder}/{storage.name(loc)}"] = loc
    return found


def reconcile(target: Target, state: State) -> int:
    """Make the output agree with the state before a run: remove the files SQLite does not record (their posts are
    pending), and send the posts of recorded files the output lacks back to pending. Returns the files changed."""
    _clear_residue(target)
    known = state.files()
    stored = {name: loc for name, loc in stored_files(target.dest).items() if target.owns(name)}
    unknown = [loc for name, loc in stored.items() if name not in known]
    for loc in unknown:
        log.warning("removing %s, left by an interrupted run; its posts will be fetched again", storage.display(loc))
        storage.remove(loc)
    missing = {name for name in known if name not in stored}
    if missing:
        log.warning(
            "%d recorded files are missing from %s (%s...); their posts will be fetched again",
            len(missing),
            storage.display(target.dest),
            sorted(missing)[0],
        )
        for name in state.forget(missing):
            storage.remove(storage.join(target.dest, *name.split("/")))
    return len(unknown) + len(missing)


def _clear_residue(target: Target) -> None:
    """Local leftovers of a killed run: half-written files (`.tmp`) in place; for an uploaded output, every local
    copy, since a copy is either in the output already or not recorded (and its posts pending)."""
    for folder in (IMAGES_DIR, POSTS_DIR):
        local = target.root / folder
        if target.out is not None:
            shutil.rmtree(local, ignore_errors=True)
            continue
        for path in local.glob("*" + TMP):
            if target.owns(f"{folder}/{path.name}"):
                log.warning("removing %s, left by an interrupted run", path)
                path.unlink()


def clear_failed(target: Target) -> None:
    """Remove the last run's posts/failed.parquet: it is rewritten at the end of every run, from the state."""
    storage.remove(storage.join(target.dest, *FAILED.split("/")))


def write_failed(target: Target, records: list[dict]) -> None:
    """posts/failed.parquet: the posts that failed, for the later stages to see; a write error is only logged."""
    if not records:
        return
    local = target.root / FAILED
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        write_posts(local, records)
        if target.out is not None:
            storage.upload(local, storage.join(target.out, *FAILED.split("/")))
            local.unlink()
    except (OSError, UserError) as e:
        log.warning("could not write %s: %s", FAILED, e)


@dataclass
class _Batch:
    """Posts written to a part (and their images to a shard), waiting to be in the output and recorded."""

    rows: list[dict]
    files: list[tuple[str, int, int]] = field(default_factory=list)  # (name, count, bytes)


class Writer:
    """Collects finished posts; writes their images' shard and their Parquet part, puts both in the output, then
    records them."""

    def __init__(self, target: Target, state: State, shard_size: int, flush_seconds: float):
        self.target, self.state = target, state
        (target.root / POSTS_DIR).mkdir(parents=True, exist_ok=True)
        first = max(target.first, state.next_index(IMAGES_DIR))
        self.shards = ShardWriter(target.root, IMAGE_SHARDS, first_index=first)
        self.part = max(target.first, state.next_index(POSTS_DIR))
        self.rows: list[dict] = []
        self.batches: list[_Batch] = []  # written, not yet recorded (an upload failed): tried again first
        self.recorded = 0  # batches recorded by this writer
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
        """Whether finished posts have waited flush_seconds: they reach the output at least that often."""
        return bool(self.rows) and time.monotonic() - self.last_flush >= self.flush_seconds

    def flush(self) -> None:
        """Write the shard and the part under temporary names and rename them, put them in the output, then record
        both in SQLite; batches an earlier flush could not put in the output go first."""
        self.last_flush = time.monotonic()
        if self.rows:
            self.batches.append(self._write())
        while self.batches:
            self._commit(self.batches[0])
            self.batches.pop(0)

    def _write(self) -> _Batch:
        stop = self.target.stop
        if stop is not None and max(self.part, self.shards.index) >= stop:
            raise UserError(f"a block of the crawl made more than {stop - self.target.first} files; use --block-size")
        batch = _Batch([])
        shard = self.shards.close()
        if shard is not None:
            batch.files.append((shard.name, shard.count, shard.bytes))
        part = PARTS.format(index=self.part)
        write_posts(self.target.root / part, self.rows)
        self.part += 1
        batch.files.append((part, len(self.rows), (self.target.root / part).stat().st_size))
        batch.rows = [{**r, "part": part} for r in self.rows]
        self.rows = []
        return batch

    def _commit(self, batch: _Batch) -> None:
        out = self.target.out
        if out is not None:
            for name, *_ in batch.files:  # the shard before the part that names it
                storage.upload(self.target.root / name, storage.join(out, *name.split("/")))
        _fault_point(self.recorded + 1)
        self.state.commit(batch.rows, batch.files)
        self.recorded += 1
        if out is not None:
            for name, *_ in batch.files:
                (self.target.root / name).unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop what is not in the output yet (after an error): its posts stay pending."""
        self.shards.abort()
        self.rows = []
        self.batches = []


def _fault_point(batch: int) -> None:
    """The test hook of KILL_BEFORE_RECORD (see above); nothing unless that variable is set."""
    spec = os.environ.get(KILL_BEFORE_RECORD)
    if not spec:
        return
    n, _, marker = spec.partition(":")
    if batch != int(n):
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
