"""The teacher pass of `i2v distill`: a tagger's outputs on unlabelled images, computed once and cached as soft
targets (`formats/teacher.py`), with each image at the student's size beside them.

It runs the one batch engine (`engine.py`): the same discovery (folders, files, tar shards, URLs), decoding in
threads, and bad-item policy (a file that does not decode is named, counted and skipped) as `i2v tag`. Each image is
decoded once, giving both the teacher's input and the student's square (`util.images.pad_resize`, `i2v build`'s
recipe), which is stored as a small JPEG so that the student's epochs never decode the originals again.

The pass is resumable: images go into parts of `part_size`, each finished part recorded; a killed pass, run again,
continues after the last finished part, and no image is written twice.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from ..errors import UserError
from ..formats import teacher as cache
from ..formats.bundle import open_bundle
from ..formats.vectors import weights_hash
from ..formats.vocab import Vocab, read_vocab
from ..util.images import pad_resize
from .engine import BatchSummary, Engine, check_job, discover, full_path, resolve_batch_size, shown
from .preprocess import prepare, read_image
from .tagger import Tagger

JPEG_QUALITY = 95  # i2v build's default
MIN_SAMPLES = {"train": 2, "val": 1}  # the fewest images per split a student can be trained and measured on


@dataclass(frozen=True)
class TeachConfig:
    """The teacher pass: which model, which images, the student's size, and where the cache goes."""

    teacher: str
    paths: tuple[str, ...]
    size: int  # the student's input side
    cache: str
    val_fraction: float = 0.1
    part_size: int = 256  # images a part: the most a killed pass does again
    batch_size: int | str = "auto"  # the teacher's batches (--batch-size auto: the rule of i2v tag)
    workers: int | None = None  # decoding threads; None: one per core
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"  # the teacher's outputs are the targets: full precision unless asked
    recursive: bool = True
    shard: tuple[int, int] | str = (0, 1)  # all of the images (check_job checks it as i2v tag's --shard)
    max_parts: int | None = None  # stop after this many parts (tests, and splitting a long pass)

    def __post_init__(self) -> None:
        check_job(self)
        if not self.paths:
            raise UserError("--images: name at least one folder, file or tar shard")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 16 <= self.size <= 2048:
            raise UserError(f"--size must be a whole number of pixels from 16 to 2048, not {self.size!r}")
        if not isinstance(self.val_fraction, int | float) or not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be between 0 and 1, not {self.val_fraction!r}")
        if not isinstance(self.part_size, int) or self.part_size < 1:
            raise UserError(f"--part-size must be at least 1, not {self.part_size!r}")
        if self.max_parts is not None and (not isinstance(self.max_parts, int) or self.max_parts < 1):
            raise UserError(f"max_parts must be at least 1 (or None), not {self.max_parts!r}")


@dataclass
class TeachSummary:
    """What the teacher pass did: images cached per split (in all, this run and before), failures, time."""

    cache: str
    teacher: str
    samples: dict[str, int] = field(default_factory=dict)  # split -> cached images, all parts
    done: int = 0  # images the teacher ran on in this run
    before: int = 0  # images cached by an earlier run (resumed)
    failed: Counter = field(default_factory=Counter)
    not_images: int = 0
    finished: bool = False  # every part done; dataset.json written
    seconds: float = 0.0
    device: str = ""

    def line(self) -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        parts = [f"teacher ran on {self.done} images in {self.seconds:.1f} s ({rate:.1f} images/s)"]
        if self.before:
            parts = [f"teacher: {self.before} images cached before (resumed)"] + (parts if self.done else [])
        if self.failed:
            reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in self.failed.most_common())
            parts.append(f"{sum(self.failed.values())} failed ({reasons})")
        if self.not_images:
            parts.append(f"{self.not_images} non-image files passed over")
        split = ", ".join(f"{n} {s}" for s, n in self.samples.items())
        parts.append(f"cache {self.cache}: {split}" + ("" if self.finished else " (unfinished)"))
        return "; ".join(parts)


