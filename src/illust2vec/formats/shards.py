"""WebDataset-style tar shards: a writer that never leaves a half shard looking whole, readers, and the crawl's
raw image shards (`images/NNNNNN.tar`, each post as `{md5}.{ext}` and `{md5}.json`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TMP = ".tmp"  # a shard being written is NAME.tmp until it is whole
IMAGES_DIR = "images"  # in a crawl directory
IMAGE_SHARDS = IMAGES_DIR + "/{index:06d}.tar"  # a crawl's raw image shards, relative to its directory


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to the writer's root, e.g. images/000003.tar
    count: int
    bytes: int


class ShardWriter:
    """Writes tar shards of samples (`{key}.{ext}` members, one sample after another), one shard at a time.

    Each shard is written as `NAME.tmp` and renamed to NAME only once complete and synced to disk, so a crash
    never leaves a partial shard that looks whole. The standard library's tarfile is what webdataset's own writer
    wraps; using it directly keeps the crawler free of the training extra.
    """

    def __init__(self, root: Path, pattern: str = "{index:06d}.tar", first_index: int = 0):
        self.root = root
        self.pattern = pattern
        self.index = first_index
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self.count = 0
        self.bytes = 0

    @property
    def name(self) -> str:
        return self.pattern.format(index=self.index)

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: `files` maps an extension (jpg, json, ...) to its bytes."""
        if self._tar is None:
            path = self.root / (self.name + TMP)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Kept open across calls and closed in close(): a context manager cannot span them.
            self._file = open(path, "wb")  # noqa: SIM115
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
        os.replace(self.root / (self.name + TMP), self.root / self.name)
        info = ShardInfo(self.name, self.count, self.bytes)
        self._tar, self._file = None, None
        self.count, self.bytes = 0, 0
        self.index += 1
        return info

    def abort(self) -> None:
        """Drop the shard being written (after an error)."""
        if self._tar is not None:
            for closable in (self._tar, self._file):
                with contextlib.suppress(OSError):
                    closable.close()
            (self.root / (self.name + TMP)).unlink(missing_ok=True)
        self._tar, self._file = None, None
        self.count, self.bytes = 0, 0


def split_name(member: str) -> tuple[str, str]:
    """`key.ext` -> (key, ext), splitting at the first dot of the base name, as WebDataset does."""
    folder, _, base = member.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext


def iter_samples(paths: Iterable[Path], exts: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of these shards in order, as (key, {ext: bytes}); members of one sample are adjacent.

    With `exts`, only those members are read (e.g. the labels without the images).
    """
    wanted = set(exts) if exts is not None else None
    for path in paths:
        with tarfile.open(path) as tar:
            key, files = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_name(member.name)
                if k != key and files:
                    yield key, files
                    files = {}
                key = k
                if wanted is None or ext in wanted:
                    files[ext] = tar.extractfile(member).read()
            if files:
                yield key, files


@dataclass(frozen=True)
class Member:
    """Where one file lies inside a tar: enough to read it back without reading the tar."""

    shard: Path
    key: str
    ext: str
    offset: int
    size: int


def index_shard(path: Path) -> list[Member]:
    """The files of a shard and their byte offsets (reads only the headers)."""
    with tarfile.open(path) as tar:
        return [Member(path, *split_name(m.name), m.offset_data, m.size) for m in tar if m.isfile()]


def read_member(member: Member) -> bytes:
    with open(member.shard, "rb") as f:
        f.seek(member.offset)
        return f.read(member.size)


def sample_json(record: dict) -> bytes:
    """A sample's `.json` member."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True, default=str).encode()


def image_sample(md5: str, ext: str, data: bytes, meta: dict) -> tuple[str, dict[str, bytes]]:
    """A raw image shard's sample, as (key, files) for ShardWriter.add: the file as `{md5}.{ext}` (jpg, png, ...,
    or zip/mp4 when a crawl keeps non-images), its post record as `{md5}.json`."""
    return md5, {ext: data, "json": sample_json(meta)}


def image_shards(crawl_dir: Path) -> list[Path]:
    """The raw image shards of a crawl directory, in order."""
    return sorted((Path(crawl_dir) / IMAGES_DIR).glob("*.tar"))


def image_members(path: Path) -> dict[str, Member]:
    """The files of a raw image shard by md5 (their `.json` records left out); empty when the shard is missing."""
    if not Path(path).is_file():
        return {}
    return {m.key: m for m in index_shard(path) if m.ext != "json"}
