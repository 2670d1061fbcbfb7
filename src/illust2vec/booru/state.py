"""The crawl's resume state in SQLite (`crawl.sqlite`, local only): config, listing cursor, posts, committed files.

Like gallery-dl's download archive, it is the crawl's memory: every post listed and its status, the cursor of the
listing, the files written and committed, and the categories of the tags of flat-tag sites.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from ..errors import UserError
from ..formats.posts import STATE, STATUSES, record_from_json, record_to_json


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

    @classmethod
    def open(cls, out: Path, identity: dict) -> State:
        """The state kept in directory `out` (created if new); a UserError if it holds a crawl of other options."""
        try:
            out.mkdir(parents=True, exist_ok=True)
            state = cls(out / STATE)
        except (OSError, sqlite3.Error) as e:
            raise UserError(f"cannot use {out} for the crawl: {e}") from e
        try:
            saved = state.get("identity")
            if saved is None:
                state.set("identity", identity)
            elif saved != identity:
                raise UserError(
                    f"{out} holds another crawl ({json.dumps(saved)}); "
                    "resume it with the same options or use another --out"
                )
        except BaseException:
            state.close()
            raise
        return state

    def close(self) -> None:
        self.db.close()

    def get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # Posts

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

    def statuses(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self.db.execute("SELECT status, COUNT(*) FROM posts GROUP BY status"):
            counts[status] = n
        return counts

    # Committed files

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

    def forget(self, missing: set[str]) -> set[str]:
        """Files recorded but gone from the output: the posts of their batches go back to pending, to be fetched
        again, and the batches' records go. Returns the other file of each batch (a shard's part, a part's shard),
        which is still in the output and must go too, or its posts would be there twice."""
        names = sorted(missing)
        batches: set[str] = set()
        for i in range(0, len(names), 400):
            chunk = names[i : i + 400]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT DISTINCT part, shard FROM posts WHERE part IN ({marks}) OR shard IN ({marks})"
            for part, shard in self.db.execute(q, chunk + chunk):
                batches |= {n for n in (part, shard) if n}
        batches |= set(names)
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE posts SET status='pending', reason='', part=NULL, shard=NULL WHERE part=?",
                [(n,) for n in sorted(batches)],
            )
            self.db.executemany("DELETE FROM files WHERE name=?", [(n,) for n in sorted(batches)])
        return batches - set(names)

    def next_index(self, prefix: str) -> int:
        """The number after the highest committed file under `prefix/` (`images`, `posts`); 0 if none."""
        names = [n for n in self.files() if n.startswith(prefix + "/")]
        return 1 + max((int(Path(n).name.split(".")[0]) for n in names), default=-1)

    # Tag categories (flat-tag sites)

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
