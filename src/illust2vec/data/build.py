"""`i2v build`: crawled posts and images -> padded, resized training shards with labels, split train/val/test."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import UserError, is_disk_full
from ..formats.posts import read_posts
from ..formats.shards import Member, ShardWriter, index_shard, read_member, sample_json
from ..util.cores import cores
from ..util.images import BadImage, load_rgb, pad_square
from .vocab import Vocab, apply_aliases, read_aliases, read_vocab

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
FORMAT_VERSION = 1
CHUNK = 32  # images per task sent to a worker process


@dataclass(frozen=True)
class BuildConfig:
    """How to turn crawls into training shards; saved in dataset.json."""

    dirs: tuple[Path, ...]
    vocab: Path
    out: Path
    size: int = 256
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    format: str = "jpg"
    quality: int = 95
    workers: int | None = None  # processes; None: one per core
    shard_size: int = 1000  # samples per shard
    seed: int = 0  # order of the training samples in the shards
    aliases: Path | None = None  # old tag name -> new, as `i2v vocab --aliases` applied before counting


def split_of(post_id: int, parent_id: int | None, val_fraction: float, test_fraction: float) -> str:
    """train, val or test, from a hash of the post's group (its parent, if it has one): stable across rebuilds.

    Related posts (variants of one picture) share a group, so a picture never sits on both sides of a split.
    Thresholds are nested, so growing a fraction only moves posts into it, never between the others.
    """
    group = parent_id or post_id
    u = int.from_bytes(hashlib.sha1(f"i2v-split:{group}".encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


@dataclass(frozen=True)
class Task:
    key: str
    member: Member
    meta: dict  # id, md5, rating, labels, split


def _die_with_parent() -> None:
    # Worker processes end when the build does, even if it is killed with SIGKILL (Linux; elsewhere a no-op).
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def process_chunk(
    chunk: list[tuple[str, Member]], size: int, fmt: str, quality: int
) -> list[tuple[str, bytes | None, str]]:
    """Decode, composite, pad and resize each image; returns (key, encoded bytes or None, skip reason)."""
    out = []
    for key, member in chunk:
        try:
            image = pad_square(load_rgb(read_member(member), shrink_to=size), size)
        except BadImage as e:
            out.append((key, None, e.reason))
            continue
        except OSError as e:  # the crawl's shard itself could not be read
            out.append((key, None, f"unreadable ({e.strerror or e})"))
            continue
        buf = io.BytesIO()
        image.save(buf, FORMATS[fmt], quality=quality)
        out.append((key, buf.getvalue(), ""))
    return out


def ordered_map(pool: ProcessPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """pool.map with at most `window` tasks in flight, results in order: bounded memory on millions of items."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def plan(cfg: BuildConfig, vocab: Vocab) -> tuple[list[Task], Counter]:
    """Which posts go where: labels, split and the crawl shard member holding each image; skips counted."""
    skipped: Counter = Counter()
    aliases = read_aliases(cfg.aliases) if cfg.aliases else {}
    members: dict[Path, dict[str, Member]] = {}
    tasks: list[Task] = []
    seen: set[int] = set()
    columns = [
        "id",
        "md5",
        "rating",
        "status",
        "shard",
        "parent_id",
        "tags_general",
        "tags_character",
        "tags_copyright",
        "tags_artist",
    ]
    for crawl_dir in cfg.dirs:
        rows = read_posts([crawl_dir], columns).to_pylist()
        for row in rows:
            if row["status"] != "ok":
                continue
            if row["id"] in seen:  # the same post in two overlapping crawls
                skipped["duplicate"] += 1
                continue
            seen.add(row["id"])
            tags = {
                c: apply_aliases(row[f"tags_{c}"], aliases) for c in ("general", "character", "copyright", "artist")
            }
            labels = vocab.encode(row["rating"] or "", tags)
            if not any(v for head, v in labels.items() if head != "rating"):
                skipped["no_selected_tag"] += 1
                continue
            shard = Path(crawl_dir) / (row["shard"] or "")
            if shard not in members:
                members[shard] = _index(shard)
            member = members[shard].get(row["md5"])
            if member is None:
                skipped["missing_image"] += 1
                log.warning("post %s: image %s not found in %s", row["id"], row["md5"], shard)
                continue
            split = split_of(row["id"], row["parent_id"], cfg.val_fraction, cfg.test_fraction)
            meta = {"id": row["id"], "md5": row["md5"], "rating": row["rating"] or "", "labels": labels, "split": split}
            tasks.append(Task(row["md5"], member, meta))
    return tasks, skipped


