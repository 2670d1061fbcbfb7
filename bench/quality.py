"""Tagger quality on the synthetic board: the whole flow (board, crawl, vocab, build, train) and the metrics per epoch.

Prints per-epoch validation mAP per category and character top-1, and the training time. The figures in the
README's training section come from here, e.g. `python -m bench quality --posts 5000 --size 128 --epochs 10`.
"""

import argparse
import tempfile
import time
from pathlib import Path

from illust2vec.booru.crawl import CrawlConfig, crawl
from illust2vec.data.build import BuildConfig, build
from illust2vec.data.vocab import build_vocab
from illust2vec.formats.run import read_metrics
from illust2vec.formats.vocab import write_vocab
from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board
from illust2vec.train.config import TrainConfig
from illust2vec.train.loop import fit
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
    parser.add_argument("--batch-size", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--lr", type=float, default=None, help="default: TrainConfig's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic board")
    parser.add_argument("--no-prior-init", action="store_true", help="start the heads' biases at zero")
    parser.add_argument("--global-pool", help="the preset's pooling instead of its own (avg, max, catavgmax, ...)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    parser.add_argument("--measure", type=Path, nargs="+", help="only measure these finished runs (see measure_runs)")
    args = parser.parse_args(argv)
    if args.measure:
        measure_runs(args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ds = root / "ds" if (root / "ds" / "dataset.json").exists() else prepare(root, args.posts, args.size, args.seed)
        prior = int(not args.no_prior_init)
        run = root / f"run-{args.arch}-{args.loss}-x{args.exclusivity:g}-p{prior}-{int(time.time())}"
        t0 = time.perf_counter()
        cfg = TrainConfig(
            data=str(ds),
            out=str(run),
            arch=args.arch,
            epochs=args.epochs,
            loss=LossConfig(kind=args.loss, exclusivity=args.exclusivity),
            prior_init=not args.no_prior_init,
            model={"global_pool": args.global_pool} if args.global_pool else {},
            **{k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None},
        )
        summary = fit(cfg)
        seconds = time.perf_counter() - t0
        rows = read_metrics(run)
    print(
        f"quality: {args.arch}, {args.posts} posts at {args.size} px, {args.epochs} epochs, loss {args.loss}, "
        f"exclusivity {args.exclusivity:g}: trained in {seconds:.0f} s"
    )
    keys = [k for k in rows[0] if k.startswith("val/") and k.endswith(("/mAP", "/top1", "/contradictions"))]
    print("epoch  " + "  ".join(k[4:] for k in keys))
    for r in rows:
        print(f"{r['epoch']:>5}  " + "  ".join(f"{float(r[k]):>{len(k) - 4}.3f}" for k in keys))
    print(f"best epoch {summary.best_epoch} by {summary.select_by}")


def measure_runs(runs: list[Path]) -> None:
    """For each run's last epoch on its validation split: mAP and top-1 per category, and the contradiction rate
    (single-character images with two mutually exclusive general tags predicted: two hair colours, two eye colours)
    at 0.5 and at the general head's F1-calibrated threshold. Runs on the same data compare like for like."""
    import numpy as np
    import torch

    from illust2vec.evaluation.calibration import calibrate
    from illust2vec.evaluation.evaluator import PredictOptions, predict_split, run_dataset
    from illust2vec.evaluation.metrics import contradiction_rate, mean_average_precision, topk_accuracy
    from illust2vec.formats.run import read_config, resolve_epoch, weights_path
    from illust2vec.models import load_tagger
    from illust2vec.train.setup import general_exclusive_pairs

    for run in runs:
        epoch = resolve_epoch(run, "last")
        ds = run_dataset(run, None)
        config = read_config(run)
        cfg = config["train"]
        model = load_tagger(config["model"], weights_path(run, epoch))
        preds = predict_split(model, ds, "val", torch.device("cpu"), PredictOptions(workers=2))
        probs, targets = preds.probs, preds.targets
        pairs = general_exclusive_pairs(ds).numpy()
        single = targets["character"].sum(axis=1) == 1
        names = {h: list(ds.vocab.head_names(h)) for h in probs}
        f1_thr = calibrate(preds, names, "f1", per_tag=False).heads["general"]
        truth = contradiction_rate(targets["general"], single, pairs, 0.5)
        print(
            f"{run.name} epoch {epoch} (loss {cfg['loss']['kind']}, exclusivity {cfg['loss']['exclusivity']:g}): "
            f"general mAP {mean_average_precision(probs['general'], targets['general']):.3f}, "
            f"character top-1 {topk_accuracy(probs['character'], targets['character'], 1):.3f}, "
            f"contradictions at 0.5 {contradiction_rate(probs['general'], single, pairs, 0.5):.3f}, "
            f"at the F1 threshold {f1_thr:.2f} {contradiction_rate(probs['general'], single, pairs, f1_thr):.3f} "
            f"(labels: {truth:.3f}; {int(np.triu(pairs).sum())} exclusive pairs, {int(single.sum())} images)"
        )


if __name__ == "__main__":
    main()
