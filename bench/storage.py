"""The training loader streaming its shards from an S3 server against reading them from local files, the same run.

The S3 server is the tests' (moto's server mode, tests/s3server.py) on loopback: the same S3 API and the same client
code (s3fs through `util/storage.open_read`) as a real store, but its Python process runs on this machine and takes
CPU time from the loader's workers, which a remote store would not. The loader is `i2v train`'s: training
augmentation, shuffled shards, `--workers` processes. Local and S3 epochs alternate, and the medians are compared;
a ratio near 1 says streaming costs the loader nothing.

    python -m bench storage [--posts 800] [--size 128] [--shard-size 100] [--workers N] [--repeat 3]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.data.build import BuildConfig, build
from illust2vec.data.vocab import build_vocab
from illust2vec.formats.dataset import INFO, open_dataset
from illust2vec.formats.loader import LoaderConfig, make_loader
from illust2vec.formats.vocab import write_vocab
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board
from illust2vec.train.config import default_workers
from illust2vec.util import storage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' S3 server
from s3server import start_s3, use  # noqa: E402


def prepare(root: Path, posts: int, size: int, shard_size: int) -> Path:
    """Board -> crawl -> vocabulary -> shards of `shard_size` samples under root; returns the dataset directory."""
    if (root / "ds" / INFO).exists():
        return root / "ds"
    with start_board(SynthConfig(posts=posts, seed=0)) as server:
        crawl(CrawlConfig(url=server.url, out=root / "crawl", api_rate=500, file_rate=500, image_size=2 * size))
    write_vocab(build_vocab([root / "crawl"]), root / "selected_tags.csv")
    cfg = BuildConfig(
        dirs=(root / "crawl",), vocab=root / "selected_tags.csv", out=root / "ds", size=size, shard_size=shard_size
    )
    build(cfg)
    return root / "ds"


def epoch_rate(data: str, cfg: LoaderConfig, epoch: int) -> float:
    """Training images per second over one epoch of the loader (workers started inside the timing, as each epoch
    of `i2v train` starts them)."""
    ds = open_dataset(data)
    n, t0 = 0, time.perf_counter()
    for images, _ in make_loader(ds, "train", cfg, train=True, epoch=epoch):
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench storage")
    parser.add_argument("--posts", type=int, default=800)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=default_workers(), help="default: i2v train's")
    parser.add_argument("--repeat", type=int, default=3, help="epochs from each place, alternating")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, start_s3() as server:
        use(server)
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        local = prepare(root, args.posts, args.size, args.shard_size)
        server.client().create_bucket(Bucket="bench")
        remote = "s3://bench/ds"
        storage.upload_tree(local, remote, last=(INFO,))
        info = open_dataset(local).info.splits["train"]
        megabytes = sum(f["bytes"] for f in info.files.values()) / 1e6
        cfg = LoaderConfig(batch_size=args.batch_size, workers=args.workers)
        rates: dict[str, list[float]] = {"local": [], "s3": []}
        epoch_rate(str(local), cfg, 0)  # warm the page cache and the imports before anything is timed
        for r in range(args.repeat):
            order = [("local", str(local)), ("s3", remote)]
            for name, data in order if r % 2 == 0 else order[::-1]:
                rates[name].append(epoch_rate(data, cfg, r))
    here, there = statistics.median(rates["local"]), statistics.median(rates["s3"])
    print(
        f"storage: {info.samples} training images ({args.size} px) in {len(info.shards)} shards, {megabytes:.1f} MB, "
        f"{args.workers} loader workers, {args.repeat} epochs from each place"
    )
    print(f"storage: local files {here:.0f} images/s ({', '.join(f'{x:.0f}' for x in rates['local'])})")
    print(f"storage: S3 (moto on loopback) {there:.0f} images/s ({', '.join(f'{x:.0f}' for x in rates['s3'])})")
    print(f"storage: S3 / local = {there / here:.2f} (target at least 0.9)")
