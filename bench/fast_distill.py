"""A distilled student against its teacher (issue 18), the last part of `python -m bench fast`.

One synthetic board, its posts in three ranges of ids: the first `--teacher-posts` are crawled, built and trained on
(the teacher, through the library functions of `i2v crawl`, `vocab`, `build`, `train` and `export --onnx`); the next
`--unlabelled` images are written as the board's originals (their real sizes and formats, no labels) and distilled
on with `i2v distill`'s library function; the last `--held-out` images, which neither model saw, measure agreement
and speed. The student is exported with ONNX and quantized (`i2v quantize`, calibrated on the unlabelled images).

Printed, each with its goal:
- agreement of the student (fp32 and int8) with the teacher on the held-out images: per category, F1 of the
  student's decisions at its own thresholds (matched to the teacher's by `i2v distill`) against the teacher's
  decisions at the teacher's thresholds; the rating, the arg-max's accuracy; character top-1, how often the
  student's highest character is one the teacher decided, over the images where it decided one; mAP of the
  student's probabilities against the teacher's decisions (goals: general F1 0.9, character top-1 0.95);
- images/s of `i2v tag` end to end (decode, prepare, infer, write; `--batch-size auto`, the default) on the
  held-out originals: the teacher, the student at fp32 and at int8 (goal: 20 images/s), alternated, best of
  `--repeat`; and the student against the 448 px presets as `bench fast` measured them in the same run
  (`--archs`; goal 20x; a preset not measured is said so).

The default teacher is what about 30 minutes of an idle 2-core CPU allow for the whole teacher (board, crawl, build,
training): `i2v_small` (ResNet-10t, avg+max pooling) at 160 px, 4,000 posts, 12 epochs. Smaller runs for a busy
machine: e.g. `--teacher-posts 2000 --teacher-size 128 --teacher-epochs 6`. The default student is `i2v_small` at
96 px: at these sizes decoding the originals is most of `i2v tag`'s time, so ResNet-10t tags about as fast as
MobileNetV3-small and learns the teacher far faster (general F1 0.90 against 0.73 after 10 epochs at 64 px); from
the default 160 px teacher a 64 px student missed the goals (general F1 0.891, character top-1 0.914) and a 96 px
one met them (0.921, 0.959) at 156 images/s fp32, 212 int8 (docs/benchmarks.md).

    python -m bench fast [--archs ...] [--teacher-posts 4000] [--teacher-size 160] [--teacher-epochs 12]
        [--teacher-arch i2v_small] [--student i2v_small] [--student-size 96] [--student-epochs 16]
        [--unlabelled 1600] [--held-out 300] [--distill-keep DIR] [--teacher BUNDLE] [--no-distill]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from illust2vec.evaluation.metrics import mean_average_precision, precision_recall_f1
from illust2vec.infer.tagger import Tagger
from illust2vec.synth.board import Board, SynthPost
from illust2vec.synth.cast import SynthConfig

from .tag import pipeline_rate

QUIET = Console(file=io.StringIO())
PRESETS_448 = ("i2v_convnext_base", "i2v_vit_base")
GOALS = {"general F1": 0.9, "character top-1": 0.95, "images/s": 20.0, "x presets": 20.0}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The distillation part's options, on `bench fast`'s parser."""
    g = parser.add_argument_group("distilled student (bench/fast_distill.py)")
    g.add_argument("--no-distill", action="store_true", help="skip the teacher, the student and their figures")
    g.add_argument("--teacher-posts", type=int, default=4000, help="board posts the teacher is trained on")
    g.add_argument("--teacher-size", type=int, default=160)
    g.add_argument("--teacher-epochs", type=int, default=12)
    g.add_argument("--teacher-arch", default="i2v_small")
    g.add_argument("--teacher", default=None, help="a teacher bundle (with model.onnx) instead of training one")
    g.add_argument("--student", default="i2v_small", help="a preset or timm model name")
    g.add_argument("--student-size", type=int, default=96)
    g.add_argument("--student-epochs", type=int, default=16)
    g.add_argument("--unlabelled", type=int, default=1600, help="board originals the student is distilled on")
    g.add_argument("--held-out", type=int, default=300, help="board originals agreement and speed are measured on")
    g.add_argument("--distill-seed", type=int, default=0, help="seed of the board")
    g.add_argument("--distill-keep", type=Path, default=None, help="work here and keep it (reruns reuse the teacher)")


@dataclass
class Models:
    teacher: Path
    student: Path  # a bundle with model.onnx and model.int8.onnx
    held_out: Path  # a folder of board originals
    seconds: dict[str, float]
    distilled: object  # DistillSummary
    teacher_line: str


