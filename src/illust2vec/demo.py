"""`i2v demo`: run every stage that exists on the synthetic board, offline, and say what each did."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console

from .booru.crawl import CrawlConfig, crawl, print_summary
from .data.build import BuildConfig, build
from .data.shards import iter_samples
from .data.vocab import build_vocab, write_vocab
from .synth.cast import SynthConfig
from .synth.server import start_board
from .train.loop import TrainConfig, fit

log = logging.getLogger(__name__)

# Stages of DESIGN.md that the demo will run once they exist.
TO_COME = ["evaluate", "export", "tag", "embed/index/similar", "serve"]


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("demo-out")
    posts: int = 1000
    seed: int = 0
    image_size: int = 512  # longer side kept by the crawl
    train_size: int = 96  # side of the training squares
    epochs: int = 5


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """Serve the synthetic board, crawl it, choose the vocabulary, build shards and train, each stage through the
    same library function as its command; returns the summary."""
    console = console or Console(stderr=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    # Each demo serves a new board on a new port: an earlier demo's crawl is not one to resume.
    shutil.rmtree(cfg.out / "crawl", ignore_errors=True)
    summary: dict = {"stages": {}}
    t0 = time.perf_counter()
    with start_board(SynthConfig(posts=cfg.posts, seed=cfg.seed)) as server:
        console.print(f"[bold]fakebooru[/] serving {len(server.board.posts)} synthetic posts at {server.url}")
        summary["stages"]["fakebooru"] = {"url": server.url, "posts": len(server.board.posts)}
        console.print("[bold]crawl[/] posts and images, resized to a longer side of", cfg.image_size, "px")
        # The board is local: the polite default rates of a real board would only slow the demo down.
        crawl_cfg = CrawlConfig(
            url=server.url, out=cfg.out / "crawl", image_size=cfg.image_size, api_rate=100, file_rate=200
        )
        result = crawl(crawl_cfg, console=console)
    print_summary(result, console)
    summary["stages"]["crawl"] = {**asdict(result), "dir": str(crawl_cfg.out)}
    sheet = cfg.out / "contact-sheet.jpg"
    _contact_sheet(_samples(crawl_cfg.out, 48)).save(sheet, quality=88)
    summary["contact_sheet"] = str(sheet)

    console.print("[bold]vocab[/] the most frequent tags per category")
    vocab = build_vocab([crawl_cfg.out])
    write_vocab(vocab, cfg.out / "selected_tags.csv")
    summary["stages"]["vocab"] = {head: len(rows) for head, rows in vocab.heads.items()}
    console.print(", ".join(f"{head}: {n} tags" for head, n in summary["stages"]["vocab"].items()))

    console.print(f"[bold]build[/] {cfg.train_size} px training shards")
    data = build(
        BuildConfig(
            dirs=(crawl_cfg.out,),
            vocab=cfg.out / "selected_tags.csv",
            out=cfg.out / "dataset",
            size=cfg.train_size,
            val_fraction=0.1,
        ),
        console=console,
    )
    summary["stages"]["build"] = {s: v["samples"] for s, v in data["splits"].items()} | {"skipped": data["skipped"]}
    console.print(f"samples per split: {summary['stages']['build']}")

    console.print(f"[bold]train[/] i2v_small for {cfg.epochs} epochs on the CPU")
    shutil.rmtree(cfg.out / "run", ignore_errors=True)
    trained = fit(
        TrainConfig(data=str(cfg.out / "dataset"), out=str(cfg.out / "run"), epochs=cfg.epochs), console=console
    )
    summary["stages"]["train"] = {
        "best_epoch": trained["best_epoch"],
        "select_by": trained["select_by"],
        "best": trained["best"],
        "curves": str(cfg.out / "run" / "curves.png"),
    }
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(
        f"wrote {crawl_cfg.out} (posts, images), {sheet}, {cfg.out / 'dataset'}, {cfg.out / 'run'}"
        f" (metrics.csv, curves.png); {summary['seconds']:.0f} s in all"
    )
    console.print("[yellow]still to come:[/] " + ", ".join(TO_COME))
    return summary


def _samples(crawl_dir: Path, n: int) -> list[tuple[Image.Image, str]]:
    """The first n images of the crawl's shards with their character tags."""
    out: list[tuple[Image.Image, str]] = []
    for _, sample in iter_samples(sorted((crawl_dir / "images").glob("*.tar"))):
        meta = json.loads(sample.pop("json"))
        image = Image.open(io.BytesIO(next(iter(sample.values()))))
        out.append((image, " ".join(meta["tags_character"]) or "original"))
        if len(out) >= n:
            break
    return out


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
