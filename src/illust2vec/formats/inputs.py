"""The inputs of the batch stages (`i2v tag`, `i2v embed`, `i2v quantize`'s calibration images): the files, folders,
URL prefixes and tar shards named on the command line, walked into a list of items, each read by `read_item`.

A folder is walked in sorted order (its subfolders with `recursive`; hidden names passed over, as `ls` does); under
an `s3://` or `gs://` prefix every object is a file, and an `http(s)://` URL is one file. A WebDataset tar shard
(`*.tar`, named or found) is replaced by its members, each an item named `SHARD/MEMBER` read by its offset
(`formats.shards`), never unpacked; a shard cut short gives its readable members and one failing item, and a shard
that cannot be listed at all is one failing item, named. Which items are images is for the reader to tell.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..util import storage
from .shards import Member, read_member, scan_shard

SHARD_SUFFIX = ".tar"  # a file so named, given or found in a folder, is a WebDataset shard: its members are items

Loc = Path | str  # a local path, or a URL (`s3://...`) as a string


def suffix(loc: Loc) -> str:
    """A path's or URL's suffix, lower case (".jpg"; "" for none)."""
    name = storage.name(loc)
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


@dataclass(frozen=True)
class Item:
    """A file, or a member of a tar shard: where it is, the name it is sharded by, and whether the user named it
    (not found in a walk)."""

    path: Loc  # a URL is a str; a member's is SHARD/MEMBER: the shard's path as found, then its name inside it
    key: str  # its path relative to the argument it was found under: the same on every machine of a job array
    named: bool
    member: Member | None = None  # where a shard member's bytes lie
    error: tuple[str, str] | None = None  # (message, reason): a shard that could not be listed, failed in turn

    @property
    def shard(self) -> Loc | None:
        """The tar shard this item lies in (or is, when it could not be listed); None for a plain file."""
        if self.member is not None:
            return self.member.shard
        return self.path if self.error is not None else None


def discover(paths: Sequence[str], recursive: bool, summary: Any = None, expand: bool = True) -> list[Item]:
    """Every file under the paths (local, or URLs), in a stable order (files as given, folders sorted), each once;
    subfolders not entered (without `recursive`) are counted in `summary.subfolders_skipped` when a summary (a
    `BatchSummary`) is given. Tar shards are replaced by their members unless `expand` is false (`--ray` lists
    shards and reads them in its tasks).

    Hidden files and folders (a leading dot) are passed over in folders, as `ls` does. A path that does not exist
    is the user's mistake.
    """
    items: list[Item] = []
    seen: set[str] = set()
    for arg in paths:
        if storage.is_remote(arg):
            found: Iterable[Item] = _remote(arg, recursive, summary)
        else:
            found = _local(arg, recursive, summary)
        for item in _expand_shards(found) if expand else found:
            ident = str(item.path) if storage.is_remote(item.path) else os.path.normpath(os.path.abspath(item.path))
            if ident not in seen:
                seen.add(ident)
                items.append(item)
    return items


def _local(arg: str, recursive: bool, summary: Any) -> Iterable[Item]:
    root = storage.local_path(arg)
    if root.is_file():
        return [Item(root, root.name, True)]
    if root.is_dir():
        return _walk(root, recursive, summary)
    if root.exists():
        raise UserError(f"{arg}: neither a file nor a folder")
    raise UserError(f"{arg}: no such file or folder")


def _remote(arg: str, recursive: bool, summary: Any) -> list[Item]:
    """A URL: one file, or every file under a prefix (sorted; hidden names and, without `recursive`, subfolders
    passed over as in a local folder). An http(s) URL is one file (such servers cannot be listed)."""
    loc = str(storage.location(arg, "input"))
    if storage.scheme(loc) in storage.READ_ONLY:
        return [Item(loc, storage.name(loc), True)]
    if not storage.isdir(loc):
        if not storage.exists(loc):
            storage.check_readable_root(loc)  # a missing bucket or wrong credentials, named as such
            raise UserError(f"{storage.display(arg)}: no such file or folder")
        return [Item(loc, storage.name(loc), True)]
    items, subdirs = [], set()
    for url in storage.walk_files(loc):
        rel = str(url)[len(loc) + 1 :]
        parts = rel.split("/")
        if not rel or rel.endswith("/") or any(p.startswith(".") for p in parts):
            continue
        if len(parts) > 1 and not recursive:
            subdirs.add(parts[0])
            continue
        items.append(Item(str(url), rel, False))
    if summary is not None:
        summary.subfolders_skipped += len(subdirs)
    return items


def _walk(root: Path, recursive: bool, summary: Any) -> Iterator[Item]:
    for dirpath, dirnames, filenames in os.walk(root):
        subdirs = sorted(d for d in dirnames if not d.startswith("."))
        if not recursive:
            if summary is not None:
                summary.subfolders_skipped += len(subdirs)
            subdirs = []
        dirnames[:] = subdirs
        for name in sorted(filenames):
            if not name.startswith("."):
                path = Path(dirpath) / name
                yield Item(path, path.relative_to(root).as_posix(), False)


def is_shard(item: Item) -> bool:
    """Whether an item is a whole tar shard, not yet replaced by its members (`discover(..., expand=False)`)."""
    return item.member is None and item.error is None and suffix(item.path) == SHARD_SUFFIX


def _expand_shards(found: Iterable[Item]) -> Iterator[Item]:
    """Files as they are; a tar shard -> its members (json, txt... among them, passed over later as non-images)."""
    for item in found:
        if suffix(item.path) == SHARD_SUFFIX:
            yield from shard_items(item)
        else:
            yield item


def shard_items(shard: Item) -> list[Item]:
    """The members of a tar shard as items (`SHARD/MEMBER`, keyed `KEY/MEMBER`), in the shard's order. A shard cut
    short (a half-copied file) gives its readable members and one failing item for the rest; a shard that cannot be
    listed at all (not a tar, unreadable) is one failing item, named."""
    try:
        scan = scan_shard(shard.path)
    except (OSError, UserError) as e:
        return [Item(shard.path, shard.key, True, error=(f"cannot read ({why(e, shard.path)})", "unreadable"))]
    items = []
    for m in scan.members:
        name = f"{m.key}.{m.ext}" if m.ext else m.key
        items.append(Item(storage.join(shard.path, name), f"{shard.key}/{name}", False, member=m))
    if scan.problem:  # "not a readable tar (...)", or "cut short at N bytes, after M readable members"
        items.append(Item(shard.path, shard.key, True, error=(scan.problem, "corrupt")))
    return items


def why(e: OSError | UserError, loc: Loc) -> str:
    """What went wrong reading `loc`, without its name (the report line names it already)."""
    if isinstance(e, OSError):
        return str(e.strerror or e)
    text, prefix = str(e), storage.display(loc) + ": "
    return text[len(prefix) :] if text.startswith(prefix) else text


def read_item(item: Item) -> bytes:
    """An item's bytes: a local file's, an object's at a URL, or a shard member's (one ranged read).

    Raises:
        OSError, UserError: it cannot be read (`why` says how); a shard that could not be listed is an OSError
            with its message.
    """
    if item.error is not None:
        raise OSError(item.error[0])
    if item.member is not None:
        data = read_member(item.member)
        if len(data) < item.member.size:
            raise OSError(f"cut short: {len(data)} of {item.member.size} bytes in the shard")
        return data
    if storage.is_remote(item.path):
        return storage.read_bytes(item.path)
    return Path(item.path).read_bytes()
