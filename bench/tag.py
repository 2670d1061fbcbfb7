"""Tagging a folder end to end (`i2v tag`: decode, prepare, infer, write) vs the model's forward pass alone, and vs
the usual WD script (one image at a time: PIL, the WD prepare, onnxruntime `session.run` per image).

The model is a 448 px base preset, randomly initialised (speed does not depend on the weights), with the vocabulary
of the synthetic board, saved as a bundle with model.onnx through export's own functions. The images are the
board's, at their real sizes (300 to 2000 px; JPEG, PNG, WebP, GIF) on disk. All three run on the same ONNX file
with onnxruntime on the CPU by default (`--backend torch` measures the bundle's torch path instead for the first two).
`--device cuda` runs the bundle's torch path on the GPU (bf16), and the baseline becomes wdv3_timm.py's pattern: one
image at a time through the same model on the GPU.

    python -m bench tag [--arch i2v_vit_base] [--images 32] [--batch-size 8] [--repeat 1] [--device cpu|cuda]

`--batch-sizes 1,2,4,8,16,32,auto` prints a table instead: `i2v tag` end to end (onnxruntime on the CPU) at each
batch size, `auto` (timed on the first batches) among them, against the WD script pattern, alternated in each
repeat, with the size auto chose; sizes larger than `--images` are left out. `--session-options` compares
onnxruntime's session options (intra-op threads, spinning, graph optimisation level, memory arena) end to end at
`--batch-size`, against the defaults in the same run.

    python -m bench tag --batch-sizes 1,2,4,8,16,auto --arch i2v_convnext_base --images 16 --repeat 2
    python -m bench tag --session-options --arch i2v_convnext_base --images 12 --batch-size 1 --repeat 2

`--ray` measures `i2v tag --ray` instead: the same folder tagged on a local Ray cluster of `--ray-cpus` CPUs (2 by
default; started once, its start-up timed apart) against plain `i2v tag` in the same run, each repeat both, and
prints the ratio (the issue's target: at least 0.8). The Ray run is timed from the pipeline's start (the model
actors' start and model load included) to its last part written.

    python -m bench tag --ray [--images 64] [--batch-size 8] [--repeat 2] [--ray-cpus 2]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from illust2vec.formats.categories import CATEGORY_CODES, HEAD_ORDER, RATING_IDS, RATING_TAGS
from illust2vec.formats.vocab import Vocab, tag_id
from illust2vec.infer.engine import RayOptions
from illust2vec.infer.pipeline import TagConfig, tag_files
from illust2vec.infer.preprocess import load_batch
from illust2vec.infer.tagger import Tagger
from illust2vec.synth.board import Board
from illust2vec.synth.cast import SynthConfig


def board_vocab(board: Board, top: int = 512) -> Vocab:
    """The board's most frequent tags per head, in WD's order: what `i2v vocab` would choose from a crawl of it."""
    counts = {h: Counter() for h in ("general", "character", "copyright")}
    ratings: Counter = Counter()
    for post in board.posts:
        if post.is_image and not post.is_deleted and not post.is_banned:
            ratings[RATING_TAGS[post.rating]] += 1
            for head, counter in counts.items():
                counter.update(post.tags.get(head, ()))
    rows = [(RATING_IDS[n], n, CATEGORY_CODES["rating"], ratings[n]) for n in RATING_IDS]
    for head in HEAD_ORDER:
        if head in counts:
            kept = sorted(counts[head].items(), key=lambda kv: (-kv[1], kv[0]))[:top]
            rows += [(tag_id(n), n, CATEGORY_CODES[head], c) for n, c in kept]
    return Vocab(*(tuple(column) for column in zip(*rows, strict=True)))


def save_random_bundle(arch: str, vocab: Vocab, out: Path) -> Path:
    """A freshly initialised preset saved as a bundle with model.onnx, through export's own functions."""
    from functools import partial

    from illust2vec.formats.bundle import Thresholds, save_bundle
    from illust2vec.models.onnx import export_onnx
    from illust2vec.models.tagger import create_tagger, default_heads

    model = create_tagger(arch, heads=default_heads({h: len(ix) for h, ix in vocab.heads.items()})).eval()
    source = {"bench": "random weights"}
    save_bundle(out, model, vocab, Thresholds(), source=source, onnx=partial(export_onnx, model))
    return out


