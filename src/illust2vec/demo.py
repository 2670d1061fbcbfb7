"""`i2v demo`: the whole flow on the synthetic board, offline, in minutes on a CPU; ends with DIR/report.html."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console

from .booru.crawl import CrawlConfig, crawl, print_summary
from .data.build import BuildConfig, build
from .data.vocab import build_vocab
from .evaluate import EvalConfig, evaluate_run
from .export import ExportConfig, export
from .formats.categories import RATING_TAGS
from .formats.shards import iter_samples
from .formats.vocab import write_vocab
from .infer.embed import EmbedConfig, embed_files
from .infer.pipeline import TagConfig, tag_files
from .report import Example, Neighbours, Report, Stage, write_report
from .search.index import IndexParams
from .search.similar import build_index, search_hits
from .synth.board import Board
from .synth.cast import SynthConfig
from .synth.server import start_board
from .train.config import TrainConfig
from .train.loop import fit

log = logging.getLogger(__name__)

# --quick: every stage in under two minutes on a 2-core CPU, for CI and a first look.
QUICK = dict(posts=300, epochs=2, held_out=60, train_size=64)


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("demo-out")
    posts: int = 3000
    seed: int = 0
    image_size: int = 512  # longer side kept by the crawl
    train_size: int = 128  # side of the training squares
    epochs: int = 8
    held_out: int = 400  # posts drawn after the board's, never crawled: tagged, embedded and searched
    workers: int = 2  # build's processes and evaluation's loaders; training takes its own default


class _Clock:
    """Times each stage and keeps its facts for the summary and the report."""

    def __init__(self, console: Console):
        self.console, self.stages, self.t = console, [], time.perf_counter()

    def done(self, name: str, **facts) -> None:
        now = time.perf_counter()
        self.stages.append(Stage(name, now - self.t, facts))
        shown = ", ".join(f"{k} {v}" for k, v in facts.items())
        self.console.print(f"[green]{name}[/] done in {now - self.t:.1f} s: {shown}", highlight=False)
        self.t = now


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """The whole flow on the synthetic board, each stage through the same library function as its command:
    serve the board, crawl it, choose the vocabulary, build shards, train, evaluate, export (with ONNX), tag
    held-out images, embed them, index them and query the index; then write DIR/report.html. Returns the summary."""
    console = console or Console(stderr=True)
    _clean(cfg.out)
    clock = _Clock(console)
    t0 = time.perf_counter()
    crawled = _crawl(cfg, clock)
    vocab = _vocab(cfg, crawled, clock)
    _build(cfg, crawled, clock)
    run = _train(cfg, clock)
    heads = _evaluate(cfg, run, clock)
    bundle = _export(cfg, run, clock)
    held_out = cfg.out / "held-out"
    truth = _write_held_out(cfg, held_out)
    records, tagged = _tag(cfg, held_out, bundle, clock)
    quality = _search(cfg, held_out, bundle, truth, vocab, clock)
    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "stages": {s.name: {"seconds": round(s.seconds, 1), **s.facts} for s in clock.stages},
        "metrics": heads,
        "search": quality["precision@10"],
        "bundle": str(bundle),
        "index": str(cfg.out / "index"),
    }
    _write_page(cfg, summary, clock, run, heads, [_example(held_out, r, truth) for r in records[:12]], quality, tagged)
    console.print(
        f"wrote {summary['report']} (and {run}, {bundle}, {cfg.out / 'tags.jsonl'}, {summary['index']}); "
        f"{summary['seconds']:.0f} s in all. Next: i2v serve --model {bundle} --index {summary['index']}",
        highlight=False,
    )
    return summary


def _clean(out: Path) -> None:
    """Each demo serves a new board on a new port: an earlier demo's outputs are not ones to resume."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("crawl", "dataset", "run", "bundle", "held-out", "vectors.parquet.parts", "index"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("vectors.parquet", "tags.jsonl", "report.html", "summary.json"):
        (out / name).unlink(missing_ok=True)


def _crawl(cfg: DemoConfig, clock: _Clock) -> Path:
    """1: serve the board in-process and crawl it; a contact sheet of what came in."""
    console = clock.console
    with start_board(SynthConfig(posts=cfg.posts, seed=cfg.seed)) as server:
        console.print(f"[bold]fakebooru[/] serving {len(server.board.posts)} synthetic posts at {server.url}")
        console.print(f"[bold]crawl[/] posts and images, resized to a longer side of {cfg.image_size} px")
        # The board is local: the polite default rates of a real board would only slow the demo down.
        crawl_cfg = CrawlConfig(
            url=server.url, out=cfg.out / "crawl", image_size=cfg.image_size, api_rate=100, file_rate=200
        )
        result = crawl(crawl_cfg, console=console)
    print_summary(result, console)
    _contact_sheet(_samples(crawl_cfg.out, 48)).save(cfg.out / "contact-sheet.jpg", quality=88)
    crawled = asdict(result)
    clock.done("crawl", statuses=crawled["statuses"], images=crawled["images"], seconds=round(crawled["seconds"], 1))
    return crawl_cfg.out


