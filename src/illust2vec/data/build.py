"""`i2v build`: crawled posts and images -> square training shards with labels, split train/val/test.

Crawls, the vocabulary and the output may be URLs (`s3://...`, `gs://...`; `https://...` for reading). A remote
crawl's image shards are downloaded to a temporary folder for the build; the shards of a remote output are written
locally, each uploaded once finished, and dataset.json last, so that its presence says the rest is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import multiprocessing
import random
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
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
from ..util import storage
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

    dirs: tuple[storage.Location, ...]  # crawl directories: paths or URLs
    vocab: storage.Location
    out: storage.Location
    size: int = 256
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    format: str = "jpg"
    quality: int = 95
    workers: int | None = None  # processes; None: one per core
    shard_size: int = 1000  # samples per shard
    seed: int = 0  # order of the training samples in the shards
    aliases: storage.Location | None = None  # old tag name -> new, as `i2v vocab --aliases` applied before counting

    def __post_init__(self) -> None:
        # Paths for local places, URL strings for remote ones; an unknown scheme or a read-only output is one line.
        object.__setattr__(self, "dirs", tuple(storage.location(d, "crawl directory") for d in self.dirs))
        object.__setattr__(self, "vocab", storage.location(self.vocab, "--vocab"))
        object.__setattr__(self, "out", storage.location(self.out, "--out", write=True))
        object.__setattr__(self, "aliases", storage.location(self.aliases, "--aliases") if self.aliases else None)
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
            "dirs": [storage.display(d) for d in self.dirs],
            "vocab": storage.display(self.vocab),
            "out": storage.display(self.out),
            "aliases": storage.display(self.aliases) if self.aliases else None,
        }


@dataclass(frozen=True)
class BuildSummary:
    """What `build` wrote: dataset.json (`path`) and its content (`info`)."""

    path: storage.Location
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


class CrawlShards:
    """A crawl's image shards as local files, for the workers to read images from: a local shard as it is, a remote
    one downloaded into `tmp` the first time a post needs it (kept until the build ends, as the shuffled training
    split may need any shard until the last sample)."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.downloaded = 0

    def local(self, shard: storage.Location) -> Path | None:
        """The local file holding `shard`, or None when there is no such file."""
        if storage.is_local(shard):
            path = storage.local_path(shard)
            return path if path.is_file() else None
        if not storage.exists(shard):
            return None
        self.tmp.mkdir(parents=True, exist_ok=True)
        dest = self.tmp / f"{self.downloaded:06d}-{storage.name(shard)}"
        storage.download(shard, dest)
        self.downloaded += 1
        return dest


def plan(cfg: BuildConfig, vocab: Vocab, sources: CrawlShards) -> tuple[list[Task], Counter]:
    """Which posts go where, in the order they are written: labels, split and the crawl shard member holding each
    image; the posts left out counted by reason. Training samples are shuffled (from the seed), val and test go by
    post id, so that evaluation reads them in a fixed order."""
    skipped: Counter = Counter()
    aliases = read_aliases(cfg.aliases) if cfg.aliases else {}
    members: dict[str, dict[str, Member]] = {}
    broken: dict[str, str] = {}  # crawl shards cut short or unreadable -> the skip reason of the posts they lost
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
            shard = str(storage.join(crawl_dir, row["shard"])) if row["shard"] else ""
            if shard not in members:
                members[shard] = _index(shard, broken, sources) if shard else {}
            member = members[shard].get(row["md5"])
            if member is None and shard in broken:
                skipped[broken[shard]] += 1  # in the part of a cut shard that is gone: one warning, for the shard
                continue
            if member is None:
                skipped["missing_image"] += 1
                log.warning("post %s: image %s not found in %s", row["id"], row["md5"], storage.display(shard))
                continue
            split = split_of(row["id"], row["parent_id"], cfg.val_fraction, cfg.test_fraction)
            sample = Sample(row["id"], row["md5"], row["rating"] or "", labels, split)
            by_split[split].append(Task(row["md5"], member, sample))
    random.Random(cfg.seed).shuffle(by_split["train"])  # posts arrive in id order; shards should not
    for s in ("val", "test"):
        by_split[s].sort(key=lambda t: t.sample.id)  # deterministic evaluation order
    return [t for s in SPLITS for t in by_split[s]], skipped


