"""Incremental `i2v tag`: a rerun over a grown or edited collection tags only the files that are new or changed.

Each tagged folder keeps a catalogue (`formats.catalogue`, the dot-file `.i2v-catalogue.sqlite`) per destination.
A file is unchanged when its catalogue row names the same content (the size and modification time as recorded, or
else the same sha256) and the same model weights; `overwrite` tags every file again (after changing thresholds or
rules, say: the row keeps a hash of those settings, but they do not decide). The
catalogue is written as each file's output is written, so a run stopped half-way resumes where it stopped. Rows of
files that are gone are dropped when a run covers the whole folder.

Incremental are the formats written beside (or into) each image (txt, hydrus, xmp) and records written to a file
(json, jsonl, csv with `--out FILE`): a rerun carries the records of unchanged files over from the file as it was,
and tags the new and changed ones (and any the file no longer holds). Records on stdout and the table are never
incremental: every run writes them whole.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..formats.catalogue import Catalogue, CatalogueError, Entry, file_hash
from ..util import storage
from ..util.cores import cores
from .engine import Item

log = logging.getLogger(__name__)


RECORD_FORMATS = ("json", "jsonl", "csv")


def destination(fmt: str, xmp_name: str = "ext", embed: bool = False, out: str | None = None) -> str | None:
    """What a run writes beside (or into) the images, or the records file it writes, as the catalogue names it;
    None for records on stdout and the table, which a rerun writes whole again."""
    if fmt in RECORD_FORMATS:
        if out is None:
            return None
        return f"{fmt}:{out if storage.is_remote(out) else storage.local_path(out).resolve()}"
    if fmt == "xmp":
        return "embed" if embed else f"xmp:{xmp_name}"
    if fmt in ("txt", "hydrus"):
        return fmt
    return None


def settings_hash(*parts: Any) -> str:
    """A short hash of what decides the tags besides the model (thresholds, rules, naming), as JSON."""
    text = json.dumps(parts, sort_keys=True, default=_plain, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__ if not k.startswith("_")}
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    return repr(obj)


def root_of(item: Item) -> Path | None:
    """The folder an item was found under (or, for a file named alone, its folder); None for a shard's member."""
    if item.member is not None or item.error is not None or not isinstance(item.path, Path):
        return None  # a shard's member, or a URL
    depth = len(PurePosixPath(item.key).parts)
    return item.path.parents[depth - 1] if depth else None


@dataclass
class Pending:
    """A file to tag, and what it was when it was looked at."""

    root: Path
    key: str
    sha256: str | None  # None: not read yet (no catalogue row to compare with)
    st: os.stat_result
    known: bool = False  # the catalogue has a row for it: this tool wrote its caption or sidecar


@dataclass
class Plan:
    """Which files a run tags, and the catalogues it records them in."""

    todo: list[Item]
    unchanged: int = 0
    items: list[Item] = field(default_factory=list)  # every item looked at
    books: dict[Path, Catalogue] = field(default_factory=dict)
    pending: dict[Path, Pending] = field(default_factory=dict)
    model: str = ""
    settings: str = ""
    kept: list[str] = field(default_factory=list)  # keys of unchanged files (for --out records carried over)

    def added_before(self, image: Path) -> tuple[str, ...]:
        """The tags this tool added to the image's caption or sidecar the last time (for merging)."""
        p = self.pending.get(image)
        book = self.books.get(p.root) if p else None
        entry = book.get(p.key) if book else None
        return entry.added if entry else ()

    def record(self, image: Path, added: Sequence[str] = (), rehash: bool = False) -> None:
        """The image's output is written: its row now says so. `rehash`: the file itself changed (embedded tags),
        so its new size, time and hash are recorded."""
        p = self.pending.get(image)
        if p is None or p.root not in self.books:
            return
        st, sha = p.st, p.sha256
        if rehash or sha is None:
            st, sha = image.stat(), file_hash(image)
        entry = Entry(p.key, st.st_size, st.st_mtime_ns, sha, self.model, self.settings, tuple(added))
        try:
            self.books[p.root].put(entry)
        except CatalogueError as e:
            log.warning("%s; the next run tags this folder again", e)
            self.books.pop(p.root).close()

    def close(self) -> None:
        for book in self.books.values():
            try:
                book.close()
            except CatalogueError as e:
                log.warning("%s", e)
        self.books.clear()