def _vocab(cfg: DemoConfig, crawled: Path, clock: _Clock):
    """2: the vocabulary."""
    vocab = build_vocab([crawled])
    write_vocab(vocab, cfg.out / "selected_tags.csv")
    clock.done("vocab", **{f"{head} tags": len(rows) for head, rows in vocab.heads.items()})
    return vocab


def _build(cfg: DemoConfig, crawled: Path, clock: _Clock) -> None:
    """3: the training shards."""
    build_cfg = BuildConfig(
        dirs=(crawled,),
        vocab=cfg.out / "selected_tags.csv",
        out=cfg.out / "dataset",
        size=cfg.train_size,
        val_fraction=0.1,
        workers=cfg.workers,
    )
    data = build(build_cfg, console=clock.console)
    clock.done("build", **{s: v.samples for s, v in data.info.splits.items()}, size=f"{cfg.train_size} px")


def _train(cfg: DemoConfig, clock: _Clock) -> Path:
    """4: train i2v_small on the CPU."""
    clock.console.print(f"[bold]train[/] i2v_small for {cfg.epochs} epochs on the CPU")
    run = cfg.out / "run"
    trained = fit(TrainConfig(data=str(cfg.out / "dataset"), out=str(run), epochs=cfg.epochs), console=clock.console)
    clock.done("train", epochs=cfg.epochs, **{"best epoch": trained.best_epoch, "by": trained.select_by})
    return run


def _evaluate(cfg: DemoConfig, run: Path, clock: _Clock) -> dict:
    """5: evaluate the best epoch; returns the metrics per head."""
    report = evaluate_run(EvalConfig(str(run), "best", workers=cfg.workers), console=clock.console)
    heads = report.heads
    clock.done(
        "evaluate",
        epoch=report.epoch,
        **{f"{h} mAP": round(r["mAP"], 3) for h, r in heads.items() if r.get("mAP") is not None},
        **{"character top-1": round(heads.get("character", {}).get("top1") or 0.0, 3)},
    )
    return heads


def _export(cfg: DemoConfig, run: Path, clock: _Clock) -> Path:
    """6: export a bundle with ONNX."""
    bundle = cfg.out / "bundle"
    export_cfg = ExportConfig(str(run), str(bundle), onnx=True, overwrite=True, workers=cfg.workers)
    exported = export(export_cfg, clock.console)
    clock.done("export", bundle=str(bundle), **{"ONNX vs torch": f"{exported.onnx_max_abs_diff:.1e}"})
    return bundle


def _tag(cfg: DemoConfig, held_out: Path, bundle: Path, clock: _Clock):
    """7: tag held-out images (posts drawn after the board's: never crawled, never trained on)."""
    tags_path = cfg.out / "tags.jsonl"
    with open(tags_path, "w") as f:
        tag_cfg = TagConfig(paths=(str(held_out),), model=str(bundle), format="jsonl")
        tagged = tag_files(tag_cfg, out=f, console=clock.console)
    records = [json.loads(line) for line in tags_path.read_text().splitlines()]
    clock.done("tag", images=tagged.done, failed=tagged.n_failed, output=str(tags_path))
    return records, tagged


def _search(cfg: DemoConfig, held_out: Path, bundle: Path, truth: dict, vocab, clock: _Clock) -> dict:
    """8: embed the held-out images, index them and query the index with each."""
    vectors = cfg.out / "vectors.parquet"
    embed_cfg = EmbedConfig(paths=(str(held_out),), model=str(bundle), out=str(vectors), ids="stem")
    embedded = embed_files(embed_cfg, console=clock.console)
    index = build_index([vectors], cfg.out / "index", IndexParams()).index
    quality = _search_quality(index, truth, vocab.head_names("character") if "character" in vocab.heads else ())
    clock.done(
        "embed+index+similar",
        vectors=embedded.rows,
        index=index.kind,
        **{f"precision@10 {k}": round(v, 3) for k, v in quality["precision@10"].items()},
    )
    return quality