def _index(shard: str, broken: dict[str, str], sources: CrawlShards) -> dict[str, Member]:
    """A crawl shard's readable images by md5 (members of its local copy). A shard cut short (a half-copied file, a
    broken stream) gives the images before the cut; it is named in a warning and noted in `broken` with the reason
    its other posts are skipped for: truncated_shard, or unreadable_shard for one that is not a tar at all."""
    path = sources.local(shard)
    if path is None:
        return {}
    shown = storage.display(shard)
    try:
        scan = scan_shard(path)
    except OSError as e:
        scan = None
        broken[shard] = "unreadable_shard"
        log.warning("%s: cannot be read (%s); its posts are skipped as unreadable_shard", shown, e.strerror or e)
    if scan is not None and scan.problem:
        broken[shard] = "truncated_shard" if scan.members else "unreadable_shard"
        log.warning(
            "%s: %s; its readable images are used, the posts of the rest skipped as %s",
            shown,
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


class Output:
    """Where the shards go: written into `root` (the output itself when local, a temporary folder when remote), each
    finished one handed to `publish`, which uploads a remote output's shards in a background thread (at most two
    waiting, so the local folder holds a few shards, not the data set) and removes the local copy."""

    def __init__(self, out: storage.Location, tmp: Path):
        self.out = out
        self.root = storage.local_path(out) if storage.is_local(out) else Path(tmp)
        self.root.mkdir(parents=True, exist_ok=True)
        self._uploads = ThreadPoolExecutor(1) if storage.is_remote(out) else None
        self._pending: deque[Future] = deque()

    def clear(self) -> None:
        """Remove an earlier build's files (dataset.json first): a rebuild replaces it wholly."""
        for old in built_files(self.out):
            storage.remove(old)

    def publish(self, name: str) -> None:
        if self._uploads is None:
            return
        while len(self._pending) >= 2:
            self._pending.popleft().result()
        self._pending.append(self._uploads.submit(self._upload, name))

    def _upload(self, name: str) -> None:
        storage.upload(self.root / name, storage.join(self.out, name))
        (self.root / name).unlink()

    def finish(self) -> None:
        """Wait for the uploads; the first that failed raises (its UserError names the object)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        if self._uploads is not None:
            for job in self._pending:
                job.cancel()
            self._uploads.shutdown(wait=True)


def write(
    cfg: BuildConfig,
    vocab: Vocab,
    encoded: Iterable[list[tuple[Task, bytes | None, str]]],
    skipped: Counter,
    advance: Callable[[int], None],
    output: Output,
) -> tuple[dict[str, SplitInfo], dict[str, list[str]]]:
    """Write the encoded samples into each split's shards: the splits' samples, shards and tag counts, and examples
    of the posts skipped by reason (counted into `skipped`). A full disk is a UserError; no half shard is left."""
    writers = {s: ShardWriter(output.root, shard_pattern(s)) for s in SPLITS}
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
                    _closed(writers[split].close(), shards[split], files[split], output)
            advance(len(chunk))
        for s, writer in writers.items():
            if (closed := writer.close()) is not None:
                _closed(closed, shards[s], files[s], output)
        output.finish()
    except OSError as e:
        for writer in writers.values():
            writer.abort()
        if is_disk_full(e):
            raise UserError(f"the disk under {output.root} is full ({e}); free some space and build again") from e
        raise
    return {s: SplitInfo(samples[s], shards[s], counts[s], files[s]) for s in SPLITS}, examples


def _closed(shard: ShardInfo, names: list[str], files: dict[str, dict], output: Output) -> None:
    """Note a finished shard: its name, and its size and sha256 for dataset.json (checked before training); and
    publish it."""
    names.append(shard.name)
    files[shard.name] = {"bytes": shard.size, "sha256": shard.sha256}
    output.publish(shard.name)


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
        sources=[storage.display(d) for d in cfg.dirs],
        config=cfg.as_json(),
        seconds=round(seconds, 2),
    )


def build(cfg: BuildConfig, console: Console | None = None) -> BuildSummary:
    """Build the shards, selected_tags.csv and dataset.json into cfg.out (replacing an earlier build there)."""
    console = console or Console(stderr=True)
    vocab = read_vocab(cfg.vocab)
    storage.check_writable_root(cfg.out)  # a missing bucket is named now, not after the images are read
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="i2v-build-") as tmp:
        tasks, skipped = plan(cfg, vocab, CrawlShards(Path(tmp) / "crawl"))
        output = Output(cfg.out, Path(tmp) / "out")
        output.clear()
        storage.write_bytes(storage.join(cfg.out, VOCAB), storage.read_bytes(cfg.vocab))

        with contextlib.closing(encode(cfg, tasks)) as encoded, progress_bar(console) as progress:
            bar = progress.add_task("building shards", total=len(tasks), info="")

            def advance(n: int) -> None:
                progress.update(bar, advance=n, info=f"{sum(skipped.values())} skipped")

            try:
                splits, examples = write(cfg, vocab, encoded, skipped, advance, output)
            finally:
                output.close()
    info = summarise(cfg, vocab, splits, skipped, examples, time.perf_counter() - t0)
    return BuildSummary(write_info(cfg.out, info), info)
