"""WebDataset-style tar shards: a writer that never leaves a half shard looking whole, readers, and the crawl's
raw image shards (`images/NNNNNN.tar`, each post as `{md5}.{ext}` and `{md5}.json`).

The readers take a local path or a URL (`s3://`, `gs://`, `http(s)://`, through `util.storage`): a remote shard is
streamed (`iter_samples`, `scan_shard`, `index_shard` read it front to back, never to disk) and a member is one
ranged read (`read_member`), so a shard is never downloaded whole to tag a few of its images.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..util import storage

TMP = ".tmp"  # a shard being written is NAME.tmp until it is whole
IMAGES_DIR = "images"  # in a crawl directory
IMAGE_SHARDS = IMAGES_DIR + "/{index:06d}.tar"  # a crawl's raw image shards, relative to its directory


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to the writer's root, e.g. images/000003.tar
    count: int
    bytes: int  # the samples' bytes
    size: int = 0  # the tar file's bytes, as written
    sha256: str = ""  # the tar file's sha256, hex, as written


class _Hashing:
    """A file being written, hashed (sha256) and counted as it goes: the shard's checksum costs no second read."""

    def __init__(self, file):
        self.file, self.hash, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()


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
        self._hashing: _Hashing | None = None
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
            self._hashing = _Hashing(self._file)
            self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
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
        info = ShardInfo(self.name, self.count, self.bytes, self._hashing.size, self._hashing.hash.hexdigest())
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


@dataclass(frozen=True)
class Member:
    """Where one file lies inside a tar: enough to read it back without reading the tar."""

    shard: Path | str  # a local path, or the shard's URL
    key: str
    ext: str
    offset: int
    size: int


class ShardError(UserError):
    """A shard that cannot be read to its end (cut short, not a tar): one line naming it."""


@contextlib.contextmanager
def _open_tar(loc: Path | str, stream: bool = False) -> Iterator[tarfile.TarFile]:
    """A tar open for reading: a local file as tarfile opens it; a remote one through `storage.open_read`, read in
    order (`stream`: tarfile's streaming mode, no seeks at all) or with forward seeks past the members' data."""
    if storage.is_local(loc):
        with tarfile.open(storage.local_path(loc)) as tar:
            yield tar
        return
    with storage.open_read(loc) as f, tarfile.open(fileobj=f, mode="r|*" if stream else "r") as tar:
        yield tar


def iter_samples(
    paths: Iterable[Path | str], exts: Iterable[str] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of these shards in order, as (key, {ext: bytes}); members of one sample are adjacent.

    With `exts`, only those members are read (e.g. the labels without the images). A shard that is cut short or not
    a tar raises ShardError (a UserError) naming it, after the samples read before the break.
    """
    wanted = set(exts) if exts is not None else None
    for path in paths:
        n = 0
        try:
            with _open_tar(path, stream=True) as tar:
                key, files = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = split_name(member.name)
                    if k != key and files:
                        yield key, files
                        n, files = n + 1, {}
                    key = k
                    if wanted is None or ext in wanted:
                        files[ext] = tar.extractfile(member).read()
                if files:
                    yield key, files
        except (tarfile.TarError, EOFError) as e:
            raise ShardError(f"{path}: cannot be read past sample {n} ({e}); a half-copied file?") from None


@dataclass(frozen=True)
class ShardScan:
    """A shard's readable members, and what is wrong with the rest ("" when the shard is whole)."""

    members: list[Member]
    problem: str = ""


def scan_shard(path: Path | str) -> ShardScan:
    """The members of a shard whose bytes all lie in the file (reads only the headers), and, for a shard cut short (a
    half-copied file, a broken stream) or not a tar at all, what is wrong: a whole tar ends with a zero block after
    its last member, so a shard cut anywhere, even between two members, is told from a whole one."""
    size = storage.size(path)
    shard = storage.local_path(path) if storage.is_local(path) else str(path)
    members: list[Member] = []
    try:
        with _open_tar(path) as tar:
            try:
                for m in tar:
                    if m.isfile() and m.offset_data + m.size <= size:
                        members.append(Member(shard, *split_name(m.name), m.offset_data, m.size))
                error = None
            except (tarfile.TarError, EOFError) as e:
                error = e
            end = tar.offset
    except (tarfile.TarError, EOFError) as e:
        return ShardScan([], f"not a readable tar ({e})")
    if error is not None or end + tarfile.BLOCKSIZE > size:
        return ShardScan(members, f"cut short at {size} bytes, after {len(members)} readable members")
    return ShardScan(members)


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file (local, or a URL read as a stream), hex: what `sha256sum` prints."""
    digest = hashlib.sha256()
    with storage.open_read(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def index_shard(path: Path | str) -> list[Member]:
    """The files of a shard and their byte offsets (reads only the headers)."""
    with _open_tar(path) as tar:
        return [Member(path, *split_name(m.name), m.offset_data, m.size) for m in tar if m.isfile()]


def read_member(member: Member) -> bytes:
    """A member's bytes, read at its offset (one ranged request for a remote shard); fewer than `member.size` when
    the shard has been cut short inside it."""
    return storage.read_range(member.shard, member.offset, member.size)


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
    """The readable files of a raw image shard by md5 (their `.json` records left out; see `scan_shard` for a shard
    cut short); empty when the shard is missing."""
    if not Path(path).is_file():
        return {}
    return {m.key: m for m in scan_shard(path).members if m.ext != "json"}
