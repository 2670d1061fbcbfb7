"""Dataset benchmarks: build throughput per core on large JPEGs against a naive PIL baseline run beside it, and the
skew between a built sample and inference's input for the same picture (`python -m bench skew`).

Ours is exactly what `i2v build` does to each image (`process_chunk`: a big JPEG decoded at a DCT scale as inference
decodes it, EXIF orientation, transparency on white, pad to a white square, resize, encode). The baseline is the
obvious code: open, convert to RGB at full size, resize, pad, encode. Both run on one core, on the same bytes, in
this process.
"""

import argparse
import io
import tempfile
import time
from pathlib import Path

from PIL import Image

from illust2vec.data.build import process_chunk
from illust2vec.formats.shards import ShardWriter, index_shard
from illust2vec.synth.board import Board
from illust2vec.synth.cast import SynthConfig


def naive(data: bytes, size: int) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = size / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def large_jpegs(n: int, tmp: Path) -> list:
    """n JPEGs of 2000 to 3200 px from the synthetic board, in a tar shard as the crawler writes them."""
    board = Board(SynthConfig(posts=n * 3, seed=7, min_size=2000, max_size=3200, pixel_noise=4.0))
    writer = ShardWriter(tmp, "{index:06d}.tar")
    count = 0
    for post in board.posts:
        if post.file_ext == "jpg" and not post.encoding.get("cmyk") and count < n:
            writer.add(f"{post.id:08d}", {"jpg": board.file(post)})
            count += 1
    writer.close()
    return [(m.key, m) for m in index_shard(tmp / "000000.tar")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench data")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a few images, to check that it runs")
    args = parser.parse_args(argv)
    n = 6 if args.quick else args.images
    with tempfile.TemporaryDirectory() as tmp:
        members = large_jpegs(n, Path(tmp))
        datas = [Path(m.shard).read_bytes()[m.offset : m.offset + m.size] for _, m in members]
        mpx = sum(Image.open(io.BytesIO(d)).width * Image.open(io.BytesIO(d)).height for d in datas) / len(datas) / 1e6
        t0 = time.process_time()
        ours = process_chunk(members, args.size, "jpg", 95)
        ours_s = time.process_time() - t0
        assert all(data is not None for _, data, _ in ours)
        t0 = time.process_time()
        for d in datas:
            naive(d, args.size)
        naive_s = time.process_time() - t0
    print(f"build: {len(datas)} JPEGs of {mpx:.1f} Mpx on average -> {args.size} px squares, one core (CPU time)")
    print(
        f"build: ours {len(datas) / ours_s:.1f} images/s vs naive PIL {len(datas) / naive_s:.1f} images/s: "
        f"{naive_s / ours_s:.2f}x"
    )


def loader_vs_model(argv: list[str] | None = None) -> None:
    """Loader images/s (training augmentation, 2 workers) against the demo model's forward+backward images/s."""
    import torch

    from bench.quality import prepare
    from illust2vec.formats.dataset import open_dataset
    from illust2vec.formats.loader import LoaderConfig, make_loader
    from illust2vec.models import create_tagger, default_heads

    parser = argparse.ArgumentParser(prog="python -m bench loader")
    parser.add_argument("--posts", type=int, default=800)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ds = open_dataset(prepare(Path(tmp), args.posts, args.size))
        cfg = LoaderConfig(batch_size=args.batch_size, workers=2)
        n, t0 = 0, time.perf_counter()
        for images, _ in make_loader(ds, "train", cfg, train=True):
            n += images.shape[0]
        loader_rate = n / (time.perf_counter() - t0)
        heads = default_heads({h: len(ix) for h, ix in ds.vocab.heads.items()})
        model = create_tagger("i2v_small", heads=heads, image_size=args.size)
        opt = torch.optim.AdamW(model.parameters())
        x = torch.randint(0, 255, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8)
        for i in range(6):  # two warm-up steps, then four timed
            if i == 2:
                t0 = time.perf_counter()
            loss = sum(v.float().square().mean() for v in model(x).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        model_rate = 4 * args.batch_size / (time.perf_counter() - t0)
    print(f"loader: {n} training images with augmentation, 2 workers: {loader_rate:.0f} images/s")
    print(f"loader: i2v_small forward+backward at {args.size} px, batch {args.batch_size}: {model_rate:.0f} images/s")
    print(f"loader: loader / model = {loader_rate / model_rate:.2f} (above 1: the loader is not the bottleneck)")


def _pictures(real: Path | None, posts: int) -> list[tuple[str, str, bytes]]:
    """(name, ext, bytes): the synthetic board's pictures, and the real illustrations under `real` when given."""
    board = Board(SynthConfig(posts=posts, seed=3))
    out = [(f"synth/{p.id}", p.file_ext, board.file(p)) for p in board.posts if p.is_image]
    if real is not None:
        for path in sorted(real.rglob("*")):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".gif"):
                out.append((str(path.relative_to(real)), path.suffix[1:].lower(), path.read_bytes()))
    return out


def skew(argv: list[str] | None = None) -> None:
    """Train/serve skew: the sample `i2v build` writes for a picture against what inference feeds the model for it.

    Both sides as RGB 0..255: build's stored image decoded, inference's `load_batch` turned from BGR to RGB.
    """
    import numpy as np

    from illust2vec.infer.preprocess import load_batch

    parser = argparse.ArgumentParser(prog="python -m bench skew")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--posts", type=int, default=200, help="synthetic board posts")
    parser.add_argument("--real", type=Path, default=None, help="a folder of real pictures, read in place")
    args = parser.parse_args(argv)
    pictures = _pictures(args.real, args.posts)
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp), "{index:06d}.tar")
        for i, (_, ext, data) in enumerate(pictures):
            writer.add(f"{i:08d}", {ext: data})
        writer.close()
        members = [(m.key, m) for m in index_shard(Path(tmp) / "000000.tar")]
        for fmt in ("png", "jpg"):
            built = process_chunk(members, args.size, fmt, 95)
            diffs = {"synth": [], "real": []}
            for (name, _, data), (_, sample, _) in zip(pictures, built, strict=True):
                ours = np.asarray(Image.open(io.BytesIO(sample)).convert("RGB"), np.float32)
                theirs = load_batch(data, args.size)[0][:, :, ::-1]
                diffs["synth" if name.startswith("synth/") else "real"].append(np.abs(ours - theirs))
            for kind, d in diffs.items():
                if d:
                    mean, worst = float(np.mean([x.mean() for x in d])), float(max(x.max() for x in d))
                    print(
                        f"skew: {kind} {len(d)} pictures, build stores {fmt}, {args.size} px: "
                        f"mean |build - inference| {mean:.3f}, max {worst:.0f} (0..255)"
                    )


if __name__ == "__main__":
    import sys

    skew(sys.argv[2:]) if sys.argv[1:2] == ["skew"] else main()
