"""The training loader streaming its shards from an S3 server against reading them from local files, the same run.

The S3 server is the tests' (moto's server mode, tests/s3server.py) on loopback: the same S3 API and the same client
code (s3fs through `util/storage.open_read`) as a real store, but its Python process runs on this machine and takes
CPU time from the loader's workers, which a remote store would not. The loader is `i2v train`'s: training
augmentation, shuffled shards, `--workers` processes. Local and S3 epochs alternate, and the medians are compared;
a ratio near 1 says streaming costs the loader nothing.

Each epoch's figure is split in two: the start (to the first batch: the workers start, and each one from S3 makes
its own S3 client, which a forked process cannot share) and the rate after it, which is what an epoch of a real
data set (hours, not seconds) runs at.

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


def epoch_rate(data: str, cfg: LoaderConfig, epoch: int) -> tuple[float, float]:
    """One epoch of the loader: seconds to its first batch (the workers start inside the timing, as each epoch of
    `i2v train` starts them), and training images per second after it."""
    ds = open_dataset(data)
    n, t0, first = 0, time.perf_counter(), None
    for images, _ in make_loader(ds, "train", cfg, train=True, epoch=epoch):
        if first is None:
            first = time.perf_counter()
        else:
            n += images.shape[0]
    return first - t0, n / (time.perf_counter() - first)


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
        runs: dict[str, list[tuple[float, float]]] = {"local": [], "s3": []}
        epoch_rate(str(local), cfg, 0)  # warm the page cache and the imports before anything is timed
        for r in range(args.repeat):
            order = [("local", str(local)), ("s3", remote)]
            for name, data in order if r % 2 == 0 else order[::-1]:
                runs[name].append(epoch_rate(data, cfg, r))
    print(
        f"storage: {info.samples} training images ({args.size} px) in {len(info.shards)} shards, {megabytes:.1f} MB, "
        f"{args.workers} loader workers, {args.repeat} epochs from each place"
    )
    rate, start = {}, {}
    for name, label in (("local", "local files"), ("s3", "S3 (moto on loopback)")):
        rate[name] = statistics.median(r for _, r in runs[name])
        start[name] = statistics.median(s for s, _ in runs[name])
        each = ", ".join(f"{r:.0f}" for _, r in runs[name])
        print(f"storage: {label}: {rate[name]:.0f} images/s after the first batch ({each}); start {start[name]:.2f} s")
    late = start["s3"] - start["local"]
    print(f"storage: S3 / local = {rate['s3'] / rate['local']:.2f} (target at least 0.9); an epoch from S3 starts")
    print(f"storage: {late:.2f} s later (each worker makes its own S3 client)")
