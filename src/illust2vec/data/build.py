"""`i2v build`: crawled posts and images -> square training shards with labels, split train/val/test."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import multiprocessing
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

from ..errors import UserError, is_disk_full
from ..formats.dataset import (
    IMAGE_FORMATS,
    SPLITS,
    VOCAB,
    DatasetInfo,
    Sample,
    SplitInfo,
    built_files,
    shard_pattern,
    write_info,
)
from ..formats.posts import read_posts
from ..formats.shards import Member, ShardInfo, ShardWriter, read_member, scan_shard
from ..formats.vocab import Vocab, read_aliases, read_vocab
from ..util.cores import cores
from ..util.images import BadImage, load_for_input, pad_resize
from ..util.progress import progress_bar
from .vocab import apply_aliases

log = logging.getLogger(__name__)

CHUNK = 32  # images per task sent to a worker process
COLUMNS = ["id", "md5", "rating", "status", "shard", "parent_id"] + [
    f"tags_{c}" for c in ("general", "character", "copyright", "artist")
]


@dataclass(frozen=True)
class BuildConfig:
    """How to turn crawls into training shards; saved in dataset.json. It checks itself (UserError)."""

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "dirs", tuple(Path(d) for d in self.dirs))
        object.__setattr__(self, "vocab", Path(self.vocab))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "aliases", Path(self.aliases) if self.aliases else None)
        if not self.dirs:
            raise UserError("give at least one crawl directory to build from")
        if self.format not in IMAGE_FORMATS:
            raise UserError(f"--format must be one of {', '.join(IMAGE_FORMATS)}, not {self.format!r}")
        if not (self.val_fraction >= 0 and self.test_fraction >= 0 and self.val_fraction + self.test_fraction < 1):
            raise UserError("--val-fraction and --test-fraction must be >= 0 and add up to less than 1")
        if self.size < 16:
            raise UserError("--size must be at least 16 pixels")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be from 1 to 100, not {self.quality}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1, not {self.workers}")
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, not {self.shard_size}")

    def as_json(self) -> dict:
        """The configuration as dataset.json saves it, paths as strings."""
        return {
            **asdict(self),
            "dirs": [str(d) for d in self.dirs],
            "vocab": str(self.vocab),
            "out": str(self.out),
            "aliases": str(self.aliases) if self.aliases else None,
        }


@dataclass(frozen=True)
class BuildSummary:
    """What `build` wrote: dataset.json (`path`) and its content (`info`)."""

    path: Path
    info: DatasetInfo

    def as_dict(self) -> dict:
        """dataset.json's content."""
        return self.info.as_dict()


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
    """One sample to make: where its image lies in a crawl shard, and its labels."""

    key: str
    member: Member
    sample: Sample


def _die_with_parent() -> None:
    # Worker processes end when the build does, even if it is killed with SIGKILL (Linux; elsewhere a no-op).
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def process_chunk(
    chunk: list[tuple[str, Member]], size: int, fmt: str, quality: int
) -> list[tuple[str, bytes | None, str]]:
    """Decode each image, pad it to a white square and resize it (as inference does), encode it; returns (key,
    encoded bytes or None, skip reason)."""
    out = []
    for key, member in chunk:
        try:
            image = pad_resize(load_for_input(read_member(member), size), size)
        except BadImage as e:
            out.append((key, None, e.reason))
            continue
        except OSError as e:  # the crawl's shard itself could not be read
            out.append((key, None, f"unreadable ({e.strerror or e})"))
            continue
        buf = io.BytesIO()
        image.save(buf, IMAGE_FORMATS[fmt], quality=quality)
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
    """Which posts go where, in the order they are written: labels, split and the crawl shard member holding each
    image; the posts left out counted by reason. Training samples are shuffled (from the seed), val and test go by
    post id, so that evaluation reads them in a fixed order."""
    skipped: Counter = Counter()
    aliases = read_aliases(cfg.aliases) if cfg.aliases else {}
    members: dict[Path, dict[str, Member]] = {}
    broken: dict[Path, str] = {}  # crawl shards cut short or unreadable -> the skip reason of the posts they lost
    by_split: dict[str, list[Task]] = {s: [] for s in SPLITS}
    seen: set[int] = set()
    for crawl_dir in cfg.dirs:
        for row in read_posts([crawl_dir], COLUMNS).to_pylist():
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
                members[shard] = _index(shard, broken)
            member = members[shard].get(row["md5"])
            if member is None and shard in broken:
                skipped[broken[shard]] += 1  # in the part of a cut shard that is gone: one warning, for the shard
                continue
            if member is None:
                skipped["missing_image"] += 1
                log.warning("post %s: image %s not found in %s", row["id"], row["md5"], shard)
                continue
            split = split_of(row["id"], row["parent_id"], cfg.val_fraction, cfg.test_fraction)
            sample = Sample(row["id"], row["md5"], row["rating"] or "", labels, split)
            by_split[split].append(Task(row["md5"], member, sample))
    random.Random(cfg.seed).shuffle(by_split["train"])  # posts arrive in id order; shards should not
    for s in ("val", "test"):
        by_split[s].sort(key=lambda t: t.sample.id)  # deterministic evaluation order
    return [t for s in SPLITS for t in by_split[s]], skipped


