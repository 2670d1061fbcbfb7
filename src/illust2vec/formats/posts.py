"""The posts table of a crawl directory (Parquet, `posts/*.parquet`): schema, statuses, write, read, the CSV export.

`i2v crawl` writes it; `i2v vocab`, `i2v build` and `i2v export-csv` read it. A crawl directory holds numbered parts
(`posts/000000.parquet`, ...) and `posts/failed.parquet`, the posts whose file could not be had this time. The readers
take a local directory or a URL (`s3://bucket/crawl`, `gs://...`, `https://...`), through `util/storage`; the crawler
writes its parts locally and uploads them.
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
from ..util import storage
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


def part_files(crawl_dir: storage.Location) -> list[storage.Location]:
    """The numbered parts of one crawl directory (not failed.parquet), in order: paths, or URLs for a remote one."""
    return storage.listing(storage.join(crawl_dir, POSTS_DIR), "[0-9]*.parquet")


def post_files(dirs: Iterable[storage.Location]) -> list[storage.Location]:
    """Every posts Parquet file of these crawl directories (local or URLs); a UserError names a directory that holds
    none."""
    files: list[storage.Location] = []
    for d in dirs:
        found = storage.listing(storage.join(d, POSTS_DIR), "*.parquet")
        if not found and not storage.exists(storage.join(d, STATE)):
            storage.check_readable_root(d)  # a missing bucket or wrong credentials, named as such
            raise UserError(f"{storage.display(d)}: no posts/*.parquet here; is it a directory that `i2v crawl` wrote?")
        files += found
    return files


def read_part(path: storage.Location, columns: Sequence[str] | None = None) -> pa.Table:
    """One posts Parquet file (a local path or a URL), with these columns (all when None)."""
    names = list(columns) if columns else SCHEMA.names
    if storage.is_local(path):
        return pq.read_table(storage.local_path(path), columns=names, schema=SCHEMA)
    # A part is small (thousands of posts): read whole in one request rather than by seeks over the network.
    with storage.errors(path, "cannot read"):
        return pq.read_table(pa.BufferReader(storage.read_bytes(path)), columns=names, schema=SCHEMA)


def read_posts(dirs: Iterable[storage.Location], columns: Sequence[str] | None = None) -> pa.Table:
    """All posts of one or more crawl directories (local or URLs) as one table."""
    schema = pa.schema([SCHEMA.field(c) for c in columns]) if columns else SCHEMA
    tables = [read_part(f, schema.names) for f in post_files(dirs)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def export_csv(dirs: Iterable[storage.Location], out: TextIO | None = None) -> int:
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