def teach(cfg: TeachConfig, console: Console | None = None) -> TeachSummary:
    """Run the teacher over the images not cached yet; returns what the cache holds."""
    console = console or Console(stderr=True)
    tagger = Tagger.load(cfg.teacher, backend=cfg.backend, device=cfg.device, precision=cfg.precision)
    vocab = teacher_vocab(tagger)
    check_teacher(tagger, vocab)
    summary = BatchSummary("taught")
    items = discover(cfg.paths, cfg.recursive, summary)
    if not items:
        raise UserError(f"--images {' '.join(cfg.paths)}: no files found")
    paths = [full_path(i.path) for i in items]
    root = Path(cfg.cache)
    info = identity(cfg, tagger, vocab, paths)
    records = open_cache(root, info, vocab)
    n_parts = math.ceil(len(items) / cfg.part_size)
    start = len(records)
    stop = n_parts if cfg.max_parts is None else min(n_parts, start + cfg.max_parts)
    out = TeachSummary(str(root), tagger.source, before=sum(r.written for r in records))
    if start < n_parts:
        cache.clear_unfinished(root, start)
        todo = items[start * cfg.part_size : stop * cfg.part_size]
        records += _run_parts(cfg, tagger, vocab, todo, start, summary, console)
        out.done = sum(r.written for r in records[start:])
    out.failed, out.not_images, out.seconds = summary.failed, summary.not_images, summary.seconds
    out.samples = {s: sum(r.samples.get(s, 0) for r in records) for s in cache.SPLITS}
    if len(records) == n_parts:
        check_enough(out.samples, sum(r.items for r in records), cfg.val_fraction)
        if not cache.is_finished(root):
            cache.finish(root, info, vocab, records, list(cfg.paths))
        out.finished = True
    return out


def teacher_vocab(tagger: Tagger) -> Vocab:
    """The teacher's vocabulary with its categories: a bundle's (both label files), or a WD tagger's file."""
    root = Path(tagger.source)
    vocab = open_bundle(root).vocab if tagger.kind == "bundle" else read_vocab(root / "selected_tags.csv")
    if tuple(vocab.names) != tuple(tagger.labels.names):
        raise UserError(f"{tagger.source}: its label files do not list its outputs in order")
    return vocab


def check_teacher(tagger: Tagger, vocab: Vocab) -> None:
    """A student learns the teacher's heads, rating among them: a teacher without one cannot be distilled."""
    if "rating" not in vocab.heads:
        raise UserError(
            f"--teacher {tagger.source}: its vocabulary has no rating head (rating tags, category 9); "
            "a distilled student has the teacher's heads and a rating"
        )


def identity(cfg: TeachConfig, tagger: Tagger, vocab: Vocab, paths: list[str]) -> cache.TeacherInfo:
    return cache.TeacherInfo(
        source=tagger.source,
        kind=tagger.kind,
        weights=weights_hash(Path(tagger.source)),
        image_size=tagger.image_size,
        size=cfg.size,
        vocab_hash=vocab.hash,
        activations=dict(tagger.labels.activations),
        thresholds=tagger.thresholds.to_json(),
        val_fraction=float(cfg.val_fraction),
        part_size=cfg.part_size,
        items=len(paths),
        items_hash=cache.items_hash(paths),
    )


def open_cache(root: Path, info: cache.TeacherInfo, vocab: Vocab) -> list[cache.PartRecord]:
    """The finished parts of the cache at `root` (none for a new one); a cache of another teacher, size or image
    list is refused."""
    old = cache.read_identity(root)
    if old is None:
        if root.exists() and any(root.iterdir()):
            raise UserError(f"--teacher-cache {root}: not empty, and not a teacher cache; choose another folder")
        cache.write_identity(root, info, vocab)
        return []
    differs = old.differences(info)
    if differs:
        raise UserError(
            f"--teacher-cache {root} was made with another {', '.join(differs)} "
            f"(teacher {old.source}, size {old.size}, {old.items} files); remove it or choose another folder"
        )
    return cache.finished_parts(root)


