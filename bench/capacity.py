"""Figures for the capacity plan in docs/cluster.md: bytes per post at each stage, and each CPU stage's rate per core.

Rates are CPU time in this one process (`time.process_time`), so they hold on a machine shared with other work: one
core does 1 / (seconds per image) images per second, and a node with C cores about C times that when the stage
runs one process per core (crawl decoders, build workers, loader workers, the batch engine's threads).

    python -m bench capacity [--posts 300] [--real ../shared/fixtures/real]

- originals: the board's own files (the synthetic board's; the real Danbooru API pages' `file_size`, real uploads);
- crawl at 512 px: `util.images.shrink`, what `i2v crawl --image-size 512` does to each file, and the bytes it keeps;
- build at 448 px: decode, pad, resize and JPEG q95 encoding of a 512 px crawl image (`data.build.process_chunk`);
- training loader at 448 px: `formats.loader` with augmentation, in this process (workers 0), and each
  augmentation step alone;
- tag at 448 px: `infer.engine.decode` of an original, what feeds the model in `i2v tag`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "fixtures" / "real"


def _rate(fn: Callable[[bytes], object], datas: list[bytes]) -> tuple[float, list]:
    """(CPU seconds per item, results) over `datas`, in this process."""
    t0 = time.process_time()
    out = [fn(d) for d in datas]
    return (time.process_time() - t0) / max(1, len(datas)), out


def _mpx(datas: list[bytes]) -> float:
    from illust2vec.util.images import open_image

    return statistics.mean(open_image(d).size[0] * open_image(d).size[1] for d in datas) / 1e6


def _real_api_posts(real: Path) -> list[dict]:
    """Posts of the stored Danbooru API pages (2016 to 2023) that give their file's size."""
    posts = []
    for path in sorted((real / "booru-api" / "danbooru").glob("*.json")):
        data = json.loads(path.read_text())
        for post in data if isinstance(data, list) else [data]:
            if isinstance(post, dict) and post.get("file_size") and post.get("image_width"):
                posts.append(post)
    return posts


def _real_images(real: Path) -> list[bytes]:
    exts = {".jpg", ".jpeg", ".png", ".webp", ".gif"}
    return [p.read_bytes() for p in sorted((real / "images").rglob("*")) if p.suffix.lower() in exts]


def _build_one(data: bytes, size: int = 448) -> bytes:
    """One training sample as `i2v build` makes it (process_chunk's steps)."""
    import io

    from illust2vec.util.images import load_for_input, pad_resize

    buf = io.BytesIO()
    pad_resize(load_for_input(data, size), size).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _shard_images(crawl: Path) -> list[bytes]:
    out = []
    for shard in sorted((crawl / "images").glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".json")]
    return out


def _report(name: str, per: float, extra: str = "") -> None:
    print(f"capacity: {name}: {per * 1000:.1f} CPU ms per image, {1 / per:.0f} images/s per core{extra}")


def _files(root: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in root.glob(pattern))


def _measure_originals(label: str, board) -> None:
    """CPU time per original of `board`: shrinking it to 512 px (the crawl) and decoding it to 448 px (tagging)."""
    from illust2vec.infer.engine import decode
    from illust2vec.util.images import shrink

    originals = [board.file(p) for p in board.posts if p.is_image and not p.is_deleted and not p.is_banned]
    print(
        f"capacity: {label} originals: {len(originals)} images, {_mpx(originals):.2f} Mpx and "
        f"{statistics.mean(map(len, originals)) / 1e3:.0f} kB on average"
    )
    per, _ = _rate(lambda d: shrink(d, 512), originals)
    _report(f"{label} crawl (shrink an original to 512 px)", per)
    per, _ = _rate(lambda d: decode(d, 448), originals)
    _report(f"{label} tag decode (an original -> 448 px input)", per)