def run(args: argparse.Namespace, rows: list[dict]) -> None:
    """Teacher, student, agreement and speed; `rows` are `bench fast`'s preset measurements of this run."""
    if args.no_distill:
        return
    print("fast: the distilled student next (a teacher trained first; --no-distill skips it)", file=sys.stderr)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.distill_keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        models = make_models(root, args)
        teacher, student = Tagger.load(models.teacher, precision="fp32"), Tagger.load(models.student, precision="fp32")
        int8 = Tagger.load(models.student, precision="int8")
        paths = sorted(models.held_out.iterdir())
        agreed = {"fp32": agreement(teacher, student, paths), "int8": agreement(teacher, int8, paths)}
        rates = speeds({"teacher": teacher, "student fp32": student, "student int8": int8}, models.held_out, args)
    report(models, agreed, rates, rows, args, (load, os.getloadavg()[0]), len(paths))


def make_models(root: Path, args: argparse.Namespace) -> Models:
    """The teacher (trained unless given or kept), the images, the distilled student, exported and quantized."""
    from illust2vec.distill import DistillConfig, distill
    from illust2vec.export import ExportConfig, export
    from illust2vec.quantize import QuantizeConfig, quantize

    extra = int(1.15 * (args.unlabelled + args.held_out)) + 50  # deleted, banned and non-image posts are skipped
    board = Board(SynthConfig(posts=args.teacher_posts + extra, seed=args.distill_seed))
    first, rest = board.posts[: args.teacher_posts], board.posts[args.teacher_posts :]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher = Path(args.teacher) if args.teacher else train_teacher(board, first[-1].id, root / "teacher", args)
    seconds["teacher"] = time.perf_counter() - t0
    images = [p for p in rest if p.is_image and not p.is_deleted and not p.is_banned]
    unlabelled = write_originals(board, images[: args.unlabelled], root / "unlabelled")
    held_out = write_originals(board, images[args.unlabelled : args.unlabelled + args.held_out], root / "held-out")
    t0 = time.perf_counter()
    name = f"student-{args.student}-{args.student_size}"
    run_dir, bundle = root / f"{name}-run", root / name
    distilled = None
    if not (bundle / "model.int8.onnx").exists():
        cfg = DistillConfig(
            teacher=str(teacher),
            images=(str(unlabelled),),
            student=args.student,
            size=args.student_size,
            out=str(run_dir),
            epochs=args.student_epochs,
            resume=(run_dir / "config.json").exists(),
        )
        distilled = distill(cfg, console=QUIET)
        export(ExportConfig(run=str(run_dir), out=str(bundle), onnx=True, overwrite=True), console=QUIET)
        quantize(QuantizeConfig(model=str(bundle), calibration=(str(unlabelled),)), console=QUIET)
    seconds["student"] = time.perf_counter() - t0
    line = teacher_line(teacher, args)
    return Models(teacher, bundle, held_out, seconds, distilled, line)


def train_teacher(board: Board, last_id: int, root: Path, args: argparse.Namespace) -> Path:
    """Crawl the board's posts up to `last_id`, choose the vocabulary, build, train and export with ONNX."""
    from illust2vec.booru.crawl import CrawlConfig, crawl
    from illust2vec.data.build import BuildConfig, build
    from illust2vec.data.vocab import build_vocab
    from illust2vec.export import ExportConfig, export
    from illust2vec.formats.vocab import write_vocab
    from illust2vec.synth.server import BoardServer
    from illust2vec.train.config import TrainConfig
    from illust2vec.train.loop import fit

    bundle = root / "bundle"
    if (bundle / "model.onnx").exists():
        return bundle
    size = args.teacher_size
    if not (root / "crawl" / "posts").is_dir():
        with BoardServer(board, warm=False) as server:
            rates = dict(api_rate=500, file_rate=500, image_size=2 * size)
            crawl(CrawlConfig(url=server.url, out=root / "crawl", ids=(1, last_id), **rates))
    if not (root / "ds" / "dataset.json").exists():
        write_vocab(build_vocab([root / "crawl"]), root / "selected_tags.csv")
        build(BuildConfig(dirs=(root / "crawl",), vocab=root / "selected_tags.csv", out=root / "ds", size=size))
    run = root / "run"
    if not (run / "best.json").exists():
        cfg = TrainConfig(data=str(root / "ds"), out=str(run), arch=args.teacher_arch, epochs=args.teacher_epochs)
        fit(cfg, resume=(run / "config.json").exists())
    export(ExportConfig(run=str(run), out=str(bundle), onnx=True, overwrite=True), console=QUIET)
    return bundle


def write_originals(board: Board, posts: list[SynthPost], folder: Path) -> Path:
    """The posts' files as the board serves them (a user's collection: no labels), kept when already there."""
    folder.mkdir(parents=True, exist_ok=True)
    for post in posts:
        path = folder / f"{post.id}.{post.file_ext}"
        if not path.exists():
            path.write_bytes(board.file(post))
    return folder


def teacher_line(bundle: Path, args: argparse.Namespace) -> str:
    import json

    model = json.loads((bundle / "config.json").read_text()).get("model", {})
    if args.teacher:
        return f"teacher {bundle} ({model.get('backbone')} at {model.get('image_size')} px)"
    return (
        f"teacher {args.teacher_arch} ({model.get('backbone')}) at {model.get('image_size')} px, trained on the "
        f"board's first {args.teacher_posts} posts for {args.teacher_epochs} epochs"
    )