def check_enough(samples: dict[str, int], items: int, val_fraction: float) -> None:
    """Enough decodable images for a training split and a held-out one."""
    short = [s for s, n in MIN_SAMPLES.items() if samples.get(s, 0) < n]
    if short:
        need = max(math.ceil(MIN_SAMPLES["val"] / val_fraction), sum(MIN_SAMPLES.values()))
        raise UserError(
            f"--images: {sum(samples.values())} decodable images of {items} files, "
            f"{samples.get('train', 0)} for training and {samples.get('val', 0)} held out at --val-fraction "
            f"{val_fraction:g}; distillation needs at least {need}"
        )


def both_sizes(student: int):
    """The engine's decoder: one decode -> (the teacher's input, the student's square as JPEG bytes)."""

    def decode(source, size: int) -> tuple[np.ndarray, bytes]:
        image = read_image(source, max(size, student))
        buf = io.BytesIO()
        pad_resize(image, student).save(buf, "JPEG", quality=JPEG_QUALITY)
        return prepare(image, size), buf.getvalue()

    return decode


def decisions(probs: np.ndarray, vocab: Vocab, thresholds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """One image's teacher decisions as a sample's labels: rating its arg-max, other heads strictly above their
    thresholds (as `Tagger.select` decides)."""
    labels = {}
    for head, ix in vocab.heads.items():
        p = probs[list(ix)]
        labels[head] = [int(np.argmax(p))] if head == "rating" else np.flatnonzero(p > thresholds[head]).tolist()
    return labels


def column_thresholds(tagger: Tagger, vocab: Vocab) -> dict[str, np.ndarray]:
    """Each head's threshold per tag: the tag's own where the teacher has one, else its head's."""
    t = tagger.thresholds
    return {
        head: np.asarray([t.tags.get(vocab.names[i], t.heads.get(head, 0.5)) for i in ix], np.float32)
        for head, ix in vocab.heads.items()
    }


class _Parts:
    """The part being written while the engine hands over batches: an image from a later part closes the parts
    before it."""

    def __init__(self, root: Path, size: int, first: int, end: int, heads: dict[str, int]):
        self.root, self.size, self.end, self.heads = root, size, end, heads  # end: one past the last position
        self.records: list[cache.PartRecord] = []
        self.writer = self._open(first)

    def _open(self, index: int) -> cache.PartWriter:
        items = min(self.size, self.end - index * self.size)
        return cache.PartWriter(self.root, index, items, self.heads)

    def at(self, position: int) -> cache.PartWriter:
        """The writer of the part that holds `position`, closing the parts before it."""
        while position // self.size > self.writer.index:
            self.records.append(self.writer.close())
            self.writer = self._open(self.writer.index + 1)
        return self.writer

    def close(self) -> list[cache.PartRecord]:
        """Close the rest, up to the last part (also parts whose images all failed)."""
        self.at(self.end - 1)
        self.records.append(self.writer.close())
        return self.records


def _run_parts(
    cfg: TeachConfig, tagger: Tagger, vocab: Vocab, items: list, first: int, summary: BatchSummary, console: Console
) -> list[cache.PartRecord]:
    """The teacher over `items` (parts `first`, `first` + 1, ...): each part written, then recorded."""
    start = first * cfg.part_size
    position = {id(item): start + i for i, item in enumerate(items)}
    parts = _Parts(
        Path(cfg.cache), cfg.part_size, first, start + len(items), {h: len(ix) for h, ix in vocab.heads.items()}
    )
    thresholds = column_thresholds(tagger, vocab)
    batch_size = resolve_batch_size(cfg.batch_size, tagger)
    engine = Engine(summary, tagger.image_size, console, batch_size, cfg.workers, decoder=both_sizes(cfg.size))

    def consume(batch) -> None:
        probs, _ = tagger.run(np.stack([x for _, (x, _) in batch]))
        for (item, (_, jpeg)), p in zip(batch, probs, strict=True):
            at = position[id(item)]
            key = cache.sample_key(full_path(item.path))
            split = cache.split_of(key, cfg.val_fraction)
            labels = decisions(p, vocab, thresholds)
            record = {"id": at, "md5": key, "rating": "", "labels": labels, "split": split, "path": shown(item.path)}
            parts.at(at).add(key, split, cache.sample_members(jpeg, record, p), labels)
            summary.done += 1

    try:
        engine.run(items, consume, "teacher")
        return parts.close()
    except BaseException:
        parts.writer.abort()
        raise
