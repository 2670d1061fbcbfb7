"""Extending a trained tagger with new characters (`i2v train --init`) against training on everything from scratch.

Base: the small preset on a synthetic board of seed 0. New data: a board of seed 1 (another cast and other series,
the same kinds of general tags), at most `--cap` posts per character. Then, from the base: the extension with the
defaults (--keep-old 1, --backbone-lr-scale 0.1), the extension without --keep-old, the extension on DATA built from
the new board and a sample of `--replay` training posts of the old one, and a model trained from scratch on both
boards together. Each is measured on held-out (test) posts: the new characters' top-1 on seed 1's, the old
characters' top-1 and the general mAP on seed 0's (top-1 ranks every character the model knows), with the time each
took to train. The figures in docs/benchmarks.md come from here, e.g. `python -m bench extend --keep DIR`.
"""

import argparse
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.data.build import BuildConfig, build, split_of
from illust2vec.data.vocab import build_vocab
from illust2vec.evaluation.evaluator import PredictOptions
from illust2vec.evaluation.vocab_map import mapped_metrics, predict_mapped
from illust2vec.formats.dataset import open_dataset
from illust2vec.formats.posts import part_files
from illust2vec.formats.run import read_config, resolve_epoch, vocab_path, weights_path
from illust2vec.formats.vocab import read_vocab, write_vocab
from illust2vec.models import load_tagger
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board
from illust2vec.train.config import TrainConfig
from illust2vec.train.loop import fit

ID_OFFSET = 10_000_000  # seed 1's post ids, moved past seed 0's so that one build can hold both boards


def crawl_board(root: Path, seed: int, posts: int, size: int, zipf: float) -> Path:
    out = root / f"crawl{seed}"
    if not (out / "posts").is_dir():
        with start_board(SynthConfig(posts=posts, seed=seed, zipf=zipf)) as server:
            crawl(CrawlConfig(url=server.url, out=out, api_rate=500, file_rate=500, image_size=2 * size))
    return out


def cap_characters(crawl_dir: Path, cap: int, offset: int) -> Counter:
    """Keep at most `cap` posts per character (in id order: a post that would exceed a cap is left out) and move the
    ids by `offset`; rewrites the posts parts in place. Returns posts per character."""
    per: Counter = Counter()
    for part in part_files(crawl_dir):
        table = pq.read_table(part)
        keep = []
        for row in table.to_pylist():
            chars = row["tags_character"] or []
            if any(per[c] >= cap for c in chars):
                continue
            per.update(chars)
            row["id"] += offset
            row["parent_id"] = None if row["parent_id"] is None else row["parent_id"] + offset
            keep.append(row)
        pq.write_table(pa.Table.from_pylist(keep, schema=table.schema), part)
    return per


def sample_crawl(root: Path, crawl_dir: Path, posts: int, test_fraction: float, seed: int = 0) -> Path:
    """A copy of a crawl holding `posts` of its posts drawn at random from those that `i2v build` puts in the training
    split (so that no test post of the base is trained on): what a user gets by crawling a sample of the old board."""
    out = root / f"{crawl_dir.name}-sample{posts}"
    if (out / "posts").is_dir():
        return out
    shutil.copytree(crawl_dir, out)
    parts = {part: pq.read_table(part) for part in part_files(out)}
    train = [
        (part, row["id"])
        for part, table in parts.items()
        for row in table.select(["id", "parent_id"]).to_pylist()
        if split_of(row["id"], row["parent_id"], BuildConfig.val_fraction, test_fraction) == "train"
    ]
    keep = set(random.Random(seed).sample(train, min(posts, len(train))))
    for part, table in parts.items():
        rows = [row for row in table.to_pylist() if (part, row["id"]) in keep]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)
    return out


def build_set(root: Path, name: str, crawls: list[Path], size: int, workers: int, test_fraction: float) -> Path:
    out = root / name
    if not (out / "dataset.json").exists():
        write_vocab(build_vocab(crawls), root / f"{name}.csv")
        cfg = BuildConfig(
            dirs=tuple(crawls),
            vocab=root / f"{name}.csv",
            out=out,
            size=size,
            workers=workers,
            test_fraction=test_fraction,
        )
        build(cfg)
    return out


