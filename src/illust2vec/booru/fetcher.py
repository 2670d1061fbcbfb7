"""Fetching a post's file: what is worth fetching, the download verified against its md5, and the resize.

A transfer that breaks or whose bytes do not match the md5 is retried; a file that is still bad, or that does not
decode, becomes a `Failed` with the reason recorded for the post.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import Executor

from ..util.images import BadImage, Stored, shrink
from .client import Client, GaveUp
from .sites import IMAGE_EXTS


class Failed(Exception):
    """The file could not be had intact, or not decoded; the message is the reason recorded."""


def skip(record: dict, keep_non_images: bool) -> tuple[str, str] | None:
    """(status, reason) for a post whose file is not fetched (no_file, not_image); None for one to fetch."""
    if not (record["md5"] and record["file_url"]):
        return "no_file", "the board shows no file (deleted, banned or restricted)"
    if record["file_ext"] not in IMAGE_EXTS and not keep_non_images:
        return "not_image", f"{record['file_ext'] or 'unknown'} file"
    return None


async def fetch_verified(client: Client, url: str, md5: str, attempts: int) -> bytes:
    """Download `url` and check its md5; a mismatch or a broken transfer is retried, then Failed."""
    reason = "no attempt made"
    for _ in range(max(1, attempts)):
        try:
            response = await client.get(url, kind="file")
        except GaveUp as e:
            raise Failed(str(e)) from e
        if response.status_code >= 400:
            # 404 and the like: the board lists a file it does not serve; retrying will not help.
            raise Failed(f"HTTP {response.status_code}")
        data = response.content
        if hashlib.md5(data).hexdigest() == md5.lower():
            return data
        client.stats["md5_mismatch"] += 1
        reason = f"md5 mismatch ({len(data)} bytes received)"
    raise Failed(f"{reason} after {attempts} attempts")


async def fetch(
    client: Client, record: dict, pool: Executor, image_size: int | None, attempts: int
) -> tuple[Stored, int]:
    """The post's file as stored (an image shrunk to `image_size` in `pool`, anything else as is) and the number of
    bytes downloaded. Raises Failed with the reason to record.
    """
    data = await fetch_verified(client, record["file_url"], record["md5"], attempts)
    if record["file_ext"] not in IMAGE_EXTS:  # a kept non-image: stored as is
        return Stored(data, record["file_ext"], record["width"], record["height"], 0, 0), len(data)
    try:
        stored = await asyncio.get_running_loop().run_in_executor(pool, shrink, data, image_size)
    except BadImage as e:
        raise Failed(str(e)) from e
    except Exception as e:  # noqa: BLE001 (a broken file may make the decoder raise anything)
        raise Failed(f"cannot decode ({type(e).__name__}: {e})") from e
    return stored, len(data)