def plan(
    items: Sequence[Item],
    dest: str | None,
    model: str,
    settings: str,
    overwrite: bool = False,
    whole: bool = True,
    workers: int | None = None,
) -> Plan:
    """Split `items` into those to tag and those unchanged since the catalogue's record of `dest`.

    `whole`: the items are every file of their folders (no --shard), so rows of files not among them are dropped.
    Files are hashed in threads, and only those whose size or time differ from their row."""
    result = Plan(list(items), model=model, settings=settings, items=list(items))
    if dest is None:
        return result
    roots = {item.path: root_of(item) for item in items}
    for root in {r for r in roots.values() if r is not None}:
        try:
            result.books[root] = Catalogue(root, dest)
        except CatalogueError as e:
            log.warning("no catalogue: %s; every file in %s is tagged", e, root)
    looked = [(it, roots[it.path]) for it in items if roots[it.path] in result.books]
    rows = {root: book.entries() for root, book in result.books.items()}
    with ThreadPoolExecutor(workers or cores()) as pool:
        states = list(pool.map(lambda pair: _state(result, rows[pair[1]].get(pair[0].key), *pair, overwrite), looked))
    fresh = {it.path for (it, _), (pending, same) in zip(looked, states, strict=True) if same}
    for (item, _), (pending, _) in zip(looked, states, strict=True):
        if pending is not None:
            result.pending[item.path] = pending
    result.todo = [it for it in items if it.path not in fresh]
    result.unchanged = len(fresh)
    result.kept = [str(p) for p in fresh]
    if whole:
        _forget_gone(result, looked)
    return result


def _state(result: Plan, entry: Entry | None, item: Item, root: Path, overwrite: bool) -> tuple[Pending | None, bool]:
    """(what the file is now, whether its row `entry` says it is tagged as it is). Runs in a worker thread."""
    try:
        st = item.path.stat()
    except OSError:
        return None, False  # the engine reports it
    if entry is None:
        return Pending(root, item.key, None, st), False
    same_model = entry.model == result.model
    if entry.same_stat(st):
        return Pending(root, item.key, entry.sha256, st, True), same_model and not overwrite
    try:
        sha = file_hash(item.path)
    except OSError:
        return None, False
    return Pending(root, item.key, sha, st, True), sha == entry.sha256 and same_model and not overwrite


def _forget_gone(result: Plan, looked: Iterable[tuple[Item, Path]]) -> None:
    present: dict[Path, set[str]] = {root: set() for root in result.books}
    for item, root in looked:
        present[root].add(item.key)
    for root, book in result.books.items():
        gone = book.keys() - present[root]
        if gone:
            book.forget(gone)


def drop_foreign(result: Plan, target: Callable[[Path], Path]) -> int:
    """txt without --overwrite or --append: images whose caption exists but is not this tool's (no row) are passed
    over, as they always were; returns how many."""
    keep, n = [], 0
    for item in result.todo:
        p = result.pending.get(item.path)
        local = isinstance(item.path, Path) and item.member is None
        if local and not (p is not None and p.known) and target(item.path) != item.path and target(item.path).exists():
            n += 1
        else:
            keep.append(item)
    result.todo = keep
    return n


class RecordingWriter:
    """A writer whose every written image is recorded in the plan's catalogues (with what it added, for merging)."""

    def __init__(self, inner: Any, result: Plan, rehash: bool = False):
        self.inner, self.plan, self.rehash = inner, result, rehash

    def write(self, record: dict, image: Path) -> None:
        self.inner.write(record, image)
        self.plan.record(image, getattr(self.inner, "added", ()), rehash=self.rehash)

    def close(self) -> None:
        self.inner.close()


def old_records(out: str, fmt: str) -> tuple[list[str] | None, dict[str, Any]]:
    """The records a previous run left in `out`, by path: (csv's header or None, path -> record or csv row).
    A file that is missing or cannot be read as `fmt` holds none (every file is then tagged again)."""
    if not storage.exists(out):
        return None, {}
    try:
        text = storage.read_text(out)
        if fmt == "csv":
            rows = list(csv.reader(io.StringIO(text)))
            return (rows[0] if rows else None), {row[0]: row for row in rows[1:] if row}
        records = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines() if line]
        return None, {r["path"]: r for r in records if isinstance(r, dict) and "path" in r}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        log.warning("%s: cannot read the records of the last run (%s); every file is tagged again", out, e)
        return None, {}


def carry_over(result: Plan, writer: Any, out: str, fmt: str, shown: Callable[[Any], str]) -> int:
    """A rerun with `--out FILE`: write the unchanged files' records from FILE as it was, through `writer` (the
    format's own, not the recording one), and put back into `todo` the unchanged files FILE no longer holds.
    Returns how many records were carried over."""
    if not result.kept:
        return 0
    header, old = old_records(out, fmt)
    if fmt == "csv" and (header is None or tuple(header) != tuple(writer.columns)):
        old = {}  # another model's heads: nothing carries over
    kept = set(result.kept)
    missing = [p for p in kept if shown(Path(p)) not in old]
    for path in sorted(kept - set(missing)):
        entry = old[shown(Path(path))]
        if fmt == "csv":
            writer.csv.writerow(entry)
        else:
            writer.write(entry, Path(path))
    if missing:
        gone = set(missing)
        result.todo.extend(it for it in result.items if str(it.path) in gone)
        result.unchanged -= len(gone)
    return len(kept) - len(missing)
