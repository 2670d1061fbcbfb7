"""Batch tagging (`i2v tag`): find the images, decode and prepare them in threads while the model runs, write records.

Images are recognised by their content, in any format Pillow reads, whatever their name. A file that cannot be
tagged is named on stderr with its reason, counted and skipped; the summary says how many. Files met in a folder
that are not images at all (captions, JSON, videos...) are counted apart, quietly: they are not failures.

Pillow releases the GIL while it decodes and resizes, so a few threads keep the model fed; a bounded read-ahead
keeps memory flat on folders of any size. Nothing here imports torch: with an ONNX bundle on the CPU, the whole
command runs on onnxruntime, numpy and Pillow.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import UserError, is_disk_full
from ..util.cores import cores
from ..util.images import BadImage
from .preprocess import prepare, read_image
from .tagger import Selection, Tagger
from .writers import FORMATS, CaptionOptions, caption_path, make_record, open_writer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagConfig:
    """What `i2v tag` was asked to do."""

    paths: tuple[str, ...]
    model: str
    recursive: bool = False
    threshold: float | None = None  # general; None: the bundle's calibrated thresholds, else 0.35
    character_threshold: float | None = None  # None: the bundle's, else 0.85
    mcut: bool = False  # MCut per image, as the WD Space: general at the MCut, character at max(0.15, MCut)
    format: str = "table"
    batch_size: int = 32
    exclude: tuple[str, ...] = ()
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    overwrite: bool = False  # txt: replace existing captions (otherwise their images are skipped)
    device: str = "auto"
    backend: str = "auto"
    shard: tuple[int, int] = (0, 1)  # part I of N of the files, for job arrays
    workers: int | None = None  # decoding threads; None: one per core


@dataclass(frozen=True)
class Item:
    """A file to tag: where it is, the name it is sharded by, and whether the user named it (not found in a walk)."""

    path: Path
    key: str  # its path relative to the argument it was found under: the same on every machine of a job array
    named: bool


@dataclass
class Summary:
    tagged: int = 0
    failed: Counter = field(default_factory=Counter)  # reason -> count
    not_images: int = 0
    captions_kept: int = 0  # txt without --overwrite: images skipped because their caption exists
    files: int = 0  # in this shard
    subfolders_skipped: int = 0  # folders not entered without --recursive
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def line(self) -> str:
        rate = self.tagged / self.seconds if self.seconds > 0 else 0.0
        parts = [f"tagged {_count(self.tagged, 'image')} in {self.seconds:.1f} s ({rate:.1f} images/s)"]
        if self.failed:
            reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in self.failed.most_common())
            parts.append(f"{self.n_failed} failed ({reasons})")
        if self.not_images:
            parts.append(f"{_count(self.not_images, 'non-image file')} passed over (-v lists them)")
        if self.captions_kept:
            parts.append(f"{self.captions_kept} skipped: caption exists (--overwrite replaces)")
        if self.subfolders_skipped:
            parts.append(f"{_count(self.subfolders_skipped, 'subfolder')} not entered (--recursive)")
        return "; ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def parse_exclude(text: str | None) -> tuple[str, ...]:
    """`--exclude "long hair, 1girl"` -> ("long_hair", "1girl"): tags as written in captions or as the model names
    them (spaces or underscores, brackets escaped or not)."""
    if not text:
        return ()
    tags = (t.strip().replace("\\(", "(").replace("\\)", ")") for t in text.split(","))
    return tuple(t.replace(" ", "_") for t in tags if t)


def discover(paths: Sequence[str], recursive: bool, summary: Summary | None = None) -> list[Item]:
    """Every file under the paths, in a stable order (files as given, folders sorted), each once.

    Hidden files and folders (a leading dot) are passed over in folders, as `ls` does. A path that does not exist
    is the user's mistake.
    """
    summary = summary if summary is not None else Summary()
    items: list[Item] = []
    seen: set[str] = set()

    def add(path: Path, key: str, named: bool) -> None:
        ident = os.path.normpath(os.path.abspath(path))
        if ident not in seen:
            seen.add(ident)
            items.append(Item(path, key, named))

    for arg in paths:
        root = Path(arg)
        if root.is_file():
            add(root, root.name, True)
        elif root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                subdirs = sorted(d for d in dirnames if not d.startswith("."))
                if not recursive:
                    summary.subfolders_skipped += len(subdirs)
                    subdirs = []
                dirnames[:] = subdirs
                for name in sorted(filenames):
                    if not name.startswith("."):
                        path = Path(dirpath) / name
                        add(path, path.relative_to(root).as_posix(), False)
        elif root.exists():
            raise UserError(f"{arg}: neither a file nor a folder")
        else:
            raise UserError(f"{arg}: no such file or folder")
    return items


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    """Whether a file belongs to part I of N: by a hash of its relative path, so every machine of a job array agrees
    without coordination, and a file added meanwhile moves no other file."""
    i, n = shard
    return n == 1 or zlib.crc32(key.encode("utf-8", "surrogateescape")) % n == i


def image_extensions() -> frozenset[str]:
    """Every suffix Pillow reads (".jpg", ".webp", ...): a file so named that does not decode is an error."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


