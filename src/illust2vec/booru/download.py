"""Fetching a post's file (verified against its md5) and writing files into tar shards that are never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .client import Client, GaveUp


class DownloadFailed(Exception):
    """The file could not be had intact after every attempt; the message is the reason recorded."""


async def fetch_verified(client: Client, url: str, md5: str, attempts: int) -> bytes:
    """Download `url` and check its md5; a mismatch or a broken transfer is retried, then DownloadFailed."""
    reason = "no attempt made"
    for _ in range(max(1, attempts)):
        try:
            response = await client.get(url, kind="file")
        except GaveUp as e:
            raise DownloadFailed(str(e)) from e
        if response.status_code >= 400:
            # 404 and the like: the board lists a file it does not serve; retrying will not help.
            raise DownloadFailed(f"HTTP {response.status_code}")
        data = response.content
        if hashlib.md5(data).hexdigest() == md5.lower():
            return data
        client.stats["md5_mismatch"] += 1
        reason = f"md5 mismatch ({len(data)} bytes received)"
    raise DownloadFailed(f"{reason} after {attempts} attempts")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to the crawl directory, e.g. images/000003.tar
    count: int
    bytes: int


class ShardWriter:
    """Writes WebDataset-style tar shards (`{key}.{ext}` and `{key}.json` per sample).

    Each shard is written as `NAME.tar.tmp` and renamed to `NAME.tar` only once complete and synced to disk, so
    a crash never leaves a partial shard that looks whole. The standard library's tarfile is what webdataset's
    own writer wraps; using it directly keeps the crawler free of the training extra.
    """

    def __init__(self, root: Path, subdir: str = "images", first_index: int = 0):
        self.root = root
        self.dir = root / subdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.subdir = subdir
        self.index = first_index
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self.count = 0
        self.bytes = 0

    @property
    def name(self) -> str:
        return f"{self.subdir}/{self.index:06d}.tar"

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: `files` maps an extension (jpg, json, ...) to its bytes."""
        if self._tar is None:
            # Kept open across calls and closed in close(): a context manager cannot span them.
            self._file = open(self.root / (self.name + ".tmp"), "wb")  # noqa: SIM115
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        now = time.time()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), now, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)
        self.count += 1

    def close(self) -> ShardInfo | None:
        """Finish the current shard: sync it and give it its final name. None when nothing was added."""
        if self._tar is None:
            return None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.root / (self.name + ".tmp"), self.root / self.name)
        info = ShardInfo(self.name, self.count, self.bytes)
        self._tar, self._file = None, None
        self.count, self.bytes = 0, 0
        self.index += 1
        return info

    def abort(self) -> None:
        """Drop the shard being written (after an error); its samples will be fetched again on resume."""
        if self._tar is not None:
            for closable in (self._tar, self._file):
                with contextlib.suppress(OSError):
                    closable.close()
            (self.root / (self.name + ".tmp")).unlink(missing_ok=True)
        self._tar, self._file = None, None
        self.count, self.bytes = 0, 0


def sample_json(record: dict) -> bytes:
    """The `.json` member of a sample: the post's record, readable without the Parquet."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True, default=str).encode()
