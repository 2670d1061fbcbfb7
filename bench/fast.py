"""Fast tagging on a CPU (issue 18): `i2v tag` end to end with model.int8.onnx (`i2v quantize`) against model.onnx,
side by side in one run, and how far a trained model's int8 decisions are from its fp32 ones.

Speed: each preset (`--archs`), randomly initialised (speed does not depend on the weights), with the synthetic
board's vocabulary, is saved as a bundle with model.onnx (bench/tag.py's `save_random_bundle`) and quantized (static
QDQ per channel, calibrated on `--calibration` board images); then the same folder of board images (their real
sizes and formats) is tagged through `i2v tag`'s library function with `--precision fp32` and `--precision int8`,
alternately, `--repeat` times; the best rate of each is kept and the ratio printed (the issue's goal: at least 1.8).

Agreement: a small tagger trained on the synthetic board (`--train-posts` posts, 4 epochs; or `--trained BUNDLE`, a
bundle with model.onnx whose run is here) is quantized in each of `--agreement-modes`, calibrated on its validation
split; the per-category F1 of int8's decisions against fp32's on `--check` held-out board images (posts past the
trained ones, never seen in training or calibration), and the largest probability difference, are printed (goal: F1
at least 0.97).

    python -m bench fast [--archs i2v_small,i2v_convnext_base,i2v_vit_base] [--images 16] [--calibration 12]
                         [--batch-size 8] [--repeat 1] [--mode static|dynamic] [--trained BUNDLE] [--no-agreement]
                         [--check 240] [--train-posts 400] [--agreement-modes static,dynamic]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

from rich.console import Console

from illust2vec.infer.tagger import Tagger
from illust2vec.quantize import QuantizeConfig, quantize
from illust2vec.synth.board import Board
from illust2vec.synth.cast import SynthConfig

from . import fast_distill
from .tag import board_vocab, pipeline_rate, save_random_bundle, write_images

QUIET = Console(file=io.StringIO())


def speed(arch: str, board: Board, root: Path, args: argparse.Namespace) -> dict:
    """images/s of `i2v tag` end to end at fp32 and at int8, for one preset with random weights."""
    bundle = save_random_bundle(arch, board_vocab(board), root / arch)
    calibration = write_images(board, root / f"{arch}-calibration", args.calibration)
    q = quantize(
        QuantizeConfig(
            model=str(bundle), calibration=(str(calibration[0].parent),), mode=args.mode, images=len(calibration)
        ),
        console=QUIET,
    )
    fp32 = Tagger.load(bundle, precision="fp32")
    int8 = Tagger.load(bundle, precision="int8")
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    rates = {"fp32": 0.0, "int8": 0.0}
    for _ in range(args.repeat):  # alternated: a burst of other work on the machine hits both alike
        for name, tagger in (("fp32", fp32), ("int8", int8)):
            rate, done = pipeline_rate(tagger, root / "images", args.batch_size)
            assert done == args.images, f"tagged {done} of {args.images}"
            rates[name] = max(rates[name], rate)
    return {"arch": arch, "size": fp32.image_size, **rates, "bytes": (q.fp32_bytes, q.int8_bytes), "quantize": q}


def held_out(root: Path, trained_posts: int, n: int) -> Path:
    """`n` images of the training board's posts past the first `trained_posts` (so never trained on), in their
    board formats: where the int8 model's decisions are compared with fp32's."""
    board = Board(SynthConfig(posts=trained_posts + 2 * n + 50, seed=41))
    folder = root / "held-out"
    folder.mkdir(parents=True)
    posts = [p for p in board.posts[trained_posts:] if p.is_image and not p.is_deleted and not p.is_banned]
    for post in posts[:n]:
        (folder / f"{post.id}.{post.file_ext}").write_bytes(board.file(post))
    return folder


def trained_bundle(root: Path, posts: int = 160, epochs: int = 2) -> Path:
    """A small tagger trained on the synthetic board (conftest's synth_bundle recipe, with `posts` posts and
    `epochs` epochs), exported with model.onnx."""
    from illust2vec.booru.crawl import CrawlConfig, crawl
    from illust2vec.data.build import BuildConfig, build
    from illust2vec.data.vocab import build_vocab
    from illust2vec.export import ExportConfig, export
    from illust2vec.formats.vocab import write_vocab
    from illust2vec.synth.server import start_board
    from illust2vec.train.config import TrainConfig
    from illust2vec.train.loop import fit

    with start_board(SynthConfig(posts=posts, seed=41)) as server:
        crawl(CrawlConfig(url=server.url, out=root / "crawl", api_rate=200, file_rate=200, backoff=0.01, decoders=2))
    write_vocab(build_vocab([root / "crawl"], top={"general": 60, "character": 20, "copyright": 8}), root / "tags.csv")
    build(
        BuildConfig(
            dirs=(root / "crawl",),
            vocab=root / "tags.csv",
            out=root / "build",
            size=96,
            shard_size=40,
            val_fraction=0.15,
            test_fraction=0.1,
            workers=2,
            format="png",
        )
    )
    run = TrainConfig(
        data=str(root / "build"), out=str(root / "run"), epochs=epochs, arch="test_resnet", batch_size=16, workers=0
    )
    fit(run)
    export(ExportConfig(run=str(root / "run"), out=str(root / "bundle"), onnx=True, workers=0), console=QUIET)
    return root / "bundle"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench fast")
    parser.add_argument("--archs", default="i2v_small,i2v_convnext_base,i2v_vit_base")
    parser.add_argument("--images", type=int, default=16, help="board images tagged per run")
    parser.add_argument("--calibration", type=int, default=12, help="board images to quantize on (at least 12)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--mode", default="static", choices=("static", "dynamic"))
    parser.add_argument(
        "--trained", default=None, help="a bundle with model.onnx whose run is here (default: train one)"
    )
    parser.add_argument("--no-agreement", action="store_true", help="speed only")
    parser.add_argument("--check", type=int, default=240, help="held-out board images to measure agreement on")
    parser.add_argument("--train-posts", type=int, default=400, help="posts the agreement's tagger is trained on")
    parser.add_argument("--agreement-modes", default="static,dynamic", help="quantize modes whose agreement to show")
    parser.add_argument("--seed", type=int, default=3)
    fast_distill.add_flags(parser)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        board = Board(SynthConfig(posts=max(200, 2 * (args.images + args.calibration)), seed=args.seed))
        write_images(board, root / "images", args.images)
        rows = [speed(arch, board, root, args) for arch in args.archs.split(",") if arch]
        agreed = None
        if not args.no_agreement:
            bundle = Path(args.trained) if args.trained else trained_bundle(root / "trained", args.train_posts, 4)
            check = held_out(root, args.train_posts, args.check)
            agreed = [
                quantize(
                    QuantizeConfig(
                        model=str(bundle),
                        out=str(root / f"int8-{mode}"),
                        mode=mode,
                        check=(str(check),),
                        images=args.check,
                    ),
                    console=QUIET,
                )
                for mode in args.agreement_modes.split(",")
            ]
    print(
        f"fast: i2v tag end to end, int8 ({args.mode}) vs fp32, onnxruntime on the CPU ({os.cpu_count()} cores, load "
        f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); {args.images} board images, batch "
        f"{args.batch_size}, best of {args.repeat}; random weights, quantized on {args.calibration} board images:"
    )
    for r in rows:
        f1 = ", ".join(f"{h} {v:.2f}" for h, v in r["quantize"].f1.items())
        print(
            f"  {r['arch']} at {r['size']} px: fp32 {r['fp32']:.2f} images/s, int8 {r['int8']:.2f} images/s, "
            f"int8/fp32 {r['int8'] / r['fp32']:.2f}x (goal 1.8x); model.int8.onnx {r['bytes'][1] / r['bytes'][0]:.2f}x "
            f"the size (random weights' agreement, not meaningful: {f1})"
        )
    for q in agreed or []:
        f1 = ", ".join(f"{h} {v:.3f}" for h, v in q.f1.items())
        print(
            f"  trained model, {q.mode} ({q.calibration_source}; calibrated on {q.calibration_images}, checked on "
            f"{q.check_images} held-out board images): F1 of int8's decisions against fp32's {f1} (goal 0.97); "
            f"largest probability difference {q.max_prob_diff:.4f}; model.int8.onnx {q.int8_bytes / q.fp32_bytes:.2f}x"
        )
    fast_distill.run(args, rows)  # the distilled student against its teacher and the presets above
