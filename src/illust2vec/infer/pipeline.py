"""Batch tagging (`i2v tag`): the engine (`engine.py`) finds and decodes the images; this writes their records.

A file that cannot be tagged is named on stderr with its reason, counted and skipped; the summary says how many.
With an ONNX bundle on the CPU, the whole command runs on onnxruntime, numpy and Pillow: nothing here imports torch.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from rich.console import Console

from ..errors import UserError, is_disk_full
from ..util.shard import in_shard
from .engine import Batch, BatchSummary, Engine, Item, check_job, discover
from .tagger import Tagger
from .thresholds import Selection
from .writers import FORMATS, CaptionOptions, Writer, caption_path, make_record, open_writer

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
    shard: tuple[int, int] = (0, 1)  # part I of N of the files, for job arrays ("I/N" is taken too)
    workers: int | None = None  # decoding threads; None: one per core

    def __post_init__(self) -> None:
        check_job(self)
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        for name, t in (("--threshold", self.threshold), ("--character-threshold", self.character_threshold)):
            if t is not None and not 0.0 <= t <= 1.0:
                raise UserError(f"{name} must be between 0 and 1, not {t}")
        if self.mcut and (self.threshold is not None or self.character_threshold is not None):
            raise UserError("--mcut chooses the thresholds per image; give it or --threshold/--character-threshold")
        if self.overwrite and self.format != "txt":
            raise UserError("--overwrite is for --format txt (captions beside the images)")

    @property
    def selection(self) -> Selection:
        return Selection(
            general=self.threshold,
            character=self.character_threshold,
            mcut_general=self.mcut,
            mcut_character=self.mcut,
            exclude=frozenset(self.exclude),
        )


def parse_exclude(text: str | None) -> tuple[str, ...]:
    """`--exclude "long hair, 1girl"` -> ("long_hair", "1girl"): tags as written in captions or as the model names
    them (spaces or underscores, brackets escaped or not)."""
    if not text:
        return ()
    tags = (t.strip().replace("\\(", "(").replace("\\)", ")") for t in text.split(","))
    return tuple(t.replace(" ", "_") for t in tags if t)


def _own_caption(engine: Engine, item: Item, captions: dict[Path, Path]) -> bool:
    """txt: whether the image's caption file is its alone in this run (a.png and a.jpg would share a.txt)."""
    target = caption_path(item.path)
    first = captions.setdefault(target, item.path)
    if first != item.path or target == item.path:
        engine.fail(item, f"its caption {target.name} would be {first.name}'s too; not tagged", "caption_clash")
        return False
    return True


def tag_files(
    cfg: TagConfig, out: TextIO | None = None, console: Console | None = None, tagger: Tagger | None = None
) -> BatchSummary:
    """Tag every image under `cfg.paths`; records go to `out` (stdout), reports and progress to `console` (stderr).

    Returns the summary; `summary.n_failed` > 0 means some image could not be tagged.
    """
    out = out or sys.stdout
    console = console or Console(stderr=True)
    logging.getLogger("PIL").setLevel(logging.INFO)  # its DEBUG lines (PNG chunks) would bury -v's list of non-images
    selection = cfg.selection
    summary = BatchSummary("tagged")
    items = [it for it in discover(cfg.paths, cfg.recursive, summary) if in_shard(it.key, cfg.shard)]
    tagger = tagger or Tagger.load(cfg.model, backend=cfg.backend, device=cfg.device)
    unknown = sorted(set(cfg.exclude) - set(tagger.labels.names))
    if unknown:
        log.warning("--exclude: not in the model's vocabulary: %s", ", ".join(unknown))
    summary.files = len(items)
    writer = open_writer(cfg.format, out, tagger.labels.heads, cfg.caption)
    captions: dict[Path, Path] = {}  # txt: caption file -> the image it is written for, so two never share one
    engine = Engine(summary, tagger.image_size, console, cfg.batch_size, cfg.workers)
    engine.keep_captions = cfg.format == "txt" and not cfg.overwrite
    if cfg.format == "txt":
        engine.accept = lambda item: _own_caption(engine, item, captions)

    def consume(batch: Batch) -> None:
        probs, _ = tagger.run(np.stack([x for _, x in batch]))
        for (item, _), p in zip(batch, probs, strict=True):
            record = make_record(str(item.path), tagger.select(p, selection), cfg.caption)
            if _write(writer, record, item, engine, cfg.format):
                summary.done += 1

    engine.run(items, consume, "tagging")
    writer.close()
    return summary


def _write(writer: Writer, record: dict, item: Item, engine: Engine, format: str) -> bool:
    """One record out; a caption that cannot be written beside its image (a read-only folder) fails that image only.
    A closed stdout (`| head`) or a full disk stops the run."""
    try:
        writer.write(record, item.path)
    except OSError as e:
        if format != "txt" or is_disk_full(e):
            raise
        engine.fail(item, f"cannot write its caption ({e.strerror or e})", "unwritable")
        return False
    return True