class NotImage(Exception):
    """A file found in a folder that is not an image at all: counted, not a failure."""


class CaptionExists(Exception):
    """txt without --overwrite: the image has its caption already, so it is not decoded."""


def load(item: Item, size: int, image_exts: frozenset[str], keep_captions: bool = False) -> np.ndarray:
    """One file -> the model's input for it. Runs in a worker thread.

    Raises:
        NotImage: a file met in a folder, without an image suffix, that Pillow does not recognise.
        CaptionExists: with `keep_captions`, an image whose caption file exists.
        BadImage: anything else that does not decode.
    """
    if not item.named and item.path.suffix.lower() not in image_exts:
        # Sniff the header before reading the whole file: a folder may hold large videos or archives.
        try:
            with Image.open(item.path):
                pass
        except (UnidentifiedImageError, ValueError) as e:
            raise NotImage(str(e)) from None
        except Image.DecompressionBombError:
            pass  # an image after all; read_image names the problem
        except OSError as e:
            raise BadImage(f"cannot read ({e.strerror or e})", "unreadable") from None
    if keep_captions and caption_path(item.path).exists():
        raise CaptionExists()
    return prepare(read_image(item.path, size), size)


def _read_ahead(items: Sequence[Item], work, pool: ThreadPoolExecutor, ahead: int) -> Iterator[tuple[Item, Future]]:
    """Submit work on up to `ahead` items beyond the one being consumed; yield (item, future) in order."""
    pending: deque[tuple[Item, Future]] = deque()
    queue = iter(items)
    for item in queue:
        pending.append((item, pool.submit(work, item)))
        if len(pending) >= ahead:
            break
    while pending:
        item, future = pending.popleft()
        nxt = next(queue, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(work, nxt)))
        yield item, future


def progress_bar(console: Console, label: str) -> Progress:
    """The bar of a batch job over images (`i2v tag`, `i2v embed`): count, images/s, time left."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} images/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def selection_of(cfg: TagConfig) -> Selection:
    if cfg.mcut and (cfg.threshold is not None or cfg.character_threshold is not None):
        raise UserError("--mcut chooses the thresholds per image; give it or --threshold/--character-threshold")
    return Selection(
        general=cfg.threshold,
        character=cfg.character_threshold,
        mcut_general=cfg.mcut,
        mcut_character=cfg.mcut,
        exclude=frozenset(cfg.exclude),
    )


def _check(cfg: TagConfig) -> None:
    if cfg.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {cfg.format!r}")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    for name, t in (("--threshold", cfg.threshold), ("--character-threshold", cfg.character_threshold)):
        if t is not None and not 0.0 <= t <= 1.0:
            raise UserError(f"{name} must be between 0 and 1, not {t}")
    if cfg.overwrite and cfg.format != "txt":
        raise UserError("--overwrite is for --format txt (captions beside the images)")


def _take(item: Item, future: Future, summary: Summary, report) -> np.ndarray | None:
    """A worker's prepared image, or None for a file passed over (counted) or failed (counted and reported)."""
    try:
        return future.result()
    except NotImage as e:
        summary.not_images += 1
        log.debug("%s: not an image (%s)", item.path, e)
    except CaptionExists:
        summary.captions_kept += 1
    except BadImage as e:
        # "not_image" is open_image's word for bytes Pillow cannot decode; here a named or image-named file
        report(item, str(e), "undecodable" if e.reason == "not_image" else e.reason)
    return None


