"""Splitting work between the machines of a job array: `--shard I/N` and which part an item belongs to."""

from __future__ import annotations

import zlib

from ..errors import UserError


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N) with 0 <= I < N (job-array task ids start at 0)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes I/N, e.g. 0/10, not {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= I < N")
    return i, n


def check_shard(shard: tuple[int, int] | str) -> tuple[int, int]:
    """(I, N) as a tuple of ints if 0 <= I < N, else a UserError naming it as `--shard I/N`."""
    if isinstance(shard, str):
        return parse_shard(shard)
    try:
        i, n = shard
    except (TypeError, ValueError):
        raise UserError(f"--shard takes two integers I and N, not {shard!r}") from None
    if not (isinstance(i, int) and isinstance(n, int)):
        raise UserError(f"--shard takes two integers I and N, not {shard!r}")
    return parse_shard(f"{i}/{n}")


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    """Whether an item belongs to part I of N: by a hash of its key (a file's relative path), so every machine of a
    job array agrees without coordination, and an item added meanwhile moves no other item."""
    i, n = shard
    return n == 1 or zlib.crc32(key.encode("utf-8", "surrogateescape")) % n == i
