"""Where files live: a local path or an fsspec URL (`s3://`, `gs://`, `file://`, and `http(s)://` for reading).

Every format module in `formats/` opens its files through these functions, so each format learns about storage
here and nowhere else. A location is a string (or a `Path`): a plain path or `file://` URL is local and goes
through the standard library as before; anything else goes through fsspec, which reads credentials and the
endpoint from each store's own configuration (for S3 the AWS variables and profiles, `AWS_ENDPOINT_URL`
included, so MinIO, Ceph and R2 work as S3 does).

Writes are whole or absent: a local file is written under a temporary name and renamed; an object store's PUT
(and a multipart upload's completion) makes an object appear only once it is whole. Errors become one
`UserError` line that names the URL with any user:password part removed, never a secret.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import UserError

READ_ONLY = ("http", "https")  # fsspec reads these; they cannot be written
EXTRA = "pip install 'illust2vec[cloud]'"
_RETRIES = 5  # a connection lost mid-read is reopened at the same offset this many times


Location = str | Path


def scheme(loc: Location) -> str:
    """The URL scheme of `loc` ('' for a plain path; 'file' URLs count as local)."""
    text = str(loc)
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://", text)
    return m.group(1).lower() if m else ""


def is_local(loc: Location) -> bool:
    return scheme(loc) in ("", "file")


def is_remote(loc: Location) -> bool:
    return not is_local(loc)


def local_path(loc: Location) -> Path:
    """The local path of a plain path or a `file://` URL."""
    text = str(loc)
    return Path(text[len("file://") :]) if scheme(text) == "file" else Path(text)


def display(loc: Location) -> str:
    """`loc` as it may appear in a message or a file: any user:password@ part and signed query are dropped."""
    text = str(loc)
    text = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", text)
    return re.sub(r"\?.*$", "", text) if is_remote(text) else text


def location(text: Location, what: str = "path", write: bool = False) -> str | Path:
    """A checked location: a `Path` for local ones, the URL string for remote ones.

    A scheme no installed filesystem serves, or a read-only scheme given as an output, is a `UserError`.
    """
    if is_local(text):
        return local_path(text)
    url = str(text).rstrip("/")
    proto = scheme(url)
    if write and proto in READ_ONLY:
        raise UserError(f"{what} {display(url)}: {proto}:// URLs can be read but not written")
    filesystem(url)  # fails early, with the message below, if the scheme is unknown or its package missing
    return url


def filesystem(loc: Location) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a remote location."""
    import fsspec

    proto = scheme(loc)
    try:
        cls = fsspec.get_filesystem_class(proto)
    except ImportError as e:
        hint = EXTRA if proto in ("s3", "s3a", "gs", "gcs") else str(e)
        raise UserError(f"{display(loc)}: the {proto}:// filesystem is not installed; {hint}") from None
    except ValueError:
        raise UserError(f"{display(loc)}: no filesystem knows {proto}:// URLs") from None
    fs = cls()
    return fs, fs._strip_protocol(str(loc))


def join(loc: Location, *names: str) -> str | Path:
    if is_local(loc):
        return local_path(loc).joinpath(*names)
    return "/".join([str(loc).rstrip("/"), *names])


def name(loc: Location) -> str:
    return str(loc).rstrip("/").rsplit("/", 1)[-1]


def _url(loc: Location, path: str) -> str:
    """The URL of `path` (a filesystem path as fsspec lists it) in `loc`'s scheme."""
    return f"{scheme(loc)}://{path}"


# ---- errors