def decisions(tagger: Tagger, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per head, the tagger's yes/no per tag at its thresholds (per tag where it has one, else its head's); the
    rating and any softmax head, the arg-max."""
    out = {}
    for head, ix in tagger.labels.heads.items():
        p = probs[:, list(ix)]
        if head == "rating" or tagger.labels.activations.get(head) == "softmax":
            out[head] = p == p.max(axis=1, keepdims=True)
            continue
        base = tagger.thresholds.heads.get(head, 0.5)
        names = tagger.labels.names
        out[head] = p > np.array([tagger.thresholds.tags.get(names[i], base) for i in ix], np.float32)
    return out


def agreement(teacher: Tagger, student: Tagger, paths: list[Path]) -> dict[str, float]:
    """The student's agreement with the teacher on `paths` (see the module's doc)."""
    assert teacher.labels.names == student.labels.names, "the student has the teacher's vocabulary"
    tp, sp = teacher.predict(paths), student.predict(paths)
    truth, said = decisions(teacher, tp), decisions(student, sp)
    out = {}
    for head, ix in teacher.labels.heads.items():
        t, s = truth[head].astype(np.float32), said[head].astype(np.float32)
        if head == "rating":
            out["rating accuracy"] = float((t.argmax(axis=1) == s.argmax(axis=1)).mean())
            continue
        out[f"{head} F1"] = precision_recall_f1(s, t, threshold=0.5)["micro_f1"]
        out[f"{head} mAP"] = mean_average_precision(sp[:, list(ix)], t)
    chars = teacher.labels.heads.get("character")
    if chars:
        t = truth["character"]
        some = t.any(axis=1)
        top = sp[:, list(chars)].argmax(axis=1)
        out["character top-1"] = float(t[some, top[some]].mean()) if some.any() else float("nan")
        out["character images"] = float(some.sum())
    return out


def speeds(taggers: dict[str, Tagger], folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """images/s of `i2v tag FOLDER` end to end for each tagger, alternated, best of `--repeat`."""
    n = len(list(folder.iterdir()))
    rates = dict.fromkeys(taggers, 0.0)
    for _ in range(args.repeat):
        for name, tagger in taggers.items():
            rate, done = pipeline_rate(tagger, folder, "auto")
            assert done == n, f"{name}: tagged {done} of {n}"
            rates[name] = max(rates[name], rate)
    return rates


def goal(value: float, target: float) -> str:
    return f"goal {target:g}: {'met' if value >= target else f'missed by {target - value:.3g}'}"


def report(m: Models, agreed: dict, rates: dict, rows: list[dict], args, load: tuple, n: int) -> None:
    s = m.distilled
    took = {k: f"{v:.0f} s" if v >= 1 else "kept from an earlier run" for k, v in m.seconds.items()}
    print(
        f"fast, distilled student: {m.teacher_line} ({took['teacher']}); student {args.student} at "
        f"{args.student_size} px distilled on {args.unlabelled} unlabelled board originals for {args.student_epochs} "
        f"epochs ({took['student']}, with the teacher pass, export and quantize); measured on {n} held-out "
        f"originals (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end):"
    )
    if s is not None and getattr(s, "agreement", None):
        inner = ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in s.agreement.items())
        print(f"  i2v distill's own validation (its held-out tenth of the unlabelled images): {inner}")
    for precision, a in agreed.items():
        figures = ", ".join(f"{k} {v:.3f}" for k, v in a.items() if k != "character images")
        print(f"  agreement of the student ({precision}) with the teacher: {figures}")
    fp32 = agreed["fp32"]
    f1, top1, chars = fp32.get("general F1", 0.0), fp32.get("character top-1", 0.0), fp32.get("character images", 0)
    print(
        f"    general F1 {f1:.3f} ({goal(f1, GOALS['general F1'])}), character top-1 {top1:.3f} over {chars:.0f} "
        f"images with a character ({goal(top1, GOALS['character top-1'])})"
    )
    best = max(rates["student fp32"], rates["student int8"])
    print(
        f"  i2v tag end to end, --batch-size auto, best of {args.repeat}: teacher {rates['teacher']:.1f} images/s, "
        f"student fp32 {rates['student fp32']:.1f}, int8 {rates['student int8']:.1f} "
        f"({best / rates['teacher']:.1f}x the teacher; {goal(best, GOALS['images/s'])} images/s)"
    )
    measured = {r["arch"]: r for r in rows}
    for arch in PRESETS_448:
        r = measured.get(arch)
        if r is None:
            print(f"  {arch}: not measured in this run (add it to --archs)")
            continue
        print(
            f"  student ({best:.1f} images/s) vs {arch} at {r['size']} px: {best / r['fp32']:.0f}x its fp32 "
            f"({r['fp32']:.2f} images/s), {best / r['int8']:.0f}x its int8 ({r['int8']:.2f}); "
            f"{goal(best / r['int8'], GOALS['x presets'])} (against int8)"
        )
