"""The posts table of a crawl directory (Parquet, `posts/*.parquet`): schema, statuses, write, read, the CSV export.

`i2v crawl` writes it; `i2v vocab`, `i2v build` and `i2v export-csv` read it. A crawl directory holds numbered parts
(`posts/000000.parquet`, ...) and `posts/failed.parquet`, the posts whose file could not be had this time.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from .categories import POST_CATEGORIES

CATEGORIES = POST_CATEGORIES
STATUSES = ("ok", "no_file", "not_image", "failed")  # what became of a post's file; the words users see
POSTS_DIR = "posts"  # in a crawl directory
PARTS = POSTS_DIR + "/{index:06d}.parquet"  # a crawl's numbered parts, relative to its directory
FAILED = POSTS_DIR + "/failed.parquet"  # the posts that failed, rewritten at the end of every run
STATE = "crawl.sqlite"  # the crawler's resume state: a crawl directory may hold it before it holds any part
_tags = pa.list_(pa.string())
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("md5", pa.string()),
        ("file_url", pa.string()),
        ("file_ext", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("rating", pa.string()),
        ("score", pa.int32()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        *[(f"tags_{c}", _tags) for c in CATEGORIES],
        ("site", pa.string()),
        ("parent_id", pa.int64()),
        ("source", pa.string()),
        ("status", pa.string()),  # ok, no_file, not_image or failed
        ("reason", pa.string()),  # why, for anything but ok
        ("shard", pa.string()),  # the tar (relative to the crawl directory) that holds the image, when ok
    ]
)


def make_row(fields: Mapping, status: str, reason: str = "", shard: str | None = None) -> dict:
    """One row of the posts table from a post's fields (the schema's names; tags as any sequence)."""
    row = {name: fields.get(name) for name in SCHEMA.names}
    for c in CATEGORIES:
        row[f"tags_{c}"] = list(fields.get(f"tags_{c}") or ())
    row.update(status=status, reason=reason, shard=shard)
    return row


def record_to_json(record: dict) -> dict:
    """A row as JSON-friendly values (timestamps as ISO strings)."""
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in record.items()}


def record_from_json(data: dict) -> dict:
    """A row back from `record_to_json`'s values."""
    value = data.get("created_at")
    return {**data, "created_at": datetime.fromisoformat(value) if value else None}


def write_posts(path: Path, records: Sequence[dict]) -> None:
    """Write rows to `path` atomically (a temporary name, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    table = pa.Table.from_pylist(list(records), schema=SCHEMA)
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def part_files(crawl_dir: Path) -> list[Path]:
    """The numbered parts of one crawl directory (not failed.parquet), in order."""
    return sorted((crawl_dir / POSTS_DIR).glob("[0-9]*.parquet"))


def post_files(dirs: Iterable[Path]) -> list[Path]:
    """Every posts Parquet file of these crawl directories; a UserError names a directory that holds none."""
    files: list[Path] = []
    for d in dirs:
        found = sorted((Path(d) / POSTS_DIR).glob("*.parquet"))
        if not found and not (Path(d) / STATE).exists():
            raise UserError(f"{d}: no posts/*.parquet here; is it a directory that `i2v crawl` wrote?")
        files += found
    return files


def read_posts(dirs: Iterable[Path], columns: Sequence[str] | None = None) -> pa.Table:
    """All posts of one or more crawl directories as one table."""
    schema = pa.schema([SCHEMA.field(c) for c in columns]) if columns else SCHEMA
    tables = [pq.read_table(f, columns=schema.names, schema=SCHEMA) for f in post_files(dirs)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def export_csv(dirs: Iterable[Path], out: TextIO | None = None) -> int:
    """The seed's tags.csv: id, md5, rating, then the tags of each category space-separated; returns rows written."""
    out = out or sys.stdout
    table = read_posts(dirs, ["id", "md5", "rating", *[f"tags_{c}" for c in CATEGORIES], "status"])
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "md5", "rating", *CATEGORIES])
    rows = 0
    for row in sorted(table.to_pylist(), key=lambda r: r["id"]):
        writer.writerow(
            [row["id"], row["md5"] or "", row["rating"] or ""] + [" ".join(row[f"tags_{c}"]) for c in CATEGORIES]
        )
        rows += 1
    return rows