def write_images(board: Board, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for post in board.posts:
        if post.is_image and not post.is_deleted and not post.is_banned:
            paths.append(folder / f"{post.id}.{post.file_ext}")
            paths[-1].write_bytes(board.file(post))
            if len(paths) == n:
                break
    return paths


def forward_rate(tagger: Tagger, paths: list[Path], batch_size: int) -> float:
    """The forward pass alone, on batches prepared beforehand and held in memory."""
    batches = [load_batch(paths[i : i + batch_size], tagger.image_size) for i in range(0, len(paths), batch_size)]
    t0 = time.perf_counter()
    for batch in batches:
        tagger.run(batch)
    return len(paths) / (time.perf_counter() - t0)


def pipeline_rate(tagger: Tagger, folder: Path, batch_size: int | str) -> tuple[float, int]:
    """`i2v tag FOLDER --format jsonl` through its library function, the records written to memory."""
    summary = pipeline_summary(tagger, folder, batch_size)
    return summary.done / summary.seconds, summary.done


def pipeline_summary(tagger: Tagger, folder: Path, batch_size: int | str):
    """`i2v tag FOLDER --format jsonl --batch-size B`'s summary (a BatchSummary), the records written to memory."""
    cfg = TagConfig(paths=(str(folder),), model="", format="jsonl", batch_size=batch_size)
    return tag_files(cfg, out=io.StringIO(), console=Console(file=io.StringIO()), tagger=tagger)


def batch_sizes(args: argparse.Namespace) -> None:
    """`i2v tag` end to end at each batch size of `--batch-sizes` (auto among them), against the WD script pattern,
    alternated in each repeat; the best of each printed as a table."""
    sizes = [s if s == "auto" else int(s) for s in args.batch_sizes.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        board = Board(SynthConfig(posts=max(200, 2 * args.images), seed=args.seed))
        bundle = save_random_bundle(args.arch, board_vocab(board), root / "bundle")
        paths = write_images(board, root / "images", args.images)
        sizes = [s for s in sizes if s == "auto" or s <= len(paths)]  # a batch larger than the folder is one batch
        tagger = Tagger.load(bundle, backend="onnx", device="cpu", precision="fp32")
        tagger.run(load_batch(paths[:1], tagger.image_size))  # warm-up
        load = os.getloadavg()[0]
        rates, wd, chosen = dict.fromkeys(sizes, 0.0), 0.0, []
        for i in range(args.repeat):  # alternated: a burst of other work on the machine hits each alike
            wd = max(wd, wd_script_rate(bundle / "model.onnx", paths))
            for size in sizes[:: 1 if i % 2 == 0 else -1]:  # each in turn early and late in a repeat
                summary = pipeline_summary(tagger, root / "images", size)
                assert summary.done == len(paths), f"tagged {summary.done} of {len(paths)}"
                rates[size] = max(rates[size], summary.done / summary.seconds)
                if size == "auto":
                    chosen.append(summary.batch)
    print(
        f"tag --batch-sizes: {args.arch} at {tagger.image_size} px (random weights), {len(paths)} board images, "
        f"onnxruntime on the CPU ({os.cpu_count()} cores, load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end), i2v tag end to end, best of {args.repeat}:"
    )
    print(f"  {'WD script pattern':>18}: {wd:.3f} images/s")
    for size, rate in rates.items():
        print(f"  {'batch ' + str(size):>18}: {rate:.3f} images/s  {rate / wd:.2f}x the WD script")
    for note in chosen:
        print(f"  auto chose batch {note}")


def ray_rate(bundle: Path, folder: Path, batch_size: int, out: Path) -> tuple[float, int]:
    """`i2v tag FOLDER --format jsonl --ray --out OUT` through its library function, on the connected cluster."""
    ray = RayOptions(part_size=256)
    cfg = TagConfig(
        paths=(str(folder),), model=str(bundle), format="jsonl", batch_size=batch_size, out=str(out), ray=ray
    )
    summary = tag_files(cfg, console=Console(file=io.StringIO()))
    return summary.done / summary.seconds, summary.done


def ray_vs_plain(args: argparse.Namespace) -> None:
    """`i2v tag --ray` on a local cluster against plain `i2v tag`, in the same run."""
    from illust2vec.util import cluster

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        board = Board(SynthConfig(posts=max(200, 2 * args.images), seed=args.seed))
        bundle = save_random_bundle(args.arch, board_vocab(board), root / "bundle")
        paths = write_images(board, root / "images", args.images)
        tagger = Tagger.load(bundle, backend=args.backend)
        tagger.run(load_batch(paths[: args.batch_size], tagger.image_size))  # warm-up
        t0 = time.perf_counter()
        with cluster.connect(None, num_cpus=args.ray_cpus) as info:
            start = time.perf_counter() - t0
            load = os.getloadavg()[0]
            plain = on_ray = 0.0
            for i in range(args.repeat):  # interleaved: a burst of other work on the machine hits both alike
                rate, tagged = pipeline_rate(tagger, root / "images", args.batch_size)
                assert tagged == len(paths), f"tagged {tagged} of {len(paths)}"
                plain = max(plain, rate)
                rate, tagged = ray_rate(bundle, root / "images", args.batch_size, root / f"out{i}")
                assert tagged == len(paths), f"tagged {tagged} of {len(paths)} on Ray"
                on_ray = max(on_ray, rate)
    print(
        f"tag --ray: {args.arch} at {tagger.image_size} px (random weights), {len(paths)} board images, batch "
        f"{args.batch_size}, backend {tagger.backend.name}; a local Ray cluster of {info.cpus:g} CPUs (started in "
        f"{start:.1f} s) on {os.cpu_count()} cores, load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; best of {args.repeat}:"
    )
    print(f"  plain i2v tag (threads decode, the model in-process): {plain:.3f} images/s")
    print(f"  i2v tag --ray (decode tasks, 1 model actor, parts written): {on_ray:.3f} images/s")
    print(f"  --ray / plain: {on_ray / plain:.2f} (target: at least 0.8)")


SESSION_VARIANTS = {  # name -> onnxruntime session options, each measured against onnxruntime's defaults
    "defaults": {"spinning": True},  # onnxruntime's own defaults
    "1 intra-op thread": {"threads": 1, "spinning": True},
    "no spinning": {"spinning": False},  # i2v tag's SessionOptions()
    "graph extended": {"graph": "extended", "spinning": True},
    "graph basic": {"graph": "basic", "spinning": True},
    "no memory arena": {"arena": False, "spinning": True},
}


def with_options(tagger: Tagger, onnx_path: Path, options: dict) -> Tagger:
    """The same tagger on a session opened with other options (`SessionOptions` fields)."""
    from dataclasses import replace

    from illust2vec.infer.backends import SessionOptions, onnx_backend

    b = tagger.backend
    backend = onnx_backend(onnx_path, outputs=(b.prob_outputs, b.feature_output), options=SessionOptions(**options))
    return replace(tagger, backend=backend)


def session_options(args: argparse.Namespace) -> None:
    """`i2v tag` end to end under each of SESSION_VARIANTS' session options, alternated, at one batch size."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        board = Board(SynthConfig(posts=max(200, 2 * args.images), seed=args.seed))
        bundle = save_random_bundle(args.arch, board_vocab(board), root / "bundle")
        paths = write_images(board, root / "images", args.images)
        base = Tagger.load(bundle, backend="onnx", device="cpu", precision="fp32")
        taggers = {name: with_options(base, bundle / "model.onnx", o) for name, o in SESSION_VARIANTS.items()}
        for tagger in taggers.values():
            tagger.run(load_batch(paths[: args.batch_size], tagger.image_size))  # warm-up
        load = os.getloadavg()[0]
        # The forward pass alone, round robin: one batch per variant in turn, so a burst of other work on a shared
        # machine hits each alike; the least time of each is its cost with the least interference.
        batch = load_batch(paths[: args.batch_size], base.image_size)
        times: dict[str, list[float]] = {name: [] for name in taggers}
        for _ in range(max(3, len(paths) // args.batch_size)):
            for name, tagger in taggers.items():
                t0 = time.perf_counter()
                tagger.run(batch)
                times[name].append(time.perf_counter() - t0)
        rates = dict.fromkeys(taggers, 0.0)
        for _ in range(args.repeat):  # alternated: a burst of other work on the machine hits each alike
            for name, tagger in list(taggers.items())[:: 1 if _ % 2 == 0 else -1]:  # and in turn first and last
                rate, tagged = pipeline_rate(tagger, root / "images", args.batch_size)
                assert tagged == len(paths), f"tagged {tagged} of {len(paths)}"
                rates[name] = max(rates[name], rate)
    print(
        f"tag --session-options: {args.arch} at {base.image_size} px, {len(paths)} board images, batch "
        f"{args.batch_size}, onnxruntime on the CPU ({os.cpu_count()} cores, load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end); the forward pass alone (round robin, least and median time of "
        f"{len(times['defaults'])}) and i2v tag end to end (best of {args.repeat}):"
    )
    fast = {name: min(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(
            f"  {name:20s} forward {fast[name]:.3f} s least, {np.median(times[name]):.3f} s median "
            f"({fast['defaults'] / fast[name]:.2f}x the defaults' speed); end to end {rate:.3f} images/s "
            f"({rate / rates['defaults']:.2f}x)"
        )


def wd_prepare(image: Image.Image, size: int) -> np.ndarray:
    """The WD Space's `prepare_image`, as the usual WD scripts copy it: RGBA onto white, pad, bicubic, BGR."""
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image)
    image = canvas.convert("RGB")
    side = max(image.size)
    padded = Image.new("RGB", (side, side), (255, 255, 255))
    padded.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
    if side != size:
        padded = padded.resize((size, size), Image.BICUBIC)
    return np.expand_dims(np.asarray(padded, dtype=np.float32)[:, :, ::-1], 0)


def wd_script_rate(onnx_path: Path, paths: list[Path]) -> float:
    """One image at a time: open, convert, prepare, `session.run`, then the scores to tags (as the scripts do)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[1]
    name, label = session.get_inputs()[0].name, session.get_outputs()[0].name
    session.run([label], {name: wd_prepare(Image.open(paths[0]).convert("RGBA"), size)})  # warm-up, as in a loop
    t0 = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGBA")
        probs = session.run([label], {name: wd_prepare(image, size)})[0][0]
        _ = [i for i, p in enumerate(probs) if p > 0.35]
    return len(paths) / (time.perf_counter() - t0)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "the CPU"


def wd_torch_rate(tagger: Tagger, paths: list[Path]) -> float:
    """wdv3_timm.py's pattern on a GPU: open, prepare, one forward pass per image, then the scores to tags."""
    size = tagger.image_size
    tagger.run(wd_prepare(Image.open(paths[0]).convert("RGBA"), size))  # warm-up
    t0 = time.perf_counter()
    for path in paths:
        probs = tagger.run(wd_prepare(Image.open(path).convert("RGBA"), size))[0][0]
        _ = [i for i, p in enumerate(probs) if p > 0.35]
    return len(paths) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench tag")
    parser.add_argument("--arch", default="i2v_vit_base", help="a 448 px base preset: i2v_vit_base, i2v_convnext_base")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="onnx", help="onnx or torch, for the pipeline and the forward pass")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="run each measurement this many times, keep the best")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the torch backend with bf16)")
    parser.add_argument("--ray", action="store_true", help="measure i2v tag --ray against plain i2v tag")
    parser.add_argument("--ray-cpus", type=int, default=2, help="--ray: CPUs of the local Ray cluster")
    parser.add_argument(
        "--session-options", action="store_true", help="compare onnxruntime session options (end to end)"
    )
    parser.add_argument(
        "--batch-sizes", default="", help="a table of i2v tag at each of these batch sizes (1,2,4,8,16,32,auto)"
    )
    args = parser.parse_args(argv)
    if args.ray:
        ray_vs_plain(args)
        return
    if args.session_options:
        session_options(args)
        return
    if args.batch_sizes:
        batch_sizes(args)
        return
    gpu = args.device.startswith("cuda")
    backend = "torch" if gpu else args.backend
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        board = Board(SynthConfig(posts=max(200, 2 * args.images), seed=args.seed))
        vocab = board_vocab(board)
        t0 = time.perf_counter()
        bundle = save_random_bundle(args.arch, vocab, root / "bundle")
        made = time.perf_counter() - t0
        paths = write_images(board, root / "images", args.images)
        megapixels = np.mean([np.prod(Image.open(p).size) for p in paths]) / 1e6
        tagger = Tagger.load(bundle, backend=backend, device=args.device)
        tagger.run(load_batch(paths[: args.batch_size], tagger.image_size))  # warm-up: first-call allocations
        load = os.getloadavg()[0]
        forward = end_to_end = wd = 0.0
        for _ in range(args.repeat):  # interleaved, so that a burst of other work on the machine hits all three alike
            forward = max(forward, forward_rate(tagger, paths, args.batch_size))
            rate, tagged = pipeline_rate(tagger, root / "images", args.batch_size)
            assert tagged == len(paths), f"tagged {tagged} of {len(paths)}"
            end_to_end = max(end_to_end, rate)
            wd = max(wd, wd_torch_rate(tagger, paths) if gpu else wd_script_rate(bundle / "model.onnx", paths))
    print(
        f"tag: {args.arch} at {tagger.image_size} px ({len(vocab)} tags, random weights, bundle made in {made:.0f} s), "
        f"{len(paths)} board images of {megapixels:.2f} Mpx on average, batch {args.batch_size}, "
        f"backend {tagger.backend.name} on {device_name(args.device)} ({os.cpu_count()} cores, "
        f"load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end), best of {args.repeat}:"
    )
    print(f"  forward pass alone (batches in memory): {forward:.3f} images/s")
    print(f"  i2v tag end to end (decode, prepare, infer, write): {end_to_end:.3f} images/s")
    baseline = "one forward pass per image on the GPU" if gpu else "session.run per image"
    print(f"  WD script pattern (PIL, prepare, {baseline}): {wd:.3f} images/s")
    print(f"  end to end / forward: {end_to_end / forward:.2f}   end to end / WD script: {end_to_end / wd:.2f}x")


if __name__ == "__main__":
    main()