def _describe(e: BaseException) -> str:
    """What went wrong, in words that carry no secret (botocore's messages name no key; we add nothing)."""
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return "no such bucket"
    if "nocredentials" in low or "unable to locate credentials" in low:
        return "no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the store's own)"
    # Words, not a bare "403": a lost connection's message can carry a byte count such as "403112 bytes read"
    # (it once read as "access denied"); botocore says "Forbidden" with a 403, and s3fs raises PermissionError.
    if any(k in low for k in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden")):
        return "access denied: the credentials are wrong or lack permission"
    if isinstance(e, PermissionError):
        return "access denied: the credentials are wrong or lack permission"
    if isinstance(e, FileNotFoundError):
        return "not found"
    if any(k in low for k in ("connect", "timeout", "timed out", "connection", "endpoint")):
        return "could not reach the store (connection lost or refused); run again to resume"
    return re.sub(r"(?i)(secret|token|signature|credential)[^\s,;]*", r"\1=…", str(e)).splitlines()[0][:200]


@contextlib.contextmanager
def errors(loc: Location, action: str = "") -> Iterator[None]:
    """Turn a storage failure on a remote `loc` into one `UserError` line naming it (never a secret)."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        if is_local(loc) and isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        if is_local(loc):
            raise UserError(f"{display(loc)}: {e.strerror or e}") from None
        raise UserError(f"{display(loc)}: {action + ': ' if action else ''}{_describe(e)}") from None
    except Exception as e:  # botocore's own exceptions are not OSErrors
        if is_local(loc) or not _is_store_error(e):
            raise
        raise UserError(f"{display(loc)}: {action + ': ' if action else ''}{_describe(e)}") from None


def _is_store_error(e: BaseException) -> bool:
    module = type(e).__module__ or ""
    return module.split(".")[0] in ("botocore", "aiobotocore", "google", "aiohttp", "s3fs", "gcsfs", "fsspec")


# ---- reading


def exists(loc: Location) -> bool:
    if is_local(loc):
        return local_path(loc).exists()
    fs, path = filesystem(loc)
    with errors(loc, "cannot check"):
        return fs.exists(path)


def isdir(loc: Location) -> bool:
    if is_local(loc):
        return local_path(loc).is_dir()
    fs, path = filesystem(loc)
    with errors(loc, "cannot check"):
        return fs.isdir(path)


def size(loc: Location) -> int:
    if is_local(loc):
        return local_path(loc).stat().st_size
    fs, path = filesystem(loc)
    with errors(loc, "cannot read"):
        return int(fs.size(path))


def listing(loc: Location, pattern: str = "*") -> list[str | Path]:
    """The files directly in directory (or prefix) `loc` whose names match `pattern`, sorted by name."""
    if is_local(loc):
        return sorted(local_path(loc).glob(pattern))
    fs, path = filesystem(loc)
    with errors(loc, "cannot list"):
        fs.invalidate_cache(path)  # another process (a crawl task, a second node) may have written since
        if not fs.exists(path):
            return []
        found = fs.ls(path, detail=True)
    names = [e["name"] for e in found if e.get("type") != "directory"]
    return sorted(_url(loc, n) for n in names if fnmatch.fnmatchcase(n.rsplit("/", 1)[-1], pattern))


def walk_files(loc: Location) -> list[str | Path]:
    """Every file under `loc`, recursively, sorted."""
    if is_local(loc):
        root = local_path(loc)
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    fs, path = filesystem(loc)
    with errors(loc, "cannot list"):
        fs.invalidate_cache(path)
        return sorted(_url(loc, p) for p in fs.find(path))


def open_read(loc: Location) -> IO[bytes]:
    """A binary file open for reading; remote reads survive a connection lost mid-stream (reopened at the offset)."""
    if is_local(loc):
        return open(local_path(loc), "rb")  # noqa: SIM115
    fs, path = filesystem(loc)
    with errors(loc, "cannot open"):
        return _Resuming(fs, path, loc)


def read_bytes(loc: Location) -> bytes:
    if is_local(loc):
        return local_path(loc).read_bytes()
    with open_read(loc) as f, errors(loc, "cannot read"):
        return f.read()


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode("utf-8")


def read_range(loc: Location, start: int, length: int) -> bytes:
    """`length` bytes of `loc` from offset `start` (fewer at its end): one ranged request for a remote file, so
    reading a tar member or sniffing a file's header never fetches a whole block of the object around it."""
    if is_local(loc):
        with open(local_path(loc), "rb") as f:
            f.seek(start)
            return f.read(length)
    if length <= 0:
        return b""
    fs, path = filesystem(loc)
    with errors(loc, "cannot read"):
        for attempt in range(_RETRIES + 1):
            try:
                return fs.cat_file(path, start=start, end=start + length)
            except Exception as e:  # a connection lost (past the filesystem's own retries) is tried again
                lost = isinstance(e, OSError) or _is_store_error(e)
                if not lost or isinstance(e, (FileNotFoundError, PermissionError)) or attempt == _RETRIES:
                    raise
                time.sleep(min(0.2 * 2**attempt, 5))
    raise AssertionError("unreachable")


class _Resuming:
    """A remote file read sequentially or with seeks that reopens itself where it was when the connection drops.

    s3fs retries a range request a few times, but past those (and in filesystems that do not retry) a body cut
    short mid-stream surfaces as an error of the read; a stream of shards over hours meets that now and then,
    so we reopen at the same offset.
    """

    def __init__(self, fs: Any, path: str, loc: Location):
        self._fs, self._path, self._loc = fs, path, loc
        self._file = fs.open(path, "rb")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        for attempt in range(_RETRIES + 1):
            try:
                data = self._file.read(n)
                self._pos += len(data)
                return data
            except Exception as e:
                lost = isinstance(e, OSError) or _is_store_error(e)
                if not lost or isinstance(e, (FileNotFoundError, PermissionError)) or attempt == _RETRIES:
                    raise
                time.sleep(min(0.2 * 2**attempt, 5))
                with contextlib.suppress(Exception):
                    self._file.close()
                self._fs.invalidate_cache(self._path)
                self._file = self._fs.open(self._path, "rb")
                self._file.seek(self._pos)
        raise AssertionError("unreachable")

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._file.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Resuming:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadAhead:
    """A remote file read front to back by a background thread, up to `depth` chunks ahead of its reader: the reader
    decodes one part of a shard while the next part is on its way. The file is opened in the thread too, so opening
    the next shard costs the reader nothing; an error (after `open_read`'s own reopening of a lost
    connection) reaches the reader at the point where it happened. The training loader reads remote shards so."""

    def __init__(self, url: str, chunk: int = 1 << 20, depth: int = 16):
        self._url, self._chunk = url, chunk
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._buffer, self._pos, self._done = b"", 0, False
        self._thread = threading.Thread(target=self._fill, name="i2v-read-ahead", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            with open_read(self._url) as f:
                while not self._stop.is_set():
                    data = f.read(self._chunk)
                    self._put(data)
                    if not data:
                        return
        except Exception as e:  # handed to the reader, which raises it where the data ends
            self._put(e)

    def _put(self, item: bytes | Exception) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        parts, size = [], 0
        while (n < 0 or size < n) and not self._done:
            if self._pos >= len(self._buffer):
                item = self._queue.get()
                if isinstance(item, Exception):
                    self._done = True
                    raise item
                if not item:
                    self._done = True
                    break
                self._buffer, self._pos = item, 0
            take = len(self._buffer) - self._pos if n < 0 else min(n - size, len(self._buffer) - self._pos)
            parts.append(self._buffer[self._pos : self._pos + take])
            self._pos += take
            size += take
        return b"".join(parts)

    def close(self) -> None:
        self._stop.set()
        while not self._queue.empty():  # let a thread blocked on a full queue see the stop
            self._queue.get_nowait()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def local_copy(loc: Location) -> Iterator[Path]:
    """A local path holding `loc`'s bytes: the file itself when local, else a temporary download removed after."""
    if is_local(loc):
        yield local_path(loc)
        return
    with tempfile.TemporaryDirectory(prefix="i2v-") as tmp:
        dest = Path(tmp) / name(loc)
        download(loc, dest)
        yield dest


def download(loc: Location, dest: Path) -> None:
    """Copy `loc` to the local file `dest` (written under a temporary name, then renamed)."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".part")
    if is_local(loc):
        shutil.copyfile(local_path(loc), tmp)
    else:
        fs, path = filesystem(loc)
        with errors(loc, "cannot download"):
            fs.get_file(path, str(tmp))
    os.replace(tmp, dest)


# ---- writing


def makedirs(loc: Location) -> None:
    """Create a local directory (object stores have no directories; a bucket must already exist)."""
    if is_local(loc):
        local_path(loc).mkdir(parents=True, exist_ok=True)
        return
    check_writable_root(loc)


def check_writable_root(loc: Location) -> None:
    """For a remote output: its bucket exists and can be listed, checked before any work starts."""
    _check_bucket(loc, "cannot write")


def check_readable_root(loc: Location) -> None:
    """For a remote input found empty or missing: its bucket exists and can be listed, so that a missing bucket or
    wrong credentials are named as such, not taken for an empty directory."""
    _check_bucket(loc, "cannot read")


def _check_bucket(loc: Location, action: str) -> None:
    """List `loc`'s bucket (fresh, not from fsspec's cache): a missing bucket or a refusal becomes one line."""
    if is_local(loc):
        return
    fs, path = filesystem(loc)
    with errors(loc, action):
        fs.ls(path.split("/", 1)[0], refresh=True)


def write_bytes(loc: Location, data: bytes) -> None:
    """Write `data` to `loc` whole: local files through a temporary name and a rename, objects in one PUT."""
    if is_local(loc):
        path = local_path(loc)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(loc)
    with errors(loc, "cannot write"):
        fs.pipe_file(path, data)


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def upload(src: Path, loc: Location) -> None:
    """Copy the local file `src` to `loc`, whole or not at all (a cut multipart upload leaves no object)."""
    if is_local(loc):
        dest = local_path(loc)
        if Path(src).resolve() == dest.resolve():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return
    fs, path = filesystem(loc)
    with errors(loc, "upload failed"):
        fs.put_file(str(src), path)


def remove(loc: Location) -> None:
    """Remove a file if it is there."""
    if is_local(loc):
        local_path(loc).unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    with errors(loc, "cannot remove"):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
        fs.invalidate_cache(path)


@contextlib.contextmanager
def staged_dir(loc: Location, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local directory to write an output directory into; for a remote `loc`, uploaded to it when the block ends.

    Local outputs are written in place (the block gets `loc` itself). For a remote one the files are uploaded
    in name order, those named in `last` at the end, so the file that says the rest is whole (`dataset.json`,
    `index.json`) appears only once the rest is there. Nothing is uploaded if the block raises.
    """
    if is_local(loc):
        path = local_path(loc)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    check_writable_root(loc)
    with tempfile.TemporaryDirectory(prefix="i2v-stage-") as tmp:
        root = Path(tmp)
        yield root
        upload_tree(root, loc, last=last)


def upload_tree(root: Path, loc: Location, last: tuple[str, ...] = ()) -> None:
    """Upload every file under the local directory `root` to `loc`, the names in `last` after the others."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for p in files:
        upload(p, join(loc, *p.relative_to(root).parts))