def synthetic(posts: int, tmp: Path) -> None:
    """Crawl a synthetic board at 512 px, build it at 448 px, read it with the training loader: bytes and rates."""
    from illust2vec.booru.crawl import CrawlConfig, crawl
    from illust2vec.data.build import BuildConfig, build
    from illust2vec.data.vocab import build_vocab
    from illust2vec.formats.dataset import open_dataset
    from illust2vec.formats.loader import LoaderConfig, make_loader
    from illust2vec.formats.vocab import write_vocab
    from illust2vec.synth.board import Board
    from illust2vec.synth.cast import SynthConfig
    from illust2vec.synth.server import start_board

    _measure_originals("synthetic", Board(SynthConfig(posts=posts, seed=0)))
    # Pictures the size of Danbooru's (4 Mpx on average, from its API's image_width x image_height; see `real`).
    _measure_originals(
        "large synthetic", Board(SynthConfig(posts=max(20, posts // 5), seed=1, min_size=1700, max_size=2500))
    )

    with start_board(SynthConfig(posts=posts, seed=0)) as server:
        crawl(CrawlConfig(url=server.url, out=tmp / "crawl", api_rate=1000, file_rate=1000, image_size=512))
    stored = _shard_images(tmp / "crawl")
    crawl_bytes = _files(tmp / "crawl" / "images", "*.tar")
    parquet = _files(tmp / "crawl" / "posts", "*.parquet")
    print(
        f"capacity: synthetic crawl at 512 px: {len(stored)} images, {crawl_bytes / len(stored) / 1e3:.1f} kB of "
        f"image shard per image, {parquet / posts:.0f} B of posts Parquet per post"
    )
    per, _ = _rate(_build_one, stored)
    _report("synthetic build (a 512 px crawl image -> 448 px JPEG q95)", per)

    write_vocab(build_vocab([tmp / "crawl"]), tmp / "selected_tags.csv")
    summary = build(BuildConfig(dirs=(tmp / "crawl",), vocab=tmp / "selected_tags.csv", out=tmp / "ds", size=448))
    samples = sum(s.samples for s in summary.info.splits.values())
    print(
        f"capacity: synthetic build at 448 px: {_files(tmp / 'ds', '*.tar') / samples / 1e3:.1f} kB of training "
        f"shard per sample ({samples} samples)"
    )
    ds = open_dataset(tmp / "ds")
    n, t0 = 0, time.process_time()
    for images, _ in make_loader(ds, "train", LoaderConfig(batch_size=32, workers=0), train=True):
        n += images.shape[0]
    _report("synthetic training loader at 448 px (decode, augment, batch)", (time.process_time() - t0) / n)
    n, t0 = 0, time.process_time()
    for images, _ in make_loader(ds, "train", LoaderConfig(batch_size=32, workers=0), train=False):
        n += images.shape[0]
    _report("synthetic loader at 448 px without augmentation (decode, batch)", (time.process_time() - t0) / n)


def augmentation_parts(size: int = 448) -> None:
    """What each step of the training augmentation costs on one uint8 image of `size` pixels."""
    import torch
    from torchvision.transforms import v2

    from illust2vec.formats.loader import LoaderConfig, augmentation

    cfg = LoaderConfig()
    steps = augmentation(size, cfg).transforms
    x = torch.randint(0, 255, (3, size, size), dtype=torch.uint8)
    for step in steps:
        per, _ = _rate(lambda _, step=step: step(x), [b""] * 20)
        name = type(step).__name__
        print(f"capacity: augmentation step {name} at {size} px: {per * 1000:.1f} CPU ms per image")
    assert any(isinstance(s, v2.ColorJitter) for s in steps)


def real(real: Path) -> None:
    """The real Danbooru API pages' file sizes, and the real pictures through the same steps."""
    from illust2vec.infer.engine import decode
    from illust2vec.util.images import shrink

    posts = _real_api_posts(real)
    if posts:
        sizes = [p["file_size"] for p in posts]
        mpx = [p["image_width"] * p["image_height"] / 1e6 for p in posts]
        print(
            f"capacity: real Danbooru originals ({len(posts)} posts of the stored API pages, 2016-2023): "
            f"{statistics.mean(sizes) / 1e6:.2f} MB mean, {statistics.median(sizes) / 1e6:.2f} MB median, "
            f"{statistics.mean(mpx):.2f} Mpx mean"
        )
    images = _real_images(real)
    if not images:
        return
    print(
        f"capacity: real pictures: {len(images)} files, {_mpx(images):.2f} Mpx and "
        f"{statistics.mean(map(len, images)) / 1e3:.0f} kB on average"
    )
    per, kept = _rate(lambda d: shrink(d, 512), images)
    _report("real crawl (shrink to 512 px)", per, f"; kept {statistics.mean(len(s.data) for s in kept) / 1e3:.1f} kB")
    per, samples = _rate(_build_one, [s.data for s in kept])
    _report("real build (512 px -> 448 px JPEG q95)", per, f"; {statistics.mean(map(len, samples)) / 1e3:.1f} kB")
    per, _ = _rate(lambda d: decode(d, 448), images)
    _report("real tag decode (a file -> 448 px input)", per)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench capacity")
    parser.add_argument("--posts", type=int, default=300, help="posts of the synthetic board")
    parser.add_argument("--real", type=Path, default=REAL, help="the real fixtures (booru-api/, images/)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic(args.posts, Path(tmp))
    augmentation_parts()
    if args.real.is_dir():
        real(args.real)
    else:
        print(f"capacity: no real fixtures at {args.real}; real figures skipped")


if __name__ == "__main__":
    main()