def train(run: Path, seconds: dict, **kwargs) -> Path:
    """Train (unless a finished run is there already: its time is the one recorded then)."""
    times = run.parent / "seconds.json"
    seconds.update(json.loads(times.read_text()) if times.exists() else {})
    if not (run / "best.json").exists():
        t0 = time.perf_counter()
        fit(TrainConfig(out=str(run), **kwargs))
        seconds[run.name] = time.perf_counter() - t0
        times.write_text(json.dumps(seconds))
    return run


def measure(run: Path, data: Path, workers: int, old: set[str]) -> dict:
    """The last epoch of a run on a data set's test split: character top-1 (every character ranked), top-1 ranking
    only the characters of the post's own group (`own`: the old ones on seed 0's posts, the new ones on seed 1's),
    the mean best probability of the other group's characters (`other`), and general mAP over the data set's tags
    that the model has. `old`: the base's character names."""
    config = read_config(run)
    model = load_tagger(config["model"], weights_path(run, resolve_epoch(run, "last")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    opts = PredictOptions(batch_size=64, workers=workers)
    vocab = read_vocab(vocab_path(run))
    ds = open_dataset(data)
    preds, vmap = predict_mapped(model, vocab, ds, "test", device, opts)
    acts = {h.name: h.activation for h in model.cfg.heads}
    m = mapped_metrics(preds, vmap.known, acts, {h: 0.5 for h in acts})
    out = {"top1": m.get("character/top1", float("nan")), "mAP": m.get("general/mAP", float("nan"))}
    names = vocab.head_names("character")
    mine = set(ds.vocab.head_names("character"))
    own = np.array([n in mine for n in names])  # the data set's characters: one group
    probs, targets = preds.probs["character"], preds.targets["character"]
    labelled = targets.sum(1) > 0
    if own.any() and labelled.any():
        cols = np.flatnonzero(own)
        best = cols[probs[:, cols].argmax(1)]
        out["own"] = float((targets[np.arange(len(best)), best] > 0)[labelled].mean())
    if (~own).any() and labelled.any():
        out["other"] = float(probs[labelled][:, ~own].max(1).mean())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench extend")
    parser.add_argument("--posts", type=int, default=3000, help="posts of the seed-0 board (the base)")
    parser.add_argument("--new-posts", type=int, default=1200, help="posts of the seed-1 board before the cap")
    parser.add_argument("--cap", type=int, default=50, help="at most this many posts per new character")
    parser.add_argument("--size", type=int, default=128, help="the image size (i2v_small's own)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the base and of the from-scratch run")
    parser.add_argument("--extend-epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: train's)")
    parser.add_argument(
        "--replay",
        type=int,
        default=1000,
        help="also extend with DATA built from the new board and this many training posts of the old one (0: not)",
    )
    parser.add_argument("--replay-epochs", type=int, default=3, help="epochs of that extension")
    parser.add_argument(
        "--skip-scratch", action="store_true", help="no from-scratch run: its time estimated from the base's"
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.15,
        help="posts held out for the figures (more than a build's 5%%: top-1 on 70 posts moves 0.014 a post)",
    )
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (reruns reuse what is there)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        run_all(root, args)


def run_all(root: Path, args) -> None:
    workers = {} if args.workers is None else {"workers": args.workers}
    w = args.workers if args.workers is not None else 2
    crawl0 = crawl_board(root, 0, args.posts, args.size, zipf=1.1)
    fresh = not (root / "crawl1" / "posts").is_dir()
    crawl1 = crawl_board(root, 1, args.new_posts, args.size, zipf=0.0)  # an even cast: about as many posts each
    if fresh:
        per = cap_characters(crawl1, args.cap, ID_OFFSET)
        print(f"new board: {len(per)} characters, {min(per.values())}..{max(per.values())} posts each")
    old = build_set(root, "old", [crawl0], args.size, w, args.test_fraction)
    new = build_set(root, "new", [crawl1], args.size, w, args.test_fraction)
    both = build_set(root, "both", [crawl0, crawl1], args.size, w, args.test_fraction)
    seconds: dict[str, float] = {}
    common = dict(epochs=args.epochs, arch="i2v_small", **workers)
    base = train(root / "base", seconds, data=str(old), **common)
    extend = dict(data=str(new), init=str(base), epochs=args.extend_epochs, **workers)
    runs = {
        "base": base,
        "extended": train(root / "extended", seconds, **extend),
        "extended, --keep-old 0": train(root / "extended-nokeep", seconds, keep_old=0.0, **extend),
    }
    if args.replay:  # the new crawl built together with a sample of the old board (i2v vocab and build over both)
        sample = sample_crawl(root, crawl0, args.replay, args.test_fraction)
        mixed = build_set(root, f"new+old{args.replay}", [crawl1, sample], args.size, w, args.test_fraction)
        runs[f"extended, +{args.replay} old"] = train(
            root / f"extended-old{args.replay}", seconds, **{**extend, "data": str(mixed), "epochs": args.replay_epochs}
        )
    if args.skip_scratch:  # the base's time per training image, times both boards' training images
        scale = open_dataset(both).samples("train") / open_dataset(old).samples("train")
        seconds["scratch"] = seconds["base"] * scale
        print(f"from scratch on both: not trained; its time estimated as the base's x {scale:.2f}")
    else:
        runs["from scratch on both"] = train(root / "scratch", seconds, data=str(both), **common)
    report(runs, old, new, seconds, args, w)


def report(runs: dict, old: Path, new: Path, seconds: dict, args, workers: int) -> None:
    ds_old, ds_new = open_dataset(old), open_dataset(new)
    print(
        f"extend: i2v_small at {args.size} px; base {ds_old.samples('train')} training posts of seed 0, "
        f"{args.epochs} epochs; new data {ds_new.samples('train')} training posts of seed 1 "
        f"(at most {args.cap} per character), {args.extend_epochs} epochs"
        + (f"; with {args.replay} of seed 0, {args.replay_epochs} epochs" if args.replay else "")
        + f"; test posts {ds_old.samples('test')} (seed 0) and {ds_new.samples('test')} (seed 1)"
    )
    print(
        "columns: top-1 over every character; 'among' ranks only the post's own group (new on seed 1, old on "
        "seed 0); 'rival': the other group's best probability on those posts, on average"
    )
    head = ["new top-1", "among new", "old rival", "old top-1", "among old", "new rival", "old mAP", "train s"]
    print(f"{'model':<24}" + "".join(f"{h:>10}" for h in head))
    figures = {}
    base_chars = set(ds_old.vocab.head_names("character"))
    nan = float("nan")
    for name, run in runs.items():
        on_old, on_new = measure(run, old, workers, base_chars), measure(run, new, workers, base_chars)
        row = (
            on_new["top1"], on_new.get("own", nan), on_new.get("other", nan),
            on_old["top1"], on_old.get("own", nan), on_old.get("other", nan),
            on_old["mAP"], seconds.get(run.name, nan),
        )  # fmt: skip
        figures[name] = row
        print(f"{name:<24}" + "".join(f"{v:>10.3f}" for v in row[:-1]) + f"{row[-1]:>10.0f}")
    b = figures["base"]
    scratch = seconds.get("scratch", nan)
    for name in [n for n in figures if n == "extended" or n.startswith("extended, +")]:
        e = figures[name]
        print(
            f"goals, {name}: new top-1 {e[0]:.3f} (>= 0.8), old top-1 {e[3] - b[3]:+.3f} and general mAP "
            f"{e[6] - b[6]:+.3f} against the base (within 0.03), time {e[7] / scratch:.2f} of from scratch (<= 0.33)"
        )


if __name__ == "__main__":
    main()