def _own_caption(item: Item, captions: dict[Path, Path], report) -> bool:
    """txt: whether the image's caption file is its alone in this run (a.png and a.jpg would share a.txt)."""
    target = caption_path(item.path)
    first = captions.setdefault(target, item.path)
    if first != item.path or target == item.path:
        report(item, f"its caption {target.name} would be {first.name}'s too; not tagged", "caption clash")
        return False
    return True


def tag_files(
    cfg: TagConfig, out: TextIO | None = None, console: Console | None = None, tagger: Tagger | None = None
) -> Summary:
    """Tag every image under `cfg.paths`; records go to `out` (stdout), reports and progress to `console` (stderr).

    Returns the summary; `summary.n_failed` > 0 means some image could not be tagged.
    """
    out = out or sys.stdout
    console = console or Console(stderr=True)
    logging.getLogger("PIL").setLevel(logging.INFO)  # its DEBUG lines (PNG chunks) would bury -v's list of non-images
    _check(cfg)
    selection = selection_of(cfg)
    summary = Summary()
    items = [it for it in discover(cfg.paths, cfg.recursive, summary) if in_shard(it.key, cfg.shard)]
    tagger = tagger or Tagger.load(cfg.model, backend=cfg.backend, device=cfg.device)
    unknown = sorted(set(cfg.exclude) - set(tagger.labels.names))
    if unknown:
        log.warning("--exclude: not in the model's vocabulary: %s", ", ".join(unknown))
    summary.files = len(items)
    writer = open_writer(cfg.format, out, tagger.labels.heads, cfg.caption)
    workers = cfg.workers or cores()
    keep_captions = cfg.format == "txt" and not cfg.overwrite
    work = partial(load, size=tagger.image_size, image_exts=image_extensions(), keep_captions=keep_captions)
    captions: dict[Path, Path] = {}  # txt: caption file -> the image it is written for, so two never share one
    batch: list[tuple[Item, np.ndarray]] = []

    def report(item: Item, message: str, reason: str) -> None:
        summary.failed[reason] += 1
        console.print(f"{item.path}: {message}", highlight=False, markup=False, soft_wrap=True)

    def flush() -> None:
        if not batch:
            return
        probs, _ = tagger.run(np.stack([x for _, x in batch]))
        for (item, _), p in zip(batch, probs, strict=True):
            try:
                writer.write(make_record(str(item.path), tagger.select(p, selection), cfg.caption), item.path)
            except OSError as e:
                if out_failed(e):
                    raise
                report(item, f"cannot write its caption ({e.strerror or e})", "unwritable")  # txt: a read-only folder
                continue
            summary.tagged += 1
        batch.clear()

    def out_failed(e: OSError) -> bool:  # stdout closed (`| head`) or the disk full: the run stops, not one file
        return cfg.format != "txt" or is_disk_full(e)

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="i2v-decode")
    try:
        with progress_bar(console, "tagging") as progress:
            task = progress.add_task("tag", total=len(items), rate=0.0)
            # Two batches ahead: the next one is decoded while the model runs on this one, and memory stays bounded.
            for item, future in _read_ahead(items, work, pool, ahead=2 * cfg.batch_size + workers):
                progress.advance(task)
                x = _take(item, future, summary, report)
                if x is None or (cfg.format == "txt" and not _own_caption(item, captions, report)):
                    continue
                batch.append((item, x))
                if len(batch) >= cfg.batch_size:
                    flush()
                    elapsed = time.perf_counter() - t0
                    progress.update(task, rate=summary.tagged / elapsed if elapsed else 0.0)
            flush()
            summary.seconds = time.perf_counter() - t0
            progress.update(task, rate=summary.tagged / summary.seconds if summary.seconds else 0.0)
    finally:
        # On Ctrl-C or a failed write, drop the read-ahead instead of decoding it to the end.
        pool.shutdown(wait=True, cancel_futures=True)
    writer.close()
    return summary