def _index(shard: Path) -> dict[str, Member]:
    if not shard.is_file():
        return {}
    return {m.key: m for m in index_shard(shard) if m.ext != "json"}


def build(cfg: BuildConfig, console: Console | None = None) -> dict:
    """Build the shards and dataset.json into cfg.out; returns dataset.json's content."""
    console = console or Console(stderr=True)
    if cfg.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {cfg.format!r}")
    if not (cfg.val_fraction >= 0 and cfg.test_fraction >= 0 and cfg.val_fraction + cfg.test_fraction < 1):
        raise UserError("--val-fraction and --test-fraction must be >= 0 and add up to less than 1")
    if cfg.size < 16:
        raise UserError("--size must be at least 16 pixels")
    vocab = read_vocab(cfg.vocab)
    t0 = time.perf_counter()
    tasks, skipped = plan(cfg, vocab)
    by_split = {s: [t for t in tasks if t.meta["split"] == s] for s in SPLITS}
    random.Random(cfg.seed).shuffle(by_split["train"])  # posts arrive in id order; shards should not
    for s in ("val", "test"):
        by_split[s].sort(key=lambda t: t.meta["id"])  # deterministic evaluation order

    cfg.out.mkdir(parents=True, exist_ok=True)
    for old in [*cfg.out.glob("*-[0-9]*.tar"), *cfg.out.glob("*.tmp"), cfg.out / "dataset.json"]:
        old.unlink(missing_ok=True)  # a rebuild replaces the previous build wholly
    shutil.copyfile(cfg.vocab, cfg.out / "selected_tags.csv")

    writers = {s: ShardWriter(cfg.out, f"{s}-{{index:06d}}.tar") for s in SPLITS}
    stats = {
        s: {"samples": 0, "shards": [], "tag_counts": {h: [0] * len(ix) for h, ix in vocab.heads.items()}}
        for s in SPLITS
    }
    examples: dict[str, list[str]] = {}
    ordered = [t for s in SPLITS for t in by_split[s]]
    chunks = [ordered[i : i + CHUNK] for i in range(0, len(ordered), CHUNK)]
    workers = cfg.workers or cores()
    context = multiprocessing.get_context("forkserver")
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    try:
        with (
            ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent) as pool,
            Progress(*columns, console=console) as progress,
        ):
            bar = progress.add_task("building shards", total=len(ordered), info="")
            jobs = (([(t.key, t.member) for t in chunk], cfg.size, cfg.format, cfg.quality) for chunk in chunks)
            for chunk, results in zip(chunks, ordered_map(pool, process_chunk, jobs, 4 * workers), strict=True):
                for task, (key, data, reason) in zip(chunk, results, strict=True):
                    if data is None:
                        skipped[reason] += 1
                        examples.setdefault(reason, []).append(f"post {task.meta['id']} ({task.member.shard.name})")
                        continue
                    split = task.meta["split"]
                    writer = writers[split]
                    writer.add(key, {cfg.format: data, "json": sample_json(task.meta)})
                    stat = stats[split]
                    stat["samples"] += 1
                    for head, positions in task.meta["labels"].items():
                        for p in positions:
                            stat["tag_counts"][head][p] += 1
                    if writer.count >= cfg.shard_size:
                        stat["shards"].append(writer.close().name)
                progress.update(bar, advance=len(chunk), info=f"{sum(skipped.values())} skipped")
        for s, writer in writers.items():
            info = writer.close()
            if info is not None:
                stats[s]["shards"].append(info.name)
    except OSError as e:
        for writer in writers.values():
            writer.abort()
        if is_disk_full(e):
            raise UserError(f"the disk under {cfg.out} is full ({e}); free some space and build again") from e
        raise

    dataset = {
        "format_version": FORMAT_VERSION,
        "image_size": cfg.size,
        "image_format": cfg.format,
        "vocab": "selected_tags.csv",
        "vocab_hash": vocab.hash,
        "heads": {h: len(ix) for h, ix in vocab.heads.items()},
        "splits": stats,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": {k: v[:10] for k, v in sorted(examples.items())},
        "sources": [str(d) for d in cfg.dirs],
        "config": {
            **asdict(cfg),
            "dirs": [str(d) for d in cfg.dirs],
            "vocab": str(cfg.vocab),
            "out": str(cfg.out),
            "aliases": str(cfg.aliases) if cfg.aliases else None,
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    tmp = cfg.out / "dataset.json.tmp"
    tmp.write_text(json.dumps(dataset, indent=1))
    os.replace(tmp, cfg.out / "dataset.json")
    return dataset
