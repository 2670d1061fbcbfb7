"""Fetching a post's file, verified against its md5, with retries for broken transfers."""

from __future__ import annotations

import hashlib

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
