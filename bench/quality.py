"""Tagger quality on the synthetic board: the whole flow (board, crawl, vocab, build, train) and the metrics per epoch.

Prints per-epoch validation mAP per category and character top-1, and the training time. The figures in the
README's training section come from here, e.g. `python -m bench quality --posts 5000 --size 128 --epochs 10`.
"""

import argparse
import csv
import tempfile
import time
from pathlib import Path

from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.data.build import BuildConfig, build
from illust2vec.data.vocab import build_vocab, write_vocab
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board
from illust2vec.train.loop import TrainConfig, fit
from illust2vec.train.losses import LossConfig


def prepare(root: Path, posts: int, size: int, seed: int = 0) -> Path:
    """Board -> crawl -> vocabulary -> shards under root; returns the dataset directory."""
    with start_board(SynthConfig(posts=posts, seed=seed)) as server:
        crawl(CrawlConfig(url=server.url, out=root / "crawl", api_rate=500, file_rate=500, image_size=2 * size))
    write_vocab(build_vocab([root / "crawl"]), root / "selected_tags.csv")
    build(BuildConfig(dirs=(root / "crawl",), vocab=root / "selected_tags.csv", out=root / "ds", size=size))
    return root / "ds"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench quality")
    parser.add_argument("--posts", type=int, default=1500)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="i2v_small")
    parser.add_argument("--exclusivity", type=float, default=0.0)
    parser.add_argument("--loss", default="bce")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ds = root / "ds" if (root / "ds" / "dataset.json").exists() else prepare(root, args.posts, args.size)
        run = root / f"run-{args.arch}-{args.loss}-x{args.exclusivity:g}-{int(time.time())}"
        t0 = time.perf_counter()
        cfg = TrainConfig(
            data=str(ds),
            out=str(run),
            arch=args.arch,
            epochs=args.epochs,
            loss=LossConfig(kind=args.loss, exclusivity=args.exclusivity),
        )
        summary = fit(cfg)
        seconds = time.perf_counter() - t0
        with open(run / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    print(
        f"quality: {args.arch}, {args.posts} posts at {args.size} px, {args.epochs} epochs, loss {args.loss}, "
        f"exclusivity {args.exclusivity:g}: trained in {seconds:.0f} s"
    )
    keys = [k for k in rows[0] if k.startswith("val/") and k.endswith(("/mAP", "/top1", "/contradictions"))]
    print("epoch  " + "  ".join(k[4:] for k in keys))
    for r in rows:
        print(f"{r['epoch']:>5}  " + "  ".join(f"{float(r[k]):>{len(k) - 4}.3f}" for k in keys))
    print(f"best epoch {summary['best_epoch']} by {summary['select_by']}")


if __name__ == "__main__":
    main()