def _write_page(cfg, summary, clock, run, heads, examples, quality, tagged) -> None:
    """report.html and summary.json."""
    bundle, index = summary["bundle"], summary["index"]
    page = Report(
        title=f"illust2vec demo: {cfg.posts} synthetic posts, i2v_small, {cfg.epochs} epochs",
        stages=clock.stages,
        curves=run / "curves.png",
        metrics=heads,
        examples=examples,
        neighbours=quality["examples"],
        figures=_figures(heads, quality, summary["seconds"]),
        notes=[
            f"Tagged images: {tagged.done} posts drawn after the board's {cfg.posts}, never crawled nor trained "
            "on. Their true tags are the board's (label noise included).",
            f"Serve it: i2v serve --model {bundle} --index {index}",
        ],
    )
    write_report(page, cfg.out / "report.html")
    summary["report"] = str(cfg.out / "report.html")
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1))


def _write_held_out(cfg: DemoConfig, folder: Path) -> dict[str, dict]:
    """Images of posts drawn after the board's own (same seed, hence the same cast), with their true tags."""
    board = Board(SynthConfig(posts=cfg.posts + cfg.held_out, seed=cfg.seed))
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for post in board.posts[cfg.posts :]:
        if not post.is_image or post.is_deleted or post.is_banned:
            continue
        (folder / f"{post.id}.{post.file_ext}").write_bytes(board.file(post))
        truth[str(post.id)] = {"rating": [RATING_TAGS.get(post.rating, "")], **post.tags}
    return truth


def _example(folder: Path, record: dict, truth: dict[str, dict]) -> Example:
    path = Path(record["path"])
    predicted = {h: v for h, v in record.items() if h != "path"}
    return Example(path if path.is_absolute() else folder / path.name, predicted, truth.get(path.stem, {}))


def _search_quality(index, truth: dict[str, dict], known_characters) -> dict:
    """Precision@10 of the index's nearest neighbours sharing the query's character (single-character posts of
    characters the vocabulary knows) and its series; a few example rows for the report."""
    known = set(known_characters)
    rows = index.rows_by_id()
    shares: dict[str, list[float]] = {"character": [], "series": []}
    examples = []
    for post_id, tags in truth.items():
        chars = tags.get("character", [])
        if post_id not in rows or len(chars) != 1 or chars[0] not in known:
            continue
        hits = search_hits(index, index.vector(post_id), 10, None, rows[post_id])[1:]  # the query itself first
        if not hits:
            continue
        for key, field_ in (("character", "character"), ("series", "copyright")):
            mine = set(tags.get(field_, []))
            same = [bool(mine & set(truth.get(h.id, {}).get(field_, []))) for h in hits]
            shares[key].append(sum(same) / len(hits))
        if len(examples) < 6 and chars[0] not in {e.label for e in examples}:  # six characters, not one six times
            label = chars[0]
            results = [(Path(h.path), h.score, _label(truth.get(h.id, {}))) for h in hits[:8]]
            examples.append(Neighbours(Path(index.paths[rows[post_id]]), label, results))
    precision = {k: (sum(v) / len(v) if v else float("nan")) for k, v in shares.items()}
    return {"precision@10": precision, "queries": len(shares["character"]), "examples": examples}


def _label(tags: dict) -> str:
    chars = tags.get("character", [])
    return " ".join(chars) if chars else "original"


def _figures(heads: dict, quality: dict, seconds: float) -> dict[str, str]:
    figs = {}
    for head, key, name in (("general", "mAP", "general mAP"), ("character", "top1", "character top-1")):
        if heads.get(head, {}).get(key) is not None:
            figs[name] = f"{heads[head][key]:.3f}"
    for key, value in quality["precision@10"].items():
        figs[f"similar images: precision@10 ({key})"] = f"{value:.3f}"
    figs["whole flow"] = f"{seconds:.0f} s"
    return figs


def _samples(crawl_dir: Path, n: int) -> list[tuple[Image.Image, str]]:
    """The first n images of the crawl's shards with their character tags."""
    out: list[tuple[Image.Image, str]] = []
    for _, sample in iter_samples(sorted((crawl_dir / "images").glob("*.tar"))):
        meta = json.loads(sample.pop("json"))
        image = Image.open(io.BytesIO(next(iter(sample.values()))))
        out.append((image, " ".join(meta["tags_character"]) or "original"))
        if len(out) >= n:
            break
    return out


def _contact_sheet(thumbs: list[tuple[Image.Image, str]], cell: int = 200, cols: int = 8) -> Image.Image:
    rows = max(1, -(-len(thumbs) // cols))
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(thumbs):
        img = image.convert("RGBA")
        flat = Image.new("RGB", img.size, "white")
        flat.paste(img, mask=img.getchannel("A"))
        flat.thumbnail((cell - 8, cell - 8))
        x, y = (i % cols) * cell, (i // cols) * (cell + 16)
        sheet.paste(flat, (x + (cell - flat.width) // 2, y + (cell - flat.height) // 2))
        draw.text((x + 4, y + cell), caption[:32], fill="black")
    return sheet