def _index(shard: Path, broken: dict[Path, str]) -> dict[str, Member]:
    """A crawl shard's readable images by md5. A shard cut short (a half-copied file, a broken stream) gives the
    images before the cut; it is named in a warning and noted in `broken` with the reason its other posts are skipped
    for: truncated_shard, or unreadable_shard for one that is not a tar at all."""
    if not shard.is_file():
        return {}
    try:
        scan = scan_shard(shard)
    except OSError as e:
        scan = None
        broken[shard] = "unreadable_shard"
        log.warning("%s: cannot be read (%s); its posts are skipped as unreadable_shard", shard, e.strerror or e)
    if scan is not None and scan.problem:
        broken[shard] = "truncated_shard" if scan.members else "unreadable_shard"
        log.warning(
            "%s: %s; its readable images are used, the posts of the rest skipped as %s",
            shard,
            scan.problem,
            broken[shard],
        )
    return {m.key: m for m in (scan.members if scan else []) if m.ext != "json"}


def encode(cfg: BuildConfig, tasks: list[Task]) -> Iterator[list[tuple[Task, bytes | None, str]]]:
    """The tasks in chunks, each image made into a sample by a pool of processes: (task, bytes or None, skip
    reason), in the tasks' order."""
    chunks = [tasks[i : i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    workers = cfg.workers or cores()
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent) as pool:
        jobs = (([(t.key, t.member) for t in chunk], cfg.size, cfg.format, cfg.quality) for chunk in chunks)
        for chunk, results in zip(chunks, ordered_map(pool, process_chunk, jobs, 4 * workers), strict=True):
            yield [(task, data, reason) for task, (_, data, reason) in zip(chunk, results, strict=True)]


def write(
    cfg: BuildConfig,
    vocab: Vocab,
    encoded: Iterable[list[tuple[Task, bytes | None, str]]],
    skipped: Counter,
    advance: Callable[[int], None],
) -> tuple[dict[str, SplitInfo], dict[str, list[str]]]:
    """Write the encoded samples into each split's shards: the splits' samples, shards and tag counts, and examples
    of the posts skipped by reason (counted into `skipped`). A full disk is a UserError; no half shard is left."""
    writers = {s: ShardWriter(cfg.out, shard_pattern(s)) for s in SPLITS}
    samples: Counter = Counter()
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    files: dict[str, dict[str, dict]] = {s: {} for s in SPLITS}  # split -> shard -> its size and checksum
    counts = {s: {h: [0] * len(ix) for h, ix in vocab.heads.items()} for s in SPLITS}
    examples: dict[str, list[str]] = {}
    try:
        for chunk in encoded:
            for task, data, reason in chunk:
                if data is None:
                    skipped[reason] += 1
                    examples.setdefault(reason, []).append(f"post {task.sample.id} ({task.member.shard.name})")
                    continue
                split = task.sample.split
                writers[split].add(task.key, task.sample.members(data, cfg.format))
                samples[split] += 1
                for head, positions in task.sample.labels.items():
                    for p in positions:
                        counts[split][head][p] += 1
                if writers[split].count >= cfg.shard_size:
                    _closed(writers[split].close(), shards[split], files[split])
            advance(len(chunk))
        for s, writer in writers.items():
            if (closed := writer.close()) is not None:
                _closed(closed, shards[s], files[s])
    except OSError as e:
        for writer in writers.values():
            writer.abort()
        if is_disk_full(e):
            raise UserError(f"the disk under {cfg.out} is full ({e}); free some space and build again") from e
        raise
    return {s: SplitInfo(samples[s], shards[s], counts[s], files[s]) for s in SPLITS}, examples


def _closed(shard: ShardInfo, names: list[str], files: dict[str, dict]) -> None:
    """Note a finished shard: its name, and its size and sha256 for dataset.json (checked before training)."""
    names.append(shard.name)
    files[shard.name] = {"bytes": shard.size, "sha256": shard.sha256}


def summarise(
    cfg: BuildConfig, vocab: Vocab, splits: dict[str, SplitInfo], skipped: Counter, examples: dict, seconds: float
) -> DatasetInfo:
    """dataset.json's content for this build."""
    return DatasetInfo(
        image_size=cfg.size,
        image_format=cfg.format,
        vocab_hash=vocab.hash,
        heads={h: len(ix) for h, ix in vocab.heads.items()},
        splits=splits,
        skipped=dict(sorted(skipped.items())),
        skipped_examples={k: v[:10] for k, v in sorted(examples.items())},
        sources=[str(d) for d in cfg.dirs],
        config=cfg.as_json(),
        seconds=round(seconds, 2),
    )


def build(cfg: BuildConfig, console: Console | None = None) -> BuildSummary:
    """Build the shards, selected_tags.csv and dataset.json into cfg.out (replacing an earlier build there)."""
    console = console or Console(stderr=True)
    vocab = read_vocab(cfg.vocab)
    t0 = time.perf_counter()
    tasks, skipped = plan(cfg, vocab)

    cfg.out.mkdir(parents=True, exist_ok=True)
    for old in built_files(cfg.out):
        old.unlink(missing_ok=True)  # a rebuild replaces the previous build wholly
    shutil.copyfile(cfg.vocab, cfg.out / VOCAB)

    with contextlib.closing(encode(cfg, tasks)) as encoded, progress_bar(console) as progress:
        bar = progress.add_task("building shards", total=len(tasks), info="")

        def advance(n: int) -> None:
            progress.update(bar, advance=n, info=f"{sum(skipped.values())} skipped")

        splits, examples = write(cfg, vocab, encoded, skipped, advance)
    info = summarise(cfg, vocab, splits, skipped, examples, time.perf_counter() - t0)
    return BuildSummary(write_info(cfg.out, info), info)
