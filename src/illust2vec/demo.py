"""`i2v demo`: run every stage that exists on the synthetic board, offline, and say what each did."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .synth.cast import SynthConfig
from .synth.server import start_board

log = logging.getLogger(__name__)

# Stages of DESIGN.md that the demo will run once they exist.
TO_COME = ["crawl", "vocab", "build", "train", "evaluate", "export", "tag", "embed/index/similar", "serve"]


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("demo-out")
    posts: int = 300
    seed: int = 0
    page_size: int = 40


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """Serve the synthetic board, read a page of posts, fetch and verify their files; returns the summary."""
    console = console or Console(stderr=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"stages": {}}
    t0 = time.perf_counter()
    with start_board(SynthConfig(posts=cfg.posts, seed=cfg.seed)) as server:
        summary["stages"]["fakebooru"] = {"url": server.url, "posts": len(server.board.posts)}
        console.print(f"[bold]fakebooru[/] serving {len(server.board.posts)} synthetic posts at {server.url}")
        with httpx.Client(base_url=server.url, timeout=30) as client:
            page = client.get("/posts.json", params={"limit": cfg.page_size}).raise_for_status().json()
            (cfg.out / "posts-page.json").write_text(json.dumps(page, indent=1))
            thumbs, counts = _fetch(client, page, console)
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    summary["stages"]["read"] = counts
    sheet = cfg.out / "contact-sheet.jpg"
    _contact_sheet(thumbs).save(sheet, quality=88)
    summary["contact_sheet"] = str(sheet)
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1))

    table = Table(title="read one page of the synthetic board")
    for key in ("posts", "images_verified", "md5_mismatch", "not_image", "no_file", "seconds"):
        table.add_column(key)
    table.add_row(
        *(str(counts[k]) for k in ("posts", "images_verified", "md5_mismatch", "not_image", "no_file", "seconds"))
    )
    console.print(table)
    console.print(f"formats seen: {counts['formats']}")
    console.print(f"wrote {cfg.out / 'posts-page.json'}, {sheet}")
    console.print("[yellow]still to come:[/] " + ", ".join(TO_COME))
    return summary


def _fetch(client: httpx.Client, page: list[dict], console: Console):
    counts = {"posts": len(page), "images_verified": 0, "md5_mismatch": 0, "not_image": 0, "no_file": 0, "formats": {}}
    thumbs = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("fetching files", total=len(page))
        for post in page:
            progress.advance(task)
            if "file_url" not in post:
                counts["no_file"] += 1
                continue
            data = client.get(post["file_url"]).raise_for_status().content
            if hashlib.md5(data).hexdigest() != post["md5"]:
                counts["md5_mismatch"] += 1
                log.warning("post %s: file does not match its md5", post["id"])
                continue
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except OSError:
                counts["not_image"] += 1
                continue
            counts["images_verified"] += 1
            counts["formats"][image.format] = counts["formats"].get(image.format, 0) + 1
            thumbs.append((image, post.get("tag_string_character") or "original"))
    return thumbs, counts


def _contact_sheet(thumbs: list[tuple[Image.Image, str]], cell: int = 200, cols: int = 8) -> Image.Image:
    rows = max(1, -(-len(thumbs) // cols))
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(thumbs):
        img = image.convert("RGBA")
        flat = Image.new("RGB", img.size, "white")
        flat.paste(img, mask=img.getchannel("A"))
        flat.thumbnail((cell - 8, cell - 8))
        x, y = (i % cols) * cell, (i // cols) * (cell + 16)
        sheet.paste(flat, (x + (cell - flat.width) // 2, y + (cell - flat.height) // 2))
        draw.text((x + 4, y + cell), caption[:32], fill="black")
    return sheet
