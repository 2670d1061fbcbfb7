"""The catalogue of `i2v tag`: what was tagged, so that a rerun tags only files that are new or changed.

One SQLite file per tagged folder, `.i2v-catalogue.sqlite`, a dot-file (the engine passes over hidden files, so it
is never taken for an image). It holds one row per file and destination, where the destination names what was
written (`txt`, `hydrus`, `xmp:ext`, `xmp:stem`, `embed`, or `jsonl:/abs/out.jsonl`): tagging a folder to one
destination says nothing about another. A row holds the file's path relative to the folder, its size, modification
time and sha256 when it was tagged (for `embed`, after the tags were written into it), the model's weights hash, the
hash of the settings (thresholds, rules) and the tags this tool added to a caption or sidecar that held others.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

NAME = ".i2v-catalogue.sqlite"
FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    destination TEXT NOT NULL, key TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL, model TEXT NOT NULL, settings TEXT NOT NULL, added TEXT NOT NULL,
    PRIMARY KEY (destination, key)
);
"""


class CatalogueError(Exception):
    """The catalogue cannot be opened or written (a read-only folder, a file of another kind or version)."""


@dataclass(frozen=True)
class Entry:
    """One file as it was when tagged for one destination."""

    key: str  # its path relative to the catalogue's folder, with "/"
    size: int
    mtime_ns: int
    sha256: str
    model: str  # the model's weights hash
    settings: str  # the hash of what decided its tags (thresholds, rules, naming)
    added: tuple[str, ...] = ()  # tags this tool added to a caption or sidecar that held others

    def same_stat(self, st: os.stat_result) -> bool:
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's content, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Catalogue:
    """The rows of one folder's catalogue for one destination. Writes are committed in batches and on `close`."""

    def __init__(self, folder: str | os.PathLike, destination: str):
        self.path = Path(folder) / NAME
        self.destination = destination
        self._pending = 0
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
                self.db.commit()
            elif row[0] != str(FORMAT_VERSION):
                raise CatalogueError(f"{self.path}: catalogue version {row[0]}, this illust2vec reads {FORMAT_VERSION}")
        except sqlite3.Error as e:
            raise CatalogueError(f"{self.path}: {e}") from None

    def get(self, key: str) -> Entry | None:
        row = self.db.execute(
            "SELECT key, size, mtime_ns, sha256, model, settings, added FROM entries WHERE destination = ? AND key = ?",
            (self.destination, key),
        ).fetchone()
        return None if row is None else Entry(*row[:6], tuple(json.loads(row[6])))

    def entries(self) -> dict[str, Entry]:
        """Every row of this destination, by key (one query; sqlite3 objects stay in the thread that made them)."""
        rows = self.db.execute(
            "SELECT key, size, mtime_ns, sha256, model, settings, added FROM entries WHERE destination = ?",
            (self.destination,),
        )
        return {r[0]: Entry(*r[:6], tuple(json.loads(r[6]))) for r in rows}

    def keys(self) -> set[str]:
        rows = self.db.execute("SELECT key FROM entries WHERE destination = ?", (self.destination,))
        return {r[0] for r in rows}

    def put(self, entry: Entry) -> None:
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (self.destination, entry.key, entry.size, entry.mtime_ns, entry.sha256, entry.model, entry.settings,
                 json.dumps(list(entry.added), ensure_ascii=False)),
            )  # fmt: skip
            self._pending += 1
            if self._pending >= 256:
                self.commit()
        except sqlite3.Error as e:
            raise CatalogueError(f"{self.path}: {e}") from None

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the rows of files that are gone."""
        self.db.executemany(
            "DELETE FROM entries WHERE destination = ? AND key = ?", [(self.destination, k) for k in keys]
        )
        self.commit()

    def commit(self) -> None:
        try:
            self.db.commit()
        except sqlite3.Error as e:
            raise CatalogueError(f"{self.path}: {e}") from None
        self._pending = 0

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.db.close()
